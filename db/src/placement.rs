//! Placement: the resources a scheduler commits to a compute node before it sends the work.
//!
//! A claim is one conditional `UPDATE` of the node's running totals that matches the row only
//! if the request still fits under the limits, so two schedulers racing for the last room on a
//! node cannot both win: SQLite runs write transactions one at a time, and PostgreSQL
//! re-checks the condition on the locked row. Each claim also writes the instance's allocation
//! row in the same transaction, which is what a release gives back.
//!
//! A claim also places the instance: it records the host and takes the instance's fixed IP,
//! so the compute that gets the build has nothing to write before it reports the instance
//! ACTIVE.

use diesel::prelude::*;

use crate::kept::Kept;
use crate::networks::{release_fixed_ip, take_fixed_ip, FixedIp};
use crate::schema::{allocations, compute_nodes, flavor_extra_specs, instances};
use crate::AnyConnection;
use crate::{now, Db, DbError, Result};

/// Resources placed on a node, or asked for by one instance: vCPUs, MB of RAM, MB of disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Placed {
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
}

/// A scheduler's request to take `usage` on node `node_id` for one instance, within `limits`
/// (whole units: what the host queue computed, rounded down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationClaim {
    pub instance_uuid: String,
    pub node_id: i64,
    pub usage: Placed,
    pub limits: Placed,
    /// The host an earlier claim of this scheduler placed the instance on, which did not take
    /// the build: the instance, placed there but not started, may be placed again.
    pub moving_from: Option<String>,
}

/// What became of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The room is taken, the node is the instance's host, and an earlier allocation of the
    /// instance (a reschedule) was given back; with the fixed IP the instance now holds.
    /// `None`: no address was free, and the compute's own request for one says why the build
    /// fails.
    Claimed(Option<FixedIp>),
    /// The request no longer fits: this is what is placed on the node now.
    NoRoom(Placed),
    /// The node row is gone.
    NodeGone,
    /// The instance was deleted, is no longer waiting for a host (placed on another host, a
    /// compute already builds it, or it is in error): nothing was taken.
    InstanceGone,
}

impl ClaimOutcome {
    /// Whether the room was taken.
    pub fn is_claimed(&self) -> bool {
        matches!(self, ClaimOutcome::Claimed(_))
    }
}

