//! The scheduler's one line to the database for placements. Claims and the host queue's reads
//! of the node rows go through it in the order they were sent, and the claims sent while the
//! previous commit ran go together in the next one: one write transaction, one turn at
//! SQLite's lock, for a burst of placements (group commit).
//!
//! The order is what lets a placement leave the queue lock while its claim commits. A rebuild
//! sends its read under that lock, so every claim selected from the old queue was sent before
//! the read and is in the rows when it succeeded; every claim selected from the new queue
//! comes after.

use db::{AllocationClaim, ClaimOutcome, ComputeNode, Db, Service};
use proto::service::GroupWriter;
use tokio::sync::oneshot;

use crate::SchedulerError;

/// Claims in one transaction at most, so that a rebuild's read waits for a bounded commit.
const MAX_CLAIMS_PER_COMMIT: usize = 256;

/// Each compute node with its service row, as the host queue is built from them.
pub(crate) type NodeRows = Vec<(ComputeNode, Service)>;

/// What a claim came to: its outcome, or why the database could not say.
pub(crate) type ClaimAnswer = oneshot::Receiver<Result<ClaimOutcome, String>>;

type ClaimSender = oneshot::Sender<Result<ClaimOutcome, String>>;

enum Job {
    Claim(AllocationClaim, ClaimSender),
    ReadNodes(oneshot::Sender<Result<NodeRows, SchedulerError>>),
}

/// The scheduler's writer of claims; its task ends when it is dropped.
pub(crate) struct Commits {
    writer: GroupWriter<Job>,
}

impl Commits {
    /// Starts the writing task on the current runtime.
    pub(crate) fn start(db: Db) -> Commits {
        let writer = GroupWriter::start(MAX_CLAIMS_PER_COMMIT, move |group| commit(&db, group));
        Commits { writer }
    }

    /// Sends a claim; the answer comes when the commit that carries it is done.
    pub(crate) fn claim(&self, claim: AllocationClaim) -> ClaimAnswer {
        let (answer, answered) = oneshot::channel();
        // Should the task be gone, the dropped sender is the answer (see `outcome`).
        let _ = self.writer.send(Job::Claim(claim, answer));
        answered
    }

    /// The node rows as they are after every claim sent before this read.
    pub(crate) async fn read_nodes(&self) -> Result<NodeRows, SchedulerError> {
        let (answer, answered) = oneshot::channel();
        let _ = self.writer.send(Job::ReadNodes(answer));
        answered.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// Waits for a claim's answer.
pub(crate) async fn outcome(answer: ClaimAnswer) -> Result<ClaimOutcome, String> {
    answer.await.unwrap_or_else(|_| Err(stopped().to_string()))
}

fn stopped() -> SchedulerError {
    SchedulerError::Task("the scheduler's database writer stopped".into())
}

/// Writes a group in order: each run of claims in one transaction, each read after the claims
/// sent before it.
fn commit(db: &Db, group: Vec<Job>) {
    let mut claims = Vec::new();
    for job in group {
        match job {
            Job::Claim(claim, answer) => claims.push((claim, answer)),
            Job::ReadNodes(answer) => {
                commit_claims(db, std::mem::take(&mut claims));
                let read = db
                    .compute_nodes_with_services()
                    .map_err(SchedulerError::from);
                let _ = answer.send(read);
            }
        }
    }
    commit_claims(db, claims);
}

fn commit_claims(db: &Db, claims: Vec<(AllocationClaim, ClaimSender)>) {
    if claims.is_empty() {
        return;
    }
    let (claims, answers): (Vec<_>, Vec<_>) = claims.into_iter().unzip();
    match db.allocation_claims(&claims) {
        Ok(outcomes) => {
            for (answer, outcome) in answers.into_iter().zip(outcomes) {
                let _ = answer.send(Ok(outcome));
            }
        }
        Err(e) => {
            let e = e.to_string();
            for answer in answers {
                let _ = answer.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use db::{ComputeNodeValues, NewInstance, Placed};

    fn building(uuid: &str) -> NewInstance {
        NewInstance {
            uuid: uuid.to_string(),
            display_name: uuid.to_string(),
            project_id: "p".to_string(),
            user_id: "u".to_string(),
            flavorid: "1".to_string(),
            image_ref: "i".to_string(),
            vcpus: 1,
            memory_mb: 512,
            root_gb: 1,
            ephemeral_gb: 0,
            swap_mb: 0,
            vm_state: "building".to_string(),
            task_state: Some("scheduling".to_string()),
            power_state: 0,
            scheduler_hints: "{}".to_string(),
            metadata: "{}".to_string(),
            reservation_id: "r-1".to_string(),
            launch_index: 0,
            description: None,
            key_name: None,
            flavor_snapshot: "{}".into(),
        }
    }

    #[tokio::test]
    async fn a_read_sees_every_claim_sent_before_it_and_each_claim_its_own_outcome() {
        let dir = tempfile::tempdir().unwrap();
        // One connection: r2d2 opens any further ones on threads of its own, and one still
        // connecting when the test process exits crashes it inside libpq (PostgreSQL pass).
        let db = Db::open_with(&db::test_database_url(dir.path()).unwrap(), 1).unwrap();
        db.compute_node_upsert(&ComputeNodeValues {
            host: "node-1".into(),
            hypervisor_hostname: "node-1".into(),
            hypervisor_type: "test".into(),
            vcpus: 2,
            memory_mb: 8192,
            local_gb: 100,
            vcpus_used: 0,
            memory_mb_used: 0,
            local_gb_used: 0,
            running_vms: 0,
            extra_resources: "{}".into(),
        })
        .unwrap();
        db.service_upsert(
            "node-1",
            "zova-compute",
            "compute.node-1",
            "tcp://127.0.0.1:1",
            None,
        )
        .unwrap();
        let node_id = db.compute_nodes().unwrap()[0].id;
        for uuid in ["a", "b", "c"] {
            db.instance_create(&building(uuid), "req-1").unwrap();
        }
        let one = Placed {
            vcpus: 1,
            memory_mb: 512,
            disk_mb: 1024,
        };
        let claim = |uuid: &str| AllocationClaim {
            instance_uuid: uuid.into(),
            node_id,
            usage: one,
            limits: Placed {
                vcpus: 2,
                memory_mb: 8192,
                disk_mb: 100 * 1024,
            },
            moving_from: None,
        };
        let commits = Commits::start(db.clone());
        // Sent without waiting, as placements do: they commit together, in this order.
        let answers: Vec<_> = ["a", "b", "c"].map(|u| commits.claim(claim(u))).into();
        let rows = commits.read_nodes().await.unwrap();
        assert_eq!(rows[0].0.placed_vcpus, 2, "the read came before the claims");
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(outcome(answer).await.unwrap());
        }
        let two = Placed {
            vcpus: 2,
            memory_mb: 1024,
            disk_mb: 2048,
        };
        assert!(
            matches!(
                &outcomes[..],
                [
                    ClaimOutcome::Claimed(_),
                    ClaimOutcome::Claimed(_),
                    ClaimOutcome::NoRoom(full)
                ] if *full == two
            ),
            "{outcomes:?}"
        );
        assert_eq!(db.allocation_get("c").unwrap(), None);
    }
}
