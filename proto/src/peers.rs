//! Several services of one kind (conductors, schedulers): work is spread over them in turn, and
//! a request that one does not take (it timed out or refused delivery) goes to the next. An
//! answer from a peer, even an error, is final: the peer took the request. A peer that did not
//! take a request is tried last for a while, so one stopped peer does not cost every other
//! request its timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Method, ProtoError, RequestContext, Rpc};

/// How long a peer that did not take a request goes to the back of the line.
pub const BENCH_TIME: Duration = Duration::from_secs(10);

/// The endpoints of one kind of service, with a round-robin cursor.
#[derive(Debug)]
pub struct Peers {
    endpoints: Vec<String>,
    next: AtomicUsize,
    /// Per endpoint: until when it is tried last.
    benched: Mutex<Vec<Option<Instant>>>,
}

impl Peers {
    /// `endpoints` in the order to try them; empty means every request fails with `Closed`.
    pub fn new(endpoints: Vec<String>) -> Self {
        let benched = Mutex::new(vec![None; endpoints.len()]);
        Peers {
            endpoints,
            next: AtomicUsize::new(0),
            benched,
        }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Casts to the next peer in turn, moving on to the others while they do not take it.
    pub async fn cast<M: Method>(
        &self,
        rpc: &Rpc,
        context: &RequestContext,
        args: &M,
    ) -> Result<(), ProtoError> {
        let mut last = ProtoError::Closed;
        for index in self.in_turn() {
            match rpc.cast(&self.endpoints[index], context, args).await {
                Ok(()) => return Ok(()),
                Err(e) if moves_on(&e) => {
                    self.bench(index);
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Calls the next peer in turn, moving on to the others while they do not take it. A call
    /// that timed out may have run on that peer: only idempotent methods should use this.
    pub async fn call<M: Method>(
        &self,
        rpc: &Rpc,
        context: &RequestContext,
        args: &M,
    ) -> Result<M::Reply, ProtoError> {
        let mut last = ProtoError::Closed;
        for index in self.in_turn() {
            match rpc.call(&self.endpoints[index], context, args).await {
                Ok(reply) => return Ok(reply),
                Err(e) if moves_on(&e) => {
                    self.bench(index);
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Every endpoint's index once: those not benched first, from the next in round robin,
    /// then the benched ones (a peer may be back, and it is better than failing).
    fn in_turn(&self) -> Vec<usize> {
        let count = self.endpoints.len();
        if count == 0 {
            return Vec::new();
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let now = Instant::now();
        let benched = self.benched.lock().unwrap_or_else(|p| p.into_inner());
        let is_benched = |i: usize| {
            benched
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|until| until > now)
        };
        let order = (0..count).map(|offset| (first + offset) % count);
        let mut indexes: Vec<usize> = order.clone().filter(|&i| !is_benched(i)).collect();
        indexes.extend(order.filter(|&i| is_benched(i)));
        indexes
    }

    fn bench(&self, index: usize) {
        let mut benched = self.benched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = benched.get_mut(index) {
            *slot = Some(Instant::now() + BENCH_TIME);
        }
    }
}

/// Whether another peer should get the request: this one did not take it (and another one
/// could: a message too large or a bad configuration fails the same way everywhere).
fn moves_on(err: &ProtoError) -> bool {
    matches!(
        err,
        ProtoError::Timeout { .. } | ProtoError::Refused { .. } | ProtoError::Socket(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_goes_round_and_a_benched_peer_is_tried_last() {
        let peers = Peers::new(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(peers.in_turn(), [0, 1, 2]);
        assert_eq!(peers.in_turn(), [1, 2, 0]);
        peers.bench(2);
        assert_eq!(peers.in_turn(), [0, 1, 2], "starting at c, c goes last");
        assert_eq!(peers.in_turn(), [0, 1, 2]);
        assert_eq!(peers.in_turn(), [1, 0, 2]);
        assert!(Peers::new(Vec::new()).in_turn().is_empty());
    }
}
