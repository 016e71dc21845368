//! Stop, start and reboot as plain decisions: which task_state the API set for each, what a
//! finished one records, and when a graceful shutdown gives way to a power-off; and what the
//! periodic power-state sync makes of a domain that no longer matches the database. No I/O.

use std::time::Duration;

use proto::{power_state, task_state, vm_state, InstanceState};

/// How often a guest that has not shut down yet is asked again: it may have missed the first
/// request while it was still booting (Nova's `SHUTDOWN_RETRY_INTERVAL`).
pub const SHUTDOWN_RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// How often the power state is read while a guest boots or shuts down.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// A change of power the API asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Stop,
    Start,
    Reboot { hard: bool },
}

impl PowerAction {
    /// The instance action the API started for it.
    pub fn name(self) -> &'static str {
        match self {
            PowerAction::Stop => "stop",
            PowerAction::Start => "start",
            PowerAction::Reboot { .. } => "reboot",
        }
    }

    /// The task_state the API set before casting; every record of the outcome expects it, so
    /// a delete that took over meanwhile is left alone.
    pub fn task_state(self) -> &'static str {
        match self {
            PowerAction::Stop => task_state::POWERING_OFF,
            PowerAction::Start => task_state::POWERING_ON,
            PowerAction::Reboot { hard: false } => task_state::REBOOTING,
            PowerAction::Reboot { hard: true } => task_state::REBOOTING_HARD,
        }
    }

    /// The one vm_state the API allows it from, if there is one: a hard reboot also brings back
    /// a stopped instance (as in Nova).
    pub fn expected_vm_state(self) -> Option<&'static str> {
        match self {
            PowerAction::Stop | PowerAction::Reboot { hard: false } => Some(vm_state::ACTIVE),
            PowerAction::Start => Some(vm_state::STOPPED),
            PowerAction::Reboot { hard: true } => None,
        }
    }

    /// The state once it has succeeded.
    pub fn done(self) -> InstanceState {
        let (vm_state, power_state) = match self {
            PowerAction::Stop => (vm_state::STOPPED, power_state::SHUTDOWN),
            PowerAction::Start | PowerAction::Reboot { .. } => {
                (vm_state::ACTIVE, power_state::RUNNING)
            }
        };
        InstanceState {
            vm_state: vm_state.into(),
            task_state: None,
            power_state,
        }
    }
}

/// Whether `task_state` is that of a stop, start or reboot under way.
pub fn is_power_task(task_state: Option<&str>) -> bool {
    matches!(
        task_state,
        Some(
            task_state::POWERING_OFF
                | task_state::POWERING_ON
                | task_state::REBOOTING
                | task_state::REBOOTING_HARD
        )
    )
}

/// The state of an instance whose stop, start or reboot was cut short (by a restart of the
/// compute service), going by its domain's `power_state`: how far the action got.
pub fn settled(power_state: i32) -> InstanceState {
    let vm_state = if is_down(power_state) {
        vm_state::STOPPED
    } else {
        vm_state::ACTIVE
    };
    InstanceState {
        vm_state: vm_state.into(),
        task_state: None,
        power_state,
    }
}

/// What a graceful stop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStep {
    /// The guest is down (or on its way down): power off what is left.
    Down,
    /// Ask the guest to shut down (again).
    AskToShutDown,
    /// Read the power state again after [`POLL_INTERVAL`].
    Wait,
    /// The guest did not shut down in time: power it off.
    PowerOff,
}

/// The next step of a graceful stop that began `elapsed` ago, with the guest in `power_state`
/// and last asked to shut down `since_asked` ago (never: `None`). A `timeout` of zero powers
/// off at once, as Nova's `shutdown_timeout = 0` does.
pub fn stop_step(
    power_state: i32,
    elapsed: Duration,
    timeout: Duration,
    since_asked: Option<Duration>,
) -> StopStep {
    if is_down(power_state) {
        return StopStep::Down;
    }
    if elapsed >= timeout {
        return StopStep::PowerOff;
    }
    match since_asked {
        Some(since) if since < SHUTDOWN_RETRY_INTERVAL => StopStep::Wait,
        _ => StopStep::AskToShutDown,
    }
}

/// What the hypervisor shows of an instance's domain when the power-state sync looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainSeen {
    /// The domain exists in this power state.
    Power(i32),
    /// No domain of that name is defined.
    Missing,
}

