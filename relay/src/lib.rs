//! The kith relay: a circuit relay v2 gateway and a store-and-forward mailbox.
//!
//! A relay lets nodes behind NAT reach each other (libp2p circuit relay v2 with limits made for
//! chat, not hole punching) and holds envelopes for nodes that are offline (`/kith/mailbox/1`),
//! pushing them over `/kith/dm/1` when the recipient is connected. It never reads message
//! content: it verifies signatures and stores envelopes as they are.
//!
//! Use [`start`] to run one in-process (tests, the node's demo, benchmarks) and
//! [`Running::shutdown`] to stop it; [`run`] does both around a shutdown future (the binary).
//!
//! Code map:
//!
//! - [`config`]: every limit, loaded from TOML and overridden by flags.
//! - [`identity`] and [`state_file`]: `<data>/identity.key` and `<data>/relay.json`.
//! - [`swarm`]: the libp2p behaviour and the task that owns the swarm; [`boxed`] keeps its
//!   per-connection handler in one allocation, and [`requests`] serves every request-response
//!   protocol from one behaviour.
//! - [`mailbox`]: the sled store, the service task that owns it, and the group-commit flusher.
//! - [`presence`]: online / last seen from heartbeats, with each user's visibility enforced.
//! - [`shed`]: graceful degradation, which work a loaded relay refuses first.
//! - [`group`]: hosted groups: membership chains (`/kith/group/1`), server-side fan-out of group
//!   messages into members' mailboxes, and their gossipsub topics.
//! - [`blob`]: encrypted file chunks (`/kith/blob/1`) held for offline recipients, with quota
//!   and TTL.
//! - [`metrics`]: Prometheus metrics and the `GET /metrics` endpoint.
//!
//! Tasks: the swarm task, the mailbox service, the flusher and (optionally) the metrics server,
//! each owned by [`Running`] through an abort-on-drop handle. Shutdown stops the swarm first, so
//! no new work arrives, then lets the service and the flusher drain and flush the store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

pub mod accept_pace;
pub mod blob;
pub mod boxed;
pub mod clock;
pub mod config;
pub mod group;
pub mod identity;
pub mod ip_rate;
pub mod keys;
pub mod lanes;
pub mod mailbox;
pub mod metrics;
pub mod occupancy;
pub mod presence;
pub mod pushes;
pub mod queues;
pub mod quiet;
pub mod requests;
pub mod shed;
pub mod state_file;
pub mod strikes;
pub mod swarm;
mod task;

pub use clock::Clock;
pub use config::{Config, ConfigError};
pub use mailbox::Usage;
pub use metrics::Metrics;

use mailbox::{flusher, service, store};
use task::Owned;

/// The mailbox database's directory inside the data directory.
pub const DB_DIR: &str = "db";

