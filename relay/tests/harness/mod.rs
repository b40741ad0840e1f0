//! Test harness: start relays on loopback with temp dirs, and a small libp2p client that speaks
//! `/kith/mailbox/1` to the relay and answers `/kith/dm/1` pushes.
//!
//! Every wait has a deadline; nothing sleeps to synchronise.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use kith_net::codec::Message;
use kith_net::{DmCodec, MailboxCodec};
use kith_protocol::envelope::Header;
use kith_protocol::mailbox::{self, Item, Request, Response};
use kith_protocol::{dm, Body, Destination, Envelope, MessageId};
use kith_relay::{Clock, Config, Running};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A clock the test moves by hand.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start_ms)))
    }

    pub fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn advance_ms(&self, by: u64) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }

    pub fn clock(&self) -> Clock {
        let inner = self.0.clone();
        Clock::from_fn(move || inner.load(Ordering::SeqCst))
    }
}

/// A relay configuration on `127.0.0.1/tcp/0` in `dir`.
pub fn config(dir: &std::path::Path) -> Config {
    Config::ephemeral(dir)
}

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(NetworkBehaviour)]
pub struct ClientBehaviour {
    pub mailbox: request_response::Behaviour<MailboxCodec>,
    pub dm: request_response::Behaviour<DmCodec>,
}

/// A bare node: a keypair, a swarm connected to one relay, and the pushes it has accepted.
pub struct Client {
    pub keypair: Keypair,
    pub peer_id: PeerId,
    pub relay: PeerId,
    pub pushes: Vec<Envelope>,
    /// Pushes received and not answered yet ([`Client::hold_pushes`]).
    pub held: Vec<(u64, request_response::ResponseChannel<dm::Response>)>,
    /// Whether pushes are held unanswered instead of accepted.
    hold: bool,
    swarm: Swarm<ClientBehaviour>,
    next_req: u64,
}

impl Client {
    /// A client connected to `relay`.
    pub async fn connect(relay: &Running) -> anyhow::Result<Self> {
        let addr = relay
            .listen_addrs
            .first()
            .cloned()
            .context("relay has no address")?;
        Self::connect_to(Keypair::generate_ed25519(), relay.peer_id, addr).await
    }

