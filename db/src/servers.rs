//! What the compute API asks of instances beyond the spine: filtered and paged lists, quota-
//! checked creation, and the start of a user action (stop, start, reboot) as one guarded step.

use std::collections::HashMap;

use diesel::dsl::{count_star, sql};
use diesel::prelude::*;
use diesel::sql_types::BigInt;

use crate::kept::Kept;
use crate::schema::{instance_actions, instances, quotas};
use crate::{now, Db, DbError, Instance, NewInstance, Result};
use crate::{AnyConnection, DbBackend};

/// Which instances a list shows. Every field narrows; `None` leaves it open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFilter {
    pub project_id: Option<String>,
    pub host: Option<String>,
    /// Any of these vm_states.
    pub vm_states: Option<Vec<String>>,
    pub task_state: Option<Option<String>>,
}

/// The limits a project's servers must fit in (Nova's `instances`, `cores` and `ram` quotas);
/// `-1` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    pub instances: i64,
    pub cores: i64,
    pub ram: i64,
}

/// What a project's live servers hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaUsage {
    pub instances: i64,
    pub cores: i64,
    pub ram: i64,
}

/// The quota a create went over, in the terms of Nova's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub resource: &'static str,
    pub requested: i64,
    pub used: i64,
    pub limit: i64,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Quota exceeded for {}: Requested {}, but already used {} of {} {}",
            self.resource, self.requested, self.used, self.limit, self.resource
        )
    }
}

/// How many of the instances asked for fit: the largest `n` with `min <= n <= max` whose
/// instances, cores and RAM stay within `limits`, or the first quota even `min` goes over.
pub fn instances_that_fit(
    limits: &QuotaLimits,
    usage: &QuotaUsage,
    per_instance: (i64, i64),
    min: i64,
    max: i64,
) -> std::result::Result<i64, QuotaExceeded> {
    let (vcpus, memory_mb) = per_instance;
    let room = |limit: i64, used: i64, each: i64| -> i64 {
        if limit < 0 || each <= 0 {
            i64::MAX
        } else {
            (limit - used).max(0) / each
        }
    };
    let fits = room(limits.instances, usage.instances, 1)
        .min(room(limits.cores, usage.cores, vcpus))
        .min(room(limits.ram, usage.ram, memory_mb));
    if fits >= min {
        return Ok(fits.min(max));
    }
    // Name the first resource that even `min` goes over, as Nova does.
    let checks = [
        ("instances", limits.instances, usage.instances, min),
        ("cores", limits.cores, usage.cores, min * vcpus),
        ("ram", limits.ram, usage.ram, min * memory_mb),
    ];
    let (resource, limit, used, requested) = checks
        .into_iter()
        .find(|(_, limit, used, requested)| *limit >= 0 && used + requested > *limit)
        .unwrap_or(checks[0]);
    Err(QuotaExceeded {
        resource,
        requested,
        used,
        limit,
    })
}

fn usage_of(conn: &mut AnyConnection, project_id: &str) -> QueryResult<QuotaUsage> {
    // Summed by the database: loading the rows cost a third of the API's CPU once a project
    // held a few thousand instances (an unlimited quota). SUM of a BIGINT is NUMERIC on
    // PostgreSQL, hence the cast; an empty project sums to NULL, hence the COALESCE.
    let (instances, cores, ram) = direct!(conn, c => {
        Kept(
            instances::table
                .filter(instances::deleted.eq(0))
                .filter(instances::project_id.eq(project_id))
                .select((
                    count_star(),
                    sql::<BigInt>("CAST(COALESCE(SUM(vcpus), 0) AS BIGINT)"),
                    sql::<BigInt>("CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT)"),
                )),
        )
        .get_result::<(i64, i64, i64)>(c)
    })?;
    Ok(QuotaUsage {
        instances,
        cores,
        ram,
    })
}

/// What a create made: its instances, or the quota it would have gone over.
pub type Created = std::result::Result<Vec<Instance>, QuotaExceeded>;

