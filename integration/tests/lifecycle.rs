//! Stop, start and reboot end to end: servers booted through the HTTP API, then each action
//! requested as the API does it (task_state, instance action, a cast to the instance's compute
//! with the request id), over real sockets with libvirt's test hypervisor.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::Value;

use compute::domain_xml::instance_name;
use compute::driver::LibvirtDriver;
use db::{Instance, InstanceAction, InstanceChanges};
use integration::{server_body, test_log, Fabric, HostSpec};
use proto::{
    power_state, task_state, vm_state, Ping, RebootInstance, RequestContext, Rpc, RpcOptions,
    StartInstance, StopInstance,
};

const LIMIT: Duration = Duration::from_secs(30);

/// One host with room for exactly one m1.tiny (1 vCPU, 512 MB, 1 GB).
fn one_tiny_host() -> HostSpec {
    HostSpec {
        cpu_allocation_ratio: 1.0,
        ..HostSpec::new("node-1", 1, 512, 1)
    }
}

/// One host with room for several m1.tiny.
fn roomy_host() -> HostSpec {
    HostSpec::new("node-1", 4, 4096, 40)
}

/// A stop, start or reboot as the API prepares it.
#[derive(Debug, Clone, Copy)]
enum Request {
    Stop,
    Start,
    Reboot { hard: bool },
}

impl Request {
    fn action(self) -> &'static str {
        match self {
            Request::Stop => "stop",
            Request::Start => "start",
            Request::Reboot { .. } => "reboot",
        }
    }

    fn task_state(self) -> &'static str {
        match self {
            Request::Stop => task_state::POWERING_OFF,
            Request::Start => task_state::POWERING_ON,
            Request::Reboot { hard: false } => task_state::REBOOTING,
            Request::Reboot { hard: true } => task_state::REBOOTING_HARD,
        }
    }
}

/// Does what the API does for `request` on `uuid`, which must be in `from` (vm_state): sets the
/// task_state, starts the instance action, casts to the instance's compute with the request id.
/// Returns the request id.
async fn request(fabric: &Fabric, rpc: &Rpc, uuid: &str, from: &str, request: Request) -> String {
    let request_id = proto::new_request_id();
    let changes = InstanceChanges {
        task_state: Some(Some(request.task_state().into())),
        ..Default::default()
    };
    let instance = fabric
        .db
        .instance_update_expecting(uuid, &changes, Some(from))
        .unwrap_or_else(|e| panic!("{request:?} of {uuid}: {e}"));
    fabric
        .db
        .instance_action_start(uuid, request.action(), &request_id, "tester", "default")
        .expect("action started");
    let host = instance.host.expect("the instance has a host");
    let service = fabric
        .db
        .service_get(&host, compute::BINARY)
        .expect("db")
        .expect("the compute is registered");
    let context = RequestContext {
        request_id: request_id.clone(),
        user_id: "tester".into(),
        project_id: "default".into(),
        roles: vec!["member".into()],
        deadline_ms: None,
    };
    let (endpoint, uuid) = (&service.rpc_endpoint, uuid.to_string());
    let cast = match request {
        Request::Stop => rpc.cast(endpoint, &context, &StopInstance { uuid }).await,
        Request::Start => rpc.cast(endpoint, &context, &StartInstance { uuid }).await,
        Request::Reboot { hard } => {
            let reboot = RebootInstance { uuid, hard };
            rpc.cast(endpoint, &context, &reboot).await
        }
    };
    cast.expect("the compute took the cast");
    request_id
}

/// Waits until the compute has finished `request_id` on `uuid` (its task_state is cleared and
/// its action finished); returns the row and the action.
async fn outcome(fabric: &Fabric, uuid: &str, request_id: &str) -> (Instance, InstanceAction) {
    let action_of = || -> Result<Option<InstanceAction>, db::DbError> {
        Ok(fabric
            .db
            .instance_actions(uuid)?
            .into_iter()
            .find(|a| a.request_id == request_id))
    };
    fabric
        .wait_for(&format!("{request_id} on {uuid} to finish"), LIMIT, || {
            let row = fabric.db.instance_get(uuid)?;
            let finished = action_of()?.is_some_and(|a| a.finish_time.is_some());
            Ok(finished && row.is_some_and(|r| r.task_state.is_none()))
        })
        .await
        .expect("finished");
    let row = fabric.db.instance_get(uuid).expect("db").expect("row");
    let action = action_of().expect("db").expect("action");
    (row, action)
}

