//! Instance disks, as Nova's libvirt driver lays them out under `instances_path`:
//!
//! ```text
//! _base/<sha256 of the image id>    the image, copied once per node and shared
//! _base/ephemeral_<gb>_ext4         a formatted blank disk per ephemeral size
//! _base/swap_<mb>                   a swap area per swap size
//! <instance name>/disk              qcow2 over the image, sized to the flavor's root_gb
//! <instance name>/disk.local        qcow2 over the ephemeral base (flavor ephemeral_gb)
//! <instance name>/disk.swap         qcow2 over the swap base (flavor swap_mb)
//! <instance name>/libvirt.xml       the domain XML the instance was defined with
//! <instance name>/console.log       the guest's serial console
//! ```
//!
//! Every overlay is a thin copy-on-write file, so a build costs one `qemu-img create` per disk
//! once the bases are cached. Bases are made under an exclusive `flock` on `_base/<name>.lock`
//! (several builds of one image, even from several processes, copy it once) and appear only
//! complete: written to `<name>.part`, synced, then renamed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use thiserror::Error;

pub const BASE_DIR_NAME: &str = "_base";
/// The file name of an instance's root disk inside its directory.
pub const DISK_FILE_NAME: &str = "disk";
pub const EPHEMERAL_FILE_NAME: &str = "disk.local";
pub const SWAP_FILE_NAME: &str = "disk.swap";
pub const DOMAIN_XML_FILE_NAME: &str = "libvirt.xml";
pub const CONSOLE_LOG_FILE_NAME: &str = "console.log";

const GIB: u64 = 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{name:?} cannot name an instance directory: it must be a plain file name (not empty, no '/', not '.' or '..')")]
    InvalidName { name: String },
    #[error("Cannot create directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot run {tool} (is it installed?): {source}")]
    ToolMissing {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed on {} ({status}): {stderr}", path.display())]
    Tool {
        tool: &'static str,
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("Image {image} cannot be used: {reason}")]
    BadImage { image: String, reason: String },
    #[error("Flavor's disk is too small for the requested image: the flavor has {root_gb} GiB, the image needs {image_bytes} bytes")]
    FlavorDiskSmallerThanImage { root_gb: u64, image_bytes: u64 },
    #[error("A disk of {count} × {unit} bytes is beyond any disk")]
    TooLarge { count: u64, unit: u64 },
    #[error("Cannot remove instance directory {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The image an instance boots from: its id (which names the cached copy), the file on this
/// host, and the format its image record declares.
#[derive(Debug, Clone, Copy)]
pub struct ImageSource<'a> {
    pub id: &'a str,
    pub path: &'a Path,
    pub disk_format: &'a str,
}

/// What the flavor and the image ask of an instance's disks.
#[derive(Debug, Clone, Copy)]
pub struct DiskRequest<'a> {
    /// 0: the image's own size (1 GiB without an image), as Nova does for a root_gb of 0.
    pub root_gb: u64,
    pub ephemeral_gb: u64,
    pub swap_mb: u64,
    pub image: Option<ImageSource<'a>>,
}

/// The files of one instance, all qcow2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDisks {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub ephemeral: Option<PathBuf>,
    pub swap: Option<PathBuf>,
}

/// A file under `_base`, ready to back overlays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub path: PathBuf,
    /// `raw` or `qcow2`: what `-F` tells qemu-img, so the backing file's format is never guessed.
    pub format: String,
    pub virtual_size: u64,
}