    /// A client with identity `keypair` connected to the relay `peer` at `addr`.
    pub async fn connect_to(
        keypair: Keypair,
        peer: PeerId,
        addr: Multiaddr,
    ) -> anyhow::Result<Self> {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| ClientBehaviour {
                mailbox: request_response::Behaviour::with_codec(
                    MailboxCodec::new(mailbox::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(mailbox::PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    kith_net::request_response_config(),
                ),
                dm: request_response::Behaviour::with_codec(
                    DmCodec::new(dm::MAX_FRAME_BYTES),
                    [(StreamProtocol::new(dm::PROTOCOL), ProtocolSupport::Inbound)],
                    kith_net::request_response_config(),
                ),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.dial(addr)?;
        let mut client = Self {
            peer_id: keypair.public().to_peer_id(),
            keypair,
            relay: peer,
            pushes: Vec::new(),
            held: Vec::new(),
            hold: false,
            swarm,
            next_req: 1,
        };
        client
            .drive_until(|event| match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if *peer_id == peer => Some(()),
                _ => None,
            })
            .await
            .context("connecting to the relay")?;
        Ok(client)
    }

    /// Seals a chat envelope from this client to `to`.
    pub fn seal(&self, to: PeerId, text: &str) -> Envelope {
        self.seal_with(Destination::Peer(to), text, None)
    }

    pub fn seal_with(&self, to: Destination, text: &str, expires_at_ms: Option<u64>) -> Envelope {
        Envelope::seal(
            &self.keypair,
            Header {
                id: MessageId::random(),
                to,
                sent_at_ms: 1,
                lamport: 1,
                expires_at_ms,
            },
            &Body::Chat { text: text.into() },
        )
        .expect("sealing a test envelope")
    }

    /// Polls the swarm, answering pushes, until `pick` returns `Some` for an event.
    async fn drive_until<T>(
        &mut self,
        mut pick: impl FnMut(&SwarmEvent<ClientBehaviourEvent>) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let event = tokio::time::timeout_at(deadline, self.swarm.select_next_some())
                .await
                .map_err(|_| anyhow!("timed out"))?;
            if let Some(value) = pick(&event) {
                return Ok(value);
            }
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: SwarmEvent<ClientBehaviourEvent>) {
        if let SwarmEvent::Behaviour(ClientBehaviourEvent::Dm(request_response::Event::Message {
            message:
                request_response::Message::Request {
                    request: Message::Valid(request),
                    channel,
                    ..
                },
            ..
        })) = event
        {
            let req_id = request.req_id;
            self.pushes.push(request.envelope);
            if self.hold {
                self.held.push((req_id, channel));
                return;
            }
            let _ = self
                .swarm
                .behaviour_mut()
                .dm
                .send_response(channel, dm::Response::Accepted { req_id });
        }
    }

    /// Sends a request (valid or raw bytes) and waits for the answer.
    pub async fn request(&mut self, request: Message<Request>) -> anyhow::Result<Response> {
        let relay = self.relay;
        let id = self
            .swarm
            .behaviour_mut()
            .mailbox
            .send_request(&relay, request);
        let mut outcome = None;
        self.drive_until(|event| match event {
            SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(
                request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                },
            )) if *request_id == id => {
                outcome = Some(Ok(response.clone()));
                Some(())
            }
            SwarmEvent::Behaviour(ClientBehaviourEvent::Mailbox(
                request_response::Event::OutboundFailure {
                    request_id, error, ..
                },
            )) if *request_id == id => {
                outcome = Some(Err(anyhow!("request failed: {error}")));
                Some(())
            }
            _ => None,
        })
        .await?;
        outcome.unwrap_or_else(|| Err(anyhow!("no outcome")))
    }

    fn req_id(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    pub async fn deposit(&mut self, envelope: Envelope) -> anyhow::Result<Response> {
        let req_id = self.req_id();
        self.request(Message::Valid(Request::Deposit {
            req_id,
            envelope,
            class: Default::default(),
        }))
        .await
    }

    pub async fn fetch(&mut self, after: Option<u64>, limit: u32) -> anyhow::Result<Response> {
        let req_id = self.req_id();
        self.request(Message::Valid(Request::Fetch {
            req_id,
            after,
            limit,
        }))
        .await
    }

    /// Every entry waiting in this client's mailbox, following `more`.
    pub async fn fetch_all(&mut self) -> anyhow::Result<Vec<Item>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            match self.fetch(after, 256).await? {
                Response::Batch { items, more, .. } => {
                    after = items.last().map(|i| i.seq).or(after);
                    all.extend(items);
                    if !more {
                        return Ok(all);
                    }
                }
                other => bail!("fetch answered {other:?}"),
            }
        }
    }

    pub async fn ack(&mut self, seqs: Vec<u64>) -> anyhow::Result<Response> {
        let req_id = self.req_id();
        self.request(Message::Valid(Request::Ack { req_id, seqs }))
            .await
    }

    /// From now on pushes are held unanswered (the relay sees them in flight) until
    /// [`Client::release_pushes`].
    pub fn hold_pushes(&mut self) {
        self.hold = true;
    }

    /// Accepts the held pushes, and the ones to come at once.
    pub fn release_pushes(&mut self) {
        self.hold = false;
        for (req_id, channel) in self.held.drain(..) {
            let _ = self
                .swarm
                .behaviour_mut()
                .dm
                .send_response(channel, dm::Response::Accepted { req_id });
        }
    }

    /// Drives the swarm until `count` pushes have been received (and accepted, unless held).
    pub async fn wait_pushes(&mut self, count: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.pushes.len() < count {
            let event = tokio::time::timeout_at(deadline, self.swarm.select_next_some())
                .await
                .map_err(|_| anyhow!("timed out waiting for {count} pushes"))?;
            self.on_event(event);
        }
        Ok(())
    }
}
