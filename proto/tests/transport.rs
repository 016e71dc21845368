//! The transport over real TCP loopback sockets.

use std::time::Duration;

use proto::{Ping, ProtoError, RequestContext, Rpc, RpcOptions, ServiceHeartbeat};

fn log() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn fast() -> RpcOptions {
    RpcOptions {
        cast_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_secs(5),
    }
}

/// Serves `ping` (answering with the caller's request id) and counts heartbeats.
fn serve(
    rpc_rx: tokio::sync::mpsc::UnboundedReceiver<proto::Incoming>,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (seen_tx, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut rx = rpc_rx;
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            match request.method() {
                "ping" => {
                    let id = request.context().request_id.clone();
                    request.reply::<Ping>(Ok(id));
                }
                "service_heartbeat" => {
                    let args: ServiceHeartbeat = request.args().expect("typed args");
                    let _ = seen_tx.send(args.host);
                }
                _ => request.reply_no_such_method("test-service"),
            }
        }
    });
    seen_rx
}

#[tokio::test]
async fn cast_is_acknowledged_and_call_is_answered() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let mut seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let ctx = RequestContext::internal("p");

    client
        .cast(
            &endpoint,
            &ctx,
            &ServiceHeartbeat {
                host: "node-1".into(),
                binary: "zova-compute".into(),
            },
        )
        .await
        .expect("cast acknowledged");
    assert_eq!(seen.recv().await.as_deref(), Some("node-1"));

    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("call answered");
    assert_eq!(answer, ctx.request_id);
}

#[tokio::test]
async fn cast_to_a_dead_peer_fails_fast() {
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let ctx = RequestContext::internal("p");
    // Bind then drop a socket to get a port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let err = client
        .cast(&format!("tcp://127.0.0.1:{port}"), &ctx, &Ping {})
        .await
        .expect_err("nobody is there");
    assert!(matches!(err, ProtoError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn garbage_frames_do_not_stop_the_service() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let _seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();

    let raw_ctx = zmq::Context::new();
    let raw = raw_ctx.socket(zmq::DEALER).expect("dealer");
    raw.connect(&endpoint).expect("connect");
    for junk in [&b""[..], b"\xc1", b"\x93\x01\x02\x03", &[0xffu8; 4096]] {
        raw.send(junk, 0).expect("send junk");
    }
    raw.send_multipart([&b"two"[..], b"parts"], 0)
        .expect("send multipart junk");

    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let ctx = RequestContext::internal("p");
    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("still serving");
    assert_eq!(answer, ctx.request_id);
}

#[tokio::test]
async fn remote_errors_reach_the_caller() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let mut rx = rx.expect("server receiver");
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            // Dropping a call unanswered must still answer it, with an error.
            drop(request);
        }
    });
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let err = client
        .call(&endpoint, &RequestContext::internal("p"), &Ping {})
        .await
        .expect_err("unanswered");
    match err {
        ProtoError::Remote(remote) => assert_eq!(remote.kind, "Unhandled"),
        other => panic!("expected a remote error, got {other}"),
    }
}

#[test]
fn the_linked_libzmq_supports_curve() {
    // The build links Debian's libzmq (see .cargo/config.toml) because the copy zmq-sys builds
    // itself has no CURVE, which the messaging issue needs for encryption and authentication.
    assert_eq!(zmq::has("curve"), Some(true));
}

#[tokio::test]
async fn stop_serving_delivers_what_was_acknowledged_and_takes_nothing_more() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let mut rx = rx.expect("server receiver");
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let ctx = RequestContext::internal("p");
    let beat = |host: &str| ServiceHeartbeat {
        host: host.into(),
        binary: "zova-compute".into(),
    };

    // Acknowledged, but not yet taken off the queue by the service loop.
    client
        .cast(&endpoint, &ctx, &beat("before"))
        .await
        .expect("acked");
    server.stop_serving();
    let late = client.cast(&endpoint, &ctx, &beat("after")).await;
    assert!(
        matches!(late, Err(ProtoError::Timeout { .. })),
        "not taken once stopping: {late:?}"
    );

    let first = rx
        .recv()
        .await
        .expect("the acknowledged cast is still delivered");
    assert_eq!(
        first.args::<ServiceHeartbeat>().expect("args").host,
        "before"
    );
    assert!(
        rx.recv().await.is_none(),
        "the queue ends after what was acknowledged"
    );
}

/// A method no service has, as a newer peer might send.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct FromTheFuture {}

impl proto::Method for FromTheFuture {
    const NAME: &'static str = "from_the_future";
    type Reply = ();
}

#[tokio::test]
async fn an_unknown_method_is_answered_with_no_such_method() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let _seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let err = client
        .call(&endpoint, &RequestContext::internal("p"), &FromTheFuture {})
        .await
        .expect_err("unknown");
    match err {
        ProtoError::Remote(remote) => {
            assert_eq!(remote.kind, "NoSuchMethod");
            assert!(
                remote.message.contains("from_the_future"),
                "{}",
                remote.message
            );
        }
        other => panic!("expected a remote error, got {other}"),
    }
}
