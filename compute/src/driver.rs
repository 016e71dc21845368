//! The thin shell around libvirt (`virt` crate): open a connection, define and start a domain,
//! read its power state, shut it down, power it off and on, reboot it, destroy and undefine it,
//! report the node's size.
//!
//! Every call blocks; the service runs them on `tokio::task::spawn_blocking` with an
//! `Arc<LibvirtDriver>` (the connection is `Send + Sync`: libvirt connections are thread-safe).

use serde::{Deserialize, Serialize};

use proto::power_state;
use thiserror::Error;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::error::ErrorNumber;

use crate::domain_xml::{
    domain_name_in, domain_uuid_in, domain_xml, DiskCache, DomainSpec, InstanceMetadata,
};

/// The node's size as libvirt reports it (before allocation ratios).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    pub vcpus: i64,
    pub memory_mb: i64,
}

#[derive(Debug, Error)]
pub enum DriverError {
    #[error("Cannot connect to libvirt at {uri}: {reason}. Is libvirtd running, and may this user use it?")]
    Connect { uri: String, reason: String },
    #[error("libvirt refused the definition of domain {name}: {reason}")]
    Define { name: String, reason: String },
    #[error("libvirt could not start domain {name}: {reason}")]
    Start { name: String, reason: String },
    #[error("Domain {name} does not exist on this hypervisor")]
    NotFound { name: String },
    #[error("Cannot read the state of domain {name}: {reason}")]
    State { name: String, reason: String },
    #[error("Cannot destroy or undefine domain {name}: {reason}")]
    Destroy { name: String, reason: String },
    #[error("Cannot ask domain {name} to shut down: {reason}")]
    Shutdown { name: String, reason: String },
    #[error("Cannot power off domain {name}: {reason}")]
    PowerOff { name: String, reason: String },
    #[error("Cannot start domain {name}: {reason}")]
    PowerOn { name: String, reason: String },
    #[error("Cannot reboot domain {name}: {reason}")]
    Reboot { name: String, reason: String },
    #[error("Cannot list the domains of this hypervisor: {0}")]
    List(String),
    #[error("Cannot read this hypervisor's CPU and memory size: {0}")]
    NodeInfo(String),
}

/// One libvirt connection, shared by every request of the compute service.
#[derive(Debug)]
pub struct LibvirtDriver {
    conn: Connect,
    uri: String,
    domain_type: &'static str,
    /// Why domains are not `kvm`, for the log.
    no_kvm_because: Option<String>,
}

/// Which `<domain type=…>` QEMU domains get (`[compute] virt_type`, Nova's
/// `[libvirt] virt_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VirtType {
    /// `kvm` when a KVM guest starts (tried once when the service starts), else emulated
    /// `qemu`: a host whose `/dev/kvm` exists but cannot run guests still boots them, slower.
    #[default]
    Auto,
    Kvm,
    Qemu,
}

impl LibvirtDriver {
    /// Connects to `uri` (`test:///default`, `qemu:///system`, …), choosing the domain type
    /// automatically.
    pub fn open(uri: &str) -> Result<Self, DriverError> {
        Self::open_with(uri, VirtType::Auto)
    }

