//! The conductor: sends the request specs of `build_instances` from the API on to a scheduler
//! (making them from the database for an API before protocol 1.4), and is the only database
//! door for compute nodes (every read or write a compute needs is an RPC here). It holds no
//! state of its own beyond the database.

mod records;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slog::{info, warn, Logger};
use tokio::sync::watch;

use db::{ComputeNodeValues, Db, DbError, ExpectedTask, InstanceChanges, NewFault, Recorded};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use proto::metrics::{default_port, outcome_counters, MetricsConfig, MetricsError, RpcMetrics};
use proto::service::{
    finish_in_flight, for_request, stopped, DatabaseConfig, LogConfig, RpcConfig, ServiceArgs,
    ServiceHandle,
};
use proto::{
    AllocateFixedIp, BuildInstances, ComputeNodeUpdate, ConductorApi, FixedIpInfo, FlavorSpec,
    ImageSpec, Incoming, InstanceActionFinish, InstanceDestroy, InstanceHost, InstanceHosts,
    InstanceResources, InstanceUpdate, InstancesOnHost, Method, Peers, Ping, RemoteError,
    RequestContext, RequestSpec, RescheduleInstance, RetrySpec, Rpc, ScheduleRunInstance,
    ServiceHeartbeat, ServiceRegister, StartSpawning,
};
use records::{Owned, Records};

pub const BINARY: &str = "zova-conductor";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rpc: RpcConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub conductor: ConductorConfig,
}

/// `[conductor]`: the periodic check that ends what a dead service left half done.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ConductorConfig {
    /// Seconds a build may take, from its creation, before the conductor puts it in ERROR
    /// (Nova's `instance_build_timeout`). A stop, start, reboot or delete untouched for as long
    /// has its task cleared. 0 turns the check off.
    pub build_timeout: f64,
    /// Seconds between two checks.
    pub stuck_check_interval: f64,
}

impl Default for ConductorConfig {
    fn default() -> Self {
        ConductorConfig {
            build_timeout: 600.0,
            stuck_check_interval: 30.0,
        }
    }
}

impl ConductorConfig {
    /// (timeout, interval) of the stuck-task check, or None when it is off.
    fn stuck_check(&self) -> Result<Option<(Duration, Duration)>, ConductorError> {
        if self.build_timeout == 0.0 {
            return Ok(None);
        }
        let timeout = proto::service::positive_seconds("build_timeout", self.build_timeout)
            .map_err(ConductorError::Config)?;
        let interval =
            proto::service::positive_seconds("stuck_check_interval", self.stuck_check_interval)
                .map_err(ConductorError::Config)?;
        Ok(Some((timeout, interval)))
    }
}

