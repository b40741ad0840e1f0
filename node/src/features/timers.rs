//! Temporary chats: each conversation's disappearing-message timer, the expiry every message of
//! a timed conversation carries, and the sweep that deletes expired messages everywhere the
//! node keeps them; plus `kith export` of a permanent chat's history.
//!
//! Flow:
//! - `kith chat timer WITH 5m` ([`Node::set_timer`]) records the timer and sends a
//!   [`Body::Timer`] in the conversation (sealed with Olm one-to-one, as group bodies travel in
//!   a group), which every side shows as a history line and applies in Lamport order (a later
//!   change wins). In a group, a change by a non-admin is ignored while the timer is
//!   admins-only, and only an admin may make it so.
//! - Every message sent while a timer is on carries `expires_at_ms = sent_at_ms + timer` in its
//!   signed header ([`Node::expiry_for`]); relays drop it then (see `kith_protocol::timer`).
//! - A receiver checks a message's expiry ([`Node::check_expiry`]) and keeps it until its own
//!   deadline ([`kith_protocol::timer::receiver_deadline`]).
//! - The store indexes timed messages by deadline (`ex/`). [`Node::expiry_loop`], a task the
//!   node owns, sweeps at start and then at each deadline (at most a second late): the message
//!   record, its conversation index, outbox entry, receipt states, attachment record and its
//!   files go (received file, partial download, thumbnail inside the record, the sent pack;
//!   never the user's own original file), a small record of its final state stays (`et/`, so
//!   `kith status` says `expired` for a message never delivered), the store is flushed, and an
//!   `expired` event names the conversation and the id.

use std::time::Duration;

use kith_protocol::{timer, Body, Envelope, GroupId, MessageId, MessageState, Reject};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::clock::now_ms;
use crate::core::hooks::{self, Feature};
use crate::core::store::{Batch, Direction, Expired, StoredMessage, Thread, TimerRecord};
use crate::core::TimerLine;
use crate::core::{MessageView, Node, NodeError, NodeEvent, Outgoing};
use crate::shutdown::Signal;
use futures::future::BoxFuture;

/// How often the sweep looks at the expiry index when nothing is due sooner.
const SWEEP_IDLE: Duration = Duration::from_secs(1);

/// Messages deleted per sweep step (one flush each).
const SWEEP_BATCH: usize = 256;

/// The text every history line of a timer change starts with.
pub const LINE_MARK: &str = "⏱";

/// The history line of a group timer change that its author was not allowed to make.
pub const IGNORED_TEXT: &str =
    "⏱ a timer change by a member who may not change it (only admins may) was ignored";

/// The text of a timer change's history line.
pub fn line_text(secs: Option<u64>) -> String {
    match secs {
        Some(secs) => format!(
            "{LINE_MARK} disappearing messages: {}",
            timer::format_secs(secs)
        ),
        None => format!("{LINE_MARK} disappearing messages: off"),
    }
}

/// A conversation's timer as `kith chat timer --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimerView {
    /// The conversation as the user named it.
    pub with: String,
    /// The peer id or group id.
    pub conversation: String,
    /// The timer in seconds, `null` when the chat is permanent.
    pub timer_secs: Option<u64>,
    /// In a group: only admins may change it.
    pub admins_only: bool,
    /// The shortest timer this node lets its user set, in seconds.
    pub min_secs: u64,
    /// The history line's message id, when this call changed the timer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// One line of an export ([`Node::export`]).
#[derive(Debug, Clone, Serialize)]
pub struct ExportLine {
    /// The message id.
    pub id: String,
    /// `in` or `out`.
    pub direction: Direction,
    /// The author's peer id.
    pub from: String,
    /// The author's name, if known.
    pub from_name: Option<String>,
    /// The text (empty for a file).
    pub text: String,
    /// The sender's clock (unix ms).
    pub sent_at_ms: u64,
    /// The tick.
    pub state: MessageState,
    /// The attached file: name, size, type, hash and where it is on this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<crate::core::AttachmentView>,
    /// For a timer change's line: the timer it set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer: Option<TimerLine>,
}

