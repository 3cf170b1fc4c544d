//! Builds a lab from a [`Topology`]: namespaces, links, addresses, NAT, the WAN
//! switch and one agent per gateway; tears all of it down on drop.
//!
//! Layout per site `S` of lab `ID` (namespaces are `sml-ID-…`):
//! - `S-gw`: the gateway, running skymesh-agent; `wan0` on the WAN segment
//!   203.0.113.0/24 (or, behind NAT, on 192.0.2.0/24 towards `S-nat`), `vpc0`
//!   holding the VPC's first address;
//! - `S-vpc`: the workload host, `eth0` with the VPC's tenth address, default
//!   route via the gateway;
//! - `S-nat` (only with `nat = true`): masquerades the gateway onto the WAN.
//!
//! The `wan` namespace holds one switch port per site (`p-S`); nothing connects
//! to the root namespace.
//!
//! In controller mode (the default) a `ctl` namespace on the WAN segment
//! (203.0.113.2, port `p-ctl`) runs skymesh-controller and an agent of its own:
//! the controller host is a mesh node too. Every gateway joins with a join token
//! made through `skymeshctl`, the controller node first, then the sites in
//! topology order. In static mode each agent's file lists its peers instead.

use super::topology::{Site, Topology};
use crate::agent::{agent_bin, workspace_bin, write_secret, Keypair};
use crate::netns::{destroy, list_namespaces, Netns};
use crate::proc::Spawned;
use crate::wan::switch::disable_offloads;
use crate::wan::{Switch, SwitchHandle};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Prefix of every lab namespace.
pub const LAB_PREFIX: &str = "sml-";
pub const LISTEN_PORT: u16 = 51820;
/// Keepalive for gateways behind NAT, short so the lab converges fast.
const NAT_KEEPALIVE: u16 = 5;
/// Agents' metrics listen on every address of their gateway namespace, so a
/// Prometheus in the lab scrapes them over the overlay (the namespaces have no
/// route out; a real gateway keeps the default, loopback).
pub const METRICS_LISTEN: &str = "0.0.0.0:9586";
/// The port of [`METRICS_LISTEN`].
pub const METRICS_PORT: u16 = 9586;
/// The controller's address on the WAN segment.
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const CONTROL_PORT: u16 = 7443;
/// The API listens on loopback inside the controller's namespace.
pub const API_URL: &str = "http://127.0.0.1:7080";
/// Node name of the controller host's own agent.
pub const CONTROLLER_NODE: &str = "controller";
/// The controller's AI gateway, on every address of its namespace.
pub const AI_GATEWAY_PORT: u16 = 7090;
/// Where the sample AI backends listen in their VPC hosts.
pub const AI_BACKEND_PORT: u16 = 8000;
pub const AI_BACKEND_TLS_PORT: u16 = 8443;

/// Where the netmap comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Agents enroll with the lab's controller (the default).
    Controller,
    /// Each agent's config file lists its peers.
    Static,
}

/// The controller host: its namespace, the controller and its own agent.
pub struct ControllerRuntime {
    pub config: PathBuf,
    pub token_file: PathBuf,
    pub agent_config: PathBuf,
    pub admin_socket: PathBuf,
    pub process: Option<Spawned>,
    pub agent: Option<Spawned>,
    pub ns: Netns,
}

/// A running site.
pub struct SiteRuntime {
    pub site: Site,
    pub index: usize,
    /// Address other gateways reach this one at (its NAT's, when behind NAT).
    pub public_ip: Ipv4Addr,
    pub overlay_ip: Ipv4Addr,
    pub vpc_host_ip: Ipv4Addr,
    pub gateway_vpc_ip: Ipv4Addr,
    pub config: PathBuf,
    pub admin_socket: PathBuf,
    pub agent: Option<Spawned>,
    /// The sample AI service in the VPC host, when the topology puts one here.
    pub ai_backend: Option<crate::ai::Backend>,
    // Drop order: processes first, then namespaces.
    pub vpc: Netns,
    pub gw: Netns,
    pub nat: Option<Netns>,
}

pub struct Lab {
    pub id: String,
    pub mode: Mode,
    /// The AI gateway's client key of the lab (controller mode with AI backends).
    pub ai_key: Option<String>,
    /// Controller mode only.
    pub controller: Option<ControllerRuntime>,
    pub topology: Topology,
    pub dir: PathBuf,
    pub sites: Vec<SiteRuntime>,
    pub switch: SwitchHandle,
    pub wan: Netns,
}

