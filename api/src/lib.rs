//! The compute API (`zova-api`): Nova's HTTP interface over hyper, with the Keystone v3 subset
//! (`/v3`) and the small image API (`/image`) the OpenStack clients need, on one port.
//!
//! Every compute request is authenticated by its token, checked against the route's policy and
//! its microversion, validated, and only then written. Creates write the instance rows and the
//! `create` action and cast `build_instances` to a conductor; actions cast to the instance's
//! compute; reads are answered from the database. Errors leave in Nova's JSON error format,
//! from one place (`ApiError::into_response`).

mod admin;
mod creates;
mod flavors;
pub mod identity;
mod images;
mod keypairs;
pub mod manage;
mod metrics;
pub mod microversion;
mod policy;
mod servers;
pub mod validate;
pub mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use slog::{debug, info, warn, Logger};
use tokio::net::TcpListener;
use tokio::sync::watch;

use db::{Db, DbError};
use proto::metrics::{default_port, MetricsConfig, MetricsError, RpcMetrics};
use proto::service::{stopped, DatabaseConfig, LogConfig, RpcConfig, ServiceArgs, ServiceHandle};
use proto::{new_request_id, Peers, RequestContext, Rpc};

use metrics::ApiMetrics;

use microversion::Version;

pub const BINARY: &str = "zova-api";

/// `[api]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Address to listen on; 8774 is Nova's port.
    pub listen: String,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// The most items a list returns at once (Nova's `max_limit`); a `limit` above it is cut.
    pub max_limit: usize,
    /// A service whose last heartbeat is older than this many seconds is shown down.
    pub service_down_time: i64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8774".into(),
            max_body_bytes: 1024 * 1024,
            max_limit: 1000,
            service_down_time: 60,
        }
    }
}

/// `[quota]`: what each project may hold unless an operator set its own limit (`-1`: no limit).
/// Nova's defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct QuotaConfig {
    pub instances: i64,
    pub cores: i64,
    pub ram: i64,
    pub key_pairs: i64,
    pub metadata_items: i64,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            instances: 10,
            cores: 20,
            ram: 51200,
            key_pairs: 100,
            metadata_items: 128,
        }
    }
}

