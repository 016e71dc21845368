//! Computes' records, committed in groups: the records that come in while one commit runs go
//! together in the next ([`Db::record_together`]), one write transaction and one turn at the
//! database's write lock for a burst of builds. Each record still gets its own answer, and a
//! record that is refused leaves the others of its group be.

use db::{ComputeNodeValues, Db, ExpectedTask, InstanceChanges, NewFault, Record, Recorded};
use proto::service::GroupWriter;
use proto::{InstanceDestroy, InstanceUpdate, RemoteError, ServiceHeartbeat};
use tokio::sync::oneshot;

use crate::remote;

/// Records in one transaction at most.
const MAX_RECORDS_PER_COMMIT: usize = 256;

/// A record as it came from a compute, owning what [`Record`] borrows.
pub(crate) enum Owned {
    Instance {
        update: InstanceUpdate,
        changes: InstanceChanges,
        fault: Option<NewFault>,
    },
    StartSpawning {
        update: InstanceUpdate,
        changes: InstanceChanges,
    },
    Destroy(InstanceDestroy),
    ComputeNode(ComputeNodeValues),
    Heartbeat(ServiceHeartbeat),
}

impl Owned {
    /// An `InstanceUpdate` record: the row's changes, and its fault if it carries one.
    pub(crate) fn instance(update: InstanceUpdate) -> Owned {
        let changes = instance_changes(&update);
        let fault = update.fault.as_ref().map(|fault| NewFault {
            instance_uuid: update.uuid.clone(),
            code: fault.code,
            message: fault.message.clone(),
            details: fault.details.clone(),
            host: update.host.clone(),
        });
        Owned::Instance {
            update,
            changes,
            fault,
        }
    }

    pub(crate) fn start_spawning(update: InstanceUpdate) -> Owned {
        let changes = instance_changes(&update);
        Owned::StartSpawning { update, changes }
    }

    /// Moves a launch stamp (`launched_at`) to `now`, as the record's group starts writing:
    /// a reader finds the instance ACTIVE within that group's turn at the database after its
    /// `launched_at`, not after a wait in the conductor's queue as well.
    fn stamp_launch(&mut self, now: chrono::NaiveDateTime) {
        if let Owned::Instance { changes, .. } | Owned::StartSpawning { changes, .. } = self {
            if let Some(Some(launched_at)) = &mut changes.launched_at {
                *launched_at = now;
            }
        }
    }

    pub(crate) fn record(&self) -> Record<'_> {
        match self {
            Owned::Instance {
                update,
                changes,
                fault,
            } => Record::Instance {
                uuid: &update.uuid,
                changes,
                expected_vm_state: update.expected_vm_state.as_deref(),
                expected_task: expected_task(update),
                fault: fault.as_ref(),
            },
            Owned::StartSpawning { update, changes } => Record::StartSpawning {
                uuid: &update.uuid,
                changes,
                expected_vm_state: update.expected_vm_state.as_deref(),
                expected_task: expected_task(update),
            },
            Owned::Destroy(destroy) => Record::Destroy {
                uuid: &destroy.uuid,
            },
            Owned::ComputeNode(values) => Record::ComputeNode(values),
            Owned::Heartbeat(heartbeat) => Record::Heartbeat {
                host: &heartbeat.host,
                binary: &heartbeat.binary,
            },
        }
    }
}

/// The row changes an `InstanceUpdate` asks for.
pub(crate) fn instance_changes(args: &InstanceUpdate) -> InstanceChanges {
    let mut changes = InstanceChanges::default();
    match &args.state {
        Some(state) => {
            changes.vm_state = Some(state.vm_state.clone());
            changes.task_state = Some(state.task_state.clone());
            changes.power_state = Some(state.power_state);
        }
        None => {
            if args.revert_task_state {
                changes.task_state = Some(None);
            }
            changes.power_state = args.power_state;
        }
    }
    if let Some(host) = args.host.clone() {
        changes.host = Some(Some(host));
    }
    if let Some(node) = args.node.clone() {
        changes.node = Some(Some(node));
    }
    if args.launched {
        changes.launched_at = Some(Some(chrono::Utc::now().naive_utc()));
    }
    changes
}

/// The task state an `InstanceUpdate` expects.
fn expected_task(args: &InstanceUpdate) -> ExpectedTask<'_> {
    match (args.expected_task_state.as_deref(), args.expect_no_task) {
        (Some(task), _) => ExpectedTask::Is(task),
        (None, true) => ExpectedTask::None,
        (None, false) => ExpectedTask::Any,
    }
}

type Answer = oneshot::Sender<Result<Recorded, RemoteError>>;

/// The conductor's writer of records; its task ends when it is dropped.
pub(crate) struct Records {
    writer: GroupWriter<(Owned, Answer)>,
}

impl Records {
    /// Starts the writing task on the current runtime.
    pub(crate) fn start(db: Db) -> Records {
        let writer =
            GroupWriter::start(MAX_RECORDS_PER_COMMIT, move |group| write_group(&db, group));
        Records { writer }
    }

    /// Writes one record with whatever others come meanwhile.
    pub(crate) async fn write(&self, record: Owned) -> Result<Recorded, RemoteError> {
        let (answer, answered) = oneshot::channel();
        // Should the task be gone, the dropped answer says so below.
        let _ = self.writer.send((record, answer));
        answered.await.unwrap_or_else(|_| {
            Err(RemoteError {
                kind: "Internal".into(),
                message: "the conductor's record writer stopped".into(),
            })
        })
    }
}

fn write_group(db: &Db, mut group: Vec<(Owned, Answer)>) {
    let now = chrono::Utc::now().naive_utc();
    for (owned, _) in &mut group {
        owned.stamp_launch(now);
    }
    let records: Vec<Record<'_>> = group.iter().map(|(owned, _)| owned.record()).collect();
    match db.record_together(&records) {
        Ok(outcomes) => {
            for ((_, answer), outcome) in group.into_iter().zip(outcomes) {
                let _ = answer.send(outcome.map_err(remote));
            }
        }
        // The transaction itself failed (a full disk, a lost connection): each alone, so each
        // caller gets its own answer.
        Err(_) => {
            for (owned, answer) in group {
                let _ = answer.send(db.record(&owned.record()).map_err(remote));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes_of(owned: &Owned) -> &InstanceChanges {
        match owned {
            Owned::Instance { changes, .. } | Owned::StartSpawning { changes, .. } => changes,
            _ => panic!("not an instance record"),
        }
    }

    #[test]
    fn a_launch_is_stamped_when_its_group_writes_and_nothing_else_is() {
        let later = chrono::Utc::now().naive_utc() + chrono::Duration::seconds(5);
        let mut launched = Owned::instance(InstanceUpdate {
            uuid: "u".into(),
            launched: true,
            ..Default::default()
        });
        launched.stamp_launch(later);
        assert_eq!(changes_of(&launched).launched_at, Some(Some(later)));

        let mut other = Owned::instance(InstanceUpdate {
            uuid: "u".into(),
            ..Default::default()
        });
        other.stamp_launch(later);
        assert_eq!(changes_of(&other).launched_at, None);
    }
}
