//! The `kith-relay` binary: parses flags, sets up logging and the signal handler, then calls
//! the library.
//!
//! ```text
//! kith-relay [--data DIR] run [--listen MULTIADDR]... [--config FILE] [--metrics HOST:PORT]
//! kith-relay [--data DIR] id [--json]
//! ```

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kith_relay::Config;
use libp2p::Multiaddr;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of the system allocator: no per-allocation header and tight size classes,
/// which is what a relay holding thousands of idle connections spends its memory on, and less
/// time in malloc on the message path.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The kith relay: circuit relay gateway and store-and-forward mailbox.
#[derive(Debug, Parser)]
#[command(name = "kith-relay", version)]
struct Cli {
    /// Data directory (identity, mailbox store, relay.json). Default: the platform data
    /// directory plus `kith-relay`.
    #[arg(long, env = "KITH_RELAY_DATA", global = true)]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay in the foreground until SIGINT or SIGTERM.
    Run {
        /// Listen address (repeatable). Default: /ip4/0.0.0.0/tcp/4001 and
        /// /ip4/0.0.0.0/udp/4001/quic-v1.
        #[arg(long)]
        listen: Vec<Multiaddr>,
        /// TOML configuration file; flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics at http://HOST:PORT/metrics.
        #[arg(long)]
        metrics: Option<SocketAddr>,
    },
    /// Print the relay's peer id and, if it runs, its listen addresses.
    Id {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Id { json } => {
            let data = cli
                .data
                .unwrap_or_else(kith_relay::config::default_data_dir);
            let info = kith_relay::id_info(&data)?;
            if json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                println!("{}", info.peer_id);
                for addr in &info.listen_addrs {
                    println!("{addr}");
                }
            }
            Ok(())
        }
        Command::Run {
            listen,
            config,
            metrics,
        } => {
            let mut config = match config {
                Some(path) => Config::from_toml_file(&path)?,
                None => Config::default(),
            };
            if let Some(data) = cli.data {
                config.data_dir = data;
            }
            if !listen.is_empty() {
                config.listen = listen;
            }
            if metrics.is_some() {
                config.metrics_addr = metrics;
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(async {
                kith_relay::run(config, shutdown_signal()).await?;
                Ok(())
            })
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT"),
        _ = terminate => tracing::info!("SIGTERM"),
    }
}
