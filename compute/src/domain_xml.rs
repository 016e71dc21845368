//! The libvirt domain XML of an instance: a pure function of a [`DomainSpec`], no I/O.
//!
//! The XML is written with `quick_xml::Writer`, so every piece of user text (the display name
//! above all) is escaped by the writer, never spliced into a string by hand.

use std::io;

use quick_xml::events::{BytesText, Event};
use quick_xml::{Reader, Writer};
use thiserror::Error;

/// Nova's metadata namespace, so tools that read Nova's `<nova:instance>` block find the name.
pub const NOVA_METADATA_NAMESPACE: &str = "http://openstack.org/xmlns/libvirt/nova/1.1";

/// Nova's MAC prefix (fa:16:3e): locally administered, unicast.
const MAC_PREFIX: [u8; 3] = [0xfa, 0x16, 0x3e];

/// What the compute service knows about an instance when it builds its domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// The libvirt domain name, `instance-<uuid>` (see [`instance_name`]).
    pub name: String,
    /// The instance uuid, used as the domain `<uuid>`.
    pub uuid: String,
    pub vcpus: u32,
    pub memory_mb: u64,
    /// `test` for `test:///default`, `kvm` or `qemu` for `qemu:///system`.
    pub domain_type: String,
    /// The instance's qcow2 disks in boot order (root, ephemeral, swap): `vda`, `vdb`, … on
    /// virtio. Empty gives a domain without a `<disk>` (the test hypervisor runs no guest).
    pub disks: Vec<String>,
    /// How QEMU caches the disks: `none` (O_DIRECT, Nova's choice where the file system takes
    /// it) or `writethrough` (where it does not).
    pub disk_cache: DiskCache,
    /// `None` gives a domain without an `<interface>`.
    pub mac_address: Option<String>,
    /// The libvirt network of the interface when there is no bridge; with neither, the NIC is
    /// QEMU's user-mode network.
    pub network: Option<String>,
    /// A host bridge the interface joins instead of a libvirt network (the fixed-IP network's
    /// `bridge`).
    pub bridge: Option<String>,
    /// The user's name for the server, kept in `<description>` and Nova's metadata block.
    pub display_name: String,
    /// The file the guest's serial console is written to (qemu and kvm domains only).
    pub console_log: Option<String>,
    /// What Nova records in the domain's `<nova:instance>` block.
    pub metadata: InstanceMetadata,
}

/// The `<driver cache=…>` of the disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskCache {
    #[default]
    None,
    Writethrough,
}

impl DiskCache {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskCache::None => "none",
            DiskCache::Writethrough => "writethrough",
        }
    }
}

/// Nova's `<nova:instance>` metadata: who owns the instance and what it was built from, so an
/// operator looking at `virsh dumpxml` sees it without asking the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceMetadata {
    /// `YYYY-MM-DD hh:mm:ss`, UTC.
    pub creation_time: String,
    pub flavor_name: String,
    pub root_gb: i64,
    pub ephemeral_gb: i64,
    pub swap_mb: i64,
    pub user_id: String,
    pub project_id: String,
    /// The image the root disk comes from, if any.
    pub image_id: Option<String>,
}