/// Creates the instance's directory and its disks, making (or reusing) the bases they sit on.
/// Existing disks at those paths are replaced, so a retried build starts from clean disks.
pub fn create_instance_disks(
    instances_dir: &Path,
    name: &str,
    request: &DiskRequest<'_>,
) -> Result<InstanceDisks, DiskError> {
    let dir = instance_dir(instances_dir, name)?;
    let base_dir = instances_dir.join(BASE_DIR_NAME);
    for d in [&base_dir, &dir] {
        std::fs::create_dir_all(d).map_err(|source| DiskError::CreateDir {
            path: d.clone(),
            source,
        })?;
    }

    let image = request
        .image
        .map(|image| cached_image(&base_dir, &image))
        .transpose()?;
    let root_bytes = match (request.root_gb, &image) {
        (0, Some(image)) => image.virtual_size,
        (0, None) => GIB,
        (gb, Some(image)) if bytes_of(gb, GIB)? < image.virtual_size => {
            return Err(DiskError::FlavorDiskSmallerThanImage {
                root_gb: gb,
                image_bytes: image.virtual_size,
            })
        }
        (gb, _) => bytes_of(gb, GIB)?,
    };
    let root = dir.join(DISK_FILE_NAME);
    create_overlay(&root, image.as_ref(), root_bytes)?;

    let ephemeral = match request.ephemeral_gb {
        0 => None,
        gb => {
            let bytes = bytes_of(gb, GIB)?;
            let base = blank_base(&base_dir, &format!("ephemeral_{gb}_ext4"), bytes, |p| {
                // Nova's default for a Linux guest: ext4 labelled ephemeral0, which cloud-init
                // mounts on /mnt.
                run("mkfs.ext4", p, |c| {
                    c.args(["-F", "-q", "-L", "ephemeral0"]).arg(p);
                })
            })?;
            let path = dir.join(EPHEMERAL_FILE_NAME);
            create_overlay(&path, Some(&base), base.virtual_size)?;
            Some(path)
        }
    };
    let swap = match request.swap_mb {
        0 => None,
        mb => {
            let bytes = bytes_of(mb, MIB)?;
            let base = blank_base(&base_dir, &format!("swap_{mb}"), bytes, |p| {
                run("mkswap", p, |c| {
                    c.arg("-q").arg(p);
                })
            })?;
            let path = dir.join(SWAP_FILE_NAME);
            create_overlay(&path, Some(&base), base.virtual_size)?;
            Some(path)
        }
    };
    Ok(InstanceDisks {
        dir,
        root,
        ephemeral,
        swap,
    })
}

/// `count` units of `unit` bytes, refused when that does not fit in 64 bits (no real disk is
/// that big; a flavor that asks is a mistake).
fn bytes_of(count: u64, unit: u64) -> Result<u64, DiskError> {
    count
        .checked_mul(unit)
        .ok_or(DiskError::TooLarge { count, unit })
}

