//! The `kith` binary: parses the command line, sets up logging, runs the command
//! ([`kith_node::cli`]) and turns its outcome into an exit code.

use std::process::ExitCode;

use kith_node::cli::{self, Cli, Command};

/// jemalloc instead of the system allocator: no per-allocation header and tight size classes,
/// which is what a relay holding thousands of idle connections spends its memory on, and less
/// time in malloc on the message path.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli.home_flag = matches.value_source("home") == Some(clap::parser::ValueSource::CommandLine);
    // The daemon reports its progress; other commands (and the demo's transcript) stay quiet
    // unless KITH_LOG asks for more.
    let default_filter = match cli.command {
        Command::Daemon { .. } => "warn,kith_node=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KITH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kith: {}", cli::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