/// A whole export: the header line's fields and the messages.
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    /// The format's name and version.
    pub format: &'static str,
    /// The peer id or group id.
    pub conversation: String,
    /// The contact's or group's name, if known.
    pub name: Option<String>,
    /// When the export was made (unix ms).
    pub exported_at_ms: u64,
    /// The messages, oldest first.
    pub messages: Vec<ExportLine>,
}

/// The export format's name.
pub const EXPORT_FORMAT: &str = "kith-export/1";

/// The conversation a user named.
enum Target {
    Peer(PeerId),
    Group(kith_protocol::group::State),
}

impl Target {
    fn thread(&self) -> Thread<'_> {
        match self {
            Target::Peer(peer) => Thread::Peer(peer),
            Target::Group(state) => Thread::Group(&state.group),
        }
    }

    fn id(&self) -> String {
        match self {
            Target::Peer(peer) => peer.to_string(),
            Target::Group(state) => state.group.to_string(),
        }
    }
}

fn store_failed(e: &dyn std::fmt::Display) -> Reject {
    tracing::error!(error = %e, "store failed");
    Reject::StoreFailed
}

/// Whether a change `(lamport, from)` comes after the recorded one.
fn newer(record: Option<&TimerRecord>, lamport: u64, from: &[u8]) -> bool {
    record.is_none_or(|r| (lamport, from) > (r.lamport, r.from.as_slice()))
}

impl Node {
    fn target(&self, with: &str) -> Result<Target, NodeError> {
        if let Some(state) = self.plugins().rooms.target(self, with)? {
            return Ok(Target::Group(state));
        }
        Ok(Target::Peer(self.resolve(with)?))
    }

    /// The timer of the conversation `with` (a contact, peer id or group).
    pub fn timer(&self, with: &str) -> Result<TimerView, NodeError> {
        let target = self.target(with)?;
        let record = self.store().timer(target.thread())?;
        Ok(TimerView {
            with: with.to_owned(),
            conversation: target.id(),
            timer_secs: record.as_ref().and_then(|r| r.secs),
            admins_only: record.is_some_and(|r| r.admins_only),
            min_secs: self.min_timer_secs(),
            id: None,
        })
    }

    /// Sets the timer of the conversation `with`: records it and sends the change to the other
    /// side (or the group) as a message shown in the history. `admins_only` (groups only, an
    /// admin's choice) says who may change it next; `None` keeps the current rule.
    pub async fn set_timer(
        &self,
        with: &str,
        secs: Option<u64>,
        admins_only: Option<bool>,
    ) -> Result<TimerView, NodeError> {
        if let Some(secs) = secs {
            timer::check(secs, self.config().min_timer_secs)
                .map_err(|e| NodeError::Invalid(e.to_string()))?;
        }
        let target = self.target(with)?;
        let me = self.peer_id();
        let current = self.store().timer(target.thread())?;
        let text = line_text(secs);
        let id = MessageId::random();
        let (lamport, admins_only) = match &target {
            Target::Peer(_) if admins_only == Some(true) => {
                return Err(NodeError::Invalid(
                    "only a group's timer can be for admins only".into(),
                ))
            }
            Target::Peer(peer) => (self.next_lamport(peer)?, false),
            Target::Group(state) => {
                let admin = state.admins.contains(&me);
                let locked = current.as_ref().is_some_and(|r| r.admins_only);
                if !admin && (locked || admins_only.is_some()) {
                    return Err(NodeError::Invalid(format!(
                        "only the admins of {} may change {}",
                        state.name,
                        if locked {
                            "its timer"
                        } else {
                            "who sets its timer"
                        }
                    )));
                }
                // The group send takes the next Lamport time; the record takes the one after
                // the current clock, which it will be.
                let next = kith_protocol::lamport::next(self.store().group_lamport(&state.group)?);
                (next, admins_only.unwrap_or(locked))
            }
        };
        let record = TimerRecord {
            secs,
            lamport,
            from: me.to_bytes(),
            admins_only,
        };
        let body = Body::Timer { secs, admins_only };
        match &target {
            Target::Group(state) => {
                let mut batch = Batch::new();
                batch.put_timer(target.thread(), &record);
                batch.put_timer_line(&id, secs);
                self.send_group_with(state.clone(), id, body, &text, batch, None)
                    .await?;
                // The send took the group's next Lamport time, which may be ahead of the
                // stored clock this record was given: record the change at its real time.
                if let Some(line) = self.store().message(&me, &id)? {
                    if line.lamport != record.lamport {
                        let mut fix = Batch::new();
                        fix.put_timer(
                            target.thread(),
                            &TimerRecord {
                                lamport: line.lamport,
                                ..record.clone()
                            },
                        );
                        self.store().commit(fix).await?;
                    }
                }
            }
            Target::Peer(peer) => {
                let mut batch = Batch::new();
                batch.put_timer(target.thread(), &record);
                batch.put_timer_line(&id, secs);
                let message = Outgoing {
                    id,
                    body,
                    text,
                    lamport: Some(lamport),
                    timed: false,
                    batch,
                };
                self.send_to_peer(*peer, message, None).await?;
            }
        }
        Ok(TimerView {
            with: with.to_owned(),
            conversation: target.id(),
            timer_secs: secs,
            admins_only,
            min_secs: self.min_timer_secs(),
            id: Some(id.to_string()),
        })
    }

