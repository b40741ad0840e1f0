//! The mailbox service: one task that owns the [`Store`] and answers `/kith/mailbox/1` requests.
//!
//! Flow: the swarm task receives a request, hands it here with [`Handle::try_request`] (a full
//! queue is answered `Busy` at once, so the swarm never waits), and keeps the libp2p response
//! channel itself. This task works in rounds: it takes every request waiting in its queue (up to
//! [`MAX_ROUND`]), verifies the signatures of the round's deposits in parallel on blocking
//! threads (ed25519 verification is most of a deposit's CPU time; senders' decoded keys come
//! from a bounded [cache](super::keys)), then validates and applies the
//! requests one by one, in arrival order:
//!
//! - `Deposit`: require a valid signature, a peer recipient and an unexpired envelope, check the
//!   depositor's rate and the recipient's quota, store (deduplicated by `(from, id)`), then pass
//!   the `Stored` answer to the [flusher](super::flusher), which releases it after the flush.
//!   All of a round's answers go to the flusher together, so one flush covers the whole round.
//!   A newly stored envelope comes back with a [`Push`] so the swarm can deliver it at
//!   once to a connected recipient; when that recipient accepts, [`Handle::try_delivered`]
//!   removes the entry.
//! - `Fetch` and `Ack`: always on the mailbox of the connection's own peer id.
//!
//! A periodic purge drops entries past their retention deadline. The task stops when every
//! [`Handle`] is gone, and flushes the store one last time.

use std::time::Duration;

use kith_protocol::envelope::SenderKey;
use kith_protocol::limits::{MAX_BODY_BYTES, MAX_FETCH_BATCH, MAX_IDS_PER_BATCH};
use kith_protocol::mailbox::{Request, Response, MAX_FRAME_BYTES};
use kith_protocol::{Destination, Envelope, PeerId, Reject, VerifyError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::flusher::{Job, Jobs};
use super::rate::RateLimiter;
use super::store::{AckError, Claim, DepositError, Staged, Store, Usage};
use super::waits::{Verdict, Waits};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::queues::{queues, Receivers, Senders};
use crate::quiet::Warnings;
use kith_protocol::keys::Keys;

/// An envelope to push to its connected recipient.
#[derive(Debug, Clone)]
pub struct Push {
    /// Whose mailbox holds it.
    pub recipient: PeerId,
    /// Its sequence number there.
    pub seq: u64,
    /// The envelope.
    pub envelope: Envelope,
}

/// The answer to one request, and what to push afterwards.
#[derive(Debug)]
pub struct Outcome {
    /// The response for the requester.
    pub response: Response,
    /// A newly stored envelope to push to its recipient, if connected.
    pub push: Option<Push>,
    /// The requester deposited again before the wait it was asked for ended: a strike
    /// against it ([`crate::mailbox::waits`]).
    pub ignored_wait: bool,
}

impl Outcome {
    /// An answer with nothing to push.
    pub fn reply(response: Response) -> Self {
        Self {
            response,
            push: None,
            ignored_wait: false,
        }
    }
}

/// Most requests handled in one round (one batch for the flusher).
pub const MAX_ROUND: usize = 1_024;

/// Most requests from newcomers in one round ([`Handle::try_request`]).
pub const NEWCOMERS_ROUND: usize = 32;

/// Fewest deposits in a round for which verification is spread over several threads; below
/// it, the service verifies them itself (handing work to a thread costs more than it saves).
const PARALLEL_VERIFY_FROM: usize = 8;

/// Depositors' decoded keys kept per generation ([`Keys`]).
const KEY_CACHE_CAPACITY: usize = 1_024;

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sustained deposits per second per depositing peer.
    pub deposits_per_sec_per_peer: u32,
    /// Deposit burst per depositing peer.
    pub deposit_burst_per_peer: u32,
    /// How often to purge expired entries.
    pub purge_interval: Duration,
    /// The wait a deposit refused for a full mailbox asks for.
    pub mailbox_full_retry_after_ms: u64,
    /// At most one WARN line per peer about its refusals in this many milliseconds.
    pub refusal_log_interval_ms: u64,
    /// The clock.
    pub clock: Clock,
}

