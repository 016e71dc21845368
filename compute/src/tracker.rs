//! The compute's own ledger of what its instances hold, and the claim that keeps it within the
//! limits the scheduler computed. Pure: no I/O.

use std::collections::HashMap;

use proto::{InstanceResources, Limits};

/// What one instance holds: vCPUs, MB of RAM and MB of disk. Disk is counted in MB, as the
/// scheduler's `requested_disk` is (`1024 * (root_gb + ephemeral_gb) + swap_mb`), so the two
/// never disagree about whether an instance fits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

impl Usage {
    pub fn of(resources: &InstanceResources) -> Self {
        let disk_gb = resources
            .root_gb
            .max(0)
            .saturating_add(resources.ephemeral_gb.max(0));
        Usage {
            vcpus: resources.vcpus.max(0),
            memory_mb: resources.memory_mb.max(0),
            disk_mb: disk_gb
                .saturating_mul(1024)
                .saturating_add(resources.swap_mb.max(0)),
        }
    }

    fn plus(self, other: Usage) -> Usage {
        Usage {
            vcpus: self.vcpus.saturating_add(other.vcpus),
            memory_mb: self.memory_mb.saturating_add(other.memory_mb),
            disk_mb: self.disk_mb.saturating_add(other.disk_mb),
        }
    }

    /// Disk in whole GB, rounded up, as `compute_nodes.local_gb_used` records it.
    pub fn disk_gb(&self) -> i64 {
        self.disk_mb.saturating_add(1023) / 1024
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("Insufficient compute resources on {host}: {reason}")]
pub struct ClaimError {
    pub host: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct ResourceTracker {
    instances: HashMap<String, Usage>,
}

impl ResourceTracker {
    /// Starts from the instances the database places on this host.
    pub fn from_instances(instances: &[InstanceResources]) -> Self {
        ResourceTracker {
            instances: instances
                .iter()
                .map(|i| (i.uuid.clone(), Usage::of(i)))
                .collect(),
        }
    }

    pub fn used(&self) -> Usage {
        self.instances
            .values()
            .fold(Usage::default(), |sum, u| sum.plus(*u))
    }

    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    /// Takes `usage` for `uuid` if it fits under `limits`; claiming the same uuid twice is a no-op.
    pub fn claim(
        &mut self,
        host: &str,
        uuid: &str,
        usage: Usage,
        limits: &Limits,
    ) -> Result<(), ClaimError> {
        if self.instances.contains_key(uuid) {
            return Ok(());
        }
        let used = self.used();
        let checks = [
            ("vCPUs", used.vcpus, usage.vcpus, limits.vcpu),
            ("MB RAM", used.memory_mb, usage.memory_mb, limits.memory_mb),
            (
                "MB disk",
                used.disk_mb,
                usage.disk_mb,
                limits.disk_gb * 1024.0,
            ),
        ];
        for (what, used, requested, limit) in checks {
            if requested > 0 && used.saturating_add(requested) as f64 > limit {
                return Err(ClaimError {
                    host: host.to_string(),
                    reason: format!("{requested} {what} requested, {used} of {limit} in use"),
                });
            }
        }
        self.instances.insert(uuid.to_string(), usage);
        Ok(())
    }

    /// Whether this host holds `uuid` (built here and not deleted; stopped instances too, whose
    /// resources stay claimed as in Nova).
    pub fn holds(&self, uuid: &str) -> bool {
        self.instances.contains_key(uuid)
    }