/// One create for [`Db::instances_create_together`]: the arguments of
/// [`Db::instances_create_within_quota`].
#[derive(Debug, Clone, Copy)]
pub struct QuotaCreate<'a> {
    pub new: &'a [NewInstance],
    pub min_count: usize,
    pub request_id: &'a str,
    pub defaults: &'a QuotaLimits,
}

/// What the creates of one transaction know their projects to hold so far: each project is
/// summed once, then [`instances_create_together`](Db::instances_create_together) adds what
/// each create wrote, rather than summing the project's rows again for each create.
type KnownUsage = HashMap<String, QuotaUsage>;

/// Adds instances a create wrote to what their project is known to hold.
fn add_created(known: &mut KnownUsage, created: &[Instance]) {
    for instance in created {
        if let Some(usage) = known.get_mut(&instance.project_id) {
            usage.instances += 1;
            usage.cores += instance.vcpus;
            usage.ram += instance.memory_mb;
        }
    }
}

fn create_within_quota(
    conn: &mut AnyConnection,
    create: &QuotaCreate<'_>,
    known: &mut KnownUsage,
) -> Result<Created> {
    let QuotaCreate {
        new,
        min_count,
        request_id,
        defaults,
    } = *create;
    for instance in new {
        crate::check_json_object("scheduler_hints", &instance.scheduler_hints)?;
        crate::check_json_object("metadata", &instance.metadata)?;
        crate::check_json_object("flavor_snapshot", &instance.flavor_snapshot)?;
    }
    let Some(first) = new.first() else {
        return Ok(Ok(Vec::new()));
    };
    let limits = limits_of(conn, &first.project_id, defaults)?;
    // The rows summed are there whatever becomes of this create, so the sum is kept at once.
    let usage = match known.get(&first.project_id) {
        Some(usage) => *usage,
        None => {
            let usage = usage_of(conn, &first.project_id)?;
            known.insert(first.project_id.clone(), usage);
            usage
        }
    };
    match instances_that_fit(
        &limits,
        &usage,
        (first.vcpus, first.memory_mb),
        min_count as i64,
        new.len() as i64,
    ) {
        Ok(fits) => crate::instances::insert_with_actions(conn, &new[..fits as usize], request_id)
            .map(Ok)
            .map_err(DbError::from),
        Err(exceeded) => Ok(Err(exceeded)),
    }
}

fn limits_of(
    conn: &mut AnyConnection,
    project_id: &str,
    defaults: &QuotaLimits,
) -> QueryResult<QuotaLimits> {
    let overrides: Vec<(String, i64)> = direct!(conn, c => {
        quotas::table
            .filter(quotas::project_id.eq(project_id))
            .select((quotas::resource, quotas::hard_limit))
            .load(c)
    })?;
    let mut limits = *defaults;
    for (resource, limit) in overrides {
        match resource.as_str() {
            "instances" => limits.instances = limit,
            "cores" => limits.cores = limit,
            "ram" => limits.ram = limit,
            _ => {}
        }
    }
    Ok(limits)
}

impl Db {
    /// Instances matching `filter`, newest first (Nova's default sort: created_at, then id).
    pub fn instances_query(&self, filter: &InstanceFilter) -> Result<Vec<Instance>> {
        let mut conn = self.conn()?;
        // Direct: a server list polled while thousands build reads whole rows by the hundred.
        Ok(direct!(&mut *conn, c => {
            let mut query = instances::table
                .filter(instances::deleted.eq(0))
                .order((instances::created_at.desc(), instances::id.desc()))
                .select(Instance::as_select())
                .into_boxed();
            if let Some(project_id) = &filter.project_id {
                query = query.filter(instances::project_id.eq(project_id.clone()));
            }
            if let Some(host) = &filter.host {
                query = query.filter(instances::host.eq(host.clone()));
            }
            if let Some(states) = &filter.vm_states {
                query = query.filter(instances::vm_state.eq_any(states.clone()));
            }
            match &filter.task_state {
                Some(Some(task)) => query = query.filter(instances::task_state.eq(task.clone())),
                Some(None) => query = query.filter(instances::task_state.is_null()),
                None => {}
            }
            query.load(c)
        })?)
    }

