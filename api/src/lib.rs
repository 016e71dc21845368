//! The compute API (`zova-api`): Nova's HTTP interface over hyper. It validates a request, writes
//! the instance rows and the `create` action, and casts `build_instances` to a conductor; reads are
//! answered from the database. Errors leave in Nova's JSON error format, from one place
//! (`ApiError::into_response`).

pub mod identity;
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
use rand::distributions::{Alphanumeric, DistString};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use slog::{info, warn, Logger};
use tokio::net::TcpListener;
use tokio::sync::watch;

use db::{Db, DbError, Instance, NewFault, NewInstance};
use proto::service::{for_request, stopped, DatabaseConfig, LogConfig, RpcConfig, ServiceHandle};
use proto::{
    new_request_id, power_state, task_state, vm_state, BuildInstances, Peers, RequestContext, Rpc,
    TerminateInstance,
};

pub const BINARY: &str = "zova-api";

/// `[api]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Address to listen on; 8774 is Nova's port.
    pub listen: String,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// The project of requests that carry no token (authentication comes later).
    pub default_project: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8774".into(),
            max_body_bytes: 1024 * 1024,
            default_project: "default".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub rpc: RpcConfig,
    pub log: LogConfig,
    pub api: ApiConfig,
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
}

impl Args {
    pub fn into_config(self) -> Result<Config, ApiStartError> {
        let mut config: Config = proto::service::load_config(self.config.as_deref())
            .map_err(|e| ApiStartError::Config(e.to_string()))?;
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
    Internal(String),
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::NotFound { .. } => ApiError::NotFound(err.to_string()),
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
    config: ApiConfig,
}

/// Opens the database, listens on `[api] listen` and serves until stopped.
pub async fn start(config: Config, log: Logger) -> Result<ServiceHandle, ApiStartError> {
    let url = config.database.url.clone();
    let db = tokio::task::spawn_blocking(move || Db::open(&url))
        .await
        .map_err(|e| ApiStartError::Task(e.to_string()))??;
    let (rpc, _) = Rpc::start(log.clone(), None, config.rpc.options())?;
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
    let conductors = config.rpc.conductor_endpoints();
    info!(log, "api listening"; "address" => %address, "conductors" => conductors.join(","));
    let api = Arc::new(Api {
        log,
        db,
        rpc,
        conductors: Peers::new(conductors),
        config: config.api,
    });
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped(&mut stop_rx) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
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
        api.rpc.shutdown();
    });
    Ok(ServiceHandle::new(address.to_string(), stop_tx, task))
}