impl QuotaConfig {
    fn limits(&self) -> db::QuotaLimits {
        db::QuotaLimits {
            instances: self.instances,
            cores: self.cores,
            ram: self.ram,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rpc: RpcConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub api: ApiConfig,
    pub quota: QuotaConfig,
    pub identity: identity::IdentityConfig,
}

#[derive(Debug, clap::Parser)]
#[command(name = "zova-api", about = "Zova compute API (Nova's HTTP API)")]
pub struct Args {
    /// The zova.toml to read (environment ZOVA_* and these flags override it).
    #[arg(long, env = "ZOVA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (default: [api] listen).
    #[arg(long)]
    pub listen: Option<String>,
    /// Database URL (default: [database] url).
    #[arg(long)]
    pub database: Option<String>,
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Args {
    pub fn into_config(self) -> Result<Config, ApiStartError> {
        let mut config: Config = proto::service::load_config(self.config.as_deref())
            .map_err(|e| ApiStartError::Config(e.to_string()))?;
        self.service.apply(&mut config.log, &mut config.metrics);
        if let Some(listen) = self.listen {
            config.api.listen = listen;
        }
        if let Some(url) = self.database {
            config.database.url = url;
        }
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Rpc(#[from] proto::ProtoError),
    #[error("internal task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// An error answered to the client, in Nova's `{"<name>": {"code", "message"}}` form.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("The method {0} is not allowed for this resource.")]
    MethodNotAllowed(String),
    #[error("The request body is larger than {0} bytes.")]
    TooLarge(usize),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::NotFound { .. } => ApiError::NotFound(err.to_string()),
            DbError::Conflict(message) => ApiError::Conflict(message),
            DbError::OverQuota(message) => ApiError::Forbidden(message),
            DbError::Invalid(message) => ApiError::BadRequest(message),
            other => ApiError::Internal(format!("Database error: {other}")),
        }
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Nova's fault names (nova.api.openstack.wsgi.Fault).
    fn fault_name(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "badRequest",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "itemNotFound",
            ApiError::MethodNotAllowed(_) => "badMethod",
            ApiError::TooLarge(_) => "overLimit",
            ApiError::Conflict(_) => "conflictingRequest",
            ApiError::UnsupportedMediaType(_) => "badMediaType",
            // Nova has no name of its own for 406 either.
            ApiError::NotAcceptable(_) | ApiError::Internal(_) => "computeFault",
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let body =
            json!({ self.fault_name(): {"code": status.as_u16(), "message": self.to_string()} });
        json_response(status, &body)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn empty_response(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

struct Api {
    log: Logger,
    db: Db,
    rpc: Rpc,
    conductors: Peers,
    /// `POST /servers` rows, committed in groups.
    creates: creates::Creates,
    /// The creates answered whose cast is still on its way.
    casting: Arc<creates::Casting>,
    identity: identity::Identity,
    config: ApiConfig,
    quota: QuotaConfig,
    metrics: ApiMetrics,
}

/// How long `GET /healthcheck` waits for the database before it answers 503.
const HEALTHCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Oslo's healthcheck answers: `OK`, or why not, in plain text (a HEAD gets no body).
fn healthcheck_response(healthy: bool, head: bool) -> Response<Full<Bytes>> {
    let (status, text) = if healthy {
        (StatusCode::OK, "OK")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "FAILED: the database does not answer",
        )
    };
    let body = if head {
        Bytes::new()
    } else {
        Bytes::from(text)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Opens the database, listens on `[api] listen` and serves until stopped.
pub async fn start(config: Config, log: Logger) -> Result<ServiceHandle, ApiStartError> {
    config
        .identity
        .token_ttl()
        .map_err(|e| ApiStartError::Config(format!("[identity] {e}")))?;
    let (url, max_connections) = (config.database.url.clone(), config.database.max_connections);
    let db = tokio::task::spawn_blocking(move || Db::open_with(&url, max_connections))
        .await
        .map_err(|e| ApiStartError::Task(e.to_string()))??;
    let mut registry = Registry::default();
    let (rpc, _) = Rpc::start_with_metrics(
        log.clone(),
        None,
        config.rpc.options(),
        RpcMetrics::new(&mut registry),
    )?;
    let metrics = ApiMetrics::new(&mut registry);
    let listener = TcpListener::bind(&config.api.listen)
        .await
        .map_err(|source| ApiStartError::Listen {
            address: config.api.listen.clone(),
            source,
        })?;
    let address: SocketAddr = listener
        .local_addr()
        .map_err(|source| ApiStartError::Listen {
            address: config.api.listen.clone(),
            source,
        })?;
    let metrics_server =
        proto::metrics::serve(&config.metrics, default_port::API, registry, &log).await?;
    let conductors = config.rpc.conductor_endpoints();
    info!(log, "api listening"; "address" => %address, "conductors" => conductors.join(","));
    let api = Arc::new(Api {
        log: log.clone(),
        db: db.clone(),
        rpc,
        conductors: Peers::new(conductors),
        creates: creates::Creates::start(db.clone()),
        casting: Arc::default(),
        identity: identity::Identity::new(db.clone(), config.identity, log.clone()),
        config: config.api,
        quota: config.quota,
        metrics,
    });
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped(&mut stop_rx) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        // Answers are small and clients keep connections: no Nagle delay.
                        let _ = stream.set_nodelay(true);
                        let api = api.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |request| {
                                let api = api.clone();
                                async move { Ok::<_, Infallible>(api.handle(request).await) }
                            });
                            // A client that hangs up mid-request is its own business.
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Err(e) => {
                        warn!(api.log, "accept failed"; "error" => %e);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
        }
        if tokio::time::timeout(proto::service::DRAIN_LIMIT, api.casting.drained())
            .await
            .is_err()
        {
            warn!(
                api.log,
                "stopped with build_instances casts still on their way"
            );
        }
        api.rpc.shutdown();
    });
    Ok(ServiceHandle::new(address.to_string(), stop_tx, task).with_metrics(metrics_server))
}

/// What every compute handler needs to know about the request it serves.
pub(crate) struct Call {
    pub log: Logger,
    pub context: RequestContext,
    /// `http://host:port` as the client addressed the API, for links.
    pub base: String,
    pub version: Version,
    /// The query string's parameters, in order (a key may repeat).
    pub query: Vec<(String, String)>,
}

impl Call {
    /// The last value of a query parameter.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_admin(&self) -> bool {
        self.context.is_admin()
    }
}

/// Splits a query string into decoded pairs; `+` is a space as in HTML forms.
fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    let Some(query) = query else {
        return Vec::new();
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key, true), percent_decode(value, true))
        })
        .collect()
}

