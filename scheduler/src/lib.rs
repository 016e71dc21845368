//! The scheduler: keeps the host queue (rebuilt from the `compute_nodes` rows at start and every
//! `build_queue_period`), places each `new_run_instance` by walking it, charges the chosen host in
//! memory and casts the work to `compute.<host>`. When no host fits, the instance goes to ERROR
//! with the "No valid host was found" fault.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use slog::{debug, info, warn, Logger};
use tokio::sync::watch;

use db::{Db, DbError, NewFault};
use hostqueue::{
    ComputeNodeRow, HostMatch, HostQueue, NoValidHost, PlacementRequest, ResourceRequest,
};
use proto::service::{for_request, stopped, DatabaseConfig, LogConfig, RpcConfig, ServiceHandle};
use proto::{
    ComputeRunInstance, ExtraResources, Incoming, Limits, Method, Ping, RequestContext,
    RequestSpec, Rpc, ScheduleRunInstance,
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
    /// Whether `scheduler_host` still checks the host's free resources.
    pub check_forced_host_resources: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            build_queue_period: 10.0,
            service_down_time: 60,
            default_queue: "kvm".into(),
            max_attempts: 3,
            check_forced_host_resources: true,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rpc: RpcConfig,
    pub log: LogConfig,
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
}

impl Args {
    pub fn into_config(self) -> Result<Config, SchedulerError> {
        let mut config: Config = proto::service::load_config(self.config.as_deref())
            .map_err(|e| SchedulerError::Config(e.to_string()))?;
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
}

struct Scheduler {
    log: Logger,
    db: Db,
    rpc: Rpc,
    config: SchedulerConfig,
    queue: Mutex<HostQueue>,
    /// Hosts whose compute did not take a cast, and when: they count as down until they send a
    /// heartbeat after that, so later requests do not each wait for the same timeout.
    unreachable: Mutex<HashMap<String, chrono::NaiveDateTime>>,
}

/// Opens the database, builds the host queue, binds `[rpc] scheduler` and serves until stopped.
pub async fn start(config: Config, log: Logger) -> Result<ServiceHandle, SchedulerError> {
    let period =
        proto::service::positive_seconds("build_queue_period", config.scheduler.build_queue_period)
            .map_err(SchedulerError::Config)?;
    let url = config.database.url.clone();
    let db = tokio::task::spawn_blocking(move || Db::open(&url))
        .await
        .map_err(|e| SchedulerError::Task(e.to_string()))??;
    let (rpc, incoming) = Rpc::start(
        log.clone(),
        Some(&config.rpc.scheduler),
        config.rpc.options(),
    )?;
    let mut incoming = incoming.ok_or(proto::ProtoError::Closed)?;
    let endpoint = rpc.endpoint().unwrap_or_default().to_string();
    let scheduler = Arc::new(Scheduler {
        log: log.clone(),
        db,
        rpc,
        queue: Mutex::new(HostQueue::new(&config.scheduler.default_queue)),
        unreachable: Mutex::new(HashMap::new()),
        config: config.scheduler,
    });
    scheduler.build_queue().await?;
    info!(log, "scheduler listening"; "endpoint" => &endpoint);

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut rebuild = tokio::time::interval(period);
        rebuild.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rebuild.tick().await; // the first tick is immediate; the queue was just built
        loop {
            tokio::select! {
                _ = stopped(&mut stop_rx) => break,
                _ = rebuild.tick() => {
                    if let Err(e) = scheduler.build_queue().await {
                        warn!(scheduler.log, "host queue rebuild failed; keeping the previous queue"; "error" => %e);
                    }
                }
                request = incoming.recv() => match request {
                    // Placements are handled one at a time, in arrival order: each one must see the
                    // charges of the one before it.
                    Some(request) => scheduler.dispatch(request).await,
                                        None => break,
                },
            }
        }
        // Place what was acknowledged before going: a cast that was acked must not vanish.
        scheduler.rpc.stop_serving();
        let drained = tokio::time::timeout(proto::service::DRAIN_LIMIT, async {
            while let Some(request) = incoming.recv().await {
                scheduler.dispatch(request).await;
            }
        });
        if drained.await.is_err() {
            warn!(scheduler.log, "stopped with requests still queued");
        }
        scheduler.rpc.shutdown();
    });
    Ok(ServiceHandle::new(endpoint, stop_tx, task))
}

