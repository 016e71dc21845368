//! Instance disks: a qcow2 file per instance under `<instances_dir>/<name>/disk`, made by
//! `qemu-img`, optionally over the image as its backing file.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// The file name of an instance's root disk inside its directory.
pub const DISK_FILE_NAME: &str = "disk";

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{name:?} cannot name an instance directory: it must be a plain file name (not empty, no '/', not '.' or '..')")]
    InvalidName { name: String },
    #[error("Cannot create instance directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot run qemu-img (is qemu-utils installed?): {source}")]
    QemuImgMissing {
        #[source]
        source: io::Error,
    },
    #[error("qemu-img could not create disk {} ({status}): {stderr}", path.display())]
    QemuImg {
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("Cannot remove instance directory {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates `<instances_dir>/<name>/disk`, a qcow2 of `size_gb` GiB (at least 1), over
/// `backing_file` (a qcow2 image) when given. Returns the disk's path.
///
/// An existing disk at that path is replaced, so a retried build starts from a clean disk.
pub fn create_instance_disk(
    instances_dir: &Path,
    name: &str,
    size_gb: u64,
    backing_file: Option<&Path>,
) -> Result<PathBuf, DiskError> {
    let dir = instance_dir(instances_dir, name)?;
    std::fs::create_dir_all(&dir).map_err(|source| DiskError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let disk = dir.join(DISK_FILE_NAME);

    let mut command = Command::new("qemu-img");
    command.args(["create", "-q", "-f", "qcow2"]);
    if let Some(backing) = backing_file {
        // qemu-img resolves a relative backing path against the new disk's directory, not ours.
        let backing = std::path::absolute(backing).unwrap_or_else(|_| backing.to_path_buf());
        command.arg("-b").arg(backing).args(["-F", "qcow2"]);
    }
    command.arg(&disk).arg(format!("{}G", size_gb.max(1)));

    let output = command
        .output()
        .map_err(|source| DiskError::QemuImgMissing { source })?;
    if !output.status.success() {
        return Err(DiskError::QemuImg {
            path: disk,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(disk)
}

/// Removes `<instances_dir>/<name>` and everything in it; a directory already gone is fine, so a
/// repeated delete succeeds.
pub fn remove_instance_dir(instances_dir: &Path, name: &str) -> Result<(), DiskError> {
    let dir = instance_dir(instances_dir, name)?;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DiskError::Remove { path: dir, source }),
    }
}

/// `<instances_dir>/<name>`, once `name` is known not to climb out of `instances_dir`.
fn instance_dir(instances_dir: &Path, name: &str) -> Result<PathBuf, DiskError> {
    let unsafe_name =
        name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0');
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

    const GIB: u64 = 1024 * 1024 * 1024;

    #[test]
    fn creates_a_qcow2_of_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let disk = create_instance_disk(dir.path(), "instance-a", 3, None).unwrap();

        assert_eq!(disk, dir.path().join("instance-a").join("disk"));
        assert!(disk.is_file());
        let info = info(&disk);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 3 * GIB);
        assert!(info.get("backing-filename").is_none());
    }

    #[test]
    fn size_zero_gives_one_gib() {
        let dir = tempfile::tempdir().unwrap();
        let disk = create_instance_disk(dir.path(), "instance-z", 0, None).unwrap();
        assert_eq!(info(&disk)["virtual-size"], GIB);
    }

    #[test]
    fn creates_an_overlay_over_a_backing_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("1G")
            .status()
            .unwrap();
        assert!(status.success());

        let instances = dir.path().join("instances");
        let disk = create_instance_disk(&instances, "instance-b", 2, Some(&image)).unwrap();

        let info = info(&disk);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 2 * GIB);
        assert_eq!(info["backing-filename"], image.to_str().unwrap());
        assert_eq!(info["backing-filename-format"], "qcow2");
    }

    #[test]
    fn a_missing_backing_image_is_reported_with_qemu_imgs_words() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-image.qcow2");
        let err = create_instance_disk(dir.path(), "instance-c", 1, Some(&missing)).unwrap_err();
        match &err {
            DiskError::QemuImg { stderr, .. } => assert!(!stderr.is_empty(), "{err}"),
            other => panic!("expected a qemu-img error, got {other:?}"),
        }
        assert!(err.to_string().contains("no-such-image"), "{err}");
    }

    #[test]
    fn unsafe_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", ".", "..", "../escape", "a/b", "/abs", "a/../b", "x\0y"] {
            let err = create_instance_disk(dir.path(), name, 1, None).unwrap_err();
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
    fn remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let disk = create_instance_disk(dir.path(), "instance-d", 1, None).unwrap();

        remove_instance_dir(dir.path(), "instance-d").unwrap();
        assert!(!disk.exists());
        assert!(!dir.path().join("instance-d").exists());
        remove_instance_dir(dir.path(), "instance-d").unwrap();
        remove_instance_dir(dir.path(), "never-existed").unwrap();
    }
}
