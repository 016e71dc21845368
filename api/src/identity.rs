//! Identity: the part of Keystone v3 that OpenStack clients need before they talk to the compute
//! API. `POST /v3/auth/tokens` checks a password and issues a token (with the service catalog);
//! `GET`/`HEAD`/`DELETE /v3/auth/tokens` validate and revoke one; [`Identity::authenticate`] turns
//! the `X-Auth-Token` of a compute request into its [`Caller`].
//!
//! A request body is parsed into a typed request by pure functions before anything is looked up.
//! Passwords are Argon2id PHC strings; a token is 32 random bytes in hex, stored only as its
//! SHA-256. Passwords, tokens and hashes never go into a log line or an error message.

use std::fmt::Write as _;
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use chrono::{NaiveDateTime, SubsecRound, Utc};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Response, StatusCode};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use slog::{info, warn, Logger};
use tokio::sync::Semaphore;

use db::{Db, DbError, LiveToken, Role, DEFAULT_DOMAIN_ID, DEFAULT_DOMAIN_NAME};

/// The header a client sends its own token in.
pub const AUTH_TOKEN_HEADER: &str = "x-auth-token";
/// The header that carries a new token, and names the token to validate or revoke.
pub const SUBJECT_TOKEN_HEADER: &str = "x-subject-token";

/// The Keystone API version this subset follows (Ussuri's).
const API_VERSION: &str = "v3.14";
const API_VERSION_UPDATED: &str = "2020-04-07T00:00:00Z";

/// Timestamps in token bodies, as Keystone writes them.
const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Keystone's answer to every failed password check, so it does not tell which part was wrong.
const AUTH_FAILED: &str = "The request you have made requires authentication.";

/// The namespace of Zova's fixed Keystone ids (roles, services, endpoints): uuid v5 of a name.
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d1f_3a0e_8c4b_4f2a_9b67_2e51_d0c8_a4f3);

/// An Argon2id hash (default parameters) of a password nobody has: checked against when the user
/// does not exist, so that an unknown name costs as much time as a wrong password.
const DUMMY_PASSWORD_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$yJ4MqOQ0O5Wbm0ZShaW3W9cAh7J4QvM4vPpOQyq3kaw";

/// The services in every scoped token's catalog: (type, name, path under the API's address).
const CATALOG: [(&str, &str, &str); 3] = [
    ("compute", "nova", "/v2.1"),
    ("image", "glance", "/image"),
    ("identity", "keystone", "/v3"),
];
const INTERFACES: [&str; 3] = ["public", "internal", "admin"];

/// `[identity]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityConfig {
    /// How long an issued token is good for.
    pub token_ttl_hours: f64,
    /// The region of every catalog endpoint.
    pub region: String,
    /// How long a checked token is trusted without asking the database again (0: always ask).
    /// A revocation through this API takes effect at once; one through another API process, a
    /// role change or a password reset within this time (keystonemiddleware's token cache).
    pub cache_seconds: f64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            token_ttl_hours: 12.0,
            region: "RegionOne".into(),
            cache_seconds: 30.0,
        }
    }
}

/// The most checked tokens kept; a full cache is emptied (a burst of new tokens only costs
/// database lookups again).
const TOKEN_CACHE_ENTRIES: usize = 100_000;

impl IdentityConfig {
    /// The token lifetime: positive and at most ten years, or a message naming the setting.
    pub fn token_ttl(&self) -> Result<chrono::Duration, String> {
        let hours = self.token_ttl_hours;
        if hours.is_finite() && hours > 0.0 && hours <= 24.0 * 3653.0 {
            Ok(chrono::Duration::milliseconds((hours * 3_600_000.0) as i64))
        } else {
            Err(format!(
                "identity.token_ttl_hours must be a positive number of hours (at most ten years), not {hours}"
            ))
        }
    }
}

/// Who sent a compute request: the user and project of its project-scoped token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub user_name: String,
    pub project_id: String,
    pub project_name: String,
    /// Effective roles, strongest first, e.g. `["admin", "member", "reader"]`.
    pub roles: Vec<String>,
    pub expires_at: NaiveDateTime,
}

/// Why a token does not let its bearer in.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("The request you have made requires authentication: send a token in X-Auth-Token.")]
    Missing,
    #[error("The token is invalid, expired or revoked; get a new one from /v3/auth/tokens.")]
    Invalid,
    #[error("The token is not scoped to a project; get a project-scoped token.")]
    Unscoped,
    #[error("identity database error: {0}")]
    Database(#[from] DbError),
    #[error("identity task failed: {0}")]
    Task(String),
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::Missing | AuthError::Invalid | AuthError::Unscoped => {
                StatusCode::UNAUTHORIZED
            }
            AuthError::Database(_) | AuthError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A password could not be hashed (the message says why; it never contains the password).
#[derive(Debug, thiserror::Error)]
#[error("cannot hash the password: {0}")]
pub struct PasswordHashError(argon2::password_hash::Error);

/// The Argon2id PHC string of `password`, with a fresh random salt and the default parameters.
pub fn hash_password(password: &str) -> Result<String, PasswordHashError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(PasswordHashError)
}

/// Whether `password` matches the PHC string `hash`; false for a hash that does not parse.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The stable Keystone id of a role.
pub fn role_id(role: Role) -> String {
    stable_id(&format!("role:{}", role.name()))
}

fn stable_id(name: &str) -> String {
    uuid::Uuid::new_v5(&ID_NAMESPACE, name.as_bytes())
        .simple()
        .to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

/// A fresh token: 32 bytes from the operating system's generator, in hex.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex(&bytes)
}

/// What the database knows a token by.
fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Keystone's audit id: names a token in logs and bodies without giving it away. Derived from
/// the stored hash, so validating a token shows the same id as issuing it.
fn audit_id(token_hash: &str) -> String {
    let digest = Sha256::digest(format!("audit:{token_hash}").as_bytes());
    hex(&digest[..11])
}

fn format_time(at: NaiveDateTime) -> String {
    at.format(TIME_FORMAT).to_string()
}

/// A password that `{:?}` does not print.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Which user, or which project, a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Named {
    Id(String),
    Name(String),
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Named::Id(id) => f.write_str(id),
            Named::Name(name) => f.write_str(name),
        }
    }
}

/// The scope a token request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScopeRequest {
    /// No scope: the user's default project if it can be had, else unscoped.
    Default,
    /// `"scope": "unscoped"`.
    Unscoped,
    Project(Named),
}

/// A password request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PasswordRequest {
    pub user: Named,
    pub password: Password,
    pub scope: ScopeRequest,
}

/// Why a token request was refused before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// 400: the body is not a token request.
    #[error("{0}")]
    Malformed(String),
    /// 401: well-formed, but for something this Keystone does not have or do.
    #[error("{0}")]
    Refused(String),
}

