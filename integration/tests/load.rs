//! `zova-load` against a whole fabric: it authenticates from a clouds.yaml as the OpenStack
//! clients do, creates more servers than the hosts hold, finds exactly the ones that fit ACTIVE
//! and the rest in ERROR with the scheduler's reason, finds no host over its limits, and
//! deletes them all.

use std::time::Duration;

use serde_json::Value;

use integration::{test_log, Fabric, HostSpec, ADMIN_PASSWORD};

/// Runs zova-load with `args` against `fabric`; returns its exit status and last JSON line.
async fn zova_load(fabric: &Fabric, args: &[&str]) -> (std::process::ExitStatus, Value) {
    let config = tempfile::tempdir().expect("temp dir");
    let clouds = config.path().join("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n  zova:\n    auth:\n      auth_url: http://{}/v3\n      username: admin\n      password: '{ADMIN_PASSWORD}'\n      project_name: admin\n",
            fabric.api_address
        ),
    )
    .expect("clouds.yaml");
    let endpoint = format!("http://{}/v2.1", fabric.api_address);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_zova-load"));
    command
        .env("OS_CLOUD", "zova")
        .env("OS_CLIENT_CONFIG_FILE", &clouds)
        .args(["--endpoint", &endpoint, "--timeout", "60"])
        .args(args);
    // The fabric runs on this runtime: wait for the child off it.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("joined")
        .expect("zova-load runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let report = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "the last line is JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zova_load_counts_what_fits_names_what_failed_and_finds_no_overcommit() {
    // Room for four m1.tiny on each host: twelve in all.
    let hosts: Vec<HostSpec> = (1..=3)
        .map(|i| HostSpec {
            cpu_allocation_ratio: 1.0,
            ..HostSpec::new(&format!("node-{i}"), 4, 8192, 100)
        })
        .collect();
    let fabric = Fabric::start(&hosts, test_log())
        .await
        .expect("fabric starts");
    let (status, report) = zova_load(&fabric, &["--count", "20", "--concurrency", "4"]).await;
    assert!(status.success(), "{status}: {report}");
    assert_eq!(report["created"], 20, "{report}");
    assert_eq!(report["active"], 12, "{report}");
    assert_eq!(report["error"], 8, "{report}");
    assert_eq!(report["overcommitted_hosts"], 0, "{report}");
    assert_eq!(report["hosts"], 3, "{report}");
    assert_eq!(report["deleted"], 20, "{report}");
    let faults = report["errors_by_fault"].as_object().expect("an object");
    assert!(
        faults
            .keys()
            .all(|k| k.starts_with("No valid host was found")),
        "{faults:?}"
    );
    assert!(report["p50_ms"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    assert!(
        report["active_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    // Everything it made is gone, and every host is empty again.
    fabric
        .wait_for("the hosts to be empty", Duration::from_secs(10), || {
            Ok(fabric.db.instances_list(None)?.is_empty()
                && fabric
                    .db
                    .allocation_sums()?
                    .values()
                    .all(|p| *p == db::Placed::default()))
        })
        .await
        .expect("empty");
    // The scheduler sees the room again at its next host-queue rebuild.
    fabric.wait_for_queue_rebuild().await;

    // A hint reaches the scheduler: every server on the named host.
    let (status, report) = zova_load(
        &fabric,
        &["--count", "3", "--hint", "scheduler_host=node-2", "--keep"],
    )
    .await;
    assert!(status.success(), "{status}: {report}");
    assert_eq!(report["active"], 3, "{report}");
    let hosts: Vec<Option<String>> = fabric
        .db
        .instances_list(None)
        .expect("instances")
        .into_iter()
        .map(|i| i.host)
        .collect();
    assert_eq!(hosts, vec![Some("node-2".to_string()); 3]);
    fabric.stop().await;
}
