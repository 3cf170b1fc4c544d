//! `skymesh-controller run --config F`: enrollment, IPAM, netmap distribution and
//! the REST API; `backup` and `restore` of its state store.

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
    /// Copy the state store to a new file, while the controller runs (through its API) or
    /// while it is stopped (from the file). The copy holds the CA key: it is written mode 0600.
    Backup {
        #[arg(long, short)]
        config: PathBuf,
        /// File to write; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
    /// Replace the state store with a backup. Refused while a controller runs on the data_dir
    /// and when the backup fails its checks; the replaced file is kept beside it.
    Restore {
        #[arg(long, short)]
        config: PathBuf,
        /// A file written by `skymesh-controller backup`.
        #[arg(long)]
        from: PathBuf,
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

mod store_cli {
    //! `backup` and `restore`: the operator's side of the store's backup functions.

    use anyhow::{bail, Context, Result};
    use skymesh_controller::config::Config;
    use skymesh_controller::store::redb;
    use std::io::{Read, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    use std::path::Path;

    pub(crate) fn backup(config_path: &Path, out: &Path) -> Result<()> {
        let config = Config::load(config_path)?;
        let store = config.data_dir.join("state.redb");
        if redb::is_store_own_name(&store, out) {
            bail!(
                "--out {}: a name the store {} uses for itself (the store, its staging and \
                 kept-aside files, store.id); write the backup elsewhere, best off this disk",
                out.display(),
                store.display()
            );
        }
        if std::fs::symlink_metadata(out).is_ok() {
            bail!(
                "--out {}: the file exists; give a new file name (a backup never overwrites a file)",
                out.display()
            );
        }
        let (bytes, how) = if redb::is_in_use(&store)? {
            (from_api(&config)?, "from the running controller's API")
        } else {
            (
                from_file(&store)?,
                "from the file (no controller is running)",
            )
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .with_context(|| format!("creating --out {}", out.display()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing --out {}", out.display()))?;
        drop(file);
        let verified = redb::verify(out).with_context(|| {
            format!(
                "the backup was written to {}, but it fails its check, so restore would refuse it",
                out.display()
            )
        })?;
        println!(
            "backup of {} written to {} {how}: {} records at revision {}",
            store.display(),
            out.display(),
            verified.records,
            verified.revision
        );
        Ok(())
    }

    /// Asks the running controller for a copy: only the process holding the store can read it.
    fn from_api(config: &Config) -> Result<Vec<u8>> {
        let token = skymesh_controller::config::read_text_bounded(
            &config.admin_token_file,
            skymesh_controller::config::MAX_TOKEN_BYTES,
            "[api] admin_token_file",
        )?
        .trim()
        .to_owned();
        let mut addr = config.api_listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let url = format!("http://{addr}/v1/backup");
        let response = match ureq::post(&url)
            .set("Authorization", &format!("Bearer {token}"))
            .timeout(std::time::Duration::from_secs(300))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => bail!(
                "POST {url}: {code}: {}",
                r.into_string().unwrap_or_default()
            ),
            Err(e) => bail!(
                "the store is in use (a controller is running) but its API at {url} ([api] listen) \
                 does not answer: {e}"
            ),
        };
        let mut bytes = Vec::new();
        response
            .into_reader()
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading the backup from {url}"))?;
        Ok(bytes)
    }

    fn from_file(store: &Path) -> Result<Vec<u8>> {
        if std::fs::symlink_metadata(store).is_err() {
            bail!(
                "no store at {} ([state] data_dir): nothing to back up",
                store.display()
            );
        }
        Ok(redb::copy_stopped(store)?)
    }

    pub(crate) fn restore(config_path: &Path, from: &Path) -> Result<()> {
        let config = Config::load(config_path)?;
        redb::refuse_dangling(&config.data_dir, "[state] data_dir")?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
        let store = config.data_dir.join("state.redb");
        let restored = redb::restore(&store, from, skymesh_controller::store::records::unix_now())?;
        println!(
            "restored {} to {}: {} records at revision {}",
            from.display(),
            store.display(),
            restored.verified.records,
            restored.verified.revision
        );
        match restored.kept_aside {
            Some(old) => println!("the replaced store file is kept as {}", old.display()),
            None => println!("there was no store file before"),
        }
        Ok(())
    }
}

/// mimalloc's `purge_delay` option (the same number in its v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Returns freed memory to the system 1 ms after mimalloc has a free page of
/// it instead of 10 ms (arenas: 10 ms instead of 100): the control plane frees
/// in bursts (a node joining thousands, a cold start), and with the longer
/// delay they pile up into the peak RSS. Measured at 1,000 agents
/// (`tests/bench/control.sh`, noisy): a peak of 193–229 MiB at 1 ms,
/// 234–276 MiB at 10 ms. Purging at once (0, 183–221 MiB) saves no more and
/// costs the AI gateway's shards a quarter more CPU per request (30.5 µs
/// instead of 24.4 µs in `tests/bench/ai_gateway.sh`; 24.1 µs at 10 ms). The
/// environment variable `MIMALLOC_PURGE_DELAY` still overrides it.
///
/// mimalloc is also built without transparent huge pages (the `no_thp`
/// feature of `libmimalloc-sys` in the workspace manifest): it would ask for
/// them on its arenas, and 2 MiB pages that are partly used stay resident.
/// At 1,000 agents that was 45 MiB of the peak (239 MiB with them, 193 MiB
/// without, the same hour).
fn tune_allocator() {
    // mimalloc read its options from the environment when the process loaded.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores an integer option; any value is
        // valid for purge_delay (negative: never purge).
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1) };
    }
}

fn main() -> ExitCode {
    tune_allocator();
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
        Command::Backup { config, out } => store_cli::backup(&config, &out),
        Command::Restore { config, from } => store_cli::restore(&config, &from),
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
            skymesh_controller::store::redb::refuse_dangling(&config.data_dir, "[state] data_dir")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                // Blocking work (the store, file reads) is bounded where it is
                // spawned; this is the backstop, far below tokio's 512.
                .max_blocking_threads(32)
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