#[derive(Debug, Error)]
pub enum XmlError {
    #[error("Cannot describe domain {name:?} to libvirt: {reason}")]
    InvalidSpec { name: String, reason: String },
    #[error("Writing the XML of domain {name:?} failed: {source}")]
    Write {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// The libvirt domain name of an instance.
pub fn instance_name(uuid: &str) -> String {
    format!("instance-{uuid}")
}

/// The instance uuid of a domain named `instance-<uuid>`; None for any other domain (an
/// operator's own, which Zova never touches).
pub fn instance_uuid_of(domain_name: &str) -> Option<String> {
    let uuid = uuid::Uuid::parse_str(domain_name.strip_prefix("instance-")?).ok()?;
    let canonical = uuid.hyphenated().to_string();
    // Only the exact form `instance_name` writes: "instance-{simple}" is someone else's name.
    (instance_name(&canonical) == domain_name).then_some(canonical)
}

/// A stable MAC address for an instance: Nova's prefix `fa:16:3e` and three bytes of a hash of the
/// uuid, so the same instance always gets the same MAC and tests can predict it.
///
/// Three bytes leave 16.7 million addresses; whoever allocates MACs for a network should still
/// check for a clash.
pub fn mac_address_for(uuid: &str) -> String {
    // Hash the canonical form, so "ABC…" and "abc…" (or a simple uuid) give the same MAC.
    let hash = match uuid::Uuid::parse_str(uuid.trim()) {
        Ok(parsed) => fnv1a_64(parsed.as_bytes()),
        Err(_) => fnv1a_64(uuid.as_bytes()),
    };
    let [a, b, c, ..] = hash.to_be_bytes();
    let [p0, p1, p2] = MAC_PREFIX;
    format!("{p0:02x}:{p1:02x}:{p2:02x}:{a:02x}:{b:02x}:{c:02x}")
}

/// FNV-1a, 64 bit: specified once and for all, unlike `std`'s `DefaultHasher`, so the MAC of an
/// instance does not change with the Rust version.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The domain XML for `spec`, as libvirt's `virDomainCreateXML` and `virDomainDefineXML` take it.
pub fn domain_xml(spec: &DomainSpec) -> Result<String, XmlError> {
    validate(spec)?;
    let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
    write_domain(&mut writer, spec).map_err(|source| XmlError::Write {
        name: spec.name.clone(),
        source,
    })?;
    String::from_utf8(writer.into_inner()).map_err(|e| XmlError::Write {
        name: spec.name.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// The `<name>` of a domain XML document, if it has one; for error messages about XML that
/// libvirt refused.
pub fn domain_name_in(xml: &str) -> Option<String> {
    top_level_text(xml, b"name")
}

/// The `<uuid>` of a domain XML document, if it has one.
pub fn domain_uuid_in(xml: &str) -> Option<String> {
    top_level_text(xml, b"uuid")
}

/// The text of the first `element` right under the document's root.
fn top_level_text(xml: &str, element: &[u8]) -> Option<String> {
    let mut reader = Reader::from_str(xml);
    let mut depth = 0usize;
    let mut in_element = false;
    loop {
        match reader.read_event().ok()? {
            Event::Start(start) => {
                depth += 1;
                in_element = depth == 2 && start.name().as_ref() == element;
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                in_element = false;
            }
            Event::Text(text) if in_element => {
                return text.unescape().ok().map(|name| name.trim().to_owned());
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

fn validate(spec: &DomainSpec) -> Result<(), XmlError> {
    let invalid = |reason: String| XmlError::InvalidSpec {
        name: spec.name.clone(),
        reason,
    };
    if spec.name.is_empty() || spec.name.contains('/') || spec.name.chars().any(char::is_control) {
        return Err(invalid(
            "the domain name must be non-empty, without '/' or control characters".into(),
        ));
    }
    if uuid::Uuid::parse_str(&spec.uuid).is_err() {
        return Err(invalid(format!("{:?} is not a uuid", spec.uuid)));
    }
    if spec.vcpus == 0 {
        return Err(invalid("a domain needs at least 1 vCPU".into()));
    }
    if spec.memory_mb == 0 {
        return Err(invalid("a domain needs at least 1 MiB of memory".into()));
    }
    if let Some(mac) = &spec.mac_address {
        let octets: Vec<&str> = mac.split(':').collect();
        let hex = |o: &&str| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit());
        if octets.len() != 6 || !octets.iter().all(hex) {
            return Err(invalid(format!("{mac:?} is not a MAC address")));
        }
    }
    if let Some(bridge) = &spec.bridge {
        if bridge.is_empty() || bridge.contains('/') || bridge.chars().any(char::is_control) {
            return Err(invalid(format!("{bridge:?} is not a bridge name")));
        }
    }
    let bad_path = |p: &String| p.is_empty() || p.chars().any(char::is_control);
    if let Some(path) = spec
        .disks
        .iter()
        .chain(&spec.console_log)
        .find(|p| bad_path(p))
    {
        return Err(invalid(format!(
            "{path:?} is not a file path (empty, or with control characters)"
        )));
    }
    if !matches!(spec.domain_type.as_str(), "test" | "kvm" | "qemu") {
        return Err(invalid(format!(
            "domain type {:?} is not one of test, kvm, qemu",
            spec.domain_type
        )));
    }
    Ok(())
}

fn write_domain(w: &mut Writer<Vec<u8>>, spec: &DomainSpec) -> io::Result<()> {
    let is_qemu = spec.domain_type != "test";
    // XML 1.0 cannot carry most control characters even escaped; the display name is only
    // informational here, so they are dropped rather than failing the boot.
    let display_name = xml_safe(&spec.display_name);
    let memory_mb = spec.memory_mb.to_string();
    let vcpus = spec.vcpus.to_string();

    w.create_element("domain")
        .with_attribute(("type", spec.domain_type.as_str()))
        .write_inner_content(|w| {
            text_element(w, "name", &spec.name)?;
            text_element(w, "uuid", &spec.uuid)?;
            text_element(w, "description", &display_name)?;
            w.create_element("metadata").write_inner_content(|w| {
                w.create_element("nova:instance")
                    .with_attribute(("xmlns:nova", NOVA_METADATA_NAMESPACE))
                    .write_inner_content(|w| write_metadata(w, spec, &display_name))?;
                Ok(())
            })?;
            w.create_element("memory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&memory_mb))?;
            w.create_element("currentMemory")
                .with_attribute(("unit", "MiB"))
                .write_text_content(BytesText::new(&memory_mb))?;
            text_element(w, "vcpu", &vcpus)?;
            w.create_element("cputune").write_inner_content(|w| {
                text_element(w, "shares", &cpu_shares(spec.vcpus).to_string())
            })?;
            w.create_element("os").write_inner_content(|w| {
                w.create_element("type")
                    .with_attribute(("arch", "x86_64"))
                    .with_attribute(("machine", "pc"))
                    .write_text_content(BytesText::new("hvm"))?;
                w.create_element("boot")
                    .with_attribute(("dev", "hd"))
                    .write_empty()?;
                Ok(())
            })?;
            if is_qemu {
                w.create_element("features").write_inner_content(|w| {
                    w.create_element("acpi").write_empty()?;
                    Ok(())
                })?;
            }
            w.create_element("clock")
                .with_attribute(("offset", "utc"))
                .write_empty()?;
            text_element(w, "on_poweroff", "destroy")?;
            text_element(w, "on_reboot", "restart")?;
            text_element(w, "on_crash", "destroy")?;
            w.create_element("devices")
                .write_inner_content(|w| write_devices(w, spec, is_qemu))?;
            Ok(())
        })?;
    Ok(())
}

fn write_devices(w: &mut Writer<Vec<u8>>, spec: &DomainSpec, is_qemu: bool) -> io::Result<()> {
    for (index, disk_path) in spec.disks.iter().enumerate() {
        let target = disk_target(index);
        w.create_element("disk")
            .with_attribute(("type", "file"))
            .with_attribute(("device", "disk"))
            .write_inner_content(|w| {
                w.create_element("driver")
                    .with_attribute(("name", "qemu"))
                    .with_attribute(("type", "qcow2"))
                    .with_attribute(("cache", spec.disk_cache.as_str()))
                    .write_empty()?;
                w.create_element("source")
                    .with_attribute(("file", disk_path.as_str()))
                    .write_empty()?;
                w.create_element("target")
                    .with_attribute(("dev", target.as_str()))
                    .with_attribute(("bus", "virtio"))
                    .write_empty()?;
                Ok(())
            })?;
    }
    if let Some(mac) = &spec.mac_address {
        // A bridge (the fixed-IP network's), else a named libvirt network, else QEMU's user-mode
        // NIC, which needs nothing on the host.
        let (kind, source) = match (&spec.bridge, &spec.network) {
            (Some(bridge), _) => ("bridge", Some(("bridge", bridge.as_str()))),
            (None, Some(network)) => ("network", Some(("network", network.as_str()))),
            (None, None) => ("user", None),
        };
        w.create_element("interface")
            .with_attribute(("type", kind))
            .write_inner_content(|w| {
                w.create_element("mac")
                    .with_attribute(("address", mac.as_str()))
                    .write_empty()?;
                if let Some(source) = source {
                    w.create_element("source")
                        .with_attribute(source)
                        .write_empty()?;
                }
                w.create_element("model")
                    .with_attribute(("type", "virtio"))
                    .write_empty()?;
                Ok(())
            })?;
    }
    if is_qemu {
        // The console goes to a file libvirt opens for QEMU, so `console.log` keeps the boot
        // messages after the guest is gone (Nova's `openstack console log show`).
        match &spec.console_log {
            Some(path) => w
                .create_element("serial")
                .with_attribute(("type", "file"))
                .write_inner_content(|w| {
                    // append: a stop and start keeps the earlier boots' messages.
                    w.create_element("source")
                        .with_attribute(("path", path.as_str()))
                        .with_attribute(("append", "on"))
                        .write_empty()?;
                    w.create_element("target")
                        .with_attribute(("port", "0"))
                        .write_empty()?;
                    Ok(())
                })?,
            None => w
                .create_element("serial")
                .with_attribute(("type", "pty"))
                .write_empty()?,
        };
    }
    Ok(())
}

/// The most CPU shares libvirt takes on a cgroup v2 host (it maps them onto `cpu.weight`,
/// 1..=10000); more fails the domain's start.
pub const MAX_CPU_SHARES: u64 = 10_000;

/// The CPU weight of a domain: 1024 per vCPU (cgroup v1's default per task), so a bigger flavor
/// gets a proportional share of a contended host, capped at what cgroup v2 accepts (Nova stopped
/// setting shares when 10 vCPUs broke there, bug 1917619).
pub fn cpu_shares(vcpus: u32) -> u64 {
    (u64::from(vcpus) * 1024).min(MAX_CPU_SHARES)
}

/// `vda`, `vdb`, … `vdz`, `vdaa`: the virtio names of the disks in order.
fn disk_target(index: usize) -> String {
    let letters = b"abcdefghijklmnopqrstuvwxyz";
    let mut suffix = Vec::new();
    let mut n = index;
    loop {
        suffix.push(letters[n % 26]);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

fn write_metadata(
    w: &mut Writer<Vec<u8>>,
    spec: &DomainSpec,
    display_name: &str,
) -> io::Result<()> {
    let m = &spec.metadata;
    text_element(w, "nova:name", display_name)?;
    text_element(w, "nova:creationTime", &xml_safe(&m.creation_time))?;
    w.create_element("nova:flavor")
        .with_attribute(("name", xml_safe(&m.flavor_name).as_str()))
        .write_inner_content(|w| {
            text_element(w, "nova:memory", &spec.memory_mb.to_string())?;
            text_element(w, "nova:disk", &m.root_gb.to_string())?;
            text_element(w, "nova:swap", &m.swap_mb.to_string())?;
            text_element(w, "nova:ephemeral", &m.ephemeral_gb.to_string())?;
            text_element(w, "nova:vcpus", &spec.vcpus.to_string())?;
            Ok(())
        })?;
    w.create_element("nova:owner").write_inner_content(|w| {
        w.create_element("nova:user")
            .with_attribute(("uuid", xml_safe(&m.user_id).as_str()))
            .write_empty()?;
        w.create_element("nova:project")
            .with_attribute(("uuid", xml_safe(&m.project_id).as_str()))
            .write_empty()?;
        Ok(())
    })?;
    if let Some(image_id) = &m.image_id {
        w.create_element("nova:root")
            .with_attribute(("type", "image"))
            .with_attribute(("uuid", xml_safe(image_id).as_str()))
            .write_empty()?;
    }
    Ok(())
}

/// `text` without the control characters XML 1.0 cannot carry (even escaped).
fn xml_safe(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r'))
        .collect()
}

fn text_element(w: &mut Writer<Vec<u8>>, name: &str, text: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use quick_xml::events::BytesStart;

    use super::*;

    const UUID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";

    fn spec() -> DomainSpec {
        DomainSpec {
            name: instance_name(UUID),
            uuid: UUID.into(),
            vcpus: 2,
            memory_mb: 512,
            domain_type: "test".into(),
            disks: vec!["/var/lib/zova/instances/instance-x/disk".into()],
            disk_cache: DiskCache::None,
            mac_address: Some(mac_address_for(UUID)),
            network: None,
            bridge: None,
            display_name: "web-1".into(),
            console_log: None,
            metadata: InstanceMetadata {
                creation_time: "2026-11-23 20:00:00".into(),
                flavor_name: "m1.small".into(),
                root_gb: 20,
                ephemeral_gb: 0,
                swap_mb: 0,
                user_id: "6c5a1d3e8f2b4c7d9e0f1a2b3c4d5e6f".into(),
                project_id: "0a1b2c3d4e5f60718293a4b5c6d7e8f9".into(),
                image_id: Some("155d900f-4e14-4e4c-a73d-069cbf4541e6".into()),
            },
        }
    }

    /// A QEMU domain with everything a real boot has: three disks, a console log, a bridge.
    fn full_qemu_spec() -> DomainSpec {
        let dir = "/var/lib/zova/instances/instance-1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        DomainSpec {
            domain_type: "qemu".into(),
            disks: vec![
                format!("{dir}/disk"),
                format!("{dir}/disk.local"),
                format!("{dir}/disk.swap"),
            ],
            bridge: Some("br100".into()),
            console_log: Some(format!("{dir}/console.log")),
            metadata: InstanceMetadata {
                ephemeral_gb: 1,
                swap_mb: 512,
                ..spec().metadata
            },
            display_name: "it's <ok> & \"fine\"".into(),
            ..spec()
        }
    }

    /// What a reader of the XML sees: the text of each element and the attributes of each
    /// element, keyed by the element's path ("domain/devices/disk/source").
    #[derive(Default, Debug)]
    struct Parsed {
        text: BTreeMap<String, String>,
        attrs: BTreeMap<String, BTreeMap<String, String>>,
    }

    fn parse(xml: &str) -> Parsed {
        let mut reader = Reader::from_str(xml);
        let mut path: Vec<String> = Vec::new();
        let mut parsed = Parsed::default();
        let record = |path: &[String], start: &BytesStart, parsed: &mut Parsed| {
            let key = path.join("/");
            let attrs = parsed.attrs.entry(key).or_default();
            for attr in start.attributes() {
                let attr = attr.expect("well-formed attribute");
                attrs.insert(
                    String::from_utf8(attr.key.as_ref().to_vec()).unwrap(),
                    attr.unescape_value().expect("escaped value").into_owned(),
                );
            }
        };
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(start) => {
                    path.push(String::from_utf8(start.name().as_ref().to_vec()).unwrap());
                    record(&path, &start, &mut parsed);
                }
                Event::Empty(start) => {
                    path.push(String::from_utf8(start.name().as_ref().to_vec()).unwrap());
                    record(&path, &start, &mut parsed);
                    path.pop();
                }
                Event::End(_) => {
                    path.pop();
                }
                Event::Text(text) => {
                    let text = text.unescape().expect("escaped text");
                    if !text.trim().is_empty() {
                        parsed.text.insert(path.join("/"), text.into_owned());
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        assert!(path.is_empty(), "unbalanced elements: {path:?}");
        parsed
    }

    #[test]
    fn the_xml_reads_back_as_the_spec() {
        let spec = spec();
        let parsed = parse(&domain_xml(&spec).unwrap());

        assert_eq!(parsed.attrs["domain"]["type"], "test");
        assert_eq!(parsed.text["domain/name"], spec.name);
        assert_eq!(parsed.text["domain/uuid"], UUID);
        assert_eq!(parsed.text["domain/description"], "web-1");
        assert_eq!(
            parsed.text["domain/metadata/nova:instance/nova:name"],
            "web-1"
        );
        assert_eq!(parsed.text["domain/memory"], "512");
        assert_eq!(parsed.attrs["domain/memory"]["unit"], "MiB");
        assert_eq!(parsed.text["domain/currentMemory"], "512");
        assert_eq!(parsed.text["domain/vcpu"], "2");
        assert_eq!(parsed.text["domain/cputune/shares"], "2048");
        let meta = "domain/metadata/nova:instance";
        assert_eq!(
            parsed.text[&format!("{meta}/nova:creationTime")],
            "2026-11-23 20:00:00"
        );
        assert_eq!(
            parsed.attrs[&format!("{meta}/nova:flavor")]["name"],
            "m1.small"
        );
        assert_eq!(
            parsed.text[&format!("{meta}/nova:flavor/nova:memory")],
            "512"
        );
        assert_eq!(parsed.text[&format!("{meta}/nova:flavor/nova:disk")], "20");
        assert_eq!(parsed.text[&format!("{meta}/nova:flavor/nova:vcpus")], "2");
        assert_eq!(
            parsed.attrs[&format!("{meta}/nova:owner/nova:project")]["uuid"],
            spec.metadata.project_id
        );
        assert_eq!(
            parsed.attrs[&format!("{meta}/nova:owner/nova:user")]["uuid"],
            spec.metadata.user_id
        );
        assert_eq!(
            parsed.attrs[&format!("{meta}/nova:root")]["uuid"],
            "155d900f-4e14-4e4c-a73d-069cbf4541e6"
        );
        assert_eq!(parsed.text["domain/os/type"], "hvm");
        assert_eq!(parsed.attrs["domain/os/boot"]["dev"], "hd");
        assert_eq!(
            parsed.attrs["domain/devices/disk/source"]["file"],
            "/var/lib/zova/instances/instance-x/disk"
        );
        assert_eq!(parsed.attrs["domain/devices/disk/driver"]["type"], "qcow2");
        assert_eq!(parsed.attrs["domain/devices/disk/driver"]["cache"], "none");
        let writethrough = DomainSpec {
            disk_cache: DiskCache::Writethrough,
            ..spec.clone()
        };
        let parsed_wt = parse(&domain_xml(&writethrough).unwrap());
        assert_eq!(
            parsed_wt.attrs["domain/devices/disk/driver"]["cache"],
            "writethrough"
        );
        assert_eq!(parsed.attrs["domain/devices/disk/target"]["dev"], "vda");
        assert_eq!(
            parsed.attrs["domain/devices/interface/mac"]["address"],
            mac_address_for(UUID)
        );
        assert_eq!(parsed.attrs["domain/devices/interface"]["type"], "user");
        assert!(!parsed.attrs.contains_key("domain/devices/interface/source"));
        assert_eq!(parsed.text["domain/on_crash"], "destroy");
    }

    #[test]
    fn test_domains_have_no_qemu_devices_and_qemu_domains_do() {
        let test_xml = parse(&domain_xml(&spec()).unwrap());
        assert!(!test_xml.attrs.contains_key("domain/features/acpi"));
        assert!(!test_xml.attrs.contains_key("domain/devices/serial"));

        let logged = parse(&domain_xml(&full_qemu_spec()).unwrap());
        assert_eq!(logged.attrs["domain/devices/serial"]["type"], "file");
        assert!(logged.attrs["domain/devices/serial/source"]["path"].ends_with("/console.log"));

        for domain_type in ["kvm", "qemu"] {
            let spec = DomainSpec {
                domain_type: domain_type.into(),
                network: Some("br-int".into()),
                ..spec()
            };
            let parsed = parse(&domain_xml(&spec).unwrap());
            assert_eq!(parsed.attrs["domain"]["type"], domain_type);
            assert!(parsed.attrs.contains_key("domain/features/acpi"));
            assert_eq!(parsed.attrs["domain/devices/serial"]["type"], "pty");
            assert_eq!(
                parsed.attrs["domain/devices/interface/source"]["network"],
                "br-int"
            );
        }
    }

    #[test]
    fn a_bridge_replaces_the_libvirt_network() {
        let bridged = DomainSpec {
            mac_address: Some("fa:16:3e:00:00:01".into()),
            bridge: Some("br100".into()),
            ..spec()
        };
        let parsed = parse(&domain_xml(&bridged).unwrap());
        assert_eq!(parsed.attrs["domain/devices/interface"]["type"], "bridge");
        assert_eq!(
            parsed.attrs["domain/devices/interface/source"]["bridge"],
            "br100"
        );
        assert_eq!(
            parsed.attrs["domain/devices/interface/mac"]["address"],
            "fa:16:3e:00:00:01"
        );
        for (mac, bridge) in [
            (Some("fa:16:3e:00:00"), None),
            (Some("fa:16:3e:00:00:zz"), None),
            (Some("fa:16:3e:00:00:01"), Some("")),
            (Some("fa:16:3e:00:00:01"), Some("br/0")),
        ] {
            let bad = DomainSpec {
                mac_address: mac.map(String::from),
                bridge: bridge.map(String::from),
                ..spec()
            };
            assert!(
                matches!(domain_xml(&bad), Err(XmlError::InvalidSpec { .. })),
                "{mac:?} {bridge:?}"
            );
        }
    }

    #[test]
    fn user_text_is_escaped_and_round_trips() {
        let nasty = r#"a<b>&c'd"e</description><name>evil</name>"#;
        let spec = DomainSpec {
            display_name: nasty.into(),
            disks: vec![r#"/tmp/it's "quoted" & <odd>/disk"#.into()],
            ..spec()
        };
        let xml = domain_xml(&spec).unwrap();
        assert!(!xml.contains("<name>evil"), "{xml}");

        let parsed = parse(&xml);
        assert_eq!(parsed.text["domain/description"], nasty);
        assert_eq!(parsed.text["domain/name"], spec.name);
        assert_eq!(
            parsed.attrs["domain/devices/disk/source"]["file"],
            spec.disks[0]
        );
        assert_eq!(domain_name_in(&xml), Some(spec.name));
    }

    #[test]
    fn control_characters_are_dropped_from_the_display_name() {
        let spec = DomainSpec {
            display_name: "web\u{0}-\u{1b}1\tx".into(),
            ..spec()
        };
        let parsed = parse(&domain_xml(&spec).unwrap());
        assert_eq!(parsed.text["domain/description"], "web-1\tx");
    }

    #[test]
    fn no_disk_and_no_interface_when_none() {
        let spec = DomainSpec {
            disks: vec![],
            mac_address: None,
            network: Some("ignored".into()),
            ..spec()
        };
        let xml = domain_xml(&spec).unwrap();
        assert!(!xml.contains("<disk"), "{xml}");
        assert!(!xml.contains("<interface"), "{xml}");
        let parsed = parse(&xml);
        assert!(parsed.attrs.contains_key("domain/devices"));
    }

    #[test]
    fn invalid_specs_are_refused() {
        let cases = [
            DomainSpec { vcpus: 0, ..spec() },
            DomainSpec {
                memory_mb: 0,
                ..spec()
            },
            DomainSpec {
                uuid: "not-a-uuid".into(),
                ..spec()
            },
            DomainSpec {
                name: String::new(),
                ..spec()
            },
            DomainSpec {
                domain_type: "xen".into(),
                ..spec()
            },
            DomainSpec {
                disks: vec![String::new()],
                ..spec()
            },
            DomainSpec {
                console_log: Some("/tmp/a\nb".into()),
                ..spec()
            },
        ];
        for case in cases {
            let err = domain_xml(&case).unwrap_err();
            assert!(
                matches!(err, XmlError::InvalidSpec { .. }),
                "{case:?}: {err}"
            );
        }
    }

    #[test]
    fn mac_addresses_are_nova_style_and_stable() {
        let mac = mac_address_for(UUID);
        assert!(mac.starts_with("fa:16:3e:"), "{mac}");
        let octets: Vec<&str> = mac.split(':').collect();
        assert_eq!(octets.len(), 6);
        for octet in octets {
            assert_eq!(octet.len(), 2);
            assert!(octet
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        // Stable across calls, spellings and Rust versions (FNV-1a is fixed).
        assert_eq!(mac, mac_address_for(UUID));
        assert_eq!(mac, mac_address_for(&UUID.to_uppercase()));
        assert_eq!(mac, mac_address_for(&UUID.replace('-', "")));
        assert_eq!(mac, "fa:16:3e:9d:8d:51");
        assert_ne!(mac, mac_address_for("1b4e28ba-2fa1-11d2-883f-0016d3cca428"));
    }

    #[test]
    fn domain_name_in_finds_the_top_level_name_only() {
        assert_eq!(
            domain_name_in("<domain><name>a</name></domain>"),
            Some("a".into())
        );
        assert_eq!(
            domain_name_in("<domain><metadata><name>x</name></metadata><name>b</name></domain>"),
            Some("b".into())
        );
        assert_eq!(domain_name_in("<domain><uuid>u</uuid></domain>"), None);
        assert_eq!(domain_name_in("<domain><name>"), None);
        assert_eq!(
            domain_uuid_in("<domain><name>a</name><uuid> u </uuid></domain>"),
            Some("u".into())
        );
        assert_eq!(domain_uuid_in("<domain><name>a</name></domain>"), None);
    }

    #[test]
    fn instance_uuids_come_back_from_instance_names_only() {
        assert_eq!(instance_uuid_of(&instance_name(UUID)), Some(UUID.into()));
        for other in [
            "web-1",
            "instance-",
            "instance-not-a-uuid",
            "instance-1b4e28ba2fa111d2883f0016d3cca427",
            "instance-1B4E28BA-2FA1-11D2-883F-0016D3CCA427",
            "zova-kvm-probe-1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        ] {
            assert_eq!(instance_uuid_of(other), None, "{other}");
        }
    }

    #[test]
    fn cpu_shares_grow_with_vcpus_up_to_what_cgroup_v2_takes() {
        assert_eq!(cpu_shares(1), 1024);
        assert_eq!(cpu_shares(9), 9216);
        assert_eq!(cpu_shares(10), MAX_CPU_SHARES);
        assert_eq!(cpu_shares(u32::MAX), MAX_CPU_SHARES);
    }

    #[test]
    fn disks_are_named_vda_vdb_in_order() {
        let names: Vec<String> = [0, 1, 2, 25, 26, 27, 701, 702]
            .into_iter()
            .map(disk_target)
            .collect();
        assert_eq!(
            names,
            ["vda", "vdb", "vdc", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]
        );
    }

    /// The whole XML of a full QEMU domain, byte for byte. When the XML changes on purpose,
    /// regenerate the file with `ZOVA_BLESS=1 cargo test -p compute golden` and review the diff.
    #[test]
    fn golden_qemu_domain_xml() {
        let xml = domain_xml(&full_qemu_spec()).unwrap();
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/domain-qemu.xml");
        if std::env::var_os("ZOVA_BLESS").is_some() {
            std::fs::write(golden, &xml).unwrap();
        }
        let expected = std::fs::read_to_string(golden).expect("the golden file exists");
        assert_eq!(xml, expected, "the XML differs from {golden}");
    }

    /// Checks the XML of every domain type against libvirt's own RelaxNG schema.
    #[test]
    fn domain_xml_passes_libvirts_schema() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let specs = [
            full_qemu_spec(),
            DomainSpec {
                domain_type: "kvm".into(),
                ..full_qemu_spec()
            },
            spec(),
            DomainSpec {
                disks: vec![],
                mac_address: None,
                metadata: InstanceMetadata::default(),
                ..spec()
            },
        ];
        for (i, spec) in specs.iter().enumerate() {
            let path = dir.path().join(format!("domain-{i}.xml"));
            std::fs::write(&path, domain_xml(spec).unwrap()).unwrap();
            // virt-xml-validate comes with libvirt-clients, which scripts/install-deps installs:
            // a missing tool is a failed check, not a skipped one.
            let output = std::process::Command::new("virt-xml-validate")
                .arg(&path)
                .arg("domain")
                .output()
                .expect("virt-xml-validate (Debian package libvirt-clients) runs");
            assert!(
                output.status.success(),
                "{:?}: {}{}",
                spec.domain_type,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
