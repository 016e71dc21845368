//! The JSON bodies the compute API returns, built from database rows as Nova shapes them.

use serde_json::{json, Value};

use db::{FixedIp, Flavor, Instance, InstanceFault};

use crate::microversion::Version;

/// How one server is shown: the microversion and what the caller may see.
#[derive(Debug, Clone, Copy)]
pub struct ServerView<'a> {
    pub base: &'a str,
    pub version: Version,
    /// Admins see the host and the extended attributes.
    pub admin: bool,
}

/// Nova's server status from vm_state (and task_state where it matters).
pub fn server_status(instance: &Instance) -> &'static str {
    match instance.task_state.as_deref() {
        Some("rebooting") => return "REBOOT",
        Some("rebooting_hard") => return "HARD_REBOOT",
        _ => {}
    }
    match instance.vm_state.as_str() {
        "building" => "BUILD",
        "active" => "ACTIVE",
        "error" => "ERROR",
        "deleted" => "DELETED",
        "stopped" => "SHUTOFF",
        "paused" => "PAUSED",
        "suspended" => "SUSPENDED",
        _ => "UNKNOWN",
    }
}

fn time(t: chrono::NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The `OS-SRV-USG` times as Nova prints them: microseconds and no zone
/// (`2017-05-25T03:40:25.066078`), where `created` and `updated` stop at the second.
fn usage_time(t: chrono::NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

fn links(base: &str, kind: &str, id: &str) -> Value {
    json!([
        {"rel": "self", "href": format!("{base}/v2.1/{kind}/{id}")},
        {"rel": "bookmark", "href": format!("{base}/{kind}/{id}")},
    ])
}

/// `{"id", "name", "links"}`, the entry of a non-detailed list.
pub fn server_summary(base: &str, instance: &Instance) -> Value {
    json!({"id": instance.uuid, "name": instance.display_name, "links": links(base, "servers", &instance.uuid)})
}

/// A server's `addresses`: its fixed IPs grouped by network name, as Nova shows them.
pub fn addresses(fixed_ips: &[FixedIp]) -> Value {
    let mut by_network = serde_json::Map::new();
    for ip in fixed_ips {
        let entry = json!({
            "version": 4,
            "addr": ip.address,
            "OS-EXT-IPS:type": "fixed",
            "OS-EXT-IPS-MAC:mac_addr": ip.mac,
        });
        match by_network
            .entry(ip.network.clone())
            .or_insert_with(|| json!([]))
        {
            Value::Array(list) => list.push(entry),
            other => *other = json!([entry]),
        }
    }
    Value::Object(by_network)
}

/// The full server, as `GET /servers/{id}` and `/servers/detail` show it at `view.version`.
/// `host_status` is the state of the server's compute service (2.16, admins only);
/// `fixed_ips` are the addresses the server holds.
pub fn server_detail(
    view: ServerView<'_>,
    instance: &Instance,
    fault: Option<&InstanceFault>,
    host_status: Option<&str>,
    fixed_ips: &[FixedIp],
) -> Value {
    let base = view.base;
    let metadata: Value = serde_json::from_str(&instance.metadata).unwrap_or_else(|_| json!({}));
    let flavor = if view.version.at_least(47) {
        let snapshot: Value =
            serde_json::from_str(&instance.flavor_snapshot).unwrap_or_else(|_| json!({}));
        json!({
            "vcpus": instance.vcpus,
            "ram": instance.memory_mb,
            "disk": instance.root_gb,
            "ephemeral": instance.ephemeral_gb,
            "swap": instance.swap_mb,
            "original_name": snapshot.get("name").cloned().unwrap_or_else(|| json!(instance.flavorid)),
            "extra_specs": snapshot.get("extra_specs").cloned().unwrap_or_else(|| json!({})),
        })
    } else {
        json!({"id": instance.flavorid, "links": [{"rel": "bookmark", "href": format!("{base}/flavors/{}", instance.flavorid)}]})
    };
    let mut server = json!({
        "id": instance.uuid,
        "name": instance.display_name,
        "status": server_status(instance),
        "tenant_id": instance.project_id,
        "user_id": instance.user_id,
        "metadata": metadata,
        "hostId": host_id(instance),
        "image": {"id": instance.image_ref, "links": [{"rel": "bookmark", "href": format!("{base}/images/{}", instance.image_ref)}]},
        "flavor": flavor,
        "created": time(instance.created_at),
        "updated": time(instance.updated_at.unwrap_or(instance.created_at)),
        "addresses": addresses(fixed_ips),
        "accessIPv4": "",
        "accessIPv6": "",
        "links": links(base, "servers", &instance.uuid),
        "progress": 0,
        "key_name": instance.key_name,
        "config_drive": "",
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-STS:vm_state": instance.vm_state,
        "OS-EXT-STS:task_state": instance.task_state,
        "OS-EXT-STS:power_state": instance.power_state,
        "OS-SRV-USG:launched_at": instance.launched_at.map(usage_time),
        "OS-SRV-USG:terminated_at": instance.terminated_at.map(usage_time),
        "os-extended-volumes:volumes_attached": [],
        "security_groups": [{"name": "default"}],
    });
    let Some(map) = server.as_object_mut() else {
        return server;
    };
    if view.admin {
        map.insert("OS-EXT-SRV-ATTR:host".into(), json!(instance.host));
        map.insert(
            "OS-EXT-SRV-ATTR:hypervisor_hostname".into(),
            json!(instance.node),
        );
        map.insert(
            "OS-EXT-SRV-ATTR:instance_name".into(),
            json!(format!("instance-{}", instance.uuid)),
        );
        if view.version.at_least(3) {
            map.insert(
                "OS-EXT-SRV-ATTR:reservation_id".into(),
                json!(instance.reservation_id),
            );
            map.insert(
                "OS-EXT-SRV-ATTR:launch_index".into(),
                json!(instance.launch_index),
            );
            map.insert(
                "OS-EXT-SRV-ATTR:hostname".into(),
                json!(hostname(&instance.display_name)),
            );
            map.insert("OS-EXT-SRV-ATTR:kernel_id".into(), json!(""));
            map.insert("OS-EXT-SRV-ATTR:ramdisk_id".into(), json!(""));
            map.insert("OS-EXT-SRV-ATTR:root_device_name".into(), json!("/dev/vda"));
            map.insert("OS-EXT-SRV-ATTR:user_data".into(), Value::Null);
        }
        if view.version.at_least(16) {
            map.insert("host_status".into(), json!(host_status.unwrap_or("")));
        }
    }
    if view.version.at_least(9) {
        // Zova has no lock action, so no server is ever locked.
        map.insert("locked".into(), json!(false));
    }
    if view.version.at_least(19) {
        map.insert("description".into(), json!(instance.description));
    }
    if view.version.at_least(26) {
        // Tags cannot be set below 2.52 other than through routes Zova does not serve.
        map.insert("tags".into(), json!([]));
    }
    if let Some(fault) = fault {
        // As Nova: the details of a 500 are for admins. Zova's messages name hosts after their
        // first sentence ("No valid host was found. 0/6 hosts ..."), which only admins see.
        let (message, details) = if view.admin || fault.code != 500 {
            (fault.message.clone(), Some(fault.details.clone()))
        } else {
            let first = match fault.message.find(". ") {
                Some(end) => fault.message[..=end].to_string(),
                None => fault.message.clone(),
            };
            (first, None)
        };
        let mut shown =
            json!({"code": fault.code, "message": message, "created": time(fault.created_at)});
        if let Some(details) = details {
            shown["details"] = json!(details);
        }
        map.insert("fault".into(), shown);
    }
    server
}

/// Nova's hostname from a display name: lower case, letters, digits and hyphens.
fn hostname(display_name: &str) -> String {
    let mut name: String = display_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    let trimmed = name.trim_matches('-');
    if trimmed.is_empty() {
        "server".into()
    } else {
        trimmed.to_string()
    }
}

/// Nova's opaque per-project host id: stable for a (project, host) pair, empty without a host.
fn host_id(instance: &Instance) -> String {
    match &instance.host {
        Some(host) => uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("{}{}", instance.project_id, host).as_bytes(),
        )
        .simple()
        .to_string(),
        None => String::new(),
    }
}

pub fn flavor(base: &str, flavor: &Flavor) -> Value {
    json!({
        "id": flavor.flavorid,
        "name": flavor.name,
        "ram": flavor.memory_mb,
        "disk": flavor.root_gb,
        "vcpus": flavor.vcpus,
        "swap": if flavor.swap_mb == 0 { json!("") } else { json!(flavor.swap_mb) },
        "OS-FLV-EXT-DATA:ephemeral": flavor.ephemeral_gb,
        "OS-FLV-DISABLED:disabled": flavor.disabled,
        "os-flavor-access:is_public": flavor.is_public,
        "rxtx_factor": 1.0,
        "links": links(base, "flavors", &flavor.flavorid),
    })
}

pub fn flavor_summary(base: &str, flavor: &Flavor) -> Value {
    json!({"id": flavor.flavorid, "name": flavor.name, "links": links(base, "flavors", &flavor.flavorid)})
}

/// The version document of `GET /` and `GET /v2.1`, which clients read before anything else.
pub fn version(base: &str) -> Value {
    json!({
        "id": "v2.1",
        "status": "CURRENT",
        "version": crate::microversion::MAX.to_string(),
        "min_version": crate::microversion::MIN.to_string(),
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}/v2.1/")}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}],
    })
}