impl Api {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let context = RequestContext {
            request_id: new_request_id(),
            user_id: "admin".into(),
            project_id: self.config.default_project.clone(),
            // Without authentication every caller is trusted as an admin of the default project;
            // the identity issue narrows this to the token's roles.
            roles: vec!["admin".into(), "member".into()],
            deadline_ms: None,
        };
        let log = for_request(&self.log, &context);
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
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        let version = validate::check_microversion(
            header("openstack-api-version"),
            header("x-openstack-nova-api-version"),
        )
        .map_err(ApiError::NotAcceptable);
        let routed = match version {
            Ok(()) => self.route(&log, &context, &base, request).await,
            Err(err) => Err(err),
        };
        let mut response = match routed {
            Ok(response) => response,
            Err(err) => {
                if matches!(err, ApiError::Internal(_)) {
                    warn!(log, "request failed"; "error" => %err);
                }
                err.into_response()
            }
        };
        if let Ok(id) = HeaderValue::from_str(&context.request_id) {
            response
                .headers_mut()
                .insert("x-openstack-request-id", id.clone());
            response.headers_mut().insert("x-compute-request-id", id);
        }
        let headers = response.headers_mut();
        headers.insert(
            "openstack-api-version",
            HeaderValue::from_static("compute 2.1"),
        );
        headers.insert(
            "x-openstack-nova-api-version",
            HeaderValue::from_static("2.1"),
        );
        headers.insert(
            "vary",
            HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
        );
        info!(log, "request"; "method" => %method, "path" => &path, "status" => response.status().as_u16(),
            "ms" => started.elapsed().as_millis() as u64);
        response
    }

    async fn route(
        self: &Arc<Self>,
        log: &Logger,
        context: &RequestContext,
        base: &str,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let method = request.method().clone();
        let path = request.uri().path().trim_end_matches('/').to_string();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match (method.clone(), segments.as_slice()) {
            (Method::GET, []) => Ok(json_response(
                StatusCode::MULTIPLE_CHOICES,
                &json!({"versions": [views::version(base)]}),
            )),
            (Method::GET, ["v2.1"]) => Ok(json_response(
                StatusCode::OK,
                &json!({"version": views::version(base)}),
            )),
            (Method::POST, ["v2.1", "servers"]) => {
                let body = self.read_body(request).await?;
                self.create_server(log, context, base, &body).await
            }
            (Method::GET, ["v2.1", "servers"]) => self.list_servers(context, base, false).await,
            (Method::GET, ["v2.1", "servers", "detail"]) => {
                self.list_servers(context, base, true).await
            }
            (Method::GET, ["v2.1", "servers", id]) => self.show_server(context, base, id).await,
            (Method::DELETE, ["v2.1", "servers", id]) => self.delete_server(log, context, id).await,
            (Method::GET, ["v2.1", "flavors"]) => self.list_flavors(base, false).await,
            (Method::GET, ["v2.1", "flavors", "detail"]) => self.list_flavors(base, true).await,
            (Method::GET, ["v2.1", "flavors", id]) => self.show_flavor(base, id).await,
            (_, ["v2.1", "servers", ..] | ["v2.1", "flavors", ..] | ["v2.1"] | []) => {
                Err(ApiError::MethodNotAllowed(method.to_string()))
            }
            _ => Err(ApiError::NotFound(format!(
                "The resource {path} could not be found."
            ))),
        }
    }

    async fn read_body(&self, request: Request<Incoming>) -> Result<Bytes, ApiError> {
        let limit = self.config.max_body_bytes;
        match Limited::new(request.into_body(), limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
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

    /// The live instance `id` if the caller's project may see it.
    async fn visible_instance(
        &self,
        context: &RequestContext,
        id: &str,
    ) -> Result<Instance, ApiError> {
        let lookup = id.to_string();
        let instance = self.db(move |db| db.instance_get(&lookup)).await?;
        match instance {
            Some(instance) if context.is_admin() || instance.project_id == context.project_id => {
                Ok(instance)
            }
            _ => Err(ApiError::NotFound(format!(
                "Instance {id} could not be found."
            ))),
        }
    }

    async fn create_server(
        self: &Arc<Self>,
        log: &Logger,
        context: &RequestContext,
        base: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let request = validate::parse_create_server(body).map_err(ApiError::BadRequest)?;
        if request.hints.scheduler_host.is_some() && !context.is_admin() {
            return Err(ApiError::Forbidden(
                "Only administrators may force a host with scheduler_host.".into(),
            ));
        }
        let (flavor_ref, image_ref) = (request.flavor_ref.clone(), request.image_ref.clone());
        let (flavor, image) = self
            .db(move |db| Ok((db.flavor_get(&flavor_ref)?, db.image_get(&image_ref)?)))
            .await?;
        let flavor = flavor.ok_or_else(|| {
            ApiError::BadRequest(format!("Flavor {} could not be found.", request.flavor_ref))
        })?;
        let image = image.ok_or_else(|| {
            ApiError::BadRequest(format!("Image {} could not be found.", request.image_ref))
        })?;
        if image.status != "active" {
            return Err(ApiError::BadRequest(format!(
                "Image {} is not active.",
                image.uuid
            )));
        }

        let reservation_id = format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let metadata = serde_json::to_string(&request.metadata)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let hints_json =
            serde_json::to_string(&request.hints).map_err(|e| ApiError::Internal(e.to_string()))?;
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
                project_id: context.project_id.clone(),
                user_id: context.user_id.clone(),
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
            })
            .collect();
        // Detached, so a client that hangs up cannot leave rows written but never cast.
        let api = self.clone();
        let (task_log, task_context, hints) = (log.clone(), context.clone(), request.hints.clone());
        let min_count = u32::try_from(request.min_count).unwrap_or(1);
        let uuids = tokio::spawn(async move {
            api.insert_and_build(&task_log, &task_context, rows, hints, min_count)
                .await
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        info!(log, "servers accepted"; "count" => count, "first" => &uuids[0], "flavor" => &flavor.name);
        if request.return_reservation_id {
            return Ok(json_response(
                StatusCode::ACCEPTED,
                &json!({"reservation_id": reservation_id}),
            ));
        }
        let id = &uuids[0];
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

    /// Writes the rows (all or none) and casts `build_instances`; if the conductor does not take
    /// it, the rows go to ERROR with the reason rather than wait in BUILD forever.
    async fn insert_and_build(
        &self,
        log: &Logger,
        context: &RequestContext,
        rows: Vec<NewInstance>,
        hints: proto::SchedulerHints,
        min_count: u32,
    ) -> Result<Vec<String>, ApiError> {
        let uuids: Vec<String> = rows.iter().map(|r| r.uuid.clone()).collect();
        let request_id = context.request_id.clone();
        self.db(move |db| db.instances_create(&rows, &request_id))
            .await?;
        let build = BuildInstances {
            instance_uuids: uuids.clone(),
            hints,
            min_count,
        };
        if let Err(e) = self.conductors.cast(&self.rpc, context, &build).await {
            warn!(log, "conductor did not take build_instances"; "error" => %e);
            let message = format!("The conductor did not take the build request: {e}");
            for uuid in uuids.clone() {
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
        Ok(uuids)
    }

    async fn list_servers(
        &self,
        context: &RequestContext,
        base: &str,
        detail: bool,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let project = context.project_id.clone();
        let servers = self
            .db(move |db| {
                let instances = db.instances_list(Some(&project))?;
                let mut out = Vec::with_capacity(instances.len());
                for instance in instances {
                    let fault = if detail && instance.vm_state == vm_state::ERROR {
                        db.instance_fault_latest(&instance.uuid)?
                    } else {
                        None
                    };
                    out.push((instance, fault));
                }
                Ok(out)
            })
            .await?;
        let servers: Vec<Value> = servers
            .iter()
            .map(|(i, f)| {
                if detail {
                    views::server_detail(base, i, f.as_ref())
                } else {
                    views::server_summary(base, i)
                }
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({ "servers": servers }),
        ))
    }

    async fn show_server(
        &self,
        context: &RequestContext,
        base: &str,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let instance = self.visible_instance(context, id).await?;
        let uuid = instance.uuid.clone();
        let fault = if instance.vm_state == vm_state::ERROR {
            self.db(move |db| db.instance_fault_latest(&uuid)).await?
        } else {
            None
        };
        Ok(json_response(
            StatusCode::OK,
            &json!({"server": views::server_detail(base, &instance, fault.as_ref())}),
        ))
    }

    async fn delete_server(
        self: &Arc<Self>,
        log: &Logger,
        context: &RequestContext,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let instance = self.visible_instance(context, id).await?;
        // Detached, so a client that hangs up cannot leave the server marked `deleting` for ever.
        let api = self.clone();
        let (task_log, task_context) = (log.clone(), context.clone());
        tokio::spawn(async move { api.terminate(&task_log, &task_context, instance).await })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        Ok(empty_response(StatusCode::NO_CONTENT))
    }

    /// Casts the delete to the instance's compute; with no host, or a compute that does not take
    /// the cast, deletes the row here (Nova's "local delete").
    async fn terminate(
        &self,
        log: &Logger,
        context: &RequestContext,
        instance: Instance,
    ) -> Result<(), ApiError> {
        let uuid = instance.uuid.clone();
        let endpoint = match instance.host {
            Some(host) => {
                self.db(move |db| {
                    Ok(db
                        .service_get(&host, "zova-compute")?
                        .map(|s| (s.rpc_endpoint, s.rpc_public_key)))
                })
                .await?
            }
            None => None,
        };
        if let Some((endpoint, key)) = endpoint {
            if let Some(key) = key {
                if let Err(e) = self.rpc.set_peer_key(&endpoint, &key) {
                    warn!(log, "the compute registered an unusable key"; "endpoint" => &endpoint, "error" => %e);
                }
            }
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
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(log, "compute did not take the delete; deleting locally"; "instance" => &uuid, "error" => %e)
                }
            }
        }
        self.db(move |db| db.instance_destroy(&uuid)).await
    }

    async fn list_flavors(
        &self,
        base: &str,
        detail: bool,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let flavors = self.db(|db| db.flavors()).await?;
        let flavors: Vec<Value> = flavors
            .iter()
            .map(|f| {
                if detail {
                    views::flavor(base, f)
                } else {
                    views::flavor_summary(base, f)
                }
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({ "flavors": flavors }),
        ))
    }

    async fn show_flavor(&self, base: &str, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let lookup = id.to_string();
        match self.db(move |db| db.flavor_get(&lookup)).await? {
            Some(flavor) => Ok(json_response(
                StatusCode::OK,
                &json!({"flavor": views::flavor(base, &flavor)}),
            )),
            None => Err(ApiError::NotFound(format!(
                "Flavor {id} could not be found."
            ))),
        }
    }
}
