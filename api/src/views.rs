//! The JSON bodies the compute API returns, built from database rows as Nova shapes them.

use serde_json::{json, Value};

use db::{Flavor, Instance, InstanceFault};

/// Nova's server status from vm_state (and task_state where it matters).
pub fn server_status(instance: &Instance) -> &'static str {
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

pub fn server_detail(base: &str, instance: &Instance, fault: Option<&InstanceFault>) -> Value {
    let metadata: Value = serde_json::from_str(&instance.metadata).unwrap_or_else(|_| json!({}));
    let mut server = json!({
        "id": instance.uuid,
        "name": instance.display_name,
        "status": server_status(instance),
        "tenant_id": instance.project_id,
        "user_id": instance.user_id,
        "metadata": metadata,
        "hostId": host_id(instance),
        "image": {"id": instance.image_ref, "links": [{"rel": "bookmark", "href": format!("{base}/images/{}", instance.image_ref)}]},
        "flavor": {"id": instance.flavorid, "links": [{"rel": "bookmark", "href": format!("{base}/flavors/{}", instance.flavorid)}]},
        "created": time(instance.created_at),
        "updated": time(instance.updated_at.unwrap_or(instance.created_at)),
        "addresses": {},
        "accessIPv4": "",
        "accessIPv6": "",
        "links": links(base, "servers", &instance.uuid),
        "progress": 0,
        "key_name": null,
        "config_drive": "",
        "OS-DCF:diskConfig": "MANUAL",
        "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-STS:vm_state": instance.vm_state,
        "OS-EXT-STS:task_state": instance.task_state,
        "OS-EXT-STS:power_state": instance.power_state,
        "OS-EXT-SRV-ATTR:host": instance.host,
        "OS-EXT-SRV-ATTR:hypervisor_hostname": instance.node,
        "OS-EXT-SRV-ATTR:instance_name": format!("instance-{}", instance.uuid),
        "OS-SRV-USG:launched_at": instance.launched_at.map(time),
        "OS-SRV-USG:terminated_at": instance.terminated_at.map(time),
        "os-extended-volumes:volumes_attached": [],
        "security_groups": [{"name": "default"}],
    });
    if let (Some(fault), Some(map)) = (fault, server.as_object_mut()) {
        map.insert(
            "fault".into(),
            json!({"code": fault.code, "message": fault.message, "details": fault.details, "created": time(fault.created_at)}),
        );
    }
    server
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
        "version": "2.1",
        "min_version": "2.1",
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}/v2.1/")}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.compute+json;version=2.1"}],
    })
}
