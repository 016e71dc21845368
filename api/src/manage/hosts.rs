//! `service` and `hypervisor`: which hosts are up and may take instances, and how full they are.

use chrono::NaiveDateTime;
use clap::Subcommand;
use serde::Serialize;
use serde_json::{json, Value};

use db::{ComputeNode, Db, DbError, Instance, Service};
use hostqueue::HostState;

use super::{fields, json_text, table, timestamp, Format, ManageConfig, ManageError};
use crate::admin::service_is_up;

const COMPUTE_BINARY: &str = "zova-compute";

/// Nova's limit on a disabled reason (os-services).
const MAX_REASON_LEN: usize = 255;

#[derive(Debug, Subcommand)]
pub(super) enum ServiceCommand {
    /// Lists the services: enabled or disabled (and why), up or down, forced down, last heard of.
    List {
        /// Seconds without a heartbeat after which a service is down (default: [scheduler]
        /// service_down_time, else 60).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i64).range(1..))]
        down_after: Option<i64>,
    },
    /// Lets the schedulers place instances on HOST again.
    Enable {
        host: String,
        #[arg(long, default_value = COMPUTE_BINARY)]
        binary: String,
    },
    /// Keeps the schedulers from placing instances on HOST; what runs there keeps running.
    Disable {
        host: String,
        /// Why, for other operators (shown by `service list` and os-services).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value = COMPUTE_BINARY)]
        binary: String,
    },
    /// Marks HOST's service down whatever its heartbeat says (the host is fenced); --unset clears
    /// the mark.
    ForceDown {
        host: String,
        #[arg(long)]
        unset: bool,
        #[arg(long, default_value = COMPUTE_BINARY)]
        binary: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum HypervisorCommand {
    /// Lists the hypervisors: state, queue, use of vCPUs, RAM and disk, allocation ratios.
    List {
        /// Seconds without a heartbeat after which a host is down (default: [scheduler]
        /// service_down_time, else 60).
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i64).range(1..))]
        down_after: Option<i64>,
    },
    /// One host's hypervisor in full, with the instances on it.
    Show {
        /// Host name, hypervisor hostname or hypervisor id.
        host: String,
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i64).range(1..))]
        down_after: Option<i64>,
    },
}

/// A service as `service list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct ServiceView {
    id: i64,
    host: String,
    binary: String,
    /// `enabled` or `disabled`.
    status: &'static str,
    /// `up` or `down`.
    state: &'static str,
    forced_down: bool,
    disabled_reason: Option<String>,
    last_seen: String,
    seconds_since_seen: i64,
}

fn service_view(service: &Service, now: NaiveDateTime, down_after: i64) -> ServiceView {
    let last_seen = service.updated_at.unwrap_or(service.created_at);
    ServiceView {
        id: service.id,
        host: service.host.clone(),
        binary: service.binary.clone(),
        status: if service.disabled {
            "disabled"
        } else {
            "enabled"
        },
        state: if service_is_up(service, now, down_after) {
            "up"
        } else {
            "down"
        },
        forced_down: service.forced_down,
        disabled_reason: service.disabled_reason.clone(),
        last_seen: timestamp(last_seen),
        seconds_since_seen: (now - last_seen).num_seconds(),
    }
}

/// A duration in seconds as a person reads it: `42s`, `5m`, `3h`, `2d`.
fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn services_output(views: &[ServiceView], format: Format) -> String {
    match format {
        Format::Json => json_text(&json!(views)),
        Format::Table => table(
            &[
                "ID",
                "HOST",
                "BINARY",
                "STATUS",
                "STATE",
                "FORCED_DOWN",
                "LAST_SEEN",
                "DISABLED_REASON",
            ],
            views.iter().map(|v| {
                vec![
                    v.id.to_string(),
                    v.host.clone(),
                    v.binary.clone(),
                    v.status.to_string(),
                    v.state.to_string(),
                    v.forced_down.to_string(),
                    format!("{} ({} ago)", v.last_seen, age(v.seconds_since_seen)),
                    v.disabled_reason.clone().unwrap_or_default(),
                ]
            }),
        ),
    }
}

