//! The `skymesh-agent` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use skymesh_agent::config::{bounded, Config};
use skymesh_agent::keys::PrivateKey;
use skymesh_agent::{admin, daemon};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "skymesh-agent",
    version,
    about = "skymesh gateway agent: userspace WireGuard mesh on a TUN device"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground.
    Run {
        #[arg(long, short, env = "SKYMESH_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Enroll with the controller using a join token (from `skymeshctl join-token
    /// create`), keep the identity in the state dir, and exit; `run` then connects.
    Join {
        /// The token text, or `-` to read it from stdin (keeps it out of the
        /// process list and shell history).
        token: String,
        #[arg(long, short, env = "SKYMESH_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file (and the key file it names); exit 1 on the first problem.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
    /// Show the running agent's interface and peers, like `wg show`.
    Status {
        #[arg(long, short, env = "SKYMESH_AGENT_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { config } => {
            init_tracing();
            let config = Config::load(&config)?;
            runtime()?.block_on(daemon::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Join { token, config } => {
            init_tracing();
            let config = Config::load(&config)?;
            if config.controller.is_none() {
                anyhow::bail!(
                    "{}: joining needs controller mode; add a [controller] table to the config",
                    config.file.display()
                );
            }
            let text = if token == "-" {
                bounded::read_to_string(std::io::stdin(), bounded::SECRET_LIMIT)
                    .context("reading the join token from stdin (`join -`)")?
            } else {
                token
            };
            let token = skymesh_wire::JoinToken::decode(&text)?;
            if let Some(existing) = skymesh_agent::control::Identity::load(&config.state_dir)? {
                anyhow::bail!(
                    "this agent is already enrolled as {:?} (state dir {}); remove its controller files to join again",
                    existing.node,
                    config.state_dir.display()
                );
            }
            let identity =
                runtime()?.block_on(daemon::enroll_with_retry(&token, &config.state_dir))?;
            println!("enrolled as {}", identity.node);
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                match &c.controller {
                    None => println!(
                        "{}: ok (static mode, interface {}, {} peers)",
                        config.display(),
                        c.interface.name,
                        c.peers.len()
                    ),
                    Some(m) => println!(
                        "{}: ok (controller mode, interface {}, advertising {} prefixes)",
                        config.display(),
                        c.interface.name,
                        m.advertise.len()
                    ),
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Genkey => {
            let key = PrivateKey::generate();
            println!("{}", key.to_base64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pubkey => {
            let text = bounded::read_to_string(std::io::stdin(), bounded::SECRET_LIMIT)
                .context("reading the private key from stdin")?;
            match PrivateKey::from_base64(&text) {
                Ok(key) => {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", key.public_key())?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: stdin is not a WireGuard private key: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Status { config, json } => {
            let config = Config::load(&config)?;
            let status = runtime()?.block_on(admin::query(&config.admin_socket))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                print!("{}", admin::render_table(&status, now));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // The data plane has its own thread; timers, the admin socket and metrics are
    // light enough for one.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
