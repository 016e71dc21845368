//! Services and the compute nodes they report: what the scheduler chooses among.

use diesel::prelude::*;

use crate::kept::Kept;
use crate::schema::{compute_nodes, services};
use crate::{
    check_json_object, now, AnyConnection, ComputeNode, ComputeNodeValues, Db, DbBackend, DbError,
    Result, Service,
};

/// The binary whose services own compute nodes.
const COMPUTE_BINARY: &str = "zova-compute";

fn service_not_found(host: &str, binary: &str) -> DbError {
    DbError::NotFound {
        kind: "service",
        id: format!("{binary} on host {host}"),
    }
}

impl Db {
    /// Registers a service at start-up, or refreshes where it listens if it ran before. An
    /// operator's `disabled` flag survives the restart.
    pub fn service_upsert(
        &self,
        host: &str,
        binary: &str,
        topic: &str,
        rpc_endpoint: &str,
        rpc_public_key: Option<&str>,
    ) -> Result<Service> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let at = now();
            let live = services::table
                .filter(services::deleted.eq(0))
                .filter(services::host.eq(host))
                .filter(services::binary.eq(binary));
            let existing: Option<i64> = live.select(services::id).first(conn).optional()?;
            let service = match existing {
                Some(id) => diesel::update(services::table.find(id))
                    .set((
                        services::topic.eq(topic),
                        services::rpc_endpoint.eq(rpc_endpoint),
                        services::rpc_public_key.eq(rpc_public_key),
                        services::updated_at.eq(at),
                    ))
                    .returning(<Service as Selectable<DbBackend>>::construct_selection())
                    .get_result(conn)?,
                None => diesel::insert_into(services::table)
                    .values((
                        services::host.eq(host),
                        services::binary.eq(binary),
                        services::topic.eq(topic),
                        services::rpc_endpoint.eq(rpc_endpoint),
                        services::rpc_public_key.eq(rpc_public_key),
                        services::created_at.eq(at),
                    ))
                    .returning(<Service as Selectable<DbBackend>>::construct_selection())
                    .get_result(conn)?,
            };
            Ok(service)
        })
    }

    /// Records that a service is alive: bumps `report_count` and `updated_at`.
    pub fn service_heartbeat(&self, host: &str, binary: &str) -> Result<()> {
        let mut conn = self.writer()?;
        record_heartbeat(&mut conn, host, binary)
    }

    /// The live service `binary` on `host`.
    pub fn service_get(&self, host: &str, binary: &str) -> Result<Option<Service>> {
        let mut conn = self.conn()?;
        Ok(services::table
            .filter(services::deleted.eq(0))
            .filter(services::host.eq(host))
            .filter(services::binary.eq(binary))
            .select(Service::as_select())
            .first(&mut conn)
            .optional()?)
    }

    /// All live services, by host then binary.
    pub fn services(&self) -> Result<Vec<Service>> {
        let mut conn = self.conn()?;
        Ok(services::table
            .filter(services::deleted.eq(0))
            .order((services::host.asc(), services::binary.asc()))
            .select(Service::as_select())
            .load(&mut conn)?)
    }

    /// Disables a service (with the operator's reason) or enables it again; enabling with no
    /// reason clears the old one.
    pub fn service_set_disabled(
        &self,
        host: &str,
        binary: &str,
        disabled: bool,
        reason: Option<&str>,
    ) -> Result<Service> {
        let mut conn = self.writer()?;
        diesel::update(
            services::table
                .filter(services::deleted.eq(0))
                .filter(services::host.eq(host))
                .filter(services::binary.eq(binary)),
        )
        .set((
            services::disabled.eq(disabled),
            services::disabled_reason.eq(reason),
            services::updated_at.eq(now()),
        ))
        .returning(<Service as Selectable<DbBackend>>::construct_selection())
        .get_result(&mut *conn)
        .optional()?
        .ok_or_else(|| service_not_found(host, binary))
    }

    /// Marks a service forced down (or clears the mark): the scheduler then treats its host as
    /// down whatever its heartbeat says.
    pub fn service_set_forced_down(
        &self,
        host: &str,
        binary: &str,
        forced_down: bool,
    ) -> Result<Service> {
        let mut conn = self.writer()?;
        diesel::update(
            services::table
                .filter(services::deleted.eq(0))
                .filter(services::host.eq(host))
                .filter(services::binary.eq(binary)),
        )
        // updated_at is the heartbeat; an operator's change must not make a dead host look alive.
        .set(services::forced_down.eq(forced_down))
        .returning(<Service as Selectable<DbBackend>>::construct_selection())
        .get_result(&mut *conn)
        .optional()?
        .ok_or_else(|| service_not_found(host, binary))
    }

    /// Stores a compute service's report on one hypervisor, creating its row the first time.
    /// Free RAM and disk are derived here so every reader sees the same arithmetic.
    pub fn compute_node_upsert(&self, values: &ComputeNodeValues) -> Result<()> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| upsert_compute_node(conn, values))
    }

    /// All live compute nodes, by host then hypervisor hostname.
    pub fn compute_nodes(&self) -> Result<Vec<ComputeNode>> {
        let mut conn = self.conn()?;
        Ok(compute_nodes::table
            .filter(compute_nodes::deleted.eq(0))
            .order((
                compute_nodes::host.asc(),
                compute_nodes::hypervisor_hostname.asc(),
            ))
            .select(ComputeNode::as_select())
            .load(&mut conn)?)
    }

    /// Live compute nodes paired with the live `zova-compute` service on their host; a node
    /// whose service is gone (or not yet registered) is left out.
    pub fn compute_nodes_with_services(&self) -> Result<Vec<(ComputeNode, Service)>> {
        let mut conn = self.conn()?;
        Ok(compute_nodes::table
            .inner_join(
                services::table.on(services::host
                    .eq(compute_nodes::host)
                    .and(services::binary.eq(COMPUTE_BINARY))
                    .and(services::deleted.eq(0))),
            )
            .filter(compute_nodes::deleted.eq(0))
            .order((
                compute_nodes::host.asc(),
                compute_nodes::hypervisor_hostname.asc(),
            ))
            .select((ComputeNode::as_select(), Service::as_select()))
            .load(&mut conn)?)
    }
}

