//! Servers: create, list, show, update, delete, the stop/start/reboot actions, their history
//! (`os-instance-actions`) and the project's `limits`.

use std::collections::BTreeMap;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};
use slog::{info, warn};
use tokio::sync::oneshot;

use db::{Image, Instance, InstanceFilter, NewFault, NewInstance};
use proto::{
    power_state, task_state, vm_state, BuildInstances, RebootInstance, StartInstance, StopInstance,
    TerminateInstance,
};

use crate::views::{self, ServerView};
use crate::{empty_response, json_body, json_response, policy, validate, Api, ApiError, Call};

/// The vm_states a `status` filter stands for (Nova's `status_to_vm_states`, for the states Zova
/// has).
fn vm_states_for_status(status: &str) -> Option<&'static [&'static str]> {
    Some(match status.to_ascii_uppercase().as_str() {
        "ACTIVE" => &["active"],
        "BUILD" => &["building"],
        "ERROR" => &["error"],
        "SHUTOFF" => &["stopped"],
        "PAUSED" => &["paused"],
        "SUSPENDED" => &["suspended"],
        "DELETED" => &["deleted"],
        "REBOOT" | "HARD_REBOOT" => &["active"],
        _ => return None,
    })
}

/// `limit` and `marker` of a list, with `[api] max_limit` applied.
pub(crate) struct Page {
    pub limit: usize,
    pub marker: Option<String>,
}

pub(crate) fn page(call: &Call, max_limit: usize) -> Result<Page, ApiError> {
    let limit = match call.param("limit") {
        None => max_limit,
        Some(text) => match text.parse::<i64>() {
            Ok(n) if n >= 0 => (n as usize).min(max_limit),
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "Invalid input for query parameters limit. Value: {text}. Value must be a non-negative integer."
                )))
            }
        },
    };
    Ok(Page {
        limit,
        marker: call.param("marker").map(str::to_string),
    })
}

/// The items after the marker (by id), at most `limit`; an unknown marker is a 400, as Nova's.
pub(crate) fn paginate<T>(
    items: Vec<T>,
    page: &Page,
    id: impl Fn(&T) -> String,
) -> Result<(Vec<T>, bool), ApiError> {
    let start = match &page.marker {
        None => 0,
        Some(marker) => match items.iter().position(|item| &id(item) == marker) {
            Some(at) => at + 1,
            None => return Err(ApiError::BadRequest(format!("marker [{marker}] not found"))),
        },
    };
    let rest: Vec<T> = items.into_iter().skip(start).collect();
    let more = rest.len() > page.limit;
    Ok((rest.into_iter().take(page.limit).collect(), more))
}

/// The `next` link of a page that was cut at `limit`, keeping the other query parameters.
pub(crate) fn next_link(call: &Call, path: &str, last_id: &str) -> Value {
    let mut query: Vec<String> = call
        .query
        .iter()
        .filter(|(k, _)| k != "marker")
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    query.push(format!("marker={}", encode(last_id)));
    json!([{"rel": "next", "href": format!("{}/v2.1/{path}?{}", call.base, query.join("&"))}])
}

fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Instance {id} could not be found."))
}

/// A page of servers with their latest faults, and the fixed IPs of each by uuid.
type FaultsAndAddresses = (
    Vec<(Instance, Option<db::InstanceFault>)>,
    BTreeMap<String, Vec<db::FixedIp>>,
);