/// What the power-state sync does about one instance (Nova's `_sync_instance_power_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncAction {
    /// Database and domain agree.
    Nothing,
    /// vm_state and domain agree; only the recorded power_state is stale.
    RecordPowerState(i32),
    /// The database says active but the domain went down behind Zova's back: the instance is
    /// stopped (what is left of the domain powered off, vm_state `stopped`, SHUTDOWN), as
    /// Nova's sync force-stops it.
    Stop,
    /// The database says stopped but the domain runs: the database holds the user's intent, so
    /// the domain is powered off and the instance stays `stopped`.
    PowerOff,
    /// The domain is gone from the hypervisor. Nova records NOSTATE and stops the instance;
    /// Zova puts it in ERROR with a fault instead, because a stopped instance must have a
    /// domain to start again and ERROR tells the user the one thing left to do: delete it.
    Gone,
}

/// The power-state sync's decision for an instance recorded as `vm_state` with `task_state`
/// and `recorded` power_state (`None`: not known), whose domain the hypervisor shows as `seen`.
/// Instances with a task under way are left to it, and only `active` and `stopped` instances
/// are corrected: one being built, in error or deleted has nothing a domain could contradict.
pub fn sync_power_state(
    vm_state: &str,
    task_state: Option<&str>,
    recorded: Option<i32>,
    seen: DomainSeen,
) -> SyncAction {
    if task_state.is_some() || !matches!(vm_state, vm_state::ACTIVE | vm_state::STOPPED) {
        return SyncAction::Nothing;
    }
    let DomainSeen::Power(power) = seen else {
        return SyncAction::Gone;
    };
    let off = matches!(power, power_state::SHUTDOWN | power_state::CRASHED);
    match vm_state {
        vm_state::ACTIVE if off => SyncAction::Stop,
        // A domain without a state is left alone, as in Nova: it is on its way somewhere.
        vm_state::STOPPED if !off && power != power_state::NOSTATE => SyncAction::PowerOff,
        _ if recorded != Some(power) => SyncAction::RecordPowerState(power),
        _ => SyncAction::Nothing,
    }
}

