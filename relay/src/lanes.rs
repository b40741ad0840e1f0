//! Which thread serves a connection: the relay's own runtime, or the newcomers' lane.
//!
//! A relay is public, so most of what an attacker can make it do happens before the attacker has
//! said anything useful: handshakes, streams that never finish a request, frames that do not
//! decode. tokio runs ready tasks in turn, so a burst of such work (a hundred connections woken
//! at once) used to queue in front of a user's deposit on the same worker, however cheap each
//! piece was.
//!
//! So a connection's task starts on the *newcomers' lane*: a runtime with one worker thread of
//! its own, at a lower CPU priority (`newcomer_lane_nice`), which runs in short turns and lets
//! the relay's threads have the CPU between them ([`turn`]). Handshakes run there too. The
//! connection moves to the relay's own runtime with its first well-formed request once it is
//! `newcomer_ms` old ([`Lanes::promote`]): attackers' fresh identities seldom live that long,
//! a relay's users stay connected. It moves back for good when its peer is struck for a
//! malformed request ([`Lanes::demote_peer`]), and for another `newcomer_ms` when its peer is
//! refused and asked to come back later ([`Lanes::refused`]): what a stranger gets out of the
//! relay is what its limits give a fresh identity, and once that is used up its requests are
//! refusals, which wait for the users' requests like a newcomer's. The mailbox and group
//! services also serve newcomers' requests only when no other request waits (their queues, in
//! small rounds), while the rest of the relay's work (the swarm task, the store, the flush) is
//! shared in turn.
//!
//! A task moves by ending its run on one runtime and being spawned, unfinished, on the other
//! ([`OnLane`]). Its first poll there registers its wakers with its new task, as every poll
//! must; I/O it registered stays with the reactor it was registered with, which wakes whichever
//! task polled it last.
//!
//! What it does not stop: an attacker that keeps a connection for `newcomer_ms` and sends one
//! well-formed request is served on the relay's runtime until it is struck; and a user's new
//! connection waits with the newcomers while an attack lasts. The lane raises the cost of the
//! cheapest attacks (a handshake flood, streams held open, garbage, identities churned to get
//! around per-peer limits) without any list of who is who.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use libp2p::swarm::{ConnectionId, Executor};
use libp2p::PeerId;
use tokio::runtime::{Handle, Runtime};

use crate::metrics::Metrics;

/// A connection's (or a handshake's) task, as libp2p hands it over.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where a connection's task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Lane {
    /// The relay's own runtime.
    Relay = 0,
    /// The newcomers' lane: its own thread, at a lower priority.
    Newcomers = 1,
}

impl Lane {
    fn from_u8(v: u8) -> Self {
        if v == Lane::Relay as u8 {
            Lane::Relay
        } else {
            Lane::Newcomers
        }
    }
}

/// Whether a refusal for `reason` asks its requester to come back later (a full mailbox or
/// budget, a rate, the relay's load), which sends the requester back to the newcomers
/// ([`Lanes::refused`]).
fn asks_to_wait(reason: &kith_protocol::Reject) -> bool {
    matches!(
        reason,
        kith_protocol::Reject::QuotaExceeded | kith_protocol::Reject::Busy { .. }
    )
}

/// Why the newcomers' lane could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the newcomers' lane (a runtime thread): {0}")]
pub struct StartError(#[from] std::io::Error);

/// The lanes: the executor the relay's swarm spawns connection tasks with, and the swarm task's
/// way to move a connection between them. Cheap to clone.
#[derive(Clone)]
pub struct Lanes {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").finish_non_exhaustive()
    }
}

struct Shared {
    relay: Handle,
    newcomers: Handle,
    connections: Mutex<HashMap<ConnectionId, Entry>>,
    /// How long a connection stays a newcomer, however well it speaks.
    newcomer_for: Duration,
    metrics: Metrics,
}

struct Entry {
    peer: PeerId,
    /// When it became a newcomer: opened, or last refused ([`Lanes::refused`]).
    since: Instant,
    /// Demoted for good: never promoted again.
    demoted: bool,
    slot: Arc<Slot>,
}

/// A connection's wanted lane (set under [`Shared::connections`], read by its task without
/// it), and its task's waker for when the wanted lane changes.
struct Slot {
    lane: AtomicU8,
    waker: AtomicWaker,
}

impl Slot {
    fn lane(&self) -> Lane {
        Lane::from_u8(self.lane.load(Ordering::Acquire))
    }

