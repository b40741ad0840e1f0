//! `kith init`, `id`, `daemon`, `settings` and `name`: the node itself, its identity and its
//! settings (the last two work without a running daemon, on config.toml).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use libp2p::Multiaddr;
use serde_json::{json, Value};

use super::print_json;
use crate::api::client::{Client, ClientError};
use crate::text::for_terminal;
use crate::{identity, Config, Settings};

/// `kith init --name NAME`.
pub fn init(home: &Path, name: String) -> Result<()> {
    let key = identity::create(home)?;
    let settings = Settings {
        name,
        ..Settings::default()
    };
    settings.save(home)?;
    println!(
        "created identity {} in {}",
        key.public().to_peer_id(),
        home.display()
    );
    println!("next: kith --home {} daemon", home.display());
    Ok(())
}

/// `kith id [--json|--invite]`: from the daemon when one runs, else from the files.
pub async fn id(home: &Path, json: bool, invite: bool) -> Result<()> {
    let key = identity::load(home)?;
    let settings = Settings::load(home)?;
    let peer_id = key.public().to_peer_id();
    let info: Value = match Client::for_home(home) {
        Ok(client) => match client.get::<Value>("/v1/id").await {
            Ok(info) => info,
            Err(_) => offline_id(peer_id, &settings),
        },
        Err(_) => offline_id(peer_id, &settings),
    };
    if !json {
        warn_failing_relays(home).await;
    }
    if json {
        print_json(&info)?;
    } else if invite {
        println!("{}", info["invite"].as_str().unwrap_or_default());
    } else {
        println!("peer id: {}", info["peer_id"].as_str().unwrap_or_default());
        println!("name:    {}", info["name"].as_str().unwrap_or_default());
        println!("invite:  {}", info["invite"].as_str().unwrap_or_default());
        for addr in info["listen_addrs"].as_array().into_iter().flatten() {
            println!("listen:  {}", addr.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// `kith daemon`: runs the node in the foreground until Ctrl-C or SIGTERM.
pub async fn daemon(
    home: &Path,
    listen: Vec<Multiaddr>,
    relay: Vec<Multiaddr>,
    api: SocketAddr,
    mdns: bool,
) -> Result<()> {
    let mut config = Config::new(home);
    if !listen.is_empty() {
        config.listen = listen;
    }
    let mut settings = Settings::load(home)?;
    // Checked before anything is saved: a bad address must not stick in config.toml.
    for addr in &relay {
        if crate::net::peer_of(addr).is_none() {
            anyhow::bail!(
                "the relay address {addr} must end in /p2p/<relay peer id> (`kith-relay id` prints the full address); nothing was saved"
            );
        }
    }
    let remembered: Vec<String> = relay.iter().map(|a| a.to_string()).collect();
    if relay.is_empty() {
        for saved in &settings.relays {
            config.relays.push(saved.parse().with_context(|| {
                format!("the relay {saved:?} remembered in config.toml is not a multiaddr; fix or remove it")
            })?);
        }
    } else if settings.relays != remembered {
        settings.relays = remembered;
        settings.save(home)?;
        config.relays = relay;
    } else {
        config.relays = relay;
    }
    config.api = api;
    config.mdns = mdns;
    let running = crate::start(config).await.context("starting the daemon")?;
    eprintln!(
        "kith daemon running as {} (API on {}); Ctrl-C to stop",
        running.node.peer_id(),
        running.api_addr
    );
    shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

/// `kith settings [--presence …] [--read-receipts …] [--reach …] [--name …] [--json]`.
pub async fn settings(
    home: &Path,
    presence: Option<kith_protocol::presence::Visibility>,
    read_receipts: Option<bool>,
    reach: Option<kith_protocol::presence::Reach>,
    name: Option<String>,
    json: bool,
) -> Result<()> {
    let change = json!({
        "presence": presence,
        "read_receipts": read_receipts,
        "reach": reach,
        "name": name,
    });
    let settings = change_settings(home, change).await?;
    if json {
        print_json(&settings)?;
    } else {
        super::print::print_settings(&settings);
    }
    Ok(())
}

/// `kith name NAME`.
pub async fn name(home: &Path, name: String) -> Result<()> {
    let settings = change_settings(home, json!({ "name": name })).await?;
    println!(
        "your name is now {}",
        for_terminal(settings["name"].as_str().unwrap_or_default())
    );
    Ok(())
}

/// Applies a settings change (`null` fields stay) and returns the settings in effect: through a
/// running daemon, which applies them at once, or in config.toml when none runs.
async fn change_settings(home: &std::path::Path, change: Value) -> Result<Value> {
    let change: serde_json::Map<String, Value> = change
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Ok(client) = Client::for_home(home) {
        match client
            .post("/v1/settings", &Value::Object(change.clone()))
            .await
        {
            Ok(settings) => return Ok(settings),
            Err(ClientError::NotRunning(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut settings = Settings::load(home)?;
    if let Some(name) = change.get("name").and_then(Value::as_str) {
        settings.name = crate::config::valid_display_name(name)?.to_owned();
    }
    if let Some(presence) = change.get("presence") {
        settings.presence = serde_json::from_value(presence.clone())?;
    }
    if let Some(on) = change.get("read_receipts").and_then(Value::as_bool) {
        settings.read_receipts = on;
    }
    if let Some(reach) = change.get("reach") {
        settings.reach = serde_json::from_value(reach.clone())?;
    }
    if !change.is_empty() {
        settings.save(home)?;
    }
    Ok(json!({
        "name": settings.name,
        "presence": settings.presence,
        "read_receipts": settings.read_receipts,
        "reach": settings.reach,
        "max_file_bytes": settings.max_file_bytes,
        "auto_download_max_bytes": settings.auto_download_max_bytes,
        "relays": settings.relays,
    }))
}

/// Says on stderr which home relays in the invite a running daemon cannot reach: friends
/// would be handed a road that does not work.
async fn warn_failing_relays(home: &std::path::Path) {
    let Ok(client) = Client::for_home(home) else {
        return;
    };
    let Ok(health) = client.get::<Value>("/v1/health").await else {
        return;
    };
    for relay in health["relays"].as_array().into_iter().flatten() {
        if let Some(error) = relay["error"].as_str() {
            eprintln!(
                "warning: the daemon cannot reach the relay {} in this invite ({}); see `kith status`",
                relay["addr"].as_str().unwrap_or_default(),
                for_terminal(error)
            );
        }
    }
}

fn offline_id(peer_id: libp2p::PeerId, settings: &Settings) -> Value {
    let invite = kith_protocol::invite::Invite {
        peer_id,
        name: settings.name.clone(),
        relays: settings.relays.clone(),
        // The identity key is in the daemon's store; `kith id` with the daemon running has it.
        identity: None,
    };
    json!({
        "peer_id": peer_id.to_string(),
        "name": settings.name,
        "invite": invite.encode(),
        "listen_addrs": [],
        "read_receipts": settings.read_receipts,
        "presence": settings.presence,
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
