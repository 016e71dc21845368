//! `flavor` and `image`: the catalogue a boot picks from. Flavors are checked as the compute API
//! checks them (`POST /flavors`); images are copied into the image store and registered.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use db::{Db, DbError, Flavor, Image, NewFlavor, NewImage};

use super::{json_text, table, timestamp, Format, ManageConfig, ManageError};

/// Sizes go up to what Nova's API takes (a signed 32-bit integer).
const MAX_SIZE: i64 = i32::MAX as i64;
/// Names and ids of flavors and images, extra spec keys and values: at most this many characters.
const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Subcommand)]
pub(super) enum FlavorCommand {
    /// Creates a flavor (public unless --private).
    Create(FlavorSpec),
    /// Lists the flavors, public and private, with their properties (extra specs).
    List,
    /// Deletes a flavor for good; servers keep what they were built with.
    Delete {
        /// Flavor id or name.
        flavor: String,
    },
}

#[derive(Debug, Args)]
pub(super) struct FlavorSpec {
    name: String,
    /// Virtual CPUs.
    #[arg(long, allow_negative_numbers = true)]
    vcpus: i64,
    /// RAM in MB.
    #[arg(long, allow_negative_numbers = true)]
    ram: i64,
    /// Root disk in GB (0: the image's size).
    #[arg(long, allow_negative_numbers = true)]
    disk: i64,
    /// The flavor id (default: a new UUID).
    #[arg(long)]
    id: Option<String>,
    /// Ephemeral disk in GB.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    ephemeral: i64,
    /// Swap in MB.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    swap: i64,
    /// Only admins see and use it.
    #[arg(long)]
    private: bool,
    /// An extra spec, e.g. queue_name=gpu (the scheduler's queue for the flavor); repeatable.
    #[arg(long = "property", value_name = "KEY=VALUE")]
    properties: Vec<String>,
}

fn invalid(message: String) -> ManageError {
    ManageError::Invalid(message)
}

fn size(flag: &str, value: i64, min: i64) -> Result<i64, ManageError> {
    if (min..=MAX_SIZE).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(format!(
            "--{flag} must be an integer from {min} to {MAX_SIZE}, not {value}"
        )))
    }
}

/// A flavor or image name: 1 to 255 characters, no blank at either end, no control characters.
fn check_name(kind: &str, name: &str) -> Result<(), ManageError> {
    if name.trim().is_empty()
        || name.trim() != name
        || name.chars().count() > MAX_NAME_LEN
        || name.chars().any(char::is_control)
    {
        return Err(invalid(format!(
            "the {kind} name {name:?} must be 1 to {MAX_NAME_LEN} characters, without blanks at \
             either end or control characters"
        )));
    }
    Ok(())
}

/// One `--property KEY=VALUE`: keys as the compute API takes them (letters, digits, `-_:. `).
fn parse_property(text: &str) -> Result<(String, String), ManageError> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(invalid(format!(
            "--property {text:?} must be KEY=VALUE, e.g. queue_name=gpu"
        )));
    };
    if key.is_empty()
        || key.len() > MAX_NAME_LEN
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:. ".contains(c))
    {
        return Err(invalid(format!(
            "the property key {key:?} must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_', \
             ':', '.' or ' '"
        )));
    }
    if value.chars().count() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "the value of property {key:?} is longer than {MAX_NAME_LEN} characters"
        )));
    }
    Ok((key.to_string(), value.to_string()))
}

