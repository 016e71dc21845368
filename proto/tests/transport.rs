//! The transport over real TCP loopback sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{Ping, ProtoError, RequestContext, Rpc, RpcOptions, ServiceHeartbeat};

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

fn beat(host: &str) -> ServiceHeartbeat {
    ServiceHeartbeat {
        host: host.into(),
        binary: "zova-compute".into(),
    }
}

/// An endpoint nothing listens on: a port bound and given back.
fn dead_endpoint() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    format!("tcp://127.0.0.1:{port}")
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
async fn a_client_reaches_more_peers_than_one_zeromq_context_holds() {
    proto::service::raise_open_file_limit().expect("open-file limit");
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let mut seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let patient = RpcOptions {
        reconnect_ivl: Duration::from_secs(60),
        reconnect_ivl_max: Duration::from_secs(60),
        ..fast()
    };
    let (client, _) = Rpc::start(log(), None, patient).expect("client");
    // 1,100 connections to endpoints nobody listens on (each tried once, as the reconnect
    // interval is long) fill the 1,023 sockets of the client's context.
    let port = dead_endpoint()
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    client.connect_ahead(
        (0..1100)
            .map(|i| format!("tcp://127.0.{}.{}:{port}", i / 250, i % 250 + 1))
            .collect(),
    );
    client
        .cast(&endpoint, &RequestContext::internal("p"), &beat("node-1"))
        .await
        .expect("cast acknowledged");
    assert_eq!(seen.recv().await.as_deref(), Some("node-1"));
    // Each of those sockets holds a descriptor: so they were opened, and the first context
    // was full when the cast's was made.
    let open_files = std::fs::read_dir("/proc/self/fd").expect("fds").count();
    assert!(open_files > 1100, "only {open_files} files open");
    client.shutdown();
    server.shutdown();
}

#[tokio::test]
async fn a_connection_opened_ahead_closes_when_its_peer_is_no_longer_named() {
    // A bare TCP listener: the client's ZeroMQ connection to it is all that arrives.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("tcp://{}", listener.local_addr().expect("address"));
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    client.connect_ahead(vec![endpoint.clone()]);
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("connected ahead")
        .expect("accepted");
    client.connect_ahead(vec![endpoint]);
    client.connect_ahead(Vec::new());
    // The greeting comes first; then the connection must end.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 256];
        loop {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut buf) {
                Ok(0) => return,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection stayed open");
    client.shutdown();
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
        matches!(&late, Err(e) if e.is_refused()),
        "refused at once, not taken, once stopping: {late:?}"
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

#[tokio::test]
async fn every_socket_option_is_taken() {
    // Values at the edges: an option ZeroMQ refused would fail the bind or the first send.
    let options = RpcOptions {
        linger: Duration::from_millis(10),
        sndhwm: 16,
        rcvhwm: u32::MAX,
        reconnect_ivl: Duration::from_millis(50),
        reconnect_ivl_max: Duration::from_secs(3600),
        heartbeat_ivl: Duration::from_millis(100),
        heartbeat_timeout: Duration::from_millis(1000),
        heartbeat_ttl: Duration::from_secs(24 * 3600),
        max_message_bytes: u64::MAX,
        ..fast()
    };
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), options.clone()).expect("bind");
    let _seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, options).expect("client");
    let ctx = RequestContext::internal("p");
    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("answered");
    assert_eq!(answer, ctx.request_id);
    // Several heartbeat intervals: the pings flow and the idle connection stays up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("answered");
    assert_eq!(answer, ctx.request_id);

    let zero = RpcOptions {
        max_in_flight_per_peer: 0,
        ..fast()
    };
    let err = Rpc::start(log(), None, zero).err().expect("refused");
    assert!(matches!(err, ProtoError::Config(_)), "{err}");
}

#[tokio::test]
async fn a_cast_to_a_stopped_peer_times_out_within_its_deadline() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let _seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let ctx = RequestContext::internal("p");
    client
        .cast(&endpoint, &ctx, &beat("up"))
        .await
        .expect("acked");
    drop(server);

    let started = Instant::now();
    let err = client
        .cast(&endpoint, &ctx, &beat("down"))
        .await
        .expect_err("nobody takes it");
    let waited = started.elapsed();
    assert!(err.is_timeout() && !err.is_refused(), "{err}");
    // It waits its deadline (how much longer depends on the machine, so it is not asserted).
    assert!(waited >= fast().cast_timeout, "{waited:?}");
}

