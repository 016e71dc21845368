//! What the operator's tool (`zova-manage`) needs beyond the services' queries: the schema's
//! migration state (`db version`, `db sync`), moving soft-deleted rows into the shadow tables or
//! purging them (`db archive-deleted`), and registering an imported image.

use std::path::Path;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text, Timestamp};
use serde::Serialize;

use crate::schema::images;
use crate::{
    establish, migrate_and_seed, now, redacted, Backend, Db, DbError, Image, Result, MIGRATIONS,
};
use crate::{AnyConnection, DbBackend};

/// One schema migration: its version (the digits of its directory's date) and its directory
/// name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationInfo {
    pub version: String,
    /// `None` for a version this binary does not know: a newer Zova migrated the database.
    pub name: Option<String>,
}

/// Where a database's schema stands against the migrations built into this binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaStatus {
    /// Applied migrations, oldest first.
    pub applied: Vec<MigrationInfo>,
    /// Migrations this binary has that the database lacks, oldest first.
    pub pending: Vec<MigrationInfo>,
}

impl SchemaStatus {
    /// The newest applied migration; `None` for an empty database.
    pub fn current(&self) -> Option<&MigrationInfo> {
        self.applied.last()
    }
}

/// An image to register (`zova-manage image import`): the file is already in the image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    pub uuid: String,
    pub name: String,
    pub disk_format: String,
    pub size_bytes: i64,
    /// The stored file's absolute path.
    pub location: String,
}

/// What `Db::archive_deleted` did to one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchivedRows {
    pub table: &'static str,
    pub rows: usize,
}

/// The tables `archive_deleted` clears, in the order it clears them, with the rows it takes
/// (`?1` is the cut-off time). The faults and actions of an instance go with it: they are taken
/// once the instance is deleted before the cut-off (or already archived) and they are older
/// than the cut-off themselves, so they go first, while their instance still says whether it
/// qualifies. A node that allocations still point at stays.
const ARCHIVABLE: [(&str, &str); 6] = [
    (
        "instance_faults",
        "created_at < ?1 AND (deleted != 0 OR NOT EXISTS (
            SELECT 1 FROM instances i WHERE i.uuid = instance_faults.instance_uuid
            AND (i.deleted = 0 OR COALESCE(i.deleted_at, i.updated_at, i.created_at) >= ?1)))",
    ),
    (
        "instance_actions",
        "COALESCE(finish_time, start_time) < ?1 AND (deleted != 0 OR NOT EXISTS (
            SELECT 1 FROM instances i WHERE i.uuid = instance_actions.instance_uuid
            AND (i.deleted = 0 OR COALESCE(i.deleted_at, i.updated_at, i.created_at) >= ?1)))",
    ),
    (
        "instances",
        "deleted != 0 AND COALESCE(deleted_at, updated_at, created_at) < ?1",
    ),
    ("key_pairs", "deleted != 0 AND created_at < ?1"),
    (
        "compute_nodes",
        "deleted != 0 AND COALESCE(updated_at, created_at) < ?1 AND NOT EXISTS (
            SELECT 1 FROM allocations a WHERE a.compute_node_id = compute_nodes.id)",
    ),
    (
        "services",
        "deleted != 0 AND COALESCE(updated_at, created_at) < ?1",
    ),
];

#[derive(QueryableByName)]
struct Column {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    column_type: String,
    #[diesel(sql_type = Integer)]
    not_null: i32,
}

/// A table's columns in their order: name, declared type, NOT NULL.
fn columns(conn: &mut AnyConnection, table: &str) -> QueryResult<Vec<(String, String, bool)>> {
    let query = match conn.backend() {
        Backend::Sqlite => {
            "SELECT name, type AS column_type, \"notnull\" AS not_null FROM pragma_table_info(?1)"
        }
        Backend::Postgres => {
            "SELECT column_name::text AS name, data_type::text AS column_type,
                    CASE WHEN is_nullable = 'NO' THEN 1 ELSE 0 END AS not_null
             FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1
             ORDER BY ordinal_position"
        }
    };
    let rows: Vec<Column> = diesel::sql_query(query).bind::<Text, _>(table).load(conn)?;
    Ok(rows
        .into_iter()
        .map(|c| (c.name, c.column_type, c.not_null != 0))
        .collect())
}

