//! Every service's metrics endpoint, scraped before and after real boots: the counters move
//! where the work went. No timing is asserted; a counter a service bumps just after the work
//! is visible elsewhere (a compute counts its build once ACTIVE is recorded) is waited for.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::json;

use integration::{metric_value, server_body, test_log, three_hosts, Fabric, FabricOptions};

const BUILD_LIMIT: Duration = Duration::from_secs(30);
const HOSTS: [&str; 3] = ["node-1", "node-2", "node-3"];

/// Scrapes of every service, by name.
struct Scrapes(BTreeMap<String, String>);

impl Scrapes {
    async fn take(fabric: &Fabric) -> Scrapes {
        let mut texts = BTreeMap::new();
        for name in ["api", "conductor", "scheduler"].into_iter().chain(HOSTS) {
            let text = fabric.scrape(name).await.expect("scraped");
            assert!(text.ends_with("# EOF\n"), "{name}: {text}");
            texts.insert(name.to_string(), text);
        }
        Scrapes(texts)
    }

    /// The series' value at `service` (0 when absent); `computes` sums the three hosts.
    fn value(&self, service: &str, series: &str) -> f64 {
        if service == "computes" {
            return HOSTS.iter().map(|host| self.value(host, series)).sum();
        }
        self.0
            .get(service)
            .and_then(|text| metric_value(text, series))
            .unwrap_or(0.0)
    }
}

/// What must have moved between two scrapes: (service, series, by how much at least).
type Expectations<'a> = &'a [(&'a str, &'a str, f64)];

