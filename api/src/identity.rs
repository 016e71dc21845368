//! TEMPORARY stand-in with the identity module's interface; replaced by the real module on merge.
use http_body_util::Full;
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityConfig {
    pub token_ttl_hours: f64,
    pub region: String,
}
impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            token_ttl_hours: 12.0,
            region: "RegionOne".into(),
        }
    }
}
pub struct Identity {}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub user_name: String,
    pub project_id: String,
    pub project_name: String,
    pub roles: Vec<String>,
    pub expires_at: chrono::NaiveDateTime,
}
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("The request you have made requires authentication.")]
    Invalid,
}
impl AuthError {
    pub fn status(&self) -> hyper::StatusCode {
        hyper::StatusCode::UNAUTHORIZED
    }
}
impl Identity {
    pub fn new(_db: db::Db, _config: IdentityConfig, _log: slog::Logger) -> Self {
        Identity {}
    }
    pub async fn handle(
        &self,
        _method: &hyper::Method,
        _segments: &[&str],
        _query: Option<&str>,
        _headers: &hyper::HeaderMap,
        _body: Bytes,
        _base: &str,
    ) -> hyper::Response<Full<Bytes>> {
        hyper::Response::new(Full::new(Bytes::new()))
    }
    pub async fn authenticate(&self, _token: &str) -> Result<Caller, AuthError> {
        Ok(Caller {
            user_id: "admin".into(),
            user_name: "admin".into(),
            project_id: "default".into(),
            project_name: "default".into(),
            roles: vec!["admin".into(), "member".into(), "reader".into()],
            expires_at: chrono::Utc::now().naive_utc(),
        })
    }
}