/// When a service last reported: its last heartbeat, or its registration.
fn last_seen(service: &db::Service) -> chrono::NaiveDateTime {
    service.updated_at.unwrap_or(service.created_at)
}

/// The host-queue input for one compute node, from its row and its service's row.
pub fn compute_node_row(
    node: &db::ComputeNode,
    service: &db::Service,
    now: chrono::NaiveDateTime,
    service_down_time: i64,
) -> ComputeNodeRow {
    let extra: Option<ExtraResources> = serde_json::from_str(&node.extra_resources).ok();
    let last_seen = last_seen(service);
    ComputeNodeRow {
        hypervisor_hostname: node.hypervisor_hostname.clone(),
        host: node.host.clone(),
        rpc_endpoint: service.rpc_endpoint.clone(),
        vcpus: node.vcpus,
        vcpus_used: node.vcpus_used,
        memory_mb: node.memory_mb,
        free_ram_mb: node.free_ram_mb,
        local_gb: node.local_gb,
        free_disk_gb: node.free_disk_gb,
        queue_name: extra.as_ref().map(|e| e.queue_name.clone()),
        cpu_allocation_ratio: extra.as_ref().map_or(1.0, |e| e.cpu_allocation_ratio),
        ram_allocation_ratio: extra.as_ref().map_or(1.0, |e| e.ram_allocation_ratio),
        disk_allocation_ratio: extra.as_ref().map_or(1.0, |e| e.disk_allocation_ratio),
        disabled: service.disabled,
        disabled_reason: service.disabled_reason.clone(),
        up: (now - last_seen).num_seconds() <= service_down_time,
    }
}

