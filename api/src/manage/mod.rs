//! `zova-manage`, the operator's tool (like `nova-manage` and `keystone-manage` plus the admin
//! parts of the `openstack` client): the admin bootstrap, projects, users and roles; the
//! database schema and archiving; compute services and hypervisors; flavors and images; CURVE
//! keys; and the scheduler's host queue. Everything but `queue show` works on the database
//! directly, so it works while the API is down.
//!
//! Output is an aligned table, or JSON with `--format json` for scripts. Errors go to stderr with
//! a non-zero exit: 2 for a bad configuration or usage, 1 for anything else.

mod catalog;
mod database;
mod hosts;
mod identity;
mod keys;
mod networks;
mod queue;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use db::{Db, DbError};
use proto::service::{DatabaseConfig, RpcConfig};

#[derive(Debug, Parser)]
#[command(
    name = "zova-manage",
    about = "Zova's operator tool: identity, database, services, hypervisors, flavors, images, \
             keys and the scheduler's queue"
)]
struct Cli {
    /// The zova.toml to read (environment ZOVA_* and these flags override it).
    #[arg(long, env = "ZOVA_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Database URL (default: [database] url).
    #[arg(long, global = true)]
    database: Option<String>,
    /// How to print results.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates or repairs project admin, user admin (with this password) and its admin role on
    /// project admin. Safe to repeat.
    Bootstrap {
        /// The admin's password.
        #[arg(long, env = "ZOVA_ADMIN_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Projects.
    #[command(subcommand)]
    Project(identity::ProjectCommand),
    /// Users.
    #[command(subcommand)]
    User(identity::UserCommand),
    /// Role assignments (roles: admin, member, reader; admin implies member implies reader).
    #[command(subcommand)]
    Role(identity::RoleCommand),
    /// The database: schema version, migrations, archiving deleted rows.
    #[command(subcommand)]
    Db(database::DbCommand),
    /// Compute and other services: state, enable, disable, force down.
    #[command(subcommand)]
    Service(hosts::ServiceCommand),
    /// Hypervisors: capacity, use, allocation ratios, instances.
    #[command(subcommand)]
    Hypervisor(hosts::HypervisorCommand),
    /// Flavors.
    #[command(subcommand)]
    Flavor(catalog::FlavorCommand),
    /// Images in the image store.
    #[command(subcommand)]
    Image(catalog::ImageCommand),
    /// Fixed-IP networks: address pools, gateways and bridges.
    #[command(subcommand)]
    Network(networks::NetworkCommand),
    /// CURVE keys for [rpc.curve].
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// The scheduler's host queue.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
}

/// The parts of the shared zova.toml that `zova-manage` reads. Sections it shares with a
/// service are read with that section's own struct (`[database]`, `[rpc]`); of the others only
/// the keys it needs are declared, so it adds nothing to the services' configuration.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct ManageConfig {
    database: DatabaseConfig,
    rpc: RpcConfig,
    scheduler: SchedulerKeys,
    image: ImageKeys,
}

/// `[scheduler]`, as far as `zova-manage` reads it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct SchedulerKeys {
    /// A service silent for longer is down (default 60 s).
    service_down_time: Option<i64>,
}

/// `[image]`, as far as `zova-manage` reads it.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct ImageKeys {
    /// Where imported images are stored (default: `images` beside the database file).
    store_path: Option<PathBuf>,
}

/// How long without a heartbeat makes a service down, when neither the flag nor the
/// configuration says.
const DEFAULT_DOWN_AFTER_SECONDS: i64 = 60;

impl ManageConfig {
    fn database_url(&self, flag: Option<&str>) -> String {
        flag.map_or_else(|| self.database.url.clone(), str::to_string)
    }

    fn down_after(&self, flag: Option<i64>) -> i64 {
        flag.or(self.scheduler.service_down_time)
            .unwrap_or(DEFAULT_DOWN_AFTER_SECONDS)
    }

    /// `--store`, else `[image] store_path`, else `images` beside the SQLite file (or in the
    /// current directory with PostgreSQL, which has no file to stand beside).
    fn image_store(&self, flag: Option<PathBuf>, database_url: &str) -> PathBuf {
        flag.or_else(|| self.image.store_path.clone())
            .unwrap_or_else(|| {
                if db::Backend::of(database_url) == db::Backend::Postgres {
                    return PathBuf::from("images");
                }
                let file = Path::new(
                    database_url
                        .strip_prefix("sqlite://")
                        .unwrap_or(database_url),
                );
                file.parent().unwrap_or(Path::new("")).join("images")
            })
    }
}

