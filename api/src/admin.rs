//! The operator's view: `os-services` (list, enable, disable, force-down), `os-hypervisors`
//! (capacity, use and allocation ratios per node) and `os-availability-zone`.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use db::{ComputeNode, Service};

use crate::servers::{body_object, next_link, page, paginate};
use crate::views::time_or_null;
use crate::{json_response, policy, Api, ApiError, Call};

/// Up: heard from within `down_after` seconds and not forced down by an operator.
pub(crate) fn service_is_up(
    service: &Service,
    now: chrono::NaiveDateTime,
    down_after: i64,
) -> bool {
    let last_seen = service.updated_at.unwrap_or(service.created_at);
    !service.forced_down && (now - last_seen).num_seconds() <= down_after
}

/// Clients name services as Nova does (`nova-compute`); Zova's binaries are `zova-*`.
fn binary_name(given: &str) -> String {
    match given.strip_prefix("nova-") {
        Some(rest) => format!("zova-{rest}"),
        None => given.to_string(),
    }
}

fn zone_of(service: &Service) -> &'static str {
    if service.binary == "zova-compute" {
        "nova"
    } else {
        "internal"
    }
}

/// A string field of an `os-services` update body.
fn text_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<String, ApiError> {
    match body.get(key) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => Ok(s.clone()),
        Some(_) => Err(ApiError::BadRequest(format!(
            "Invalid input for field/attribute {key}. Value must be a string of 1 to 255 characters."
        ))),
        None => Err(ApiError::BadRequest(format!("'{key}' is a required property"))),
    }
}

/// The allocation ratios a node reports in its extra resources (the scheduler's defaults when it
/// reports none).
fn ratios(node: &ComputeNode) -> (f64, f64, f64) {
    let extra: Value = serde_json::from_str(&node.extra_resources).unwrap_or(Value::Null);
    let ratio = |key: &str, default: f64| extra.get(key).and_then(Value::as_f64).unwrap_or(default);
    (
        ratio("cpu_allocation_ratio", 4.0),
        ratio("ram_allocation_ratio", 1.0),
        ratio("disk_allocation_ratio", 1.0),
    )
}

impl Api {
    fn services_view(&self, call: &Call, services: &[Service]) -> Vec<Value> {
        let now = chrono::Utc::now().naive_utc();
        services
            .iter()
            .map(|s| {
                let mut shown = json!({
                    "id": s.id,
                    "binary": s.binary,
                    "host": s.host,
                    "zone": zone_of(s),
                    "status": if s.disabled { "disabled" } else { "enabled" },
                    "state": if service_is_up(s, now, self.config.service_down_time) { "up" } else { "down" },
                    "updated_at": time_or_null(s.updated_at),
                    "disabled_reason": s.disabled_reason,
                });
                if call.version.at_least(11) {
                    shown["forced_down"] = json!(s.forced_down);
                }
                shown
            })
            .collect()
    }