impl FlavorSpec {
    /// The flavor and its extra specs, checked as `POST /flavors` checks them.
    fn validate(&self) -> Result<(NewFlavor, BTreeMap<String, String>), ManageError> {
        check_name("flavor", &self.name)?;
        let flavorid = match &self.id {
            None => uuid::Uuid::new_v4().to_string(),
            Some(id)
                if !id.is_empty()
                    && id.len() <= MAX_NAME_LEN
                    && id.trim() == id
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c)) =>
            {
                id.clone()
            }
            Some(id) => {
                return Err(invalid(format!(
                    "--id {id:?} must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_', '.' or \
                     ' ', without blanks at either end"
                )))
            }
        };
        let flavor = NewFlavor {
            flavorid,
            name: self.name.clone(),
            vcpus: size("vcpus", self.vcpus, 1)?,
            memory_mb: size("ram", self.ram, 1)?,
            root_gb: size("disk", self.disk, 0)?,
            ephemeral_gb: size("ephemeral", self.ephemeral, 0)?,
            swap_mb: size("swap", self.swap, 0)?,
            is_public: !self.private,
        };
        let mut specs = BTreeMap::new();
        for text in &self.properties {
            let (key, value) = parse_property(text)?;
            if specs.insert(key.clone(), value).is_some() {
                return Err(invalid(format!("--property {key} is given twice")));
            }
        }
        Ok((flavor, specs))
    }
}

fn flavor_view(flavor: &Flavor, specs: &BTreeMap<String, String>) -> Value {
    json!({
        "id": flavor.flavorid,
        "name": flavor.name,
        "vcpus": flavor.vcpus,
        "ram": flavor.memory_mb,
        "disk": flavor.root_gb,
        "ephemeral": flavor.ephemeral_gb,
        "swap": flavor.swap_mb,
        "is_public": flavor.is_public,
        "properties": specs,
    })
}

fn flavors_output(flavors: &[(Flavor, BTreeMap<String, String>)], format: Format) -> String {
    match format {
        Format::Json => json_text(&Value::Array(
            flavors
                .iter()
                .map(|(f, specs)| flavor_view(f, specs))
                .collect(),
        )),
        Format::Table => table(
            &[
                "ID",
                "NAME",
                "VCPUS",
                "RAM_MB",
                "DISK_GB",
                "EPHEMERAL_GB",
                "SWAP_MB",
                "PUBLIC",
                "PROPERTIES",
            ],
            flavors.iter().map(|(f, specs)| {
                vec![
                    f.flavorid.clone(),
                    f.name.clone(),
                    f.vcpus.to_string(),
                    f.memory_mb.to_string(),
                    f.root_gb.to_string(),
                    f.ephemeral_gb.to_string(),
                    f.swap_mb.to_string(),
                    f.is_public.to_string(),
                    specs
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            }),
        ),
    }
}

/// A live flavor by id or, failing that, by name.
fn find_flavor(db: &Db, key: &str) -> Result<Flavor, ManageError> {
    match db.flavor_get(key)? {
        Some(flavor) => Ok(flavor),
        None => db.flavor_get_by_name(key)?.ok_or_else(|| {
            ManageError::Database(DbError::NotFound {
                kind: "flavor",
                id: key.to_string(),
            })
        }),
    }
}

pub(super) fn flavor(
    db: &Db,
    command: FlavorCommand,
    format: Format,
) -> Result<String, ManageError> {
    match command {
        FlavorCommand::Create(spec) => {
            // Everything is checked before anything is written.
            let (new, specs) = spec.validate()?;
            let flavor = db.flavor_create(&new)?;
            if !specs.is_empty() {
                if let Err(e) = db.flavor_extra_specs_set(&flavor.flavorid, &specs) {
                    // A flavor without the properties asked for would place servers wrongly.
                    let _ = db.flavor_delete(&flavor.flavorid);
                    return Err(e.into());
                }
            }
            let created = [(flavor, specs)];
            Ok(match format {
                Format::Json => json_text(&flavor_view(&created[0].0, &created[0].1)),
                Format::Table => flavors_output(&created, format),
            })
        }
        FlavorCommand::List => {
            let mut listed = Vec::new();
            for flavor in db.flavors()? {
                let specs = db.flavor_extra_specs(&flavor.flavorid)?;
                listed.push((flavor, specs));
            }
            Ok(flavors_output(&listed, format))
        }
        FlavorCommand::Delete { flavor } => {
            let found = find_flavor(db, &flavor)?;
            db.flavor_delete(&found.flavorid)?;
            Ok(match format {
                Format::Json => json_text(&json!({
                    "id": found.flavorid, "name": found.name, "deleted": true,
                })),
                Format::Table => format!("deleted flavor {} ({})\n", found.flavorid, found.name),
            })
        }
    }
}

#[derive(Debug, Subcommand)]
pub(super) enum ImageCommand {
    /// Copies an image file into the image store and registers it (active, container bare).
    Import {
        /// The qcow2 or raw image file.
        file: PathBuf,
        /// The image's name, as the clients show it (need not be unique).
        #[arg(long)]
        name: String,
        /// The file's format (default: what `qemu-img info` says).
        #[arg(long, value_enum)]
        disk_format: Option<DiskFormat>,
        /// Where to keep the image (default: [image] store_path, else `images` beside the
        /// database file).
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Lists the images.
    List,
}

/// The disk formats a compute can boot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    fn name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// What can go wrong importing an image; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub(super) enum ImageError {
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot tell the format of {path} with qemu-img info ({reason}); pass --disk-format")]
    Inspect { path: PathBuf, reason: String },
    #[error("{path} is a {format} image; Zova boots qcow2 and raw (qemu-img convert -O qcow2)")]
    Unsupported { path: PathBuf, format: String },
    #[error(
        "{path} has a backing file ({backing}); import a standalone image \
         (qemu-img convert -O qcow2 {path} NEW)"
    )]
    BackingFile { path: PathBuf, backing: String },
    #[error("cannot write {path} in the image store: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `qemu-img info --output=json` says that matters here: the format, and a backing file
