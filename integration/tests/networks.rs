//! Fixed IPs end to end: servers booted through the HTTP API take an address and a MAC from the
//! `private` pool through the conductor, show them in `addresses`, give them back on delete, and
//! an exhausted pool fails the build with a clear fault instead of rescheduling it.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::Value;

use integration::{building_row, metric_value, server_body, test_log, Fabric, FabricOptions};
use integration::{HostSpec, HttpResponse};

const LIMIT: Duration = Duration::from_secs(30);

/// The first (only) fixed address of a shown server, and its MAC.
fn private_address(server: &Value) -> (String, String) {
    let entry = &server["addresses"]["private"][0];
    assert_eq!(entry["version"], 4, "{server}");
    assert_eq!(entry["OS-EXT-IPS:type"], "fixed", "{server}");
    let addr = entry["addr"].as_str().expect("an addr").to_string();
    let mac = entry["OS-EXT-IPS-MAC:mac_addr"]
        .as_str()
        .expect("a mac")
        .to_string();
    (addr, mac)
}

async fn boot_active(fabric: &Fabric, name: &str) -> Value {
    let server = fabric
        .boot(&server_body(name, "1"), LIMIT)
        .await
        .expect("left BUILD");
    assert_eq!(server["status"], "ACTIVE", "{server}");
    server
}

async fn delete(fabric: &Fabric, uuid: &str) {
    let deleted: HttpResponse = fabric
        .http(Method::DELETE, &format!("/v2.1/servers/{uuid}"), None)
        .await
        .expect("delete");
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    fabric
        .wait_for("the deleted server to disappear", LIMIT, || {
            Ok(fabric.db.instance_get(uuid)?.is_none())
        })
        .await
        .expect("deleted");
}

/// Builds on `host` that ended with `outcome`, per its metrics.
async fn builds(fabric: &Fabric, host: &str, outcome: &str) -> f64 {
    let text = fabric.scrape(host).await.expect("metrics");
    metric_value(
        &text,
        &format!("zova_compute_builds_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_hold_distinct_addresses_until_deleted_and_an_exhausted_pool_fails_the_build() {
    let hosts = [
        HostSpec::new("node-1", 4, 4096, 40),
        HostSpec::new("node-2", 4, 4096, 40),
    ];
    let options = FabricOptions {
        metrics: true,
        ..Default::default()
    };
    let fabric = Fabric::start_with(&hosts, options, test_log())
        .await
        .expect("fabric starts");

    // Two servers: two addresses of 10.0.0.0/24, two MACs of Nova's prefix.
    let a = boot_active(&fabric, "a").await;
    let b = boot_active(&fabric, "b").await;
    let (a_addr, a_mac) = private_address(&a);
    let (b_addr, b_mac) = private_address(&b);
    assert_ne!(a_addr, b_addr);
    assert_ne!(a_mac, b_mac);
    for (addr, mac) in [(&a_addr, &a_mac), (&b_addr, &b_mac)] {
        assert!(addr.starts_with("10.0.0."), "{addr}");
        assert!(mac.starts_with("fa:16:3e:"), "{mac}");
    }
    let a_id = a["id"].as_str().expect("an id").to_string();
    let b_id = b["id"].as_str().expect("an id").to_string();

    // The detailed list shows the same addresses.
    let listed = fabric
        .http(Method::GET, "/v2.1/servers/detail", None)
        .await
        .expect("list");
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.body);
    let servers = listed.body["servers"].as_array().expect("servers");
    for (id, addr) in [(&a_id, &a_addr), (&b_id, &b_addr)] {
        let server = servers
            .iter()
            .find(|s| s["id"] == id.as_str())
            .expect("listed");
        assert_eq!(&private_address(server).0, addr, "{server}");
    }

    // Deleting a server frees its address.
    delete(&fabric, &a_id).await;
    assert!(fabric.db.fixed_ips_of(&a_id).expect("db").is_empty());

    // Fill every free address but none for the next server.
    let pool = db::pool_addresses("10.0.0.0/24", "10.0.0.1").expect("pool");
    for i in 0..pool.len() - 1 {
        let uuid = format!("00000000-0000-4000-8000-{i:012}");
        fabric
            .db
            .instance_create(&building_row(&uuid), "req-fill")
            .expect("filler row");
        fabric
            .db
            .fixed_ip_allocate(&uuid, Some("private"))
            .expect("a free address");
    }
    let reschedules_before = builds(&fabric, "node-1", "rescheduled").await
        + builds(&fabric, "node-2", "rescheduled").await;
    let errors_before =
        builds(&fabric, "node-1", "error").await + builds(&fabric, "node-2", "error").await;

    let c = fabric
        .boot(&server_body("c", "1"), LIMIT)
        .await
        .expect("left BUILD");
    assert_eq!(c["status"], "ERROR", "{c}");
    assert_eq!(
        c["fault"]["message"], "No fixed IP address is free in network private (10.0.0.0/24)",
        "{c}"
    );
    let c_id = c["id"].as_str().expect("an id");
    assert!(fabric.db.fixed_ips_of(c_id).expect("db").is_empty());
    // One attempt on one host, no reschedule: another host would meet the same pool.
    let reschedules_after = builds(&fabric, "node-1", "rescheduled").await
        + builds(&fabric, "node-2", "rescheduled").await;
    let errors_after =
        builds(&fabric, "node-1", "error").await + builds(&fabric, "node-2", "error").await;
    assert_eq!(reschedules_after - reschedules_before, 0.0);
    assert_eq!(errors_after - errors_before, 1.0);
    let actions = fabric.db.instance_actions(c_id).expect("actions");
    assert_eq!(actions.len(), 1, "{actions:?}");

    // The survivor keeps its address throughout.
    let shown = fabric.show_server(&b_id).await.expect("show");
    assert_eq!(private_address(&shown.body["server"]).0, b_addr);

    fabric.stop().await;
}