    pub(crate) async fn list_services(
        &self,
        call: &Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-services:list")?;
        let host = call.param("host").map(str::to_string);
        let binary = call.param("binary").map(binary_name);
        let services: Vec<Service> = self
            .db(|db| db.services())
            .await?
            .into_iter()
            .filter(|s| host.as_ref().is_none_or(|h| &s.host == h))
            .filter(|s| binary.as_ref().is_none_or(|b| &s.binary == b))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({"services": self.services_view(call, &services)}),
        ))
    }

    /// `PUT /os-services/{enable|disable|disable-log-reason|force-down}` with `{host, binary}`.
    pub(crate) async fn update_service(
        &self,
        call: &Call,
        action: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-services:update")?;
        let known = matches!(action, "enable" | "disable" | "disable-log-reason")
            || (action == "force-down" && call.version.at_least(11));
        if !known {
            return Err(ApiError::NotFound(format!("Unknown action {action}")));
        }
        let body = body_object(body)?;
        let host = text_field(&body, "host")?;
        let binary = binary_name(&text_field(&body, "binary")?);
        let allowed: &[&str] = match action {
            "disable-log-reason" => &["host", "binary", "disabled_reason"],
            "force-down" => &["host", "binary", "forced_down"],
            _ => &["host", "binary"],
        };
        if let Some(extra) = body.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::BadRequest(format!(
                "Additional properties are not allowed ('{extra}' was unexpected)"
            )));
        }
        let (h, b) = (host.clone(), binary.clone());
        let shown = match action {
            "enable" => {
                self.db(move |db| db.service_set_disabled(&h, &b, false, None))
                    .await?;
                json!({"host": host, "binary": binary, "status": "enabled"})
            }
            "disable" => {
                self.db(move |db| db.service_set_disabled(&h, &b, true, None))
                    .await?;
                json!({"host": host, "binary": binary, "status": "disabled"})
            }
            "disable-log-reason" => {
                let reason = text_field(&body, "disabled_reason")?;
                let r = reason.clone();
                self.db(move |db| db.service_set_disabled(&h, &b, true, Some(&r)))
                    .await?;
                json!({"host": host, "binary": binary, "status": "disabled", "disabled_reason": reason})
            }
            _ => {
                let Some(Value::Bool(forced_down)) = body.get("forced_down").cloned() else {
                    return Err(ApiError::BadRequest(
                        "Invalid input for field/attribute forced_down. Value must be a boolean."
                            .into(),
                    ));
                };
                self.db(move |db| db.service_set_forced_down(&h, &b, forced_down))
                    .await?;
                json!({"host": host, "binary": binary, "forced_down": forced_down})
            }
        };
        Ok(json_response(StatusCode::OK, &json!({"service": shown})))
    }

    fn hypervisor_view(
        &self,
        call: &Call,
        node: &ComputeNode,
        service: &Service,
        detail: bool,
    ) -> Value {
        let now = chrono::Utc::now().naive_utc();
        let up = service_is_up(service, now, self.config.service_down_time);
        let mut shown = json!({
            "id": node.id,
            "hypervisor_hostname": node.hypervisor_hostname,
            "state": if up { "up" } else { "down" },
            "status": if service.disabled { "disabled" } else { "enabled" },
        });
        if !detail {
            return shown;
        }
        // Used is what the node reports or what schedulers placed on it, whichever is more: a
        // placement counts before the compute reports it.
        let vcpus_used = node.vcpus_used.max(node.placed_vcpus);
        let memory_mb_used = node.memory_mb_used.max(node.placed_memory_mb);
        let local_gb_used = node.local_gb_used.max((node.placed_disk_mb + 1023) / 1024);
        let (cpu_ratio, ram_ratio, disk_ratio) = ratios(node);
        let cpu_info =
            json!({"arch": "x86_64", "model": "", "vendor": "", "topology": {}, "features": []});
        let extra = json!({
            "vcpus": node.vcpus,
            "memory_mb": node.memory_mb,
            "local_gb": node.local_gb,
            "vcpus_used": vcpus_used,
            "memory_mb_used": memory_mb_used,
            "local_gb_used": local_gb_used,
            "free_ram_mb": node.memory_mb - memory_mb_used,
            "free_disk_gb": node.local_gb - local_gb_used,
            "current_workload": 0,
            "running_vms": node.running_vms,
            "disk_available_least": node.local_gb - local_gb_used,
            "host_ip": "127.0.0.1",
            "hypervisor_type": node.hypervisor_type,
            "hypervisor_version": 1000000,
            // 2.28 turned the CPU description from a JSON string into an object.
            "cpu_info": if call.version.at_least(28) { cpu_info } else { json!(cpu_info.to_string()) },
            "service": {"id": service.id, "host": service.host, "disabled_reason": service.disabled_reason},
            // Not in Nova's body (its ratios live in placement); operators want them here.
            "cpu_allocation_ratio": cpu_ratio,
            "ram_allocation_ratio": ram_ratio,
            "disk_allocation_ratio": disk_ratio,
        });
        if let (Some(map), Value::Object(extra)) = (shown.as_object_mut(), extra) {
            map.extend(extra);
        }
        shown
    }

    pub(crate) async fn list_hypervisors(
        &self,
        call: &Call,
        detail: bool,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-hypervisors:list")?;
        let mut nodes = self.db(|db| db.compute_nodes_with_services()).await?;
        nodes.sort_by_key(|(node, _)| node.id);
        let (nodes, more) = if call.version.at_least(33) {
            let page = page(call, self.config.max_limit)?;
            paginate(nodes, &page, |(node, _)| node.id.to_string())?
        } else {
            (nodes, false)
        };
        let shown: Vec<Value> = nodes
            .iter()
            .map(|(node, service)| self.hypervisor_view(call, node, service, detail))
            .collect();
        let mut body = json!({"hypervisors": shown});
        if more {
            if let Some((last, _)) = nodes.last() {
                let path = if detail {
                    "os-hypervisors/detail"
                } else {
                    "os-hypervisors"
                };
                body["hypervisors_links"] = next_link(call, path, &last.id.to_string());
            }
        }
        Ok(json_response(StatusCode::OK, &body))
    }

    pub(crate) async fn show_hypervisor(
        &self,
        call: &Call,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-hypervisors:show")?;
        let nodes = self.db(|db| db.compute_nodes_with_services()).await?;
        let found = nodes
            .iter()
            .find(|(node, _)| node.id.to_string() == id)
            .ok_or_else(|| {
                ApiError::NotFound(format!("Hypervisor with ID {id} could not be found."))
            })?;
        Ok(json_response(
            StatusCode::OK,
            &json!({"hypervisor": self.hypervisor_view(call, &found.0, &found.1, true)}),
        ))
    }

    /// One zone, `nova`, for every compute host; `detail` (admins) also lists the hosts and the
    /// `internal` zone of the other services.
    pub(crate) async fn availability_zones(
        &self,
        call: &Call,
        detail: bool,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        if detail {
            policy::admin(call, "os_compute_api:os-availability-zone:detail")?;
        } else {
            policy::reader(call, "os_compute_api:os-availability-zone:list")?;
        }
        let services = self.db(|db| db.services()).await?;
        let now = chrono::Utc::now().naive_utc();
        let zones: Vec<Value> = ["nova", "internal"]
            .iter()
            .filter_map(|zone| {
                let members: Vec<&Service> =
                    services.iter().filter(|s| zone_of(s) == *zone).collect();
                if *zone == "internal" && (!detail || members.is_empty()) {
                    return None;
                }
                let available = members
                    .iter()
                    .any(|s| !s.disabled && service_is_up(s, now, self.config.service_down_time));
                let hosts = if detail {
                    let mut hosts = serde_json::Map::new();
                    for s in &members {
                        let entry = hosts.entry(s.host.clone()).or_insert_with(|| json!({}));
                        entry[s.binary.replace("zova-", "nova-")] = json!({
                            "available": service_is_up(s, now, self.config.service_down_time),
                            "active": !s.disabled,
                            "updated_at": time_or_null(s.updated_at),
                        });
                    }
                    Value::Object(hosts)
                } else {
                    Value::Null
                };
                Some(json!({"zoneName": zone, "zoneState": {"available": available}, "hosts": hosts}))
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({"availabilityZoneInfo": zones}),
        ))
    }
}