#[tokio::test]
async fn the_in_flight_limit_refuses_at_once_and_frees_up() {
    let options = RpcOptions {
        max_in_flight_per_peer: 2,
        ..fast()
    };
    let (client, _) = Rpc::start(log(), None, options).expect("client");
    let ctx = RequestContext::internal("p");
    let endpoint = dead_endpoint();
    let beats = [beat("1"), beat("2"), beat("3")];
    let third = client.cast(&endpoint, &ctx, &beats[2]);
    // join! polls in order, so the first two are waiting when the third is sent.
    let (first, second, third) = tokio::join!(
        client.cast(&endpoint, &ctx, &beats[0]),
        client.cast(&endpoint, &ctx, &beats[1]),
        third
    );
    let err = third.expect_err("over the limit");
    assert!(err.is_refused(), "{err}");
    // Refused, not timed out: it failed at once.
    assert!(err.to_string().contains("max_in_flight_per_peer"), "{err}");
    for result in [first, second] {
        let err = result.expect_err("nobody is there");
        // The first to time out resets the connection, which fails the other as refused.
        assert!(err.is_timeout() || err.is_refused(), "{err}");
    }

    // Nothing waits any more: the next cast is sent, and times out.
    let err = client
        .cast(&endpoint, &ctx, &beat("4"))
        .await
        .expect_err("nobody is there");
    assert!(err.is_timeout(), "{err}");
}

#[tokio::test]
async fn a_full_send_queue_is_refused_not_grown() {
    let options = RpcOptions {
        sndhwm: 1,
        rcvhwm: 1,
        ..fast()
    };
    let (client, _) = Rpc::start(log(), None, options).expect("client");
    let client = Arc::new(client);
    let endpoint = dead_endpoint();
    let mut casts = tokio::task::JoinSet::new();
    for i in 0..20 {
        let client = client.clone();
        let endpoint = endpoint.clone();
        casts.spawn(async move {
            let ctx = RequestContext::internal("p");
            client.cast(&endpoint, &ctx, &beat(&i.to_string())).await
        });
    }
    let mut full = 0;
    while let Some(result) = casts.join_next().await {
        let err = result.expect("task").expect_err("nobody is there");
        assert!(err.is_timeout() || err.is_refused(), "{err}");
        if err.to_string().contains("send queue is full") {
            full += 1;
        }
    }
    assert!(full > 0, "some casts found the queue full");
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_before_it_is_sent() {
    let options = RpcOptions {
        max_message_bytes: 64,
        ..fast()
    };
    let (client, _) = Rpc::start(log(), None, options).expect("client");
    let err = client
        .call(&dead_endpoint(), &RequestContext::internal("p"), &Ping {})
        .await
        .expect_err("too large");
    assert!(
        matches!(err, ProtoError::TooLarge { limit: 64, .. }),
        "{err}"
    );
}

/// Binds `endpoint` again, waiting for the previous owner's listener to close.
async fn rebind(
    endpoint: &str,
    options: RpcOptions,
) -> (Rpc, tokio::sync::mpsc::UnboundedReceiver<proto::Incoming>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match Rpc::start(log(), Some(endpoint), options.clone()) {
            Ok((rpc, rx)) => return (rpc, rx.expect("server receiver")),
            Err(ProtoError::Bind { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {endpoint} again: {e}"),
        }
    }
}

#[tokio::test]
async fn the_client_keeps_working_when_its_peer_restarts_on_the_same_port() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let _seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let ctx = RequestContext::internal("p");
    client
        .cast(&endpoint, &ctx, &beat("first life"))
        .await
        .expect("acked");
    drop(server);

    let err = client
        .cast(&endpoint, &ctx, &beat("given up"))
        .await
        .expect_err("down");
    assert!(err.is_timeout(), "{err}");

    let (server, rx) = rebind(&endpoint, fast()).await;
    let mut seen = serve(rx);
    client
        .cast(&endpoint, &ctx, &beat("second life"))
        .await
        .expect("the same client reaches the restarted peer");
    // The cast its caller gave up on is not delivered late to the new peer.
    assert_eq!(seen.recv().await.as_deref(), Some("second life"));
    let answer = client
        .call(&endpoint, &ctx, &Ping {})
        .await
        .expect("answered");
    assert_eq!(answer, ctx.request_id);

    // Down again, and back while a cast waits: the connection comes back by itself.
    drop(server);
    let patient = RpcOptions {
        cast_timeout: Duration::from_secs(3),
        ..fast()
    };
    let (client, _) = Rpc::start(log(), None, patient).expect("client");
    let waited = beat("waited");
    let waiting = client.cast(&endpoint, &ctx, &waited);
    let restart = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rebind(&endpoint, fast()).await
    };
    let (result, (_server, rx)) = tokio::join!(waiting, restart);
    result.expect("taken once the peer is back");
    let mut seen = serve(rx);
    assert_eq!(seen.recv().await.as_deref(), Some("waited"));
}