/// The legacy v2.0 entry that `GET /` lists beside v2.1 (clients expect both).
pub fn version_v2(base: &str) -> Value {
    json!({
        "id": "v2.0",
        "status": "SUPPORTED",
        "version": "",
        "min_version": "",
        "updated": "2011-01-21T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}/v2/")}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2"}],
    })
}

/// `GMT` time as Nova prints it in lists of services and hypervisors.
pub fn time_or_null(t: Option<chrono::NaiveDateTime>) -> Value {
    match t {
        Some(t) => json!(t.format("%Y-%m-%dT%H:%M:%S.000000").to_string()),
        None => Value::Null,
    }
}

pub fn iso_time(t: chrono::NaiveDateTime) -> String {
    time(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_times_keep_microseconds_as_nova_prints_them() {
        let t = chrono::NaiveDate::from_ymd_opt(2017, 5, 25)
            .and_then(|d| d.and_hms_micro_opt(3, 40, 25, 66_078))
            .expect("a valid time");
        assert_eq!(usage_time(t), "2017-05-25T03:40:25.066078");
        assert_eq!(time(t), "2017-05-25T03:40:25Z");
        let whole = chrono::NaiveDate::from_ymd_opt(2017, 5, 25)
            .and_then(|d| d.and_hms_opt(3, 40, 25))
            .expect("a valid time");
        assert_eq!(usage_time(whole), "2017-05-25T03:40:25.000000");
    }
}
