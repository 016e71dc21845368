//! The scheduler: keeps the host queue (rebuilt from the `compute_nodes` rows at start, every
//! `build_queue_period`, on SIGHUP and on the `build_queue` call), places each
//! `new_run_instance` batch by walking it, commits every placement to the database with a
//! conditional update that fails when the node no longer has room (so several schedulers, or a
//! stale queue, never over-commit a node), and casts the work to `compute.<host>`. When no host
//! fits, the instance goes to ERROR with a "No valid host was found" fault that counts what
//! ruled each host out.

mod commits;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use slog::{debug, info, warn, Logger};
use tokio::sync::watch;

use commits::{outcome, ClaimAnswer, Commits};
use db::{AllocationClaim, ClaimOutcome, Db, DbError, NewFault};
use hostqueue::{
    ComputeNodeRow, Direction, Elimination, HostMatch, HostQueue, NoValidHost, Placed, Placement,
    PlacementRequest, ResourceRequest, UnavailableReason,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use proto::metrics::{
    default_port, outcome_counters, seconds_histogram, GaugeSet, MetricsConfig, MetricsError,
    RpcMetrics,
};
use proto::service::{
    finish_in_flight, for_request, stopped, DatabaseConfig, LogConfig, RpcConfig, ServiceArgs,
    ServiceHandle,
};
use proto::{
    ComputeRunInstance, ExtraResources, FixedIpInfo, Incoming, Limits, Ping, QueueSummary,
    QueuedHost, RebuildQueue, RequestContext, RequestSpec, Rpc, ScheduleRunInstance, SchedulerApi,
};

pub const BINARY: &str = "zova-scheduler";

/// `[scheduler]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Seconds between two rebuilds of the host queue.
    pub build_queue_period: f64,
    /// A compute whose last heartbeat is older than this many seconds is down.
    pub service_down_time: i64,
    /// The queue of hosts whose `extra_resources` name none.
    pub default_queue: String,
    /// Hosts tried for one instance before it goes to ERROR.
    pub max_attempts: u32,
    /// Whether `scheduler_host` skips the check of the host's free resources.
    pub force_hosts_skip_resource_check: bool,
    /// Ratios for hosts whose compute sets none (Nova's defaults).
    pub initial_cpu_allocation_ratio: f64,
    pub initial_ram_allocation_ratio: f64,
    pub initial_disk_allocation_ratio: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            build_queue_period: 10.0,
            service_down_time: 60,
            default_queue: "kvm".into(),
            max_attempts: 3,
            force_hosts_skip_resource_check: false,
            initial_cpu_allocation_ratio: 4.0,
            initial_ram_allocation_ratio: 1.0,
            initial_disk_allocation_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rpc: RpcConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub scheduler: SchedulerConfig,
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "zova-scheduler",
    about = "Zova scheduler: the host queue and placement"
)]
pub struct Args {
    /// The zova.toml to read (environment ZOVA_* and these flags override it).
    #[arg(long, env = "ZOVA_CONFIG")]
    pub config: Option<PathBuf>,
    /// RPC endpoint to bind (default: [rpc] scheduler).
    #[arg(long)]
    pub bind: Option<String>,
    /// Database URL (default: [database] url).
    #[arg(long)]
    pub database: Option<String>,
    /// Seconds between host-queue rebuilds (default: [scheduler] build_queue_period).
    #[arg(long)]
    pub build_queue_period: Option<f64>,
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Args {
    pub fn into_config(self) -> Result<Config, SchedulerError> {
        let mut config: Config = proto::service::load_config(self.config.as_deref())
            .map_err(|e| SchedulerError::Config(e.to_string()))?;
        self.service.apply(&mut config.log, &mut config.metrics);
        if let Some(bind) = self.bind {
            config.rpc.scheduler = bind;
        }
        if let Some(url) = self.database {
            config.database.url = url;
        }
        if let Some(period) = self.build_queue_period {
            config.scheduler.build_queue_period = period;
        }
        proto::service::positive_seconds("build_queue_period", config.scheduler.build_queue_period)
            .map_err(SchedulerError::Config)?;
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Rpc(#[from] proto::ProtoError),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    queue: String,
    host: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

const MB: f64 = 1024.0 * 1024.0;
const GB: f64 = 1024.0 * MB;

/// The `reason` label of an elimination: `Elimination::as_str` in snake case.
fn elimination_label(elimination: Elimination) -> &'static str {
    match elimination {
        Elimination::Disabled => "disabled",
        Elimination::Down => "down",
        Elimination::NotMatching => "not_matching",
        Elimination::NotSameHost => "not_same_host",
        Elimination::DifferentHost => "different_host",
        Elimination::AlreadyTried => "already_tried",
        Elimination::BeyondBoundary => "beyond_boundary",
        Elimination::InsufficientDisk => "insufficient_disk",
        Elimination::InsufficientRam => "insufficient_ram",
        Elimination::InsufficientVcpus => "insufficient_vcpus",
    }
}

/// Every elimination, so each reason's series exists from the start.
const ELIMINATIONS: [Elimination; 10] = [
    Elimination::Disabled,
    Elimination::Down,
    Elimination::NotMatching,
    Elimination::NotSameHost,
    Elimination::DifferentHost,
    Elimination::AlreadyTried,
    Elimination::BeyondBoundary,
    Elimination::InsufficientDisk,
    Elimination::InsufficientRam,
    Elimination::InsufficientVcpus,
];

/// What the scheduler counts beyond the messaging (which `proto` counts).
struct SchedulerMetrics {
    queue_hosts: GaugeSet<QueueLabel>,
    unavailable_hosts: GaugeSet<ReasonLabel>,
    free_vcpus: GaugeSet<HostLabel>,
    free_ram: GaugeSet<HostLabel>,
    free_disk: GaugeSet<HostLabel>,
    rebuild_duration: Histogram,
    rebuild_failures: Counter,
    placed: Counter,
    no_valid_host: Counter,
    /// By `ELIMINATIONS` index, then one for a walk that ruled out no host (an empty queue,
    /// an unknown forced host).
    eliminations: Vec<Counter>,
    claim_conflicts: Counter,
}

impl SchedulerMetrics {
    fn new(registry: &mut Registry) -> Self {
        let rebuild_duration = seconds_histogram();
        registry.register_with_unit(
            "zova_scheduler_queue_rebuild_duration",
            "Time to read the compute nodes and rebuild the host queue",
            Unit::Seconds,
            rebuild_duration.clone(),
        );
        let rebuild_failures = Counter::default();
        registry.register(
            "zova_scheduler_queue_rebuild_failures",
            "Host-queue rebuilds that failed (the previous queue was kept)",
            rebuild_failures.clone(),
        );
        let [placed, no_valid_host] = outcome_counters(
            registry,
            "zova_scheduler_decisions",
            "Instances placed (their database claim committed) or put in ERROR with No valid host",
            ["placed", "no_valid_host"],
        );
        let family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "zova_scheduler_no_valid_host",
            "Host-queue walks that found no valid host, once under each reason that ruled hosts out (other: none was)",
            family.clone(),
        );
        let eliminations = ELIMINATIONS
            .iter()
            .map(|e| elimination_label(*e))
            .chain(["other"])
            .map(|reason| family.get_or_create_owned(&ReasonLabel { reason }))
            .collect();
        let claim_conflicts = Counter::default();
        registry.register(
            "zova_scheduler_claim_conflicts",
            "Database claims lost to another placement (the node had no room left); the walk went on",
            claim_conflicts.clone(),
        );
        SchedulerMetrics {
            queue_hosts: GaugeSet::register(
                registry,
                "zova_scheduler_queue_hosts",
                "Hosts in each host queue at the last rebuild",
                None,
            ),
            unavailable_hosts: GaugeSet::register(
                registry,
                "zova_scheduler_unavailable_hosts",
                "Hosts left out of every queue at the last rebuild, by reason",
                None,
            ),
            free_vcpus: GaugeSet::register(
                registry,
                "zova_scheduler_host_free_vcpus",
                "Free vCPUs of each queued host at the last rebuild, under its allocation ratio",
                None,
            ),
            free_ram: GaugeSet::register(
                registry,
                "zova_scheduler_host_free_ram",
                "Free RAM of each queued host at the last rebuild, under its allocation ratio",
                Some(Unit::Bytes),
            ),
            free_disk: GaugeSet::register(
                registry,
                "zova_scheduler_host_free_disk",
                "Free disk of each queued host at the last rebuild, under its allocation ratio",
                Some(Unit::Bytes),
            ),
            rebuild_duration,
            rebuild_failures,
            placed,
            no_valid_host,
            eliminations,
            claim_conflicts,
        }
    }

    /// Counts a walk that found no host, under each reason that ruled hosts out.
    fn walk_failed(&self, err: &NoValidHost) {
        let mut counted = false;
        for (elimination, hosts) in &err.eliminated {
            if *hosts == 0 {
                continue;
            }
            if let Some(i) = ELIMINATIONS.iter().position(|e| e == elimination) {
                self.eliminations[i].inc();
                counted = true;
            }
        }
        if !counted {
            if let Some(other) = self.eliminations.last() {
                other.inc();
            }
        }
    }

    /// The queue as the last rebuild left it.
    fn observe_queue(&self, queue: &HostQueue) {
        let mut sizes = Vec::new();
        let (mut vcpus, mut ram, mut disk) = (Vec::new(), Vec::new(), Vec::new());
        for name in queue.queue_names() {
            let hosts = queue.get_host_queue(name);
            sizes.push((
                QueueLabel {
                    queue: name.to_string(),
                },
                hosts.len() as f64,
            ));
            for host in hosts {
                let labels = HostLabel {
                    queue: name.to_string(),
                    host: host.hostname.clone(),
                };
                vcpus.push((labels.clone(), host.free_vcpus));
                ram.push((labels.clone(), host.free_memory_mb * MB));
                disk.push((labels, host.free_local_gb * GB));
            }
        }
        self.queue_hosts.replace(sizes);
        self.free_vcpus.replace(vcpus);
        self.free_ram.replace(ram);
        self.free_disk.replace(disk);
        let mut unavailable = [("disabled", 0.0), ("down", 0.0), ("not_answering", 0.0)];
        for why in queue.unavailable().values() {
            let i = match why.reason {
                UnavailableReason::Disabled(_) => 0,
                UnavailableReason::Down => 1,
                UnavailableReason::NotAnswering => 2,
            };
            unavailable[i].1 += 1.0;
        }
        self.unavailable_hosts.replace(
            unavailable
                .into_iter()
                .map(|(reason, n)| (ReasonLabel { reason }, n))
                .collect(),
        );
    }
}

struct Scheduler {
    log: Logger,
    db: Db,
    rpc: Rpc,
    config: SchedulerConfig,
    /// The host queue. A placement selects (and charges) hosts and sends its claims under this
    /// lock, then waits for them without it; a rebuild reads the rows under it, through
    /// `commits`, so the read comes after every claim selected from the old queue.
    queue: tokio::sync::Mutex<HostQueue>,
    /// Rebuilds of `queue` so far: a claim that failed gives its charge back only to the
    /// queue it was charged to, since a newer one was built from rows without it.
    generation: AtomicU64,
    commits: Commits,
    /// Hosts whose compute did not take a cast, and when: they count as down until they send a
    /// heartbeat after that, so later requests do not each wait for the same timeout.
    unreachable: Mutex<HashMap<String, chrono::NaiveDateTime>>,
    /// A periodic or SIGHUP rebuild is under way.
    rebuilding: std::sync::atomic::AtomicBool,
    metrics: SchedulerMetrics,
}

/// Opens the database, builds the host queue, binds `[rpc] scheduler` and serves until stopped.
pub async fn start(config: Config, log: Logger) -> Result<ServiceHandle, SchedulerError> {
    let period =
        proto::service::positive_seconds("build_queue_period", config.scheduler.build_queue_period)
            .map_err(SchedulerError::Config)?;
    let (url, max_connections) = (config.database.url.clone(), config.database.max_connections);
    let db = tokio::task::spawn_blocking(move || Db::open_with(&url, max_connections))
        .await
        .map_err(|e| SchedulerError::Task(e.to_string()))??;
    let mut registry = Registry::default();
    let (rpc, incoming) = Rpc::start_with_metrics(
        log.clone(),
        Some(&config.rpc.scheduler),
        config.rpc.options(),
        RpcMetrics::new(&mut registry),
    )?;
    let metrics = SchedulerMetrics::new(&mut registry);
    let mut incoming = incoming.ok_or(proto::ProtoError::Closed)?;
    let endpoint = rpc.endpoint().unwrap_or_default().to_string();
    let scheduler = Arc::new(Scheduler {
        log: log.clone(),
        commits: Commits::start(db.clone()),
        db,
        rpc,
        queue: tokio::sync::Mutex::new(HostQueue::new(&config.scheduler.default_queue)),
        generation: AtomicU64::new(0),
        unreachable: Mutex::new(HashMap::new()),
        rebuilding: std::sync::atomic::AtomicBool::new(false),
        config: config.scheduler,
        metrics,
    });
    scheduler.build_queue().await?;
    let metrics_server =
        proto::metrics::serve(&config.metrics, default_port::SCHEDULER, registry, &log).await?;
    info!(log, "scheduler listening"; "endpoint" => &endpoint);

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut rebuild = tokio::time::interval(period);
        rebuild.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rebuild.tick().await; // the first tick is immediate; the queue was just built
        let mut hangup = hangup_signal(&scheduler.log);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped(&mut stop_rx) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = rebuild.tick() => scheduler.spawn_rebuild(&mut tasks, "periodic"),
                Some(()) = next_hangup(&mut hangup) => scheduler.spawn_rebuild(&mut tasks, "SIGHUP"),
                request = incoming.recv() => match request {
                    Some(request) => {
                        tasks.spawn(scheduler.clone().dispatch(request));
                    }
                    None => break,
                },
            }
        }
        // Place what was acknowledged before going: a cast that was acked must not vanish.
        scheduler.rpc.stop_serving();
        while let Some(request) = incoming.recv().await {
            tasks.spawn(scheduler.clone().dispatch(request));
        }
        let abandoned = finish_in_flight(&mut tasks).await;
        if abandoned > 0 {
            warn!(scheduler.log, "stopped with requests still running"; "abandoned" => abandoned);
        }
        scheduler.rpc.shutdown();
    });
    Ok(ServiceHandle::new(endpoint, stop_tx, task).with_metrics(metrics_server))
}

