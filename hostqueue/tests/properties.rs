//! Property tests for [`HostQueue`]: over random host sets and random sequences of placements,
//! multi-creates, rebuilds, releases and hosts that stop answering, no host is charged past its
//! limits, every chosen host qualified, and every "no valid host" tells the truth.
//!
//! Each operation is judged against a copy of the queue state taken just before it, read
//! through the public API only (`queue_names`, `get_host_queue`, `host`, `unavailable`). The
//! walk's round-robin cursor is private, so the test keeps its own copy by the documented rules
//! (one past the chosen host after a placement, unmoved by a forced one or a refusal, kept
//! across rebuilds and wrapped to the start when its queue got shorter, shifted when a host
//! before it leaves the queue); that copy tells which hosts a walk bounded by `boundary_host`
//! reaches, and which host round robin owes the next request.

use std::collections::{BTreeMap, BTreeSet};

use hostqueue::{
    check_host_resource, ComputeNodeRow, Direction, Elimination, HostMatch, HostQueue, HostState,
    NoValidHost, Placed, Placement, PlacementRequest, ResourceRequest, Unavailable,
    UnavailableReason,
};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::TestCaseError;

const DEFAULT_QUEUE: &str = "kvm";
/// Hosts per case: 1 to 39.
const MAX_HOSTS: usize = 40;
/// Hints and forced hosts also name a few hosts that do not exist.
const NAMEABLE_HOSTS: usize = MAX_HOSTS + 4;

fn hostname(i: usize) -> String {
    format!("node-{i}")
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Allocation ratios, including the ones `from_row` must read as 1.0.
fn allocation_ratio() -> impl Strategy<Value = f64> {
    select(vec![
        1.0,
        1.5,
        2.0,
        16.0,
        0.5,
        1.3,
        0.0,
        -1.0,
        f64::NAN,
        f64::INFINITY,
    ])
}

/// One compute-node row with a placeholder name. Usage is drawn as a percentage of the total
/// (up to 110%, so some hosts start over-used) so that it shrinks independently of the total.
fn compute_node_row() -> impl Strategy<Value = ComputeNodeRow> {
    let totals = (0..=64i64, 0..=128i64, 0..=1000i64);
    let reported_percent = (0..=110i64, 0..=110i64, 0..=110i64);
    let placed_percent = (0..=110i64, 0..=110i64, 0..=110i64);
    let reserved = (
        select(vec![0i64, 512, 4096, 1 << 20]),
        select(vec![0i64, 1024, 20 * 1024, 1 << 30]),
    );
    let queue_name = select(vec![None, Some(""), Some("kvm"), Some("gpu")]);
    let ratios = (allocation_ratio(), allocation_ratio(), allocation_ratio());
    let service = (
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.9),
        prop::option::of(select(vec!["", "maintenance"])),
    );
    (
        totals,
        reported_percent,
        placed_percent,
        reserved,
        queue_name,
        ratios,
        service,
    )
        .prop_map(
            |(
                (vcpus, memory_gb, local_gb),
                (vcpus_pct, ram_pct, disk_pct),
                (placed_vcpus_pct, placed_ram_pct, placed_disk_pct),
                (reserved_host_memory_mb, reserved_host_disk_mb),
                queue_name,
                (cpu_allocation_ratio, ram_allocation_ratio, disk_allocation_ratio),
                (disabled, up, disabled_reason),
            )| {
                let memory_mb = memory_gb * 1024;
                ComputeNodeRow {
                    node_id: 0,
                    hypervisor_hostname: String::new(),
                    host: String::new(),
                    rpc_endpoint: String::new(),
                    vcpus,
                    vcpus_used: vcpus * vcpus_pct / 100,
                    memory_mb,
                    free_ram_mb: memory_mb - memory_mb * ram_pct / 100,
                    local_gb,
                    free_disk_gb: local_gb - local_gb * disk_pct / 100,
                    placed: Placed {
                        vcpus: vcpus * placed_vcpus_pct / 100,
                        memory_mb: memory_mb * placed_ram_pct / 100,
                        disk_mb: local_gb * 1024 * placed_disk_pct / 100,
                    },
                    reserved_host_memory_mb,
                    reserved_host_disk_mb,
                    queue_name: queue_name.map(str::to_owned),
                    cpu_allocation_ratio,
                    ram_allocation_ratio,
                    disk_allocation_ratio,
                    disabled,
                    disabled_reason: disabled_reason.map(str::to_owned),
                    up,
                }
            },
        )
}

