//! Measures the scheduler's two hot paths on N compute hosts with a realistic mix of sizes and
//! free capacity: the host-queue rebuild from a real SQLite file (what the scheduler does every
//! `build_queue_period`), and placement decisions (`HostQueue::select`, the walk and the
//! in-memory charge, on one core). It also measures full placements with the database claim
//! (select + the conditional update + the allocation row), which bound what one scheduler
//! process can commit. The last line is one JSON object for scripts.
//!
//!     cargo run --release -p integration --bin zova-sched-bench -- --hosts 10000 --requests 100000
//!
//! With `ZOVA_TEST_POSTGRES=postgres://USER:PASSWORD@HOST/DB` it runs on a fresh PostgreSQL
//! database on that server instead of a SQLite file.

use std::time::{Duration, Instant};

use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use db::{AllocationClaim, ClaimOutcome, ComputeNodeValues, Db, NewInstance};
use hostqueue::{ComputeNodeRow, HostQueue, PlacementRequest, ResourceRequest};
use integration::{micros, percentile};

#[derive(Debug, Parser)]
#[command(about = "Time Zova's host-queue rebuild and placement decisions on N hosts")]
struct Args {
    /// Compute hosts in the queue.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    hosts: u32,
    /// Placement decisions to time.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    requests: u32,
    /// Placements committed to the database (select + claim) to time.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    claims: u32,
    /// Rebuilds to time (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    rebuilds: u32,
}

/// Nova's default flavors m1.tiny … m1.large: vCPUs, MB RAM, GB root disk.
const FLAVORS: [(i64, i64, i64); 4] = [(1, 512, 1), (1, 2048, 20), (2, 4096, 40), (4, 8192, 80)];

/// Host sizes: vCPUs, MB RAM, GB disk.
const SIZES: [(i64, i64, i64); 3] = [
    (16, 65_536, 500),
    (32, 131_072, 1_000),
    (64, 262_144, 2_000),
];

/// Registers `hosts` compute services and nodes, each 0–90 % used, a tenth of them full.
fn populate(db: &Db, hosts: u32, rng: &mut StdRng) -> Result<(), db::DbError> {
    for i in 1..=hosts {
        let name = format!("node-{i:06}");
        db.service_upsert(&name, "zova-compute", "compute", "tcp://127.0.0.1:1", None)?;
        let (vcpus, memory_mb, local_gb) = SIZES[rng.gen_range(0..SIZES.len())];
        let used = if rng.gen_ratio(1, 10) {
            1.0
        } else {
            rng.gen_range(0.0..0.9)
        };
        db.compute_node_upsert(&ComputeNodeValues {
            host: name.clone(),
            hypervisor_hostname: name,
            hypervisor_type: "test".into(),
            vcpus,
            memory_mb,
            local_gb,
            // With the default cpu ratio 4.0 the vCPU limit is 4x the cores.
            vcpus_used: (vcpus as f64 * 4.0 * used) as i64,
            memory_mb_used: (memory_mb as f64 * used) as i64,
            local_gb_used: (local_gb as f64 * used) as i64,
            running_vms: 0,
            extra_resources: "{}".into(),
        })?;
    }
    Ok(())
}

/// What the scheduler does on a rebuild: read nodes with their services, turn them into rows.
fn read_rows(
    db: &Db,
    config: &scheduler::SchedulerConfig,
) -> Result<Vec<ComputeNodeRow>, db::DbError> {
    let now = chrono::Utc::now().naive_utc();
    Ok(db
        .compute_nodes_with_services()?
        .iter()
        .map(|(node, service)| scheduler::compute_node_row(node, service, now, config))
        .collect())
}

fn request(rng: &mut StdRng) -> PlacementRequest {
    let (vcpus, memory_mb, root_gb) = FLAVORS[rng.gen_range(0..FLAVORS.len())];
    PlacementRequest::new(ResourceRequest::from_flavor(
        vcpus, memory_mb, root_gb, 0, 0,
    ))
}

fn instance(uuid: &str) -> NewInstance {
    NewInstance {
        uuid: uuid.into(),
        display_name: uuid.into(),
        project_id: "bench".into(),
        user_id: "bench".into(),
        flavorid: "1".into(),
        image_ref: "155d900f-4e14-4e4c-a73d-069cbf4541e6".into(),
        vcpus: 1,
        memory_mb: 512,
        root_gb: 1,
        ephemeral_gb: 0,
        swap_mb: 0,
        vm_state: "building".into(),
        task_state: Some("scheduling".into()),
        power_state: 0,
        scheduler_hints: "{}".into(),
        metadata: "{}".into(),
        reservation_id: "r-bench".into(),
        launch_index: 0,
        description: None,
        key_name: None,
        flavor_snapshot: "{}".into(),
    }
}

