//! Zova's database: diesel over SQLite (a file in WAL mode, the embedded default) or PostgreSQL
//! (for several controller machines), chosen by the URL, with embedded migrations for each;
//! soft-deleted rows as in Nova.
//!
//! Every query is written once, for [`AnyConnection`]; the ones a build, a delete or a busy
//! server list runs go through [`direct!`], compiled once per backend and run on its own
//! connection. A write runs in
//! [`AnyConnection::write_transaction`]: `BEGIN IMMEDIATE` on SQLite, and on PostgreSQL a
//! read-committed transaction that first takes one advisory lock shared by every Zova process.
//! Either way writers go one at a time and each statement sees what the previous writer
//! committed, so a read-then-write (a quota check and its insert, a state check and its update)
//! is as safe on one database as on the other. SERIALIZABLE was tried first: under a burst of
//! creates in one project most transactions lost the race and had to run again. On SQLite a
//! writer first waits its turn in a queue the kernel keeps (`flock` on `<file>-writer`), so it
//! is woken when the previous writer is done rather than polling SQLite's lock.
//!
//! A [`Db`] is a cheap-to-clone handle on a connection pool. Every method is synchronous and
//! short; async callers run them under `tokio::task::spawn_blocking`. A live row has
//! `deleted = 0`; soft deletion sets `deleted = id`, and every read skips deleted rows.

/// `direct!(conn, c => body)`: `body` with `c` bound to the backend's own connection inside
/// `conn` (an `&mut AnyConnection`), so the statement is built for that backend and run on it
/// directly; the body is compiled once per backend. It is not a closure: `?` and `return` in it
/// leave the enclosing function. Through `AnyConnection` itself, diesel's MultiConnection
/// renders a statement's SQL again on every run, cached or not, and decodes each field of each
/// row through a dynamic row: reading a whole instance row took 22 µs that way and 9 µs
/// directly, a two-column read 5–7 µs and 3.5–4 µs. The statements run inside a transaction
/// begun on `conn` all the same: the MultiConnection keeps its transaction state in the
/// backend's connection.
macro_rules! direct {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::AnyConnection::Sqlite($c) => $body,
            $crate::AnyConnection::Postgresql($c) => $body,
        }
    };
}

mod admin;
mod catalog;
mod error;
mod identity;
mod instances;
mod kept;
mod keypairs;
mod models;
mod networks;
mod placement;
mod records;
pub mod schema;
mod servers;
mod services;

use std::path::Path;
use std::time::Duration;

use chrono::{NaiveDateTime, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel::r2d2::{ManageConnection, Pool, PooledConnection, R2D2Connection};
use diesel::result::DatabaseErrorKind;
use diesel::{PgConnection, SqliteConnection};
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
pub use records::{Record, Recorded};
pub use servers::{
    instances_that_fit, Created, InstanceFilter, QuotaCreate, QuotaExceeded, QuotaLimits,
    QuotaUsage,
};

/// The schema, compiled into the binary so a fresh host needs nothing but the database path.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The same schema for PostgreSQL (only the key columns are spelled differently).
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations-postgres");

/// Connections kept open by default (`[database] max_connections`); SQLite has one writer at a
/// time, so more would only queue there.
pub const DEFAULT_POOL_SIZE: u32 = 8;

/// Runs of a PostgreSQL transaction that was chosen as a deadlock's victim, at most.
const SERIALIZATION_ATTEMPTS: u32 = 5;

/// The advisory locks that make PostgreSQL migrations, and writes, one at a time (any numbers,
/// the same in every Zova process).
const MIGRATION_LOCK: i64 = 0x7a6f_7661;
const WRITE_LOCK: i64 = 0x7a6f_7677;

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

/// A connection to either database; [`Backend::of`] the URL decides which.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

/// The backend type of [`AnyConnection`]: queries are written against it once.
pub(crate) type DbBackend = <AnyConnection as Connection>::Backend;

/// The file a SQLite `[database] url` names (a path, or `sqlite://PATH`).
pub(crate) fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap_or(url)
}

