//! The API's HTTP metrics: requests by method, route template and status, and their latency.
//! Routes are templates (`/v2.1/servers/{id}`), never raw paths, so ids and names in URLs
//! cannot grow the label sets; a path no route serves is `unmatched`.

use std::time::Duration;

use hyper::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};
use proto::metrics::{seconds_family, SecondsFamily};

use crate::COMPUTE_COLLECTIONS;

/// The route of a path that no route serves.
pub const UNMATCHED: &str = "unmatched";

/// The route of `GET /healthcheck`.
pub const HEALTHCHECK: &str = "/healthcheck";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: &'static str,
}

pub(crate) struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: SecondsFamily<RouteLabels>,
}

impl ApiMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "zova_api_requests",
            "HTTP requests answered, by method, route template and status",
            requests.clone(),
        );
        let duration = seconds_family();
        registry.register_with_unit(
            "zova_api_request_duration",
            "Time from receiving an HTTP request to its answer, by method and route template",
            Unit::Seconds,
            duration.clone(),
        );
        ApiMetrics { requests, duration }
    }

    /// Counts one answered request.
    pub fn observe(
        &self,
        method: &Method,
        route: &'static str,
        status: StatusCode,
        took: Duration,
    ) {
        let method = method_label(method);
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route,
                status: status.as_u16(),
            })
            .inc();
        self.duration
            .get_or_create(&RouteLabels { method, route })
            .observe(took.as_secs_f64());
    }
}

/// The standard methods by name; any other (a client may send anything) is `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The route template of a request path, given as its decoded segments. The older catalogs'
/// `/v2.1/{project_id}/...` form maps to the same template as `/v2.1/...`.
pub fn route_template(segments: &[&str]) -> &'static str {
    match segments {
        [] => "/",
        ["healthcheck"] => HEALTHCHECK,
        ["v3", rest @ ..] => match rest {
            [] => "/v3",
            ["auth", "tokens"] => "/v3/auth/tokens",
            _ => UNMATCHED,
        },
        ["image", rest @ ..] => match rest {
            [] => "/image",
            ["versions"] => "/image/versions",
            ["v2", "images"] => "/image/v2/images",
            ["v2", "images", _] => "/image/v2/images/{id}",
            _ => UNMATCHED,
        },
        ["v2.1", rest @ ..] => compute_v21(without_project(rest)),
        ["v2", rest @ ..] => compute_v2(without_project(rest)),
        _ => UNMATCHED,
    }
}

/// The compute path without the project id that older catalogs put first.
fn without_project<'a>(path: &'a [&'a str]) -> &'a [&'a str] {
    match path {
        [first, rest @ ..] if !rest.is_empty() && !COMPUTE_COLLECTIONS.contains(first) => rest,
        _ => path,
    }
}

/// The compute API's routes under one version prefix, as `Api::route` serves them.
macro_rules! compute_routes {
    ($name:ident, $prefix:literal) => {
        fn $name(path: &[&str]) -> &'static str {
            match path {
                [] => $prefix,
                ["servers"] => concat!($prefix, "/servers"),
                ["servers", "detail"] => concat!($prefix, "/servers/detail"),
                ["servers", _] => concat!($prefix, "/servers/{id}"),
                ["servers", _, "action"] => concat!($prefix, "/servers/{id}/action"),
                ["servers", _, "os-instance-actions"] => {
                    concat!($prefix, "/servers/{id}/os-instance-actions")
                }
                ["servers", _, "os-instance-actions", _] => {
                    concat!($prefix, "/servers/{id}/os-instance-actions/{request_id}")
                }
                ["flavors"] => concat!($prefix, "/flavors"),
                ["flavors", "detail"] => concat!($prefix, "/flavors/detail"),
                ["flavors", _] => concat!($prefix, "/flavors/{id}"),
                ["flavors", _, "os-extra_specs"] => {
                    concat!($prefix, "/flavors/{id}/os-extra_specs")
                }
                ["flavors", _, "os-extra_specs", _] => {
                    concat!($prefix, "/flavors/{id}/os-extra_specs/{key}")
                }
                ["os-services"] => concat!($prefix, "/os-services"),
                ["os-services", _] => concat!($prefix, "/os-services/{action}"),
                ["os-hypervisors"] => concat!($prefix, "/os-hypervisors"),
                ["os-hypervisors", "detail"] => concat!($prefix, "/os-hypervisors/detail"),
                ["os-hypervisors", _] => concat!($prefix, "/os-hypervisors/{id}"),
                ["os-availability-zone"] => concat!($prefix, "/os-availability-zone"),
                ["os-availability-zone", "detail"] => {
                    concat!($prefix, "/os-availability-zone/detail")
                }
                ["limits"] => concat!($prefix, "/limits"),
                ["os-keypairs"] => concat!($prefix, "/os-keypairs"),
                ["os-keypairs", _] => concat!($prefix, "/os-keypairs/{name}"),
                _ => UNMATCHED,
            }
        }
    };
}

