//! What a request needs and whether a host has it: the seed's `req_res` and `check_host_resource`.

use crate::HostState;

/// The resources one instance asks for, as the seed's `req_res`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResourceRequest {
    pub requested_vcpus: i64,
    /// MB.
    pub requested_ram: i64,
    /// MB: root and ephemeral disks plus swap.
    pub requested_disk: i64,
}

impl ResourceRequest {
    /// `requested_disk = 1024 * (root_gb + ephemeral_gb) + swap_mb`, saturating rather than
    /// overflowing on absurd flavors (which then fit nowhere).
    pub fn from_flavor(
        vcpus: i64,
        memory_mb: i64,
        root_gb: i64,
        ephemeral_gb: i64,
        swap_mb: i64,
    ) -> Self {
        ResourceRequest {
            requested_vcpus: vcpus,
            requested_ram: memory_mb,
            requested_disk: root_gb
                .saturating_add(ephemeral_gb)
                .saturating_mul(1024)
                .saturating_add(swap_mb),
        }
    }

    /// The amounts a placement takes from a host: vCPUs, MB of RAM, GB of disk. A negative
    /// request takes nothing, so it can never add free resources to a host.
    pub(crate) fn charge(&self) -> (f64, f64, f64) {
        (
            self.requested_vcpus.max(0) as f64,
            self.requested_ram.max(0) as f64,
            self.requested_disk.max(0) as f64 / 1024.0,
        )
    }

    /// "1 vCPU, 16384 MB RAM and 160 GB disk", naming only what is asked for; `None` when
    /// nothing is.
    pub(crate) fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.requested_vcpus > 0 {
            parts.push(vcpus(self.requested_vcpus as f64));
        }
        if self.requested_ram > 0 {
            parts.push(format!("{} MB RAM", self.requested_ram));
        }
        if self.requested_disk > 0 {
            parts.push(format!(
                "{} GB disk",
                amount(self.requested_disk as f64 / 1024.0)
            ));
        }
        let (last, rest) = parts.split_last()?;
        Some(if rest.is_empty() {
            last.clone()
        } else {
            format!("{} and {last}", rest.join(", "))
        })
    }
}

/// The seed's `check_host_resource`: disk always, RAM and vCPUs only when asked for.
pub fn check_host_resource(host: &HostState, req: &ResourceRequest) -> bool {
    disk_fits(host, req) && ram_fits(host, req) && vcpus_fit(host, req)
}

/// Why `host` fails [`check_host_resource`] for `req`, e.g.
/// "node-2 has 512 MB RAM free, 2048 MB requested"; `None` when it fits.
pub fn why_not(host: &HostState, req: &ResourceRequest) -> Option<String> {
    let shortfalls = shortfalls(host, req);
    if shortfalls.is_empty() {
        None
    } else {
        Some(format!(
            "{} has {}",
            host.hostname,
            shortfalls.join(" and ")
        ))
    }
}

/// Each resource `host` lacks for `req`, e.g. "512 MB RAM free, 2048 MB requested".
pub(crate) fn shortfalls(host: &HostState, req: &ResourceRequest) -> Vec<String> {
    let mut out = Vec::new();
    if !disk_fits(host, req) {
        out.push(format!(
            "{} GB disk free, {} GB requested",
            amount(host.free_local_gb),
            amount(req.requested_disk as f64 / 1024.0)
        ));
    }
    if !ram_fits(host, req) {
        out.push(format!(
            "{} MB RAM free, {} MB requested",
            amount(host.free_memory_mb),
            req.requested_ram
        ));
    }
    if !vcpus_fit(host, req) {
        out.push(format!(
            "{} free, {} requested",
            vcpus(host.free_vcpus),
            req.requested_vcpus
        ));
    }
    out
}

// Each check is written as "has at least", so a NaN free amount (only possible in a hand-built
// HostState) fails rather than passes.
pub(crate) fn disk_fits(host: &HostState, req: &ResourceRequest) -> bool {
    let usable_disk_mb = host.free_local_gb * 1024.0;
    usable_disk_mb >= req.requested_disk as f64
}

pub(crate) fn ram_fits(host: &HostState, req: &ResourceRequest) -> bool {
    req.requested_ram <= 0 || host.free_memory_mb >= req.requested_ram as f64
}

pub(crate) fn vcpus_fit(host: &HostState, req: &ResourceRequest) -> bool {
    req.requested_vcpus <= 0 || host.free_vcpus >= req.requested_vcpus as f64
}

/// "1 vCPU", "0 vCPUs", "2.5 vCPUs".
fn vcpus(n: f64) -> String {
    let unit = if n == 1.0 { "vCPU" } else { "vCPUs" };
    format!("{} {unit}", amount(n))
}

