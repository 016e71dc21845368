//! The messaging metrics of a client and a server over real loopback sockets.

use std::time::Duration;

use prometheus_client::registry::Registry;
use proto::metrics::render;
use proto::{Ping, ProtoError, RebuildQueue, RequestContext, Rpc, RpcMetrics, RpcOptions};
use proto::{ServiceHeartbeat, ServiceRegister};

fn log() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn fast() -> RpcOptions {
    RpcOptions {
        cast_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_secs(5),
        ..RpcOptions::default()
    }
}

/// The value of one series (name with its labels, as the text writes them), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Answers `ping`, takes heartbeats, and knows nothing else.
fn serve(mut rx: tokio::sync::mpsc::UnboundedReceiver<proto::Incoming>) {
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            match request.method() {
                "ping" => request.reply::<Ping>(Ok("pong".into())),
                "service_heartbeat" => {}
                _ => request.reply_no_such_method("test-service"),
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_count_what_they_send_take_and_drop() {
    let mut server_registry = Registry::default();
    let server_metrics = RpcMetrics::new(&mut server_registry);
    let (server, rx) =
        Rpc::start_with_metrics(log(), Some("tcp://127.0.0.1:*"), fast(), server_metrics)
            .expect("bind");
    serve(rx.expect("receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let mut client_registry = Registry::default();
    let client_metrics = RpcMetrics::new(&mut client_registry);
    let (client, _) = Rpc::start_with_metrics(log(), None, fast(), client_metrics).expect("client");
    let ctx = RequestContext::internal("p");

    for _ in 0..5 {
        let beat = ServiceHeartbeat {
            host: "node-1".into(),
            binary: "zova-compute".into(),
        };
        client.cast(&endpoint, &ctx, &beat).await.expect("acked");
    }
    for _ in 0..2 {
        client
            .call(&endpoint, &ctx, &Ping {})
            .await
            .expect("answered");
    }
    // An error answer is an answer, not a failed send.
    let err = client
        .call(&endpoint, &ctx, &RebuildQueue {})
        .await
        .expect_err("not served");
    assert!(matches!(err, ProtoError::Remote(_)), "{err}");
    // Nobody listens there.
    let dead = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        format!(
            "tcp://127.0.0.1:{}",
            socket.local_addr().expect("addr").port()
        )
    };
    let register = ServiceRegister {
        host: "node-1".into(),
        binary: "zova-compute".into(),
        rpc_endpoint: endpoint.clone(),
        rpc_public_key: None,
    };
    let err = client
        .cast(&dead, &ctx, &register)
        .await
        .expect_err("times out");
    assert!(err.is_timeout(), "{err}");

    let text = render(&client_registry);
    for (series, expected) in [
        (
            "zova_rpc_messages_sent_total{method=\"service_heartbeat\",kind=\"cast\"}",
            5.0,
        ),
        (
            "zova_rpc_messages_received_total{method=\"service_heartbeat\",kind=\"ack\"}",
            5.0,
        ),
        (
            "zova_rpc_messages_sent_total{method=\"ping\",kind=\"call\"}",
            2.0,
        ),
        (
            "zova_rpc_messages_received_total{method=\"ping\",kind=\"reply\"}",
            2.0,
        ),
        ("zova_rpc_call_duration_seconds_count{method=\"ping\"}", 2.0),
        (
            "zova_rpc_call_duration_seconds_count{method=\"build_queue\"}",
            1.0,
        ),
        (
            "zova_rpc_send_failures_total{method=\"service_register\",reason=\"timeout\"}",
            1.0,
        ),
        ("zova_rpc_casts_awaiting_ack", 0.0),
        ("zova_rpc_calls_in_flight", 0.0),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series} in:\n{text}");
    }
    assert!(
        !text.contains("method=\"build_queue\",reason"),
        "an error answer is not a failure:\n{text}"
    );

    // A frame that is not an envelope is dropped, and the server keeps serving.
    let context = zmq::Context::new();
    let raw = context.socket(zmq::DEALER).expect("socket");
    raw.connect(&endpoint).expect("connect");
    raw.send(&b"not an envelope"[..], 0).expect("send");
    let mut text = render(&server_registry);
    for _ in 0..200 {
        if value(&text, "zova_rpc_frames_dropped_total{reason=\"malformed\"}") == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        text = render(&server_registry);
    }
    for (series, expected) in [
        ("zova_rpc_frames_dropped_total{reason=\"malformed\"}", 1.0),
        (
            "zova_rpc_messages_received_total{method=\"service_heartbeat\",kind=\"cast\"}",
            5.0,
        ),
        (
            "zova_rpc_messages_sent_total{method=\"service_heartbeat\",kind=\"ack\"}",
            5.0,
        ),
        (
            "zova_rpc_messages_received_total{method=\"ping\",kind=\"call\"}",
            2.0,
        ),
        (
            "zova_rpc_messages_sent_total{method=\"ping\",kind=\"reply\"}",
            2.0,
        ),
        (
            "zova_rpc_messages_sent_total{method=\"build_queue\",kind=\"reply\"}",
            1.0,
        ),
    ] {
        assert_eq!(value(&text, series), Some(expected), "{series} in:\n{text}");
    }
    client.shutdown();
    server.shutdown();
}