#[derive(Debug, thiserror::Error)]
enum ManageError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("no admin password: pass --password or set ZOVA_ADMIN_PASSWORD")]
    NoPassword,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Hash(#[from] crate::identity::PasswordHashError),
    #[error(transparent)]
    Image(#[from] catalog::ImageError),
    #[error("cannot generate a CURVE key pair: {0}")]
    Keys(proto::ProtoError),
    #[error("the scheduler at {endpoint} did not give its queue: {source}")]
    Scheduler {
        endpoint: String,
        source: proto::ProtoError,
    },
}

impl ManageError {
    /// 2 for what the operator must fix in the configuration, 1 for everything else.
    fn exit_code(&self) -> ExitCode {
        match self {
            ManageError::Config(_) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Parses the command line, runs the command, prints its output or the error.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zova-manage: {e}");
            e.exit_code()
        }
    }
}

fn load_config(file: Option<&Path>) -> Result<ManageConfig, ManageError> {
    proto::service::load_config(file).map_err(|e| ManageError::Config(e.to_string()))
}

/// Runs a command from the command line: the few that need neither the database nor a
/// migrated schema first, then the rest on an opened database.
fn execute(cli: Cli) -> Result<String, ManageError> {
    // A key pair needs no configuration at all.
    if let Command::Keys(command) = cli.command {
        return keys::run(command, cli.format);
    }
    let config = load_config(cli.config.as_deref())?;
    let url = config.database_url(cli.database.as_deref());
    match cli.command {
        Command::Db(database::DbCommand::Sync) => database::sync(&url, cli.format),
        Command::Db(database::DbCommand::Version) => database::version(&url, cli.format),
        Command::Queue(command) => queue::run(&config.rpc, command, cli.format),
        command => run(&Db::open(&url)?, &config, &url, command, cli.format),
    }
}

/// Carries out one command on an opened database; returns what to print.
fn run(
    db: &Db,
    config: &ManageConfig,
    url: &str,
    command: Command,
    format: Format,
) -> Result<String, ManageError> {
    match command {
        Command::Bootstrap { password } => identity::bootstrap(db, password, format),
        Command::Project(command) => identity::project(db, command, format),
        Command::User(command) => identity::user(db, command, format),
        Command::Role(command) => identity::role(db, command, format),
        Command::Db(command) => database::run(db, url, command, format),
        Command::Service(command) => hosts::service(db, config, command, format),
        Command::Hypervisor(command) => hosts::hypervisor(db, config, command, format),
        Command::Flavor(command) => catalog::flavor(db, command, format),
        Command::Image(command) => catalog::image(db, config, url, command, format),
        Command::Network(command) => networks::run(db, command, format),
        Command::Keys(command) => keys::run(command, format),
        Command::Queue(command) => queue::run(&config.rpc, command, format),
    }
}

fn json_text(value: &Value) -> String {
    // Serializing a Value cannot fail: its map keys are strings.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(headers.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; headers.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line.push_str(cell);
            line.push_str(&" ".repeat(width - cell.chars().count() + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One record as a two-column FIELD/VALUE table (`show` commands).
fn fields(rows: impl IntoIterator<Item = (&'static str, String)>) -> String {
    table(
        &["FIELD", "VALUE"],
        rows.into_iter().map(|(k, v)| vec![k.to_string(), v]),
    )
}

/// A timestamp column as the API shows it.
fn timestamp(at: chrono::NaiveDateTime) -> String {
    at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn open_temp() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&db::test_database_url(dir.path()).unwrap()).unwrap();
        (dir, db)
    }

    /// Runs `zova-manage ARGS` (without the program name) on `db` with the default
    /// configuration.
    pub(super) fn manage(db: &Db, args: &str) -> Result<String, ManageError> {
        manage_with(db, &ManageConfig::default(), args)
    }

    pub(super) fn manage_with(
        db: &Db,
        config: &ManageConfig,
        args: &str,
    ) -> Result<String, ManageError> {
        let cli = parse(args).unwrap_or_else(|e| panic!("{args}: {e}"));
        run(db, config, "unused.sqlite", cli.command, cli.format)
    }

    pub(super) fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("zova-manage").chain(args.split_whitespace()))
    }

    pub(super) fn json(db: &Db, args: &str) -> Value {
        let text = manage(db, &format!("{args} --format json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn tables_are_aligned_without_trailing_blanks() {
        let text = table(
            &["ID", "NAME"],
            [
                vec!["1".into(), "alpha".into()],
                vec!["22222".into(), "".into()],
            ],
        );
        assert_eq!(text, "ID     NAME\n1      alpha\n22222\n");
        let text = table(&["A", "B"], [vec!["ü".into(), "x".into()]]);
        assert_eq!(text, "A  B\nü  x\n", "width counts characters, not bytes");
        assert_eq!(
            fields([("name", "x".to_string()), ("vcpus", "2".into())]),
            "FIELD  VALUE\nname   x\nvcpus  2\n"
        );
    }

    #[test]
    fn the_database_flag_overrides_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("zova.toml");
        std::fs::write(
            &file,
            "[database]\nurl = \"/from/file.sqlite\"\n[api]\nlisten = \"x\"\n\
             [scheduler]\nservice_down_time = 90\nbuild_queue_period = 2.0\n",
        )
        .unwrap();
        let config = load_config(Some(&file)).unwrap();
        assert_eq!(config.database_url(None), "/from/file.sqlite");
        assert_eq!(config.database_url(Some("/flag.sqlite")), "/flag.sqlite");
        assert_eq!(
            (config.down_after(None), config.down_after(Some(5))),
            (90, 5)
        );
        let err = load_config(Some(&dir.path().join("missing.toml"))).unwrap_err();
        assert!(matches!(err, ManageError::Config(_)), "{err}");
        assert_eq!(err.exit_code(), ExitCode::from(2));
        assert_eq!(ManageConfig::default().down_after(None), 60);
    }

    #[test]
    fn the_image_store_defaults_to_images_beside_the_database() {
        let mut config = ManageConfig::default();
        assert_eq!(
            config.image_store(None, "sqlite:///var/lib/zova/zova.sqlite"),
            Path::new("/var/lib/zova/images")
        );
        assert_eq!(config.image_store(None, "zova.sqlite"), Path::new("images"));
        assert_eq!(
            config.image_store(None, "postgres://zova:secret@db.example/zova"),
            Path::new("images")
        );
        config.image.store_path = Some("/srv/images".into());
        assert_eq!(
            config.image_store(None, "/x/zova.sqlite"),
            Path::new("/srv/images")
        );
        assert_eq!(
            config.image_store(Some("/flag".into()), "/x/zova.sqlite"),
            Path::new("/flag")
        );
    }

    #[test]
    fn a_bad_configuration_file_is_a_configuration_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("zova.toml");
        std::fs::write(&file, "[database\nurl = 1\n").unwrap();
        let err = load_config(Some(&file)).unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::from(2), "{err}");
    }
}
