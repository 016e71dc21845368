//! `db sync`, `db version` and `db archive-deleted`: the schema and the soft-deleted history.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use clap::Subcommand;
use serde_json::{json, Value};

use db::{ArchivedRows, Db, MigrationInfo};

use super::{fields, json_text, table, timestamp, Format, ManageError};

#[derive(Debug, Subcommand)]
pub(super) enum DbCommand {
    /// Applies the migrations the database lacks and says which (every service also does this
    /// when it starts).
    Sync,
    /// The schema's version (its newest migration) and the migrations still pending. Changes
    /// nothing.
    Version,
    /// Moves soft-deleted rows older than --before into the shadow_* tables, or deletes them
    /// with --purge: instances (by deleted_at) with their faults and actions, key pairs (by
    /// created_at), compute nodes and services (by updated_at). One transaction per table.
    ArchiveDeleted {
        /// The cut-off: YYYY-MM-DD (midnight UTC), YYYY-MM-DDTHH:MM[:SS] (UTC), or RFC 3339 with
        /// an offset.
        #[arg(long, value_parser = parse_before)]
        before: NaiveDateTime,
        /// Delete the rows instead of keeping them in the shadow tables.
        #[arg(long)]
        purge: bool,
    },
}

/// Reads a cut-off time; a time without an offset is UTC, a date alone is its midnight.
pub(super) fn parse_before(text: &str) -> Result<NaiveDateTime, String> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.naive_utc());
    }
    let naive = text
        .strip_suffix(['Z', 'z'])
        .unwrap_or(text)
        .replacen(' ', "T", 1);
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(&naive, format) {
            return Ok(at);
        }
    }
    if let Some(midnight) = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|day| day.and_hms_opt(0, 0, 0))
    {
        return Ok(midnight);
    }
    Err(format!(
        "{text:?} is not a time: give YYYY-MM-DD, YYYY-MM-DDTHH:MM:SS (UTC) or RFC 3339 \
         (2025-05-01T12:00:00+02:00)"
    ))
}

fn migration_view(m: &MigrationInfo) -> Value {
    json!({"version": m.version, "name": m.name})
}

fn migration_name(m: &MigrationInfo) -> String {
    m.name
        .clone()
        .unwrap_or_else(|| "(unknown to this zova-manage: a newer Zova migrated it)".into())
}

