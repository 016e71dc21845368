//! A whole fabric in one process for tests and load tools: scheduler, conductor, compute hosts and
//! API as separate services (the same library code as the binaries) talking over real loopback
//! ZeroMQ and HTTP, with a temporary SQLite file and libvirt's `test:///default` hypervisor.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use proto::service::ServiceHandle;

/// The cirros image every fresh database has.
pub const IMAGE: &str = "155d900f-4e14-4e4c-a73d-069cbf4541e6";

/// For tests: quiet unless ZOVA_TEST_LOG is set, then every service logs to stderr.
pub fn test_log() -> slog::Logger {
    match std::env::var_os("ZOVA_TEST_LOG") {
        Some(_) => proto::service::root_logger(
            &proto::service::LogConfig {
                debug: true,
                ..Default::default()
            },
            "test",
        ),
        None => slog::Logger::root(slog::Discard, slog::o!()),
    }
}

/// A create-server body.
pub fn server_body(name: &str, flavor: &str) -> Value {
    serde_json::json!({"server": {"name": name, "flavorRef": flavor, "imageRef": IMAGE}})
}

/// A create-server body with scheduler hints.
pub fn with_hints(name: &str, flavor: &str, hints: Value) -> Value {
    let mut body = server_body(name, flavor);
    body["os:scheduler_hints"] = hints;
    body
}

/// The value of one series in a metrics text, named with its labels as the text writes them
/// (`zova_api_requests_total{method="POST",route="/v2.1/servers",status="202"}`); None when
/// the series is absent.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The value at fraction `p` (0.0–1.0) of sorted latencies; zero when there are none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Microseconds to one decimal, for the benchmarks' JSON lines.
pub fn micros(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// An m1.tiny instance row a compute is building (`building`/`spawning`), for tests that
/// insert the state a crash or a stale scheduler would leave.
pub fn building_row(uuid: &str) -> db::NewInstance {
    db::NewInstance {
        uuid: uuid.into(),
        display_name: uuid.into(),
        project_id: "default".into(),
        user_id: "test".into(),
        flavorid: "1".into(),
        image_ref: IMAGE.into(),
        vcpus: 1,
        memory_mb: 512,
        root_gb: 1,
        ephemeral_gb: 0,
        swap_mb: 0,
        vm_state: "building".into(),
        task_state: Some("spawning".into()),
        power_state: 0,
        scheduler_hints: "{}".into(),
        metadata: "{}".into(),
        reservation_id: "r-test".into(),
        launch_index: 0,
        description: None,
        key_name: None,
        flavor_snapshot: "{}".into(),
    }
}

/// A client socket of its own, for tests that speak to one service as another would.
pub fn client(log: &slog::Logger) -> proto::Rpc {
    let (rpc, _) =
        proto::Rpc::start(log.clone(), None, proto::RpcOptions::default()).expect("client socket");
    rpc
}

/// An admin's request context, as the services pass it on.
pub fn admin() -> proto::RequestContext {
    proto::RequestContext {
        request_id: proto::new_request_id(),
        user_id: "test".into(),
        project_id: "default".into(),
        roles: vec!["admin".into()],
        deadline_ms: None,
    }
}

/// A request spec for an instance row the test inserted itself (see [`building_row`]).
pub fn spec_for(uuid: &str, retry: proto::RetrySpec) -> proto::RequestSpec {
    proto::RequestSpec {
        instance_uuid: uuid.into(),
        display_name: uuid.into(),
        project_id: "default".into(),
        flavor: proto::FlavorSpec {
            flavorid: "1".into(),
            name: "m1.tiny".into(),
            vcpus: 1,
            memory_mb: 512,
            root_gb: 1,
            ephemeral_gb: 0,
            swap_mb: 0,
            extra_specs: Default::default(),
        },
        image: proto::ImageSpec {
            id: IMAGE.into(),
            name: "cirros".into(),
            disk_format: "qcow2".into(),
            location: None,
        },
        hints: Default::default(),
        retry,
    }
}

/// The size of one pretend compute host.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub name: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub local_gb: i64,
    pub cpu_allocation_ratio: f64,
    /// The host queue (`kvm` when unset).
    pub queue_name: Option<String>,
    /// `[compute] sync_power_state_interval` (the default when unset).
    pub sync_power_state_interval: Option<f64>,
    /// `[compute] shutdown_timeout` (the default when unset).
    pub shutdown_timeout: Option<f64>,
    /// The hypervisor; unset, libvirt's in-process test driver (`test:///default`).
    pub libvirt_uri: Option<String>,
    /// Where the host keeps its disks; unset, a directory in the fabric's state.
    pub instances_path: Option<std::path::PathBuf>,
    /// `[compute] virt_type` (auto when unset).
    pub virt_type: Option<compute::driver::VirtType>,
    /// `[compute] running_deleted_instance_action` (the default when unset).
    pub running_deleted_instance_action: Option<compute::RunningDeletedAction>,
}

