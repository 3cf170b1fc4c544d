//! `skymesh-ai-backend`: the lab's OpenAI-compatible backend, standing in for cloud AI
//! services behind the controller's AI gateway. See `skymesh_tests::ai_backend`.

use anyhow::{Context, Result};
use clap::Parser;
use skymesh_tests::ai_backend::{self, ApiKey, Backend, Config, DEFAULT_MODELS};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "skymesh-ai-backend",
    version,
    about = "An OpenAI-compatible sample backend for the skymesh lab (chat, embeddings, \
             echo of any other path, and /_lab fault injection)"
)]
struct Cli {
    /// Address to listen on, IP:PORT (port 0 picks a free port; the bound one is printed).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    listen: SocketAddr,
    /// Backend name: sent in `x-backend`, in answers and in completion ids.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    name: String,
    /// File holding the API key that /v1/* requests must carry.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or EC) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Comma-separated model ids that chat and embeddings accept.
    #[arg(long, value_name = "M1,M2,...", default_value = DEFAULT_MODELS, value_parser = parse_models)]
    models: Models,
    /// Milliseconds before each content chunk of a streamed answer.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = parse_millis)]
    chunk_delay_ms: u64,
}

#[derive(Clone)]
struct Models(Vec<String>);

fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| "expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080".to_owned())
}

fn parse_name(value: &str) -> Result<String, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "use printable ASCII without spaces (it goes into the x-backend header), \
                    e.g. azure-eastus"
                .to_owned(),
        );
    }
    Ok(value.to_owned())
}

fn parse_models(value: &str) -> Result<Models, String> {
    let models: Vec<String> = value.split(',').map(|m| m.trim().to_owned()).collect();
    if models.iter().any(String::is_empty) {
        return Err(format!(
            "empty model id; give a comma-separated list without empty entries, e.g. {DEFAULT_MODELS}"
        ));
    }
    Ok(Models(models))
}

fn parse_millis(value: &str) -> Result<u64, String> {
    value.parse().map_err(|_| {
        "expected whole milliseconds, e.g. 20 (0 sends chunks back to back)".to_owned()
    })
}

fn read_api_key(path: &PathBuf) -> Result<ApiKey> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "--api-key-file {}: cannot read it; give a readable file holding the key",
            path.display()
        )
    })?;
    ApiKey::new(&text).with_context(|| {
        format!(
            "--api-key-file {}: the file is empty; put the API key in it",
            path.display()
        )
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` keeps the cause chain on one line, without a backtrace.
            eprintln!("skymesh-ai-backend: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let api_key = cli.api_key_file.as_ref().map(read_api_key).transpose()?;
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            Some(ai_backend::tls_acceptor(cert, key).with_context(|| {
                format!(
                    "--tls-cert {} --tls-key {}: cannot set up TLS",
                    cert.display(),
                    key.display()
                )
            })?)
        }
        _ => None,
    };
    let config = Config {
        name: cli.name.clone(),
        models: cli.models.0,
        api_key,
        chunk_delay: Duration::from_millis(cli.chunk_delay_ms),
    };
    let backend = Arc::new(Backend::new(config).context("--name")?);

    // Registered before announcing, so a SIGTERM sent right after the line is handled.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };

    let listener = TcpListener::bind(cli.listen).await.with_context(|| {
        format!(
            "--listen {}: cannot bind; pick a free port and an address of this host",
            cli.listen
        )
    })?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "skymesh-ai-backend {} listening on {addr}", cli.name)?;
    out.flush()?;
    drop(out);

    ai_backend::serve(listener, tls, backend, shutdown).await;
    Ok(())
}