fn malformed(message: impl Into<String>) -> RequestError {
    RequestError::Malformed(message.into())
}

/// An object member that must be a JSON object if present.
fn object<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, RequestError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(malformed(format!("{path}.{key} must be an object."))),
    }
}

/// An object member that must be a non-empty string if present.
fn text<'a>(
    parent: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, RequestError> {
    match parent.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(malformed(format!(
            "{path}.{key} must be a non-empty string."
        ))),
    }
}

/// Checks a `domain` reference: it must name the default domain, by id or name.
fn check_domain(domain: &Map<String, Value>, path: &str) -> Result<(), RequestError> {
    let path = format!("{path}.domain");
    let known = match (text(domain, "id", &path)?, text(domain, "name", &path)?) {
        (Some(id), _) => id == DEFAULT_DOMAIN_ID,
        (None, Some(name)) => name.eq_ignore_ascii_case(DEFAULT_DOMAIN_NAME),
        (None, None) => return Err(malformed(format!("{path} needs an id or a name."))),
    };
    if known {
        Ok(())
    } else {
        Err(RequestError::Refused(format!(
            "Could not find domain: only the domain \"{DEFAULT_DOMAIN_ID}\" (\"{DEFAULT_DOMAIN_NAME}\") exists."
        )))
    }
}

/// A user or project reference: `{"id"}` or `{"name", "domain"}` (an id wins if both are given).
fn named(reference: &Map<String, Value>, path: &str) -> Result<Named, RequestError> {
    if let Some(id) = text(reference, "id", path)? {
        if let Some(domain) = object(reference, "domain", path)? {
            check_domain(domain, path)?;
        }
        return Ok(Named::Id(id.to_string()));
    }
    let Some(name) = text(reference, "name", path)? else {
        return Err(malformed(format!("{path} needs an id or a name.")));
    };
    let Some(domain) = object(reference, "domain", path)? else {
        return Err(malformed(format!(
            "{path} names {name} but no domain; add \"domain\": {{\"id\": \"default\"}}."
        )));
    };
    check_domain(domain, path)?;
    Ok(Named::Name(name.to_string()))
}

/// Parses a `POST /v3/auth/tokens` body with the password method.
pub(crate) fn parse_token_request(body: &[u8]) -> Result<PasswordRequest, RequestError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("The request body is not valid JSON: {e}")))?;
    let Value::Object(root) = value else {
        return Err(malformed("The request body must be a JSON object."));
    };
    let auth = object(&root, "auth", "body")?.ok_or_else(|| malformed("auth is required."))?;
    let identity =
        object(auth, "identity", "auth")?.ok_or_else(|| malformed("auth.identity is required."))?;
    let methods = match identity.get("methods") {
        Some(Value::Array(methods)) if !methods.is_empty() => methods,
        _ => {
            return Err(malformed(
                "auth.identity.methods must be a non-empty list, e.g. [\"password\"].",
            ))
        }
    };
    for method in methods {
        match method.as_str() {
            Some("password") => {}
            Some(_) => {
                return Err(RequestError::Refused(
                    "Attempted to authenticate with an unsupported method; only \"password\" is supported."
                        .into(),
                ))
            }
            None => return Err(malformed("auth.identity.methods must hold strings.")),
        }
    }
    let password = object(identity, "password", "auth.identity")?
        .ok_or_else(|| malformed("auth.identity.password is required by the password method."))?;
    let user = object(password, "user", "auth.identity.password")?
        .ok_or_else(|| malformed("auth.identity.password.user is required."))?;
    let path = "auth.identity.password.user";
    let user_ref = named(user, path)?;
    let secret = match user.get("password") {
        Some(Value::String(secret)) => Password(secret.clone()),
        _ => return Err(malformed(format!("{path}.password must be a string."))),
    };
    let scope = match auth.get("scope") {
        None | Some(Value::Null) => ScopeRequest::Default,
        Some(Value::String(s)) if s == "unscoped" => ScopeRequest::Unscoped,
        Some(Value::Object(scope)) => {
            if let Some(project) = object(scope, "project", "auth.scope")? {
                ScopeRequest::Project(named(project, "auth.scope.project")?)
            } else if scope.contains_key("domain")
                || scope.contains_key("system")
                || scope.contains_key("OS-TRUST:trust")
            {
                return Err(RequestError::Refused(
                    "Only project-scoped and unscoped tokens are issued here; domain, system and trust scopes are not supported."
                        .into(),
                ));
            } else {
                return Err(malformed("auth.scope must name a project."));
            }
        }
        Some(_) => return Err(malformed("auth.scope must be an object or \"unscoped\".")),
    };
    Ok(PasswordRequest {
        user: user_ref,
        password: secret,
        scope,
    })
}

/// Whether a query string asks to leave the catalog out (`?nocatalog`, any value).
fn wants_no_catalog(query: Option<&str>) -> bool {
    query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some("nocatalog"))
    })
}

/// The service catalog, with every endpoint under `base`.
fn catalog(base: &str, region: &str) -> Value {
    let services: Vec<Value> = CATALOG
        .iter()
        .map(|(kind, name, path)| {
            let endpoints: Vec<Value> = INTERFACES
                .iter()
                .map(|interface| {
                    json!({
                        "id": stable_id(&format!("endpoint:{kind}:{interface}")),
                        "interface": interface,
                        "region": region,
                        "region_id": region,
                        "url": format!("{base}{path}"),
                    })
                })
                .collect();
            json!({
                "type": kind,
                "name": name,
                "id": stable_id(&format!("service:{kind}")),
                "endpoints": endpoints,
            })
        })
        .collect();
    Value::Array(services)
}

fn domain_body() -> Value {
    json!({"id": DEFAULT_DOMAIN_ID, "name": DEFAULT_DOMAIN_NAME})
}

/// The `{"token": ...}` body for a live token; `catalog` is None to leave it out.
fn token_body(live: &LiveToken, catalog: Option<Value>) -> Value {
    let mut token = json!({
        "methods": ["password"],
        "user": {
            "id": live.user.uuid,
            "name": live.user.name,
            "domain": domain_body(),
            "password_expires_at": null,
        },
        "audit_ids": [audit_id(&live.token.token_hash)],
        "expires_at": format_time(live.token.expires_at),
        "issued_at": format_time(live.token.issued_at),
    });
    if let (Some(project), Value::Object(token)) = (&live.project, &mut token) {
        token.insert(
            "project".into(),
            json!({"id": project.uuid, "name": project.name, "domain": domain_body()}),
        );
        token.insert("is_domain".into(), Value::Bool(false));
        let roles: Vec<Value> = live
            .roles
            .iter()
            .map(|role| json!({"id": role_id(*role), "name": role.name()}))
            .collect();
        token.insert("roles".into(), Value::Array(roles));
        if let Some(catalog) = catalog {
            token.insert("catalog".into(), catalog);
        }
    }
    json!({ "token": token })
}