/// Requests `request` and checks it succeeded: `vm_state` with `power_state` in the row, the
/// domain in that power state, the action finished without a message.
async fn succeeds(
    fabric: &Fabric,
    rpc: &Rpc,
    driver: &LibvirtDriver,
    uuid: &str,
    from: &str,
    req: Request,
    (vm_state, power_state): (&str, i32),
) {
    let request_id = request(fabric, rpc, uuid, from, req).await;
    let (row, action) = outcome(fabric, uuid, &request_id).await;
    assert_eq!(
        (row.vm_state.as_str(), row.power_state, row.task_state),
        (vm_state, power_state, None),
        "{req:?}"
    );
    assert_eq!(action.action, req.action());
    assert_eq!(action.message, None, "{req:?}");
    assert_eq!(
        driver.power_state(&instance_name(uuid)).expect("domain"),
        power_state,
        "{req:?}: the domain"
    );
}

fn client() -> Rpc {
    let (rpc, _) = Rpc::start(test_log(), None, RpcOptions::default()).expect("client socket");
    rpc
}

fn driver() -> LibvirtDriver {
    // The test hypervisor's domains live in this process, shared by every connection to it.
    LibvirtDriver::open("test:///default").expect("test hypervisor")
}

async fn boot_active(fabric: &Fabric, name: &str) -> String {
    let server = fabric
        .boot(&server_body(name, "1"), LIMIT)
        .await
        .expect("left BUILD");
    assert_eq!(server["status"], "ACTIVE", "{server}");
    server["id"].as_str().expect("an id").to_string()
}

async fn status(fabric: &Fabric, uuid: &str) -> Value {
    let shown = fabric.show_server(uuid).await.expect("show");
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.body);
    shown.body["server"]["status"].clone()
}