fn connect(url: &str) -> Result<AnyConnection> {
    establish(url).map_err(|reason| DbError::Connection {
        url: redacted(url),
        reason,
    })
}

/// `sql` with SQLite's numbered parameters (`?1`) spelled for the connection's database.
fn placeholders(conn: &AnyConnection, sql: &str) -> String {
    match conn.backend() {
        Backend::Sqlite => sql.to_string(),
        Backend::Postgres => sql.replace('?', "$"),
    }
}

fn migration_error(e: impl std::fmt::Display) -> DbError {
    DbError::Migration(e.to_string())
}

/// Every migration built into this binary, oldest first.
fn known_migrations() -> Result<Vec<MigrationInfo>> {
    let mut known: Vec<MigrationInfo> =
        diesel::migration::MigrationSource::<diesel::sqlite::Sqlite>::migrations(&MIGRATIONS)
            .map_err(migration_error)?
            .iter()
            .map(|m| MigrationInfo {
                version: m.name().version().to_string(),
                name: Some(m.name().to_string()),
            })
            .collect();
    known.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(known)
}

fn named(known: &[MigrationInfo], version: String) -> MigrationInfo {
    let name = known
        .iter()
        .find(|m| m.version == version)
        .and_then(|m| m.name.clone());
    MigrationInfo { version, name }
}

impl Db {
    /// Where the schema of the database at `url` stands, without migrating it (unlike
    /// [`Db::open`]). A database file that does not exist yet has every migration pending and is
    /// not created.
    pub fn schema_status(url: &str) -> Result<SchemaStatus> {
        let known = known_migrations()?;
        if Backend::of(url) == Backend::Sqlite && !Path::new(crate::sqlite_path(url)).exists() {
            return Ok(SchemaStatus {
                applied: Vec::new(),
                pending: known,
            });
        }
        let mut conn = connect(url)?;
        let mut applied = conn.applied_migrations_list()?;
        applied.sort();
        let pending = known
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .cloned()
            .collect();
        let applied = applied.into_iter().map(|v| named(&known, v)).collect();
        Ok(SchemaStatus { applied, pending })
    }