/// An error answered in Keystone's `{"error": {"code", "title", "message"}}` form.
#[derive(Debug, thiserror::Error)]
enum KeystoneError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("The method {0} is not allowed for the requested URL.")]
    MethodNotAllowed(Method),
    /// The detail goes to the log; the client gets Keystone's generic sentence.
    #[error("An unexpected error prevented the server from fulfilling your request.")]
    Internal(String),
}

impl From<AuthError> for KeystoneError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Missing | AuthError::Invalid | AuthError::Unscoped => {
                KeystoneError::Unauthorized(err.to_string())
            }
            AuthError::Database(_) | AuthError::Task(_) => KeystoneError::Internal(err.to_string()),
        }
    }
}

impl From<DbError> for KeystoneError {
    fn from(err: DbError) -> Self {
        AuthError::from(err).into()
    }
}

impl From<RequestError> for KeystoneError {
    fn from(err: RequestError) -> Self {
        match err {
            RequestError::Malformed(message) => KeystoneError::BadRequest(message),
            RequestError::Refused(message) => KeystoneError::Unauthorized(message),
        }
    }
}

impl KeystoneError {
    fn status(&self) -> StatusCode {
        match self {
            KeystoneError::BadRequest(_) => StatusCode::BAD_REQUEST,
            KeystoneError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            KeystoneError::Forbidden(_) => StatusCode::FORBIDDEN,
            KeystoneError::NotFound(_) => StatusCode::NOT_FOUND,
            KeystoneError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            KeystoneError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn into_response(self, base: &str) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = json!({"error": {
            "code": status.as_u16(),
            "title": status.canonical_reason().unwrap_or("Error"),
            "message": self.to_string(),
        }});
        let mut response = json_response(status, &body);
        if status == StatusCode::UNAUTHORIZED {
            if let Ok(value) = HeaderValue::from_str(&format!("Keystone uri=\"{base}/v3\"")) {
                response
                    .headers_mut()
                    .insert(hyper::header::WWW_AUTHENTICATE, value);
            }
        }
        response
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

fn with_subject_token(mut response: Response<Full<Bytes>>, token: &str) -> Response<Full<Bytes>> {
    if let Ok(value) = HeaderValue::from_str(token) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(SUBJECT_TOKEN_HEADER), value);
    }
    response
}

/// What a request does with the token named in `X-Subject-Token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubjectAction {
    Show,
    Check,
    Revoke,
}

impl SubjectAction {
    fn policy(self) -> &'static str {
        match self {
            SubjectAction::Show => "identity:validate_token",
            SubjectAction::Check => "identity:check_token",
            SubjectAction::Revoke => "identity:revoke_token",
        }
    }
}

/// The Keystone v3 subset, over the database it shares with the compute API.
pub struct Identity {
    db: Db,
    config: IdentityConfig,
    token_ttl: chrono::Duration,
    /// Bounds concurrent Argon2 work (each check takes ~19 MiB and a core for tens of ms), so a
    /// burst of sign-ins queues instead of filling the blocking pool.
    password_checks: Arc<Semaphore>,
    /// Checked tokens by hash, with when they were checked: every compute request carries a
    /// token, and a database lookup for each would cost more than the request.
    checked: std::sync::Mutex<std::collections::HashMap<String, (Caller, std::time::Instant)>>,
}

impl Identity {
    pub fn new(db: Db, config: IdentityConfig, log: Logger) -> Self {
        let token_ttl = match config.token_ttl() {
            Ok(ttl) => ttl,
            Err(message) => {
                warn!(log, "using the default token lifetime"; "reason" => message);
                IdentityConfig::default()
                    .token_ttl()
                    .unwrap_or_else(|_| chrono::Duration::hours(12))
            }
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Identity {
            db,
            config,
            token_ttl,
            password_checks: Arc::new(Semaphore::new(cores)),
            checked: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn cache_ttl(&self) -> std::time::Duration {
        let seconds = self.config.cache_seconds;
        if seconds.is_finite() && seconds > 0.0 {
            std::time::Duration::from_secs_f64(seconds.min(3600.0))
        } else {
            std::time::Duration::ZERO
        }
    }

    fn cached(&self, hash: &str) -> Option<Caller> {
        let ttl = self.cache_ttl();
        if ttl.is_zero() {
            return None;
        }
        let checked = self.checked.lock().ok()?;
        let (caller, at) = checked.get(hash)?;
        (at.elapsed() < ttl && caller.expires_at > Utc::now().naive_utc()).then(|| caller.clone())
    }

    fn remember(&self, hash: String, caller: &Caller) {
        if self.cache_ttl().is_zero() {
            return;
        }
        if let Ok(mut checked) = self.checked.lock() {
            if checked.len() >= TOKEN_CACHE_ENTRIES {
                checked.clear();
            }
            checked.insert(hash, (caller.clone(), std::time::Instant::now()));
        }
    }

    fn forget(&self, hash: &str) {
        if let Ok(mut checked) = self.checked.lock() {
            checked.remove(hash);
        }
    }

    /// Everything under /v3. `segments`: the path segments AFTER "v3" (e.g. ["auth","tokens"]);
    /// `base`: "http://host:port" as the client addressed us; `body`: already read and
    /// size-limited; `log`: the request's logger (its lines carry the request id).
    // The parts of one request, each used; a struct for them would only be unpacked again.
    #[allow(clippy::too_many_arguments)]
    pub async fn handle(
        &self,
        log: &Logger,
        method: &Method,
        segments: &[&str],
        query: Option<&str>,
        headers: &HeaderMap,
        body: Bytes,
        base: &str,
    ) -> Response<Full<Bytes>> {
        let result = match (method, segments) {
            (&Method::GET | &Method::HEAD, []) => Ok(json_response(
                StatusCode::OK,
                &json!({ "version": version(base) }),
            )),
            (&Method::POST, ["auth", "tokens"]) => self.issue(log, query, &body, base).await,
            (&Method::GET, ["auth", "tokens"]) => {
                self.subject(log, SubjectAction::Show, query, headers, base)
                    .await
            }
            (&Method::HEAD, ["auth", "tokens"]) => {
                self.subject(log, SubjectAction::Check, query, headers, base)
                    .await
            }
            (&Method::DELETE, ["auth", "tokens"]) => {
                self.subject(log, SubjectAction::Revoke, query, headers, base)
                    .await
            }
            (_, [] | ["auth", "tokens"]) => Err(KeystoneError::MethodNotAllowed(method.clone())),
            _ => Err(KeystoneError::NotFound(
                "The resource could not be found.".into(),
            )),
        };
        match result {
            Ok(response) => response,
            Err(err) => {
                if let KeystoneError::Internal(detail) = &err {
                    warn!(log, "identity request failed"; "error" => detail);
                }
                let mut response = err.into_response(base);
                if method == Method::HEAD {
                    *response.body_mut() = Full::new(Bytes::new());
                }
                response
            }
        }
    }

    /// The caller of a compute request from its X-Auth-Token value (must be project-scoped).
    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some(caller) = self.cached(&token_hash(token)) {
            return Ok(caller);
        }
        let live = self.live_token(token).await?;
        let (Some(project), false) = (&live.project, live.roles.is_empty()) else {
            return Err(AuthError::Unscoped);
        };
        let caller = Caller {
            user_id: live.user.uuid.clone(),
            user_name: live.user.name.clone(),
            project_id: project.uuid.clone(),
            project_name: project.name.clone(),
            roles: live.roles.iter().map(|r| r.name().to_string()).collect(),
            expires_at: live.token.expires_at,
        };
        self.remember(live.token.token_hash.clone(), &caller);
        Ok(caller)
    }

    /// The live token (scoped or not) behind a token's text.
    async fn live_token(&self, token: &str) -> Result<LiveToken, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let hash = token_hash(token);
        let db = self.db.clone();
        let now = Utc::now().naive_utc();
        tokio::task::spawn_blocking(move || db.token_lookup(&hash, now))
            .await
            .map_err(|e| AuthError::Task(e.to_string()))??
            .ok_or(AuthError::Invalid)
    }

    async fn issue(
        &self,
        log: &Logger,
        query: Option<&str>,
        body: &[u8],
        base: &str,
    ) -> Result<Response<Full<Bytes>>, KeystoneError> {
        let request = parse_token_request(body)?;
        let user_named = request.user.to_string();
        let permit = self
            .password_checks
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| KeystoneError::Internal(e.to_string()))?;
        let db = self.db.clone();
        let ttl = self.token_ttl;
        let issued = tokio::task::spawn_blocking(move || {
            let issued = issue_blocking(&db, request, ttl);
            drop(permit);
            issued
        })
        .await
        .map_err(|e| KeystoneError::Internal(e.to_string()))?;
        let (token, live) = match issued {
            Ok(issued) => issued,
            Err(err) => {
                if let KeystoneError::Unauthorized(reason) = &err {
                    info!(log, "token refused"; "user" => &user_named, "reason" => reason);
                }
                return Err(err);
            }
        };
        let audit = audit_id(&live.token.token_hash);
        info!(log, "token issued"; "user" => &live.user.name,
            "project" => live.project.as_ref().map_or("(unscoped)", |p| p.name.as_str()),
            "audit_id" => &audit);
        let catalog = (!wants_no_catalog(query)).then(|| catalog(base, &self.config.region));
        let response = json_response(StatusCode::CREATED, &token_body(&live, catalog));
        Ok(with_subject_token(response, &token))
    }

