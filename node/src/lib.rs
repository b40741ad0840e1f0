//! The kith node: identity, store, libp2p swarm, delivery engine, local API and command line.
//!
//! [`start`] brings a node up (network, engine, API) and returns a [`Running`] node whose
//! [`Node`] handle the demo and the tests drive directly; [`run`] does the same and waits for a
//! shutdown signal, which is what `kith daemon` does.

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod features;
pub mod health;
pub mod identity;
pub mod net;
pub mod private;
pub mod shutdown;
pub mod text;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

pub use crate::core::{Node, NodeError, NodeEvent};
pub use config::{Config, Settings};

/// File in the home directory with the running daemon's API address and listen addresses.
pub const API_FILE: &str = "api.json";
/// File in the home directory with the API's bearer token (mode 0600).
pub const TOKEN_FILE: &str = "api.token";

/// What a running daemon writes to `<home>/api.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiInfo {
    /// Where the local API listens.
    pub api: SocketAddr,
    /// The node's listen addresses, with `/p2p/<id>`.
    pub listen_addrs: Vec<String>,
    /// The daemon's process id.
    pub pid: u32,
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity is missing or damaged.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The settings file is damaged.
    #[error(transparent)]
    Settings(#[from] config::SettingsError),
    /// Another daemon holds this home's store.
    #[error("another kith daemon is already running with --home {0}; stop it first, or give this one another --home")]
    AlreadyRunning(PathBuf),
    /// The store could not be opened.
    #[error("cannot open the store in {path}")]
    Store {
        /// The store directory.
        path: PathBuf,
        /// The error.
        source: crate::core::store::StoreError,
    },
    /// The network could not start.
    #[error(transparent)]
    Net(#[from] net::StartError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] NodeError),
    /// The API could not bind, or its files could not be written.
    #[error("local API: {0}")]
    Api(#[from] std::io::Error),
}

/// A running node.
pub struct Running {
    /// The handle to drive it.
    pub node: Node,
    /// Where its local API listens.
    pub api_addr: SocketAddr,
    home: PathBuf,
    trigger: shutdown::Trigger,
    tasks: JoinSet<()>,
    store_closed: crate::core::store::Closed,
}

/// How long a new node's first start waits for a home relay to take its keys.
const FIRST_PUBLICATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping node waits for its store to close before giving up on it.
const STORE_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Running {
    /// Stops the node: tells its relays it is going offline, stops the API, the engine and the
    /// network, then flushes the store.
    pub async fn shutdown(self) {
        self.node.say_goodbye().await;
        let Running {
            node,
            home,
            trigger,
            mut tasks,
            store_closed,
            ..
        } = self;
        trigger.fire();
        while tasks.join_next().await.is_some() {}
        let _ = std::fs::remove_file(home.join(API_FILE));
        drop(node);
        if tokio::time::timeout(STORE_CLOSE_TIMEOUT, store_closed.wait())
            .await
            .is_err()
        {
            tracing::error!("the store did not close in time; a handle is still held");
        }
        tracing::info!("node stopped");
    }
}

/// Reads the API token, creating it (mode 0600) if it does not exist.
pub fn api_token(home: &Path) -> std::io::Result<String> {
    let path = home.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) => return Ok(token.trim().to_owned()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(&path)?.write_all(token.as_bytes())?;
    Ok(token)
}

/// Every feature, plugged into the core by the roles it plays ([`core::hooks`]).
fn plugins(
    store: &crate::core::store::Store,
    key: &libp2p::identity::Keypair,
) -> Result<core::hooks::Plugins, NodeError> {
    use features::{group, media, presence, strangers, timers};
    let member = core::crypto::mls::Member::new(store.clone(), key, Default::default())
        .map_err(|e| NodeError::Invalid(format!("group keys: {e}")))?;
    let groups = std::sync::Arc::new(group::Groups::load(store, member)?);
    let files = std::sync::Arc::new(media::State::default());
    let presence = std::sync::Arc::new(presence::State::default());
    let gate = std::sync::Arc::new(strangers::State::load(store)?);
    let timers = std::sync::Arc::new(timers::State);
    Ok(core::hooks::Plugins::default()
        .feature(groups.clone())
        .rooms(groups)
        .feature(files.clone())
        .files(files)
        .feature(presence.clone())
        .presence(presence)
        .feature(gate.clone())
        .gate(gate)
        .feature(timers.clone())
        .timers(timers))
}

/// Starts a node from `config`: identity, store, network, engine and local API.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let key = identity::load(&config.home)?;
    let settings = Settings::load(&config.home)?;
    let db_path = config.home.join("db");
    let store = crate::core::store::Store::open(&db_path).map_err(|source| match source {
        // sled says so only in its message: "could not acquire lock on ...".
        crate::core::store::StoreError::Sled(sled::Error::Io(e))
            if e.to_string().contains("acquire lock") =>
        {
            StartError::AlreadyRunning(config.home.clone())
        }
        source => StartError::Store {
            path: db_path.clone(),
            source,
        },
    })?;
    let store_closed = store.closed();
    // Only the owner may read the home: its key, token, settings and store.
    if let Err(e) = private::tighten(&config.home, &db_path) {
        tracing::warn!(home = %config.home.display(), error = %e, "cannot tighten the home's file modes");
    }
    let (trigger, signal) = shutdown::channel();
    let (net, net_events, net_task) = net::start(
        key.clone(),
        net::Settings {
            listen: config.listen.clone(),
            relays: config.relays.clone(),
            mdns: config.mdns,
            gossip_heartbeat: config.gossip_heartbeat,
        },
        signal.clone(),
    )
    .await?;
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let _ = net_task.await;
    });
    let plugins = plugins(&store, &key)?;
    let node = Node::start(
        crate::core::Parts {
            key,
            settings,
            config: config.clone(),
            store,
            net,
            net_events,
            shutdown: signal.clone(),
            plugins,
        },
        &mut tasks,
    )?;
    // A new node's keys reach its relays before it reports ready, so that contacts can write
    // to it even if it goes offline right away.
    node.first_publication(FIRST_PUBLICATION_TIMEOUT).await;
    let token = api_token(&config.home)?;
    let (api_addr, api_task) = api::serve(config.api, node.clone(), token, signal).await?;
    tasks.spawn(async move {
        let _ = api_task.await;
    });
    let info = ApiInfo {
        api: api_addr,
        listen_addrs: node
            .listen_addrs()
            .await
            .iter()
            .map(|a| a.to_string())
            .collect(),
        pid: std::process::id(),
    };
    api::write_info(&config.home.join(API_FILE), &info)?;
    tracing::info!(peer = %node.peer_id(), api = %api_addr, "node running");
    Ok(Running {
        node,
        api_addr,
        home: config.home,
        trigger,
        tasks,
        store_closed,
    })
}

/// Runs a node until `shutdown` resolves, then stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let running = start(config).await?;
    shutdown.await;
    running.shutdown().await;
    Ok(())
}
