//! The end-to-end harness: start nodes (and relays) in-process on loopback with temporary
//! homes, drive them through their handles, and wait on conditions with deadlines (never sleep as
//! synchronisation). Also a bare libp2p peer ([`RawPeer`]) for sending hostile input.

pub mod attack;
pub mod bench;
pub mod group_bench;
pub mod media_bench;
pub mod mls_bench;
pub mod presence;
pub mod process;
pub mod relay_bench;
pub mod scan;
pub mod webdriver;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use kith_net::codec::Message;
use kith_net::{DmCodec, MailboxCodec};
use kith_node::{Config, Node, Running, Settings};
use kith_protocol::{dm, mailbox};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity::Keypair, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};

/// How long any awaited condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A request frame that is well framed but not CBOR of any request: every kith protocol refuses
/// it as malformed (send it as `Message::Raw`).
pub fn malformed_frame() -> Vec<u8> {
    let body = [0xffu8, 0x00, 0x13, 0x37];
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Installs a test log subscriber once (set `KITH_LOG=debug` to see the nodes' logs).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_test_writer()
        .try_init();
}

/// The same logs as [`init_logs`], to standard error: for tools (kith-bench), whose child
/// servers' standard output is a pipe their parent stops reading after the address line.
pub fn init_logs_to_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(std::io::stderr)
        .try_init();
}

/// `KITH_LOG`, or `warn`.
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("KITH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
}

/// Polls `condition` until it returns `Some`, or fails after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut condition: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh identity dialling `addr` with `dm_streams`' behaviour on `protocol`: its connection
/// keeps raw streams ready to take ([`kith_node::net::dm_streams::Streams::take`]), on which a
/// test writes what it wants. The swarm runs until the returned task is aborted.
pub fn raw_streams(
    addr: &Multiaddr,
    protocol: &'static str,
) -> Result<(
    kith_node::net::dm_streams::Streams,
    tokio::task::JoinHandle<()>,
)> {
    let (events, _inbound) = tokio::sync::mpsc::channel(8);
    let (behaviour, streams) =
        kith_node::net::dm_streams::Behaviour::new(libp2p::StreamProtocol::new(protocol), events);
    let mut swarm = attack::attacks::tcp_swarm(Keypair::generate_ed25519(), || behaviour)?;
    swarm.dial(addr.clone())?;
    // The connection task opens the ready streams on its own: keep the swarm going.
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    Ok((streams, driver))
}

/// A node under test with its own temporary home.
pub struct TestNode {
    /// The running node.
    pub running: Option<Running>,
    /// Its home directory.
    pub home: PathBuf,
    /// Its config (for restarts).
    pub config: Config,
    _dir: Option<tempfile::TempDir>,
}

impl TestNode {
    /// Creates an identity in a fresh temporary home and starts the node on loopback.
    pub async fn start(name: &str, relays: Vec<Multiaddr>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let home = dir.path().to_path_buf();
        Self::init_home(&home, name)?;
        let mut config = Config::loopback(&home);
        config.relays = relays;
        let mut node = Self::start_in(config).await?;
        node._dir = Some(dir);
        Ok(node)
    }

    /// Creates an identity and settings in `home`.
    pub fn init_home(home: &Path, name: &str) -> Result<()> {
        kith_node::identity::create(home)?;
        Settings {
            name: name.into(),
            ..Settings::default()
        }
        .save(home)?;
        Ok(())
    }

    /// Starts a node with an explicit config (its home must hold an identity).
    pub async fn start_in(config: Config) -> Result<Self> {
        let running = kith_node::start(config.clone())
            .await
            .context("starting node")?;
        Ok(Self {
            running: Some(running),
            home: config.home.clone(),
            config,
            _dir: None,
        })
    }

    /// The node's handle.
    pub fn node(&self) -> &Node {
        &self.running.as_ref().expect("node is running").node
    }

    /// Its peer id.
    pub fn peer_id(&self) -> PeerId {
        self.node().peer_id()
    }

