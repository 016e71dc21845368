//! [`Kept`]: a statement whose SQL is one of a few, kept prepared on its connection.
//!
//! Diesel prepares every UPDATE afresh, and every query with an `IN` list or (on SQLite) an
//! insert with defaulted columns, because their SQL text may vary with the values: caching each
//! variant could grow the cache without bound. For the statements on the hot path of a build
//! that growth is bounded (a changeset's SQL depends only on which of its fields are set), and
//! preparing them was a quarter of the conductor's CPU under load. A `Kept` query is cached
//! under its SQL text, so each variant is prepared once per connection.
//!
//! Only when it is loaded, though: `execute` hands the query on by reference (the
//! MultiConnection does, and so does `PgConnection`), and a `&Kept` answers
//! `is_safe_to_cache_prepared` by walking the statement, which every UPDATE marks unsafe. So an
//! UPDATE or DELETE that is kept returns its rows' ids and runs through [`Kept::changed`], which
//! loads them; `execute` would quietly prepare it afresh again.

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::query_dsl::{LoadQuery, RunQueryDsl};
use diesel::QueryResult;

/// `query`, cached under its SQL text. Only for a query whose SQL takes few forms (not an `IN`
/// list of any length): every form stays prepared as long as its connection lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kept<Q>(pub(crate) Q);

impl<Q, DB> QueryFragment<DB> for Kept<Q>
where
    Q: QueryFragment<DB>,
    DB: Backend,
{
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &DB) -> QueryResult<bool> {
        Ok(true)
    }
}

// No static id: the cache is then keyed by the SQL text, so each form gets its own statement.
impl<Q> QueryId for Kept<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Kept<Q> {
    type SqlType = Q::SqlType;
}

impl<Q, Conn> RunQueryDsl<Conn> for Kept<Q> {}

impl<Q> Kept<Q> {
    /// Runs an UPDATE or DELETE that returns one id per row it changed (`.returning(t::id)`)
    /// and says how many rows that was: `execute`, but with the statement kept (see above).
    pub(crate) fn changed<'q, Conn>(self, conn: &mut Conn) -> QueryResult<usize>
    where
        Self: LoadQuery<'q, Conn, i64>,
    {
        Ok(self.load::<i64>(conn)?.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use diesel::connection::{Connection, Instrumentation, InstrumentationEvent};

    use crate::instances::{destroy, update_expecting_task, ExpectedTask};
    use crate::testing::{new_instance, open_temp};
    use crate::InstanceChanges;

    /// The SQL of every statement the connection prepared and kept.
    #[derive(Clone, Default)]
    struct KeptStatements(Arc<Mutex<Vec<String>>>);

    impl KeptStatements {
        /// The UPDATEs among them, in the order they were kept.
        fn updates(&self) -> Vec<String> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|sql| sql.starts_with("UPDATE"))
                .cloned()
                .collect()
        }
    }

    impl Instrumentation for KeptStatements {
        fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
            if let InstrumentationEvent::CacheQuery { sql, .. } = event {
                if let Ok(mut kept) = self.0.lock() {
                    kept.push(sql.to_string());
                }
            }
        }
    }

    #[test]
    fn each_form_of_a_kept_update_is_prepared_once_and_writes_what_it_was_given() {
        let (_dir, db) = open_temp();
        for uuid in ["a", "b", "c"] {
            db.instance_create(&new_instance(uuid, "p"), "req").unwrap();
        }
        let kept = KeptStatements::default();
        let mut conn = db.conn().unwrap();
        conn.set_instrumentation(kept.clone());
        let to_power = |power_state| InstanceChanges {
            power_state: Some(power_state),
            ..Default::default()
        };
        let to_state = |vm_state: &str| InstanceChanges {
            vm_state: Some(vm_state.to_string()),
            task_state: Some(None),
            ..Default::default()
        };
        // Two forms, three instances each way round: each form prepared once, and a statement
        // of one form never runs the other's.
        for (uuid, power_state) in [("a", 1), ("b", 4), ("c", 1)] {
            let updated = update_expecting_task(
                &mut conn,
                uuid,
                &to_power(power_state),
                None,
                ExpectedTask::Any,
            )
            .unwrap();
            assert_eq!(
                (updated.power_state, updated.vm_state.as_str()),
                (power_state, "building")
            );
        }
        for (uuid, vm_state) in [("a", "active"), ("b", "stopped"), ("c", "active")] {
            let updated = update_expecting_task(
                &mut conn,
                uuid,
                &to_state(vm_state),
                None,
                ExpectedTask::Any,
            )
            .unwrap();
            assert_eq!(updated.vm_state, vm_state);
            assert_eq!(updated.task_state, None);
        }
        let updates = kept.updates();
        assert_eq!(updates.len(), 2, "one kept statement per form: {updates:?}");
        // What each one sets (RETURNING names every column).
        let sets = |sql: &str| {
            let after_set = sql.split(" SET ").nth(1).unwrap_or_default();
            after_set
                .split(" WHERE ")
                .next()
                .unwrap_or_default()
                .to_string()
        };
        let (first, second) = (sets(&updates[0]), sets(&updates[1]));
        assert!(
            first.contains("power_state") && !first.contains("vm_state"),
            "{first}"
        );
        assert!(
            second.contains("vm_state") && second.contains("task_state"),
            "{second}"
        );
        let b = db.instance_get("b").unwrap().unwrap();
        assert_eq!((b.vm_state.as_str(), b.power_state), ("stopped", 4));
    }

    #[test]
    fn a_kept_update_run_for_its_count_is_prepared_once_and_counts_its_rows() {
        let (_dir, db) = open_temp();
        for uuid in ["a", "b"] {
            db.instance_create(&new_instance(uuid, "p"), "req").unwrap();
        }
        let kept = KeptStatements::default();
        let mut conn = db.conn().unwrap();
        conn.set_instrumentation(kept.clone());
        destroy(&mut conn, "a").unwrap();
        destroy(&mut conn, "b").unwrap();
        // Nothing left to change: the count is 0, which destroy reports as not found.
        assert!(destroy(&mut conn, "a").is_err());
        let updates = kept.updates();
        // A statement that is not cached is prepared afresh each time and never reported. The
        // instance's update and the release of its fixed IP: each prepared once, then kept.
        let kept_once = |table: &str| {
            updates
                .iter()
                .filter(|sql| {
                    // Quoted with backquotes on SQLite, double quotes on PostgreSQL.
                    let plain = sql.replace(['`', '"'], "");
                    plain.starts_with(&format!("UPDATE {table} "))
                })
                .count()
                == 1
        };
        assert!(
            kept_once("instances") && kept_once("fixed_ips") && updates.len() == 2,
            "{updates:?}"
        );
        assert_eq!(db.instance_get("a").unwrap(), None);
    }
}