    fn set(&self, lane: Lane) -> bool {
        let before = self.lane.swap(lane as u8, Ordering::AcqRel);
        if before != lane as u8 {
            self.waker.wake();
            return true;
        }
        false
    }
}

/// Owns the newcomers' runtime: dropping it stops the lane's thread (tasks still on it are
/// dropped, closing their connections).
pub struct NewcomersRuntime(Option<Runtime>);

impl std::fmt::Debug for NewcomersRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NewcomersRuntime")
    }
}

impl NewcomersRuntime {
    /// Stops the lane's thread and waits (at most `within`) until the tasks still on it are
    /// dropped: their connections' sockets are closed when this returns, so that a process that
    /// starts again at once can listen on the same port.
    pub async fn stop(mut self, within: Duration) {
        if let Some(runtime) = self.0.take() {
            // `shutdown_timeout` blocks, and tokio refuses it on any of a runtime's threads
            // (its blocking pool's included): a thread of its own.
            let (done, stopped) = tokio::sync::oneshot::channel();
            let held = Arc::new(Mutex::new(Some(runtime)));
            let on_thread = held.clone();
            let spawned = std::thread::Builder::new()
                .name("kith-newcomers-stop".into())
                .spawn(move || {
                    let runtime = on_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(runtime) = runtime {
                        runtime.shutdown_timeout(within);
                    }
                    let _ = done.send(());
                });
            match spawned {
                Ok(_) => {
                    let _ = stopped.await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot wait for the newcomers' lane to stop");
                    let runtime = held.lock().unwrap_or_else(|e| e.into_inner()).take();
                    if let Some(runtime) = runtime {
                        runtime.shutdown_background();
                    }
                }
            }
        }
    }
}

impl Drop for NewcomersRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            // Dropping a runtime from inside another one would block it; this does not wait.
            runtime.shutdown_background();
        }
    }
}

impl Lanes {
    /// Starts the newcomers' lane: one worker thread at `nice` (0 to 19; a thread that may not
    /// lower its priority logs it and runs at the relay's). The relay's lane is the runtime this
    /// is called from. A connection is a newcomer for at least `newcomer_for`.
    pub fn start(
        nice: i32,
        newcomer_for: Duration,
        metrics: Metrics,
    ) -> Result<(Self, NewcomersRuntime), StartError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kith-newcomers")
            .on_thread_start(move || lower_priority(nice))
            .on_thread_unpark(turn::start)
            .on_thread_park(turn::end)
            .enable_all()
            .build()?;
        let lanes = Lanes {
            shared: Arc::new(Shared {
                relay: Handle::current(),
                newcomers: runtime.handle().clone(),
                connections: Mutex::new(HashMap::new()),
                newcomer_for,
                metrics,
            }),
        };
        Ok((lanes, NewcomersRuntime(Some(runtime))))
    }

    /// Moves `connection` to the relay's lane (its peer sent a well-formed request), unless it
    /// is younger than the newcomers' time or its peer was demoted.
    pub fn promote(&self, connection: ConnectionId) {
        if let Some(entry) = self.shared.connections().get(&connection) {
            self.shared.promote(entry);
        }
    }

    /// [`Lanes::promote`] for every open connection of `peer` (a node's contact or home relay:
    /// known by its key, not by how long it has behaved).
    pub fn promote_peer(&self, peer: &PeerId) {
        let connections = self.shared.connections();
        for entry in connections.values().filter(|e| e.peer == *peer) {
            self.shared.promote(entry);
        }
    }

    /// Moves every open connection of `peer` to the newcomers' lane for good (it was struck;
    /// a connection it opens later starts over as a newcomer, unless it is banned by then).
    pub fn demote_peer(&self, peer: &PeerId) {
        let mut connections = self.shared.connections();
        for entry in connections.values_mut().filter(|e| e.peer == *peer) {
            entry.demoted = true;
            if entry.slot.set(Lane::Newcomers) {
                self.shared.metrics.lane_move("newcomers");
            }
        }
    }

    /// Moves every open connection of `peer` back to the newcomers' lane after a refusal that
    /// asks it to come back later (a full mailbox or budget, a rate, the relay's load): each
    /// is a newcomer again until it has gone `newcomer_ms` without such a refusal and sends a
    /// well-formed request. A fresh identity's requests are refused like anyone's once it has
    /// used up what the relay gives it; it must not then be served before the relay's users.
    pub fn refused(&self, peer: &PeerId) {
        let mut connections = self.shared.connections();
        let now = Instant::now();
        for entry in connections.values_mut().filter(|e| e.peer == *peer) {
            entry.since = now;
            if entry.slot.set(Lane::Newcomers) {
                self.shared.metrics.lane_move("newcomers");
            }
        }
    }

    /// After `peer` was refused for `reason`: back to the newcomers ([`Lanes::refused`]) if
    /// the refusal asks it to come back later.
    pub fn after_refusal(&self, peer: &PeerId, reason: &kith_protocol::Reject) {
        if asks_to_wait(reason) {
            self.refused(peer);
        }
    }

    /// The lanes `peer`'s established connections are on.
    pub fn lanes_of_peer(&self, peer: &PeerId) -> Vec<Lane> {
        self.shared
            .connections()
            .values()
            .filter(|e| e.peer == *peer)
            .map(|e| e.slot.lane())
            .collect()
    }

    /// The lane `connection` is on, if it is an established connection.
    pub fn lane_of(&self, connection: ConnectionId) -> Option<Lane> {
        self.shared
            .connections()
            .get(&connection)
            .map(|e| e.slot.lane())
    }
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, HashMap<ConnectionId, Entry>> {
        // The map holds no invariant a panic elsewhere could break.
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn promote(&self, entry: &Entry) {
        if entry.since.elapsed() >= self.newcomer_for
            && !entry.demoted
            && entry.slot.set(Lane::Relay)
        {
            self.metrics.lane_move("relay");
        }
    }

    fn handle(&self, lane: Lane) -> &Handle {
        match lane {
            Lane::Relay => &self.relay,
            Lane::Newcomers => &self.newcomers,
        }
    }
}