    pub fn release(&mut self, uuid: &str) -> bool {
        self.instances.remove(uuid).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(
        uuid: &str,
        vcpus: i64,
        memory_mb: i64,
        root_gb: i64,
        swap_mb: i64,
    ) -> InstanceResources {
        InstanceResources {
            uuid: uuid.into(),
            vcpus,
            memory_mb,
            root_gb,
            ephemeral_gb: 0,
            swap_mb,
            vm_state: "active".into(),
            task_state: None,
            power_state: None,
        }
    }

    const LIMITS: Limits = Limits {
        vcpu: 4.0,
        memory_mb: 4096.0,
        disk_gb: 40.0,
    };

    #[test]
    fn disk_is_counted_in_mb_like_the_scheduler_and_reported_in_whole_gb() {
        assert_eq!(Usage::of(&resources("a", 1, 512, 1, 1)).disk_mb, 1025);
        assert_eq!(Usage::of(&resources("a", 1, 512, 1, 1)).disk_gb(), 2);
        assert_eq!(Usage::of(&resources("a", 1, 512, 1, 1024)).disk_gb(), 2);
        assert_eq!(Usage::of(&resources("a", 1, 512, 1, 1025)).disk_gb(), 3);
    }

    #[test]
    fn absurd_values_saturate_instead_of_overflowing() {
        let huge = resources("h", i64::MAX, i64::MAX, i64::MAX, i64::MAX);
        let usage = Usage::of(&huge);
        assert_eq!(usage.disk_mb, i64::MAX);
        let mut tracker =
            ResourceTracker::from_instances(&[huge.clone(), resources("g", i64::MAX, 1, 1, 0)]);
        assert_eq!(tracker.used().vcpus, i64::MAX);
        assert!(tracker.claim("h", "x", usage, &LIMITS).is_err());
        let negative = Usage::of(&resources("n", -5, -5, -5, -5));
        assert_eq!(negative, Usage::default());
    }

    #[test]
    fn claims_fill_up_to_the_limits_exactly() {
        let mut tracker = ResourceTracker::default();
        for i in 0..4 {
            let usage = Usage::of(&resources(&format!("i{i}"), 1, 1024, 10, 0));
            tracker
                .claim("node-1", &format!("i{i}"), usage, &LIMITS)
                .expect("fits");
        }
        assert_eq!(
            tracker.used(),
            Usage {
                vcpus: 4,
                memory_mb: 4096,
                disk_mb: 40 * 1024
            }
        );
        let err = tracker
            .claim(
                "node-1",
                "i5",
                Usage {
                    vcpus: 1,
                    memory_mb: 0,
                    disk_mb: 0,
                },
                &LIMITS,
            )
            .expect_err("no vCPU left");
        assert!(err.to_string().contains("vCPUs"), "{err}");
        assert!(tracker.holds("i0"));
        assert!(tracker.release("i0"));
        assert!(!tracker.release("i0"));
        assert!(!tracker.holds("i0"));
        assert!(tracker.holds("i1"));
        tracker
            .claim(
                "node-1",
                "i5",
                Usage {
                    vcpus: 1,
                    memory_mb: 1024,
                    disk_mb: 10 * 1024,
                },
                &LIMITS,
            )
            .expect("fits again");
    }

    #[test]
    fn a_repeated_claim_is_counted_once() {
        let mut tracker = ResourceTracker::from_instances(&[resources("a", 2, 2048, 20, 0)]);
        tracker
            .claim(
                "node-1",
                "a",
                Usage {
                    vcpus: 2,
                    memory_mb: 2048,
                    disk_mb: 20 * 1024,
                },
                &LIMITS,
            )
            .expect("same");
        assert_eq!(tracker.used().vcpus, 2);
        assert_eq!(tracker.instance_count(), 1);
    }

    #[test]
    fn each_resource_is_checked() {
        let tracker_with = |u: Usage| {
            let mut t = ResourceTracker::default();
            t.claim("h", "x", u, &LIMITS).map(|_| t)
        };
        assert!(tracker_with(Usage {
            vcpus: 5,
            memory_mb: 1,
            disk_mb: 1024
        })
        .is_err());
        assert!(tracker_with(Usage {
            vcpus: 1,
            memory_mb: 4097,
            disk_mb: 1024
        })
        .is_err());
        assert!(tracker_with(Usage {
            vcpus: 1,
            memory_mb: 1,
            disk_mb: 41 * 1024
        })
        .is_err());
        assert!(tracker_with(Usage {
            vcpus: 4,
            memory_mb: 4096,
            disk_mb: 40 * 1024
        })
        .is_ok());
    }
}