compute_routes!(compute_v21, "/v2.1");
compute_routes!(compute_v2, "/v2");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_templates_without_ids() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "/"),
            (&["healthcheck"], "/healthcheck"),
            (&["v2.1"], "/v2.1"),
            (&["v2.1", "servers"], "/v2.1/servers"),
            (&["v2.1", "servers", "detail"], "/v2.1/servers/detail"),
            (&["v2.1", "servers", "4f1c"], "/v2.1/servers/{id}"),
            (&["v2", "servers", "4f1c"], "/v2/servers/{id}"),
            // The project id of older catalogs is not part of the route.
            (&["v2.1", "p-1", "servers", "4f1c"], "/v2.1/servers/{id}"),
            (
                &["v2.1", "servers", "4f1c", "action"],
                "/v2.1/servers/{id}/action",
            ),
            (
                &["v2.1", "servers", "4f1c", "os-instance-actions", "req-1"],
                "/v2.1/servers/{id}/os-instance-actions/{request_id}",
            ),
            (
                &["v2.1", "flavors", "1", "os-extra_specs", "hw:cpu_policy"],
                "/v2.1/flavors/{id}/os-extra_specs/{key}",
            ),
            (
                &["v2.1", "os-keypairs", "my key"],
                "/v2.1/os-keypairs/{name}",
            ),
            (
                &["v2.1", "os-services", "disable"],
                "/v2.1/os-services/{action}",
            ),
            (&["v3", "auth", "tokens"], "/v3/auth/tokens"),
            (&["image", "v2", "images", "155d"], "/image/v2/images/{id}"),
            (&["v2.1", "servers", "a", "b", "c", "d"], UNMATCHED),
            (&["wp-admin", "setup.php"], UNMATCHED),
            (&["v3", "users", "u-1"], UNMATCHED),
        ];
        for (segments, expected) in cases {
            assert_eq!(route_template(segments), *expected, "{segments:?}");
        }
    }

    #[test]
    fn requests_are_counted_by_template_and_status() {
        let mut registry = Registry::default();
        let metrics = ApiMetrics::new(&mut registry);
        let route = route_template(&["v2.1", "servers"]);
        metrics.observe(
            &Method::POST,
            route,
            StatusCode::ACCEPTED,
            Duration::from_millis(3),
        );
        metrics.observe(
            &Method::POST,
            route,
            StatusCode::ACCEPTED,
            Duration::from_millis(4),
        );
        let odd = Method::from_bytes(b"BREW").expect("a method");
        metrics.observe(&odd, UNMATCHED, StatusCode::NOT_FOUND, Duration::ZERO);
        let text = proto::metrics::render(&registry);
        for line in [
            "zova_api_requests_total{method=\"POST\",route=\"/v2.1/servers\",status=\"202\"} 2",
            "zova_api_requests_total{method=\"other\",route=\"unmatched\",status=\"404\"} 1",
            "zova_api_request_duration_seconds_count{method=\"POST\",route=\"/v2.1/servers\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
