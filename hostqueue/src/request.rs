//! A placement request: the resources plus the seed's scheduler hints.

use std::collections::BTreeSet;

use crate::{HostQueueError, ResourceRequest};

/// A compiled `scheduler_host_match` hint. It keeps hosts whose name *contains* a match (a
/// search, as in the seed); `^…$` anchors it to the whole name.
#[derive(Debug, Clone)]
pub struct HostMatch(regex::Regex);

impl HostMatch {
    /// The most memory a compiled pattern may take, so a hostile pattern cannot blow up the
    /// scheduler.
    pub const SIZE_LIMIT: usize = 1 << 20;

    pub fn new(pattern: &str) -> Result<Self, HostQueueError> {
        regex::RegexBuilder::new(pattern)
            .size_limit(Self::SIZE_LIMIT)
            .dfa_size_limit(Self::SIZE_LIMIT)
            .build()
            .map(HostMatch)
            .map_err(|err| HostQueueError::InvalidHostMatch {
                pattern: pattern.to_owned(),
                reason: describe_regex_error(&err),
            })
    }

    /// Whether `hostname` contains a match.
    pub fn is_match(&self, hostname: &str) -> bool {
        self.0.is_match(hostname)
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// Two hints are the same when their patterns are.
impl PartialEq for HostMatch {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for HostMatch {}

/// The regex crate's parse errors span several lines (pattern, caret, message); an operator
/// reading a one-line fault wants only the message.
fn describe_regex_error(err: &regex::Error) -> String {
    match err {
        regex::Error::CompiledTooBig(limit) => {
            format!("the compiled pattern would exceed the limit of {limit} bytes")
        }
        other => {
            let text = other.to_string();
            text.lines()
                .rev()
                .find_map(|line| line.trim().strip_prefix("error: "))
                .map(str::to_owned)
                .unwrap_or(text)
        }
    }
}

/// Which way the walk goes from the cursor: the seed's `sign` (1 or -1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    Forward,
    Backward,
}

/// Everything [`crate::HostQueue::select`] needs to pick a host for one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementRequest {
    pub resources: ResourceRequest,
    /// `None` or `""`: the default queue.
    pub queue_name: Option<String>,
    /// A forced host (admin only; the caller checks that).
    pub scheduler_host: Option<String>,
    pub scheduler_host_match: Option<HostMatch>,
    /// `same_host`, resolved by the caller to the hosts that run those instances: when set,
    /// only these hosts qualify (an empty set: none does).
    pub same_host: Option<BTreeSet<String>>,
    /// `different_host`, resolved by the caller: hosts that run one of those instances.
    pub different_host: BTreeSet<String>,
    /// Hosts earlier attempts for this instance already tried.
    pub tried_hosts: BTreeSet<String>,
    /// The operator's `force_hosts_skip_resource_check`: a forced host is taken even when
    /// it lacks room.
    pub skip_forced_host_resource_check: bool,
    /// The seed's `sign`.
    pub direction: Direction,
    /// The seed's `boundary_host`: the walk stops when it reaches this host, without
    /// checking it (a walk that starts on it, or a host not in the queue, makes a full lap).
    pub boundary_host: Option<String>,
}

impl PlacementRequest {
    /// A request for `resources` in the default queue, without hints, walking forward.
    pub fn new(resources: ResourceRequest) -> Self {
        PlacementRequest {
            resources,
            queue_name: None,
            scheduler_host: None,
            scheduler_host_match: None,
            same_host: None,
            different_host: BTreeSet::new(),
            tried_hosts: BTreeSet::new(),
            skip_forced_host_resource_check: false,
            direction: Direction::Forward,
            boundary_host: None,
        }
    }

    /// The queue this request walks.
    pub fn queue<'a>(&'a self, default_queue: &'a str) -> &'a str {
        match self.queue_name.as_deref() {
            Some(name) if !name.is_empty() => name,
            _ => default_queue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_match_is_a_search() {
        let cases = [
            ("^node-[12]$", "node-1", true),
            ("^node-[12]$", "node-3", false),
            ("^node-[12]$", "node-12", false),
            ("^node-[12]$", "xnode-1", false),
            ("node", "node-3", true),
            ("node", "compute-node-7.example", true),
            ("node", "host-1", false),
            ("-[0-9]+$", "node-42", true),
            ("", "anything", true),
        ];
        for (pattern, hostname, want) in cases {
            let m = HostMatch::new(pattern).unwrap();
            assert_eq!(m.is_match(hostname), want, "{pattern} on {hostname}");
            assert_eq!(m.as_str(), pattern);
        }
    }

    #[test]
    fn invalid_host_match() {
        let err = HostMatch::new("[").unwrap_err();
        assert_eq!(
            err,
            HostQueueError::InvalidHostMatch {
                pattern: "[".to_owned(),
                reason: "unclosed character class".to_owned(),
            }
        );
        assert_eq!(
            err.to_string(),
            "Invalid scheduler_host_match '[': unclosed character class"
        );

        for pattern in ["(", "a{2,1}", "\\", "*"] {
            assert!(
                matches!(
                    HostMatch::new(pattern),
                    Err(HostQueueError::InvalidHostMatch { .. })
                ),
                "{pattern}"
            );
        }
    }

    #[test]
    fn hostile_patterns_are_refused_not_compiled() {
        // Nested counted repetition would compile to an enormous program.
        let err = HostMatch::new("((a{100}){100}){100}").unwrap_err();
        let HostQueueError::InvalidHostMatch { reason, .. } = err;
        assert!(reason.contains("limit"), "{reason}");
    }

    #[test]
    fn placement_request_defaults() {
        let r = PlacementRequest::new(ResourceRequest::from_flavor(1, 512, 1, 0, 0));
        assert!(!r.skip_forced_host_resource_check);
        assert_eq!(r.queue_name, None);
        assert_eq!(r.queue("kvm"), "kvm");
        assert_eq!(r.direction, Direction::Forward);
        assert!(r.different_host.is_empty() && r.tried_hosts.is_empty());
        assert_eq!(r.same_host, None);
    }
}