/// The database a `[database] url` names: `postgres://` or `postgresql://` is PostgreSQL;
/// anything else a SQLite file (a path, or `sqlite://PATH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of(url: &str) -> Backend {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

/// What a transaction is for: a write, or a schema change (see the module doc: on PostgreSQL
/// each takes its own advisory lock, in a read-committed transaction so that it sees what the
/// previous holder committed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransactionKind {
    Write,
    Schema,
}

/// Errors that mean "a concurrent transaction won; run it again" on PostgreSQL.
pub(crate) trait MayRetry {
    fn lost_a_race(&self) -> bool;
}

impl MayRetry for diesel::result::Error {
    fn lost_a_race(&self) -> bool {
        matches!(
            self,
            diesel::result::Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _)
        ) || matches!(
            self,
            diesel::result::Error::DatabaseError(_, info) if info.message().contains("deadlock detected")
        )
    }
}

impl MayRetry for DbError {
    fn lost_a_race(&self) -> bool {
        matches!(self, DbError::Query(e) if e.lost_a_race())
    }
}

impl AnyConnection {
    pub fn backend(&self) -> Backend {
        match self {
            AnyConnection::Sqlite(_) => Backend::Sqlite,
            AnyConnection::Postgresql(_) => Backend::Postgres,
        }
    }