impl Scheduler {
    /// `build_queue`: reads every compute node and rebuilds the queue (dropping in-memory charges,
    /// which the compute nodes' own reports now include).
    async fn build_queue(&self) -> Result<(), SchedulerError> {
        let db = self.db.clone();
        let down_time = self.config.service_down_time;
        let nodes = tokio::task::spawn_blocking(move || db.compute_nodes_with_services())
            .await
            .map_err(|e| SchedulerError::Task(e.to_string()))??;
        let now = chrono::Utc::now().naive_utc();
        let mut rows = Vec::with_capacity(nodes.len());
        {
            let mut unreachable = self.unreachable.lock().unwrap_or_else(|p| p.into_inner());
            for (node, service) in &nodes {
                let mut row = compute_node_row(node, service, now, down_time);
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
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.build_queue(&rows);
        debug!(self.log, "host queue rebuilt"; "hosts" => rows.len(), "unavailable" => queue.unavailable().len());
        Ok(())
    }

    async fn dispatch(&self, request: Incoming) {
        let log = for_request(&self.log, request.context());
        match request.method() {
            ScheduleRunInstance::NAME => match request.args::<ScheduleRunInstance>() {
                Ok(args) => {
                    let context = request.context().clone();
                    request.reply::<ScheduleRunInstance>(Ok(()));
                    self.new_run_instance(&log, &context, args.spec).await;
                }
                Err(e) => {
                    warn!(log, "new_run_instance with malformed arguments dropped"; "error" => %e)
                }
            },
            Ping::NAME => request.reply::<Ping>(Ok(BINARY.to_string())),
            other => {
                warn!(log, "unknown method"; "method" => other);
                request.reply_no_such_method(BINARY);
            }
        }
    }

    /// Places one instance: select a host, charge it, cast to it; a host that does not take the
    /// cast is given back and avoided, up to `max_attempts` hosts in all.
    async fn new_run_instance(
        &self,
        log: &Logger,
        context: &RequestContext,
        mut spec: RequestSpec,
    ) {
        let mut placement_request = match self.placement_request(&spec).await {
            Ok(request) => request,
            Err(reason) => return self.no_valid_host(log, &spec.instance_uuid, &reason).await,
        };
        loop {
            let selected = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                queue.select(&placement_request)
            };
            let placement = match selected {
                Ok(placement) => placement,
                Err(NoValidHost { reason }) => {
                    return self.no_valid_host(log, &spec.instance_uuid, &reason).await
                }
            };
            spec.retry.num_attempts += 1;
            spec.retry.hosts.push(placement.hostname.clone());
            let args = ComputeRunInstance {
                spec: spec.clone(),
                node: placement.hostname.clone(),
                limits: Limits {
                    vcpu: placement.limits.vcpu,
                    memory_mb: placement.limits.memory_mb,
                    disk_gb: placement.limits.disk_gb,
                },
            };
            match self.rpc.cast(&placement.rpc_endpoint, context, &args).await {
                Ok(()) => {
                    info!(log, "instance placed"; "instance" => &spec.instance_uuid, "host" => &placement.hostname);
                    return;
                }
                Err(e) => {
                    warn!(log, "compute did not take the instance; trying another host";
                        "instance" => &spec.instance_uuid, "host" => &placement.hostname, "error" => %e);
                    self.queue
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .release_host(&placement.hostname, &placement_request.resources);
                    placement_request
                        .avoid_hosts
                        .push(placement.hostname.clone());
                    self.unreachable
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(placement.hostname.clone(), chrono::Utc::now().naive_utc());
                    if spec.retry.num_attempts >= self.config.max_attempts {
                        let reason = format!(
                            "Exceeded maximum number of attempts ({}); hosts tried: {}",
                            self.config.max_attempts,
                            spec.retry.hosts.join(", ")
                        );
                        return self.no_valid_host(log, &spec.instance_uuid, &reason).await;
                    }
                }
            }
        }
    }

    async fn placement_request(&self, spec: &RequestSpec) -> Result<PlacementRequest, String> {
        let hints = &spec.hints;
        let scheduler_host_match = match &hints.scheduler_host_match {
            Some(pattern) => Some(HostMatch::new(pattern).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut avoid_hosts = spec.retry.hosts.clone();
        avoid_hosts.extend(
            self.unreachable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned(),
        );
        if !hints.different_host.is_empty() {
            let db = self.db.clone();
            let uuids = hints.different_host.clone();
            let others = tokio::task::spawn_blocking(move || db.instances_by_uuids(&uuids))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            avoid_hosts.extend(others.into_iter().filter_map(|i| i.host));
        }
        let flavor = &spec.flavor;
        Ok(PlacementRequest {
            resources: ResourceRequest::from_flavor(
                flavor.vcpus,
                flavor.memory_mb,
                flavor.root_gb,
                flavor.ephemeral_gb,
                flavor.swap_mb,
            ),
            queue_name: None,
            scheduler_host: hints.scheduler_host.clone(),
            scheduler_host_match,
            avoid_hosts,
            check_forced_host_resources: self.config.check_forced_host_resources,
        })
    }

    async fn no_valid_host(&self, log: &Logger, uuid: &str, reason: &str) {
        let message = if reason.starts_with("No valid host was found") {
            reason.to_string()
        } else {
            format!("No valid host was found. {reason}")
        };
        warn!(log, "no valid host"; "instance" => uuid, "reason" => &message);
        let fault = NewFault {
            instance_uuid: uuid.to_string(),
            code: 500,
            message,
            details: String::new(),
            host: None,
        };
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || {
            db.instance_set_error(&fault.instance_uuid.clone(), &fault)
        })
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
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
        };
        (node, service, now)
    }

    #[test]
    fn a_row_carries_the_ratios_and_the_endpoint() {
        let extra = r#"{"queue_name":"gpu","cpu_allocation_ratio":16.0,"ram_allocation_ratio":1.5,"disk_allocation_ratio":1.0}"#;
        let (node, service, now) = rows(5, extra);
        let row = compute_node_row(&node, &service, now, 60);
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
    }

    #[test]
    fn a_silent_service_is_down_and_bad_extra_resources_fall_back_to_the_defaults() {
        let (node, service, now) = rows(61, "not json");
        let row = compute_node_row(&node, &service, now, 60);
        assert!(!row.up);
        assert_eq!(row.queue_name, None);
        assert_eq!(
            (
                row.cpu_allocation_ratio,
                row.ram_allocation_ratio,
                row.disk_allocation_ratio
            ),
            (1.0, 1.0, 1.0)
        );
    }
}