enum Command {
    Request {
        peer: PeerId,
        request: Box<Request>,
        reply: oneshot::Sender<Outcome>,
    },
    Delivered {
        owner: PeerId,
        seq: u64,
    },
    Usage {
        owner: Option<PeerId>,
        reply: oneshot::Sender<Usage>,
    },
    Purge {
        reply: oneshot::Sender<u64>,
    },
    FanOut {
        recipients: Vec<PeerId>,
        envelope: Box<Envelope>,
        reply: oneshot::Sender<FanOut>,
    },
    Waiting {
        owner: PeerId,
        from: u64,
        limit: u32,
        reply: oneshot::Sender<Waiting>,
    },
}

/// Entries of one mailbox still waiting, to push to their connected recipient
/// ([`Handle::try_waiting`]).
#[derive(Debug, Default)]
pub struct Waiting {
    /// Oldest first.
    pub pushes: Vec<Push>,
    /// Whether more wait after them.
    pub more: bool,
}

/// A group message stored in many mailboxes (server-side fan-out), waiting for its flush.
#[derive(Debug)]
pub struct FanOut {
    /// Released by the flusher (`Stored`) once every copy is durable.
    pub flushed: oneshot::Receiver<Outcome>,
    /// One push per newly stored copy.
    pub pushes: Vec<Push>,
    /// How many recipients hold a copy.
    pub stored: u32,
    /// Recipients whose mailbox refused the copy.
    pub missed: Vec<PeerId>,
}

/// The service's queue is full; answer `Busy`.
#[derive(Debug, thiserror::Error)]
#[error("the mailbox service is busy")]
pub struct Busy;

/// Why a query to the service failed.
#[derive(Debug, thiserror::Error)]
#[error("the mailbox service has stopped")]
pub struct Stopped;

/// A cloneable handle to the service.
#[derive(Debug, Clone)]
pub struct Handle {
    /// Requests from connections on the newcomers' lane ([`crate::lanes`]) are served when no
    /// other waits, in rounds of at most [`NEWCOMERS_ROUND`].
    tx: Senders<Command>,
}

impl Handle {
    /// Queues `request` from `peer` without waiting; the answer arrives on the receiver. A
    /// request from a connection on the newcomers' lane (`newcomer`) waits for the others.
    pub fn try_request(
        &self,
        peer: PeerId,
        request: Request,
        newcomer: bool,
    ) -> Result<oneshot::Receiver<Outcome>, Busy> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .to(newcomer)
            .try_send(Command::Request {
                peer,
                request: Box::new(request),
                reply,
            })
            .map_err(|_| Busy)?;
        Ok(rx)
    }

    /// Reports that `owner` accepted the pushed entry `seq`, which can go. Dropped when the
    /// queue is full: the node then fetches it again and deduplicates.
    pub fn try_delivered(&self, owner: PeerId, seq: u64) -> Result<(), Busy> {
        self.tx
            .users()
            .try_send(Command::Delivered { owner, seq })
            .map_err(|_| Busy)
    }

    /// Queues a group envelope (already checked by the group gateway) for the mailboxes of
    /// `recipients`, without waiting; a newcomer's waits for the others as in
    /// [`Handle::try_request`].
    pub fn try_fan_out(
        &self,
        recipients: Vec<PeerId>,
        envelope: Envelope,
        newcomer: bool,
    ) -> Result<oneshot::Receiver<FanOut>, Busy> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .to(newcomer)
            .try_send(Command::FanOut {
                recipients,
                envelope: Box::new(envelope),
                reply,
            })
            .map_err(|_| Busy)?;
        Ok(rx)
    }

    /// Up to `limit` entries of `owner`'s mailbox from sequence number `from` on, oldest first,
    /// without waiting: for pushes that were held back while too many were in flight
    /// ([`crate::pushes`]).
    pub fn try_waiting(
        &self,
        owner: PeerId,
        from: u64,
        limit: u32,
    ) -> Result<oneshot::Receiver<Waiting>, Busy> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .users()
            .try_send(Command::Waiting {
                owner,
                from,
                limit,
                reply,
            })
            .map_err(|_| Busy)?;
        Ok(rx)
    }

    /// Entries and bytes waiting for `owner`, or in all mailboxes.
    pub async fn usage(&self, owner: Option<PeerId>) -> Result<Usage, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .users()
            .send(Command::Usage { owner, reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Purges expired entries now; returns how many went.
    pub async fn purge(&self) -> Result<u64, Stopped> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .users()
            .send(Command::Purge { reply })
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

/// Creates the handle and the receiving end for [`run`], with room for `capacity` requests.
/// Requests from newcomers each have the same room again.
pub fn channel(capacity: usize) -> (Handle, Receiver) {
    let (tx, rx) = queues(capacity);
    (Handle { tx }, Receiver(rx))
}

/// The service's end of the queues.
#[derive(Debug)]
pub struct Receiver(Receivers<Command>);

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Request { peer, request, .. } => {
                write!(f, "Request({peer}, {})", request.req_id())
            }
            Command::Delivered { owner, seq } => write!(f, "Delivered({owner}, {seq})"),
            Command::Usage { .. } => f.write_str("Usage"),
            Command::Purge { .. } => f.write_str("Purge"),
            Command::FanOut { recipients, .. } => write!(f, "FanOut({})", recipients.len()),
            Command::Waiting { owner, from, .. } => write!(f, "Waiting({owner}, {from})"),
        }
    }
}