/// 1 to 39 rows named node-0, node-1, ...; now and then a row repeats an earlier row's name
/// (the last row for a host wins).
fn compute_node_rows() -> impl Strategy<Value = Vec<ComputeNodeRow>> {
    prop::collection::vec(
        (
            compute_node_row(),
            prop::option::weighted(0.05, any::<Index>()),
        ),
        1..MAX_HOSTS,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (row, repeat))| {
                let name_index = match repeat {
                    Some(earlier) if i > 0 => earlier.index(i),
                    _ => i,
                };
                let name = hostname(name_index);
                ComputeNodeRow {
                    node_id: i as i64 + 1,
                    rpc_endpoint: format!("tcp://{name}:5570"),
                    host: name.clone(),
                    hypervisor_hostname: name,
                    ..row
                }
            })
            .collect()
    })
}

fn resource_request() -> impl Strategy<Value = ResourceRequest> {
    (
        select(vec![-1i64, 0, 1, 2, 4, 8, 64]),
        select(vec![-512i64, 0, 512, 2048, 4096, 8192, 65536]),
        select(vec![-1i64, 0, 1, 20, 40, 80, 160, 2000]),
        select(vec![0i64, 512]),
    )
        .prop_map(|(vcpus, memory_mb, disk_gb, swap_mb)| {
            ResourceRequest::from_flavor(vcpus, memory_mb, disk_gb, 0, swap_mb)
        })
}

fn host_names() -> impl Strategy<Value = BTreeSet<String>> {
    prop::collection::vec(0..NAMEABLE_HOSTS, 0..6)
        .prop_map(|indexes| indexes.into_iter().map(hostname).collect())
}

fn placement_request() -> impl Strategy<Value = PlacementRequest> {
    let queue_name = prop_oneof![
        4 => Just(None),
        1 => select(vec![Some(""), Some("kvm"), Some("gpu"), Some("nope")]),
    ];
    let host_match = prop::option::weighted(
        0.25,
        select(vec![
            "^node-[0-3]$",
            "^node-1",
            "[02468]$",
            "node",
            "^gpu",
            "xyz",
            "",
        ]),
    );
    let same_host = prop::option::weighted(0.15, host_names());
    let avoided = prop_oneof![2 => Just(BTreeSet::new()), 1 => host_names()];
    let direction = prop_oneof![Just(Direction::Forward), Just(Direction::Backward)];
    let boundary_host = prop::option::weighted(0.25, 0..NAMEABLE_HOSTS);
    let forced = prop::option::weighted(0.1, (0..NAMEABLE_HOSTS, any::<bool>()));
    (
        resource_request(),
        queue_name,
        host_match,
        same_host,
        avoided.clone(),
        avoided,
        direction,
        boundary_host,
        forced,
    )
        .prop_map(
            |(
                resources,
                queue_name,
                host_match,
                same_host,
                different_host,
                tried_hosts,
                direction,
                boundary_host,
                forced,
            )| PlacementRequest {
                resources,
                queue_name: queue_name.map(str::to_owned),
                scheduler_host: forced.map(|(i, _)| hostname(i)),
                scheduler_host_match: host_match
                    .map(|pattern| HostMatch::new(pattern).expect("the test's patterns compile")),
                same_host,
                different_host,
                tried_hosts,
                skip_forced_host_resource_check: forced.is_some_and(|(_, skip)| skip),
                direction,
                boundary_host: boundary_host.map(hostname),
            },
        )
}

#[derive(Debug, Clone)]
enum Operation {
    Select(PlacementRequest),
    /// The API checks 1 <= min_count <= max_count, so only such batches are drawn.
    SelectMany {
        request: PlacementRequest,
        count: usize,
        min_count: usize,
    },
    /// `build_queue` again from the same rows.
    Rebuild,
    /// Gives back one earlier placement (this number modulo how many there are), as the
    /// scheduler does when a cast fails.
    Release(usize),
    /// The host did not take a cast.
    MarkUnavailable(usize),
}