/// Many casts in flight at once are acknowledged in batches: every one of them, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_casts_are_each_acknowledged_and_delivered() {
    let (server, rx) = Rpc::start(log(), Some("tcp://127.0.0.1:*"), fast()).expect("bind");
    let mut seen = serve(rx.expect("server receiver"));
    let endpoint = server.endpoint().expect("endpoint").to_string();
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    let client = Arc::new(client);
    let mut casts = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (client, endpoint) = (client.clone(), endpoint.clone());
        casts.spawn(async move {
            client
                .cast(
                    &endpoint,
                    &RequestContext::internal("p"),
                    &beat(&format!("h-{i}")),
                )
                .await
        });
    }
    while let Some(result) = casts.join_next().await {
        result.expect("joined").expect("acknowledged");
    }
    let mut hosts = std::collections::BTreeSet::new();
    while hosts.len() < 1000 {
        let host = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("delivered in time")
            .expect("served");
        assert!(hosts.insert(host), "delivered once");
    }
}

/// Once its I/O thread has stopped, an `Rpc` refuses at once: nobody would deliver an answer.
#[tokio::test]
async fn after_shutdown_every_request_fails_closed() {
    let (client, _) = Rpc::start(log(), None, fast()).expect("client");
    client.shutdown();
    let err = client
        .cast(&dead_endpoint(), &RequestContext::internal("p"), &beat("x"))
        .await
        .expect_err("shut down");
    assert!(matches!(err, ProtoError::Closed), "{err}");
}

/// What a stand-in peer saw: frames, batch frames among them, and envelopes in all.
#[derive(Debug, Default)]
struct Seen {
    frames: usize,
    batches: usize,
    envelopes: usize,
}

/// A stand-in peer that acknowledges `casts` casts as protocol 1.`minor`, on a thread.
fn peer_of_minor(minor: u16, casts: usize) -> (String, std::thread::JoinHandle<Seen>) {
    use proto::envelope::{split_batch, Envelope, PROTOCOL_MAJOR};
    let context = zmq::Context::new();
    let router = context.socket(zmq::ROUTER).expect("router");
    router.set_rcvtimeo(5_000).expect("rcvtimeo");
    router.bind("tcp://127.0.0.1:*").expect("bind");
    let endpoint = router
        .get_last_endpoint()
        .expect("endpoint")
        .expect("utf-8");
    let peer = std::thread::spawn(move || {
        let _context = context;
        let mut seen = Seen::default();
        while seen.envelopes < casts {
            let Ok(parts) = router.recv_multipart(0) else {
                break;
            };
            seen.frames += 1;
            let frames = match split_batch(&parts[1]) {
                None => vec![parts[1].as_slice()],
                Some(split) => {
                    seen.batches += 1;
                    split.expect("a well-formed batch")
                }
            };
            for frame in frames {
                seen.envelopes += 1;
                let cast = Envelope::from_bytes(frame).expect("an envelope");
                let mut ack = Envelope::ack(cast.msg_id);
                ack.version = (PROTOCOL_MAJOR, minor);
                let ack = ack.to_bytes().expect("bytes");
                router
                    .send_multipart([parts[0].as_slice(), &ack], 0)
                    .expect("ack");
            }
        }
        seen
    });
    (endpoint, peer)
}

/// Requests to one peer share frames only once the peer has answered as 1.2 or later, which
/// reads them; a 1.1 peer gets one frame per request, as it always did.
#[tokio::test]
async fn requests_share_frames_only_with_peers_that_read_them() {
    for minor in [1, 2] {
        let (endpoint, peer) = peer_of_minor(minor, 201);
        let (client, _) = Rpc::start(log(), None, fast()).expect("client");
        let client = Arc::new(client);
        let context = RequestContext::internal("p");
        // The first answer tells the client the peer's version.
        client
            .cast(&endpoint, &context, &Ping {})
            .await
            .expect("acked");
        // On this single-threaded runtime the 200 casters each queue their request before the
        // I/O task runs again, so it finds them all waiting.
        let mut casters = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let (client, endpoint, context) = (client.clone(), endpoint.clone(), context.clone());
            casters.spawn(async move { client.cast(&endpoint, &context, &Ping {}).await });
        }
        while let Some(cast) = casters.join_next().await {
            cast.expect("caster").expect("acked");
        }
        let seen = peer.join().expect("peer");
        assert_eq!(seen.envelopes, 201, "1.{minor}: {seen:?}");
        if minor == 1 {
            assert_eq!((seen.frames, seen.batches), (201, 0), "{seen:?}");
        } else {
            assert!(seen.batches >= 1 && seen.frames < 20, "1.{minor}: {seen:?}");
        }
        client.shutdown();
    }
}
