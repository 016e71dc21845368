//! The scheduler under pressure and with every hint: several scheduler services racing over one
//! SQLite file, bursts of creates, multi-create, reschedules, queues and instance hints. Every
//! service is real (loopback ZeroMQ and HTTP, libvirt's test hypervisor).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use integration::{
    admin, building_row, client, server_body, spec_for, test_log, three_hosts, with_hints, Fabric,
    FabricOptions, HostSpec, IMAGE,
};
use proto::{QueueSummary, RebuildQueue, RescheduleInstance, RetrySpec, ScheduleRunInstance};

const BUILD_LIMIT: Duration = Duration::from_secs(30);

/// Creates a server and waits until it has left BUILD; returns its final JSON.
async fn boot(fabric: &Fabric, body: &Value) -> Value {
    fabric.boot(body, BUILD_LIMIT).await.expect("left BUILD")
}

fn host_of(server: &Value) -> String {
    server["OS-EXT-SRV-ATTR:host"]
        .as_str()
        .unwrap_or_else(|| panic!("no host: {server}"))
        .to_string()
}

/// `n` identical small hosts with no overcommit: each takes exactly two m1.tiny.
fn small_hosts(n: usize) -> Vec<HostSpec> {
    (1..=n)
        .map(|i| HostSpec {
            cpu_allocation_ratio: 1.0,
            ..HostSpec::new(&format!("small-{i:02}"), 2, 2048, 20)
        })
        .collect()
}

/// Waits until none of `uuids` is building any more.
async fn wait_until_settled(fabric: &Fabric, uuids: &[String], limit: Duration) {
    fabric
        .wait_for("every instance to leave building", limit, || {
            Ok(fabric
                .db
                .instances_by_uuids(uuids)?
                .iter()
                .all(|i| i.vm_state != "building"))
        })
        .await
        .expect("settled");
}