    /// `GET`, `HEAD` or `DELETE /v3/auth/tokens`: the caller's token in X-Auth-Token acts on the
    /// one in X-Subject-Token. Only an admin may act on another user's tokens.
    async fn subject(
        &self,
        log: &Logger,
        action: SubjectAction,
        query: Option<&str>,
        headers: &HeaderMap,
        base: &str,
    ) -> Result<Response<Full<Bytes>>, KeystoneError> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let caller = self
            .live_token(header(AUTH_TOKEN_HEADER).unwrap_or_default())
            .await?;
        let subject_token = header(SUBJECT_TOKEN_HEADER).ok_or_else(|| {
            KeystoneError::BadRequest("The X-Subject-Token header is required.".into())
        })?;
        let subject = match self.live_token(subject_token).await {
            Ok(subject) => subject,
            Err(AuthError::Invalid) => {
                return Err(KeystoneError::NotFound(
                    "Could not find token: it is invalid, expired or revoked.".into(),
                ))
            }
            Err(err) => return Err(err.into()),
        };
        let is_admin = caller.roles.contains(&Role::Admin);
        if !is_admin && caller.user.uuid != subject.user.uuid {
            return Err(KeystoneError::Forbidden(format!(
                "You are not authorized to perform the requested action: {}.",
                action.policy()
            )));
        }
        match action {
            SubjectAction::Show => {
                let catalog =
                    (!wants_no_catalog(query)).then(|| catalog(base, &self.config.region));
                let response = json_response(StatusCode::OK, &token_body(&subject, catalog));
                Ok(with_subject_token(response, subject_token))
            }
            SubjectAction::Check => {
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::OK;
                Ok(with_subject_token(response, subject_token))
            }
            SubjectAction::Revoke => {
                let hash = subject.token.token_hash.clone();
                self.forget(&hash);
                let db = self.db.clone();
                tokio::task::spawn_blocking(move || db.token_revoke(&hash))
                    .await
                    .map_err(|e| KeystoneError::Internal(e.to_string()))??;
                info!(log, "token revoked"; "user" => &subject.user.name,
                    "by" => &caller.user.name, "audit_id" => audit_id(&subject.token.token_hash));
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::NO_CONTENT;
                Ok(response)
            }
        }
    }
}

/// Keystone's version document for `GET /v3`.
fn version(base: &str) -> Value {
    json!({
        "id": API_VERSION,
        "status": "stable",
        "updated": API_VERSION_UPDATED,
        "links": [{"rel": "self", "href": format!("{base}/v3/")}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}],
    })
}

