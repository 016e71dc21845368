//! Flavors: list and show for everyone; create, delete and extra specs for admins.

use std::collections::BTreeMap;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};

use db::{Flavor, NewFlavor};

use crate::servers::{body_object, next_link, page, paginate};
use crate::{empty_response, policy, views, Api, ApiError, Call};

fn flavor_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Flavor {id} could not be found."))
}

fn invalid(field: &str, why: &str) -> ApiError {
    ApiError::BadRequest(format!("Invalid input for field/attribute {field}. {why}"))
}

/// An integer field within `range`; Nova also takes digit strings.
fn integer(
    flavor: &Map<String, Value>,
    field: &str,
    range: std::ops::RangeInclusive<i64>,
    default: Option<i64>,
) -> Result<i64, ApiError> {
    let value = match flavor.get(field) {
        None | Some(Value::Null) => {
            return default
                .ok_or_else(|| ApiError::BadRequest(format!("'{field}' is a required property")))
        }
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) if field == "swap" && s.is_empty() => Some(0),
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(_) => None,
    };
    match value {
        Some(n) if range.contains(&n) => Ok(n),
        _ => Err(invalid(
            field,
            &format!(
                "Value must be an integer from {} to {}.",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Parses `POST /flavors`.
pub(crate) fn parse_create_flavor(body: &[u8]) -> Result<NewFlavor, ApiError> {
    let top = body_object(body)?;
    if let Some(extra) = top.keys().find(|k| *k != "flavor") {
        return Err(ApiError::BadRequest(format!(
            "Additional properties are not allowed ('{extra}' was unexpected)"
        )));
    }
    let Some(Value::Object(flavor)) = top.get("flavor") else {
        return Err(ApiError::BadRequest(
            "'flavor' is a required property".into(),
        ));
    };
    const FIELDS: &[&str] = &[
        "name",
        "id",
        "ram",
        "vcpus",
        "disk",
        "swap",
        "OS-FLV-EXT-DATA:ephemeral",
        "rxtx_factor",
        "os-flavor-access:is_public",
    ];
    if let Some(extra) = flavor.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "Additional properties are not allowed ('{extra}' was unexpected)"
        )));
    }
    let name = match flavor.get("name") {
        Some(Value::String(n))
            if !n.trim().is_empty() && n.trim() == n && n.chars().count() <= 255 =>
        {
            n.clone()
        }
        Some(_) => {
            return Err(invalid(
                "name",
                "Value must be 1 to 255 characters, without leading or trailing white space.",
            ))
        }
        None => return Err(ApiError::BadRequest("'name' is a required property".into())),
    };
    let flavorid = match flavor.get("id") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(id))
            if !id.is_empty()
                && id.len() <= 255
                && id.trim() == id
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c)) =>
        {
            id.clone()
        }
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(_) => {
            return Err(invalid(
                "id",
                "Value must be 1 to 255 letters, digits, '-', '_', '.' or ' '.",
            ))
        }
    };
    let is_public = match flavor.get("os-flavor-access:is_public") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(invalid(
                "os-flavor-access:is_public",
                "Value must be a boolean.",
            ))
        }
    };
    if let Some(factor) = flavor.get("rxtx_factor") {
        if !factor.as_f64().is_some_and(|f| f > 0.0) {
            return Err(invalid("rxtx_factor", "Value must be a positive number."));
        }
    }
    const MAX: i64 = i32::MAX as i64;
    Ok(NewFlavor {
        flavorid,
        name,
        memory_mb: integer(flavor, "ram", 1..=MAX, None)?,
        vcpus: integer(flavor, "vcpus", 1..=MAX, None)?,
        root_gb: integer(flavor, "disk", 0..=MAX, None)?,
        swap_mb: integer(flavor, "swap", 0..=MAX, Some(0))?,
        ephemeral_gb: integer(flavor, "OS-FLV-EXT-DATA:ephemeral", 0..=MAX, Some(0))?,
        is_public,
    })
}

/// Extra specs: keys of 1–255 characters (letters, digits, `-_:. `), string values of at most
/// 255.
fn parse_specs(value: Option<&Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(Value::Object(specs)) = value else {
        return Err(ApiError::BadRequest(
            "'extra_specs' is a required property and must be an object".into(),
        ));
    };
    let mut out = BTreeMap::new();
    for (key, value) in specs {
        if key.is_empty()
            || key.len() > 255
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_:. ".contains(c))
        {
            return Err(invalid(
                "extra_specs",
                &format!("The key {key:?} is not a valid extra spec key."),
            ));
        }
        let value = match value {
            Value::String(s) if s.chars().count() <= 255 => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(invalid(
                    "extra_specs",
                    &format!("The value of {key:?} must be a string of at most 255 characters."),
                ))
            }
        };
        out.insert(key.clone(), value);
    }
    Ok(out)
}

impl Api {
    /// A flavor the caller may use: private flavors are for admins (Zova keeps no access
    /// lists).
    async fn visible_flavor(&self, call: &Call, id: &str) -> Result<Flavor, ApiError> {
        let lookup = id.to_string();
        self.db(move |db| db.flavor_get(&lookup))
            .await?
            .filter(|f| f.is_public || call.is_admin())
            .ok_or_else(|| flavor_not_found(id))
    }