impl Api {
    fn server_view<'a>(&self, call: &'a Call) -> ServerView<'a> {
        ServerView {
            base: &call.base,
            version: call.version,
            admin: call.is_admin(),
        }
    }

    /// Each compute host's state for `host_status` (2.16, admins): UP, DOWN, MAINTENANCE
    /// (disabled) as Nova reports it.
    async fn host_statuses(&self, call: &Call) -> Result<BTreeMap<String, String>, ApiError> {
        if !(call.is_admin() && call.version.at_least(16)) {
            return Ok(BTreeMap::new());
        }
        let down_after = self.config.service_down_time;
        let services = self.db(|db| db.services()).await?;
        let now = chrono::Utc::now().naive_utc();
        Ok(services
            .into_iter()
            .filter(|s| s.binary == "zova-compute")
            .map(|s| {
                let status = if !crate::admin::service_is_up(&s, now, down_after) {
                    "DOWN"
                } else if s.disabled {
                    "MAINTENANCE"
                } else {
                    "UP"
                };
                (s.host, status.to_string())
            })
            .collect())
    }

    /// The live instance `id` if the caller's project may see it (admins see all).
    pub(crate) async fn visible_instance(
        &self,
        call: &Call,
        id: &str,
    ) -> Result<Instance, ApiError> {
        let lookup = id.to_string();
        let instance = self.db(move |db| db.instance_get(&lookup)).await?;
        match instance {
            Some(instance) if call.is_admin() || instance.project_id == call.context.project_id => {
                Ok(instance)
            }
            _ => Err(not_found(id)),
        }
    }

    /// `same_host` and `different_host` name servers; a non-admin may name only its project's,
    /// so a hint cannot tell whether another project's server exists or put a server beside it.
    async fn check_hinted_servers(
        &self,
        call: &Call,
        hints: &proto::SchedulerHints,
    ) -> Result<(), ApiError> {
        if call.is_admin() {
            return Ok(());
        }
        let named: Vec<String> = hints
            .same_host
            .iter()
            .chain(hints.different_host.iter())
            .cloned()
            .collect();
        if named.is_empty() {
            return Ok(());
        }
        let lookup = named.clone();
        let found = self.db(move |db| db.instances_by_uuids(&lookup)).await?;
        for uuid in &named {
            let visible = found
                .iter()
                .any(|i| &i.uuid == uuid && i.project_id == call.context.project_id);
            if !visible {
                return Err(ApiError::BadRequest(format!(
                    "Invalid server in scheduler hints: {uuid} could not be found."
                )));
            }
        }
        Ok(())
    }

    pub(crate) async fn create_server(
        self: &Arc<Self>,
        call: &Call,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::member(call, "os_compute_api:servers:create")?;
        let request =
            validate::parse_create_server(body, call.version).map_err(ApiError::BadRequest)?;
        if request.hints.scheduler_host.is_some() && !call.is_admin() {
            return Err(ApiError::Forbidden(
                "Policy doesn't allow os_compute_api:servers:create:forced_host to be performed."
                    .into(),
            ));
        }
        if request.metadata.len() as i64 > self.quota.metadata_items
            && self.quota.metadata_items >= 0
        {
            return Err(ApiError::Forbidden(format!(
                "Quota exceeded for metadata_items: Requested {}, but already used 0 of {} metadata_items",
                request.metadata.len(),
                self.quota.metadata_items
            )));
        }
        let (flavor_ref, image_ref) = (request.flavor_ref.clone(), request.image_ref.clone());
        let key = request
            .key_name
            .clone()
            .map(|name| (call.context.user_id.clone(), name));
        let (flavor, image, specs, key_found) = self
            .db(move |db| {
                let flavor = db.flavor_get(&flavor_ref)?;
                let specs = match &flavor {
                    Some(f) => db.flavor_extra_specs(&f.flavorid)?,
                    None => BTreeMap::new(),
                };
                let key_found = match &key {
                    Some((user, name)) => db.key_pair_get(user, name)?.is_some(),
                    None => true,
                };
                Ok((flavor, db.image_get(&image_ref)?, specs, key_found))
            })
            .await?;
        // Zova keeps no flavor access lists: a private flavor is for admins only.
        let flavor = flavor
            .filter(|f| f.is_public || call.is_admin())
            .ok_or_else(|| {
                ApiError::BadRequest(format!("Flavor {} could not be found.", request.flavor_ref))
            })?;
        if flavor.disabled {
            return Err(ApiError::BadRequest(format!(
                "Flavor {} is disabled.",
                flavor.flavorid
            )));
        }
        let image = image.ok_or_else(|| {
            ApiError::BadRequest(format!("Image {} could not be found.", request.image_ref))
        })?;
        if image.status != "active" {
            return Err(ApiError::BadRequest(format!(
                "Image {} is not active.",
                image.uuid
            )));
        }
        if !key_found {
            return Err(ApiError::BadRequest("Invalid key_name provided.".into()));
        }
        if flavor.root_gb > 0 && flavor.root_gb < image.min_disk {
            return Err(ApiError::BadRequest(
                "Flavor's disk is too small for requested image.".into(),
            ));
        }
        if flavor.memory_mb < image.min_ram {
            return Err(ApiError::BadRequest(
                "Flavor's memory is too small for requested image.".into(),
            ));
        }
        self.check_hinted_servers(call, &request.hints).await?;

        let reservation_id = format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let metadata = serde_json::to_string(&request.metadata)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let hints_json =
            serde_json::to_string(&request.hints).map_err(|e| ApiError::Internal(e.to_string()))?;
        let flavor_snapshot = json!({"name": flavor.name, "extra_specs": specs}).to_string();
        let count = request.max_count;
        let rows: Vec<NewInstance> = (0..count)
            .map(|index| NewInstance {
                uuid: uuid::Uuid::new_v4().to_string(),
                // Nova's multi_instance_display_name_template: "%(name)s-%(count)d".
                display_name: if count > 1 {
                    format!("{}-{}", request.name, index + 1)
                } else {
                    request.name.clone()
                },
                project_id: call.context.project_id.clone(),
                user_id: call.context.user_id.clone(),
                flavorid: flavor.flavorid.clone(),
                image_ref: image.uuid.clone(),
                vcpus: flavor.vcpus,
                memory_mb: flavor.memory_mb,
                root_gb: flavor.root_gb,
                ephemeral_gb: flavor.ephemeral_gb,
                swap_mb: flavor.swap_mb,
                vm_state: vm_state::BUILDING.into(),
                task_state: Some(task_state::SCHEDULING.into()),
                power_state: power_state::NOSTATE,
                scheduler_hints: hints_json.clone(),
                metadata: metadata.clone(),
                reservation_id: reservation_id.clone(),
                launch_index: index as i32,
                description: request.description.clone(),
                key_name: request.key_name.clone(),
                flavor_snapshot: flavor_snapshot.clone(),
            })
            .collect();
        // Detached, so a client that hangs up cannot leave rows written but never cast. The
        // answer goes back once the rows are committed, and the cast follows: the answer never
        // depended on the cast (one the conductor does not take ends the instances in ERROR),
        // and waiting for the conductor's ack, a round trip through two busy processes, was a
        // fifth of a create's time under load.
        let api = self.clone();
        let (task_log, task_context, hints) = (
            call.log.clone(),
            call.context.clone(),
            request.hints.clone(),
        );
        let min_count = request.min_count;
        let (committed, answer) = oneshot::channel();
        let casting = self.casting.start();
        tokio::spawn(async move {
            let _casting = casting;
            let created = api.insert(&task_context, rows, min_count).await;
            let (answer, instances) = match created {
                Ok(instances) => (
                    Ok(instances.iter().map(|i| i.uuid.clone()).collect()),
                    instances,
                ),
                Err(e) => (Err(e), Vec::new()),
            };
            let _ = committed.send(answer);
            if !instances.is_empty() {
                api.cast_build(&task_log, &task_context, instances, image, hints, min_count)
                    .await;
            }
        });
        let uuids: Vec<String> = answer
            .await
            .map_err(|_| ApiError::Internal("the create task stopped".into()))??;
        info!(call.log, "servers accepted"; "count" => uuids.len(), "first" => &uuids[0], "flavor" => &flavor.name);
        if request.return_reservation_id {
            return Ok(json_response(
                StatusCode::ACCEPTED,
                &json!({"reservation_id": reservation_id}),
            ));
        }
        let id = &uuids[0];
        let base = &call.base;
        let admin_pass = Alphanumeric.sample_string(&mut rand::thread_rng(), 12);
        let body = json!({"server": {
            "id": id,
            "links": [
                {"rel": "self", "href": format!("{base}/v2.1/servers/{id}")},
                {"rel": "bookmark", "href": format!("{base}/servers/{id}")},
            ],
            "adminPass": admin_pass,
            "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": "default"}],
        }});
        let mut response = json_response(StatusCode::ACCEPTED, &body);
        if let Ok(location) = HeaderValue::from_str(&format!("{base}/v2.1/servers/{id}")) {
            response
                .headers_mut()
                .insert(hyper::header::LOCATION, location);
        }
        Ok(response)
    }

    /// Writes as many rows as the quota allows (at least `min_count`, all in one transaction).
    async fn insert(
        &self,
        context: &proto::RequestContext,
        rows: Vec<NewInstance>,
        min_count: i64,
    ) -> Result<Vec<Instance>, ApiError> {
        let request_id = context.request_id.clone();
        let limits = self.quota.limits();
        let min = usize::try_from(min_count).unwrap_or(1);
        let created = self
            .creates
            .create(rows, min, request_id, limits)
            .await
            .ok_or_else(|| ApiError::Internal("the writer of creates stopped".into()))??
            .map_err(|exceeded| ApiError::Forbidden(exceeded.to_string()))?;
        Ok(created)
    }

    /// Casts `build_instances`; if the conductor does not take it, the rows go to ERROR with the
    /// reason rather than wait in BUILD forever.
    async fn cast_build(
        &self,
        log: &slog::Logger,
        context: &proto::RequestContext,
        instances: Vec<Instance>,
        image: Image,
        hints: proto::SchedulerHints,
        min_count: i64,
    ) {
        let uuids: Vec<String> = instances.iter().map(|i| i.uuid.clone()).collect();
        // The specs as the conductor would read them back; none if one cannot be made (the
        // conductor then reads them all).
        let specs = instances
            .into_iter()
            .map(|instance| conductor::request_spec_of_new(instance, image.clone(), hints.clone()))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        let build = BuildInstances {
            instance_uuids: uuids.clone(),
            hints,
            min_count: u32::try_from(min_count).unwrap_or(1),
            specs,
        };
        let Err(e) = self.conductors.cast(&self.rpc, context, &build).await else {
            return;
        };
        warn!(log, "conductor did not take build_instances"; "error" => %e);
        let message = format!("The conductor did not take the build request: {e}");
        for uuid in uuids {
            let fault = NewFault {
                instance_uuid: uuid.clone(),
                code: 500,
                message: message.clone(),
                details: String::new(),
                host: None,
            };
            if let Err(e) = self
                .db(move |db| db.instance_set_error(&uuid, &fault))
                .await
            {
                warn!(log, "could not record the fault"; "error" => %e);
            }
        }
    }

    pub(crate) async fn list_servers(
        &self,
        call: &Call,
        detail: bool,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:servers:index")?;
        let page = page(call, self.config.max_limit)?;
        let all_tenants = match call.param("all_tenants") {
            None => false,
            Some(v) => !matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "false" | "off" | "no"
            ),
        };
        if all_tenants {
            policy::admin(call, "os_compute_api:servers:index:get_all_tenants")?;
        }
        let mut filter = InstanceFilter {
            project_id: if all_tenants {
                call.param("project_id")
                    .or(call.param("tenant_id"))
                    .map(str::to_string)
            } else {
                Some(call.context.project_id.clone())
            },
            ..Default::default()
        };
        // Nova ignores the admin-only filters for other callers rather than refusing them.
        if call.is_admin() {
            filter.host = call.param("host").map(str::to_string);
        }
        if let Some(status) = call.param("status") {
            match vm_states_for_status(status) {
                Some(states) => {
                    filter.vm_states = Some(states.iter().map(|s| s.to_string()).collect())
                }
                None if call.version.at_least(38) => {
                    return Err(ApiError::BadRequest(format!(
                        "Invalid status value: {status}"
                    )))
                }
                None => {
                    return Ok(json_response(StatusCode::OK, &json!({"servers": []})));
                }
            }
            match status.to_ascii_uppercase().as_str() {
                "REBOOT" => filter.task_state = Some(Some(task_state::REBOOTING.into())),
                "HARD_REBOOT" => filter.task_state = Some(Some(task_state::REBOOTING_HARD.into())),
                _ => {}
            }
        }
        let name = match call.param("name") {
            // Nova matches the name as a regular expression (a search, not a full match).
            Some(pattern) => Some(regex::Regex::new(pattern).map_err(|e| {
                ApiError::BadRequest(format!("Invalid name filter {pattern:?}: {e}"))
            })?),
            None => None,
        };
        let flavor = call.param("flavor").map(str::to_string);
        let image = call.param("image").map(str::to_string);
        // Filtering by address or tag is not implemented yet, so these filters match nothing.
        let matches_nothing = call.param("ip").is_some()
            || call.param("ip6").is_some()
            || (call.version.at_least(26)
                && (call.param("tags").is_some() || call.param("tags-any").is_some()));
        let marker_project = filter.project_id.clone();
        let instances = if matches_nothing {
            Vec::new()
        } else {
            self.db(move |db| db.instances_query(&filter)).await?
        };
        let instances: Vec<Instance> = instances
            .into_iter()
            .filter(|i| name.as_ref().is_none_or(|re| re.is_match(&i.display_name)))
            .filter(|i| flavor.as_ref().is_none_or(|f| &i.flavorid == f))
            .filter(|i| image.as_ref().is_none_or(|f| &i.image_ref == f))
            .collect();
        let (instances, more) = match &page.marker {
            Some(marker) if !instances.iter().any(|i| &i.uuid == marker) => {
                // As Nova: a marker that no longer matches the filters (a server that left
                // BUILD between two pages) or was deleted still marks where the next page
                // starts, by its place in the order (newest first); only an unknown one is a 400.
                let (lookup, project) = (marker.clone(), marker_project.clone());
                let found = self
                    .db(move |db| db.instance_get_with_deleted(&lookup))
                    .await?
                    .filter(|m| project.as_ref().is_none_or(|p| &m.project_id == p));
                let Some(at) = found else {
                    return Err(ApiError::BadRequest(format!("marker [{marker}] not found")));
                };
                let after: Vec<Instance> = instances
                    .into_iter()
                    .filter(|i| (i.created_at, i.id) < (at.created_at, at.id))
                    .collect();
                let more = after.len() > page.limit;
                (after.into_iter().take(page.limit).collect(), more)
            }
            _ => paginate(instances, &page, |i| i.uuid.clone())?,
        };
        let view = self.server_view(call);
        let statuses = if detail {
            self.host_statuses(call).await?
        } else {
            BTreeMap::new()
        };
        let (with_faults, mut fixed_ips): FaultsAndAddresses = if detail {
            self.db(move |db| {
                // One query for the addresses of the whole page.
                let uuids: Vec<String> = instances.iter().map(|i| i.uuid.clone()).collect();
                let mut fixed_ips: BTreeMap<String, Vec<db::FixedIp>> = BTreeMap::new();
                for ip in db.fixed_ips_of_instances(&uuids)? {
                    fixed_ips
                        .entry(ip.instance_uuid.clone())
                        .or_default()
                        .push(ip);
                }
                let mut out = Vec::with_capacity(instances.len());
                for instance in instances {
                    let fault = if instance.vm_state == vm_state::ERROR {
                        db.instance_fault_latest(&instance.uuid)?
                    } else {
                        None
                    };
                    out.push((instance, fault));
                }
                Ok((out, fixed_ips))
            })
            .await?
        } else {
            (
                instances.into_iter().map(|i| (i, None)).collect(),
                BTreeMap::new(),
            )
        };
        let servers: Vec<Value> = with_faults
            .iter()
            .map(|(i, f)| {
                if detail {
                    let status = i
                        .host
                        .as_ref()
                        .and_then(|h| statuses.get(h))
                        .map(String::as_str);
                    let ips = fixed_ips.remove(&i.uuid).unwrap_or_default();
                    views::server_detail(view, i, f.as_ref(), status, &ips)
                } else {
                    views::server_summary(&call.base, i)
                }
            })
            .collect();
        let mut body = json!({ "servers": servers });
        if more {
            if let Some((last, _)) = with_faults.last() {
                let path = if detail { "servers/detail" } else { "servers" };
                body["servers_links"] = next_link(call, path, &last.uuid);
            }
        }
        Ok(json_response(StatusCode::OK, &body))
    }

    async fn server_body(&self, call: &Call, instance: &Instance) -> Result<Value, ApiError> {
        let uuid = instance.uuid.clone();
        let in_error = instance.vm_state == vm_state::ERROR;
        let (fault, fixed_ips) = self
            .db(move |db| {
                let fault = if in_error {
                    db.instance_fault_latest(&uuid)?
                } else {
                    None
                };
                Ok((fault, db.fixed_ips_of(&uuid)?))
            })
            .await?;
        let statuses = self.host_statuses(call).await?;
        let status = instance
            .host
            .as_ref()
            .and_then(|h| statuses.get(h))
            .map(String::as_str);
        Ok(
            json!({"server": views::server_detail(self.server_view(call), instance, fault.as_ref(), status, &fixed_ips)}),
        )
    }

    pub(crate) async fn show_server(
        &self,
        call: &Call,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:servers:show")?;
        let instance = self.visible_instance(call, id).await?;
        Ok(json_response(
            StatusCode::OK,
            &self.server_body(call, &instance).await?,
        ))
    }

    /// `PUT /servers/{id}`: the name, and from 2.19 the description.
    pub(crate) async fn update_server(
        &self,
        call: &Call,
        id: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::member(call, "os_compute_api:servers:update")?;
        let changes =
            validate::parse_update_server(body, call.version).map_err(ApiError::BadRequest)?;
        let instance = self.visible_instance(call, id).await?;
        let uuid = instance.uuid.clone();
        let updated = self
            .db(move |db| db.instance_update(&uuid, &changes))
            .await?;
        Ok(json_response(
            StatusCode::OK,
            &self.server_body(call, &updated).await?,
        ))
    }

    pub(crate) async fn delete_server(
        self: &Arc<Self>,
        call: &Call,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::member(call, "os_compute_api:servers:delete")?;
        let instance = self.visible_instance(call, id).await?;
        // Detached, so a client that hangs up cannot leave the server marked `deleting` for ever.
        let api = self.clone();
        let (task_log, task_context) = (call.log.clone(), call.context.clone());
        tokio::spawn(async move { api.terminate(&task_log, &task_context, instance).await })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        Ok(empty_response(StatusCode::NO_CONTENT))
    }

    /// The RPC endpoint of a host's compute service, with its CURVE key installed.
    async fn compute_endpoint(
        &self,
        log: &slog::Logger,
        host: String,
    ) -> Result<Option<String>, ApiError> {
        let found = self
            .db(move |db| {
                Ok(db
                    .service_get(&host, "zova-compute")?
                    .map(|s| (s.rpc_endpoint, s.rpc_public_key)))
            })
            .await?;
        let Some((endpoint, key)) = found else {
            return Ok(None);
        };
        if let Some(key) = key {
            if let Err(e) = self.rpc.set_peer_key(&endpoint, &key) {
                warn!(log, "the compute registered an unusable key"; "endpoint" => &endpoint, "error" => %e);
            }
        }
        Ok(Some(endpoint))
    }

    /// Casts the delete to the instance's compute; with no host, or a compute that does not take
    /// the cast, deletes the row here (Nova's "local delete").
    async fn terminate(
        &self,
        log: &slog::Logger,
        context: &proto::RequestContext,
        instance: Instance,
    ) -> Result<(), ApiError> {
        let uuid = instance.uuid.clone();
        // The delete is part of the server's history, which outlives it (2.21).
        let (lookup, request_id, user, project) = (
            uuid.clone(),
            context.request_id.clone(),
            context.user_id.clone(),
            context.project_id.clone(),
        );
        self.db(move |db| {
            db.instance_action_start(&lookup, "delete", &request_id, &user, &project)
        })
        .await?;
        let endpoint = match instance.host {
            Some(host) => self.compute_endpoint(log, host).await?,
            None => None,
        };
        if let Some(endpoint) = endpoint {
            let changes = db::InstanceChanges {
                task_state: Some(Some(task_state::DELETING.into())),
                ..Default::default()
            };
            let lookup = uuid.clone();
            self.db(move |db| db.instance_update(&lookup, &changes))
                .await?;
            match self
                .rpc
                .cast(
                    &endpoint,
                    context,
                    &TerminateInstance { uuid: uuid.clone() },
                )
                .await
            {
                // The compute has taken it: the request is done from the API's side.
                Ok(()) => return self.finish_delete_action(&uuid, &context.request_id).await,
                Err(e) => {
                    warn!(log, "compute did not take the delete; deleting locally"; "instance" => &uuid, "error" => %e)
                }
            }
        }
        let lookup = uuid.clone();
        self.db(move |db| db.instance_destroy(&lookup)).await?;
        self.finish_delete_action(&uuid, &context.request_id).await
    }

    async fn finish_delete_action(&self, uuid: &str, request_id: &str) -> Result<(), ApiError> {
        let (uuid, request_id) = (uuid.to_string(), request_id.to_string());
        self.db(
            move |db| match db.instance_action_finish(&uuid, &request_id, None) {
                Ok(()) | Err(db::DbError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            },
        )
        .await
    }

    /// `POST /servers/{id}/action`: `os-stop`, `os-start` and `reboot`.
    pub(crate) async fn server_action(
        self: &Arc<Self>,
        call: &Call,
        id: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let action = validate::parse_server_action(body).map_err(ApiError::BadRequest)?;
        let (rule, allowed, task, name): (&str, &[&str], &str, &str) = match action {
            // Not from ERROR, unlike Nova: an instance in error has no domain in Zova.
            validate::ServerAction::Stop => (
                "os_compute_api:servers:stop",
                &[vm_state::ACTIVE],
                task_state::POWERING_OFF,
                "stop",
            ),
            validate::ServerAction::Start => (
                "os_compute_api:servers:start",
                &[vm_state::STOPPED],
                task_state::POWERING_ON,
                "start",
            ),
            validate::ServerAction::Reboot { hard: false } => (
                "os_compute_api:servers:reboot",
                &[vm_state::ACTIVE],
                task_state::REBOOTING,
                "reboot",
            ),
            validate::ServerAction::Reboot { hard: true } => (
                "os_compute_api:servers:reboot",
                &[vm_state::ACTIVE, vm_state::STOPPED],
                task_state::REBOOTING_HARD,
                "reboot",
            ),
        };
        policy::member(call, rule)?;
        let instance = self.visible_instance(call, id).await?;
        let Some(host) = instance.host.clone() else {
            return Err(ApiError::Conflict(format!(
                "Cannot '{name}' instance {id} while it is in vm_state {}",
                instance.vm_state
            )));
        };
        let context = call.context.clone();
        let (uuid, task_owned, name_owned) =
            (instance.uuid.clone(), task.to_string(), name.to_string());
        let allowed_owned: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        self.db(move |db| {
            let allowed: Vec<&str> = allowed_owned.iter().map(String::as_str).collect();
            // A hard reboot may take over a soft one that hangs, as in Nova.
            let replaceable: &[&str] = if task_owned == task_state::REBOOTING_HARD {
                &[task_state::REBOOTING]
            } else {
                &[]
            };
            db.instance_begin_task(
                &uuid,
                &allowed,
                replaceable,
                &task_owned,
                &name_owned,
                &context.request_id,
                &context.user_id,
                &context.project_id,
            )
        })
        .await?;
        let uuid = instance.uuid.clone();
        let task_owned_for_undo = task.to_string();
        // Detached: once the task is set, the cast (or its undoing) must happen.
        let api = self.clone();
        let (log, context) = (call.log.clone(), call.context.clone());
        tokio::spawn(async move {
            let sent = match api.compute_endpoint(&log, host.clone()).await {
                Ok(Some(endpoint)) => {
                    let result = match action {
                        validate::ServerAction::Stop => {
                            api.rpc
                                .cast(&endpoint, &context, &StopInstance { uuid: uuid.clone() })
                                .await
                        }
                        validate::ServerAction::Start => {
                            api.rpc
                                .cast(&endpoint, &context, &StartInstance { uuid: uuid.clone() })
                                .await
                        }
                        validate::ServerAction::Reboot { hard } => {
                            api.rpc
                                .cast(
                                    &endpoint,
                                    &context,
                                    &RebootInstance {
                                        uuid: uuid.clone(),
                                        hard,
                                    },
                                )
                                .await
                        }
                    };
                    result.map_err(|e| e.to_string())
                }
                Ok(None) => Err(format!("host {host} has no compute service")),
                Err(e) => Err(e.to_string()),
            };
            if let Err(reason) = sent {
                // Undo only what is still this action's: a delete that took over keeps its
                // `deleting`, and a row already gone is left gone. The action ends either way.
                warn!(log, "the compute did not take the action; undoing its task state"; "instance" => &uuid, "error" => &reason);
                let request_id = context.request_id.clone();
                let task = task_owned_for_undo;
                let undo = api
                    .db(move |db| {
                        let reverted = db.instance_update_expecting_task_state(
                            &uuid,
                            &db::InstanceChanges {
                                task_state: Some(None),
                                ..Default::default()
                            },
                            None,
                            Some(&task),
                        );
                        match reverted {
                            Ok(_) | Err(db::DbError::Conflict(_) | db::DbError::NotFound { .. }) => {}
                            Err(e) => return Err(e),
                        }
                        match db.instance_action_finish(&uuid, &request_id, Some("Error")) {
                            Ok(()) | Err(db::DbError::NotFound { .. }) => Ok(()),
                            Err(e) => Err(e),
                        }
                    })
                    .await;
                if let Err(e) = undo {
                    warn!(log, "could not undo the task state"; "error" => %e);
                }
            }
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(empty_response(StatusCode::ACCEPTED))
    }

    /// `os-instance-actions`: the history of a server, also after it is deleted (2.21).
    pub(crate) async fn instance_actions(
        &self,
        call: &Call,
        id: &str,
        request_id: Option<&str>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:os-instance-actions:list")?;
        let lookup = id.to_string();
        let with_deleted = call.version.at_least(21);
        let instance = self
            .db(move |db| {
                if with_deleted {
                    db.instance_get_with_deleted(&lookup)
                } else {
                    db.instance_get(&lookup)
                }
            })
            .await?;
        let instance = match instance {
            Some(i) if call.is_admin() || i.project_id == call.context.project_id => i,
            _ => return Err(not_found(id)),
        };
        let uuid = instance.uuid.clone();
        let actions = self.db(move |db| db.instance_actions(&uuid)).await?;
        let show = |a: &db::InstanceAction| {
            json!({
                "action": a.action,
                "instance_uuid": a.instance_uuid,
                "request_id": a.request_id,
                "user_id": a.user_id,
                "project_id": a.project_id,
                "start_time": views::time_or_null(Some(a.start_time)),
                "message": a.message,
            })
        };
        match request_id {
            None => {
                let mut listed: Vec<Value> = actions.iter().rev().map(show).collect();
                listed.truncate(1000);
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"instanceActions": listed}),
                ))
            }
            Some(request_id) => {
                let action = actions
                    .iter()
                    .find(|a| a.request_id == request_id)
                    .ok_or_else(|| {
                        ApiError::NotFound(format!(
                            "Action for request_id {request_id} on instance {id} not found"
                        ))
                    })?;
                let mut shown = show(action);
                // Zova records no per-step events yet.
                shown["events"] = json!([]);
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"instanceAction": shown}),
                ))
            }
        }
    }

    /// `GET /limits`: the project's quota and what it uses.
    pub(crate) async fn limits(&self, call: &Call) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:limits")?;
        let project = match call.param("tenant_id") {
            Some(other) if other != call.context.project_id => {
                policy::admin(call, "os_compute_api:limits:other_project")?;
                other.to_string()
            }
            _ => call.context.project_id.clone(),
        };
        let defaults = self.quota.limits();
        let (limits, usage) = self
            .db(move |db| {
                Ok((
                    db.quota_limits(&project, &defaults)?,
                    db.quota_usage(&project)?,
                ))
            })
            .await?;
        let mut absolute = json!({
            "maxTotalInstances": limits.instances,
            "maxTotalCores": limits.cores,
            "maxTotalRAMSize": limits.ram,
            "maxServerMeta": self.quota.metadata_items,
            "maxPersonality": 5,
            "maxPersonalitySize": 10240,
            "maxTotalKeypairs": self.quota.key_pairs,
            "maxServerGroups": 10,
            "maxServerGroupMembers": 10,
            "totalInstancesUsed": usage.instances,
            "totalCoresUsed": usage.cores,
            "totalRAMUsed": usage.ram,
            "totalServerGroupsUsed": 0,
        });
        if !call.version.at_least(36) {
            // The network proxies' quotas, gone from 2.36.
            for (key, value) in [
                ("maxSecurityGroups", 10),
                ("maxSecurityGroupRules", 20),
                ("maxTotalFloatingIps", 10),
                ("totalSecurityGroupsUsed", 0),
                ("totalFloatingIpsUsed", 0),
            ] {
                absolute[key] = json!(value);
            }
        }
        if !call.version.at_least(39) {
            absolute["maxImageMeta"] = json!(128);
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"limits": {"rate": [], "absolute": absolute}}),
        ))
    }
}

pub(crate) fn body_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match json_body(body)? {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::BadRequest(
            "Malformed request body: the body must be a JSON object".into(),
        )),
    }
}