fn operation() -> impl Strategy<Value = Operation> {
    let batch = (1..=6usize).prop_flat_map(|count| (Just(count), 1..=count));
    prop_oneof![
        12 => placement_request().prop_map(Operation::Select),
        2 => (placement_request(), batch).prop_map(|(request, (count, min_count))| {
            Operation::SelectMany { request, count, min_count }
        }),
        1 => Just(Operation::Rebuild),
        2 => any::<usize>().prop_map(Operation::Release),
        1 => (0..NAMEABLE_HOSTS).prop_map(Operation::MarkUnavailable),
    ]
}

// ---------------------------------------------------------------------------------------------
// The test's own reading of the rules
// ---------------------------------------------------------------------------------------------

/// Every queue's hosts and every unavailable host, as the public API shows them.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    queues: BTreeMap<String, Vec<HostState>>,
    unavailable: BTreeMap<String, Unavailable>,
}

impl Snapshot {
    fn of(queue: &HostQueue) -> Self {
        Snapshot {
            queues: queue
                .queue_names()
                .map(|name| (name.to_owned(), queue.get_host_queue(name).to_vec()))
                .collect(),
            unavailable: queue.unavailable().clone(),
        }
    }

    fn queue(&self, queue_name: &str) -> &[HostState] {
        self.queues.get(queue_name).map_or(&[], Vec::as_slice)
    }

    /// An available host and its queue and position.
    fn find(&self, hostname: &str) -> Option<(&str, usize, &HostState)> {
        self.queues.iter().find_map(|(queue_name, hosts)| {
            hosts
                .iter()
                .position(|h| h.hostname == hostname)
                .map(|pos| (queue_name.as_str(), pos, &hosts[pos]))
        })
    }

    fn hosts(&self) -> impl Iterator<Item = &HostState> {
        self.queues.values().flatten()
    }

    /// A copy with `hostname` changed by `change`.
    fn with_host(&self, hostname: &str, change: impl FnOnce(&mut HostState)) -> Snapshot {
        let mut changed = self.clone();
        if let Some(host) = changed
            .queues
            .values_mut()
            .flatten()
            .find(|h| h.hostname == hostname)
        {
            change(host);
        }
        changed
    }
}

/// What a placement takes: negative amounts take nothing; disk is charged in GB.
fn charged(host: &mut HostState, resources: &ResourceRequest) {
    let vcpus = resources.requested_vcpus.max(0) as f64;
    host.free_vcpus -= vcpus;
    host.vcpus_used += vcpus;
    host.free_memory_mb -= resources.requested_ram.max(0) as f64;
    host.free_local_gb -= resources.requested_disk.max(0) as f64 / 1024.0;
}

/// Every host hint `hostname` fails, in check order. `scheduler_host_match` does not apply to
/// a forced host.
fn hint_failures(hostname: &str, req: &PlacementRequest) -> Vec<Elimination> {
    let mut failures = Vec::new();
    if let Some(pattern) = &req.scheduler_host_match {
        if req.scheduler_host.is_none() && !pattern.is_match(hostname) {
            failures.push(Elimination::NotMatching);
        }
    }
    if let Some(same_host) = &req.same_host {
        if !same_host.contains(hostname) {
            failures.push(Elimination::NotSameHost);
        }
    }
    if req.different_host.contains(hostname) {
        failures.push(Elimination::DifferentHost);
    }
    if req.tried_hosts.contains(hostname) {
        failures.push(Elimination::AlreadyTried);
    }
    failures
}

/// Every resource `host` lacks for `resources`: disk always counts, RAM and vCPUs only when
/// asked for.
fn resource_failures(host: &HostState, resources: &ResourceRequest) -> Vec<Elimination> {
    let mut failures = Vec::new();
    if host.free_local_gb * 1024.0 < resources.requested_disk as f64 {
        failures.push(Elimination::InsufficientDisk);
    }
    if resources.requested_ram > 0 && host.free_memory_mb < resources.requested_ram as f64 {
        failures.push(Elimination::InsufficientRam);
    }
    if resources.requested_vcpus > 0 && host.free_vcpus < resources.requested_vcpus as f64 {
        failures.push(Elimination::InsufficientVcpus);
    }
    failures
}