    pub(crate) async fn list_flavors(
        &self,
        call: &Call,
        detail: bool,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:flavors:index")?;
        let page = page(call, self.config.max_limit)?;
        let min = |key: &str| -> Result<i64, ApiError> {
            match call.param(key) {
                None => Ok(0),
                Some(v) => v
                    .parse()
                    .map_err(|_| ApiError::BadRequest(format!("Invalid {key} filter [{v}]"))),
            }
        };
        let (min_ram, min_disk) = (min("minRam")?, min("minDisk")?);
        // Nova's is_public: public flavors by default; admins may ask for private ones
        // ("false") or all ("none", which the clients send as the literal None).
        let wanted: Option<bool> = match call.param("is_public").map(str::to_ascii_lowercase) {
            Some(v) if call.is_admin() && v == "none" => None,
            Some(v)
                if call.is_admin() && matches!(v.as_str(), "false" | "f" | "0" | "no" | "off") =>
            {
                Some(false)
            }
            _ => Some(true),
        };
        let flavors: Vec<Flavor> = self
            .db(|db| db.flavors())
            .await?
            .into_iter()
            .filter(|f| f.memory_mb >= min_ram && f.root_gb >= min_disk)
            .filter(|f| wanted.is_none_or(|public| f.is_public == public))
            .collect();
        let (flavors, more) = paginate(flavors, &page, |f| f.flavorid.clone())?;
        let shown: Vec<Value> = flavors
            .iter()
            .map(|f| {
                if detail {
                    views::flavor(&call.base, f)
                } else {
                    views::flavor_summary(&call.base, f)
                }
            })
            .collect();
        let mut body = json!({"flavors": shown});
        if more {
            if let Some(last) = flavors.last() {
                let path = if detail { "flavors/detail" } else { "flavors" };
                body["flavors_links"] = next_link(call, path, &last.flavorid);
            }
        }
        Ok(crate::json_response(StatusCode::OK, &body))
    }

    pub(crate) async fn show_flavor(
        &self,
        call: &Call,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:flavors:show")?;
        let flavor = self.visible_flavor(call, id).await?;
        Ok(crate::json_response(
            StatusCode::OK,
            &json!({"flavor": views::flavor(&call.base, &flavor)}),
        ))
    }

    pub(crate) async fn create_flavor(
        &self,
        call: &Call,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-flavor-manage:create")?;
        let new = parse_create_flavor(body)?;
        let flavor = self.db(move |db| db.flavor_create(&new)).await?;
        Ok(crate::json_response(
            StatusCode::OK,
            &json!({"flavor": views::flavor(&call.base, &flavor)}),
        ))
    }

    pub(crate) async fn delete_flavor(
        &self,
        call: &Call,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-flavor-manage:delete")?;
        let lookup = id.to_string();
        match self.db(move |db| db.flavor_delete(&lookup)).await {
            Ok(()) => Ok(empty_response(StatusCode::ACCEPTED)),
            Err(ApiError::NotFound(_)) => Err(flavor_not_found(id)),
            Err(e) => Err(e),
        }
    }

    async fn specs_of(&self, call: &Call, id: &str) -> Result<BTreeMap<String, String>, ApiError> {
        self.visible_flavor(call, id).await?;
        let lookup = id.to_string();
        match self.db(move |db| db.flavor_extra_specs(&lookup)).await {
            Err(ApiError::NotFound(_)) => Err(flavor_not_found(id)),
            other => other,
        }
    }

    pub(crate) async fn extra_specs(
        &self,
        call: &Call,
        id: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:os-flavor-extra-specs:index")?;
        let specs = self.specs_of(call, id).await?;
        Ok(crate::json_response(
            StatusCode::OK,
            &json!({"extra_specs": specs}),
        ))
    }

    pub(crate) async fn extra_spec(
        &self,
        call: &Call,
        id: &str,
        key: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::reader(call, "os_compute_api:os-flavor-extra-specs:show")?;
        let specs = self.specs_of(call, id).await?;
        let value = specs.get(key).ok_or_else(|| {
            ApiError::NotFound(format!("Flavor {id} has no extra specs with key {key}."))
        })?;
        Ok(crate::json_response(StatusCode::OK, &json!({ key: value })))
    }

    pub(crate) async fn set_extra_specs(
        &self,
        call: &Call,
        id: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-flavor-extra-specs:create")?;
        let top = body_object(body)?;
        let specs = parse_specs(top.get("extra_specs"))?;
        self.store_specs(call, id, specs.clone()).await?;
        Ok(crate::json_response(
            StatusCode::OK,
            &json!({"extra_specs": specs}),
        ))
    }

    pub(crate) async fn put_extra_spec(
        &self,
        call: &Call,
        id: &str,
        key: &str,
        body: &[u8],
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-flavor-extra-specs:update")?;
        let top = body_object(body)?;
        if top.len() != 1 || !top.contains_key(key) {
            return Err(ApiError::BadRequest("Request body and URI mismatch".into()));
        }
        let specs = parse_specs(Some(&Value::Object(top)))?;
        self.store_specs(call, id, specs.clone()).await?;
        Ok(crate::json_response(StatusCode::OK, &json!(specs)))
    }

    async fn store_specs(
        &self,
        call: &Call,
        id: &str,
        specs: BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        self.visible_flavor(call, id).await?;
        let flavorid = id.to_string();
        match self
            .db(move |db| db.flavor_extra_specs_set(&flavorid, &specs))
            .await
        {
            Err(ApiError::NotFound(_)) => Err(flavor_not_found(id)),
            other => other,
        }
    }

    pub(crate) async fn delete_extra_spec(
        &self,
        call: &Call,
        id: &str,
        key: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        policy::admin(call, "os_compute_api:os-flavor-extra-specs:delete")?;
        self.visible_flavor(call, id).await?;
        let (flavorid, key) = (id.to_string(), key.to_string());
        self.db(move |db| db.flavor_extra_spec_delete(&flavorid, &key))
            .await?;
        Ok(empty_response(StatusCode::OK))
    }
}
