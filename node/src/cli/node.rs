//! `kith init`, `id`, `daemon`, `settings` and `name`: the node itself, its identity and its
//! settings (the last two work without a running daemon, on config.toml).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use libp2p::Multiaddr;
use serde_json::Value;

use super::print_json;
use crate::api::client::{Client, ClientError};
use crate::config::{SettingsChange, SettingsView};
use crate::core::IdInfo;
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
    let offline = || serde_json::to_value(offline_id(peer_id, &settings));
    let info: Value = match Client::for_home(home) {
        Ok(client) => match client.id().await {
            Ok(info) => info.into_json(),
            Err(_) => offline()?,
        },
        Err(_) => offline()?,
    };
    if json {
        return print_json(&info);
    }
    warn_failing_relays(home).await;
    let info: IdInfo = serde_json::from_value(info)?;
    if invite {
        println!("{}", info.invite);
    } else {
        println!("peer id: {}", info.peer_id);
        println!("name:    {}", info.name);
        println!("invite:  {}", info.invite);
        for addr in &info.listen_addrs {
            println!("listen:  {addr}");
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
    let change = SettingsChange {
        name,
        presence,
        read_receipts,
        reach,
    };
    let settings = change_settings(home, &change).await?;
    if json {
        print_json(&settings)?;
    } else {
        super::print::print_settings(&serde_json::from_value(settings)?);
    }
    Ok(())
}

/// `kith name NAME`.
pub async fn name(home: &Path, name: String) -> Result<()> {
    let change = SettingsChange {
        name: Some(name),
        ..SettingsChange::default()
    };
    let settings: SettingsView = serde_json::from_value(change_settings(home, &change).await?)?;
    println!("your name is now {}", for_terminal(&settings.name));
    Ok(())
}

/// `kith ui [--open]`: asks the running daemon for a one-time code and prints the page's
/// address with it (and opens it in the browser with `--open`).
pub async fn ui(client: &Client, launch: bool) -> Result<()> {
    let url = client.ui_code().await?.decode()?.url;
    println!("{url}");
    if launch {
        let status = tokio::process::Command::new("xdg-open")
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
        match status {
            Ok(s) if s.success() => eprintln!("opened in your browser (the link works once)"),
            _ => eprintln!("could not start xdg-open: open the address above in your browser"),
        }
    } else {
        eprintln!("open this address in your browser; it works once, within 2 minutes");
    }
    Ok(())
}

/// Applies a settings change (absent fields stay) and returns the settings in effect as JSON:
/// through a running daemon, which applies them at once, or in config.toml when none runs.
async fn change_settings(home: &Path, change: &SettingsChange) -> Result<Value> {
    if let Ok(client) = Client::for_home(home) {
        match client.change_settings(change).await {
            Ok(settings) => return Ok(settings.into_json()),
            Err(ClientError::NotRunning(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut settings = Settings::load(home)?;
    if let Some(name) = &change.name {
        settings.name = crate::config::valid_display_name(name)?.to_owned();
    }
    if let Some(presence) = change.presence {
        settings.presence = presence;
    }
    if let Some(on) = change.read_receipts {
        settings.read_receipts = on;
    }
    if let Some(reach) = change.reach {
        settings.reach = reach;
    }
    let changed = change.name.is_some()
        || change.presence.is_some()
        || change.read_receipts.is_some()
        || change.reach.is_some();
    if changed {
        settings.save(home)?;
    }
    Ok(serde_json::to_value(SettingsView {
        name: settings.name,
        presence: settings.presence,
        read_receipts: settings.read_receipts,
        reach: settings.reach,
        max_file_bytes: settings.max_file_bytes,
        auto_download_max_bytes: settings.auto_download_max_bytes,
        relays: settings.relays,
    })?)
}

/// Says on stderr which home relays in the invite a running daemon cannot reach: friends
/// would be handed a road that does not work.
async fn warn_failing_relays(home: &Path) {
    let Ok(client) = Client::for_home(home) else {
        return;
    };
    let Ok(Ok(health)) = client.health().await.map(|answer| answer.decode()) else {
        return;
    };
    for relay in health.relays {
        if let Some(error) = relay.error {
            eprintln!(
                "warning: the daemon cannot reach the relay {} in this invite ({}); see `kith status`",
                relay.addr,
                for_terminal(&error)
            );
        }
    }
}

/// What `kith id` shows when no daemon runs: from the identity and config.toml.
fn offline_id(peer_id: libp2p::PeerId, settings: &Settings) -> IdInfo {
    let invite = kith_protocol::invite::Invite {
        peer_id,
        name: settings.name.clone(),
        relays: settings.relays.clone(),
        // The identity key is in the daemon's store; `kith id` with the daemon running has it.
        identity: None,
    };
    IdInfo {
        peer_id: peer_id.to_string(),
        name: settings.name.clone(),
        invite: invite.encode(),
        listen_addrs: Vec::new(),
        read_receipts: settings.read_receipts,
        presence: settings.presence,
    }
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
