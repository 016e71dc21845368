//! Boots many servers through a whole in-process fabric (real HTTP, real ZeroMQ on loopback,
//! SQLite, libvirt's test hypervisor) and prints how fast: boots per second and the latency from
//! `POST /servers` to ACTIVE.
//!
//!     cargo run --release -p integration --bin zova-boot-bench -- --servers 200 --concurrency 8
//!
//! With `ZOVA_TEST_POSTGRES=postgres://USER:PASSWORD@HOST/DB` the fabric runs on a fresh
//! PostgreSQL database on that server instead of a SQLite file.

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

use integration::{percentile, Fabric, HostSpec};

#[derive(Debug, Parser)]
#[command(about = "Boot servers through an in-process Zova fabric and print boots/s and latency")]
struct Args {
    /// Servers to boot.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    servers: u32,
    /// Create requests in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Compute hosts (each 64 vCPUs, 256 GB RAM, 4 TB disk).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    hosts: u32,
}

const IMAGE: &str = "155d900f-4e14-4e4c-a73d-069cbf4541e6";
const PER_SERVER_LIMIT: Duration = Duration::from_secs(60);

async fn boot_one(fabric: &Fabric, index: u32) -> Result<Duration, String> {
    let started = Instant::now();
    let body =
        json!({"server": {"name": format!("bench-{index}"), "flavorRef": "1", "imageRef": IMAGE}});
    let id = fabric
        .create_server(&body)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let response = fabric.show_server(&id).await.map_err(|e| e.to_string())?;
        match response.body["server"]["status"].as_str() {
            Some("ACTIVE") => return Ok(started.elapsed()),
            Some("BUILD") if started.elapsed() < PER_SERVER_LIMIT => {}
            other => return Err(format!("server {id} ended as {other:?}: {}", response.body)),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let hosts: Vec<HostSpec> = (1..=args.hosts)
        .map(|i| HostSpec::new(&format!("node-{i}"), 64, 262_144, 4096))
        .collect();
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let fabric = match Fabric::start(&hosts, log).await {
        Ok(fabric) => std::sync::Arc::new(fabric),
        Err(e) => {
            eprintln!("zova-boot-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The seeded `private` /24 holds 253 servers; a second pool, used once it is full, holds
    // the rest of the largest run.
    if let Err(e) = fabric
        .db
        .network_create("bench", "172.16.0.0/16", "172.16.0.1", None)
    {
        eprintln!("zova-boot-bench: {e}");
        return std::process::ExitCode::FAILURE;
    }

    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (fabric, next, total) = (fabric.clone(), next.clone(), args.servers);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= total {
                    return Ok::<_, String>(latencies);
                }
                latencies.push(boot_one(&fabric, index).await?);
            }
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        match worker.await {
            Ok(Ok(mut part)) => latencies.append(&mut part),
            Ok(Err(e)) => {
                eprintln!("zova-boot-bench: {e}");
                return std::process::ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("zova-boot-bench: worker failed: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "booted {} servers on {} hosts ({:?}) with {} in flight in {:.2} s: {:.1} boots/s; POST→ACTIVE p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        latencies.len(),
        args.hosts,
        fabric.db.backend(),
        args.concurrency,
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.95).as_secs_f64() * 1000.0,
        percentile(&latencies, 1.0).as_secs_f64() * 1000.0,
    );
    if let Ok(fabric) = std::sync::Arc::try_unwrap(fabric) {
        fabric.stop().await;
    }
    std::process::ExitCode::SUCCESS
}
