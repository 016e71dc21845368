//! The compute API as the OpenStack clients use it, over real HTTP against a whole fabric:
//! tokens, microversion shapes, every route, the policy rules, quotas and input validation.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use integration::{three_hosts, with_hints, Fabric, HttpResponse, IMAGE};

const BUILD_LIMIT: Duration = Duration::from_secs(30);

async fn fabric() -> Fabric {
    Fabric::start(&three_hosts(), integration::test_log())
        .await
        .expect("fabric starts")
}

fn server(name: &str) -> Value {
    integration::server_body(name, "1")
}

/// A request as the admin at a microversion.
async fn at(
    fabric: &Fabric,
    version: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> HttpResponse {
    let raw = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    integration::http_request(
        &fabric.api_address,
        method,
        path,
        raw,
        &[
            ("x-auth-token", &fabric.admin_token),
            ("openstack-api-version", &format!("compute {version}")),
        ],
    )
    .await
    .expect("answered")
}

async fn get(fabric: &Fabric, path: &str) -> HttpResponse {
    fabric
        .http(Method::GET, path, None)
        .await
        .expect("answered")
}

fn message(response: &HttpResponse) -> String {
    response
        .body
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(|fault| fault["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn wait_for_status(fabric: &Fabric, id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + BUILD_LIMIT;
    loop {
        let shown = get(fabric, &format!("/v2.1/servers/{id}")).await;
        let server = shown.body["server"].clone();
        if server["status"] == status && server["OS-EXT-STS:task_state"].is_null() {
            return server;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server {id} never reached {status}: {server}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_the_api_and_version_documents_need_none() {
    let fabric = fabric().await;
    let versions = fabric
        .http_as("", Method::GET, "/", None)
        .await
        .expect("answered");
    assert_eq!(versions.status, StatusCode::MULTIPLE_CHOICES);
    let ids: Vec<&str> = versions.body["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert_eq!(ids, ["v2.0", "v2.1"]);
    let v21 = fabric
        .http_as("", Method::GET, "/v2.1", None)
        .await
        .expect("answered");
    assert_eq!(v21.body["version"]["version"], "2.47");
    assert_eq!(v21.body["version"]["min_version"], "2.1");

    let anonymous = fabric
        .http_as("", Method::GET, "/v2.1/servers", None)
        .await
        .expect("answered");
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers["www-authenticate"]
        .to_str()
        .unwrap_or_default()
        .contains("/v3"));
    let forged = fabric
        .http_as("not-a-token", Method::GET, "/v2.1/servers", None)
        .await
        .expect("answered");
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);

    // The project id may sit in the path, as older catalogs have it, but must be the token's.
    let with_project = get(&fabric, &format!("/v2.1/{}/flavors", fabric.admin_project)).await;
    assert_eq!(with_project.status, StatusCode::OK);
    let other_project = get(&fabric, "/v2.1/0123456789abcdef0123456789abcdef/flavors").await;
    assert_eq!(other_project.status, StatusCode::BAD_REQUEST);
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_shaped_by_microversion_filtered_and_paged() {
    let fabric = fabric().await;
    let web = fabric
        .boot(
            &with_hints("web-1", "1", json!({"scheduler_host": "node-2"})),
            BUILD_LIMIT,
        )
        .await
        .expect("built");
    assert_eq!(web["status"], "ACTIVE");
    let id = web["id"].as_str().expect("id").to_string();
    for name in ["db-1", "db-2"] {
        let elsewhere = with_hints(name, "1", json!({"scheduler_host_match": "^node-[13]$"}));
        fabric.boot(&elsewhere, BUILD_LIMIT).await.expect("built");
    }

    let old = at(
        &fabric,
        "2.1",
        Method::GET,
        &format!("/v2.1/servers/{id}"),
        None,
    )
    .await;
    let old = &old.body["server"];
    assert_eq!(old["flavor"]["id"], "1");
    assert!(old.get("description").is_none() && old.get("locked").is_none());
    assert!(old.get("OS-EXT-SRV-ATTR:reservation_id").is_none());
    assert_eq!(old["OS-EXT-SRV-ATTR:host"], "node-2");

    let new = at(
        &fabric,
        "2.47",
        Method::GET,
        &format!("/v2.1/servers/{id}"),
        None,
    )
    .await;
    let new = &new.body["server"];
    assert_eq!(new["flavor"]["original_name"], "m1.tiny");
    assert_eq!(new["flavor"]["vcpus"], 1);
    assert_eq!(new["flavor"]["ram"], 512);
    assert!(new["flavor"].get("id").is_none());
    assert_eq!(new["locked"], false);
    assert_eq!(new["tags"], json!([]));
    assert_eq!(new["description"], Value::Null);
    assert_eq!(new["host_status"], "UP");
    assert!(new["OS-EXT-SRV-ATTR:reservation_id"]
        .as_str()
        .unwrap_or_default()
        .starts_with("r-"));

    // Update: a name at 2.1, a description only from 2.19.
    let renamed = at(
        &fabric,
        "2.19",
        Method::PUT,
        &format!("/v2.1/servers/{id}"),
        Some(&json!({"server": {"name": "web-one", "description": "front end"}})),
    )
    .await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    assert_eq!(renamed.body["server"]["name"], "web-one");
    assert_eq!(renamed.body["server"]["description"], "front end");
    let refused = at(
        &fabric,
        "2.18",
        Method::PUT,
        &format!("/v2.1/servers/{id}"),
        Some(&json!({"server": {"description": "x"}})),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);

    // Filters: name is a regular expression, status maps to vm_states, host is for admins.
    let names = |r: &HttpResponse| -> Vec<String> {
        r.body["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect()
    };
    let dbs = get(&fabric, "/v2.1/servers?name=%5Edb-").await;
    let mut found = names(&dbs);
    found.sort();
    assert_eq!(found, ["db-1", "db-2"]);
    assert_eq!(
        names(&get(&fabric, "/v2.1/servers/detail?status=ACTIVE&host=node-2").await),
        ["web-one"]
    );
    assert!(names(&get(&fabric, "/v2.1/servers?status=SHUTOFF").await).is_empty());
    let bad_status = at(
        &fabric,
        "2.38",
        Method::GET,
        "/v2.1/servers?status=SLEEPY",
        None,
    )
    .await;
    assert_eq!(bad_status.status, StatusCode::BAD_REQUEST);
    let old_status = at(
        &fabric,
        "2.37",
        Method::GET,
        "/v2.1/servers?status=SLEEPY",
        None,
    )
    .await;
    assert_eq!(old_status.status, StatusCode::OK);
    assert!(names(&old_status).is_empty());
    let bad_regex = get(&fabric, "/v2.1/servers?name=%28").await;
    assert_eq!(bad_regex.status, StatusCode::BAD_REQUEST);

    // Pages: newest first, a next link while more remain, the marker continues after it.
    let first = get(&fabric, "/v2.1/servers?limit=2").await;
    assert_eq!(names(&first).len(), 2);
    let next = first.body["servers_links"][0]["href"]
        .as_str()
        .expect("a next link")
        .to_string();
    let marker = first.body["servers"][1]["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(next.contains(&format!("marker={marker}")), "{next}");
    let rest = get(&fabric, &format!("/v2.1/servers?limit=2&marker={marker}")).await;
    assert_eq!(names(&rest), ["web-one"]);
    assert!(rest.body.get("servers_links").is_none());
    let unknown_marker = get(&fabric, "/v2.1/servers?marker=nope").await;
    assert_eq!(unknown_marker.status, StatusCode::BAD_REQUEST);
    let bad_limit = get(&fabric, "/v2.1/servers?limit=-1").await;
    assert_eq!(bad_limit.status, StatusCode::BAD_REQUEST);

    // History: the create and the update's absence (updates are not actions), then delete.
    let actions = get(&fabric, &format!("/v2.1/servers/{id}/os-instance-actions")).await;
    let list = actions.body["instanceActions"].as_array().expect("actions");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["action"], "create");
    let request_id = list[0]["request_id"]
        .as_str()
        .expect("request id")
        .to_string();
    let one = get(
        &fabric,
        &format!("/v2.1/servers/{id}/os-instance-actions/{request_id}"),
    )
    .await;
    assert_eq!(one.body["instanceAction"]["events"], json!([]));
    let deleted = fabric
        .http(Method::DELETE, &format!("/v2.1/servers/{id}"), None)
        .await
        .expect("delete");
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let deadline = tokio::time::Instant::now() + BUILD_LIMIT;
    while fabric.db.instance_get(&id).expect("db").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = at(
        &fabric,
        "2.1",
        Method::GET,
        &format!("/v2.1/servers/{id}/os-instance-actions"),
        None,
    )
    .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let kept = at(
        &fabric,
        "2.21",
        Method::GET,
        &format!("/v2.1/servers/{id}/os-instance-actions"),
        None,
    )
    .await;
    assert_eq!(kept.status, StatusCode::OK);
    let history: Vec<&str> = kept.body["instanceActions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    assert_eq!(history, ["delete", "create"]);
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_that_left_the_filter_or_was_deleted_still_pages_as_in_nova() {
    let fabric = fabric().await;
    // Newest first: late, failed, early. m1.xlarge fits no host, so `failed` ends in ERROR.
    fabric
        .boot(&server("early"), BUILD_LIMIT)
        .await
        .expect("built");
    let failed = fabric
        .boot(&integration::server_body("failed", "5"), BUILD_LIMIT)
        .await
        .expect("built");
    assert_eq!(failed["status"], "ERROR", "{failed}");
    let late = fabric
        .boot(&server("late"), BUILD_LIMIT)
        .await
        .expect("built");
    let id = |server: &Value| server["id"].as_str().expect("id").to_string();
    let names = |response: &HttpResponse| -> Vec<String> {
        response.body["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .map(|s| s["name"].as_str().unwrap_or_default().to_string())
            .collect()
    };

    // A server that no longer matches the filter (here: it is in ERROR) marks where to go on.
    let page = get(
        &fabric,
        &format!("/v2.1/servers?status=ACTIVE&marker={}", id(&failed)),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(names(&page), ["early"]);
    // So does a deleted one.
    let gone = fabric
        .http(
            Method::DELETE,
            &format!("/v2.1/servers/{}", id(&late)),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    fabric
        .wait_for("the delete", BUILD_LIMIT, || {
            Ok(fabric.db.instance_get(&id(&late))?.is_none())
        })
        .await
        .expect("deleted");
    let page = get(&fabric, &format!("/v2.1/servers?marker={}", id(&late))).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(names(&page), ["failed", "early"]);
    // An id that never was a server is still Nova's 400.
    let unknown = get(
        &fabric,
        "/v2.1/servers?marker=6c3a1f0e-0000-4000-8000-000000000000",
    )
    .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert!(message(&unknown).contains("marker"), "{}", unknown.body);
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_are_isolated_and_roles_limit_what_callers_do() {
    let fabric = fabric().await;
    let admins = fabric
        .boot(&server("admins"), BUILD_LIMIT)
        .await
        .expect("built");
    let admins_id = admins["id"].as_str().expect("id").to_string();
    let (member, _) = fabric
        .user_token("demo", "alice", "member")
        .await
        .expect("member");
    let (reader, _) = fabric
        .user_token("demo", "bob", "reader")
        .await
        .expect("reader");

    let hidden = fabric
        .http_as(
            &member,
            Method::GET,
            &format!("/v2.1/servers/{admins_id}"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(
        hidden.status,
        StatusCode::NOT_FOUND,
        "another project's server is a 404"
    );
    let not_deleted = fabric
        .http_as(
            &member,
            Method::DELETE,
            &format!("/v2.1/servers/{admins_id}"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(not_deleted.status, StatusCode::NOT_FOUND);

    let forced = fabric
        .http_as(
            &member,
            Method::POST,
            "/v2.1/servers",
            Some(&with_hints("f", "1", json!({"scheduler_host": "node-1"}))),
        )
        .await
        .expect("answered");
    assert_eq!(forced.status, StatusCode::FORBIDDEN, "{}", forced.body);
    assert!(message(&forced).contains("forced_host"));

    let own = fabric
        .http_as(
            &member,
            Method::POST,
            "/v2.1/servers",
            Some(&server("alices")),
        )
        .await
        .expect("answered");
    assert_eq!(own.status, StatusCode::ACCEPTED, "{}", own.body);
    let own_id = own.body["server"]["id"].as_str().expect("id").to_string();
    let listed = fabric
        .http_as(&member, Method::GET, "/v2.1/servers", None)
        .await
        .expect("answered");
    let ids: Vec<&str> = listed.body["servers"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, [own_id.as_str()]);
    let shown = fabric
        .http_as(
            &member,
            Method::GET,
            &format!("/v2.1/servers/{own_id}"),
            None,
        )
        .await
        .expect("answered");
    assert!(
        shown.body["server"].get("OS-EXT-SRV-ATTR:host").is_none(),
        "hosts are for admins"
    );
    let all = fabric
        .http_as(&member, Method::GET, "/v2.1/servers?all_tenants=1", None)
        .await
        .expect("answered");
    assert_eq!(all.status, StatusCode::FORBIDDEN);

    // A reader reads its project and changes nothing.
    let read = fabric
        .http_as(&reader, Method::GET, "/v2.1/servers", None)
        .await
        .expect("answered");
    assert_eq!(read.status, StatusCode::OK);
    let created = fabric
        .http_as(&reader, Method::POST, "/v2.1/servers", Some(&server("r")))
        .await
        .expect("answered");
    assert_eq!(created.status, StatusCode::FORBIDDEN);
    let deleted = fabric
        .http_as(
            &reader,
            Method::DELETE,
            &format!("/v2.1/servers/{own_id}"),
            None,
        )
        .await
        .expect("answered");
    assert_eq!(deleted.status, StatusCode::FORBIDDEN);

    for path in [
        "/v2.1/os-services",
        "/v2.1/os-hypervisors",
        "/v2.1/os-hypervisors/detail",
        "/v2.1/os-availability-zone/detail",
    ] {
        let refused = fabric
            .http_as(&member, Method::GET, path, None)
            .await
            .expect("answered");
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(refused.body["forbidden"]["code"], 403);
    }
    let flavor = fabric
        .http_as(
            &member,
            Method::POST,
            "/v2.1/flavors",
            Some(&json!({"flavor": {"name": "x", "ram": 1, "vcpus": 1, "disk": 1}})),
        )
        .await
        .expect("answered");
    assert_eq!(flavor.status, StatusCode::FORBIDDEN);
    let zones = fabric
        .http_as(&member, Method::GET, "/v2.1/os-availability-zone", None)
        .await
        .expect("answered");
    assert_eq!(zones.body["availabilityZoneInfo"][0]["zoneName"], "nova");

    // Hints may name only the caller's own servers.
    let beside = fabric
        .http_as(
            &member,
            Method::POST,
            "/v2.1/servers",
            Some(&with_hints("b", "1", json!({"same_host": admins_id}))),
        )
        .await
        .expect("answered");
    assert_eq!(beside.status, StatusCode::BAD_REQUEST, "{}", beside.body);

    // A private flavor is for admins only.
    let private = fabric
        .http(
            Method::POST,
            "/v2.1/flavors",
            Some(
                &json!({"flavor": {"name": "secret", "ram": 512, "vcpus": 1, "disk": 1, "id": "p1",
                "os-flavor-access:is_public": false}}),
            ),
        )
        .await
        .expect("answered");
    assert_eq!(private.status, StatusCode::OK, "{}", private.body);
    let unseen = fabric
        .http_as(&member, Method::GET, "/v2.1/flavors/p1", None)
        .await
        .expect("answered");
    assert_eq!(unseen.status, StatusCode::NOT_FOUND);
    let unused = fabric
        .http_as(
            &member,
            Method::POST,
            "/v2.1/servers",
            Some(&integration::server_body("p", "p1")),
        )
        .await
        .expect("answered");
    assert_eq!(unused.status, StatusCode::BAD_REQUEST);

    // A build no host can take: the member sees why, but not the hosts.
    let too_big = fabric
        .http_as(
            &member,
            Method::POST,
            "/v2.1/servers",
            Some(&integration::server_body("big", "5")),
        )
        .await
        .expect("answered");
    let big_id = too_big.body["server"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let deadline = tokio::time::Instant::now() + BUILD_LIMIT;
    let failed = loop {
        let shown = fabric
            .http_as(
                &member,
                Method::GET,
                &format!("/v2.1/servers/{big_id}"),
                None,
            )
            .await
            .expect("answered");
        if shown.body["server"]["status"] == "ERROR" {
            break shown.body["server"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never failed: {}",
            shown.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(failed["fault"]["message"], "No valid host was found.");
    assert!(failed["fault"].get("details").is_none());
    let as_admin = get(&fabric, &format!("/v2.1/servers/{big_id}")).await;
    assert!(as_admin.body["server"]["fault"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("node-"));
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_what_does_not_fit_and_limits_show_them() {
    let fabric = fabric().await;
    let (member, project) = fabric
        .user_token("small", "carol", "member")
        .await
        .expect("member");
    fabric
        .db
        .quota_set(&project, "instances", Some(2))
        .expect("quota");
    fabric
        .db
        .quota_set(&project, "cores", Some(10))
        .expect("quota");

    // max_count 3 with room for 2: Nova creates the 2 that fit.
    let mut body = server("q");
    body["server"]["min_count"] = json!(1);
    body["server"]["max_count"] = json!(3);
    let made = fabric
        .http_as(&member, Method::POST, "/v2.1/servers", Some(&body))
        .await
        .expect("answered");
    assert_eq!(made.status, StatusCode::ACCEPTED, "{}", made.body);
    let refused = fabric
        .http_as(
            &member,
            Method::POST,
            "/v2.1/servers",
            Some(&server("over")),
        )
        .await
        .expect("answered");
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        message(&refused),
        "Quota exceeded for instances: Requested 1, but already used 2 of 2 instances"
    );
    let rows = fabric
        .db
        .instances_query(&db::InstanceFilter {
            project_id: Some(project.clone()),
            ..Default::default()
        })
        .expect("db");
    assert_eq!(rows.len(), 2, "nothing written for the refused create");

    let limits = fabric
        .http_as(&member, Method::GET, "/v2.1/limits", None)
        .await
        .expect("answered");
    let absolute = &limits.body["limits"]["absolute"];
    assert_eq!(absolute["maxTotalInstances"], 2);
    assert_eq!(absolute["totalInstancesUsed"], 2);
    assert_eq!(absolute["maxTotalCores"], 10);
    assert_eq!(absolute["totalCoresUsed"], 2);
    assert_eq!(absolute["maxTotalRAMSize"], -1);
    assert!(
        absolute.get("maxImageMeta").is_some(),
        "2.1 still lists image metadata"
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_services_hypervisors_and_flavors() {
    let fabric = fabric().await;
    let services = get(&fabric, "/v2.1/os-services?binary=nova-compute").await;
    let listed = services.body["services"].as_array().expect("services");
    assert_eq!(listed.len(), 3, "{}", services.body);
    assert!(listed
        .iter()
        .all(|s| s["state"] == "up" && s["status"] == "enabled" && s["zone"] == "nova"));
    assert!(
        listed[0].get("forced_down").is_none(),
        "forced_down is 2.11"
    );

    let disabled = fabric
        .http(Method::PUT, "/v2.1/os-services/disable-log-reason",
            Some(&json!({"host": "node-1", "binary": "nova-compute", "disabled_reason": "maintenance"})))
        .await
        .expect("answered");
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.body);
    assert_eq!(disabled.body["service"]["status"], "disabled");
    let node1 = get(&fabric, "/v2.1/os-services?host=node-1").await;
    assert_eq!(node1.body["services"][0]["disabled_reason"], "maintenance");
    let enabled = fabric
        .http(
            Method::PUT,
            "/v2.1/os-services/enable",
            Some(&json!({"host": "node-1", "binary": "zova-compute"})),
        )
        .await
        .expect("answered");
    assert_eq!(enabled.body["service"]["status"], "enabled");
    let unknown = fabric
        .http(
            Method::PUT,
            "/v2.1/os-services/enable",
            Some(&json!({"host": "node-9", "binary": "zova-compute"})),
        )
        .await
        .expect("answered");
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let old = at(
        &fabric,
        "2.10",
        Method::PUT,
        "/v2.1/os-services/force-down",
        Some(&json!({"host": "node-3", "binary": "nova-compute", "forced_down": true})),
    )
    .await;
    assert_eq!(old.status, StatusCode::NOT_FOUND, "force-down is 2.11");
    let forced = at(
        &fabric,
        "2.11",
        Method::PUT,
        "/v2.1/os-services/force-down",
        Some(&json!({"host": "node-3", "binary": "nova-compute", "forced_down": true})),
    )
    .await;
    assert_eq!(forced.status, StatusCode::OK, "{}", forced.body);
    let node3 = at(
        &fabric,
        "2.11",
        Method::GET,
        "/v2.1/os-services?host=node-3",
        None,
    )
    .await;
    assert_eq!(node3.body["services"][0]["state"], "down");
    assert_eq!(node3.body["services"][0]["forced_down"], true);

    let hypervisors = get(&fabric, "/v2.1/os-hypervisors/detail").await;
    let nodes = hypervisors.body["hypervisors"]
        .as_array()
        .expect("hypervisors");
    assert_eq!(nodes.len(), 3);
    let first = &nodes[0];
    for key in [
        "vcpus",
        "vcpus_used",
        "memory_mb",
        "memory_mb_used",
        "free_ram_mb",
        "local_gb",
        "free_disk_gb",
        "running_vms",
        "cpu_allocation_ratio",
        "ram_allocation_ratio",
    ] {
        assert!(first[key].is_number(), "{key} in {first}");
    }
    assert!(first["cpu_info"].is_string(), "a string before 2.28");
    let id = first["id"].to_string();
    let shown = at(
        &fabric,
        "2.28",
        Method::GET,
        &format!("/v2.1/os-hypervisors/{id}"),
        None,
    )
    .await;
    assert!(shown.body["hypervisor"]["cpu_info"].is_object());
    assert_eq!(
        get(&fabric, "/v2.1/os-hypervisors/999").await.status,
        StatusCode::NOT_FOUND
    );
    let paged = at(
        &fabric,
        "2.33",
        Method::GET,
        "/v2.1/os-hypervisors?limit=1",
        None,
    )
    .await;
    assert_eq!(paged.body["hypervisors"].as_array().map(Vec::len), Some(1));
    assert!(paged.body["hypervisors_links"].is_array());

    // Flavors: create, extra specs, delete; a taken name is a conflict.
    let created = fabric.http(Method::POST, "/v2.1/flavors",
        Some(&json!({"flavor": {"name": "c1.big", "ram": 2048, "vcpus": 2, "disk": 10, "id": "c1"}}))).await.expect("answered");
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    assert_eq!(created.body["flavor"]["id"], "c1");
    let again = fabric
        .http(
            Method::POST,
            "/v2.1/flavors",
            Some(&json!({"flavor": {"name": "c1.big", "ram": 2048, "vcpus": 2, "disk": 10}})),
        )
        .await
        .expect("answered");
    assert_eq!(again.status, StatusCode::CONFLICT);
    let bad = fabric
        .http(
            Method::POST,
            "/v2.1/flavors",
            Some(&json!({"flavor": {"name": "z", "ram": 0, "vcpus": 1, "disk": 1}})),
        )
        .await
        .expect("answered");
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let specs = fabric
        .http(
            Method::POST,
            "/v2.1/flavors/c1/os-extra_specs",
            Some(&json!({"extra_specs": {"queue_name": "kvm", "hw:cpu_policy": "shared"}})),
        )
        .await
        .expect("answered");
    assert_eq!(specs.status, StatusCode::OK, "{}", specs.body);
    assert_eq!(
        get(&fabric, "/v2.1/flavors/c1/os-extra_specs/queue_name")
            .await
            .body,
        json!({"queue_name": "kvm"})
    );
    let removed = fabric
        .http(
            Method::DELETE,
            "/v2.1/flavors/c1/os-extra_specs/hw:cpu_policy",
            None,
        )
        .await
        .expect("answered");
    assert_eq!(removed.status, StatusCode::OK);
    assert_eq!(
        get(&fabric, "/v2.1/flavors/c1/os-extra_specs").await.body,
        json!({"extra_specs": {"queue_name": "kvm"}})
    );
    let built = fabric
        .boot(&integration::server_body("big", "c1"), BUILD_LIMIT)
        .await
        .expect("built");
    let gone = fabric
        .http(Method::DELETE, "/v2.1/flavors/c1", None)
        .await
        .expect("answered");
    assert_eq!(gone.status, StatusCode::ACCEPTED);
    assert_eq!(
        get(&fabric, "/v2.1/flavors/c1").await.status,
        StatusCode::NOT_FOUND
    );
    let kept = at(
        &fabric,
        "2.47",
        Method::GET,
        &format!("/v2.1/servers/{}", built["id"].as_str().unwrap_or_default()),
        None,
    )
    .await;
    assert_eq!(
        kept.body["server"]["flavor"]["original_name"], "c1.big",
        "the server keeps its flavor"
    );
    assert_eq!(
        kept.body["server"]["flavor"]["extra_specs"],
        json!({"queue_name": "kvm"})
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_pairs_are_imported_or_generated_per_user() {
    let fabric = fabric().await;
    // A well-known test key (OpenSSH's own test vectors use the same shape).
    let public = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm8OD3S8SgLl9ew8YKGb5HR2Lpp+rCj2BL+7kzPUxWh test@zova";
    let imported = at(
        &fabric,
        "2.2",
        Method::POST,
        "/v2.1/os-keypairs",
        Some(&json!({"keypair": {"name": "laptop", "public_key": public}})),
    )
    .await;
    assert_eq!(imported.status, StatusCode::CREATED, "{}", imported.body);
    let fingerprint = imported.body["keypair"]["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_string();
    assert_eq!(fingerprint.split(':').count(), 16, "{fingerprint}");
    assert_eq!(imported.body["keypair"]["type"], "ssh");
    assert!(imported.body["keypair"].get("private_key").is_none());

    let generated = fabric
        .http(
            Method::POST,
            "/v2.1/os-keypairs",
            Some(&json!({"keypair": {"name": "made"}})),
        )
        .await
        .expect("answered");
    assert_eq!(generated.status, StatusCode::OK, "2.1 answers 200");
    assert!(generated.body["keypair"]["private_key"]
        .as_str()
        .unwrap_or_default()
        .contains("PRIVATE KEY"));
    assert!(
        generated.body["keypair"].get("type").is_none(),
        "type is 2.2"
    );

    let duplicate = fabric
        .http(
            Method::POST,
            "/v2.1/os-keypairs",
            Some(&json!({"keypair": {"name": "made", "public_key": public}})),
        )
        .await
        .expect("answered");
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    for bad in [
        json!({"keypair": {"name": "x", "public_key": "ssh-rsa nonsense"}}),
        json!({"keypair": {"name": "a/b"}}),
        json!({"keypair": {}}),
    ] {
        let refused = fabric
            .http(Method::POST, "/v2.1/os-keypairs", Some(&bad))
            .await
            .expect("answered");
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let listed = get(&fabric, "/v2.1/os-keypairs").await;
    let names: Vec<&str> = listed.body["keypairs"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|k| k["keypair"]["name"].as_str())
        .collect();
    assert_eq!(names, ["laptop", "made"]);
    let shown = get(&fabric, "/v2.1/os-keypairs/laptop").await;
    assert_eq!(shown.body["keypair"]["fingerprint"], fingerprint.as_str());

    // Another user does not see them; a server can name one.
    let (member, _) = fabric
        .user_token("demo", "dave", "member")
        .await
        .expect("member");
    let theirs = fabric
        .http_as(&member, Method::GET, "/v2.1/os-keypairs", None)
        .await
        .expect("answered");
    assert_eq!(theirs.body["keypairs"], json!([]));
    let mut with_key = server("keyed");
    with_key["server"]["key_name"] = json!("laptop");
    assert_eq!(
        fabric
            .http(Method::POST, "/v2.1/servers", Some(&with_key))
            .await
            .expect("answered")
            .status,
        StatusCode::ACCEPTED
    );
    with_key["server"]["key_name"] = json!("nope");
    assert_eq!(
        fabric
            .http(Method::POST, "/v2.1/servers", Some(&with_key))
            .await
            .expect("answered")
            .status,
        StatusCode::BAD_REQUEST
    );

    // Names travel percent-encoded in paths.
    let spaced = fabric
        .http(
            Method::POST,
            "/v2.1/os-keypairs",
            Some(&json!({"keypair": {"name": "my key", "public_key": public}})),
        )
        .await
        .expect("answered");
    assert_eq!(spaced.status, StatusCode::OK, "{}", spaced.body);
    assert_eq!(
        get(&fabric, "/v2.1/os-keypairs/my%20key").await.status,
        StatusCode::OK
    );
    let deleted = at(
        &fabric,
        "2.2",
        Method::DELETE,
        "/v2.1/os-keypairs/laptop",
        None,
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(&fabric, "/v2.1/os-keypairs/laptop").await.status,
        StatusCode::NOT_FOUND
    );
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_api_resolves_names_and_ids() {
    let fabric = fabric().await;
    let versions = fabric
        .http_as("", Method::GET, "/image", None)
        .await
        .expect("answered");
    assert_eq!(versions.status, StatusCode::MULTIPLE_CHOICES);
    assert!(versions.body["versions"][0]["links"][0]["href"]
        .as_str()
        .unwrap_or_default()
        .ends_with("/image/v2/"));
    assert_eq!(
        fabric
            .http_as("", Method::GET, "/image/v2/images", None)
            .await
            .expect("answered")
            .status,
        StatusCode::UNAUTHORIZED
    );

    let all = get(&fabric, "/image/v2/images").await;
    let name = all.body["images"][0]["name"]
        .as_str()
        .expect("seeded image")
        .to_string();
    assert_eq!(all.body["images"][0]["id"], IMAGE);
    let by_name = get(&fabric, &format!("/image/v2/images?name={name}")).await;
    assert_eq!(by_name.body["images"].as_array().map(Vec::len), Some(1));
    let by_ids = get(
        &fabric,
        &format!("/image/v2/images?id=in:{IMAGE},7f1c0e2a-0000-4000-8000-000000000000"),
    )
    .await;
    assert_eq!(by_ids.body["images"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        get(&fabric, "/image/v2/images?name=nope").await.body["images"],
        json!([])
    );
    let one = get(&fabric, &format!("/image/v2/images/{IMAGE}")).await;
    assert_eq!(one.body["disk_format"], "qcow2");
    let missing = get(
        &fabric,
        "/image/v2/images/7f1c0e2a-0000-4000-8000-000000000000",
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.body["itemNotFound"]["code"], 404);
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_reboot_go_through_the_compute() {
    let fabric = fabric().await;
    let built = fabric
        .boot(&server("cycled"), BUILD_LIMIT)
        .await
        .expect("built");
    let id = built["id"].as_str().expect("id").to_string();
    let action = |body: Value| {
        let path = format!("/v2.1/servers/{id}/action");
        let fabric = &fabric;
        async move {
            fabric
                .http(Method::POST, &path, Some(&body))
                .await
                .expect("answered")
        }
    };
    let started_twice = action(json!({"os-start": null})).await;
    assert_eq!(
        started_twice.status,
        StatusCode::CONFLICT,
        "{}",
        started_twice.body
    );
    assert_eq!(started_twice.body["conflictingRequest"]["code"], 409);

    assert_eq!(
        action(json!({"os-stop": null})).await.status,
        StatusCode::ACCEPTED
    );
    let stopped = wait_for_status(&fabric, &id, "SHUTOFF").await;
    assert_eq!(stopped["OS-EXT-STS:power_state"], 4);
    assert_eq!(
        action(json!({"reboot": {"type": "SOFT"}})).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        action(json!({"os-start": null})).await.status,
        StatusCode::ACCEPTED
    );
    wait_for_status(&fabric, &id, "ACTIVE").await;
    assert_eq!(
        action(json!({"reboot": {"type": "HARD"}})).await.status,
        StatusCode::ACCEPTED
    );
    let rebooted = wait_for_status(&fabric, &id, "ACTIVE").await;
    assert_eq!(rebooted["OS-EXT-STS:power_state"], 1);
    assert_eq!(
        action(json!({"pause": null})).await.status,
        StatusCode::BAD_REQUEST
    );

    let actions = get(&fabric, &format!("/v2.1/servers/{id}/os-instance-actions")).await;
    let names: Vec<&str> = actions.body["instanceActions"]
        .as_array()
        .expect("actions")
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    assert_eq!(names, ["reboot", "start", "stop", "create"]);
    fabric.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_before_anything_is_written() {
    let fabric = fabric().await;
    let send = |content_type: &'static str, body: &'static [u8]| {
        let address = fabric.api_address.clone();
        let token = fabric.admin_token.clone();
        async move {
            integration::http_request(
                &address,
                Method::POST,
                "/v2.1/servers",
                body.to_vec(),
                &[("x-auth-token", &token), ("content-type", content_type)],
            )
            .await
            .expect("answered")
        }
    };
    assert_eq!(
        send("text/plain", b"{}").await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(
        send("application/json", b"").await.status,
        StatusCode::BAD_REQUEST
    );
    let unknown = send("application/json", br#"{"server": {"name": "x", "flavorRef": "1", "imageRef": "155d900f-4e14-4e4c-a73d-069cbf4541e6", "colour": "red"}}"#).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert!(message(&unknown).contains("colour"));
    let mut bad_networks = server("n");
    bad_networks["server"]["networks"] = json!("everywhere");
    let networks = at(
        &fabric,
        "2.37",
        Method::POST,
        "/v2.1/servers",
        Some(&bad_networks),
    )
    .await;
    assert_eq!(networks.status, StatusCode::BAD_REQUEST);
    assert!(message(&networks).contains("networks"));
    assert_eq!(
        fabric
            .http(Method::PUT, "/v2.1/servers/x", Some(&json!([])))
            .await
            .expect("answered")
            .status,
        StatusCode::BAD_REQUEST
    );
    assert!(
        fabric.db.instances_list(None).expect("db").is_empty(),
        "nothing was written"
    );
    assert_eq!(
        get(&fabric, "/v2.1/os-nothing").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        fabric
            .http(Method::DELETE, "/v2.1/flavors", None)
            .await
            .expect("answered")
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    fabric.stop().await;
}
