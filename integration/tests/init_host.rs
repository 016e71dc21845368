//! What a compute does with what it finds when it starts again (Nova's `init_host`): a build
//! whose domain runs is resumed, a build without one (or with one started but never defined)
//! goes to ERROR, a domain without an
//! instance is reaped when the operator asked for it, and a domain of another host's instance
//! is left alone.
//!
//! Its own test binary on purpose: libvirt's test hypervisor is shared by everything in one
//! process, and reaping looks at every domain on it.

use std::time::Duration;

use compute::domain_xml::{domain_xml, instance_name, DiskCache, DomainSpec, InstanceMetadata};
use compute::driver::LibvirtDriver;
use compute::RunningDeletedAction;
use db::InstanceChanges;
use integration::{building_row, test_log, Fabric, HostSpec};
use proto::{power_state, vm_state, Ping, RequestContext, Rpc, RpcOptions};

const LIMIT: Duration = Duration::from_secs(30);

/// A running test-driver domain named as instance `uuid`'s.
fn start_domain(driver: &LibvirtDriver, uuid: &str) {
    driver
        .define_and_start(&xml_for(uuid))
        .expect("domain starts");
}

/// The test-driver domain XML of instance `uuid`.
fn xml_for(uuid: &str) -> String {
    domain_xml(&DomainSpec {
        name: instance_name(uuid),
        uuid: uuid.into(),
        vcpus: 1,
        memory_mb: 128,
        domain_type: "test".into(),
        disks: Vec::new(),
        disk_cache: DiskCache::None,
        mac_address: None,
        network: None,
        bridge: None,
        display_name: "left behind".into(),
        console_log: None,
        metadata: InstanceMetadata::default(),
    })
    .expect("xml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_compute_resumes_fails_reaps_and_leaves_alone_what_it_finds() {
    let host = HostSpec {
        running_deleted_instance_action: Some(RunningDeletedAction::Reap),
        ..HostSpec::new("node-1", 4, 4096, 40)
    };
    let mut fabric = Fabric::start(std::slice::from_ref(&host), test_log())
        .await
        .expect("fabric starts");
    let driver = LibvirtDriver::open("test:///default").expect("test hypervisor");
    assert!(fabric.kill("node-1").await);

    // What a crash of node-1 leaves, and what others left on the same hypervisor.
    let new_uuid = || uuid::Uuid::new_v4().to_string();
    let (spawned, unstarted, orphan, elsewhere) = (new_uuid(), new_uuid(), new_uuid(), new_uuid());
    let half_started = new_uuid();
    for (uuid, host) in [
        (&spawned, "node-1"),
        (&unstarted, "node-1"),
        (&half_started, "node-1"),
        (&elsewhere, "node-9"),
    ] {
        fabric
            .db
            .instance_create(&building_row(uuid), "req-test")
            .expect("row");
        let placed = InstanceChanges {
            host: Some(Some(host.into())),
            node: Some(Some(host.into())),
            ..Default::default()
        };
        fabric
            .db
            .instance_update_expecting(uuid, &placed, Some(vm_state::BUILDING))
            .expect("placed");
    }
    for uuid in [&spawned, &orphan, &elsewhere] {
        start_domain(&driver, uuid);
    }
    // A crash between the start of a domain and its definition leaves it transient.
    virt::connect::Connect::open(Some("test:///default"))
        .expect("test hypervisor")
        .create_domain_xml(&xml_for(&half_started), 0)
        .expect("transient domain");

    restart(&mut fabric, &host).await;

    let row = |uuid: &str| fabric.db.instance_get(uuid).expect("db").expect("row");
    let resumed = row(&spawned);
    assert_eq!(
        (
            resumed.vm_state.as_str(),
            resumed.task_state.as_deref(),
            resumed.power_state
        ),
        (vm_state::ACTIVE, None, power_state::RUNNING)
    );
    assert!(resumed.launched_at.is_some());
    assert_eq!(row(&unstarted).vm_state, vm_state::ERROR);
    // Resumed, it would vanish at its first stop.
    assert_eq!(row(&half_started).vm_state, vm_state::ERROR);
    assert_eq!(row(&elsewhere).vm_state, vm_state::BUILDING);

    let domains = driver.domain_names().expect("domains");
    assert!(domains.contains(&instance_name(&spawned)));
    assert!(!domains.contains(&instance_name(&half_started)));
    assert!(
        !domains.contains(&instance_name(&orphan)),
        "the orphan is reaped"
    );
    assert!(
        domains.contains(&instance_name(&elsewhere)),
        "another host's domain stays"
    );
    // The resumed instance counts against node-1; the failed one does not.
    let node = fabric
        .db
        .compute_nodes()
        .expect("db")
        .into_iter()
        .find(|n| n.host == "node-1")
        .expect("node-1");
    assert_eq!((node.running_vms, node.memory_mb_used), (1, 512));

    // The other actions, on two fresh orphans: log and noop leave them running, shutdown powers
    // them off and keeps their definitions.
    let orphans = [new_uuid(), new_uuid()];
    let state = |uuid: &String| driver.power_state(&instance_name(uuid)).expect("state");
    for (action, expected) in [
        (RunningDeletedAction::Log, power_state::RUNNING),
        (RunningDeletedAction::Noop, power_state::RUNNING),
        (RunningDeletedAction::Shutdown, power_state::SHUTDOWN),
    ] {
        assert!(fabric.kill("node-1").await);
        for uuid in &orphans {
            if driver
                .domain_names()
                .expect("domains")
                .contains(&instance_name(uuid))
            {
                continue;
            }
            start_domain(&driver, uuid);
        }
        let host = HostSpec {
            running_deleted_instance_action: Some(action),
            ..host.clone()
        };
        restart(&mut fabric, &host).await;
        for uuid in &orphans {
            assert_eq!(state(uuid), expected, "{action:?}");
        }
    }
    for uuid in &orphans {
        driver
            .destroy_and_undefine(&instance_name(uuid))
            .expect("cleaned up");
    }

    fabric.stop().await;
}

/// Starts node-1 again and returns once it answers, which is after its init_host.
async fn restart(fabric: &mut Fabric, host: &HostSpec) {
    let before = fabric
        .db
        .service_get("node-1", compute::BINARY)
        .expect("db")
        .map(|s| s.rpc_endpoint);
    fabric.start_compute(host).await.expect("node-1 restarts");
    let mut endpoint = None;
    fabric
        .wait_for("node-1 to register again", LIMIT, || {
            endpoint = fabric
                .db
                .service_get("node-1", compute::BINARY)?
                .map(|s| s.rpc_endpoint)
                .filter(|e| Some(e) != before.as_ref());
            Ok(endpoint.is_some())
        })
        .await
        .expect("registered");
    let (rpc, _) = Rpc::start(test_log(), None, RpcOptions::default()).expect("rpc");
    let context = RequestContext::internal("default");
    let answer = rpc
        .call(&endpoint.expect("endpoint"), &context, &Ping {})
        .await
        .expect("ping");
    assert_eq!(answer, "node-1");
    rpc.shutdown();
}
