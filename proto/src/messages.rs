//! The typed arguments and replies of every RPC method, one struct per method.
//!
//! Fields added later must be `#[serde(default)]` so a peer of the previous minor version still
//! decodes them.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A remote method: its wire name, its argument struct (`Self`) and its reply.
pub trait Method: Serialize + DeserializeOwned + Send + Sync + 'static {
    const NAME: &'static str;
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

macro_rules! method {
    ($ty:ty, $name:literal, $reply:ty) => {
        impl Method for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

/// Declares one service's RPC surface: an enum with a variant per method it serves, decoded
/// from a request in one place, so a service's dispatch is one exhaustive `match`.
macro_rules! rpc_surface {
    ($(#[$doc:meta])* $surface:ident { $($method:ident),+ $(,)? }) => {
        $(#[$doc])*
        // Decoded once per request and moved into its handler; boxing the large variants
        // would only add an allocation.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq)]
        pub enum $surface {
            $($method($method)),+
        }

        impl $surface {
            /// The wire names of the methods this service serves.
            pub const METHODS: &'static [&'static str] = &[$(<$method as Method>::NAME),+];

            /// The typed request, `Ok(None)` for a method this service does not serve (a newer
            /// peer's, or a stray frame), or the decoding error for malformed arguments.
            pub fn decode(
                method: &str,
                payload: &[u8],
            ) -> Result<Option<Self>, crate::ProtoError> {
                $(
                    if method == <$method as Method>::NAME {
                        return crate::envelope::decode::<$method>(payload)
                            .map(|args| Some($surface::$method(args)));
                    }
                )+
                Ok(None)
            }

            /// The wire name of this request's method.
            pub fn name(&self) -> &'static str {
                match self {
                    $($surface::$method(_) => <$method as Method>::NAME),+
                }
            }
        }
    };
}

// ---------------------------------------------------------------- shared data

/// Nova's vm_state values used on the create path and by stop and start.
pub mod vm_state {
    pub const BUILDING: &str = "building";
    pub const ACTIVE: &str = "active";
    pub const STOPPED: &str = "stopped";
    pub const ERROR: &str = "error";
    pub const DELETED: &str = "deleted";
}

/// Nova's task_state values used on the create, delete, stop, start and reboot paths.
pub mod task_state {
    pub const SCHEDULING: &str = "scheduling";
    pub const SPAWNING: &str = "spawning";
    pub const DELETING: &str = "deleting";
    pub const POWERING_OFF: &str = "powering-off";
    pub const POWERING_ON: &str = "powering-on";
    pub const REBOOTING: &str = "rebooting";
    pub const REBOOTING_HARD: &str = "rebooting_hard";
}

/// Nova's power_state codes.
pub mod power_state {
    pub const NOSTATE: i32 = 0;
    pub const RUNNING: i32 = 1;
    pub const PAUSED: i32 = 3;
    pub const SHUTDOWN: i32 = 4;
    pub const CRASHED: i32 = 6;
    pub const SUSPENDED: i32 = 7;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlavorSpec {
    pub flavorid: String,
    pub name: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub root_gb: i64,
    pub ephemeral_gb: i64,
    pub swap_mb: i64,
    /// The flavor's extra specs; the scheduler reads `queue_name`.
    #[serde(default)]
    pub extra_specs: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub id: String,
    pub name: String,
    pub disk_format: String,
    /// Path of the base image file on the compute host, if the image has one; the qemu path
    /// uses it as the backing file of the instance disk.
    #[serde(default)]
    pub location: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerHints {
    /// Send the instance to exactly this host (admin only).
    #[serde(default)]
    pub scheduler_host: Option<String>,
    /// Keep only hosts whose name contains a match of this regular expression.
    #[serde(default)]
    pub scheduler_host_match: Option<String>,
    /// Skip hosts that run any of these instances.
    #[serde(default)]
    pub different_host: Vec<String>,
    /// Keep only hosts that run one of these instances.
    #[serde(default)]
    pub same_host: Vec<String>,
    /// The host queue to place in (overrides the flavor's `queue_name` extra spec).
    #[serde(default)]
    pub queue_name: Option<String>,
    /// The seed's walk direction: 1 (forward, the default) or -1.
    #[serde(default)]
    pub sign: Option<i8>,
    /// The seed's `boundary_host`: the walk stops when it reaches this host, without checking
    /// it (a walk that starts on it, or a host not in the queue, makes a full lap).
    #[serde(default)]
    pub boundary_host: Option<String>,
}

/// Hosts already tried for this instance, so a reschedule goes elsewhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrySpec {
    pub num_attempts: u32,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Why the last attempt failed, for the fault if no attempt is left.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Everything the scheduler and the compute need to place and build one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSpec {
    pub instance_uuid: String,
    pub display_name: String,
    pub project_id: String,
    pub flavor: FlavorSpec,
    pub image: ImageSpec,
    #[serde(default)]
    pub hints: SchedulerHints,
    #[serde(default)]
    pub retry: RetrySpec,
}

/// The ceilings the compute's claim must respect, as the scheduler computed them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub vcpu: f64,
    pub memory_mb: f64,
    pub disk_gb: f64,
}

/// vm_state, task_state and power_state always change together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    pub vm_state: String,
    pub task_state: Option<String>,
    pub power_state: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub code: i32,
    pub message: String,
    #[serde(default)]
    pub details: String,
}

/// Per-host settings the scheduler reads from `compute_nodes.extra_resources`. A ratio the
/// compute does not set falls back to the scheduler's `initial_*_allocation_ratio`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtraResources {
    #[serde(default)]
    pub queue_name: Option<String>,
    #[serde(default)]
    pub cpu_allocation_ratio: Option<f64>,
    #[serde(default)]
    pub ram_allocation_ratio: Option<f64>,
    #[serde(default)]
    pub disk_allocation_ratio: Option<f64>,
    /// Memory and disk kept back for the host itself, in MB.
    #[serde(default)]
    pub reserved_host_memory_mb: i64,
    #[serde(default)]
    pub reserved_host_disk_mb: i64,
}

/// The resources one instance holds on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceResources {
    pub uuid: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub root_gb: i64,
    pub ephemeral_gb: i64,
    pub swap_mb: i64,
    /// The instance's vm_state, so a restarted compute can tell interrupted builds apart.
    #[serde(default)]
    pub vm_state: String,
    /// The instance's task_state, so a restarted compute can tell interrupted stops, starts and
    /// reboots apart.
    #[serde(default)]
    pub task_state: Option<String>,
    /// The power_state the database records, so the power-state sync records only a change
    /// (`None` from a conductor that does not send it).
    #[serde(default)]
    pub power_state: Option<i32>,
}