/// (an image that reads another file of this host must not be imported as is).
pub(super) fn parse_qemu_info(path: &Path, output: &str) -> Result<DiskFormat, ImageError> {
    let info: Value = serde_json::from_str(output).map_err(|e| ImageError::Inspect {
        path: path.to_path_buf(),
        reason: format!("unreadable output: {e}"),
    })?;
    let Some(format) = info.get("format").and_then(Value::as_str) else {
        return Err(ImageError::Inspect {
            path: path.to_path_buf(),
            reason: "no format in its output".into(),
        });
    };
    if let Some(backing) = info
        .get("backing-filename")
        .or_else(|| info.get("full-backing-filename"))
        .and_then(Value::as_str)
    {
        return Err(ImageError::BackingFile {
            path: path.to_path_buf(),
            backing: backing.to_string(),
        });
    }
    match format {
        "qcow2" => Ok(DiskFormat::Qcow2),
        "raw" => Ok(DiskFormat::Raw),
        other => Err(ImageError::Unsupported {
            path: path.to_path_buf(),
            format: other.to_string(),
        }),
    }
}

fn detect_format(path: &Path) -> Result<DiskFormat, ImageError> {
    let inspect_error = |reason: String| ImageError::Inspect {
        path: path.to_path_buf(),
        reason,
    };
    let output = Process::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .map_err(|e| inspect_error(format!("cannot run qemu-img: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(inspect_error(stderr.trim().to_string()));
    }
    parse_qemu_info(path, &String::from_utf8_lossy(&output.stdout))
}

/// Files at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 64 * 1024 * 1024;
const COPY_BUFFER_BYTES: usize = 1024 * 1024;

fn progress_bar(size: u64) -> indicatif::ProgressBar {
    if size < PROGRESS_MIN_BYTES || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(size);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message("importing");
    bar
}

/// Copies `from` to `to` (a new file), showing progress, and makes it durable: the file's data
/// is synced before the caller renames it into place. Returns the bytes copied.
fn copy_durably(from: &Path, to: &Path, size: u64) -> Result<u64, ImageError> {
    let read_error = |source| ImageError::Read {
        path: from.to_path_buf(),
        source,
    };
    let store_error = |source| ImageError::Store {
        path: to.to_path_buf(),
        source,
    };
    let mut source = File::open(from).map_err(read_error)?;
    let mut target = File::options()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(store_error)?;
    let bar = progress_bar(size);
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut copied = 0u64;
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_error(e)),
        };
        target.write_all(&buffer[..n]).map_err(store_error)?;
        copied += n as u64;
        bar.set_position(copied);
    }
    target.sync_all().map_err(store_error)?;
    bar.finish_and_clear();
    Ok(copied)
}