    /// The instance with this uuid, live or deleted (its action history outlives it).
    pub fn instance_get_with_deleted(&self, uuid: &str) -> Result<Option<Instance>> {
        let mut conn = self.conn()?;
        Ok(instances::table
            .filter(instances::uuid.eq(uuid))
            .select(Instance::as_select())
            .first(&mut conn)
            .optional()?)
    }

    /// The project's quota limits: `defaults` with the project's own overrides applied.
    pub fn quota_limits(&self, project_id: &str, defaults: &QuotaLimits) -> Result<QuotaLimits> {
        let mut conn = self.conn()?;
        Ok(limits_of(&mut conn, project_id, defaults)?)
    }

    /// What the project's live instances hold.
    pub fn quota_usage(&self, project_id: &str) -> Result<QuotaUsage> {
        let mut conn = self.conn()?;
        Ok(usage_of(&mut conn, project_id)?)
    }

    /// Sets (or, with `None`, removes) a project's own limit for `instances`, `cores` or `ram`.
    pub fn quota_set(&self, project_id: &str, resource: &str, limit: Option<i64>) -> Result<()> {
        if !matches!(resource, "instances" | "cores" | "ram") {
            return Err(DbError::NotFound {
                kind: "quota resource",
                id: resource.to_string(),
            });
        }
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            diesel::delete(
                quotas::table
                    .filter(quotas::project_id.eq(project_id))
                    .filter(quotas::resource.eq(resource)),
            )
            .execute(conn)?;
            if let Some(limit) = limit {
                diesel::insert_into(quotas::table)
                    .values((
                        quotas::project_id.eq(project_id),
                        quotas::resource.eq(resource),
                        quotas::hard_limit.eq(limit),
                        quotas::created_at.eq(now()),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
    }

    /// Creates as many of `new` (all of one project and flavor) as the project's quota allows,
    /// at least `min_count`, with their `create` actions, in one transaction: the check and the
    /// insert cannot be split by a concurrent create. `Ok(Err(..))` when even `min_count` does
    /// not fit; nothing is written then.
    pub fn instances_create_within_quota(
        &self,
        new: &[NewInstance],
        min_count: usize,
        request_id: &str,
        defaults: &QuotaLimits,
    ) -> Result<Created> {
        let create = QuotaCreate {
            new,
            min_count,
            request_id,
            defaults,
        };
        let mut conn = self.writer()?;
        // One transaction: what fits is counted and written while no other create can write.
        conn.write_transaction(|conn| create_within_quota(conn, &create, &mut KnownUsage::new()))
    }

    /// Several creates in one transaction, in order, each as
    /// [`Db::instances_create_within_quota`] in a savepoint of its own: a later one counts what
    /// the earlier ones created. The API commits together the creates that came in while its
    /// previous commit ran. `Err` only when the transaction itself failed, and then nothing
    /// was written.
    pub fn instances_create_together(
        &self,
        creates: &[QuotaCreate<'_>],
    ) -> Result<Vec<Result<Created>>> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let mut known = KnownUsage::new();
            Ok(creates
                .iter()
                .map(|create| {
                    let created =
                        conn.transaction(|conn| create_within_quota(conn, create, &mut known));
                    // Counted once its savepoint is kept: a create that failed holds nothing.
                    if let Ok(Ok(made)) = &created {
                        add_created(&mut known, made);
                    }
                    created
                })
                .collect())
        })
    }

    /// Starts a user action on an instance: only when its vm_state is one of `allowed_vm_states`
    /// and no other task runs on it (or one of `replaceable_task_states`, as a hard reboot takes
    /// over a stuck soft one), sets `task_state` and records the action, together.
    /// [`DbError::Conflict`] says why not.
    #[allow(clippy::too_many_arguments)]
    pub fn instance_begin_task(
        &self,
        uuid: &str,
        allowed_vm_states: &[&str],
        replaceable_task_states: &[&str],
        task_state: &str,
        action: &str,
        request_id: &str,
        user_id: &str,
        project_id: &str,
    ) -> Result<Instance> {
        let mut conn = self.writer()?;
        conn.write_transaction(|conn| {
            let current: Option<(String, Option<String>)> = instances::table
                .filter(instances::deleted.eq(0))
                .filter(instances::uuid.eq(uuid))
                .select((instances::vm_state, instances::task_state))
                .first(conn)
                .optional()?;
            let Some((vm_state, running)) = current else {
                return Err(DbError::NotFound {
                    kind: "instance",
                    id: uuid.to_string(),
                });
            };
            if let Some(running) =
                running.filter(|t| !replaceable_task_states.contains(&t.as_str()))
            {
                return Err(DbError::Conflict(format!(
                    "Cannot '{action}' instance {uuid} while it is in task_state {running}"
                )));
            }
            if !allowed_vm_states.contains(&vm_state.as_str()) {
                return Err(DbError::Conflict(format!(
                    "Cannot '{action}' instance {uuid} while it is in vm_state {vm_state}"
                )));
            }
            let instance = diesel::update(
                instances::table
                    .filter(instances::deleted.eq(0))
                    .filter(instances::uuid.eq(uuid)),
            )
            .set((
                instances::task_state.eq(task_state),
                instances::updated_at.eq(now()),
            ))
            .returning(<Instance as Selectable<DbBackend>>::construct_selection())
            .get_result(conn)?;
            diesel::insert_into(instance_actions::table)
                .values((
                    instance_actions::action.eq(action),
                    instance_actions::instance_uuid.eq(uuid),
                    instance_actions::request_id.eq(request_id),
                    instance_actions::user_id.eq(user_id),
                    instance_actions::project_id.eq(project_id),
                    instance_actions::start_time.eq(now()),
                ))
                .execute(conn)?;
            Ok(instance)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{new_instance, open_temp};

    const LIMITS: QuotaLimits = QuotaLimits {
        instances: 10,
        cores: 20,
        ram: 51200,
    };

    #[test]
    fn the_first_quota_min_count_goes_over_is_named() {
        let used = QuotaUsage {
            instances: 9,
            cores: 9,
            ram: 9 * 512,
        };
        assert_eq!(instances_that_fit(&LIMITS, &used, (1, 512), 1, 5), Ok(1));
        let err = instances_that_fit(&LIMITS, &used, (1, 512), 2, 5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Quota exceeded for instances: Requested 2, but already used 9 of 10 instances"
        );
        let err = instances_that_fit(&LIMITS, &QuotaUsage::default(), (8, 512), 3, 3).unwrap_err();
        assert_eq!((err.resource, err.requested, err.used), ("cores", 24, 0));
        let unlimited = QuotaLimits {
            instances: -1,
            cores: -1,
            ram: -1,
        };
        assert_eq!(
            instances_that_fit(&unlimited, &used, (64, 1 << 20), 1, 100),
            Ok(100)
        );
    }

    #[test]
    fn usage_sums_the_live_instances_of_the_project_alone() {
        let (_dir, db) = open_temp();
        assert_eq!(db.quota_usage("p").unwrap(), QuotaUsage::default());
        let sized = |uuid: &str, project: &str, vcpus, memory_mb| NewInstance {
            vcpus,
            memory_mb,
            ..new_instance(uuid, project)
        };
        for instance in [
            sized("a", "p", 2, 2048),
            sized("b", "p", 4, 8192),
            sized("c", "p", 1, 512),
            sized("d", "q", 8, 16384),
        ] {
            db.instance_create(&instance, "req").unwrap();
        }
        db.instance_destroy("c").unwrap();
        let used = db.quota_usage("p").unwrap();
        assert_eq!((used.instances, used.cores, used.ram), (2, 6, 10240));
    }

    #[test]
    fn creates_committed_together_count_each_other_against_the_quota() {
        let (_dir, db) = open_temp();
        let limits = QuotaLimits {
            instances: 2,
            cores: 20,
            ram: 51200,
        };
        let one = |uuid: &str| vec![new_instance(uuid, "p")];
        let (a, b, c) = (one("a"), one("b"), one("c"));
        let mut bad = one("bad");
        bad[0].metadata = "[1]".into();
        let create = |new| QuotaCreate {
            new,
            min_count: 1,
            request_id: "req-1",
            defaults: &limits,
        };
        let outcomes = db
            .instances_create_together(&[create(&a), create(&bad), create(&b), create(&c)])
            .unwrap();
        assert!(matches!(&outcomes[0], Ok(Ok(made)) if made.len() == 1));
        assert!(matches!(outcomes[1], Err(DbError::Json(_))));
        assert!(matches!(&outcomes[2], Ok(Ok(made)) if made.len() == 1));
        assert!(matches!(&outcomes[3], Ok(Err(exceeded)) if exceeded.resource == "instances"));
        let live: Vec<_> = ["a", "bad", "b", "c"]
            .into_iter()
            .filter(|uuid| db.instance_get(uuid).unwrap().is_some())
            .collect();
        assert_eq!(live, ["a", "b"]);

        // A create whose insert fails (a uuid taken) holds nothing: the one after it fits.
        let (_dir, db) = open_temp();
        let outcomes = db
            .instances_create_together(&[create(&a), create(&a), create(&b)])
            .unwrap();
        assert!(matches!(&outcomes[0], Ok(Ok(made)) if made.len() == 1));
        assert!(outcomes[1].is_err(), "{:?}", outcomes[1]);
        assert!(matches!(&outcomes[2], Ok(Ok(made)) if made.len() == 1));
    }

    #[test]
    fn a_create_takes_what_fits_and_writes_nothing_when_min_does_not() {
        let (_dir, db) = open_temp();
        let limits = QuotaLimits {
            instances: 3,
            cores: 20,
            ram: 51200,
        };
        let rows: Vec<_> = (0..5)
            .map(|i| new_instance(&format!("u-{i}"), "p"))
            .collect();
        let made = db
            .instances_create_within_quota(&rows, 1, "req-1", &limits)
            .unwrap()
            .unwrap();
        assert_eq!(made.len(), 3);
        let more: Vec<_> = (5..7)
            .map(|i| new_instance(&format!("u-{i}"), "p"))
            .collect();
        let refused = db
            .instances_create_within_quota(&more, 1, "req-2", &limits)
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.resource, "instances");
        assert_eq!(db.quota_usage("p").unwrap().instances, 3);
        // Another project has its own count; an override raises this one's.
        db.quota_set("p", "instances", Some(4)).unwrap();
        assert_eq!(db.quota_limits("p", &limits).unwrap().instances, 4);
        let made = db
            .instances_create_within_quota(&more, 1, "req-3", &limits)
            .unwrap()
            .unwrap();
        assert_eq!(made.len(), 1);
        assert!(db.quota_set("p", "floating_ips", Some(1)).is_err());
    }

    #[test]
    fn racing_creates_never_pass_the_quota_together() {
        let (_dir, db) = open_temp();
        let limits = QuotaLimits {
            instances: 5,
            cores: -1,
            ram: -1,
        };
        let racers: Vec<_> = (0..20)
            .map(|i| {
                let db = db.clone();
                std::thread::spawn(move || {
                    let row = new_instance(&format!("race-{i}"), "p");
                    db.instances_create_within_quota(&[row], 1, "req", &limits)
                        .expect("no database error")
                        .is_ok()
                })
            })
            .collect();
        let created = racers
            .into_iter()
            .map(|r| r.join().expect("racer"))
            .filter(|ok| *ok)
            .count();
        assert_eq!(created, 5);
        assert_eq!(db.quota_usage("p").unwrap().instances, 5);
    }

    #[test]
    fn a_task_begins_only_from_an_allowed_state_and_records_its_action() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("u-1", "p"), "req-0")
            .unwrap();
        let refused = db
            .instance_begin_task(
                "u-1",
                &["active"],
                &[],
                "powering-off",
                "stop",
                "req-1",
                "u",
                "p",
            )
            .unwrap_err();
        assert!(matches!(refused, DbError::Conflict(_)), "{refused}");
        db.instance_update(
            "u-1",
            &crate::InstanceChanges {
                vm_state: Some("active".into()),
                task_state: Some(None),
                ..Default::default()
            },
        )
        .unwrap();
        let begun = db
            .instance_begin_task(
                "u-1",
                &["active"],
                &[],
                "powering-off",
                "stop",
                "req-1",
                "u",
                "p",
            )
            .unwrap();
        assert_eq!(begun.task_state.as_deref(), Some("powering-off"));
        // A second action while the first runs is a conflict.
        assert!(matches!(
            db.instance_begin_task(
                "u-1",
                &["active"],
                &[],
                "rebooting",
                "reboot",
                "req-2",
                "u",
                "p"
            ),
            Err(DbError::Conflict(_))
        ));
        // A hard reboot may take over a task it names.
        let taken = db
            .instance_begin_task(
                "u-1",
                &["active"],
                &["powering-off"],
                "rebooting_hard",
                "reboot",
                "req-3",
                "u",
                "p",
            )
            .unwrap();
        assert_eq!(taken.task_state.as_deref(), Some("rebooting_hard"));
        let actions = db.instance_actions("u-1").unwrap();
        assert_eq!(
            actions
                .iter()
                .map(|a| a.action.as_str())
                .collect::<Vec<_>>(),
            ["create", "stop", "reboot"]
        );
        assert!(matches!(
            db.instance_begin_task("nope", &["active"], &[], "x", "stop", "r", "u", "p"),
            Err(DbError::NotFound { .. })
        ));
    }

    #[test]
    fn filters_narrow_and_deleted_instances_stay_readable_by_uuid() {
        let (_dir, db) = open_temp();
        db.instance_create(&new_instance("a", "p"), "r").unwrap();
        db.instance_create(&new_instance("b", "q"), "r").unwrap();
        let only_p = db
            .instances_query(&InstanceFilter {
                project_id: Some("p".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(only_p.len(), 1);
        let building = db
            .instances_query(&InstanceFilter {
                vm_states: Some(vec!["building".into()]),
                task_state: Some(Some("scheduling".into())),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(building.len(), 2);
        db.instance_destroy("a").unwrap();
        assert!(db.instance_get("a").unwrap().is_none());
        assert!(db.instance_get_with_deleted("a").unwrap().is_some());
    }

    #[test]
    fn a_projects_usage_is_read_from_an_index_alone() {
        use diesel::sql_types::Text;
        use diesel::RunQueryDsl;

        #[derive(diesel::QueryableByName)]
        struct Step {
            #[diesel(sql_type = Text)]
            detail: String,
        }
        // SQLite's plan, whatever database the rest of the suite runs on: the same statement
        // as `usage_of`'s.
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("zova.sqlite").to_str().unwrap()).unwrap();
        let mut conn = db.conn().unwrap();
        let AnyConnection::Sqlite(c) = &mut *conn else {
            panic!("a SQLite file opens a SQLite connection");
        };
        let plan: Vec<Step> = diesel::sql_query(
            "EXPLAIN QUERY PLAN SELECT COUNT(*), CAST(COALESCE(SUM(vcpus), 0) AS BIGINT), \
             CAST(COALESCE(SUM(memory_mb), 0) AS BIGINT) FROM instances \
             WHERE deleted = 0 AND project_id = 'p'",
        )
        .load(c)
        .unwrap();
        let details: Vec<&str> = plan.iter().map(|s| s.detail.as_str()).collect();
        assert!(
            details
                .iter()
                .any(|d| d.contains("COVERING INDEX instances_project_usage_idx")),
            "{details:?}"
        );
    }
}
