//! `skymesh-controller run --config F`: enrollment, IPAM, netmap distribution and
//! the REST API.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc's per-thread heaps suit the gateway's shards, which allocate and
/// free request state on one thread each: fewer cycles per request than glibc's
/// malloc under the same load (see the README's AI gateway benchmark).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "skymesh-controller", version, about = "skymesh controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// AI gateway client keys.
    AiKey {
        #[command(subcommand)]
        command: AiKeyCommand,
    },
}

#[derive(Subcommand)]
enum AiKeyCommand {
    /// Create a client key: the key goes to --out (mode 0600), the
    /// `[[ai_gateway.keys]]` entry to paste into the config (only its SHA-256)
    /// to stdout.
    Create {
        /// Name of the application the key is for (shown in the audit log).
        #[arg(long)]
        name: String,
        /// File to write the key to; must not exist.
        #[arg(long)]
        out: PathBuf,
        /// Routes the key may use ("*" for all).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        routes: Vec<String>,
        /// Requests per minute.
        #[arg(long, default_value_t = 600)]
        rpm: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SKYMESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: journald and log files get
        // plain text, and the per-request audit line costs a third less.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skymesh-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            skymesh_controller::config::Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::AiKey {
            command:
                AiKeyCommand::Create {
                    name,
                    out,
                    routes,
                    rpm,
                },
        } => {
            let entry = skymesh_controller::gateway::config::create_key(&name, &out, &routes, rpm)?;
            print!("{entry}");
            eprintln!("key written to {} (mode 0600)", out.display());
            Ok(())
        }
        Command::Run { config: path } => {
            let config = skymesh_controller::config::Config::load(&path)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let mut int =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
                let mut ctl = skymesh_controller::server::start(&config).await?;
                notify("READY=1");
                let result = loop {
                    tokio::select! {
                        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
                        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break Ok(()) }
                        _ = hup.recv() => reload(&ctl, &path),
                        r = ctl.wait() => break r,
                    }
                };
                notify("STOPPING=1");
                ctl.shutdown().await;
                result
            })
        }
    }
}

/// SIGHUP: re-reads the config file and applies its `[ai_gateway]`; a bad file
/// is reported and the running config stays.
fn reload(ctl: &skymesh_controller::server::Controller, path: &std::path::Path) {
    notify("RELOADING=1");
    match skymesh_controller::config::Config::load(path) {
        Ok(config) => match ctl.reload_gateway(config.ai_gateway) {
            Ok(()) => tracing::info!(
                config = %path.display(),
                "SIGHUP: [ai_gateway] reloaded (other sections apply at the next restart)"
            ),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: reload refused"),
        },
        Err(e) => tracing::error!(
            error = %format!("{e:#}"),
            "SIGHUP: the config file is invalid; keeping the running config"
        ),
    }
    notify("READY=1");
}

/// Tells systemd (Type=notify) about our state, if it is listening.
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = sock.send_to(state.as_bytes(), path);
    }
}
