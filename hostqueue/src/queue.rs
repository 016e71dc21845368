//! The queues of hosts and the walk that picks one: the seed's `QueueManager.build_queue` and
//! `_new_schedule` with its `find_pos` cursor.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::resources::{disk_fits, ram_fits, shortfalls, vcpus_fit};
use crate::{check_host_resource, why_not, ComputeNodeRow, HostState, Limits, Placed};
use crate::{Direction, PlacementRequest, ResourceRequest};

/// How many hosts lacking resources a "no valid host" message names as examples.
const EXAMPLE_HOSTS: usize = 3;

/// The host chosen for one instance: where to cast `new_run_instance`, the node row the
/// database claim updates and the limits both claims must respect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub node_id: i64,
    pub hostname: String,
    pub host: String,
    pub rpc_endpoint: String,
    pub limits: Limits,
}

impl Placement {
    fn of(host: &HostState) -> Self {
        Placement {
            node_id: host.node_id,
            hostname: host.hostname.clone(),
            host: host.host.clone(),
            rpc_endpoint: host.rpc_endpoint.clone(),
            limits: host.limits,
        }
    }
}

/// Why a host was not chosen, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Elimination {
    Disabled,
    Down,
    NotMatching,
    NotSameHost,
    DifferentHost,
    AlreadyTried,
    BeyondBoundary,
    InsufficientDisk,
    InsufficientRam,
    InsufficientVcpus,
}

impl Elimination {
    /// A short label, also usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Elimination::Disabled => "disabled",
            Elimination::Down => "down",
            Elimination::NotMatching => "not matching scheduler_host_match",
            Elimination::NotSameHost => "not running a same_host instance",
            Elimination::DifferentHost => "running a different_host instance",
            Elimination::AlreadyTried => "already tried",
            Elimination::BeyondBoundary => "beyond boundary_host",
            Elimination::InsufficientDisk => "insufficient disk",
            Elimination::InsufficientRam => "insufficient RAM",
            Elimination::InsufficientVcpus => "insufficient vCPUs",
        }
    }
}

/// No host can take the instance; `reason` says why, for the instance fault, and
/// `eliminated` counts the hosts each check ruled out (each host counted once, under the
/// first check it failed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("No valid host was found. {reason}")]
pub struct NoValidHost {
    pub reason: String,
    pub eliminated: Vec<(Elimination, usize)>,
}

fn no_valid_host(reason: String) -> NoValidHost {
    NoValidHost {
        reason,
        eliminated: Vec::new(),
    }
}

/// Why a host is in no queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// The queue the host would be in.
    pub queue_name: String,
    pub reason: UnavailableReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnavailableReason {
    /// The operator disabled the service, perhaps with a reason.
    Disabled(Option<String>),
    /// Its heartbeat is too old.
    Down,
    /// It did not take work sent to it and has not reported since.
    NotAnswering,
}

impl std::fmt::Display for UnavailableReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnavailableReason::Disabled(Some(reason)) if !reason.is_empty() => {
                write!(f, "disabled: {reason}")
            }
            UnavailableReason::Disabled(_) => f.write_str("disabled"),
            UnavailableReason::Down => f.write_str("service is down"),
            UnavailableReason::NotAnswering => f.write_str("not answering"),
        }
    }
}

/// The outcome of placing a multi-create request: the hosts found and, when fewer than asked
/// for were found, why the rest were not.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlacement {
    pub placements: Vec<Placement>,
    pub shortfall: Option<NoValidHost>,
}

/// The hosts the scheduler may place on, grouped by queue name and ordered by host name, with
/// a round-robin cursor per queue and the hosts left out (and why).
#[derive(Debug, Clone)]
pub struct HostQueue {
    default_queue: String,
    queues: BTreeMap<String, Vec<HostState>>,
    /// The seed's `find_pos`: where the next walk of each queue starts.
    find_pos: BTreeMap<String, usize>,
    /// Host name → (queue name, position in that queue).
    index: BTreeMap<String, (String, usize)>,
    /// Host name → why it is not in any queue.
    unavailable: BTreeMap<String, Unavailable>,
}

impl HostQueue {
    /// An empty queue set; hosts without a queue name go to `default_queue` (`kvm` in Nova).
    pub fn new(default_queue: &str) -> Self {
        HostQueue {
            default_queue: default_queue.to_owned(),
            queues: BTreeMap::new(),
            find_pos: BTreeMap::new(),
            index: BTreeMap::new(),
            unavailable: BTreeMap::new(),
        }
    }

    /// The queue for hosts and requests that name none.
    pub fn default_queue(&self) -> &str {
        &self.default_queue
    }

    /// Replaces every host state from `rows`, dropping in-memory charges (the rows' placed
    /// usage now counts them). Disabled and down hosts go to [`HostQueue::unavailable`]
    /// instead. Each queue's cursor is kept, so round robin continues across rebuilds; a
    /// cursor past the end of a queue that got shorter wraps to its start, and the cursor of
    /// a queue that is gone is forgotten. When several rows name the same host, the last one
    /// wins.
    pub fn build_queue(&mut self, rows: &[ComputeNodeRow]) {
        let mut latest: BTreeMap<&str, &ComputeNodeRow> = BTreeMap::new();
        for row in rows {
            latest.insert(row.hypervisor_hostname.as_str(), row);
        }

        self.queues.clear();
        self.index.clear();
        self.unavailable.clear();
        // `latest` iterates in host-name order, so every queue comes out sorted.
        for (hostname, row) in latest {
            let state = HostState::from_row(row, &self.default_queue);
            let reason = if row.disabled {
                Some(UnavailableReason::Disabled(row.disabled_reason.clone()))
            } else if !row.up {
                Some(UnavailableReason::Down)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.unavailable.insert(
                    hostname.to_owned(),
                    Unavailable {
                        queue_name: state.queue_name,
                        reason,
                    },
                );
                continue;
            }
            let queue = self.queues.entry(state.queue_name.clone()).or_default();
            self.index
                .insert(hostname.to_owned(), (state.queue_name.clone(), queue.len()));
            queue.push(state);
        }

        let queues = &self.queues;
        self.find_pos.retain(|name, pos| match queues.get(name) {
            Some(queue) => {
                if *pos >= queue.len() {
                    *pos = 0;
                }
                true
            }
            None => false,
        });
    }

