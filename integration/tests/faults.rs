//! Fault injection with real processes: every service kind is killed with SIGKILL during a burst
//! of creates and started again, and afterwards no instance is left in a transitional state
//! past `build_timeout` and no resource is leaked (each host's placed totals are exactly its live
//! instances', and deleting everything gives everything back).
//!
//! The services are the workspace's own binaries (`zova-api`, `zova-conductor`,
//! `zova-scheduler`, `zova-compute`), found next to this test in the target directory:
//! `cargo build --bins` first (`scripts/test` does). A missing binary fails the test; it never
//! skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use rand::Rng;
use serde_json::Value;

use integration::{
    http_request, issue_token, server_body, with_hints, HttpResponse, ADMIN_PASSWORD,
};

/// Short, so the test sees the stuck-build check end what the kills leave behind.
const BUILD_TIMEOUT_S: f64 = 6.0;
/// A compute silent this long is down (heartbeats every second).
const SERVICE_DOWN_TIME_S: u64 = 3;
const HOSTS: [&str; 3] = ["node-1", "node-2", "node-3"];
/// At most this many creates while each service kind is killed and restarted: all of them fit
/// on the hosts (768 m1.tiny) and in the address pools, so every ERROR comes from a kill.
const MOST_CREATES_PER_ROUND: usize = 180;

/// A free loopback port for a service to bind, below the kernel's range of ephemeral ports. A
/// port the kernel picks (`bind` to port 0) is released again for the service to bind, and in
/// between an outgoing connection of the other test's services could take it (`Address already
/// in use`). Below that range only explicit binds compete, and this picks among thousands.
fn free_port() -> u16 {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let lowest = 10_000.min(first_ephemeral / 2);
    for _ in 0..1000 {
        let port = rand::thread_rng().gen_range(lowest..first_ephemeral);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {lowest} and {first_ephemeral}");
}

/// The directory holding the workspace's binaries: this test runs from its `deps/`.
fn binaries() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf();
    for name in [
        "zova-api",
        "zova-conductor",
        "zova-scheduler",
        "zova-compute",
    ] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: run `cargo build --bins` before this test (scripts/test does)",
            dir.join(name).display()
        );
    }
    dir
}

/// One Zova deployment of separate processes on loopback, with its own SQLite file.
struct Deployment {
    state: tempfile::TempDir,
    database_url: String,
    bin: PathBuf,
    config: PathBuf,
    api_address: String,
    scheduler_binds: [String; 2],
    /// Running processes by service name.
    processes: BTreeMap<String, Child>,
    /// How often each service has been started (names its log files).
    starts: BTreeMap<String, usize>,
}

impl Deployment {
    fn new() -> Deployment {
        let state = tempfile::tempdir().expect("state dir");
        let api_address = format!("127.0.0.1:{}", free_port());
        let conductor = format!("tcp://127.0.0.1:{}", free_port());
        let scheduler_binds = [
            format!("tcp://127.0.0.1:{}", free_port()),
            format!("tcp://127.0.0.1:{}", free_port()),
        ];
        let database_url = db::test_database_url(state.path()).expect("a test database");
        let config = state.path().join("zova.toml");
        let text = format!(
            r#"[database]
url = "{db}"

[rpc]
conductor = "{conductor}"
scheduler = "{s1}"
schedulers = ["{s1}", "{s2}"]
cast_timeout_ms = 1000
call_timeout_ms = 5000

[api]
listen = "{api_address}"
service_down_time = {SERVICE_DOWN_TIME_S}

[quota]
instances = -1
cores = -1
ram = -1

[scheduler]
build_queue_period = 0.5
service_down_time = {SERVICE_DOWN_TIME_S}

[conductor]
build_timeout = {BUILD_TIMEOUT_S}
stuck_check_interval = 0.5

[compute]
libvirt_uri = "test:///default"
report_interval = 1.0
"#,
            db = database_url,
            s1 = scheduler_binds[0],
            s2 = scheduler_binds[1],
        );
        std::fs::write(&config, text).expect("write zova.toml");
        Deployment {
            bin: binaries(),
            state,
            database_url,
            config,
            api_address,
            scheduler_binds,
            processes: BTreeMap::new(),
            starts: BTreeMap::new(),
        }
    }

    fn db(&self) -> db::Db {
        db::Db::open(&self.database_url).expect("db")
    }