    /// Its first direct listen address (not a relay circuit: a node that waited for its home
    /// relay at start may list its circuit first).
    pub async fn addr(&self) -> Multiaddr {
        self.node()
            .listen_addrs()
            .await
            .into_iter()
            .find(|a| {
                !a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
            })
            .expect("a direct listen address")
    }

    /// Its TCP listen address (for peers that speak TCP only).
    pub async fn tcp_addr(&self) -> Multiaddr {
        self.node()
            .listen_addrs()
            .await
            .into_iter()
            .find(|a| {
                a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)))
            })
            .expect("a TCP listen address")
    }

    /// Stops the node, keeping its home.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    /// Starts it again on the same home, listening on `listen` (to keep its address).
    pub async fn restart_on(&mut self, listen: Multiaddr) -> Result<()> {
        self.stop().await;
        let mut config = self.config.clone();
        config.listen = vec![listen];
        self.running = Some(kith_node::start(config).await?);
        Ok(())
    }

    /// The state of an outgoing message.
    pub fn state(&self, id: &str) -> Option<kith_protocol::MessageState> {
        self.node().status(id).ok().map(|s| s.state)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // Dropping without `stop` aborts the tasks with the runtime; nothing to flush by hand.
    }
}

/// Adds `other` as contact `name` of `node`, with its direct address.
pub async fn befriend(node: &TestNode, name: &str, other: &TestNode) -> Result<()> {
    let addr = other.addr().await.to_string();
    node.node()
        .add_contact(name, &other.peer_id().to_string(), &[addr])
        .await?;
    Ok(())
}

/// Makes each of `others` a contact of every node in `nodes` (by peer id, named after its last
/// 8 characters): a group one of them adds such a node to is joined at once, not left waiting
/// as a stranger's invitation.
pub async fn know(nodes: &[&TestNode], others: &[&TestNode]) -> Result<()> {
    for node in nodes {
        for other in others {
            let id = other.peer_id().to_string();
            let name = &id[id.len() - 8..];
            node.node().add_contact(name, &id, &[]).await?;
        }
    }
    Ok(())
}

/// A bare libp2p peer that speaks kith's protocols without any of the node's checks, for sending
/// forged, malformed or oversize input.
#[derive(NetworkBehaviour)]
pub struct RawBehaviour {
    /// `/kith/dm/1`.
    pub dm: request_response::Behaviour<DmCodec>,
    /// `/kith/mailbox/1`.
    pub mailbox: request_response::Behaviour<MailboxCodec>,
    /// `/kith/group/1`.
    pub group: request_response::Behaviour<kith_net::GroupCodec>,
    /// `/kith/keys/1`.
    pub keys: request_response::Behaviour<kith_net::KeysCodec>,
}

/// A raw peer.
pub struct RawPeer {
    /// Its swarm.
    pub swarm: Swarm<RawBehaviour>,
    /// Its key.
    pub key: Keypair,
}

impl RawPeer {
    /// A new raw peer with a fresh identity.
    pub fn new() -> Result<Self> {
        Self::with_key(Keypair::generate_ed25519())
    }

    /// A raw peer with a given identity.
    pub fn with_key(key: Keypair) -> Result<Self> {
        Self::build(key, false)
    }

    /// A new raw peer that negotiates the protocol of each stream it opens in 0-RTT
    /// (multistream-select `V1Lazy`, as kith nodes do) instead of libp2p's default round trip.
    pub fn zero_rtt() -> Result<Self> {
        Self::build(Keypair::generate_ed25519(), true)
    }

