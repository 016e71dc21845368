//! Instances and their history (actions and faults).

use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::catalog::live_image;
use crate::kept::Kept;
use crate::networks::release_fixed_ip;
use crate::placement::{allocation_node, release_allocation};
use crate::schema::{instance_actions, instance_faults, instances};
use crate::{
    check_json_object, now, Db, DbError, Image, Instance, InstanceAction, InstanceChanges,
    InstanceFault, NewFault, NewInstance, Result,
};
use crate::{AnyConnection, DbBackend};

/// What a conditional update expects of the instance's task_state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedTask<'a> {
    /// Whatever it is.
    Any,
    /// No task is under way.
    None,
    /// Exactly this one.
    Is(&'a str),
}

/// The live instance with this uuid, on the caller's connection.
fn live_instance(conn: &mut AnyConnection, uuid: &str) -> QueryResult<Option<Instance>> {
    direct!(conn, c => {
        instances::table
            .filter(instances::deleted.eq(0))
            .filter(instances::uuid.eq(uuid))
            .select(Instance::as_select())
            .first(c)
            .optional()
    })
}

fn instance_not_found(uuid: &str) -> DbError {
    DbError::NotFound {
        kind: "instance",
        id: uuid.to_string(),
    }
}

pub(crate) fn insert_fault(
    conn: &mut AnyConnection,
    fault: &NewFault,
) -> QueryResult<InstanceFault> {
    diesel::insert_into(instance_faults::table)
        .values((fault, instance_faults::created_at.eq(now())))
        .returning(<InstanceFault as Selectable<DbBackend>>::construct_selection())
        .get_result(conn)
}

/// Inserts instances and their `create` actions inside the caller's transaction.
pub(crate) fn insert_with_actions(
    conn: &mut AnyConnection,
    new: &[NewInstance],
    request_id: &str,
) -> QueryResult<Vec<Instance>> {
    let created_at = now();
    let mut created = Vec::with_capacity(new.len());
    for instance in new {
        created.push(direct!(&mut *conn, c => {
            diesel::insert_into(instances::table)
                .values((instance, instances::created_at.eq(created_at)))
                .returning(Instance::as_select())
                .get_result(c)
        })?);
        direct!(&mut *conn, c => {
            diesel::insert_into(instance_actions::table)
                .values((
                    instance_actions::action.eq("create"),
                    instance_actions::instance_uuid.eq(&instance.uuid),
                    instance_actions::request_id.eq(request_id),
                    instance_actions::user_id.eq(&instance.user_id),
                    instance_actions::project_id.eq(&instance.project_id),
                    instance_actions::start_time.eq(created_at),
                ))
                .execute(c)
        })?;
    }
    Ok(created)
}

impl Db {
    /// Creates an instance together with its `create` action, so no instance exists without
    /// the record of the request that made it.
    pub fn instance_create(&self, new: &NewInstance, request_id: &str) -> Result<Instance> {
        let mut created = self.instances_create(std::slice::from_ref(new), request_id)?;
        created.pop().ok_or_else(|| instance_not_found(&new.uuid))
    }