/// A resource amount for people: whole numbers without a fraction, others to two decimals.
pub(crate) fn amount(v: f64) -> String {
    let rounded = (v * 100.0).round() / 100.0;
    // Rounding a tiny negative value gives -0, which reads as a bug.
    let rounded = if rounded == 0.0 { 0.0 } else { rounded };
    format!("{rounded}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_state::tests::row;

    fn host(vcpus: i64, memory_mb: i64, local_gb: i64) -> HostState {
        HostState::from_row(&row("node-2", vcpus, memory_mb, local_gb), "kvm")
    }

    fn req(vcpus: i64, ram: i64, disk: i64) -> ResourceRequest {
        ResourceRequest {
            requested_vcpus: vcpus,
            requested_ram: ram,
            requested_disk: disk,
        }
    }

    #[test]
    fn requested_disk_formula() {
        let cases = [
            // vcpus, memory_mb, root_gb, ephemeral_gb, swap_mb, requested_disk
            (1, 512, 1, 0, 0, 1024),
            (2, 2048, 20, 0, 0, 20 * 1024),
            (4, 8192, 40, 20, 0, 60 * 1024),
            (1, 512, 10, 5, 512, 15 * 1024 + 512),
            (1, 512, 0, 0, 0, 0),
            (1, 512, i64::MAX, 1, 0, i64::MAX),
            (1, 512, i64::MIN, -1, 0, i64::MIN),
        ];
        for (vcpus, memory_mb, root_gb, ephemeral_gb, swap_mb, want) in cases {
            let r = ResourceRequest::from_flavor(vcpus, memory_mb, root_gb, ephemeral_gb, swap_mb);
            assert_eq!(r.requested_disk, want, "{root_gb} {ephemeral_gb} {swap_mb}");
            assert_eq!(r.requested_vcpus, vcpus);
            assert_eq!(r.requested_ram, memory_mb);
        }
    }

    #[test]
    fn check_host_resource_boundaries() {
        // The host has 4 vCPUs, 2048 MB RAM and 10 GB (10240 MB) disk free.
        let h = host(4, 2048, 10);
        let cases = [
            ("exact fit", req(4, 2048, 10240), true),
            ("one vCPU over", req(5, 2048, 10240), false),
            ("one MB RAM over", req(4, 2049, 10240), false),
            ("one MB disk over", req(4, 2048, 10241), false),
            ("zero RAM skips the RAM check", req(1, 0, 0), true),
            ("zero vCPUs skip the vCPU check", req(0, 1, 0), true),
            ("negative requests skip the checks", req(-1, -1, -1), true),
            ("empty request", req(0, 0, 0), true),
        ];
        for (name, r, want) in cases {
            assert_eq!(check_host_resource(&h, &r), want, "{name}");
            assert_eq!(why_not(&h, &r).is_none(), want, "{name}");
        }

        // A host with nothing free still takes a request for nothing, but not 1 MB of disk.
        let full = HostState {
            free_vcpus: 0.0,
            free_memory_mb: 0.0,
            free_local_gb: 0.0,
            ..h.clone()
        };
        assert!(check_host_resource(&full, &req(0, 0, 0)));
        assert!(!check_host_resource(&full, &req(0, 0, 1)));

        // Over-used hosts fail even the RAM- and vCPU-free request, on disk.
        let over = HostState {
            free_local_gb: -1.0,
            ..h.clone()
        };
        assert!(!check_host_resource(&over, &req(0, 0, 0)));

        // NaN never passes.
        let nan = HostState {
            free_vcpus: f64::NAN,
            free_memory_mb: f64::NAN,
            free_local_gb: f64::NAN,
            ..h
        };
        assert!(!check_host_resource(&nan, &req(1, 1, 0)));
    }

    #[test]
    fn why_not_messages() {
        let h = HostState {
            free_memory_mb: 512.0,
            free_vcpus: 1.0,
            free_local_gb: 20.0,
            ..host(4, 4096, 100)
        };
        let cases = [
            (
                req(1, 2048, 0),
                "node-2 has 512 MB RAM free, 2048 MB requested",
            ),
            (req(2, 0, 0), "node-2 has 1 vCPU free, 2 requested"),
            (
                req(1, 0, 40 * 1024 + 512),
                "node-2 has 20 GB disk free, 40.5 GB requested",
            ),
            (
                req(3, 1024, 0),
                "node-2 has 512 MB RAM free, 1024 MB requested and 1 vCPU free, 3 requested",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(why_not(&h, &r).as_deref(), Some(want));
        }
    }

    #[test]
    fn describe_and_amount() {
        let cases = [
            (
                req(1, 16384, 160 * 1024),
                Some("1 vCPU, 16384 MB RAM and 160 GB disk"),
            ),
            (req(2, 512, 0), Some("2 vCPUs and 512 MB RAM")),
            (req(0, 0, 512), Some("0.5 GB disk")),
            (req(0, 0, 0), None),
            (req(-1, -1, -1), None),
        ];
        for (r, want) in cases {
            assert_eq!(r.describe().as_deref(), want);
        }
        assert_eq!(amount(4.0), "4");
        assert_eq!(amount(4.5), "4.5");
        assert_eq!(amount(1.0 / 3.0), "0.33");
        assert_eq!(amount(-0.001), "0");
        assert_eq!(amount(-2.0), "-2");
    }

    #[test]
    fn charge_ignores_negative_requests() {
        assert_eq!(req(2, 1024, 2048).charge(), (2.0, 1024.0, 2.0));
        assert_eq!(req(-2, -1024, -2048).charge(), (0.0, 0.0, 0.0));
    }
}
