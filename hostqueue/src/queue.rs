//! The queues of hosts and the walk that picks one: the seed's `QueueManager.build_queue` and
//! `_new_schedule` with its `find_pos` cursor.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::resources::shortfalls;
use crate::{check_host_resource, why_not, ComputeNodeRow, HostState, Limits};
use crate::{PlacementRequest, ResourceRequest};

/// How many hosts a "no valid host" message describes one by one.
const DETAILED_HOSTS: usize = 5;

/// The host chosen for one instance: where to cast `new_run_instance` and the limits its
/// claim must respect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub hostname: String,
    pub host: String,
    pub rpc_endpoint: String,
    pub limits: Limits,
}

impl Placement {
    fn of(host: &HostState) -> Self {
        Placement {
            hostname: host.hostname.clone(),
            host: host.host.clone(),
            rpc_endpoint: host.rpc_endpoint.clone(),
            limits: host.limits,
        }
    }
}

/// No host can take the instance; `reason` says why, for the instance fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("No valid host was found. {reason}")]
pub struct NoValidHost {
    pub reason: String,
}

fn no_valid_host(reason: String) -> NoValidHost {
    NoValidHost { reason }
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
    unavailable: BTreeMap<String, String>,
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

    /// Replaces every host state from `rows`, dropping in-memory charges (the rows now count
    /// them). Disabled and down hosts go to [`HostQueue::unavailable`] instead. Each queue's
    /// cursor is kept, so round robin continues across rebuilds; a cursor past the end of a
    /// queue that got shorter wraps to its start, and the cursor of a queue that is gone is
    /// forgotten. When several rows name the same host, the last one wins.
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
            if row.disabled {
                let reason = match row.disabled_reason.as_deref() {
                    Some(reason) if !reason.is_empty() => format!("disabled: {reason}"),
                    _ => "disabled".to_owned(),
                };
                self.unavailable.insert(hostname.to_owned(), reason);
                continue;
            }
            if !row.up {
                self.unavailable
                    .insert(hostname.to_owned(), "service is down".to_owned());
                continue;
            }
            let state = HostState::from_row(row, &self.default_queue);
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

    /// An available host by name, whatever its queue.
    pub fn host(&self, hostname: &str) -> Option<&HostState> {
        let (queue, pos) = self.index.get(hostname)?;
        self.queues.get(queue)?.get(*pos)
    }

    fn host_mut(&mut self, hostname: &str) -> Option<&mut HostState> {
        let (queue, pos) = self.index.get(hostname)?;
        self.queues.get_mut(queue)?.get_mut(*pos)
    }

    /// Hosts left out by the last [`HostQueue::build_queue`], with the reason
    /// ("disabled: maintenance", "service is down").
    pub fn unavailable(&self) -> &BTreeMap<String, String> {
        &self.unavailable
    }

    /// Picks a host for `req` and charges it in memory, so the next call sees what is left.
    ///
    /// A forced `scheduler_host` is taken if it is available, not avoided and (unless the
    /// operator turned the check off) has room; the cursor does not move. Otherwise the
    /// request's queue is walked from its cursor for at most one lap, skipping hosts that do
    /// not match `scheduler_host_match`, are avoided or lack room; the cursor then moves past
    /// the chosen host.
    pub fn select(&mut self, req: &PlacementRequest) -> Result<Placement, NoValidHost> {
        match req.scheduler_host.as_deref() {
            Some(forced) => self.select_forced(forced, req),
            None => self.select_from_queue(req),
        }
    }

    fn select_forced(
        &mut self,
        forced: &str,
        req: &PlacementRequest,
    ) -> Result<Placement, NoValidHost> {
        let Some(host) = self.host(forced) else {
            return Err(no_valid_host(match self.unavailable.get(forced) {
                Some(reason) => format!("Host {forced} is not available: {reason}"),
                None => format!("Host {forced} is unknown"),
            }));
        };
        if req.avoid_hosts.iter().any(|avoid| avoid == forced) {
            return Err(no_valid_host(format!(
                "Host {forced} is excluded by the request (different_host or an earlier attempt)"
            )));
        }
        if req.check_forced_host_resources {
            if let Some(why) = why_not(host, &req.resources) {
                return Err(no_valid_host(why));
            }
        }
        let placement = Placement::of(host);
        self.charge_host(forced, &req.resources);
        Ok(placement)
    }

    fn select_from_queue(&mut self, req: &PlacementRequest) -> Result<Placement, NoValidHost> {
        let queue_name = match req.queue_name.as_deref() {
            Some(name) if !name.is_empty() => name,
            _ => self.default_queue.as_str(),
        };
        let queue = match self.queues.get(queue_name) {
            Some(queue) if !queue.is_empty() => queue,
            _ => {
                return Err(no_valid_host(format!("No hosts in queue '{queue_name}'")));
            }
        };
        let matches = |host: &HostState| match &req.scheduler_host_match {
            Some(host_match) => host_match.is_match(&host.hostname),
            None => true,
        };
        if !queue.iter().any(matches) {
            let pattern = req
                .scheduler_host_match
                .as_ref()
                .map_or("", |host_match| host_match.as_str());
            return Err(no_valid_host(format!("No host name matches '{pattern}'")));
        }
        let avoid: BTreeSet<&str> = req.avoid_hosts.iter().map(String::as_str).collect();

        // Walk in the full queue's index space, so a host-name filter does not disturb the
        // round robin of requests without one.
        let len = queue.len();
        let start = self.find_pos.get(queue_name).copied().unwrap_or(0) % len;
        let mut rejected: Vec<(&str, String)> = Vec::new();
        let mut chosen = None;
        for step in 0..len {
            let pos = (start + step) % len;
            let host = &queue[pos];
            if !matches(host) {
                continue;
            }
            if avoid.contains(host.hostname.as_str()) {
                rejected.push((&host.hostname, "excluded by the request".to_owned()));
                continue;
            }
            if check_host_resource(host, &req.resources) {
                chosen = Some(pos);
                break;
            }
            let shortfalls = shortfalls(host, &req.resources).join(" and ");
            rejected.push((&host.hostname, shortfalls));
        }

        let Some(pos) = chosen else {
            return Err(no_valid_host(summarise(queue_name, req, &rejected)));
        };
        let queue_name = queue_name.to_owned();
        self.find_pos.insert(queue_name.clone(), (pos + 1) % len);
        let host = self
            .queues
            .get_mut(&queue_name)
            .and_then(|queue| queue.get_mut(pos))
            .ok_or_else(|| no_valid_host(format!("No hosts in queue '{queue_name}'")))?;
        charge(host, &req.resources);
        Ok(Placement::of(host))
    }

    /// Takes `req` from the host's free resources until the next rebuild. Unknown hosts are
    /// ignored.
    pub fn charge_host(&mut self, hostname: &str, req: &ResourceRequest) {
        if let Some(host) = self.host_mut(hostname) {
            charge(host, req);
        }
    }

    /// Gives back what [`HostQueue::charge_host`] took, for a placement that did not happen
    /// (the cast to the chosen compute failed). Free resources never rise above the host's
    /// capacity, so a release after a rebuild already counted it cannot invent room.
    /// Unknown hosts are ignored.
    pub fn release_host(&mut self, hostname: &str, req: &ResourceRequest) {
        let Some(host) = self.host_mut(hostname) else {
            return;
        };
        let (vcpus, ram_mb, disk_gb) = req.charge();
        let vcpus = give_back(host.free_vcpus, vcpus, host.vcpus);
        host.free_vcpus += vcpus;
        host.vcpus_used -= vcpus;
        host.free_memory_mb += give_back(host.free_memory_mb, ram_mb, host.memory_mb);
        host.free_local_gb += give_back(host.free_local_gb, disk_gb, host.local_gb);
    }
}

