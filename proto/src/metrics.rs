//! Prometheus metrics. Each service keeps a registry of its own (so the services of one process,
//! as in the test fabric, report apart), counts on its hot paths with atomics whose label sets
//! are resolved once, and serves the registry as OpenMetrics text (which Prometheus scrapes
//! natively) on `GET /metrics` at `[metrics] listen`, on a port of its own: never on the
//! compute API's port, which tenants reach.
//!
//! The messaging metrics live here, in [`RpcMetrics`], so every service has them.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use slog::{info, warn, Logger};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::envelope::Kind;
use crate::ProtoError;

/// The port each service serves its metrics on when `[metrics] listen` names only a host:
/// the compute API's 8774 plus 1000, and the next ports for the others.
pub mod default_port {
    pub const API: u16 = 9774;
    pub const CONDUCTOR: u16 = 9775;
    pub const SCHEDULER: u16 = 9776;
    pub const COMPUTE: u16 = 9777;
}

/// Upper bounds, in seconds, of every duration histogram: from 100 µs (an RPC call on loopback
/// takes about 0.13 ms) to 5 minutes (the default `boot_timeout` of a build).
pub const SECONDS_BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// A histogram with [`SECONDS_BUCKETS`].
pub fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// A family of [`seconds_histogram`]s, one per label set.
pub type SecondsFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// An empty [`SecondsFamily`].
pub fn seconds_family<S: Clone + std::hash::Hash + Eq>() -> SecondsFamily<S> {
    Family::new_with_constructor(seconds_histogram as fn() -> Histogram)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Registers `name` as a counter family by `outcome` and returns one counter per outcome, in
/// the order given, each present (at zero) from the start.
pub fn outcome_counters<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    outcomes: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<OutcomeLabel, Counter>::default();
    registry.register(name, help, family.clone());
    outcomes.map(|outcome| family.get_or_create_owned(&OutcomeLabel { outcome }))
}

/// Registers `name` as a [`seconds_histogram`] family by `outcome` and returns one histogram
/// per outcome, in the order given.
pub fn outcome_histograms<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    outcomes: [&'static str; N],
) -> [Histogram; N] {
    let family = seconds_family::<OutcomeLabel>();
    registry.register_with_unit(name, help, Unit::Seconds, family.clone());
    outcomes.map(|outcome| family.get_or_create_owned(&OutcomeLabel { outcome }))
}

/// A gauge that holds a fraction (free vCPUs under an allocation ratio, say).
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A family of gauges whose label sets come and go (hosts, queues): [`GaugeSet::replace`] sets
/// the current values and removes the label sets that are gone, so a scrape never shows a host
/// that has left.
#[derive(Debug)]
pub struct GaugeSet<S> {
    family: Family<S, FloatGauge>,
    current: Mutex<Vec<S>>,
}

