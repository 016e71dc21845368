//! The messaging layer across real services: failover between schedulers and conductors when
//! one stops, and (with keys) CURVE on every socket of a whole fabric.

use std::time::Duration;

use integration::{server_body, test_log, three_hosts, Fabric, FabricOptions};

const BUILD_LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_fails_over_to_the_live_scheduler_when_one_stops() {
    let options = FabricOptions {
        schedulers: 2,
        ..Default::default()
    };
    let mut fabric = Fabric::start_with(&three_hosts(), options, test_log())
        .await
        .expect("fabric starts");
    assert!(fabric.kill("scheduler").await, "the first scheduler stops");
    // The conductor's next cast to the stopped scheduler goes unacknowledged; it moves the
    // request to the live one and keeps the stopped one last from then on.
    for i in 0..6 {
        let server = fabric
            .boot(&server_body(&format!("vm-{i}"), "1"), BUILD_LIMIT)
            .await
            .expect("built");
        assert_eq!(server["status"], "ACTIVE", "{server}");
    }
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_fails_over_to_the_live_conductor_when_one_stops() {
    // Two conductors and two schedulers on one database (PostgreSQL in the suite's second
    // pass): issue 8's control plane on several machines, here on one.
    let options = FabricOptions {
        conductors: 2,
        schedulers: 2,
        ..Default::default()
    };
    let mut fabric = Fabric::start_with(&three_hosts(), options, test_log())
        .await
        .expect("fabric starts");
    for i in 0..4 {
        let server = fabric
            .boot(&server_body(&format!("both-{i}"), "1"), BUILD_LIMIT)
            .await
            .expect("built");
        assert_eq!(server["status"], "ACTIVE", "{server}");
    }
    assert!(fabric.kill("conductor").await, "the first conductor stops");
    // The API's builds and the computes' records move to the live conductor.
    for i in 0..6 {
        let server = fabric
            .boot(&server_body(&format!("one-{i}"), "1"), BUILD_LIMIT)
            .await
            .expect("built");
        assert_eq!(server["status"], "ACTIVE", "{server}");
    }
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_fabric_runs_on_curve_and_keys_reach_the_services_table() {
    let options = FabricOptions {
        curve: true,
        ..Default::default()
    };
    let fabric = Fabric::start_with(&three_hosts(), options, test_log())
        .await
        .expect("fabric starts");
    let mut hosts = std::collections::BTreeSet::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let server = fabric
            .boot(&server_body(&format!("vm-{i}"), "1"), BUILD_LIMIT)
            .await
            .expect("built");
        assert_eq!(server["status"], "ACTIVE", "{server}");
        hosts.insert(
            server["OS-EXT-SRV-ATTR:host"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        ids.push(server["id"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        hosts.len(),
        3,
        "every compute took work over CURVE: {hosts:?}"
    );
    for service in fabric.db.services().expect("services") {
        let key = service.rpc_public_key.unwrap_or_default();
        assert_eq!(
            key.len(),
            40,
            "{} registered its Z85 public key",
            service.host
        );
    }
    // A delete reaches the compute with the key it registered.
    let deleted = fabric
        .http(
            hyper::Method::DELETE,
            &format!("/v2.1/servers/{}", ids[0]),
            None,
        )
        .await
        .expect("delete answered");
    assert_eq!(deleted.status, hyper::StatusCode::NO_CONTENT);
    fabric
        .wait_for("the deleted server to go", BUILD_LIMIT, || {
            Ok(fabric.db.instance_get(&ids[0])?.is_none())
        })
        .await
        .expect("deleted");
    fabric.stop().await;
}