    fn build(key: Keypair, zero_rtt: bool) -> Result<Self> {
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| RawBehaviour {
                dm: request_response::Behaviour::with_codec(
                    DmCodec::new(dm::MAX_FRAME_BYTES),
                    [(StreamProtocol::new(dm::PROTOCOL), ProtocolSupport::Full)],
                    kith_net::request_response_config(),
                ),
                group: request_response::Behaviour::with_codec(
                    kith_net::GroupCodec::new(kith_protocol::group::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(kith_protocol::group::PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    kith_net::request_response_config(),
                ),
                keys: request_response::Behaviour::with_codec(
                    kith_net::KeysCodec::new(kith_protocol::prekeys::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(kith_protocol::prekeys::PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    kith_net::request_response_config(),
                ),
                mailbox: request_response::Behaviour::with_codec(
                    MailboxCodec::new(mailbox::MAX_FRAME_BYTES),
                    [(
                        StreamProtocol::new(mailbox::PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    kith_net::request_response_config(),
                ),
            })?
            .with_swarm_config(|c| {
                let c = c.with_idle_connection_timeout(Duration::from_secs(60));
                match zero_rtt {
                    true => c.with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    ),
                    false => c,
                }
            })
            .build();
        Ok(Self { swarm, key })
    }

    /// Sends one dm request to `peer` at `addr` and waits for the answer.
    pub async fn dm(
        &mut self,
        peer: PeerId,
        addr: &Multiaddr,
        request: Message<dm::Request>,
    ) -> Result<dm::Response> {
        self.swarm.add_peer_address(peer, addr.clone());
        let id = self.swarm.behaviour_mut().dm.send_request(&peer, request);
        let fut = async {
            loop {
                if let SwarmEvent::Behaviour(RawBehaviourEvent::Dm(event)) =
                    self.swarm.select_next_some().await
                {
                    match event {
                        request_response::Event::Message {
                            message:
                                request_response::Message::Response {
                                    request_id,
                                    response,
                                },
                            ..
                        } if request_id == id => return Ok(response),
                        request_response::Event::OutboundFailure {
                            request_id, error, ..
                        } if request_id == id => bail!("dm failed: {error}"),
                        _ => {}
                    }
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut).await?
    }

    /// Sends one `/kith/group/1` request to `relay` at `addr` and waits for the answer.
    pub async fn group(
        &mut self,
        relay: PeerId,
        addr: &Multiaddr,
        request: kith_protocol::group::Request,
    ) -> Result<kith_protocol::group::Response> {
        self.swarm.add_peer_address(relay, addr.clone());
        let id = self
            .swarm
            .behaviour_mut()
            .group
            .send_request(&relay, Message::Valid(request));
        let fut = async {
            loop {
                if let SwarmEvent::Behaviour(RawBehaviourEvent::Group(event)) =
                    self.swarm.select_next_some().await
                {
                    match event {
                        request_response::Event::Message {
                            message:
                                request_response::Message::Response {
                                    request_id,
                                    response,
                                },
                            ..
                        } if request_id == id => return Ok(response),
                        request_response::Event::OutboundFailure {
                            request_id, error, ..
                        } if request_id == id => bail!("group request failed: {error}"),
                        _ => {}
                    }
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut).await?
    }

    /// Sends one mailbox request to `relay` at `addr` and waits for the answer.
    pub async fn mailbox(
        &mut self,
        relay: PeerId,
        addr: &Multiaddr,
        request: Message<mailbox::Request>,
    ) -> Result<mailbox::Response> {
        self.swarm.add_peer_address(relay, addr.clone());
        let id = self
            .swarm
            .behaviour_mut()
            .mailbox
            .send_request(&relay, request);
        let fut = async {
            loop {
                if let SwarmEvent::Behaviour(RawBehaviourEvent::Mailbox(event)) =
                    self.swarm.select_next_some().await
                {
                    match event {
                        request_response::Event::Message {
                            message:
                                request_response::Message::Response {
                                    request_id,
                                    response,
                                },
                            ..
                        } if request_id == id => return Ok(response),
                        request_response::Event::OutboundFailure {
                            request_id, error, ..
                        } if request_id == id => bail!("mailbox request failed: {error}"),
                        _ => {}
                    }
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut).await?
    }

    /// Sends one `/kith/keys/1` request to `peer` at `addr` and waits for the answer.
    pub async fn keys(
        &mut self,
        peer: PeerId,
        addr: &Multiaddr,
        request: kith_protocol::prekeys::Request,
    ) -> Result<kith_protocol::prekeys::Response> {
        self.swarm.add_peer_address(peer, addr.clone());
        let id = self
            .swarm
            .behaviour_mut()
            .keys
            .send_request(&peer, Message::Valid(request));
        let fut = async {
            loop {
                if let SwarmEvent::Behaviour(RawBehaviourEvent::Keys(event)) =
                    self.swarm.select_next_some().await
                {
                    match event {
                        request_response::Event::Message {
                            message:
                                request_response::Message::Response {
                                    request_id,
                                    response,
                                },
                            ..
                        } if request_id == id => return Ok(response),
                        request_response::Event::OutboundFailure {
                            request_id, error, ..
                        } if request_id == id => bail!("keys request failed: {error}"),
                        _ => {}
                    }
                }
            }
        };
        tokio::time::timeout(DEADLINE, fut).await?
    }
}

/// A group operation with stand-in commit bytes made in `epoch` (a relay orders commits by
/// epoch without reading them), and those bytes to submit beside it.
pub fn op_with_junk_commit(
    group: kith_protocol::GroupId,
    version: u64,
    epoch: u64,
    change: kith_protocol::group::Change,
) -> (
    kith_protocol::group::Op,
    Option<kith_protocol::group::Handshake>,
) {
    use kith_protocol::group::{Crypto, Handshake, Op};
    let handshake = change.commits().then(|| Handshake {
        commit: serde_bytes::ByteBuf::from(vec![version as u8; 256]),
        welcome: change
            .welcomes()
            .then(|| serde_bytes::ByteBuf::from(vec![1; 256])),
    });
    let op = Op {
        group,
        version,
        mls: handshake.as_ref().map(|h| Crypto::of(epoch, h)),
        change,
    };
    (op, handshake)
}

/// Stand-ins for group members that run no node: each publishes two MLS key packages to the
/// relay (as its owner), so that an admin can add it. Their private keys go to a store in
/// `store_dir`.
pub async fn publish_packages(
    relay: PeerId,
    addr: &Multiaddr,
    keys: &[Keypair],
    store_dir: &Path,
) -> Result<()> {
    use kith_node::core::crypto::mls::{Config as MlsConfig, Member};
    use kith_protocol::prekeys::{Request, Response};
    let store = kith_node::core::store::Store::open(store_dir)?;
    for key in keys {
        let member = Member::new(store.clone(), key, MlsConfig::default())?;
        let mut batch = kith_node::core::store::Batch::new();
        let packages = member.key_packages(2, false, &mut batch)?;
        store.apply(batch)?;
        let mut peer = RawPeer::with_key(key.clone())?;
        let publish = Request::PublishPackages {
            req_id: 1,
            packages: packages
                .into_iter()
                .map(serde_bytes::ByteBuf::from)
                .collect(),
            last_resort: None,
        };
        match peer.keys(relay, addr, publish).await? {
            Response::PackagesPublished { .. } => {}
            other => bail!("the relay did not take the packages: {other:?}"),
        }
    }
    Ok(())
}

/// An in-process relay in `dir` with a short gossip heartbeat (for group tests), and its
/// address.
pub async fn start_group_relay(dir: &Path) -> Result<(kith_relay::Running, Multiaddr)> {
    let config = kith_relay::Config {
        gossip_heartbeat_interval_ms: 200,
        ..kith_relay::Config::ephemeral(dir)
    };
    let relay = kith_relay::start(config).await?;
    let addr = relay.listen_addrs[0].clone();
    Ok((relay, addr))
}

/// The texts of a node's conversation `with` (a contact, peer id or group), oldest first.
pub fn texts(node: &TestNode, with: &str) -> Vec<String> {
    node.node()
        .messages(Some(with))
        .expect("messages")
        .into_iter()
        .map(|m| m.text)
        .collect()
}

/// Waits until a node's conversation `with` holds exactly `expected`, in order.
pub async fn wait_texts(node: &TestNode, with: &str, expected: &[&str]) -> Result<()> {
    wait_for("the conversation's messages", || async {
        (texts(node, with) == expected).then_some(())
    })
    .await
}
