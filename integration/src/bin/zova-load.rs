//! Drives a running fabric through its public API as its users do, and says how fast and how
//! well it kept its promises: N creates at a given concurrency (with optional scheduler hints),
//! waits for every server to reach ACTIVE or ERROR, checks that no host holds more than its
//! limits, deletes them and waits until they are gone.
//!
//!     zova-load --endpoint http://127.0.0.1:8774/v2.1 --count 2000 --concurrency 32 [--hint k=v]...
//!
//! It authenticates like the OpenStack clients: from `OS_CLOUD` and clouds.yaml
//! (`OS_CLIENT_CONFIG_FILE`, ./clouds.yaml, ~/.config/openstack/clouds.yaml,
//! /etc/openstack/clouds.yaml), else from `OS_AUTH_URL`, `OS_USERNAME`, `OS_PASSWORD`,
//! `OS_PROJECT_NAME` (and the `*_DOMAIN_NAME` variables, "Default" when unset). The limits check
//! reads `GET /os-hypervisors/detail`, so the user should be an admin.
//!
//! Latency is from sending `POST /servers` to the moment the server became ACTIVE: its
//! `OS-SRV-USG:launched_at`, which the conductor stamps as the group of records carrying the
//! ACTIVE starts its write (the commit follows within that group's turn at the database). A poll
//! (every `--poll-ms`, 50 ms, listing only the servers still in BUILD, which keeps it cheap for
//! the API while thousands are in flight) notes when each server leaves BUILD; that moment, late
//! by up to one poll interval and the list it sends, ends the latency of a server whose
//! `launched_at` does not fall between its POST and that poll (the fabric's clock is not this
//! machine's), and marks when a server in ERROR ended. `active_per_s` counts until the last
//! server became ACTIVE or ERROR by those moments, so it runs a few percent above a rate
//! counted to the last poll.
//! Progress goes to stderr; the last line of stdout is one JSON object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};

use integration::{http_request, percentile, read_response, HttpResponse, IMAGE};

#[derive(Debug, Parser)]
#[command(
    name = "zova-load",
    about = "Create N servers through the compute API, wait for them, check the hosts' limits, delete them, and print the figures"
)]
struct Args {
    /// The compute API, e.g. http://127.0.0.1:8774/v2.1.
    #[arg(long)]
    endpoint: String,
    /// Servers to create.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,
    /// Create requests in flight at once (and deletes, afterwards).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// A scheduler hint for every create, as key=value (scheduler_host=node-3,
    /// scheduler_host_match=^node-1); repeatable.
    #[arg(long = "hint", value_parser = parse_hint)]
    hints: Vec<(String, String)>,
    /// Flavor id of every server.
    #[arg(long, default_value = "1")]
    flavor: String,
    /// Image id of every server.
    #[arg(long, default_value = IMAGE)]
    image: String,
    /// Seconds to wait for every server to leave BUILD (and later to be gone).
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Milliseconds between two polls of the servers still in BUILD.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    poll_ms: u64,
    /// Leave the servers in place instead of deleting them at the end.
    #[arg(long)]
    keep: bool,
}

fn parse_hint(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("a hint is key=value, not {text:?}")),
    }
}

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("{0}")]
    Api(String),
    #[error("invalid --endpoint {0:?}: give a URL such as http://127.0.0.1:8774/v2.1")]
    Endpoint(String),
}

/// Who to authenticate as, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Credentials {
    auth_url: String,
    username: String,
    password: String,
    project_name: String,
    user_domain_name: String,
    project_domain_name: String,
}

#[derive(Debug, Deserialize)]
struct CloudsFile {
    clouds: BTreeMap<String, Cloud>,
}

#[derive(Debug, Deserialize)]
struct Cloud {
    auth: CloudAuth,
}

#[derive(Debug, Deserialize)]
struct CloudAuth {
    auth_url: String,
    username: String,
    password: String,
    project_name: String,
    user_domain_name: Option<String>,
    project_domain_name: Option<String>,
}

