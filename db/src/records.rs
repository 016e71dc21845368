//! Computes' records written together: the conductor commits in one write transaction the
//! records that came in while its previous commit ran (group commit), so a burst of builds
//! costs one turn at the write lock per batch rather than one per record. Each record runs in
//! a savepoint of its own: one that is refused (a state that no longer holds, a row gone)
//! changes nothing and leaves the others be.

use diesel::Connection;

use crate::instances::{destroy, insert_fault, update_expecting_task};
use crate::networks::take_fixed_ip;
use crate::services::{record_heartbeat, upsert_compute_node};
use crate::{
    AnyConnection, ComputeNodeValues, Db, DbError, ExpectedTask, FixedIp, InstanceChanges,
    NewFault, Result,
};

/// One record, as the method of [`Db`] named on each variant would write it.
#[derive(Debug, Clone, Copy)]
pub enum Record<'a> {
    /// [`Db::instance_update_expecting_task`], and the fault with it if there is one.
    Instance {
        uuid: &'a str,
        changes: &'a InstanceChanges,
        expected_vm_state: Option<&'a str>,
        expected_task: ExpectedTask<'a>,
        fault: Option<&'a NewFault>,
    },
    /// A build starting on its host: the instance's update (as
    /// [`Db::instance_update_expecting_task`]) and its fixed IP from any network (as
    /// [`Db::fixed_ip_allocate`]). Nothing of either is kept when one fails.
    StartSpawning {
        uuid: &'a str,
        changes: &'a InstanceChanges,
        expected_vm_state: Option<&'a str>,
        expected_task: ExpectedTask<'a>,
    },
    /// [`Db::instance_destroy`]: a compute has removed the instance.
    Destroy { uuid: &'a str },
    /// [`Db::compute_node_upsert`].
    ComputeNode(&'a ComputeNodeValues),
    /// [`Db::service_heartbeat`].
    Heartbeat { host: &'a str, binary: &'a str },
}

/// What a record gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Done,
    /// A spawning build's address.
    FixedIp(FixedIp),
}

impl Db {
    /// Writes `records` in one transaction, in order, each in a savepoint: one outcome per
    /// record. `Err` only when the transaction itself failed, and then nothing was written.
    pub fn record_together(&self, records: &[Record<'_>]) -> Result<Vec<Result<Recorded>>> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            Ok(records
                .iter()
                .map(|record| conn.transaction(|conn| write(conn, record)))
                .collect())
        })
    }

    /// One record in a transaction of its own.
    pub fn record(&self, record: &Record<'_>) -> Result<Recorded> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| write(conn, record))
    }
}