/// Namespace name of `role` in lab `id`.
pub fn ns_name(id: &str, role: &str) -> String {
    format!("{LAB_PREFIX}{id}-{role}")
}

/// Namespace of the agent of `node` in lab `id`: the controller host's for
/// [`CONTROLLER_NODE`], else the gateway of the site called `node`.
pub fn agent_ns_name(id: &str, node: &str) -> String {
    if node == CONTROLLER_NODE {
        ns_name(id, "ctl")
    } else {
        ns_name(id, &format!("{node}-gw"))
    }
}

/// `/metrics` of the agent of `node` in lab `id`, fetched inside its namespace from
/// 127.0.0.1 (where every lab agent listens, in static and controller mode).
pub fn scrape_agent_metrics(id: &str, node: &str) -> Result<crate::metrics::Metrics> {
    let ns = agent_ns_name(id, node);
    crate::metrics::scrape(&ns, &format!("127.0.0.1:{METRICS_PORT}"))
        .with_context(|| format!("fetching /metrics of {node}'s agent in namespace {ns}"))
}

/// WAN switch port of a site.
pub fn port_name(site: &str) -> String {
    format!("p-{site}")
}

/// The repository's `configs/lab.toml`, the topology the end-to-end suites run on.
pub fn default_topology() -> Result<Topology> {
    Topology::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lab.toml"))
}

/// A lab id unique to this test process and `test` (a letter or two): short, because
/// it is part of every namespace name.
pub fn test_lab_id(test: &str) -> String {
    format!("t{}{test}", std::process::id() % 100_000)
}

/// Runs `body` on a fresh lab of `topology` (id from [`test_lab_id`]`(tag)`) as an
/// end-to-end test: needs root, and `nft` when a site sits behind NAT; the lab is
/// torn down whatever happens, and its logs are kept when the test fails.
pub fn with_lab(
    name: &str,
    tag: &str,
    topology: Topology,
    body: impl FnOnce(&mut Lab) -> Result<()>,
) -> Result<()> {
    if !crate::require_root() {
        return Ok(());
    }
    if topology.sites.iter().any(|s| s.nat) && !crate::require_tool("nft") {
        return Ok(());
    }
    crate::e2e(name, |env| {
        let mut lab = Lab::up(&test_lab_id(tag), topology, &env.path("lab"))?;
        body(&mut lab)
    })
}