impl HostSpec {
    pub fn new(name: &str, vcpus: i64, memory_mb: i64, local_gb: i64) -> Self {
        HostSpec {
            name: name.into(),
            vcpus,
            memory_mb,
            local_gb,
            cpu_allocation_ratio: 16.0,
            queue_name: None,
            sync_power_state_interval: None,
            shutdown_timeout: None,
            libvirt_uri: None,
            instances_path: None,
            virt_type: None,
            running_deleted_instance_action: None,
        }
    }
}

/// How a fabric is set up beyond its hosts.
#[derive(Debug, Clone)]
pub struct FabricOptions {
    /// Scheduler services (each with its own sockets, database connections and host queue)
    /// the conductor spreads work over.
    pub schedulers: usize,
    /// Their settings; `build_queue_period` is the fabric's own (0.3 s).
    pub scheduler: scheduler::SchedulerConfig,
    /// Conductor services; the API and the computes spread work over them.
    pub conductors: usize,
    /// CURVE on every socket: the conductor and schedulers share one server key pair, each
    /// compute host and the API have their own, and every service trusts only these keys.
    pub curve: bool,
    /// Every service serves `GET /metrics` on an ephemeral loopback port
    /// ([`Fabric::metrics_address`], [`Fabric::scrape`]).
    pub metrics: bool,
    /// The conductor's `[conductor]` (its stuck-task check).
    pub conductor: conductor::ConductorConfig,
}

impl Default for FabricOptions {
    fn default() -> Self {
        FabricOptions {
            schedulers: 1,
            scheduler: scheduler::SchedulerConfig::default(),
            conductors: 1,
            curve: false,
            metrics: false,
            conductor: conductor::ConductorConfig::default(),
        }
    }
}

/// `[metrics]` of a fabric's services: an ephemeral loopback port each, or none.
fn metrics_config(enabled: bool) -> proto::metrics::MetricsConfig {
    proto::metrics::MetricsConfig {
        listen: if enabled {
            "127.0.0.1:0".into()
        } else {
            String::new()
        },
    }
}