/// `db version`: reads the schema's state without migrating it.
pub(super) fn version(url: &str, format: Format) -> Result<String, ManageError> {
    let status = Db::schema_status(url)?;
    let current = status.current();
    Ok(match format {
        Format::Json => json_text(&json!({
            "version": current.map(|m| m.version.clone()),
            "name": current.and_then(|m| m.name.clone()),
            "applied": status.applied.len(),
            "pending": status.pending.iter().map(migration_view).collect::<Vec<_>>(),
            "up_to_date": status.pending.is_empty(),
        })),
        Format::Table => {
            let pending = if status.pending.is_empty() {
                "none".to_string()
            } else {
                status
                    .pending
                    .iter()
                    .map(migration_name)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            fields([
                (
                    "version",
                    current.map_or_else(|| "none".into(), |m| m.version.clone()),
                ),
                ("name", current.map(migration_name).unwrap_or_default()),
                ("applied", status.applied.len().to_string()),
                ("pending", pending),
            ])
        }
    })
}

/// `db sync`: migrates (and seeds a fresh database), saying what it applied.
pub(super) fn sync(url: &str, format: Format) -> Result<String, ManageError> {
    let (_db, applied) = Db::sync(url)?;
    let status = Db::schema_status(url)?;
    let current = status.current().map(|m| m.version.clone());
    Ok(match format {
        Format::Json => json_text(&json!({
            "applied": applied.iter().map(migration_view).collect::<Vec<_>>(),
            "version": current,
        })),
        Format::Table if applied.is_empty() => format!(
            "the database schema is up to date (version {})\n",
            current.unwrap_or_else(|| "none".into())
        ),
        Format::Table => table(
            &["APPLIED", "VERSION"],
            applied
                .iter()
                .map(|m| vec![migration_name(m), m.version.clone()]),
        ),
    })
}

pub(super) fn run(
    db: &Db,
    url: &str,
    command: DbCommand,
    format: Format,
) -> Result<String, ManageError> {
    match command {
        DbCommand::Sync => sync(url, format),
        DbCommand::Version => version(url, format),
        DbCommand::ArchiveDeleted { before, purge } => {
            let done = db.archive_deleted(before, purge)?;
            Ok(archive_output(&done, before, purge, format))
        }
    }
}

fn archive_output(
    done: &[ArchivedRows],
    before: NaiveDateTime,
    purge: bool,
    format: Format,
) -> String {
    match format {
        Format::Json => json_text(&json!({
            "before": timestamp(before),
            "purged": purge,
            "tables": done.iter().map(|d| (d.table.to_string(), json!(d.rows)))
                .collect::<serde_json::Map<_, _>>(),
            "total": done.iter().map(|d| d.rows).sum::<usize>(),
        })),
        Format::Table => table(
            &["TABLE", if purge { "PURGED" } else { "ARCHIVED" }],
            done.iter()
                .map(|d| vec![d.table.to_string(), d.rows.to_string()]),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{manage, open_temp, parse};
    use super::*;

    fn at(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    #[test]
    fn cut_off_times_are_read_as_utc() {
        let cases = [
            ("2025-05-01", "2025-05-01 00:00:00"),
            ("2025-05-01T12:30", "2025-05-01 12:30:00"),
            ("2025-05-01T12:30:15", "2025-05-01 12:30:15"),
            ("2025-05-01 12:30:15", "2025-05-01 12:30:15"),
            ("2025-05-01T12:30:15Z", "2025-05-01 12:30:15"),
            ("2025-05-01T12:30:15.250", "2025-05-01 12:30:15.250"),
            ("2025-05-01T12:30:15+02:00", "2025-05-01 10:30:15"),
            ("2025-05-01T00:30:00-01:00", "2025-05-01 01:30:00"),
            (" 2025-05-01 ", "2025-05-01 00:00:00"),
        ];
        for (text, want) in cases {
            assert_eq!(parse_before(text), Ok(at(want)), "{text}");
        }
        for bad in [
            "",
            "yesterday",
            "2025-13-01",
            "2025-02-30",
            "01/05/2025",
            "2025-05-01T25:00",
        ] {
            let err = parse_before(bad).unwrap_err();
            assert!(err.contains("is not a time"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_bad_cut_off_is_a_usage_error() {
        let err = parse("db archive-deleted --before soon").unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let err = parse("db archive-deleted").unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn archive_reports_each_table() {
        let (_dir, db) = open_temp();
        let text = manage(&db, "db archive-deleted --before 2999-01-01").unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "TABLE             ARCHIVED");
        assert_eq!(lines.len(), 7, "{text}");
        assert!(lines.contains(&"instances         0"), "{text}");
        let text = manage(
            &db,
            "db archive-deleted --before 2999-01-01 --purge --format json",
        )
        .unwrap();
        let out: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(out["purged"], true);
        assert_eq!(out["before"], "2999-01-01T00:00:00Z");
        assert_eq!(out["tables"]["instances"], 0);
        assert_eq!(out["total"], 0);
    }

    #[test]
    fn version_and_sync_say_where_the_schema_stands() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("zova.sqlite").display().to_string();
        let before: Value = serde_json::from_str(&version(&url, Format::Json).unwrap()).unwrap();
        assert_eq!(before["version"], Value::Null);
        assert_eq!(before["up_to_date"], false);
        let pending = before["pending"].as_array().unwrap().len();
        assert!(pending >= 6, "{before}");

        let text = sync(&url, Format::Table).unwrap();
        assert!(text.starts_with("APPLIED "), "{text}");
        assert_eq!(text.lines().count(), pending + 1, "{text}");
        assert!(text.contains("2025-05-01-000000_shadow_tables"), "{text}");

        let text = sync(&url, Format::Table).unwrap();
        assert!(
            text.starts_with("the database schema is up to date (version 2"),
            "{text}"
        );
        let after: Value = serde_json::from_str(&version(&url, Format::Json).unwrap()).unwrap();
        assert_eq!(after["up_to_date"], true);
        assert_eq!(after["applied"], pending);
        let text = version(&url, Format::Table).unwrap();
        assert!(text.contains("pending  none"), "{text}");
    }
}