struct Service {
    store: Store,
    rate: RateLimiter,
    settings: Settings,
    flusher: mpsc::Sender<Jobs>,
    metrics: Metrics,
    /// Threads to verify a round's signatures on.
    parallelism: usize,
    /// Depositors' decoded keys.
    keys: Keys,
    /// Which refusals make a WARN line.
    warnings: Warnings,
    /// The earliest deadline of a stored entry, when the purge must run next.
    next_deadline: Option<u64>,
    /// The waits depositors were asked for.
    waits: Waits,
}

/// A request of the current round; a deposit's envelope waits in the round's list of envelopes
/// to verify.
enum Prepared {
    Deposit {
        peer: PeerId,
        req_id: u64,
        reply: oneshot::Sender<Outcome>,
    },
    Other(Command),
}

/// An envelope after verification; `None` when its verification thread failed.
type Checked = Option<(Envelope, Result<(), VerifyError>)>;

/// An envelope to verify, with its sender's key if the sender's id embeds one.
type ToCheck = (Envelope, Option<SenderKey>);

/// Runs the service until every [`Handle`] is dropped, then flushes the store.
pub async fn run(
    store: Store,
    settings: Settings,
    Receiver(mut rx): Receiver,
    flusher: mpsc::Sender<Jobs>,
    metrics: Metrics,
) -> Result<(), sled::Error> {
    let mut service = Service {
        rate: RateLimiter::new(
            settings.deposits_per_sec_per_peer,
            settings.deposit_burst_per_peer,
        ),
        store,
        settings: settings.clone(),
        flusher,
        metrics,
        parallelism: std::thread::available_parallelism().map_or(1, |n| n.get()),
        keys: Keys::new(KEY_CACHE_CAPACITY),
        warnings: Warnings::new(settings.refusal_log_interval_ms),
        next_deadline: None,
        waits: Waits::default(),
    };
    service.update_gauges();
    service.refresh_next_deadline();
    let mut purge = tokio::time::interval(service.settings.purge_interval);
    purge.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut round = Vec::with_capacity(64);
    loop {
        // Entries of temporary chats go at their own deadline, not at the next periodic purge:
        // an expired message must leave the relay's disk even if it was never delivered.
        let next_deadline = service.next_deadline;
        let until_deadline = async {
            match next_deadline {
                Some(at) => {
                    let wait = at.saturating_sub(service.settings.clock.now_ms());
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            n = rx.recv_many(&mut round, MAX_ROUND, NEWCOMERS_ROUND) => {
                if n == 0 {
                    break;
                }
                service.round(&mut round).await;
            }
            _ = purge.tick() => {
                service.purge();
            }
            _ = until_deadline => {
                service.purge();
            }
        }
    }
    let db = service.store.db().clone();
    drop(service);
    db.flush_async().await.map(|_| ())
}

/// Verifies every envelope, on up to `parallelism` blocking threads when there are enough, and
/// returns them in order with their results. The envelopes move to the threads and back: no
/// copies.
async fn verify_all(envelopes: Vec<ToCheck>, parallelism: usize) -> Vec<Checked> {
    let check = |(envelope, sender): ToCheck| {
        let verified = match &sender {
            Some(sender) => envelope.verify_with(sender),
            // No key to check with: `verify` says why (a bad version, a key-less id...).
            None => envelope.verify(),
        };
        Some((envelope, verified))
    };
    if parallelism <= 1 || envelopes.len() < PARALLEL_VERIFY_FROM {
        return envelopes.into_iter().map(check).collect();
    }
    let total = envelopes.len();
    let share = total.div_ceil(parallelism);
    let mut rest = envelopes;
    let mut threads = Vec::with_capacity(parallelism);
    while !rest.is_empty() {
        let tail = rest.split_off(share.min(rest.len()));
        let chunk = std::mem::replace(&mut rest, tail);
        let len = chunk.len();
        let thread =
            tokio::task::spawn_blocking(move || chunk.into_iter().map(check).collect::<Vec<_>>());
        threads.push((len, thread));
    }
    let mut checked = Vec::with_capacity(total);
    for (len, thread) in threads {
        match thread.await {
            Ok(done) => checked.extend(done),
            Err(e) => {
                tracing::error!(error = %e, "a signature verification thread failed");
                checked.extend((0..len).map(|_| None));
            }
        }
    }
    checked
}

impl Service {
    /// Handles one round of requests, in order, and hands the round's durable answers to the
    /// flusher as one batch.
    async fn round(&mut self, commands: &mut Vec<Command>) {
        let mut envelopes = Vec::new();
        let mut prepared = Vec::with_capacity(commands.len());
        for command in commands.drain(..) {
            match command {
                Command::Request {
                    peer,
                    request,
                    reply,
                } => match *request {
                    Request::Deposit {
                        req_id, envelope, ..
                    } => {
                        if let Some(early) = self.ignores_wait(&peer, &envelope, req_id) {
                            let _ = reply.send(early);
                            continue;
                        }
                        // A deposit that would be refused anyway costs no signature check.
                        if let Some((reason, detail, after)) = self.precheck(&peer, &envelope) {
                            self.ask_to_wait(peer, envelope.to, after);
                            let _ = reply.send(self.refuse(&peer, req_id, reason, &detail, after));
                            continue;
                        }
                        let sender = self.keys.get(&envelope.from);
                        envelopes.push((envelope, sender));
                        prepared.push(Prepared::Deposit {
                            peer,
                            req_id,
                            reply,
                        });
                    }
                    request => prepared.push(Prepared::Other(Command::Request {
                        peer,
                        request: Box::new(request),
                        reply,
                    })),
                },
                other => prepared.push(Prepared::Other(other)),
            }
        }
        let mut checked = verify_all(envelopes, self.parallelism).await.into_iter();
        // Answers released by the flusher, and the staged deposits' answers, released to the
        // flusher once their batch is written.
        let mut jobs = Vec::new();
        let mut staged = (Staged::default(), Vec::new());
        for item in prepared {
            match item {
                Prepared::Deposit {
                    peer,
                    req_id,
                    reply,
                } => {
                    // One entry per deposit of the round; `None` if its verification failed to
                    // run, which is answered like a failed write (the sender retries).
                    let Some((envelope, verified)) = checked.next().flatten() else {
                        let detail = "signature verification did not run";
                        let reason = Reject::StoreFailed;
                        let _ = reply.send(self.reject(&peer, req_id, reason, detail));
                        continue;
                    };
                    let to = envelope.to;
                    match self.deposit(req_id, envelope, verified, &mut staged.0) {
                        // The answer is released by the flusher once the write is durable.
                        Ok(outcome) => staged.1.push(Job { reply, outcome }),
                        Err((reason, detail)) => {
                            // Only a full mailbox (counting this round's deposits) is refused
                            // for a while here; the rate was checked before.
                            let after = (reason == Reject::QuotaExceeded)
                                .then_some(self.settings.mailbox_full_retry_after_ms);
                            self.ask_to_wait(peer, to, after);
                            let _ = reply.send(self.refuse(&peer, req_id, reason, &detail, after));
                        }
                    }
                }
                Prepared::Other(command) => {
                    // Later requests (a fetch, say) see every earlier deposit.
                    self.commit(&mut staged, &mut jobs);
                    self.handle(command, &mut jobs);
                }
            }
        }
        self.commit(&mut staged, &mut jobs);
        if !jobs.is_empty() {
            if let Err(mpsc::error::SendError(jobs)) = self.flusher.send(jobs).await {
                tracing::error!("the mailbox flusher has stopped");
                for job in jobs {
                    let req_id = job.outcome.response.req_id();
                    self.metrics.reject(&Reject::StoreFailed);
                    let _ = job.reply.send(Outcome::reply(Response::rejected(
                        req_id,
                        Reject::StoreFailed,
                    )));
                }
            }
        }
        self.update_gauges();
    }

    /// Writes the staged deposits and moves their answers to `jobs`, or, if a write fails,
    /// answers them all `StoreFailed` at once: the senders retry, and a deposit written before
    /// the failure is then found by its dedup key and answered `Stored`.
    fn commit(&mut self, (deposits, answers): &mut (Staged, Vec<Job>), jobs: &mut Vec<Job>) {
        if deposits.is_empty() {
            jobs.append(answers);
            return;
        }
        match self.store.commit(std::mem::take(deposits)) {
            Ok(()) => jobs.append(answers),
            Err(e) => {
                tracing::error!(error = %e, deposits = answers.len(), "mailbox store failed");
                for job in answers.drain(..) {
                    let req_id = job.outcome.response.req_id();
                    self.metrics.reject(&Reject::StoreFailed);
                    let _ = job.reply.send(Outcome::reply(Response::rejected(
                        req_id,
                        Reject::StoreFailed,
                    )));
                }
            }
        }
    }

    fn handle(&mut self, command: Command, jobs: &mut Vec<Job>) {
        match command {
            Command::Request {
                peer,
                request,
                reply,
            } => {
                let _ = reply.send(self.request(peer, *request));
            }
            Command::Delivered { owner, seq } => match self.store.remove(&owner, seq) {
                Ok(true) => {
                    self.metrics.pushes.inc();
                }
                Ok(false) => {}
                Err(e) => tracing::error!(%owner, seq, error = %e, "removing a pushed entry"),
            },
            Command::Usage { owner, reply } => {
                let usage = match owner {
                    Some(owner) => self.store.usage(&owner),
                    None => self.store.totals(),
                };
                let _ = reply.send(usage);
            }
            Command::Purge { reply } => {
                let _ = reply.send(self.purge());
            }
            Command::FanOut {
                recipients,
                envelope,
                reply,
            } => self.fan_out(recipients, *envelope, reply, jobs),
            Command::Waiting {
                owner,
                from,
                limit,
                reply,
            } => {
                let after = from.checked_sub(1);
                let waiting = match self.store.fetch(&owner, after, limit, usize::MAX) {
                    Ok(page) => Waiting {
                        pushes: page
                            .items
                            .into_iter()
                            .map(|item| Push {
                                recipient: owner,
                                seq: item.seq,
                                envelope: item.envelope,
                            })
                            .collect(),
                        more: page.more,
                    },
                    Err(e) => {
                        // The entries stay for the recipient's own fetch, which reports it.
                        tracing::warn!(%owner, error = %e, "cannot read a mailbox to push");
                        Waiting::default()
                    }
                };
                let _ = reply.send(waiting);
            }
        }
    }

    fn purge(&mut self) -> u64 {
        let now = self.settings.clock.now_ms();
        self.rate.prune(now);
        let purged = match self.store.purge(now) {
            Ok(purged) => {
                if purged > 0 {
                    tracing::info!(purged, "purged expired mailbox entries");
                    self.metrics.purged.inc_by(purged);
                }
                self.update_gauges();
                purged
            }
            Err(e) => {
                tracing::error!(error = %e, "mailbox purge failed");
                0
            }
        };
        self.refresh_next_deadline();
        purged
    }

    /// Reads the earliest entry deadline again (after a purge, or at start).
    fn refresh_next_deadline(&mut self) {
        self.next_deadline = match self.store.next_deadline() {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the mailbox's next deadline");
                None
            }
        };
    }

    /// Notes the deadline of an entry just stored, if it comes before the others'.
    fn note_deadline(&mut self, envelope: &Envelope, now_ms: u64) {
        if let Some(at) = envelope.expires_at_ms {
            let at = kith_protocol::timer::relay_deadline(at, self.store.expiry_skew_ms());
            if at > now_ms && self.next_deadline.is_none_or(|next| at < next) {
                self.next_deadline = Some(at);
            }
        }
    }

    /// Makes `owner`, fetching, one of the relay's users, with its reserve of the budget,
    /// if there is room ([`crate::mailbox::store`]).
    fn claim(&mut self, owner: &PeerId) {
        let now = self.settings.clock.now_ms();
        match self.store.claim(owner, now) {
            Ok(Claim::Added) => {
                tracing::debug!(%owner, users = self.store.users(), "a new user of the mailbox");
                self.update_gauges();
            }
            Ok(Claim::NoRoom) => self.metrics.limit_hit("mailbox_users"),
            Ok(Claim::Known | Claim::Off) => {}
            Err(e) => tracing::warn!(%owner, error = %e, "cannot record a user of the mailbox"),
        }
    }

    fn update_gauges(&self) {
        let totals = self.store.totals();
        self.metrics
            .mailbox_messages
            .set(i64::try_from(totals.messages).unwrap_or(i64::MAX));
        self.metrics
            .mailbox_bytes
            .set(i64::try_from(totals.bytes).unwrap_or(i64::MAX));
        self.metrics
            .mailbox_users
            .set(i64::try_from(self.store.users()).unwrap_or(i64::MAX));
    }

    fn reject(&mut self, peer: &PeerId, req_id: u64, reason: Reject, detail: &str) -> Outcome {
        self.refuse(peer, req_id, reason, detail, None)
    }

    /// Refuses a request; `retry_after_ms` tells the sender when to come back. The WARN line
    /// is rate-limited per peer; the metric counts every refusal.
    fn refuse(
        &mut self,
        peer: &PeerId,
        req_id: u64,
        reason: Reject,
        detail: &str,
        retry_after_ms: Option<u64>,
    ) -> Outcome {
        let now = self.settings.clock.now_ms();
        crate::warn_refused!(self.warnings, now, *peer, req_id, %reason, detail, "mailbox request rejected");
        self.metrics.reject(&reason);
        let mut response = Response::rejected(req_id, reason);
        if let (
            Response::Rejected {
                retry_after_ms: r, ..
            },
            Some(after),
        ) = (&mut response, retry_after_ms)
        {
            *r = Some(after);
        }
        Outcome::reply(response)
    }

    /// The refusal of a deposit by `peer` for a recipient it was asked to wait for, when the
    /// wait has not ended: a strike against `peer` ([`crate::mailbox::waits`]).
    fn ignores_wait(&mut self, peer: &PeerId, envelope: &Envelope, req_id: u64) -> Option<Outcome> {
        let Destination::Peer(recipient) = envelope.to else {
            return None;
        };
        let now = self.settings.clock.now_ms();
        let Verdict::Early(left) = self.waits.check(*peer, recipient, now) else {
            return None;
        };
        self.metrics.limit_hit("ignored_retry_after");
        let detail = format!("deposited for {recipient} again {left} ms before the wait asked for");
        let reason = Reject::QuotaExceeded;
        let mut outcome = self.refuse(peer, req_id, reason, &detail, Some(left));
        outcome.ignored_wait = true;
        Some(outcome)
    }

    /// Records the wait a refused deposit by `peer` for `to` asks for.
    fn ask_to_wait(&mut self, peer: PeerId, to: Destination, after: Option<u64>) {
        if let (Destination::Peer(recipient), Some(after)) = (to, after) {
            let now = self.settings.clock.now_ms();
            self.waits.asked(peer, recipient, now, after);
        }
    }

    /// The refusal a deposit of `envelope` by `peer` gets before its signature is checked,
    /// if any: the depositor's rate (it takes a token) and a full recipient mailbox, each with
    /// the wait it asks for.
    fn precheck(
        &mut self,
        peer: &PeerId,
        envelope: &Envelope,
    ) -> Option<(Reject, String, Option<u64>)> {
        let now = self.settings.clock.now_ms();
        if !self.rate.check(peer, now) {
            self.metrics.limit_hit("deposit_rate");
            let detail = "deposit rate exceeded".to_owned();
            return Some((Reject::QuotaExceeded, detail, Some(self.rate.refill_ms())));
        }
        if let Destination::Peer(recipient) = envelope.to {
            if self.store.surely_full(&recipient, envelope) {
                self.metrics.limit_hit("mailbox_quota");
                let detail = format!("the mailbox of {recipient} is full");
                let after = self.settings.mailbox_full_retry_after_ms;
                return Some((Reject::QuotaExceeded, detail, Some(after)));
            }
            if self.store.surely_over_share(&recipient, envelope) {
                self.metrics.limit_hit("mailbox_sender_share");
                let detail = format!(
                    "{} has its share of the mailbox of {recipient} waiting",
                    envelope.from
                );
                let after = self.settings.mailbox_full_retry_after_ms;
                return Some((Reject::QuotaExceeded, detail, Some(after)));
            }
        }
        None
    }

    /// Answers a fetch or an ack (deposits go through [`Service::round`]).
    fn request(&mut self, peer: PeerId, request: Request) -> Outcome {
        match request {
            Request::Deposit { req_id, .. } => {
                // Rounds take deposits apart before they get here.
                let detail = "deposit outside a round";
                self.reject(&peer, req_id, Reject::StoreFailed, detail)
            }
            Request::Fetch {
                req_id,
                after,
                limit,
            } => {
                let limit = limit.min(MAX_FETCH_BATCH);
                self.claim(&peer);
                match self.store.fetch(&peer, after, limit, MAX_FRAME_BYTES) {
                    Ok(page) => {
                        self.metrics.fetches.inc();
                        Outcome::reply(Response::Batch {
                            req_id,
                            items: page.items,
                            more: page.more,
                        })
                    }
                    Err(e) => self.reject(&peer, req_id, Reject::StoreFailed, &e.to_string()),
                }
            }
            Request::Ack { req_id, seqs } => {
                if seqs.len() > MAX_IDS_PER_BATCH {
                    let detail = format!("{} seqs, at most {MAX_IDS_PER_BATCH}", seqs.len());
                    self.reject(&peer, req_id, Reject::Malformed, &detail)
                } else {
                    match self.store.ack(&peer, &seqs) {
                        Ok(removed) => {
                            self.metrics.acks.inc();
                            self.update_gauges();
                            Outcome::reply(Response::Acked { req_id, removed })
                        }
                        Err(e @ AckError::NotYours { .. }) => {
                            self.reject(&peer, req_id, Reject::NotYours, &e.to_string())
                        }
                        Err(e @ AckError::Storage(_)) => {
                            self.reject(&peer, req_id, Reject::StoreFailed, &e.to_string())
                        }
                    }
                }
            }
        }
    }

    /// Stores one group envelope in every recipient's mailbox (one flush for all
    /// copies). A recipient whose mailbox is full misses this message; the others do not.
    fn fan_out(
        &mut self,
        recipients: Vec<PeerId>,
        envelope: Envelope,
        reply: oneshot::Sender<FanOut>,
        jobs: &mut Vec<Job>,
    ) {
        let now = self.settings.clock.now_ms();
        // A fan-out costs its poster one deposit per copy (a group message, or a membership
        // change announced to every member): a stranger cannot flood mailboxes through a group.
        let cost = recipients.len() as u64;
        if !self.rate.check_n(&envelope.from, cost, now) {
            self.metrics.limit_hit("group_fan_out_rate");
            self.metrics.reject(&Reject::QuotaExceeded);
            let (tx, flushed) = oneshot::channel();
            let mut response = Response::rejected(0, Reject::QuotaExceeded);
            if let Response::Rejected { retry_after_ms, .. } = &mut response {
                *retry_after_ms = Some(self.rate.refill_ms().saturating_mul(cost.max(1)));
            }
            let _ = tx.send(Outcome::reply(response));
            let _ = reply.send(FanOut {
                flushed,
                pushes: Vec::new(),
                stored: 0,
                missed: recipients,
            });
            return;
        }
        let expired = envelope
            .expires_at_ms
            .is_some_and(|at| kith_protocol::timer::refuses(at, now, self.store.expiry_skew_ms()));
        if expired {
            tracing::debug!(id = %envelope.id, "refusing to fan out an expired group message");
            self.metrics.reject(&Reject::Expired);
            let (tx, flushed) = oneshot::channel();
            let _ = tx.send(Outcome::reply(Response::rejected(0, Reject::Expired)));
            let _ = reply.send(FanOut {
                flushed,
                pushes: Vec::new(),
                stored: 0,
                missed: recipients,
            });
            return;
        }
        self.note_deadline(&envelope, now);
        let mut copies = Vec::new();
        let mut missed = Vec::new();
        let mut staged = Staged::default();
        for recipient in recipients {
            match self.store.stage(&mut staged, &recipient, &envelope, now) {
                Ok(done) => copies.push((recipient, done)),
                Err(e) => {
                    tracing::debug!(%recipient, id = %envelope.id, error = %e, "group copy not stored");
                    self.metrics.limit_hit(match e {
                        DepositError::SenderShareExceeded { .. } => "mailbox_sender_share",
                        _ => "mailbox_quota",
                    });
                    missed.push(recipient);
                }
            }
        }
        let (tx, flushed) = oneshot::channel();
        let mut pushes = Vec::new();
        let mut stored = 0u32;
        let response = match self.store.commit(staged) {
            Ok(()) => {
                stored = u32::try_from(copies.len()).unwrap_or(u32::MAX);
                for (recipient, done) in copies {
                    if !done.duplicate {
                        pushes.push(Push {
                            recipient,
                            seq: done.seq,
                            envelope: envelope.clone(),
                        });
                    }
                }
                Response::Stored { req_id: 0 }
            }
            Err(e) => {
                tracing::error!(id = %envelope.id, error = %e, "group copies not stored");
                self.metrics.reject(&Reject::StoreFailed);
                Response::rejected(0, Reject::StoreFailed)
            }
        };
        jobs.push(Job {
            reply: tx,
            outcome: Outcome::reply(response),
        });
        let _ = reply.send(FanOut {
            flushed,
            pushes,
            stored,
            missed,
        });
    }

    /// Validates and stores a deposit whose signature check gave `verified`; the answer still
    /// has to wait for the flush.
    fn deposit(
        &mut self,
        req_id: u64,
        envelope: Envelope,
        verified: Result<(), VerifyError>,
        staged: &mut Staged,
    ) -> Result<Outcome, (Reject, String)> {
        if let Err(e) = verified {
            let reason = match e {
                VerifyError::UnsupportedVersion(_) => Reject::UnsupportedVersion,
                VerifyError::BodyTooLarge { .. } => Reject::TooLarge {
                    max: MAX_BODY_BYTES as u64,
                },
                VerifyError::UnknownKey(_) | VerifyError::BadSignature => Reject::BadSignature,
            };
            return Err((
                reason,
                format!("envelope {} from {}: {e}", envelope.id, envelope.from),
            ));
        }
        let recipient = match envelope.to {
            Destination::Peer(recipient) => recipient,
            Destination::Group(group) => {
                return Err((
                    Reject::Malformed,
                    format!("group deposits ({group}) are not supported yet"),
                ))
            }
        };
        let now = self.settings.clock.now_ms();
        if let Some(at) = envelope.expires_at_ms {
            if kith_protocol::timer::refuses(at, now, self.store.expiry_skew_ms()) {
                return Err((
                    Reject::Expired,
                    format!("envelope {} expired at {at} (now {now})", envelope.id),
                ));
            }
        }
        match self.store.stage(staged, &recipient, &envelope, now) {
            Ok(stored) => {
                tracing::debug!(%recipient, seq = stored.seq, duplicate = stored.duplicate, "deposit");
                self.note_deadline(&envelope, now);
                let push = (!stored.duplicate).then_some(Push {
                    recipient,
                    seq: stored.seq,
                    envelope,
                });
                Ok(Outcome {
                    push,
                    ..Outcome::reply(Response::Stored { req_id })
                })
            }
            Err(e @ (DepositError::QuotaExceeded { .. } | DepositError::BudgetFull { .. })) => {
                Err((Reject::QuotaExceeded, e.to_string()))
            }
            Err(e @ DepositError::SenderShareExceeded { .. }) => {
                self.metrics.limit_hit("mailbox_sender_share");
                Err((Reject::QuotaExceeded, e.to_string()))
            }
            Err(e @ DepositError::Unstorable(_)) => Err((Reject::Malformed, e.to_string())),
            Err(e @ DepositError::Storage(_)) => {
                tracing::error!(error = %e, "mailbox store failed");
                Err((Reject::StoreFailed, e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kith_protocol::{Body, Keypair};

    fn envelope(from: &Keypair, to: PeerId, text: &str) -> Envelope {
        crate::mailbox::test_envelope(from, to, text, None)
    }

    #[tokio::test]
    async fn parallel_verification_keeps_order_and_catches_forgeries() {
        let alice = Keypair::generate_ed25519();
        let bob = Keypair::generate_ed25519().public().to_peer_id();
        let mut envelopes: Vec<Envelope> = (0..3 * PARALLEL_VERIFY_FROM)
            .map(|i| envelope(&alice, bob, &format!("message {i}")))
            .collect();
        let forged = [1, PARALLEL_VERIFY_FROM + 2, envelopes.len() - 1];
        for &i in &forged {
            envelopes[i].body = kith_protocol::cbor::encode(
                &Body::Chat {
                    text: "forged".into(),
                },
                MAX_BODY_BYTES,
            )
            .expect("encode");
        }
        let ids: Vec<_> = envelopes.iter().map(|e| e.id).collect();
        let mut keys = Keys::new(KEY_CACHE_CAPACITY);
        for parallelism in [1, 2, 3, 8] {
            let to_check = envelopes
                .iter()
                .map(|e| (e.clone(), keys.get(&e.from)))
                .collect();
            let checked = verify_all(to_check, parallelism).await;
            assert_eq!(checked.len(), envelopes.len());
            for (i, entry) in checked.into_iter().enumerate() {
                let (envelope, verified) = entry.expect("verification ran");
                assert_eq!(envelope.id, ids[i], "order kept");
                if forged.contains(&i) {
                    assert!(matches!(verified, Err(VerifyError::BadSignature)), "{i}");
                } else {
                    assert!(verified.is_ok(), "{i}");
                }
            }
        }
    }
}