// ---------------------------------------------------------------- conductor

/// api → conductor (cast): schedule these freshly inserted instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInstances {
    pub instance_uuids: Vec<String>,
    #[serde(default)]
    pub hints: SchedulerHints,
    /// How many of the instances must find a host for any of them to be built.
    #[serde(default = "one")]
    pub min_count: u32,
    /// The instances' request specs, in the order of `instance_uuids`, made by the API from the
    /// rows it has just written (as Nova's API hands its RequestSpec on). Empty from an API
    /// before 1.4: the conductor then reads each instance and its image. Protocol 1.4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub specs: Vec<RequestSpec>,
}

fn one() -> u32 {
    1
}
method!(BuildInstances, "build_instances", ());

/// compute → conductor (cast): the compute's claim refused the instance; place it again,
/// avoiding the hosts in `spec.retry` (the scheduler counts the attempts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RescheduleInstance {
    pub spec: RequestSpec,
    pub host: String,
    pub reason: String,
}
method!(RescheduleInstance, "reschedule_instance", ());

/// compute → conductor (call): record a state change, host, launch time or fault.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceUpdate {
    pub uuid: String,
    #[serde(default)]
    pub state: Option<InstanceState>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    /// Set `launched_at` to now.
    #[serde(default)]
    pub launched: bool,
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Apply only while the instance is in this vm_state (and, when `node` is set, placed on
    /// that node); otherwise the conductor answers `Conflict` and changes nothing.
    #[serde(default)]
    pub expected_vm_state: Option<String>,
    /// Apply only while the instance has this task_state (Nova's `expected_task_state`);
    /// otherwise `Conflict`. The end of a stop, start or reboot expects the task_state the API
    /// set for it, so it changes nothing once a delete (`deleting`) has taken over.
    #[serde(default)]
    pub expected_task_state: Option<String>,
    /// Apply only while no task runs on the instance (task_state NULL); otherwise `Conflict`.
    /// What the compute corrects on its own initiative (the power-state sync) expects this, so
    /// a user action or a delete started meanwhile wins. Ignored when `expected_task_state`
    /// is set.
    #[serde(default)]
    pub expect_no_task: bool,
    /// Without `state`: put task_state back to None and leave vm_state as it is, as a failed
    /// stop, start or reboot does (Nova's `reverts_task_state`).
    #[serde(default)]
    pub revert_task_state: bool,
    /// Without `state`: record this power_state alone (what the hypervisor showed after a
    /// failed stop, start or reboot).
    #[serde(default)]
    pub power_state: Option<i32>,
}
method!(InstanceUpdate, "instance_update", ());

