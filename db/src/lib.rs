//! Zova's database: diesel over SQLite (file, WAL) with embedded migrations; soft-deleted rows
//! as in Nova.
//!
//! A [`Db`] is a cheap-to-clone handle on a connection pool. Every method is synchronous and
//! short; async callers run them under `tokio::task::spawn_blocking`. A live row has
//! `deleted = 0`; soft deletion sets `deleted = id`, and every read skips deleted rows.

mod admin;
mod catalog;
mod error;
mod identity;
mod instances;
mod keypairs;
mod models;
mod networks;
mod placement;
pub mod schema;
mod servers;
mod services;

use std::path::Path;
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

pub use admin::{ArchivedRows, MigrationInfo, NewImage, SchemaStatus};
pub use catalog::NewFlavor;
pub use error::{DbError, Result};
pub use identity::{
    effective_roles, Bootstrap, LiveToken, Project, Role, RoleAssignment, Token, User,
    BOOTSTRAP_NAME, DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME,
};
pub use instances::ExpectedTask;
pub use keypairs::{KeyPair, NewKeyPair};
pub use models::{
    ComputeNode, ComputeNodeValues, Flavor, Image, Instance, InstanceAction, InstanceChanges,
    InstanceFault, NewFault, NewInstance, Service,
};
pub use networks::{pool_addresses, FixedIp, Network, NetworkUsage};
pub use placement::{AllocationClaim, ClaimOutcome, Placed};
pub use servers::{instances_that_fit, InstanceFilter, QuotaExceeded, QuotaLimits, QuotaUsage};

/// The schema, compiled into the binary so a fresh host needs nothing but the database path.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Connections kept open; SQLite has one writer at a time, so more would only queue.
const POOL_SIZE: u32 = 8;

/// How long a writer waits for SQLite's lock before giving up with "database is locked".
const BUSY_TIMEOUT_MS: u32 = 5000;

/// Tries of the open-time set-up when a concurrent opener holds SQLite's lock, and the pause
/// between them.
const OPEN_ATTEMPTS: u32 = 20;
const OPEN_RETRY_DELAY: Duration = Duration::from_millis(50);

/// How long a caller waits for a free pooled connection.
const POOL_TIMEOUT: Duration = Duration::from_secs(10);

/// The image every fresh database offers, so a first boot needs no upload.
const SEED_IMAGE_UUID: &str = "155d900f-4e14-4e4c-a73d-069cbf4541e6";

/// The network every fresh database offers: (name, cidr, gateway).
const SEED_NETWORK: (&str, &str, &str) = ("private", "10.0.0.0/24", "10.0.0.1");

/// Nova's classic flavors: (flavorid, name, vcpus, memory_mb, root_gb).
const SEED_FLAVORS: [(&str, &str, i64, i64, i64); 5] = [
    ("1", "m1.tiny", 1, 512, 1),
    ("2", "m1.small", 1, 2048, 20),
    ("3", "m1.medium", 2, 4096, 40),
    ("4", "m1.large", 4, 8192, 80),
    ("5", "m1.xlarge", 8, 16384, 160),
];

type Conn = PooledConnection<ConnectionManager<SqliteConnection>>;

/// A handle on Zova's database.
#[derive(Clone)]
pub struct Db {
    pool: Pool<ConnectionManager<SqliteConnection>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("state", &self.pool.state())
            .finish()
    }
}

/// Settings every connection needs. busy_timeout comes first so that switching to WAL waits
/// for a concurrent opener instead of failing at once.
#[derive(Debug)]
struct Pragmas;

impl Pragmas {
    fn apply(conn: &mut SqliteConnection) -> QueryResult<()> {
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS};
             PRAGMA journal_mode = WAL;
             PRAGMA foreign_keys = ON;
             PRAGMA synchronous = NORMAL;"
        ))
    }
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(
        &self,
        conn: &mut SqliteConnection,
    ) -> std::result::Result<(), diesel::r2d2::Error> {
        Pragmas::apply(conn).map_err(diesel::r2d2::Error::QueryError)
    }
}