fn walk_position(start: usize, step: usize, len: usize, direction: Direction) -> usize {
    match direction {
        Direction::Forward => (start + step) % len,
        Direction::Backward => (start + len - step % len) % len,
    }
}

/// The positions a walk from `start` visits, in order: one lap, stopping before
/// `boundary_host` unless the walk starts on it.
fn walk(hosts: &[HostState], start: usize, req: &PlacementRequest) -> Vec<usize> {
    let len = hosts.len();
    let boundary = req
        .boundary_host
        .as_deref()
        .and_then(|name| hosts.iter().position(|h| h.hostname == name));
    let mut visited = Vec::new();
    for step in 0..len {
        let pos = walk_position(start, step, len, req.direction);
        if step > 0 && Some(pos) == boundary {
            break;
        }
        visited.push(pos);
    }
    visited
}

/// The queue a rebuild from `rows` must produce, by the documented rules.
fn expected_build(rows: &[ComputeNodeRow]) -> Snapshot {
    let mut latest: BTreeMap<&str, &ComputeNodeRow> = BTreeMap::new();
    for row in rows {
        latest.insert(&row.hypervisor_hostname, row);
    }
    let mut expected = Snapshot {
        queues: BTreeMap::new(),
        unavailable: BTreeMap::new(),
    };
    for (name, row) in latest {
        let state = HostState::from_row(row, DEFAULT_QUEUE);
        let reason = if row.disabled {
            Some(UnavailableReason::Disabled(row.disabled_reason.clone()))
        } else if !row.up {
            Some(UnavailableReason::Down)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                expected.unavailable.insert(
                    name.to_owned(),
                    Unavailable {
                        queue_name: state.queue_name,
                        reason,
                    },
                );
            }
            None => expected
                .queues
                .entry(state.queue_name.clone())
                .or_default()
                .push(state),
        }
    }
    expected
}

fn free_resources(host: &HostState) -> [f64; 3] {
    [host.free_vcpus, host.free_memory_mb, host.free_local_gb]
}

fn capacities(host: &HostState) -> [f64; 3] {
    [host.vcpus, host.memory_mb, host.local_gb]
}

// ---------------------------------------------------------------------------------------------
// The harness: the queue under test plus what the test knows about it
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Harness<'a> {
    rows: &'a [ComputeNodeRow],
    queue: HostQueue,
    /// The test's copy of each queue's cursor (absent: 0).
    cursor: BTreeMap<String, usize>,
    /// Hosts whose free resources may be negative: they were at the last rebuild, or a forced
    /// placement skipped the resource check on them since.
    may_be_negative: BTreeSet<String>,
    /// Placements not given back yet, for `Operation::Release`.
    placements: Vec<(String, ResourceRequest)>,
}

impl<'a> Harness<'a> {
    fn new(rows: &'a [ComputeNodeRow]) -> Result<Self, TestCaseError> {
        let mut harness = Harness {
            rows,
            queue: HostQueue::new(DEFAULT_QUEUE),
            cursor: BTreeMap::new(),
            may_be_negative: BTreeSet::new(),
            placements: Vec::new(),
        };
        harness.rebuild()?;
        Ok(harness)
    }

    fn apply(&mut self, operation: &Operation) -> Result<(), TestCaseError> {
        match operation {
            Operation::Select(request) => self.select(request).map(drop),
            Operation::SelectMany {
                request,
                count,
                min_count,
            } => self.select_many(request, *count, *min_count),
            Operation::Rebuild => self.rebuild(),
            Operation::Release(which) => self.release(*which),
            Operation::MarkUnavailable(i) => self.mark_unavailable(&hostname(*i)),
        }
    }