/// Copies `file` into `store` as `<uuid>.<format>` (through a hidden partial file, renamed once
/// synced, so the store never holds half an image under a real name) and registers it. A failure
/// leaves neither a file nor a row behind.
fn import(
    db: &Db,
    store: &Path,
    file: &Path,
    name: &str,
    disk_format: Option<DiskFormat>,
) -> Result<Image, ManageError> {
    check_name("image", name)?;
    let metadata = std::fs::metadata(file).map_err(|source| ImageError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(ImageError::NotAFile(file.to_path_buf()).into());
    }
    let disk_format = match disk_format {
        Some(given) => given,
        None => detect_format(file)?,
    };
    let store_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Store { path, source }
    };
    std::fs::create_dir_all(store).map_err(store_error(store))?;
    // The compute opens the image by this path: it must not depend on where this ran.
    let store = std::path::absolute(store).map_err(store_error(store))?;
    let uuid = uuid::Uuid::new_v4().to_string();
    let stored = store.join(format!("{uuid}.{}", disk_format.name()));
    let partial = store.join(format!(".{uuid}.{}.part", disk_format.name()));
    let copied = match copy_durably(file, &partial, metadata.len()) {
        Ok(copied) => copied,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.into());
        }
    };
    let placed = std::fs::rename(&partial, &stored)
        .and_then(|()| File::open(&store)?.sync_all())
        .map_err(store_error(&stored));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&partial);
        let _ = std::fs::remove_file(&stored);
        return Err(e.into());
    }
    let location = stored.to_string_lossy().into_owned();
    let new = NewImage {
        uuid,
        name: name.to_string(),
        disk_format: disk_format.name().to_string(),
        size_bytes: i64::try_from(copied).unwrap_or(i64::MAX),
        location,
    };
    db.image_create(&new).map_err(|e| {
        let _ = std::fs::remove_file(&stored);
        ManageError::from(e)
    })
}

fn image_view(image: &Image) -> Value {
    json!({
        "id": image.uuid,
        "name": image.name,
        "disk_format": image.disk_format,
        "container_format": image.container_format,
        "status": image.status,
        "size": image.size_bytes,
        "location": image.location,
        "created_at": timestamp(image.created_at),
    })
}

fn images_output(images: &[Image], format: Format) -> String {
    match format {
        Format::Json => json_text(&Value::Array(images.iter().map(image_view).collect())),
        Format::Table => table(
            &["ID", "NAME", "FORMAT", "STATUS", "SIZE", "LOCATION"],
            images.iter().map(|i| {
                vec![
                    i.uuid.clone(),
                    i.name.clone(),
                    i.disk_format.clone(),
                    i.status.clone(),
                    i.size_bytes.to_string(),
                    i.location.clone().unwrap_or_default(),
                ]
            }),
        ),
    }
}