/// Why the relay did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The mailbox store could not be opened (another relay may be using the data directory).
    #[error(transparent)]
    Store(#[from] store::OpenError),
    /// The swarm could not be built.
    #[error(transparent)]
    Swarm(#[from] swarm::BuildError),
    /// The blob store could not be opened.
    #[error(transparent)]
    Blobs(#[from] blob::store::StoreError),
    /// The keys store could not open.
    #[error("keys store: {0}")]
    Keys(#[from] keys::store::StoreError),
    /// The group store could not be opened.
    #[error(transparent)]
    Groups(#[from] group::store::StoreError),
    /// A listener did not come up.
    #[error(transparent)]
    Listen(#[from] swarm::ListenError),
    /// `relay.json` could not be written.
    #[error("cannot write relay.json: {0}")]
    StateFile(#[from] state_file::StateFileError),
    /// The metrics endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] metrics::ServeError),
    /// The newcomers' lane could not start.
    #[error(transparent)]
    Lanes(#[from] lanes::StartError),
}

/// Why the relay did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// One of the relay's tasks panicked.
    #[error("the {task} task failed: {source}")]
    Task {
        /// Which task.
        task: &'static str,
        /// What happened to it.
        source: tokio::task::JoinError,
    },
    /// The final flush of the mailbox store failed; recent deposits may be lost.
    #[error("final mailbox flush failed: {0}")]
    Flush(#[from] sled::Error),
    /// The metrics server failed.
    #[error("metrics server failed: {0}")]
    Metrics(std::io::Error),
    /// `relay.json` could not be removed.
    #[error("cannot remove relay.json: {0}")]
    StateFile(#[from] state_file::StateFileError),
}

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The relay did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The relay did not stop cleanly.
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
}

/// A running relay. Dropping it aborts its tasks; call [`Running::shutdown`] to stop cleanly.
#[derive(Debug)]
pub struct Running {
    /// The relay's peer id.
    pub peer_id: PeerId,
    /// The actual listen addresses, each ending in `/p2p/<peer id>`.
    pub listen_addrs: Vec<Multiaddr>,
    data_dir: PathBuf,
    metrics: Metrics,
    metrics_addr: Option<SocketAddr>,
    mailbox: service::Handle,
    stop_swarm: oneshot::Sender<()>,
    swarm_task: Owned<()>,
    service_task: Owned<Result<(), sled::Error>>,
    flusher_task: Owned<()>,
    group_task: Owned<()>,
    metrics_task: Option<(oneshot::Sender<()>, Owned<std::io::Result<()>>)>,
    /// Last, so that it stops after the tasks above are aborted.
    newcomers: lanes::NewcomersRuntime,
}

/// Key claims one claimer may make a second at a relay, sustained (`/kith/keys/1`).
const KEY_CLAIMS_PER_SEC: u32 = 20;

/// Key claims one claimer may make at once.
const KEY_CLAIM_BURST: u32 = 200;

/// Starts a relay and returns once its listeners are up, so `listen_addrs` are real.
pub async fn start(config: Config) -> Result<Running, StartError> {
    config.validate()?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let keypair = identity::load_or_create(&data_dir)?;
    let peer_id = keypair.public().to_peer_id();
    let store = store::Store::open(
        &data_dir.join(DB_DIR),
        store::Limits {
            max_messages: config.mailbox_max_messages,
            max_bytes: config.mailbox_max_bytes,
            budget_bytes: config.mailbox_budget_bytes,
            ttl_ms: config.mailbox_ttl_secs.saturating_mul(1_000),
            max_delivered_ids: config.mailbox_max_delivered_ids,
            max_messages_per_sender: config.mailbox_max_messages_per_sender,
            max_bytes_per_sender: config.mailbox_max_bytes_per_sender,
            expiry_skew_ms: config.expiry_skew_ms,
            cache_bytes: config.store_cache_bytes,
            reserved_bytes_per_user: config.mailbox_reserved_bytes_per_user,
        },
    )?;
    // The store's lock proves no other relay runs on this data directory, so a relay.json
    // still here is stale (a crash); nobody should read its addresses until ours are up.
    state_file::remove(&data_dir)?;
    let read_budget =
        kith_net::codec::Budget::new(config.read_buffer_budget_bytes, config.busy_retry_after_ms)
            .with_connection_shares(
                config.read_buffer_reserved_per_connection_bytes,
                config.read_buffer_max_per_connection_bytes,
            );
    let metrics = Metrics::new().with_read_budget(read_budget.clone());

    let (lanes, newcomers) = lanes::Lanes::start(
        config.newcomer_lane_nice,
        Duration::from_millis(config.newcomer_ms),
        metrics.clone(),
    )?;
    let mut swarm = swarm::build(
        keypair,
        &config,
        read_budget,
        lanes.clone(),
        metrics.clone(),
    )?;
    let bound = swarm::listen(&mut swarm, &config.listen).await?;
    let listen_addrs: Vec<Multiaddr> = bound.iter().map(|a| swarm::with_peer(a, peer_id)).collect();
    state_file::write(&data_dir, &state_file::Info::new(&peer_id, &listen_addrs))?;

    let metrics_server = match config.metrics_addr {
        Some(addr) => {
            let (stop, stopped) = oneshot::channel::<()>();
            let (local, server) = metrics::bind(addr, metrics.clone(), async move {
                let _ = stopped.await;
            })
            .await?;
            tracing::info!(addr = %local, "serving metrics at /metrics");
            Some((local, stop, server))
        }
        None => None,
    };

    let (flush_tx, flush_rx) = mpsc::channel(flusher::CHANNEL_CAPACITY);
    let flusher_task = Owned::spawn(flusher::run(store.db().clone(), flush_rx, metrics.clone()));
    let (mailbox, requests) = service::channel(config.max_pending_mailbox_requests);
    let (group_store, hosted) = group::store::Store::open(store.db())?;
    let blobs = blob::Server::new(
        blob::store::Store::open(
            &data_dir,
            store.db(),
            blob::store::Limits {
                quota_bytes_per_peer: config.blob_quota_bytes_per_peer,
                budget_bytes: config.blob_budget_bytes,
                ttl_ms: config.blob_ttl_secs.saturating_mul(1_000),
            },
        )?,
        blob::Settings {
            max_file_bytes: config.blob_max_file_bytes,
            max_pending: config.max_pending_blob_requests,
            busy_retry_after_ms: config.busy_retry_after_ms,
            purge_interval: Duration::from_secs(config.purge_interval_secs),
            clock: config.clock.clone(),
            expiry_skew_ms: config.expiry_skew_ms,
        },
        metrics.clone(),
    );
    let keys = keys::Server::new(
        keys::store::Store::open(store.db())?,
        keys::Settings {
            claims_per_sec: KEY_CLAIMS_PER_SEC,
            claim_burst: KEY_CLAIM_BURST,
            publishes_per_sec: 1,
            publish_burst: 10,
            max_pending: config.max_pending_blob_requests,
            busy_retry_after_ms: config.busy_retry_after_ms,
            clock: config.clock.clone(),
            refusal_log_interval_ms: config.refusal_log_interval_secs.saturating_mul(1_000),
        },
        metrics.clone(),
    );
    let directory = group::Directory::default();
    for state in hosted.into_values() {
        directory.insert(state);
    }
    let (groups, group_requests) = group::service::channel(config.max_pending_group_requests);
    let group_task = Owned::spawn(group::service::run(
        group_store,
        directory.clone(),
        group::service::Settings {
            limits: kith_protocol::group::Limits {
                max_members: config.max_group_members,
            },
            relay: peer_id,
        },
        group_requests,
        metrics.clone(),
    ));
    let gateway = group::gateway::Gateway::new(
        groups,
        directory,
        mailbox.clone(),
        lanes.clone(),
        metrics.clone(),
        group::gateway::Settings {
            busy_retry_after_ms: config.busy_retry_after_ms,
            ops_per_sec_per_peer: config.group_ops_per_sec_per_peer,
            op_burst_per_peer: config.group_op_burst_per_peer,
            creations_per_sec: config.group_creations_per_sec,
            creation_burst: config.group_creation_burst,
            newcomer_ops_per_sec: config.group_newcomer_ops_per_sec,
            newcomer_op_burst: config.group_newcomer_op_burst,
            clock: config.clock.clone(),
        },
    );
    let service_task = Owned::spawn(service::run(
        store,
        service::Settings {
            deposits_per_sec_per_peer: config.deposits_per_sec_per_peer,
            deposit_burst_per_peer: config.deposit_burst_per_peer,
            purge_interval: Duration::from_secs(config.purge_interval_secs),
            mailbox_full_retry_after_ms: config.mailbox_full_retry_after_ms,
            refusal_log_interval_ms: config.refusal_log_interval_secs.saturating_mul(1_000),
            clock: config.clock.clone(),
        },
        requests,
        flush_tx,
        metrics.clone(),
    ));
    let (stop_swarm, swarm_stopped) = oneshot::channel();
    let task = swarm::Task::new(
        swarm,
        bound,
        mailbox.clone(),
        lanes,
        metrics.clone(),
        swarm::TaskSettings {
            data_dir: data_dir.clone(),
            push_to_connected: config.push_to_connected,
            max_pending_pushes: config.max_pending_pushes,
            max_pushes_per_recipient: config.max_pushes_per_recipient,
            refusal_log_interval_ms: config.refusal_log_interval_secs.saturating_mul(1_000),
            busy_retry_after_ms: config.busy_retry_after_ms,
            shed: shed::Policy {
                enabled: config.shed_enabled,
                max_in_flight: config.shed_max_in_flight_requests,
                max_flush_latency_ms: config.shed_max_flush_latency_ms,
            },
            presence: presence::Settings {
                offline_after_ms: config.presence_offline_after_ms,
                max_tracked_peers: config.presence_max_tracked_peers,
                clock: config.clock.clone(),
            },
        },
    );
    let swarm_task = Owned::spawn(
        task.with_groups(gateway)
            .with_blobs(blobs)
            .with_keys(keys)
            .run(swarm_stopped),
    );
    let (metrics_addr, metrics_task) = match metrics_server {
        Some((local, stop, server)) => (Some(local), Some((stop, Owned::spawn(server)))),
        None => (None, None),
    };
    tracing::info!(%peer_id, addrs = ?listen_addrs, "relay started");
    Ok(Running {
        peer_id,
        listen_addrs,
        data_dir,
        metrics,
        metrics_addr,
        mailbox,
        stop_swarm,
        swarm_task,
        service_task,
        flusher_task,
        group_task,
        metrics_task,
        newcomers,
    })
}

impl Running {
    /// Stops the swarm, drains the mailbox service and the flusher, flushes the store, stops the
    /// metrics server and removes `relay.json`.
    pub async fn shutdown(self) -> Result<(), ShutdownError> {
        let Running {
            data_dir,
            mailbox,
            stop_swarm,
            swarm_task,
            service_task,
            flusher_task,
            group_task,
            metrics_task,
            newcomers,
            ..
        } = self;
        let task_failed = |task| move |source| ShutdownError::Task { task, source };
        let _ = stop_swarm.send(());
        swarm_task.join().await.map_err(task_failed("swarm"))?;
        // The swarm is gone with its task, and with it every connection.
        drop(newcomers);
        // The gateway's handle went with the swarm task: the group service ends.
        group_task
            .join()
            .await
            .map_err(task_failed("group service"))?;
        // The swarm task's handle is gone with it; dropping ours ends the service.
        drop(mailbox);
        service_task
            .join()
            .await
            .map_err(task_failed("mailbox service"))??;
        flusher_task.join().await.map_err(task_failed("flusher"))?;
        if let Some((stop, server)) = metrics_task {
            let _ = stop.send(());
            server
                .join()
                .await
                .map_err(task_failed("metrics"))?
                .map_err(ShutdownError::Metrics)?;
        }
        state_file::remove(&data_dir)?;
        tracing::info!("relay stopped");
        Ok(())
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where `GET /metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Entries and bytes waiting for `owner`, or in all mailboxes when `None`.
    pub async fn mailbox_usage(&self, owner: Option<PeerId>) -> Result<Usage, service::Stopped> {
        self.mailbox.usage(owner).await
    }

    /// Purges expired mailbox entries now, instead of waiting for the next periodic purge.
    pub async fn purge_now(&self) -> Result<u64, service::Stopped> {
        self.mailbox.purge().await
    }
}

/// Starts a relay, runs it until `shutdown` resolves, then stops it cleanly.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let running = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    running.shutdown().await?;
    Ok(())
}

/// What `kith-relay id` reports: the peer id (creating the identity if needed) and the listen
/// addresses of the relay running on `data_dir` (none if it is not running).
pub fn id_info(data_dir: &Path) -> Result<state_file::Info, identity::IdentityError> {
    let keypair = identity::load_or_create(data_dir)?;
    Ok(state_file::Info {
        peer_id: keypair.public().to_peer_id().to_string(),
        listen_addrs: state_file::read_listen_addrs(data_dir),
    })
}