    /// Creates several instances (one request's `min_count..max_count`) and their `create`
    /// actions in one transaction: all of them, or none.
    pub fn instances_create(&self, new: &[NewInstance], request_id: &str) -> Result<Vec<Instance>> {
        for instance in new {
            check_json_object("scheduler_hints", &instance.scheduler_hints)?;
            check_json_object("metadata", &instance.metadata)?;
        }
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| Ok(insert_with_actions(conn, new, request_id)?))
    }

    /// The live instance with this uuid.
    pub fn instance_get(&self, uuid: &str) -> Result<Option<Instance>> {
        let mut conn = self.conn()?;
        Ok(live_instance(&mut conn, uuid)?)
    }

    /// The live instance with this uuid and the live image it boots from (`None` for an image
    /// deleted since), on one connection: what a build's request spec is made of.
    pub fn instance_and_image(&self, uuid: &str) -> Result<Option<(Instance, Option<Image>)>> {
        let mut conn = self.conn()?;
        let Some(instance) = live_instance(&mut conn, uuid)? else {
            return Ok(None);
        };
        let image = live_image(&mut conn, &instance.image_ref)?;
        Ok(Some((instance, image)))
    }

    /// Live instances of one project (or of all projects for `None`), newest first.
    pub fn instances_list(&self, project_id: Option<&str>) -> Result<Vec<Instance>> {
        let mut conn = self.conn()?;
        let mut query = instances::table
            .filter(instances::deleted.eq(0))
            .order((instances::created_at.desc(), instances::id.desc()))
            .select(Instance::as_select())
            .into_boxed();
        if let Some(project_id) = project_id {
            query = query.filter(instances::project_id.eq(project_id));
        }
        Ok(query.load(&mut conn)?)
    }

    /// Live instances placed on `host`, oldest first.
    pub fn instances_by_host(&self, host: &str) -> Result<Vec<Instance>> {
        let mut conn = self.conn()?;
        Ok(instances::table
            .filter(instances::deleted.eq(0))
            .filter(instances::host.eq(host))
            .order(instances::id.asc())
            .select(Instance::as_select())
            .load(&mut conn)?)
    }

    /// The live instances among `uuids`, oldest first; unknown uuids are skipped.
    pub fn instances_by_uuids(&self, uuids: &[String]) -> Result<Vec<Instance>> {
        let mut conn = self.conn()?;
        Ok(instances::table
            .filter(instances::deleted.eq(0))
            .filter(instances::uuid.eq_any(uuids))
            .order(instances::id.asc())
            .select(Instance::as_select())
            .load(&mut conn)?)
    }

    /// Applies `changes` (and a fresh `updated_at`) to a live instance and returns the result.
    /// An instance put into `error` gives back what was placed for it, in the same transaction
    /// (a failed build leaves no domain behind).
    pub fn instance_update(&self, uuid: &str, changes: &InstanceChanges) -> Result<Instance> {
        self.instance_update_expecting(uuid, changes, None)
    }

    /// As [`Db::instance_update`], but only while the instance is in `expected_vm_state`, and,
    /// when the change names a node, only if the instance's resources are placed on that node
    /// (or nowhere): otherwise [`DbError::Conflict`]. A compute uses it so that it never brings
    /// back an instance that went to error or was placed elsewhere meanwhile.
    pub fn instance_update_expecting(
        &self,
        uuid: &str,
        changes: &InstanceChanges,
        expected_vm_state: Option<&str>,
    ) -> Result<Instance> {
        self.instance_update_expecting_task_state(uuid, changes, expected_vm_state, None)
    }

    /// As [`Db::instance_update_expecting`], and also only while the instance's task_state is
    /// `expected_task_state` (Nova's `expected_task_state`), otherwise [`DbError::Conflict`]. The
    /// end of a stop, start or reboot expects the task_state the API set for it, so a delete
    /// that has set `deleting` meanwhile is left alone.
    pub fn instance_update_expecting_task_state(
        &self,
        uuid: &str,
        changes: &InstanceChanges,
        expected_vm_state: Option<&str>,
        expected_task_state: Option<&str>,
    ) -> Result<Instance> {
        let expected_task = match expected_task_state {
            Some(task) => ExpectedTask::Is(task),
            None => ExpectedTask::Any,
        };
        self.instance_update_expecting_task(uuid, changes, expected_vm_state, expected_task)
    }

    /// As [`Db::instance_update_expecting_task_state`], where the expectation may also be that no
    /// task runs at all ([`ExpectedTask::None`]): a correction made on the compute's own
    /// initiative (the power-state sync) thereby gives way to any user action or delete.
    pub fn instance_update_expecting_task(
        &self,
        uuid: &str,
        changes: &InstanceChanges,
        expected_vm_state: Option<&str>,
        expected_task: ExpectedTask<'_>,
    ) -> Result<Instance> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            update_expecting_task(conn, uuid, changes, expected_vm_state, expected_task)
        })
    }

    /// Sends a build a compute refused back to be scheduled: no host, task `scheduling`. Only
    /// while it is `building` and placed on `refused_by` (or on no host); a refusal from a host
    /// the build has left since (a late copy of the cast) is a [`DbError::Conflict`] and changes
    /// nothing.
    pub fn instance_return_to_scheduling(&self, uuid: &str, refused_by: &str) -> Result<Instance> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let host: Option<Option<String>> = direct!(&mut *conn, c => {
                instances::table
                    .filter(instances::deleted.eq(0))
                    .filter(instances::uuid.eq(uuid))
                    .select(instances::host)
                    .first(c)
                    .optional()
            })?;
            match host {
                None => return Err(instance_not_found(uuid)),
                Some(Some(host)) if host != refused_by => {
                    return Err(DbError::Conflict(format!(
                        "instance {uuid} is placed on {host}, not {refused_by}"
                    )))
                }
                Some(_) => {}
            }
            let changes = InstanceChanges {
                task_state: Some(Some("scheduling".into())),
                host: Some(None),
                node: Some(None),
                ..Default::default()
            };
            update_expecting_task(conn, uuid, &changes, Some("building"), ExpectedTask::Any)
        })
    }

    /// Puts a live instance into `error` and records why, together.
    pub fn instance_set_error(&self, uuid: &str, fault: &NewFault) -> Result<()> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            if !set_error_where(conn, uuid, fault, |live| live)? {
                return Err(instance_not_found(uuid));
            }
            Ok(())
        })
    }

    /// Live builds created before `created_before`: what the conductor's stuck-build check
    /// ends (Nova's `instance_build_timeout` counts from creation too).
    pub fn instances_building_since_before(
        &self,
        created_before: NaiveDateTime,
    ) -> Result<Vec<Instance>> {
        let mut conn = self.conn()?;
        Ok(instances::table
            .filter(instances::deleted.eq(0))
            .filter(instances::vm_state.eq("building"))
            .filter(instances::created_at.lt(created_before))
            .order(instances::id.asc())
            .select(Instance::as_select())
            .load(&mut conn)?)
    }

    /// Live instances outside a build whose task (a stop, start, reboot or delete) was last
    /// touched before `touched_before`: a task whose service died with it.
    pub fn instances_in_task_since_before(
        &self,
        touched_before: NaiveDateTime,
    ) -> Result<Vec<Instance>> {
        let mut conn = self.conn()?;
        Ok(instances::table
            .filter(instances::deleted.eq(0))
            .filter(instances::vm_state.ne("building"))
            .filter(instances::task_state.is_not_null())
            .filter(
                instances::updated_at
                    .lt(touched_before)
                    .or(instances::updated_at
                        .is_null()
                        .and(instances::created_at.lt(touched_before))),
            )
            .order(instances::id.asc())
            .select(Instance::as_select())
            .load(&mut conn)?)
    }

    /// As [`Db::instance_set_error`], but only while the instance is still `building`: false
    /// (and nothing changed) when it is gone or finished its build meanwhile, so a build that
    /// ends just as it is declared stuck keeps its outcome.
    pub fn instance_set_error_if_building(&self, uuid: &str, fault: &NewFault) -> Result<bool> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            set_error_where(conn, uuid, fault, |live| {
                live.filter(instances::vm_state.eq("building"))
            })
        })
    }

    /// As [`Db::instance_set_error`], for a build no host was found for: only while it still
    /// waits for a placement (`building`, task `scheduling`, on no host or on `moving_from`,
    /// the host it was being moved from). False, and nothing changed, when it is gone, or when
    /// another placement took it meanwhile: a duplicate of its request, sent to another
    /// scheduler when the first was slow to acknowledge it, may have placed it.
    pub fn instance_set_error_if_unplaced(
        &self,
        uuid: &str,
        fault: &NewFault,
        moving_from: Option<&str>,
    ) -> Result<bool> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            set_error_where(conn, uuid, fault, |live| {
                live.filter(instances::vm_state.eq("building"))
                    .filter(instances::task_state.eq("scheduling"))
                    .filter(
                        instances::host
                            .is_null()
                            .or(instances::host.eq(moving_from)),
                    )
            })
        })
    }

    /// Records a fault without changing the instance's state.
    pub fn instance_fault_create(&self, fault: &NewFault) -> Result<InstanceFault> {
        let mut conn = self.writer()?;
        Ok(insert_fault(&mut conn, fault)?)
    }

    /// The most recent fault of an instance, the one the API shows.
    pub fn instance_fault_latest(&self, uuid: &str) -> Result<Option<InstanceFault>> {
        let mut conn = self.conn()?;
        Ok(instance_faults::table
            .filter(instance_faults::deleted.eq(0))
            .filter(instance_faults::instance_uuid.eq(uuid))
            .order(instance_faults::id.desc())
            .select(InstanceFault::as_select())
            .first(&mut conn)
            .optional()?)
    }

    /// Soft-deletes a live instance: it keeps its row (and its actions and faults) but is
    /// `deleted` from then on, with `vm_state = "deleted"`.
    pub fn instance_destroy(&self, uuid: &str) -> Result<()> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| destroy(conn, uuid))
    }

    /// Records the start of a user request on an instance (`reboot`, `delete`, ...).
    pub fn instance_action_start(
        &self,
        instance_uuid: &str,
        action: &str,
        request_id: &str,
        user_id: &str,
        project_id: &str,
    ) -> Result<InstanceAction> {
        let mut conn = self.writer()?;
        Ok(diesel::insert_into(instance_actions::table)
            .values((
                instance_actions::action.eq(action),
                instance_actions::instance_uuid.eq(instance_uuid),
                instance_actions::request_id.eq(request_id),
                instance_actions::user_id.eq(user_id),
                instance_actions::project_id.eq(project_id),
                instance_actions::start_time.eq(now()),
            ))
            .returning(<InstanceAction as Selectable<DbBackend>>::construct_selection())
            .get_result(&mut *conn)?)
    }

    /// Marks the unfinished actions of `request_id` on an instance finished, with an optional
    /// message (Nova's "Error" on failure). NotFound if there is none.
    pub fn instance_action_finish(
        &self,
        instance_uuid: &str,
        request_id: &str,
        message: Option<&str>,
    ) -> Result<()> {
        let mut conn = self.writer()?;
        let updated = Kept(
            diesel::update(
                instance_actions::table
                    .filter(instance_actions::deleted.eq(0))
                    .filter(instance_actions::instance_uuid.eq(instance_uuid))
                    .filter(instance_actions::request_id.eq(request_id))
                    .filter(instance_actions::finish_time.is_null()),
            )
            .set((
                instance_actions::finish_time.eq(now()),
                instance_actions::message.eq(message),
            ))
            .returning(instance_actions::id),
        )
        .changed(&mut *conn)?;
        if updated == 0 {
            return Err(DbError::NotFound {
                kind: "unfinished instance action",
                id: format!("{request_id} on instance {instance_uuid}"),
            });
        }
        Ok(())
    }

    /// The actions on an instance, oldest first; kept after the instance is deleted.
    pub fn instance_actions(&self, uuid: &str) -> Result<Vec<InstanceAction>> {
        let mut conn = self.conn()?;
        Ok(instance_actions::table
            .filter(instance_actions::deleted.eq(0))
            .filter(instance_actions::instance_uuid.eq(uuid))
            .order((
                instance_actions::start_time.asc(),
                instance_actions::id.asc(),
            ))
            .select(InstanceAction::as_select())
            .load(&mut conn)?)
    }
}