type Hangup = Option<tokio::signal::unix::Signal>;

/// SIGHUP asks for an immediate rebuild, as `kill -HUP` reloads other daemons.
fn hangup_signal(log: &Logger) -> Hangup {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            warn!(log, "cannot listen for SIGHUP; rebuilds stay periodic"; "error" => %e);
            None
        }
    }
}

async fn next_hangup(hangup: &mut Hangup) -> Option<()> {
    match hangup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// When a service last reported: its last heartbeat, or its registration.
fn last_seen(service: &db::Service) -> chrono::NaiveDateTime {
    service.updated_at.unwrap_or(service.created_at)
}

/// The host-queue input for one compute node, from its row and its service's row; ratios the
/// compute does not set come from the scheduler's `initial_*_allocation_ratio`.
pub fn compute_node_row(
    node: &db::ComputeNode,
    service: &db::Service,
    now: chrono::NaiveDateTime,
    config: &SchedulerConfig,
) -> ComputeNodeRow {
    let extra: ExtraResources = serde_json::from_str(&node.extra_resources).unwrap_or_default();
    let last_seen = last_seen(service);
    ComputeNodeRow {
        node_id: node.id,
        hypervisor_hostname: node.hypervisor_hostname.clone(),
        host: node.host.clone(),
        rpc_endpoint: service.rpc_endpoint.clone(),
        vcpus: node.vcpus,
        vcpus_used: node.vcpus_used,
        memory_mb: node.memory_mb,
        free_ram_mb: node.free_ram_mb,
        local_gb: node.local_gb,
        free_disk_gb: node.free_disk_gb,
        placed: Placed {
            vcpus: node.placed_vcpus,
            memory_mb: node.placed_memory_mb,
            disk_mb: node.placed_disk_mb,
        },
        reserved_host_memory_mb: extra.reserved_host_memory_mb,
        reserved_host_disk_mb: extra.reserved_host_disk_mb,
        queue_name: extra.queue_name,
        cpu_allocation_ratio: extra
            .cpu_allocation_ratio
            .unwrap_or(config.initial_cpu_allocation_ratio),
        ram_allocation_ratio: extra
            .ram_allocation_ratio
            .unwrap_or(config.initial_ram_allocation_ratio),
        disk_allocation_ratio: extra
            .disk_allocation_ratio
            .unwrap_or(config.initial_disk_allocation_ratio),
        disabled: service.disabled,
        disabled_reason: service.disabled_reason.clone(),
        up: !service.forced_down && (now - last_seen).num_seconds() <= config.service_down_time,
    }
}

/// What every claim for one instance shares, whichever hosts it tries: the request, the
/// instance's spec, and the host a re-placement moves it from.
struct ClaimFor<'a> {
    request: &'a PlacementRequest,
    spec: &'a RequestSpec,
    moving_from: Option<&'a str>,
}