    fn rebuild(&mut self) -> Result<(), TestCaseError> {
        self.queue.build_queue(self.rows);
        let after = Snapshot::of(&self.queue);
        prop_assert_eq!(
            &after,
            &expected_build(self.rows),
            "a rebuild starts from the rows again"
        );
        self.cursor.retain(|queue_name, cursor| {
            let len = after.queue(queue_name).len();
            if *cursor >= len {
                *cursor = 0;
            }
            len > 0
        });
        self.may_be_negative = after
            .hosts()
            .filter(|h| free_resources(h).iter().any(|&free| free < 0.0))
            .map(|h| h.hostname.clone())
            .collect();
        self.check_invariants(None, &after, None)
    }

    /// `select`, checked against the state before it.
    fn select(
        &mut self,
        req: &PlacementRequest,
    ) -> Result<Result<Placement, NoValidHost>, TestCaseError> {
        let before = Snapshot::of(&self.queue);
        let outcome = self.queue.select(req);
        let after = Snapshot::of(&self.queue);
        match &req.scheduler_host {
            Some(forced) => self.check_forced(forced, req, &outcome, &before, &after)?,
            None => self.check_walk(req, &outcome, &before, &after)?,
        }
        if let Ok(placement) = &outcome {
            self.placements
                .push((placement.hostname.clone(), req.resources));
        }
        let exempt = req
            .skip_forced_host_resource_check
            .then_some(req.scheduler_host.as_deref())
            .flatten();
        self.check_invariants(Some(&before), &after, exempt)?;
        Ok(outcome)
    }

    fn check_forced(
        &mut self,
        forced: &str,
        req: &PlacementRequest,
        outcome: &Result<Placement, NoValidHost>,
        before: &Snapshot,
        after: &Snapshot,
    ) -> Result<(), TestCaseError> {
        let was = before.find(forced).map(|(_, _, host)| host);
        let may_take = was.is_some_and(|host| {
            hint_failures(forced, req).is_empty()
                && (req.skip_forced_host_resource_check
                    || check_host_resource(host, &req.resources))
        });
        match (outcome, was) {
            (Ok(placement), Some(was)) => {
                prop_assert!(may_take, "forced onto {forced} against the rules: {was:?}");
                prop_assert_eq!(&placement.hostname, forced);
                prop_assert_eq!(placement.limits, was.limits);
                prop_assert_eq!(
                    after,
                    &before.with_host(forced, |h| charged(h, &req.resources)),
                    "a forced placement charges the forced host, and only it"
                );
                if req.skip_forced_host_resource_check {
                    self.may_be_negative.insert(forced.to_owned());
                }
            }
            (Ok(placement), None) => {
                prop_assert!(false, "forced onto unavailable {forced}: {placement:?}");
            }
            (Err(err), _) => {
                prop_assert!(
                    !may_take,
                    "forced {forced} refused although it qualified: {err}"
                );
                prop_assert_eq!(after, before, "a refusal charges nothing");
                prop_assert!(err.eliminated.is_empty(), "{err:?}");
                if was.is_none() {
                    let why = if before.unavailable.contains_key(forced) {
                        format!("Host {forced} is not available: ")
                    } else {
                        format!("Host {forced} is unknown")
                    };
                    prop_assert!(err.reason.starts_with(&why), "{err}");
                }
            }
        }
        Ok(())
    }

