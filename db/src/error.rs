//! The one error type of the crate; each message says what went wrong and where to look.

/// Everything a database call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database file could not be opened or configured.
    #[error("cannot open database {url}: {reason}")]
    Connection { url: String, reason: String },

    /// The embedded schema migrations could not be applied.
    #[error("database schema migration failed: {0}")]
    Migration(String),

    /// No live (not soft-deleted) row has this key.
    #[error("{kind} {id} could not be found")]
    NotFound { kind: &'static str, id: String },

    /// A live row already has this name (names are unique among live rows, as in Keystone).
    #[error("{kind} {name} already exists")]
    Duplicate { kind: &'static str, name: String },

    /// The row is not in the state the change expects (another actor changed it first).
    #[error("conflict: {0}")]
    Conflict(String),

    /// A statement failed (constraint violation, locked database, corrupt file, ...).
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),

    /// No pooled connection became free in time.
    #[error("no database connection available: {0}")]
    Pool(String),

    /// The request goes over a limit (a quota); the text is the message for the user.
    #[error("{0}")]
    OverQuota(String),

    /// No address of the pool is free; the text is the message for the user.
    #[error("{0}")]
    Exhausted(String),

    /// A value is not acceptable (a malformed CIDR, a gateway outside its network, ...).
    #[error("invalid value: {0}")]
    Invalid(String),

    /// A JSON column was given text that is not a JSON object; the text says which column.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// Results of database calls.
pub type Result<T> = std::result::Result<T, DbError>;