/// compute → conductor (call): a stop, start or reboot the API recorded as an instance action
/// has ended; mark the action of `request_id` finished, with `message` (Nova's "Error") if it
/// failed. `NotFound` when no such action is unfinished (finished already, or never started).
///
/// A call of its own rather than a field of `InstanceUpdate`: the action ends even when the
/// state change is refused because a delete overtook it (actions outlive their instance), and a
/// conductor that does not know it says so instead of dropping it unnoticed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionFinish {
    pub uuid: String,
    pub request_id: String,
    #[serde(default)]
    pub message: Option<String>,
}
method!(InstanceActionFinish, "instance_action_finish", ());

/// compute → conductor (call): the domain is gone; soft-delete the row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDestroy {
    pub uuid: String,
}
method!(InstanceDestroy, "instance_destroy", ());

/// compute → conductor (call): give the instance a fixed IP address and MAC from a network's
/// pool (the same ones again if it holds them already). A pool with no free address is answered
/// with the error kind [`FIXED_IP_EXHAUSTED`]: another host would meet the same pool, so the
/// build fails instead of being rescheduled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocateFixedIp {
    pub instance_uuid: String,
}
method!(AllocateFixedIp, "allocate_fixed_ip", FixedIpInfo);

/// compute → conductor (call): a build starts on its host. Records `update` (the instance
/// spawning there, as [`InstanceUpdate`]) and gives the instance its fixed IP (as
/// [`AllocateFixedIp`]) in one database transaction, so a build costs one round trip and one
/// write less. Nothing of either is kept when one fails. Protocol 1.1: a conductor of 1.0
/// answers `NoSuchMethod`, and the compute sends the two instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartSpawning {
    pub update: InstanceUpdate,
}
method!(StartSpawning, "start_spawning", FixedIpInfo);

/// The `RemoteError::kind` of an exhausted fixed-IP pool.
pub const FIXED_IP_EXHAUSTED: &str = "FixedIpExhausted";

/// An instance's fixed IP address and what its NIC needs to know of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedIpInfo {
    pub address: String,
    pub mac: String,
    pub network: String,
    pub cidr: String,
    pub gateway: String,
    /// The host bridge the NIC joins; `None`: the hypervisor's default network.
    #[serde(default)]
    pub bridge: Option<String>,
}

/// compute → conductor (call): the instances the database places on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancesOnHost {
    pub host: String,
}
method!(InstancesOnHost, "instances_on_host", Vec<InstanceResources>);

/// compute → conductor (call): where the database places each of these instances. A compute
/// asks about the domains it found with no instance of its own behind them; a uuid missing
/// from the answer has no live instance row at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceHosts {
    pub uuids: Vec<String>,
}
method!(InstanceHosts, "instance_hosts", Vec<InstanceHost>);

/// A live instance and the host the database places it on (none while it is scheduled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceHost {
    pub uuid: String,
    pub host: Option<String>,
}