/// `name`'s credentials from a clouds.yaml text.
fn credentials_from_clouds(text: &str, name: &str) -> Result<Credentials, LoadError> {
    let file: CloudsFile = yaml_serde::from_str(text)
        .map_err(|e| LoadError::Credentials(format!("clouds.yaml: {e}")))?;
    let cloud = file.clouds.get(name).ok_or_else(|| {
        LoadError::Credentials(format!("clouds.yaml has no cloud named {name:?}"))
    })?;
    let auth = &cloud.auth;
    Ok(Credentials {
        auth_url: auth.auth_url.clone(),
        username: auth.username.clone(),
        password: auth.password.clone(),
        project_name: auth.project_name.clone(),
        user_domain_name: auth.user_domain_name.clone().unwrap_or("Default".into()),
        project_domain_name: auth.project_domain_name.clone().unwrap_or("Default".into()),
    })
}

/// The credentials from the `OS_*` variables `var` gives.
fn credentials_from_env(var: impl Fn(&str) -> Option<String>) -> Result<Credentials, LoadError> {
    let required = |name: &str| {
        var(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| LoadError::Credentials(format!("set OS_CLOUD, or {name}")))
    };
    Ok(Credentials {
        auth_url: required("OS_AUTH_URL")?,
        username: required("OS_USERNAME")?,
        password: required("OS_PASSWORD")?,
        project_name: required("OS_PROJECT_NAME")?,
        user_domain_name: var("OS_USER_DOMAIN_NAME").unwrap_or("Default".into()),
        project_domain_name: var("OS_PROJECT_DOMAIN_NAME").unwrap_or("Default".into()),
    })
}

/// Where the OpenStack clients look for clouds.yaml, in their order.
fn clouds_files(var: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(file) = var("OS_CLIENT_CONFIG_FILE") {
        files.push(PathBuf::from(file));
    }
    files.push(PathBuf::from("clouds.yaml"));
    if let Some(home) = var("HOME") {
        files.push(Path::new(&home).join(".config/openstack/clouds.yaml"));
    }
    files.push(PathBuf::from("/etc/openstack/clouds.yaml"));
    files
}

fn credentials() -> Result<Credentials, LoadError> {
    let var = |name: &str| std::env::var(name).ok();
    let Some(cloud) = var("OS_CLOUD").filter(|c| !c.is_empty()) else {
        return credentials_from_env(var);
    };
    for file in clouds_files(var) {
        if let Ok(text) = std::fs::read_to_string(&file) {
            return credentials_from_clouds(&text, &cloud);
        }
    }
    Err(LoadError::Credentials(format!(
        "OS_CLOUD={cloud} but no clouds.yaml was found"
    )))
}

/// A server address (`host:port`) and a path prefix from a URL.
fn split_url(url: &str) -> Result<(String, String), LoadError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| LoadError::Endpoint(url.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(LoadError::Endpoint(url.to_string()));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| LoadError::Endpoint(url.to_string()))?;
    let address = match authority.port_u16() {
        Some(_) => authority.to_string(),
        None => format!("{}:80", authority.host()),
    };
    Ok((address, uri.path().trim_end_matches('/').to_string()))
}

/// The path of Keystone's token request under `auth_url` (with or without its `/v3`).
fn tokens_path(auth_path: &str) -> String {
    let base = auth_path.trim_end_matches('/');
    if base.ends_with("/v3") {
        format!("{base}/auth/tokens")
    } else {
        format!("{base}/v3/auth/tokens")
    }
}

async fn token(credentials: &Credentials) -> Result<String, LoadError> {
    let (address, path) = split_url(&credentials.auth_url)?;
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": credentials.username,
            "domain": {"name": credentials.user_domain_name},
            "password": credentials.password}}},
        "scope": {"project": {
            "name": credentials.project_name,
            "domain": {"name": credentials.project_domain_name}}},
    }});
    let response = http_request(
        &address,
        Method::POST,
        &tokens_path(&path),
        body.to_string().into_bytes(),
        &[],
    )
    .await
    .map_err(|e| LoadError::Credentials(e.to_string()))?;
    response
        .headers
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| {
            LoadError::Credentials(format!("no token ({}): {}", response.status, response.body))
        })
}

