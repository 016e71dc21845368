//! CURVE over real TCP loopback sockets: who gets through, and what never shows.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::curve::generate_key_pair;
use proto::service::RpcConfig;
use proto::{CurveConfig, Ping, ProtoError, RequestContext, Rpc, RpcOptions, ServiceHeartbeat};
use tokio::sync::mpsc::UnboundedReceiver;

/// A log that keeps every line, values included, to check what was (not) written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

impl Captured {
    fn logger(&self) -> slog::Logger {
        slog::Logger::root(self.clone(), slog::o!())
    }

    fn lines(&self) -> Vec<String> {
        self.0.lock().expect("log lines").clone()
    }
}

struct Line<'a>(&'a mut String);

impl slog::Serializer for Line<'_> {
    fn emit_arguments(&mut self, key: slog::Key, value: &std::fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={value}");
        Ok(())
    }
}

impl slog::Drain for Captured {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut line = format!("{} {}", record.level(), record.msg());
        let _ = record.kv().serialize(record, &mut Line(&mut line));
        let _ = values.serialize(record, &mut Line(&mut line));
        self.0.lock().expect("log lines").push(line);
        Ok(())
    }
}

fn quiet() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

struct Pair {
    public: String,
    secret: String,
}

fn pair() -> Pair {
    let (public, secret) = generate_key_pair().expect("key pair");
    Pair { public, secret }
}

fn options(own: &Pair, server: Option<&Pair>, trusted: &[&Pair]) -> RpcOptions {
    RpcOptions {
        cast_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_secs(5),
        curve: Some(CurveConfig {
            public_key: own.public.clone(),
            secret_key: own.secret.clone(),
            server_public_key: server.map(|s| s.public.clone()).unwrap_or_default(),
            trusted_clients: trusted.iter().map(|p| p.public.clone()).collect(),
            ..Default::default()
        }),
        ..RpcOptions::default()
    }
}

fn plain() -> RpcOptions {
    RpcOptions {
        cast_timeout: Duration::from_millis(300),
        ..RpcOptions::default()
    }
}

/// Answers `ping` and passes on every heartbeat's host.
fn serve(mut rx: UnboundedReceiver<proto::Incoming>) -> UnboundedReceiver<String> {
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            if request.method() == "ping" {
                let id = request.context().request_id.clone();
                request.reply::<Ping>(Ok(id));
            } else if let Ok(beat) = request.args::<ServiceHeartbeat>() {
                let _ = seen_tx.send(beat.host);
            }
        }
    });
    seen_rx
}

fn beat(host: &str) -> ServiceHeartbeat {
    ServiceHeartbeat {
        host: host.into(),
        binary: "zova-compute".into(),
    }
}

/// A CURVE service with `server`'s keys that trusts `trusted`.
fn curve_server(
    log: slog::Logger,
    server: &Pair,
    trusted: &[&Pair],
) -> (Rpc, String, UnboundedReceiver<String>) {
    let (rpc, rx) = Rpc::start(
        log,
        Some("tcp://127.0.0.1:*"),
        options(server, None, trusted),
    )
    .expect("bind");
    let seen = serve(rx.expect("server receiver"));
    let endpoint = rpc.endpoint().expect("endpoint").to_string();
    (rpc, endpoint, seen)
}

async fn nothing_arrives(seen: &mut UnboundedReceiver<String>) {
    let late = tokio::time::timeout(Duration::from_millis(100), seen.recv()).await;
    assert!(late.is_err(), "the server took a request: {late:?}");
}

#[tokio::test]
async fn a_trusted_client_gets_through_both_ways() {
    let (server, client_keys, other_keys) = (pair(), pair(), pair());
    let (_server, endpoint, mut seen) =
        curve_server(quiet(), &server, &[&client_keys, &other_keys]);
    let ctx = RequestContext::internal("p");

    // The server key from configuration.
    let (client, _) =
        Rpc::start(quiet(), None, options(&client_keys, Some(&server), &[])).expect("client");
    client
        .cast(&endpoint, &ctx, &beat("node-1"))
        .await
        .expect("cast acknowledged");
    assert_eq!(seen.recv().await.as_deref(), Some("node-1"));
    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("answered");
    assert_eq!(answer, ctx.request_id);

    // The server key registered for the peer, with no default.
    let (client, _) = Rpc::start(quiet(), None, options(&other_keys, None, &[])).expect("client");
    client
        .set_peer_key(&endpoint, &server.public)
        .expect("valid key");
    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("answered");
    assert_eq!(answer, ctx.request_id);
}

