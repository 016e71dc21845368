//! One compute host as the scheduler sees it: the seed's `BaseQueue`.

use serde::{Deserialize, Serialize};

/// What the scheduler reads from `compute_nodes` joined with `services`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ComputeNodeRow {
    /// `compute_nodes.id`: the row a placement's database claim updates.
    pub node_id: i64,
    /// The host name used everywhere (`node-1`, ...).
    pub hypervisor_hostname: String,
    pub host: String,
    pub rpc_endpoint: String,
    /// Totals and usage as the compute last reported them.
    pub vcpus: i64,
    pub vcpus_used: i64,
    pub memory_mb: i64,
    pub free_ram_mb: i64,
    pub local_gb: i64,
    pub free_disk_gb: i64,
    /// What schedulers have placed on the node (the sum of its allocations, committed before
    /// the compute hears of them): vCPUs, MB of RAM, MB of disk.
    pub placed: Placed,
    /// Kept back for the host itself; taken off the capacity after the ratio.
    pub reserved_host_memory_mb: i64,
    pub reserved_host_disk_mb: i64,
    /// From `extra_resources`; `None` or `""` puts the host in the default queue.
    pub queue_name: Option<String>,
    pub cpu_allocation_ratio: f64,
    pub ram_allocation_ratio: f64,
    pub disk_allocation_ratio: f64,
    pub disabled: bool,
    pub disabled_reason: Option<String>,
    /// The service's heartbeat is recent enough (the caller decides what that means).
    pub up: bool,
}

/// Resources placed on a node: vCPUs, MB of RAM and MB of disk (disk in MB, as a request's
/// `requested_disk` is, so that swap is counted exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Placed {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

/// The ceilings the compute's claim and the database claim must respect: capacity after the
/// allocation ratios, less what is reserved for the host.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub vcpu: f64,
    pub memory_mb: f64,
    pub disk_gb: f64,
}

/// A host in a queue, with its capacity after the allocation ratios and what is still free.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostState {
    pub node_id: i64,
    pub hostname: String,
    pub host: String,
    pub rpc_endpoint: String,
    pub queue_name: String,
    pub vcpus: f64,
    pub vcpus_used: f64,
    pub free_vcpus: f64,
    pub memory_mb: f64,
    pub free_memory_mb: f64,
    pub local_gb: f64,
    pub free_local_gb: f64,
    pub limits: Limits,
}

impl HostState {
    /// The seed's `build_queue` arithmetic for one row. A row without a queue name goes to
    /// `default_queue`.
    ///
    /// Used is the larger of what the compute reported and what schedulers placed: a
    /// placement counts from the moment it is committed, before the compute reports it, and
    /// an instance the compute runs counts even if no allocation records it.
    pub fn from_row(row: &ComputeNodeRow, default_queue: &str) -> Self {
        let cpu_ratio = allocation_ratio(row.cpu_allocation_ratio);
        let ram_ratio = allocation_ratio(row.ram_allocation_ratio);
        let disk_ratio = allocation_ratio(row.disk_allocation_ratio);
        let reserved_memory_mb = row.reserved_host_memory_mb.max(0) as f64;
        let reserved_disk_gb = row.reserved_host_disk_mb.max(0) as f64 / 1024.0;

        // Differences are taken in f64 so that no pair of i64 values can overflow.
        let vcpus = row.vcpus as f64 * cpu_ratio;
        let vcpus_used = (row.vcpus_used as f64).max(row.placed.vcpus as f64);
        let free_vcpus = vcpus - vcpus_used;

        let memory_mb = row.memory_mb as f64 * ram_ratio - reserved_memory_mb;
        let memory_used =
            (row.memory_mb as f64 - row.free_ram_mb as f64).max(row.placed.memory_mb as f64);
        let free_memory_mb = memory_mb - memory_used;

        let local_gb = row.local_gb as f64 * disk_ratio - reserved_disk_gb;
        let disk_used_gb =
            (row.local_gb as f64 - row.free_disk_gb as f64).max(row.placed.disk_mb as f64 / 1024.0);
        let free_local_gb = local_gb - disk_used_gb;

        let queue_name = match row.queue_name.as_deref() {
            Some(name) if !name.is_empty() => name,
            _ => default_queue,
        };

        HostState {
            node_id: row.node_id,
            hostname: row.hypervisor_hostname.clone(),
            host: row.host.clone(),
            rpc_endpoint: row.rpc_endpoint.clone(),
            queue_name: queue_name.to_owned(),
            vcpus,
            vcpus_used,
            free_vcpus,
            memory_mb,
            free_memory_mb,
            local_gb,
            free_local_gb,
            limits: Limits {
                vcpu: vcpus,
                memory_mb,
                disk_gb: local_gb,
            },
        }
    }

