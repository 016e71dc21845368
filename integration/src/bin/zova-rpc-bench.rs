//! Measures the messaging layer on loopback: one client `Rpc`, one server `Rpc`, small messages.
//! Acknowledged casts per second with many in flight (pipelined), then call round trips one at a
//! time (p50/p99), then bare ZeroMQ round trips for scale. The last line is one JSON object for
//! scripts.
//!
//! Client and server share one ZeroMQ context (one I/O thread), as ZeroMQ advises for a process
//! and as the bare round trips do; `--separate-contexts` gives each its own, as two processes
//! would have, and the bare round trips then use two contexts too.
//!
//!     cargo run --release -p integration --bin zova-rpc-bench -- --seconds 5 [--curve]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use integration::{micros, percentile};
use proto::{CurveConfig, Method, Ping, RequestContext, Rpc, RpcOptions};

#[derive(Debug, Parser)]
#[command(about = "Time Zova's acknowledged casts and call round trips over loopback ZeroMQ")]
struct Args {
    /// Seconds for each of the three measurements (casts, calls, bare ZeroMQ).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// CURVE on both sockets (the server trusts only the client's key).
    #[arg(long)]
    curve: bool,
    /// Casts in flight at once.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    in_flight: u32,
    /// A ZeroMQ context (and I/O thread) for the client and one for the server, as in two
    /// processes; the bare ZeroMQ round trips then cross two I/O threads as well. CURVE always
    /// does (a context has one ZAP handler).
    #[arg(long)]
    separate_contexts: bool,
    /// Run only this measurement (the other reports zeros): to profile one of them.
    #[arg(long, value_enum)]
    only: Option<Phase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Casts,
    Calls,
    /// Bare ZeroMQ, no Zova code: the floor under a call's round trip on this machine.
    Zmq,
}

/// Round trips of bare ZeroMQ over loopback TCP, one at a time, between this thread (a DEALER)
/// and an echoing thread (a ROUTER), in one context or two: what a call would cost if Zova added
/// nothing. Returns the sorted latencies and the context switches per round trip.
fn zmq_floor(duration: Duration, separate_contexts: bool) -> Result<(Vec<Duration>, f64), String> {
    let zmq_err = |e: zmq::Error| e.to_string();
    let context = zmq::Context::new();
    let client_context = if separate_contexts {
        zmq::Context::new()
    } else {
        context.clone()
    };
    let router = context.socket(zmq::ROUTER).map_err(zmq_err)?;
    router.set_linger(0).map_err(zmq_err)?;
    router.bind("tcp://127.0.0.1:*").map_err(zmq_err)?;
    let endpoint = router
        .get_last_endpoint()
        .map_err(zmq_err)?
        .map_err(|_| "the ROUTER's endpoint is not UTF-8".to_string())?;
    let echo = std::thread::spawn(move || {
        // Ends when the client's "stop" arrives (or the socket fails).
        while let Ok(frames) = router.recv_multipart(0) {
            let stop = frames.last().is_some_and(|f| f == b"stop");
            if router.send_multipart(frames, 0).is_err() || stop {
                break;
            }
        }
    });
    let dealer = client_context.socket(zmq::DEALER).map_err(zmq_err)?;
    dealer.set_linger(0).map_err(zmq_err)?;
    dealer.connect(&endpoint).map_err(zmq_err)?;
    let payload = [0u8; 64];
    let mut latencies = Vec::new();
    let usage = Usage::now();
    let started = Instant::now();
    while started.elapsed() < duration {
        let sent = Instant::now();
        dealer.send(&payload[..], 0).map_err(zmq_err)?;
        dealer.recv_bytes(0).map_err(zmq_err)?;
        latencies.push(sent.elapsed());
    }
    let (_, switches) = usage.per_op(latencies.len() as u64);
    dealer.send("stop", 0).map_err(zmq_err)?;
    dealer.recv_bytes(0).map_err(zmq_err)?;
    echo.join()
        .map_err(|_| "the echo thread panicked".to_string())?;
    // The first round trip pays for the connection.
    if !latencies.is_empty() {
        latencies.remove(0);
    }
    latencies.sort();
    Ok((latencies, switches))
}

/// CPU time and context switches of the whole process so far: per operation, they show what a
/// phase costs apart from how busy the host was (wall-clock figures move with other load; a
/// context switch is a thread going to sleep, which a round trip pays for every hop).
#[derive(Clone, Copy)]
struct Usage {
    cpu: Duration,
    switches: u64,
}

impl Usage {
    fn now() -> Usage {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let time = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        Usage {
            cpu: time(usage.ru_utime) + time(usage.ru_stime),
            switches: (usage.ru_nvcsw.max(0) + usage.ru_nivcsw.max(0)) as u64,
        }
    }

    /// CPU µs and context switches per operation since `self`.
    fn per_op(self, ops: u64) -> (f64, f64) {
        let now = Usage::now();
        let ops = ops.max(1) as f64;
        (
            micros(now.cpu.saturating_sub(self.cpu)) / ops,
            ((now.switches.saturating_sub(self.switches)) as f64 / ops * 100.0).round() / 100.0,
        )
    }
}

