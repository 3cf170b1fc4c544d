//! Starts a controller: store, CA, hub, control endpoint and REST API. Used by
//! `skymesh-controller run` and, in process, by tests and the benchmark.

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::control::{self, Control, Hub};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::redb::RedbStore;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use rand::RngCore;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

/// A running controller.
pub struct Controller {
    pub control_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub ca_fingerprint: String,
    pub registry: Arc<Registry>,
    /// The AI gateway, when `[ai_gateway]` is configured.
    pub gateway: Option<(Arc<crate::gateway::Gateway>, SocketAddr)>,
    endpoint: quinn::Endpoint,
    tasks: tokio::task::JoinSet<Result<()>>,
}

impl Controller {
    /// Waits until a server task fails (they run until shutdown).
    pub async fn wait(&mut self) -> Result<()> {
        match self.tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => bail!("a controller task panicked: {e}"),
            None => Ok(()),
        }
    }

    /// Applies a reloaded config's `[ai_gateway]` (SIGHUP). Other sections
    /// need a restart; the caller says so.
    pub fn reload_gateway(
        &self,
        config: Option<crate::gateway::config::GatewayConfig>,
    ) -> Result<()> {
        match (&self.gateway, config) {
            (Some((gw, _)), Some(c)) => gw.reload(c),
            (None, None) => Ok(()),
            (None, Some(_)) => bail!("[ai_gateway] was added: restart the controller to start the gateway"),
            (Some(_), None) => bail!("[ai_gateway] was removed: restart the controller to stop the gateway; it keeps serving the last config"),
        }
    }

    pub async fn shutdown(mut self) {
        self.endpoint.close(0u8.into(), b"controller shutting down");
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        // Let the close frames leave.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle())
            .await;
    }
}

/// Opens the store in the config's data dir and starts every service.
pub async fn start(config: &Config) -> Result<Controller> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let store_path = config.data_dir.join("state.redb");
    let store = RedbStore::open(&store_path)
        .with_context(|| format!("opening the store {}", store_path.display()))?;
    std::fs::set_permissions(&store_path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", store_path.display()))?;
    let admin_token = load_or_create_admin_token(&config.admin_token_file)?;
    start_with(config, Arc::new(store), admin_token).await
}

/// Starts every service on a given store.
pub async fn start_with(
    config: &Config,
    store: Arc<dyn Store>,
    admin_token: String,
) -> Result<Controller> {
    crate::listen::raise_fd_limit();
    let metrics = Arc::new(Metrics {
        store: Some(store.stats()),
        ..Metrics::default()
    });
    let registry = Arc::new(
        Registry::new(store, config.overlay_pool).with_max_prefixes(config.max_prefixes_per_node),
    );
    let ca = Arc::new(registry.load_or_create_ca().await?);
    let hub = Hub::start(
        registry.clone(),
        config.mtu,
        metrics.clone(),
        config.paths.clone(),
    );
    let endpoint = control::bind(config.control_listen, &ca)?;
    let control_addr = endpoint.local_addr()?;
    let api_listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API {} ([api] listen)", config.api_listen))?;
    let api_addr = api_listener.local_addr()?;
    let api_guard = crate::listen::Guard::new("api", crate::listen::Limits::API);
    let control_guard = crate::listen::Guard::new("control", control::PRE_AUTH);

    let mut tasks = tokio::task::JoinSet::new();
    let gateway = match &config.ai_gateway {
        Some(g) => {
            Some(crate::gateway::start(g.clone(), registry.clone(), hub.clone(), &mut tasks).await?)
        }
        None => None,
    };
    {
        let ctx = Arc::new(Control {
            pre_auth: control_guard.clone(),
            large_writes: crate::control::large_writes(),
            registry: registry.clone(),
            ca: ca.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
        });
        let endpoint = endpoint.clone();
        tasks.spawn(async move {
            control::serve(endpoint, ctx).await;
            Ok(())
        });
    }
    {
        let state = Arc::new(ApiState {
            registry: registry.clone(),
            ca: ca.clone(),
            hub,
            metrics,
            admin_token,
            control_advertise: config.control_advertise.clone(),
            gateway: gateway.as_ref().map(|(g, _)| g.clone()),
            api_guard: api_guard.clone(),
            control_guard: control_guard.clone(),
        });
        let app = api::router(state);
        tasks.spawn(async move {
            crate::listen::serve_api(api_listener, api_guard, app).await;
            Ok(())
        });
    }
    tracing::info!(
        control = %control_addr,
        api = %api_addr,
        ca_fingerprint = %ca.fingerprint(),
        overlay_pool = %config.overlay_pool,
        "skymesh-controller up"
    );
    Ok(Controller {
        control_addr,
        api_addr,
        ca_fingerprint: ca.fingerprint(),
        registry,
        gateway,
        endpoint,
        tasks,
    })
}

/// Reads the admin token, or creates the file (mode 0600) with a random one. A
/// file others can read is refused: the token is the API's only credential.
pub fn load_or_create_admin_token(path: &Path) -> Result<String> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                bail!(
                    "[api] admin_token_file {}: readable by others (mode {:o}); run `chmod 600 {}`",
                    path.display(),
                    meta.permissions().mode() & 0o777,
                    path.display()
                );
            }
            let token = crate::config::read_text_bounded(
                path,
                crate::config::MAX_TOKEN_BYTES,
                "[api] admin_token_file",
            )?
            .trim()
            .to_string();
            if token.len() < 16 {
                bail!(
                    "[api] admin_token_file {}: the token is shorter than 16 characters; put a long random string there (or delete the file to have one generated)",
                    path.display()
                );
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let token = hex::encode(bytes);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating [api] admin_token_file {}", path.display()))?;
            std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())?;
            tracing::info!(file = %path.display(), "generated the admin token");
            Ok(token)
        }
        Err(e) => {
            Err(e).with_context(|| format!("reading [api] admin_token_file {}", path.display()))
        }
    }
}