#[derive(Debug, clap::Parser)]
#[command(
    name = "zova-conductor",
    about = "Zova conductor: scheduling requests and the compute nodes' database door"
)]
pub struct Args {
    /// The zova.toml to read (environment ZOVA_* and these flags override it).
    #[arg(long, env = "ZOVA_CONFIG")]
    pub config: Option<PathBuf>,
    /// RPC endpoint to bind, e.g. tcp://127.0.0.1:5560 (default: [rpc] conductor).
    #[arg(long)]
    pub bind: Option<String>,
    /// Database URL (default: [database] url).
    #[arg(long)]
    pub database: Option<String>,
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Args {
    pub fn into_config(self) -> Result<Config, ConductorError> {
        let mut config: Config = proto::service::load_config(self.config.as_deref())
            .map_err(|e| ConductorError::Config(e.to_string()))?;
        self.service.apply(&mut config.log, &mut config.metrics);
        if let Some(bind) = self.bind {
            config.rpc.conductor = bind;
        }
        if let Some(url) = self.database {
            config.database.url = url;
        }
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConductorError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Rpc(#[from] proto::ProtoError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

struct Conductor {
    log: Logger,
    db: Db,
    rpc: Rpc,
    schedulers: Peers,
    /// Computes' state records and reports, committed in groups.
    records: Records,
    metrics: ConductorMetrics,
}

/// What the conductor counts beyond the messaging (which `proto` counts).
struct ConductorMetrics {
    /// Instances of `build_instances`: sent to a scheduler, or put in ERROR here.
    builds_scheduled: Counter,
    builds_failed: Counter,
    /// Instances a compute refused: sent back to a scheduler, put in ERROR, or not rescheduled
    /// because they were deleted or no longer building meanwhile.
    reschedules: [Counter; 3],
    /// What the stuck-task check ended: builds put in ERROR, other tasks cleared.
    stuck_builds_ended: Counter,
    stuck_tasks_cleared: Counter,
}

#[derive(Debug, Clone, Copy)]
enum Rescheduled {
    Sent = 0,
    Failed = 1,
    Skipped = 2,
}

impl ConductorMetrics {
    fn new(registry: &mut Registry) -> Self {
        let [builds_scheduled, builds_failed] = outcome_counters(
            registry,
            "zova_conductor_build_requests",
            "Instances of build_instances requests: sent to a scheduler, or put in ERROR by the conductor",
            ["scheduled", "failed"],
        );
        let reschedules = outcome_counters(
            registry,
            "zova_conductor_reschedules",
            "Instances a compute refused: sent to a scheduler again, put in ERROR, or skipped (deleted or no longer building)",
            ["scheduled", "failed", "skipped"],
        );
        let [stuck_builds_ended, stuck_tasks_cleared] = outcome_counters(
            registry,
            "zova_conductor_stuck_tasks",
            "Instances the stuck-task check found past build_timeout: builds put in ERROR, other tasks cleared",
            ["build_ended", "task_cleared"],
        );
        ConductorMetrics {
            builds_scheduled,
            builds_failed,
            reschedules,
            stuck_builds_ended,
            stuck_tasks_cleared,
        }
    }
}

/// Opens the database, binds `[rpc] conductor` and serves until stopped.
pub async fn start(config: Config, log: Logger) -> Result<ServiceHandle, ConductorError> {
    let stuck_check = config.conductor.stuck_check()?;
    let (url, max_connections) = (config.database.url.clone(), config.database.max_connections);
    let db = tokio::task::spawn_blocking(move || Db::open_with(&url, max_connections))
        .await
        .map_err(|e| ConductorError::Config(e.to_string()))??;
    let mut registry = Registry::default();
    let (rpc, incoming) = Rpc::start_with_metrics(
        log.clone(),
        Some(&config.rpc.conductor),
        config.rpc.options(),
        RpcMetrics::new(&mut registry),
    )?;
    let metrics = ConductorMetrics::new(&mut registry);
    let mut incoming = incoming.ok_or(proto::ProtoError::Closed)?;
    let endpoint = rpc.endpoint().unwrap_or_default().to_string();
    let schedulers = config.rpc.scheduler_endpoints();
    let metrics_server =
        proto::metrics::serve(&config.metrics, default_port::CONDUCTOR, registry, &log).await?;
    info!(log, "conductor listening"; "endpoint" => &endpoint, "schedulers" => schedulers.join(","));
    let conductor = Arc::new(Conductor {
        log,
        records: Records::start(db.clone()),
        db,
        rpc,
        schedulers: Peers::new(schedulers),
        metrics,
    });
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let checker = stuck_check.map(|(timeout, interval)| {
        info!(conductor.log, "stuck-task check on"; "build_timeout_s" => timeout.as_secs_f64(), "interval_s" => interval.as_secs_f64());
        tokio::spawn(
            conductor
                .clone()
                .check_stuck_tasks(timeout, interval, stop_rx.clone()),
        )
    });
    let task = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped(&mut stop_rx) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                request = incoming.recv() => match request {
                    Some(request) => {
                        tasks.spawn(conductor.clone().dispatch(request));
                    }
                    None => break,
                },
            }
        }
        // Finish what was acknowledged before going: a cast that was acked must not vanish.
        conductor.rpc.stop_serving();
        while let Some(request) = incoming.recv().await {
            tasks.spawn(conductor.clone().dispatch(request));
        }
        if let Some(checker) = checker {
            // It only stops between two passes; a pass is short and each of its updates whole.
            let _ = checker.await;
        }
        let abandoned = finish_in_flight(&mut tasks).await;
        if abandoned > 0 {
            warn!(conductor.log, "stopped with requests still running"; "abandoned" => abandoned);
        }
        conductor.rpc.shutdown();
    });
    Ok(ServiceHandle::new(endpoint, stop_tx, task).with_metrics(metrics_server))
}

fn remote(err: DbError) -> RemoteError {
    let kind = match err {
        DbError::NotFound { .. } => "NotFound",
        DbError::Conflict(_) => "Conflict",
        DbError::Exhausted(_) => proto::FIXED_IP_EXHAUSTED,
        _ => "Database",
    };
    RemoteError {
        kind: kind.into(),
        message: err.to_string(),
    }
}