/// One changed service: a one-row table, or its JSON object.
fn service_output(view: ServiceView, format: Format) -> String {
    match format {
        Format::Json => json_text(&json!(view)),
        Format::Table => services_output(&[view], format),
    }
}

/// A disabled reason as os-services takes it: 1 to 255 characters, not all blank.
fn check_reason(reason: &str) -> Result<(), ManageError> {
    if reason.trim().is_empty()
        || reason.chars().count() > MAX_REASON_LEN
        || reason.chars().any(char::is_control)
    {
        return Err(ManageError::Invalid(format!(
            "the reason must be 1 to {MAX_REASON_LEN} characters, not blank, without control \
             characters"
        )));
    }
    Ok(())
}

fn now() -> NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

pub(super) fn service(
    db: &Db,
    config: &ManageConfig,
    command: ServiceCommand,
    format: Format,
) -> Result<String, ManageError> {
    let down_after = config.down_after(None);
    let changed = match command {
        ServiceCommand::List { down_after } => {
            let down_after = config.down_after(down_after);
            let now = now();
            let views: Vec<ServiceView> = db
                .services()?
                .iter()
                .map(|s| service_view(s, now, down_after))
                .collect();
            return Ok(services_output(&views, format));
        }
        ServiceCommand::Enable { host, binary } => {
            db.service_set_disabled(&host, &binary, false, None)?
        }
        ServiceCommand::Disable {
            host,
            reason,
            binary,
        } => {
            if let Some(reason) = &reason {
                check_reason(reason)?;
            }
            db.service_set_disabled(&host, &binary, true, reason.as_deref())?
        }
        ServiceCommand::ForceDown {
            host,
            unset,
            binary,
        } => db.service_set_forced_down(&host, &binary, !unset)?,
    };
    Ok(service_output(
        service_view(&changed, now(), down_after),
        format,
    ))
}

/// One resource of a hypervisor. Used is the larger of what the compute reports and what the
/// schedulers placed (a placement counts before the compute reports it), as os-hypervisors shows
/// it; the limit is what the schedulers fill up to: the total times the allocation ratio, less
/// what is reserved for the host.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Resource {
    total: i64,
    used: i64,
    free: i64,
    allocation_ratio: f64,
    limit: i64,
}

/// A hypervisor as `hypervisor list|show` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct HypervisorView {
    id: i64,
    host: String,
    hypervisor_hostname: String,
    hypervisor_type: String,
    state: &'static str,
    status: &'static str,
    forced_down: bool,
    disabled_reason: Option<String>,
    queue_name: String,
    vcpus: Resource,
    memory_mb: Resource,
    local_gb: Resource,
    /// What the compute last reported running.
    running_vms: i64,
    /// Live instances the database places on this hypervisor.
    instances: usize,
    last_seen: String,
}

/// The queue of hosts that report none (the scheduler's default).
const DEFAULT_QUEUE: &str = "kvm";

fn hypervisor_view(
    node: &ComputeNode,
    service: &Service,
    instances: usize,
    now: NaiveDateTime,
    down_after: i64,
) -> HypervisorView {
    // The scheduler's own row and arithmetic for the limits, so both tell the same story.
    let config = scheduler::SchedulerConfig {
        service_down_time: down_after,
        default_queue: DEFAULT_QUEUE.into(),
        ..Default::default()
    };
    let row = scheduler::compute_node_row(node, service, now, &config);
    let ratios = (
        row.cpu_allocation_ratio,
        row.ram_allocation_ratio,
        row.disk_allocation_ratio,
    );
    let host_state = HostState::from_row(&row, DEFAULT_QUEUE);
    let resource = |total: i64, used: i64, ratio: f64, limit: f64| Resource {
        total,
        used,
        free: total - used,
        allocation_ratio: ratio,
        // `as` saturates; a nonsense limit shows as 0.
        limit: limit.floor() as i64,
    };
    let service = service_view(service, now, down_after);
    HypervisorView {
        id: node.id,
        host: node.host.clone(),
        hypervisor_hostname: node.hypervisor_hostname.clone(),
        hypervisor_type: node.hypervisor_type.clone(),
        state: service.state,
        status: service.status,
        forced_down: service.forced_down,
        disabled_reason: service.disabled_reason,
        queue_name: host_state.queue_name,
        vcpus: resource(
            node.vcpus,
            node.vcpus_used.max(node.placed_vcpus),
            ratios.0,
            host_state.limits.vcpu,
        ),
        memory_mb: resource(
            node.memory_mb,
            node.memory_mb_used.max(node.placed_memory_mb),
            ratios.1,
            host_state.limits.memory_mb,
        ),
        local_gb: resource(
            node.local_gb,
            node.local_gb_used.max((node.placed_disk_mb + 1023) / 1024),
            ratios.2,
            host_state.limits.disk_gb,
        ),
        running_vms: node.running_vms,
        instances,
        last_seen: service.last_seen,
    }
}