impl Executor for Lanes {
    /// Handshakes (and the few small tasks the swarm spawns besides connections) run on the
    /// newcomers' lane: their peer has not said anything yet.
    fn exec(&self, future: Task) {
        self.shared.newcomers.spawn(GivesWay(future));
    }

    fn exec_established(&self, peer: PeerId, connection: ConnectionId, future: Task) {
        let slot = Arc::new(Slot {
            lane: AtomicU8::new(Lane::Newcomers as u8),
            waker: AtomicWaker::new(),
        });
        self.shared.connections().insert(
            connection,
            Entry {
                peer,
                since: Instant::now(),
                demoted: false,
                slot: slot.clone(),
            },
        );
        self.shared.newcomers.spawn(OnLane {
            lane: Lane::Newcomers,
            running: Some(Running {
                task: future,
                slot,
                registration: Registration {
                    shared: self.shared.clone(),
                    connection,
                },
            }),
        });
    }
}

/// Removes its connection from [`Shared::connections`] when the connection's task ends (or is
/// dropped with its runtime); it moves with the task between lanes.
struct Registration {
    shared: Arc<Shared>,
    connection: ConnectionId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.connections().remove(&self.connection);
    }
}

/// A connection's task on `lane`: polls the task until it ends, or until the connection's
/// wanted lane changes, then hands the unfinished task to the other lane's runtime.
struct OnLane {
    lane: Lane,
    /// `None` once the task ended or moved.
    running: Option<Running>,
}

/// An unfinished connection task and what moves with it.
struct Running {
    task: Task,
    slot: Arc<Slot>,
    registration: Registration,
}

impl Future for OnLane {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(running) = this.running.as_mut() else {
            return Poll::Ready(());
        };
        // Registered before the lane is read: a move asked for after the read wakes this task.
        running.slot.waker.register(cx.waker());
        let wanted = running.slot.lane();
        if wanted == this.lane {
            let done = running.task.as_mut().poll(cx);
            if done.is_ready() {
                this.running = None;
            }
            if this.lane == Lane::Newcomers {
                turn::give_way();
            }
            return done;
        }
        if let Some(running) = this.running.take() {
            let shared = running.registration.shared.clone();
            shared.handle(wanted).spawn(OnLane {
                lane: wanted,
                running: Some(running),
            });
        }
        Poll::Ready(())
    }
}

/// A task on the newcomers' lane (a handshake) that gives the CPU way after its polls, as
/// [`OnLane`] does for newcomers' connections.
struct GivesWay(Task);

impl Future for GivesWay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let done = self.0.as_mut().poll(cx);
        turn::give_way();
        done
    }
}