    /// The shortest timer the user may set ([`crate::Config::min_timer_secs`], never below
    /// the protocol's minimum).
    fn min_timer_secs(&self) -> u64 {
        self.config().min_timer_secs.max(timer::MIN_SECS)
    }

    /// The expiry a message sent now at `sent_at_ms` in `thread` carries: the timer in force.
    pub(crate) fn expiry_for(
        &self,
        thread: Thread<'_>,
        sent_at_ms: u64,
    ) -> Result<Option<u64>, NodeError> {
        Ok(self
            .store()
            .timer(thread)?
            .and_then(|r| r.secs)
            .map(|secs| timer::expiry(sent_at_ms, secs)))
    }

    /// Checks an inbound envelope's expiry: refused once it passed beyond the tolerated skew,
    /// or when it makes no sense (before its send time, longer than the longest timer).
    pub(crate) fn check_expiry(&self, envelope: &Envelope) -> Result<(), Reject> {
        let Some(at) = envelope.expires_at_ms else {
            return Ok(());
        };
        match timer::receiver_deadline(
            envelope.sent_at_ms,
            at,
            now_ms(),
            self.config().expiry_skew_ms,
        ) {
            Ok(_) => Ok(()),
            Err(timer::ExpiryError::Expired { .. }) => {
                tracing::debug!(from = %envelope.from, id = %envelope.id, "refusing an expired envelope");
                Err(Reject::Expired)
            }
            Err(e) => {
                tracing::warn!(from = %envelope.from, id = %envelope.id, error = %e, "refusing an envelope with a nonsense expiry");
                Err(Reject::Malformed)
            }
        }
    }

    /// A received message as it is stored: deleted at this node's own deadline for it.
    pub(crate) fn received(&self, envelope: &Envelope, text: String) -> StoredMessage {
        let mut msg = StoredMessage::received(envelope, text);
        msg.expires_at_ms = envelope.expires_at_ms.map(|at| {
            timer::receiver_deadline(
                envelope.sent_at_ms,
                at,
                now_ms(),
                self.config().expiry_skew_ms,
            )
            .unwrap_or(at)
        });
        msg
    }