/// The compute API as one user sees it, over kept-alive connections as the OpenStack clients
/// use it (a connection per request would cost both sides a TCP set-up and tear-down each).
#[derive(Clone)]
struct Client {
    address: String,
    prefix: String,
    token: String,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    fn new(address: String, prefix: String, token: String) -> Client {
        let mut connector = HttpConnector::new();
        // Small requests and answers: none should wait for the previous segment's ACK.
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Client {
            address,
            prefix,
            token,
            http,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<HttpResponse, LoadError> {
        let failed = |e: &dyn std::fmt::Display| LoadError::Api(format!("{method} {path}: {e}"));
        let raw = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}{}{path}", self.address, self.prefix))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header("x-auth-token", self.token.as_str())
            // Servers with their flavor embedded (2.47) and hypervisors as Nova shows them.
            .header("openstack-api-version", "compute 2.47")
            .body(Full::new(Bytes::from(raw)))
            .map_err(|e| failed(&e))?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| failed(&with_causes(&e)))?;
        read_response(response).await.map_err(|e| failed(&e))
    }

    /// Every page of a server listing (`query` without limit and marker).
    async fn servers(&self, detail: bool, query: &str) -> Result<Vec<Value>, LoadError> {
        let mut all = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let base = if detail {
                "/servers/detail"
            } else {
                "/servers"
            };
            let mut path = format!("{base}?limit=1000&{query}");
            if let Some(marker) = &marker {
                path.push_str(&format!("&marker={marker}"));
            }
            let page = self.call(Method::GET, &path, None).await?;
            if page.status != StatusCode::OK {
                return Err(LoadError::Api(format!(
                    "GET {path}: {} {}",
                    page.status, page.body
                )));
            }
            let servers = page.body["servers"].as_array().cloned().unwrap_or_default();
            let full = servers.len() == 1000;
            marker = servers
                .last()
                .and_then(|s| s["id"].as_str())
                .map(String::from);
            all.extend(servers);
            if !full || marker.is_none() {
                return Ok(all);
            }
        }
    }

    /// Every page of the hypervisor listing: the API gives at most `max_limit` (1,000) at once,
    /// and a host missing from it would count as one without limits.
    async fn hypervisors(&self) -> Result<Vec<Value>, LoadError> {
        let mut all = Vec::new();
        let mut path = "/os-hypervisors/detail?limit=1000".to_string();
        loop {
            let page = self.call(Method::GET, &path, None).await?;
            if page.status != StatusCode::OK {
                return Err(LoadError::Api(format!(
                    "GET {path} (the limits check needs an admin): {} {}",
                    page.status, page.body
                )));
            }
            let hypervisors = page.body["hypervisors"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let marker = hypervisors.last().map(|h| match &h["id"] {
                Value::String(id) => id.clone(),
                id => id.to_string(),
            });
            all.extend(hypervisors);
            match marker {
                Some(marker) if page.body.get("hypervisors_links").is_some() => {
                    path = format!("/os-hypervisors/detail?limit=1000&marker={marker}");
                }
                _ => return Ok(all),
            }
        }
    }
}

/// An error with its causes: hyper-util's own message is only "client error (Connect)".
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// One host's capacity under its allocation ratios, and what its live servers hold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct HostBooks {
    vcpus_limit: f64,
    memory_mb_limit: f64,
    disk_gb_limit: f64,
    vcpus: f64,
    memory_mb: f64,
    disk_gb: f64,
}

impl HostBooks {
    fn overcommitted(&self) -> bool {
        self.vcpus > self.vcpus_limit
            || self.memory_mb > self.memory_mb_limit
            || self.disk_gb > self.disk_gb_limit
    }
}