/// [`Db::instance_destroy`] within the caller's transaction.
pub(crate) fn destroy(conn: &mut AnyConnection, uuid: &str) -> Result<()> {
    let at = now();
    let updated = direct!(&mut *conn, c => {
        Kept(
            diesel::update(
                instances::table
                    .filter(instances::deleted.eq(0))
                    .filter(instances::uuid.eq(uuid)),
            )
            .set((
                instances::deleted.eq(instances::id),
                instances::vm_state.eq("deleted"),
                instances::task_state.eq(None::<String>),
                instances::terminated_at.eq(at),
                instances::deleted_at.eq(at),
                instances::updated_at.eq(at),
            ))
            .returning(instances::id),
        )
        .changed(c)
    })?;
    if updated == 0 {
        return Err(instance_not_found(uuid));
    }
    release_allocation(conn, uuid)?;
    release_fixed_ip(conn, uuid)?;
    Ok(())
}

/// The live instance `uuid` as an UPDATE to narrow with more filters.
type LiveInstance<'a> = diesel::query_builder::BoxedUpdateStatement<
    'a,
    <AnyConnection as diesel::Connection>::Backend,
    instances::table,
>;

/// Puts the live instance `uuid` into `error` where `only_if` (more filters on it) holds, with
/// its fault and without whatever was placed for it, which is free again (an instance in error
/// runs nowhere), inside the caller's transaction; false, and nothing changed, where it does
/// not hold.
fn set_error_where<'a>(
    conn: &mut AnyConnection,
    uuid: &'a str,
    fault: &NewFault,
    only_if: impl FnOnce(LiveInstance<'a>) -> LiveInstance<'a>,
) -> Result<bool> {
    let live = diesel::update(instances::table)
        .filter(instances::deleted.eq(0))
        .filter(instances::uuid.eq(uuid))
        .into_boxed();
    let updated = only_if(live)
        .set((
            instances::vm_state.eq("error"),
            instances::task_state.eq(None::<String>),
            instances::updated_at.eq(now()),
        ))
        .execute(conn)?;
    if updated == 0 {
        return Ok(false);
    }
    insert_fault(conn, fault)?;
    release_allocation(conn, uuid)?;
    release_fixed_ip(conn, uuid)?;
    Ok(true)
}