/// The three hosts of the spine tests: node-1 small, node-2 and node-3 twice its size.
pub fn three_hosts() -> Vec<HostSpec> {
    vec![
        HostSpec::new("node-1", 4, 4096, 40),
        HostSpec::new("node-2", 8, 8192, 80),
        HostSpec::new("node-3", 8, 8192, 80),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("{service} did not start: {reason}")]
    Start {
        service: &'static str,
        reason: String,
    },
    #[error("HTTP request failed: {0}")]
    Http(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Db(#[from] db::DbError),
}

/// The admin password every test fabric bootstraps.
pub const ADMIN_PASSWORD: &str = "zova-test-admin";

pub struct Fabric {
    pub api_address: String,
    /// A project-scoped token of `admin` in project `admin`; [`Fabric::http`] sends it.
    pub admin_token: String,
    /// The id of project `admin`.
    pub admin_project: String,
    pub db: db::Db,
    pub build_queue_period: Duration,
    /// (name, handle): `scheduler`, `conductor`, the compute host names, `api`.
    services: Vec<(String, ServiceHandle)>,
    rpc: proto::service::RpcConfig,
    /// With CURVE: each service's key pair, by service name (`control`, `api`, host names).
    keys: Keys,
    /// `[metrics]` of every service (and of computes started later).
    metrics: proto::metrics::MetricsConfig,
    log: slog::Logger,
    // Held for its Drop: the state directory lives as long as the fabric.
    _state: tempfile::TempDir,
}

fn rpc_config(conductors: &[String], schedulers: &[String]) -> proto::service::RpcConfig {
    proto::service::RpcConfig {
        conductor: conductors.first().cloned().unwrap_or_default(),
        conductors: conductors.to_vec(),
        scheduler: schedulers.first().cloned().unwrap_or_default(),
        schedulers: schedulers.to_vec(),
        cast_timeout_ms: 2000,
        call_timeout_ms: 10_000,
        ..Default::default()
    }
}

/// CURVE key pairs (public, secret) of a fabric's services, by name; empty in plain mode.
#[derive(Debug, Clone, Default)]
struct Keys(std::collections::BTreeMap<String, (String, String)>);

impl Keys {
    fn generate(names: impl IntoIterator<Item = String>) -> Result<Keys, FabricError> {
        let mut keys = std::collections::BTreeMap::new();
        for name in names {
            let pair = proto::curve::generate_key_pair()
                .map_err(|e| start_error("keys")(e.to_string()))?;
            keys.insert(name, pair);
        }
        Ok(Keys(keys))
    }

    /// `rpc` with the CURVE settings of service `name`: its own pair, the control plane's
    /// server key, and every key of the fabric trusted.
    fn apply(&self, name: &str, rpc: &proto::service::RpcConfig) -> proto::service::RpcConfig {
        let (Some((public, secret)), Some((control, _))) =
            (self.0.get(name), self.0.get("control"))
        else {
            return rpc.clone();
        };
        proto::service::RpcConfig {
            curve: Some(proto::CurveConfig {
                public_key: public.clone(),
                secret_key: secret.clone(),
                server_public_key: control.clone(),
                trusted_clients: self.0.values().map(|(p, _)| p.clone()).collect(),
                ..Default::default()
            }),
            ..rpc.clone()
        }
    }
}

fn start_error(service: &'static str) -> impl Fn(String) -> FabricError {
    move |reason| FabricError::Start { service, reason }
}

async fn start_compute(
    host: &HostSpec,
    rpc: &proto::service::RpcConfig,
    metrics: &proto::metrics::MetricsConfig,
    state: &std::path::Path,
    log: &slog::Logger,
) -> Result<ServiceHandle, FabricError> {
    compute::start(
        compute::Config {
            rpc: rpc.clone(),
            metrics: metrics.clone(),
            compute: compute::ComputeConfig {
                host: host.name.clone(),
                bind: "tcp://127.0.0.1:*".into(),
                libvirt_uri: host
                    .libvirt_uri
                    .clone()
                    .unwrap_or_else(|| "test:///default".into()),
                instances_path: host
                    .instances_path
                    .clone()
                    .unwrap_or_else(|| state.join("instances").join(&host.name)),
                vcpus: Some(host.vcpus),
                memory_mb: Some(host.memory_mb),
                local_gb: Some(host.local_gb),
                cpu_allocation_ratio: Some(host.cpu_allocation_ratio),
                queue_name: host.queue_name.clone().unwrap_or_else(|| "kvm".into()),
                // Tests reason about whole host sizes.
                reserved_host_memory_mb: 0,
                report_interval: 1.0,
                sync_power_state_interval: host
                    .sync_power_state_interval
                    .unwrap_or(compute::ComputeConfig::default().sync_power_state_interval),
                virt_type: host.virt_type.unwrap_or_default(),
                running_deleted_instance_action: host
                    .running_deleted_instance_action
                    .unwrap_or_default(),
                shutdown_timeout: host
                    .shutdown_timeout
                    .unwrap_or(compute::ComputeConfig::default().shutdown_timeout),
                ..Default::default()
            },
            ..Default::default()
        },
        log.new(slog::o!("service" => "zova-compute", "host" => host.name.clone())),
    )
    .await
    .map_err(|e| start_error("compute")(e.to_string()))
}

impl Fabric {
    /// Starts every service on ephemeral loopback ports and waits until the scheduler's host queue
    /// has seen every host.
    pub async fn start(hosts: &[HostSpec], log: slog::Logger) -> Result<Fabric, FabricError> {
        Fabric::start_with(hosts, FabricOptions::default(), log).await
    }

    /// As [`Fabric::start`], with `options`.
    pub async fn start_with(
        hosts: &[HostSpec],
        options: FabricOptions,
        log: slog::Logger,
    ) -> Result<Fabric, FabricError> {
        let state = tempfile::tempdir()?;
        // A SQLite file, or a fresh PostgreSQL database when ZOVA_TEST_POSTGRES names a server.
        let database = proto::service::DatabaseConfig {
            url: db::test_database_url(state.path())?,
            ..Default::default()
        };
        let build_queue_period = Duration::from_millis(300);
        let keys = if options.curve {
            let names = ["control".to_string(), "api".to_string()]
                .into_iter()
                .chain(hosts.iter().map(|h| h.name.clone()));
            Keys::generate(names)?
        } else {
            Keys::default()
        };
        let any = "tcp://127.0.0.1:*";
        let metrics = metrics_config(options.metrics);
        let mut services = Vec::new();

        let mut scheduler_endpoints = Vec::new();
        for n in 1..=options.schedulers.max(1) {
            let scheduler = scheduler::start(
                scheduler::Config {
                    database: database.clone(),
                    rpc: keys.apply("control", &rpc_config(&[], &[any.to_string()])),
                    metrics: metrics.clone(),
                    scheduler: scheduler::SchedulerConfig {
                        build_queue_period: build_queue_period.as_secs_f64(),
                        ..options.scheduler.clone()
                    },
                    ..Default::default()
                },
                log.new(slog::o!("service" => "zova-scheduler", "scheduler" => n)),
            )
            .await
            .map_err(|e| start_error("scheduler")(e.to_string()))?;
            scheduler_endpoints.push(scheduler.endpoint.clone());
            let name = if n == 1 {
                "scheduler".to_string()
            } else {
                format!("scheduler-{n}")
            };
            services.push((name, scheduler));
        }

        let mut conductor_endpoints = Vec::new();
        for n in 1..=options.conductors.max(1) {
            let conductor = conductor::start(
                conductor::Config {
                    database: database.clone(),
                    rpc: keys.apply(
                        "control",
                        &rpc_config(&[any.to_string()], &scheduler_endpoints),
                    ),
                    metrics: metrics.clone(),
                    conductor: options.conductor.clone(),
                    ..Default::default()
                },
                log.new(slog::o!("service" => "zova-conductor", "conductor" => n)),
            )
            .await
            .map_err(|e| start_error("conductor")(e.to_string()))?;
            conductor_endpoints.push(conductor.endpoint.clone());
            let name = if n == 1 {
                "conductor".to_string()
            } else {
                format!("conductor-{n}")
            };
            services.push((name, conductor));
        }
        let rpc = rpc_config(&conductor_endpoints, &scheduler_endpoints);

        for host in hosts {
            services.push((
                host.name.clone(),
                start_compute(
                    host,
                    &keys.apply(&host.name, &rpc),
                    &metrics,
                    state.path(),
                    &log,
                )
                .await?,
            ));
        }

        let api = api::start(
            api::Config {
                database: database.clone(),
                rpc: keys.apply("api", &rpc),
                metrics: metrics.clone(),
                api: api::ApiConfig {
                    listen: "127.0.0.1:0".into(),
                    ..Default::default()
                },
                // Tests and load tools boot more than Nova's default 10 servers per project;
                // quota tests set a project's own limits.
                quota: api::QuotaConfig {
                    instances: -1,
                    cores: -1,
                    ram: -1,
                    ..Default::default()
                },
                ..Default::default()
            },
            log.new(slog::o!("service" => "zova-api")),
        )
        .await
        .map_err(|e| start_error("api")(e.to_string()))?;
        let api_address = api.endpoint.clone();
        services.push(("api".to_string(), api));

        let db = db::Db::open(&database.url)?;
        let hash = api::identity::hash_password(ADMIN_PASSWORD)
            .map_err(|e| FabricError::Http(format!("cannot hash the admin password: {e}")))?;
        let admin_project = db.identity_bootstrap(&hash)?.project.uuid;
        let admin_token = issue_token(&api_address, "admin", ADMIN_PASSWORD, "admin").await?;
        let fabric = Fabric {
            api_address,
            admin_token,
            admin_project,
            db,
            build_queue_period,
            services,
            rpc,
            keys,
            metrics,
            log,
            _state: state,
        };
        let expected = hosts.len();
        fabric
            .wait_for(
                "every compute node to report",
                Duration::from_secs(30),
                || Ok(fabric.db.compute_nodes()?.len() >= expected),
            )
            .await?;
        fabric.wait_for_queue_rebuild().await;
        Ok(fabric)
    }

    /// The RPC endpoint compute `host` registered.
    pub fn compute_endpoint(&self, host: &str) -> String {
        self.db
            .service_get(host, "zova-compute")
            .expect("services table")
            .unwrap_or_else(|| panic!("{host} is not registered"))
            .rpc_endpoint
    }

    /// Inserts an m1.tiny instance waiting for a host (`building`/`scheduling`), as the API
    /// leaves it, with a new uuid; returns the uuid.
    pub fn insert_waiting_instance(&self) -> String {
        let uuid = uuid::Uuid::new_v4().to_string();
        let row = db::NewInstance {
            task_state: Some("scheduling".into()),
            ..building_row(&uuid)
        };
        self.db.instance_create(&row, "req-test").expect("row");
        uuid
    }

    /// Places m1.tiny instance `uuid` on `host`'s node as a scheduler's claim does (its limits
    /// those of an 8-vCPU, 16 GiB, 160 GB host); returns the fixed IP the claim took.
    pub fn claim_on(&self, uuid: &str, host: &str) -> db::FixedIp {
        let node_id = self
            .db
            .compute_nodes()
            .expect("nodes")
            .into_iter()
            .find(|n| n.host == host)
            .unwrap_or_else(|| panic!("{host} has no node"))
            .id;
        let claim = db::AllocationClaim {
            instance_uuid: uuid.to_string(),
            node_id,
            usage: db::Placed {
                vcpus: 1,
                memory_mb: 512,
                disk_mb: 1024,
            },
            limits: db::Placed {
                vcpus: 8,
                memory_mb: 16_384,
                disk_mb: 160 * 1024,
            },
            moving_from: None,
        };
        match self.db.allocation_claim(&claim).expect("claim") {
            db::ClaimOutcome::Claimed(Some(ip)) => ip,
            other => panic!("the claim on {host} placed nothing: {other:?}"),
        }
    }

    /// The RPC endpoints of the services: `conductor`, `scheduler` and `schedulers`.
    pub fn rpc(&self) -> &proto::service::RpcConfig {
        &self.rpc
    }

    /// Where service `name` (`api`, `conductor`, `scheduler`, a compute host's name) serves
    /// `GET /metrics`; None without [`FabricOptions::metrics`] or for an unknown name.
    pub fn metrics_address(&self, name: &str) -> Option<String> {
        self.services
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, handle)| handle.metrics_address())
            .map(|address| address.to_string())
    }

    /// The metrics text of service `name`, as a Prometheus scrape gets it.
    pub async fn scrape(&self, name: &str) -> Result<String, FabricError> {
        let address = self
            .metrics_address(name)
            .ok_or_else(|| FabricError::Http(format!("{name} serves no metrics")))?;
        let response = http_request(&address, Method::GET, "/metrics", Vec::new(), &[]).await?;
        if response.status != StatusCode::OK {
            return Err(FabricError::Http(format!(
                "GET /metrics of {name} answered {}",
                response.status
            )));
        }
        String::from_utf8(response.raw.to_vec())
            .map_err(|e| FabricError::Http(format!("the metrics of {name} are not UTF-8: {e}")))
    }

    /// Sleeps long enough for the scheduler to rebuild its host queue at least once.
    pub async fn wait_for_queue_rebuild(&self) {
        tokio::time::sleep(self.build_queue_period * 2 + Duration::from_millis(100)).await;
    }

    /// Polls `check` every 50 ms until it is true.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut() -> Result<bool, FabricError>,
    ) -> Result<(), FabricError> {
        let deadline = tokio::time::Instant::now() + limit;
        while !check()? {
            if tokio::time::Instant::now() >= deadline {
                return Err(FabricError::Timeout(what.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// A request as the fabric's admin.
    pub async fn http(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<HttpResponse, FabricError> {
        self.http_as(&self.admin_token, method, path, body).await
    }

    /// A request with `token` (empty: none).
    pub async fn http_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<HttpResponse, FabricError> {
        let raw = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let headers: Vec<(&str, &str)> = if token.is_empty() {
            Vec::new()
        } else {
            vec![("x-auth-token", token)]
        };
        http_request(&self.api_address, method, path, raw, &headers).await
    }

    /// Creates `user` (password = its name) with `role` on `project` (created if needed) and
    /// returns a token scoped to that project, and the project's id.
    pub async fn user_token(
        &self,
        project: &str,
        user: &str,
        role: &str,
    ) -> Result<(String, String), FabricError> {
        let project_row = match self.db.project_get_by_name(project)? {
            Some(p) => p,
            None => self.db.project_create(project, "")?,
        };
        let hash = api::identity::hash_password(user)
            .map_err(|e| FabricError::Http(format!("cannot hash a password: {e}")))?;
        let user_row = self.db.user_create(user, &hash, Some(&project_row.uuid))?;
        self.db
            .role_assign(&user_row.uuid, &project_row.uuid, role)?;
        let token = issue_token(&self.api_address, user, user, project).await?;
        Ok((token, project_row.uuid))
    }

    /// `POST /v2.1/servers`; returns the new server's id.
    pub async fn create_server(&self, body: &Value) -> Result<String, FabricError> {
        let response = self.http(Method::POST, "/v2.1/servers", Some(body)).await?;
        if response.status != StatusCode::ACCEPTED {
            return Err(FabricError::Http(format!(
                "create answered {}: {}",
                response.status, response.body
            )));
        }
        response.body["server"]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| FabricError::Http(format!("no server id in {}", response.body)))
    }

    pub async fn show_server(&self, id: &str) -> Result<HttpResponse, FabricError> {
        self.http(Method::GET, &format!("/v2.1/servers/{id}"), None)
            .await
    }

    /// Creates a server and waits until it has left BUILD; returns its final body.
    pub async fn boot(&self, body: &Value, limit: Duration) -> Result<Value, FabricError> {
        let id = self.create_server(body).await?;
        self.wait_until_built(&id, limit).await
    }

    /// Waits until the server leaves BUILD and returns its final body.
    pub async fn wait_until_built(&self, id: &str, limit: Duration) -> Result<Value, FabricError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let response = self.show_server(id).await?;
            let status = response.body["server"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if response.status == StatusCode::OK && status != "BUILD" {
                return Ok(response.body["server"].clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FabricError::Timeout(format!(
                    "server {id} to leave BUILD (last: {})",
                    response.body
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the API until the server shows `status` with no task under way and returns it.
    /// A server that goes to ERROR when something else is wanted is an error at once, with its
    /// fault.
    pub async fn wait_for_status(
        &self,
        id: &str,
        status: &str,
        limit: Duration,
    ) -> Result<Value, FabricError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let shown = self.show_server(id).await?;
            let server = shown.body["server"].clone();
            if shown.status == StatusCode::OK
                && server["status"] == status
                && server["OS-EXT-STS:task_state"].is_null()
            {
                return Ok(server);
            }
            if server["status"] == "ERROR" && status != "ERROR" {
                return Err(FabricError::Http(format!(
                    "server {id} went to ERROR instead of {status}: {}",
                    server["fault"]
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FabricError::Timeout(format!(
                    "server {id} to reach {status} (last: {server})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// POSTs a server action (`{"os-stop": null}`, …); an answer other than 202 is an error.
    pub async fn server_action(&self, id: &str, body: &Value) -> Result<(), FabricError> {
        let path = format!("/v2.1/servers/{id}/action");
        let answer = self.http(Method::POST, &path, Some(body)).await?;
        if answer.status != StatusCode::ACCEPTED {
            return Err(FabricError::Http(format!(
                "{body} answered {}: {}",
                answer.status, answer.body
            )));
        }
        Ok(())
    }

    /// Stops every service, API first, so no request is left half done.
    pub async fn stop(mut self) {
        while let Some((_, service)) = self.services.pop() {
            service.stop().await;
        }
    }

    /// Starts (or restarts, after `kill`) a compute host.
    pub async fn start_compute(&mut self, host: &HostSpec) -> Result<(), FabricError> {
        let conductors = self.rpc.conductors.clone();
        self.start_compute_via(host, &conductors).await
    }

    /// Starts a compute host that sends its records to `conductors` instead of the fabric's
    /// (a stand-in for an older conductor, say).
    pub async fn start_compute_via(
        &mut self,
        host: &HostSpec,
        conductors: &[String],
    ) -> Result<(), FabricError> {
        let mut rpc = self.rpc.clone();
        rpc.conductor = conductors.first().cloned().unwrap_or_default();
        rpc.conductors = conductors.to_vec();
        let rpc = self.keys.apply(&host.name, &rpc);
        let handle =
            start_compute(host, &rpc, &self.metrics, self._state.path(), &self.log).await?;
        self.services.push((host.name.clone(), handle));
        Ok(())
    }

    /// Stops one service (a compute host by its name), as if its process had died.
    pub async fn kill(&mut self, name: &str) -> bool {
        match self.services.iter().position(|(n, _)| n == name) {
            Some(index) => {
                self.services.remove(index).1.stop().await;
                true
            }
            None => false,
        }
    }
}

pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The JSON body, or `Value::Null` when it is empty or not JSON.
    pub body: Value,
    pub raw: Bytes,
}

/// A password token for `user` scoped to `project` (both by name, domain Default).
pub async fn issue_token(
    address: &str,
    user: &str,
    password: &str,
    project: &str,
) -> Result<String, FabricError> {
    let body = serde_json::json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"id": "default"}}},
    }});
    let response = http_request(
        address,
        Method::POST,
        "/v3/auth/tokens",
        body.to_string().into_bytes(),
        &[],
    )
    .await?;
    response
        .headers
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| {
            FabricError::Http(format!(
                "no token for {user} ({}): {}",
                response.status, response.body
            ))
        })
}

/// One HTTP/1.1 request on a fresh connection, with extra headers.
pub async fn http_request(
    address: &str,
    method: Method,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, FabricError> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| FabricError::Http(e.to_string()))?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, address);
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| FabricError::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| FabricError::Http(e.to_string()))?;
    read_response(response).await
}

/// A response read whole, its body parsed as JSON where it is JSON.
pub async fn read_response(
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<HttpResponse, FabricError> {
    let status = response.status();
    let headers = response.headers().clone();
    let raw = response
        .into_body()
        .collect()
        .await
        .map_err(|e| FabricError::Http(e.to_string()))?
        .to_bytes();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Ok(HttpResponse {
        status,
        headers,
        body,
        raw,
    })
}
