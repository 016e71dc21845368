//! The compute service, one per hypervisor host: registers itself through the conductor, reports
//! its resources and a heartbeat, and on `new_run_instance` claims the resources, writes the
//! libvirt domain XML, defines and starts the domain and reports ACTIVE. It stops, starts and
//! reboots the domains it holds when the API asks, and every `sync_power_state_interval` brings
//! the database back in line with domains that changed behind its back. It never opens the
//! database: every read or write goes to the conductor.

pub mod disk;
pub mod domain_xml;
pub mod driver;
pub mod power;
pub mod tracker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slog::{info, warn, Logger};
use tokio::sync::watch;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use proto::metrics::{
    default_port, outcome_counters, outcome_histograms, MetricsConfig, MetricsError, RpcMetrics,
};
use proto::service::{
    finish_in_flight, for_request, stopped, LogConfig, RpcConfig, ServiceArgs, ServiceHandle,
};
use proto::{
    power_state, task_state, vm_state, AllocateFixedIp, ComputeApi, ComputeNodeUpdate,
    ComputeRunInstance, ExtraResources, Fault, FixedIpInfo, Incoming, InstanceActionFinish,
    InstanceDestroy, InstanceHosts, InstanceResources, InstanceState, InstanceUpdate,
    InstancesOnHost, Method, Peers, Ping, RebootInstance, RequestContext, RequestSpec,
    RescheduleInstance, Rpc, ServiceHeartbeat, ServiceRegister, StartInstance, StartSpawning,
    StopInstance, TerminateInstance, FIXED_IP_EXHAUSTED,
};

use domain_xml::{
    domain_xml, instance_name, instance_uuid_of, DiskCache, DomainSpec, InstanceMetadata,
};
use driver::{DriverError, LibvirtDriver, VirtType};
use power::{DomainSeen, PowerAction, StopStep, SyncAction};
use tracker::{ResourceTracker, Usage};

pub const BINARY: &str = "zova-compute";

/// `[compute]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ComputeConfig {
    /// This host's name: the service row, the compute-node row and `compute.<host>`.
    pub host: String,
    /// RPC endpoint to bind.
    pub bind: String,
    /// The endpoint other services connect to, recorded in the `services` table; default: the
    /// bound endpoint. Required when `bind` listens on every address (`tcp://0.0.0.0:…`, `*`).
    pub advertise: Option<String>,
    /// `test:///default` (libvirt's in-process test hypervisor) or `qemu:///system`.
    pub libvirt_uri: String,
    /// `auto` (kvm when a KVM guest starts here, else qemu), `kvm` or `qemu`: the domain type
    /// of QEMU domains (Nova's `[libvirt] virt_type`).
    pub virt_type: VirtType,
    /// Where instance disks live (one directory per instance, and `_base` for cached images).
    pub instances_path: PathBuf,
    /// Capacity overrides; unset values come from libvirt's node info (vCPUs, RAM) and the
    /// file system of `instances_path` (disk).
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub local_gb: Option<i64>,
    /// Overcommit of this host; unset, the scheduler's `initial_*_allocation_ratio` applies
    /// (as in Nova: cpu 4.0, ram 1.0, disk 1.0).
    pub cpu_allocation_ratio: Option<f64>,
    pub ram_allocation_ratio: Option<f64>,
    pub disk_allocation_ratio: Option<f64>,
    /// Memory and disk kept back for the host itself (Nova's defaults: 512 MB, 0 MB).
    pub reserved_host_memory_mb: i64,
    pub reserved_host_disk_mb: i64,
    /// The host queue this host belongs to.
    pub queue_name: String,
    /// Seconds between heartbeats (and resource reports, unless `update_resources_interval`
    /// says otherwise).
    pub report_interval: f64,
    /// Seconds between resource reports (Nova's `update_resources_interval`); 0 reports with
    /// every heartbeat. A delete or failed build reports at once in any case and a build's
    /// claim within a second (`CLAIM_REPORT_DELAY`), so a longer period only spares the
    /// conductor on a quiet host.
    pub update_resources_interval: f64,
    /// Seconds a domain may take to reach RUNNING before the build (or a start or reboot)
    /// fails.
    pub boot_timeout: f64,
    /// Seconds a stop waits for the guest to shut down cleanly before it powers the domain off
    /// (Nova's `shutdown_timeout`); 0 powers off at once.
    pub shutdown_timeout: f64,
    /// Seconds between power-state syncs, which correct the database when a domain was shut
    /// off, started or removed behind Zova's back (Nova's `sync_power_state_interval`); 0
    /// disables them.
    pub sync_power_state_interval: f64,
    /// What `init_host` does with a domain named like an instance that has no live instance
    /// row (Nova's option of the same name): `noop`, `log` (the default), `shutdown` or
    /// `reap` (destroy it and remove its files).
    pub running_deleted_instance_action: RunningDeletedAction,
}

/// `[compute] running_deleted_instance_action`. The default is `log`, not Nova's `reap`: a
/// domain is only destroyed when the operator asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RunningDeletedAction {
    Noop,
    #[default]
    Log,
    Shutdown,
    Reap,
}

impl RunningDeletedAction {
    fn as_str(self) -> &'static str {
        match self {
            RunningDeletedAction::Noop => "noop",
            RunningDeletedAction::Log => "log",
            RunningDeletedAction::Shutdown => "shutdown",
            RunningDeletedAction::Reap => "reap",
        }
    }
}