impl Conductor {
    async fn dispatch(self: Arc<Self>, request: Incoming) {
        let log = for_request(&self.log, request.context());
        let decoded = match ConductorApi::decode(request.method(), &request.envelope.payload) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => {
                warn!(log, "unknown method"; "method" => request.method());
                return request.reply_no_such_method(BINARY);
            }
            Err(e) => {
                warn!(log, "request with malformed arguments refused"; "method" => request.method(), "error" => %e);
                return request.reply_invalid_args(&e);
            }
        };
        match decoded {
            ConductorApi::BuildInstances(args) => {
                let context = request.context().clone();
                request.reply::<BuildInstances>(Ok(()));
                self.build_instances(&log, &context, args).await;
            }
            ConductorApi::RescheduleInstance(args) => {
                let context = request.context().clone();
                request.reply::<RescheduleInstance>(Ok(()));
                self.reschedule_instance(&log, &context, args).await;
            }
            ConductorApi::InstanceUpdate(args) => {
                self.record::<InstanceUpdate>(request, Owned::instance(args), |_| Ok(()))
                    .await
            }
            ConductorApi::InstanceActionFinish(args) => {
                self.answer::<InstanceActionFinish>(request, args, |db, args| {
                    db.instance_action_finish(&args.uuid, &args.request_id, args.message.as_deref())
                })
                .await
            }
            ConductorApi::InstanceDestroy(args) => {
                self.record::<InstanceDestroy>(request, Owned::Destroy(args), |_| Ok(()))
                    .await
            }
            ConductorApi::InstanceHosts(args) => {
                self.answer::<InstanceHosts>(request, args, |db, args| {
                    Ok(db
                        .instances_by_uuids(&args.uuids)?
                        .into_iter()
                        .map(|i| InstanceHost {
                            uuid: i.uuid,
                            host: i.host,
                        })
                        .collect())
                })
                .await
            }
            ConductorApi::InstancesOnHost(args) => {
                self.answer::<InstancesOnHost>(request, args, |db, args| {
                    Ok(db
                        .instances_by_host(&args.host)?
                        .into_iter()
                        .map(|i| InstanceResources {
                            uuid: i.uuid,
                            vcpus: i.vcpus,
                            memory_mb: i.memory_mb,
                            root_gb: i.root_gb,
                            ephemeral_gb: i.ephemeral_gb,
                            swap_mb: i.swap_mb,
                            vm_state: i.vm_state,
                            task_state: i.task_state,
                            power_state: Some(i.power_state),
                        })
                        .collect())
                })
                .await
            }
            ConductorApi::AllocateFixedIp(args) => {
                self.answer::<AllocateFixedIp>(request, args, |db, args| {
                    Ok(fixed_ip_info(
                        db.fixed_ip_allocate(&args.instance_uuid, None)?,
                    ))
                })
                .await
            }
            ConductorApi::StartSpawning(args) => {
                let record = Owned::start_spawning(args.update);
                self.record::<StartSpawning>(request, record, |recorded| match recorded {
                    Recorded::FixedIp(ip) => Ok(fixed_ip_info(ip)),
                    Recorded::Done => Err(RemoteError {
                        kind: "Internal".into(),
                        message: "no fixed IP came back for a spawning build".into(),
                    }),
                })
                .await
            }
            ConductorApi::ServiceRegister(args) => {
                self.answer::<ServiceRegister>(request, args, |db, args| {
                    let topic = format!("compute.{}", args.host);
                    db.service_upsert(
                        &args.host,
                        &args.binary,
                        &topic,
                        &args.rpc_endpoint,
                        args.rpc_public_key.as_deref(),
                    )
                    .map(|_| ())
                })
                .await
            }
            ConductorApi::ServiceHeartbeat(args) => {
                self.record::<ServiceHeartbeat>(request, Owned::Heartbeat(args), |_| Ok(()))
                    .await
            }
            ConductorApi::ComputeNodeUpdate(args) => {
                let extra = match serde_json::to_string(&args.extra_resources) {
                    Ok(extra) => extra,
                    Err(e) => {
                        let refused = remote(DbError::Json(e.to_string()));
                        return request.reply::<ComputeNodeUpdate>(Err(refused));
                    }
                };
                let record = Owned::ComputeNode(ComputeNodeValues {
                    host: args.host,
                    hypervisor_hostname: args.hypervisor_hostname,
                    hypervisor_type: args.hypervisor_type,
                    vcpus: args.vcpus,
                    memory_mb: args.memory_mb,
                    local_gb: args.local_gb,
                    vcpus_used: args.vcpus_used,
                    memory_mb_used: args.memory_mb_used,
                    local_gb_used: args.local_gb_used,
                    running_vms: args.running_vms,
                    extra_resources: extra,
                });
                self.record::<ComputeNodeUpdate>(request, record, |_| Ok(()))
                    .await
            }
            ConductorApi::Ping(_) => request.reply::<Ping>(Ok(BINARY.to_string())),
        }
    }

    /// Every `interval`, ends what has been in a transitional state longer than `timeout`:
    /// after a service died (kill -9, a lost host), nothing else would.
    async fn check_stuck_tasks(
        self: Arc<Self>,
        timeout: Duration,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = ticks.tick() => {}
            }
            let (db, log) = (self.db.clone(), self.log.clone());
            match tokio::task::spawn_blocking(move || end_stuck_tasks(&db, &log, timeout)).await {
                Ok(Ok(ended)) => {
                    self.metrics.stuck_builds_ended.inc_by(ended.builds);
                    self.metrics.stuck_tasks_cleared.inc_by(ended.tasks);
                }
                Ok(Err(e)) => warn!(self.log, "stuck-task check failed"; "error" => %e),
                Err(e) => warn!(self.log, "stuck-task check failed"; "error" => %e),
            }
        }
    }

    /// Writes one record of a compute with the others of its group and answers with what
    /// `reply` makes of the outcome.
    async fn record<M: Method>(
        &self,
        request: Incoming,
        record: Owned,
        reply: impl FnOnce(Recorded) -> Result<M::Reply, RemoteError>,
    ) {
        let result = self.records.write(record).await.and_then(reply);
        if let Err(e) = &result {
            warn!(for_request(&self.log, request.context()), "{} failed", M::NAME; "error" => %e);
        }
        request.reply::<M>(result);
    }

    /// Runs one database call for a compute off the reactor and answers with its result.
    async fn answer<M: Method>(
        &self,
        request: Incoming,
        args: M,
        work: impl FnOnce(&Db, M) -> Result<M::Reply, DbError> + Send + 'static,
    ) {
        let db = self.db.clone();
        let result = match tokio::task::spawn_blocking(move || work(&db, args)).await {
            Ok(result) => result.map_err(remote),
            Err(e) => Err(RemoteError {
                kind: "Internal".into(),
                message: e.to_string(),
            }),
        };
        if let Err(e) = &result {
            warn!(for_request(&self.log, request.context()), "{} failed", M::NAME; "error" => %e);
        }
        request.reply::<M>(result);
    }

    async fn build_instances(&self, log: &Logger, context: &RequestContext, args: BuildInstances) {
        let total = args.instance_uuids.len() as u64;
        let scheduled = self.schedule_builds(log, context, args).await as u64;
        self.metrics.builds_scheduled.inc_by(scheduled);
        self.metrics
            .builds_failed
            .inc_by(total.saturating_sub(scheduled));
    }

    /// Sends the instances of a build to a scheduler; returns how many went (the others are
    /// in ERROR).
    async fn schedule_builds(
        &self,
        log: &Logger,
        context: &RequestContext,
        args: BuildInstances,
    ) -> usize {
        let specs = if sent_specs_match(&args) {
            args.specs
        } else {
            if !args.specs.is_empty() {
                warn!(log, "the build's request specs are not its instances': reading them";
                    "instances" => args.instance_uuids.len(), "specs" => args.specs.len());
            }
            self.read_specs(log, args.instance_uuids, &args.hints).await
        };
        if specs.is_empty() {
            return 0;
        }
        let uuids: Vec<String> = specs.iter().map(|s| s.instance_uuid.clone()).collect();
        if uuids.len() < args.min_count as usize {
            // All or nothing for min_count, as the scheduler would decide it.
            let message = format!(
                "Only {} of the {} instances required could be scheduled (the others failed \
                 before placement).",
                uuids.len(),
                args.min_count
            );
            for uuid in &uuids {
                self.fail(log, uuid, message.clone()).await;
            }
            return 0;
        }
        let request = ScheduleRunInstance {
            specs,
            min_count: args.min_count,
        };
        match self.cast_to_a_scheduler(log, context, &request).await {
            Ok(()) => {
                info!(log, "instances sent to the scheduler"; "instances" => uuids.len());
                uuids.len()
            }
            Err(message) => {
                for uuid in &uuids {
                    self.fail(log, uuid, message.clone()).await;
                }
                0
            }
        }
    }

    /// The instances' request specs, read from the database (a build from an API before 1.4);
    /// those that cannot be made end in ERROR.
    async fn read_specs(
        &self,
        log: &Logger,
        uuids: Vec<String>,
        hints: &proto::SchedulerHints,
    ) -> Vec<RequestSpec> {
        let mut specs = Vec::with_capacity(uuids.len());
        for uuid in uuids {
            let db = self.db.clone();
            let hints = hints.clone();
            let lookup = uuid.clone();
            match tokio::task::spawn_blocking(move || request_spec(&db, &lookup, hints)).await {
                Ok(Ok(spec)) => specs.push(spec),
                Ok(Err(e)) => self.fail(log, &uuid, e.to_string()).await,
                Err(e) => self.fail(log, &uuid, e.to_string()).await,
            }
        }
        specs
    }

    /// A compute refused an instance: back to `scheduling`, without a host, and to a
    /// scheduler again (which gives up after `max_attempts`).
    async fn reschedule_instance(
        &self,
        log: &Logger,
        context: &RequestContext,
        args: RescheduleInstance,
    ) {
        let outcome = self.reschedule(log, context, args).await;
        self.metrics.reschedules[outcome as usize].inc();
    }

    async fn reschedule(
        &self,
        log: &Logger,
        context: &RequestContext,
        args: RescheduleInstance,
    ) -> Rescheduled {
        let uuid = args.spec.instance_uuid.clone();
        let db = self.db.clone();
        let (lookup, refused_by) = (uuid.clone(), args.host.clone());
        let reset = tokio::task::spawn_blocking(move || {
            db.instance_return_to_scheduling(&lookup, &refused_by)
        })
        .await;
        match reset {
            Ok(Ok(_)) => {}
            Ok(Err(DbError::NotFound { .. })) => {
                info!(log, "instance deleted before its reschedule"; "instance" => &uuid);
                return Rescheduled::Skipped;
            }
            Ok(Err(DbError::Conflict(why))) => {
                info!(log, "instance no longer building here; not rescheduled"; "instance" => &uuid, "why" => why);
                return Rescheduled::Skipped;
            }
            Ok(Err(e)) => {
                self.fail(log, &uuid, e.to_string()).await;
                return Rescheduled::Failed;
            }
            Err(e) => {
                self.fail(log, &uuid, e.to_string()).await;
                return Rescheduled::Failed;
            }
        }
        info!(log, "rescheduling"; "instance" => &uuid, "refused_by" => &args.host, "reason" => &args.reason);
        let request = ScheduleRunInstance {
            specs: vec![args.spec],
            min_count: 1,
        };
        match self.cast_to_a_scheduler(log, context, &request).await {
            Ok(()) => Rescheduled::Sent,
            Err(message) => {
                self.fail(log, &uuid, message).await;
                Rescheduled::Failed
            }
        }
    }

    /// Casts to the schedulers in turn until one takes the request.
    async fn cast_to_a_scheduler(
        &self,
        log: &Logger,
        context: &RequestContext,
        request: &ScheduleRunInstance,
    ) -> Result<(), String> {
        self.schedulers
            .cast(&self.rpc, context, request)
            .await
            .map_err(|e| {
                warn!(log, "no scheduler took the request"; "schedulers" => self.schedulers.endpoints().join(","), "error" => %e);
                format!("no scheduler took the request: {e}")
            })
    }

    /// Puts an instance that cannot be scheduled into ERROR with `message` as its fault.
    async fn fail(&self, log: &Logger, uuid: &str, message: String) {
        warn!(log, "instance could not be scheduled"; "instance" => uuid, "error" => &message);
        let db = self.db.clone();
        let fault = NewFault {
            instance_uuid: uuid.to_string(),
            code: 500,
            message,
            details: String::new(),
            host: None,
        };
        let recorded = tokio::task::spawn_blocking(move || {
            db.instance_set_error(&fault.instance_uuid.clone(), &fault)
        })
        .await;
        if let Ok(Err(e)) = recorded {
            warn!(log, "could not record the fault"; "instance" => uuid, "error" => %e);
        }
    }
}

