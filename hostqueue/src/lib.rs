//! The scheduler's host queue: which compute hosts exist, how much each still has free, and which
//! one takes the next instance.
//!
//! A pure library in the shape of the seed's `host_queue.py` and `_new_schedule`: the scheduler
//! feeds it compute-node rows ([`HostQueue::build_queue`]) and asks it for a host
//! ([`HostQueue::select`]). It does no I/O and no logging, and no input makes it panic; every
//! refusal is a typed error whose message says why.

mod host_state;
mod queue;
mod request;
mod resources;

pub use host_state::{ComputeNodeRow, HostState, Limits, Placed};
pub use queue::{
    BatchPlacement, Elimination, HostQueue, NoValidHost, Placement, Unavailable, UnavailableReason,
};
pub use request::{Direction, HostMatch, PlacementRequest};
pub use resources::{check_host_resource, why_not, ResourceRequest};

/// What can be wrong with a request before any host is looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostQueueError {
    /// The `scheduler_host_match` hint is not a usable regular expression.
    #[error("Invalid scheduler_host_match '{pattern}': {reason}")]
    InvalidHostMatch { pattern: String, reason: String },
}