impl Db {
    /// Takes the room for one instance on one node if it still fits (see the module doc), and
    /// places it there: the node is the instance's host, and its fixed IP is taken. Only an
    /// instance waiting for a host (`building`/`scheduling`, with no host or on the claim's
    /// `moving_from`) can claim: once it is placed elsewhere, or a compute has started to
    /// build it (`spawning`), a late re-placement finds it gone rather than building it twice.
    /// A request for zero vCPUs or RAM is not checked against that limit, as the host queue
    /// does not check it; disk is always checked.
    pub fn allocation_claim(&self, claim: &AllocationClaim) -> Result<ClaimOutcome> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| claim_allocation(conn, claim))
    }

    /// Several claims in one transaction, each as [`Db::allocation_claim`] and in order (a
    /// later claim on a node sees the room an earlier one took): a scheduler commits together
    /// the claims that came in while its previous commit ran. An error fails them all.
    pub fn allocation_claims(&self, claims: &[AllocationClaim]) -> Result<Vec<ClaimOutcome>> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            claims
                .iter()
                .map(|claim| claim_allocation(conn, claim))
                .collect()
        })
    }

    /// Undoes a claim whose batch was given up (all or nothing): the allocation, the fixed IP,
    /// and the host and node of an instance still waiting to be built, which then waits for a
    /// placement as before any claim; `false` when it held no allocation.
    pub fn claim_undo(&self, instance_uuid: &str) -> Result<bool> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let held = release_allocation(conn, instance_uuid)?;
            release_fixed_ip(conn, instance_uuid)?;
            diesel::update(
                instances::table
                    .filter(instances::deleted.eq(0))
                    .filter(instances::uuid.eq(instance_uuid))
                    .filter(instances::vm_state.eq("building"))
                    .filter(instances::task_state.eq("scheduling")),
            )
            .set((
                instances::host.eq(None::<String>),
                instances::node.eq(None::<String>),
                instances::updated_at.eq(now()),
            ))
            .execute(conn)?;
            Ok(held)
        })
    }

    /// The node an instance's resources are placed on, with what it holds there.
    pub fn allocation_get(&self, instance_uuid: &str) -> Result<Option<(i64, Placed)>> {
        let mut conn = self.conn()?;
        let row: Option<(i64, i64, i64, i64)> = allocations::table
            .filter(allocations::instance_uuid.eq(instance_uuid))
            .select((
                allocations::compute_node_id,
                allocations::vcpus,
                allocations::memory_mb,
                allocations::disk_mb,
            ))
            .first(&mut conn)
            .optional()?;
        Ok(row.map(|(node_id, vcpus, memory_mb, disk_mb)| {
            (
                node_id,
                Placed {
                    vcpus,
                    memory_mb,
                    disk_mb,
                },
            )
        }))
    }

    /// The sum of the allocations on each node, by node id, for checking the running totals.
    pub fn allocation_sums(&self) -> Result<std::collections::BTreeMap<i64, Placed>> {
        let mut conn = self.conn()?;
        let rows: Vec<(i64, i64, i64, i64)> = allocations::table
            .select((
                allocations::compute_node_id,
                allocations::vcpus,
                allocations::memory_mb,
                allocations::disk_mb,
            ))
            .load(&mut conn)?;
        let mut sums = std::collections::BTreeMap::<i64, Placed>::new();
        for (node_id, vcpus, memory_mb, disk_mb) in rows {
            let sum = sums.entry(node_id).or_default();
            sum.vcpus += vcpus;
            sum.memory_mb += memory_mb;
            sum.disk_mb += disk_mb;
        }
        Ok(sums)
    }

    /// The hosts of these instances, for the `same_host` and `different_host` hints: where an
    /// instance runs (`instances.host`) or, while it is still being placed or built, the node
    /// its allocation is on. Deleted and unknown instances have no host.
    pub fn instance_hosts(&self, uuids: &[String]) -> Result<std::collections::BTreeSet<String>> {
        let mut conn = self.conn()?;
        let mut hosts: std::collections::BTreeSet<String> = instances::table
            .filter(instances::deleted.eq(0))
            .filter(instances::uuid.eq_any(uuids))
            .select(instances::node.nullable())
            .load::<Option<String>>(&mut conn)?
            .into_iter()
            .flatten()
            .collect();
        let placed: Vec<String> = allocations::table
            .inner_join(compute_nodes::table)
            .inner_join(instances::table.on(instances::uuid.eq(allocations::instance_uuid)))
            .filter(instances::deleted.eq(0))
            .filter(allocations::instance_uuid.eq_any(uuids))
            .select(compute_nodes::hypervisor_hostname)
            .load(&mut conn)?;
        hosts.extend(placed);
        Ok(hosts)
    }

    /// Sets one extra spec of a flavor (by flavor id), replacing an earlier value.
    pub fn flavor_extra_spec_set(&self, flavorid: &str, key: &str, value: &str) -> Result<()> {
        let one = std::collections::BTreeMap::from([(key.to_string(), value.to_string())]);
        self.flavor_extra_specs_set(flavorid, &one)
    }

    /// Sets several extra specs of a flavor together: all of them, or (flavor gone, database
    /// error) none.
    pub fn flavor_extra_specs_set(
        &self,
        flavorid: &str,
        specs: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let flavor = crate::catalog::flavor_row_id(conn, flavorid)?;
            for (key, value) in specs {
                diesel::delete(
                    flavor_extra_specs::table
                        .filter(flavor_extra_specs::flavor_id.eq(flavor))
                        .filter(flavor_extra_specs::spec_key.eq(key)),
                )
                .execute(conn)?;
                diesel::insert_into(flavor_extra_specs::table)
                    .values((
                        flavor_extra_specs::flavor_id.eq(flavor),
                        flavor_extra_specs::spec_key.eq(key),
                        flavor_extra_specs::spec_value.eq(value),
                        flavor_extra_specs::created_at.eq(now()),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
    }

    /// A flavor's extra specs (by flavor id), by key.
    pub fn flavor_extra_specs(
        &self,
        flavorid: &str,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let mut conn = self.conn()?;
        let flavor = crate::catalog::flavor_row_id(&mut conn, flavorid)?;
        let specs: Vec<(String, String)> = direct!(&mut *conn, c => {
            flavor_extra_specs::table
                .filter(flavor_extra_specs::flavor_id.eq(flavor))
                .select((flavor_extra_specs::spec_key, flavor_extra_specs::spec_value))
                .load(c)
        })?;
        Ok(specs.into_iter().collect())
    }
}

/// One claim, inside the caller's write transaction (see [`Db::allocation_claim`]).
fn claim_allocation(conn: &mut AnyConnection, claim: &AllocationClaim) -> Result<ClaimOutcome> {
    let waiting: Option<(Option<String>, Option<String>)> = direct!(&mut *conn, c => {
        instances::table
            .filter(instances::uuid.eq(&claim.instance_uuid))
            .filter(instances::deleted.eq(0))
            .filter(instances::vm_state.eq("building"))
            .select((instances::task_state, instances::host))
            .first(c)
            .optional()
    })?;
    let waiting = match &waiting {
        Some((Some(task), host)) if task == "scheduling" => match host {
            None => true,
            Some(host) => claim.moving_from.as_deref() == Some(host.as_str()),
        },
        _ => false,
    };
    if !waiting {
        return Ok(ClaimOutcome::InstanceGone);
    }

    let usage = Placed {
        vcpus: claim.usage.vcpus.max(0),
        memory_mb: claim.usage.memory_mb.max(0),
        disk_mb: claim.usage.disk_mb.max(0),
    };
    let node = compute_nodes::table
        .filter(compute_nodes::id.eq(claim.node_id))
        .filter(compute_nodes::deleted.eq(0));
    // Four forms at most (which of vcpus and memory are asked for).
    let taken = direct!(&mut *conn, c => {
        let mut fits = diesel::update(node)
            .filter((compute_nodes::placed_disk_mb + usage.disk_mb).le(claim.limits.disk_mb))
            .into_boxed();
        if usage.vcpus > 0 {
            fits = fits.filter((compute_nodes::placed_vcpus + usage.vcpus).le(claim.limits.vcpus));
        }
        if usage.memory_mb > 0 {
            fits = fits.filter(
                (compute_nodes::placed_memory_mb + usage.memory_mb).le(claim.limits.memory_mb),
            );
        }
        Kept(
            fits.set((
                compute_nodes::placed_vcpus.eq(compute_nodes::placed_vcpus + usage.vcpus),
                compute_nodes::placed_memory_mb
                    .eq(compute_nodes::placed_memory_mb + usage.memory_mb),
                compute_nodes::placed_disk_mb.eq(compute_nodes::placed_disk_mb + usage.disk_mb),
            ))
            .returning(compute_nodes::id),
        )
        .changed(c)
    })?;
    if taken == 0 {
        let placed: Option<(i64, i64, i64)> = node
            .select((
                compute_nodes::placed_vcpus,
                compute_nodes::placed_memory_mb,
                compute_nodes::placed_disk_mb,
            ))
            .first(conn)
            .optional()?;
        return Ok(match placed {
            Some((vcpus, memory_mb, disk_mb)) => ClaimOutcome::NoRoom(Placed {
                vcpus,
                memory_mb,
                disk_mb,
            }),
            None => ClaimOutcome::NodeGone,
        });
    }

    release_allocation(conn, &claim.instance_uuid)?;
    let (host, node): (String, String) = direct!(&mut *conn, c => {
        compute_nodes::table
            .find(claim.node_id)
            .select((compute_nodes::host, compute_nodes::hypervisor_hostname))
            .first(c)
    })?;
    let fixed_ip = match take_fixed_ip(conn, &claim.instance_uuid, None) {
        Ok(ip) => Some(ip),
        // Nothing was written; the build goes on without, as it went before claims took
        // addresses, and ends where the compute asks for one.
        Err(DbError::Exhausted(_)) => None,
        Err(e) => return Err(e),
    };
    let at = now();
    direct!(&mut *conn, c => {
        Kept(
            diesel::update(instances::table.filter(instances::uuid.eq(&claim.instance_uuid)))
                .set((
                    instances::host.eq(&host),
                    instances::node.eq(&node),
                    instances::updated_at.eq(at),
                ))
                .returning(instances::id),
        )
        .changed(c)
    })?;
    direct!(&mut *conn, c => {
        diesel::insert_into(allocations::table)
            .values((
                allocations::instance_uuid.eq(&claim.instance_uuid),
                allocations::compute_node_id.eq(claim.node_id),
                allocations::vcpus.eq(usage.vcpus),
                allocations::memory_mb.eq(usage.memory_mb),
                allocations::disk_mb.eq(usage.disk_mb),
                allocations::created_at.eq(at),
            ))
            .execute(c)
    })?;
    Ok(ClaimOutcome::Claimed(fixed_ip))
}

/// Deletes an instance's allocation and takes it off its node's running totals, inside the
/// caller's transaction; `false` when there was none.
pub(crate) fn release_allocation(
    conn: &mut AnyConnection,
    instance_uuid: &str,
) -> QueryResult<bool> {
    let held: Option<(i64, i64, i64, i64)> = direct!(&mut *conn, c => {
        diesel::delete(allocations::table.filter(allocations::instance_uuid.eq(instance_uuid)))
            .returning((
                allocations::compute_node_id,
                allocations::vcpus,
                allocations::memory_mb,
                allocations::disk_mb,
            ))
            .get_result(c)
            .optional()
    })?;
    let Some((node_id, vcpus, memory_mb, disk_mb)) = held else {
        return Ok(false);
    };
    direct!(&mut *conn, c => {
        Kept(
            diesel::update(compute_nodes::table.filter(compute_nodes::id.eq(node_id)))
                .set((
                    compute_nodes::placed_vcpus.eq(compute_nodes::placed_vcpus - vcpus),
                    compute_nodes::placed_memory_mb.eq(compute_nodes::placed_memory_mb - memory_mb),
                    compute_nodes::placed_disk_mb.eq(compute_nodes::placed_disk_mb - disk_mb),
                ))
                .returning(compute_nodes::id),
        )
        .changed(c)
    })?;
    Ok(true)
}

/// The node (hypervisor hostname) an instance's resources are placed on, if any.
pub(crate) fn allocation_node(
    conn: &mut AnyConnection,
    instance_uuid: &str,
) -> QueryResult<Option<String>> {
    direct!(conn, c => {
        allocations::table
            .inner_join(compute_nodes::table)
            .filter(allocations::instance_uuid.eq(instance_uuid))
            .select(compute_nodes::hypervisor_hostname)
            .first(c)
            .optional()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::open_temp;
    use crate::{ComputeNodeValues, DbError, NewFault, NewInstance};

    fn instance(uuid: &str) -> NewInstance {
        crate::testing::new_instance(uuid, "p")
    }

    /// A node reporting `vcpus` vCPUs and 8 GB / 100 GB, nothing used; returns its id.
    fn node(db: &Db, host: &str, vcpus: i64) -> i64 {
        db.compute_node_upsert(&ComputeNodeValues {
            host: host.to_string(),
            hypervisor_hostname: host.to_string(),
            hypervisor_type: "test".to_string(),
            vcpus,
            memory_mb: 8192,
            local_gb: 100,
            vcpus_used: 0,
            memory_mb_used: 0,
            local_gb_used: 0,
            running_vms: 0,
            extra_resources: "{}".to_string(),
        })
        .unwrap();
        db.compute_nodes()
            .unwrap()
            .into_iter()
            .find(|n| n.host == host)
            .unwrap()
            .id
    }

    const ONE: Placed = Placed {
        vcpus: 1,
        memory_mb: 512,
        disk_mb: 1024,
    };
    const LIMITS: Placed = Placed {
        vcpus: 2,
        memory_mb: 8192,
        disk_mb: 100 * 1024,
    };

    fn claim(uuid: &str, node_id: i64) -> AllocationClaim {
        AllocationClaim {
            instance_uuid: uuid.to_string(),
            node_id,
            usage: ONE,
            limits: LIMITS,
            moving_from: None,
        }
    }

    fn placed(db: &Db, node_id: i64) -> Placed {
        let n = db
            .compute_nodes()
            .unwrap()
            .into_iter()
            .find(|n| n.id == node_id)
            .unwrap();
        Placed {
            vcpus: n.placed_vcpus,
            memory_mb: n.placed_memory_mb,
            disk_mb: n.placed_disk_mb,
        }
    }

    #[test]
    fn a_claim_takes_room_until_the_limit_then_reports_what_is_placed() {
        let (_dir, db) = open_temp();
        let node_id = node(&db, "node-1", 2);
        for uuid in ["a", "b", "c"] {
            db.instance_create(&instance(uuid), "req-1").unwrap();
        }
        assert!(db
            .allocation_claim(&claim("a", node_id))
            .unwrap()
            .is_claimed());
        assert!(db
            .allocation_claim(&claim("b", node_id))
            .unwrap()
            .is_claimed());
        let two = Placed {
            vcpus: 2,
            memory_mb: 1024,
            disk_mb: 2048,
        };
        assert_eq!(
            db.allocation_claim(&claim("c", node_id)).unwrap(),
            ClaimOutcome::NoRoom(two)
        );
        assert_eq!(placed(&db, node_id), two);
        assert_eq!(db.allocation_get("c").unwrap(), None);
        assert_eq!(db.allocation_get("a").unwrap(), Some((node_id, ONE)));

        // A compute's report never touches the placed totals.
        node(&db, "node-1", 2);
        assert_eq!(placed(&db, node_id), two);

        assert_eq!(
            db.allocation_claim(&claim("c", 9999)).unwrap(),
            ClaimOutcome::NodeGone
        );
        assert_eq!(
            db.allocation_claim(&claim("nope", node_id)).unwrap(),
            ClaimOutcome::InstanceGone
        );
    }

    #[test]
    fn claims_committed_together_each_see_the_room_the_earlier_ones_took() {
        let (_dir, db) = open_temp();
        let node_id = node(&db, "node-1", 2);
        for uuid in ["a", "b", "c"] {
            db.instance_create(&instance(uuid), "req-1").unwrap();
        }
        let outcomes = db
            .allocation_claims(&[
                claim("a", node_id),
                claim("gone", node_id),
                claim("b", node_id),
                claim("c", node_id),
                claim("c", 9999),
            ])
            .unwrap();
        let two = Placed {
            vcpus: 2,
            memory_mb: 1024,
            disk_mb: 2048,
        };
        // Each claim that took room took an address of its own.
        assert!(
            matches!(
                &outcomes[..],
                [
                    ClaimOutcome::Claimed(Some(a)),
                    ClaimOutcome::InstanceGone,
                    ClaimOutcome::Claimed(Some(b)),
                    ClaimOutcome::NoRoom(full),
                    ClaimOutcome::NodeGone,
                ] if a.address != b.address && *full == two
            ),
            "{outcomes:?}"
        );
        assert_eq!(placed(&db, node_id), two);
        assert_eq!(db.allocation_get("b").unwrap(), Some((node_id, ONE)));
        assert_eq!(db.allocation_get("c").unwrap(), None);
        assert_eq!(db.allocation_claims(&[]).unwrap(), []);
    }

    #[test]
    fn a_claim_places_the_instance_with_an_address_or_without_when_none_is_free() {
        let (_dir, db) = open_temp();
        let node_1 = node(&db, "node-1", 4);
        let node_2 = node(&db, "node-2", 4);
        db.network_delete("private").unwrap();
        // Room for one address.
        db.network_create("tiny", "192.168.5.0/30", "192.168.5.1", None)
            .unwrap();
        for uuid in ["a", "b"] {
            db.instance_create(&instance(uuid), "req-1").unwrap();
        }

        let ClaimOutcome::Claimed(Some(ip)) = db.allocation_claim(&claim("a", node_1)).unwrap()
        else {
            panic!("the claim took no address");
        };
        assert_eq!(
            (ip.address.as_str(), ip.network.as_str()),
            ("192.168.5.2", "tiny")
        );
        assert_eq!(db.fixed_ips_of("a").unwrap(), std::slice::from_ref(&ip));
        let a = db.instance_get("a").unwrap().unwrap();
        assert_eq!(
            (a.task_state.as_deref(), a.host.as_deref()),
            (Some("scheduling"), Some("node-1")),
            "placed, not started"
        );

        // No address left: the room is taken all the same.
        assert_eq!(
            db.allocation_claim(&claim("b", node_1)).unwrap(),
            ClaimOutcome::Claimed(None)
        );
        assert_eq!(db.fixed_ips_of("b").unwrap(), []);

        // Placed on node-1, "a" moves only for the scheduler that moves it from there, and
        // keeps its address.
        assert_eq!(
            db.allocation_claim(&claim("a", node_2)).unwrap(),
            ClaimOutcome::InstanceGone
        );
        let mut moved = claim("a", node_2);
        moved.moving_from = Some("node-2".into());
        assert_eq!(
            db.allocation_claim(&moved).unwrap(),
            ClaimOutcome::InstanceGone
        );
        moved.moving_from = Some("node-1".into());
        assert_eq!(
            db.allocation_claim(&moved).unwrap(),
            ClaimOutcome::Claimed(Some(ip))
        );
        let a = db.instance_get("a").unwrap().unwrap();
        assert_eq!(a.host.as_deref(), Some("node-2"));
        assert_eq!(placed(&db, node_1).vcpus, 1, "only b's room is left there");

        // Once a compute builds it (`spawning`, as `start_spawning` records), not even that.
        let spawning = crate::InstanceChanges {
            task_state: Some(Some("spawning".into())),
            ..Default::default()
        };
        db.instance_update("a", &spawning).unwrap();
        let mut back = claim("a", node_1);
        back.moving_from = Some("node-2".into());
        assert_eq!(
            db.allocation_claim(&back).unwrap(),
            ClaimOutcome::InstanceGone
        );
    }

    #[test]
    fn no_valid_host_ends_a_build_only_while_it_waits_for_a_placement() {
        let (_dir, db) = open_temp();
        let node_1 = node(&db, "node-1", 2);
        let fault = |uuid: &str| NewFault {
            instance_uuid: uuid.into(),
            code: 500,
            message: "No valid host was found.".into(),
            details: String::new(),
            host: None,
        };
        let vm_state = |uuid: &str| db.instance_get(uuid).unwrap().unwrap().vm_state;

        db.instance_create(&instance("waiting"), "req-1").unwrap();
        assert!(db
            .instance_set_error_if_unplaced("waiting", &fault("waiting"), None)
            .unwrap());
        assert_eq!(vm_state("waiting"), "error");

        // Placed by a duplicate of its request: that build goes on.
        db.instance_create(&instance("placed"), "req-1").unwrap();
        assert!(db
            .allocation_claim(&claim("placed", node_1))
            .unwrap()
            .is_claimed());
        assert!(!db
            .instance_set_error_if_unplaced("placed", &fault("placed"), None)
            .unwrap());
        assert_eq!(vm_state("placed"), "building");
        assert_eq!(placed(&db, node_1), ONE);
        // The scheduler that was moving it from node-1 found no other host: it ends, and
        // node-1 is free again.
        assert!(db
            .instance_set_error_if_unplaced("placed", &fault("placed"), Some("node-1"))
            .unwrap());
        assert_eq!(vm_state("placed"), "error");
        assert_eq!(placed(&db, node_1), Placed::default());

        // A claim its batch gave up leaves the instance as before any claim.
        db.instance_create(&instance("undone"), "req-1").unwrap();
        assert!(db
            .allocation_claim(&claim("undone", node_1))
            .unwrap()
            .is_claimed());
        assert!(!db
            .fixed_ips_of_instances(&["undone".into()])
            .unwrap()
            .is_empty());
        assert!(db.claim_undo("undone").unwrap());
        let row = db.instance_get("undone").unwrap().unwrap();
        assert_eq!((row.host, row.node), (None, None));
        assert!(db
            .fixed_ips_of_instances(&["undone".into()])
            .unwrap()
            .is_empty());
        assert_eq!(placed(&db, node_1), Placed::default());
        assert!(db
            .instance_set_error_if_unplaced("undone", &fault("undone"), None)
            .unwrap());
        // One no longer building is left alone.
        assert!(!db
            .instance_set_error_if_unplaced("undone", &fault("undone"), None)
            .unwrap());
    }

    #[test]
    fn delete_error_and_reschedule_give_back_exactly_once() {
        let (_dir, db) = open_temp();
        let node_1 = node(&db, "node-1", 2);
        let node_2 = node(&db, "node-2", 2);
        for uuid in ["a", "b"] {
            db.instance_create(&instance(uuid), "req-1").unwrap();
            assert!(db
                .allocation_claim(&claim(uuid, node_1))
                .unwrap()
                .is_claimed());
        }
        // A scheduler whose cast node-1 did not take moves "a" to node-2 in one step.
        let mut moved = claim("a", node_2);
        moved.moving_from = Some("node-1".into());
        assert!(db.allocation_claim(&moved).unwrap().is_claimed());
        assert_eq!((placed(&db, node_1), placed(&db, node_2)), (ONE, ONE));

        db.instance_destroy("a").unwrap();
        assert_eq!(placed(&db, node_2), Placed::default());
        db.instance_set_error(
            "b",
            &NewFault {
                instance_uuid: "b".into(),
                code: 500,
                message: "boom".into(),
                details: String::new(),
                host: None,
            },
        )
        .unwrap();
        assert_eq!(placed(&db, node_1), Placed::default());
        assert!(!db.claim_undo("b").unwrap(), "already given back");

        // A compute reporting a failed build (an update to error) gives it back too.
        db.instance_create(&instance("c"), "req-1").unwrap();
        assert!(db
            .allocation_claim(&claim("c", node_1))
            .unwrap()
            .is_claimed());
        db.instance_update(
            "c",
            &crate::InstanceChanges {
                vm_state: Some("error".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(placed(&db, node_1), Placed::default());
        assert_eq!(placed(&db, node_1), Placed::default());
        assert!(db.allocation_sums().unwrap().is_empty());

        // An instance that is no longer building cannot claim.
        assert_eq!(
            db.allocation_claim(&claim("b", node_1)).unwrap(),
            ClaimOutcome::InstanceGone
        );
    }

    #[test]
    fn the_migration_gives_running_instances_their_allocations() {
        use diesel::connection::SimpleConnection;
        use diesel_migrations::MigrationHarness;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zova.sqlite");
        let path = path.to_str().unwrap();
        {
            // A database of the first schema version, with two instances on node-1.
            let mut conn = diesel::SqliteConnection::establish(path).unwrap();
            conn.run_next_migration(crate::MIGRATIONS).unwrap();
            conn.batch_execute(
                "INSERT INTO compute_nodes (host, hypervisor_hostname, hypervisor_type, vcpus,
                     memory_mb, local_gb, vcpus_used, memory_mb_used, local_gb_used, free_ram_mb,
                     free_disk_gb, running_vms, created_at)
                 VALUES ('node-1', 'node-1', 'test', 8, 8192, 100, 3, 1536, 3, 6656, 97, 2,
                     '2025-01-01 00:00:00');
                 INSERT INTO instances (uuid, display_name, project_id, user_id, flavorid,
                     image_ref, vcpus, memory_mb, root_gb, ephemeral_gb, swap_mb, vm_state,
                     power_state, host, node, reservation_id, launch_index, created_at)
                 VALUES
                     ('a', 'a', 'p', 'u', '1', 'img', 1, 512, 1, 0, 0, 'active', 1, 'node-1',
                      'node-1', 'r', 0, '2025-01-01 00:00:00'),
                     ('b', 'b', 'p', 'u', '1', 'img', 2, 1024, 2, 1, 512, 'building', 0,
                      'node-1', 'node-1', 'r', 0, '2025-01-01 00:00:00'),
                     ('c', 'c', 'p', 'u', '1', 'img', 4, 4096, 4, 0, 0, 'error', 0, 'node-1',
                      'node-1', 'r', 0, '2025-01-01 00:00:00');",
            )
            .unwrap();
        }
        let db = Db::open(path).unwrap();
        let node = db.compute_nodes().unwrap().remove(0);
        assert_eq!(
            (
                node.placed_vcpus,
                node.placed_memory_mb,
                node.placed_disk_mb
            ),
            (3, 1536, 1024 + 3 * 1024 + 512)
        );
        assert_eq!(
            db.allocation_get("c").unwrap(),
            None,
            "an error holds nothing"
        );
        assert_eq!(db.allocation_sums().unwrap()[&node.id].vcpus, 3);
    }

    #[test]
    fn once_a_compute_builds_it_an_instance_cannot_be_placed_again() {
        let (_dir, db) = open_temp();
        let node_1 = node(&db, "node-1", 2);
        let node_2 = node(&db, "node-2", 2);
        db.instance_create(&instance("a"), "req-1").unwrap();
        assert!(db
            .allocation_claim(&claim("a", node_1))
            .unwrap()
            .is_claimed());
        let placed = db.instance_get("a").unwrap().unwrap();
        assert_eq!(
            (placed.host.as_deref(), placed.node.as_deref()),
            (Some("node-1"), Some("node-1")),
            "the claim records the host"
        );

        // node-2 (a late copy of the cast) may not start it: it is placed on node-1.
        let spawning_on = |node: &str| crate::InstanceChanges {
            task_state: Some(Some("spawning".into())),
            host: Some(Some(node.into())),
            node: Some(Some(node.into())),
            ..Default::default()
        };
        assert!(matches!(
            db.instance_update_expecting("a", &spawning_on("node-2"), Some("building")),
            Err(DbError::Conflict(_))
        ));
        db.instance_update_expecting("a", &spawning_on("node-1"), Some("building"))
            .unwrap();
        // Now node-1 builds it: a re-placement finds it gone and takes nothing.
        assert_eq!(
            db.allocation_claim(&claim("a", node_2)).unwrap(),
            ClaimOutcome::InstanceGone
        );
        assert_eq!(placed_vcpus(&db, node_2), 0);

        // An instance that went to error meanwhile is not brought back.
        db.instance_update(
            "a",
            &crate::InstanceChanges {
                vm_state: Some("error".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let active = crate::InstanceChanges {
            vm_state: Some("active".into()),
            ..Default::default()
        };
        assert!(matches!(
            db.instance_update_expecting("a", &active, Some("building")),
            Err(DbError::Conflict(_))
        ));
        assert!(matches!(
            db.instance_update_expecting("gone", &active, Some("building")),
            Err(DbError::NotFound { .. })
        ));
    }

    fn placed_vcpus(db: &Db, node_id: i64) -> i64 {
        placed(db, node_id).vcpus
    }

    #[test]
    fn zero_vcpu_and_ram_requests_skip_those_checks_but_not_disk() {
        let (_dir, db) = open_temp();
        let node_id = node(&db, "node-1", 2);
        db.instance_create(&instance("a"), "req-1").unwrap();
        let mut zero = claim("a", node_id);
        zero.usage = Placed {
            vcpus: 0,
            memory_mb: 0,
            disk_mb: 200 * 1024,
        };
        zero.limits.vcpus = -1;
        assert!(matches!(
            db.allocation_claim(&zero).unwrap(),
            ClaimOutcome::NoRoom(_)
        ));
        zero.usage.disk_mb = 0;
        assert!(db.allocation_claim(&zero).unwrap().is_claimed());
    }

    #[test]
    fn racing_claims_from_many_threads_never_exceed_the_limit() {
        let (_dir, db) = open_temp();
        let node_id = node(&db, "node-1", 8);
        let uuids: Vec<String> = (0..64).map(|i| format!("i-{i}")).collect();
        for uuid in &uuids {
            db.instance_create(&instance(uuid), "req-1").unwrap();
        }
        let url = db.url().to_string();
        let claimed: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = uuids
                .chunks(8)
                .map(|chunk| {
                    // Each thread has its own pool, as separate scheduler processes would.
                    let db = Db::open(&url).unwrap();
                    scope.spawn(move || {
                        let mut won = 0;
                        for uuid in chunk {
                            let mut c = claim(uuid, node_id);
                            c.limits.vcpus = 8;
                            if db.allocation_claim(&c).unwrap().is_claimed() {
                                won += 1;
                            }
                        }
                        won
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(claimed, 8);
        assert_eq!(placed(&db, node_id).vcpus, 8);
        assert_eq!(
            db.allocation_sums().unwrap()[&node_id],
            placed(&db, node_id)
        );
    }
}
