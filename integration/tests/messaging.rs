//! The messaging layer across real services: failover between schedulers and conductors when
//! one stops, a compute of a newer minor protocol version with a conductor and a scheduler of
//! older ones,
//! and (with keys) CURVE on every socket of a whole fabric.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration::{
    admin, client, server_body, spec_for, test_log, three_hosts, Fabric, FabricOptions, HostSpec,
};
use proto::{
    BuildInstances, ComputeRunInstance, ConductorApi, Limits, Method, ProtoError, RemoteError,
    RetrySpec, Rpc, RpcOptions, StartSpawning,
};

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

/// Stands for a conductor of protocol 1.0 in front of the real one: it does not know
/// `start_spawning` (1.1) and answers it as such a conductor would; every other method is
/// passed on. Returns its endpoint and how many requests it refused.
fn conductor_of_protocol_1_0(real: String) -> (String, Arc<AtomicUsize>, Rpc) {
    let (server, incoming) =
        Rpc::start(test_log(), Some("tcp://127.0.0.1:*"), RpcOptions::default()).expect("bind");
    let mut incoming = incoming.expect("receiver");
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(test_log(), None, RpcOptions::default()).expect("client");
    let client = Arc::new(client);
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            if request.method() == StartSpawning::NAME {
                counted.fetch_add(1, Ordering::SeqCst);
                request.reply_no_such_method("zova-conductor");
                continue;
            }
            let (client, real) = (client.clone(), real.clone());
            tokio::spawn(async move { pass_on(&client, &real, request).await });
        }
    });
    (endpoint, refused, server)
}

async fn pass_on(client: &Rpc, real: &str, request: proto::Incoming) {
    fn remote(e: ProtoError) -> RemoteError {
        match e {
            ProtoError::Remote(remote) => remote,
            other => RemoteError {
                kind: "Unavailable".into(),
                message: other.to_string(),
            },
        }
    }
    macro_rules! pass {
        ($($method:ident),+) => {
            match ConductorApi::decode(request.method(), &request.envelope.payload) {
                $(Ok(Some(ConductorApi::$method(args))) => {
                    let answer = client.call(real, request.context(), &args).await;
                    request.reply::<proto::$method>(answer.map_err(remote));
                })+
                _ => request.reply_no_such_method("zova-conductor"),
            }
        };
    }
    // What a 1.0 conductor serves, listed here on purpose rather than taken from ConductorApi,
    // which grows with every minor version.
    pass!(
        BuildInstances,
        RescheduleInstance,
        InstanceUpdate,
        InstanceActionFinish,
        InstanceDestroy,
        InstancesOnHost,
        InstanceHosts,
        AllocateFixedIp,
        ServiceRegister,
        ServiceHeartbeat,
        ComputeNodeUpdate,
        Ping
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_builds_through_a_conductor_of_1_0_with_or_without_the_claims_address() {
    let mut fabric = Fabric::start_with(&[], FabricOptions::default(), test_log())
        .await
        .expect("fabric starts");
    let real = fabric.rpc().conductors[0].clone();
    let (old_conductor, refused, _old) = conductor_of_protocol_1_0(real);
    fabric
        .start_compute_via(&HostSpec::new("node-1", 8, 16_384, 160), &[old_conductor])
        .await
        .expect("compute starts");
    fabric.wait_for_queue_rebuild().await;
    let built = |server: &serde_json::Value| {
        assert_eq!(server["status"], "ACTIVE", "{server}");
        assert_eq!(server["addresses"]["private"][0]["version"], 4, "{server}");
        assert_eq!(server["OS-EXT-SRV-ATTR:host"], "node-1", "{server}");
    };
    // Today's scheduler takes the address in its claim (1.3): the compute asks for nothing.
    for i in 0..3 {
        let server = fabric
            .boot(&server_body(&format!("claimed-{i}"), "1"), BUILD_LIMIT)
            .await
            .expect("built");
        built(&server);
    }
    assert_eq!(refused.load(Ordering::SeqCst), 0, "no start_spawning asked");

    // A scheduler of 1.2 sends no address: the compute tries `start_spawning` (1.1), and
    // after its refusal takes the address by the 1.0 path.
    let rpc = client(&test_log());
    let node_1 = fabric.compute_endpoint("node-1");
    for _ in 0..3 {
        let uuid = fabric.insert_waiting_instance();
        let retry = RetrySpec {
            num_attempts: 1,
            hosts: vec!["node-1".into()],
            last_error: None,
        };
        let build = ComputeRunInstance {
            spec: spec_for(&uuid, retry),
            node: "node-1".into(),
            limits: Limits {
                vcpu: 8.0,
                memory_mb: 16_384.0,
                disk_gb: 160.0,
            },
            fixed_ip: None,
            cast_at_ms: None,
        };
        rpc.cast(&node_1, &admin(), &build)
            .await
            .expect("node-1 takes the cast");
        let server = fabric
            .wait_until_built(&uuid, BUILD_LIMIT)
            .await
            .expect("built");
        built(&server);
    }
    assert_eq!(
        refused.load(Ordering::SeqCst),
        3,
        "each build without an address tried 1.1 first"
    );
    rpc.shutdown();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conductor_schedules_the_specs_a_build_carries_and_reads_those_it_lacks() {
    let fabric = Fabric::start_with(
        &[HostSpec::new("node-1", 8, 16_384, 160)],
        FabricOptions::default(),
        test_log(),
    )
    .await
    .expect("fabric starts");
    fabric.wait_for_queue_rebuild().await;
    let rpc = client(&test_log());
    let conductor = fabric.rpc().conductors[0].clone();
    let build = |uuid: &str, specs| BuildInstances {
        instance_uuids: vec![uuid.to_string()],
        hints: Default::default(),
        min_count: 1,
        specs,
    };
    // A hint only the sent spec has, for a host that does not exist: the build can end in
    // ERROR only if the conductor scheduled that spec rather than one read from the row.
    let sent = |uuid: &str| {
        let mut spec = spec_for(uuid, RetrySpec::default());
        spec.hints.scheduler_host = Some("node-404".into());
        spec
    };

    let uuid = fabric.insert_waiting_instance();
    rpc.cast(&conductor, &admin(), &build(&uuid, vec![sent(&uuid)]))
        .await
        .expect("the conductor takes the cast");
    let server = fabric
        .wait_until_built(&uuid, BUILD_LIMIT)
        .await
        .expect("ended");
    assert_eq!(server["status"], "ERROR", "{server}");
    assert!(
        server["fault"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("No valid host")),
        "{server}"
    );

    // An API before 1.4 sends no specs, and specs that are not the build's instances' are
    // not taken: the conductor reads each instance, whose row has no hint.
    let other = fabric.insert_waiting_instance();
    for specs in [Vec::new(), vec![sent(&other)]] {
        let uuid = fabric.insert_waiting_instance();
        rpc.cast(&conductor, &admin(), &build(&uuid, specs))
            .await
            .expect("the conductor takes the cast");
        let server = fabric
            .wait_until_built(&uuid, BUILD_LIMIT)
            .await
            .expect("built");
        assert_eq!(server["status"], "ACTIVE", "{server}");
    }
    fabric.stop().await;
}
