//! The real path: a server booted through the whole fabric onto `qemu:///system`, a QEMU process
//! running its domain (KVM when libvirt finds it usable, else TCG), its disks over the node's
//! cached image, then stopped, started and deleted with nothing left behind.
//!
//! Needs root and libvirtd: the test starts the daemon itself with `scripts/start-libvirtd`
//! when it is not running (scripts/install-deps installs QEMU and libvirt). It never skips.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use compute::disk;
use compute::domain_xml::instance_name;
use compute::driver::{LibvirtDriver, VirtType};
use integration::{test_log, Fabric, HostSpec};

const QEMU_URI: &str = "qemu:///system";
/// TCG boots are slow and CI machines are busy: generous, and never a measured figure.
const LIMIT: Duration = Duration::from_secs(120);

/// Connects to libvirtd after `start-libvirtd` (quick when all is in place) has set up what
/// it needs and started it.
fn libvirtd() -> LibvirtDriver {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-libvirtd");
    let status = Command::new(&script)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} failed ({status}); the real-QEMU test needs root and libvirtd",
        script.display()
    );
    LibvirtDriver::open(QEMU_URI).expect("libvirtd answers after start-libvirtd")
}

/// The pids of QEMU processes running the domain `name` (QEMU's `-name guest=<name>,…`).
fn qemu_processes(name: &str) -> Vec<u32> {
    let needle = format!("guest={name},");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains("qemu-system-x86_64") && cmdline.contains(&needle)
        })
        .collect()
}