/// Checks the database's books: each node's placed totals equal the sum of its allocations and
/// stay within its size; returns the placed vCPUs by host.
fn check_placed_within_capacity(fabric: &Fabric) -> BTreeMap<String, i64> {
    let sums = fabric.db.allocation_sums().expect("sums");
    let mut by_host = BTreeMap::new();
    for node in fabric.db.compute_nodes().expect("nodes") {
        let summed = sums.get(&node.id).copied().unwrap_or_default();
        assert_eq!(
            (summed.vcpus, summed.memory_mb, summed.disk_mb),
            (
                node.placed_vcpus,
                node.placed_memory_mb,
                node.placed_disk_mb
            ),
            "running totals of {} match its allocations",
            node.hypervisor_hostname
        );
        assert!(node.placed_vcpus <= node.vcpus, "{node:?}");
        assert!(node.placed_memory_mb <= node.memory_mb, "{node:?}");
        assert!(node.placed_disk_mb <= node.local_gb * 1024, "{node:?}");
        by_host.insert(node.hypervisor_hostname.clone(), node.placed_vcpus);
    }
    by_host
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_and_a_burst_of_1000_creates_on_20_hosts_never_overcommit() {
    // Issue 10's burst: 1,000 creates on 20 small hosts, two schedulers racing. The stuck-build
    // check runs as in production, with a timeout the burst must settle within: an instance
    // it ended would show up below as an error without a "No valid host" fault.
    let hosts = small_hosts(20);
    let settle_limit = Duration::from_secs(120);
    let options = FabricOptions {
        schedulers: 2,
        conductor: conductor::ConductorConfig {
            build_timeout: settle_limit.as_secs_f64(),
            stuck_check_interval: 1.0,
        },
        ..Default::default()
    };
    let fabric = Arc::new(
        Fabric::start_with(&hosts, options, test_log())
            .await
            .expect("fabric starts"),
    );
    let creates = 1000;
    let concurrency = 50;
    let (next, ids) = (
        Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (fabric, next, ids) = (fabric.clone(), next.clone(), ids.clone());
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= creates {
                    return;
                }
                let id = fabric
                    .create_server(&server_body(&format!("burst-{n}"), "1"))
                    .await
                    .expect("accepted");
                ids.lock().expect("ids").push(id);
            }
        });
    }
    while let Some(joined) = clients.join_next().await {
        joined.expect("client task");
    }
    let uuids = ids.lock().expect("ids").clone();
    assert_eq!(uuids.len(), creates);
    wait_until_settled(&fabric, &uuids, settle_limit).await;

    let instances = fabric.db.instances_by_uuids(&uuids).expect("instances");
    let mut active_per_host: BTreeMap<String, i64> = BTreeMap::new();
    let mut errors = 0;
    for instance in &instances {
        match instance.vm_state.as_str() {
            "active" => {
                *active_per_host
                    .entry(instance.node.clone().expect("a node"))
                    .or_default() += 1
            }
            "error" => {
                errors += 1;
                let fault = fabric
                    .db
                    .instance_fault_latest(&instance.uuid)
                    .expect("fault")
                    .expect("an error has a fault");
                assert!(
                    fault
                        .message
                        .starts_with("No valid host was found. 0/20 hosts in queue 'kvm'"),
                    "{}",
                    fault.message
                );
            }
            other => panic!("instance {} ended {other}", instance.uuid),
        }
    }
    // Twenty hosts with room for two each: exactly forty fit, no host holds more than two.
    assert_eq!(
        active_per_host.values().sum::<i64>(),
        40,
        "{active_per_host:?}"
    );
    assert!(
        active_per_host.values().all(|&n| n <= 2),
        "{active_per_host:?}"
    );
    assert_eq!(errors, creates - 40);
    let placed = check_placed_within_capacity(&fabric);
    assert_eq!(
        placed, active_per_host,
        "placed totals are the ACTIVE instances"
    );
    match Arc::try_unwrap(fabric) {
        Ok(fabric) => fabric.stop().await,
        Err(_) => panic!("fabric still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_all_or_nothing_for_min_count() {
    // Room for three m1.tiny in all.
    let hosts = [
        HostSpec {
            cpu_allocation_ratio: 1.0,
            ..HostSpec::new("node-1", 2, 8192, 80)
        },
        HostSpec {
            cpu_allocation_ratio: 1.0,
            ..HostSpec::new("node-2", 1, 8192, 80)
        },
    ];
    let fabric = Fabric::start(&hosts, test_log())
        .await
        .expect("fabric starts");
    let batch = |name: &str, min: i64| {
        json!({"server": {"name": name, "flavorRef": "1", "imageRef": IMAGE,
                          "min_count": min, "max_count": 5}})
    };
    let settled = |prefix: &'static str| {
        let fabric = &fabric;
        async move {
            let uuids: Vec<String> = fabric
                .db
                .instances_list(None)
                .expect("list")
                .into_iter()
                .filter(|i| i.display_name.starts_with(prefix))
                .map(|i| i.uuid)
                .collect();
            assert_eq!(uuids.len(), 5);
            wait_until_settled(fabric, &uuids, BUILD_LIMIT).await;
            fabric.db.instances_by_uuids(&uuids).expect("instances")
        }
    };

    fabric
        .create_server(&batch("all", 4))
        .await
        .expect("accepted");
    let all = settled("all-").await;
    assert!(all.iter().all(|i| i.vm_state == "error"), "{all:?}");
    let fault = fabric
        .db
        .instance_fault_latest(&all[0].uuid)
        .expect("fault")
        .expect("a fault");
    assert!(
        fault.message.contains("Only 3 of the 4 instances required"),
        "{}",
        fault.message
    );
    assert!(check_placed_within_capacity(&fabric)
        .values()
        .all(|&v| v == 0));

    fabric
        .create_server(&batch("some", 2))
        .await
        .expect("accepted");
    let some = settled("some-").await;
    let active = some.iter().filter(|i| i.vm_state == "active").count();
    assert_eq!(active, 3, "{some:?}");
    assert_eq!(some.len() - active, 2);
    assert_eq!(
        check_placed_within_capacity(&fabric).values().sum::<i64>(),
        3
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flavor_or_the_hint_picks_the_queue() {
    let mut hosts = three_hosts();
    hosts[2] = HostSpec {
        queue_name: Some("gpu".into()),
        ..HostSpec::new("gpu-1", 8, 8192, 80)
    };
    let fabric = Fabric::start(&hosts, test_log())
        .await
        .expect("fabric starts");
    for i in 0..4 {
        let server = boot(&fabric, &server_body(&format!("plain-{i}"), "1")).await;
        assert_eq!(server["status"], "ACTIVE", "{server}");
        assert_ne!(host_of(&server), "gpu-1");
    }
    fabric
        .db
        .flavor_extra_spec_set("2", "queue_name", "gpu")
        .expect("extra spec");
    let gpu = boot(&fabric, &server_body("gpu", "2")).await;
    assert_eq!(host_of(&gpu), "gpu-1", "{gpu}");
    // The hint overrides the flavor.
    let kvm = boot(
        &fabric,
        &with_hints("kvm", "2", json!({"queue_name": "kvm"})),
    )
    .await;
    assert_ne!(host_of(&kvm), "gpu-1", "{kvm}");
    let nowhere = boot(
        &fabric,
        &with_hints("x", "1", json!({"queue_name": "nope"})),
    )
    .await;
    assert_eq!(nowhere["status"], "ERROR");
    assert_eq!(
        nowhere["fault"]["message"],
        "No valid host was found. No hosts in queue 'nope'"
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_and_different_host_follow_the_named_server() {
    let fabric = Fabric::start(&three_hosts(), test_log())
        .await
        .expect("fabric starts");
    let first = boot(&fabric, &server_body("first", "1")).await;
    let (first_id, first_host) = (first["id"].clone(), host_of(&first));
    for i in 0..3 {
        let near = boot(
            &fabric,
            &with_hints(&format!("near-{i}"), "1", json!({"same_host": first_id})),
        )
        .await;
        assert_eq!(host_of(&near), first_host, "{near}");
        let far = boot(
            &fabric,
            &with_hints(
                &format!("far-{i}"),
                "1",
                json!({"different_host": [first_id]}),
            ),
        )
        .await;
        assert_ne!(host_of(&far), first_host, "{far}");
    }
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_instance_is_rescheduled_elsewhere_until_attempts_run_out() {
    let fabric = Fabric::start(&three_hosts(), test_log())
        .await
        .expect("fabric starts");
    let log = test_log();
    let rpc = client(&log);
    let conductor = fabric.rpc().conductor.clone();

    // node-1 refused it once: it lands on another host.
    let again = uuid::Uuid::new_v4().to_string();
    fabric
        .db
        .instance_create(&building_row(&again), "req-test")
        .expect("row");
    let retry = RetrySpec {
        num_attempts: 1,
        hosts: vec!["node-1".into()],
        last_error: Some("Insufficient compute resources on node-1".into()),
    };
    rpc.cast(
        &conductor,
        &admin(),
        &RescheduleInstance {
            spec: spec_for(&again, retry),
            host: "node-1".into(),
            reason: "Insufficient compute resources on node-1".into(),
        },
    )
    .await
    .expect("conductor takes it");
    let server = fabric
        .wait_until_built(&again, BUILD_LIMIT)
        .await
        .expect("built");
    assert_eq!(server["status"], "ACTIVE", "{server}");
    assert_ne!(host_of(&server), "node-1");

    // Three hosts have refused it: no fourth attempt.
    let spent = uuid::Uuid::new_v4().to_string();
    fabric
        .db
        .instance_create(&building_row(&spent), "req-test")
        .expect("row");
    let retry = RetrySpec {
        num_attempts: 3,
        hosts: vec!["node-1".into(), "node-2".into(), "node-3".into()],
        last_error: Some("node-3 said no".into()),
    };
    rpc.cast(
        &conductor,
        &admin(),
        &RescheduleInstance {
            spec: spec_for(&spent, retry),
            host: "node-3".into(),
            reason: "node-3 said no".into(),
        },
    )
    .await
    .expect("conductor takes it");
    let server = fabric
        .wait_until_built(&spent, BUILD_LIMIT)
        .await
        .expect("settled");
    assert_eq!(server["status"], "ERROR", "{server}");
    assert_eq!(
        server["fault"]["message"],
        "No valid host was found. Exceeded maximum number of attempts (3); hosts tried: \
         node-1, node-2, node-3. Last failure: node-3 said no"
    );
    rpc.shutdown();
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_that_refuses_an_instance_sends_it_back_and_it_lands_elsewhere() {
    let fabric = Fabric::start(&three_hosts(), test_log())
        .await
        .expect("fabric starts");
    let log = test_log();
    let rpc = client(&log);
    let node_1 = fabric.compute_endpoint("node-1");
    // What a scheduler with a stale view would send: limits node-1's own ledger cannot meet.
    let uuid = fabric.insert_waiting_instance();
    let retry = RetrySpec {
        num_attempts: 1,
        hosts: vec!["node-1".into()],
        last_error: None,
    };
    rpc.cast(
        &node_1,
        &admin(),
        &proto::ComputeRunInstance {
            spec: spec_for(&uuid, retry),
            node: "node-1".into(),
            limits: proto::Limits {
                vcpu: 0.5,
                memory_mb: 4096.0,
                disk_gb: 40.0,
            },
            // As a scheduler before 1.3 sends it: the compute takes the address itself.
            fixed_ip: None,
            cast_at_ms: None,
        },
    )
    .await
    .expect("node-1 takes the cast");
    let server = fabric
        .wait_until_built(&uuid, BUILD_LIMIT)
        .await
        .expect("built");
    assert_eq!(server["status"], "ACTIVE", "{server}");
    assert_ne!(host_of(&server), "node-1");
    check_placed_within_capacity(&fabric);
    rpc.shutdown();
    fabric.stop().await;
}

/// A copy of a build that reaches a host after the build was placed on another (a cast that
/// seemed lost, then arrived): its refusal sends nothing back to be scheduled, its failure
/// ends nothing and its success is not recorded, since only the host the build is placed on
/// may do any of these.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_copy_of_a_build_placed_elsewhere_changes_nothing() {
    let options = FabricOptions {
        metrics: true,
        ..Default::default()
    };
    let fabric = Fabric::start_with(&three_hosts(), options, test_log())
        .await
        .expect("fabric starts");
    let rpc = client(&test_log());
    let node_1 = fabric.compute_endpoint("node-1");
    // Placed on node-2, as a scheduler's claim leaves it.
    let uuid = fabric.insert_waiting_instance();
    let ip = fabric.claim_on(&uuid, "node-2");
    let placed = fabric.db.instance_get(&uuid).expect("read").expect("row");
    let address = proto::FixedIpInfo {
        address: ip.address,
        mac: ip.mac,
        network: ip.network,
        cidr: ip.cidr,
        gateway: ip.gateway,
        bridge: ip.bridge,
    };

    let copy = |node: &str, vcpu: f64| proto::ComputeRunInstance {
        spec: spec_for(
            &uuid,
            RetrySpec {
                num_attempts: 1,
                hosts: vec![node.into()],
                last_error: None,
            },
        ),
        node: node.into(),
        limits: proto::Limits {
            vcpu,
            memory_mb: 4096.0,
            disk_gb: 40.0,
        },
        fixed_ip: None,
        cast_at_ms: None,
    };
    // As the scheduler sends it, taken `late_by_ms` after it was cast.
    let with_address = |late_by_ms: u64| proto::ComputeRunInstance {
        fixed_ip: Some(address.clone()),
        cast_at_ms: Some(proto::envelope::now_ms() - late_by_ms),
        ..copy("node-1", 8.0)
    };
    let count = |service: &'static str, series: &'static str| {
        let fabric = &fabric;
        async move {
            let text = fabric.scrape(service).await.expect("scraped");
            integration::metric_value(&text, series).unwrap_or(0.0)
        }
    };
    let reaches = |service: &'static str, series: &'static str, wanted: f64| async move {
        for _ in 0..100 {
            if count(service, series).await >= wanted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(count(service, series).await, wanted, "{service}: {series}");
    };
    let checked_in = "zova_rpc_messages_received_total{method=\"start_spawning\",kind=\"call\"}";

    // node-1 refuses its copy (limits its ledger cannot meet): the conductor skips it.
    rpc.cast(&node_1, &admin(), &copy("node-1", 0.5))
        .await
        .expect("node-1 takes the cast");
    reaches(
        "conductor",
        "zova_conductor_reschedules_total{outcome=\"skipped\"}",
        1.0,
    )
    .await;

    // A fresh copy whose build fails (the shared test hypervisor already runs a domain of that
    // name): the failure is not recorded.
    virt::connect::Connect::open(Some("test:///default"))
        .expect("test hypervisor")
        .create_domain_xml(
            &format!(
                "<domain type='test'><name>{}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>128</memory><os><type>hvm</type></os></domain>",
                compute::domain_xml::instance_name(&uuid)
            ),
            0,
        )
        .expect("domain runs");
    rpc.cast(&node_1, &admin(), &with_address(0))
        .await
        .expect("node-1 takes the cast");
    reaches(
        "node-1",
        "zova_compute_builds_total{outcome=\"error\"}",
        1.0,
    )
    .await;

    // A fresh copy builds without checking in, cannot record ACTIVE, and removes what it made.
    rpc.cast(&node_1, &admin(), &with_address(0))
        .await
        .expect("node-1 takes the cast");
    let undone = "zova_compute_builds_total{outcome=\"deleted\"}";
    reaches("node-1", undone, 1.0).await;
    assert_eq!(count("conductor", checked_in).await, 0.0);

    // A copy taken a minute after it was cast checks in first, and builds nothing.
    rpc.cast(&node_1, &admin(), &with_address(60_000))
        .await
        .expect("node-1 takes the cast");
    reaches("node-1", undone, 2.0).await;
    assert_eq!(count("conductor", checked_in).await, 1.0);

    let after = fabric.db.instance_get(&uuid).expect("read").expect("row");
    assert_eq!(
        (
            after.vm_state.as_str(),
            after.task_state.as_deref(),
            after.host.as_deref()
        ),
        ("building", Some("scheduling"), Some("node-2"))
    );
    assert_eq!(after.updated_at, placed.updated_at, "nothing was written");
    assert_eq!(
        fabric.db.instance_fault_latest(&uuid).expect("faults"),
        None
    );
    rpc.shutdown();
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_may_force_an_overcommit_when_the_check_is_off() {
    let options = FabricOptions {
        scheduler: scheduler::SchedulerConfig {
            force_hosts_skip_resource_check: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let fabric = Fabric::start_with(&three_hosts(), options, test_log())
        .await
        .expect("fabric starts");
    // m1.xlarge wants 16384 MB; node-1 has 4096. As with Nova's force_hosts, neither the
    // scheduler nor the database claim nor the compute's claim stands in the way.
    let server = boot(
        &fabric,
        &with_hints("big", "5", json!({"scheduler_host": "node-1"})),
    )
    .await;
    assert_eq!(server["status"], "ACTIVE", "{server}");
    assert_eq!(host_of(&server), "node-1");
    let node_1 = fabric
        .db
        .compute_nodes()
        .expect("nodes")
        .into_iter()
        .find(|n| n.hypervisor_hostname == "node-1")
        .expect("node-1");
    assert_eq!(node_1.placed_memory_mb, 16384);
    // Without the hint the over-committed host is not offered again.
    for i in 0..4 {
        let other = boot(&fabric, &server_body(&format!("vm-{i}"), "1")).await;
        assert_ne!(host_of(&other), "node-1", "{other}");
    }
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_rebuild_the_queue_at_once() {
    let fabric = Fabric::start(&three_hosts(), test_log())
        .await
        .expect("fabric starts");
    let log = test_log();
    let rpc = client(&log);
    let scheduler = fabric.rpc().scheduler.clone();
    let summary: QueueSummary = rpc
        .call(&scheduler, &admin(), &RebuildQueue {})
        .await
        .expect("rebuilt");
    assert_eq!(summary.queues, BTreeMap::from([("kvm".to_string(), 3)]));
    assert!(summary.unavailable.is_empty());

    fabric
        .db
        .service_set_disabled("node-3", "zova-compute", true, Some("maintenance"))
        .expect("disable");
    let summary: QueueSummary = rpc
        .call(&scheduler, &admin(), &RebuildQueue {})
        .await
        .expect("rebuilt");
    assert_eq!(summary.queues, BTreeMap::from([("kvm".to_string(), 2)]));
    assert_eq!(
        summary.unavailable,
        BTreeMap::from([("node-3".to_string(), "disabled: maintenance".to_string())])
    );
    let mut hosts = BTreeSet::new();
    for i in 0..6 {
        hosts.insert(host_of(
            &boot(&fabric, &server_body(&format!("vm-{i}"), "1")).await,
        ));
    }
    assert!(!hosts.contains("node-3"), "{hosts:?}");

    let refused = fabric
        .http(
            Method::POST,
            "/v2.1/servers",
            Some(&with_hints(
                "bad",
                "1",
                json!({"scheduler_host_match": "("}),
            )),
        )
        .await
        .expect("answered");
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    rpc.shutdown();
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_connects_to_a_queued_host_before_its_first_build() {
    let fabric = Fabric::start(&three_hosts(), test_log())
        .await
        .expect("fabric starts");
    // A host whose endpoint is a bare TCP listener: any connection to it is the scheduler's,
    // since nothing is built there.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    fabric
        .db
        .service_upsert(
            "node-ahead",
            "zova-compute",
            "compute",
            &format!("tcp://127.0.0.1:{port}"),
            None,
        )
        .expect("register");
    fabric
        .db
        .compute_node_upsert(&db::ComputeNodeValues {
            host: "node-ahead".into(),
            hypervisor_hostname: "node-ahead".into(),
            hypervisor_type: "QEMU".into(),
            vcpus: 4,
            memory_mb: 4096,
            local_gb: 40,
            vcpus_used: 0,
            memory_mb_used: 0,
            local_gb_used: 0,
            running_vms: 0,
            extra_resources: "{}".into(),
        })
        .expect("report");
    let log = test_log();
    let rpc = client(&log);
    let summary: QueueSummary = rpc
        .call(&fabric.rpc().scheduler, &admin(), &RebuildQueue {})
        .await
        .expect("rebuilt");
    assert!(
        summary.hosts.iter().any(|h| h.hostname == "node-ahead"),
        "{summary:?}"
    );
    let accepted = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
    assert!(
        matches!(accepted, Ok(Ok(_))),
        "the scheduler did not connect to the queued host: {accepted:?}"
    );
    rpc.shutdown();
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_request_that_finds_no_host_leaves_the_placed_build_alone() {
    let fabric = Fabric::start_with(&three_hosts(), FabricOptions::default(), test_log())
        .await
        .expect("fabric starts");
    let rpc = client(&test_log());
    // One scheduler's claim placed the instance on node-2; a duplicate of its request (sent
    // on when the first scheduler was slow to acknowledge it) finds no host: a hint for a host
    // that does not exist. Behind it in the same batch, an instance that waits for a host.
    let placed = fabric.insert_waiting_instance();
    fabric.claim_on(&placed, "node-2");
    let waiting = fabric.insert_waiting_instance();
    let nowhere = |uuid: &str| {
        let mut spec = spec_for(uuid, RetrySpec::default());
        spec.hints.scheduler_host = Some("node-404".into());
        spec
    };
    let duplicate = ScheduleRunInstance {
        specs: vec![nowhere(&placed), nowhere(&waiting)],
        min_count: 1,
    };
    rpc.cast(&fabric.rpc().scheduler, &admin(), &duplicate)
        .await
        .expect("the scheduler takes the cast");

    let ended = fabric
        .wait_until_built(&waiting, BUILD_LIMIT)
        .await
        .expect("the waiting instance ends");
    assert_eq!(ended["status"], "ERROR", "{ended}");
    let row = fabric.db.instance_get(&placed).expect("read").expect("row");
    assert_eq!(
        (row.vm_state.as_str(), row.host.as_deref()),
        ("building", Some("node-2"))
    );
    assert!(
        fabric.db.allocation_get(&placed).expect("read").is_some(),
        "its allocation stays"
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_given_up_for_min_count_undoes_its_claims() {
    let fabric = Fabric::start_with(&three_hosts(), FabricOptions::default(), test_log())
        .await
        .expect("fabric starts");
    fabric.wait_for_queue_rebuild().await;
    let rpc = client(&test_log());
    // Both must be placed; the second was placed by another request meanwhile, so its claim
    // here finds it gone and the batch is given up after the first claim committed.
    let waiting = fabric.insert_waiting_instance();
    let elsewhere = fabric.insert_waiting_instance();
    fabric.claim_on(&elsewhere, "node-3");
    let batch = ScheduleRunInstance {
        specs: vec![
            spec_for(&waiting, RetrySpec::default()),
            spec_for(&elsewhere, RetrySpec::default()),
        ],
        min_count: 2,
    };
    rpc.cast(&fabric.rpc().scheduler, &admin(), &batch)
        .await
        .expect("the scheduler takes the cast");

    let ended = fabric
        .wait_until_built(&waiting, BUILD_LIMIT)
        .await
        .expect("the waiting instance ends");
    assert_eq!(ended["status"], "ERROR", "{ended}");
    let row = fabric
        .db
        .instance_get(&waiting)
        .expect("read")
        .expect("row");
    assert_eq!((row.host, row.node), (None, None), "its claim was undone");
    assert!(fabric.db.allocation_get(&waiting).expect("read").is_none());
    assert!(fabric
        .db
        .fixed_ips_of_instances(std::slice::from_ref(&waiting))
        .expect("read")
        .is_empty());
    // Only the other request's placement is left on the books.
    let row = fabric
        .db
        .instance_get(&elsewhere)
        .expect("read")
        .expect("row");
    assert_eq!(
        (row.vm_state.as_str(), row.host.as_deref()),
        ("building", Some("node-3"))
    );
    let sums = fabric.db.allocation_sums().expect("sums");
    assert_eq!(sums.len(), 1, "{sums:?}");
    fabric.stop().await;
}