impl Db {
    /// Opens (creating if needed) the database at `url`, a file path or `sqlite://PATH`, brings
    /// its schema up to date and seeds the default flavors and image into a fresh database.
    pub fn open(url: &str) -> Result<Db> {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        let connection_error = |reason: String| DbError::Connection {
            url: url.to_string(),
            reason,
        };
        if path.is_empty() {
            return Err(connection_error("the path is empty".to_string()));
        }
        if let Some(parent) = Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    connection_error(format!("cannot create directory {}: {e}", parent.display()))
                })?;
            }
        }

        // Set up on one plain connection first: a bad path then fails at once with SQLite's
        // own reason, rather than after the pool's timeout with a generic one.
        let set_up = || -> Result<()> {
            let mut conn =
                SqliteConnection::establish(path).map_err(|e| connection_error(e.to_string()))?;
            Pragmas::apply(&mut conn).map_err(|e| connection_error(e.to_string()))?;
            migrate_and_seed(&mut conn)
        };
        // Two openers of a fresh file can both ask to switch it to WAL; SQLite then fails one at
        // once with "database is locked" rather than wait (the busy handler would deadlock).
        // The switch is done by then, so trying again succeeds.
        let mut attempts = 1;
        loop {
            match set_up() {
                Err(e)
                    if attempts < OPEN_ATTEMPTS && e.to_string().contains("database is locked") =>
                {
                    attempts += 1;
                    std::thread::sleep(OPEN_RETRY_DELAY);
                }
                other => break other?,
            }
        }

        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .connection_timeout(POOL_TIMEOUT)
            .connection_customizer(Box::new(Pragmas))
            .build(ConnectionManager::<SqliteConnection>::new(path))
            .map_err(|e| connection_error(e.to_string()))?;
        Ok(Db { pool })
    }

    /// One trivial query: whether the database answers at all (health checks).
    pub fn ping(&self) -> Result<()> {
        let mut conn = self.conn()?;
        conn.batch_execute("SELECT 1")?;
        Ok(())
    }

    /// How many rows (live and soft-deleted) the tables the compute API writes hold, in the
    /// order of [`API_TABLES`]. Tests compare them around a refused request, which must change
    /// nothing.
    pub fn api_row_counts(&self) -> Result<Vec<i64>> {
        use diesel::dsl::count_star;
        let mut conn = self.conn()?;
        Ok(vec![
            schema::instances::table
                .select(count_star())
                .first(&mut conn)?,
            schema::instance_actions::table
                .select(count_star())
                .first(&mut conn)?,
            schema::key_pairs::table
                .select(count_star())
                .first(&mut conn)?,
            schema::flavors::table
                .select(count_star())
                .first(&mut conn)?,
            schema::flavor_extra_specs::table
                .select(count_star())
                .first(&mut conn)?,
            schema::users::table.select(count_star()).first(&mut conn)?,
            schema::projects::table
                .select(count_star())
                .first(&mut conn)?,
            schema::quotas::table
                .select(count_star())
                .first(&mut conn)?,
        ])
    }

    fn conn(&self) -> Result<Conn> {
        self.pool.get().map_err(|e| DbError::Pool(e.to_string()))
    }
}

/// The tables [`Db::api_row_counts`] counts.
pub const API_TABLES: [&str; 8] = [
    "instances",
    "instance_actions",
    "key_pairs",
    "flavors",
    "flavor_extra_specs",
    "users",
    "projects",
    "quotas",
];

/// The current time as stored in every timestamp column.
fn now() -> NaiveDateTime {
    Utc::now().naive_utc()
}

/// Checks that `text` is a JSON object before it goes into the JSON column `what`.
fn check_json_object(what: &str, text: &str) -> Result<()> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(DbError::Json(format!(
            "{what} must be a JSON object, got {text}"
        ))),
        Err(e) => Err(DbError::Json(format!("{what}: {e}"))),
    }
}

/// Brings the schema up to date and seeds a fresh database under one exclusive lock: every
/// service opens the database at start-up, and the all-in-one starts them together, so without
/// the lock two of them could both see the schema missing and the second would fail on
/// `CREATE TABLE`. The others wait on busy_timeout, then find nothing pending.
fn migrate_and_seed(conn: &mut SqliteConnection) -> Result<()> {
    conn.exclusive_transaction(|conn| {
        conn.run_pending_migrations(MIGRATIONS)
            .map_err(|e| DbError::Migration(e.to_string()))?;
        seed(conn)
    })
}

/// Fills a fresh database with the default flavors, image and network. Each table is seeded only when it
/// has never held a row, so reopening never duplicates and deleting a seed row is permanent.
fn seed(conn: &mut SqliteConnection) -> Result<()> {
    use schema::{flavors, images};
    conn.transaction(|conn| {
        let created_at = now();
        let flavor_rows: i64 = flavors::table.count().get_result(conn)?;
        if flavor_rows == 0 {
            for (flavorid, name, vcpus, memory_mb, root_gb) in SEED_FLAVORS {
                diesel::insert_into(flavors::table)
                    .values((
                        flavors::flavorid.eq(flavorid),
                        flavors::name.eq(name),
                        flavors::vcpus.eq(vcpus),
                        flavors::memory_mb.eq(memory_mb),
                        flavors::root_gb.eq(root_gb),
                        flavors::ephemeral_gb.eq(0),
                        flavors::swap_mb.eq(0),
                        flavors::is_public.eq(true),
                        flavors::disabled.eq(false),
                        flavors::created_at.eq(created_at),
                    ))
                    .execute(conn)?;
            }
        }
        let image_rows: i64 = images::table.count().get_result(conn)?;
        if image_rows == 0 {
            diesel::insert_into(images::table)
                .values((
                    images::uuid.eq(SEED_IMAGE_UUID),
                    images::name.eq("cirros-0.6.2-x86_64-disk"),
                    images::disk_format.eq("qcow2"),
                    images::container_format.eq("bare"),
                    images::status.eq("active"),
                    images::min_disk.eq(0),
                    images::min_ram.eq(0),
                    images::size_bytes.eq(21_430_272),
                    images::location.eq(None::<String>),
                    images::created_at.eq(created_at),
                ))
                .execute(conn)?;
        }
        let network_rows: i64 = schema::networks::table.count().get_result(conn)?;
        if network_rows == 0 {
            let (name, cidr, gateway) = SEED_NETWORK;
            networks::insert_network(conn, name, cidr, gateway, None)?;
        }
        Ok(())
    })
}