/// The body of [`Db::instance_update_expecting_task`], inside the caller's write transaction.
pub(crate) fn update_expecting_task(
    conn: &mut AnyConnection,
    uuid: &str,
    changes: &InstanceChanges,
    expected_vm_state: Option<&str>,
    expected_task: ExpectedTask<'_>,
) -> Result<Instance> {
    if expected_vm_state.is_some() || expected_task != ExpectedTask::Any {
        let (vm_state, task_state): (String, Option<String>) = direct!(conn, c => {
            instances::table
                .filter(instances::deleted.eq(0))
                .filter(instances::uuid.eq(uuid))
                .select((instances::vm_state, instances::task_state))
                .first(c)
                .optional()
        })?
        .ok_or_else(|| instance_not_found(uuid))?;
        let current = task_state.as_deref();
        let wanted = match expected_task {
            ExpectedTask::Any => None,
            ExpectedTask::None => current.is_some().then_some("none"),
            ExpectedTask::Is(expected) => (current != Some(expected)).then_some(expected),
        };
        if let Some(expected) = wanted {
            let current = current.unwrap_or("none");
            return Err(DbError::Conflict(format!(
                "instance {uuid} has task_state {current}, not {expected}"
            )));
        }
        if let Some(expected) = expected_vm_state.filter(|e| *e != vm_state) {
            return Err(DbError::Conflict(format!(
                "instance {uuid} is {vm_state}, not {expected}"
            )));
        }
    }
    if let (Some(_), Some(Some(node))) = (expected_vm_state, &changes.node) {
        if let Some(placed_on) = allocation_node(conn, uuid)? {
            if &placed_on != node {
                return Err(DbError::Conflict(format!(
                    "instance {uuid} is placed on {placed_on}, not {node}"
                )));
            }
        }
    }
    let at = now();
    let instance = direct!(conn, c => {
        Kept(
            diesel::update(
                instances::table
                    .filter(instances::deleted.eq(0))
                    .filter(instances::uuid.eq(uuid)),
            )
            .set((changes, instances::updated_at.eq(at)))
            .returning(Instance::as_select()),
        )
        .get_result(c)
        .optional()
    })?
    .ok_or_else(|| instance_not_found(uuid))?;
    if changes.vm_state.as_deref() == Some("error") {
        release_allocation(conn, uuid)?;
        release_fixed_ip(conn, uuid)?;
    }
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{new_instance, open_temp};

    fn fault(uuid: &str) -> NewFault {
        NewFault {
            instance_uuid: uuid.to_string(),
            code: 500,
            message: "No valid host was found.".to_string(),
            details: "no host has 512 MB free".to_string(),
            host: None,
        }
    }

    #[test]
    fn create_writes_instance_and_create_action() {
        let (_dir, db) = open_temp();
        let created = db
            .instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        assert_eq!(created.uuid, "u1");
        assert_eq!(created.vm_state, "building");
        assert_eq!(created.task_state.as_deref(), Some("scheduling"));
        assert_eq!(created.metadata, r#"{"role": "web"}"#);
        assert_eq!(
            (created.deleted, created.updated_at, created.host.as_deref()),
            (0, None, None)
        );
        assert_eq!(db.instance_get("u1").unwrap().as_ref(), Some(&created));

        let actions = db.instance_actions("u1").unwrap();
        assert_eq!(actions.len(), 1);
        let action = &actions[0];
        assert_eq!(
            (action.action.as_str(), action.request_id.as_str()),
            ("create", "req-1")
        );
        assert_eq!(
            (action.user_id.as_str(), action.project_id.as_str()),
            ("alice", "p1")
        );
        assert_eq!(action.start_time, created.created_at);
        assert_eq!(action.finish_time, None);
    }

    fn uuids(instances: Vec<Instance>) -> Vec<String> {
        instances.into_iter().map(|i| i.uuid).collect()
    }

    #[test]
    fn stuck_builds_are_found_by_age_and_ended_only_while_building() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("old", "p1"), "req-1")
            .unwrap();
        let mut done = new_instance("done", "p1");
        done.vm_state = "active".into();
        done.task_state = None;
        db.instance_create(&done, "req-2").unwrap();
        let past = now() - chrono::Duration::seconds(60);
        let future = now() + chrono::Duration::seconds(60);
        assert!(db.instances_building_since_before(past).unwrap().is_empty());
        assert_eq!(
            uuids(db.instances_building_since_before(future).unwrap()),
            ["old"]
        );

        assert!(db
            .instance_set_error_if_building("old", &fault("old"))
            .unwrap());
        let ended = db.instance_get("old").unwrap().unwrap();
        assert_eq!((ended.vm_state.as_str(), ended.task_state), ("error", None));
        assert_eq!(
            db.instance_fault_latest("old").unwrap().unwrap().message,
            "No valid host was found."
        );
        // Once ended, or never building, or gone: nothing changes and no fault is added.
        assert!(!db
            .instance_set_error_if_building("old", &fault("old"))
            .unwrap());
        assert!(!db
            .instance_set_error_if_building("done", &fault("done"))
            .unwrap());
        assert!(!db
            .instance_set_error_if_building("nobody", &fault("nobody"))
            .unwrap());
        assert_eq!(db.instance_get("done").unwrap().unwrap().vm_state, "active");
        assert!(db.instance_fault_latest("done").unwrap().is_none());
        assert!(db
            .instances_building_since_before(future)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn tasks_outside_builds_are_found_by_their_last_touch() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("building", "p1"), "req-1")
            .unwrap();
        for (uuid, task) in [("stopping", Some("powering-off")), ("idle", None)] {
            let mut row = new_instance(uuid, "p1");
            row.vm_state = "active".into();
            row.task_state = task.map(String::from);
            db.instance_create(&row, "req-2").unwrap();
        }
        let past = now() - chrono::Duration::seconds(60);
        let future = now() + chrono::Duration::seconds(60);
        assert!(db.instances_in_task_since_before(past).unwrap().is_empty());
        assert_eq!(
            uuids(db.instances_in_task_since_before(future).unwrap()),
            ["stopping"]
        );
        // A touch moves it out of the window that starts now.
        let just_now = now();
        db.instance_update(
            "stopping",
            &InstanceChanges {
                power_state: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(db
            .instances_in_task_since_before(just_now)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn create_rejects_non_object_json() {
        let (_dir, db) = open_temp();
        let mut new = new_instance("u1", "p1");
        new.metadata = "[]".to_string();
        assert!(matches!(
            db.instance_create(&new, "req-1"),
            Err(DbError::Json(_))
        ));
        assert!(db.instance_get("u1").unwrap().is_none());
    }

    #[test]
    fn duplicate_uuid_is_a_query_error_and_writes_no_action() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        let err = db
            .instance_create(&new_instance("u1", "p1"), "req-2")
            .unwrap_err();
        assert!(matches!(err, DbError::Query(_)), "{err}");
        assert_eq!(db.instance_actions("u1").unwrap().len(), 1);
    }

    #[test]
    fn a_batch_is_created_whole_or_not_at_all() {
        let (_dir, db) = open_temp();
        let batch = [new_instance("b1", "p1"), new_instance("b2", "p1")];
        assert_eq!(db.instances_create(&batch, "req-1").unwrap().len(), 2);
        // b3 is new but b1 clashes: nothing of this batch may be written.
        let clash = [new_instance("b3", "p1"), new_instance("b1", "p1")];
        assert!(db.instances_create(&clash, "req-2").is_err());
        assert!(db.instance_get("b3").unwrap().is_none());
        assert!(db.instance_actions("b3").unwrap().is_empty());
        assert_eq!(db.instances_list(Some("p1")).unwrap().len(), 2);
    }

    #[test]
    fn update_applies_only_given_fields() {
        let (_dir, db) = open_temp();
        let before = db
            .instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        let launched = now();
        let after = db
            .instance_update(
                "u1",
                &InstanceChanges {
                    vm_state: Some("active".to_string()),
                    task_state: Some(None),
                    power_state: Some(1),
                    host: Some(Some("node-1".to_string())),
                    launched_at: Some(Some(launched)),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(after.vm_state, "active");
        assert_eq!(after.task_state, None);
        assert_eq!(after.power_state, 1);
        assert_eq!(after.host.as_deref(), Some("node-1"));
        assert_eq!(after.node, None);
        assert_eq!(after.launched_at, Some(launched));
        assert!(after.updated_at.is_some());
        assert_eq!(after.display_name, before.display_name);
        assert_eq!(after.created_at, before.created_at);

        // None leaves a column alone, even a nullable one.
        let again = db
            .instance_update(
                "u1",
                &InstanceChanges {
                    node: Some(Some("node-1.example".to_string())),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(again.host.as_deref(), Some("node-1"));
        assert_eq!(again.launched_at, Some(launched));
        assert_eq!(again.node.as_deref(), Some("node-1.example"));
        assert_eq!(db.instance_get("u1").unwrap(), Some(again));
    }

    #[test]
    fn an_update_expecting_a_task_state_applies_only_in_it() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        let powering_off = InstanceChanges {
            vm_state: Some("active".to_string()),
            task_state: Some(Some("powering-off".to_string())),
            ..Default::default()
        };
        db.instance_update("u1", &powering_off).unwrap();
        let stopped = InstanceChanges {
            vm_state: Some("stopped".to_string()),
            task_state: Some(None),
            power_state: Some(4),
            ..Default::default()
        };

        // A delete took over: the stop's end changes nothing.
        let deleting = InstanceChanges {
            task_state: Some(Some("deleting".to_string())),
            ..Default::default()
        };
        db.instance_update("u1", &deleting).unwrap();
        let err = db
            .instance_update_expecting_task_state("u1", &stopped, None, Some("powering-off"))
            .unwrap_err();
        assert!(
            matches!(&err, DbError::Conflict(why)
                if why == "instance u1 has task_state deleting, not powering-off"),
            "{err}"
        );
        let row = db.instance_get("u1").unwrap().unwrap();
        assert_eq!(
            (row.vm_state.as_str(), row.task_state.as_deref()),
            ("active", Some("deleting"))
        );

        // Both expectations must hold.
        db.instance_update("u1", &powering_off).unwrap();
        let err = db
            .instance_update_expecting_task_state(
                "u1",
                &stopped,
                Some("stopped"),
                Some("powering-off"),
            )
            .unwrap_err();
        assert!(matches!(err, DbError::Conflict(_)), "{err}");
        let after = db
            .instance_update_expecting_task_state(
                "u1",
                &stopped,
                Some("active"),
                Some("powering-off"),
            )
            .unwrap();
        assert_eq!(
            (after.vm_state.as_str(), after.task_state, after.power_state),
            ("stopped", None, 4)
        );

        // No task_state is not the one expected either; a deleted row is not found.
        let err = db
            .instance_update_expecting_task_state("u1", &stopped, None, Some("powering-off"))
            .unwrap_err();
        assert!(err.to_string().contains("task_state none"), "{err}");
        db.instance_destroy("u1").unwrap();
        let err = db
            .instance_update_expecting_task_state("u1", &stopped, None, Some("powering-off"))
            .unwrap_err();
        assert!(matches!(err, DbError::NotFound { .. }), "{err}");
    }

    #[test]
    fn an_update_expecting_no_task_gives_way_to_any_task() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        let active = InstanceChanges {
            vm_state: Some("active".to_string()),
            task_state: Some(None),
            power_state: Some(1),
            ..Default::default()
        };
        db.instance_update("u1", &active).unwrap();
        let shut_off = InstanceChanges {
            power_state: Some(4),
            ..Default::default()
        };

        // A user action started meanwhile: the correction changes nothing.
        let stopping = InstanceChanges {
            task_state: Some(Some("powering-off".to_string())),
            ..Default::default()
        };
        db.instance_update("u1", &stopping).unwrap();
        let err = db
            .instance_update_expecting_task("u1", &shut_off, Some("active"), ExpectedTask::None)
            .unwrap_err();
        assert!(
            matches!(&err, DbError::Conflict(why)
                if why == "instance u1 has task_state powering-off, not none"),
            "{err}"
        );
        assert_eq!(db.instance_get("u1").unwrap().unwrap().power_state, 1);

        // With no task under way it applies, the vm_state still checked.
        db.instance_update("u1", &active).unwrap();
        let err = db
            .instance_update_expecting_task("u1", &shut_off, Some("stopped"), ExpectedTask::None)
            .unwrap_err();
        assert!(matches!(err, DbError::Conflict(_)), "{err}");
        let after = db
            .instance_update_expecting_task("u1", &shut_off, Some("active"), ExpectedTask::None)
            .unwrap();
        assert_eq!((after.vm_state.as_str(), after.power_state), ("active", 4));
    }

    #[test]
    fn only_the_host_a_build_is_placed_on_sends_it_back_to_scheduling() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        let spawning_on_node_1 = InstanceChanges {
            task_state: Some(Some("spawning".into())),
            host: Some(Some("node-1".into())),
            node: Some(Some("node-1".into())),
            ..Default::default()
        };
        db.instance_update("u1", &spawning_on_node_1).unwrap();

        assert!(matches!(
            db.instance_return_to_scheduling("u1", "node-2"),
            Err(DbError::Conflict(_))
        ));
        let unchanged = db.instance_get("u1").unwrap().unwrap();
        assert_eq!(
            (unchanged.task_state.as_deref(), unchanged.host.as_deref()),
            (Some("spawning"), Some("node-1"))
        );

        let back = db.instance_return_to_scheduling("u1", "node-1").unwrap();
        assert_eq!(
            (back.task_state.as_deref(), back.host, back.node),
            (Some("scheduling"), None, None)
        );
        // With no host, any refusal sends it back (a build that was never placed).
        db.instance_return_to_scheduling("u1", "node-3").unwrap();

        db.instance_set_error("u1", &fault("u1")).unwrap();
        assert!(matches!(
            db.instance_return_to_scheduling("u1", "node-1"),
            Err(DbError::Conflict(_))
        ));
        assert!(matches!(
            db.instance_return_to_scheduling("gone", "node-1"),
            Err(DbError::NotFound { .. })
        ));
    }

    #[test]
    fn set_error_records_fault_and_state() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        db.instance_set_error("u1", &fault("u1")).unwrap();
        let instance = db.instance_get("u1").unwrap().unwrap();
        assert_eq!(instance.vm_state, "error");
        assert_eq!(instance.task_state, None);
        let latest = db.instance_fault_latest("u1").unwrap().unwrap();
        assert_eq!(
            (latest.code, latest.message.as_str()),
            (500, "No valid host was found.")
        );

        let mut newer = fault("u1");
        newer.message = "second".to_string();
        newer.host = Some("node-2".to_string());
        db.instance_fault_create(&newer).unwrap();
        let latest = db.instance_fault_latest("u1").unwrap().unwrap();
        assert_eq!(latest.message, "second");
        assert_eq!(latest.host.as_deref(), Some("node-2"));
        assert!(db.instance_fault_latest("u2").unwrap().is_none());
    }

    #[test]
    fn destroy_soft_deletes() {
        let (_dir, db) = open_temp();
        let created = db
            .instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        db.instance_destroy("u1").unwrap();
        assert!(db.instance_get("u1").unwrap().is_none());
        assert!(db.instances_list(None).unwrap().is_empty());

        let mut conn = db.conn().unwrap();
        let row = instances::table
            .filter(instances::uuid.eq("u1"))
            .select(Instance::as_select())
            .first(&mut conn)
            .unwrap();
        assert_eq!(row.deleted, created.id);
        assert_eq!(row.vm_state, "deleted");
        assert_eq!(row.task_state, None);
        assert!(row.terminated_at.is_some());
        assert_eq!(row.terminated_at, row.deleted_at);
        // History outlives the instance.
        assert_eq!(db.instance_actions("u1").unwrap().len(), 1);

        let err = db.instance_destroy("u1").unwrap_err();
        assert!(
            matches!(
                err,
                DbError::NotFound {
                    kind: "instance",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_instance_is_not_found() {
        let (_dir, db) = open_temp();
        let err = db
            .instance_update("1234", &InstanceChanges::default())
            .unwrap_err();
        assert_eq!(err.to_string(), "instance 1234 could not be found");
        let err = db.instance_set_error("1234", &fault("1234")).unwrap_err();
        assert!(matches!(err, DbError::NotFound { .. }), "{err}");
        assert!(db.instance_fault_latest("1234").unwrap().is_none());
        let err = db.instance_destroy("1234").unwrap_err();
        assert!(matches!(err, DbError::NotFound { .. }), "{err}");
    }

    #[test]
    fn listing_by_project_host_and_uuids() {
        let (_dir, db) = open_temp();
        for (uuid, project) in [("a", "p1"), ("b", "p2"), ("c", "p1")] {
            db.instance_create(&new_instance(uuid, project), "req")
                .unwrap();
        }
        let uuids = |list: Vec<Instance>| list.into_iter().map(|i| i.uuid).collect::<Vec<_>>();
        assert_eq!(uuids(db.instances_list(None).unwrap()), ["c", "b", "a"]);
        assert_eq!(uuids(db.instances_list(Some("p1")).unwrap()), ["c", "a"]);
        assert!(db.instances_list(Some("p3")).unwrap().is_empty());

        let on_node = InstanceChanges {
            host: Some(Some("node-1".to_string())),
            ..Default::default()
        };
        db.instance_update("a", &on_node).unwrap();
        db.instance_update("b", &on_node).unwrap();
        db.instance_destroy("b").unwrap();
        assert_eq!(uuids(db.instances_by_host("node-1").unwrap()), ["a"]);
        assert!(db.instances_by_host("node-2").unwrap().is_empty());

        let wanted = ["c", "b", "zzz", "a"].map(String::from);
        assert_eq!(uuids(db.instances_by_uuids(&wanted).unwrap()), ["a", "c"]);
        assert!(db.instances_by_uuids(&[]).unwrap().is_empty());
    }

    #[test]
    fn action_start_and_finish() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("u1", "p1"), "req-1")
            .unwrap();
        db.instance_action_finish("u1", "req-1", None).unwrap();
        db.instance_action_start("u1", "reboot", "req-2", "bob", "p1")
            .unwrap();
        db.instance_action_finish("u1", "req-2", Some("Error"))
            .unwrap();
        let actions = db.instance_actions("u1").unwrap();
        let summary: Vec<_> = actions
            .iter()
            .map(|a| {
                (
                    a.action.as_str(),
                    a.finish_time.is_some(),
                    a.message.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [("create", true, None), ("reboot", true, Some("Error"))]
        );
        let err = db.instance_action_finish("u1", "req-2", None).unwrap_err();
        assert!(matches!(err, DbError::NotFound { .. }), "{err}");
    }

    #[test]
    fn concurrent_writers_all_succeed() {
        let (_dir, db) = open_temp();
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let db = db.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let uuid = format!("t{t}-{i}");
                        db.instance_create(&new_instance(&uuid, "p1"), &format!("req-{uuid}"))
                            .unwrap();
                        db.instance_update(
                            &uuid,
                            &InstanceChanges {
                                vm_state: Some("active".to_string()),
                                ..Default::default()
                            },
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let all = db.instances_list(None).unwrap();
        assert_eq!(all.len(), 100);
        assert!(all.iter().all(|i| i.vm_state == "active"));
    }
}