#[tokio::test]
async fn an_untrusted_client_times_out_and_its_key_stays_out_of_the_log() {
    let (server, trusted, stranger) = (pair(), pair(), pair());
    let log = Captured::default();
    let (_server, endpoint, mut seen) = curve_server(log.logger(), &server, &[&trusted]);
    let (client, _) =
        Rpc::start(quiet(), None, options(&stranger, Some(&server), &[])).expect("client");

    let err = client
        .cast(&endpoint, &RequestContext::internal("p"), &beat("intruder"))
        .await
        .expect_err("refused");
    assert!(err.is_timeout(), "{err}");
    nothing_arrives(&mut seen).await;

    let lines = log.lines();
    let refusal = lines
        .iter()
        .find(|l| l.contains("CURVE client refused"))
        .unwrap_or_else(|| panic!("the refusal is logged: {lines:#?}"));
    assert!(refusal.contains(&stranger.public[..8]), "{refusal}");
    for line in &lines {
        for key in [&stranger.public, &stranger.secret, &server.secret] {
            assert!(!line.contains(key.as_str()), "key material logged: {line}");
        }
    }
}

#[tokio::test]
async fn a_plain_client_gets_nothing_through_to_a_curve_server_nor_the_reverse() {
    let (server, client_keys) = (pair(), pair());
    let (_server, endpoint, mut seen) = curve_server(quiet(), &server, &[&client_keys]);
    let (client, _) = Rpc::start(quiet(), None, plain()).expect("client");
    let err = client
        .cast(&endpoint, &RequestContext::internal("p"), &beat("plain"))
        .await
        .expect_err("refused");
    assert!(err.is_timeout(), "{err}");
    nothing_arrives(&mut seen).await;

    // A CURVE client does not fall back to plain either.
    let (plain_server, rx) = Rpc::start(quiet(), Some("tcp://127.0.0.1:*"), plain()).expect("bind");
    let mut seen = serve(rx.expect("server receiver"));
    let endpoint = plain_server.endpoint().expect("endpoint").to_string();
    let (client, _) =
        Rpc::start(quiet(), None, options(&client_keys, Some(&server), &[])).expect("client");
    let err = client
        .cast(&endpoint, &RequestContext::internal("p"), &beat("curve"))
        .await
        .expect_err("refused");
    assert!(err.is_timeout(), "{err}");
    nothing_arrives(&mut seen).await;
}

