//! Server creates, committed in groups: the creates that come in while one commit runs go
//! together in the next ([`Db::instances_create_together`]), one write transaction and one turn
//! at the database's write lock for a burst of `POST /servers`. Each still counts the project's
//! quota inside that transaction, after the creates before it, and gets its own answer.

use db::{Db, DbError, NewInstance, QuotaCreate, QuotaLimits};
use proto::service::GroupWriter;
use tokio::sync::oneshot;

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