    /// Starts service `name`: `api`, `conductor`, `scheduler-1`, `scheduler-2` or a host name.
    fn start(&mut self, name: &str) {
        let mut command = match name {
            "api" => Command::new(self.bin.join("zova-api")),
            "conductor" => Command::new(self.bin.join("zova-conductor")),
            "scheduler-1" | "scheduler-2" => {
                let mut command = Command::new(self.bin.join("zova-scheduler"));
                let index = usize::from(name == "scheduler-2");
                command.args(["--bind", &self.scheduler_binds[index]]);
                command
            }
            host => {
                let mut command = Command::new(self.bin.join("zova-compute"));
                let instances = self.state.path().join("instances").join(host);
                command.args(["--host", host, "--bind", "tcp://127.0.0.1:*"]);
                command.arg("--instances-path").arg(instances);
                command.args([
                    "--vcpus",
                    "64",
                    "--memory-mb",
                    "262144",
                    "--local-gb",
                    "4000",
                ]);
                command
            }
        };
        let count = self.starts.entry(name.to_string()).or_default();
        *count += 1;
        let log = std::fs::File::create(self.state.path().join(format!("{name}.{count}.log")))
            .expect("log file");
        let child = command
            .env("ZOVA_CONFIG", &self.config)
            .args(["--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.processes.insert(name.to_string(), child);
    }

    /// SIGKILL, as a crash or the OOM killer would: no clean-up of any kind.
    fn kill_nine(&mut self, name: &str) {
        let mut child = self
            .processes
            .remove(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// SIGSTOP or SIGCONT: a process that stops answering (a hung host, a full disk, a
    /// paused VM) with its sockets still open, and its return.
    fn signal(&self, name: &str, signal: libc::c_int) {
        let child = self
            .processes
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) on a child of this process, which has not been reaped.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "signal {signal} to {name}");
    }

    /// Fails the test if a service exited on its own.
    fn check_alive(&mut self) {
        let exited = self
            .processes
            .iter_mut()
            .find_map(|(name, child)| Some((name.clone(), child.try_wait().ok()??)));
        if let Some((name, status)) = exited {
            panic!("{name} exited by itself ({status}):\n{}", self.logs());
        }
    }

    /// The last lines of every service's logs, for a failure message.
    fn logs(&self) -> String {
        let mut text = String::new();
        let Ok(entries) = std::fs::read_dir(self.state.path()) else {
            return text;
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        for file in files {
            let content = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            let tail = &lines[lines.len().saturating_sub(8)..];
            text.push_str(&format!("== {}\n{}\n", file.display(), tail.join("\n")));
        }
        text
    }

    async fn http(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Option<HttpResponse> {
        let raw = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        http_request(
            &self.api_address,
            method,
            path,
            raw,
            &[("x-auth-token", token)],
        )
        .await
        .ok()
    }

    /// A deployment with every service running, its admin bootstrapped, and an admin token.
    async fn start_all() -> (Deployment, db::Db, String) {
        let mut deployment = Deployment::new();
        let db = deployment.db();
        let hash = api::identity::hash_password(ADMIN_PASSWORD).expect("hash");
        db.identity_bootstrap(&hash).expect("bootstrap");
        // The seeded /24 holds 253 addresses; this pool takes the rest.
        db.network_create("more", "172.16.0.0/16", "172.16.0.1", None)
            .expect("network");
        for name in ["scheduler-1", "scheduler-2", "conductor"] {
            deployment.start(name);
        }
        for host in HOSTS {
            deployment.start(host);
        }
        deployment.start("api");
        deployment.wait_for_api().await;
        deployment
            .wait_until("every compute to report", Duration::from_secs(30), |db| {
                let nodes = db.compute_nodes().map_err(|e| e.to_string())?.len();
                (nodes == HOSTS.len())
                    .then_some(())
                    .ok_or(format!("{nodes} nodes"))
            })
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let token = issue_token(&deployment.api_address, "admin", ADMIN_PASSWORD, "admin")
            .await
            .expect("token");

        (deployment, db, token)
    }

    /// Waits until the API answers again after a (re)start.
    async fn wait_for_api(&mut self) {
        for _ in 0..200 {
            if http_request(&self.api_address, Method::GET, "/v2.1/", Vec::new(), &[])
                .await
                .is_ok_and(|r| r.status == StatusCode::OK)
            {
                return;
            }
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the API did not answer:\n{}", self.logs());
    }

    /// Polls `check` every 100 ms for up to `limit`; fails with the logs.
    async fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&db::Db) -> Result<(), String>,
    ) {
        let db = self.db();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let outcome = check(&db);
            match outcome {
                Ok(()) => return,
                Err(why) if tokio::time::Instant::now() >= deadline => {
                    panic!("{what}: {why}\n{}", self.logs())
                }
                Err(_) => {}
            }
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for child in self.processes.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends creates, 8 at a time, until `stop` is set or `most` were sent, as a client would
/// during an outage: a refused or broken request is counted and the next one sent after a short
/// pause. Returns (accepted, refused or cut).
async fn burst(
    address: String,
    token: String,
    round: &'static str,
    most: usize,
    stop: Arc<AtomicBool>,
) -> (usize, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (address, token, next, accepted, stop) = (
            address.clone(),
            token.clone(),
            next.clone(),
            accepted.clone(),
            stop.clone(),
        );
        clients.spawn(async move {
            let mut failed = 0;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= most || stop.load(Ordering::Relaxed) {
                    return failed;
                }
                let body = server_body(&format!("{round}-{n}"), "1")
                    .to_string()
                    .into_bytes();
                let headers = [("x-auth-token", token.as_str())];
                match http_request(&address, Method::POST, "/v2.1/servers", body, &headers).await {
                    Ok(r) if r.status == StatusCode::ACCEPTED => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    let mut failed = 0;
    while let Some(joined) = clients.join_next().await {
        failed += joined.expect("client task");
    }
    (accepted.load(Ordering::Relaxed), failed)
}

/// Live instances that are still building or in a task.
fn transitional(db: &db::Db) -> Result<(), String> {
    let stuck: Vec<String> = db
        .instances_list(None)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|i| i.vm_state == "building" || i.task_state.is_some())
        .map(|i| format!("{} {}/{:?}", i.uuid, i.vm_state, i.task_state))
        .collect();
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} transitional: {:?}",
            stuck.len(),
            &stuck[..stuck.len().min(5)]
        ))
    }
}

/// The books balance: each node's placed totals are the sum of its allocations, and the
/// allocations are exactly those of the live instances out of ERROR, on their own node.
fn books_balance(db: &db::Db) -> Result<(), String> {
    let nodes = db.compute_nodes().map_err(|e| e.to_string())?;
    let sums = db.allocation_sums().map_err(|e| e.to_string())?;
    let node_of: BTreeMap<i64, String> = nodes
        .iter()
        .map(|n| (n.id, n.hypervisor_hostname.clone()))
        .collect();
    for node in &nodes {
        let summed = sums.get(&node.id).copied().unwrap_or_default();
        let placed = (
            node.placed_vcpus,
            node.placed_memory_mb,
            node.placed_disk_mb,
        );
        if (summed.vcpus, summed.memory_mb, summed.disk_mb) != placed {
            return Err(format!(
                "{}: placed {placed:?}, allocations {summed:?}",
                node.hypervisor_hostname
            ));
        }
    }
    let mut vcpus_by_node: BTreeMap<String, i64> = BTreeMap::new();
    for instance in db.instances_list(None).map_err(|e| e.to_string())? {
        let allocation = db
            .allocation_get(&instance.uuid)
            .map_err(|e| e.to_string())?;
        match (instance.vm_state.as_str(), allocation) {
            ("error", None) => {}
            ("error", Some(_)) => {
                return Err(format!(
                    "{} is in error but holds an allocation",
                    instance.uuid
                ))
            }
            (state, None) => {
                return Err(format!(
                    "{} is {state} without an allocation",
                    instance.uuid
                ))
            }
            (_, Some((node_id, placed))) => {
                let node = node_of.get(&node_id).cloned().unwrap_or_default();
                if instance.node.as_deref() != Some(node.as_str()) {
                    return Err(format!(
                        "{} runs on {:?} but is placed on {node}",
                        instance.uuid, instance.node
                    ));
                }
                if placed.vcpus != instance.vcpus || placed.memory_mb != instance.memory_mb {
                    return Err(format!(
                        "{} holds {placed:?}, not its flavor",
                        instance.uuid
                    ));
                }
                *vcpus_by_node.entry(node).or_default() += placed.vcpus;
            }
        }
    }
    for node in &nodes {
        let live = vcpus_by_node
            .get(&node.hypervisor_hostname)
            .copied()
            .unwrap_or(0);
        if live != node.placed_vcpus {
            return Err(format!(
                "{}: {} vCPUs placed, its live instances hold {live}",
                node.hypervisor_hostname, node.placed_vcpus
            ));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_each_service_kind_during_a_burst_and_nothing_stays_stuck_or_leaks() {
    let (mut deployment, db, token) = Deployment::start_all().await;

    let mut accepted = 0;
    for (round, victim) in [
        ("api", "api"),
        ("conductor", "conductor"),
        ("scheduler", "scheduler-1"),
        ("compute", "node-2"),
    ] {
        // The kill falls inside the burst, and the burst goes on past the restart.
        let stop = Arc::new(AtomicBool::new(false));
        let burst = tokio::spawn(burst(
            deployment.api_address.clone(),
            token.clone(),
            round,
            MOST_CREATES_PER_ROUND,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(150)).await;
        deployment.kill_nine(victim);
        tokio::time::sleep(Duration::from_millis(500)).await;
        deployment.start(victim);
        if victim == "api" {
            deployment.wait_for_api().await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = burst.await.expect("burst");
        eprintln!(
            "faults: {round} killed mid-burst: {ok} creates accepted, {failed} refused or cut"
        );
        accepted += ok;
        deployment.check_alive();
    }
    assert!(accepted > 0, "no create got through");

    // The stuck-build check needs build_timeout after the last create, plus a pass.
    let settle = Duration::from_secs_f64(BUILD_TIMEOUT_S * 2.0 + 10.0);
    deployment
        .wait_until(
            "nothing left transitional after build_timeout",
            settle,
            transitional,
        )
        .await;
    let instances = db.instances_list(None).expect("instances");
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_fault: BTreeMap<String, usize> = BTreeMap::new();
    for instance in &instances {
        *by_state.entry(instance.vm_state.clone()).or_default() += 1;
        if instance.vm_state == "error" {
            let fault = db
                .instance_fault_latest(&instance.uuid)
                .expect("fault")
                .unwrap_or_else(|| panic!("{} is in error without a fault", instance.uuid));
            // The message without the instance's and the endpoints' particulars.
            let kind = fault
                .message
                .split_whitespace()
                .filter(|word| !word.contains('-') && !word.contains("tcp://"))
                .take(8)
                .collect::<Vec<_>>()
                .join(" ");
            *by_fault.entry(kind).or_default() += 1;
            assert!(
                !fault.message.is_empty(),
                "{} has an empty fault",
                instance.uuid
            );
        }
    }
    eprintln!("faults: errors by fault: {by_fault:?}");
    eprintln!(
        "faults: {} instances after the kills: {by_state:?}",
        instances.len()
    );
    assert!(
        instances.len() >= accepted,
        "an accepted create lost its row"
    );
    assert!(
        by_state.get("active").copied().unwrap_or(0) > 0,
        "{by_state:?}"
    );
    deployment
        .wait_until("the books balance", Duration::from_secs(10), books_balance)
        .await;

    // Deleting everything gives every vCPU, MB and address back.
    for instance in &instances {
        let path = format!("/v2.1/servers/{}", instance.uuid);
        let deleted = deployment.http(&token, Method::DELETE, &path, None).await;
        let status = deleted.map(|r| r.status);
        assert!(
            matches!(status, Some(StatusCode::NO_CONTENT | StatusCode::NOT_FOUND)),
            "delete {}: {status:?}",
            instance.uuid
        );
    }
    deployment
        .wait_until(
            "every instance deleted and every resource free",
            Duration::from_secs(30),
            |db| {
                let live = db.instances_list(None).map_err(|e| e.to_string())?.len();
                if live > 0 {
                    return Err(format!("{live} instances left"));
                }
                let sums = db.allocation_sums().map_err(|e| e.to_string())?;
                if sums.values().any(|p| *p != db::Placed::default()) {
                    return Err(format!("allocations left: {sums:?}"));
                }
                for node in db.compute_nodes().map_err(|e| e.to_string())? {
                    if (
                        node.placed_vcpus,
                        node.placed_memory_mb,
                        node.placed_disk_mb,
                    ) != (0, 0, 0)
                    {
                        return Err(format!(
                            "{} still has placed resources",
                            node.hypervisor_hostname
                        ));
                    }
                }
                let held: i64 = db
                    .network_usage()
                    .map_err(|e| e.to_string())?
                    .iter()
                    .map(|n| n.held)
                    .sum();
                (held == 0)
                    .then_some(())
                    .ok_or(format!("{held} fixed IPs still held"))
            },
        )
        .await;
    deployment.check_alive();
}

/// The `state` of `host`'s compute service in `GET /os-services`.
async fn compute_state(deployment: &Deployment, token: &str, host: &str) -> Option<String> {
    let services = deployment
        .http(token, Method::GET, "/v2.1/os-services", None)
        .await?;
    services.body["services"]
        .as_array()?
        .iter()
        .find(|s| s["host"] == host && s["binary"] == "zova-compute")
        .and_then(|s| s["state"].as_str())
        .map(str::to_string)
}

/// Waits (up to `service_down_time` and 10 s) until `os-services` says `host` is `state`.
async fn wait_for_compute_state(deployment: &Deployment, token: &str, host: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(SERVICE_DOWN_TIME_S + 10);
    while compute_state(deployment, token, host).await.as_deref() != Some(state) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{host} is not reported {state}:\n{}",
            deployment.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A check for [`Deployment::wait_until`]: instance `uuid` is ACTIVE.
fn active(uuid: &str) -> impl FnMut(&db::Db) -> Result<(), String> + '_ {
    move |db| {
        let vm = db
            .instance_get(uuid)
            .map_err(|e| e.to_string())?
            .map(|i| i.vm_state);
        (vm.as_deref() == Some("active"))
            .then_some(())
            .ok_or(format!("{vm:?}"))
    }
}

/// Creates `count` servers with `hints`; returns the ids of those accepted.
async fn create_many(
    deployment: &Deployment,
    token: &str,
    name: &str,
    count: usize,
    hints: Value,
) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..count {
        let body = with_hints(&format!("{name}-{n}"), "1", hints.clone());
        let created = deployment
            .http(token, Method::POST, "/v2.1/servers", Some(&body))
            .await
            .expect("the API answers");
        assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.body);
        ids.push(
            created.body["server"]["id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_that_stops_answering_is_marked_down_gets_no_work_and_builds_nothing_late() {
    let (mut deployment, db, token) = Deployment::start_all().await;
    let on_node_2 = serde_json::json!({"scheduler_host": "node-2"});
    let warm = create_many(&deployment, &token, "warm", 1, on_node_2.clone()).await;
    deployment
        .wait_until(
            "the first server ACTIVE on node-2",
            Duration::from_secs(30),
            active(&warm[0]),
        )
        .await;

    deployment.signal("node-2", libc::SIGSTOP);
    // Work sent while nobody knows yet: forced onto node-2, and placed by the scheduler.
    let forced = create_many(&deployment, &token, "forced", 3, on_node_2.clone()).await;
    let placed = create_many(&deployment, &token, "placed", 15, serde_json::json!({})).await;
    wait_for_compute_state(&deployment, &token, "node-2", "down").await;
    let later = create_many(&deployment, &token, "later", 15, serde_json::json!({})).await;
    let settle = Duration::from_secs_f64(BUILD_TIMEOUT_S * 2.0 + 10.0);
    deployment
        .wait_until(
            "nothing transitional while node-2 is frozen",
            settle,
            transitional,
        )
        .await;
    for uuid in &forced {
        let instance = db.instance_get(uuid).expect("read").expect("live");
        assert_eq!(
            instance.vm_state, "error",
            "{uuid} forced onto a frozen host"
        );
        let fault = db
            .instance_fault_latest(uuid)
            .expect("fault")
            .expect("a fault");
        assert!(
            fault.message.contains("node-2"),
            "the fault names the host: {}",
            fault.message
        );
    }
    for uuid in placed.iter().chain(&later) {
        let instance = db.instance_get(uuid).expect("read").expect("live");
        assert_eq!(instance.vm_state, "active", "{uuid} went elsewhere");
        assert_ne!(
            instance.node.as_deref(),
            Some("node-2"),
            "{uuid} was given to the frozen host"
        );
    }
    deployment
        .wait_until("the books balance", Duration::from_secs(10), books_balance)
        .await;

    // Back: it is up again, what it had queued builds nothing, and it takes work again.
    deployment.signal("node-2", libc::SIGCONT);
    wait_for_compute_state(&deployment, &token, "node-2", "up").await;
    // The scheduler counts a host that missed a cast as down until its next heartbeat.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = create_many(&deployment, &token, "back", 1, on_node_2).await;
    deployment
        .wait_until(
            "a server ACTIVE on node-2 again",
            Duration::from_secs(30),
            active(&back[0]),
        )
        .await;
    deployment
        .wait_until("the books balance", Duration::from_secs(10), books_balance)
        .await;
    let on_node_2: Vec<String> = db
        .instances_list(None)
        .expect("instances")
        .into_iter()
        .filter(|i| i.node.as_deref() == Some("node-2") && i.vm_state == "active")
        .map(|i| i.uuid)
        .collect();
    let mut expected = vec![warm[0].clone(), back[0].clone()];
    expected.sort();
    let mut found = on_node_2;
    found.sort();
    assert_eq!(
        found, expected,
        "node-2 runs only what it was given while it answered"
    );
    deployment.check_alive();
}