impl Default for ComputeConfig {
    fn default() -> Self {
        ComputeConfig {
            host: "node-1".into(),
            bind: "tcp://127.0.0.1:5570".into(),
            advertise: None,
            libvirt_uri: "test:///default".into(),
            virt_type: VirtType::Auto,
            instances_path: PathBuf::from("zova-state/instances"),
            vcpus: None,
            memory_mb: None,
            local_gb: None,
            cpu_allocation_ratio: None,
            ram_allocation_ratio: None,
            disk_allocation_ratio: None,
            reserved_host_memory_mb: 512,
            reserved_host_disk_mb: 0,
            queue_name: "kvm".into(),
            report_interval: 10.0,
            update_resources_interval: 0.0,
            boot_timeout: 300.0,
            shutdown_timeout: 60.0,
            sync_power_state_interval: 600.0,
            running_deleted_instance_action: RunningDeletedAction::Log,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub rpc: RpcConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub compute: ComputeConfig,
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "zova-compute",
    about = "Zova compute: runs the libvirt domains of one host"
)]
pub struct Args {
    /// The zova.toml to read (environment ZOVA_* and these flags override it).
    #[arg(long, env = "ZOVA_CONFIG")]
    pub config: Option<PathBuf>,
    /// This host's name (default: [compute] host).
    #[arg(long)]
    pub host: Option<String>,
    /// RPC endpoint to bind (default: [compute] bind).
    #[arg(long)]
    pub bind: Option<String>,
    /// Endpoint other services use to reach this one (default: [compute] advertise, or the bound endpoint).
    #[arg(long)]
    pub advertise: Option<String>,
    /// libvirt URI (default: [compute] libvirt_uri).
    #[arg(long)]
    pub libvirt_uri: Option<String>,
    /// Directory for instance disks (default: [compute] instances_path).
    #[arg(long)]
    pub instances_path: Option<PathBuf>,
    /// Pretend to have this many vCPUs.
    #[arg(long)]
    pub vcpus: Option<i64>,
    /// Pretend to have this much RAM, in MB.
    #[arg(long)]
    pub memory_mb: Option<i64>,
    /// Pretend to have this much disk, in GB.
    #[arg(long)]
    pub local_gb: Option<i64>,
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Args {
    pub fn into_config(self) -> Result<Config, ComputeError> {
        let mut config: Config = proto::service::load_config(self.config.as_deref())
            .map_err(|e| ComputeError::Config(e.to_string()))?;
        self.service.apply(&mut config.log, &mut config.metrics);
        let c = &mut config.compute;
        c.host = self.host.unwrap_or(c.host.clone());
        c.bind = self.bind.unwrap_or(c.bind.clone());
        c.advertise = self.advertise.or(c.advertise.clone());
        c.libvirt_uri = self.libvirt_uri.unwrap_or(c.libvirt_uri.clone());
        c.instances_path = self.instances_path.unwrap_or(c.instances_path.clone());
        c.vcpus = self.vcpus.or(c.vcpus);
        c.memory_mb = self.memory_mb.or(c.memory_mb);
        c.local_gb = self.local_gb.or(c.local_gb);
        if c.host.is_empty() || c.host.contains(char::is_whitespace) {
            return Err(ComputeError::Config(format!(
                "host name {:?} must be non-empty without spaces",
                c.host
            )));
        }
        for (name, value) in [
            ("report_interval", c.report_interval),
            ("boot_timeout", c.boot_timeout),
        ] {
            proto::service::positive_seconds(name, value).map_err(ComputeError::Config)?;
        }
        shutdown_timeout(c.shutdown_timeout)?;
        sync_power_state_interval(c.sync_power_state_interval)?;
        update_resources_interval(c.update_resources_interval)?;
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Driver(#[from] driver::DriverError),
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error(transparent)]
    Xml(#[from] domain_xml::XmlError),
    #[error(transparent)]
    Rpc(#[from] proto::ProtoError),
    #[error(transparent)]
    Claim(#[from] tracker::ClaimError),
    #[error("domain {name} did not reach RUNNING within {seconds} s (power state {state})")]
    BootTimeout {
        name: String,
        seconds: f64,
        state: i32,
    },
    #[error("internal task failed: {0}")]
    Task(String),
    #[error("the build for node {node} reached {host}: refusing it")]
    WrongHost { node: String, host: String },
    /// The fixed-IP pool has no free address; the text names the network.
    #[error("{0}")]
    NoFixedIp(String),
    #[error("the instance was deleted while it was being built: {0}")]
    Vanished(String),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

/// How a build ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy)]
enum BuildOutcome {
    Active = 0,
    Error = 1,
    /// This host's claim refused it; it went back to a scheduler.
    Rescheduled = 2,
    /// Deleted (or placed elsewhere, or put in ERROR) while it was being built.
    Deleted = 3,
}

const BUILD_OUTCOMES: [&str; 4] = ["active", "error", "rescheduled", "deleted"];

const MB: i64 = 1024 * 1024;

/// What the compute counts beyond the messaging (which `proto` counts). The gauges carry the
/// host's name, so the computes of one fabric can be told apart after aggregation.
struct ComputeMetrics {
    builds: [Counter; 4],
    build_duration: [Histogram; 4],
    free_vcpus: Gauge,
    free_ram_bytes: Gauge,
    free_disk_bytes: Gauge,
    instances: Gauge,
}

impl ComputeMetrics {
    fn new(registry: &mut Registry, host: &str) -> Self {
        let builds = outcome_counters(
            registry,
            "zova_compute_builds",
            "Builds (new_run_instance) by how they ended",
            BUILD_OUTCOMES,
        );
        let build_duration = outcome_histograms(
            registry,
            "zova_compute_build_duration",
            "Time from taking a build to its end (ACTIVE recorded, refused, failed), by outcome",
            BUILD_OUTCOMES,
        );
        let host = HostLabel {
            host: host.to_string(),
        };
        let mut gauge = |name: &str, help: &str, unit: Option<Unit>| {
            let family = Family::<HostLabel, Gauge>::default();
            match unit {
                Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
                None => registry.register(name, help, family.clone()),
            }
            family.get_or_create_owned(&host)
        };
        ComputeMetrics {
            free_vcpus: gauge(
                "zova_compute_free_vcpus",
                "vCPUs of this host not held by its instances (before allocation ratios; negative when overcommitted)",
                None,
            ),
            free_ram_bytes: gauge(
                "zova_compute_free_ram",
                "RAM of this host not held by its instances nor reserved for the host (before allocation ratios)",
                Some(Unit::Bytes),
            ),
            free_disk_bytes: gauge(
                "zova_compute_free_disk",
                "Disk of this host not held by its instances nor reserved for the host (before allocation ratios)",
                Some(Unit::Bytes),
            ),
            instances: gauge(
                "zova_compute_instances",
                "Instances holding resources on this host",
                None,
            ),
            builds,
            build_duration,
        }
    }

    fn build_ended(&self, outcome: BuildOutcome, took: Duration) {
        self.builds[outcome as usize].inc();
        self.build_duration[outcome as usize].observe(took.as_secs_f64());
    }
}

/// Total capacity of this host, before allocation ratios.
#[derive(Debug, Clone, Copy)]
struct Capacity {
    vcpus: i64,
    memory_mb: i64,
    local_gb: i64,
}

struct Compute {
    log: Logger,
    config: ComputeConfig,
    /// The conductors, tried in turn (every call to them is safe to repeat).
    conductors: Peers,
    /// This service's CURVE public key, registered with its endpoint (plain mode: none).
    public_key: Option<String>,
    rpc: Rpc,
    driver: Arc<LibvirtDriver>,
    capacity: Capacity,
    /// `none` where `instances_path` takes O_DIRECT, else `writethrough`.
    disk_cache: DiskCache,
    boot_timeout: Duration,
    shutdown_timeout: Duration,
    /// How old a build's cast may be for the build to go ahead on the scheduler's placement
    /// without checking in (see `cast_is_fresh`).
    fresh_cast_within: Duration,
    tracker: Mutex<ResourceTracker>,
    /// One resource report at a time, each snapshotting the ledger only once the one before has
    /// landed, so an older snapshot can never overwrite a newer one in the database.
    report_lock: tokio::sync::Mutex<()>,
    /// A resource report is wanted (a claim, a delete, the timer), the service's loop is asked
    /// to send it (for a claim, only after `CLAIM_REPORT_DELAY`), and who is sending them: see
    /// `report_resources` and `report_claim`.
    report_wanted: AtomicBool,
    report_asked: tokio::sync::Notify,
    report_sender: tokio::sync::Mutex<()>,
    /// A claim's report is waiting out `CLAIM_REPORT_DELAY`; the loop is asked to time it.
    claim_report_pending: AtomicBool,
    claim_report_asked: tokio::sync::Notify,
    /// One power-state sync at a time: a slow one is not joined by the next.
    sync_lock: tokio::sync::Mutex<()>,
    instance_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: ComputeMetrics,
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ComputeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ComputeError::Task(e.to_string()))
}

/// Opens libvirt, binds the RPC endpoint, registers through the conductor (retrying until it
/// answers) and serves until stopped.
pub async fn start(mut config: Config, log: Logger) -> Result<ServiceHandle, ComputeError> {
    let seconds =
        |name, value| proto::service::positive_seconds(name, value).map_err(ComputeError::Config);
    let report_interval = seconds("report_interval", config.compute.report_interval)?;
    let boot_timeout = seconds("boot_timeout", config.compute.boot_timeout)?;
    // A scheduler gives a cast up after the whole timeout; the other half allows for clocks.
    let fresh_cast_within = Duration::from_millis(config.rpc.cast_timeout_ms) / 2;
    let shutdown_timeout = shutdown_timeout(config.compute.shutdown_timeout)?;
    let sync_interval = sync_power_state_interval(config.compute.sync_power_state_interval)?;
    let resources_interval = update_resources_interval(config.compute.update_resources_interval)?;
    let uri = config.compute.libvirt_uri.clone();
    let virt_type = config.compute.virt_type;
    let driver = Arc::new(blocking(move || LibvirtDriver::open_with(&uri, virt_type)).await??);
    info!(log, "libvirt connected"; "uri" => driver.uri(), "domain_type" => driver.domain_type(),
        "no_kvm_because" => driver.no_kvm_because(), "host" => &config.compute.host);
    let node = {
        let driver = driver.clone();
        blocking(move || driver.node_info()).await??
    };
    std::fs::create_dir_all(&config.compute.instances_path).map_err(|e| {
        ComputeError::Config(format!(
            "cannot create {}: {e}",
            config.compute.instances_path.display()
        ))
    })?;
    // Disk and console paths go into the domain XML, which libvirtd and QEMU read from their own
    // working directory: a relative path there would point elsewhere.
    config.compute.instances_path =
        std::path::absolute(&config.compute.instances_path).map_err(|e| {
            ComputeError::Config(format!(
                "cannot make {} absolute: {e}",
                config.compute.instances_path.display()
            ))
        })?;
    let capacity = Capacity {
        vcpus: config.compute.vcpus.unwrap_or(node.vcpus),
        memory_mb: config.compute.memory_mb.unwrap_or(node.memory_mb),
        local_gb: config
            .compute
            .local_gb
            .unwrap_or_else(|| disk_gb_of(&config.compute.instances_path)),
    };
    let mut registry = Registry::default();
    let (rpc, incoming) = Rpc::start_with_metrics(
        log.clone(),
        Some(&config.compute.bind),
        config.rpc.options(),
        RpcMetrics::new(&mut registry),
    )?;
    let metrics = ComputeMetrics::new(&mut registry, &config.compute.host);
    let mut incoming = incoming.ok_or(proto::ProtoError::Closed)?;
    let bound = rpc.endpoint().unwrap_or_default().to_string();
    let endpoint = advertised_endpoint(&bound, config.compute.advertise.as_deref())
        .map_err(ComputeError::Config)?;
    let log = log.new(slog::o!("host" => config.compute.host.clone()));
    let metrics_server =
        proto::metrics::serve(&config.metrics, default_port::COMPUTE, registry, &log).await?;
    let disk_cache = if disk::supports_direct_io(&config.compute.instances_path) {
        DiskCache::None
    } else {
        warn!(log, "the instances path does not take O_DIRECT; disks use cache=writethrough";
            "instances_path" => %config.compute.instances_path.display());
        DiskCache::Writethrough
    };
    let compute = Arc::new(Compute {
        log: log.clone(),
        conductors: Peers::new(config.rpc.conductor_endpoints()),
        public_key: config.rpc.curve.as_ref().map(|c| c.public_key.clone()),
        config: config.compute,
        rpc,
        driver,
        capacity,
        disk_cache,
        boot_timeout,
        shutdown_timeout,
        fresh_cast_within,
        tracker: Mutex::new(ResourceTracker::default()),
        report_lock: tokio::sync::Mutex::new(()),
        report_wanted: AtomicBool::new(false),
        report_asked: tokio::sync::Notify::new(),
        report_sender: tokio::sync::Mutex::new(()),
        claim_report_pending: AtomicBool::new(false),
        claim_report_asked: tokio::sync::Notify::new(),
        sync_lock: tokio::sync::Mutex::new(()),
        instance_locks: Mutex::new(HashMap::new()),
        metrics,
    });

    let handle_endpoint = endpoint.clone();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        // Register before taking work: the scheduler only knows hosts that have a service row.
        let registered = tokio::select! {
            _ = stopped(&mut stop_rx) => false,
            _ = compute.register(&endpoint) => true,
        };
        if registered {
            info!(compute.log, "compute registered"; "endpoint" => &endpoint,
                "vcpus" => capacity.vcpus, "memory_mb" => capacity.memory_mb, "local_gb" => capacity.local_gb);
            let mut report = tokio::time::interval(report_interval);
            report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Registration reported the resources; the next report comes one period later.
            let mut resources = resources_interval.map(|period| {
                let mut resources =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                resources.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                resources
            });
            let report_with_heartbeat = resources.is_none();
            // Periodic only: the first sync comes one interval after registration.
            let mut sync = sync_interval.map(|period| {
                let mut sync =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                sync
            });
            loop {
                tokio::select! {
                    _ = stopped(&mut stop_rx) => break,
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    _ = report.tick() => {
                        let compute = compute.clone();
                        tasks.spawn(async move { compute.periodic_report(report_with_heartbeat).await });
                    }
                    _ = next_tick(&mut resources) => compute.report_resources(),
                    _ = compute.report_asked.notified() => {
                        let compute = compute.clone();
                        tasks.spawn(async move { compute.send_wanted_reports().await });
                    }
                    _ = compute.claim_report_asked.notified() => {
                        let (compute, stop) = (compute.clone(), stop_rx.clone());
                        tasks.spawn(async move { compute.report_claims_later(stop).await });
                    }
                    _ = next_tick(&mut sync) => {
                        let compute = compute.clone();
                        tasks.spawn(async move { compute.sync_power_states().await });
                    }
                    request = incoming.recv() => match request {
                        Some(request) => {
                            let compute = compute.clone();
                            tasks.spawn(async move { compute.dispatch(request).await });
                        }
                        None => break,
                    },
                }
            }
        }
        // Finish what was acknowledged before going; a build cut short here is turned into ERROR
        // by `init_host` when the compute comes back.
        compute.rpc.stop_serving();
        while let Some(request) = incoming.recv().await {
            let compute = compute.clone();
            tasks.spawn(async move { compute.dispatch(request).await });
        }
        let abandoned = finish_in_flight(&mut tasks).await;
        if abandoned > 0 {
            warn!(compute.log, "stopped with requests still running"; "abandoned" => abandoned);
        }
        // What the last builds and deletes changed, now that the loop no longer sends it.
        compute.send_wanted_reports().await;
        compute.rpc.shutdown();
    });
    Ok(ServiceHandle::new(handle_endpoint, stop_tx, task).with_metrics(metrics_server))
}

/// `[compute] shutdown_timeout` as a duration: zero (power off at once) or more seconds.
fn shutdown_timeout(seconds: f64) -> Result<Duration, ComputeError> {
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        ComputeError::Config(format!(
            "shutdown_timeout must be zero or a positive number of seconds, not {seconds}"
        ))
    })
}

/// `[compute] sync_power_state_interval` as a period; zero disables the sync (`None`).
fn sync_power_state_interval(seconds: f64) -> Result<Option<Duration>, ComputeError> {
    if seconds == 0.0 {
        return Ok(None);
    }
    proto::service::positive_seconds("sync_power_state_interval", seconds)
        .map(Some)
        .map_err(|e| ComputeError::Config(format!("{e} (0 disables it)")))
}

/// `[compute] update_resources_interval`: None (report with each heartbeat) for 0.
fn update_resources_interval(seconds: f64) -> Result<Option<Duration>, ComputeError> {
    if seconds == 0.0 {
        return Ok(None);
    }
    proto::service::positive_seconds("update_resources_interval", seconds)
        .map(Some)
        .map_err(ComputeError::Config)
}

/// The next tick of an optional interval; never, without one.
async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The endpoint to register: `advertise` if set, else the bound one, which must then name one
/// address (a wildcard would send other hosts to themselves).
pub fn advertised_endpoint(bound: &str, advertise: Option<&str>) -> Result<String, String> {
    if let Some(advertise) = advertise {
        return Ok(advertise.to_string());
    }
    let wildcard = ["://0.0.0.0:", "://*:", "://[::]:", "://::"]
        .iter()
        .any(|w| bound.contains(w));
    if wildcard {
        return Err(format!(
            "the RPC endpoint {bound} listens on every address; set [compute] advertise to the one other hosts should use"
        ));
    }
    Ok(bound.to_string())
}

/// Size of the file system holding `path`, in GB (0 if it cannot be read).
fn disk_gb_of(path: &Path) -> i64 {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a properly sized out-parameter.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return 0;
    }
    (stat.f_blocks as u128 * stat.f_frsize as u128 / (1024 * 1024 * 1024)) as i64
}

/// Retries of a state record before the compute gives up on the conductor.
const RECORD_ATTEMPTS: u32 = 5;

/// How long the report of a claim waits for the claims after it (see `report_claim`).
const CLAIM_REPORT_DELAY: Duration = Duration::from_secs(1);

impl Compute {
    fn context(&self) -> RequestContext {
        RequestContext::internal("")
    }