#[cfg(test)]
pub(crate) mod testing {
    use super::{Db, NewInstance};

    /// A building instance of m1.tiny in `project_id`.
    pub(crate) fn new_instance(uuid: &str, project_id: &str) -> NewInstance {
        NewInstance {
            uuid: uuid.to_string(),
            display_name: format!("vm-{uuid}"),
            project_id: project_id.to_string(),
            user_id: "alice".to_string(),
            flavorid: "1".to_string(),
            image_ref: "155d900f-4e14-4e4c-a73d-069cbf4541e6".to_string(),
            vcpus: 1,
            memory_mb: 512,
            root_gb: 1,
            ephemeral_gb: 0,
            swap_mb: 0,
            vm_state: "building".to_string(),
            task_state: Some("scheduling".to_string()),
            power_state: 0,
            scheduler_hints: "{}".to_string(),
            metadata: r#"{"role": "web"}"#.to_string(),
            reservation_id: "r-1".to_string(),
            launch_index: 0,
            description: None,
            key_name: None,
            flavor_snapshot: "{}".into(),
        }
    }

    /// A database in its own temporary directory; keep the directory alive as long as the `Db`.
    pub(crate) fn open_temp() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("zova.sqlite");
        let db = Db::open(path.to_str().expect("utf-8 temp path")).expect("open temp db");
        (dir, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_opening_a_fresh_database_together_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zova.sqlite");
        let openers: Vec<_> = (0..6)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || Db::open(path.to_str().unwrap()).map(|_| ()))
            })
            .collect();
        for opener in openers {
            opener.join().unwrap().unwrap();
        }
        let db = Db::open(path.to_str().unwrap()).unwrap();
        assert_eq!(db.flavors().unwrap().len(), 5);
        assert_eq!(db.images().unwrap().len(), 1);
    }

    #[test]
    fn opening_twice_seeds_once() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}",
            dir.path().join("sub/dir/zova.sqlite").display()
        );
        let first = Db::open(&url).unwrap();
        assert_eq!(first.flavors().unwrap().len(), 5);
        drop(first);
        let second = Db::open(&url).unwrap();
        assert_eq!(second.flavors().unwrap().len(), 5);
        assert_eq!(second.images().unwrap().len(), 1);
        let mut conn = second.conn().unwrap();
        let all_flavors: i64 = schema::flavors::table
            .count()
            .get_result(&mut conn)
            .unwrap();
        let all_images: i64 = schema::images::table.count().get_result(&mut conn).unwrap();
        assert_eq!((all_flavors, all_images), (5, 1));
    }

    #[test]
    fn connections_use_wal_and_foreign_keys() {
        let (_dir, db) = testing::open_temp();
        let mut conn = db.conn().unwrap();
        #[derive(QueryableByName)]
        struct Mode {
            #[diesel(sql_type = diesel::sql_types::Text)]
            journal_mode: String,
        }
        let mode: Mode = diesel::sql_query("PRAGMA journal_mode")
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(mode.journal_mode, "wal");
        #[derive(QueryableByName)]
        struct ForeignKeys {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            foreign_keys: i32,
        }
        let fk: ForeignKeys = diesel::sql_query("PRAGMA foreign_keys")
            .get_result(&mut conn)
            .unwrap();
        assert_eq!(fk.foreign_keys, 1);
    }

    #[test]
    fn unopenable_path_is_a_connection_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory is not a database file.
        let err = Db::open(dir.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(err, DbError::Connection { .. }), "{err}");
        assert!(err.to_string().starts_with("cannot open database"), "{err}");
    }

    #[test]
    fn json_columns_must_hold_objects() {
        assert!(check_json_object("metadata", "{\"a\": 1}").is_ok());
        assert!(matches!(
            check_json_object("metadata", "[1]"),
            Err(DbError::Json(_))
        ));
        assert!(matches!(
            check_json_object("metadata", "{"),
            Err(DbError::Json(_))
        ));
    }
}