/// Scrapes until every expectation holds (a bounded wait, not a timing assertion) and
/// returns the last scrapes; fails naming what did not move.
async fn until_moved(fabric: &Fabric, before: &Scrapes, expected: Expectations<'_>) -> Scrapes {
    let mut after = Scrapes::take(fabric).await;
    for _ in 0..200 {
        let missing: Vec<_> = expected
            .iter()
            .filter(|(service, series, by)| {
                after.value(service, series) - before.value(service, series) < *by
            })
            .collect();
        if missing.is_empty() {
            return after;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = Scrapes::take(fabric).await;
    }
    for (service, series, by) in expected {
        let moved = after.value(service, series) - before.value(service, series);
        assert!(
            moved >= *by,
            "{service}: {series} moved by {moved}, expected at least {by}:\n{}",
            after
                .0
                .get(*service)
                .map(String::as_str)
                .unwrap_or("(no scrape)")
        );
    }
    after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_moves_the_counters_of_every_service_it_crosses() {
    let options = FabricOptions {
        metrics: true,
        ..Default::default()
    };
    let fabric = Fabric::start_with(&three_hosts(), options, test_log())
        .await
        .expect("fabric starts");
    let before = Scrapes::take(&fabric).await;
    assert_eq!(
        before.value("scheduler", "zova_scheduler_queue_hosts{queue=\"kvm\"}"),
        3.0,
        "{}",
        before.0["scheduler"]
    );

    // The healthcheck needs no token and is counted under its own route.
    let health = fabric
        .http_as("", Method::GET, "/healthcheck", None)
        .await
        .expect("answered");
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(&health.raw[..], b"OK");
    assert_eq!(
        health
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/plain; charset=utf-8")
    );

    let server = fabric
        .boot(&server_body("vm-1", "1"), BUILD_LIMIT)
        .await
        .expect("built");
    assert_eq!(server["status"], "ACTIVE", "{server}");
    let host = server["OS-EXT-SRV-ATTR:host"]
        .as_str()
        .expect("a host")
        .to_string();

    let after = until_moved(
        &fabric,
        &before,
        &[
            (
                "api",
                "zova_api_requests_total{method=\"POST\",route=\"/v2.1/servers\",status=\"202\"}",
                1.0,
            ),
            (
                "api",
                "zova_api_requests_total{method=\"GET\",route=\"/v2.1/servers/{id}\",status=\"200\"}",
                1.0,
            ),
            (
                "api",
                "zova_api_requests_total{method=\"GET\",route=\"/healthcheck\",status=\"200\"}",
                1.0,
            ),
            (
                "api",
                "zova_api_request_duration_seconds_count{method=\"POST\",route=\"/v2.1/servers\"}",
                1.0,
            ),
            (
                "api",
                "zova_rpc_messages_sent_total{method=\"build_instances\",kind=\"cast\"}",
                1.0,
            ),
            (
                "api",
                "zova_rpc_messages_received_total{method=\"build_instances\",kind=\"ack\"}",
                1.0,
            ),
            (
                "conductor",
                "zova_rpc_messages_received_total{method=\"build_instances\",kind=\"cast\"}",
                1.0,
            ),
            (
                "conductor",
                "zova_conductor_build_requests_total{outcome=\"scheduled\"}",
                1.0,
            ),
            // schedule_run_instance: its wire name is new_run_instance.
            (
                "conductor",
                "zova_rpc_messages_sent_total{method=\"new_run_instance\",kind=\"cast\"}",
                1.0,
            ),
            (
                "scheduler",
                "zova_rpc_messages_received_total{method=\"new_run_instance\",kind=\"cast\"}",
                1.0,
            ),
            (
                "scheduler",
                "zova_scheduler_decisions_total{outcome=\"placed\"}",
                1.0,
            ),
            // compute_run_instance, the scheduler's cast to the compute.
            (
                "scheduler",
                "zova_rpc_messages_sent_total{method=\"new_run_instance\",kind=\"cast\"}",
                1.0,
            ),
            (
                &host,
                "zova_rpc_messages_received_total{method=\"new_run_instance\",kind=\"cast\"}",
                1.0,
            ),
            (
                &host,
                "zova_compute_builds_total{outcome=\"active\"}",
                1.0,
            ),
            (
                &host,
                "zova_compute_build_duration_seconds_count{outcome=\"active\"}",
                1.0,
            ),
            // The compute's records went to the conductor as calls, answered.
            (
                &host,
                "zova_rpc_call_duration_seconds_count{method=\"instance_update\"}",
                1.0,
            ),
            (
                "conductor",
                "zova_rpc_messages_sent_total{method=\"instance_update\",kind=\"reply\"}",
                1.0,
            ),
        ],
    )
    .await;
    for (service, series) in [
        (
            "conductor",
            "zova_conductor_build_requests_total{outcome=\"failed\"}",
        ),
        (
            "scheduler",
            "zova_scheduler_decisions_total{outcome=\"no_valid_host\"}",
        ),
        ("computes", "zova_compute_builds_total{outcome=\"error\"}"),
        (
            "computes",
            "zova_compute_builds_total{outcome=\"rescheduled\"}",
        ),
        (
            "api",
            "zova_rpc_send_failures_total{method=\"build_instances\",reason=\"timeout\"}",
        ),
        (
            "computes",
            "zova_rpc_frames_dropped_total{reason=\"malformed\"}",
        ),
    ] {
        assert_eq!(
            after.value(service, series) - before.value(service, series),
            0.0,
            "{service}: {series} moved"
        );
    }
    // Exactly one build went anywhere, to the host the API names.
    assert_eq!(
        after.value("computes", "zova_compute_builds_total{outcome=\"active\"}")
            - before.value("computes", "zova_compute_builds_total{outcome=\"active\"}"),
        1.0
    );
    assert_eq!(
        after.value("scheduler", "zova_scheduler_queue_hosts{queue=\"kvm\"}"),
        3.0
    );
    // The compute's own view of what is left, and the scheduler's queue by host.
    let spec = three_hosts()
        .into_iter()
        .find(|h| h.name == host)
        .expect("one of the three");
    let gauge = |name: &str| format!("{name}{{host=\"{host}\"}}");
    assert_eq!(
        after.value(&host, &gauge("zova_compute_free_vcpus")),
        (spec.vcpus - 1) as f64
    );
    assert_eq!(
        after.value(&host, &gauge("zova_compute_free_ram_bytes")),
        ((spec.memory_mb - 512) * 1024 * 1024) as f64
    );
    assert_eq!(after.value(&host, &gauge("zova_compute_instances")), 1.0);
    assert!(
        after.0["scheduler"].contains(&format!(
            "zova_scheduler_host_free_vcpus{{queue=\"kvm\",host=\"{host}\"}}"
        )),
        "{}",
        after.0["scheduler"]
    );
    // Nothing is left waiting for an answer.
    for service in ["api", "conductor", "scheduler", host.as_str()] {
        assert_eq!(
            after.value(service, "zova_rpc_casts_awaiting_ack"),
            0.0,
            "{service}"
        );
    }

    // A flavor no host has the RAM for: No valid host, counted by what ruled the hosts out.
    let created = fabric
        .http(
            Method::POST,
            "/v2.1/flavors",
            Some(&json!({"flavor": {"name": "huge", "ram": 1048576, "vcpus": 1, "disk": 1, "id": "huge"}})),
        )
        .await
        .expect("answered");
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let before = after;
    let server = fabric
        .boot(&server_body("too-big", "huge"), BUILD_LIMIT)
        .await
        .expect("left BUILD");
    assert_eq!(server["status"], "ERROR", "{server}");
    let after = until_moved(
        &fabric,
        &before,
        &[
            (
                "scheduler",
                "zova_scheduler_no_valid_host_total{reason=\"insufficient_ram\"}",
                1.0,
            ),
            (
                "scheduler",
                "zova_scheduler_decisions_total{outcome=\"no_valid_host\"}",
                1.0,
            ),
        ],
    )
    .await;
    assert_eq!(
        after.value(
            "scheduler",
            "zova_scheduler_decisions_total{outcome=\"placed\"}"
        ),
        before.value(
            "scheduler",
            "zova_scheduler_decisions_total{outcome=\"placed\"}"
        ),
    );
    assert!(
        after.0["scheduler"].contains("zova_scheduler_no_valid_host_total{reason=\"down\"} 0"),
        "every reason is there from the start:\n{}",
        after.0["scheduler"]
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_metrics_no_service_serves_them() {
    let fabric = Fabric::start(&three_hosts()[..1], test_log())
        .await
        .expect("fabric starts");
    for name in ["api", "conductor", "scheduler", "node-1"] {
        assert_eq!(fabric.metrics_address(name), None, "{name}");
    }
    // The healthcheck is the API's own and is always there.
    let health = fabric
        .http_as("", Method::HEAD, "/healthcheck", None)
        .await
        .expect("answered");
    assert_eq!(health.status, StatusCode::OK);
    assert!(health.raw.is_empty());
    let wrong = fabric
        .http_as("", Method::POST, "/healthcheck", None)
        .await
        .expect("answered");
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    fabric.stop().await;
}