    /// Runs `work` in a write transaction (see the module doc); on PostgreSQL, again from the
    /// start if it was a deadlock's victim, so `work` must only touch the database.
    pub(crate) fn write_transaction<T, E>(
        &mut self,
        work: impl FnMut(&mut AnyConnection) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E>
    where
        E: From<diesel::result::Error> + MayRetry,
    {
        self.run_transaction(TransactionKind::Write, work)
    }

    fn run_transaction<T, E>(
        &mut self,
        kind: TransactionKind,
        mut work: impl FnMut(&mut AnyConnection) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E>
    where
        E: From<diesel::result::Error> + MayRetry,
    {
        let mut attempt = 1;
        loop {
            self.begin(kind)?;
            let outcome = match work(self) {
                Ok(value) => self.finish(true).map(|()| value).map_err(E::from),
                Err(e) => {
                    // The error that ended the work says more than a failed rollback would.
                    let _ = self.finish(false);
                    Err(e)
                }
            };
            match outcome {
                Err(e) if e.lost_a_race() && attempt < SERIALIZATION_ATTEMPTS => attempt += 1,
                other => return other,
            }
        }
    }

    fn begin(&mut self, kind: TransactionKind) -> QueryResult<()> {
        match (self, kind) {
            (AnyConnection::Sqlite(c), TransactionKind::Write) => {
                AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")
            }
            (AnyConnection::Sqlite(c), TransactionKind::Schema) => {
                AnsiTransactionManager::begin_transaction_sql(c, "BEGIN EXCLUSIVE")
            }
            (AnyConnection::Postgresql(c), kind) => {
                let lock = match kind {
                    TransactionKind::Write => WRITE_LOCK,
                    TransactionKind::Schema => MIGRATION_LOCK,
                };
                // One round trip for both: every write pays it.
                let begin = format!("BEGIN; SELECT pg_advisory_xact_lock({lock})");
                let begun = AnsiTransactionManager::begin_transaction_sql(c, &begin);
                if begun.is_err() {
                    // diesel counts no transaction, but PostgreSQL may hold an aborted one (a
                    // ROLLBACK without one is only a warning).
                    let _ = c.batch_execute("ROLLBACK");
                }
                begun
            }
        }
    }

    fn finish(&mut self, commit: bool) -> QueryResult<()> {
        match (self, commit) {
            (AnyConnection::Sqlite(c), true) => AnsiTransactionManager::commit_transaction(c),
            (AnyConnection::Sqlite(c), false) => AnsiTransactionManager::rollback_transaction(c),
            (AnyConnection::Postgresql(c), true) => AnsiTransactionManager::commit_transaction(c),
            (AnyConnection::Postgresql(c), false) => {
                AnsiTransactionManager::rollback_transaction(c)
            }
        }
    }

    /// Applies the migrations of this connection's database that it lacks.
    fn run_migrations(&mut self) -> Result<Vec<String>> {
        let applied = match self {
            AnyConnection::Sqlite(c) => c.run_pending_migrations(MIGRATIONS),
            AnyConnection::Postgresql(c) => c.run_pending_migrations(POSTGRES_MIGRATIONS),
        }
        .map_err(|e| DbError::Migration(e.to_string()))?;
        Ok(applied.into_iter().map(|v| v.to_string()).collect())
    }

    /// The migrations applied to this connection's database.
    fn applied_migrations_list(&mut self) -> Result<Vec<String>> {
        let applied = match self {
            AnyConnection::Sqlite(c) => c.applied_migrations(),
            AnyConnection::Postgresql(c) => c.applied_migrations(),
        }
        .map_err(|e| DbError::Migration(e.to_string()))?;
        Ok(applied.into_iter().map(|v| v.to_string()).collect())
    }
}

/// Opens a connection of the URL's kind, with SQLite's pragmas applied.
fn establish(url: &str) -> std::result::Result<AnyConnection, String> {
    match Backend::of(url) {
        Backend::Postgres => PgConnection::establish(url)
            .map(AnyConnection::Postgresql)
            .map_err(|e| e.to_string()),
        Backend::Sqlite => {
            let mut conn =
                SqliteConnection::establish(sqlite_path(url)).map_err(|e| e.to_string())?;
            Pragmas::apply(&mut conn).map_err(|e| e.to_string())?;
            Ok(AnyConnection::Sqlite(conn))
        }
    }
}

/// The pool's connection factory: the URL's kind of connection, never a guess between kinds (a
/// mistyped PostgreSQL URL must not become a SQLite file of that name).
#[derive(Debug)]
struct Manager {
    url: String,
}

impl ManageConnection for Manager {
    type Connection = AnyConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> std::result::Result<AnyConnection, Self::Error> {
        establish(&self.url).map_err(|reason| {
            diesel::r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(reason))
        })
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> std::result::Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut AnyConnection) -> bool {
        std::thread::panicking() || conn.is_broken()
    }
}

type Conn = PooledConnection<Manager>;

/// Whose turn it is to write to one SQLite file: first among this handle's threads (a mutex),
/// then among handles and processes (an exclusive `flock` on `<file>-writer`, which the kernel
/// drops with a killed process). SQLite's own lock keeps writes one at a time without it, but a
/// writer that finds that lock taken sleeps 1, 2, 5, 10 … ms before it looks again: under a
/// burst of builds most writes slept so, in the api and conductor alike. Here a waiter is
/// woken as soon as the holder is done. SQLite's lock stays the guarantee: a writer that cannot
/// open the lock file still writes, only without the queue.
#[derive(Debug)]
struct WriteGate {
    threads: std::sync::Mutex<()>,
    processes: Option<std::fs::File>,
}

impl WriteGate {
    fn beside(sqlite_path: &str) -> WriteGate {
        let processes = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(format!("{sqlite_path}-writer"))
            .ok();
        WriteGate {
            threads: std::sync::Mutex::new(()),
            processes,
        }
    }

    fn take(&self) -> WriteTurn<'_> {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        // A failed lock (an odd file system) leaves the queueing to SQLite's busy handler.
        let processes = self.processes.as_ref().filter(|file| file.lock().is_ok());
        WriteTurn {
            _threads: threads,
            processes,
        }
    }
}

/// One writer's turn (see [`WriteGate`]); ends when dropped.
struct WriteTurn<'a> {
    _threads: std::sync::MutexGuard<'a, ()>,
    processes: Option<&'a std::fs::File>,
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        if let Some(file) = self.processes {
            let _ = file.unlock();
        }
    }
}