/// The newcomers' lane's turns on its CPU.
///
/// A lower priority (`nice`) gives the lane a smaller share of the CPU, but not a shorter
/// wait for the relay's threads: the kernel lets a running thread finish its time slice
/// (milliseconds) before a thread it woke runs on the same CPU, whatever their priorities.
/// Measured during a flood of newcomers' streams, the relay's worker waited up to 4 ms at a
/// time for the lane's thread to finish its slice, which was most of the users' p99. So the
/// lane's thread yields the CPU (`sched_yield`) once it has been busy for [`TURN`] without
/// parking: a relay thread waiting for the CPU runs then, and when none waits the yield
/// returns at once. The lane keeps its share; it only runs in shorter turns.
mod turn {
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    /// How long the lane's thread runs before it lets a waiting thread have the CPU.
    pub(super) const TURN: Duration = Duration::from_micros(200);

    thread_local! {
        /// When the lane's thread last woke or yielded; `None` while it is parked (and on
        /// every other thread).
        static SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
    }

    /// The thread woke up with work: a turn starts.
    pub(super) fn start() {
        SINCE.with(|since| since.set(Some(Instant::now())));
    }

    /// The thread parks: nothing to give way for.
    pub(super) fn end() {
        SINCE.with(|since| since.set(None));
    }

    /// Yields the CPU if this turn has lasted [`TURN`]; a new turn starts after it. Does
    /// nothing outside the lane's thread.
    pub(super) fn give_way() {
        SINCE.with(|since| {
            if since.get().is_some_and(|start| start.elapsed() >= TURN) {
                std::thread::yield_now();
                since.set(Some(Instant::now()));
            }
        });
    }

    #[cfg(test)]
    pub(super) fn turn_started() -> Option<Instant> {
        SINCE.with(Cell::get)
    }
}