/// [`Db::service_heartbeat`] on the caller's connection.
pub(crate) fn record_heartbeat(conn: &mut AnyConnection, host: &str, binary: &str) -> Result<()> {
    let updated = direct!(&mut *conn, c => {
        Kept(
            diesel::update(
                services::table
                    .filter(services::deleted.eq(0))
                    .filter(services::host.eq(host))
                    .filter(services::binary.eq(binary)),
            )
            .set((
                services::report_count.eq(services::report_count + 1),
                services::updated_at.eq(now()),
            ))
            .returning(services::id),
        )
        .changed(c)
    })?;
    if updated == 0 {
        return Err(service_not_found(host, binary));
    }
    Ok(())
}

/// [`Db::compute_node_upsert`] inside the caller's write transaction.
pub(crate) fn upsert_compute_node(
    conn: &mut AnyConnection,
    values: &ComputeNodeValues,
) -> Result<()> {
    check_json_object("extra_resources", &values.extra_resources)?;
    let free_ram_mb = values.memory_mb - values.memory_mb_used;
    let free_disk_gb = values.local_gb - values.local_gb_used;
    let at = now();
    let existing: Option<i64> = direct!(&mut *conn, c => {
        compute_nodes::table
            .filter(compute_nodes::deleted.eq(0))
            .filter(compute_nodes::host.eq(&values.host))
            .filter(compute_nodes::hypervisor_hostname.eq(&values.hypervisor_hostname))
            .select(compute_nodes::id)
            .first(c)
            .optional()
    })?;
    match existing {
        Some(id) => direct!(&mut *conn, c => {
            Kept(
                diesel::update(compute_nodes::table.find(id))
                    .set((
                        values,
                        compute_nodes::free_ram_mb.eq(free_ram_mb),
                        compute_nodes::free_disk_gb.eq(free_disk_gb),
                        compute_nodes::updated_at.eq(at),
                    ))
                    .returning(compute_nodes::id),
            )
            .changed(c)
        })?,
        None => diesel::insert_into(compute_nodes::table)
            .values((
                values,
                compute_nodes::free_ram_mb.eq(free_ram_mb),
                compute_nodes::free_disk_gb.eq(free_disk_gb),
                compute_nodes::created_at.eq(at),
            ))
            .execute(conn)?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::open_temp;

    fn node(host: &str, memory_mb_used: i64) -> ComputeNodeValues {
        ComputeNodeValues {
            host: host.to_string(),
            hypervisor_hostname: format!("{host}.example"),
            hypervisor_type: "QEMU".to_string(),
            vcpus: 8,
            memory_mb: 16384,
            local_gb: 100,
            vcpus_used: 1,
            memory_mb_used,
            local_gb_used: 10,
            running_vms: 1,
            extra_resources: "{}".to_string(),
        }
    }

    #[test]
    fn upsert_refreshes_endpoint_and_keeps_disabled() {
        let (_dir, db) = open_temp();
        let first = db
            .service_upsert(
                "node-1",
                "zova-compute",
                "compute",
                "tcp://10.0.0.1:5000",
                None,
            )
            .unwrap();
        assert!(!first.disabled);
        assert_eq!((first.report_count, first.updated_at), (0, None));
        db.service_set_disabled("node-1", "zova-compute", true, Some("maintenance"))
            .unwrap();

        let again = db
            .service_upsert(
                "node-1",
                "zova-compute",
                "compute",
                "tcp://10.0.0.1:6000",
                None,
            )
            .unwrap();
        assert_eq!(again.id, first.id);
        assert_eq!(again.rpc_endpoint, "tcp://10.0.0.1:6000");
        assert!(again.disabled);
        assert_eq!(again.disabled_reason.as_deref(), Some("maintenance"));
        assert!(again.updated_at.is_some());
        assert_eq!(db.services().unwrap(), std::slice::from_ref(&again));
        assert_eq!(
            db.service_get("node-1", "zova-compute").unwrap(),
            Some(again)
        );

        let enabled = db
            .service_set_disabled("node-1", "zova-compute", false, None)
            .unwrap();
        assert!(!enabled.disabled);
        assert_eq!(enabled.disabled_reason, None);
    }

    #[test]
    fn heartbeat_bumps_report_count() {
        let (_dir, db) = open_temp();
        db.service_upsert("node-1", "zova-compute", "compute", "tcp://a", None)
            .unwrap();
        db.service_heartbeat("node-1", "zova-compute").unwrap();
        db.service_heartbeat("node-1", "zova-compute").unwrap();
        let service = db.service_get("node-1", "zova-compute").unwrap().unwrap();
        assert_eq!(service.report_count, 2);
        assert!(service.updated_at.is_some());
    }

    #[test]
    fn missing_service_is_not_found() {
        let (_dir, db) = open_temp();
        let err = db.service_heartbeat("node-9", "zova-compute").unwrap_err();
        assert_eq!(
            err.to_string(),
            "service zova-compute on host node-9 could not be found"
        );
        let err = db
            .service_set_disabled("node-9", "zova-compute", true, None)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DbError::NotFound {
                    kind: "service",
                    ..
                }
            ),
            "{err}"
        );
        assert!(db.service_get("node-9", "zova-compute").unwrap().is_none());
    }

    #[test]
    fn compute_node_upsert_derives_free_resources_and_updates_in_place() {
        let (_dir, db) = open_temp();
        db.compute_node_upsert(&node("node-1", 512)).unwrap();
        let [first] = <[ComputeNode; 1]>::try_from(db.compute_nodes().unwrap()).unwrap();
        assert_eq!((first.free_ram_mb, first.free_disk_gb), (16384 - 512, 90));
        assert_eq!(first.updated_at, None);

        let mut report = node("node-1", 4096);
        report.running_vms = 3;
        report.extra_resources = r#"{"pci": []}"#.to_string();
        db.compute_node_upsert(&report).unwrap();
        let [second] = <[ComputeNode; 1]>::try_from(db.compute_nodes().unwrap()).unwrap();
        assert_eq!(second.id, first.id);
        assert_eq!(second.free_ram_mb, 16384 - 4096);
        assert_eq!(second.running_vms, 3);
        assert_eq!(second.extra_resources, r#"{"pci": []}"#);
        assert_eq!(second.created_at, first.created_at);
        assert!(second.updated_at.is_some());

        let mut bad = node("node-1", 0);
        bad.extra_resources = "not json".to_string();
        assert!(matches!(
            db.compute_node_upsert(&bad),
            Err(DbError::Json(_))
        ));
    }

    #[test]
    fn nodes_join_their_live_compute_service() {
        let (_dir, db) = open_temp();
        db.compute_node_upsert(&node("node-1", 0)).unwrap();
        db.compute_node_upsert(&node("node-2", 0)).unwrap();
        db.compute_node_upsert(&node("node-3", 0)).unwrap();
        db.service_upsert("node-1", "zova-compute", "compute", "tcp://1", None)
            .unwrap();
        // A non-compute service on node-2 does not make node-2 schedulable.
        db.service_upsert("node-2", "zova-conductor", "conductor", "tcp://2", None)
            .unwrap();
        db.service_upsert("node-3", "zova-compute", "compute", "tcp://3", None)
            .unwrap();
        db.service_set_disabled("node-3", "zova-compute", true, Some("maintenance"))
            .unwrap();

        let pairs = db.compute_nodes_with_services().unwrap();
        let summary: Vec<_> = pairs
            .iter()
            .map(|(n, s)| {
                (
                    n.host.as_str(),
                    s.host.as_str(),
                    s.binary.as_str(),
                    s.disabled,
                )
            })
            .collect();
        // Disabled services are still returned: skipping them is the scheduler's decision.
        assert_eq!(
            summary,
            [
                ("node-1", "node-1", "zova-compute", false),
                ("node-3", "node-3", "zova-compute", true),
            ]
        );
    }
}