/// compute → conductor (call): register or refresh the service row with the RPC endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRegister {
    pub host: String,
    pub binary: String,
    pub rpc_endpoint: String,
    /// The CURVE public key (Z85) of that endpoint, when the service uses CURVE.
    #[serde(default)]
    pub rpc_public_key: Option<String>,
}
method!(ServiceRegister, "service_register", ());

/// compute → conductor (call): the periodic "I am alive".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHeartbeat {
    pub host: String,
    pub binary: String,
}
method!(ServiceHeartbeat, "service_heartbeat", ());

/// compute → conductor (call): `update_available_resource`, the compute-node row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeNodeUpdate {
    pub host: String,
    pub hypervisor_hostname: String,
    pub hypervisor_type: String,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub local_gb: i64,
    pub vcpus_used: i64,
    pub memory_mb_used: i64,
    pub local_gb_used: i64,
    pub running_vms: i64,
    pub extra_resources: ExtraResources,
}
method!(ComputeNodeUpdate, "compute_node_update", ());

// ---------------------------------------------------------------- scheduler

/// conductor → scheduler (cast): place these instances of one request in one pass. If fewer
/// than `min_count` fit, none is built; a reschedule is a batch of one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRunInstance {
    pub specs: Vec<RequestSpec>,
    #[serde(default = "one")]
    pub min_count: u32,
}
method!(ScheduleRunInstance, "new_run_instance", ());

/// operator → scheduler (call): rebuild the host queue now rather than at the next period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildQueue {}
method!(RebuildQueue, "build_queue", QueueSummary);

/// The host queue after a rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSummary {
    /// Hosts in a queue, by queue name.
    pub queues: std::collections::BTreeMap<String, usize>,
    /// Hosts left out (disabled, down), with the reason.
    pub unavailable: std::collections::BTreeMap<String, String>,
    /// Every queued host in walk order, queue by queue, with what it has free after allocation
    /// ratios (absent from older schedulers).
    #[serde(default)]
    pub hosts: Vec<QueuedHost>,
}

/// One host of a queue as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedHost {
    pub queue: String,
    pub hostname: String,
    pub free_vcpus: f64,
    pub free_memory_mb: f64,
    pub free_local_gb: f64,
}

// The free amounts come from finite row arithmetic (never NaN), so equality is total.
impl Eq for QueuedHost {}

// ---------------------------------------------------------------- compute

/// scheduler → compute.<host> (cast): claim and build this instance here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeRunInstance {
    pub spec: RequestSpec,
    pub node: String,
    pub limits: Limits,
    /// The address the scheduler's claim took when it placed the instance here: with a fresh
    /// cast (`cast_at_ms`) the compute skips [`StartSpawning`]. `None` (a scheduler before 1.3,
    /// or no address free): the compute asks for the address itself. Protocol 1.3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_ip: Option<FixedIpInfo>,
    /// When the scheduler sent this cast, in milliseconds since the Unix epoch by its clock. A
    /// cast taken much later (a host that hung) may have been given up on and the instance
    /// placed elsewhere, so the compute then checks in with [`StartSpawning`] before it builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cast_at_ms: Option<u64>,
}
method!(ComputeRunInstance, "new_run_instance", ());

/// api → compute.<host> (cast): destroy the domain and its disk, then destroy the row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateInstance {
    pub uuid: String,
}
method!(TerminateInstance, "terminate_instance", ());

/// api → compute.<host> (cast): shut the guest down (gracefully, then by force after
/// `[compute] shutdown_timeout`), keeping its domain; the instance becomes `stopped`. The API has
/// set task_state `powering-off` and started the `stop` action of the context's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopInstance {
    pub uuid: String,
}
method!(StopInstance, "stop_instance", ());

/// api → compute.<host> (cast): start the stopped instance's domain again; the instance
/// becomes `active`. The API has set task_state `powering-on` and started the `start` action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInstance {
    pub uuid: String,
}
method!(StartInstance, "start_instance", ());