fn run(args: &Args) -> Result<serde_json::Value, String> {
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    // SQLite, or PostgreSQL when ZOVA_TEST_POSTGRES names a server (a fresh database there).
    let url = db::test_database_url(state.path()).map_err(|e| e.to_string())?;
    let db = Db::open(&url).map_err(|e| e.to_string())?;
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let config = scheduler::SchedulerConfig::default();

    let started = Instant::now();
    populate(&db, args.hosts, &mut rng).map_err(|e| e.to_string())?;
    eprintln!(
        "zova-sched-bench: {} hosts registered in {:.1} s",
        args.hosts,
        started.elapsed().as_secs_f64()
    );

    // Rebuild: the database read and the queue build, as the scheduler does them.
    let mut queue = HostQueue::new(&config.default_queue);
    let mut rebuilds = Vec::new();
    let mut rows = Vec::new();
    for _ in 0..args.rebuilds {
        let started = Instant::now();
        rows = read_rows(&db, &config).map_err(|e| e.to_string())?;
        queue.build_queue(&rows);
        rebuilds.push(started.elapsed());
    }
    rebuilds.sort();
    let rebuild = percentile(&rebuilds, 0.5);
    if queue.len() != args.hosts as usize {
        return Err(format!(
            "the queue holds {} hosts, not {}",
            queue.len(),
            args.hosts
        ));
    }

    // Decisions: the walk and the charge. When the hosts fill up the queue is rebuilt from the
    // same rows (not timed), so the figure is for a queue with room, as in steady state.
    let mut latencies = Vec::with_capacity(args.requests as usize);
    let mut refused = 0u32;
    let mut decisions_started = Instant::now();
    let mut untimed = Duration::ZERO;
    for _ in 0..args.requests {
        let req = request(&mut rng);
        let started = Instant::now();
        let placed = queue.select(&req);
        latencies.push(started.elapsed());
        if placed.is_err() {
            refused += 1;
            let rebuild_started = Instant::now();
            queue.build_queue(&rows);
            untimed += rebuild_started.elapsed();
        }
    }
    let decisions_elapsed = decisions_started.elapsed().saturating_sub(untimed);
    latencies.sort();

    // Full placements: select, then the database claim, one at a time as a scheduler does.
    let uuids: Vec<String> = (0..args.claims).map(|i| format!("bench-{i:07}")).collect();
    let rows_to_insert: Vec<NewInstance> = uuids.iter().map(|u| instance(u)).collect();
    for chunk in rows_to_insert.chunks(1_000) {
        db.instances_create(chunk, "req-bench")
            .map_err(|e| e.to_string())?;
    }
    // An address for every claim, as the all-in-one's `load` network gives its servers: a
    // claim that finds the pool empty skips the address and costs less.
    db.network_create("bench", "172.16.0.0/16", "172.16.0.1", None)
        .map_err(|e| e.to_string())?;
    queue.build_queue(&read_rows(&db, &config).map_err(|e| e.to_string())?);
    let mut claim_latencies = Vec::with_capacity(uuids.len());
    let mut lost = 0u32;
    decisions_started = Instant::now();
    for uuid in &uuids {
        let req = PlacementRequest::new(ResourceRequest::from_flavor(1, 512, 1, 0, 0));
        let started = Instant::now();
        let placement = queue.select(&req).map_err(|e| e.to_string())?;
        let outcome = db
            .allocation_claim(&AllocationClaim {
                instance_uuid: uuid.clone(),
                node_id: placement.node_id,
                usage: db::Placed {
                    vcpus: 1,
                    memory_mb: 512,
                    disk_mb: 1024,
                },
                limits: db::Placed {
                    vcpus: placement.limits.vcpu.floor() as i64,
                    memory_mb: placement.limits.memory_mb.floor() as i64,
                    disk_mb: (placement.limits.disk_gb * 1024.0).floor() as i64,
                },
                moving_from: None,
            })
            .map_err(|e| e.to_string())?;
        claim_latencies.push(started.elapsed());
        if !matches!(outcome, ClaimOutcome::Claimed(Some(_))) {
            lost += 1;
        }
    }
    let claims_elapsed = decisions_started.elapsed();
    claim_latencies.sort();

    Ok(serde_json::json!({
        "database": format!("{:?}", db.backend()).to_lowercase(),
        "hosts": args.hosts,
        "requests": args.requests,
        "decisions_per_s": (f64::from(args.requests) / decisions_elapsed.as_secs_f64()).round(),
        "p50_us": micros(percentile(&latencies, 0.5)),
        "p99_us": micros(percentile(&latencies, 0.99)),
        "max_us": micros(percentile(&latencies, 1.0)),
        "refused": refused,
        "rebuild_ms": (rebuild.as_secs_f64() * 1e4).round() / 10.0,
        "claims": args.claims,
        "claims_per_s": if args.claims == 0 { 0.0 } else {
            (f64::from(args.claims) / claims_elapsed.as_secs_f64()).round()
        },
        "claim_p50_us": micros(percentile(&claim_latencies, 0.5)),
        "claim_p99_us": micros(percentile(&claim_latencies, 0.99)),
        "claims_not_taken": lost,
    }))
}

// mimalloc: glibc's malloc was a fifth of a busy service's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(figures) => {
            println!("{figures}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zova-sched-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