    /// Connects to `uri` with the given choice of domain type.
    pub fn open_with(uri: &str, virt_type: VirtType) -> Result<Self, DriverError> {
        // libvirt's default handler prints every error to stderr as well; ours carry libvirt's
        // message, so the duplicate is only noise.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| DriverError::Connect {
            uri: uri.to_owned(),
            reason: e.message().to_owned(),
        })?;
        let kvm = match virt_type {
            VirtType::Auto if is_test_uri(uri) => Err("the test driver".to_owned()),
            VirtType::Auto => kvm_check(&conn),
            VirtType::Kvm => Ok(()),
            VirtType::Qemu => Err("[compute] virt_type = \"qemu\"".to_owned()),
        };
        Ok(Self {
            domain_type: domain_type_for(uri, kvm.is_ok()),
            no_kvm_because: kvm.err(),
            conn,
            uri: uri.to_owned(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Why this host's domains do not use KVM; None when they do.
    pub fn no_kvm_because(&self) -> Option<&str> {
        self.no_kvm_because.as_deref()
    }

    /// The `<domain type=…>` this host's domains get: `test` on the test driver, `kvm` when the
    /// host has `/dev/kvm`, plain (emulated) `qemu` otherwise.
    pub fn domain_type(&self) -> &'static str {
        self.domain_type
    }

    /// The compute node's `hypervisor_type`, as Nova reports it.
    pub fn hypervisor_type(&self) -> &'static str {
        if self.domain_type == "test" {
            "test"
        } else {
            "QEMU"
        }
    }

    /// The host's CPU count and memory (virNodeGetInfo; memory comes in KiB).
    pub fn node_info(&self) -> Result<NodeInfo, DriverError> {
        let info = self
            .conn
            .node_info()
            .map_err(|e| DriverError::NodeInfo(e.message().to_owned()))?;
        Ok(NodeInfo {
            vcpus: i64::from(info.cpus),
            memory_mb: i64::try_from(info.memory / 1024).unwrap_or(i64::MAX),
        })
    }

    /// Starts the domain described by `xml` and makes it persistent, and returns its state just
    /// after (a Nova `power_state` code; NOSTATE when it cannot be read), so a caller waiting
    /// for RUNNING usually need not look again. The end is Nova's, a defined and running domain,
    /// in the other order: starting a defined domain copies its definition (libvirt formats and
    /// parses it again), a quarter of a boot's libvirt time on the test hypervisor, while
    /// defining a running one only parses the XML. If the definition fails, the guest this call
    /// started is stopped again, so a failed boot leaves nothing behind; a definition made
    /// before the call (a retried build) stays as it was. The XML must carry the domain's
    /// `<uuid>` (Zova's is the instance's): without one, the start and the definition would each
    /// make up a different one.
    pub fn define_and_start(&self, xml: &str) -> Result<i32, DriverError> {
        let name = domain_name_in(xml).unwrap_or_else(|| "(no <name> in the XML)".to_owned());
        if domain_uuid_in(xml).is_none() {
            return Err(DriverError::Define {
                name,
                reason: "the domain XML has no <uuid>".into(),
            });
        }
        let domain = self.conn.create_domain_xml(xml, 0).map_err(|e| {
            let reason = e.message().to_owned();
            if refuses_the_xml(&e) {
                DriverError::Define {
                    name: name.clone(),
                    reason,
                }
            } else {
                DriverError::Start {
                    name: name.clone(),
                    reason,
                }
            }
        })?;
        if let Err(e) = self.conn.define_domain_xml(xml) {
            let mut reason = e.message().to_owned();
            if let Err(destroy) = domain.destroy() {
                reason.push_str("; stopping the guest again also failed: ");
                reason.push_str(destroy.message());
            }
            return Err(DriverError::Define { name, reason });
        }
        // The guest started: a state that cannot be read now is for the caller's wait to find,
        // not a failed boot.
        Ok(state_of(&domain, &name).unwrap_or(power_state::NOSTATE))
    }

    /// Whether the domain has a definition of its own: a boot cut short between its start and
    /// its definition leaves a transient one.
    pub fn is_persistent(&self, name: &str) -> Result<bool, DriverError> {
        let domain = self.domain(name)?;
        domain
            .is_persistent()
            .map_err(|e| domain_error(name, &e, |name, reason| DriverError::State { name, reason }))
    }

    /// The domain's state as a Nova `power_state` code.
    pub fn power_state(&self, name: &str) -> Result<i32, DriverError> {
        state_of(&self.domain(name)?, name)
    }

    /// Asks the guest to shut down (the ACPI power button) and returns at once: the caller
    /// polls [`LibvirtDriver::power_state`]. A domain that is not running is where this leads.
    pub fn shutdown(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.domain(name)?;
        if !is_active(&domain, name)? {
            return Ok(());
        }
        match domain.shutdown() {
            Ok(()) => Ok(()),
            // Went down between the check and the call (libvirt's error code for that differs
            // between drivers).
            Err(_) if !still_active(&domain) => Ok(()),
            Err(e) => Err(domain_error(name, &e, |name, reason| {
                DriverError::Shutdown { name, reason }
            })),
        }
    }

    /// Stops the domain at once (virDomainDestroy, the power cord) and keeps its definition, so
    /// it can be started again. A domain that is not running is success.
    pub fn power_off(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.domain(name)?;
        if !is_active(&domain, name)? {
            return Ok(());
        }
        match domain.destroy() {
            Ok(()) => Ok(()),
            Err(_) if !still_active(&domain) => Ok(()),
            Err(e) => Err(domain_error(name, &e, |name, reason| {
                DriverError::PowerOff { name, reason }
            })),
        }
    }

    /// Starts the defined domain (virDomainCreate). A domain that already runs is success.
    pub fn power_on(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.domain(name)?;
        if is_active(&domain, name)? {
            return Ok(());
        }
        match domain.create() {
            Ok(()) => Ok(()),
            // Started by someone else between the check and the call.
            Err(_) if domain.is_active().unwrap_or(false) => Ok(()),
            Err(e) => Err(domain_error(name, &e, |name, reason| {
                DriverError::PowerOn { name, reason }
            })),
        }
    }

    /// Asks the guest to reboot, by the hypervisor's default method. Fails when the domain is
    /// not running or the hypervisor cannot; [`LibvirtDriver::hard_reboot`] then does it.
    pub fn reboot(&self, name: &str) -> Result<(), DriverError> {
        let domain = self.domain(name)?;
        domain
            .reboot(virt::sys::VIR_DOMAIN_REBOOT_DEFAULT)
            .map_err(|e| {
                domain_error(name, &e, |name, reason| DriverError::Reboot {
                    name,
                    reason,
                })
            })
    }

    /// Powers the domain off if it runs and starts it again from its definition.
    pub fn hard_reboot(&self, name: &str) -> Result<(), DriverError> {
        self.power_off(name)?;
        self.power_on(name)
    }

    /// Stops the domain if it runs and removes its definition. A domain that does not exist
    /// (never did, or a previous delete got there first) is success: deletes are repeated.
    pub fn destroy_and_undefine(&self, name: &str) -> Result<(), DriverError> {
        let Some(domain) = self.lookup(name)? else {
            return Ok(());
        };
        let failed = |e: virt::error::Error| DriverError::Destroy {
            name: name.to_owned(),
            reason: e.message().to_owned(),
        };
        match domain.is_active() {
            Ok(true) => match domain.destroy() {
                Ok(()) => {}
                // Stopped (or vanished) between the check and the destroy: nothing left to stop.
                Err(e) if is_no_domain(&e) || is_not_running(&e) => {}
                Err(e) => return Err(failed(e)),
            },
            Ok(false) => {}
            Err(e) if is_no_domain(&e) => return Ok(()),
            Err(e) => return Err(failed(e)),
        }
        // A transient domain is gone once destroyed; only a persistent one has a definition.
        match domain.is_persistent() {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) if is_no_domain(&e) => return Ok(()),
            Err(e) => return Err(failed(e)),
        }
        // A managed-save image would otherwise block the undefine.
        match domain.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE) {
            Ok(()) => Ok(()),
            Err(e) if is_no_domain(&e) => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }

    /// The names of all defined domains, running or not.
    pub fn domain_names(&self) -> Result<Vec<String>, DriverError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(|e| DriverError::List(e.message().to_owned()))?;
        domains
            .iter()
            .map(|domain| {
                domain
                    .name()
                    .map_err(|e| DriverError::List(e.message().to_owned()))
            })
            .collect()
    }

    /// The domain called `name`, which must exist.
    fn domain(&self, name: &str) -> Result<Domain, DriverError> {
        self.lookup(name)?.ok_or_else(|| DriverError::NotFound {
            name: name.to_owned(),
        })
    }

    /// The domain called `name`, or `None` if libvirt has no such domain.
    fn lookup(&self, name: &str) -> Result<Option<Domain>, DriverError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(domain) => Ok(Some(domain)),
            Err(e) if is_no_domain(&e) => Ok(None),
            Err(e) => Err(DriverError::State {
                name: name.to_owned(),
                reason: e.message().to_owned(),
            }),
        }
    }
}