    fn check_walk(
        &mut self,
        req: &PlacementRequest,
        outcome: &Result<Placement, NoValidHost>,
        before: &Snapshot,
        after: &Snapshot,
    ) -> Result<(), TestCaseError> {
        let queue_name = req.queue(DEFAULT_QUEUE).to_owned();
        let hosts = before.queue(&queue_name);
        let len = hosts.len();
        let start = match len {
            0 => 0,
            _ => self.cursor.get(&queue_name).copied().unwrap_or(0) % len,
        };
        let visited = walk(hosts, start, req);
        let qualifies = |host: &HostState| {
            hint_failures(&host.hostname, req).is_empty()
                && check_host_resource(host, &req.resources)
        };
        let first_qualified = visited.iter().copied().find(|&pos| qualifies(&hosts[pos]));

        match outcome {
            Ok(placement) => {
                let found = hosts.iter().position(|h| h.hostname == placement.hostname);
                let Some(pos) = found else {
                    return Err(TestCaseError::fail(format!(
                        "placed on {} outside queue '{queue_name}'",
                        placement.hostname
                    )));
                };
                let was = &hosts[pos];
                prop_assert!(
                    check_host_resource(was, &req.resources),
                    "placed on a host without room: {was:?}"
                );
                prop_assert_eq!(
                    hint_failures(&was.hostname, req),
                    Vec::<Elimination>::new(),
                    "placed on a host a hint excludes"
                );
                prop_assert!(
                    visited.contains(&pos),
                    "placed on {} beyond boundary_host (walk {visited:?})",
                    was.hostname
                );
                prop_assert_eq!(
                    Some(pos),
                    first_qualified,
                    "round robin: the first qualifying host from the cursor"
                );
                prop_assert_eq!(
                    placement,
                    &Placement {
                        node_id: was.node_id,
                        hostname: was.hostname.clone(),
                        host: was.host.clone(),
                        rpc_endpoint: was.rpc_endpoint.clone(),
                        limits: was.limits,
                    }
                );
                prop_assert_eq!(
                    after,
                    &before.with_host(&was.hostname, |h| charged(h, &req.resources)),
                    "a placement charges the chosen host, and only it"
                );
                self.cursor
                    .insert(queue_name, walk_position(pos, 1, len, req.direction));
            }
            Err(err) => {
                prop_assert_eq!(
                    first_qualified,
                    None,
                    "refused although a host the walk reached qualified: {}",
                    err
                );
                if req.boundary_host.is_none() {
                    // Without a boundary the claim does not depend on the test's cursor.
                    prop_assert!(!hosts.iter().any(qualifies), "refused: {err}");
                }
                prop_assert_eq!(after, before, "a refusal charges nothing");
                check_eliminated(err, &queue_name, req, before, &visited)?;
            }
        }
        Ok(())
    }

    /// `select_many`, checked against a replay of single `select`s on a copy of the queue.
    fn select_many(
        &mut self,
        req: &PlacementRequest,
        count: usize,
        min_count: usize,
    ) -> Result<(), TestCaseError> {
        let before = Snapshot::of(&self.queue);
        let mut replay = self.clone();
        let mut placements = Vec::new();
        let mut shortfall = None;
        while placements.len() < count {
            match replay.select(req)? {
                Ok(placement) => placements.push(placement),
                Err(err) => {
                    shortfall = Some(err);
                    break;
                }
            }
        }

        let outcome = self.queue.select_many(req, count, min_count);
        let after = Snapshot::of(&self.queue);
        // The walks moved the cursor whether or not the batch was kept.
        self.cursor = replay.cursor.clone();
        match outcome {
            Ok(batch) => {
                prop_assert!(
                    (min_count..=count).contains(&batch.placements.len()),
                    "{} placements for {min_count}..={count}",
                    batch.placements.len()
                );
                prop_assert_eq!(&batch.placements, &placements, "one select per instance");
                prop_assert_eq!(&batch.shortfall, &shortfall);
                prop_assert_eq!(&after, &Snapshot::of(&replay.queue));
                self.placements = replay.placements;
                self.may_be_negative = replay.may_be_negative;
            }
            Err(err) => {
                prop_assert!(
                    placements.len() < min_count,
                    "refused although {} of {min_count} fit: {err}",
                    placements.len()
                );
                prop_assert_eq!(&after, &before, "a refused batch leaves nothing charged");
                let Some(shortfall) = shortfall else {
                    return Err(TestCaseError::fail(format!(
                        "refused without a shortfall: {err}"
                    )));
                };
                prop_assert_eq!(&err.eliminated, &shortfall.eliminated);
                prop_assert!(err.reason.ends_with(&shortfall.reason), "{err}");
            }
        }
        let exempt = req
            .skip_forced_host_resource_check
            .then_some(req.scheduler_host.as_deref())
            .flatten();
        self.check_invariants(Some(&before), &after, exempt)
    }