impl ClaimFor<'_> {
    /// The database claim of the instance on `placement`.
    fn on(&self, placement: &Placement) -> AllocationClaim {
        let resources = &self.request.resources;
        AllocationClaim {
            instance_uuid: self.spec.instance_uuid.clone(),
            node_id: placement.node_id,
            usage: db::Placed {
                vcpus: resources.requested_vcpus,
                memory_mb: resources.requested_ram,
                disk_mb: resources.requested_disk,
            },
            limits: claim_limits(&limits_of(placement)),
            moving_from: self.moving_from.map(str::to_owned),
        }
    }
}

/// What the database claim may take on a placement's node: the queue's limits in whole units.
/// An infinite limit (a forced host whose check the operator turned off) is no limit.
fn claim_limits(limits: &Limits) -> db::Placed {
    // `as` saturates and maps NaN to 0: a nonsense limit admits nothing.
    db::Placed {
        vcpus: limits.vcpu.floor() as i64,
        memory_mb: limits.memory_mb.floor() as i64,
        disk_mb: (limits.disk_gb * 1024.0).floor() as i64,
    }
}

fn limits_of(placement: &Placement) -> Limits {
    Limits {
        vcpu: placement.limits.vcpu,
        memory_mb: placement.limits.memory_mb,
        disk_gb: placement.limits.disk_gb,
    }
}