/// api → compute.<host> (cast): reboot the guest, by asking it (`hard: false`, falling back to
/// hard when libvirt cannot) or by powering it off and on (`hard: true`); the instance ends
/// `active`. The API has set task_state `rebooting` or `rebooting_hard` and started the
/// `reboot` action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootInstance {
    pub uuid: String,
    pub hard: bool,
}
method!(RebootInstance, "reboot_instance", ());

/// any → any (call): liveness probe used by tests and operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {}
method!(Ping, "ping", String);

// ---------------------------------------------------------------- service surfaces

rpc_surface!(
    /// What `zova-conductor` serves: scheduling requests from the API and computes, and the
    /// compute nodes' database door.
    ConductorApi {
        BuildInstances,
        RescheduleInstance,
        InstanceUpdate,
        InstanceActionFinish,
        InstanceDestroy,
        InstancesOnHost,
        InstanceHosts,
        AllocateFixedIp,
        StartSpawning,
        ServiceRegister,
        ServiceHeartbeat,
        ComputeNodeUpdate,
        Ping,
    }
);

rpc_surface!(
    /// What `zova-scheduler` serves.
    SchedulerApi {
        ScheduleRunInstance,
        RebuildQueue,
        Ping,
    }
);

rpc_surface!(
    /// What `zova-compute` serves.
    ComputeApi {
        ComputeRunInstance,
        TerminateInstance,
        StopInstance,
        StartInstance,
        RebootInstance,
        Ping,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> crate::RequestContext {
        crate::RequestContext {
            request_id: "req-1".into(),
            user_id: "u".into(),
            project_id: "p".into(),
            roles: vec!["admin".into()],
            deadline_ms: None,
        }
    }

    /// Every method's arguments survive the envelope, and each surface decodes its own.
    #[test]
    fn every_message_type_round_trips_through_its_surface() {
        let spec = RequestSpec {
            instance_uuid: "i-1".into(),
            display_name: "vm".into(),
            project_id: "p".into(),
            flavor: FlavorSpec {
                flavorid: "1".into(),
                name: "m1.tiny".into(),
                vcpus: 1,
                memory_mb: 512,
                root_gb: 1,
                ephemeral_gb: 0,
                swap_mb: 0,
                extra_specs: [("queue_name".to_string(), "gpu".to_string())].into(),
            },
            image: ImageSpec {
                id: "img".into(),
                name: "cirros".into(),
                disk_format: "qcow2".into(),
                location: Some("/images/cirros.qcow2".into()),
            },
            hints: SchedulerHints {
                scheduler_host: Some("node-1".into()),
                scheduler_host_match: Some("^node".into()),
                different_host: vec!["a".into()],
                same_host: vec!["b".into()],
                queue_name: Some("gpu".into()),
                sign: Some(-1),
                boundary_host: Some("node-3".into()),
            },
            retry: RetrySpec {
                num_attempts: 1,
                hosts: vec!["node-2".into()],
                last_error: Some("full".into()),
            },
        };
        let limits = Limits {
            vcpu: 16.0,
            memory_mb: 4096.0,
            disk_gb: 40.0,
        };
        fn through<M: Method + Clone>(args: &M) -> (String, Vec<u8>) {
            let envelope =
                crate::Envelope::request(crate::Kind::Call, M::NAME, &context(), args).unwrap();
            let bytes = envelope.to_bytes().unwrap();
            let back = crate::Envelope::from_bytes(&bytes).unwrap();
            (back.method, back.payload)
        }
        macro_rules! check {
            ($surface:ident, $variant:ident, $value:expr) => {{
                let value = $value;
                let (method, payload) = through(&value);
                assert_eq!(
                    $surface::decode(&method, &payload).unwrap(),
                    Some($surface::$variant(value.clone())),
                    "{}",
                    stringify!($variant)
                );
            }};
        }
        check!(
            ConductorApi,
            BuildInstances,
            BuildInstances {
                instance_uuids: vec!["i-1".into(), "i-2".into()],
                hints: spec.hints.clone(),
                min_count: 2,
                specs: vec![spec.clone(), spec.clone()],
            }
        );
        check!(
            ConductorApi,
            RescheduleInstance,
            RescheduleInstance {
                spec: spec.clone(),
                host: "node-1".into(),
                reason: "full".into(),
            }
        );
        check!(
            ConductorApi,
            InstanceUpdate,
            InstanceUpdate {
                uuid: "i-1".into(),
                state: Some(InstanceState {
                    vm_state: vm_state::BUILDING.into(),
                    task_state: Some(task_state::SPAWNING.into()),
                    power_state: power_state::NOSTATE,
                }),
                host: Some("node-1".into()),
                node: Some("node-1".into()),
                launched: true,
                fault: Some(Fault {
                    code: 500,
                    message: "boom".into(),
                    details: "trace".into(),
                }),
                expected_vm_state: Some(vm_state::BUILDING.into()),
                expected_task_state: Some(task_state::SPAWNING.into()),
                expect_no_task: true,
                revert_task_state: true,
                power_state: Some(power_state::SHUTDOWN),
            }
        );
        check!(
            ConductorApi,
            InstanceActionFinish,
            InstanceActionFinish {
                uuid: "i-1".into(),
                request_id: "req-1".into(),
                message: Some("Error".into()),
            }
        );
        check!(
            ConductorApi,
            InstanceDestroy,
            InstanceDestroy { uuid: "i-1".into() }
        );
        check!(
            ConductorApi,
            InstancesOnHost,
            InstancesOnHost {
                host: "node-1".into()
            }
        );
        check!(
            ConductorApi,
            InstanceHosts,
            InstanceHosts {
                uuids: vec!["i-1".into(), "i-2".into()]
            }
        );
        check!(
            ConductorApi,
            AllocateFixedIp,
            AllocateFixedIp {
                instance_uuid: "i-1".into()
            }
        );
        check!(
            ConductorApi,
            StartSpawning,
            StartSpawning {
                update: InstanceUpdate {
                    uuid: "i-1".into(),
                    host: Some("node-1".into()),
                    expected_vm_state: Some("building".into()),
                    ..Default::default()
                }
            }
        );
        check!(
            ConductorApi,
            ServiceRegister,
            ServiceRegister {
                host: "node-1".into(),
                binary: "zova-compute".into(),
                rpc_endpoint: "tcp://127.0.0.1:5571".into(),
                rpc_public_key: Some("rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7".into()),
            }
        );
        check!(
            ConductorApi,
            ServiceHeartbeat,
            ServiceHeartbeat {
                host: "node-1".into(),
                binary: "zova-compute".into(),
            }
        );
        check!(
            ConductorApi,
            ComputeNodeUpdate,
            ComputeNodeUpdate {
                host: "node-1".into(),
                hypervisor_hostname: "node-1".into(),
                hypervisor_type: "QEMU".into(),
                vcpus: 8,
                memory_mb: 16384,
                local_gb: 100,
                vcpus_used: 1,
                memory_mb_used: 512,
                local_gb_used: 1,
                running_vms: 1,
                extra_resources: ExtraResources {
                    queue_name: Some("kvm".into()),
                    cpu_allocation_ratio: Some(16.0),
                    ram_allocation_ratio: None,
                    disk_allocation_ratio: Some(1.0),
                    reserved_host_memory_mb: 512,
                    reserved_host_disk_mb: 0,
                },
            }
        );
        check!(ConductorApi, Ping, Ping {});
        check!(
            SchedulerApi,
            ScheduleRunInstance,
            ScheduleRunInstance {
                specs: vec![spec.clone()],
                min_count: 1,
            }
        );
        check!(SchedulerApi, RebuildQueue, RebuildQueue {});
        check!(
            ComputeApi,
            ComputeRunInstance,
            ComputeRunInstance {
                spec: spec.clone(),
                node: "node-1".into(),
                limits,
                fixed_ip: Some(FixedIpInfo {
                    address: "10.0.0.5".into(),
                    mac: "fa:16:3e:00:00:05".into(),
                    network: "private".into(),
                    cidr: "10.0.0.0/24".into(),
                    gateway: "10.0.0.1".into(),
                    bridge: None,
                }),
                cast_at_ms: Some(1_764_806_400_000),
            }
        );
        check!(
            ComputeApi,
            TerminateInstance,
            TerminateInstance { uuid: "i-1".into() }
        );
        check!(
            ComputeApi,
            StopInstance,
            StopInstance { uuid: "i-1".into() }
        );
        check!(
            ComputeApi,
            StartInstance,
            StartInstance { uuid: "i-1".into() }
        );
        check!(
            ComputeApi,
            RebootInstance,
            RebootInstance {
                uuid: "i-1".into(),
                hard: true,
            }
        );

        // Replies too.
        let summary = QueueSummary {
            queues: [("kvm".to_string(), 3)].into(),
            unavailable: [("node-9".to_string(), "disabled".to_string())].into(),
            hosts: vec![QueuedHost {
                queue: "kvm".into(),
                hostname: "node-1".into(),
                free_vcpus: 3.5,
                free_memory_mb: 1024.0,
                free_local_gb: 10.0,
            }],
        };
        let bytes = crate::envelope::encode(&summary).unwrap();
        assert_eq!(
            crate::envelope::decode::<QueueSummary>(&bytes).unwrap(),
            summary
        );
        let resources = vec![InstanceResources {
            uuid: "i-1".into(),
            vcpus: 1,
            memory_mb: 512,
            root_gb: 1,
            ephemeral_gb: 0,
            swap_mb: 0,
            vm_state: "active".into(),
            task_state: Some(task_state::POWERING_OFF.into()),
            power_state: Some(power_state::RUNNING),
        }];
        let bytes = crate::envelope::encode(&resources).unwrap();
        assert_eq!(
            crate::envelope::decode::<Vec<InstanceResources>>(&bytes).unwrap(),
            resources
        );
    }

    #[test]
    fn a_surface_does_not_serve_other_services_methods() {
        let payload = crate::envelope::encode(&TerminateInstance { uuid: "i".into() }).unwrap();
        assert_eq!(
            SchedulerApi::decode("terminate_instance", &payload).unwrap(),
            None
        );
        assert!(ComputeApi::decode("terminate_instance", b"\xc1").is_err());
        assert!(SchedulerApi::METHODS.contains(&"build_queue"));
        assert_eq!(
            ComputeApi::decode("ping", &crate::envelope::encode(&Ping {}).unwrap())
                .unwrap()
                .map(|r| r.name()),
            Some("ping")
        );
    }

    /// An older compute's `instance_update`, without the power-action fields, still decodes:
    /// no task_state expectation, nothing reverted.
    #[test]
    fn an_instance_update_from_an_older_peer_decodes_with_defaults() {
        #[derive(Serialize)]
        struct OlderUpdate {
            uuid: String,
            state: Option<InstanceState>,
            expected_vm_state: Option<String>,
        }
        let payload = crate::envelope::encode(&OlderUpdate {
            uuid: "i-1".into(),
            state: None,
            expected_vm_state: Some(vm_state::BUILDING.into()),
        })
        .unwrap();
        assert_eq!(
            ConductorApi::decode("instance_update", &payload).unwrap(),
            Some(ConductorApi::InstanceUpdate(InstanceUpdate {
                uuid: "i-1".into(),
                expected_vm_state: Some(vm_state::BUILDING.into()),
                ..Default::default()
            }))
        );
    }

    /// A newer peer may add optional fields: an older one still decodes the message.
    #[test]
    fn extra_fields_from_a_newer_minor_version_are_ignored() {
        #[derive(Serialize)]
        struct NewerTerminate {
            uuid: String,
            graceful_timeout_s: u32,
            reason: Option<String>,
        }
        let payload = crate::envelope::encode(&NewerTerminate {
            uuid: "i-1".into(),
            graceful_timeout_s: 30,
            reason: Some("user".into()),
        })
        .unwrap();
        assert_eq!(
            ComputeApi::decode("terminate_instance", &payload).unwrap(),
            Some(ComputeApi::TerminateInstance(TerminateInstance {
                uuid: "i-1".into()
            }))
        );
    }
}