    /// Takes into account what the database says is placed on the host (after a claim lost a
    /// race to another scheduler): free resources only ever go down here, so a stale or
    /// partial view can make the host look fuller, never emptier.
    pub fn observe_placed(&mut self, placed: Placed) {
        let free_vcpus = self.limits.vcpu - placed.vcpus as f64;
        if free_vcpus < self.free_vcpus {
            self.free_vcpus = free_vcpus;
            self.vcpus_used = self.vcpus - free_vcpus;
        }
        self.free_memory_mb = self
            .free_memory_mb
            .min(self.limits.memory_mb - placed.memory_mb as f64);
        self.free_local_gb = self
            .free_local_gb
            .min(self.limits.disk_gb - placed.disk_mb as f64 / 1024.0);
    }
}

/// A ratio that is not a positive finite number means "no overcommit" rather than a
/// zero, negative or NaN capacity.
fn allocation_ratio(ratio: f64) -> f64 {
    if ratio.is_finite() && ratio > 0.0 {
        ratio
    } else {
        1.0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An enabled, up host in the default queue with the given totals and nothing used.
    pub(crate) fn row(name: &str, vcpus: i64, memory_mb: i64, local_gb: i64) -> ComputeNodeRow {
        ComputeNodeRow {
            node_id: 0,
            hypervisor_hostname: name.to_owned(),
            host: name.to_owned(),
            rpc_endpoint: format!("tcp://{name}:5570"),
            vcpus,
            vcpus_used: 0,
            memory_mb,
            free_ram_mb: memory_mb,
            local_gb,
            free_disk_gb: local_gb,
            placed: Placed::default(),
            reserved_host_memory_mb: 0,
            reserved_host_disk_mb: 0,
            queue_name: None,
            cpu_allocation_ratio: 1.0,
            ram_allocation_ratio: 1.0,
            disk_allocation_ratio: 1.0,
            disabled: false,
            disabled_reason: None,
            up: true,
        }
    }

    #[test]
    fn ratios_and_used_resources() {
        struct Case {
            name: &'static str,
            row: ComputeNodeRow,
            // vcpus, free_vcpus, memory_mb, free_memory_mb, local_gb, free_local_gb
            want: [f64; 6],
        }
        let base = row("node-1", 4, 8192, 100);
        let cases = [
            Case {
                name: "ratio 1, nothing used",
                row: base.clone(),
                want: [4.0, 4.0, 8192.0, 8192.0, 100.0, 100.0],
            },
            Case {
                name: "cpu ratio 16",
                row: ComputeNodeRow {
                    cpu_allocation_ratio: 16.0,
                    ..base.clone()
                },
                want: [64.0, 64.0, 8192.0, 8192.0, 100.0, 100.0],
            },
            Case {
                name: "ram ratio 1.5",
                row: ComputeNodeRow {
                    ram_allocation_ratio: 1.5,
                    ..base.clone()
                },
                want: [4.0, 4.0, 12288.0, 12288.0, 100.0, 100.0],
            },
            Case {
                name: "disk ratio 2",
                row: ComputeNodeRow {
                    disk_allocation_ratio: 2.0,
                    ..base.clone()
                },
                want: [4.0, 4.0, 8192.0, 8192.0, 200.0, 200.0],
            },
            Case {
                name: "used resources are subtracted after the ratio",
                row: ComputeNodeRow {
                    vcpus_used: 10,
                    free_ram_mb: 2048,
                    free_disk_gb: 40,
                    cpu_allocation_ratio: 16.0,
                    ram_allocation_ratio: 1.5,
                    disk_allocation_ratio: 2.0,
                    ..base.clone()
                },
                // 12288 - (8192 - 2048) = 6144; 200 - (100 - 40) = 140
                want: [64.0, 54.0, 12288.0, 6144.0, 200.0, 140.0],
            },
            Case {
                name: "ratio 0, NaN, negative and infinite mean 1.0",
                row: ComputeNodeRow {
                    vcpus_used: 1,
                    cpu_allocation_ratio: 0.0,
                    ram_allocation_ratio: f64::NAN,
                    disk_allocation_ratio: f64::NEG_INFINITY,
                    ..base.clone()
                },
                want: [4.0, 3.0, 8192.0, 8192.0, 100.0, 100.0],
            },
            Case {
                name: "negative ratio and +inf mean 1.0",
                row: ComputeNodeRow {
                    cpu_allocation_ratio: -2.0,
                    ram_allocation_ratio: f64::INFINITY,
                    ..base.clone()
                },
                want: [4.0, 4.0, 8192.0, 8192.0, 100.0, 100.0],
            },
            Case {
                name: "over-used host has negative free resources",
                row: ComputeNodeRow {
                    vcpus_used: 6,
                    free_ram_mb: -1024,
                    ..base.clone()
                },
                want: [4.0, -2.0, 8192.0, -1024.0, 100.0, 100.0],
            },
        ];
        for case in cases {
            let h = HostState::from_row(&case.row, "kvm");
            let got = [
                h.vcpus,
                h.free_vcpus,
                h.memory_mb,
                h.free_memory_mb,
                h.local_gb,
                h.free_local_gb,
            ];
            assert_eq!(got, case.want, "{}", case.name);
            assert_eq!(
                h.limits,
                Limits {
                    vcpu: h.vcpus,
                    memory_mb: h.memory_mb,
                    disk_gb: h.local_gb
                },
                "{}",
                case.name
            );
            assert_eq!(h.vcpus_used, case.row.vcpus_used as f64, "{}", case.name);
        }
    }

    #[test]
    fn placed_usage_and_reserved_resources() {
        let r = ComputeNodeRow {
            vcpus_used: 2,
            free_ram_mb: 8192 - 1024,
            free_disk_gb: 100 - 30,
            placed: Placed {
                vcpus: 3,
                memory_mb: 512,
                disk_mb: 40 * 1024 + 512,
            },
            reserved_host_memory_mb: 512,
            reserved_host_disk_mb: 2048,
            ram_allocation_ratio: 1.5,
            ..row("node-1", 4, 8192, 100)
        };
        let h = HostState::from_row(&r, "kvm");
        // Placed vCPUs (3) exceed the reported 2; reported RAM (1024) exceeds placed (512).
        assert_eq!((h.vcpus, h.vcpus_used, h.free_vcpus), (4.0, 3.0, 1.0));
        // 8192 * 1.5 - 512 reserved = 11776; minus 1024 used.
        assert_eq!((h.memory_mb, h.free_memory_mb), (11776.0, 10752.0));
        // 100 GB - 2 GB reserved = 98; placed 40.5 GB beats the reported 30.
        assert_eq!((h.local_gb, h.free_local_gb), (98.0, 57.5));
        assert_eq!(
            h.limits,
            Limits {
                vcpu: 4.0,
                memory_mb: 11776.0,
                disk_gb: 98.0
            }
        );
        // A negative reservation reserves nothing.
        let r = ComputeNodeRow {
            reserved_host_memory_mb: -4096,
            ..row("node-1", 4, 8192, 100)
        };
        assert_eq!(HostState::from_row(&r, "kvm").memory_mb, 8192.0);
    }

    #[test]
    fn queue_name_defaults() {
        let cases = [(None, "kvm"), (Some(""), "kvm"), (Some("gpu"), "gpu")];
        for (queue_name, want) in cases {
            let r = ComputeNodeRow {
                queue_name: queue_name.map(str::to_owned),
                ..row("node-1", 1, 1, 1)
            };
            assert_eq!(HostState::from_row(&r, "kvm").queue_name, want);
        }
    }

    #[test]
    fn extreme_rows_never_give_nan() {
        let extremes = [i64::MIN, -1, 0, 1, i64::MAX];
        let ratios = [0.0, 1.0, 1e300, f64::MAX, f64::MIN_POSITIVE, f64::NAN];
        for &a in &extremes {
            for &b in &extremes {
                for &ratio in &ratios {
                    let r = ComputeNodeRow {
                        vcpus: a,
                        vcpus_used: b,
                        memory_mb: a,
                        free_ram_mb: b,
                        local_gb: a,
                        free_disk_gb: b,
                        cpu_allocation_ratio: ratio,
                        ram_allocation_ratio: ratio,
                        disk_allocation_ratio: ratio,
                        ..row("node-1", 0, 0, 0)
                    };
                    let h = HostState::from_row(&r, "kvm");
                    for v in [
                        h.vcpus,
                        h.free_vcpus,
                        h.memory_mb,
                        h.free_memory_mb,
                        h.local_gb,
                        h.free_local_gb,
                    ] {
                        assert!(!v.is_nan(), "{a} {b} {ratio}: {h:?}");
                    }
                }
            }
        }
    }
}