fn charge(host: &mut HostState, req: &ResourceRequest) {
    let (vcpus, ram_mb, disk_gb) = req.charge();
    host.free_vcpus -= vcpus;
    host.vcpus_used += vcpus;
    host.free_memory_mb -= ram_mb;
    host.free_local_gb -= disk_gb;
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

/// "No host in queue 'kvm' has 1 vCPU, 16384 MB RAM and 160 GB disk free (3 hosts checked:
/// node-1: ...; node-2: ...; node-3: ...)".
fn summarise(queue_name: &str, req: &PlacementRequest, rejected: &[(&str, String)]) -> String {
    let matching = match &req.scheduler_host_match {
        Some(host_match) => format!(" matching '{}'", host_match.as_str()),
        None => String::new(),
    };
    let wanted = match req.resources.describe() {
        Some(wanted) => format!("{wanted} free"),
        None => "room for the request".to_owned(),
    };
    let plural = if rejected.len() == 1 { "" } else { "s" };
    let mut details: Vec<String> = rejected
        .iter()
        .take(DETAILED_HOSTS)
        .map(|(hostname, why)| format!("{hostname}: {why}"))
        .collect();
    if rejected.len() > DETAILED_HOSTS {
        details.push(format!("and {} more", rejected.len() - DETAILED_HOSTS));
    }
    format!(
        "No host in queue '{queue_name}'{matching} has {wanted} ({} host{plural} checked: {})",
        rejected.len(),
        details.join("; ")
    )
}

#[cfg(test)]
mod tests {
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
        let unavailable: Vec<(&str, &str)> = q
            .unavailable()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            unavailable,
            [
                ("node-7", "service is down"),
                ("node-8", "disabled"),
                ("node-9", "disabled: maintenance"),
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
        assert_eq!(q.unavailable()["node-2"], "disabled: bad disk");
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
            "No valid host was found. No host in queue 'kvm' has 1 vCPU free \
             (1 host checked: node-1: 0 vCPUs free, 1 requested)"
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
                ..row("node-1", 4, 8192, 100)
            },
            ComputeNodeRow {
                free_ram_mb: 512,
                ..row("node-2", 4, 8192, 100)
            },
            row("node-3", 4, 8192, 100),
        ];
        let mut q = queue_of(&rows);
        let r = req(1, 16384, 160 * 1024);
        let err = q.select(&r).unwrap_err();
        assert_eq!(
            err.reason,
            "No host in queue 'kvm' has 1 vCPU, 16384 MB RAM and 160 GB disk free (3 hosts checked: \
             node-1: 100 GB disk free, 160 GB requested and 8192 MB RAM free, 16384 MB requested \
             and 0 vCPUs free, 1 requested; \
             node-2: 100 GB disk free, 160 GB requested and 512 MB RAM free, 16384 MB requested; \
             node-3: 100 GB disk free, 160 GB requested and 8192 MB RAM free, 16384 MB requested)"
        );

        // Avoided hosts and a host-name filter show in the summary; detail stops at five hosts.
        let mut q = queue_of(&equal_hosts(8));
        let mut r = req(64, 0, 0);
        r.avoid_hosts = vec!["node-1".to_owned()];
        r.scheduler_host_match = Some(HostMatch::new("node").unwrap());
        let err = q.select(&r).unwrap_err();
        assert_eq!(
            err.reason,
            "No host in queue 'kvm' matching 'node' has 64 vCPUs free (8 hosts checked: \
             node-1: excluded by the request; node-2: 4 vCPUs free, 64 requested; \
             node-3: 4 vCPUs free, 64 requested; node-4: 4 vCPUs free, 64 requested; \
             node-5: 4 vCPUs free, 64 requested; and 3 more)"
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
                want: Err("Host node-1 is excluded by the request \
                           (different_host or an earlier attempt)"),
            },
        ];
        for case in cases {
            let mut q = queue_of(&rows);
            let mut r = req(1, 2048, 1024);
            r.scheduler_host = Some(case.forced.to_owned());
            r.check_forced_host_resources = case.check;
            r.avoid_hosts = case.avoid.iter().map(|s| s.to_string()).collect();
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
        r.check_forced_host_resources = false;
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
            "No host name matches 'xyz'"
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
        r.avoid_hosts = vec!["node-1".to_owned(), "node-2".to_owned()];
        for _ in 0..4 {
            assert_eq!(pick(&mut q, &r), "node-3");
        }
        let err = q.select(&r).unwrap_err();
        assert!(
            err.reason.contains("node-1: excluded by the request"),
            "{err}"
        );
        assert!(err.reason.contains("node-3: 0 vCPUs free"), "{err}");
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
            r.avoid_hosts = vec![format!("node-{}", rng.below(n_hosts as u64))];
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
            && !r.avoid_hosts.contains(&host.hostname)
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
                        assert!(!r.avoid_hosts.contains(&placement.hostname));
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
                forced.check_forced_host_resources = false;
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