/// A pooled connection taken for writing, with the writer's turn (SQLite) held until it is
/// dropped.
struct Writer<'a> {
    conn: Conn,
    _turn: Option<WriteTurn<'a>>,
}

impl std::ops::Deref for Writer<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for Writer<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// A handle on Zova's database.
#[derive(Clone)]
pub struct Db {
    pool: Pool<Manager>,
    backend: Backend,
    url: std::sync::Arc<str>,
    /// SQLite only: PostgreSQL queues writers on its advisory lock without sleeping.
    write_gate: Option<std::sync::Arc<WriteGate>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend)
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

impl Db {
    /// Opens (creating if needed) the database at `url` with the default pool size, brings its
    /// schema up to date and seeds the default flavors, image and network into a fresh
    /// database. `url` is a SQLite file path (or `sqlite://PATH`) or a `postgres://` URL.
    pub fn open(url: &str) -> Result<Db> {
        Db::open_with(url, DEFAULT_POOL_SIZE)
    }

    /// As [`Db::open`], keeping up to `max_connections` connections open.
    pub fn open_with(url: &str, max_connections: u32) -> Result<Db> {
        let backend = Backend::of(url);
        let connection_error = |reason: String| DbError::Connection {
            url: redacted(url),
            reason,
        };
        if max_connections == 0 {
            return Err(connection_error(
                "max_connections must be at least 1".to_string(),
            ));
        }
        if backend == Backend::Sqlite {
            let path = sqlite_path(url);
            if path.is_empty() {
                return Err(connection_error("the path is empty".to_string()));
            }
            if let Some(parent) = Path::new(path).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        connection_error(format!(
                            "cannot create directory {}: {e}",
                            parent.display()
                        ))
                    })?;
                }
            }
        }

        // Set up on one plain connection first: a bad path or URL then fails at once with the
        // database's own reason, rather than after the pool's timeout with a generic one.
        let set_up = || -> Result<()> {
            let mut conn = establish(url).map_err(connection_error)?;
            migrate_and_seed(&mut conn).map(drop)
        };
        // Two openers of a fresh SQLite file can both ask to switch it to WAL; SQLite then fails
        // one at once with "database is locked" rather than wait (the busy handler would
        // deadlock). The switch is done by then, so trying again succeeds.
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

        // Connections open as they are needed: a PostgreSQL server counts every idle one
        // against its max_connections. A PostgreSQL connection is pinged as it is handed out,
        // so one the server dropped is replaced rather than failing a request; a SQLite file
        // does not go away, and its `SELECT 1` on every hand-out was CPU for nothing.
        let pool = Pool::builder()
            .max_size(max_connections)
            .min_idle(Some(1))
            .test_on_check_out(backend == Backend::Postgres)
            .connection_timeout(POOL_TIMEOUT)
            .build(Manager {
                url: url.to_string(),
            })
            .map_err(|e| connection_error(e.to_string()))?;
        let write_gate = match backend {
            Backend::Sqlite => Some(std::sync::Arc::new(WriteGate::beside(sqlite_path(url)))),
            Backend::Postgres => None,
        };
        Ok(Db {
            pool,
            backend,
            url: url.into(),
            write_gate,
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL it was opened with (with its password: for opening it again, not for logs).
    pub fn url(&self) -> &str {
        &self.url
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

    /// A connection for a write: the turn first, so that waiting writers do not also hold
    /// connections the readers need.
    fn writer(&self) -> Result<Writer<'_>> {
        let turn = self.write_turn();
        Ok(Writer {
            conn: self.conn()?,
            _turn: turn,
        })
    }

    /// The writer's turn alone, for a caller that writes in several transactions and should
    /// not keep the others waiting between them.
    fn write_turn(&self) -> Option<WriteTurn<'_>> {
        self.write_gate.as_deref().map(WriteGate::take)
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
/// Whole microseconds: what PostgreSQL keeps, so a value reads back as it was written on both.
fn now() -> NaiveDateTime {
    use chrono::SubsecRound;
    Utc::now().naive_utc().trunc_subsecs(6)
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

/// The environment variable naming the PostgreSQL server tests use instead of SQLite files.
pub const TEST_POSTGRES_ENV: &str = "ZOVA_TEST_POSTGRES";

/// Where a test keeps its database: a SQLite file in `dir`, or, when `ZOVA_TEST_POSTGRES` holds
/// a PostgreSQL URL (whose user may create databases), a fresh database of its own on that
/// server. `scripts/test` runs the whole suite both ways; the databases are left for the
/// throw-away server to take with it.
pub fn test_database_url(dir: &Path) -> Result<String> {
    let base = match std::env::var(TEST_POSTGRES_ENV) {
        Ok(base) if !base.is_empty() => base,
        _ => return Ok(dir.join("zova.sqlite").display().to_string()),
    };
    let error = |reason: String| DbError::Connection {
        url: redacted(&base),
        reason,
    };
    if Backend::of(&base) != Backend::Postgres {
        return Err(error(format!(
            "{TEST_POSTGRES_ENV} must be a postgres:// URL"
        )));
    }
    let (address, query) = base.split_once('?').unwrap_or((&base, ""));
    let (server, _) = address
        .rsplit_once('/')
        .filter(|(server, _)| server.contains("://"))
        .ok_or_else(|| error("the URL names no database".to_string()))?;
    let name = format!("zova_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::establish(&base).map_err(|e| error(e.to_string()))?;
    conn.batch_execute(&format!("CREATE DATABASE {name}"))
        .map_err(|e| error(e.to_string()))?;
    if query.is_empty() {
        Ok(format!("{server}/{name}"))
    } else {
        Ok(format!("{server}/{name}?{query}"))
    }
}

/// Brings the schema up to date and seeds a fresh database under one exclusive lock: every
/// service opens the database at start-up, and the all-in-one starts them together, so without
/// the lock two of them could both see the schema missing and the second would fail on
/// `CREATE TABLE`. The others wait on busy_timeout, then find nothing pending.
fn migrate_and_seed(conn: &mut AnyConnection) -> Result<Vec<String>> {
    conn.run_transaction(TransactionKind::Schema, |conn| {
        let applied = conn.run_migrations()?;
        seed(conn)?;
        Ok(applied)
    })
}

/// `url` without its password, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    match authority.rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            let shown = if user_info.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{shown}@{host}/{path}")
        }
        None => url.to_string(),
    }
}

/// Fills a fresh database with the default flavors, image and network. Each table is seeded only when it
/// has never held a row, so reopening never duplicates and deleting a seed row is permanent.
fn seed(conn: &mut AnyConnection) -> Result<()> {
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

    /// A database of its own (see [`crate::test_database_url`]); keep the directory alive as
    /// long as the `Db`.
    pub(crate) fn open_temp() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("create temp dir");
        let url = crate::test_database_url(dir.path()).expect("a test database");
        let db = Db::open(&url).expect("open temp db");
        (dir, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_waits_its_turn_behind_another_process_and_goes_when_that_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zova.sqlite");
        let db = Db::open(path.to_str().unwrap()).unwrap();
        // Held as another Zova process holds it while it writes.
        let other_process = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("zova.sqlite-writer"))
            .unwrap();
        other_process.lock().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || {
                let created = db.project_create("queued", "");
                done_tx.send(()).unwrap();
                created
            })
        };
        // Not a timing claim: with the turn held the write never ends, so any wait would do.
        assert!(
            done_rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the write went ahead while another process had the turn"
        );
        assert!(db.project_get_by_name("queued").unwrap().is_none());
        other_process.unlock().unwrap();
        done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the write went on once the turn was free");
        writer.join().unwrap().unwrap();
        // Reads never wait for the turn.
        other_process.lock().unwrap();
        assert!(db.project_get_by_name("queued").unwrap().is_some());
    }

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
    fn sqlite_connections_use_wal_and_foreign_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("zova.sqlite").display().to_string()).unwrap();
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