pub(super) fn image(
    db: &Db,
    config: &ManageConfig,
    url: &str,
    command: ImageCommand,
    format: Format,
) -> Result<String, ManageError> {
    match command {
        ImageCommand::Import {
            file,
            name,
            disk_format,
            store,
        } => {
            let store = config.image_store(store, url);
            let image = import(db, &store, &file, &name, disk_format)?;
            Ok(match format {
                Format::Json => json_text(&image_view(&image)),
                Format::Table => images_output(&[image], format),
            })
        }
        ImageCommand::List => Ok(images_output(&db.images()?, format)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{json, manage, open_temp, parse};
    use super::*;

    fn spec(args: &str) -> Result<(NewFlavor, BTreeMap<String, String>), ManageError> {
        let cli = parse(&format!("flavor create {args}")).unwrap();
        let super::super::Command::Flavor(FlavorCommand::Create(spec)) = cli.command else {
            panic!("not a flavor create: {args}");
        };
        spec.validate()
    }

    #[test]
    fn flavor_arguments_are_checked_like_the_api_checks_them() {
        let (flavor, specs) = spec(
            "m2.big --vcpus 4 --ram 8192 --disk 0 --id 42 --swap 512 --property a=1 --private",
        )
        .unwrap();
        assert_eq!(
            flavor,
            NewFlavor {
                flavorid: "42".into(),
                name: "m2.big".into(),
                vcpus: 4,
                memory_mb: 8192,
                root_gb: 0,
                ephemeral_gb: 0,
                swap_mb: 512,
                is_public: false,
            }
        );
        assert_eq!(specs, BTreeMap::from([("a".to_string(), "1".to_string())]));
        let (flavor, _) = spec("x --vcpus 1 --ram 1 --disk 1").unwrap();
        assert_eq!(flavor.flavorid.len(), 36, "a UUID when no id is given");
        assert!(flavor.is_public);

        let bad = [
            (
                "x --vcpus 0 --ram 512 --disk 1",
                "--vcpus must be an integer from 1",
            ),
            ("x --vcpus -2 --ram 512 --disk 1", "not -2"),
            ("x --vcpus 1 --ram 0 --disk 1", "--ram must be"),
            ("x --vcpus 1 --ram 512 --disk -1", "--disk must be"),
            ("x --vcpus 1 --ram 512 --disk 1 --swap -1", "--swap must be"),
            (
                "x --vcpus 1 --ram 512 --disk 1 --ephemeral -1",
                "--ephemeral must be",
            ),
            ("x --vcpus 3000000000 --ram 512 --disk 1", "to 2147483647"),
            ("x --vcpus 1 --ram 512 --disk 1 --id a/b", "--id \"a/b\""),
            (
                "x --vcpus 1 --ram 512 --disk 1 --property novalue",
                "KEY=VALUE",
            ),
            (
                "x --vcpus 1 --ram 512 --disk 1 --property a/b=c",
                "property key",
            ),
            (
                "x --vcpus 1 --ram 512 --disk 1 --property a=1 --property a=2",
                "twice",
            ),
        ];
        for (args, want) in bad {
            let err = spec(args).unwrap_err().to_string();
            assert!(err.contains(want), "{args}: {err}");
        }
        for name in [" x", "x ", "a\tb", &"n".repeat(256)] {
            assert!(check_name("flavor", name).is_err(), "{name:?}");
        }
        // Missing sizes are a usage error, before any check of ours.
        assert!(parse("flavor create x --vcpus 1 --ram 512").is_err());
        assert!(parse("flavor create x --vcpus one --ram 512 --disk 1").is_err());
    }

    #[test]
    fn flavors_are_created_listed_and_deleted() {
        let (_dir, db) = open_temp();
        let created = json(
            &db,
            "flavor create m9.test --id m9 --vcpus 2 --ram 1024 --disk 10 --property queue_name=gpu",
        );
        assert_eq!(created["id"], "m9");
        assert_eq!(created["properties"]["queue_name"], "gpu");
        assert_eq!(
            db.flavor_extra_specs("m9")
                .unwrap()
                .get("queue_name")
                .map(String::as_str),
            Some("gpu")
        );
        let text = manage(&db, "flavor list").unwrap();
        assert_eq!(text.lines().count(), 7, "{text}");
        let row = text.lines().find(|l| l.starts_with("m9 ")).unwrap();
        assert!(row.ends_with("true    queue_name=gpu"), "{text}");

        let err = manage(&db, "flavor create m9.test --vcpus 1 --ram 1 --disk 1").unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");

        let text = manage(&db, "flavor delete m9.test").unwrap();
        assert_eq!(text, "deleted flavor m9 (m9.test)\n");
        let err = manage(&db, "flavor delete m9").unwrap_err();
        assert_eq!(err.to_string(), "flavor m9 could not be found");
        assert_eq!(json(&db, "flavor list").as_array().unwrap().len(), 5);
    }

    #[test]
    fn qemu_img_info_decides_the_format() {
        let path = Path::new("/tmp/x.img");
        let format = |json: &str| parse_qemu_info(path, json);
        assert_eq!(
            format(r#"{"format": "qcow2", "virtual-size": 16777216}"#).unwrap(),
            DiskFormat::Qcow2
        );
        assert_eq!(format(r#"{"format": "raw"}"#).unwrap(), DiskFormat::Raw);
        assert!(matches!(
            format(r#"{"format": "vmdk"}"#),
            Err(ImageError::Unsupported { .. })
        ));
        assert!(matches!(
            format(r#"{"format": "qcow2", "backing-filename": "/etc/shadow"}"#),
            Err(ImageError::BackingFile { .. })
        ));
        assert!(matches!(format("{}"), Err(ImageError::Inspect { .. })));
        assert!(matches!(
            format("qemu-img: oops"),
            Err(ImageError::Inspect { .. })
        ));
    }

    #[test]
    fn an_image_is_copied_into_the_store_and_registered() {
        let (dir, db) = open_temp();
        let file = dir.path().join("disk.raw");
        std::fs::write(&file, vec![7u8; 3 * COPY_BUFFER_BYTES + 5]).unwrap();
        let store = dir.path().join("store");
        let image = import(&db, &store, &file, "tiny", Some(DiskFormat::Raw)).unwrap();
        assert_eq!(image.size_bytes, 3 * COPY_BUFFER_BYTES as i64 + 5);
        assert_eq!(
            (image.disk_format.as_str(), image.status.as_str()),
            ("raw", "active")
        );
        let location = PathBuf::from(image.location.clone().unwrap());
        assert_eq!(location, store.join(format!("{}.raw", image.uuid)));
        assert_eq!(
            std::fs::read(&location).unwrap(),
            std::fs::read(&file).unwrap()
        );
        // Nothing but the image is left in the store.
        assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1);

        let listed = json(&db, "image list");
        assert!(listed
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == image.uuid.as_str() && i["name"] == "tiny"));

        let err = import(
            &db,
            &store,
            &dir.path().join("missing"),
            "x",
            Some(DiskFormat::Raw),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("cannot read "), "{err}");
        let err = import(&db, &store, dir.path(), "x", Some(DiskFormat::Raw)).unwrap_err();
        assert!(err.to_string().contains("is not a regular file"), "{err}");
        let err = import(&db, &store, &file, " x", Some(DiskFormat::Raw)).unwrap_err();
        assert!(err.to_string().contains("image name"), "{err}");
        assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1);
    }

    #[test]
    fn a_qcow2_image_is_recognised_by_qemu_img() {
        if Process::new("qemu-img").arg("--version").output().is_err() {
            eprintln!("skipped: no qemu-img (scripts/install-deps installs it)");
            return;
        }
        let (dir, db) = open_temp();
        let file = dir.path().join("disk.qcow2");
        let made = Process::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&file)
            .arg("16M")
            .status()
            .unwrap();
        assert!(made.success());
        let image = import(&db, &dir.path().join("store"), &file, "q", None).unwrap();
        assert_eq!(image.disk_format, "qcow2");
        assert!(image.location.unwrap().ends_with(".qcow2"));
    }
}