/// Each hypervisor's limits (`GET /os-hypervisors/detail`, with the allocation ratios Zova
/// adds), charged with the flavors of the live servers placed on it. A server in ERROR holds
/// nothing (Zova gives its placement back).
fn books(hypervisors: &[Value], servers: &[Value]) -> BTreeMap<String, HostBooks> {
    let number = |v: &Value| v.as_f64().unwrap_or(0.0);
    let ratio = |v: &Value| v.as_f64().unwrap_or(1.0);
    let mut books = BTreeMap::new();
    for hypervisor in hypervisors {
        let host = hypervisor["service"]["host"]
            .as_str()
            .or(hypervisor["hypervisor_hostname"].as_str())
            .unwrap_or_default()
            .to_string();
        books.insert(
            host,
            HostBooks {
                vcpus_limit: number(&hypervisor["vcpus"])
                    * ratio(&hypervisor["cpu_allocation_ratio"]),
                memory_mb_limit: number(&hypervisor["memory_mb"])
                    * ratio(&hypervisor["ram_allocation_ratio"]),
                disk_gb_limit: number(&hypervisor["local_gb"])
                    * ratio(&hypervisor["disk_allocation_ratio"]),
                ..Default::default()
            },
        );
    }
    for server in servers {
        if server["status"] == "ERROR" {
            continue;
        }
        let Some(host) = server["OS-EXT-SRV-ATTR:host"].as_str() else {
            continue;
        };
        let flavor = &server["flavor"];
        let entry = books.entry(host.to_string()).or_default();
        entry.vcpus += number(&flavor["vcpus"]);
        entry.memory_mb += number(&flavor["ram"]) + number(&flavor["swap"]);
        entry.disk_gb += number(&flavor["disk"]) + number(&flavor["ephemeral"]);
    }
    books
}