/// Decodes `%XX` escapes (a malformed one stays as it is); `+` is a space in query strings only.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The collections under `/v2.1`; any other first segment followed by more is a project id
/// (the `/v2.1/{project_id}/...` form of the older catalogs).
const COMPUTE_COLLECTIONS: &[&str] = &[
    "servers",
    "flavors",
    "os-services",
    "os-hypervisors",
    "os-availability-zone",
    "limits",
    "os-keypairs",
    "os-quota-sets",
];

impl Api {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let request_id = new_request_id();
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let base = match request
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            Some(host) => format!("http://{host}"),
            None => format!("http://{}", self.config.listen),
        };
        let log = self.log.new(slog::o!("request_id" => request_id.clone()));
        // Names in paths arrive encoded ("my%20key", "hw%3Acpu_policy").
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| percent_decode(s, false))
            .collect();
        let route = {
            let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
            metrics::route_template(&parts)
        };
        if route == metrics::HEALTHCHECK {
            // Load balancers ask often: counted, but logged only at debug level.
            let mut response = self.healthcheck(&log, &method).await;
            if let Ok(id) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert("x-openstack-request-id", id);
            }
            self.metrics
                .observe(&method, route, response.status(), started.elapsed());
            debug!(log, "request"; "method" => %method, "path" => &path, "status" => response.status().as_u16());
            return response;
        }
        // `%00` is the only escape that decodes to NUL.
        let nul_in_uri = request
            .uri()
            .path_and_query()
            .is_some_and(|pq| pq.as_str().contains("%00"));
        let (mut response, version) = match segments.first().map(String::as_str) {
            _ if nul_in_uri => (
                ApiError::BadRequest(NUL_REFUSED.into()).into_response(),
                None,
            ),
            Some("v3") => (
                self.identity_request(&log, request, &segments, &base).await,
                None,
            ),
            Some("image") => (
                self.image_request(&log, request, &segments, &base)
                    .await
                    .unwrap_or_else(ApiError::into_response),
                None,
            ),
            _ => {
                let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
                // The legacy v2 API has no microversions.
                let version = if segments.first().map(String::as_str) == Some("v2") {
                    Ok(microversion::MIN)
                } else {
                    microversion::requested(
                        header("openstack-api-version"),
                        header("x-openstack-nova-api-version"),
                    )
                };
                // Version documents answer whatever version was asked for: clients read them to
                // find out which versions there are.
                let version_document = request.method() == Method::GET
                    && matches!(
                        segments
                            .iter()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .as_slice(),
                        [] | ["v2.1"] | ["v2"]
                    );
                let version = if version_document {
                    Ok(version.unwrap_or(microversion::MIN))
                } else {
                    version
                };
                match version {
                    Ok(version) => {
                        let response = self
                            .compute_request(&log, &request_id, version, request, &segments, &base)
                            .await
                            .unwrap_or_else(|err| {
                                if matches!(err, ApiError::Internal(_)) {
                                    warn!(log, "request failed"; "error" => %err);
                                }
                                err.into_response()
                            });
                        (response, Some(version))
                    }
                    Err(err @ microversion::VersionError::Malformed(_)) => (
                        ApiError::BadRequest(err.to_string()).into_response(),
                        Some(microversion::MIN),
                    ),
                    Err(err) => (
                        ApiError::NotAcceptable(err.to_string()).into_response(),
                        Some(microversion::MIN),
                    ),
                }
            }
        };
        let headers = response.headers_mut();
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            headers.insert("x-openstack-request-id", id.clone());
            headers.insert("x-compute-request-id", id);
        }
        if let Some(version) = version {
            if let (Ok(new), Ok(old)) = (
                HeaderValue::from_str(&format!("compute {version}")),
                HeaderValue::from_str(&version.to_string()),
            ) {
                headers.insert("openstack-api-version", new);
                headers.insert("x-openstack-nova-api-version", old);
            }
            headers.insert(
                "vary",
                HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
            );
        }
        let took = started.elapsed();
        self.metrics
            .observe(&method, route, response.status(), took);
        info!(log, "request"; "method" => %method, "path" => &path, "status" => response.status().as_u16(),
            "ms" => took.as_millis() as u64);
        response
    }

    /// `GET /healthcheck`, as oslo's healthcheck middleware answers it (no token needed): 200
    /// `OK` when the database answers a trivial query in time, 503 otherwise.
    async fn healthcheck(&self, log: &Logger, method: &Method) -> Response<Full<Bytes>> {
        if *method != Method::GET && *method != Method::HEAD {
            return ApiError::MethodNotAllowed(method.to_string()).into_response();
        }
        let db = self.db.clone();
        // Any indexed read would do: it takes a pooled connection and runs a query.
        let query = tokio::task::spawn_blocking(move || db.ping());
        let healthy = match tokio::time::timeout(HEALTHCHECK_TIMEOUT, query).await {
            Ok(Ok(Ok(()))) => true,
            Ok(Ok(Err(e))) => {
                warn!(log, "healthcheck: the database did not answer"; "error" => %e);
                false
            }
            Ok(Err(e)) => {
                warn!(log, "healthcheck: the database query did not finish"; "error" => %e);
                false
            }
            Err(_) => {
                warn!(log, "healthcheck: the database did not answer in time";
                    "waited_ms" => HEALTHCHECK_TIMEOUT.as_millis() as u64);
                false
            }
        };
        healthcheck_response(healthy, *method == Method::HEAD)
    }

    async fn identity_request(
        &self,
        log: &Logger,
        request: Request<Incoming>,
        segments: &[String],
        base: &str,
    ) -> Response<Full<Bytes>> {
        let method = request.method().clone();
        let query = request.uri().query().map(str::to_string);
        let headers = request.headers().clone();
        let body = match self.read_body(request).await {
            Ok(body) => body,
            Err(err) => return err.into_response(),
        };
        let rest: Vec<&str> = segments[1..].iter().map(String::as_str).collect();
        self.identity
            .handle(log, &method, &rest, query.as_deref(), &headers, body, base)
            .await
    }

    /// The caller named by the request's token, as the context every later step carries.
    async fn authenticate(
        &self,
        request: &Request<Incoming>,
        request_id: &str,
        base: &str,
    ) -> Result<RequestContext, Response<Full<Bytes>>> {
        let token = request
            .headers()
            .get("x-auth-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let caller = match token {
            "" => Err(None),
            token => self.identity.authenticate(token).await.map_err(Some),
        };
        match caller {
            Ok(caller) => Ok(RequestContext {
                request_id: request_id.to_string(),
                user_id: caller.user_id,
                project_id: caller.project_id,
                roles: caller.roles,
                deadline_ms: None,
            }),
            Err(err) => {
                let status = err
                    .as_ref()
                    .map(|e| e.status())
                    .unwrap_or(StatusCode::UNAUTHORIZED);
                if status != StatusCode::UNAUTHORIZED {
                    if let Some(err) = err {
                        warn!(self.log, "token check failed"; "request_id" => request_id, "error" => %err);
                    }
                    return Err(ApiError::Internal("The token could not be checked.".into())
                        .into_response());
                }
                // keystonemiddleware's answer, so clients re-authenticate.
                let mut response = json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": {"code": 401, "title": "Unauthorized",
                        "message": "The request you have made requires authentication."}}),
                );
                if let Ok(value) = HeaderValue::from_str(&format!("Keystone uri=\"{base}/v3\"")) {
                    response.headers_mut().insert("www-authenticate", value);
                }
                Err(response)
            }
        }
    }

    async fn compute_request(
        self: &Arc<Self>,
        log: &Logger,
        request_id: &str,
        version: Version,
        request: Request<Incoming>,
        segments: &[String],
        base: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let method = request.method().clone();
        let mut segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        // Version documents need no token: clients read them first.
        match (&method, segments.as_slice()) {
            (&Method::GET, []) => {
                return Ok(json_response(
                    StatusCode::MULTIPLE_CHOICES,
                    &json!({"versions": [views::version_v2(base), views::version(base)]}),
                ))
            }
            (&Method::GET, ["v2.1"]) => {
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({"version": views::version(base)}),
                ))
            }
            (&Method::GET, ["v2"]) => {
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({"version": views::version_v2(base)}),
                ))
            }
            (_, [] | ["v2.1"] | ["v2"]) => {
                return Err(ApiError::MethodNotAllowed(method.to_string()))
            }
            (_, [first, ..]) if *first != "v2.1" && *first != "v2" => {
                return Err(ApiError::NotFound(format!(
                    "The resource {} could not be found.",
                    request.uri().path()
                )))
            }
            _ => {}
        }
        let context = match self.authenticate(&request, request_id, base).await {
            Ok(context) => context,
            Err(response) => return Ok(response),
        };
        if segments.len() > 2 && !COMPUTE_COLLECTIONS.contains(&segments[1]) {
            if segments[1] != context.project_id {
                return Err(ApiError::BadRequest(format!(
                    "Malformed request URL: URL's project_id '{}' doesn't match Context's project_id '{}'",
                    segments[1], context.project_id
                )));
            }
            segments.remove(1);
        }
        let call = Call {
            log: log.new(slog::o!("user" => context.user_id.clone(), "project" => context.project_id.clone())),
            context,
            base: base.to_string(),
            version,
            query: parse_query(request.uri().query()),
        };
        let body = if matches!(method, Method::POST | Method::PUT) {
            check_json_content_type(&request)?;
            self.read_body(request).await?
        } else {
            Bytes::new()
        };
        self.route(&call, &method, &segments[1..], &body).await
    }

    async fn route(
        self: &Arc<Self>,
        call: &Call,
        method: &Method,
        path: &[&str],
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        use Method as M;
        match (method, path) {
            (&M::POST, ["servers"]) => self.create_server(call, body).await,
            (&M::GET, ["servers"]) => self.list_servers(call, false).await,
            (&M::GET, ["servers", "detail"]) => self.list_servers(call, true).await,
            (&M::GET, ["servers", id]) => self.show_server(call, id).await,
            (&M::PUT, ["servers", id]) => self.update_server(call, id, body).await,
            (&M::DELETE, ["servers", id]) => self.delete_server(call, id).await,
            (&M::POST, ["servers", id, "action"]) => self.server_action(call, id, body).await,
            (&M::GET, ["servers", id, "os-instance-actions"]) => {
                self.instance_actions(call, id, None).await
            }
            (&M::GET, ["servers", id, "os-instance-actions", request_id]) => {
                self.instance_actions(call, id, Some(request_id)).await
            }
            (&M::GET, ["flavors"]) => self.list_flavors(call, false).await,
            (&M::GET, ["flavors", "detail"]) => self.list_flavors(call, true).await,
            (&M::POST, ["flavors"]) => self.create_flavor(call, body).await,
            (&M::GET, ["flavors", id]) => self.show_flavor(call, id).await,
            (&M::DELETE, ["flavors", id]) => self.delete_flavor(call, id).await,
            (&M::GET, ["flavors", id, "os-extra_specs"]) => self.extra_specs(call, id).await,
            (&M::POST, ["flavors", id, "os-extra_specs"]) => {
                self.set_extra_specs(call, id, body).await
            }
            (&M::GET, ["flavors", id, "os-extra_specs", key]) => {
                self.extra_spec(call, id, key).await
            }
            (&M::PUT, ["flavors", id, "os-extra_specs", key]) => {
                self.put_extra_spec(call, id, key, body).await
            }
            (&M::DELETE, ["flavors", id, "os-extra_specs", key]) => {
                self.delete_extra_spec(call, id, key).await
            }
            (&M::GET, ["os-services"]) => self.list_services(call).await,
            (&M::PUT, ["os-services", action]) => self.update_service(call, action, body).await,
            (&M::GET, ["os-hypervisors"]) => self.list_hypervisors(call, false).await,
            (&M::GET, ["os-hypervisors", "detail"]) => self.list_hypervisors(call, true).await,
            (&M::GET, ["os-hypervisors", id]) => self.show_hypervisor(call, id).await,
            (&M::GET, ["os-availability-zone"]) => self.availability_zones(call, false).await,
            (&M::GET, ["os-availability-zone", "detail"]) => {
                self.availability_zones(call, true).await
            }
            (&M::GET, ["limits"]) => self.limits(call).await,
            (&M::GET, ["os-keypairs"]) => self.list_keypairs(call).await,
            (&M::POST, ["os-keypairs"]) => self.create_keypair(call, body).await,
            (&M::GET, ["os-keypairs", name]) => self.show_keypair(call, name).await,
            (&M::DELETE, ["os-keypairs", name]) => self.delete_keypair(call, name).await,
            (_, [collection, ..])
                if COMPUTE_COLLECTIONS.contains(collection) && known_path(path) =>
            {
                Err(ApiError::MethodNotAllowed(method.to_string()))
            }
            _ => Err(ApiError::NotFound(format!(
                "The resource /v2.1/{} could not be found.",
                path.join("/")
            ))),
        }
    }

    async fn read_body(&self, request: Request<Incoming>) -> Result<Bytes, ApiError> {
        let limit = self.config.max_body_bytes;
        match Limited::new(request.into_body(), limit).collect().await {
            Ok(collected) => {
                let body = collected.to_bytes();
                if has_nul_string(&body) {
                    return Err(ApiError::BadRequest(NUL_REFUSED.into()));
                }
                Ok(body)
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(limit)),
            Err(e) => Err(ApiError::BadRequest(format!(
                "The request body could not be read: {e}"
            ))),
        }
    }

    /// Runs a database closure on a blocking thread.
    async fn db<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Db) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(ApiError::from)
    }
}