    /// Opens the database at `url` as [`Db::open`] does, and says which migrations this call
    /// applied (none when the schema was up to date). Pending migrations and the seed run under
    /// one exclusive lock, as at every service's start.
    pub fn sync(url: &str) -> Result<(Db, Vec<MigrationInfo>)> {
        let known = known_migrations()?;
        let parent = match Backend::of(url) {
            Backend::Sqlite => Path::new(crate::sqlite_path(url)).parent(),
            Backend::Postgres => None,
        };
        if let Some(parent) = parent {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| DbError::Connection {
                    url: url.to_string(),
                    reason: format!("cannot create directory {}: {e}", parent.display()),
                })?;
            }
        }
        let mut conn = connect(url)?;
        let applied = migrate_and_seed(&mut conn)?;
        drop(conn);
        let applied = applied.into_iter().map(|v| named(&known, v)).collect();
        Ok((Db::open(url)?, applied))
    }

    /// Moves the soft-deleted rows older than `before` into the shadow tables (or, with `purge`,
    /// deletes them): instances by their `deleted_at` (else `updated_at`, `created_at`), their
    /// faults by `created_at` and actions by `finish_time` (else `start_time`) once the instance
    /// qualifies, key pairs by `created_at`, compute nodes and services by `updated_at` (else
    /// `created_at`). One transaction per table; returns the rows taken from each.
    pub fn archive_deleted(&self, before: NaiveDateTime, purge: bool) -> Result<Vec<ArchivedRows>> {
        let mut conn = self.conn()?;
        let mut done = Vec::with_capacity(ARCHIVABLE.len());
        for (table, condition) in ARCHIVABLE {
            let _turn = self.write_turn();
            let rows = conn.write_transaction(|conn| {
                let condition = placeholders(conn, condition);
                let delete = format!("DELETE FROM {table} WHERE {condition}");
                if purge {
                    return Ok(diesel::sql_query(delete)
                        .bind::<Timestamp, _>(before)
                        .execute(conn)?);
                }
                let shadow = format!("shadow_{table}");
                let shadow_columns: Vec<String> =
                    columns(conn, &shadow)?.into_iter().map(|c| c.0).collect();
                if let Some((missing, _, _)) = columns(conn, table)?
                    .into_iter()
                    .find(|c| !shadow_columns.contains(&c.0))
                {
                    return Err(DbError::Migration(format!(
                        "{shadow} has no column {missing} of {table}: the migration that added \
                         it must add it to {shadow} too; nothing of {table} was archived"
                    )));
                }
                let list = shadow_columns
                    .iter()
                    .map(|c| format!("\"{c}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                let copied = diesel::sql_query(format!(
                    "INSERT INTO {shadow} ({list}) SELECT {list} FROM {table} WHERE {condition}"
                ))
                .bind::<Timestamp, _>(before)
                .execute(conn)?;
                let deleted = diesel::sql_query(delete)
                    .bind::<Timestamp, _>(before)
                    .execute(conn)?;
                if copied != deleted {
                    // Cannot happen under the write lock; if it did, roll back rather than lose
                    // rows.
                    return Err(DbError::Conflict(format!(
                        "archiving {table}: {copied} rows copied but {deleted} deleted"
                    )));
                }
                Ok(deleted)
            })?;
            done.push(ArchivedRows { table, rows });
        }
        Ok(done)
    }

    /// Registers an image whose file is already in the image store: active, container `bare`.
    pub fn image_create(&self, new: &NewImage) -> Result<Image> {
        let mut conn = self.writer()?;
        Ok(diesel::insert_into(images::table)
            .values((
                images::uuid.eq(&new.uuid),
                images::name.eq(&new.name),
                images::disk_format.eq(&new.disk_format),
                images::container_format.eq("bare"),
                images::status.eq("active"),
                images::min_disk.eq(0),
                images::min_ram.eq(0),
                images::size_bytes.eq(new.size_bytes),
                images::location.eq(Some(&new.location)),
                images::created_at.eq(now()),
            ))
            .returning(<Image as Selectable<DbBackend>>::construct_selection())
            .get_result(&mut *conn)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{new_instance, open_temp};
    use crate::{ComputeNodeValues, NewFault, NewKeyPair};
    use chrono::Duration;
    use diesel::connection::SimpleConnection;

    fn count(db: &Db, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = db.conn().unwrap();
        diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {sql}"))
            .get_result::<Count>(&mut conn)
            .unwrap()
            .n
    }

    fn rows(done: &[ArchivedRows]) -> Vec<(&'static str, usize)> {
        done.iter().map(|d| (d.table, d.rows)).collect()
    }

    #[test]
    fn every_shadow_table_mirrors_its_table() {
        let (_dir, db) = open_temp();
        let mut conn = db.conn().unwrap();
        for (table, _) in ARCHIVABLE {
            let live = columns(&mut conn, table).unwrap();
            let shadow = columns(&mut conn, &format!("shadow_{table}")).unwrap();
            assert!(!live.is_empty(), "{table}");
            assert_eq!(shadow, live, "shadow_{table} must mirror {table}");
        }
    }

    /// The PostgreSQL set is a copy of the SQLite one but for the key columns; a migration
    /// added to one and not the other, or changed in one only, fails here.
    #[test]
    fn the_postgresql_migrations_are_the_sqlite_ones_but_for_the_keys() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sql_of = |dir: &Path| -> Vec<(String, String)> {
            let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
                .unwrap()
                .flat_map(|migration| {
                    let migration = migration.unwrap().path();
                    ["up.sql", "down.sql"].map(|file| {
                        let name = migration.file_name().unwrap().to_string_lossy();
                        let text = std::fs::read_to_string(migration.join(file)).unwrap();
                        // Comments may differ; statements may not.
                        let statements = text
                            .lines()
                            .filter(|l| !l.trim_start().starts_with("--"))
                            .collect::<Vec<_>>()
                            .join("\n");
                        (format!("{name}/{file}"), statements)
                    })
                })
                .collect();
            files.sort();
            files
        };
        let sqlite: Vec<(String, String)> = sql_of(&root.join("migrations"))
            .into_iter()
            .map(|(name, sql)| {
                let keys = sql
                    .replace(
                        "id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL",
                        "id BIGSERIAL PRIMARY KEY",
                    )
                    .replace(
                        "id INTEGER PRIMARY KEY NOT NULL",
                        "id BIGINT PRIMARY KEY NOT NULL",
                    );
                (name, keys)
            })
            .collect();
        let postgres = sql_of(&root.join("migrations-postgres"));
        assert_eq!(sqlite.len(), postgres.len(), "the same migrations");
        for ((name, expected), (pg_name, actual)) in sqlite.iter().zip(&postgres) {
            assert_eq!(name, pg_name);
            assert_eq!(expected, actual, "{name} differs beyond its key columns");
        }
    }

    #[test]
    fn status_of_a_missing_file_has_everything_pending_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zova.sqlite");
        let status = Db::schema_status(path.to_str().unwrap()).unwrap();
        assert!(status.applied.is_empty() && status.current().is_none());
        assert_eq!(status.pending, known_migrations().unwrap());
        assert!(!path.exists());
    }

    #[test]
    fn status_and_sync_report_pending_and_applied_migrations() {
        let dir = tempfile::tempdir().unwrap();
        // On PostgreSQL too when the suite runs there: an empty database of its own.
        let url = crate::test_database_url(dir.path()).unwrap();
        let known = known_migrations().unwrap();
        assert!(known.len() >= 6, "{known:?}");
        assert_eq!(
            known.last().unwrap().name.as_deref(),
            Some("2026-12-03-000000_instances_usage_index")
        );
        {
            use diesel_migrations::MigrationHarness;
            let mut conn = connect(&url).unwrap();
            let first = match &mut conn {
                AnyConnection::Sqlite(c) => c.run_next_migration(MIGRATIONS).map(drop),
                AnyConnection::Postgresql(c) => {
                    c.run_next_migration(crate::POSTGRES_MIGRATIONS).map(drop)
                }
            };
            first.unwrap();
        }
        let status = Db::schema_status(&url).unwrap();
        assert_eq!(status.applied, known[..1]);
        assert_eq!(status.pending, known[1..]);
        assert_eq!(status.current().unwrap().version, "20250101000000");

        let (db, applied) = Db::sync(&url).unwrap();
        assert_eq!(applied, known[1..]);
        assert_eq!(db.flavors().unwrap().len(), 5, "sync seeds like open");
        let status = Db::schema_status(&url).unwrap();
        assert_eq!((status.applied, status.pending), (known.clone(), vec![]));

        let (_db, applied) = Db::sync(&url).unwrap();
        assert!(applied.is_empty());
    }

    #[test]
    fn a_version_this_binary_does_not_know_is_shown_without_a_name() {
        let (_dir, db) = open_temp();
        let mut conn = db.conn().unwrap();
        diesel::sql_query(
            "INSERT INTO __diesel_schema_migrations (version) VALUES ('20990101000000')",
        )
        .execute(&mut conn)
        .unwrap();
        let status = Db::schema_status(db.url()).unwrap();
        assert!(status.pending.is_empty());
        assert_eq!(
            status.current(),
            Some(&MigrationInfo {
                version: "20990101000000".into(),
                name: None
            })
        );
    }

    /// Two deleted instances (with a fault and an action each), one live one (with both too), a
    /// deleted and a live key pair, a deleted service and two deleted nodes (one still holding
    /// an allocation).
    fn history(db: &Db) {
        for uuid in ["dead-1", "dead-2", "alive"] {
            db.instance_create(&new_instance(uuid, "p1"), &format!("req-{uuid}"))
                .unwrap();
            db.instance_fault_create(&NewFault {
                instance_uuid: uuid.into(),
                code: 500,
                message: "boom".into(),
                details: String::new(),
                host: None,
            })
            .unwrap();
        }
        db.instance_destroy("dead-1").unwrap();
        db.instance_destroy("dead-2").unwrap();
        for name in ["old", "kept"] {
            db.key_pair_create(
                &NewKeyPair {
                    name: name.into(),
                    user_id: "alice".into(),
                    fingerprint: "f".into(),
                    public_key: "k".into(),
                    key_type: "ssh".into(),
                },
                10,
            )
            .unwrap();
        }
        db.key_pair_delete("alice", "old").unwrap();
        db.service_upsert("gone", "zova-compute", "compute", "tcp://x", None)
            .unwrap();
        db.service_upsert("here", "zova-compute", "compute", "tcp://y", None)
            .unwrap();
        for host in ["gone", "busy"] {
            db.compute_node_upsert(&ComputeNodeValues {
                host: host.into(),
                hypervisor_hostname: host.into(),
                hypervisor_type: "QEMU".into(),
                vcpus: 4,
                memory_mb: 4096,
                local_gb: 40,
                vcpus_used: 0,
                memory_mb_used: 0,
                local_gb_used: 0,
                running_vms: 0,
                extra_resources: "{}".into(),
            })
            .unwrap();
        }
        let mut conn = db.conn().unwrap();
        diesel::sql_query(
            "INSERT INTO allocations (instance_uuid, compute_node_id, vcpus, memory_mb, disk_mb,
             created_at) SELECT 'alive', id, 1, 512, 1024, created_at FROM compute_nodes
             WHERE host = 'busy'",
        )
        .execute(&mut conn)
        .unwrap();
        conn.batch_execute(
            "UPDATE services SET deleted = id WHERE host = 'gone';
             UPDATE compute_nodes SET deleted = id WHERE host IN ('gone', 'busy');",
        )
        .unwrap();
    }

    const EVERY_TABLE: [&str; 6] = [
        "instance_faults",
        "instance_actions",
        "instances",
        "key_pairs",
        "compute_nodes",
        "services",
    ];

    #[test]
    fn nothing_newer_than_the_cut_off_is_archived() {
        let (_dir, db) = open_temp();
        history(&db);
        let yesterday = now() - Duration::days(1);
        let done = db.archive_deleted(yesterday, false).unwrap();
        assert_eq!(rows(&done), EVERY_TABLE.map(|t| (t, 0)));
        assert_eq!(count(&db, "instances"), 3);
    }

    #[test]
    fn archive_moves_deleted_rows_and_their_history_into_the_shadow_tables() {
        let (_dir, db) = open_temp();
        history(&db);
        let alive_before = db.instance_get("alive").unwrap().unwrap();
        let tomorrow = now() + Duration::days(1);
        let done = db.archive_deleted(tomorrow, false).unwrap();
        assert_eq!(
            rows(&done),
            [
                ("instance_faults", 2),
                ("instance_actions", 2),
                ("instances", 2),
                ("key_pairs", 1),
                ("compute_nodes", 1),
                ("services", 1),
            ]
        );
        assert_eq!(count(&db, "shadow_instances WHERE uuid LIKE 'dead-%'"), 2);
        assert_eq!(
            count(
                &db,
                "shadow_instance_faults WHERE instance_uuid LIKE 'dead-%'"
            ),
            2
        );
        assert_eq!(
            count(
                &db,
                "shadow_instance_actions WHERE instance_uuid LIKE 'dead-%'"
            ),
            2
        );
        assert_eq!(count(&db, "shadow_key_pairs WHERE name = 'old'"), 1);
        assert_eq!(count(&db, "shadow_services WHERE host = 'gone'"), 1);
        assert_eq!(count(&db, "shadow_compute_nodes WHERE host = 'gone'"), 1);
        // The live rows, and the node an allocation still points at, stay.
        assert_eq!(db.instance_get("alive").unwrap(), Some(alive_before));
        assert_eq!(count(&db, "instances"), 1);
        assert_eq!(
            count(&db, "instance_faults WHERE instance_uuid = 'alive'"),
            1
        );
        assert_eq!(
            count(&db, "instance_actions WHERE instance_uuid = 'alive'"),
            1
        );
        assert_eq!(db.key_pairs("alice").unwrap().len(), 1);
        assert_eq!(count(&db, "compute_nodes WHERE host = 'busy'"), 1);
        assert_eq!(db.services().unwrap().len(), 1);
        // Archived rows keep every column.
        assert_eq!(
            count(
                &db,
                "shadow_instances WHERE vm_state = 'deleted' AND deleted = id \
                 AND deleted_at IS NOT NULL AND metadata = '{\"role\": \"web\"}'"
            ),
            2
        );

        let again = db.archive_deleted(tomorrow, false).unwrap();
        assert_eq!(rows(&again), EVERY_TABLE.map(|t| (t, 0)));
    }

    #[test]
    fn purge_deletes_without_keeping_a_copy() {
        let (_dir, db) = open_temp();
        history(&db);
        let done = db.archive_deleted(now() + Duration::days(1), true).unwrap();
        assert_eq!(
            rows(&done),
            [
                ("instance_faults", 2),
                ("instance_actions", 2),
                ("instances", 2),
                ("key_pairs", 1),
                ("compute_nodes", 1),
                ("services", 1),
            ]
        );
        for table in EVERY_TABLE {
            assert_eq!(count(&db, &format!("shadow_{table}")), 0, "{table}");
        }
        assert_eq!(count(&db, "instances"), 1);
        assert_eq!(count(&db, "instance_faults"), 1);
        assert!(db.instance_get("alive").unwrap().is_some());
    }

    #[test]
    fn the_history_of_an_instance_archived_earlier_follows_it() {
        let (_dir, db) = open_temp();
        history(&db);
        let mut conn = db.conn().unwrap();
        // As if a fault had been written after its instance was archived.
        diesel::sql_query("DELETE FROM instances WHERE uuid = 'dead-1'")
            .execute(&mut conn)
            .unwrap();
        let done = db
            .archive_deleted(now() + Duration::days(1), false)
            .unwrap();
        assert_eq!(
            rows(&done)[..3],
            [
                ("instance_faults", 2),
                ("instance_actions", 2),
                ("instances", 1),
            ]
        );
    }

    #[test]
    fn an_image_is_registered_active_with_its_location() {
        let (_dir, db) = open_temp();
        let image = db
            .image_create(&NewImage {
                uuid: "7f1c0c4e-7e47-4d84-9d0b-1b0c4b1f2a3e".into(),
                name: "debian-12".into(),
                disk_format: "qcow2".into(),
                size_bytes: 196_624,
                location: "/var/lib/zova/images/7f1c0c4e-7e47-4d84-9d0b-1b0c4b1f2a3e.qcow2".into(),
            })
            .unwrap();
        assert_eq!(
            (
                image.status.as_str(),
                image.container_format.as_str(),
                image.size_bytes
            ),
            ("active", "bare", 196_624)
        );
        assert_eq!(db.image_get(&image.uuid).unwrap(), Some(image.clone()));
        assert_eq!(db.images().unwrap().len(), 2);
        assert!(image.location.unwrap().ends_with(".qcow2"));
    }
}