/// What the compute's NIC needs of the address a claim took.
fn fixed_ip_info(ip: db::FixedIp) -> FixedIpInfo {
    FixedIpInfo {
        address: ip.address,
        mac: ip.mac,
        network: ip.network,
        cidr: ip.cidr,
        gateway: ip.gateway,
        bridge: ip.bridge,
    }
}

/// An instance whose claim committed: what its compute is sent.
struct ClaimedBuild {
    spec: RequestSpec,
    placement: Placement,
    fixed_ip: Option<FixedIpInfo>,
}

impl Scheduler {
    /// `build_queue`: reads every compute node and rebuilds the queue (dropping in-memory
    /// charges: every placement is in the rows' placed totals from the moment it is claimed).
    async fn build_queue(&self) -> Result<QueueSummary, SchedulerError> {
        let mut queue = self.queue.lock().await;
        let started = std::time::Instant::now();
        let nodes = self.commits.read_nodes().await.inspect_err(|_| {
            self.metrics.rebuild_failures.inc();
        })?;
        let now = chrono::Utc::now().naive_utc();
        let mut rows = Vec::with_capacity(nodes.len());
        {
            let mut unreachable = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
            for (node, service) in &nodes {
                if let Some(key) = &service.rpc_public_key {
                    // A no-op unless the compute came back with another key.
                    if let Err(e) = self.rpc.set_peer_key(&service.rpc_endpoint, key) {
                        warn!(self.log, "a compute registered an unusable key"; "host" => &service.host, "error" => %e);
                    }
                }
                let mut row = compute_node_row(node, service, now, &self.config);
                match unreachable.get(&row.hypervisor_hostname) {
                    Some(failed_at) if last_seen(service) <= *failed_at => row.up = false,
                    Some(_) => {
                        unreachable.remove(&row.hypervisor_hostname);
                    }
                    None => {}
                }
                rows.push(row);
            }
        }
        queue.build_queue(&rows);
        self.generation.fetch_add(1, Ordering::AcqRel);
        // Builds go only to queued hosts. Connecting to them now takes the handshakes off the
        // first build each one gets: on a fresh fabric of 1,000 hosts, a host's first build took
        // 1.5 to 4.5 times as long to reach ACTIVE (median) as its second.
        // A host in several queues is named more than once; the transport takes each once.
        let queued: Vec<String> = queue
            .queue_names()
            .flat_map(|name| queue.get_host_queue(name))
            .map(|host| host.rpc_endpoint.clone())
            .collect();
        self.rpc.connect_ahead(queued);
        self.metrics
            .rebuild_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.observe_queue(&queue);
        debug!(self.log, "host queue rebuilt"; "hosts" => rows.len(), "unavailable" => queue.unavailable().len());
        Ok(QueueSummary {
            queues: queue
                .queue_names()
                .map(|name| (name.to_string(), queue.get_host_queue(name).len()))
                .collect(),
            unavailable: queue
                .unavailable()
                .iter()
                .map(|(host, why)| (host.clone(), why.reason.to_string()))
                .collect(),
            hosts: queue
                .queue_names()
                .flat_map(|name| {
                    queue.get_host_queue(name).iter().map(|h| QueuedHost {
                        queue: name.to_string(),
                        hostname: h.hostname.clone(),
                        free_vcpus: h.free_vcpus,
                        free_memory_mb: h.free_memory_mb,
                        free_local_gb: h.free_local_gb,
                    })
                })
                .collect(),
        })
    }