    /// Records a one-to-one timer change from `envelope`'s sender (not flushed; the caller
    /// stores its history line).
    pub(crate) fn stage_timer(
        &self,
        envelope: &Envelope,
        secs: Option<u64>,
        batch: &mut Batch,
    ) -> Result<(), Reject> {
        let from = envelope.from;
        let thread = Thread::Peer(&from);
        let current = self.store().timer(thread).map_err(|e| store_failed(&e))?;
        let from_bytes = from.to_bytes();
        if newer(current.as_ref(), envelope.lamport, &from_bytes) {
            batch.put_timer(
                thread,
                &TimerRecord {
                    secs,
                    lamport: envelope.lamport,
                    from: from_bytes,
                    admins_only: false,
                },
            );
        }
        batch.put_timer_line(&envelope.id, secs);
        Ok(())
    }

    /// Records a group's timer change from `envelope`'s sender, if the group's rule lets it
    /// (not flushed; the caller stores its history line). `false` when it is ignored.
    pub(crate) fn stage_group_timer(
        &self,
        envelope: &Envelope,
        state: &kith_protocol::group::State,
        secs: Option<u64>,
        admins_only: bool,
        batch: &mut Batch,
    ) -> Result<bool, Reject> {
        let thread = Thread::Group(&state.group);
        let current = self.store().timer(thread).map_err(|e| store_failed(&e))?;
        let admin = state.admins.contains(&envelope.from);
        let locked = current.as_ref().is_some_and(|r| r.admins_only);
        if !admin && (locked || admins_only) {
            tracing::warn!(from = %envelope.from, group = %state.group, "ignoring a timer change by a member who may not make it");
            return Ok(false);
        }
        let from_bytes = envelope.from.to_bytes();
        if newer(current.as_ref(), envelope.lamport, &from_bytes) {
            batch.put_timer(
                thread,
                &TimerRecord {
                    secs,
                    lamport: envelope.lamport,
                    from: from_bytes,
                    admins_only: if admin { admins_only } else { locked },
                },
            );
        }
        batch.put_timer_line(&envelope.id, secs);
        Ok(true)
    }

    /// Fills in the timer of history lines that announce a timer change.
    pub(crate) fn with_timer_lines(&self, views: &mut [MessageView]) {
        for view in views.iter_mut() {
            if !view.text.starts_with(LINE_MARK) {
                continue;
            }
            let Ok(id) = view.id.parse::<MessageId>() else {
                continue;
            };
            if let Ok(Some(secs)) = self.store().timer_line(&id) {
                view.timer = Some(TimerLine { timer_secs: secs });
            }
        }
    }

    // ---- the sweep ------------------------------------------------------------------------------

