//! Server creates, committed in groups: the creates that come in while one commit runs go
//! together in the next ([`Db::instances_create_together`]), one write transaction and one turn
//! at the database's write lock for a burst of `POST /servers`. Each still counts the project's
//! quota inside that transaction, after the creates before it, and gets its own answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use db::{Db, DbError, NewInstance, QuotaCreate, QuotaLimits};
use proto::service::GroupWriter;
use tokio::sync::{oneshot, Notify};

/// Creates in one transaction at most.
const MAX_CREATES_PER_COMMIT: usize = 128;

type Created = Result<db::Created, DbError>;

struct Job {
    new: Vec<NewInstance>,
    min_count: usize,
    request_id: String,
    limits: QuotaLimits,
    answer: oneshot::Sender<Created>,
}

impl Job {
    fn create(&self) -> QuotaCreate<'_> {
        QuotaCreate {
            new: &self.new,
            min_count: self.min_count,
            request_id: &self.request_id,
            defaults: &self.limits,
        }
    }
}

/// The API's writer of creates; its task ends when it is dropped.
pub(crate) struct Creates {
    writer: GroupWriter<Job>,
}

impl Creates {
    /// Starts the writing task on the current runtime.
    pub(crate) fn start(db: Db) -> Creates {
        let writer = GroupWriter::start(MAX_CREATES_PER_COMMIT, move |group| write(&db, group));
        Creates { writer }
    }

    /// [`Db::instances_create_within_quota`], with whatever other creates come meanwhile;
    /// `None` if the writing task is gone.
    pub(crate) async fn create(
        &self,
        new: Vec<NewInstance>,
        min_count: usize,
        request_id: String,
        limits: QuotaLimits,
    ) -> Option<Created> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            new,
            min_count,
            request_id,
            limits,
            answer,
        };
        self.writer.send(job).ok()?;
        answered.await.ok()
    }
}

fn write(db: &Db, group: Vec<Job>) {
    let creates: Vec<QuotaCreate<'_>> = group.iter().map(Job::create).collect();
    match db.instances_create_together(&creates) {
        Ok(outcomes) => {
            for (job, outcome) in group.into_iter().zip(outcomes) {
                let _ = job.answer.send(outcome);
            }
        }
        // The transaction itself failed (a full disk, a lost connection): each alone, so each
        // request gets its own answer.
        Err(_) => {
            for job in group {
                let create = job.create();
                let alone = db.instances_create_within_quota(
                    create.new,
                    create.min_count,
                    create.request_id,
                    create.defaults,
                );
                let _ = job.answer.send(alone);
            }
        }
    }
}

/// The creates answered `202` whose `build_instances` cast is still on its way: a stopping API
/// waits for them (see [`Casting::drained`]), so an instance it answered for is not left in
/// BUILD, until the conductor's stuck-build check, because the API went away before its cast.
#[derive(Default)]
pub(crate) struct Casting {
    count: AtomicUsize,
    none_left: Notify,
}

/// One create's cast in flight; dropping it ends it.
pub(crate) struct CastInFlight(Arc<Casting>);

impl Casting {
    pub(crate) fn start(self: &Arc<Self>) -> CastInFlight {
        self.count.fetch_add(1, Ordering::SeqCst);
        CastInFlight(self.clone())
    }

    /// Resolves once no cast is in flight.
    pub(crate) async fn drained(&self) {
        loop {
            // Made before the look, so a last cast ending in between still wakes it.
            let ended = self.none_left.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for CastInFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `drained` resolves within a moment (it is either at once or never here).
    async fn drains(casting: &Casting) -> bool {
        tokio::time::timeout(Duration::from_millis(50), casting.drained())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_stop_waits_for_the_last_cast_only() {
        let casting = Arc::new(Casting::default());
        assert!(drains(&casting).await, "nothing in flight");
        let first = casting.start();
        let second = casting.start();
        assert!(!drains(&casting).await);
        drop(first);
        assert!(!drains(&casting).await, "one still in flight");

        let waiting = tokio::spawn({
            let casting = casting.clone();
            async move { casting.drained().await }
        });
        tokio::task::yield_now().await;
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter woke")
            .expect("joined");
        assert!(drains(&casting).await);
    }
}