/// `test` for libvirt's test driver, else `kvm` when the host can accelerate, else `qemu`.
fn domain_type_for(uri: &str, has_kvm: bool) -> &'static str {
    if is_test_uri(uri) {
        "test"
    } else if has_kvm {
        "kvm"
    } else {
        "qemu"
    }
}

/// Whether a KVM guest really runs here; Err says why not. libvirt's capabilities say KVM when
/// `/dev/kvm` answered libvirt (root), yet QEMU runs as its own user and may not open it, or may
/// open it and fail on the first instruction; so a tiny transient domain is started, left to run
/// its firmware for a moment, and destroyed (well under a second, once per start of the service).
fn kvm_check(conn: &Connect) -> Result<(), String> {
    conn.domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0)
        .map_err(|e| format!("libvirt reports no KVM: {}", e.message()))?;
    let uuid = uuid::Uuid::new_v4().to_string();
    let probe = DomainSpec {
        name: format!("zova-kvm-probe-{uuid}"),
        uuid,
        vcpus: 1,
        memory_mb: 16,
        domain_type: "kvm".into(),
        disks: Vec::new(),
        disk_cache: DiskCache::None,
        mac_address: None,
        network: None,
        bridge: None,
        display_name: "Zova's check that KVM guests can run".into(),
        console_log: None,
        metadata: InstanceMetadata::default(),
    };
    let xml = domain_xml(&probe).map_err(|e| e.to_string())?;
    let domain = conn
        .create_domain_xml(&xml, 0)
        .map_err(|e| format!("a KVM guest does not start: {}", e.message()))?;
    // A vCPU that cannot run (KVM_RUN failing) stops or crashes the guest within moments.
    std::thread::sleep(KVM_PROBE_RUN);
    let state = domain
        .state()
        .map(|(state, _)| state.known())
        .map_err(|e| e.message().to_owned());
    // A transient domain vanishes once destroyed.
    let _ = domain.destroy();
    match state {
        Ok(Some(DomainState::Running | DomainState::Blocked)) => Ok(()),
        Ok(other) => Err(format!(
            "a KVM guest started but did not keep running (libvirt state {other:?})"
        )),
        Err(reason) => Err(format!("a KVM guest's state cannot be read: {reason}")),
    }
}