/// Checks the password, settles the scope and records a new token; on a blocking thread.
fn issue_blocking(
    db: &Db,
    request: PasswordRequest,
    ttl: chrono::Duration,
) -> Result<(String, LiveToken), KeystoneError> {
    let user = match &request.user {
        Named::Id(id) => db.user_get(id)?,
        Named::Name(name) => db.user_get_by_name(name)?,
    };
    // The hash is checked even for an unknown user, so timing tells nothing either.
    let hash = user
        .as_ref()
        .map_or(DUMMY_PASSWORD_HASH, |u| u.password_hash.as_str());
    let password_ok = verify_password(&request.password.0, hash);
    let user = match user {
        Some(user) if password_ok && user.enabled => user,
        _ => return Err(KeystoneError::Unauthorized(AUTH_FAILED.into())),
    };

    let project = match &request.scope {
        ScopeRequest::Unscoped => None,
        ScopeRequest::Project(named) => {
            let project = match named {
                Named::Id(id) => db.project_get(id)?,
                Named::Name(name) => db.project_get_by_name(name)?,
            };
            let project = project.ok_or_else(|| {
                KeystoneError::Unauthorized(format!("Could not find project: {named}."))
            })?;
            if !project.enabled {
                return Err(KeystoneError::Unauthorized(format!(
                    "Project {} is disabled.",
                    project.uuid
                )));
            }
            if db.roles_of(&user.uuid, &project.uuid)?.is_empty() {
                return Err(KeystoneError::Unauthorized(format!(
                    "User {} has no access to project {}.",
                    user.uuid, project.uuid
                )));
            }
            Some(project)
        }
        // As Keystone: a default project the user cannot use gives an unscoped token.
        ScopeRequest::Default => match user.default_project_uuid.as_deref() {
            Some(uuid) => match db.project_get(uuid)? {
                Some(project)
                    if project.enabled && !db.roles_of(&user.uuid, &project.uuid)?.is_empty() =>
                {
                    Some(project)
                }
                _ => None,
            },
            None => None,
        },
    };

    let token = new_token();
    let hash = token_hash(&token);
    // Microseconds, as the body shows them, so issuing and validating print the same times.
    let issued_at = Utc::now().naive_utc().trunc_subsecs(6);
    db.token_insert(
        &hash,
        &user.uuid,
        project.as_ref().map(|p| p.uuid.as_str()),
        issued_at,
        issued_at + ttl,
    )?;
    // Read back through the one definition of a live token, so the body is what validation shows.
    let live = db
        .token_lookup(&hash, issued_at)?
        .ok_or_else(|| KeystoneError::Unauthorized(AUTH_FAILED.into()))?;
    Ok((token, live))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    const BASE: &str = "http://10.0.0.5:8774";
    const ADMIN_PASSWORD: &str = "admin-secret";

    struct Fixture {
        _dir: tempfile::TempDir,
        db: Db,
        identity: Identity,
        admin_project: db::Project,
        demo: db::Project,
        alice: db::User,
    }

    /// The bootstrap admin, project `demo` with alice (member, default project demo) and bob
    /// (member of demo, no default project), and project `empty` nobody has a role on.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Db::open(&db::test_database_url(dir.path()).expect("a test database"))
            .expect("open db");
        let boot = db
            .identity_bootstrap(&hash_password(ADMIN_PASSWORD).unwrap())
            .unwrap();
        let demo = db.project_create("demo", "").unwrap();
        db.project_create("empty", "").unwrap();
        let alice = db
            .user_create(
                "alice",
                &hash_password("alice-pw").unwrap(),
                Some(&demo.uuid),
            )
            .unwrap();
        db.role_assign(&alice.uuid, &demo.uuid, "member").unwrap();
        let bob = db
            .user_create("bob", &hash_password("bob-pw").unwrap(), None)
            .unwrap();
        db.role_assign(&bob.uuid, &demo.uuid, "member").unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let identity = Identity::new(db.clone(), IdentityConfig::default(), log);
        Fixture {
            _dir: dir,
            db,
            identity,
            admin_project: boot.project,
            demo,
            alice,
        }
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Value,
    }

    impl Answer {
        fn subject_token(&self) -> String {
            self.headers
                .get(SUBJECT_TOKEN_HEADER)
                .expect("X-Subject-Token")
                .to_str()
                .unwrap()
                .to_string()
        }

        fn error_message(&self) -> &str {
            self.body["error"]["message"].as_str().unwrap_or_default()
        }
    }

    async fn call(
        identity: &Identity,
        method: Method,
        path: &str,
        headers: &[(&'static str, &str)],
        body: &str,
    ) -> Answer {
        let (path, query) = match path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path, None),
        };
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        let response = identity
            .handle(
                &Logger::root(slog::Discard, slog::o!()),
                &method,
                &segments,
                query,
                &map,
                Bytes::from(body.to_string()),
                BASE,
            )
            .await;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    fn password_body(user: Value, password: &str, scope: Option<Value>) -> String {
        let mut user = user;
        user["password"] = json!(password);
        let mut auth = json!({"identity": {"methods": ["password"], "password": {"user": user}}});
        if let Some(scope) = scope {
            auth["scope"] = scope;
        }
        json!({ "auth": auth }).to_string()
    }

    fn by_name(name: &str) -> Value {
        json!({"name": name, "domain": {"id": "default"}})
    }

    fn project_scope(project: Value) -> Option<Value> {
        Some(json!({ "project": project }))
    }

    async fn issue(identity: &Identity, body: &str) -> Answer {
        call(identity, Method::POST, "auth/tokens", &[], body).await
    }

    /// A token for `user` with `password`, scoped as asked; panics unless it is issued.
    async fn token_for(
        identity: &Identity,
        user: &str,
        password: &str,
        scope: Option<Value>,
    ) -> String {
        let answer = issue(identity, &password_body(by_name(user), password, scope)).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.subject_token()
    }

    async fn admin_token(identity: &Identity) -> String {
        token_for(
            identity,
            "admin",
            ADMIN_PASSWORD,
            project_scope(json!({"name": "admin", "domain": {"name": "Default"}})),
        )
        .await
    }

    fn role_names(token: &Value) -> Vec<&str> {
        token["roles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn passwords_hash_to_argon2id_and_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(!hash.contains("correct horse"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horsf", &hash));
        assert!(!verify_password("correct horse", "not a phc string"));
        assert_ne!(hash, hash_password("correct horse").unwrap(), "salted");
    }

    #[test]
    fn the_dummy_hash_costs_what_a_real_one_does() {
        let dummy = PasswordHash::new(DUMMY_PASSWORD_HASH).unwrap();
        let real_text = hash_password("x").unwrap();
        let real = PasswordHash::new(&real_text).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
        assert!(!verify_password("", DUMMY_PASSWORD_HASH));
    }

    #[test]
    fn tokens_are_random_hex_and_stored_as_sha256() {
        let token = new_token();
        assert_eq!(token.len(), 64);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(token, new_token());
        // SHA-256 of "abc", from FIPS 180-2.
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(audit_id(&token_hash("abc")).len(), 22);
        assert_ne!(audit_id("a"), audit_id("b"));
    }

    #[test]
    fn role_ids_are_stable_keystone_ids() {
        let ids: Vec<String> = Role::ALL.into_iter().map(role_id).collect();
        assert!(ids.iter().all(|id| id.len() == 32));
        assert_eq!(ids, Role::ALL.into_iter().map(role_id).collect::<Vec<_>>());
        assert!(ids[0] != ids[1] && ids[1] != ids[2]);
    }

    #[test]
    fn the_token_lifetime_must_be_positive() {
        assert_eq!(
            IdentityConfig::default().token_ttl(),
            Ok(chrono::Duration::hours(12))
        );
        for hours in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            let config = IdentityConfig {
                token_ttl_hours: hours,
                ..Default::default()
            };
            assert!(config.token_ttl().is_err(), "{hours}");
        }
    }

    #[test]
    fn token_requests_parse_into_user_and_scope() {
        let password = |p: &str| Password(p.to_string());
        let cases = [
            (
                password_body(by_name("alice"), "pw", None),
                Named::Name("alice".into()),
                ScopeRequest::Default,
            ),
            (
                password_body(json!({"id": "abc"}), "pw", Some(json!("unscoped"))),
                Named::Id("abc".into()),
                ScopeRequest::Unscoped,
            ),
            (
                password_body(
                    json!({"name": "alice", "domain": {"name": "Default"}}),
                    "pw",
                    project_scope(json!({"id": "p1"})),
                ),
                Named::Name("alice".into()),
                ScopeRequest::Project(Named::Id("p1".into())),
            ),
            (
                password_body(
                    by_name("alice"),
                    "pw",
                    project_scope(json!({"name": "demo", "domain": {"id": "default"}})),
                ),
                Named::Name("alice".into()),
                ScopeRequest::Project(Named::Name("demo".into())),
            ),
        ];
        for (body, user, scope) in cases {
            assert_eq!(
                parse_token_request(body.as_bytes()),
                Ok(PasswordRequest {
                    user,
                    password: password("pw"),
                    scope
                }),
                "{body}"
            );
        }
    }

    #[test]
    fn malformed_token_requests_are_refused_with_a_reason() {
        let malformed = [
            "",
            "{",
            "[]",
            r#"{"auth": 1}"#,
            r#"{"auth": {}}"#,
            r#"{"auth": {"identity": {"methods": []}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"]}}}"#,
            r#"{"auth": {"identity": {"methods": [1], "password": {}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"password": "x"}}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "a", "password": "x"}}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "", "domain": {"id": "default"}, "password": "x"}}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "a"}}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "a", "password": 5}}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "a", "domain": {}, "password": "x"}}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "a", "password": "x"}}}, "scope": 3}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "a", "password": "x"}}}, "scope": {}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "a", "password": "x"}}}, "scope": {"project": {"name": "p"}}}}"#,
        ];
        for body in malformed {
            let err = parse_token_request(body.as_bytes()).unwrap_err();
            assert!(matches!(err, RequestError::Malformed(_)), "{body}: {err}");
        }
        let refused = [
            r#"{"auth": {"identity": {"methods": ["token"], "token": {"id": "x"}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "a", "domain": {"id": "other"}, "password": "x"}}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "a", "password": "x"}}}, "scope": {"domain": {"id": "default"}}}}"#,
            r#"{"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "a", "password": "x"}}}, "scope": {"project": {"name": "p", "domain": {"name": "Other"}}}}}"#,
        ];
        for body in refused {
            let err = parse_token_request(body.as_bytes()).unwrap_err();
            assert!(matches!(err, RequestError::Refused(_)), "{body}: {err}");
        }
    }

    #[test]
    fn a_parsed_request_does_not_print_the_password() {
        let body = password_body(by_name("alice"), "hunter2", None);
        let request = parse_token_request(body.as_bytes()).unwrap();
        assert!(!format!("{request:?}").contains("hunter2"));
    }

    #[test]
    fn nocatalog_is_recognised_in_the_query() {
        for (query, expected) in [
            (None, false),
            (Some(""), false),
            (Some("nocatalog"), true),
            (Some("a=1&nocatalog=1"), true),
            (Some("nocatalogue"), false),
        ] {
            assert_eq!(wants_no_catalog(query), expected, "{query:?}");
        }
    }

    #[tokio::test]
    async fn the_version_document_points_at_base() {
        let f = fixture();
        let answer = call(&f.identity, Method::GET, "", &[], "").await;
        assert_eq!(answer.status, StatusCode::OK);
        let version = &answer.body["version"];
        assert_eq!(version["id"], "v3.14");
        assert_eq!(version["status"], "stable");
        assert_eq!(version["links"][0]["href"], format!("{BASE}/v3/"));
        assert_eq!(
            version["media-types"][0]["type"],
            "application/vnd.openstack.identity-v3+json"
        );
    }

    #[tokio::test]
    async fn a_token_scoped_by_project_name_carries_roles_and_catalog() {
        let f = fixture();
        let body = password_body(
            by_name("alice"),
            "alice-pw",
            project_scope(json!({"name": "demo", "domain": {"id": "default"}})),
        );
        let answer = issue(&f.identity, &body).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        let token_text = answer.subject_token();
        assert_eq!(token_text.len(), 64);
        let token = &answer.body["token"];
        assert_eq!(token["methods"], json!(["password"]));
        assert_eq!(token["user"]["id"], f.alice.uuid.as_str());
        assert_eq!(token["user"]["name"], "alice");
        assert_eq!(
            token["user"]["domain"],
            json!({"id": "default", "name": "Default"})
        );
        assert_eq!(token["user"]["password_expires_at"], Value::Null);
        assert_eq!(token["project"]["id"], f.demo.uuid.as_str());
        assert_eq!(token["project"]["name"], "demo");
        assert_eq!(token["is_domain"], false);
        assert_eq!(role_names(token), ["member", "reader"]);
        assert_eq!(token["roles"][0]["id"], role_id(Role::Member).as_str());
        assert_eq!(token["audit_ids"].as_array().unwrap().len(), 1);

        let issued =
            NaiveDateTime::parse_from_str(token["issued_at"].as_str().unwrap(), TIME_FORMAT)
                .unwrap();
        let expires =
            NaiveDateTime::parse_from_str(token["expires_at"].as_str().unwrap(), TIME_FORMAT)
                .unwrap();
        assert_eq!(expires - issued, chrono::Duration::hours(12));
        assert!(token["issued_at"].as_str().unwrap().ends_with('Z'));

        // The body never carries the token or the password.
        let text = answer.body.to_string();
        assert!(!text.contains(&token_text) && !text.contains("alice-pw"));

        let caller = f.identity.authenticate(&token_text).await.unwrap();
        assert_eq!(
            caller,
            Caller {
                user_id: f.alice.uuid.clone(),
                user_name: "alice".into(),
                project_id: f.demo.uuid.clone(),
                project_name: "demo".into(),
                roles: vec!["member".into(), "reader".into()],
                expires_at: expires,
            }
        );
    }

    #[tokio::test]
    async fn the_catalog_points_at_base() {
        let f = fixture();
        let token = admin_token(&f.identity).await;
        let answer = call(
            &f.identity,
            Method::GET,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &token), (SUBJECT_TOKEN_HEADER, &token)],
            "",
        )
        .await;
        let catalog = answer.body["token"]["catalog"].as_array().unwrap().clone();
        let services: Vec<(&str, &str)> = catalog
            .iter()
            .map(|s| (s["type"].as_str().unwrap(), s["name"].as_str().unwrap()))
            .collect();
        assert_eq!(
            services,
            [
                ("compute", "nova"),
                ("image", "glance"),
                ("identity", "keystone")
            ]
        );
        for (service, path) in catalog.iter().zip(["/v2.1", "/image", "/v3"]) {
            let endpoints = service["endpoints"].as_array().unwrap();
            let interfaces: Vec<&str> = endpoints
                .iter()
                .map(|e| e["interface"].as_str().unwrap())
                .collect();
            assert_eq!(interfaces, ["public", "internal", "admin"]);
            for endpoint in endpoints {
                assert_eq!(endpoint["url"], format!("{BASE}{path}"));
                assert_eq!(endpoint["region"], "RegionOne");
                assert_eq!(endpoint["region_id"], "RegionOne");
                assert_eq!(endpoint["id"].as_str().unwrap().len(), 32);
            }
        }

        let answer = issue(
            &f.identity,
            &password_body(by_name("alice"), "alice-pw", None),
        )
        .await;
        assert_eq!(
            answer.body["token"]["catalog"],
            json!(catalog),
            "same ids for everyone"
        );
        let answer = call(
            &f.identity,
            Method::POST,
            "auth/tokens?nocatalog",
            &[],
            &password_body(by_name("alice"), "alice-pw", None),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.body["token"].get("catalog").is_none());
        assert!(answer.body["token"].get("project").is_some());
    }

    #[tokio::test]
    async fn users_and_projects_can_be_named_by_id() {
        let f = fixture();
        let body = password_body(
            json!({"id": f.alice.uuid}),
            "alice-pw",
            project_scope(json!({"id": f.demo.uuid})),
        );
        let answer = issue(&f.identity, &body).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        assert_eq!(answer.body["token"]["user"]["name"], "alice");
        assert_eq!(answer.body["token"]["project"]["name"], "demo");
    }

    #[tokio::test]
    async fn without_a_scope_the_default_project_is_used() {
        let f = fixture();
        let answer = issue(
            &f.identity,
            &password_body(by_name("alice"), "alice-pw", None),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(answer.body["token"]["project"]["id"], f.demo.uuid.as_str());
        let caller = f
            .identity
            .authenticate(&answer.subject_token())
            .await
            .unwrap();
        assert_eq!(caller.project_name, "demo");
    }

    #[tokio::test]
    async fn without_a_default_project_the_token_is_unscoped() {
        let f = fixture();
        let answer = issue(&f.identity, &password_body(by_name("bob"), "bob-pw", None)).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        let token = &answer.body["token"];
        for absent in ["project", "roles", "catalog", "is_domain"] {
            assert!(token.get(absent).is_none(), "{absent} in {token}");
        }
        assert_eq!(token["user"]["name"], "bob");
        let err = f
            .identity
            .authenticate(&answer.subject_token())
            .await
            .unwrap_err();
        assert!(matches!(err, AuthError::Unscoped), "{err}");
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);

        // Asked for explicitly, even a user with a default project gets one.
        let answer = issue(
            &f.identity,
            &password_body(by_name("alice"), "alice-pw", Some(json!("unscoped"))),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.body["token"].get("project").is_none());
    }

    #[tokio::test]
    async fn a_default_project_without_a_role_gives_an_unscoped_token() {
        let f = fixture();
        f.db.role_unassign(&f.alice.uuid, &f.demo.uuid, "member")
            .unwrap();
        let answer = issue(
            &f.identity,
            &password_body(by_name("alice"), "alice-pw", None),
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.body["token"].get("project").is_none());
    }

    #[tokio::test]
    async fn a_wrong_password_and_an_unknown_user_look_the_same() {
        let f = fixture();
        let wrong = issue(
            &f.identity,
            &password_body(by_name("alice"), "alice-PW", None),
        )
        .await;
        let unknown = issue(
            &f.identity,
            &password_body(by_name("mallory"), "alice-pw", None),
        )
        .await;
        let unknown_id = issue(
            &f.identity,
            &password_body(json!({"id": "0123456789abcdef0123456789abcdef"}), "x", None),
        )
        .await;
        for answer in [&wrong, &unknown, &unknown_id] {
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
            assert_eq!(answer.body, wrong.body);
            assert!(answer.headers.get(SUBJECT_TOKEN_HEADER).is_none());
            assert!(answer
                .headers
                .get(hyper::header::WWW_AUTHENTICATE)
                .is_some());
        }
        assert_eq!(
            wrong.body,
            json!({"error": {"code": 401, "title": "Unauthorized", "message": AUTH_FAILED}})
        );
    }

    #[tokio::test]
    async fn an_unknown_domain_is_unauthorized() {
        let f = fixture();
        let body = password_body(
            json!({"name": "alice", "domain": {"id": "elsewhere"}}),
            "alice-pw",
            None,
        );
        assert_eq!(
            issue(&f.identity, &body).await.status,
            StatusCode::UNAUTHORIZED
        );
    }

    #[tokio::test]
    async fn a_project_without_a_role_is_unauthorized() {
        let f = fixture();
        for scope in [
            json!({"name": "empty", "domain": {"id": "default"}}),
            json!({"id": f.admin_project.uuid}),
            json!({"name": "nonexistent", "domain": {"id": "default"}}),
        ] {
            let answer = issue(
                &f.identity,
                &password_body(by_name("alice"), "alice-pw", project_scope(scope.clone())),
            )
            .await;
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{scope}");
            assert_eq!(answer.body["error"]["title"], "Unauthorized");
        }
    }

    #[tokio::test]
    async fn a_malformed_body_is_a_bad_request() {
        let f = fixture();
        for body in ["not json", "{}", r#"{"auth": {"identity": {}}}"#] {
            let answer = issue(&f.identity, body).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(answer.body["error"]["code"], 400);
            assert_eq!(answer.body["error"]["title"], "Bad Request");
            assert!(!answer.error_message().is_empty());
        }
    }

    #[tokio::test]
    async fn a_user_validates_its_own_token() {
        let f = fixture();
        let first = token_for(&f.identity, "alice", "alice-pw", None).await;
        let second = token_for(&f.identity, "alice", "alice-pw", None).await;
        for subject in [&first, &second] {
            let answer = call(
                &f.identity,
                Method::GET,
                "auth/tokens",
                &[(AUTH_TOKEN_HEADER, &first), (SUBJECT_TOKEN_HEADER, subject)],
                "",
            )
            .await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
            assert_eq!(answer.subject_token(), *subject);
            assert_eq!(answer.body["token"]["user"]["name"], "alice");
            assert_eq!(role_names(&answer.body["token"]), ["member", "reader"]);
        }
        let answer = call(
            &f.identity,
            Method::HEAD,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &first), (SUBJECT_TOKEN_HEADER, &first)],
            "",
        )
        .await;
        assert_eq!((answer.status, answer.body), (StatusCode::OK, Value::Null));
    }

    #[tokio::test]
    async fn validation_shows_what_issuing_showed() {
        let f = fixture();
        let issued = issue(
            &f.identity,
            &password_body(by_name("alice"), "alice-pw", None),
        )
        .await;
        let token = issued.subject_token();
        let shown = call(
            &f.identity,
            Method::GET,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &token), (SUBJECT_TOKEN_HEADER, &token)],
            "",
        )
        .await;
        assert_eq!(shown.body, issued.body);
    }

    #[tokio::test]
    async fn only_an_admin_validates_another_users_token() {
        let f = fixture();
        let alice = token_for(&f.identity, "alice", "alice-pw", None).await;
        let bob = token_for(&f.identity, "bob", "bob-pw", None).await;
        let admin = admin_token(&f.identity).await;
        for method in [Method::GET, Method::HEAD, Method::DELETE] {
            let answer = call(
                &f.identity,
                method.clone(),
                "auth/tokens",
                &[(AUTH_TOKEN_HEADER, &bob), (SUBJECT_TOKEN_HEADER, &alice)],
                "",
            )
            .await;
            assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method}");
        }
        let answer = call(
            &f.identity,
            Method::GET,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &admin), (SUBJECT_TOKEN_HEADER, &alice)],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body["token"]["user"]["name"], "alice");
        assert!(f.identity.authenticate(&alice).await.is_ok(), "still live");
    }

    #[tokio::test]
    async fn validation_needs_a_valid_caller_and_names_a_missing_subject_404() {
        let f = fixture();
        let alice = token_for(&f.identity, "alice", "alice-pw", None).await;
        let answer = call(
            &f.identity,
            Method::GET,
            "auth/tokens",
            &[(SUBJECT_TOKEN_HEADER, &alice)],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        let answer = call(
            &f.identity,
            Method::GET,
            "auth/tokens",
            &[
                (AUTH_TOKEN_HEADER, "forged"),
                (SUBJECT_TOKEN_HEADER, &alice),
            ],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        for method in [Method::GET, Method::HEAD, Method::DELETE] {
            let answer = call(
                &f.identity,
                method.clone(),
                "auth/tokens",
                &[
                    (AUTH_TOKEN_HEADER, &alice),
                    (SUBJECT_TOKEN_HEADER, "forged"),
                ],
                "",
            )
            .await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method}");
        }
        let answer = call(
            &f.identity,
            Method::GET,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &alice)],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_revoked_token_no_longer_authenticates() {
        let f = fixture();
        let alice = token_for(&f.identity, "alice", "alice-pw", None).await;
        let spare = token_for(&f.identity, "alice", "alice-pw", None).await;
        assert!(f.identity.authenticate(&alice).await.is_ok());
        let answer = call(
            &f.identity,
            Method::DELETE,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &spare), (SUBJECT_TOKEN_HEADER, &alice)],
            "",
        )
        .await;
        assert_eq!(
            (answer.status, answer.body),
            (StatusCode::NO_CONTENT, Value::Null)
        );
        let err = f.identity.authenticate(&alice).await.unwrap_err();
        assert!(matches!(err, AuthError::Invalid), "{err}");
        let answer = call(
            &f.identity,
            Method::GET,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &spare), (SUBJECT_TOKEN_HEADER, &alice)],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert!(f.identity.authenticate(&spare).await.is_ok());

        // An admin revokes anyone's.
        let admin = admin_token(&f.identity).await;
        let answer = call(
            &f.identity,
            Method::DELETE,
            "auth/tokens",
            &[(AUTH_TOKEN_HEADER, &admin), (SUBJECT_TOKEN_HEADER, &spare)],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::NO_CONTENT);
        assert!(f.identity.authenticate(&spare).await.is_err());
    }

    #[tokio::test]
    async fn checked_tokens_are_cached_for_cache_seconds_only() {
        let f = fixture();
        let token = admin_token(&f.identity).await;
        assert!(f.identity.authenticate(&token).await.is_ok());
        // Revoked behind this process's back: the cache still trusts it ...
        f.db.token_revoke(&token_hash(&token)).unwrap();
        assert!(f.identity.authenticate(&token).await.is_ok());
        // ... while an identity without a cache asks the database every time.
        let uncached = Identity::new(
            f.db.clone(),
            IdentityConfig {
                cache_seconds: 0.0,
                ..Default::default()
            },
            Logger::root(slog::Discard, slog::o!()),
        );
        assert!(matches!(
            uncached.authenticate(&token).await,
            Err(AuthError::Invalid)
        ));
    }

    #[tokio::test]
    async fn an_expired_token_does_not_authenticate() {
        let f = fixture();
        let issued = Utc::now().naive_utc() - chrono::Duration::hours(13);
        let token = new_token();
        f.db.token_insert(
            &token_hash(&token),
            &f.alice.uuid,
            Some(&f.demo.uuid),
            issued,
            issued + chrono::Duration::hours(12),
        )
        .unwrap();
        let err = f.identity.authenticate(&token).await.unwrap_err();
        assert!(matches!(err, AuthError::Invalid), "{err}");

        // The same row, still in date, does.
        let live = new_token();
        let now = Utc::now().naive_utc();
        f.db.token_insert(
            &token_hash(&live),
            &f.alice.uuid,
            Some(&f.demo.uuid),
            now,
            now + chrono::Duration::hours(1),
        )
        .unwrap();
        assert!(f.identity.authenticate(&live).await.is_ok());
    }

    #[tokio::test]
    async fn authenticate_refuses_missing_and_unknown_tokens() {
        let f = fixture();
        let err = f.identity.authenticate("").await.unwrap_err();
        assert!(matches!(err, AuthError::Missing), "{err}");
        let err = f.identity.authenticate(&new_token()).await.unwrap_err();
        assert!(matches!(err, AuthError::Invalid), "{err}");
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn the_admin_gets_the_implied_roles() {
        let f = fixture();
        let admin = admin_token(&f.identity).await;
        let caller = f.identity.authenticate(&admin).await.unwrap();
        assert_eq!(caller.roles, ["admin", "member", "reader"]);
        assert_eq!(caller.project_id, f.admin_project.uuid);
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_wrong_methods_405() {
        let f = fixture();
        for path in ["projects", "auth", "auth/tokens/extra", "users/x"] {
            let answer = call(&f.identity, Method::GET, path, &[], "").await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(answer.body["error"]["code"], 404);
            assert_eq!(answer.body["error"]["title"], "Not Found");
        }
        for method in [Method::PUT, Method::PATCH] {
            let answer = call(&f.identity, method.clone(), "auth/tokens", &[], "").await;
            assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
            assert_eq!(answer.body["error"]["title"], "Method Not Allowed");
        }
    }

    #[tokio::test]
    async fn a_bad_ttl_falls_back_to_twelve_hours() {
        let f = fixture();
        let config = IdentityConfig {
            token_ttl_hours: -3.0,
            region: "Elsewhere".into(),
            ..Default::default()
        };
        let log = Logger::root(slog::Discard, slog::o!());
        let identity = Identity::new(f.db.clone(), config, log);
        let answer = issue(
            &identity,
            &password_body(by_name("alice"), "alice-pw", None),
        )
        .await;
        let token = &answer.body["token"];
        let at = |key: &str| {
            NaiveDateTime::parse_from_str(token[key].as_str().unwrap(), TIME_FORMAT).unwrap()
        };
        assert_eq!(
            at("expires_at") - at("issued_at"),
            chrono::Duration::hours(12)
        );
        assert_eq!(token["catalog"][0]["endpoints"][0]["region"], "Elsewhere");
    }
}