/// The power states a stop counts as done (Nova's `SHUTDOWN_STATES`).
fn is_down(state: i32) -> bool {
    matches!(
        state,
        power_state::SHUTDOWN | power_state::CRASHED | power_state::SUSPENDED
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_action_expects_its_task_state_and_records_its_end() {
        let cases = [
            (
                PowerAction::Stop,
                "stop",
                "powering-off",
                Some("active"),
                ("stopped", 4),
            ),
            (
                PowerAction::Start,
                "start",
                "powering-on",
                Some("stopped"),
                ("active", 1),
            ),
            (
                PowerAction::Reboot { hard: false },
                "reboot",
                "rebooting",
                Some("active"),
                ("active", 1),
            ),
            (
                PowerAction::Reboot { hard: true },
                "reboot",
                "rebooting_hard",
                None,
                ("active", 1),
            ),
        ];
        for (action, name, task, expected_vm_state, (vm, power)) in cases {
            assert_eq!(action.name(), name, "{action:?}");
            assert_eq!(action.task_state(), task, "{action:?}");
            assert_eq!(action.expected_vm_state(), expected_vm_state, "{action:?}");
            assert_eq!(
                action.done(),
                InstanceState {
                    vm_state: vm.into(),
                    task_state: None,
                    power_state: power,
                },
                "{action:?}"
            );
        }
    }

    #[test]
    fn an_interrupted_action_settles_where_its_domain_is() {
        for task in ["powering-off", "powering-on", "rebooting", "rebooting_hard"] {
            assert!(is_power_task(Some(task)), "{task}");
        }
        for other in [None, Some("spawning"), Some("deleting"), Some("scheduling")] {
            assert!(!is_power_task(other), "{other:?}");
        }
        let cases = [
            (power_state::RUNNING, "active"),
            (power_state::PAUSED, "active"),
            (power_state::NOSTATE, "active"),
            (power_state::SHUTDOWN, "stopped"),
            (power_state::CRASHED, "stopped"),
            (power_state::SUSPENDED, "stopped"),
        ];
        for (power, vm) in cases {
            assert_eq!(
                settled(power),
                InstanceState {
                    vm_state: vm.into(),
                    task_state: None,
                    power_state: power,
                },
                "power state {power}"
            );
        }
    }

    #[test]
    fn a_graceful_stop_asks_waits_asks_again_and_powers_off_at_the_timeout() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let minute = s(60);
        let running = power_state::RUNNING;
        let cases = [
            // (state, elapsed, timeout, since_asked, step)
            (running, s(0), minute, None, StopStep::AskToShutDown),
            (running, ms(500), minute, Some(ms(500)), StopStep::Wait),
            (running, s(9), minute, Some(s(9)), StopStep::Wait),
            (running, s(10), minute, Some(s(10)), StopStep::AskToShutDown),
            (running, s(59), minute, Some(s(9)), StopStep::Wait),
            (running, s(60), minute, Some(s(0)), StopStep::PowerOff),
            (running, s(0), s(0), None, StopStep::PowerOff),
            (
                power_state::PAUSED,
                s(30),
                minute,
                Some(s(1)),
                StopStep::Wait,
            ),
            (
                power_state::NOSTATE,
                s(1),
                minute,
                Some(s(1)),
                StopStep::Wait,
            ),
            (power_state::SHUTDOWN, s(0), minute, None, StopStep::Down),
            (
                power_state::SHUTDOWN,
                s(90),
                minute,
                Some(s(1)),
                StopStep::Down,
            ),
            (
                power_state::CRASHED,
                s(3),
                minute,
                Some(s(3)),
                StopStep::Down,
            ),
            (
                power_state::SUSPENDED,
                s(3),
                minute,
                Some(s(3)),
                StopStep::Down,
            ),
            (power_state::SHUTDOWN, s(0), s(0), None, StopStep::Down),
        ];
        for (state, elapsed, timeout, since_asked, step) in cases {
            assert_eq!(
                stop_step(state, elapsed, timeout, since_asked),
                step,
                "state {state}, {elapsed:?} of {timeout:?}, asked {since_asked:?} ago"
            );
        }
    }

    #[test]
    fn the_power_state_sync_corrects_what_the_domain_contradicts() {
        use DomainSeen::{Missing, Power};
        use SyncAction::*;
        let (active, stopped) = (vm_state::ACTIVE, vm_state::STOPPED);
        let running = power_state::RUNNING;
        let shutdown = power_state::SHUTDOWN;
        let cases = [
            // (vm_state, recorded power_state, domain, what the sync does)
            (active, Some(running), Power(running), Nothing),
            (active, Some(running), Power(shutdown), Stop),
            (active, Some(running), Power(power_state::CRASHED), Stop),
            (active, Some(shutdown), Power(shutdown), Stop),
            (active, Some(running), Missing, Gone),
            (active, Some(power_state::NOSTATE), Missing, Gone),
            (
                active,
                Some(running),
                Power(power_state::PAUSED),
                RecordPowerState(3),
            ),
            (
                active,
                Some(running),
                Power(power_state::SUSPENDED),
                RecordPowerState(7),
            ),
            (
                active,
                Some(running),
                Power(power_state::NOSTATE),
                RecordPowerState(0),
            ),
            (
                active,
                Some(power_state::NOSTATE),
                Power(running),
                RecordPowerState(1),
            ),
            (active, None, Power(running), RecordPowerState(1)),
            (stopped, Some(shutdown), Power(shutdown), Nothing),
            (stopped, Some(shutdown), Power(running), PowerOff),
            (stopped, Some(running), Power(running), PowerOff),
            (
                stopped,
                Some(shutdown),
                Power(power_state::PAUSED),
                PowerOff,
            ),
            (
                stopped,
                Some(shutdown),
                Power(power_state::SUSPENDED),
                PowerOff,
            ),
            (stopped, Some(shutdown), Missing, Gone),
            (stopped, Some(running), Power(shutdown), RecordPowerState(4)),
            (
                stopped,
                Some(shutdown),
                Power(power_state::CRASHED),
                RecordPowerState(6),
            ),
            (
                stopped,
                Some(shutdown),
                Power(power_state::NOSTATE),
                RecordPowerState(0),
            ),
            (stopped, None, Power(shutdown), RecordPowerState(4)),
        ];
        for (vm, recorded, seen, action) in cases {
            assert_eq!(
                sync_power_state(vm, None, recorded, seen),
                action,
                "{vm}, recorded {recorded:?}, domain {seen:?}"
            );
        }
    }

    #[test]
    fn the_power_state_sync_leaves_running_tasks_and_other_states_alone() {
        let seen = [
            DomainSeen::Missing,
            DomainSeen::Power(power_state::RUNNING),
            DomainSeen::Power(power_state::SHUTDOWN),
            DomainSeen::Power(power_state::CRASHED),
        ];
        let tasks = [
            "scheduling",
            "spawning",
            "deleting",
            "powering-off",
            "powering-on",
            "rebooting",
            "rebooting_hard",
        ];
        for domain in seen {
            for vm in ["active", "stopped", "building", "error", "deleted"] {
                for task in tasks {
                    assert_eq!(
                        sync_power_state(vm, Some(task), Some(power_state::RUNNING), domain),
                        SyncAction::Nothing,
                        "{vm} {task} {domain:?}"
                    );
                }
            }
            for vm in ["building", "error", "deleted"] {
                assert_eq!(
                    sync_power_state(vm, None, Some(power_state::NOSTATE), domain),
                    SyncAction::Nothing,
                    "{vm} {domain:?}"
                );
            }
        }
    }
}