/// `used/total`, the way a person scans a column of them.
fn used_of(r: &Resource) -> String {
    format!("{}/{}", r.used, r.total)
}

/// The ratio without a needless `.0`.
fn ratio(r: f64) -> String {
    format!("{r}")
}

fn instances_on(node: &ComputeNode, all_on_host: &[Instance]) -> Vec<Instance> {
    all_on_host
        .iter()
        .filter(|i| {
            i.node
                .as_deref()
                .is_none_or(|n| n == node.hypervisor_hostname)
        })
        .cloned()
        .collect()
}

pub(super) fn hypervisor(
    db: &Db,
    config: &ManageConfig,
    command: HypervisorCommand,
    format: Format,
) -> Result<String, ManageError> {
    let now = now();
    let nodes = db.compute_nodes_with_services()?;
    match command {
        HypervisorCommand::List { down_after } => {
            let down_after = config.down_after(down_after);
            let mut views = Vec::with_capacity(nodes.len());
            for (node, service) in &nodes {
                let on_node = instances_on(node, &db.instances_by_host(&node.host)?);
                views.push(hypervisor_view(
                    node,
                    service,
                    on_node.len(),
                    now,
                    down_after,
                ));
            }
            Ok(match format {
                Format::Json => json_text(&json!(views)),
                Format::Table => table(
                    &[
                        "ID",
                        "HOST",
                        "STATE",
                        "STATUS",
                        "QUEUE",
                        "VCPUS",
                        "RAM_MB",
                        "DISK_GB",
                        "RATIOS",
                        "INSTANCES",
                    ],
                    views.iter().map(|v| {
                        vec![
                            v.id.to_string(),
                            v.host.clone(),
                            v.state.to_string(),
                            v.status.to_string(),
                            v.queue_name.clone(),
                            used_of(&v.vcpus),
                            used_of(&v.memory_mb),
                            used_of(&v.local_gb),
                            format!(
                                "{}/{}/{}",
                                ratio(v.vcpus.allocation_ratio),
                                ratio(v.memory_mb.allocation_ratio),
                                ratio(v.local_gb.allocation_ratio)
                            ),
                            v.instances.to_string(),
                        ]
                    }),
                ),
            })
        }
        HypervisorCommand::Show { host, down_after } => {
            let down_after = config.down_after(down_after);
            let matching: Vec<&(ComputeNode, Service)> = nodes
                .iter()
                .filter(|(node, _)| {
                    node.host == host
                        || node.hypervisor_hostname == host
                        || node.id.to_string() == host
                })
                .collect();
            if matching.is_empty() {
                return Err(DbError::NotFound {
                    kind: "hypervisor",
                    id: host,
                }
                .into());
            }
            let mut shown = Vec::with_capacity(matching.len());
            for (node, service) in matching {
                let on_node = instances_on(node, &db.instances_by_host(&node.host)?);
                let view = hypervisor_view(node, service, on_node.len(), now, down_after);
                shown.push((view, on_node));
            }
            Ok(match format {
                Format::Json => {
                    let list: Vec<Value> = shown
                        .iter()
                        .map(|(view, on_node)| {
                            let mut value = json!(view);
                            value["instance_list"] = on_node.iter().map(instance_view).collect();
                            value
                        })
                        .collect();
                    // One host has one hypervisor (as the all-in-one and Nova's libvirt driver
                    // run them): show it as an object, several as a list.
                    match <[Value; 1]>::try_from(list) {
                        Ok([one]) => json_text(&one),
                        Err(list) => json_text(&Value::Array(list)),
                    }
                }
                Format::Table => shown
                    .iter()
                    .map(|(view, on_node)| hypervisor_table(view, on_node))
                    .collect::<Vec<_>>()
                    .join("\n"),
            })
        }
    }
}