    fn release(&mut self, which: usize) -> Result<(), TestCaseError> {
        if self.placements.is_empty() {
            return Ok(());
        }
        let (hostname, resources) = self.placements.swap_remove(which % self.placements.len());
        let before = Snapshot::of(&self.queue);
        self.queue.release_host(&hostname, &resources);
        let after = Snapshot::of(&self.queue);
        let released = [
            resources.requested_vcpus.max(0) as f64,
            resources.requested_ram.max(0) as f64,
            resources.requested_disk.max(0) as f64 / 1024.0,
        ];
        match (before.find(&hostname), after.find(&hostname)) {
            (Some((_, _, was)), Some((_, _, now))) => {
                let per_resource = free_resources(was)
                    .into_iter()
                    .zip(free_resources(now))
                    .zip(capacities(was))
                    .zip(released);
                for (((was_free, now_free), capacity), released) in per_resource {
                    prop_assert!(
                        was_free <= now_free && now_free - was_free <= released,
                        "a release gives back at most what was charged: {was:?} -> {now:?}"
                    );
                    prop_assert!(
                        now_free <= capacity.max(was_free),
                        "a release never rises above capacity: {was:?} -> {now:?}"
                    );
                }
                let unchanged = before.with_host(&hostname, |h| *h = now.clone());
                prop_assert_eq!(&after, &unchanged, "a release touches only its host");
            }
            _ => prop_assert_eq!(&after, &before, "releasing an unavailable host is ignored"),
        }
        self.check_invariants(Some(&before), &after, None)
    }

    fn mark_unavailable(&mut self, hostname: &str) -> Result<(), TestCaseError> {
        let before = Snapshot::of(&self.queue);
        self.queue
            .mark_unavailable(hostname, UnavailableReason::NotAnswering);
        let after = Snapshot::of(&self.queue);
        let Some((queue_name, pos, _)) = before.find(hostname) else {
            prop_assert_eq!(&after, &before, "an unavailable or unknown host is ignored");
            return Ok(());
        };
        let mut expected = before.clone();
        let unavailable = Unavailable {
            queue_name: queue_name.to_owned(),
            reason: UnavailableReason::NotAnswering,
        };
        expected
            .unavailable
            .insert(hostname.to_owned(), unavailable);
        let hosts = expected.queues.entry(queue_name.to_owned()).or_default();
        hosts.remove(pos);
        let len = hosts.len();
        if len == 0 {
            expected.queues.remove(queue_name);
            self.cursor.remove(queue_name);
        } else if let Some(cursor) = self.cursor.get_mut(queue_name) {
            // The cursor keeps pointing at the same next host.
            if *cursor > pos {
                *cursor -= 1;
            }
            if *cursor >= len {
                *cursor = 0;
            }
        }
        prop_assert_eq!(&after, &expected);
        self.check_invariants(Some(&before), &after, None)
    }

    /// After every operation: every available host is reachable by name, no free resource
    /// is NaN or above capacity, none is negative unless allowed, and (except on the host a
    /// forced placement skipped the check for) none went lower than both its value before
    /// the operation and zero.
    fn check_invariants(
        &self,
        before: Option<&Snapshot>,
        after: &Snapshot,
        exempt: Option<&str>,
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(after.hosts().count(), self.queue.len());
        for host in after.hosts() {
            prop_assert_eq!(self.queue.host(&host.hostname), Some(host));
            let free = free_resources(host);
            for (i, capacity) in capacities(host).into_iter().enumerate() {
                prop_assert!(!free[i].is_nan(), "NaN: {host:?}");
                prop_assert!(free[i] <= capacity, "free above capacity: {host:?}");
                prop_assert!(
                    free[i] >= 0.0 || self.may_be_negative.contains(&host.hostname),
                    "charged past its limits: {host:?}"
                );
            }
            let was = before.and_then(|b| b.find(&host.hostname));
            if let (Some((_, _, was)), false) = (was, exempt == Some(host.hostname.as_str())) {
                for (was_free, now_free) in free_resources(was).into_iter().zip(free) {
                    prop_assert!(
                        now_free >= was_free.min(0.0),
                        "charged below zero: {was:?} -> {host:?}"
                    );
                }
            }
        }
        Ok(())
    }
}