    /// Rebuilds in a task of its own, so the main loop keeps taking requests while the rebuild
    /// waits for the queue lock; a rebuild already under way makes this one unnecessary.
    fn spawn_rebuild(self: &Arc<Self>, tasks: &mut tokio::task::JoinSet<()>, why: &'static str) {
        if self
            .rebuilding
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let scheduler = self.clone();
        tasks.spawn(async move {
            scheduler.rebuild_or_warn(why).await;
            scheduler
                .rebuilding
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }

    async fn rebuild_or_warn(&self, why: &str) {
        match self.build_queue().await {
            Ok(summary) if why != "periodic" => {
                info!(self.log, "host queue rebuilt"; "trigger" => why, "hosts" => summary.queues.values().sum::<usize>())
            }
            Ok(_) => {}
            Err(e) => {
                warn!(self.log, "host queue rebuild failed; keeping the previous queue"; "error" => %e)
            }
        }
    }

    async fn dispatch(self: Arc<Self>, request: Incoming) {
        let log = for_request(&self.log, request.context());
        match SchedulerApi::decode(request.method(), &request.envelope.payload) {
            Ok(Some(SchedulerApi::ScheduleRunInstance(args))) => {
                let context = request.context().clone();
                request.reply::<ScheduleRunInstance>(Ok(()));
                self.schedule(log, context, args).await;
            }
            Ok(Some(SchedulerApi::RebuildQueue(_))) => {
                let summary = self.build_queue().await.map_err(|e| proto::RemoteError {
                    kind: "RebuildFailed".into(),
                    message: e.to_string(),
                });
                info!(log, "host queue rebuilt on request");
                request.reply::<RebuildQueue>(summary);
            }
            Ok(Some(SchedulerApi::Ping(_))) => request.reply::<Ping>(Ok(BINARY.to_string())),
            Ok(None) => {
                warn!(log, "unknown method"; "method" => request.method());
                request.reply_no_such_method(BINARY);
            }
            Err(e) => {
                warn!(log, "request with malformed arguments refused"; "method" => request.method(), "error" => %e);
                request.reply_invalid_args(&e);
            }
        }
    }

    /// Places a batch, then sends each placed instance to its compute (concurrently: a
    /// compute that does not answer holds up only its own instances).
    async fn schedule(
        self: Arc<Self>,
        log: Logger,
        context: RequestContext,
        args: ScheduleRunInstance,
    ) {
        let placed = self.place(&log, &context, args, None).await;
        let mut sends = tokio::task::JoinSet::new();
        for build in placed {
            let (scheduler, log, context) = (self.clone(), log.clone(), context.clone());
            sends.spawn(async move { scheduler.send(&log, &context, build).await });
        }
        while sends.join_next().await.is_some() {}
    }

    /// Casts one placed instance to its compute. A compute that does not take it is marked
    /// unavailable and the instance is placed again (its allocation moves with it), up to
    /// `max_attempts` hosts in all.
    async fn send(&self, log: &Logger, context: &RequestContext, build: ClaimedBuild) {
        let ClaimedBuild {
            mut spec,
            mut placement,
            mut fixed_ip,
        } = build;
        loop {
            let args = ComputeRunInstance {
                spec: spec.clone(),
                node: placement.hostname.clone(),
                limits: limits_of(&placement),
                fixed_ip: fixed_ip.take(),
                cast_at_ms: Some(proto::envelope::now_ms()),
            };
            let error = match self.rpc.cast(&placement.rpc_endpoint, context, &args).await {
                Ok(()) => {
                    info!(log, "instance placed"; "instance" => &spec.instance_uuid, "host" => &placement.hostname);
                    return;
                }
                Err(e) => e,
            };
            warn!(log, "compute did not take the instance; trying another host";
                "instance" => &spec.instance_uuid, "host" => &placement.hostname, "error" => %error);
            self.unreachable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(placement.hostname.clone(), chrono::Utc::now().naive_utc());
            self.queue
                .lock()
                .await
                .mark_unavailable(&placement.hostname, UnavailableReason::NotAnswering);
            spec.retry.last_error = Some(format!(
                "{} did not take the instance: {error}",
                placement.hostname
            ));
            let retry = ScheduleRunInstance {
                specs: vec![spec],
                min_count: 1,
            };
            let moving_from = Some(placement.host.as_str());
            match self.place(log, context, retry, moving_from).await.pop() {
                Some(next) => {
                    spec = next.spec;
                    placement = next.placement;
                    fixed_ip = next.fixed_ip;
                }
                None => return, // `place` recorded why
            }
        }
    }

    /// Finds and claims hosts for a batch; instances that get none go to ERROR here (unless
    /// they no longer wait for a placement: see [`Scheduler::no_valid_host`]). Returns
    /// each placed instance's spec (its retry now counting this host), placement and address.
    /// `moving_from`: the host this scheduler placed the batch on before, which did not take it.
    async fn place(
        &self,
        log: &Logger,
        context: &RequestContext,
        args: ScheduleRunInstance,
        moving_from: Option<&str>,
    ) -> Vec<ClaimedBuild> {
        let ScheduleRunInstance { specs, min_count } = args;
        let mut pending = Vec::with_capacity(specs.len());
        for spec in specs {
            if spec.retry.num_attempts >= self.config.max_attempts.max(1) {
                let reason = format!(
                    "Exceeded maximum number of attempts ({}); hosts tried: {}.",
                    self.config.max_attempts,
                    spec.retry.hosts.join(", ")
                );
                self.no_valid_host(log, &spec, &reason, moving_from).await;
            } else {
                pending.push(spec);
            }
        }
        let Some(first) = pending.first() else {
            return Vec::new();
        };
        let request = match self.placement_request(context, first).await {
            Ok(request) => request,
            Err(reason) => {
                for spec in &pending {
                    self.no_valid_host(log, spec, &reason, moving_from).await;
                }
                return Vec::new();
            }
        };
        let min_count = min_count.max(1) as usize;
        if pending.len() < min_count {
            let reason = format!(
                "Only {} of the {min_count} instances required could be scheduled.",
                pending.len()
            );
            for spec in &pending {
                self.no_valid_host(log, spec, &reason, moving_from).await;
            }
            return Vec::new();
        }

        let mut queue = self.queue.lock().await;
        let batch = match queue.select_many(&request, pending.len(), min_count) {
            Ok(batch) => batch,
            Err(err) => {
                drop(queue);
                self.metrics.walk_failed(&err);
                for spec in &pending {
                    self.no_valid_host(log, spec, &err.reason, moving_from)
                        .await;
                }
                return Vec::new();
            }
        };
        let mut shortfall = batch.shortfall.map(|err| {
            self.metrics.walk_failed(&err);
            err.reason
        });
        let generation = self.generation.load(Ordering::Acquire);
        let laps = queue.len() + 1;
        let mut sent = Vec::with_capacity(batch.placements.len());
        let mut specs = pending.into_iter();
        // Not `zip`: it would take one spec too many from `specs` when the placements run out.
        for placement in batch.placements {
            let Some(spec) = specs.next() else {
                queue.release_host(&placement.hostname, &request.resources);
                continue;
            };
            let placement = self.forced_limits(&request, placement);
            let claim_for = ClaimFor {
                request: &request,
                spec: &spec,
                moving_from,
            };
            let answer = self.commits.claim(claim_for.on(&placement));
            sent.push((spec, placement, answer));
        }
        // Other requests select while these commit, and their claims may join the same commit.
        drop(queue);
        let mut claimed: Vec<(RequestSpec, Placement, u64, Option<db::FixedIp>)> =
            Vec::with_capacity(sent.len());
        let mut unplaced: Vec<(RequestSpec, String)> = Vec::new();
        for (spec, placement, answer) in sent {
            let charge = (placement, generation);
            let claim_for = ClaimFor {
                request: &request,
                spec: &spec,
                moving_from,
            };
            match self.claim(log, &claim_for, charge, answer, laps).await {
                Ok(Some((placement, generation, ip))) => {
                    claimed.push((spec, placement, generation, ip))
                }
                Ok(None) => {} // deleted meanwhile: nothing to build, nothing to record
                Err(reason) => unplaced.push((spec, reason)),
            }
        }
        let leftover: Vec<RequestSpec> = specs.collect();
        if claimed.len() < min_count {
            let mut queue = self.queue.lock().await;
            // All or nothing: give back what this batch took.
            let placed = claimed.len();
            let why = unplaced
                .iter()
                .map(|(_, reason)| reason.clone())
                .next()
                .or(shortfall.take())
                .unwrap_or_else(|| "The others were deleted meanwhile.".to_string());
            // With the host each was placed on: one whose claim could not be undone is still
            // there, and only this batch's fault may end it.
            let mut given_back = Vec::with_capacity(claimed.len());
            for (spec, placement, generation, _) in claimed.drain(..) {
                self.release_charge(&mut queue, generation, &placement.hostname, &request);
                let db = self.db.clone();
                let uuid = spec.instance_uuid.clone();
                match tokio::task::spawn_blocking(move || db.claim_undo(&uuid)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        warn!(log, "could not give back a claim"; "instance" => &spec.instance_uuid, "error" => %e)
                    }
                    Err(e) => {
                        warn!(log, "could not give back a claim"; "instance" => &spec.instance_uuid, "error" => %e)
                    }
                }
                given_back.push((spec, placement.host));
            }
            drop(queue);
            let reason = if given_back.len() + unplaced.len() + leftover.len() > 1 {
                format!(
                    "Only {placed} of the {min_count} instances required could be placed. {why}"
                )
            } else {
                why
            };
            for (spec, host) in given_back {
                self.no_valid_host(log, &spec, &reason, Some(&host)).await;
            }
            for spec in unplaced.into_iter().map(|(spec, _)| spec).chain(leftover) {
                self.no_valid_host(log, &spec, &reason, moving_from).await;
            }
            return Vec::new();
        }
        for (spec, reason) in unplaced {
            self.no_valid_host(log, &spec, &reason, moving_from).await;
        }
        let reason = shortfall.unwrap_or_default();
        for spec in leftover {
            self.no_valid_host(log, &spec, &reason, moving_from).await;
        }
        self.metrics.placed.inc_by(claimed.len() as u64);
        claimed
            .into_iter()
            .map(|(mut spec, placement, _, fixed_ip)| {
                spec.retry.num_attempts += 1;
                spec.retry.hosts.push(placement.hostname.clone());
                ClaimedBuild {
                    spec,
                    placement,
                    fixed_ip: fixed_ip.map(fixed_ip_info),
                }
            })
            .collect()
    }

    /// Gives back a placement's charge to the queue, if it is still the queue it was charged
    /// to: a rebuilt one counts only what the database holds.
    fn release_charge(
        &self,
        queue: &mut HostQueue,
        generation: u64,
        hostname: &str,
        request: &PlacementRequest,
    ) {
        if self.generation.load(Ordering::Acquire) == generation {
            queue.release_host(hostname, &request.resources);
        }
    }

    /// As Nova's force_hosts: with `force_hosts_skip_resource_check`, a forced host gets no
    /// limits, for the database claim nor for the compute's.
    fn forced_limits(&self, request: &PlacementRequest, mut placement: Placement) -> Placement {
        if request.scheduler_host.is_some() && request.skip_forced_host_resource_check {
            placement.limits = hostqueue::Limits {
                vcpu: f64::INFINITY,
                memory_mb: f64::INFINITY,
                disk_gb: f64::INFINITY,
            };
        }
        placement
    }

    /// Waits for one placement's claim. A lost race (another scheduler took the room)
    /// updates the queue with what the database says and walks on to the next host; a
    /// refusal is `Err(reason)`; `Ok(None)` means the instance is gone.
    async fn claim(
        &self,
        log: &Logger,
        claim_for: &ClaimFor<'_>,
        (mut placement, mut generation): (Placement, u64),
        mut answer: ClaimAnswer,
        laps: usize,
    ) -> Result<Option<(Placement, u64, Option<db::FixedIp>)>, String> {
        let ClaimFor { request, spec, .. } = *claim_for;
        let forced = request.scheduler_host.is_some();
        // Every lost race makes one host look full, so this ends within a lap of the queue.
        for tries in 1.. {
            let outcome = match outcome(answer).await {
                Ok(ClaimOutcome::Claimed(ip)) => return Ok(Some((placement, generation, ip))),
                other => other,
            };
            let mut queue = self.queue.lock().await;
            match outcome {
                Ok(ClaimOutcome::Claimed(ip)) => return Ok(Some((placement, generation, ip))),
                Ok(ClaimOutcome::InstanceGone) => {
                    self.release_charge(&mut queue, generation, &placement.hostname, request);
                    info!(log, "instance gone before it was placed"; "instance" => &spec.instance_uuid);
                    return Ok(None);
                }
                Ok(ClaimOutcome::NoRoom(placed)) => {
                    self.metrics.claim_conflicts.inc();
                    debug!(log, "lost a race for a host; walking on"; "instance" => &spec.instance_uuid, "host" => &placement.hostname);
                    self.release_charge(&mut queue, generation, &placement.hostname, request);
                    queue.observe_placed(
                        &placement.hostname,
                        Placed {
                            vcpus: placed.vcpus,
                            memory_mb: placed.memory_mb,
                            disk_mb: placed.disk_mb,
                        },
                    );
                    if forced {
                        return Err(format!(
                            "Host {} has no room left for the request (taken since the host \
                             queue was built)",
                            placement.hostname
                        ));
                    }
                }
                Ok(ClaimOutcome::NodeGone) => {
                    self.release_charge(&mut queue, generation, &placement.hostname, request);
                    queue.mark_unavailable(&placement.hostname, UnavailableReason::Down);
                    if forced {
                        return Err(format!("Host {} is gone", placement.hostname));
                    }
                }
                Err(e) => {
                    self.release_charge(&mut queue, generation, &placement.hostname, request);
                    warn!(log, "could not record the placement"; "instance" => &spec.instance_uuid, "error" => &e);
                    return Err(format!("The placement could not be recorded: {e}"));
                }
            }
            if tries > laps {
                break;
            }
            generation = self.generation.load(Ordering::Acquire);
            placement = queue.select(request).map_err(|err| {
                self.metrics.walk_failed(&err);
                err.reason
            })?;
            placement = self.forced_limits(request, placement);
            answer = self.commits.claim(claim_for.on(&placement));
        }
        Err("Every host with room was taken by other schedulers meanwhile".to_string())
    }

    /// The placement request for a spec: its resources, queue and hints, with the instance
    /// hints resolved to host names.
    async fn placement_request(
        &self,
        context: &RequestContext,
        spec: &RequestSpec,
    ) -> Result<PlacementRequest, String> {
        let hints = &spec.hints;
        if hints.scheduler_host.is_some() && !context.is_admin() {
            return Err("Only administrators may force a host with scheduler_host".to_string());
        }
        let scheduler_host_match = match &hints.scheduler_host_match {
            Some(pattern) => Some(HostMatch::new(pattern).map_err(|e| e.to_string())?),
            None => None,
        };
        let different_host = self.instance_hosts(&hints.different_host).await?;
        let same_host = if hints.same_host.is_empty() {
            None
        } else {
            Some(self.instance_hosts(&hints.same_host).await?)
        };
        let flavor = &spec.flavor;
        let queue_name = hints
            .queue_name
            .clone()
            .or_else(|| flavor.extra_specs.get("queue_name").cloned());
        Ok(PlacementRequest {
            resources: ResourceRequest::from_flavor(
                flavor.vcpus,
                flavor.memory_mb,
                flavor.root_gb,
                flavor.ephemeral_gb,
                flavor.swap_mb,
            ),
            queue_name,
            scheduler_host: hints.scheduler_host.clone(),
            scheduler_host_match,
            same_host,
            different_host,
            tried_hosts: spec.retry.hosts.iter().cloned().collect(),
            skip_forced_host_resource_check: self.config.force_hosts_skip_resource_check,
            direction: if hints.sign == Some(-1) {
                Direction::Backward
            } else {
                Direction::Forward
            },
            boundary_host: hints.boundary_host.clone(),
        })
    }

    async fn instance_hosts(&self, uuids: &[String]) -> Result<BTreeSet<String>, String> {
        if uuids.is_empty() {
            return Ok(BTreeSet::new());
        }
        let db = self.db.clone();
        let uuids = uuids.to_vec();
        tokio::task::spawn_blocking(move || db.instance_hosts(&uuids))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Puts the instance into ERROR with a "No valid host was found" fault, while it still
    /// waits for a placement (on no host, or on `moving_from`, the host this request moves it
    /// from): a duplicate of the request, sent to another scheduler, may have placed it, and
    /// that build goes on. For a reschedule the fault also says why the last host did not take
    /// it.
    async fn no_valid_host(
        &self,
        log: &Logger,
        spec: &RequestSpec,
        reason: &str,
        moving_from: Option<&str>,
    ) {
        let uuid = spec.instance_uuid.as_str();
        let mut message = if reason.starts_with("No valid host was found") {
            reason.to_string()
        } else {
            format!("No valid host was found. {reason}")
        };
        if let Some(last) = &spec.retry.last_error {
            if !message.ends_with('.') {
                message.push('.');
            }
            message.push_str(&format!(" Last failure: {last}"));
        }
        let fault = NewFault {
            instance_uuid: uuid.to_string(),
            code: 500,
            message,
            details: String::new(),
            host: None,
        };
        let db = self.db.clone();
        let moving_from = moving_from.map(str::to_string);
        match tokio::task::spawn_blocking(move || {
            let ended = db.instance_set_error_if_unplaced(
                &fault.instance_uuid,
                &fault,
                moving_from.as_deref(),
            );
            (ended, fault.message)
        })
        .await
        {
            Ok((Ok(true), message)) => {
                self.metrics.no_valid_host.inc();
                warn!(log, "no valid host"; "instance" => uuid, "reason" => message);
            }
            // Deleted, or placed by a duplicate of this request meanwhile: that build goes on.
            Ok((Ok(false), message)) => {
                info!(log, "no valid host, but the instance no longer waits for one"; "instance" => uuid, "reason" => message);
            }
            Ok((Err(e), _)) => {
                warn!(log, "could not record the fault"; "instance" => uuid, "error" => %e)
            }
            Err(e) => warn!(log, "could not record the fault"; "instance" => uuid, "error" => %e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(
        updated_seconds_ago: i64,
        extra: &str,
    ) -> (db::ComputeNode, db::Service, chrono::NaiveDateTime) {
        let now = chrono::Utc::now().naive_utc();
        let seen = now - chrono::Duration::seconds(updated_seconds_ago);
        let node = db::ComputeNode {
            id: 1,
            host: "node-1".into(),
            hypervisor_hostname: "node-1".into(),
            hypervisor_type: "test".into(),
            vcpus: 4,
            memory_mb: 4096,
            local_gb: 40,
            vcpus_used: 1,
            memory_mb_used: 512,
            local_gb_used: 1,
            free_ram_mb: 3584,
            free_disk_gb: 39,
            running_vms: 1,
            extra_resources: extra.into(),
            created_at: seen,
            updated_at: Some(seen),
            deleted: 0,
            placed_vcpus: 3,
            placed_memory_mb: 256,
            placed_disk_mb: 2048,
        };
        let service = db::Service {
            id: 1,
            host: "node-1".into(),
            binary: "zova-compute".into(),
            topic: "compute.node-1".into(),
            rpc_endpoint: "tcp://127.0.0.1:5571".into(),
            disabled: false,
            disabled_reason: None,
            report_count: 3,
            created_at: seen,
            updated_at: Some(seen),
            deleted: 0,
            rpc_public_key: None,
            forced_down: false,
        };
        (node, service, now)
    }

    #[test]
    fn a_failed_walk_counts_once_under_each_reason_that_ruled_hosts_out() {
        let mut registry = Registry::default();
        let metrics = SchedulerMetrics::new(&mut registry);
        metrics.walk_failed(&NoValidHost {
            reason: "0/5 hosts".into(),
            eliminated: vec![
                (Elimination::Down, 2),
                (Elimination::InsufficientRam, 3),
                (Elimination::InsufficientDisk, 0),
            ],
        });
        metrics.walk_failed(&NoValidHost {
            reason: "Host node-9 is unknown".into(),
            eliminated: Vec::new(),
        });
        let text = proto::metrics::render(&registry);
        for line in [
            "zova_scheduler_no_valid_host_total{reason=\"down\"} 1",
            "zova_scheduler_no_valid_host_total{reason=\"insufficient_ram\"} 1",
            "zova_scheduler_no_valid_host_total{reason=\"insufficient_disk\"} 0",
            "zova_scheduler_no_valid_host_total{reason=\"other\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // Every elimination has a label of its own.
        let labels: BTreeSet<&str> = ELIMINATIONS.iter().map(|e| elimination_label(*e)).collect();
        assert_eq!(labels.len(), ELIMINATIONS.len());
    }

    #[test]
    fn claim_limits_round_down_and_infinity_is_no_limit() {
        let limits = Limits {
            vcpu: 16.5,
            memory_mb: 4095.9,
            disk_gb: 1.5,
        };
        assert_eq!(
            claim_limits(&limits),
            db::Placed {
                vcpus: 16,
                memory_mb: 4095,
                disk_mb: 1536
            }
        );
        let unlimited = Limits {
            vcpu: f64::INFINITY,
            memory_mb: f64::INFINITY,
            disk_gb: f64::INFINITY,
        };
        assert_eq!(
            claim_limits(&unlimited),
            db::Placed {
                vcpus: i64::MAX,
                memory_mb: i64::MAX,
                disk_mb: i64::MAX
            }
        );
        let nonsense = Limits {
            vcpu: f64::NAN,
            memory_mb: f64::INFINITY,
            disk_gb: -1.0,
        };
        assert_eq!(
            claim_limits(&nonsense),
            db::Placed {
                vcpus: 0,
                memory_mb: i64::MAX,
                disk_mb: -1024
            }
        );
    }

    #[test]
    fn a_row_carries_the_ratios_and_the_endpoint() {
        let extra = r#"{"queue_name":"gpu","cpu_allocation_ratio":16.0,"ram_allocation_ratio":1.5,"disk_allocation_ratio":1.0,"reserved_host_memory_mb":512}"#;
        let (node, service, now) = rows(5, extra);
        let row = compute_node_row(&node, &service, now, &SchedulerConfig::default());
        assert!(row.up);
        assert_eq!(row.queue_name.as_deref(), Some("gpu"));
        assert_eq!(
            (row.cpu_allocation_ratio, row.ram_allocation_ratio),
            (16.0, 1.5)
        );
        assert_eq!(row.rpc_endpoint, "tcp://127.0.0.1:5571");
        assert_eq!(
            (row.vcpus_used, row.free_ram_mb, row.free_disk_gb),
            (1, 3584, 39)
        );
        assert_eq!(
            (row.node_id, row.placed, row.reserved_host_memory_mb),
            (
                1,
                Placed {
                    vcpus: 3,
                    memory_mb: 256,
                    disk_mb: 2048
                },
                512
            )
        );
    }

    #[test]
    fn a_silent_service_is_down_and_bad_extra_resources_fall_back_to_the_defaults() {
        let (node, service, now) = rows(61, "not json");
        let row = compute_node_row(&node, &service, now, &SchedulerConfig::default());
        assert!(!row.up);
        assert_eq!(row.queue_name, None);
        // Nova's initial_*_allocation_ratio defaults.
        assert_eq!(
            (
                row.cpu_allocation_ratio,
                row.ram_allocation_ratio,
                row.disk_allocation_ratio
            ),
            (4.0, 1.0, 1.0)
        );
        // A compute that sets only some ratios gets the defaults for the others.
        let (node, service, now) = rows(0, r#"{"ram_allocation_ratio":1.5}"#);
        let config = SchedulerConfig {
            initial_cpu_allocation_ratio: 8.0,
            ..Default::default()
        };
        let row = compute_node_row(&node, &service, now, &config);
        assert!(row.up);
        assert_eq!(
            (
                row.cpu_allocation_ratio,
                row.ram_allocation_ratio,
                row.disk_allocation_ratio
            ),
            (8.0, 1.5, 1.0)
        );
    }
}