/// Paths that exist for some method, so another method is a 405 rather than a 404.
fn known_path(path: &[&str]) -> bool {
    matches!(
        path,
        [_] | ["servers", _]
            | ["servers", _, "action"]
            | ["flavors", _]
            | ["flavors", _, "os-extra_specs"]
            | ["flavors", _, "os-extra_specs", _]
            | ["os-hypervisors", _]
            | ["os-services", _]
            | ["os-keypairs", _]
    )
}

/// A body the API reads must be JSON; no Content-Type at all is taken as JSON, as Nova does.
fn check_json_content_type(request: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(value) = request.headers().get(CONTENT_TYPE) else {
        return Ok(());
    };
    let media = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if media == "application/json" || media.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "The media type {media} is not supported, use application/json."
        )))
    }
}

/// Why a request with a NUL character is refused. PostgreSQL cannot store one in text, SQLite
/// would, and no name, description or password needs one: refused alike on both, before
/// anything is parsed further or written.
const NUL_REFUSED: &str = "Invalid input: the request contains a NUL character (\\u0000 or %00).";

/// Whether a JSON body holds a string with a NUL character. Only a body that spells the escape
/// is parsed to find out (a raw NUL byte is not valid JSON, so the parser refuses it anyway).
fn has_nul_string(body: &[u8]) -> bool {
    fn any_nul(value: &Value) -> bool {
        match value {
            Value::String(text) => text.contains('\0'),
            Value::Array(items) => items.iter().any(any_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || any_nul(v)),
            _ => false,
        }
    }
    body.windows(6).any(|w| w == b"\\u0000")
        && serde_json::from_slice::<Value>(body).is_ok_and(|v| any_nul(&v))
}