/// Lowers the calling thread's CPU priority to `nice` (Linux: per thread).
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::process::setpriority_process(None, nice) {
        tracing::warn!(%error, nice, "could not lower the newcomers' lane priority; it runs at the relay's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn the_newcomers_lane_gives_way_after_a_turn_and_not_before() {
        turn::start();
        let first = turn::turn_started().expect("a turn started");
        turn::give_way();
        let kept = turn::turn_started().expect("still in a turn");
        // The turn stays unless this thread really was held up for a whole turn.
        assert!(kept == first || first.elapsed() >= turn::TURN);
        while first.elapsed() < turn::TURN {
            std::hint::spin_loop();
        }
        turn::give_way();
        assert!(turn::turn_started().expect("a new turn") > first);
        turn::end();
        turn::give_way();
        assert_eq!(turn::turn_started(), None, "a parked thread has no turn");
    }

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or_default().to_owned()
    }

    /// A task that reports the thread of each poll and waits for `go` between polls.
    async fn report_threads(
        mut go: tokio::sync::mpsc::UnboundedReceiver<()>,
        seen: tokio::sync::mpsc::UnboundedSender<String>,
    ) {
        let _ = seen.send(thread_name());
        // Each report ends a poll, so a move asked for after it takes effect by the next one.
        tokio::task::yield_now().await;
        while go.recv().await.is_some() {
            let _ = seen.send(thread_name());
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_connection_starts_on_the_newcomers_lane_moves_when_promoted_and_stays_demoted() {
        let (lanes, _runtime) = Lanes::start(0, Duration::ZERO, Metrics::new()).expect("lanes");
        // The relay's runtime here is the test's, whose workers have tokio's default name.
        let relay_thread = "tokio-rt-worker".to_owned();
        let (go_tx, go_rx) = tokio::sync::mpsc::unbounded_channel();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let peer = PeerId::random();
        let connection = ConnectionId::new_unchecked(7);
        lanes.exec_established(peer, connection, Box::pin(report_threads(go_rx, seen_tx)));

        assert_eq!(seen.recv().await.as_deref(), Some("kith-newcomers"));
        assert_eq!(lanes.lane_of(connection), Some(Lane::Newcomers));

        // A move takes effect at the task's next poll: one more report may still come from
        // the poll that was under way when it was asked for.
        let next = |go: &tokio::sync::mpsc::UnboundedSender<()>| {
            go.send(()).expect("task alive");
        };
        lanes.promote(connection);
        assert_eq!(lanes.lane_of(connection), Some(Lane::Relay));
        next(&go_tx);
        let mut thread = seen.recv().await.expect("a report");
        if thread != relay_thread {
            next(&go_tx);
            thread = seen.recv().await.expect("a report");
        }
        assert_eq!(thread, relay_thread);
        next(&go_tx);
        assert_eq!(seen.recv().await, Some(relay_thread.clone()), "stays");

        lanes.demote_peer(&peer);
        next(&go_tx);
        let mut thread = seen.recv().await.expect("a report");
        if thread != "kith-newcomers" {
            next(&go_tx);
            thread = seen.recv().await.expect("a report");
        }
        assert_eq!(thread, "kith-newcomers");
        lanes.promote(connection);
        for _ in 0..2 {
            next(&go_tx);
            assert_eq!(
                seen.recv().await.as_deref(),
                Some("kith-newcomers"),
                "demoted for good"
            );
        }
        assert_eq!(lanes.lane_of(connection), Some(Lane::Newcomers));

        // The task ends: its connection is forgotten.
        drop(go_tx);
        assert_eq!(seen.recv().await, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while lanes.lane_of(connection).is_some() {
            assert!(tokio::time::Instant::now() < deadline, "never forgotten");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_connection_younger_than_the_newcomers_time_is_not_promoted() {
        let (lanes, _runtime) =
            Lanes::start(0, Duration::from_secs(3_600), Metrics::new()).expect("lanes");
        let connection = ConnectionId::new_unchecked(9);
        let (_hold, held) = tokio::sync::oneshot::channel::<()>();
        lanes.exec_established(
            PeerId::random(),
            connection,
            Box::pin(async move {
                let _ = held.await;
            }),
        );
        lanes.promote(connection);
        assert_eq!(lanes.lane_of(connection), Some(Lane::Newcomers));
    }

    /// Makes `connection` look `by` older, as if it had been a newcomer that much longer.
    fn backdate(lanes: &Lanes, connection: ConnectionId, by: Duration) {
        let mut connections = lanes.shared.connections();
        let entry = connections.get_mut(&connection).expect("a connection");
        entry.since = entry
            .since
            .checked_sub(by)
            .expect("an instant that far back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_refused_peer_is_a_newcomer_again_for_the_newcomers_time() {
        let newcomer_for = Duration::from_secs(3_600);
        let (lanes, _runtime) = Lanes::start(0, newcomer_for, Metrics::new()).expect("lanes");
        let peer = PeerId::random();
        let (first, second) = (
            ConnectionId::new_unchecked(10),
            ConnectionId::new_unchecked(11),
        );
        let (_hold, held) = tokio::sync::watch::channel(());
        for connection in [first, second] {
            let mut held = held.clone();
            lanes.exec_established(
                peer,
                connection,
                Box::pin(async move {
                    let _ = held.changed().await;
                }),
            );
            backdate(&lanes, connection, newcomer_for);
            lanes.promote(connection);
            assert_eq!(lanes.lane_of(connection), Some(Lane::Relay));
        }

        lanes.refused(&peer);
        for connection in [first, second] {
            assert_eq!(lanes.lane_of(connection), Some(Lane::Newcomers));
            // Its clock started over: a request now does not bring it back.
            lanes.promote(connection);
            assert_eq!(lanes.lane_of(connection), Some(Lane::Newcomers));
        }
        // Not for good, unlike a strike: once the newcomers' time has passed again, it is.
        backdate(&lanes, first, newcomer_for);
        lanes.promote(first);
        assert_eq!(lanes.lane_of(first), Some(Lane::Relay));
        assert_eq!(lanes.lane_of(second), Some(Lane::Newcomers));
        assert!(asks_to_wait(&kith_protocol::Reject::QuotaExceeded));
        assert!(!asks_to_wait(&kith_protocol::Reject::Malformed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_task_moved_while_waiting_is_woken_by_what_it_waits_for() {
        // A task parked on a channel is moved, then the channel gets a value: the moved task
        // (not the ended one) must see it.
        let (lanes, _runtime) = Lanes::start(0, Duration::ZERO, Metrics::new()).expect("lanes");
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(u32, String)>();
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let connection = ConnectionId::new_unchecked(8);
        lanes.exec_established(
            PeerId::random(),
            connection,
            Box::pin(async move {
                let mut rx = rx;
                // Counted once the channel has been polled: the task then waits on it.
                let value = std::future::poll_fn(|cx| {
                    let polled = Pin::new(&mut rx).poll(cx);
                    counted.fetch_add(1, Ordering::SeqCst);
                    polled
                })
                .await
                .unwrap_or(0);
                let _ = done_tx.send((value, thread_name()));
            }),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while polls.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never polled");
            tokio::task::yield_now().await;
        }
        lanes.promote(connection);
        while lanes.lane_of(connection) != Some(Lane::Relay) {
            tokio::task::yield_now().await;
        }
        tx.send(42).expect("task alive");
        let (value, thread) = done_rx.await.expect("the moved task finished");
        assert_eq!(value, 42);
        assert_ne!(thread, "kith-newcomers");
    }
}