impl<
        S: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    > GaugeSet<S>
{
    /// Registers the family as `name` (with `unit`, if any) in `registry`.
    pub fn register(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Self {
        let family = Family::<S, FloatGauge>::default();
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
            None => registry.register(name, help, family.clone()),
        }
        GaugeSet {
            family,
            current: Mutex::new(Vec::new()),
        }
    }

    /// Makes `values` the whole family: sets each, then removes the label sets not among them.
    pub fn replace(&self, values: Vec<(S, f64)>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        for (labels, value) in &values {
            self.family.get_or_create(labels).set(*value);
        }
        let now: Vec<S> = values.into_iter().map(|(labels, _)| labels).collect();
        for gone in current.iter().filter(|labels| !now.contains(labels)) {
            self.family.remove(gone);
        }
        *current = now;
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics`: `host:port`, or just a host (`127.0.0.1`, `::1`) for
    /// the service's own default port ([`default_port`]). Empty: no metrics endpoint. Port 0
    /// takes any free port (tests).
    pub listen: String,
}

impl MetricsConfig {
    /// The address to bind, with `default_port` when `listen` names only a host; None when
    /// metrics are off.
    pub fn address(&self, default_port: u16) -> Option<String> {
        listen_address(&self.listen, default_port)
    }
}

fn listen_address(listen: &str, default_port: u16) -> Option<String> {
    let listen = listen.trim();
    if listen.is_empty() {
        return None;
    }
    if listen.parse::<SocketAddr>().is_ok() {
        return Some(listen.to_string());
    }
    let bare = listen.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, default_port).to_string());
    }
    match listen.rsplit_once(':') {
        // A host name with a port.
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => {
            Some(listen.to_string())
        }
        _ => Some(format!("{listen}:{default_port}")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {address} ([metrics] listen): {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
}

/// The OpenMetrics text of `registry`, as `GET /metrics` answers it.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail; an encoder error would mean a bug in a label value,
    // and a truncated answer is still better than none.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers one request to the metrics endpoint.
pub fn respond(registry: &Registry, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, body, content_type) = match (method, path) {
        (&Method::GET, "/metrics") => (StatusCode::OK, render(registry), OPENMETRICS),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "Only GET is served here.\n".to_string(),
            "text/plain; charset=utf-8",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "Metrics are at /metrics.\n".to_string(),
            "text/plain; charset=utf-8",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A running metrics endpoint. Dropping it stops it.
#[derive(Debug)]
pub struct MetricsServer {
    address: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The address it is bound to, with the real port if 0 was asked for.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client that sends no request line within this time is dropped, so idle connections
/// cannot pile up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `registry` on `config`'s address (None when metrics are off). Runs on its own tasks:
/// a scrape only reads atomics and never waits on the service.
pub async fn serve(
    config: &MetricsConfig,
    default_port: u16,
    registry: Registry,
    log: &Logger,
) -> Result<Option<MetricsServer>, MetricsError> {
    let Some(address) = config.address(default_port) else {
        return Ok(None);
    };
    let listen_error = |source| MetricsError::Listen {
        address: address.clone(),
        source,
    };
    let listener = TcpListener::bind(&address).await.map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    info!(log, "metrics served"; "address" => %bound, "path" => "/metrics");
    let registry = Arc::new(registry);
    let log = log.clone();
    let task = tokio::spawn(async move {
        // Owned here, so aborting this task also ends the connections it serves.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let registry = registry.clone();
                        connections.spawn(async move {
                            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                                let response = respond(&registry, request.method(), request.uri().path());
                                async move { Ok::<_, Infallible>(response) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .timer(TokioTimer::new())
                                .header_read_timeout(HEADER_TIMEOUT)
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Err(e) => {
                        warn!(log, "metrics accept failed"; "error" => %e);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
    Ok(Some(MetricsServer {
        address: bound,
        task,
    }))
}

// ---------------------------------------------------------------- messaging

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodKind {
    method: &'static str,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodReason {
    method: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

const KINDS: [&str; 4] = ["cast", "call", "reply", "ack"];

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Cast => 0,
        Kind::Call => 1,
        Kind::Reply => 2,
        Kind::Ack => 3,
    }
}

/// Why a send failed, as the `reason` label says it.
const FAILURES: [&str; 7] = [
    "timeout",
    "refused",
    "too_large",
    "closed",
    "encode",
    "malformed_reply",
    "other",
];

/// The `reason` of a failed request; None when the peer answered (an error answer is the
/// peer's, not a failed send).
fn failure_index(err: &ProtoError) -> Option<usize> {
    Some(match err {
        ProtoError::Remote(_) => return None,
        ProtoError::Timeout { .. } => 0,
        ProtoError::Refused { .. } => 1,
        ProtoError::TooLarge { .. } => 2,
        ProtoError::Closed => 3,
        ProtoError::Encode(_) => 4,
        ProtoError::Decode(_) | ProtoError::Version(_) => 5,
        _ => 6,
    })
}

/// Why the I/O task dropped a frame it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DroppedFrame {
    /// Not a MessagePack envelope this service can read (requests and answers alike).
    Malformed,
    /// A ROUTER frame without exactly an identity and a payload.
    Parts,
    /// Another protocol major version.
    Version,
    /// A kind that has no business on that socket (an ack sent to a service, say).
    Kind,
}

const DROPPED: [&str; 4] = ["malformed", "parts", "version", "kind"];

impl DroppedFrame {
    fn index(self) -> usize {
        match self {
            DroppedFrame::Malformed => 0,
            DroppedFrame::Parts => 1,
            DroppedFrame::Version => 2,
            DroppedFrame::Kind => 3,
        }
    }
}

/// The counters of one method, each created in its family the first time it counts and then
/// only read: the families' locks and label hashing are paid once per series, not per message.
#[derive(Debug)]
struct MethodCounters {
    name: &'static str,
    sent: [OnceLock<Counter>; 4],
    received: [OnceLock<Counter>; 4],
    failed: [OnceLock<Counter>; FAILURES.len()],
    call_duration: OnceLock<Histogram>,
}

impl MethodCounters {
    fn new(name: &'static str) -> Self {
        MethodCounters {
            name,
            sent: Default::default(),
            received: Default::default(),
            failed: Default::default(),
            call_duration: OnceLock::new(),
        }
    }
}

#[derive(Debug)]
struct RpcInner {
    sent: Family<MethodKind, Counter>,
    received: Family<MethodKind, Counter>,
    failed: Family<MethodReason, Counter>,
    call_duration: SecondsFamily<MethodLabel>,
    dropped: [Counter; DROPPED.len()],
    late_answers: Counter,
    curve_refused: Counter,
    casts_awaiting_ack: Gauge,
    calls_in_flight: Gauge,
    /// Every method of the three surfaces; anything else a peer sends counts as `other`, so
    /// a stray or hostile peer cannot grow the label sets.
    methods: crate::hash::FastMap<&'static str, MethodCounters>,
    other: MethodCounters,
}

/// The messaging metrics of one `Rpc` (cheap to clone: one shared set of atomics).
///
/// `zova_rpc_messages_sent_total{method,kind}` and `zova_rpc_messages_received_total{method,kind}`
/// count frames by wire method name and kind (`cast`, `call`, `reply`, `ack`; an ack is
/// counted once per cast it acknowledges); `zova_rpc_send_failures_total{method,reason}`
/// counts requests that failed without an answer; `zova_rpc_call_duration_seconds{method}` is
/// the time to a call's answer; `zova_rpc_frames_dropped_total{reason}`,
/// `zova_rpc_late_answers_total` and `zova_rpc_curve_refused_total` count what was not taken;
/// `zova_rpc_casts_awaiting_ack` and `zova_rpc_calls_in_flight` are the requests waiting now.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    inner: Arc<RpcInner>,
}

impl Default for RpcMetrics {
    /// Metrics that count but are registered nowhere (a service without an endpoint, tests).
    fn default() -> Self {
        RpcMetrics::new(&mut Registry::default())
    }
}

impl RpcMetrics {
    /// Creates the messaging metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let names = crate::ConductorApi::METHODS
            .iter()
            .chain(crate::SchedulerApi::METHODS)
            .chain(crate::ComputeApi::METHODS);
        let methods = names
            .map(|name| (*name, MethodCounters::new(name)))
            .collect();
        let failed = Family::<MethodReason, Counter>::default();
        let dropped_family = Family::<ReasonLabel, Counter>::default();
        // Every reason exists from the start, at zero: an alert on its rate needs the series.
        let dropped =
            DROPPED.map(|reason| dropped_family.get_or_create_owned(&ReasonLabel { reason }));
        let inner = RpcInner {
            sent: Family::default(),
            received: Family::default(),
            failed,
            call_duration: seconds_family(),
            dropped,
            late_answers: Counter::default(),
            curve_refused: Counter::default(),
            casts_awaiting_ack: Gauge::default(),
            calls_in_flight: Gauge::default(),
            methods,
            other: MethodCounters::new("other"),
        };
        registry.register(
            "zova_rpc_messages_sent",
            "RPC frames sent, by wire method and kind (an ack counts once per cast it acknowledges)",
            inner.sent.clone(),
        );
        registry.register(
            "zova_rpc_messages_received",
            "RPC frames received and taken, by wire method and kind",
            inner.received.clone(),
        );
        registry.register(
            "zova_rpc_send_failures",
            "Casts and calls that failed without an answer, by wire method and reason",
            inner.failed.clone(),
        );
        registry.register_with_unit(
            "zova_rpc_call_duration",
            "Time from sending a call to its answer, by wire method",
            Unit::Seconds,
            inner.call_duration.clone(),
        );
        registry.register(
            "zova_rpc_frames_dropped",
            "Received frames dropped unread, by reason",
            dropped_family,
        );
        registry.register(
            "zova_rpc_late_answers",
            "Acks and replies that arrived after their caller gave up",
            inner.late_answers.clone(),
        );
        registry.register(
            "zova_rpc_curve_refused",
            "CURVE handshakes refused because the client key is not trusted",
            inner.curve_refused.clone(),
        );
        registry.register(
            "zova_rpc_casts_awaiting_ack",
            "Casts sent and not yet acknowledged",
            inner.casts_awaiting_ack.clone(),
        );
        registry.register(
            "zova_rpc_calls_in_flight",
            "Calls sent and not yet answered",
            inner.calls_in_flight.clone(),
        );
        RpcMetrics {
            inner: Arc::new(inner),
        }
    }

    fn method(&self, name: &str) -> &MethodCounters {
        self.inner.methods.get(name).unwrap_or(&self.inner.other)
    }

    /// The `'static` label of a method name from the wire: its own if known, else `other`.
    pub(crate) fn method_label(&self, name: &str) -> &'static str {
        self.method(name).name
    }

    pub(crate) fn sent(&self, method: &str, kind: Kind) {
        let counters = self.method(method);
        let i = kind_index(kind);
        counters.sent[i]
            .get_or_init(|| {
                self.inner.sent.get_or_create_owned(&MethodKind {
                    method: counters.name,
                    kind: KINDS[i],
                })
            })
            .inc();
    }

    pub(crate) fn received(&self, method: &str, kind: Kind) {
        let counters = self.method(method);
        let i = kind_index(kind);
        counters.received[i]
            .get_or_init(|| {
                self.inner.received.get_or_create_owned(&MethodKind {
                    method: counters.name,
                    kind: KINDS[i],
                })
            })
            .inc();
    }

    /// Counts a request that ended with `err`, unless the peer answered it.
    pub(crate) fn failed(&self, method: &str, err: &ProtoError) {
        let Some(i) = failure_index(err) else { return };
        let counters = self.method(method);
        counters.failed[i]
            .get_or_init(|| {
                self.inner.failed.get_or_create_owned(&MethodReason {
                    method: counters.name,
                    reason: FAILURES[i],
                })
            })
            .inc();
    }

    pub(crate) fn call_answered(&self, method: &str, waited: Duration) {
        let counters = self.method(method);
        counters
            .call_duration
            .get_or_init(|| {
                self.inner.call_duration.get_or_create_owned(&MethodLabel {
                    method: counters.name,
                })
            })
            .observe(waited.as_secs_f64());
    }

    pub(crate) fn dropped(&self, why: DroppedFrame) {
        self.inner.dropped[why.index()].inc();
    }

    pub(crate) fn late_answer(&self) {
        self.inner.late_answers.inc();
    }

    pub(crate) fn curve_refused(&self) {
        self.inner.curve_refused.inc();
    }

    /// The gauge of requests of `kind` (a cast or a call) waiting for an answer.
    pub(crate) fn waiting(&self, kind: Kind) -> &Gauge {
        match kind {
            Kind::Call => &self.inner.calls_in_flight,
            _ => &self.inner.casts_awaiting_ack,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_an_address_or_a_host_for_the_default_port() {
        let cases = [
            ("", None),
            ("   ", None),
            ("127.0.0.1:9100", Some("127.0.0.1:9100")),
            ("127.0.0.1:0", Some("127.0.0.1:0")),
            ("127.0.0.1", Some("127.0.0.1:9775")),
            ("0.0.0.0", Some("0.0.0.0:9775")),
            ("::1", Some("[::1]:9775")),
            ("[::1]", Some("[::1]:9775")),
            ("[::1]:9200", Some("[::1]:9200")),
            ("localhost", Some("localhost:9775")),
            ("localhost:9300", Some("localhost:9300")),
        ];
        for (listen, expected) in cases {
            assert_eq!(
                listen_address(listen, default_port::CONDUCTOR).as_deref(),
                expected,
                "{listen:?}"
            );
        }
    }

    #[test]
    fn the_text_carries_each_metric_with_its_labels() {
        let mut registry = Registry::default();
        let rpc = RpcMetrics::new(&mut registry);
        rpc.sent("build_instances", Kind::Cast);
        rpc.sent("build_instances", Kind::Cast);
        rpc.received("no_such_method", Kind::Call);
        rpc.failed(
            "new_run_instance",
            &ProtoError::Timeout {
                method: "new_run_instance".into(),
                endpoint: "tcp://127.0.0.1:1".into(),
                waited: Duration::from_secs(2),
            },
        );
        rpc.failed(
            "ping",
            &ProtoError::Remote(crate::RemoteError {
                kind: "NotFound".into(),
                message: "gone".into(),
            }),
        );
        rpc.call_answered("ping", Duration::from_micros(300));
        rpc.dropped(DroppedFrame::Malformed);
        rpc.waiting(Kind::Cast).inc();
        let text = render(&registry);
        for line in [
            "zova_rpc_messages_sent_total{method=\"build_instances\",kind=\"cast\"} 2",
            // A method no surface has is `other`: a peer cannot grow the label sets.
            "zova_rpc_messages_received_total{method=\"other\",kind=\"call\"} 1",
            "zova_rpc_send_failures_total{method=\"new_run_instance\",reason=\"timeout\"} 1",
            "zova_rpc_call_duration_seconds_count{method=\"ping\"} 1",
            "zova_rpc_call_duration_seconds_bucket{le=\"0.0005\",method=\"ping\"} 1",
            "zova_rpc_frames_dropped_total{reason=\"malformed\"} 1",
            "zova_rpc_frames_dropped_total{reason=\"version\"} 0",
            "zova_rpc_casts_awaiting_ack 1",
            "zova_rpc_calls_in_flight 0",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // An answer, even an error, is not a failed send.
        assert!(!text.contains("method=\"ping\",reason"), "{text}");
    }

    #[test]
    fn a_gauge_set_forgets_the_label_sets_that_are_gone() {
        #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Host {
            host: String,
        }
        let mut registry = Registry::default();
        let gauges = GaugeSet::<Host>::register(&mut registry, "zova_test_free", "Free", None);
        let host = |name: &str| Host { host: name.into() };
        gauges.replace(vec![(host("node-1"), 4.0), (host("node-2"), 2.5)]);
        gauges.replace(vec![(host("node-2"), 1.5)]);
        let text = render(&registry);
        assert!(
            text.contains("zova_test_free{host=\"node-2\"} 1.5"),
            "{text}"
        );
        assert!(!text.contains("node-1"), "{text}");
    }

    #[test]
    fn the_endpoint_serves_only_get_metrics() {
        let mut registry = Registry::default();
        let _rpc = RpcMetrics::new(&mut registry);
        let ok = respond(&registry, &Method::GET, "/metrics");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()),
            Some(OPENMETRICS)
        );
        assert_eq!(
            respond(&registry, &Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            respond(&registry, &Method::GET, "/").status(),
            StatusCode::NOT_FOUND
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_disabled_endpoint_serves_nothing_and_an_enabled_one_scrapes() {
        let log = Logger::root(slog::Discard, slog::o!());
        let off = serve(&MetricsConfig::default(), 1, Registry::default(), &log)
            .await
            .expect("no error");
        assert!(off.is_none());

        let mut registry = Registry::default();
        let rpc = RpcMetrics::new(&mut registry);
        rpc.sent("ping", Kind::Call);
        let config = MetricsConfig {
            listen: "127.0.0.1:0".into(),
        };
        let server = serve(&config, 1, registry, &log)
            .await
            .expect("binds")
            .expect("enabled");
        let text = scrape(server.address()).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("zova_rpc_messages_sent_total{method=\"ping\",kind=\"call\"} 1"),
            "{text}"
        );
        let address = server.address();
        drop(server);
        tokio::task::yield_now().await;
        // Dropped, it stops listening (the port may take a moment to close).
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(address).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the metrics endpoint still listens after its server was dropped");
    }

    /// A raw HTTP/1.1 GET on a blocking socket, so the test needs no HTTP client.
    async fn scrape(address: SocketAddr) -> String {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(address).expect("connects");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .expect("writes");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("reads");
            answer
        })
        .await
        .expect("scrape task")
    }
}