    /// The lock that keeps a build and a delete of the same instance from running at once.
    fn instance_lock(&self, uuid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .instance_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        locks.entry(uuid.to_string()).or_default().clone()
    }

    fn forget_instance_lock(&self, uuid: &str) {
        self.instance_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uuid);
    }

    async fn register(&self, endpoint: &str) {
        let args = ServiceRegister {
            host: self.config.host.clone(),
            binary: BINARY.into(),
            rpc_endpoint: endpoint.to_string(),
            rpc_public_key: self.public_key.clone(),
        };
        let mut delay = Duration::from_millis(200);
        loop {
            let context = self.context();
            let result = async {
                self.conductors.call(&self.rpc, &context, &args).await?;
                let host = self.config.host.clone();
                let instances = self
                    .conductors
                    .call(&self.rpc, &context, &InstancesOnHost { host })
                    .await?;
                self.init_host(&context, instances).await;
                self.update_available_resource(&context).await
            }
            .await;
            match result {
                Ok(()) => return,
                Err(e) => {
                    warn!(self.log, "cannot register with the conductor yet; retrying"; "error" => %e, "retry_in_ms" => delay.as_millis() as u64);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Nova's `init_host`: instances this host was building when its previous process stopped
    /// can never finish, so they go to ERROR (and their leftovers are removed); instances in
    /// ERROR hold nothing; the rest are counted against this host, and those whose stop, start
    /// or reboot was cut short take the state their domain is in.
    async fn init_host(&self, context: &RequestContext, instances: Vec<InstanceResources>) {
        let own: HashSet<String> = instances.iter().map(|i| i.uuid.clone()).collect();
        let (building, rest): (Vec<_>, Vec<_>) = instances
            .into_iter()
            .partition(|i| i.vm_state == vm_state::BUILDING);
        let mut holding: Vec<_> = rest
            .into_iter()
            .filter(|i| i.vm_state != vm_state::ERROR)
            .collect();
        let mut interrupted = Vec::new();
        for instance in building {
            if self.resume_spawned(context, &instance).await {
                holding.push(instance);
            } else {
                interrupted.push(instance);
            }
        }
        *self.tracker.lock().unwrap_or_else(|p| p.into_inner()) =
            ResourceTracker::from_instances(&holding);
        for instance in interrupted {
            warn!(self.log, "build interrupted by a restart"; "instance" => &instance.uuid);
            self.remove_leftovers(&self.log, &instance.uuid).await;
            let message = format!(
                "The build was interrupted by a restart of {BINARY} on {}",
                self.config.host
            );
            if let Err(e) = self
                .record(context, &self.error_update(&instance.uuid, message))
                .await
            {
                warn!(self.log, "could not record the interrupted build"; "instance" => &instance.uuid, "error" => %e);
            }
        }
        for instance in &holding {
            if power::is_power_task(instance.task_state.as_deref()) {
                self.settle_interrupted(context, instance).await;
            }
        }
        self.handle_unknown_domains(context, &own).await;
    }

    /// A build the restart cut short after its domain was started: only ACTIVE was not
    /// recorded, so the instance is recorded ACTIVE instead of being thrown away.
    async fn resume_spawned(&self, context: &RequestContext, instance: &InstanceResources) -> bool {
        if instance.task_state.as_deref() != Some(task_state::SPAWNING) {
            return false;
        }
        let name = instance_name(&instance.uuid);
        if self.observed_power_state(&name).await != Some(power_state::RUNNING) {
            return false;
        }
        // Started but cut short before its definition (see `define_and_start`): a transient
        // domain would vanish at its first stop, so the build ends as an interrupted one.
        if !matches!(
            self.on_domain(&name, LibvirtDriver::is_persistent).await,
            Ok(true)
        ) {
            return false;
        }
        let active = spawned(&instance.uuid, &self.config.host);
        match self.record(context, &active).await {
            Ok(()) => {
                warn!(self.log, "build interrupted by a restart after its domain started; resumed as ACTIVE"; "instance" => &instance.uuid);
                true
            }
            Err(e) => {
                warn!(self.log, "could not resume the interrupted build"; "instance" => &instance.uuid, "error" => %e);
                false
            }
        }
    }

    /// Domains named like an instance that the database does not place on this host. Those of
    /// instances placed elsewhere are left alone (another host's, on a shared hypervisor); those
    /// with no live instance at all are orphans (a delete that happened while this service was
    /// down), handled as `[compute] running_deleted_instance_action` says.
    async fn handle_unknown_domains(&self, context: &RequestContext, own: &HashSet<String>) {
        let driver = self.driver.clone();
        let listed = blocking(move || driver.domain_names().map_err(ComputeError::from)).await;
        let names = match listed.and_then(|names| names) {
            Ok(names) => names,
            Err(e) => {
                warn!(self.log, "cannot list domains to find orphans"; "error" => %e);
                return;
            }
        };
        let unknown: Vec<String> = names
            .iter()
            .filter_map(|name| instance_uuid_of(name))
            .filter(|uuid| !own.contains(uuid))
            .collect();
        if unknown.is_empty() {
            return;
        }
        let placed = match self
            .conductors
            .call(
                &self.rpc,
                context,
                &InstanceHosts {
                    uuids: unknown.clone(),
                },
            )
            .await
        {
            Ok(placed) => placed,
            Err(e) => {
                warn!(self.log, "cannot ask where unknown domains belong"; "domains" => unknown.len(), "error" => %e);
                return;
            }
        };
        let action = self.config.running_deleted_instance_action;
        for uuid in unknown {
            if placed.iter().any(|p| p.uuid == uuid) {
                continue;
            }
            let name = instance_name(&uuid);
            let outcome = match action {
                RunningDeletedAction::Noop => continue,
                RunningDeletedAction::Log => Ok(()),
                RunningDeletedAction::Shutdown => {
                    let driver = self.driver.clone();
                    let target = name.clone();
                    blocking(move || driver.power_off(&target).map_err(ComputeError::from))
                        .await
                        .and_then(|result| result)
                }
                RunningDeletedAction::Reap => {
                    let result = self.destroy_domain(&uuid).await;
                    if result.is_ok() {
                        self.release_files_and_claim(&self.log, &uuid);
                    }
                    result
                }
            };
            match outcome {
                Ok(()) => warn!(self.log, "domain without an instance"; "domain" => &name,
                    "action" => action.as_str()),
                Err(e) => {
                    warn!(self.log, "domain without an instance; the action failed"; "domain" => &name,
                    "action" => action.as_str(), "error" => %e)
                }
            }
        }
    }

    /// Ends a stop, start or reboot that the previous process of this service left half done:
    /// the instance takes the state its domain is in, and its task_state is cleared so the user
    /// can ask again. Its instance action stays unfinished: the request is not known here.
    async fn settle_interrupted(&self, context: &RequestContext, instance: &InstanceResources) {
        let uuid = instance.uuid.clone();
        let task = instance.task_state.clone();
        let name = instance_name(&uuid);
        let update = match self.on_domain(&name, LibvirtDriver::power_state).await {
            Ok(state) => InstanceUpdate {
                uuid: uuid.clone(),
                state: Some(power::settled(state)),
                expected_task_state: task.clone(),
                ..Default::default()
            },
            Err(e) => {
                let message = format!(
                    "The {} was interrupted by a restart of {BINARY} on {}: {e}",
                    task.as_deref().unwrap_or_default(),
                    self.config.host
                );
                InstanceUpdate {
                    uuid: uuid.clone(),
                    revert_task_state: true,
                    power_state: self.observed_power_state(&name).await,
                    fault: Some(Fault {
                        code: fault_for(&e).code,
                        message,
                        details: String::new(),
                    }),
                    expected_task_state: task.clone(),
                    ..Default::default()
                }
            }
        };
        warn!(self.log, "power action interrupted by a restart; settling"; "instance" => &uuid,
            "task_state" => task.as_deref(), "vm_state" => update.state.as_ref().map(|s| s.vm_state.clone()));
        match self.record(context, &update).await.map_err(vanished_or_rpc) {
            Ok(()) => {}
            Err(ComputeError::Vanished(why)) => {
                info!(self.log, "interrupted power action already taken over"; "instance" => &uuid, "why" => why)
            }
            Err(e) => {
                warn!(self.log, "could not settle the interrupted power action"; "instance" => &uuid, "error" => %e)
            }
        }
    }

    /// Nova's `_sync_power_states`: for each instance the database places on this host with no
    /// task under way, compares the recorded state with its domain and corrects what a domain
    /// changed behind Zova's back ([`power::sync_power_state`] decides). Every correction
    /// expects the vm_state it read and no task, so a user action or delete started meanwhile
    /// wins.
    async fn sync_power_states(&self) {
        let Ok(_one_at_a_time) = self.sync_lock.try_lock() else {
            info!(
                self.log,
                "the previous power-state sync is still running; skipping this one"
            );
            return;
        };
        let context = self.context();
        let host = self.config.host.clone();
        let instances = match self
            .conductors
            .call(&self.rpc, &context, &InstancesOnHost { host })
            .await
        {
            Ok(instances) => instances,
            Err(e) => {
                warn!(self.log, "power-state sync skipped: the instances of this host cannot be listed"; "error" => %e);
                return;
            }
        };
        for instance in instances {
            let idle = instance.task_state.is_none();
            if idle
                && matches!(
                    instance.vm_state.as_str(),
                    vm_state::ACTIVE | vm_state::STOPPED
                )
            {
                self.sync_instance_power_state(&context, &instance).await;
            }
        }
    }

    /// Syncs one instance under its lock, so no build, delete or power action of it runs
    /// between reading its domain and correcting it.
    async fn sync_instance_power_state(
        &self,
        context: &RequestContext,
        instance: &InstanceResources,
    ) {
        let uuid = instance.uuid.as_str();
        let lock = self.instance_lock(uuid);
        let _syncing = lock.lock().await;
        let name = instance_name(uuid);
        let seen = match self.on_domain(&name, LibvirtDriver::power_state).await {
            Ok(state) => DomainSeen::Power(state),
            Err(ComputeError::Driver(DriverError::NotFound { .. })) => DomainSeen::Missing,
            Err(e) => {
                warn!(self.log, "power-state sync: the domain cannot be read"; "instance" => uuid, "error" => %e);
                return;
            }
        };
        let vm = instance.vm_state.as_str();
        let action = power::sync_power_state(
            vm,
            instance.task_state.as_deref(),
            instance.power_state,
            seen,
        );
        let corrected = match action {
            SyncAction::Nothing => return,
            SyncAction::RecordPowerState(state) => {
                info!(self.log, "power-state sync: recording the domain's power state"; "instance" => uuid,
                    "vm_state" => vm, "recorded" => instance.power_state, "power_state" => state);
                let update = InstanceUpdate {
                    uuid: uuid.to_string(),
                    power_state: Some(state),
                    expected_vm_state: Some(vm.to_string()),
                    expect_no_task: true,
                    ..Default::default()
                };
                self.record(context, &update).await
            }
            SyncAction::Stop | SyncAction::PowerOff => {
                info!(self.log, "power-state sync: the domain contradicts the database; powering it off and recording the instance stopped";
                    "instance" => uuid, "vm_state" => vm, "domain" => ?seen);
                self.sync_power_off(context, uuid, vm, &name).await
            }
            SyncAction::Gone => {
                info!(self.log, "power-state sync: the domain is gone; the instance goes to ERROR"; "instance" => uuid, "vm_state" => vm);
                let message = format!(
                    "The domain of this instance is gone from the hypervisor: {name} is not defined on {}",
                    self.config.host
                );
                let update = InstanceUpdate {
                    expected_vm_state: Some(vm.to_string()),
                    expect_no_task: true,
                    ..self.error_update(uuid, message)
                };
                let recorded = self.record(context, &update).await;
                if recorded.is_ok() {
                    // ERROR holds nothing: the database gave back the placement with the update.
                    self.tracker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .release(uuid);
                    self.report_resources();
                }
                recorded
            }
        };
        match corrected.map_err(vanished_or_rpc) {
            Ok(()) => {}
            Err(ComputeError::Vanished(why)) => {
                info!(self.log, "power-state sync: the instance changed meanwhile; left alone"; "instance" => uuid, "why" => why)
            }
            Err(e) => {
                warn!(self.log, "power-state sync: correction not recorded"; "instance" => uuid, "error" => %e)
            }
        }
    }

    /// Stops an instance on the sync's initiative, as Nova's force-stop does: takes the
    /// instance with task_state `powering-off` (only while it is still `vm` with no task, so
    /// nothing the user started is overridden), powers the domain off and records it stopped.
    /// A compute that restarts half way settles it in `init_host` like any stop.
    async fn sync_power_off(
        &self,
        context: &RequestContext,
        uuid: &str,
        vm: &str,
        name: &str,
    ) -> Result<(), proto::ProtoError> {
        let stop = PowerAction::Stop;
        let taken = InstanceUpdate {
            uuid: uuid.to_string(),
            state: Some(InstanceState {
                vm_state: vm.to_string(),
                task_state: Some(stop.task_state().to_string()),
                power_state: self
                    .observed_power_state(name)
                    .await
                    .unwrap_or(power_state::NOSTATE),
            }),
            expected_vm_state: Some(vm.to_string()),
            expect_no_task: true,
            ..Default::default()
        };
        self.record(context, &taken).await?;
        let expected_task_state = Some(stop.task_state().to_string());
        let update = match self.on_domain(name, LibvirtDriver::power_off).await {
            Ok(()) => InstanceUpdate {
                uuid: uuid.to_string(),
                state: Some(stop.done()),
                expected_task_state,
                ..Default::default()
            },
            Err(e) => {
                warn!(self.log, "power-state sync: the domain cannot be powered off"; "instance" => uuid, "error" => %e);
                InstanceUpdate {
                    uuid: uuid.to_string(),
                    revert_task_state: true,
                    power_state: self.observed_power_state(name).await,
                    fault: Some(fault_for(&e)),
                    expected_task_state,
                    ..Default::default()
                }
            }
        };
        self.record(context, &update).await
    }

    /// Sends a state change to the conductor, retrying while the conductor does not answer. An
    /// answer that is an error (the row is gone, say) is final.
    async fn record(
        &self,
        context: &RequestContext,
        update: &InstanceUpdate,
    ) -> Result<(), proto::ProtoError> {
        self.call_retrying(context, &update.uuid, update).await
    }

    /// Records the build as spawning on this host and takes its fixed IP, in one call (one
    /// transaction) to a conductor of protocol 1.1; in two to an older one.
    async fn start_spawning(
        &self,
        context: &RequestContext,
        spawning: InstanceUpdate,
    ) -> Result<FixedIpInfo, ComputeError> {
        let uuid = spawning.uuid.clone();
        let request = StartSpawning { update: spawning };
        match self.call_retrying(context, &uuid, &request).await {
            Ok(info) => return Ok(info),
            Err(proto::ProtoError::Remote(remote)) if remote.kind == "NoSuchMethod" => {}
            Err(proto::ProtoError::Remote(remote)) if remote.kind == FIXED_IP_EXHAUSTED => {
                return Err(ComputeError::NoFixedIp(remote.message))
            }
            Err(e) => return Err(vanished_or_rpc(e)),
        }
        self.record(context, &request.update)
            .await
            .map_err(vanished_or_rpc)?;
        self.allocate_fixed_ip(context, &uuid).await
    }

    /// Sends one record about `instance` to the conductor, as [`Compute::record`] does.
    async fn call_retrying<M: Method>(
        &self,
        context: &RequestContext,
        instance: &str,
        request: &M,
    ) -> Result<M::Reply, proto::ProtoError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.conductors.call(&self.rpc, context, request).await {
                Ok(reply) => return Ok(reply),
                Err(e @ proto::ProtoError::Remote(_)) => return Err(e),
                Err(e) if attempt >= RECORD_ATTEMPTS => return Err(e),
                Err(e) => {
                    warn!(for_request(&self.log, context), "state not recorded yet; retrying"; "instance" => instance, "method" => M::NAME, "error" => %e);
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }

    /// ERROR for an instance of this host. With the host and node named, and `building`
    /// expected (the power-state sync expects the state it saw instead), the conductor refuses
    /// it unless the instance is placed here: a late copy of a build that was placed elsewhere
    /// since must not end the instance there.
    fn error_update(&self, uuid: &str, message: String) -> InstanceUpdate {
        InstanceUpdate {
            uuid: uuid.to_string(),
            state: Some(InstanceState {
                vm_state: vm_state::ERROR.into(),
                task_state: None,
                power_state: power_state::NOSTATE,
            }),
            host: Some(self.config.host.clone()),
            node: Some(self.config.host.clone()),
            expected_vm_state: Some(vm_state::BUILDING.into()),
            fault: Some(Fault {
                code: 500,
                message,
                details: String::new(),
            }),
            ..Default::default()
        }
    }

    /// Destroys and undefines the domain of `uuid`; a domain that does not exist is not an error.
    async fn destroy_domain(&self, uuid: &str) -> Result<(), ComputeError> {
        self.on_domain(&instance_name(uuid), LibvirtDriver::destroy_and_undefine)
            .await
    }

    /// Runs one blocking libvirt call on the domain called `name`, off the reactor.
    async fn on_domain<T: Send + 'static>(
        &self,
        name: &str,
        call: fn(&LibvirtDriver, &str) -> Result<T, DriverError>,
    ) -> Result<T, ComputeError> {
        let driver = self.driver.clone();
        let name = name.to_owned();
        Ok(blocking(move || call(&driver, &name)).await??)
    }

    /// Polls the domain's power state until it runs, for at most `boot_timeout`.
    async fn wait_until_running(&self, name: &str) -> Result<(), ComputeError> {
        let deadline = Instant::now() + self.boot_timeout;
        loop {
            let state = self.on_domain(name, LibvirtDriver::power_state).await?;
            if state == power_state::RUNNING {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ComputeError::BootTimeout {
                    name: name.to_owned(),
                    seconds: self.boot_timeout.as_secs_f64(),
                    state,
                });
            }
            tokio::time::sleep(power::POLL_INTERVAL).await;
        }
    }

    /// Removes the disk of `uuid` and releases its claim (its domain is already gone).
    fn release_files_and_claim(&self, log: &Logger, uuid: &str) {
        if let Err(e) = disk::remove_instance_dir(&self.config.instances_path, &instance_name(uuid))
        {
            warn!(log, "instance files not removed"; "instance" => uuid, "error" => %e);
        }
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(uuid);
    }

    /// Destroys the domain and the disk of `uuid` if they exist, and releases its claim. When
    /// the domain cannot be destroyed its files stay: a guest that may still run keeps its disks.
    async fn remove_leftovers(&self, log: &Logger, uuid: &str) {
        match self.destroy_domain(uuid).await {
            Ok(()) => self.release_files_and_claim(log, uuid),
            Err(e) => {
                warn!(log, "domain not removed; its files are kept"; "instance" => uuid, "error" => %e);
                self.tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(uuid);
            }
        }
    }

    async fn periodic_report(&self, with_resources: bool) {
        let context = self.context();
        let heartbeat = ServiceHeartbeat {
            host: self.config.host.clone(),
            binary: BINARY.into(),
        };
        if let Err(e) = self.conductors.call(&self.rpc, &context, &heartbeat).await {
            warn!(self.log, "heartbeat not recorded"; "error" => %e);
        }
        if with_resources {
            self.report_resources();
        }
    }

    /// Asks for an `update_available_resource` and returns at once: a build does not wait
    /// for the report of its claim (the scheduler counts a placement from its allocation).
    fn report_resources(&self) {
        self.report_wanted.store(true, Ordering::SeqCst);
        self.report_asked.notify_one();
    }

    /// Asks for a report of the claims made in the next `CLAIM_REPORT_DELAY`, together. The
    /// scheduler does not wait for it (a placement counts from its allocation); it is the
    /// hypervisor's figures (`os-hypervisors`) it brings up to date. Reported one by one, a
    /// burst of builds on a host cost the conductor a write per claim.
    fn report_claim(&self) {
        // Wanted at once, so a report sent meanwhile (a delete, the timer, the stop) carries it.
        self.report_wanted.store(true, Ordering::SeqCst);
        if !self.claim_report_pending.swap(true, Ordering::SeqCst) {
            self.claim_report_asked.notify_one();
        }
    }

    /// At a stop, the stop's own last report carries the claims at once.
    async fn report_claims_later(&self, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            _ = tokio::time::sleep(CLAIM_REPORT_DELAY) => {}
            _ = stopped(&mut stop) => return,
        }
        self.claim_report_pending.store(false, Ordering::SeqCst);
        self.report_resources();
    }

    /// Sends the reports asked for, coalesced: a report asked for while another is on its way
    /// is left to the task sending that one, which sends one more with the ledger as it is
    /// then. Claims wait for `CLAIM_REPORT_DELAY` first, so a burst of them on a host costs a
    /// report a second, not one per claim. A failure
    /// is only worth a log line: the next periodic report carries the same numbers.
    async fn send_wanted_reports(&self) {
        let context = self.context();
        let context = &context;
        loop {
            let Ok(sending) = self.report_sender.try_lock() else {
                return;
            };
            while self.report_wanted.swap(false, Ordering::SeqCst) {
                if let Err(e) = self.update_available_resource(context).await {
                    warn!(for_request(&self.log, context), "resource report not recorded"; "error" => %e);
                }
            }
            drop(sending);
            // Asked for between the last look and the release: nobody else saw the lock free.
            if !self.report_wanted.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Reports this host's capacity and what its instances use (`update_available_resource`).
    async fn update_available_resource(
        &self,
        context: &RequestContext,
    ) -> Result<(), proto::ProtoError> {
        let _one_at_a_time = self.report_lock.lock().await;
        let (used, running) = {
            let tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            (tracker.used(), tracker.instance_count() as i64)
        };
        self.observe_free(used, running);
        let update = ComputeNodeUpdate {
            host: self.config.host.clone(),
            hypervisor_hostname: self.config.host.clone(),
            hypervisor_type: self.driver.hypervisor_type().to_string(),
            vcpus: self.capacity.vcpus,
            memory_mb: self.capacity.memory_mb,
            local_gb: self.capacity.local_gb,
            vcpus_used: used.vcpus,
            memory_mb_used: used.memory_mb,
            local_gb_used: used.disk_gb(),
            running_vms: running,
            extra_resources: ExtraResources {
                queue_name: Some(self.config.queue_name.clone()),
                cpu_allocation_ratio: self.config.cpu_allocation_ratio,
                ram_allocation_ratio: self.config.ram_allocation_ratio,
                disk_allocation_ratio: self.config.disk_allocation_ratio,
                reserved_host_memory_mb: self.config.reserved_host_memory_mb,
                reserved_host_disk_mb: self.config.reserved_host_disk_mb,
            },
        };
        self.conductors.call(&self.rpc, context, &update).await
    }

    /// This host's free resources as its own ledger sees them, for the gauges.
    fn observe_free(&self, used: Usage, instances: i64) {
        let capacity = &self.capacity;
        let reserved_ram_mb = self.config.reserved_host_memory_mb.max(0);
        let reserved_disk_mb = self.config.reserved_host_disk_mb.max(0);
        let metrics = &self.metrics;
        metrics
            .free_vcpus
            .set(capacity.vcpus.saturating_sub(used.vcpus));
        let free_ram_mb = capacity
            .memory_mb
            .saturating_sub(reserved_ram_mb)
            .saturating_sub(used.memory_mb);
        metrics.free_ram_bytes.set(free_ram_mb.saturating_mul(MB));
        let free_disk_mb = capacity
            .local_gb
            .saturating_mul(1024)
            .saturating_sub(reserved_disk_mb)
            .saturating_sub(used.disk_mb);
        metrics.free_disk_bytes.set(free_disk_mb.saturating_mul(MB));
        metrics.instances.set(instances);
    }

    async fn dispatch(&self, request: Incoming) {
        let log = for_request(&self.log, request.context());
        let context = request.context().clone();
        match ComputeApi::decode(request.method(), &request.envelope.payload) {
            Ok(Some(ComputeApi::ComputeRunInstance(args))) => {
                request.reply::<ComputeRunInstance>(Ok(()));
                self.new_run_instance(&log, &context, args).await;
            }
            Ok(Some(ComputeApi::TerminateInstance(args))) => {
                request.reply::<TerminateInstance>(Ok(()));
                self.terminate_instance(&log, &context, &args.uuid).await;
            }
            Ok(Some(ComputeApi::StopInstance(args))) => {
                request.reply::<StopInstance>(Ok(()));
                self.power_action(&log, &context, &args.uuid, PowerAction::Stop)
                    .await;
            }
            Ok(Some(ComputeApi::StartInstance(args))) => {
                request.reply::<StartInstance>(Ok(()));
                self.power_action(&log, &context, &args.uuid, PowerAction::Start)
                    .await;
            }
            Ok(Some(ComputeApi::RebootInstance(args))) => {
                request.reply::<RebootInstance>(Ok(()));
                let action = PowerAction::Reboot { hard: args.hard };
                self.power_action(&log, &context, &args.uuid, action).await;
            }
            Ok(Some(ComputeApi::Ping(_))) => request.reply::<Ping>(Ok(self.config.host.clone())),
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

    async fn new_run_instance(
        &self,
        log: &Logger,
        context: &RequestContext,
        args: ComputeRunInstance,
    ) {
        let uuid = args.spec.instance_uuid.clone();
        let lock = self.instance_lock(&uuid);
        let _building = lock.lock().await;
        let started = Instant::now();
        let outcome = self.build(log, context, args, started).await;
        self.metrics.build_ended(outcome, started.elapsed());
    }

    /// Builds the instance and cleans up after a build that cannot finish; says how it ended.
    async fn build(
        &self,
        log: &Logger,
        context: &RequestContext,
        args: ComputeRunInstance,
        started: Instant,
    ) -> BuildOutcome {
        let uuid = args.spec.instance_uuid.clone();
        match self.build_and_run(log, context, &args).await {
            Ok(()) => {
                info!(log, "instance running"; "instance" => &uuid, "build_ms" => started.elapsed().as_millis() as u64);
                BuildOutcome::Active
            }
            Err(ComputeError::Vanished(_)) => {
                // Deleted while it was being built: clean up, there is no row to report to.
                info!(log, "instance deleted, in error or placed elsewhere during its build; cleaning up"; "instance" => &uuid);
                self.remove_leftovers(log, &uuid).await;
                self.report_resources();
                BuildOutcome::Deleted
            }
            Err(ComputeError::Claim(refused)) => {
                // The last line of defence against over-commit: this host cannot take it, so
                // ask for another one (the scheduler counts the attempts).
                info!(log, "claim refused; asking for a reschedule"; "instance" => &uuid, "reason" => %refused);
                self.reschedule(log, context, args.spec, refused.to_string())
                    .await;
                BuildOutcome::Rescheduled
            }
            Err(e) => {
                warn!(log, "instance build failed"; "instance" => &uuid, "error" => %e);
                // Leave nothing behind: no domain, no disk, no claim.
                self.remove_leftovers(log, &uuid).await;
                let mut failed = self.error_update(&uuid, e.to_string());
                if matches!(e, ComputeError::WrongHost { .. }) {
                    // A misrouted cast: the host it was placed on never hears of it, so this
                    // host records the failure without claiming the instance as its own.
                    (failed.host, failed.node) = (None, None);
                }
                if let Err(e) = self.record(context, &failed).await {
                    warn!(log, "could not record the build failure"; "instance" => &uuid, "error" => %e);
                }
                self.report_resources();
                BuildOutcome::Error
            }
        }
    }

    /// Hands an instance this host refused back to the conductor for another host; if the
    /// conductor does not take it, the instance goes to ERROR with the refusal as its fault.
    async fn reschedule(
        &self,
        log: &Logger,
        context: &RequestContext,
        mut spec: RequestSpec,
        reason: String,
    ) {
        let uuid = spec.instance_uuid.clone();
        if !spec.retry.hosts.contains(&self.config.host) {
            spec.retry.hosts.push(self.config.host.clone());
        }
        spec.retry.last_error = Some(reason.clone());
        let request = RescheduleInstance {
            spec,
            host: self.config.host.clone(),
            reason: reason.clone(),
        };
        if let Err(e) = self.conductors.cast(&self.rpc, context, &request).await {
            warn!(log, "the conductor did not take the reschedule"; "instance" => &uuid, "error" => %e);
            if let Err(e) = self
                .record(context, &self.error_update(&uuid, reason))
                .await
            {
                warn!(log, "could not record the build failure"; "instance" => &uuid, "error" => %e);
            }
        }
    }

    /// Claim, spawn, wait for RUNNING, report ACTIVE.
    async fn build_and_run(
        &self,
        log: &Logger,
        context: &RequestContext,
        args: &ComputeRunInstance,
    ) -> Result<(), ComputeError> {
        let spec = &args.spec;
        let uuid = spec.instance_uuid.clone();
        if args.node != self.config.host {
            return Err(ComputeError::WrongHost {
                node: args.node.clone(),
                host: self.config.host.clone(),
            });
        }
        let resources = InstanceResources {
            uuid: uuid.clone(),
            vcpus: spec.flavor.vcpus,
            memory_mb: spec.flavor.memory_mb,
            root_gb: spec.flavor.root_gb,
            ephemeral_gb: spec.flavor.ephemeral_gb,
            swap_mb: spec.flavor.swap_mb,
            vm_state: vm_state::BUILDING.into(),
            task_state: Some(task_state::SPAWNING.into()),
            power_state: None,
        };
        {
            let mut tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            tracker.claim(
                &self.config.host,
                &uuid,
                Usage::of(&resources),
                &args.limits,
            )?;
            // This host's own gauges move with the claim; the database's figures follow it
            // (see `report_claim`).
            self.observe_free(tracker.used(), tracker.instance_count() as i64);
        }
        self.report_claim();
        // Before the disk, so an exhausted pool costs no copy of the image. A scheduler of 1.3
        // took the address when its claim placed the instance here; a cast that comes late may
        // have been placed elsewhere since, and checks in first.
        let fresh = cast_is_fresh(
            args.cast_at_ms,
            proto::envelope::now_ms(),
            self.fresh_cast_within,
        );
        let fixed_ip = match args.fixed_ip.clone() {
            Some(fixed_ip) if fresh => fixed_ip,
            _ => {
                let spawning = InstanceUpdate {
                    uuid: uuid.clone(),
                    state: Some(InstanceState {
                        vm_state: vm_state::BUILDING.into(),
                        task_state: Some(task_state::SPAWNING.into()),
                        power_state: power_state::NOSTATE,
                    }),
                    host: Some(self.config.host.clone()),
                    node: Some(args.node.clone()),
                    expected_vm_state: Some(vm_state::BUILDING.into()),
                    ..Default::default()
                };
                self.start_spawning(context, spawning).await?
            }
        };
        info!(log, "fixed IP"; "instance" => &uuid, "address" => &fixed_ip.address, "mac" => &fixed_ip.mac, "network" => &fixed_ip.network, "from_claim" => fresh && args.fixed_ip.is_some());
        let name = instance_name(&uuid);
        let mut spec_xml = DomainSpec {
            name: name.clone(),
            uuid: uuid.clone(),
            vcpus: u32::try_from(spec.flavor.vcpus.max(1)).unwrap_or(u32::MAX),
            memory_mb: spec.flavor.memory_mb.max(1) as u64,
            domain_type: self.driver.domain_type().to_string(),
            disks: Vec::new(),
            disk_cache: self.disk_cache,
            mac_address: Some(fixed_ip.mac),
            network: None,
            bridge: fixed_ip.bridge,
            display_name: spec.display_name.clone(),
            console_log: None,
            metadata: InstanceMetadata {
                creation_time: chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string(),
                flavor_name: spec.flavor.name.clone(),
                root_gb: spec.flavor.root_gb,
                ephemeral_gb: spec.flavor.ephemeral_gb,
                swap_mb: spec.flavor.swap_mb,
                user_id: context.user_id.clone(),
                project_id: spec.project_id.clone(),
                image_id: Some(spec.image.id.clone()).filter(|id| !id.is_empty()),
            },
        };
        // The test hypervisor runs no guest, so it needs no disks and no instance directory.
        let instance_dir = if self.driver.domain_type() == "test" {
            None
        } else {
            let disks = self.create_disks(spec, &name).await?;
            spec_xml.disks = [Some(disks.root), disks.ephemeral, disks.swap]
                .into_iter()
                .flatten()
                .map(|p| p.display().to_string())
                .collect();
            spec_xml.console_log = Some(
                disks
                    .dir
                    .join(disk::CONSOLE_LOG_FILE_NAME)
                    .display()
                    .to_string(),
            );
            Some(disks.dir)
        };
        let xml = domain_xml(&spec_xml)?;
        if instance_dir.is_some() {
            // Kept beside the disks, as Nova does, for an operator comparing what was asked
            // with what libvirt made of it.
            let (dir, name, xml) = (
                self.config.instances_path.clone(),
                name.clone(),
                xml.clone(),
            );
            blocking(move || {
                disk::write_instance_file(&dir, &name, disk::DOMAIN_XML_FILE_NAME, &xml)
            })
            .await??;
        }
        let driver = self.driver.clone();
        let state = blocking(move || driver.define_and_start(&xml)).await??;
        if state != power_state::RUNNING {
            self.wait_until_running(&name).await?;
        }
        let active = spawned(&uuid, &self.config.host);
        match self.record(context, &active).await.map_err(vanished_or_rpc) {
            Ok(()) => Ok(()),
            Err(e @ ComputeError::Vanished(_)) => Err(e),
            Err(e) => {
                // The guest runs; destroying it because the conductor is unreachable would turn a
                // bookkeeping problem into lost work. The row says BUILD until a later record.
                warn!(log, "instance runs but ACTIVE was not recorded"; "instance" => &uuid, "error" => %e);
                Ok(())
            }
        }
    }

    /// The instance's disks over the node's cached image and blank bases (see [`disk`]).
    async fn create_disks(
        &self,
        spec: &RequestSpec,
        name: &str,
    ) -> Result<disk::InstanceDisks, ComputeError> {
        let dir = self.config.instances_path.clone();
        let name = name.to_owned();
        let image = spec.image.location.clone().map(|path| {
            (
                spec.image.id.clone(),
                PathBuf::from(path),
                spec.image.disk_format.clone(),
            )
        });
        let (root_gb, ephemeral_gb, swap_mb) = (
            non_negative(spec.flavor.root_gb),
            non_negative(spec.flavor.ephemeral_gb),
            non_negative(spec.flavor.swap_mb),
        );
        let disks = blocking(move || {
            let request = disk::DiskRequest {
                root_gb,
                ephemeral_gb,
                swap_mb,
                image: image.as_ref().map(|(id, path, format)| disk::ImageSource {
                    id,
                    path,
                    disk_format: format,
                }),
            };
            disk::create_instance_disks(&dir, &name, &request)
        })
        .await??;
        Ok(disks)
    }

    /// The instance's fixed IP and MAC from the conductor (the same ones on a retried build).
    /// An exhausted pool fails the build where it is: every host draws from the same pool, so
    /// a reschedule could only fail again.
    async fn allocate_fixed_ip(
        &self,
        context: &RequestContext,
        uuid: &str,
    ) -> Result<FixedIpInfo, ComputeError> {
        let request = AllocateFixedIp {
            instance_uuid: uuid.to_string(),
        };
        match self.conductors.call(&self.rpc, context, &request).await {
            Ok(info) => Ok(info),
            Err(proto::ProtoError::Remote(remote)) if remote.kind == FIXED_IP_EXHAUSTED => {
                Err(ComputeError::NoFixedIp(remote.message))
            }
            Err(e) => Err(vanished_or_rpc(e)),
        }
    }

    async fn terminate_instance(&self, log: &Logger, context: &RequestContext, uuid: &str) {
        let lock = self.instance_lock(uuid);
        // Wait for a build of the same instance to finish, then delete what it made.
        let _deleting = lock.lock().await;
        if let Err(e) = self.destroy_domain(uuid).await {
            // The row stays (in its current state) so the operator can see and retry the delete.
            warn!(log, "domain could not be destroyed"; "instance" => uuid, "error" => %e);
            let update = InstanceUpdate {
                uuid: uuid.to_string(),
                fault: Some(Fault {
                    code: 500,
                    message: e.to_string(),
                    details: String::new(),
                }),
                ..Default::default()
            };
            let _ = self.record(context, &update).await;
            return;
        }
        self.release_files_and_claim(log, uuid);
        match self
            .conductors
            .call(
                &self.rpc,
                context,
                &InstanceDestroy {
                    uuid: uuid.to_string(),
                },
            )
            .await
        {
            Ok(()) => info!(log, "instance deleted"; "instance" => uuid),
            Err(e) => warn!(log, "instance row not deleted"; "instance" => uuid, "error" => %e),
        }
        self.forget_instance_lock(uuid);
        self.report_resources();
    }

    /// Stops, starts or reboots `uuid`; the API has set its task_state and started the instance
    /// action of the context's request. Records the outcome and finishes the action; a failure
    /// becomes the instance's fault and leaves its vm_state as it was. Resources stay claimed
    /// either way: a stopped instance keeps its place on this host, as in Nova.
    async fn power_action(
        &self,
        log: &Logger,
        context: &RequestContext,
        uuid: &str,
        action: PowerAction,
    ) {
        let lock = self.instance_lock(uuid);
        // After a build or a delete of the same instance, never during one.
        let _acting = lock.lock().await;
        let held = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .holds(uuid);
        if !held {
            warn!(log, "asked to {} an instance this host does not hold; ignored", action.name(); "instance" => uuid);
            return;
        }
        let name = instance_name(uuid);
        let started = Instant::now();
        let outcome = match action {
            PowerAction::Stop => self.stop_domain(log, &name).await,
            PowerAction::Start => self.start_domain(&name).await,
            PowerAction::Reboot { hard } => self.reboot_domain(log, &name, hard).await,
        };
        let expected_vm_state = action.expected_vm_state().map(str::to_string);
        let expected_task_state = Some(action.task_state().to_string());
        let failed = outcome.is_err();
        let update = match outcome {
            Ok(()) => {
                info!(log, "{} done", action.name(); "instance" => uuid, "ms" => started.elapsed().as_millis() as u64);
                InstanceUpdate {
                    uuid: uuid.to_string(),
                    state: Some(action.done()),
                    expected_vm_state,
                    expected_task_state,
                    ..Default::default()
                }
            }
            Err(e) => {
                warn!(log, "{} failed", action.name(); "instance" => uuid, "error" => %e);
                InstanceUpdate {
                    uuid: uuid.to_string(),
                    revert_task_state: true,
                    power_state: self.observed_power_state(&name).await,
                    fault: Some(fault_for(&e)),
                    expected_task_state,
                    ..Default::default()
                }
            }
        };
        match self.record(context, &update).await.map_err(vanished_or_rpc) {
            Ok(()) => {}
            Err(ComputeError::Vanished(why)) => {
                info!(log, "instance deleted, or taken over by another request, meanwhile; outcome not recorded"; "instance" => uuid, "why" => why)
            }
            Err(e) => {
                warn!(log, "outcome not recorded"; "instance" => uuid, "action" => action.name(), "error" => %e)
            }
        }
        self.finish_action(log, context, uuid, failed).await;
    }

    /// Nova's `power_off` with a clean shutdown: asks the guest to shut down (again every
    /// [`power::SHUTDOWN_RETRY_INTERVAL`]), and powers the domain off once the guest is down
    /// or `shutdown_timeout` has passed. The domain stays defined.
    async fn stop_domain(&self, log: &Logger, name: &str) -> Result<(), ComputeError> {
        let started = Instant::now();
        let mut asked: Option<Instant> = None;
        loop {
            let state = self.on_domain(name, LibvirtDriver::power_state).await?;
            let since_asked = asked.map(|at| at.elapsed());
            match power::stop_step(state, started.elapsed(), self.shutdown_timeout, since_asked) {
                StopStep::Down => break,
                StopStep::PowerOff => {
                    info!(log, "the guest is still running after shutdown_timeout; powering it off";
                        "domain" => name, "shutdown_timeout_s" => self.shutdown_timeout.as_secs_f64());
                    break;
                }
                StopStep::AskToShutDown => {
                    match self.on_domain(name, LibvirtDriver::shutdown).await {
                        Ok(()) => asked = Some(Instant::now()),
                        Err(e @ ComputeError::Driver(DriverError::NotFound { .. })) => {
                            return Err(e)
                        }
                        Err(e) => {
                            warn!(log, "the guest cannot be asked to shut down; powering it off"; "domain" => name, "error" => %e);
                            break;
                        }
                    }
                }
                StopStep::Wait => tokio::time::sleep(power::POLL_INTERVAL).await,
            }
        }
        self.on_domain(name, LibvirtDriver::power_off).await
    }

    /// Starts the defined domain and waits until it runs.
    async fn start_domain(&self, name: &str) -> Result<(), ComputeError> {
        self.on_domain(name, LibvirtDriver::power_on).await?;
        self.wait_until_running(name).await
    }

    /// A soft reboot asks the guest; when libvirt cannot (the domain is not running, or the
    /// hypervisor has no way to ask), it becomes a hard one, as in Nova. Either way it ends
    /// with the domain running.
    async fn reboot_domain(
        &self,
        log: &Logger,
        name: &str,
        hard: bool,
    ) -> Result<(), ComputeError> {
        if !hard {
            match self.on_domain(name, LibvirtDriver::reboot).await {
                Ok(()) => return self.wait_until_running(name).await,
                Err(e @ ComputeError::Driver(DriverError::NotFound { .. })) => return Err(e),
                Err(e) => {
                    warn!(log, "soft reboot not possible; rebooting hard"; "domain" => name, "error" => %e)
                }
            }
        }
        self.on_domain(name, LibvirtDriver::hard_reboot).await?;
        self.wait_until_running(name).await
    }

    /// What the hypervisor shows for `name` after a failure: NOSTATE for a domain that is gone,
    /// `None` (record nothing) when it cannot be read.
    async fn observed_power_state(&self, name: &str) -> Option<i32> {
        match self.on_domain(name, LibvirtDriver::power_state).await {
            Ok(state) => Some(state),
            Err(ComputeError::Driver(DriverError::NotFound { .. })) => Some(power_state::NOSTATE),
            Err(_) => None,
        }
    }

    /// Marks the instance action of the context's request finished, with Nova's "Error" if the
    /// work failed.
    async fn finish_action(
        &self,
        log: &Logger,
        context: &RequestContext,
        uuid: &str,
        failed: bool,
    ) {
        let finish = InstanceActionFinish {
            uuid: uuid.to_string(),
            request_id: context.request_id.clone(),
            message: failed.then(|| "Error".to_string()),
        };
        match self.call_retrying(context, uuid, &finish).await {
            Ok(()) => {}
            // An earlier attempt finished it and its answer was lost, or none was started.
            Err(proto::ProtoError::Remote(remote)) if remote.kind == "NotFound" => {
                info!(log, "no unfinished instance action for this request"; "instance" => uuid)
            }
            Err(e) => warn!(log, "instance action not finished"; "instance" => uuid, "error" => %e),
        }
    }
}

/// The record of a build whose domain runs on `host`: ACTIVE and launched, only from
/// `building` (a delete or an error recorded meanwhile wins). Naming the host and node makes
/// the conductor refuse it (`Conflict`) unless the instance is placed here: a copy of the build
/// that a scheduler sent elsewhere after this host seemed not to take it must not end ACTIVE.
fn spawned(uuid: &str, host: &str) -> InstanceUpdate {
    InstanceUpdate {
        uuid: uuid.to_owned(),
        state: Some(InstanceState {
            vm_state: vm_state::ACTIVE.into(),
            task_state: None,
            power_state: power_state::RUNNING,
        }),
        host: Some(host.to_owned()),
        node: Some(host.to_owned()),
        launched: true,
        expected_vm_state: Some(vm_state::BUILDING.into()),
        ..Default::default()
    }
}

/// Whether a build's cast is fresh enough to build on the scheduler's placement without
/// checking in: sent (`cast_at_ms`, by the scheduler's clock) less than `within` before
/// `now_ms`. The scheduler gives a cast up, and may place the instance elsewhere, only after its
/// cast timeout, of which `within` is half. No stamp (a scheduler before 1.3) is not fresh.
fn cast_is_fresh(cast_at_ms: Option<u64>, now_ms: u64, within: Duration) -> bool {
    let within = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
    cast_at_ms.is_some_and(|sent| now_ms.saturating_sub(sent) < within)
}

fn non_negative(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// The fault recorded for a failed stop, start or reboot; a domain that is gone is Nova's 404
/// (`InstanceNotFound`), anything else 500.
fn fault_for(err: &ComputeError) -> Fault {
    let code = match err {
        ComputeError::Driver(DriverError::NotFound { .. }) => 404,
        _ => 500,
    };
    Fault {
        code,
        message: err.to_string(),
        details: String::new(),
    }
}

/// A remote NotFound means the row was deleted while this compute worked on it.
/// A conductor answer that means "this host must not (or no longer) build it": the row is
/// gone, went to error, or the instance was placed on another host meanwhile.
fn vanished_or_rpc(err: proto::ProtoError) -> ComputeError {
    match err {
        proto::ProtoError::Remote(remote)
            if remote.kind == "NotFound" || remote.kind == "Conflict" =>
        {
            ComputeError::Vanished(remote.message)
        }
        other => ComputeError::Rpc(other),
    }
}

#[cfg(test)]
mod tests {
    use super::{
        advertised_endpoint, cast_is_fresh, shutdown_timeout, sync_power_state_interval,
        update_resources_interval,
    };
    use std::time::Duration;

    #[test]
    fn only_a_cast_taken_within_the_window_is_fresh() {
        let window = Duration::from_millis(2_500);
        let sent = 1_000_000;
        assert!(cast_is_fresh(Some(sent), sent, window));
        assert!(cast_is_fresh(Some(sent), sent + 2_499, window));
        assert!(!cast_is_fresh(Some(sent), sent + 2_500, window));
        assert!(!cast_is_fresh(Some(sent), sent + 60_000, window));
        // A scheduler's clock ahead of this one's is no reason to check in.
        assert!(cast_is_fresh(Some(sent + 1_000), sent, window));
        assert!(!cast_is_fresh(None, sent, window), "a scheduler before 1.3");
    }

    #[test]
    fn shutdown_timeout_may_be_zero_but_not_negative() {
        assert_eq!(shutdown_timeout(60.0).ok(), Some(Duration::from_secs(60)));
        assert_eq!(shutdown_timeout(0.0).ok(), Some(Duration::ZERO));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err = shutdown_timeout(bad).expect_err("refused");
            assert!(err.to_string().contains("shutdown_timeout"), "{err}");
        }
    }

    #[test]
    fn update_resources_interval_zero_reports_with_heartbeats() {
        assert_eq!(update_resources_interval(0.0).unwrap(), None);
        assert_eq!(
            update_resources_interval(60.0).unwrap(),
            Some(Duration::from_secs(60))
        );
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(update_resources_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sync_power_state_interval_zero_disables_the_sync_and_negative_is_refused() {
        assert_eq!(
            sync_power_state_interval(600.0).ok(),
            Some(Some(Duration::from_secs(600)))
        );
        assert_eq!(sync_power_state_interval(0.0).ok(), Some(None));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err = sync_power_state_interval(bad).expect_err("refused");
            assert!(
                err.to_string().contains("sync_power_state_interval"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_wildcard_bind_needs_an_advertised_endpoint() {
        assert_eq!(
            advertised_endpoint("tcp://127.0.0.1:5571", None).as_deref(),
            Ok("tcp://127.0.0.1:5571")
        );
        assert!(advertised_endpoint("tcp://0.0.0.0:5571", None).is_err());
        assert!(advertised_endpoint("tcp://[::]:5571", None).is_err());
        assert_eq!(
            advertised_endpoint("tcp://0.0.0.0:5571", Some("tcp://10.0.0.7:5571")).as_deref(),
            Ok("tcp://10.0.0.7:5571")
        );
    }
}