/// How long the KVM probe lets its guest run before looking.
const KVM_PROBE_RUN: std::time::Duration = std::time::Duration::from_millis(300);

fn is_test_uri(uri: &str) -> bool {
    uri.starts_with("test:") || uri.starts_with("test+")
}

/// Nova's mapping of libvirt states (nova/virt/libvirt/driver.py, LIBVIRT_POWER_STATE).
fn nova_power_state(state: DomainState) -> i32 {
    match state {
        DomainState::NoState => power_state::NOSTATE,
        // "Blocked" is a running domain whose vCPUs are idle.
        DomainState::Running | DomainState::Blocked => power_state::RUNNING,
        DomainState::Paused => power_state::PAUSED,
        // "Shutdown" is a domain on its way down; Nova counts it as down already.
        DomainState::Shutdown | DomainState::Shutoff => power_state::SHUTDOWN,
        DomainState::Crashed => power_state::CRASHED,
        DomainState::PMSuspended => power_state::SUSPENDED,
    }
}

/// The state of `domain` (named `name`) as a Nova `power_state` code.
fn state_of(domain: &Domain, name: &str) -> Result<i32, DriverError> {
    let (state, _reason) = domain.state().map_err(|e| {
        if is_no_domain(&e) {
            DriverError::NotFound {
                name: name.to_owned(),
            }
        } else {
            DriverError::State {
                name: name.to_owned(),
                reason: e.message().to_owned(),
            }
        }
    })?;
    Ok(state.known().map_or(power_state::NOSTATE, nova_power_state))
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code().is(ErrorNumber::NoDomain)
}