    /// Deletes every message whose deadline passed at `now_ms`; returns how many went.
    pub async fn sweep_expired(&self, now_ms: u64) -> Result<usize, NodeError> {
        let mut deleted = 0;
        loop {
            let due = self.store().expiries_due(now_ms, SWEEP_BATCH)?;
            if due.is_empty() {
                // Every message of the buckets that ended is deleted (and flushed): their
                // keys go, and with them what sled's log still holds of those messages.
                self.store().destroy_expiry_keys(now_ms)?;
                return Ok(deleted);
            }
            let mut batch = Batch::new();
            let mut gone = Vec::new();
            let mut files = Vec::new();
            for (at, (from, id)) in &due {
                let Some(msg) = self.store().message(from, id)? else {
                    batch.remove_expiry(*at, from, id);
                    continue;
                };
                let group = self.store().message_group(id)?;
                let state = match msg.direction {
                    Direction::Out if msg.state < MessageState::Delivered => MessageState::Expired,
                    _ => msg.state,
                };
                let conversation = match group {
                    Some(g) => g.to_string(),
                    None => msg.peer.to_string(),
                };
                files.extend(self.expired_files(id));
                batch.remove_message(&msg, group.as_ref());
                batch.put_expired(
                    id,
                    &Expired {
                        conversation: conversation.clone(),
                        direction: msg.direction,
                        state,
                        deleted_at_ms: now_ms,
                    },
                );
                gone.push((*id, conversation, group, state));
            }
            self.store().apply_in_order(batch)?;
            self.store().flush().await?;
            for path in files {
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot delete an expired file")
                    }
                }
            }
            for (id, conversation, group, state) in gone {
                self.forget_outbox(&id);
                tracing::debug!(%id, %conversation, %state, "message expired");
                self.emit(NodeEvent::Expired {
                    id: id.to_string(),
                    conversation,
                    group: group.map(|g: GroupId| g.to_string()),
                    state,
                });
                deleted += 1;
            }
        }
    }

    /// Sweeps at start, then at each deadline (at most [`SWEEP_IDLE`] late), until shutdown.
    pub(crate) async fn expiry_loop(self, mut shutdown: Signal) {
        loop {
            let now = now_ms();
            if let Err(e) = self.sweep_expired(now).await {
                tracing::error!(error = %e, "cannot delete expired messages");
            }
            let next = self.store().next_expiry().ok().flatten();
            let wait = next
                .map(|at| Duration::from_millis(at.saturating_sub(now_ms())))
                .unwrap_or(SWEEP_IDLE)
                .min(SWEEP_IDLE);
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    // ---- export ---------------------------------------------------------------------------------

    /// The history of the permanent chat `with`, oldest first, with file references. Messages
    /// that will disappear are left out; a chat whose timer is on is refused.
    pub fn export(&self, with: &str) -> Result<Export, NodeError> {
        let target = self.target(with)?;
        if let Some(secs) = self.store().timer(target.thread())?.and_then(|r| r.secs) {
            return Err(NodeError::Invalid(format!(
                "{with} is a temporary chat (timer {}): only permanent chats are exported; turn the timer off first",
                timer::format_secs(secs)
            )));
        }
        let views = self.messages(Some(with))?;
        let mut messages = Vec::with_capacity(views.len());
        for view in views {
            if view.expires_at_ms.is_some() {
                continue;
            }
            messages.push(ExportLine {
                id: view.id,
                direction: view.direction,
                from: view.from,
                from_name: view.from_name,
                text: view.text,
                sent_at_ms: view.sent_at_ms,
                state: view.state,
                file: view.attachment,
                timer: view.timer,
            });
        }
        let name = match &target {
            Target::Peer(peer) => self.name_of(peer),
            Target::Group(state) => Some(state.name.clone()),
        };
        Ok(Export {
            format: EXPORT_FORMAT,
            conversation: target.id(),
            name,
            exported_at_ms: now_ms(),
            messages,
        })
    }
}

// ---- plugged into the core ------------------------------------------------------------------

/// The temporary-chats feature (its state is in the store).
#[derive(Debug, Default)]
pub struct State;

impl Feature for State {
    fn tasks(&self, node: &Node, shutdown: &Signal) -> Vec<BoxFuture<'static, ()>> {
        vec![Box::pin(node.clone().expiry_loop(shutdown.clone()))]
    }

    fn original_body(&self, node: &Node, id: &MessageId) -> Result<Option<Body>, NodeError> {
        Ok(node.store().timer_line(id)?.map(|secs| Body::Timer {
            secs,
            admins_only: false,
        }))
    }
}

impl hooks::Timers for State {
    fn expiry_for(
        &self,
        node: &Node,
        thread: Thread<'_>,
        sent_at_ms: u64,
    ) -> Result<Option<u64>, NodeError> {
        node.expiry_for(thread, sent_at_ms)
    }

    fn check(&self, node: &Node, envelope: &Envelope) -> Result<(), Reject> {
        node.check_expiry(envelope)
    }

    fn stage(
        &self,
        node: &Node,
        envelope: &Envelope,
        room: Option<&kith_protocol::group::State>,
        secs: Option<u64>,
        admins_only: bool,
        batch: &mut Batch,
    ) -> Result<String, Reject> {
        match room {
            Some(room) => Ok(
                if node.stage_group_timer(envelope, room, secs, admins_only, batch)? {
                    line_text(secs)
                } else {
                    IGNORED_TEXT.to_owned()
                },
            ),
            None => {
                node.stage_timer(envelope, secs, batch)?;
                Ok(line_text(secs))
            }
        }
    }

    fn with_lines(&self, node: &Node, views: &mut [MessageView]) {
        node.with_timer_lines(views);
    }
}