fn context() -> RequestContext {
    RequestContext {
        request_id: proto::new_request_id(),
        user_id: "bench".into(),
        project_id: "bench".into(),
        roles: vec!["member".into()],
        deadline_ms: None,
    }
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let (mut server_options, mut client_options) = (RpcOptions::default(), RpcOptions::default());
    if args.curve {
        let (server_public, server_secret) =
            proto::curve::generate_key_pair().map_err(|e| e.to_string())?;
        let (client_public, client_secret) =
            proto::curve::generate_key_pair().map_err(|e| e.to_string())?;
        server_options.curve = Some(CurveConfig {
            public_key: server_public.clone(),
            secret_key: server_secret,
            trusted_clients: vec![client_public.clone()],
            ..Default::default()
        });
        client_options.curve = Some(CurveConfig {
            public_key: client_public,
            secret_key: client_secret,
            server_public_key: server_public,
            ..Default::default()
        });
    }
    let curve = args.curve;
    let separate_contexts = args.separate_contexts || curve;
    if !separate_contexts {
        proto::share_one_context();
    }
    let (server, incoming) = Rpc::start(log.clone(), Some("tcp://127.0.0.1:*"), server_options)
        .map_err(|e| e.to_string())?;
    let mut incoming = incoming.ok_or("the server has no receiver")?;
    let endpoint = server.endpoint().unwrap_or_default().to_string();
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    let serving = tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            counter.fetch_add(1, Ordering::Relaxed);
            if request.method() == Ping::NAME {
                request.reply::<Ping>(Ok(String::new()));
            }
        }
    });
    let (client, _) = Rpc::start(log, None, client_options).map_err(|e| e.to_string())?;
    let client = Arc::new(client);
    let duration = Duration::from_secs_f64(args.seconds.max(0.1));
    let phase = |phase: Phase| match args.only {
        Some(only) if only != phase => Duration::ZERO,
        _ => duration,
    };

    // Warm up the connection.
    client
        .call(&endpoint, &context(), &Ping {})
        .await
        .map_err(|e| e.to_string())?;

    // Pipelined casts.
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let usage = Usage::now();
    let started = Instant::now();
    let mut casters = tokio::task::JoinSet::new();
    let casters_n = if phase(Phase::Casts).is_zero() {
        0
    } else {
        args.in_flight
    };
    for _ in 0..casters_n {
        let (client, endpoint, acked, failed, stop) = (
            client.clone(),
            endpoint.clone(),
            acked.clone(),
            failed.clone(),
            stop.clone(),
        );
        casters.spawn(async move {
            let context = context();
            while !stop.load(Ordering::Relaxed) {
                match client.cast(&endpoint, &context, &Ping {}).await {
                    Ok(()) => acked.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    tokio::time::sleep(phase(Phase::Casts)).await;
    stop.store(true, Ordering::Relaxed);
    let acked_in_time = acked.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    let (cast_cpu_us, cast_switches) = usage.per_op(acked_in_time);
    while casters.join_next().await.is_some() {}

    // Calls, one at a time, from a task as a service makes them (the runtime's main thread is
    // not one of its workers, so a call from it would pay two more thread hand-overs).
    let usage = Usage::now();
    let calls_for = phase(Phase::Calls);
    let (caller, to) = (client.clone(), endpoint.clone());
    let mut latencies = tokio::spawn(async move {
        let mut latencies = Vec::new();
        let context = context();
        let started = Instant::now();
        while started.elapsed() < calls_for {
            let sent = Instant::now();
            caller
                .call(&to, &context, &Ping {})
                .await
                .map_err(|e| e.to_string())?;
            latencies.push(sent.elapsed());
        }
        Ok::<_, String>(latencies)
    })
    .await
    .map_err(|e| e.to_string())??;
    let (call_cpu_us, call_switches) = usage.per_op(latencies.len() as u64);
    latencies.sort();

    client.shutdown();
    server.shutdown();
    let _ = serving.await;

    let floor_for = phase(Phase::Zmq);
    let (floor, floor_switches) =
        tokio::task::spawn_blocking(move || zmq_floor(floor_for, separate_contexts))
            .await
            .map_err(|e| e.to_string())??;
    Ok(serde_json::json!({
        "curve": curve,
        "zmq_contexts": if separate_contexts { 2 } else { 1 },
        "in_flight": args.in_flight,
        "acked_casts_per_s": (acked_in_time as f64 / elapsed.as_secs_f64()).round(),
        "casts_failed": failed.load(Ordering::Relaxed),
        "calls": latencies.len(),
        "call_p50_us": micros(percentile(&latencies, 0.5)),
        "call_p99_us": micros(percentile(&latencies, 0.99)),
        "call_max_us": micros(percentile(&latencies, 1.0)),
        "cast_cpu_us": (cast_cpu_us * 100.0).round() / 100.0,
        "cast_switches": cast_switches,
        "call_cpu_us": (call_cpu_us * 100.0).round() / 100.0,
        "call_switches": call_switches,
        "served": served.load(Ordering::Relaxed),
        "zmq_floor_p50_us": micros(percentile(&floor, 0.5)),
        "zmq_floor_p99_us": micros(percentile(&floor, 0.99)),
        "zmq_floor_switches": floor_switches,
    }))
}

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(figures) => {
            println!("{figures}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zova-rpc-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