/// HTTP DELETE, then waits until the row is gone; checks no domain is left.
async fn delete(fabric: &Fabric, driver: &LibvirtDriver, uuid: &str) {
    let deleted = fabric
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
    let name = instance_name(uuid);
    assert!(
        !driver.domain_names().expect("list").contains(&name),
        "{name} is left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_reboot_and_delete_a_server() {
    let mut fabric = Fabric::start(&[one_tiny_host()], test_log())
        .await
        .expect("fabric starts");
    let (rpc, driver) = (client(), driver());
    let uuid = boot_active(&fabric, "lifecycle").await;
    let stopped = (vm_state::STOPPED, power_state::SHUTDOWN);
    let active = (vm_state::ACTIVE, power_state::RUNNING);

    succeeds(
        &fabric,
        &rpc,
        &driver,
        &uuid,
        "active",
        Request::Stop,
        stopped,
    )
    .await;
    assert_eq!(status(&fabric, &uuid).await, "SHUTOFF");
    assert!(
        driver
            .domain_names()
            .expect("list")
            .contains(&instance_name(&uuid)),
        "a stopped server keeps its domain"
    );

    // A stopped server keeps its resources: the host, sized for one m1.tiny, takes no other.
    let second = fabric
        .boot(&server_body("no-room", "1"), LIMIT)
        .await
        .expect("decided");
    assert_eq!(second["status"], "ERROR", "{second}");
    let second = second["id"].as_str().expect("an id").to_string();
    delete(&fabric, &driver, &second).await;

    // A restarted compute still holds the stopped server, and counts it. It also ends a start
    // its previous process left half done: the domain is still shut off, so the server is
    // stopped again, ready for the next request.
    let interrupted = InstanceChanges {
        task_state: Some(Some(task_state::POWERING_ON.into())),
        ..Default::default()
    };
    fabric
        .db
        .instance_update_expecting(&uuid, &interrupted, Some(vm_state::STOPPED))
        .expect("start under way");
    let endpoint_of = |fabric: &Fabric| -> Result<Option<String>, db::DbError> {
        Ok(fabric
            .db
            .service_get("node-1", compute::BINARY)?
            .map(|s| s.rpc_endpoint))
    };
    let before = endpoint_of(&fabric).expect("db");
    assert!(fabric.kill("node-1").await);
    fabric
        .start_compute(&one_tiny_host())
        .await
        .expect("node-1 restarts");
    fabric
        .wait_for("node-1 to register again", LIMIT, || {
            Ok(endpoint_of(&fabric)? != before)
        })
        .await
        .expect("registered");
    let endpoint = endpoint_of(&fabric).expect("db").expect("registered");
    // A compute answers only once it has registered, rebuilt its ledger (settling what its
    // previous process left half done) and reported it.
    let context = RequestContext::internal("default");
    let host = rpc.call(&endpoint, &context, &Ping {}).await.expect("ping");
    assert_eq!(host, "node-1");
    let node = fabric
        .db
        .compute_nodes()
        .expect("db")
        .into_iter()
        .find(|n| n.host == "node-1")
        .expect("node-1");
    assert_eq!((node.running_vms, node.memory_mb_used), (1, 512));
    let row = fabric.db.instance_get(&uuid).expect("db").expect("row");
    assert_eq!(
        (row.vm_state.as_str(), row.task_state, row.power_state),
        (vm_state::STOPPED, None, power_state::SHUTDOWN)
    );

    succeeds(
        &fabric,
        &rpc,
        &driver,
        &uuid,
        "stopped",
        Request::Start,
        active,
    )
    .await;
    assert_eq!(status(&fabric, &uuid).await, "ACTIVE");
    let soft = Request::Reboot { hard: false };
    succeeds(&fabric, &rpc, &driver, &uuid, "active", soft, active).await;
    let hard = Request::Reboot { hard: true };
    succeeds(&fabric, &rpc, &driver, &uuid, "active", hard, active).await;
    succeeds(
        &fabric,
        &rpc,
        &driver,
        &uuid,
        "active",
        Request::Stop,
        stopped,
    )
    .await;

    let actions: Vec<String> = fabric
        .db
        .instance_actions(&uuid)
        .expect("db")
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(
        actions,
        ["create", "stop", "start", "reboot", "reboot", "stop"]
    );

    // Deleting a stopped server undefines its shut-off domain.
    delete(&fabric, &driver, &uuid).await;
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_destroyed_behind_zovas_back_fails_the_stop_and_nothing_else() {
    let fabric = Fabric::start(&[roomy_host()], test_log())
        .await
        .expect("fabric starts");
    let (rpc, driver) = (client(), driver());
    let broken = boot_active(&fabric, "broken").await;
    driver
        .destroy_and_undefine(&instance_name(&broken))
        .expect("domain removed");

    let request_id = request(&fabric, &rpc, &broken, "active", Request::Stop).await;
    let (row, action) = outcome(&fabric, &broken, &request_id).await;
    assert_eq!(
        (row.vm_state.as_str(), row.task_state, row.power_state),
        (vm_state::ACTIVE, None, power_state::NOSTATE),
        "the vm_state is kept; the power state is what the hypervisor shows"
    );
    assert_eq!(action.message.as_deref(), Some("Error"));
    let fault = fabric
        .db
        .instance_fault_latest(&broken)
        .expect("db")
        .expect("a fault");
    assert_eq!(fault.code, 404);
    assert!(
        fault.message.contains("does not exist"),
        "{}",
        fault.message
    );

    // A cast for an instance this host does not hold is taken and ignored.
    let context = RequestContext::internal("default");
    let endpoint = fabric
        .db
        .service_get("node-1", compute::BINARY)
        .expect("db")
        .expect("registered")
        .rpc_endpoint;
    let stray = StopInstance {
        uuid: uuid::Uuid::new_v4().to_string(),
    };
    rpc.cast(&endpoint, &context, &stray).await.expect("acked");

    // The compute goes on: another server stops and comes back with a hard reboot.
    let healthy = boot_active(&fabric, "healthy").await;
    let stopped = (vm_state::STOPPED, power_state::SHUTDOWN);
    let active = (vm_state::ACTIVE, power_state::RUNNING);
    succeeds(
        &fabric,
        &rpc,
        &driver,
        &healthy,
        "active",
        Request::Stop,
        stopped,
    )
    .await;
    let hard = Request::Reboot { hard: true };
    succeeds(&fabric, &rpc, &driver, &healthy, "stopped", hard, active).await;

    // Both delete cleanly, the one without a domain too.
    delete(&fabric, &driver, &broken).await;
    delete(&fabric, &driver, &healthy).await;
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_power_state_sync_corrects_domains_changed_behind_zovas_back() {
    let syncing_host = HostSpec {
        sync_power_state_interval: Some(0.5),
        ..roomy_host()
    };
    let fabric = Fabric::start(&[syncing_host], test_log())
        .await
        .expect("fabric starts");
    let driver = driver();
    let uuid = boot_active(&fabric, "drifting").await;
    let name = instance_name(&uuid);

    // Shut off behind Zova's back: the sync records the server stopped, its domain kept.
    driver.power_off(&name).expect("powered off");
    let server = fabric
        .wait_for_status(&uuid, "SHUTOFF", LIMIT)
        .await
        .expect("status");
    assert_eq!(server["OS-EXT-STS:power_state"], power_state::SHUTDOWN);
    assert_eq!(server["OS-EXT-STS:vm_state"], vm_state::STOPPED);
    fabric
        .server_action(&uuid, &serde_json::json!({"os-start": null}))
        .await
        .expect("action accepted");
    let server = fabric
        .wait_for_status(&uuid, "ACTIVE", LIMIT)
        .await
        .expect("status");
    assert_eq!(server["OS-EXT-STS:power_state"], power_state::RUNNING);

    // Started behind Zova's back while the user wants it stopped: the sync powers it off again.
    fabric
        .server_action(&uuid, &serde_json::json!({"os-stop": null}))
        .await
        .expect("action accepted");
    fabric
        .wait_for_status(&uuid, "SHUTOFF", LIMIT)
        .await
        .expect("status");
    driver.power_on(&name).expect("started behind Zova's back");
    assert_eq!(
        driver.power_state(&name).expect("domain"),
        power_state::RUNNING
    );
    fabric
        .wait_for("the sync to power the domain off", LIMIT, || {
            Ok(driver.power_state(&name).ok() == Some(power_state::SHUTDOWN))
        })
        .await
        .expect("powered off by the sync");
    let server = fabric
        .wait_for_status(&uuid, "SHUTOFF", LIMIT)
        .await
        .expect("status");
    assert_eq!(server["OS-EXT-STS:power_state"], power_state::SHUTDOWN);

    // Removed behind Zova's back: the server goes to ERROR, says why, and holds nothing.
    fabric
        .server_action(&uuid, &serde_json::json!({"os-start": null}))
        .await
        .expect("action accepted");
    fabric
        .wait_for_status(&uuid, "ACTIVE", LIMIT)
        .await
        .expect("status");
    driver.destroy_and_undefine(&name).expect("domain removed");
    let server = fabric
        .wait_for_status(&uuid, "ERROR", LIMIT)
        .await
        .expect("status");
    let fault = server["fault"]["message"].as_str().unwrap_or_default();
    assert!(fault.contains("is gone from the hypervisor"), "{server}");
    fabric
        .wait_for("node-1 to stop counting the server", LIMIT, || {
            let node = fabric
                .db
                .compute_nodes()?
                .into_iter()
                .find(|n| n.host == "node-1");
            Ok(node.is_some_and(|n| n.running_vms == 0))
        })
        .await
        .expect("released");

    delete(&fabric, &driver, &uuid).await;
    fabric.stop().await;
}