/// What one pass of the stuck-task check ended.
#[derive(Debug, Default, PartialEq, Eq)]
struct StuckEnded {
    builds: u64,
    tasks: u64,
}

/// One pass of the stuck-task check. A build created more than `timeout` ago goes to ERROR
/// with a fault that names its last task; only while it still builds, so a compute finishing
/// at that moment keeps its ACTIVE (and one finishing just after finds the ERROR and cleans
/// up, as after a delete). Any other task untouched that long is cleared, so the instance
/// takes actions again. Several conductors may run it at once: every change is conditional.
fn end_stuck_tasks(db: &Db, log: &Logger, timeout: Duration) -> Result<StuckEnded, DbError> {
    let mut ended = StuckEnded::default();
    let age = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    let cutoff = chrono::Utc::now()
        .naive_utc()
        .checked_sub_signed(age)
        .unwrap_or(chrono::NaiveDateTime::MIN);
    let seconds = timeout.as_secs_f64();
    for instance in db.instances_building_since_before(cutoff)? {
        let task = instance.task_state.as_deref().unwrap_or("none");
        let fault = NewFault {
            instance_uuid: instance.uuid.clone(),
            code: 500,
            message: format!(
                "Build of instance {} timed out after {seconds} s (in task {task}); set to error state.",
                instance.uuid
            ),
            details: String::new(),
            host: instance.host.clone(),
        };
        match db.instance_set_error_if_building(&instance.uuid, &fault) {
            Ok(true) => {
                ended.builds += 1;
                warn!(log, "build timed out; instance set to error"; "instance" => &instance.uuid, "task_state" => task, "host" => instance.host.as_deref().unwrap_or("-"));
            }
            Ok(false) => {}
            Err(e) => {
                warn!(log, "could not end a stuck build"; "instance" => &instance.uuid, "error" => %e)
            }
        }
    }
    for instance in db.instances_in_task_since_before(cutoff)? {
        let Some(task) = instance.task_state.as_deref() else {
            continue;
        };
        let cleared = db.instance_update_expecting_task(
            &instance.uuid,
            &InstanceChanges {
                task_state: Some(None),
                ..Default::default()
            },
            Some(&instance.vm_state),
            ExpectedTask::Is(task),
        );
        match cleared {
            Ok(_) => {
                ended.tasks += 1;
                warn!(log, "task timed out and was cleared"; "instance" => &instance.uuid, "task_state" => task, "vm_state" => &instance.vm_state);
            }
            Err(DbError::Conflict(_) | DbError::NotFound { .. }) => {}
            Err(e) => {
                warn!(log, "could not clear a stuck task"; "instance" => &instance.uuid, "error" => %e)
            }
        }
    }
    Ok(ended)
}

