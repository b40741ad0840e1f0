//! Group commit: one sled flush makes every deposit written before it durable.
//!
//! The mailbox service writes a round of deposits into sled (in memory) and hands the finished
//! answers to the flusher as one batch of [`Job`]s. The flusher takes every batch waiting in its
//! channel, runs one `flush_async`, and only then releases the answers, so `Stored` always means
//! "on disk" while a burst of deposits costs one flush instead of one each.

use std::time::Instant;

use kith_protocol::mailbox::Response;
use kith_protocol::Reject;
use tokio::sync::{mpsc, oneshot};

use super::service::Outcome;
use crate::metrics::Metrics;

/// Most batches released by one flush; the rest wait for the next one.
pub const MAX_BATCHES_PER_FLUSH: usize = 1_024;

/// Capacity of the flusher's channel, in batches (the mailbox service waits when it is full).
pub const CHANNEL_CAPACITY: usize = 1_024;

/// An answer waiting for the data it reports to be durable.
#[derive(Debug)]
pub struct Job {
    /// Where the answer goes.
    pub reply: oneshot::Sender<Outcome>,
    /// The answer to send once flushed.
    pub outcome: Outcome,
}

/// The answers of one round of the mailbox service.
pub type Jobs = Vec<Job>;

/// Runs until every sender of `jobs` is gone, flushing once for all the batches waiting.
pub async fn run(db: sled::Db, mut jobs: mpsc::Receiver<Jobs>, metrics: Metrics) {
    let mut batches = Vec::with_capacity(MAX_BATCHES_PER_FLUSH);
    while jobs.recv_many(&mut batches, MAX_BATCHES_PER_FLUSH).await > 0 {
        let started = Instant::now();
        let result = db.flush_async().await;
        let took = started.elapsed();
        metrics.flush_seconds.observe(took.as_secs_f64());
        metrics.last_flush.record(took);
        if let Err(e) = &result {
            let jobs: usize = batches.iter().map(Vec::len).sum();
            tracing::error!(error = %e, jobs, "mailbox flush failed");
        }
        for job in batches.drain(..).flatten() {
            let outcome = match &result {
                Ok(_) => {
                    if matches!(job.outcome.response, Response::Stored { .. }) {
                        metrics.deposits.inc();
                    }
                    job.outcome
                }
                Err(_) => {
                    metrics.reject(&Reject::StoreFailed);
                    Outcome::reply(Response::rejected(
                        job.outcome.response.req_id(),
                        Reject::StoreFailed,
                    ))
                }
            };
            // The requester may have gone away; its answer is then moot.
            let _ = job.reply.send(outcome);
        }
    }
}
