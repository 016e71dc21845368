//! The minimal image API under `/image` (Glance v2's read side): enough for clients to resolve
//! `--image NAME` and list images, backed by Zova's own images table.

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use db::Image;

use crate::{json_response, Api, ApiError, Call};

fn image_view(image: &Image) -> Value {
    let time = crate::views::iso_time(image.created_at);
    json!({
        "id": image.uuid,
        "name": image.name,
        "status": image.status,
        "visibility": "public",
        "protected": false,
        "os_hidden": false,
        "disk_format": image.disk_format,
        "container_format": image.container_format,
        "size": image.size_bytes,
        "virtual_size": null,
        "min_disk": image.min_disk,
        "min_ram": image.min_ram,
        "checksum": null,
        "os_hash_algo": null,
        "os_hash_value": null,
        "owner": null,
        "tags": [],
        "created_at": time,
        "updated_at": time,
        "self": format!("/v2/images/{}", image.uuid),
        "file": format!("/v2/images/{}/file", image.uuid),
        "schema": "/v2/schemas/image",
    })
}

/// Glance's `id=in:a,b` and `name=in:"a","b"` operators, or a plain value.
fn in_filter(value: &str) -> Vec<String> {
    match value.strip_prefix("in:") {
        Some(list) => list
            .split(',')
            .map(|v| v.trim().trim_matches('"').to_string())
            .collect(),
        None => vec![value.to_string()],
    }
}

impl Api {
    pub(crate) async fn image_request(
        &self,
        log: &slog::Logger,
        request: Request<Incoming>,
        segments: &[String],
        base: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let method = request.method().clone();
        let path: Vec<&str> = segments[1..].iter().map(String::as_str).collect();
        // Version discovery needs no token, as in Glance.
        if method == Method::GET && matches!(path.as_slice(), [] | ["versions"]) {
            let versions: Vec<Value> = ["2.16", "2.15", "2.0"]
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    json!({"id": format!("v{v}"), "status": if i == 0 { "CURRENT" } else { "SUPPORTED" },
                        "links": [{"rel": "self", "href": format!("{base}/image/v2/")}]})
                })
                .collect();
            let status = if path.is_empty() {
                StatusCode::MULTIPLE_CHOICES
            } else {
                StatusCode::OK
            };
            return Ok(json_response(status, &json!({"versions": versions})));
        }
        let request_id = proto::new_request_id();
        let context = match self.authenticate(&request, &request_id, base).await {
            Ok(context) => context,
            Err(response) => return Ok(response),
        };
        let call = Call {
            log: log.clone(),
            context,
            base: base.to_string(),
            version: crate::microversion::MIN,
            query: crate::parse_query(request.uri().query()),
        };
        match (&method, path.as_slice()) {
            (&Method::GET, ["v2", "images"]) => self.list_images(&call).await,
            (&Method::GET, ["v2", "images", id]) => {
                let lookup = id.to_string();
                match self.db(move |db| db.image_get(&lookup)).await? {
                    Some(image) => Ok(json_response(StatusCode::OK, &image_view(&image))),
                    None => Err(ApiError::NotFound(format!("No image found with ID {id}"))),
                }
            }
            (_, ["v2", "images"] | ["v2", "images", _]) => {
                Err(ApiError::MethodNotAllowed(method.to_string()))
            }
            _ => Err(ApiError::NotFound(format!(
                "The resource /image/{} could not be found.",
                path.join("/")
            ))),
        }
    }

    async fn list_images(&self, call: &Call) -> Result<Response<Full<Bytes>>, ApiError> {
        let page = crate::servers::page(call, self.config.max_limit)?;
        let ids = call.param("id").map(in_filter);
        let names = call.param("name").map(in_filter);
        let status = call.param("status").map(str::to_ascii_lowercase);
        let visibility = call.param("visibility").map(str::to_string);
        let images: Vec<Image> = self
            .db(|db| db.images())
            .await?
            .into_iter()
            .filter(|i| ids.as_ref().is_none_or(|ids| ids.contains(&i.uuid)))
            .filter(|i| names.as_ref().is_none_or(|names| names.contains(&i.name)))
            .filter(|i| status.as_ref().is_none_or(|s| &i.status == s))
            // Every image here is public.
            .filter(|_| {
                visibility
                    .as_deref()
                    .is_none_or(|v| v == "public" || v == "all")
            })
            .collect();
        let (images, more) = crate::servers::paginate(images, &page, |i| i.uuid.clone())?;
        let mut body = json!({
            "images": images.iter().map(image_view).collect::<Vec<_>>(),
            "first": "/v2/images",
            "schema": "/v2/schemas/images",
        });
        if more {
            if let Some(last) = images.last() {
                body["next"] = json!(format!(
                    "/v2/images?marker={}&limit={}",
                    last.uuid, page.limit
                ));
            }
        }
        Ok(json_response(StatusCode::OK, &body))
    }
}
