//! The create-server path end to end: API, conductor, scheduler and three compute hosts as
//! separate services over loopback ZeroMQ and HTTP, SQLite in a temporary file, libvirt's test
//! hypervisor.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use integration::{three_hosts, with_hints, Fabric, IMAGE};

const BUILD_LIMIT: Duration = Duration::from_secs(30);

fn log() -> slog::Logger {
    integration::test_log()
}

fn server(name: &str, flavor: &str) -> Value {
    integration::server_body(name, flavor)
}

/// Creates a server and waits until it has left BUILD; returns its final JSON.
async fn boot(fabric: &Fabric, body: &Value) -> Value {
    fabric.boot(body, BUILD_LIMIT).await.expect("left BUILD")
}

async fn fabric() -> Fabric {
    Fabric::start(&three_hosts(), log())
        .await
        .expect("fabric starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_servers_become_active_and_spread_over_the_hosts() {
    let fabric = fabric().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            fabric
                .create_server(&server(&format!("vm-{i}"), "1"))
                .await
                .expect("accepted"),
        );
    }
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        let server = fabric
            .wait_until_built(id, BUILD_LIMIT)
            .await
            .expect("built");
        assert_eq!(server["status"], "ACTIVE", "{server}");
        assert_eq!(server["OS-EXT-STS:vm_state"], "active");
        assert_eq!(server["OS-EXT-STS:task_state"], Value::Null);
        assert_eq!(server["OS-EXT-STS:power_state"], 1);
        assert!(server["OS-SRV-USG:launched_at"].is_string());
        let host = server["OS-EXT-SRV-ATTR:host"]
            .as_str()
            .expect("a host")
            .to_string();
        *per_host.entry(host).or_default() += 1;
    }
    // Round robin over three hosts with room for all: 7, 7 and 6.
    assert_eq!(per_host.len(), 3, "{per_host:?}");
    assert!(
        per_host.values().all(|&n| (6..=7).contains(&n)),
        "{per_host:?}"
    );

    // The compute nodes report what they hold (after their next report).
    fabric
        .wait_for("compute nodes to report 20 instances", BUILD_LIMIT, || {
            Ok(fabric
                .db
                .compute_nodes()?
                .iter()
                .map(|n| n.running_vms)
                .sum::<i64>()
                == 20)
        })
        .await
        .expect("resources reported");

    let detail = fabric
        .http(Method::GET, "/v2.1/servers/detail", None)
        .await
        .expect("detail");
    assert_eq!(detail.status, StatusCode::OK);
    assert_eq!(detail.body["servers"].as_array().map(Vec::len), Some(20));
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flavor_larger_than_every_host_ends_in_error_with_the_no_valid_host_fault() {
    let fabric = fabric().await;
    // m1.xlarge: 16384 MB of RAM, twice the largest host.
    let id = fabric
        .create_server(&server("too-big", "5"))
        .await
        .expect("accepted");
    let server = fabric
        .wait_until_built(&id, BUILD_LIMIT)
        .await
        .expect("decided");
    assert_eq!(server["status"], "ERROR", "{server}");
    assert_eq!(server["OS-EXT-STS:vm_state"], "error");
    let message = server["fault"]["message"].as_str().expect("a fault");
    assert!(message.starts_with("No valid host was found"), "{message}");
    assert!(
        message.contains("16384"),
        "the reason names the request: {message}"
    );
    assert_eq!(server["OS-EXT-SRV-ATTR:host"], Value::Null);
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_host_lands_on_that_host() {
    let fabric = fabric().await;
    for i in 0..3 {
        let body = with_hints(
            &format!("pinned-{i}"),
            "1",
            json!({"scheduler_host": "node-2"}),
        );
        let server = boot(&fabric, &body).await;
        assert_eq!(server["status"], "ACTIVE", "{server}");
        assert_eq!(server["OS-EXT-SRV-ATTR:host"], "node-2");
    }
    let body = with_hints("nowhere", "1", json!({"scheduler_host": "node-9"}));
    let server = boot(&fabric, &body).await;
    assert_eq!(server["status"], "ERROR");
    assert!(
        server["fault"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("node-9"),
        "{server}"
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_host_match_never_lands_outside_the_match() {
    let fabric = fabric().await;
    let mut ids = Vec::new();
    for i in 0..9 {
        // Sent as the older clients spell it.
        let mut body = server(&format!("matched-{i}"), "1");
        body["OS-SCH-HNT:scheduler_hints"] = json!({"scheduler_host_match": "^node-[12]$"});
        ids.push(fabric.create_server(&body).await.expect("accepted"));
    }
    let mut hosts = BTreeMap::new();
    for id in &ids {
        let server = fabric
            .wait_until_built(id, BUILD_LIMIT)
            .await
            .expect("built");
        assert_eq!(server["status"], "ACTIVE", "{server}");
        *hosts
            .entry(
                server["OS-EXT-SRV-ATTR:host"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_insert(0) += 1;
    }
    assert!(!hosts.contains_key("node-3"), "{hosts:?}");
    assert_eq!(hosts.len(), 2, "both matching hosts are used: {hosts:?}");
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_frees_the_resources_for_the_next_queue_rebuild() {
    let fabric = fabric().await;
    // m1.large (4 vCPU, 8192 MB, 80 GB) fills node-2's RAM and disk exactly.
    let on_node_2 = |name: &str| with_hints(name, "4", json!({"scheduler_host": "node-2"}));
    let server = boot(&fabric, &on_node_2("large-1")).await;
    let first = server["id"].as_str().expect("an id").to_string();
    assert_eq!(server["status"], "ACTIVE", "{server}");

    let server = boot(&fabric, &on_node_2("large-2")).await;
    let second = server["id"].as_str().expect("an id").to_string();
    assert_eq!(server["status"], "ERROR", "node-2 is full: {server}");

    let deleted = fabric
        .http(Method::DELETE, &format!("/v2.1/servers/{first}"), None)
        .await
        .expect("delete");
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    fabric
        .wait_for("the deleted server to disappear", BUILD_LIMIT, || {
            Ok(fabric.db.instance_get(&first)?.is_none())
        })
        .await
        .expect("deleted");
    let gone = fabric.show_server(&first).await.expect("show");
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.body["itemNotFound"]["code"], 404);
    fabric
        .wait_for("node-2 to report its memory free", BUILD_LIMIT, || {
            Ok(fabric
                .db
                .compute_nodes()?
                .iter()
                .any(|n| n.host == "node-2" && n.free_ram_mb == 8192))
        })
        .await
        .expect("freed");
    fabric.wait_for_queue_rebuild().await;

    let server = boot(&fabric, &on_node_2("large-3")).await;
    assert_eq!(
        server["status"], "ACTIVE",
        "the freed room is used again: {server}"
    );
    assert_eq!(server["OS-EXT-SRV-ATTR:host"], "node-2");

    // The server in ERROR has no host: its delete is local.
    let deleted = fabric
        .http(Method::DELETE, &format!("/v2.1/servers/{second}"), None)
        .await
        .expect("delete");
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(fabric.db.instance_get(&second).expect("db").is_none());
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_nova_errors_and_change_nothing() {
    let fabric = fabric().await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "Malformed request body"),
        (server("", "1").to_string().into_bytes(), "name"),
        (server("vm", "99").to_string().into_bytes(), "Flavor 99 could not be found."),
        (json!({"server": {"name": "vm", "flavorRef": "1", "imageRef": "7f1c0e2a-0000-4000-8000-000000000000"}}).to_string().into_bytes(), "could not be found"),
        (with_hints("vm", "1", json!({"scheduler_host_match": "(["})).to_string().into_bytes(), "scheduler_host_match"),
        // PostgreSQL cannot store a NUL in text: refused on either database, before any write.
        (server("vm\u{0}x", "1").to_string().into_bytes(), "NUL character"),
    ];
    for (body, expected) in cases {
        let response = integration::http_request(
            &fabric.api_address,
            Method::POST,
            "/v2.1/servers",
            body,
            &[("x-auth-token", &fabric.admin_token)],
        )
        .await
        .expect("answered");
        assert_eq!(
            response.status,
            StatusCode::BAD_REQUEST,
            "{}",
            response.body
        );
        assert_eq!(response.body["badRequest"]["code"], 400);
        let message = response.body["badRequest"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.contains(expected),
            "{message:?} should mention {expected:?}"
        );
        let request_id = response
            .headers
            .get("x-openstack-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(request_id.starts_with("req-"), "{request_id}");
    }
    assert!(
        fabric.db.instances_list(None).expect("db").is_empty(),
        "no row was written"
    );

    for path in ["/v2.1/servers?name=a%00b", "/v2.1/servers/%00"] {
        let refused = fabric
            .http(Method::GET, path, None)
            .await
            .expect("answered");
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(refused.body["badRequest"]["code"], 400, "{path}");
    }

    let too_large = vec![b' '; 2 * 1024 * 1024];
    let response = integration::http_request(
        &fabric.api_address,
        Method::POST,
        "/v2.1/servers",
        too_large,
        &[("x-auth-token", &fabric.admin_token)],
    )
    .await
    .expect("answered");
    assert_eq!(response.status, StatusCode::PAYLOAD_TOO_LARGE);

    let missing = fabric
        .show_server("no-such-server")
        .await
        .expect("answered");
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.body["itemNotFound"]["code"], 404);
    let wrong_method = fabric
        .http(Method::PUT, "/v2.1/servers", None)
        .await
        .expect("answered");
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);

    let flavors = fabric
        .http(Method::GET, "/v2.1/flavors/detail", None)
        .await
        .expect("flavors");
    assert_eq!(flavors.status, StatusCode::OK);
    let names: Vec<&str> = flavors.body["flavors"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"]
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_compute_is_skipped_and_the_instance_lands_on_the_next_host() {
    let mut fabric = fabric().await;
    assert!(fabric.kill("node-1").await);
    // The scheduler still believes node-1 is up (its heartbeat is recent): the cast to it is not
    // acknowledged, so the scheduler gives the charge back and tries the next matching host.
    let mut hosts = BTreeMap::new();
    for i in 0..3 {
        let body = with_hints(
            &format!("survivor-{i}"),
            "1",
            json!({"scheduler_host_match": "^node-[12]$"}),
        );
        let server = boot(&fabric, &body).await;
        assert_eq!(server["status"], "ACTIVE", "{server}");
        *hosts
            .entry(
                server["OS-EXT-SRV-ATTR:host"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
            .or_insert(0) += 1;
    }
    assert_eq!(hosts, BTreeMap::from([("node-2".to_string(), 3)]));

    // Forced onto the dead host, the instance goes to ERROR instead of waiting forever; after a
    // rebuild the scheduler counts the host as down (its last heartbeat predates the failed cast)
    // rather than trying it again.
    fabric.wait_for_queue_rebuild().await;
    let id = fabric
        .create_server(&with_hints(
            "stranded",
            "1",
            json!({"scheduler_host": "node-1"}),
        ))
        .await
        .expect("accepted");
    let server = fabric
        .wait_until_built(&id, BUILD_LIMIT)
        .await
        .expect("decided");
    assert_eq!(server["status"], "ERROR", "{server}");
    let message = server["fault"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("No valid host was found"), "{server}");
    assert!(
        message.contains("node-1 is not available: service is down"),
        "{message}"
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_interrupted_by_a_compute_restart_ends_in_error() {
    let mut fabric = fabric().await;
    let id = fabric
        .create_server(&with_hints(
            "before",
            "1",
            json!({"scheduler_host": "node-3"}),
        ))
        .await
        .expect("accepted");
    assert_eq!(
        fabric
            .wait_until_built(&id, BUILD_LIMIT)
            .await
            .expect("built")["status"],
        "ACTIVE"
    );
    assert!(fabric.kill("node-3").await);

    // A row that node-3's previous process was still building when it stopped.
    let stuck = uuid::Uuid::new_v4().to_string();
    let row = db::NewInstance {
        display_name: "stuck".into(),
        user_id: "admin".into(),
        ..integration::building_row(&stuck)
    };
    fabric.db.instance_create(&row, "req-test").expect("row");
    let on_node_3 = db::InstanceChanges {
        host: Some(Some("node-3".into())),
        ..Default::default()
    };
    fabric.db.instance_update(&stuck, &on_node_3).expect("host");

    fabric
        .start_compute(&three_hosts()[2])
        .await
        .expect("node-3 restarts");
    let server = fabric
        .wait_until_built(&stuck, BUILD_LIMIT)
        .await
        .expect("decided");
    assert_eq!(server["status"], "ERROR", "{server}");
    assert!(
        server["fault"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("interrupted"),
        "{server}"
    );

    // The active instance is still counted, the interrupted one is not.
    fabric
        .wait_for("node-3 to report one instance", BUILD_LIMIT, || {
            Ok(fabric
                .db
                .compute_nodes()?
                .iter()
                .any(|n| n.host == "node-3" && n.running_vms == 1 && n.memory_mb_used == 512))
        })
        .await
        .expect("counted once");
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_creates_max_count_servers_and_can_answer_with_the_reservation() {
    let fabric = fabric().await;
    let body = json!({"server": {"name": "batch", "flavorRef": "1", "imageRef": IMAGE, "min_count": 2, "max_count": 3}});
    fabric.create_server(&body).await.expect("accepted");
    let listed = fabric
        .http(Method::GET, "/v2.1/servers", None)
        .await
        .expect("list");
    let mut names: Vec<String> = listed.body["servers"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    assert_eq!(names, ["batch-1", "batch-2", "batch-3"]);

    let body = json!({"server": {"name": "r", "flavorRef": "1", "imageRef": IMAGE, "return_reservation_id": true}});
    let response = fabric
        .http(Method::POST, "/v2.1/servers", Some(&body))
        .await
        .expect("answered");
    assert_eq!(response.status, StatusCode::ACCEPTED);
    assert!(
        response.body["reservation_id"]
            .as_str()
            .unwrap_or_default()
            .starts_with("r-"),
        "{}",
        response.body
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microversions_2_1_to_2_47_are_served_and_echoed() {
    let fabric = fabric().await;
    let ask = |header: &'static str, value: &'static str| {
        let token = fabric.admin_token.clone();
        let address = fabric.api_address.clone();
        async move {
            integration::http_request(
                &address,
                Method::GET,
                "/v2.1/flavors",
                Vec::new(),
                &[("x-auth-token", &token), (header, value)],
            )
            .await
            .expect("answered")
        }
    };
    let too_new = ask("OpenStack-API-Version", "compute 2.79").await;
    assert_eq!(
        too_new.status,
        StatusCode::NOT_ACCEPTABLE,
        "{}",
        too_new.body
    );
    let message = too_new.body["computeFault"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("maximum is 2.47"), "{message}");
    let malformed = ask("X-OpenStack-Nova-API-Version", "2.x").await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);

    let newest = ask("OpenStack-API-Version", "compute 2.47").await;
    assert_eq!(newest.status, StatusCode::OK);
    assert_eq!(newest.headers["openstack-api-version"], "compute 2.47");
    assert_eq!(newest.headers["x-openstack-nova-api-version"], "2.47");
    let latest = ask("X-OpenStack-Nova-API-Version", "latest").await;
    assert_eq!(latest.headers["x-openstack-nova-api-version"], "2.47");

    let plain = fabric
        .http(Method::GET, "/v2.1/flavors", None)
        .await
        .expect("answered");
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.headers["openstack-api-version"], "compute 2.1");
    fabric.stop().await;
}