fn write(conn: &mut AnyConnection, record: &Record<'_>) -> Result<Recorded> {
    match *record {
        Record::Instance {
            uuid,
            changes,
            expected_vm_state,
            expected_task,
            fault,
        } => {
            update_expecting_task(conn, uuid, changes, expected_vm_state, expected_task)?;
            if let Some(fault) = fault {
                insert_fault(conn, fault)?;
            }
            Ok(Recorded::Done)
        }
        Record::StartSpawning {
            uuid,
            changes,
            expected_vm_state,
            expected_task,
        } => {
            let updated =
                update_expecting_task(conn, uuid, changes, expected_vm_state, expected_task)?;
            // The row as the update left it says whether the instance is live: one in error
            // holds no address (as allocate_fixed_ip would refuse it).
            if updated.vm_state == "error" {
                return Err(DbError::NotFound {
                    kind: "instance",
                    id: uuid.to_string(),
                });
            }
            take_fixed_ip(conn, uuid, None).map(Recorded::FixedIp)
        }
        Record::Destroy { uuid } => destroy(conn, uuid).map(|()| Recorded::Done),
        Record::ComputeNode(values) => upsert_compute_node(conn, values).map(|()| Recorded::Done),
        Record::Heartbeat { host, binary } => {
            record_heartbeat(conn, host, binary).map(|()| Recorded::Done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{new_instance, open_temp};

    #[test]
    fn records_written_together_each_stand_or_fall_alone() {
        let (_dir, db) = open_temp();
        for uuid in ["a", "b", "c"] {
            db.instance_create(&new_instance(uuid, "p"), "req-1")
                .unwrap();
        }
        db.network_delete("private").unwrap();
        // Room for one address.
        db.network_create("tiny", "192.168.5.0/30", "192.168.5.1", None)
            .unwrap();
        db.service_upsert(
            "node-1",
            "zova-compute",
            "compute.node-1",
            "tcp://h:1",
            None,
        )
        .unwrap();
        let spawning = InstanceChanges {
            task_state: Some(Some("spawning".into())),
            host: Some(Some("node-1".into())),
            ..Default::default()
        };
        let error = InstanceChanges {
            vm_state: Some("error".into()),
            task_state: Some(None),
            ..Default::default()
        };
        let fault = NewFault {
            instance_uuid: "c".into(),
            code: 500,
            message: "boom".into(),
            details: String::new(),
            host: None,
        };
        let bad_node = ComputeNodeValues {
            host: "node-1".into(),
            hypervisor_hostname: "node-1".into(),
            hypervisor_type: "test".into(),
            vcpus: 2,
            memory_mb: 1024,
            local_gb: 10,
            vcpus_used: 0,
            memory_mb_used: 0,
            local_gb_used: 0,
            running_vms: 0,
            extra_resources: "not json".into(),
        };
        let start = |uuid| Record::StartSpawning {
            uuid,
            changes: &spawning,
            expected_vm_state: Some("building"),
            expected_task: ExpectedTask::Is("scheduling"),
        };
        let outcomes = db
            .record_together(&[
                start("a"),
                // The pool's one address is a's now.
                start("b"),
                // Expects a task c does not have: its fault must not be written either.
                Record::Instance {
                    uuid: "c",
                    changes: &error,
                    expected_vm_state: None,
                    expected_task: ExpectedTask::Is("spawning"),
                    fault: Some(&fault),
                },
                Record::ComputeNode(&bad_node),
                Record::Heartbeat {
                    host: "node-1",
                    binary: "zova-compute",
                },
                Record::Heartbeat {
                    host: "node-9",
                    binary: "zova-compute",
                },
                Record::Instance {
                    uuid: "c",
                    changes: &error,
                    expected_vm_state: None,
                    expected_task: ExpectedTask::Is("scheduling"),
                    fault: Some(&fault),
                },
            ])
            .unwrap();
        assert!(matches!(&outcomes[0], Ok(Recorded::FixedIp(ip)) if ip.address == "192.168.5.2"));
        assert!(matches!(outcomes[1], Err(DbError::Exhausted(_))));
        assert!(matches!(outcomes[2], Err(DbError::Conflict(_))));
        assert!(matches!(outcomes[3], Err(DbError::Json(_))));
        assert!(matches!(outcomes[4], Ok(Recorded::Done)));
        assert!(matches!(outcomes[5], Err(DbError::NotFound { .. })));
        assert!(matches!(outcomes[6], Ok(Recorded::Done)));

        let a = db.instance_get("a").unwrap().unwrap();
        assert_eq!(a.task_state.as_deref(), Some("spawning"));
        let b = db.instance_get("b").unwrap().unwrap();
        assert_eq!(
            (b.task_state.as_deref(), b.host),
            (Some("scheduling"), None)
        );
        let c = db.instance_get("c").unwrap().unwrap();
        assert_eq!(c.vm_state, "error");
        // One fault: the refused record's went with it.
        let faults: i64 = {
            use crate::schema::instance_faults;
            use diesel::prelude::*;
            instance_faults::table
                .filter(instance_faults::instance_uuid.eq("c"))
                .count()
                .get_result(&mut db.conn().unwrap())
                .unwrap()
        };
        assert_eq!(faults, 1);
        assert!(db.compute_nodes().unwrap().is_empty());
        assert_eq!(
            db.service_get("node-1", "zova-compute")
                .unwrap()
                .unwrap()
                .report_count,
            1
        );

        // A build that goes to error as it starts spawning takes no address, and keeps none.
        db.instance_create(&new_instance("d", "p"), "req-1")
            .unwrap();
        let failed = db.record_together(&[Record::StartSpawning {
            uuid: "d",
            changes: &error,
            expected_vm_state: Some("building"),
            expected_task: ExpectedTask::Is("scheduling"),
        }]);
        assert!(matches!(
            failed.unwrap().as_slice(),
            [Err(DbError::NotFound { .. })]
        ));
        assert_eq!(db.fixed_ips_of_instances(&["d".into()]).unwrap(), vec![]);
        assert_eq!(db.instance_get("d").unwrap().unwrap().vm_state, "building");

        // A destroy in a group frees the address it held for the next build of the group; a
        // second destroy of the same instance finds nothing and fails alone.
        let outcomes = db
            .record_together(&[
                Record::Destroy { uuid: "a" },
                Record::Destroy { uuid: "a" },
                start("b"),
            ])
            .unwrap();
        assert!(matches!(outcomes[0], Ok(Recorded::Done)));
        assert!(matches!(outcomes[1], Err(DbError::NotFound { .. })));
        assert!(matches!(&outcomes[2], Ok(Recorded::FixedIp(ip)) if ip.address == "192.168.5.2"));
        assert!(db.instance_get("a").unwrap().is_none());
    }
}