    /// The hosts of one queue in walk order; empty for an unknown queue.
    pub fn get_host_queue(&self, queue_name: &str) -> &[HostState] {
        self.queues.get(queue_name).map_or(&[], Vec::as_slice)
    }

    /// The names of the queues that have hosts.
    pub fn queue_names(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// How many hosts are in a queue, over all queues.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// An available host by name, whatever its queue.
    pub fn host(&self, hostname: &str) -> Option<&HostState> {
        let (queue, pos) = self.index.get(hostname)?;
        self.queues.get(queue)?.get(*pos)
    }

    fn host_mut(&mut self, hostname: &str) -> Option<&mut HostState> {
        let (queue, pos) = self.index.get(hostname)?;
        self.queues.get_mut(queue)?.get_mut(*pos)
    }

    /// Hosts left out by the last [`HostQueue::build_queue`] or taken out since, and why.
    pub fn unavailable(&self) -> &BTreeMap<String, Unavailable> {
        &self.unavailable
    }

    /// Takes a host out of its queue until the next rebuild (its compute did not take a
    /// cast), so later requests do not each wait for the same timeout. The queue's cursor
    /// keeps pointing at the same next host. Unknown hosts are ignored.
    pub fn mark_unavailable(&mut self, hostname: &str, reason: UnavailableReason) {
        let Some((queue_name, pos)) = self.index.remove(hostname) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(&queue_name) else {
            return;
        };
        if pos < queue.len() {
            queue.remove(pos);
        }
        for (later_pos, host) in queue.iter().enumerate().skip(pos) {
            if let Some(entry) = self.index.get_mut(&host.hostname) {
                entry.1 = later_pos;
            }
        }
        if let Some(cursor) = self.find_pos.get_mut(&queue_name) {
            if *cursor > pos {
                *cursor -= 1;
            }
            if *cursor >= queue.len() {
                *cursor = 0;
            }
        }
        if queue.is_empty() {
            self.queues.remove(&queue_name);
            self.find_pos.remove(&queue_name);
        }
        self.unavailable
            .insert(hostname.to_owned(), Unavailable { queue_name, reason });
    }

    /// Picks a host for `req` and charges it in memory, so the next call sees what is left.
    ///
    /// A forced `scheduler_host` is taken if it is available, passes the request's host hints
    /// and (unless the operator turned the check off) has room; the cursor does not move.
    /// Otherwise the request's queue is walked from its cursor in the request's direction,
    /// for at most one lap or until `boundary_host`, skipping hosts that fail a hint or lack
    /// room; the cursor then moves one past the chosen host.
    pub fn select(&mut self, req: &PlacementRequest) -> Result<Placement, NoValidHost> {
        match req.scheduler_host.as_deref() {
            Some(forced) => self.select_forced(forced, req),
            None => self.select_from_queue(req),
        }
    }

    /// Places `count` instances of one request in one pass. If at least `min_count` fit (capped
    /// to `count`, at least 1), the hosts found are kept (at most `count`) and `shortfall` says
    /// why the rest did not; otherwise nothing stays charged and the error says why.
    pub fn select_many(
        &mut self,
        req: &PlacementRequest,
        count: usize,
        min_count: usize,
    ) -> Result<BatchPlacement, NoValidHost> {
        let mut placements = Vec::with_capacity(count);
        let mut shortfall = None;
        while placements.len() < count {
            match self.select(req) {
                Ok(placement) => placements.push(placement),
                Err(err) => {
                    shortfall = Some(err);
                    break;
                }
            }
        }
        if placements.len() >= min_count.max(1).min(count) {
            return Ok(BatchPlacement {
                placements,
                shortfall,
            });
        }
        for placement in &placements {
            self.release_host(&placement.hostname, &req.resources);
        }
        let mut err = shortfall.unwrap_or_else(|| no_valid_host(String::new()));
        if count > 1 {
            err.reason = format!(
                "Only {} of the {min_count} instances required fit. {}",
                placements.len(),
                err.reason
            );
        }
        Err(err)
    }

    fn select_forced(
        &mut self,
        forced: &str,
        req: &PlacementRequest,
    ) -> Result<Placement, NoValidHost> {
        let Some(host) = self.host(forced) else {
            return Err(no_valid_host(match self.unavailable.get(forced) {
                Some(unavailable) => {
                    format!("Host {forced} is not available: {}", unavailable.reason)
                }
                None => format!("Host {forced} is unknown"),
            }));
        };
        if let Some(elimination) = hint_elimination(host, req) {
            return Err(no_valid_host(format!(
                "Host {forced} is excluded by the request: {}",
                elimination.as_str()
            )));
        }
        if !req.skip_forced_host_resource_check {
            if let Some(why) = why_not(host, &req.resources) {
                return Err(no_valid_host(why));
            }
        }
        let placement = Placement::of(host);
        self.charge_host(forced, &req.resources);
        Ok(placement)
    }

    fn select_from_queue(&mut self, req: &PlacementRequest) -> Result<Placement, NoValidHost> {
        let queue_name = req.queue(&self.default_queue);
        let Some(queue) = self.queues.get(queue_name).filter(|q| !q.is_empty()) else {
            return Err(self.explain(queue_name, req, &[]));
        };
        let len = queue.len();
        let start = self.find_pos.get(queue_name).copied().unwrap_or(0) % len;
        let boundary = req
            .boundary_host
            .as_deref()
            .and_then(|name| queue.iter().position(|h| h.hostname == name));
        let mut chosen = None;
        for step in 0..len {
            let pos = walk_position(start, step, len, req.direction);
            if step > 0 && Some(pos) == boundary {
                break;
            }
            let host = &queue[pos];
            if hint_elimination(host, req).is_none() && check_host_resource(host, &req.resources) {
                chosen = Some(pos);
                break;
            }
        }
        let Some(pos) = chosen else {
            let queue_name = queue_name.to_owned();
            let reached = reached_positions(start, len, boundary, req.direction);
            return Err(self.explain(&queue_name, req, &reached));
        };

        let queue_name = queue_name.to_owned();
        self.find_pos.insert(
            queue_name.clone(),
            walk_position(pos, 1, len, req.direction),
        );
        let host = self
            .queues
            .get_mut(&queue_name)
            .and_then(|queue| queue.get_mut(pos))
            .ok_or_else(|| no_valid_host(format!("No hosts in queue '{queue_name}'")))?;
        charge(host, &req.resources);
        Ok(Placement::of(host))
    }

    /// Why no host of `queue_name` took `req`: every host of the queue (available or not)
    /// counted under the first check it fails. `reached[pos]` says whether the walk got to
    /// the host at `pos` (it may have stopped at `boundary_host`).
    fn explain(&self, queue_name: &str, req: &PlacementRequest, reached: &[bool]) -> NoValidHost {
        let mut counts: BTreeMap<Elimination, usize> = BTreeMap::new();
        let mut examples = Vec::new();
        for unavailable in self.unavailable.values() {
            if unavailable.queue_name == queue_name {
                let elimination = match unavailable.reason {
                    UnavailableReason::Disabled(_) => Elimination::Disabled,
                    UnavailableReason::Down | UnavailableReason::NotAnswering => Elimination::Down,
                };
                *counts.entry(elimination).or_default() += 1;
            }
        }
        for (pos, host) in self.get_host_queue(queue_name).iter().enumerate() {
            let elimination = hint_elimination(host, req)
                .or_else(|| {
                    (!reached.get(pos).copied().unwrap_or(true))
                        .then_some(Elimination::BeyondBoundary)
                })
                .or_else(|| resource_elimination(host, &req.resources));
            let Some(elimination) = elimination else {
                continue; // unreachable in practice: such a host would have been chosen
            };
            if elimination >= Elimination::InsufficientDisk && examples.len() < EXAMPLE_HOSTS {
                examples.push(format!(
                    "{}: {}",
                    host.hostname,
                    shortfalls(host, &req.resources).join(" and ")
                ));
            }
            *counts.entry(elimination).or_default() += 1;
        }
        let total: usize = counts.values().sum();
        let wanted = match req.resources.describe() {
            Some(wanted) => format!(" for {wanted}"),
            None => String::new(),
        };
        if total == 0 {
            return no_valid_host(format!("No hosts in queue '{queue_name}'"));
        }
        let mut reason = format!("0/{total} hosts in queue '{queue_name}'{wanted}");
        {
            let parts: Vec<String> = counts
                .iter()
                .map(
                    |(elimination, n)| match (elimination, &req.scheduler_host_match) {
                        (Elimination::NotMatching, Some(pattern)) => {
                            format!(
                                "{n} not matching scheduler_host_match '{}'",
                                pattern.as_str()
                            )
                        }
                        _ => format!("{n} {}", elimination.as_str()),
                    },
                )
                .collect();
            reason.push_str(": ");
            reason.push_str(&parts.join(", "));
        }
        if !examples.is_empty() {
            reason.push_str(&format!(" ({})", examples.join("; ")));
        }
        NoValidHost {
            reason,
            eliminated: counts.into_iter().collect(),
        }
    }

    /// Takes `req` from the host's free resources until the next rebuild. Unknown hosts are
    /// ignored.
    pub fn charge_host(&mut self, hostname: &str, req: &ResourceRequest) {
        if let Some(host) = self.host_mut(hostname) {
            charge(host, req);
        }
    }

    /// Gives back what [`HostQueue::charge_host`] took, for a placement that did not happen.
    /// Free resources never rise above the host's capacity, so a release after a rebuild
    /// already counted it cannot invent room. Unknown hosts are ignored.
    pub fn release_host(&mut self, hostname: &str, req: &ResourceRequest) {
        let Some(host) = self.host_mut(hostname) else {
            return;
        };
        let (vcpus, ram_mb, disk_gb) = req.charge();
        let vcpus = give_back(host.free_vcpus, vcpus, host.vcpus);
        let free_vcpus = capped(host.free_vcpus + vcpus, host.free_vcpus, host.vcpus);
        host.vcpus_used -= free_vcpus - host.free_vcpus;
        host.free_vcpus = free_vcpus;
        host.free_memory_mb = capped(
            host.free_memory_mb + give_back(host.free_memory_mb, ram_mb, host.memory_mb),
            host.free_memory_mb,
            host.memory_mb,
        );
        host.free_local_gb = capped(
            host.free_local_gb + give_back(host.free_local_gb, disk_gb, host.local_gb),
            host.free_local_gb,
            host.local_gb,
        );
    }

    /// Records what the database says is placed on a host (a claim there lost a race): see
    /// [`HostState::observe_placed`]. Unknown hosts are ignored.
    pub fn observe_placed(&mut self, hostname: &str, placed: Placed) {
        if let Some(host) = self.host_mut(hostname) {
            host.observe_placed(placed);
        }
    }
}

/// The position `step` hosts from `start` in `direction`, wrapping around a queue of `len`.
fn walk_position(start: usize, step: usize, len: usize, direction: Direction) -> usize {
    let step = step % len;
    match direction {
        Direction::Forward => (start + step) % len,
        Direction::Backward => (start + len - step) % len,
    }
}

/// Which positions a walk from `start` reaches before the boundary.
fn reached_positions(
    start: usize,
    len: usize,
    boundary: Option<usize>,
    direction: Direction,
) -> Vec<bool> {
    let mut reached = vec![false; len];
    for step in 0..len {
        let pos = walk_position(start, step, len, direction);
        if step > 0 && Some(pos) == boundary {
            break;
        }
        reached[pos] = true;
    }
    reached
}

/// The first host hint `host` fails, if any.
fn hint_elimination(host: &HostState, req: &PlacementRequest) -> Option<Elimination> {
    if let Some(pattern) = &req.scheduler_host_match {
        if req.scheduler_host.is_none() && !pattern.is_match(&host.hostname) {
            return Some(Elimination::NotMatching);
        }
    }
    if let Some(same) = &req.same_host {
        if !same.contains(&host.hostname) {
            return Some(Elimination::NotSameHost);
        }
    }
    if req.different_host.contains(&host.hostname) {
        return Some(Elimination::DifferentHost);
    }
    if req.tried_hosts.contains(&host.hostname) {
        return Some(Elimination::AlreadyTried);
    }
    None
}

/// The first resource `host` lacks for `req`, in the seed's order: disk, RAM, vCPUs.
fn resource_elimination(host: &HostState, req: &ResourceRequest) -> Option<Elimination> {
    if !disk_fits(host, req) {
        Some(Elimination::InsufficientDisk)
    } else if !ram_fits(host, req) {
        Some(Elimination::InsufficientRam)
    } else if !vcpus_fit(host, req) {
        Some(Elimination::InsufficientVcpus)
    } else {
        None
    }
}

fn charge(host: &mut HostState, req: &ResourceRequest) {
    let (vcpus, ram_mb, disk_gb) = req.charge();
    host.free_vcpus -= vcpus;
    host.vcpus_used += vcpus;
    host.free_memory_mb -= ram_mb;
    host.free_local_gb -= disk_gb;
}

/// `raised`, but never above `capacity` (nor below `free`, when `free` was already above it):
/// `free + (capacity - free)` can round past `capacity`.
fn capped(raised: f64, free: f64, capacity: f64) -> f64 {
    raised.min(capacity.max(free))
}

/// How much of `amount` can go back to `free` without rising above `capacity`. Computed as an
/// amount rather than a new total so that infinite capacities never produce NaN.
fn give_back(free: f64, amount: f64, capacity: f64) -> f64 {
    if free < capacity {
        amount.min(capacity - free)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::host_state::tests::row;
    use crate::HostMatch;

    fn req(vcpus: i64, ram: i64, disk: i64) -> PlacementRequest {
        PlacementRequest::new(ResourceRequest {
            requested_vcpus: vcpus,
            requested_ram: ram,
            requested_disk: disk,
        })
    }

    /// `n` equal hosts node-1..node-n with 4 vCPUs, 8192 MB and 100 GB each.
    fn equal_hosts(n: usize) -> Vec<ComputeNodeRow> {
        (1..=n)
            .map(|i| row(&format!("node-{i}"), 4, 8192, 100))
            .collect()
    }

    fn queue_of(rows: &[ComputeNodeRow]) -> HostQueue {
        let mut q = HostQueue::new("kvm");
        q.build_queue(rows);
        q
    }

    fn pick(q: &mut HostQueue, r: &PlacementRequest) -> String {
        q.select(r).expect("a host").hostname
    }

    #[test]
    fn build_queue_groups_sorts_and_skips() {
        let mut rows = vec![
            row("node-3", 4, 8192, 100),
            row("node-1", 4, 8192, 100),
            ComputeNodeRow {
                queue_name: Some("gpu".to_owned()),
                ..row("gpu-1", 8, 16384, 200)
            },
            ComputeNodeRow {
                disabled: true,
                disabled_reason: Some("maintenance".to_owned()),
                ..row("node-9", 4, 8192, 100)
            },
            ComputeNodeRow {
                disabled: true,
                ..row("node-8", 4, 8192, 100)
            },
            ComputeNodeRow {
                up: false,
                ..row("node-7", 4, 8192, 100)
            },
            row("node-2", 4, 8192, 100),
        ];
        let q = queue_of(&rows);
        let names = |queue: &str| -> Vec<String> {
            q.get_host_queue(queue)
                .iter()
                .map(|h| h.hostname.clone())
                .collect()
        };
        assert_eq!(names("kvm"), ["node-1", "node-2", "node-3"]);
        assert_eq!(names("gpu"), ["gpu-1"]);
        assert!(names("nope").is_empty());
        assert_eq!(q.queue_names().collect::<Vec<_>>(), ["gpu", "kvm"]);
        let unavailable: Vec<(&str, String)> = q
            .unavailable()
            .iter()
            .map(|(k, v)| (k.as_str(), v.reason.to_string()))
            .collect();
        assert_eq!(
            unavailable,
            [
                ("node-7", "service is down".to_owned()),
                ("node-8", "disabled".to_owned()),
                ("node-9", "disabled: maintenance".to_owned()),
            ]
        );
        assert!(q.host("node-9").is_none());
        assert_eq!(q.host("gpu-1").map(|h| h.vcpus), Some(8.0));

        // The last row for a host wins: node-2 becomes disabled.
        rows.push(ComputeNodeRow {
            disabled: true,
            disabled_reason: Some("bad disk".to_owned()),
            ..row("node-2", 4, 8192, 100)
        });
        let q = queue_of(&rows);
        assert!(q.host("node-2").is_none());
        assert_eq!(
            q.unavailable()["node-2"].reason.to_string(),
            "disabled: bad disk"
        );
    }

    #[test]
    fn round_robin_spreads_requests() {
        let mut q = queue_of(&equal_hosts(3));
        let picks: Vec<String> = (0..6).map(|_| pick(&mut q, &req(1, 0, 0))).collect();
        assert_eq!(
            picks,
            ["node-1", "node-2", "node-3", "node-1", "node-2", "node-3"]
        );
        for name in ["node-1", "node-2", "node-3"] {
            let h = q.host(name).unwrap();
            assert_eq!((h.free_vcpus, h.vcpus_used), (2.0, 2.0), "{name}");
        }
    }

    #[test]
    fn cursor_survives_build_queue() {
        let rows = equal_hosts(3);
        let mut q = queue_of(&rows);
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-1");
        q.build_queue(&rows);
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-2");
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-3");

        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-1");
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-2");
        // The cursor now points at node-3's slot; dropping node-3 wraps it to the start.
        q.build_queue(&rows[..2]);
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-1");

        // A rebuild drops in-memory charges.
        q.build_queue(&rows);
        assert_eq!(q.host("node-1").unwrap().free_vcpus, 4.0);
    }

    #[test]
    fn charging_prevents_over_commit() {
        let mut q = queue_of(&[row("node-1", 4, 8192, 100)]);
        for _ in 0..4 {
            assert_eq!(pick(&mut q, &req(1, 1024, 10 * 1024)), "node-1");
        }
        let err = q.select(&req(1, 0, 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "No valid host was found. 0/1 hosts in queue 'kvm' for 1 vCPU: \
             1 insufficient vCPUs (node-1: 0 vCPUs free, 1 requested)"
        );
        let h = q.host("node-1").unwrap();
        assert_eq!(
            (
                h.free_vcpus,
                h.vcpus_used,
                h.free_memory_mb,
                h.free_local_gb
            ),
            (0.0, 4.0, 4096.0, 60.0)
        );

        // Giving one back makes room for exactly one more.
        q.release_host("node-1", &req(1, 1024, 10 * 1024).resources);
        let h = q.host("node-1").unwrap();
        assert_eq!(
            (
                h.free_vcpus,
                h.vcpus_used,
                h.free_memory_mb,
                h.free_local_gb
            ),
            (1.0, 3.0, 5120.0, 70.0)
        );
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-1");
        assert!(q.select(&req(1, 0, 0)).is_err());

        // The next rebuild starts from the rows again.
        q.build_queue(&[row("node-1", 4, 8192, 100)]);
        assert_eq!(pick(&mut q, &req(4, 0, 0)), "node-1");
    }

    #[test]
    fn release_never_exceeds_capacity() {
        let mut q = queue_of(&[row("node-1", 4, 8192, 100)]);
        q.release_host("node-1", &req(2, 1024, 2048).resources);
        let h = q.host("node-1").unwrap();
        assert_eq!(
            (
                h.free_vcpus,
                h.vcpus_used,
                h.free_memory_mb,
                h.free_local_gb
            ),
            (4.0, 0.0, 8192.0, 100.0)
        );
        // Unknown hosts are ignored.
        q.release_host("node-9", &req(2, 1024, 2048).resources);
        q.charge_host("node-9", &req(2, 1024, 2048).resources);
        assert!(q.host("node-9").is_none());
    }

    #[test]
    fn no_valid_host_summary() {
        let rows = [
            ComputeNodeRow {
                vcpus_used: 4,
                ..row("node-1", 4, 8192, 200)
            },
            ComputeNodeRow {
                free_ram_mb: 512,
                ..row("node-2", 4, 8192, 200)
            },
            row("node-3", 4, 8192, 100),
            row("other-1", 4, 8192, 100),
            ComputeNodeRow {
                disabled: true,
                ..row("node-4", 64, 65536, 1000)
            },
            ComputeNodeRow {
                up: false,
                ..row("node-5", 64, 65536, 1000)
            },
            ComputeNodeRow {
                up: false,
                queue_name: Some("gpu".to_owned()),
                ..row("gpu-1", 64, 65536, 1000)
            },
        ];
        let mut q = queue_of(&rows);
        let mut r = req(1, 4096, 160 * 1024);
        r.scheduler_host_match = Some(HostMatch::new("^node").unwrap());
        let err = q.select(&r).unwrap_err();
        assert_eq!(
            err.reason,
            "0/6 hosts in queue 'kvm' for 1 vCPU, 4096 MB RAM and 160 GB disk: 1 disabled, \
             1 down, 1 not matching scheduler_host_match '^node', 1 insufficient disk, \
             1 insufficient RAM, 1 insufficient vCPUs \
             (node-1: 0 vCPUs free, 1 requested; \
             node-2: 512 MB RAM free, 4096 MB requested; \
             node-3: 100 GB disk free, 160 GB requested)"
        );
        assert_eq!(
            err.eliminated,
            [
                (Elimination::Disabled, 1),
                (Elimination::Down, 1),
                (Elimination::NotMatching, 1),
                (Elimination::InsufficientDisk, 1),
                (Elimination::InsufficientRam, 1),
                (Elimination::InsufficientVcpus, 1),
            ]
        );

        // Examples stop at three hosts; the counts cover every host.
        let mut q = queue_of(&equal_hosts(8));
        let err = q.select(&req(64, 0, 0)).unwrap_err();
        assert_eq!(
            err.reason,
            "0/8 hosts in queue 'kvm' for 64 vCPUs: 8 insufficient vCPUs \
             (node-1: 4 vCPUs free, 64 requested; node-2: 4 vCPUs free, 64 requested; \
             node-3: 4 vCPUs free, 64 requested)"
        );
    }

    #[test]
    fn empty_and_missing_queues() {
        let mut q = HostQueue::new("kvm");
        assert_eq!(
            q.select(&req(1, 0, 0)).unwrap_err().reason,
            "No hosts in queue 'kvm'"
        );
        q.build_queue(&equal_hosts(2));
        let mut r = req(1, 0, 0);
        r.queue_name = Some("gpu".to_owned());
        assert_eq!(q.select(&r).unwrap_err().reason, "No hosts in queue 'gpu'");
        // An empty queue name means the default queue.
        r.queue_name = Some(String::new());
        assert_eq!(pick(&mut q, &r), "node-1");
    }

    #[test]
    fn forced_host() {
        let rows = [
            row("node-1", 4, 8192, 100),
            ComputeNodeRow {
                free_ram_mb: 512,
                ..row("node-2", 4, 8192, 100)
            },
            ComputeNodeRow {
                queue_name: Some("gpu".to_owned()),
                ..row("gpu-1", 4, 8192, 100)
            },
            ComputeNodeRow {
                disabled: true,
                disabled_reason: Some("maintenance".to_owned()),
                ..row("node-9", 4, 8192, 100)
            },
            ComputeNodeRow {
                up: false,
                ..row("node-8", 4, 8192, 100)
            },
        ];
        struct Case {
            forced: &'static str,
            check: bool,
            avoid: &'static [&'static str],
            want: Result<&'static str, &'static str>,
        }
        let cases = [
            Case {
                forced: "node-1",
                check: true,
                avoid: &[],
                want: Ok("node-1"),
            },
            Case {
                forced: "gpu-1",
                check: true,
                avoid: &[],
                want: Ok("gpu-1"),
            },
            Case {
                forced: "node-7",
                check: true,
                avoid: &[],
                want: Err("Host node-7 is unknown"),
            },
            Case {
                forced: "node-9",
                check: true,
                avoid: &[],
                want: Err("Host node-9 is not available: disabled: maintenance"),
            },
            Case {
                forced: "node-8",
                check: false,
                avoid: &[],
                want: Err("Host node-8 is not available: service is down"),
            },
            Case {
                forced: "node-2",
                check: true,
                avoid: &[],
                want: Err("node-2 has 512 MB RAM free, 2048 MB requested"),
            },
            Case {
                forced: "node-2",
                check: false,
                avoid: &[],
                want: Ok("node-2"),
            },
            Case {
                forced: "node-1",
                check: true,
                avoid: &["node-1"],
                want: Err("Host node-1 is excluded by the request: \
                           running a different_host instance"),
            },
        ];
        for case in cases {
            let mut q = queue_of(&rows);
            let mut r = req(1, 2048, 1024);
            r.scheduler_host = Some(case.forced.to_owned());
            r.skip_forced_host_resource_check = !case.check;
            r.different_host = case.avoid.iter().map(|s| s.to_string()).collect();
            // A host-name filter does not apply to a forced host.
            r.scheduler_host_match = Some(HostMatch::new("^nothing$").unwrap());
            let got = q.select(&r);
            match case.want {
                Ok(name) => {
                    let placement = got.unwrap_or_else(|e| panic!("{}: {e}", case.forced));
                    assert_eq!(placement.hostname, name);
                    assert_eq!(placement.rpc_endpoint, format!("tcp://{name}:5570"));
                    let h = q.host(name).unwrap();
                    assert_eq!(placement.limits, h.limits);
                    assert_eq!(h.vcpus_used, 1.0, "charged");
                    // The cursor did not move: an unforced request still starts at node-1.
                    assert_eq!(pick(&mut q, &req(0, 0, 0)), "node-1");
                }
                Err(reason) => {
                    assert_eq!(got.unwrap_err().reason, reason, "{}", case.forced)
                }
            }
        }

        // Without the check a forced host may be over-committed.
        let mut q = queue_of(&rows);
        let mut r = req(3, 0, 0);
        r.scheduler_host = Some("node-1".to_owned());
        r.skip_forced_host_resource_check = true;
        for _ in 0..2 {
            assert_eq!(pick(&mut q, &r), "node-1");
        }
        assert_eq!(q.host("node-1").unwrap().free_vcpus, -2.0);
    }

    #[test]
    fn host_match_filters() {
        let mut q = queue_of(&equal_hosts(3));
        let mut r = req(0, 0, 0);
        r.scheduler_host_match = Some(HostMatch::new("^node-[12]$").unwrap());
        for _ in 0..50 {
            assert_ne!(pick(&mut q, &r), "node-3");
        }

        let mut r = req(0, 0, 0);
        r.scheduler_host_match = Some(HostMatch::new("node").unwrap());
        let picks: BTreeSet<String> = (0..3).map(|_| pick(&mut q, &r)).collect();
        assert_eq!(picks.len(), 3, "an unanchored pattern matches every host");

        let mut r = req(0, 0, 0);
        r.scheduler_host_match = Some(HostMatch::new("xyz").unwrap());
        assert_eq!(
            q.select(&r).unwrap_err().reason,
            "0/3 hosts in queue 'kvm': 3 not matching scheduler_host_match 'xyz'"
        );
    }

    #[test]
    fn filtered_requests_keep_round_robin_in_queue_order() {
        let mut q = queue_of(&equal_hosts(4));
        let mut only_3 = req(0, 0, 0);
        only_3.scheduler_host_match = Some(HostMatch::new("^node-3$").unwrap());
        assert_eq!(pick(&mut q, &req(0, 0, 0)), "node-1");
        assert_eq!(pick(&mut q, &only_3), "node-3");
        // The cursor sits after node-3 in the full queue.
        assert_eq!(pick(&mut q, &req(0, 0, 0)), "node-4");
        assert_eq!(pick(&mut q, &req(0, 0, 0)), "node-1");
    }

    #[test]
    fn avoid_hosts_honoured() {
        let mut q = queue_of(&equal_hosts(3));
        let mut r = req(1, 0, 0);
        r.tried_hosts = ["node-1".to_owned(), "node-2".to_owned()].into();
        for _ in 0..4 {
            assert_eq!(pick(&mut q, &r), "node-3");
        }
        let err = q.select(&r).unwrap_err();
        assert_eq!(
            err.reason,
            "0/3 hosts in queue 'kvm' for 1 vCPU: 2 already tried, 1 insufficient vCPUs \
             (node-3: 0 vCPUs free, 1 requested)"
        );
        assert_eq!(
            err.eliminated,
            [
                (Elimination::AlreadyTried, 2),
                (Elimination::InsufficientVcpus, 1)
            ]
        );
    }

    #[test]
    fn queues_are_separate() {
        let mut rows = equal_hosts(2);
        rows.push(ComputeNodeRow {
            queue_name: Some("gpu".to_owned()),
            ..row("gpu-1", 64, 65536, 1000)
        });
        let mut q = queue_of(&rows);
        for _ in 0..8 {
            assert_ne!(pick(&mut q, &req(1, 0, 0)), "gpu-1");
        }
        // Both kvm hosts are full; the idle gpu host is still not offered.
        assert!(q.select(&req(1, 0, 0)).is_err());
        let mut gpu = req(1, 0, 0);
        gpu.queue_name = Some("gpu".to_owned());
        assert_eq!(pick(&mut q, &gpu), "gpu-1");
    }

    #[test]
    fn same_host_and_different_host() {
        let mut q = queue_of(&equal_hosts(4));
        let mut r = req(1, 0, 0);
        r.same_host = Some(["node-2".to_owned(), "node-4".to_owned()].into());
        r.different_host = ["node-4".to_owned()].into();
        for _ in 0..4 {
            assert_eq!(pick(&mut q, &r), "node-2");
        }
        let err = q.select(&r).unwrap_err();
        assert_eq!(
            err.eliminated,
            [
                (Elimination::NotSameHost, 2),
                (Elimination::DifferentHost, 1),
                (Elimination::InsufficientVcpus, 1)
            ]
        );
        // same_host naming instances that run nowhere leaves no host at all.
        r.same_host = Some(BTreeSet::new());
        assert_eq!(
            q.select(&r).unwrap_err().reason,
            "0/4 hosts in queue 'kvm' for 1 vCPU: 4 not running a same_host instance"
        );
    }

    #[test]
    fn backward_walk_and_boundary_host() {
        let mut q = queue_of(&equal_hosts(5));
        let mut back = req(0, 0, 0);
        back.direction = Direction::Backward;
        // From the cursor at node-1 a backward walk goes node-1, node-5, node-4, ...
        let picks: Vec<String> = (0..4).map(|_| pick(&mut q, &back)).collect();
        assert_eq!(picks, ["node-1", "node-5", "node-4", "node-3"]);
        // The cursor now sits on node-2 for either direction.
        assert_eq!(pick(&mut q, &req(0, 0, 0)), "node-2");

        // A boundary stops the walk before it reaches that host.
        let mut q = queue_of(&equal_hosts(5));
        q.charge_host("node-1", &req(4, 0, 0).resources);
        q.charge_host("node-2", &req(4, 0, 0).resources);
        let mut bounded = req(1, 0, 0);
        bounded.boundary_host = Some("node-3".to_owned());
        let err = q.select(&bounded).unwrap_err();
        assert_eq!(
            err.eliminated,
            [
                (Elimination::BeyondBoundary, 3),
                (Elimination::InsufficientVcpus, 2)
            ]
        );
        // Starting on the boundary host is a full lap.
        bounded.boundary_host = Some("node-1".to_owned());
        assert_eq!(pick(&mut q, &bounded), "node-3");
        // Backward from node-4 with the boundary at node-2: node-4, node-3, then stop.
        let mut back = req(4, 0, 0);
        back.direction = Direction::Backward;
        back.boundary_host = Some("node-2".to_owned());
        assert_eq!(pick(&mut q, &back), "node-4");
        // The cursor moved back to node-3, which has 3 vCPUs left; the walk stops at node-2.
        let err = q.select(&back).unwrap_err();
        assert_eq!(
            err.eliminated,
            [
                (Elimination::BeyondBoundary, 4),
                (Elimination::InsufficientVcpus, 1)
            ],
            "{err}"
        );
    }

    #[test]
    fn an_unanswering_host_leaves_the_queue_until_the_rebuild() {
        let rows = equal_hosts(4);
        let mut q = queue_of(&rows);
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-1");
        assert_eq!(pick(&mut q, &req(1, 0, 0)), "node-2");
        q.mark_unavailable("node-2", UnavailableReason::NotAnswering);
        q.mark_unavailable("node-9", UnavailableReason::NotAnswering);
        assert!(q.host("node-2").is_none());
        assert_eq!(q.len(), 3);
        assert_eq!(
            q.host("node-4").map(|h| h.hostname.as_str()),
            Some("node-4")
        );
        // The cursor still points at node-3, and node-2 is never offered.
        let picks: Vec<String> = (0..4).map(|_| pick(&mut q, &req(1, 0, 0))).collect();
        assert_eq!(picks, ["node-3", "node-4", "node-1", "node-3"]);
        let mut forced = req(1, 0, 0);
        forced.scheduler_host = Some("node-2".to_owned());
        assert_eq!(
            q.select(&forced).unwrap_err().reason,
            "Host node-2 is not available: not answering"
        );
        // Taking the last host out of a queue empties it.
        for name in ["node-1", "node-3", "node-4"] {
            q.mark_unavailable(name, UnavailableReason::NotAnswering);
        }
        assert!(q.is_empty());
        assert_eq!(
            q.select(&req(1, 0, 0)).unwrap_err().eliminated,
            [(Elimination::Down, 4)]
        );
        q.build_queue(&rows);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn multi_create_is_all_or_nothing_for_min_count() {
        // Two hosts with room for three 1-vCPU instances in all.
        let rows = [row("node-1", 2, 8192, 100), row("node-2", 1, 8192, 100)];
        let mut q = queue_of(&rows);
        let err = q.select_many(&req(1, 0, 0), 5, 4).unwrap_err();
        assert!(
            err.reason
                .starts_with("Only 3 of the 4 instances required fit. 0/2 hosts"),
            "{err}"
        );
        for name in ["node-1", "node-2"] {
            assert_eq!(
                q.host(name).unwrap().vcpus_used,
                0.0,
                "nothing stays charged"
            );
        }

        let batch = q.select_many(&req(1, 0, 0), 5, 2).unwrap();
        let hosts: Vec<&str> = batch
            .placements
            .iter()
            .map(|p| p.hostname.as_str())
            .collect();
        assert_eq!(hosts.len(), 3);
        assert!(batch.shortfall.is_some());

        let mut q = queue_of(&rows);
        let batch = q.select_many(&req(1, 0, 0), 2, 2).unwrap();
        assert_eq!(batch.placements.len(), 2);
        assert_eq!(batch.shortfall, None);
    }

    #[test]
    fn a_lost_race_makes_the_host_look_fuller_never_emptier() {
        let mut q = queue_of(&[row("node-1", 4, 8192, 100)]);
        q.observe_placed(
            "node-1",
            Placed {
                vcpus: 3,
                memory_mb: 1024,
                disk_mb: 10 * 1024,
            },
        );
        let h = q.host("node-1").unwrap();
        assert_eq!(
            (
                h.free_vcpus,
                h.vcpus_used,
                h.free_memory_mb,
                h.free_local_gb
            ),
            (1.0, 3.0, 7168.0, 90.0)
        );
        // A smaller figure (an older view) changes nothing.
        q.observe_placed("node-1", Placed::default());
        assert_eq!(q.host("node-1").unwrap().free_vcpus, 1.0);
        q.observe_placed("node-9", Placed::default());
    }

    /// A 64-bit linear congruential generator (Knuth's MMIX constants): enough randomness for
    /// a reproducible property test without a dependency.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        fn below(&mut self, n: u64) -> i64 {
            (self.next() % n) as i64
        }
    }

    fn random_rows(rng: &mut Lcg) -> Vec<ComputeNodeRow> {
        let ratios = [1.0, 1.5, 2.0, 16.0, 0.0, f64::NAN];
        let queues = [None, Some("kvm"), Some("gpu"), Some("")];
        let n = 1 + rng.below(8);
        (0..n)
            .map(|i| {
                let vcpus = 1 + rng.below(16);
                let memory_mb = 512 * (1 + rng.below(32));
                let local_gb = 10 * (1 + rng.below(50));
                ComputeNodeRow {
                    vcpus_used: rng.below(vcpus as u64 + 1),
                    free_ram_mb: rng.below(memory_mb as u64 + 1),
                    free_disk_gb: rng.below(local_gb as u64 + 1),
                    queue_name: queues[rng.below(4) as usize].map(str::to_owned),
                    cpu_allocation_ratio: ratios[rng.below(6) as usize],
                    ram_allocation_ratio: ratios[rng.below(6) as usize],
                    disk_allocation_ratio: ratios[rng.below(6) as usize],
                    disabled: rng.below(8) == 0,
                    up: rng.below(8) != 0,
                    ..row(&format!("node-{i}"), vcpus, memory_mb, local_gb)
                }
            })
            .collect()
    }

    fn random_request(rng: &mut Lcg, n_hosts: i64) -> PlacementRequest {
        let mut r = req(
            rng.below(5),
            [0, 512, 1024, 2048, 4096][rng.below(5) as usize],
            1024 * rng.below(40) + [0, 512][rng.below(2) as usize],
        );
        r.queue_name = [None, Some("gpu")][rng.below(2) as usize].map(str::to_owned);
        if rng.below(4) == 0 {
            let pattern = format!("^node-[0-{}]$", rng.below(n_hosts as u64).min(9));
            r.scheduler_host_match = Some(HostMatch::new(&pattern).unwrap());
        }
        if rng.below(4) == 0 {
            r.different_host = [format!("node-{}", rng.below(n_hosts as u64))].into();
        }
        if rng.below(10) == 0 {
            r.scheduler_host = Some(format!("node-{}", rng.below(n_hosts as u64 + 1)));
        }
        r
    }

    fn eligible(host: &HostState, r: &PlacementRequest, queue: &str) -> bool {
        host.queue_name == queue
            && match &r.scheduler_host_match {
                Some(m) => m.is_match(&host.hostname),
                None => true,
            }
            && !r.different_host.contains(&host.hostname)
    }

    #[test]
    fn random_requests_never_over_commit() {
        let mut rng = Lcg(0x5eed_2024);
        let mut placements = 0;
        for _round in 0..200 {
            let rows = random_rows(&mut rng);
            let n_hosts = rows.len() as i64;
            let mut q = queue_of(&rows);
            for _ in 0..100 {
                if rng.below(20) == 0 {
                    q.build_queue(&rows);
                }
                let r = random_request(&mut rng, n_hosts);
                let queue = r.queue_name.clone().unwrap_or_else(|| "kvm".to_owned());
                let before: Vec<HostState> = q.queues.values().flatten().cloned().collect();
                match q.select(&r) {
                    Ok(placement) => {
                        placements += 1;
                        let was = before
                            .iter()
                            .find(|h| h.hostname == placement.hostname)
                            .expect("placed on a known host");
                        assert!(check_host_resource(was, &r.resources), "{was:?} {r:?}");
                        assert!(!r.different_host.contains(&placement.hostname));
                        if r.scheduler_host.is_none() {
                            assert!(eligible(was, &r, &queue), "{was:?} {r:?}");
                        }
                        if rng.below(10) == 0 {
                            q.release_host(&placement.hostname, &r.resources);
                        }
                    }
                    Err(err) => {
                        if r.scheduler_host.is_none() {
                            // A refusal means no eligible host had room.
                            assert!(
                                !before.iter().any(|h| eligible(h, &r, &queue)
                                    && check_host_resource(h, &r.resources)),
                                "{err} {r:?}"
                            );
                        }
                    }
                }
                for h in q.queues.values().flatten() {
                    assert!(h.free_vcpus >= 0.0, "{h:?}");
                    assert!(h.free_memory_mb >= 0.0, "{h:?}");
                    assert!(h.free_local_gb >= 0.0, "{h:?}");
                    assert!(h.free_vcpus <= h.vcpus, "{h:?}");
                }
            }
        }
        assert!(
            placements > 1000,
            "the test exercised placements: {placements}"
        );
    }

    #[test]
    fn extreme_inputs_do_not_panic() {
        let extremes = [i64::MIN, -1, 0, 1, i64::MAX];
        let mut rows = Vec::new();
        for (i, &a) in extremes.iter().enumerate() {
            for (j, &b) in extremes.iter().enumerate() {
                rows.push(ComputeNodeRow {
                    vcpus: a,
                    vcpus_used: b,
                    memory_mb: a,
                    free_ram_mb: b,
                    local_gb: a,
                    free_disk_gb: b,
                    cpu_allocation_ratio: f64::MAX,
                    ..row(&format!("node-{i}-{j}"), 0, 0, 0)
                });
            }
        }
        let mut q = queue_of(&rows);
        for &v in &extremes {
            for &d in &extremes {
                let r = req(v, v, d);
                let _ = q.select(&r);
                q.charge_host("node-4-0", &r.resources);
                q.release_host("node-4-0", &r.resources);
                let mut forced = r.clone();
                forced.scheduler_host = Some("node-4-4".to_owned());
                forced.skip_forced_host_resource_check = true;
                let _ = q.select(&forced);
            }
        }
        for h in q.queues.values().flatten() {
            assert!(!h.free_vcpus.is_nan(), "{h:?}");
            assert!(!h.free_memory_mb.is_nan(), "{h:?}");
            assert!(!h.free_local_gb.is_nan(), "{h:?}");
        }
    }
}