fn host(net: ipnet::Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

impl Lab {
    /// Builds the lab `id` from `topology` in controller mode, keeping keys,
    /// configs and logs in `dir`, and starts the controller and every agent.
    pub fn up(id: &str, topology: Topology, dir: &Path) -> Result<Self> {
        Self::up_with(id, topology, dir, Mode::Controller)
    }

    /// Builds the lab in the given mode.
    pub fn up_with(id: &str, topology: Topology, dir: &Path, mode: Mode) -> Result<Self> {
        if topology
            .sites
            .iter()
            .any(|s| s.name == "ctl" || s.name == CONTROLLER_NODE)
        {
            bail!("site names \"ctl\" and {CONTROLLER_NODE:?} are reserved for the lab's controller; rename that site");
        }
        if list_namespaces()
            .iter()
            .any(|n| n.starts_with(&ns_name(id, "")))
        {
            bail!("a lab with id {id:?} exists already; `skymesh-lab down --id {id}` removes it");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let wan = Netns::named(&ns_name(id, "wan"))?;
        let mut sites = Vec::new();
        for (i, site) in topology.sites.iter().enumerate() {
            sites.push(build_site(id, i, site, &wan, dir)?);
        }
        let ctl_ns = match mode {
            Mode::Controller => {
                let ns = Netns::named(&ns_name(id, "ctl"))?;
                link(
                    &ns,
                    "wan0",
                    &format!("{CONTROLLER_IP}/24"),
                    &wan,
                    &port_name("ctl"),
                    None,
                )?;
                disable_offloads(ns.name(), "wan0")?;
                Some(ns)
            }
            Mode::Static => None,
        };
        let mut ports: Vec<String> = topology.sites.iter().map(|s| port_name(&s.name)).collect();
        if ctl_ns.is_some() {
            ports.push(port_name("ctl"));
        }
        let port_refs: Vec<&str> = ports.iter().map(String::as_str).collect();
        let switch = Switch::start(wan.name(), &port_refs, 0x5eed)?;
        for ((from, to), shape) in &topology.wan {
            switch.set(&port_name(from), &port_name(to), *shape)?;
        }
        let controller = ctl_ns.map(|ns| ControllerRuntime {
            config: dir.join("controller.toml"),
            token_file: dir.join("admin.token"),
            agent_config: dir.join("controller-agent.toml"),
            admin_socket: dir.join("controller-agent.sock"),
            process: None,
            agent: None,
            ns,
        });
        let mut lab = Self {
            id: id.to_string(),
            mode,
            ai_key: None,
            controller,
            topology,
            dir: dir.to_path_buf(),
            sites,
            switch,
            wan,
        };
        match mode {
            Mode::Static => lab.write_agent_configs()?,
            Mode::Controller => {
                lab.start_ai_backends()?;
                lab.start_controller()?;
                lab.join_controller_node()?;
                lab.write_controller_agent_configs()?;
            }
        }
        for i in 0..lab.sites.len() {
            lab.start_agent(i)?;
        }
        Ok(lab)
    }

    fn ctl(&self) -> Result<&ControllerRuntime> {
        self.controller
            .as_ref()
            .context("this lab runs in static mode; it has no controller")
    }

    /// Writes the controller's config (first time) and starts it; returns once
    /// its API answers.
    pub fn start_controller(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        let ai_gateway_toml = self.ai_gateway_toml()?;
        let ctl = self
            .controller
            .as_mut()
            .context("this lab runs in static mode; it has no controller")?;
        if !ctl.config.exists() {
            let mut toml = format!(
                "[control]\nlisten = \"0.0.0.0:{CONTROL_PORT}\"\nadvertise = [\"{CONTROLLER_IP}:{CONTROL_PORT}\"]\n\n[api]\nlisten = \"127.0.0.1:7080\"\nadmin_token_file = \"{}\"\n\n[state]\ndata_dir = \"{}\"\n",
                ctl.token_file.display(),
                dir.join("controller-data").display()
            );
            toml.push_str(&ai_gateway_toml);
            write_secret(&ctl.config, &toml)?;
        }
        let bin = workspace_bin("skymesh-controller", "SKYMESH_CONTROLLER_BIN")?;
        let config = ctl.config.to_str().context("config path")?.to_string();
        let cmd = ctl.ns.command(
            bin.to_str().context("controller path")?,
            &["run", "--config", &config],
        );
        let mut process = Spawned::start("controller", cmd, &dir.join("controller.log"))?;
        let ctl_bin = workspace_bin("skymeshctl", "SKYMESHCTL_BIN")?;
        let ctl_bin = ctl_bin.to_str().context("skymeshctl path")?.to_string();
        let token_file = ctl.token_file.to_str().context("token path")?.to_string();
        let ready = crate::wait_until(Duration::from_secs(15), || {
            ctl.token_file.exists()
                && ctl
                    .ns
                    .command(
                        &ctl_bin,
                        &[
                            "--api",
                            API_URL,
                            "--token-file",
                            &token_file,
                            "nodes",
                            "list",
                        ],
                    )
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
        if ready.is_none() {
            let _ = process.ensure_running();
            bail!("the controller did not come up:\n{}", process.log());
        }
        ctl.process = Some(process);
        Ok(())
    }

    /// Starts the topology's AI backends in their sites' VPC hosts, and makes
    /// the lab's client key (controller mode).
    fn start_ai_backends(&mut self) -> Result<()> {
        if self.topology.ai_backends.is_empty() {
            return Ok(());
        }
        for spec in self.topology.ai_backends.clone() {
            let i = self.site_index(&spec.site)?;
            let s = &self.sites[i];
            let port = if spec.tls {
                AI_BACKEND_TLS_PORT
            } else {
                AI_BACKEND_PORT
            };
            let backend = crate::ai::Backend::start(
                Some(s.vpc.name()),
                &self.dir,
                &spec.name,
                std::net::SocketAddr::from((s.vpc_host_ip, port)),
                &spec.models.join(","),
                spec.tls,
            )?;
            self.sites[i].ai_backend = Some(backend);
        }
        let key = crate::ai::create_key(&self.dir, "lab", "*", 6000)?;
        self.ai_key = Some(key.key);
        std::fs::write(self.dir.join("lab.ai-key-entry"), key.entry)?;
        Ok(())
    }

    /// `[ai_gateway]` for the controller: one upstream per backend (reached over
    /// the mesh, never `public`), a lowest-latency `chat` route over all of
    /// them, a `cn` route held to cn-shanghai, and the lab's key.
    fn ai_gateway_toml(&self) -> Result<String> {
        let backends: Vec<(&SiteRuntime, &crate::ai::Backend)> = self
            .sites
            .iter()
            .filter_map(|s| s.ai_backend.as_ref().map(|b| (s, b)))
            .collect();
        if backends.is_empty() {
            return Ok(String::new());
        }
        let mut t = format!(
            "\n[ai_gateway]\nlisten = \"0.0.0.0:{AI_GATEWAY_PORT}\"\nnode = \"{CONTROLLER_NODE}\"\n\n"
        );
        let mut names = Vec::new();
        for (s, b) in &backends {
            let spec = self
                .topology
                .ai_backends
                .iter()
                .find(|x| x.name == b.name)
                .context("backend spec")?;
            let models: Vec<String> = spec.models.iter().map(|m| format!("{m:?}")).collect();
            t.push_str(&b.upstream_toml(
                &s.site.name,
                &s.site.region,
                false,
                &format!("models = [{}]", models.join(", ")),
            ));
            names.push(format!("{:?}", b.name));
        }
        t.push_str(&format!(
            "[[ai_gateway.routes]]\nname = \"cn\"\npath_prefix = \"/cn/v1\"\nupstreams = [{}]\nallowed_regions = [\"cn-shanghai\"]\n\n[[ai_gateway.routes]]\nname = \"chat\"\npath_prefix = \"/v1\"\nstrategy = \"lowest-latency\"\nupstreams = [{}]\n\n",
            names.join(", "),
            names.join(", ")
        ));
        let entry = std::fs::read_to_string(self.dir.join("lab.ai-key-entry"))
            .context("the lab's AI key entry")?;
        t.push_str(&entry);
        Ok(t)
    }

    /// The AI gateway's OpenAI base URL, on the controller's overlay address
    /// (reachable from every site's VPC host over the mesh).
    pub fn ai_base_url(&self) -> Result<String> {
        let ip = self.node_overlay_ip(CONTROLLER_NODE)?;
        Ok(format!("http://{ip}:{AI_GATEWAY_PORT}/v1"))
    }

    /// A node's overlay address, from `skymeshctl nodes list --json`.
    pub fn node_overlay_ip(&self, node: &str) -> Result<String> {
        let nodes: serde_json::Value =
            serde_json::from_str(&self.ctl_exec(&["--json", "nodes", "list"])?)?;
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == node))
            .and_then(|n| n["overlay_ip"].as_str())
            .map(String::from)
            .with_context(|| format!("node {node} is not enrolled"))
    }

    /// Kills the controller with SIGKILL (a crash or an outage).
    pub fn kill_controller(&mut self) -> Result<()> {
        if let Some(ctl) = self.controller.as_mut() {
            if let Some(mut p) = ctl.process.take() {
                p.kill9()?;
            }
        }
        Ok(())
    }

    /// Runs `skymeshctl ARGS` against the lab's controller, inside its namespace.
    pub fn ctl_command(&self, args: &[&str]) -> Result<Command> {
        let ctl = self.ctl()?;
        let bin = workspace_bin("skymeshctl", "SKYMESHCTL_BIN")?;
        let mut full = vec![
            "--api",
            API_URL,
            "--token-file",
            ctl.token_file.to_str().context("token path")?,
        ];
        full.extend_from_slice(args);
        Ok(ctl
            .ns
            .command(bin.to_str().context("skymeshctl path")?, &full))
    }

    /// `skymeshctl ARGS` output, failing with its stderr.
    pub fn ctl_exec(&self, args: &[&str]) -> Result<String> {
        crate::proc::check(&mut self.ctl_command(args)?)
    }

    /// A join token for node `name`, written to a file (mode 0600).
    fn join_token(&self, name: &str, cloud: &str, region: &str) -> Result<PathBuf> {
        let token = self.ctl_exec(&[
            "join-token",
            "create",
            "--name",
            name,
            "--site",
            name,
            "--cloud",
            cloud,
            "--region",
            region,
            "--ttl",
            "1h",
        ])?;
        let path = self.dir.join(format!("{name}.join-token"));
        write_secret(&path, token.trim())?;
        Ok(path)
    }

    /// The controller host's own agent: a mesh node without a VPC.
    fn join_controller_node(&mut self) -> Result<()> {
        let token = self.join_token(CONTROLLER_NODE, "lab", "lab")?;
        let key = Keypair::generate()?;
        let ctl = self.ctl()?;
        let key_file = self.dir.join("controller-agent.key");
        write_secret(&key_file, &format!("{}\n", key.private))?;
        let toml = format!(
            "[interface]\nname = \"skymesh0\"\nprivate_key_file = \"{}\"\nlisten_port = {LISTEN_PORT}\n\n[metrics]\nlisten = \"{METRICS_LISTEN}\"\n\n[admin]\nsocket = \"{}\"\n\n[state]\ndir = \"{}\"\n\n[controller]\njoin_token_file = \"{}\"\n\n[node]\nendpoints = [\"{CONTROLLER_IP}:{LISTEN_PORT}\"]\n",
            key_file.display(),
            ctl.admin_socket.display(),
            self.dir.join("controller-agent-state").display(),
            token.display(),
        );
        write_secret(&ctl.agent_config, &toml)?;
        self.start_controller_agent()
    }

    pub fn start_controller_agent(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        let ctl = self
            .controller
            .as_mut()
            .context("no controller in static mode")?;
        let bin = agent_bin()?;
        let config = ctl
            .agent_config
            .to_str()
            .context("config path")?
            .to_string();
        let cmd = ctl.ns.command(
            bin.to_str().context("agent path")?,
            &["run", "--config", &config],
        );
        let _ = std::fs::remove_file(&ctl.admin_socket);
        let mut agent = Spawned::start("controller-agent", cmd, &dir.join("controller-agent.log"))?;
        if crate::wait_until(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&ctl.admin_socket).is_ok()
        })
        .is_none()
        {
            let _ = agent.ensure_running();
            bail!("the controller's agent did not start:\n{}", agent.log());
        }
        ctl.agent = Some(agent);
        Ok(())
    }

    /// Agent configs in controller mode: a join token, the VPC to advertise,
    /// the public endpoint (none behind NAT: the controller observes it).
    fn write_controller_agent_configs(&self) -> Result<()> {
        for s in &self.sites {
            let token = self.join_token(&s.site.name, &s.site.cloud, &s.site.region)?;
            let key = Keypair::generate()?;
            let key_file = self.dir.join(format!("{}.key", s.site.name));
            write_secret(&key_file, &format!("{}\n", key.private))?;
            let mut toml = format!(
                "[interface]\nname = \"skymesh0\"\nprivate_key_file = \"{}\"\nlisten_port = {LISTEN_PORT}\n\n[metrics]\nlisten = \"{METRICS_LISTEN}\"\n\n[admin]\nsocket = \"{}\"\n\n[state]\ndir = \"{}\"\n\n[controller]\njoin_token_file = \"{}\"\n\n[node]\nadvertise = [\"{}\"]\ntransit = {}\n",
                key_file.display(),
                s.admin_socket.display(),
                self.dir.join(format!("{}-state", s.site.name)).display(),
                token.display(),
                s.site.vpc,
                s.site.transit,
            );
            if s.site.nat {
                toml.push_str(&format!("persistent_keepalive = {NAT_KEEPALIVE}\n"));
            } else {
                toml.push_str(&format!(
                    "endpoints = [\"{}:{LISTEN_PORT}\"]\n",
                    s.public_ip
                ));
            }
            write_secret(&s.config, &toml)?;
        }
        Ok(())
    }

    pub fn site(&self, name: &str) -> Result<&SiteRuntime> {
        self.sites
            .iter()
            .find(|s| s.site.name == name)
            .with_context(|| format!("no site {name:?} in this lab"))
    }

    fn site_index(&self, name: &str) -> Result<usize> {
        self.sites
            .iter()
            .position(|s| s.site.name == name)
            .with_context(|| format!("no site {name:?} in this lab"))
    }

    fn write_agent_configs(&self) -> Result<()> {
        let keys: Vec<Keypair> = self
            .sites
            .iter()
            .map(|_| Keypair::generate())
            .collect::<Result<_>>()?;
        for (s, key) in self.sites.iter().zip(&keys) {
            let key_file = self.dir.join(format!("{}.key", s.site.name));
            write_secret(&key_file, &format!("{}\n", key.private))?;
            let mut toml = format!(
                "[interface]\nname = \"skymesh0\"\nprivate_key_file = \"{}\"\nlisten_port = {LISTEN_PORT}\naddress = \"{}/32\"\n\n[metrics]\nlisten = \"127.0.0.1:9586\"\n\n[admin]\nsocket = \"{}\"\n\n[state]\ndir = \"{}\"\n",
                key_file.display(),
                s.overlay_ip,
                s.admin_socket.display(),
                self.dir.join(format!("{}-state", s.site.name)).display(),
            );
            for (p, pkey) in self
                .sites
                .iter()
                .zip(&keys)
                .filter(|(p, _)| p.index != s.index)
            {
                toml.push_str(&format!(
                    "\n[[peers]]\nname = \"{}\"\npublic_key = \"{}\"\nallowed_ips = [\"{}/32\", \"{}\"]\n",
                    p.site.name, pkey.public, p.overlay_ip, p.site.vpc
                ));
                // A peer behind NAT is reached at the address its packets come
                // from; it keeps the mapping open with keepalives.
                if !p.site.nat {
                    toml.push_str(&format!("endpoint = \"{}:{LISTEN_PORT}\"\n", p.public_ip));
                }
                if s.site.nat {
                    toml.push_str(&format!("persistent_keepalive = {NAT_KEEPALIVE}\n"));
                }
            }
            write_secret(&s.config, &toml)?;
        }
        Ok(())
    }

    /// Starts (or restarts) the agent of site `i` and waits for its admin socket.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let s = &mut self.sites[i];
        let log = self.dir.join(format!("{}-agent.log", s.site.name));
        let config = s
            .config
            .to_str()
            .context("config path is not UTF-8")?
            .to_string();
        let bin = agent_bin()?;
        let bin = bin.to_str().context("agent path is not UTF-8")?.to_string();
        let cmd = s.gw.command(&bin, &["run", "--config", &config]);
        // A socket file left by a killed agent must not count as ready.
        let _ = std::fs::remove_file(&s.admin_socket);
        let mut agent = Spawned::start(&format!("{}-agent", s.site.name), cmd, &log)?;
        let ready = crate::wait_until(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&s.admin_socket).is_ok()
        });
        if ready.is_none() {
            let _ = agent.ensure_running();
            bail!(
                "agent of {} did not open its admin socket:\n{}",
                s.site.name,
                agent.log()
            );
        }
        s.agent = Some(agent);
        if self.mode == Mode::Controller {
            // The controller assigns the overlay address with the first netmap.
            let name = self.sites[i].site.name.clone();
            let mut addr = None;
            crate::wait_until(Duration::from_secs(20), || {
                addr = self.agent_status(&name).ok().and_then(|st| {
                    st.interface
                        .address
                        .split('/')
                        .next()?
                        .parse::<Ipv4Addr>()
                        .ok()
                });
                addr.is_some()
            });
            match addr {
                Some(a) => self.sites[i].overlay_ip = a,
                None => bail!(
                    "agent of {name} got no netmap from the controller:\n{}",
                    self.sites[i]
                        .agent
                        .as_ref()
                        .map(|a| a.log())
                        .unwrap_or_default()
                ),
            }
        }
        Ok(())
    }

    /// Kills the agent of `site` with SIGKILL (a crash).
    pub fn kill_agent(&mut self, site: &str) -> Result<()> {
        let i = self.site_index(site)?;
        if let Some(mut a) = self.sites[i].agent.take() {
            a.kill9()?;
        }
        Ok(())
    }

    pub fn restart_agent(&mut self, site: &str) -> Result<()> {
        let i = self.site_index(site)?;
        self.start_agent(i)
    }

    /// Runs `program args…` in the VPC host of `site`.
    pub fn vpc_command(&self, site: &str, program: &str, args: &[&str]) -> Result<Command> {
        Ok(self.site(site)?.vpc.command(program, args))
    }

    /// One ping from the VPC host of `from` to the VPC host of `to`.
    pub fn vpc_ping(&self, from: &str, to: &str, timeout_s: u32) -> Result<Option<f64>> {
        let dst = self.site(to)?.vpc_host_ip.to_string();
        let out = self
            .vpc_command(
                from,
                "ping",
                &["-n", "-c", "1", "-W", &timeout_s.to_string(), &dst],
            )?
            .output()
            .context("running ping")?;
        if !out.status.success() {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split("time=")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok()))
    }

    /// Sends `bytes` of pattern data over TCP from the VPC host of `from` to a
    /// listener on `port` at the VPC host of `to`; fails unless they arrive intact.
    pub fn vpc_transfer(
        &self,
        from: &str,
        to: &str,
        port: u16,
        bytes: usize,
    ) -> Result<crate::traffic::Transfer> {
        let (src, dst) = (self.site(from)?, self.site(to)?);
        let what = || format!("{bytes} bytes over TCP from VPC {from} to VPC {to}");
        let t = crate::traffic::tcp_transfer(
            &src.vpc,
            &dst.vpc,
            &dst.vpc_host_ip.to_string(),
            port,
            crate::traffic::Payload::Pattern(bytes),
        )
        .with_context(what)?;
        t.verify().with_context(what)?;
        Ok(t)
    }

    /// Every ordered pair of distinct sites, as (from, to) names.
    pub fn ordered_pairs(&self) -> Vec<(String, String)> {
        let names: Vec<&str> = self.sites.iter().map(|s| s.site.name.as_str()).collect();
        names
            .iter()
            .flat_map(|a| {
                names
                    .iter()
                    .filter(move |b| *b != a)
                    .map(move |b| (a.to_string(), b.to_string()))
            })
            .collect()
    }

    /// Pings from VPC host to VPC host for every pair in `pairs` at once until each
    /// gets a reply; returns how long each pair took, or fails naming the pairs that
    /// got none within `timeout`. In parallel because a pair may wait out a handshake
    /// timer (seconds), and one pair's wait must not eat into the next one's.
    pub fn wait_vpc_pings(
        &self,
        pairs: &[(String, String)],
        timeout: Duration,
    ) -> Result<Vec<Duration>> {
        let waited: Vec<Option<Duration>> = std::thread::scope(|s| {
            let waits: Vec<_> = pairs
                .iter()
                .map(|(from, to)| {
                    s.spawn(move || {
                        crate::wait_until(timeout, || {
                            self.vpc_ping(from, to, 1).ok().flatten().is_some()
                        })
                    })
                })
                .collect();
            waits
                .into_iter()
                .map(|w| w.join().unwrap_or(None))
                .collect()
        });
        let failed: Vec<String> = pairs
            .iter()
            .zip(&waited)
            .filter(|(_, w)| w.is_none())
            .map(|((from, to), _)| format!("{from}→{to}"))
            .collect();
        if !failed.is_empty() {
            bail!(
                "no VPC ping reply within {timeout:?} for {}",
                failed.join(", ")
            );
        }
        Ok(waited.into_iter().flatten().collect())
    }

    /// `count` pings (200 ms apart) from the VPC host of `from` to that of `to`:
    /// how many came back, and the lowest RTT in ms.
    pub fn vpc_ping_n(&self, from: &str, to: &str, count: u32) -> Result<(u32, Option<f64>)> {
        let dst = self.site(to)?.vpc_host_ip.to_string();
        let out = self
            .vpc_command(
                from,
                "ping",
                &[
                    "-n",
                    "-q",
                    "-c",
                    &count.to_string(),
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    &dst,
                ],
            )?
            .output()
            .context("running ping")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let received = text
            .split(" received")
            .next()
            .and_then(|t| t.rsplit(", ").next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let min = text
            .split("min/avg/max")
            .nth(1)
            .and_then(|t| t.split('=').nth(1))
            .and_then(|t| t.trim().split('/').next())
            .and_then(|v| v.parse().ok());
        Ok((received, min))
    }

    /// Status of the agent of `site` ([`CONTROLLER_NODE`]: the controller host's),
    /// via `skymesh-agent status --json`.
    pub fn agent_status(&self, site: &str) -> Result<crate::agent::Status> {
        let (ns, config) = match self.controller.as_ref() {
            Some(ctl) if site == CONTROLLER_NODE => (&ctl.ns, &ctl.agent_config),
            _ => {
                let s = self.site(site)?;
                (&s.gw, &s.config)
            }
        };
        let config = config.to_str().context("config path")?;
        let out = ns
            .command(
                agent_bin()?.to_str().context("agent path")?,
                &["status", "--config", config, "--json"],
            )
            .output()
            .context("running status")?;
        if !out.status.success() {
            bail!("status of {site}: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("parsing status --json")
    }

    /// Names of the nodes running an agent: the sites in topology order, then
    /// [`CONTROLLER_NODE`] in controller mode.
    pub fn agent_nodes(&self) -> Vec<&str> {
        let sites = self.sites.iter().map(|s| s.site.name.as_str());
        let controller = self.controller.as_ref().map(|_| CONTROLLER_NODE);
        sites.chain(controller).collect()
    }

    /// `/metrics` of the agent of `node` (a site, or [`CONTROLLER_NODE`]).
    pub fn agent_metrics(&self, node: &str) -> Result<crate::metrics::Metrics> {
        if node == CONTROLLER_NODE {
            self.ctl()?;
        } else {
            self.site(node)?;
        }
        scrape_agent_metrics(&self.id, node)
    }
}

fn build_site(id: &str, i: usize, site: &Site, wan: &Netns, dir: &Path) -> Result<SiteRuntime> {
    let n = site.name.as_str();
    let gw = Netns::named(&ns_name(id, &format!("{n}-gw")))?;
    let vpc = Netns::named(&ns_name(id, &format!("{n}-vpc")))?;
    let public_ip = Ipv4Addr::new(203, 0, 113, 10 + i as u8);
    let port = port_name(n);

    // The gateway's (or its NAT's) leg on the WAN segment.
    let nat = if site.nat {
        let nat = Netns::named(&ns_name(id, &format!("{n}-nat")))?;
        link(&nat, "wan0", &format!("{public_ip}/24"), wan, &port, None)?;
        link(
            &gw,
            "wan0",
            "192.0.2.2/24",
            &nat,
            "lan0",
            Some("192.0.2.1/24"),
        )?;
        gw.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
        nat.sysctl("net.ipv4.ip_forward", "1")?;
        nat.nft(
            "table ip nat {\n chain postrouting {\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan0\" masquerade\n }\n}\n",
        )?;
        disable_offloads(nat.name(), "wan0")?;
        disable_offloads(nat.name(), "lan0")?;
        Some(nat)
    } else {
        link(&gw, "wan0", &format!("{public_ip}/24"), wan, &port, None)?;
        None
    };
    disable_offloads(gw.name(), "wan0")?;

    // The VPC: the gateway holds .1, the workload host .10.
    let gateway_vpc_ip = host(site.vpc, 1);
    let vpc_host_ip = host(site.vpc, 10);
    link(
        &vpc,
        "eth0",
        &format!("{vpc_host_ip}/{}", site.vpc.prefix_len()),
        &gw,
        "vpc0",
        Some(&format!("{gateway_vpc_ip}/{}", site.vpc.prefix_len())),
    )?;
    vpc.ip(&[
        "route",
        "add",
        "default",
        "via",
        &gateway_vpc_ip.to_string(),
    ])?;
    gw.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(SiteRuntime {
        site: site.clone(),
        index: i,
        public_ip,
        overlay_ip: Ipv4Addr::new(100, 96, 0, 1 + i as u8),
        vpc_host_ip,
        gateway_vpc_ip,
        config: dir.join(format!("{n}.toml")),
        admin_socket: dir.join(format!("{n}.sock")),
        agent: None,
        ai_backend: None,
        vpc,
        gw,
        nat,
    })
}

/// A veth from `a` (named `a_if`, address `a_cidr`) to `b` (named `b_if`, optional
/// address); both ends up, IPv6 off (the lab's underlay is IPv4).
fn link(
    a: &Netns,
    a_if: &str,
    a_cidr: &str,
    b: &Netns,
    b_if: &str,
    b_cidr: Option<&str>,
) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.sysctl(&format!("net.ipv6.conf.{a_if}.disable_ipv6"), "1")?;
    b.sysctl(&format!("net.ipv6.conf.{b_if}.disable_ipv6"), "1")?;
    a.ip(&["addr", "add", a_cidr, "dev", a_if])?;
    if let Some(c) = b_cidr {
        b.ip(&["addr", "add", c, "dev", b_if])?;
    }
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// Removes every namespace of lab `id` (or of every lab, with `None`) and the
/// processes in them; works after the lab process itself crashed.
pub fn down(id: Option<&str>) -> Vec<String> {
    let prefix = match id {
        Some(id) => ns_name(id, ""),
        None => LAB_PREFIX.to_string(),
    };
    let mut removed = Vec::new();
    // Gateways and hosts first, the WAN last, so nothing is left half-linked.
    let mut names: Vec<String> = list_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort_by_key(|n| n.ends_with("-wan"));
    for n in names {
        destroy(&n);
        removed.push(n);
    }
    removed
}
