//! How fast the scheduler decides: `HostQueue::select` over queues of 1,000, 10,000 and
//! 100,000 hosts, plus one `scheduler_host_match` case and `build_queue` itself.
//!
//! The hosts come in a few sizes with 0–90% already used and about one in twenty full, and the
//! requests cycle through Nova's classic flavors, so a walk skips some hosts before it finds
//! room. The queue is rebuilt from the rows (outside the timed part) long before it fills up,
//! so every figure is a steady-state decision rather than a walk over a full queue.
//!
//! Run with `cargo bench -p hostqueue --bench select`; criterion's "thrpt" line is decisions
//! per second.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hostqueue::{ComputeNodeRow, HostMatch, HostQueue, Placed, PlacementRequest, ResourceRequest};

/// Host shapes: vCPUs, MB of RAM, GB of disk.
const HOST_SIZES: [(i64, i64, i64); 4] = [
    (8, 16_384, 200),
    (16, 65_536, 500),
    (32, 131_072, 1_000),
    (64, 262_144, 2_000),
];

/// m1.tiny, m1.small, m1.medium, m1.large: vCPUs, MB of RAM, GB of root disk.
const FLAVORS: [(i64, i64, i64); 4] = [(1, 512, 1), (1, 2048, 20), (2, 4096, 40), (4, 8192, 80)];

/// A small deterministic generator (xorshift64*), so every run benchmarks the same hosts.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// `n` enabled hosts node-000000.. with Nova's default ratios (16 vCPUs per core, 1.5 for
/// RAM), 0–90% used, and about one in twenty full.
fn compute_node_rows(n: usize) -> Vec<ComputeNodeRow> {
    let mut rng = Xorshift(0x5eed_cafe_f00d);
    (0..n)
        .map(|i| {
            let (vcpus, memory_mb, local_gb) = HOST_SIZES[rng.below(4) as usize];
            let used_percent = if rng.below(20) == 0 {
                100
            } else {
                rng.below(91) as i64
            };
            let name = format!("node-{i:06}");
            ComputeNodeRow {
                node_id: i as i64 + 1,
                hypervisor_hostname: name.clone(),
                host: name.clone(),
                rpc_endpoint: format!("tcp://{name}:5570"),
                vcpus,
                // Capacity is 16 vCPUs per core, so a full host reports 16x its cores in use.
                vcpus_used: vcpus * 16 * used_percent / 100,
                memory_mb,
                free_ram_mb: memory_mb - memory_mb * 3 / 2 * used_percent / 100,
                local_gb,
                free_disk_gb: local_gb - local_gb * used_percent / 100,
                placed: Placed::default(),
                reserved_host_memory_mb: 512,
                reserved_host_disk_mb: 0,
                queue_name: None,
                cpu_allocation_ratio: 16.0,
                ram_allocation_ratio: 1.5,
                disk_allocation_ratio: 1.0,
                disabled: false,
                disabled_reason: None,
                up: true,
            }
        })
        .collect()
}

/// A repeating mix of flavors, drawn at random so the walk does not settle into a pattern.
fn requests(host_match: Option<&HostMatch>) -> Vec<PlacementRequest> {
    let mut rng = Xorshift(0x0f1a_7025);
    (0..1024)
        .map(|_| {
            let (vcpus, memory_mb, root_gb) = FLAVORS[rng.below(4) as usize];
            let mut request = PlacementRequest::new(ResourceRequest::from_flavor(
                vcpus, memory_mb, root_gb, 0, 0,
            ));
            request.scheduler_host_match = host_match.cloned();
            request
        })
        .collect()
}

/// Times `select` over `requests` in a loop, rebuilding the queue from `rows` (untimed) every
/// `rebuild_every` decisions so that it never fills up.
fn bench_select(
    c: &mut Criterion,
    group_name: &str,
    hosts: usize,
    host_match: Option<&HostMatch>,
    rebuild_every: u64,
) {
    let rows = compute_node_rows(hosts);
    let requests = requests(host_match);
    let mut queue = HostQueue::new("kvm");
    queue.build_queue(&rows);
    let mut since_rebuild = 0u64;
    let mut next_request = 0usize;

    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::from_parameter(hosts), |b| {
        b.iter_custom(|iterations| {
            let mut timed = Duration::ZERO;
            let mut done = 0;
            while done < iterations {
                let batch = (iterations - done).min(rebuild_every - since_rebuild);
                let start = Instant::now();
                for _ in 0..batch {
                    let request = &requests[next_request % requests.len()];
                    next_request += 1;
                    let placement = queue.select(black_box(request));
                    assert!(placement.is_ok(), "the queue filled up: rebuild more often");
                    black_box(placement).ok();
                }
                timed += start.elapsed();
                done += batch;
                since_rebuild += batch;
                if since_rebuild == rebuild_every {
                    queue.build_queue(&rows);
                    since_rebuild = 0;
                }
            }
            timed
        });
    });
    group.finish();
}

fn select_without_hints(c: &mut Criterion) {
    for hosts in [1_000, 10_000, 100_000] {
        // A quarter of the queue's length: each host takes about one instance per rebuild.
        bench_select(c, "select", hosts, None, hosts as u64 / 4);
    }
}

fn select_with_host_match(c: &mut Criterion) {
    // One host in ten ends in 7; rebuilding every 250 decisions leaves most of them room.
    let host_match = HostMatch::new(r"^node-\d*7$").expect("the pattern compiles");
    bench_select(
        c,
        "select_scheduler_host_match",
        10_000,
        Some(&host_match),
        250,
    );
}

fn build_queue(c: &mut Criterion) {
    let rows = compute_node_rows(10_000);
    let mut queue = HostQueue::new("kvm");
    c.bench_function("build_queue/10000", |b| {
        b.iter(|| queue.build_queue(black_box(&rows)));
    });
}

criterion_group!(
    benches,
    select_without_hints,
    select_with_host_match,
    build_queue
);
criterion_main!(benches);