fn instance_view(instance: &Instance) -> Value {
    json!({
        "id": instance.uuid,
        "name": instance.display_name,
        "project_id": instance.project_id,
        "vm_state": instance.vm_state,
        "task_state": instance.task_state,
        "vcpus": instance.vcpus,
        "memory_mb": instance.memory_mb,
        "disk_gb": instance.root_gb + instance.ephemeral_gb,
    })
}

fn hypervisor_table(view: &HypervisorView, on_node: &[Instance]) -> String {
    let resource_rows = |name: &'static str, r: &Resource| {
        [
            (name, r.total.to_string()),
            ("  used", r.used.to_string()),
            ("  free", r.free.to_string()),
            ("  allocation_ratio", ratio(r.allocation_ratio)),
            ("  limit", r.limit.to_string()),
        ]
    };
    let mut rows = vec![
        ("id", view.id.to_string()),
        ("host", view.host.clone()),
        ("hypervisor_hostname", view.hypervisor_hostname.clone()),
        ("hypervisor_type", view.hypervisor_type.clone()),
        ("state", view.state.to_string()),
        ("status", view.status.to_string()),
        ("forced_down", view.forced_down.to_string()),
        (
            "disabled_reason",
            view.disabled_reason.clone().unwrap_or_default(),
        ),
        ("queue_name", view.queue_name.clone()),
        ("last_seen", view.last_seen.clone()),
    ];
    rows.extend(resource_rows("vcpus", &view.vcpus));
    rows.extend(resource_rows("memory_mb", &view.memory_mb));
    rows.extend(resource_rows("local_gb", &view.local_gb));
    rows.push(("running_vms", view.running_vms.to_string()));
    rows.push(("instances", view.instances.to_string()));
    let mut out = fields(rows);
    if !on_node.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "INSTANCE",
                "NAME",
                "VM_STATE",
                "TASK_STATE",
                "VCPUS",
                "RAM_MB",
            ],
            on_node.iter().map(|i| {
                vec![
                    i.uuid.clone(),
                    i.display_name.clone(),
                    i.vm_state.clone(),
                    i.task_state.clone().unwrap_or_default(),
                    i.vcpus.to_string(),
                    i.memory_mb.to_string(),
                ]
            }),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{json, manage, manage_with, open_temp, parse};
    use super::*;
    use chrono::Duration;
    use db::ComputeNodeValues;

    fn service(disabled: bool, forced_down: bool, seen_secs_ago: Option<i64>) -> Service {
        let now = at();
        Service {
            id: 7,
            host: "node-1".into(),
            binary: COMPUTE_BINARY.into(),
            topic: "compute".into(),
            rpc_endpoint: "tcp://127.0.0.1:5571".into(),
            disabled,
            disabled_reason: disabled.then(|| "maintenance".to_string()),
            report_count: 3,
            created_at: now - Duration::seconds(1000),
            updated_at: seen_secs_ago.map(|s| now - Duration::seconds(s)),
            deleted: 0,
            rpc_public_key: None,
            forced_down,
        }
    }

    fn at() -> NaiveDateTime {
        NaiveDateTime::parse_from_str("2025-05-01 12:00:00", "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn a_service_is_up_while_it_reports_and_is_not_forced_down() {
        let view = service_view(&service(false, false, Some(10)), at(), 60);
        assert_eq!((view.state, view.status), ("up", "enabled"));
        assert_eq!(view.seconds_since_seen, 10);
        assert_eq!(view.last_seen, "2025-05-01T11:59:50Z");
        let view = service_view(&service(false, false, Some(61)), at(), 60);
        assert_eq!(view.state, "down");
        let view = service_view(&service(false, false, Some(61)), at(), 120);
        assert_eq!(view.state, "up", "--down-after decides");
        let view = service_view(&service(true, true, Some(1)), at(), 60);
        assert_eq!((view.state, view.status), ("down", "disabled"));
        assert_eq!(view.disabled_reason.as_deref(), Some("maintenance"));
        // Never heard from since it registered: its registration is its last sign of life.
        let view = service_view(&service(false, false, None), at(), 60);
        assert_eq!((view.state, view.seconds_since_seen), ("down", 1000));
    }

    #[test]
    fn ages_read_like_a_person_says_them() {
        let cases = [
            (-5, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (7199, "119m"),
            (7200, "2h"),
            (86400 * 2 - 1, "47h"),
            (86400 * 2, "2d"),
        ];
        for (seconds, want) in cases {
            assert_eq!(age(seconds), want, "{seconds}");
        }
    }

    #[test]
    fn disabled_reasons_are_checked() {
        assert!(check_reason("maintenance").is_ok());
        assert!(check_reason(&"r".repeat(255)).is_ok());
        for bad in ["", "  ", "a\nb", &"r".repeat(256)] {
            assert!(check_reason(bad).is_err(), "{bad:?}");
        }
        assert!(parse("service list --down-after 0").is_err());
        assert!(parse("service list --down-after 30").is_ok());
    }

    fn node(extra_resources: &str) -> ComputeNode {
        ComputeNode {
            id: 3,
            host: "node-1".into(),
            hypervisor_hostname: "node-1".into(),
            hypervisor_type: "QEMU".into(),
            vcpus: 4,
            memory_mb: 8192,
            local_gb: 80,
            vcpus_used: 1,
            memory_mb_used: 512,
            local_gb_used: 1,
            free_ram_mb: 7680,
            free_disk_gb: 79,
            running_vms: 1,
            extra_resources: extra_resources.into(),
            created_at: at(),
            updated_at: Some(at()),
            deleted: 0,
            placed_vcpus: 2,
            placed_memory_mb: 256,
            placed_disk_mb: 1025,
        }
    }

    #[test]
    fn a_hypervisor_shows_the_larger_of_reported_and_placed_use_and_its_limits() {
        let view = hypervisor_view(
            &node(
                r#"{"queue_name": "gpu", "ram_allocation_ratio": 1.5,
                     "reserved_host_memory_mb": 512}"#,
            ),
            &service(false, false, Some(5)),
            2,
            at(),
            60,
        );
        assert_eq!((view.state, view.status), ("up", "enabled"));
        assert_eq!(view.queue_name, "gpu");
        assert_eq!(
            view.vcpus,
            Resource {
                total: 4,
                used: 2,
                free: 2,
                allocation_ratio: 4.0,
                limit: 16
            }
        );
        assert_eq!(
            view.memory_mb,
            Resource {
                total: 8192,
                used: 512,
                free: 7680,
                allocation_ratio: 1.5,
                limit: 8192 * 3 / 2 - 512
            }
        );
        // 1025 MB placed is 2 GB used, rounded up.
        assert_eq!((view.local_gb.used, view.local_gb.limit), (2, 80));
        assert_eq!((view.running_vms, view.instances), (1, 2));
    }

    #[test]
    fn a_hypervisor_without_extra_resources_takes_the_defaults() {
        for extra in ["{}", "not json", r#"{"queue_name": ""}"#] {
            let view = hypervisor_view(&node(extra), &service(true, false, Some(500)), 0, at(), 60);
            assert_eq!(view.queue_name, "kvm", "{extra}");
            assert_eq!(
                (
                    view.vcpus.allocation_ratio,
                    view.memory_mb.allocation_ratio,
                    view.local_gb.allocation_ratio
                ),
                (4.0, 1.0, 1.0)
            );
            assert_eq!((view.state, view.status), ("down", "disabled"));
            assert_eq!(view.disabled_reason.as_deref(), Some("maintenance"));
        }
    }

    fn register(db: &Db, host: &str) {
        db.service_upsert(host, COMPUTE_BINARY, "compute", "tcp://127.0.0.1:1", None)
            .unwrap();
        db.service_heartbeat(host, COMPUTE_BINARY).unwrap();
        db.compute_node_upsert(&ComputeNodeValues {
            host: host.into(),
            hypervisor_hostname: host.into(),
            hypervisor_type: "QEMU".into(),
            vcpus: 8,
            memory_mb: 16384,
            local_gb: 160,
            vcpus_used: 0,
            memory_mb_used: 0,
            local_gb_used: 0,
            running_vms: 0,
            extra_resources: r#"{"queue_name": "kvm"}"#.into(),
        })
        .unwrap();
    }

    #[test]
    fn services_are_listed_disabled_enabled_and_forced_down() {
        let (_dir, db) = open_temp();
        register(&db, "node-1");
        register(&db, "node-2");
        let list = json(&db, "service list");
        assert_eq!(list.as_array().unwrap().len(), 2);
        assert_eq!(list[0]["host"], "node-1");
        assert_eq!(list[0]["state"], "up");
        assert_eq!(list[0]["status"], "enabled");

        let changed = json(&db, "service disable node-2 --reason maintenance");
        assert_eq!(changed["status"], "disabled");
        assert_eq!(changed["disabled_reason"], "maintenance");
        let text = manage(&db, "service list").unwrap();
        let row = text.lines().find(|l| l.contains("node-2")).unwrap();
        assert!(
            row.contains("disabled") && row.ends_with("maintenance"),
            "{text}"
        );
        assert!(row.contains(" ago)"), "{text}");

        let changed = json(&db, "service enable node-2");
        assert_eq!(changed["status"], "enabled");
        assert_eq!(changed["disabled_reason"], Value::Null);

        let changed = json(&db, "service force-down node-1");
        assert_eq!(
            (&changed["forced_down"], &changed["state"]),
            (&json!(true), &json!("down"))
        );
        let changed = json(&db, "service force-down node-1 --unset");
        assert_eq!(
            (&changed["forced_down"], &changed["state"]),
            (&json!(false), &json!("up"))
        );

        for args in [
            "service enable node-9",
            "service disable node-9 --reason x",
            "service force-down node-9",
            "service enable node-1 --binary zova-api",
        ] {
            let err = manage(&db, args).unwrap_err();
            assert!(
                err.to_string().contains("could not be found"),
                "{args}: {err}"
            );
        }
        let long = "r".repeat(256);
        let err = manage(&db, &format!("service disable node-1 --reason {long}")).unwrap_err();
        assert!(err.to_string().contains("reason"), "{err}");
        assert_eq!(
            json(&db, "service list")[0]["status"],
            "enabled",
            "nothing changed"
        );
    }

    #[test]
    fn the_configured_down_time_applies_unless_the_flag_says_otherwise() {
        let (_dir, db) = open_temp();
        register(&db, "node-1");
        let config = ManageConfig {
            scheduler: super::super::SchedulerKeys {
                service_down_time: Some(1),
            },
            ..ManageConfig::default()
        };
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let text = manage_with(&db, &config, "service list --format json").unwrap();
        assert!(text.contains("\"down\""), "{text}");
        let text = manage_with(&db, &config, "service list --down-after 60 --format json").unwrap();
        assert!(text.contains("\"up\""), "{text}");
    }

    #[test]
    fn hypervisors_are_listed_and_shown_with_their_instances() {
        let (_dir, db) = open_temp();
        register(&db, "node-1");
        register(&db, "node-2");
        let text = manage(&db, "hypervisor list").unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("ID  HOST    STATE  STATUS   QUEUE  VCPUS"),
            "{text}"
        );
        assert!(
            lines[1].contains("node-1  up     enabled  kvm    0/8"),
            "{text}"
        );
        assert!(lines[1].ends_with("4/1/1   0"), "{text}");

        let list = json(&db, "hypervisor list");
        assert_eq!(list[1]["memory_mb"]["total"], 16384);
        assert_eq!(list[1]["vcpus"]["limit"], 32);

        let shown = json(&db, "hypervisor show node-2");
        assert_eq!(shown["host"], "node-2");
        assert_eq!(shown["instance_list"], json!([]));
        let by_id = json(&db, &format!("hypervisor show {}", shown["id"]));
        assert_eq!(by_id["host"], "node-2");
        let text = manage(&db, "hypervisor show node-1").unwrap();
        assert!(text.starts_with("FIELD "), "{text}");
        assert!(text.contains("\nqueue_name           kvm\n"), "{text}");

        let err = manage(&db, "hypervisor show node-9").unwrap_err();
        assert_eq!(err.to_string(), "hypervisor node-9 could not be found");
    }
}