/// The flavor's name and extra specs as the API copied them into the instance at its create.
#[derive(Debug, Default, Deserialize)]
struct FlavorSnapshot {
    name: Option<String>,
    #[serde(default)]
    extra_specs: BTreeMap<String, String>,
}

/// Whether a build carries a request spec for each of its instances, in their order (an API
/// of 1.4 or later).
fn sent_specs_match(args: &BuildInstances) -> bool {
    args.specs.len() == args.instance_uuids.len()
        && args
            .specs
            .iter()
            .zip(&args.instance_uuids)
            .all(|(spec, uuid)| spec.instance_uuid == *uuid)
}

/// The request spec the API sends with a build: made, as [`request_spec`] makes it, from the
/// row it has just written and the image it checked. `None` for a row without a flavor
/// snapshot (the API writes one into every row).
pub fn request_spec_of_new(
    instance: db::Instance,
    image: db::Image,
    hints: proto::SchedulerHints,
) -> Option<RequestSpec> {
    let snapshot: FlavorSnapshot = serde_json::from_str(&instance.flavor_snapshot).ok()?;
    let name = snapshot.name?;
    Some(spec_of(instance, image, name, snapshot.extra_specs, hints))
}

/// The request spec for one instance, from its row and its image (as Nova's conductor builds it).
fn request_spec(db: &Db, uuid: &str, hints: proto::SchedulerHints) -> Result<RequestSpec, DbError> {
    let (instance, image) = db
        .instance_and_image(uuid)?
        .ok_or_else(|| DbError::NotFound {
            kind: "instance",
            id: uuid.to_string(),
        })?;
    let image = image.ok_or_else(|| DbError::NotFound {
        kind: "image",
        id: instance.image_ref.clone(),
    })?;
    // The flavor as it was when the server was asked for (Nova's embedded instance.flavor):
    // sizes in the row, name and extra specs in its snapshot. A row written before snapshots
    // has none; it gets them from the flavor, if that still exists.
    let snapshot: FlavorSnapshot =
        serde_json::from_str(&instance.flavor_snapshot).unwrap_or_default();
    let (flavor_name, extra_specs) = match snapshot.name {
        Some(name) => (name, snapshot.extra_specs),
        None => {
            let name = db
                .flavor_get(&instance.flavorid)?
                .map(|f| f.name)
                .unwrap_or_default();
            let extra_specs = match db.flavor_extra_specs(&instance.flavorid) {
                Ok(specs) => specs,
                Err(DbError::NotFound { .. }) => Default::default(),
                Err(e) => return Err(e),
            };
            (name, extra_specs)
        }
    };
    Ok(spec_of(instance, image, flavor_name, extra_specs, hints))
}

