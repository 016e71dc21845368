//! `os-keypairs`: a user's named SSH public keys. Without a public key in the request, one is
//! generated (Ed25519) and its private half returned once, as Nova does before 2.92.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use md5::{Digest, Md5};
use serde_json::{json, Value};

use db::{KeyPair, NewKeyPair};

use crate::servers::body_object;
use crate::{empty_response, json_response, policy, Api, ApiError, Call};

/// Nova's fingerprint: MD5 of the key blob, as colon-separated hex pairs.
pub(crate) fn fingerprint(key: &ssh_key::PublicKey) -> Result<String, ApiError> {
    let blob = key
        .to_bytes()
        .map_err(|e| ApiError::Internal(format!("cannot encode the key: {e}")))?;
    let digest = Md5::digest(&blob);
    Ok(digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

fn invalid_key() -> ApiError {
    ApiError::BadRequest("Keypair data is invalid: failed to generate fingerprint".into())
}

/// A key pair name: 1–255 letters, digits, spaces, `-` and `_` (Nova's rule before 2.92).
fn check_name(name: &Value) -> Result<String, ApiError> {
    match name {
        Value::String(n)
            if !n.is_empty()
                && n.chars().count() <= 255
                && n.trim() == n
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || " -_".contains(c)) =>
        {
            Ok(n.clone())
        }
        _ => Err(ApiError::BadRequest(
            "Keypair data is invalid: Keypair name contains unsafe characters".into(),
        )),
    }
}

impl Api {
    fn keypair_view(&self, call: &Call, key: &KeyPair, detail: bool) -> Value {
        let mut shown = json!({
            "name": key.name,
            "public_key": key.public_key,
            "fingerprint": key.fingerprint,
        });
        if call.version.at_least(2) {
            shown["type"] = json!(key.key_type);
        }
        if detail {
            shown["user_id"] = json!(key.user_id);
            shown["id"] = json!(key.id);
            shown["created_at"] = json!(crate::views::iso_time(key.created_at));
            shown["deleted"] = json!(false);
            shown["deleted_at"] = Value::Null;
            shown["updated_at"] = Value::Null;
        }
        shown
    }

    /// Whose key pairs a request means: the caller's, or (2.10, admins) `user_id`'s.
    fn keypair_owner(&self, call: &Call) -> Result<String, ApiError> {
        match call.param("user_id") {
            Some(user) if call.version.at_least(10) && user != call.context.user_id => {
                policy::admin(call, "os_compute_api:os-keypairs:index")?;
                Ok(user.to_string())
            }
            _ => Ok(call.context.user_id.clone()),
        }
    }

    pub(crate) async fn list_keypairs(
        &self,
        call: &Call,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:os-keypairs:index")?;
        let owner = self.keypair_owner(call)?;
        let keys = self.db(move |db| db.key_pairs(&owner)).await?;
        let (keys, more) = if call.version.at_least(35) {
            let page = crate::servers::page(call, self.config.max_limit)?;
            crate::servers::paginate(keys, &page, |k| k.name.clone())?
        } else {
            (keys, false)
        };
        let shown: Vec<Value> = keys
            .iter()
            .map(|k| json!({"keypair": self.keypair_view(call, k, false)}))
            .collect();
        let mut body = json!({"keypairs": shown});
        if more {
            if let Some(last) = keys.last() {
                body["keypairs_links"] = crate::servers::next_link(call, "os-keypairs", &last.name);
            }
        }
        Ok(json_response(StatusCode::OK, &body))
    }

    pub(crate) async fn show_keypair(
        &self,
        call: &Call,
        name: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:os-keypairs:show")?;
        let owner = self.keypair_owner(call)?;
        let lookup = name.to_string();
        let key = self
            .db(move |db| db.key_pair_get(&owner, &lookup))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("Keypair {name} not found.")))?;
        Ok(json_response(
            StatusCode::OK,
            &json!({"keypair": self.keypair_view(call, &key, true)}),
        ))
    }

    pub(crate) async fn create_keypair(
        &self,
        call: &Call,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::member(call, "os_compute_api:os-keypairs:create")?;
        let top = body_object(body)?;
        let Some(Value::Object(request)) = top.get("keypair") else {
            return Err(ApiError::BadRequest(
                "'keypair' is a required property".into(),
            ));
        };
        let mut allowed = vec!["name", "public_key"];
        if call.version.at_least(2) {
            allowed.push("type");
        }
        if call.version.at_least(10) {
            allowed.push("user_id");
        }
        if let Some(extra) = request.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::BadRequest(format!(
                "Additional properties are not allowed ('{extra}' was unexpected)"
            )));
        }
        let name = check_name(request.get("name").unwrap_or(&Value::Null))?;
        let key_type = match request.get("type") {
            None => "ssh".to_string(),
            Some(Value::String(t)) if t == "ssh" => t.clone(),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "Invalid input for field/attribute type. Value must be 'ssh' (Zova keeps no x509 keys).".into(),
                ))
            }
        };
        let user_id = match request.get("user_id") {
            None => call.context.user_id.clone(),
            Some(Value::String(user)) if *user == call.context.user_id => user.clone(),
            Some(Value::String(user)) => {
                policy::admin(call, "os_compute_api:os-keypairs:create")?;
                user.clone()
            }
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "Invalid input for field/attribute user_id.".into(),
                ))
            }
        };
        let (public, private) = match request.get("public_key") {
            Some(Value::String(text)) => {
                let key =
                    ssh_key::PublicKey::from_openssh(text.trim()).map_err(|_| invalid_key())?;
                (key, None)
            }
            Some(_) => return Err(invalid_key()),
            None => {
                let private = ssh_key::PrivateKey::random(
                    &mut rand::rngs::OsRng,
                    ssh_key::Algorithm::Ed25519,
                )
                .map_err(|e| ApiError::Internal(format!("cannot generate a key: {e}")))?;
                let pem = private
                    .to_openssh(ssh_key::LineEnding::LF)
                    .map_err(|e| ApiError::Internal(format!("cannot encode a key: {e}")))?;
                (private.public_key().clone(), Some(pem.to_string()))
            }
        };
        let new = NewKeyPair {
            name,
            user_id,
            fingerprint: fingerprint(&public)?,
            public_key: public
                .to_openssh()
                .map_err(|e| ApiError::Internal(format!("cannot encode the key: {e}")))?,
            key_type,
        };
        let limit = self.quota.key_pairs;
        let key = self.db(move |db| db.key_pair_create(&new, limit)).await?;
        let mut shown = self.keypair_view(call, &key, false);
        shown["user_id"] = json!(key.user_id);
        if let Some(private) = private {
            shown["private_key"] = json!(private);
        }
        let status = if call.version.at_least(2) {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok(json_response(status, &json!({"keypair": shown})))
    }

    pub(crate) async fn delete_keypair(
        &self,
        call: &Call,
        name: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::member(call, "os_compute_api:os-keypairs:delete")?;
        let owner = self.keypair_owner(call)?;
        let lookup = name.to_string();
        match self.db(move |db| db.key_pair_delete(&owner, &lookup)).await {
            Ok(()) => {}
            Err(ApiError::NotFound(_)) => {
                return Err(ApiError::NotFound(format!("Keypair {name} not found.")))
            }
            Err(e) => return Err(e),
        }
        Ok(empty_response(if call.version.at_least(2) {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::ACCEPTED
        }))
    }
}