/// A fault message without the particulars (ids, addresses) that make each one different.
fn fault_kind(message: &str) -> String {
    message
        .split_whitespace()
        .filter(|word| {
            let id = word.len() >= 32 && word.contains('-');
            !(id || word.contains("://"))
        })
        .take(12)
        .collect::<Vec<_>>()
        .join(" ")
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

/// What the create phase learnt: each accepted server's id and when its POST was sent, and
/// the refusals by HTTP status (or "unanswered").
#[derive(Default)]
struct Accepted {
    sent: HashMap<String, Instant>,
    order: Vec<String>,
    refused: BTreeMap<String, u64>,
}

async fn run(args: Args) -> Result<(Value, bool), LoadError> {
    let (address, prefix) = split_url(&args.endpoint)?;
    let credentials = credentials()?;
    let client = Client::new(address, prefix, token(&credentials).await?);
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let name_prefix = format!("load-{run_id}-");
    let name_filter = format!("name=%5E{name_prefix}");
    let mut hints = serde_json::Map::new();
    for (key, value) in &args.hints {
        hints.insert(key.clone(), Value::String(value.clone()));
    }
    eprintln!(
        "zova-load: {} creates, {} in flight, servers named {name_prefix}*",
        args.count, args.concurrency
    );

    // Creates, and a poller beside them that notes when each leaves BUILD.
    let accepted = Arc::new(Mutex::new(Accepted::default()));
    let started = Instant::now();
    let started_wall = std::time::SystemTime::now();
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, accepted, next) = (client.clone(), accepted.clone(), next.clone());
        let (name_prefix, hints) = (name_prefix.clone(), hints.clone());
        let (flavor, image, count) = (args.flavor.clone(), args.image.clone(), args.count);
        creators.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count {
                    return;
                }
                let mut body = json!({"server": {
                    "name": format!("{name_prefix}{n}"), "flavorRef": flavor, "imageRef": image}});
                if !hints.is_empty() {
                    body["os:scheduler_hints"] = Value::Object(hints.clone());
                }
                let sent = Instant::now();
                let answer = client.call(Method::POST, "/servers", Some(&body)).await;
                let mut books = accepted.lock().unwrap_or_else(|p| p.into_inner());
                match answer {
                    Ok(r) if r.status == StatusCode::ACCEPTED => {
                        if let Some(id) = r.body["server"]["id"].as_str() {
                            books.sent.insert(id.to_string(), sent);
                            books.order.push(id.to_string());
                        }
                    }
                    Ok(r) => {
                        *books
                            .refused
                            .entry(r.status.as_u16().to_string())
                            .or_default() += 1
                    }
                    Err(_) => *books.refused.entry("unanswered".into()).or_default() += 1,
                }
            }
        });
    }
    let mut left_build: HashMap<String, Instant> = HashMap::new();
    let mut creates_done: Option<Duration> = None;
    let deadline = started + Duration::from_secs_f64(args.timeout.max(0.0));
    let mut last_report = Instant::now();
    loop {
        if creates_done.is_none() && creators.is_empty() {
            creates_done = Some(started.elapsed());
        }
        while let Some(joined) = creators.try_join_next() {
            joined.map_err(|e| LoadError::Api(format!("a create task failed: {e}")))?;
        }
        // Only servers whose 202 came before this poll was sent are judged by it.
        let known: Vec<String> = {
            let books = accepted.lock().unwrap_or_else(|p| p.into_inner());
            books
                .order
                .iter()
                .filter(|id| !left_build.contains_key(*id))
                .cloned()
                .collect()
        };
        let building: BTreeSet<String> = client
            .servers(false, &format!("status=BUILD&{name_filter}"))
            .await?
            .iter()
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect();
        let seen = Instant::now();
        for id in known {
            if !building.contains(&id) {
                left_build.insert(id, seen);
            }
        }
        let total = accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sent
            .len();
        if creates_done.is_some() && left_build.len() >= total {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "zova-load: timed out with {} of {total} servers still in BUILD",
                total - left_build.len()
            );
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "zova-load: {:.0} s: {total} accepted, {} out of BUILD",
                started.elapsed().as_secs_f64(),
                left_build.len()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
    let polled_until = started.elapsed();
    let accepted = std::mem::take(&mut *accepted.lock().unwrap_or_else(|p| p.into_inner()));
    let creates_took = creates_done.unwrap_or(polled_until);

    // Where each one ended, and the hosts' books with everything that lives on them.
    let ours: HashMap<String, Value> = client
        .servers(true, &name_filter)
        .await?
        .into_iter()
        .filter_map(|s| s["id"].as_str().map(|id| (id.to_string(), s.clone())))
        .collect();
    // A server that left BUILD only after the polls stopped (at the deadline) was seen doing so
    // by this list.
    let listed = Instant::now();
    let mut latencies = Vec::new();
    let (mut active, mut error, mut other) = (0u64, 0u64, 0u64);
    let (mut from_launched_at, mut from_poll) = (0u64, 0u64);
    let mut last_settled: Option<Instant> = None;
    let mut errors_by_fault: BTreeMap<String, u64> = BTreeMap::new();
    for id in &accepted.order {
        let server = ours.get(id);
        let sent = accepted.sent.get(id).copied().unwrap_or(started);
        let seen = left_build.get(id).copied().unwrap_or(listed);
        match server.and_then(|s| s["status"].as_str()) {
            Some("ACTIVE") => {
                active += 1;
                let launched = server.and_then(|s| launched_moment(s, started, started_wall));
                let became_active = match launched {
                    Some(launched) if sent <= launched && launched <= seen => {
                        from_launched_at += 1;
                        launched
                    }
                    _ => {
                        from_poll += 1;
                        seen
                    }
                };
                latencies.push(became_active.duration_since(sent));
                last_settled = last_settled.max(Some(became_active));
            }
            Some("ERROR") => {
                error += 1;
                last_settled = last_settled.max(Some(seen));
                let message = server
                    .and_then(|s| s["fault"]["message"].as_str())
                    .unwrap_or("(no fault)");
                *errors_by_fault.entry(fault_kind(message)).or_default() += 1;
            }
            _ => other += 1,
        }
    }
    latencies.sort();
    // A server still in BUILD at the deadline holds the clock until then.
    let settled_after = match last_settled {
        Some(at) if other == 0 => at.duration_since(started),
        _ => polled_until,
    };
    let hypervisors = client.hypervisors().await?;
    let everything = client.servers(true, "all_tenants=1").await?;
    let books = books(&hypervisors, &everything);
    let overcommitted: Vec<&String> = books
        .iter()
        .filter(|(_, b)| b.overcommitted())
        .map(|(host, _)| host)
        .collect();
    for host in &overcommitted {
        eprintln!("zova-load: {host} is over its limits: {:?}", books[*host]);
    }

    // Delete them and wait until they are gone.
    let mut deleted = 0u64;
    if !args.keep {
        let ids = Arc::new(Mutex::new(accepted.order.clone()));
        let mut deleters = tokio::task::JoinSet::new();
        for _ in 0..args.concurrency {
            let (client, ids) = (client.clone(), ids.clone());
            deleters.spawn(async move {
                let mut done = 0u64;
                loop {
                    let Some(id) = ids.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                        return done;
                    };
                    let answer = client
                        .call(Method::DELETE, &format!("/servers/{id}"), None)
                        .await;
                    if answer
                        .is_ok_and(|r| r.status.is_success() || r.status == StatusCode::NOT_FOUND)
                    {
                        done += 1;
                    }
                }
            });
        }
        while let Some(joined) = deleters.join_next().await {
            deleted += joined.map_err(|e| LoadError::Api(format!("a delete task failed: {e}")))?;
        }
        let gone_by = Instant::now() + Duration::from_secs_f64(args.timeout.max(0.0));
        while !client.servers(false, &name_filter).await?.is_empty() {
            if Instant::now() >= gone_by {
                eprintln!("zova-load: some servers were not gone within --timeout");
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let created = accepted.order.len() as u64;
    let per_s = |n: u64, d: Duration| (n as f64 / d.as_secs_f64().max(1e-9) * 10.0).round() / 10.0;
    let ok = overcommitted.is_empty() && other == 0;
    let report = json!({
        "created": created,
        "active": active,
        "error": error,
        "unfinished": other,
        "accepted_per_s": per_s(created, creates_took),
        "active_per_s": per_s(active, settled_after),
        "p50_ms": millis(percentile(&latencies, 0.50)),
        "p90_ms": millis(percentile(&latencies, 0.90)),
        "p99_ms": millis(percentile(&latencies, 0.99)),
        "max_ms": millis(percentile(&latencies, 1.0)),
        "latency_from": {"launched_at": from_launched_at, "poll": from_poll},
        "errors_by_fault": errors_by_fault,
        "http_errors": accepted.refused,
        "overcommitted_hosts": overcommitted.len(),
        "hosts": books.len(),
        "deleted": deleted,
        "seconds": (settled_after.as_secs_f64() * 100.0).round() / 100.0,
        "count": args.count,
        "concurrency": args.concurrency,
    });
    Ok((report, ok))
}

/// When `server` became ACTIVE by its `OS-SRV-USG:launched_at` (UTC, as Nova prints it), on
/// this run's clock: `started` is `started_wall` on the wall clock.
fn launched_moment(
    server: &Value,
    started: Instant,
    started_wall: std::time::SystemTime,
) -> Option<Instant> {
    let text = server["OS-SRV-USG:launched_at"].as_str()?;
    let launched = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok()?;
    let micros = u64::try_from(launched.and_utc().timestamp_micros()).ok()?;
    let wall = std::time::UNIX_EPOCH + Duration::from_micros(micros);
    Some(started + wall.duration_since(started_wall).ok()?)
}

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok((report, ok)) => {
            println!("{report}");
            if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("zova-load: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOUDS: &str = "clouds:
  zova:
    auth:
      auth_url: http://127.0.0.1:8774/v3
      username: admin
      password: 'it''s secret'
      project_name: admin
      user_domain_name: Default
    region_name: RegionOne
  other:
    auth:
      auth_url: http://10.0.0.1:5000
      username: u
      password: p
      project_name: p
";

    #[test]
    fn clouds_yaml_gives_the_named_cloud_with_default_domains() {
        let zova = credentials_from_clouds(CLOUDS, "zova").unwrap();
        assert_eq!(zova.password, "it's secret");
        assert_eq!(zova.auth_url, "http://127.0.0.1:8774/v3");
        assert_eq!(zova.project_domain_name, "Default");
        let err = credentials_from_clouds(CLOUDS, "nowhere").unwrap_err();
        assert!(err.to_string().contains("nowhere"), "{err}");
        assert!(credentials_from_clouds("clouds: [", "zova").is_err());
    }

    #[test]
    fn the_os_variables_name_what_is_missing() {
        let env: HashMap<&str, &str> = [
            ("OS_AUTH_URL", "http://127.0.0.1:8774/v3"),
            ("OS_USERNAME", "admin"),
            ("OS_PROJECT_NAME", "admin"),
        ]
        .into();
        let lookup = |name: &str| env.get(name).map(|v| v.to_string());
        let err = credentials_from_env(lookup).unwrap_err();
        assert!(err.to_string().contains("OS_PASSWORD"), "{err}");
        let mut full = env.clone();
        full.insert("OS_PASSWORD", "x");
        let credentials =
            credentials_from_env(|n: &str| full.get(n).map(|v| v.to_string())).unwrap();
        assert_eq!(credentials.user_domain_name, "Default");
        let files = clouds_files(|n: &str| (n == "HOME").then(|| "/home/op".to_string()));
        assert_eq!(
            files[1],
            Path::new("/home/op/.config/openstack/clouds.yaml")
        );
    }

    #[test]
    fn urls_split_into_address_and_prefix() {
        assert_eq!(
            split_url("http://127.0.0.1:8774/v2.1/").unwrap(),
            ("127.0.0.1:8774".to_string(), "/v2.1".to_string())
        );
        assert_eq!(
            split_url("http://api.example/v3").unwrap().0,
            "api.example:80"
        );
        assert!(split_url("https://api.example/v3").is_err());
        assert!(split_url("not a url").is_err());
        assert_eq!(tokens_path("/v3"), "/v3/auth/tokens");
        assert_eq!(tokens_path(""), "/v3/auth/tokens");
        assert_eq!(tokens_path("/identity/"), "/identity/v3/auth/tokens");
    }

    #[test]
    fn a_host_is_overcommitted_only_beyond_its_ratios() {
        let hypervisors = [json!({
            "service": {"host": "node-1"}, "vcpus": 2, "memory_mb": 1024, "local_gb": 10,
            "cpu_allocation_ratio": 4.0, "ram_allocation_ratio": 1.0, "disk_allocation_ratio": 1.0,
        })];
        let tiny = |status: &str| {
            json!({"status": status, "OS-EXT-SRV-ATTR:host": "node-1",
                   "flavor": {"vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0, "swap": 0}})
        };
        let two = [tiny("ACTIVE"), tiny("ACTIVE"), tiny("ERROR")];
        let fits = books(&hypervisors, &two);
        assert!(!fits["node-1"].overcommitted(), "{fits:?}");
        assert_eq!(fits["node-1"].vcpus, 2.0);
        let three = [tiny("ACTIVE"), tiny("ACTIVE"), tiny("SHUTOFF")];
        assert!(books(&hypervisors, &three)["node-1"].overcommitted());
    }

    #[test]
    fn fault_kinds_drop_ids_and_endpoints() {
        assert_eq!(
            fault_kind(
                "Build of instance 6f1d2c9e-8a41-4a3e-9c55-0b7f3a2d1e90 timed out after 600 s"
            ),
            "Build of instance timed out after 600 s"
        );
        assert_eq!(
            fault_kind("new_run_instance to tcp://10.0.0.7:5571 was not answered"),
            "new_run_instance to was not answered"
        );
    }

    #[test]
    fn launched_at_is_placed_on_the_runs_clock() {
        let (started, started_wall) = (Instant::now(), std::time::SystemTime::now());
        let later =
            chrono::DateTime::<chrono::Utc>::from(started_wall + Duration::from_millis(1500));
        let server =
            json!({"OS-SRV-USG:launched_at": later.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()});
        let at = launched_moment(&server, started, started_wall).expect("a moment");
        let off = at
            .duration_since(started)
            .abs_diff(Duration::from_millis(1500));
        assert!(off <= Duration::from_micros(1), "{off:?}");

        let earlier = chrono::DateTime::<chrono::Utc>::from(started_wall - Duration::from_secs(5));
        let before =
            json!({"OS-SRV-USG:launched_at": earlier.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()});
        assert_eq!(launched_moment(&before, started, started_wall), None);
        for server in [
            json!({}),
            json!({"OS-SRV-USG:launched_at": null}),
            json!({"OS-SRV-USG:launched_at": "soon"}),
        ] {
            assert_eq!(
                launched_moment(&server, started, started_wall),
                None,
                "{server}"
            );
        }
    }
}