/// Whether libvirt refused the domain's XML itself rather than failed to start what it says.
fn refuses_the_xml(e: &virt::error::Error) -> bool {
    let code = e.code();
    code.is(ErrorNumber::XmlError)
        || code.is(ErrorNumber::XmlDetail)
        || code.is(ErrorNumber::XmlInvalidSchema)
        || code.is(ErrorNumber::ConfigUnsupported)
        || code.is(ErrorNumber::InvalidArg)
}

fn is_not_running(e: &virt::error::Error) -> bool {
    e.code().is(ErrorNumber::OperationInvalid)
}

/// Whether `domain` (called `name`) runs.
fn is_active(domain: &Domain, name: &str) -> Result<bool, DriverError> {
    domain
        .is_active()
        .map_err(|e| domain_error(name, &e, |name, reason| DriverError::State { name, reason }))
}

/// Whether the domain runs, counting a domain whose state cannot be read as running (so an
/// error about it is reported rather than taken for "already stopped").
fn still_active(domain: &Domain) -> bool {
    domain.is_active().unwrap_or(true)
}

/// libvirt's failure `e` on domain `name` as `other`, or as `NotFound` if the domain vanished
/// between the lookup and the call.
fn domain_error(
    name: &str,
    e: &virt::error::Error,
    other: fn(String, String) -> DriverError,
) -> DriverError {
    if is_no_domain(e) {
        DriverError::NotFound {
            name: name.to_owned(),
        }
    } else {
        other(name.to_owned(), e.message().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain_xml::{
        domain_xml, instance_name, mac_address_for, DomainSpec, InstanceMetadata,
    };

    const TEST_URI: &str = "test:///default";

    fn driver() -> LibvirtDriver {
        LibvirtDriver::open(TEST_URI).expect("the test driver runs in-process")
    }

    /// A domain spec with a fresh uuid: the test driver's state is shared by every test in
    /// this process.
    fn fresh_spec() -> DomainSpec {
        let uuid = uuid::Uuid::new_v4().to_string();
        DomainSpec {
            name: instance_name(&uuid),
            mac_address: Some(mac_address_for(&uuid)),
            uuid,
            vcpus: 1,
            memory_mb: 128,
            domain_type: "test".into(),
            disks: vec!["/var/lib/zova/instances/test/disk".into()],
            disk_cache: DiskCache::None,
            network: None,
            bridge: None,
            display_name: "driver test <&>".into(),
            console_log: None,
            metadata: InstanceMetadata {
                flavor_name: "m1.tiny".into(),
                ..InstanceMetadata::default()
            },
        }
    }

    #[test]
    fn the_driver_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LibvirtDriver>();
    }

    #[test]
    fn the_test_driver_reports_its_kind_and_size() {
        let driver = driver();
        assert_eq!(driver.uri(), TEST_URI);
        assert_eq!(driver.domain_type(), "test");
        assert_eq!(driver.hypervisor_type(), "test");
        let node = driver.node_info().unwrap();
        assert!(node.vcpus > 0, "{node:?}");
        assert!(node.memory_mb > 0, "{node:?}");
    }

    #[test]
    fn domain_type_follows_the_uri_and_kvm() {
        assert_eq!(domain_type_for("test:///default", true), "test");
        assert_eq!(domain_type_for("qemu:///system", true), "kvm");
        assert_eq!(domain_type_for("qemu:///system", false), "qemu");
        assert_eq!(domain_type_for("qemu+ssh://host/system", false), "qemu");
    }

    #[test]
    fn a_domain_boots_runs_and_is_deleted_twice() {
        let driver = driver();
        let spec = fresh_spec();
        let started = driver
            .define_and_start(&domain_xml(&spec).unwrap())
            .unwrap();
        assert_eq!(
            started,
            power_state::RUNNING,
            "the state just after the start"
        );

        assert_eq!(
            driver.power_state(&spec.name).unwrap(),
            power_state::RUNNING
        );
        assert!(driver.domain_names().unwrap().contains(&spec.name));

        driver.destroy_and_undefine(&spec.name).unwrap();
        assert!(!driver.domain_names().unwrap().contains(&spec.name));
        assert!(matches!(
            driver.power_state(&spec.name),
            Err(DriverError::NotFound { .. })
        ));
        driver.destroy_and_undefine(&spec.name).unwrap();
    }

    #[test]
    fn a_stopped_domain_is_undefined_and_listed_until_then() {
        let driver = driver();
        let spec = fresh_spec();
        let domain = driver
            .conn
            .define_domain_xml(&domain_xml(&spec).unwrap())
            .unwrap();
        assert!(!domain.is_active().unwrap());
        assert!(driver.domain_names().unwrap().contains(&spec.name));
        assert_eq!(
            driver.power_state(&spec.name).unwrap(),
            power_state::SHUTDOWN
        );

        driver.destroy_and_undefine(&spec.name).unwrap();
        assert!(!driver.domain_names().unwrap().contains(&spec.name));
    }

    #[test]
    fn a_paused_domain_reports_paused() {
        let driver = driver();
        let spec = fresh_spec();
        driver
            .define_and_start(&domain_xml(&spec).unwrap())
            .unwrap();
        driver
            .conn
            .lookup_domain_by_name(&spec.name)
            .unwrap()
            .suspend()
            .unwrap();
        assert_eq!(driver.power_state(&spec.name).unwrap(), power_state::PAUSED);
        driver.destroy_and_undefine(&spec.name).unwrap();
    }

    /// Defines and starts a fresh domain; returns its name.
    fn running_domain(driver: &LibvirtDriver) -> String {
        let spec = fresh_spec();
        driver
            .define_and_start(&domain_xml(&spec).unwrap())
            .unwrap();
        spec.name
    }

    fn is_defined(driver: &LibvirtDriver, name: &str) -> bool {
        driver.domain_names().unwrap().iter().any(|n| n == name)
    }

    #[test]
    fn a_shut_down_domain_stays_defined_and_starts_again() {
        let driver = driver();
        let name = running_domain(&driver);

        driver.shutdown(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::SHUTDOWN);
        assert!(is_defined(&driver, &name));
        // Both are repeated safely on a domain that is already down.
        driver.shutdown(&name).unwrap();
        driver.power_off(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::SHUTDOWN);

        driver.power_on(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::RUNNING);
        driver.power_on(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::RUNNING);

        driver.destroy_and_undefine(&name).unwrap();
        assert!(!is_defined(&driver, &name));
    }

    #[test]
    fn a_powered_off_domain_stays_defined_and_starts_again() {
        let driver = driver();
        let name = running_domain(&driver);

        driver.power_off(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::SHUTDOWN);
        assert!(is_defined(&driver, &name));
        driver.power_off(&name).unwrap();

        driver.power_on(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::RUNNING);
        driver.destroy_and_undefine(&name).unwrap();
    }

    #[test]
    fn soft_and_hard_reboots_leave_the_domain_running() {
        let driver = driver();
        let name = running_domain(&driver);

        driver.reboot(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::RUNNING);
        driver.hard_reboot(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::RUNNING);

        // A stopped domain cannot be asked to reboot; a hard reboot brings it back.
        driver.power_off(&name).unwrap();
        let err = driver.reboot(&name).unwrap_err();
        assert!(matches!(err, DriverError::Reboot { .. }), "{err}");
        driver.hard_reboot(&name).unwrap();
        assert_eq!(driver.power_state(&name).unwrap(), power_state::RUNNING);
        assert!(is_defined(&driver, &name));
        driver.destroy_and_undefine(&name).unwrap();
    }

    #[test]
    fn power_operations_on_a_missing_domain_are_not_found() {
        let driver = driver();
        let name = instance_name(&uuid::Uuid::new_v4().to_string());
        type Operation = fn(&LibvirtDriver, &str) -> Result<(), DriverError>;
        let operations: [(&str, Operation); 5] = [
            ("shutdown", LibvirtDriver::shutdown),
            ("power_off", LibvirtDriver::power_off),
            ("power_on", LibvirtDriver::power_on),
            ("reboot", LibvirtDriver::reboot),
            ("hard_reboot", LibvirtDriver::hard_reboot),
        ];
        for (what, operation) in operations {
            match operation(&driver, &name) {
                Err(DriverError::NotFound { name: missing }) => assert_eq!(missing, name),
                other => panic!("{what} on a missing domain gave {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_xml_is_a_define_error() {
        let driver = driver();
        // Past the uuid check, refused by libvirt itself.
        let uuid = uuid::Uuid::new_v4();
        let err = driver
            .define_and_start(&format!(
                "<domain type='test'><name>broken</name><uuid>{uuid}</uuid>"
            ))
            .unwrap_err();
        assert!(matches!(err, DriverError::Define { .. }), "{err}");
        assert!(!is_defined(&driver, "broken"));

        let err = driver.define_and_start("not xml at all").unwrap_err();
        assert!(matches!(err, DriverError::Define { .. }), "{err}");

        // Valid to libvirt, but without a uuid of its own the domain would get two.
        let name = instance_name(&uuid::Uuid::new_v4().to_string());
        let err = driver
            .define_and_start(&format!(
                "<domain type='test'><name>{name}</name><memory>65536</memory>\
                 <os><type>hvm</type></os></domain>"
            ))
            .unwrap_err();
        assert!(
            matches!(&err, DriverError::Define { reason, .. } if reason.contains("<uuid>")),
            "{err}"
        );
        assert!(!is_defined(&driver, &name));
    }

    #[test]
    fn a_failed_start_keeps_a_definition_made_before_the_call() {
        let driver = driver();
        let spec = fresh_spec();
        let xml = domain_xml(&spec).unwrap();
        // Starting a domain that already runs fails, and the definition (not this call's) stays.
        driver.define_and_start(&xml).unwrap();
        let err = driver.define_and_start(&xml).unwrap_err();
        assert!(matches!(err, DriverError::Start { .. }), "{err}");
        assert_eq!(
            driver.power_state(&spec.name).unwrap(),
            power_state::RUNNING
        );
        assert!(
            driver.is_persistent(&spec.name).unwrap(),
            "started and defined"
        );
        driver.destroy_and_undefine(&spec.name).unwrap();
    }

    #[test]
    fn a_bogus_uri_is_a_connect_error() {
        let err = LibvirtDriver::open("bogus:///x").unwrap_err();
        match &err {
            DriverError::Connect { uri, reason } => {
                assert_eq!(uri, "bogus:///x");
                assert!(!reason.is_empty());
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[test]
    fn the_driver_works_from_spawn_blocking() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let driver = Arc::new(driver());
        let spec = fresh_spec();
        let name = spec.name.clone();
        let state = runtime.block_on(async move {
            let xml = domain_xml(&spec).unwrap();
            let worker = Arc::clone(&driver);
            tokio::task::spawn_blocking(move || {
                worker.define_and_start(&xml)?;
                let state = worker.power_state(&name)?;
                worker.destroy_and_undefine(&name)?;
                Ok::<_, DriverError>(state)
            })
            .await
            .unwrap()
        });
        assert_eq!(state.unwrap(), power_state::RUNNING);
    }
}