/// Parses a JSON request body; an empty or malformed one is Nova's 400.
pub(crate) fn json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|_| ApiError::BadRequest("Malformed request body".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_reads_into_the_api_config() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/zova.toml");
        let config: Config = proto::service::load_config(Some(&file)).expect("parses");
        assert_eq!(config.quota.instances, 10);
        assert_eq!(config.quota.ram, 51200);
        assert_eq!(config.api.max_limit, 1000);
        assert_eq!(config.identity.region, "RegionOne");
        assert!(config.identity.token_ttl().is_ok());
        assert_eq!(
            config.metrics.address(default_port::API).as_deref(),
            Some("127.0.0.1:9774")
        );
    }

    #[test]
    fn only_bodies_with_a_nul_string_are_found() {
        assert!(has_nul_string(br#"{"server": {"name": "a\u0000b"}}"#));
        assert!(has_nul_string(br#"{"a\u0000": 1}"#));
        assert!(has_nul_string(br#"[["\u0000"]]"#));
        // A backslash followed by the text u0000 is no NUL; nor is a body that is not JSON.
        assert!(!has_nul_string(br#"{"name": "a\\u0000b"}"#));
        assert!(!has_nul_string(br#"{"name": "\u0000"#));
        assert!(!has_nul_string(br#"{"name": "plain"}"#));
    }

    #[test]
    fn the_healthcheck_says_ok_or_why_not_in_plain_text() {
        let ok = healthcheck_response(true, false);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()),
            Some("text/plain; charset=utf-8")
        );
        let failed = healthcheck_response(false, false);
        assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
        let head = healthcheck_response(false, true);
        assert_eq!(head.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn query_strings_decode_as_clients_encode_them() {
        let pairs = parse_query(Some(
            "name=web%2D1&status=ACTIVE&name=a+b&flag&bad=%zz&end=%4",
        ));
        assert_eq!(
            pairs,
            vec![
                ("name".to_string(), "web-1".to_string()),
                ("status".to_string(), "ACTIVE".to_string()),
                ("name".to_string(), "a b".to_string()),
                ("flag".to_string(), String::new()),
                ("bad".to_string(), "%zz".to_string()),
                ("end".to_string(), "%4".to_string()),
            ]
        );
        assert!(parse_query(None).is_empty());
    }
}