fn spec_of(
    instance: db::Instance,
    image: db::Image,
    flavor_name: String,
    extra_specs: BTreeMap<String, String>,
    hints: proto::SchedulerHints,
) -> RequestSpec {
    RequestSpec {
        instance_uuid: instance.uuid,
        display_name: instance.display_name,
        project_id: instance.project_id,
        flavor: FlavorSpec {
            flavorid: instance.flavorid,
            name: flavor_name,
            vcpus: instance.vcpus,
            memory_mb: instance.memory_mb,
            root_gb: instance.root_gb,
            ephemeral_gb: instance.ephemeral_gb,
            swap_mb: instance.swap_mb,
            extra_specs,
        },
        image: ImageSpec {
            id: image.uuid,
            name: image.name,
            disk_format: image.disk_format,
            location: image.location,
        },
        hints,
        retry: RetrySpec::default(),
    }
}

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

/// An `InstanceUpdate` on its own (the tests' way in).
#[cfg(test)]
fn instance_update(db: &Db, args: InstanceUpdate) -> Result<(), DbError> {
    db.record(&Owned::instance(args).record()).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{power_state, task_state, vm_state, Fault, InstanceState};

    /// A database with one active instance, task_state `powering-off` (a stop under way).
    fn stopping() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&db::test_database_url(dir.path()).expect("url")).expect("db");
        let row = db::NewInstance {
            uuid: "i-1".into(),
            display_name: "vm".into(),
            project_id: "p".into(),
            user_id: "u".into(),
            flavorid: "1".into(),
            image_ref: "155d900f-4e14-4e4c-a73d-069cbf4541e6".into(),
            vcpus: 1,
            memory_mb: 512,
            root_gb: 1,
            ephemeral_gb: 0,
            swap_mb: 0,
            vm_state: vm_state::ACTIVE.into(),
            task_state: Some(task_state::POWERING_OFF.into()),
            power_state: power_state::RUNNING,
            scheduler_hints: "{}".into(),
            metadata: "{}".into(),
            reservation_id: "r-1".into(),
            launch_index: 0,
            description: None,
            key_name: None,
            flavor_snapshot: "{}".into(),
        };
        db.instance_create(&row, "req-create").expect("row");
        (dir, db)
    }

    /// Adds a row like `stopping`'s in another state.
    fn add_instance(db: &Db, uuid: &str, vm: &str, task: Option<&str>) {
        add_instance_with_snapshot(db, uuid, vm, task, "{}");
    }

    /// `add_instance`, with this flavor snapshot.
    fn add_instance_with_snapshot(
        db: &Db,
        uuid: &str,
        vm: &str,
        task: Option<&str>,
        flavor_snapshot: &str,
    ) {
        let mut row = db
            .instance_get("i-1")
            .expect("read")
            .map(|i| db::NewInstance {
                uuid: uuid.into(),
                display_name: i.display_name,
                project_id: i.project_id,
                user_id: i.user_id,
                flavorid: i.flavorid,
                image_ref: i.image_ref,
                vcpus: i.vcpus,
                memory_mb: i.memory_mb,
                root_gb: i.root_gb,
                ephemeral_gb: i.ephemeral_gb,
                swap_mb: i.swap_mb,
                vm_state: String::new(),
                task_state: None,
                power_state: 0,
                scheduler_hints: "{}".into(),
                metadata: "{}".into(),
                reservation_id: "r-2".into(),
                launch_index: 0,
                description: None,
                key_name: None,
                flavor_snapshot: flavor_snapshot.into(),
            })
            .expect("i-1 exists");
        row.vm_state = vm.into();
        row.task_state = task.map(String::from);
        db.instance_create(&row, "req-create").expect("row");
    }

    #[test]
    fn a_request_spec_has_the_flavor_as_it_was_at_the_create() {
        let (_dir, db) = stopping();
        db.flavor_extra_specs_set("1", &[("queue_name".to_string(), "now".to_string())].into())
            .unwrap();
        // i-1 has no snapshot (a row from before them): the flavor as it is now.
        let spec = request_spec(&db, "i-1", Default::default()).unwrap();
        assert_eq!(spec.flavor.name, "m1.tiny");
        assert_eq!(spec.flavor.extra_specs["queue_name"], "now");
        assert_eq!(spec.image.id, "155d900f-4e14-4e4c-a73d-069cbf4541e6");

        // With a snapshot, its name and extra specs win over the flavor's present ones.
        let snapshot = r#"{"name":"m1.old","extra_specs":{"queue_name":"then"}}"#;
        add_instance_with_snapshot(&db, "i-2", vm_state::BUILDING, None, snapshot);
        let spec = request_spec(&db, "i-2", Default::default()).unwrap();
        assert_eq!(
            (
                spec.flavor.name.as_str(),
                spec.flavor.vcpus,
                spec.flavor.memory_mb
            ),
            ("m1.old", 1, 512)
        );
        assert_eq!(spec.flavor.extra_specs["queue_name"], "then");

        // The API makes the same spec from the row it wrote and the image it checked; from a
        // row without a snapshot it makes none (the conductor then reads the flavor).
        let of_new = |uuid: &str| {
            let (row, image) = db.instance_and_image(uuid).unwrap().unwrap();
            request_spec_of_new(row, image.unwrap(), Default::default())
        };
        assert_eq!(of_new("i-2"), Some(spec));
        assert_eq!(of_new("i-1"), None);

        assert!(matches!(
            request_spec(&db, "i-404", Default::default()),
            Err(DbError::NotFound {
                kind: "instance",
                ..
            })
        ));
    }

    #[test]
    fn the_stuck_task_check_ends_old_builds_and_clears_old_tasks_only() {
        let (_dir, db) = stopping();
        add_instance(&db, "scheduling", vm_state::BUILDING, Some("scheduling"));
        add_instance(&db, "spawning", vm_state::BUILDING, Some("spawning"));
        add_instance(&db, "idle", vm_state::ACTIVE, None);
        let log = Logger::root(slog::Discard, slog::o!());

        // Nothing is that old yet.
        let hour = Duration::from_secs(3600);
        assert_eq!(
            end_stuck_tasks(&db, &log, hour).unwrap(),
            StuckEnded::default()
        );
        assert_eq!(
            db.instance_get("spawning").unwrap().unwrap().vm_state,
            "building"
        );

        std::thread::sleep(Duration::from_millis(20));
        let ended = end_stuck_tasks(&db, &log, Duration::from_millis(1)).unwrap();
        assert_eq!(
            ended,
            StuckEnded {
                builds: 2,
                tasks: 1
            }
        );
        for uuid in ["scheduling", "spawning"] {
            let instance = db.instance_get(uuid).unwrap().unwrap();
            assert_eq!(
                (instance.vm_state.as_str(), instance.task_state),
                ("error", None)
            );
            let fault = db.instance_fault_latest(uuid).unwrap().unwrap();
            assert!(fault.message.contains("timed out"), "{}", fault.message);
            assert!(
                fault.message.contains(uuid),
                "names its last task: {}",
                fault.message
            );
        }
        let stopped = db.instance_get("i-1").unwrap().unwrap();
        assert_eq!(
            (stopped.vm_state.as_str(), stopped.task_state),
            ("active", None)
        );
        assert!(db.instance_fault_latest("i-1").unwrap().is_none());
        let idle = db.instance_get("idle").unwrap().unwrap();
        assert_eq!((idle.vm_state.as_str(), idle.task_state), ("active", None));

        // A second pass (another conductor's) finds nothing left to end.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            end_stuck_tasks(&db, &log, Duration::from_millis(1)).unwrap(),
            StuckEnded::default()
        );
    }

    #[test]
    fn the_example_configuration_reads_into_the_conductor_config() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/zova.toml");
        let config: Config = proto::service::load_config(Some(&file)).expect("parses");
        assert_eq!(
            config.conductor.stuck_check().unwrap(),
            Some((Duration::from_secs(600), Duration::from_secs(30)))
        );
    }

    #[test]
    fn the_stuck_task_check_is_off_at_zero_and_refuses_nonsense() {
        let off = ConductorConfig {
            build_timeout: 0.0,
            ..Default::default()
        };
        assert!(off.stuck_check().unwrap().is_none());
        let on = ConductorConfig::default().stuck_check().unwrap();
        assert_eq!(
            on,
            Some((Duration::from_secs(600), Duration::from_secs(30)))
        );
        for (build_timeout, stuck_check_interval) in [
            (-1.0, 30.0),
            (f64::NAN, 30.0),
            (600.0, 0.0),
            (600.0, f64::INFINITY),
        ] {
            let config = ConductorConfig {
                build_timeout,
                stuck_check_interval,
            };
            let err = config.stuck_check().unwrap_err().to_string();
            assert!(err.contains("must be a positive number"), "{err}");
        }
    }

    fn stopped() -> InstanceUpdate {
        InstanceUpdate {
            uuid: "i-1".into(),
            state: Some(InstanceState {
                vm_state: vm_state::STOPPED.into(),
                task_state: None,
                power_state: power_state::SHUTDOWN,
            }),
            expected_vm_state: Some(vm_state::ACTIVE.into()),
            expected_task_state: Some(task_state::POWERING_OFF.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_finished_stop_applies_while_its_task_state_holds() {
        let (_dir, db) = stopping();
        instance_update(&db, stopped()).expect("applied");
        let row = db.instance_get("i-1").unwrap().expect("row");
        assert_eq!(
            (row.vm_state.as_str(), row.task_state, row.power_state),
            (vm_state::STOPPED, None, power_state::SHUTDOWN)
        );
    }

    #[test]
    fn a_finished_stop_yields_to_a_delete() {
        let (_dir, db) = stopping();
        let deleting = InstanceChanges {
            task_state: Some(Some(task_state::DELETING.into())),
            ..Default::default()
        };
        db.instance_update("i-1", &deleting).unwrap();
        let err = instance_update(&db, stopped()).unwrap_err();
        assert!(matches!(err, DbError::Conflict(_)), "{err}");
        let row = db.instance_get("i-1").unwrap().expect("row");
        assert_eq!(
            (row.vm_state.as_str(), row.task_state.as_deref()),
            (vm_state::ACTIVE, Some(task_state::DELETING))
        );

        db.instance_destroy("i-1").unwrap();
        let err = instance_update(&db, stopped()).unwrap_err();
        assert!(matches!(err, DbError::NotFound { .. }), "{err}");
    }

    #[test]
    fn a_failed_stop_reverts_the_task_state_and_keeps_the_vm_state() {
        let (_dir, db) = stopping();
        let failed = InstanceUpdate {
            uuid: "i-1".into(),
            revert_task_state: true,
            power_state: Some(power_state::NOSTATE),
            fault: Some(Fault {
                code: 404,
                message: "Domain instance-i-1 does not exist on this hypervisor".into(),
                details: String::new(),
            }),
            expected_task_state: Some(task_state::POWERING_OFF.into()),
            ..Default::default()
        };
        instance_update(&db, failed).expect("applied");
        let row = db.instance_get("i-1").unwrap().expect("row");
        assert_eq!(
            (row.vm_state.as_str(), row.task_state, row.power_state),
            (vm_state::ACTIVE, None, power_state::NOSTATE)
        );
        let fault = db.instance_fault_latest("i-1").unwrap().expect("fault");
        assert_eq!(fault.code, 404);
        assert!(
            fault.message.contains("does not exist"),
            "{}",
            fault.message
        );
    }
    #[test]
    fn a_correction_expecting_no_task_yields_to_a_running_one() {
        let (_dir, db) = stopping();
        let shut_off = InstanceUpdate {
            uuid: "i-1".into(),
            power_state: Some(power_state::SHUTDOWN),
            expected_vm_state: Some(vm_state::ACTIVE.into()),
            expect_no_task: true,
            ..Default::default()
        };
        let err = instance_update(&db, shut_off.clone()).unwrap_err();
        assert!(matches!(err, DbError::Conflict(_)), "{err}");
        assert_eq!(
            db.instance_get("i-1").unwrap().expect("row").power_state,
            power_state::RUNNING
        );

        let idle = InstanceChanges {
            task_state: Some(None),
            ..Default::default()
        };
        db.instance_update("i-1", &idle).unwrap();
        instance_update(&db, shut_off).expect("applied");
        let row = db.instance_get("i-1").unwrap().expect("row");
        assert_eq!(
            (row.vm_state.as_str(), row.task_state, row.power_state),
            (vm_state::ACTIVE, None, power_state::SHUTDOWN)
        );
    }
}