/// A refusal's counts: one per host of the queue (available or not), each under the first
/// check it fails, and each count backed by that many hosts that really fail that check.
fn check_eliminated(
    err: &NoValidHost,
    queue_name: &str,
    req: &PlacementRequest,
    before: &Snapshot,
    visited: &[usize],
) -> Result<(), TestCaseError> {
    // Every reason that holds for each host of the queue.
    let mut reasons: Vec<Vec<Elimination>> = before
        .unavailable
        .values()
        .filter(|u| u.queue_name == queue_name)
        .map(|u| match u.reason {
            UnavailableReason::Disabled(_) => vec![Elimination::Disabled],
            UnavailableReason::Down | UnavailableReason::NotAnswering => vec![Elimination::Down],
        })
        .collect();
    for (pos, host) in before.queue(queue_name).iter().enumerate() {
        let mut host_reasons = hint_failures(&host.hostname, req);
        if !visited.contains(&pos) {
            host_reasons.push(Elimination::BeyondBoundary);
        }
        host_reasons.extend(resource_failures(host, &req.resources));
        reasons.push(host_reasons);
    }

    let counted: usize = err.eliminated.iter().map(|(_, n)| n).sum();
    prop_assert_eq!(
        counted,
        reasons.len(),
        "every host of the queue counted once: {}",
        err
    );
    for window in err.eliminated.windows(2) {
        prop_assert!(
            window[0].0 < window[1].0,
            "each reason once, in check order: {err:?}"
        );
    }
    for &(elimination, n) in &err.eliminated {
        let holds = reasons.iter().filter(|r| r.contains(&elimination)).count();
        prop_assert!(
            n > 0 && n <= holds,
            "{n} hosts reported {elimination:?}, {holds} really are: {err}"
        );
    }

    let mut first_reasons: BTreeMap<Elimination, usize> = BTreeMap::new();
    for host_reasons in &reasons {
        let first = host_reasons.iter().min();
        prop_assert!(first.is_some(), "a host with no reason to refuse it: {err}");
        if let Some(&first) = first {
            *first_reasons.entry(first).or_default() += 1;
        }
    }
    let expected: Vec<(Elimination, usize)> = first_reasons.into_iter().collect();
    prop_assert_eq!(
        &err.eliminated,
        &expected,
        "each host under the first check it fails"
    );

    let summary = match reasons.len() {
        0 => format!("No hosts in queue '{queue_name}'"),
        total => format!("0/{total} hosts in queue '{queue_name}'"),
    };
    prop_assert!(err.reason.starts_with(&summary), "{err}");
    Ok(())
}

/// Builds a queue from `rows`, applies `operations` and checks every step.
fn run(rows: &[ComputeNodeRow], operations: &[Operation]) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(rows)?;
    for operation in operations {
        harness.apply(operation)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_queue_honest(
        rows in compute_node_rows(),
        operations in prop::collection::vec(operation(), 1..60),
    ) {
        run(&rows, &operations)?;
    }
}

/// A case the property found, kept so that it runs every time: a 2-core host at
/// `cpu_allocation_ratio` 1.3 (2.6 vCPUs), forced past its room by 64 vCPUs and then given them
/// back, must not end with more than 2.6 vCPUs free. Rounding in `release_host` leaves
/// 2.6000000000000014.
#[test]
fn release_after_a_forced_over_commit_stays_within_capacity() -> Result<(), TestCaseError> {
    let rows = [ComputeNodeRow {
        node_id: 1,
        hypervisor_hostname: hostname(0),
        host: hostname(0),
        rpc_endpoint: "tcp://node-0:5570".to_owned(),
        vcpus: 2,
        cpu_allocation_ratio: 1.3,
        ram_allocation_ratio: 1.0,
        disk_allocation_ratio: 1.0,
        up: true,
        ..ComputeNodeRow::default()
    }];
    let forced = PlacementRequest {
        scheduler_host: Some(hostname(0)),
        skip_forced_host_resource_check: true,
        ..PlacementRequest::new(ResourceRequest {
            requested_vcpus: 64,
            requested_ram: 0,
            requested_disk: 0,
        })
    };
    run(&rows, &[Operation::Select(forced), Operation::Release(0)])
}