#[tokio::test]
async fn a_changed_peer_key_replaces_the_connection() {
    let (server, client_keys, impostor) = (pair(), pair(), pair());
    let (_server, endpoint, _seen) = curve_server(quiet(), &server, &[&client_keys]);
    let (client, _) = Rpc::start(quiet(), None, options(&client_keys, None, &[])).expect("client");
    let client = Arc::new(client);
    let ctx = RequestContext::internal("p");

    // With the wrong server key the handshake fails and the call waits.
    client
        .set_peer_key(&endpoint, &impostor.public)
        .expect("valid key");
    let waiting = {
        let (client, endpoint, ctx) = (client.clone(), endpoint.clone(), ctx.clone());
        tokio::spawn(async move { client.call(&endpoint, &ctx, &Ping {}).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .set_peer_key(&endpoint, &server.public)
        .expect("valid key");
    let err = waiting
        .await
        .expect("task")
        .expect_err("its connection was replaced");
    // Refused (the connection was replaced), not a timeout: it failed at once.
    assert!(err.is_refused(), "{err}");

    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("answered");
    assert_eq!(answer, ctx.request_id);
}

#[tokio::test]
async fn a_peer_with_no_known_server_key_is_refused_at_once() {
    let (server, client_keys) = (pair(), pair());
    let (_server, endpoint, _seen) = curve_server(quiet(), &server, &[&client_keys]);
    let (client, _) = Rpc::start(quiet(), None, options(&client_keys, None, &[])).expect("client");
    let err = client
        .cast(&endpoint, &RequestContext::internal("p"), &beat("x"))
        .await
        .expect_err("no key");
    assert!(err.is_refused(), "{err}");
    assert!(err.to_string().contains("server_public_key"), "{err}");
}

#[test]
fn invalid_keys_are_a_start_up_error_that_does_not_show_them() {
    let good = pair();
    let mut bad_secret = good.secret.clone();
    bad_secret.truncate(30);
    let bad = Pair {
        public: good.public.clone(),
        secret: bad_secret.clone(),
    };
    let err = Rpc::start(quiet(), Some("tcp://127.0.0.1:*"), options(&bad, None, &[]))
        .err()
        .expect("refused");
    assert!(matches!(err, ProtoError::Config(_)), "{err}");
    assert!(err.to_string().contains("rpc.curve.secret_key"), "{err}");
    assert!(!err.to_string().contains(&bad_secret), "{err}");

    let (client, _) = Rpc::start(quiet(), None, plain()).expect("client");
    let err = client
        .set_peer_key("tcp://127.0.0.1:1", "not a key")
        .expect_err("refused");
    assert!(matches!(err, ProtoError::Config(_)), "{err}");
}

#[test]
fn a_secret_key_never_shows_in_debug_output() {
    let keys = pair();
    let config = RpcConfig {
        curve: Some(CurveConfig {
            public_key: keys.public.clone(),
            secret_key: keys.secret.clone(),
            server_public_key: keys.public.clone(),
            trusted_clients: vec![keys.public.clone()],
            ..Default::default()
        }),
        ..RpcConfig::default()
    };
    for shown in [
        format!("{config:?}"),
        format!("{config:#?}"),
        format!("{:?}", config.options()),
        format!("{:?}", config.curve),
    ] {
        assert!(!shown.contains(&keys.secret), "{shown}");
        assert!(shown.contains(&keys.public), "{shown}");
    }
}

#[tokio::test]
async fn plain_traffic_off_loopback_is_warned_about_once() {
    let unauthenticated = |log: &Captured| {
        log.lines()
            .iter()
            .filter(|l| l.contains("UNAUTHENTICATED"))
            .count()
    };

    let log = Captured::default();
    let (rpc, _rx) = Rpc::start(log.logger(), Some("tcp://0.0.0.0:*"), plain()).expect("bind");
    let (client, _) = Rpc::start(quiet(), None, plain()).expect("client");
    let endpoint = rpc
        .endpoint()
        .expect("endpoint")
        .replace("0.0.0.0", "127.0.0.1");
    let _ = client
        .cast(&endpoint, &RequestContext::internal("p"), &beat("x"))
        .await;
    assert_eq!(unauthenticated(&log), 1, "{:#?}", log.lines());

    let log = Captured::default();
    let _local = Rpc::start(log.logger(), Some("tcp://127.0.0.1:*"), plain()).expect("bind");
    assert_eq!(unauthenticated(&log), 0, "{:#?}", log.lines());

    let keys = pair();
    let log = Captured::default();
    let _curve = Rpc::start(
        log.logger(),
        Some("tcp://0.0.0.0:*"),
        options(&keys, None, &[&keys]),
    )
    .expect("bind");
    assert_eq!(unauthenticated(&log), 0, "{:#?}", log.lines());
}

#[tokio::test]
async fn zova_keygen_prints_a_working_key_pair() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_zova-keygen"))
        .output()
        .expect("runs");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).expect("UTF-8");

    #[derive(serde::Deserialize)]
    struct File {
        rpc: Section,
    }
    #[derive(serde::Deserialize)]
    struct Section {
        curve: CurveConfig,
    }
    use figment::providers::Format;
    let file: File = figment::Figment::from(figment::providers::Toml::string(&text))
        .extract()
        .expect("TOML with [rpc.curve]");
    let keys = Pair {
        public: file.rpc.curve.public_key,
        secret: file.rpc.curve.secret_key,
    };

    // The pair is consistent: a service that trusts itself answers its own call.
    let (rpc, rx) = Rpc::start(
        quiet(),
        Some("tcp://127.0.0.1:*"),
        options(&keys, Some(&keys), &[&keys]),
    )
    .expect("bind");
    let _seen = serve(rx.expect("server receiver"));
    let endpoint = rpc.endpoint().expect("endpoint").to_string();
    let ctx = RequestContext::internal("p");
    let answer = rpc.call(&endpoint, &ctx, &Ping {}).await.expect("answered");
    assert_eq!(answer, ctx.request_id);
}