/// A blank qcow2 the test owns: the guest finds nothing to boot and waits in the firmware, which
/// is a running domain all the same.
fn make_image(dir: &Path) -> PathBuf {
    let image = dir.join("blank.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .expect("qemu-img runs");
    assert!(status.success());
    image
}

async fn server_status(fabric: &Fabric, id: &str) -> (StatusCode, Value) {
    let answer = fabric.show_server(id).await.expect("answered");
    (answer.status, answer.body["server"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_boot_on_real_qemu_and_leave_nothing_behind_when_deleted() {
    let driver = libvirtd();
    let scratch = tempfile::tempdir().expect("a temporary directory");
    // QEMU runs as libvirt-qemu: it must be able to walk to the disks.
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let image_path = make_image(scratch.path());

    // Two hosts on the one libvirtd: one takes KVM when it works here, the other is told to
    // emulate (TCG), the path of hosts without usable KVM.
    let host = |name: &str, virt_type| HostSpec {
        libvirt_uri: Some(QEMU_URI.into()),
        instances_path: Some(scratch.path().join(name)),
        virt_type: Some(virt_type),
        // The blank guest ignores ACPI: a stop powers it off after this.
        shutdown_timeout: Some(1.0),
        ..HostSpec::new(name, 2, 2048, 20)
    };
    let hosts = [
        host("qemu-auto", VirtType::Auto),
        host("qemu-tcg", VirtType::Qemu),
    ];
    let fabric = Fabric::start(&hosts, test_log())
        .await
        .expect("fabric starts");
    let image_id = uuid::Uuid::new_v4().to_string();
    fabric
        .db
        .image_create(&db::NewImage {
            uuid: image_id.clone(),
            name: "blank".into(),
            disk_format: "qcow2".into(),
            size_bytes: std::fs::metadata(&image_path).expect("image").len() as i64,
            location: image_path.display().to_string(),
        })
        .expect("image registered");
    fabric
        .db
        .flavor_create(&db::NewFlavor {
            flavorid: "qemu.tiny".into(),
            name: "qemu.tiny".into(),
            vcpus: 1,
            memory_mb: 128,
            root_gb: 1,
            ephemeral_gb: 1,
            swap_mb: 64,
            is_public: true,
        })
        .expect("flavor created");

    for (host, domain_types) in [
        (&hosts[0], &["kvm", "qemu"][..]),
        (&hosts[1], &["qemu"][..]),
    ] {
        boot_stop_start_delete(&fabric, &driver, host, &image_id, domain_types).await;
    }
    fabric.stop().await;
}

/// One server on `host` through its whole life, checking QEMU, libvirt and the files at each
/// step.
async fn boot_stop_start_delete(
    fabric: &Fabric,
    driver: &LibvirtDriver,
    host: &HostSpec,
    image_id: &str,
    domain_types: &[&str],
) {
    let instances = host.instances_path.clone().expect("an instances path");
    // Boot: create to ACTIVE, which the compute reports once libvirt says RUNNING.
    let body = json!({
        "server": {"name": "qemu <1>", "flavorRef": "qemu.tiny", "imageRef": image_id},
        "os:scheduler_hints": {"scheduler_host": host.name},
    });
    let started = Instant::now();
    let id = fabric.create_server(&body).await.expect("create accepted");
    let server = fabric
        .wait_for_status(&id, "ACTIVE", LIMIT)
        .await
        .expect("status");
    let boot_time = started.elapsed();
    assert_eq!(server["OS-EXT-SRV-ATTR:host"], host.name.as_str());
    let name = instance_name(&id);

    // A QEMU process runs the domain, of the type this host chose.
    assert_eq!(
        driver.power_state(&name).expect("domain state"),
        proto::power_state::RUNNING
    );
    assert_eq!(
        qemu_processes(&name).len(),
        1,
        "one QEMU process for {name}"
    );
    let dir = instances.join(&name);
    let xml = std::fs::read_to_string(dir.join(disk::DOMAIN_XML_FILE_NAME)).expect("libvirt.xml");
    let domain_type = domain_types
        .iter()
        .find(|t| xml.contains(&format!("<domain type=\"{t}\">")))
        .unwrap_or_else(|| panic!("{}: not one of {domain_types:?}: {xml}", host.name));
    println!(
        "qemu: {} create to ACTIVE (domain RUNNING) in {} ms, domain type {domain_type}",
        host.name,
        boot_time.as_millis(),
    );

    // Nova's layout: three overlays over the cached bases, the console in console.log.
    let base = instances.join(disk::BASE_DIR_NAME);
    for (file, backing) in [
        (
            disk::DISK_FILE_NAME,
            disk::cached_image_path(&base, image_id),
        ),
        (disk::EPHEMERAL_FILE_NAME, base.join("ephemeral_1_ext4")),
        (disk::SWAP_FILE_NAME, base.join("swap_64")),
    ] {
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(dir.join(file))
            .output()
            .expect("qemu-img runs");
        assert!(
            info.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&info.stderr)
        );
        let info: Value = serde_json::from_slice(&info.stdout).expect("JSON");
        assert_eq!(info["format"], "qcow2", "{file}");
        let backing_file = PathBuf::from(info["backing-filename"].as_str().expect("backed"));
        assert_eq!(backing_file, backing, "{file}");
    }
    assert!(
        dir.join(disk::CONSOLE_LOG_FILE_NAME).exists(),
        "console.log"
    );

    // Stop (the guest ignores ACPI, so the compute powers it off), then start again.
    fabric
        .server_action(&id, &json!({"os-stop": null}))
        .await
        .expect("action accepted");
    fabric
        .wait_for_status(&id, "SHUTOFF", LIMIT)
        .await
        .expect("status");
    assert_eq!(
        driver.power_state(&name).expect("domain state"),
        proto::power_state::SHUTDOWN
    );
    assert!(qemu_processes(&name).is_empty(), "QEMU exits on power-off");
    fabric
        .server_action(&id, &json!({"os-start": null}))
        .await
        .expect("action accepted");
    fabric
        .wait_for_status(&id, "ACTIVE", LIMIT)
        .await
        .expect("status");
    assert_eq!(
        driver.power_state(&name).expect("domain state"),
        proto::power_state::RUNNING
    );
    assert_eq!(qemu_processes(&name).len(), 1);

    // Delete: no domain, no files, no address, no QEMU.
    let answer = fabric
        .http(Method::DELETE, &format!("/v2.1/servers/{id}"), None)
        .await
        .expect("answered");
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.body);
    let deadline = Instant::now() + LIMIT;
    while server_status(fabric, &id).await.0 != StatusCode::NOT_FOUND {
        assert!(
            Instant::now() < deadline,
            "the deleted server stays visible"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fabric
        .wait_for("the domain to be undefined", LIMIT, || {
            Ok(!driver.domain_names().expect("domains").contains(&name))
        })
        .await
        .expect("domain gone");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(fabric.db.fixed_ips_of(&id).expect("db").is_empty());
    assert!(qemu_processes(&name).is_empty());
    // The cached bases stay for the next boot.
    assert!(base.join("swap_64").exists());
}