/// Writes `contents` to `<instances_dir>/<name>/<file>` (the domain XML), replacing it.
pub fn write_instance_file(
    instances_dir: &Path,
    name: &str,
    file: &str,
    contents: &str,
) -> Result<PathBuf, DiskError> {
    let path = instance_dir(instances_dir, name)?.join(file);
    std::fs::write(&path, contents).map_err(|source| DiskError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The path of `<instances_dir>/<name>/<file>`, once `name` is known to be safe.
pub fn instance_file(instances_dir: &Path, name: &str, file: &str) -> Result<PathBuf, DiskError> {
    Ok(instance_dir(instances_dir, name)?.join(file))
}

/// The image's copy under `_base`, made on first use. The image must really be in the format its
/// record declares (raw or qcow2) and must not have a backing file of its own: a qcow2 that
/// points at `/etc/shadow` would hand the guest that file.
pub fn cached_image(base_dir: &Path, image: &ImageSource<'_>) -> Result<BaseImage, DiskError> {
    let bad = |reason: String| DiskError::BadImage {
        image: image.id.to_owned(),
        reason,
    };
    let format = match image.disk_format {
        "raw" | "qcow2" => image.disk_format,
        other => {
            return Err(bad(format!(
                "disk format {other:?} is not supported here (raw or qcow2)"
            )))
        }
    };
    let cached = cached_image_path(base_dir, image.id);
    with_base_lock(base_dir, &cached, || {
        if !cached.exists() {
            let part = part_path(&cached);
            let made = (|| {
                std::fs::copy(image.path, &part).map_err(|source| DiskError::Write {
                    path: part.clone(),
                    source,
                })?;
                // The copy is what guests will read, so the copy is what is checked: a file
                // swapped at the source after a check would otherwise slip through.
                refuse_external_files(&image_info(&part, format)?).map_err(bad)?;
                sync_and_rename(&part, &cached)
            })();
            if made.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            made?;
        }
        let info = image_info(&cached, format)?;
        let virtual_size = info
            .get("virtual-size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("qemu-img reports no virtual size".into()))?;
        Ok(BaseImage {
            path: cached.clone(),
            format: format.to_owned(),
            virtual_size,
        })
    })
}

/// Refuses an image that makes QEMU open another file: a backing file, or a qcow2 external
/// data file (OSSA-2024-001), either of which would hand the guest a host file (another
/// instance's disk, `/etc/shadow`) to read.
fn refuse_external_files(info: &serde_json::Value) -> Result<(), String> {
    if let Some(backing) = info.get("backing-filename") {
        return Err(format!(
            "it has a backing file ({backing}); upload a flattened image"
        ));
    }
    if let Some(data_file) = info.pointer("/format-specific/data/data-file") {
        return Err(format!(
            "it has an external data file ({data_file}); upload a self-contained image"
        ));
    }
    Ok(())
}

/// Where image `image_id` is cached under `base_dir` (`_base`): named by the SHA-256 of the id,
/// so no id can name a path.
pub fn cached_image_path(base_dir: &Path, image_id: &str) -> PathBuf {
    base_dir.join(hex_sha256(image_id))
}

/// A raw base of `bytes` under `_base/<file>`, prepared once by `prepare` (mkfs, mkswap).
fn blank_base(
    base_dir: &Path,
    file: &str,
    bytes: u64,
    prepare: impl FnOnce(&Path) -> Result<(), DiskError>,
) -> Result<BaseImage, DiskError> {
    let path = base_dir.join(file);
    with_base_lock(base_dir, &path, || {
        if !path.exists() {
            let part = part_path(&path);
            let made = (|| {
                let file = File::create(&part).map_err(|source| DiskError::Write {
                    path: part.clone(),
                    source,
                })?;
                // Sparse: only what mkfs writes takes space.
                file.set_len(bytes).map_err(|source| DiskError::Write {
                    path: part.clone(),
                    source,
                })?;
                drop(file);
                prepare(&part)?;
                sync_and_rename(&part, &path)
            })();
            if made.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            made?;
        }
        Ok(BaseImage {
            path: path.clone(),
            format: "raw".into(),
            virtual_size: bytes,
        })
    })
}

/// Runs `make` holding an exclusive lock on `_base/<file>.lock`, so one base is made once even
/// when several builds (or several compute processes sharing the directory) want it at once.
fn with_base_lock<T>(
    base_dir: &Path,
    base: &Path,
    make: impl FnOnce() -> Result<T, DiskError>,
) -> Result<T, DiskError> {
    let file_name = base.file_name().unwrap_or_default().to_string_lossy();
    let lock_path = base_dir.join(format!("{file_name}.lock"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| DiskError::Write {
            path: lock_path.clone(),
            source,
        })?;
    lock.lock().map_err(|source| DiskError::Write {
        path: lock_path.clone(),
        source,
    })?;
    // The lock goes with the file handle, also when `make` fails.
    make()
}

/// A qcow2 at `path` of `bytes`, over `backing` when given; an existing file is replaced.
fn create_overlay(path: &Path, backing: Option<&BaseImage>, bytes: u64) -> Result<(), DiskError> {
    run("qemu-img", path, |c| {
        c.args(["create", "-q", "-f", "qcow2"]);
        if let Some(backing) = backing {
            // qemu-img resolves a relative backing path against the new disk's directory.
            let file = std::path::absolute(&backing.path).unwrap_or_else(|_| backing.path.clone());
            c.arg("-b").arg(file).args(["-F", backing.format.as_str()]);
        }
        c.arg(path).arg(bytes.to_string());
    })
}

/// `qemu-img info` of `path` read as `format` (never probed: probing a raw image whose first
/// bytes look like qcow2 is how a guest reads host files).
fn image_info(path: &Path, format: &str) -> Result<serde_json::Value, DiskError> {
    let output = tool_output("qemu-img", path, |c| {
        c.args(["info", "--output=json", "-U", "-f", format])
            .arg(path);
    })?;
    serde_json::from_slice(&output).map_err(|e| DiskError::BadImage {
        image: path.display().to_string(),
        reason: format!("qemu-img info printed no JSON: {e}"),
    })
}

fn run(tool: &'static str, path: &Path, args: impl FnOnce(&mut Command)) -> Result<(), DiskError> {
    tool_output(tool, path, args).map(drop)
}

/// Runs `tool`, returning its standard output; a failure carries its standard error.
fn tool_output(
    tool: &'static str,
    path: &Path,
    args: impl FnOnce(&mut Command),
) -> Result<Vec<u8>, DiskError> {
    let mut command = Command::new(tool);
    args(&mut command);
    let output = command
        .output()
        .map_err(|source| DiskError::ToolMissing { tool, source })?;
    if !output.status.success() {
        return Err(DiskError::Tool {
            tool,
            path: path.to_path_buf(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output.stdout)
}

fn part_path(path: &Path) -> PathBuf {
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    PathBuf::from(part)
}

/// Makes `part` durable, then gives it its final name: a crash leaves a `.part`, never a
/// half-written base that later builds would trust.
fn sync_and_rename(part: &Path, path: &Path) -> Result<(), DiskError> {
    let write_err = |source| DiskError::Write {
        path: part.to_path_buf(),
        source,
    };
    OpenOptions::new()
        .write(true)
        .open(part)
        .and_then(|mut f| f.flush().and_then(|()| f.sync_all()))
        .map_err(write_err)?;
    std::fs::rename(part, path).map_err(write_err)
}

fn hex_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the file system of `dir` takes O_DIRECT writes, which QEMU's `cache="none"` needs
/// (tmpfs and some overlay set-ups do not). As Nova's `_supports_direct_io`: open a scratch file
/// with O_DIRECT and write one aligned block.
pub fn supports_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4096;
    let probe = dir.join(".zova-directio.test");
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .and_then(|mut file| {
            // O_DIRECT wants the buffer aligned too: take an aligned window of a larger one.
            let buffer = vec![0u8; 2 * BLOCK];
            let offset = buffer.as_ptr().align_offset(BLOCK);
            let aligned = buffer
                .get(offset..offset + BLOCK)
                .ok_or(io::ErrorKind::Other)?;
            file.write_all(aligned)
        });
    let _ = std::fs::remove_file(&probe);
    written.is_ok()
}

/// Removes `<instances_dir>/<name>` and everything in it; a directory already gone is fine, so a
/// repeated delete succeeds. The shared bases stay.
pub fn remove_instance_dir(instances_dir: &Path, name: &str) -> Result<(), DiskError> {
    let dir = instance_dir(instances_dir, name)?;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DiskError::Remove { path: dir, source }),
    }
}

/// `<instances_dir>/<name>`, once `name` is known not to climb out of `instances_dir` (nor to
/// be the shared `_base`).
fn instance_dir(instances_dir: &Path, name: &str) -> Result<PathBuf, DiskError> {
    let unsafe_name = name.is_empty()
        || name == "."
        || name == ".."
        || name == BASE_DIR_NAME
        || name.contains('/')
        || name.contains('\0');
    if unsafe_name {
        return Err(DiskError::InvalidName { name: name.into() });
    }
    Ok(instances_dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qemu-img info` of a file, as JSON.
    fn info(path: &Path) -> serde_json::Value {
        let output = Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(path)
            .output()
            .expect("qemu-img runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("qemu-img prints JSON")
    }

    fn qemu_img_create(path: &Path, format: &str, size: &str, backing: Option<&Path>) {
        let mut c = Command::new("qemu-img");
        c.args(["create", "-q", "-f", format]);
        if let Some(b) = backing {
            c.arg("-b").arg(b).args(["-F", "qcow2"]);
        }
        let status = c.arg(path).arg(size).status().unwrap();
        assert!(status.success());
    }

    /// The files under a `_base` directory but its lock files, sorted.
    fn base_files(base_dir: &Path) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(base_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        files.sort();
        files
    }

    const IMAGE_ID: &str = "155d900f-4e14-4e4c-a73d-069cbf4541e6";

    fn no_image(root_gb: u64) -> DiskRequest<'static> {
        DiskRequest {
            root_gb,
            ephemeral_gb: 0,
            swap_mb: 0,
            image: None,
        }
    }

    #[test]
    fn root_disk_is_a_qcow2_of_the_flavor_size() {
        let dir = tempfile::tempdir().unwrap();
        let disks = create_instance_disks(dir.path(), "instance-a", &no_image(3)).unwrap();

        assert_eq!(disks.root, dir.path().join("instance-a").join("disk"));
        assert_eq!(disks.dir, dir.path().join("instance-a"));
        assert_eq!((disks.ephemeral, disks.swap), (None, None));
        let info = info(&disks.root);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 3 * GIB);
        assert!(info.get("backing-filename").is_none());
    }

    #[test]
    fn root_gb_zero_takes_the_image_size_or_one_gib() {
        let dir = tempfile::tempdir().unwrap();
        let disks = create_instance_disks(dir.path(), "instance-z", &no_image(0)).unwrap();
        assert_eq!(info(&disks.root)["virtual-size"], GIB);

        let image = dir.path().join("image.qcow2");
        qemu_img_create(&image, "qcow2", "2G", None);
        let request = DiskRequest {
            image: Some(ImageSource {
                id: IMAGE_ID,
                path: &image,
                disk_format: "qcow2",
            }),
            ..no_image(0)
        };
        let disks = create_instance_disks(dir.path(), "instance-y", &request).unwrap();
        assert_eq!(info(&disks.root)["virtual-size"], 2 * GIB);
    }

    #[test]
    fn the_image_is_cached_once_under_base_and_backs_every_root_disk() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        std::fs::write(&image, vec![7u8; 1024 * 1024]).unwrap();
        let request = DiskRequest {
            root_gb: 2,
            ephemeral_gb: 0,
            swap_mb: 0,
            image: Some(ImageSource {
                id: IMAGE_ID,
                path: &image,
                disk_format: "raw",
            }),
        };
        let instances = dir.path().join("instances");
        let a = create_instance_disks(&instances, "instance-a", &request).unwrap();
        // The source may go away once cached: the second build must not read it.
        std::fs::remove_file(&image).unwrap();
        let b = create_instance_disks(&instances, "instance-b", &request).unwrap();

        let base = instances.join(BASE_DIR_NAME).join(hex_sha256(IMAGE_ID));
        assert_eq!(std::fs::read(&base).unwrap(), vec![7u8; 1024 * 1024]);
        for disks in [&a, &b] {
            let info = info(&disks.root);
            assert_eq!(info["format"], "qcow2");
            assert_eq!(info["virtual-size"], 2 * GIB);
            assert_eq!(info["backing-filename"], base.to_str().unwrap());
            assert_eq!(info["backing-filename-format"], "raw");
        }
        let files = base_files(&instances.join(BASE_DIR_NAME));
        assert!(!files.iter().any(|n| n.ends_with(".part")), "{files:?}");
    }

    #[test]
    fn ephemeral_and_swap_disks_sit_on_formatted_bases() {
        let dir = tempfile::tempdir().unwrap();
        let request = DiskRequest {
            root_gb: 1,
            ephemeral_gb: 1,
            swap_mb: 64,
            image: None,
        };
        let disks = create_instance_disks(dir.path(), "instance-e", &request).unwrap();

        let ephemeral = disks.ephemeral.expect("an ephemeral disk");
        assert_eq!(ephemeral, dir.path().join("instance-e").join("disk.local"));
        let info_e = info(&ephemeral);
        assert_eq!(info_e["virtual-size"], GIB);
        assert_eq!(info_e["backing-filename-format"], "raw");
        let base = dir.path().join("_base").join("ephemeral_1_ext4");
        assert_eq!(info_e["backing-filename"], base.to_str().unwrap());
        // An ext4 superblock: magic 0xEF53 at byte 1024 + 56.
        let bytes = std::fs::read(&base).unwrap();
        assert_eq!(&bytes[1080..1082], &[0x53, 0xef]);

        let swap = disks.swap.expect("a swap disk");
        assert_eq!(info(&swap)["virtual-size"], 64 * MIB);
        let swap_base = std::fs::read(dir.path().join("_base").join("swap_64")).unwrap();
        // mkswap's signature sits at the end of the first page.
        assert_eq!(&swap_base[4096 - 10..4096], b"SWAPSPACE2");
    }

    #[test]
    fn a_flavor_smaller_than_the_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("big.qcow2");
        qemu_img_create(&image, "qcow2", "3G", None);
        let request = DiskRequest {
            image: Some(ImageSource {
                id: IMAGE_ID,
                path: &image,
                disk_format: "qcow2",
            }),
            ..no_image(2)
        };
        let err = create_instance_disks(dir.path(), "instance-s", &request).unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::FlavorDiskSmallerThanImage {
                    root_gb: 2,
                    image_bytes
                } if image_bytes == 3 * GIB
            ),
            "{err}"
        );
    }

    #[test]
    fn images_with_a_backing_file_or_a_wrong_format_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.qcow2");
        qemu_img_create(&secret, "qcow2", "1G", None);
        let sneaky = dir.path().join("sneaky.qcow2");
        qemu_img_create(&sneaky, "qcow2", "1G", Some(&secret));
        let base_dir = dir.path().join("_base");
        std::fs::create_dir_all(&base_dir).unwrap();

        let err = cached_image(
            &base_dir,
            &ImageSource {
                id: "sneaky",
                path: &sneaky,
                disk_format: "qcow2",
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("backing file"), "{err}");

        // A raw file declared qcow2 does not parse as qcow2.
        let raw = dir.path().join("plain.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let err = cached_image(
            &base_dir,
            &ImageSource {
                id: "plain",
                path: &raw,
                disk_format: "qcow2",
            },
        )
        .unwrap_err();
        assert!(matches!(err, DiskError::Tool { .. }), "{err}");

        let err = cached_image(
            &base_dir,
            &ImageSource {
                id: "iso",
                path: &raw,
                disk_format: "iso",
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");

        let cached = base_files(&base_dir);
        assert!(cached.is_empty(), "{cached:?}");
    }

    #[test]
    fn images_with_an_external_data_file_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret.raw");
        std::fs::write(&secret, b"host secret").unwrap();
        let image = dir.path().join("data-file.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={},data_file_raw=on", secret.display()))
            .arg(&image)
            .arg("1M")
            .status()
            .unwrap();
        assert!(status.success());
        let base_dir = dir.path().join("_base");
        std::fs::create_dir_all(&base_dir).unwrap();
        let err = cached_image(
            &base_dir,
            &ImageSource {
                id: "data-file",
                path: &image,
                disk_format: "qcow2",
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("external data file"), "{err}");
        let left = base_files(&base_dir);
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn concurrent_builds_of_one_image_copy_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        std::fs::write(&image, vec![3u8; 4 * 1024 * 1024]).unwrap();
        let instances = dir.path().join("instances");
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (image, instances) = (image.clone(), instances.clone());
                std::thread::spawn(move || {
                    let request = DiskRequest {
                        root_gb: 1,
                        ephemeral_gb: 1,
                        swap_mb: 16,
                        image: Some(ImageSource {
                            id: IMAGE_ID,
                            path: &image,
                            disk_format: "raw",
                        }),
                    };
                    create_instance_disks(&instances, &format!("instance-{i}"), &request)
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap().unwrap();
        }
        let files = base_files(&instances.join(BASE_DIR_NAME));
        let mut expected = vec![
            hex_sha256(IMAGE_ID),
            "ephemeral_1_ext4".to_string(),
            "swap_16".to_string(),
        ];
        expected.sort();
        assert_eq!(files, expected);
        let base = instances.join(BASE_DIR_NAME).join(hex_sha256(IMAGE_ID));
        assert_eq!(std::fs::read(base).unwrap(), vec![3u8; 4 * 1024 * 1024]);
    }

    #[test]
    fn absurd_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_instance_disks(dir.path(), "instance-h", &no_image(u64::MAX)).unwrap_err();
        assert!(matches!(err, DiskError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn direct_io_is_found_where_the_file_system_has_it() {
        let dir = tempfile::tempdir().unwrap();
        // This machine's disks take O_DIRECT; the probe leaves nothing behind either way.
        assert!(supports_direct_io(dir.path()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(!supports_direct_io(&dir.path().join("missing")));
    }

    #[test]
    fn unsafe_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "",
            ".",
            "..",
            "_base",
            "../escape",
            "a/b",
            "/abs",
            "a/../b",
            "x\0y",
        ] {
            let err = create_instance_disks(dir.path(), name, &no_image(1)).unwrap_err();
            assert!(
                matches!(err, DiskError::InvalidName { .. }),
                "{name:?}: {err}"
            );
            let err = remove_instance_dir(dir.path(), name).unwrap_err();
            assert!(
                matches!(err, DiskError::InvalidName { .. }),
                "{name:?}: {err}"
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn remove_is_idempotent_and_keeps_the_bases() {
        let dir = tempfile::tempdir().unwrap();
        let request = DiskRequest {
            swap_mb: 16,
            ..no_image(1)
        };
        let disks = create_instance_disks(dir.path(), "instance-d", &request).unwrap();

        remove_instance_dir(dir.path(), "instance-d").unwrap();
        assert!(!disks.root.exists());
        assert!(!dir.path().join("instance-d").exists());
        assert!(dir.path().join("_base").join("swap_16").exists());
        remove_instance_dir(dir.path(), "instance-d").unwrap();
        remove_instance_dir(dir.path(), "never-existed").unwrap();
    }
}
