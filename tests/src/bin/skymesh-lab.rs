//! `skymesh-lab`: builds the four-cloud lab on this machine (network namespaces and
//! an emulated WAN), shows the fabric working, and changes the WAN at run time.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};
use skymesh_tests::lab::build::Mode;
use skymesh_tests::lab::build::{ns_name, port_name, scrape_agent_metrics, CONTROLLER_NODE};
use skymesh_tests::lab::topology::{duration, percent, rate};
use skymesh_tests::lab::{down, Lab, Topology};
use skymesh_tests::wan::PairShape;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where running labs keep their state: one directory per lab id.
const RUN_DIR: &str = "/run/skymesh-lab";

#[derive(Parser)]
#[command(
    name = "skymesh-lab",
    version,
    about = "The skymesh multi-cloud lab: four clouds in network namespaces, joined by an emulated WAN"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the lab, start the agents, show the mesh, and run until Ctrl-C.
    Up {
        #[arg(long, default_value = "configs/lab.toml")]
        config: PathBuf,
        /// Lab id (part of every namespace name); random by default.
        #[arg(long)]
        id: Option<String>,
        /// Static mode: peers from each agent's config file, no controller.
        #[arg(long = "static")]
        static_mode: bool,
    },
    /// Run skymeshctl against the lab's controller: `skymesh-lab ctl -- nodes list`.
    Ctl {
        #[arg(long)]
        id: Option<String>,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Remove a lab's namespaces, processes and state, also after `up` crashed.
    /// Without --id: every lab started by `skymesh-lab up`.
    Down {
        #[arg(long)]
        id: Option<String>,
        /// Also sweep lab namespaces that no `up` registered (e.g. left by a killed
        /// test run).
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Print a site's agent metrics (Prometheus text, from inside its gateway);
    /// `controller` names the controller host's own agent.
    Metrics {
        site: String,
        #[arg(long)]
        id: Option<String>,
    },
    /// Print `KEY=VALUE` lines for clients of the lab: OPENAI_BASE_URL and
    /// OPENAI_API_KEY (the AI gateway, reachable from every VPC host), and more.
    /// `skymesh-lab exec aws -- env $(skymesh-lab env) python3 app.py`.
    Env {
        #[arg(long)]
        id: Option<String>,
    },
    /// Run a command in a site's VPC host: `skymesh-lab exec aws -- ping 10.10.0.10`.
    Exec {
        site: String,
        #[arg(long)]
        id: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Change the emulated WAN between two sites (both directions).
    Wan {
        #[command(subcommand)]
        op: WanOp,
    },
}

#[derive(Subcommand)]
enum WanOp {
    /// Drop everything between A and B.
    Cut(Pair),
    /// Undo a cut, keeping the pair's delay, loss and rate.
    Restore(Pair),
    /// Change the pair's shape: `wan set aws gcp --delay 80ms --loss 2%`.
    Set {
        #[command(flatten)]
        pair: Pair,
        #[arg(long)]
        delay: Option<String>,
        #[arg(long)]
        jitter: Option<String>,
        #[arg(long)]
        loss: Option<String>,
        #[arg(long)]
        rate: Option<String>,
        #[arg(long)]
        mtu: Option<u32>,
    },
}

#[derive(Args)]
struct Pair {
    a: String,
    b: String,
    #[arg(long)]
    id: Option<String>,
}

/// One request on a lab's control socket.
#[derive(Serialize, Deserialize)]
struct WanRequest {
    a: String,
    b: String,
    up: Option<bool>,
    delay: Option<String>,
    jitter: Option<String>,
    loss: Option<String>,
    rate: Option<String>,
    mtu: Option<u32>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Up {
            config,
            id,
            static_mode,
        } => up(&config, id, static_mode),
        Cmd::Ctl { id, args } => {
            let id = pick_lab(id)?;
            let ns = ns_name(&id, "ctl");
            if !skymesh_tests::netns::list_namespaces().contains(&ns) {
                bail!("lab {id} has no controller (it runs in static mode)");
            }
            let bin = skymesh_tests::agent::workspace_bin("skymeshctl", "SKYMESHCTL_BIN")?;
            let token = Path::new(RUN_DIR).join(&id).join("admin.token");
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&bin)
                .args(["--api", skymesh_tests::lab::build::API_URL, "--token-file"])
                .arg(&token)
                .args(&args)
                .status()
                .context("running skymeshctl")?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
        Cmd::Down { id, all } => {
            let ids: Vec<String> = match id {
                Some(id) => vec![id],
                None => running_labs(),
            };
            let mut stopped = Vec::new();
            for id in &ids {
                if stop_up_process(id) {
                    stopped.push(id.clone());
                }
                let _ = std::fs::remove_dir_all(Path::new(RUN_DIR).join(id));
            }
            // Whatever a stopped or crashed `up` left behind.
            let mut removed: Vec<String> = ids.iter().flat_map(|id| down(Some(id))).collect();
            if all {
                removed.extend(down(None));
            }
            for id in &stopped {
                println!("stopped lab {id}");
            }
            if !removed.is_empty() {
                println!(
                    "removed {} leftover namespaces: {}",
                    removed.len(),
                    removed.join(" ")
                );
            }
            if stopped.is_empty() && removed.is_empty() {
                println!("no lab was running");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Metrics { site, id } => {
            let id = pick_lab(id)?;
            let nodes = agent_nodes_of(&id);
            if nodes.is_empty() {
                bail!(
                    "lab {id} is not running (no namespaces {}*)",
                    ns_name(&id, "")
                );
            }
            if !nodes.contains(&site) {
                bail!(
                    "lab {id} has no site {site:?}; its agents run at: {}",
                    nodes.join(", ")
                );
            }
            print!("{}", scrape_agent_metrics(&id, &site)?.text);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Env { id } => {
            let id = pick_lab(id)?;
            let file = Path::new(RUN_DIR).join(&id).join(LAB_ENV);
            let text = std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "lab {id} has no {} yet (is `skymesh-lab up` running and past its status output?)",
                    file.display()
                )
            })?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec { site, id, command } => {
            let id = pick_lab(id)?;
            let ns = ns_name(&id, &format!("{site}-vpc"));
            if !skymesh_tests::netns::list_namespaces().contains(&ns) {
                bail!("lab {id} has no site {site:?} (no namespace {ns})");
            }
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(&command)
                .status()
                .context("running ip netns exec")?;
            Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
        }
        Cmd::Wan { op } => {
            let (pair, req) = match op {
                WanOp::Cut(p) => (
                    p.id.clone(),
                    WanRequest {
                        a: p.a,
                        b: p.b,
                        up: Some(false),
                        delay: None,
                        jitter: None,
                        loss: None,
                        rate: None,
                        mtu: None,
                    },
                ),
                WanOp::Restore(p) => (
                    p.id.clone(),
                    WanRequest {
                        a: p.a,
                        b: p.b,
                        up: Some(true),
                        delay: None,
                        jitter: None,
                        loss: None,
                        rate: None,
                        mtu: None,
                    },
                ),
                WanOp::Set {
                    pair,
                    delay,
                    jitter,
                    loss,
                    rate,
                    mtu,
                } => (
                    pair.id.clone(),
                    WanRequest {
                        a: pair.a,
                        b: pair.b,
                        up: None,
                        delay,
                        jitter,
                        loss,
                        rate,
                        mtu,
                    },
                ),
            };
            let id = pick_lab(pair)?;
            let sock = Path::new(RUN_DIR).join(&id).join("control.sock");
            let mut stream = UnixStream::connect(&sock).with_context(|| {
                format!(
                    "cannot reach lab {id} at {} (is `skymesh-lab up` running?)",
                    sock.display()
                )
            })?;
            writeln!(stream, "{}", serde_json::to_string(&req)?)?;
            let mut answer = String::new();
            BufReader::new(stream).read_line(&mut answer)?;
            let answer: serde_json::Value =
                serde_json::from_str(&answer).context("bad answer from the lab")?;
            if let Some(err) = answer.get("error").and_then(|e| e.as_str()) {
                bail!("{err}");
            }
            println!(
                "{}",
                answer
                    .get("detail")
                    .and_then(|d| d.as_str())
                    .unwrap_or("ok")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn running_labs() -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The nodes of lab `id` that run an agent, from its namespaces: the sites
/// (alphabetically), then the controller host when there is one.
fn agent_nodes_of(id: &str) -> Vec<String> {
    let namespaces = skymesh_tests::netns::list_namespaces();
    let prefix = ns_name(id, "");
    let mut nodes: Vec<String> = namespaces
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix)?.strip_suffix("-gw"))
        .map(str::to_string)
        .collect();
    nodes.sort();
    if namespaces.contains(&ns_name(id, "ctl")) {
        nodes.push(CONTROLLER_NODE.to_string());
    }
    nodes
}

fn pick_lab(id: Option<String>) -> Result<String> {
    if let Some(id) = id {
        return Ok(id);
    }
    let ids = running_labs();
    match ids.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no lab is running; start one with `skymesh-lab up`"),
        many => bail!(
            "several labs are running ({}); choose one with --id",
            many.join(", ")
        ),
    }
}

/// Asks a running `skymesh-lab up` of lab `id` to tear its lab down and waits for
/// it; false when none was running.
fn stop_up_process(id: &str) -> bool {
    let pid_file = Path::new(RUN_DIR).join(id).join("up.pid");
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return false;
    };
    // Only a live `skymesh-lab` (not a zombie, not a reused pid) gets the signal.
    let alive = |pid: i32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains("skymesh-lab")
    };
    if !alive(pid) {
        return false;
    }
    let raw = pid;
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, Signal::SIGTERM).is_err() {
        return false;
    }
    let start = Instant::now();
    while alive(raw) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

fn random_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:04x}", (nanos ^ std::process::id()) & 0xffff)
}

fn up(config: &Path, id: Option<String>, static_mode: bool) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces: run it as root");
    }
    let topology = Topology::load(config)?;
    let id = id.unwrap_or_else(random_id);
    if id.is_empty() || id.len() > 8 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("--id {id:?}: expected 1-8 letters or digits (it becomes part of namespace names)");
    }
    // Ctrl-C and SIGTERM are taken by sigwait below; block them before any thread
    // starts so every thread inherits the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let dir = Path::new(RUN_DIR).join(&id);
    println!(
        "building lab {id} from {} ({} sites)…",
        config.display(),
        topology.sites.len()
    );
    let mode = if static_mode {
        Mode::Static
    } else {
        Mode::Controller
    };
    let lab = Arc::new(Lab::up_with(&id, topology, &dir, mode)?);
    std::fs::write(dir.join("up.pid"), std::process::id().to_string())?;
    let control = UnixListener::bind(dir.join("control.sock"))?;
    {
        let lab = lab.clone();
        std::thread::spawn(move || serve_control(control, &lab));
    }

    wait_for_mesh(&lab);
    print!("{}", status_table(&lab));
    if lab.mode == Mode::Controller {
        println!(
            "\ncontroller: {}:{} (QUIC), API {} in namespace {}\n",
            skymesh_tests::lab::build::CONTROLLER_IP,
            skymesh_tests::lab::build::CONTROL_PORT,
            skymesh_tests::lab::build::API_URL,
            ns_name(&id, "ctl")
        );
        match lab.ctl_exec(&["nodes", "list"]) {
            Ok(t) => print!("{t}"),
            Err(e) => println!("(skymeshctl nodes list failed: {e:#})"),
        }
        print!("{}", paths_report(&lab));
        println!("\n  skymesh-lab ctl -- nodes list | prefixes list | ipam check 10.0.5.0/24");
        println!("  skymesh-lab ctl -- links list | paths list");
    }
    println!(
        "\nlab {id} is up. Try:\n  skymesh-lab exec aws -- ping -c 3 {}\n  skymesh-lab metrics aws        (its agent's Prometheus metrics; `metrics controller` too)\n  skymesh-lab wan cut aws gcp    |  skymesh-lab wan restore aws gcp\n  skymesh-lab wan set aws gcp --delay 80ms --loss 2%\nCtrl-C (or `skymesh-lab down`) removes it.",
        lab.sites.get(1).map(|s| s.vpc_host_ip.to_string()).unwrap_or_default()
    );
    if lab.mode == Mode::Controller {
        println!("  skymesh-lab exec aws -- env $(skymesh-lab env) python3 your_openai_app.py");
        match ai_report(&lab, &dir) {
            Ok(t) => print!("{t}"),
            Err(e) => println!("\n(AI gateway check failed: {e:#})"),
        }
    }
    let sig = signals.wait()?;
    println!("\n{sig:?}: removing lab {id}…");
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    down(Some(&id));
    Ok(ExitCode::SUCCESS)
}

fn wait_for_mesh(lab: &Lab) {
    let names: Vec<&str> = lab.sites.iter().map(|s| s.site.name.as_str()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for from in &names {
        for to in names.iter().filter(|t| *t != from) {
            while Instant::now() < deadline && lab.vpc_ping(from, to, 1).ok().flatten().is_none() {}
        }
    }
}

/// The status table `up` prints: sites, gateways, handshakes and a ping matrix.
fn status_table(lab: &Lab) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "\n{:<9} {:<8} {:<12} {:<14} {:<14} {:<12} {}\n",
        "site", "cloud", "region", "vpc", "gateway", "overlay", "handshakes"
    ));
    for s in &lab.sites {
        let handshakes = match lab.agent_status(&s.site.name) {
            Ok(st) => st
                .peers
                .iter()
                .map(|p| {
                    format!(
                        "{}:{}",
                        p.name,
                        if p.latest_handshake_unix.is_some() {
                            "ok"
                        } else {
                            "none"
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => format!("agent not answering: {e:#}"),
        };
        let gw = if s.site.nat {
            format!("{} (NAT)", s.public_ip)
        } else {
            s.public_ip.to_string()
        };
        out.push_str(&format!(
            "{:<9} {:<8} {:<12} {:<14} {:<14} {:<12} {}\n",
            s.site.name,
            s.site.cloud,
            s.site.region,
            s.site.vpc.to_string(),
            gw,
            s.overlay_ip.to_string(),
            handshakes
        ));
    }
    out.push_str("\nVPC-to-VPC ping (lowest RTT of 3, ms, from row to column; (n/3) = replies when some were lost):\n");
    out.push_str(&format!("{:<9}", ""));
    for s in &lab.sites {
        out.push_str(&format!("{:>13}", s.site.name));
    }
    out.push('\n');
    // All pairs at once: a lossy, long path should not make the table slow.
    let cells: Vec<Vec<String>> = std::thread::scope(|scope| {
        let rows: Vec<Vec<_>> = lab
            .sites
            .iter()
            .map(|from| {
                lab.sites
                    .iter()
                    .map(|to| {
                        let (f, t) = (from.site.name.as_str(), to.site.name.as_str());
                        let same = from.index == to.index;
                        scope.spawn(move || {
                            if same {
                                Ok((0, None))
                            } else {
                                lab.vpc_ping_n(f, t, 3)
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        rows.into_iter()
            .enumerate()
            .map(|(i, row)| {
                row.into_iter()
                    .enumerate()
                    .map(|(j, h)| match h.join() {
                        _ if i == j => "-".to_string(),
                        Ok(Ok((3, Some(ms)))) => format!("{ms:.1}"),
                        Ok(Ok((n, Some(ms)))) => format!("{ms:.1} ({n}/3)"),
                        _ => "FAIL".to_string(),
                    })
                    .collect()
            })
            .collect()
    });
    for (from, row) in lab.sites.iter().zip(cells) {
        out.push_str(&format!("{:<9}", from.site.name));
        for cell in row {
            out.push_str(&format!("{cell:>13}"));
        }
        out.push('\n');
    }
    out
}

/// One link of `GET /v1/links` (`skymeshctl links list --json`): the fields `up` shows.
#[derive(Debug, Deserialize)]
struct LinkView {
    a: String,
    b: String,
    up: bool,
    rtt_ms: Option<f64>,
    /// A ratio: 0.03 is 3%.
    loss: Option<f64>,
}

/// One pair of `GET /v1/paths` (`skymeshctl paths list --json`).
#[derive(Debug, Deserialize)]
struct PathView {
    a: String,
    b: String,
    /// "direct" or the transit node.
    primary: String,
    primary_cost_ms: Option<f64>,
    backup: Option<String>,
    backup_cost_ms: Option<f64>,
    reason: String,
}

/// The `KEY=VALUE` file `skymesh-lab env` prints, in the lab's run dir.
const LAB_ENV: &str = "lab.env";

/// Writes the lab's client environment and sends one chat completion from the
/// first site's VPC host through the AI gateway; returns what `up` prints.
fn ai_report(lab: &Lab, dir: &Path) -> Result<String> {
    let Some(key) = &lab.ai_key else {
        return Ok(String::new());
    };
    let base = lab.ai_base_url()?;
    let env = format!(
        "OPENAI_BASE_URL={base}\nOPENAI_API_KEY={key}\nSKYMESH_LAB_ID={}\nSKYMESH_API_TOKEN_FILE={}\n",
        lab.id,
        dir.join("admin.token").display()
    );
    skymesh_tests::agent::write_secret(&dir.join(LAB_ENV), &env)?;
    let from = &lab.sites[0].site;
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": format!("hello from {}", from.name)}],
    })
    .to_string();
    let url = format!("{base}/chat/completions");
    let auth = format!("Authorization: Bearer {key}");
    let mut last = String::new();
    // The gateway's first fabric view and the first paths may take a moment.
    for _ in 0..10 {
        let out = skymesh_tests::proc::output(&mut lab.vpc_command(
            &from.name,
            "curl",
            &[
                "-sS",
                "-i",
                "--max-time",
                "10",
                "-H",
                &auth,
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                &url,
            ],
        )?)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let header = |name: &str| {
            skymesh_tests::ai::http_header(&text, name)
                .unwrap_or_default()
                .to_string()
        };
        if skymesh_tests::ai::http_status(&text) == Some(200) {
            let json_start = text.find('{').unwrap_or(text.len());
            let answer: serde_json::Value =
                serde_json::from_str(&text[json_start..]).unwrap_or_default();
            return Ok(format!(
                "\nAI gateway {base} (from every VPC host; `skymesh-lab env` prints a key):\n  {} VPC host → gateway → {} in {} ({}): {:?}\n",
                from.name,
                header("x-skymesh-upstream"),
                header("x-skymesh-region"),
                lab.sites
                    .iter()
                    .find(|s| s.ai_backend.as_ref().is_some_and(|b| b.name == header("x-skymesh-upstream")))
                    .map(|s| s.site.name.as_str())
                    .unwrap_or("?"),
                answer["choices"][0]["message"]["content"].as_str().unwrap_or("")
            ));
        }
        last = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(format!(
        "\nAI gateway {base}: the chat completion from {} failed: {last}\n",
        from.name
    ))
}

/// How long `up` waits for the controller's first measurements and paths.
const PATHS_WAIT: Duration = Duration::from_secs(20);

/// `skymeshctl ARGS --json`, parsed.
fn ctl_json<T: serde::de::DeserializeOwned>(lab: &Lab, args: &[&str]) -> Result<T> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let text = lab.ctl_exec(&full)?;
    serde_json::from_str(&text)
        .with_context(|| format!("parsing `skymeshctl {}` output: {text}", full.join(" ")))
}

/// Pairs of nodes (in [`Lab::agent_nodes`] order) the controller has not both
/// measured and found a path for yet, as "a-b".
fn unmeasured_pairs(lab: &Lab, links: &[LinkView], paths: &[PathView]) -> Vec<String> {
    let nodes = lab.agent_nodes();
    let same = |a: &str, b: &str, x: &str, y: &str| (a, b) == (x, y) || (a, b) == (y, x);
    let mut missing = Vec::new();
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            let measured = links
                .iter()
                .any(|l| same(&l.a, &l.b, a, b) && l.rtt_ms.is_some());
            let routed = paths
                .iter()
                .any(|p| same(&p.a, &p.b, a, b) && p.primary_cost_ms.is_some());
            if !(measured && routed) {
                missing.push(format!("{a}-{b}"));
            }
        }
    }
    missing
}

/// The controller's view `up` prints: the measured link matrix (`GET /v1/links`)
/// and each pair's chosen path with its reason (`GET /v1/paths`), after waiting
/// up to [`PATHS_WAIT`] for every pair to be measured and routed.
fn paths_report(lab: &Lab) -> String {
    let fetch = || -> Result<(Vec<LinkView>, Vec<PathView>)> {
        Ok((
            ctl_json(lab, &["links", "list"])?,
            ctl_json(lab, &["paths", "list"])?,
        ))
    };
    let deadline = Instant::now() + PATHS_WAIT;
    let (links, paths, missing) = loop {
        match fetch() {
            Ok((links, paths)) => {
                let missing = unmeasured_pairs(lab, &links, &paths);
                if missing.is_empty() || Instant::now() >= deadline {
                    break (links, paths, missing);
                }
            }
            Err(e) if Instant::now() >= deadline => {
                return format!("\n(the controller's links and paths are unavailable: {e:#})\n")
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut out = String::new();
    if !missing.is_empty() {
        out.push_str(&format!(
            "\n(after {PATHS_WAIT:?} the controller still lacks measurements or a path for {})\n",
            missing.join(", ")
        ));
    }
    out.push_str(&link_matrix(lab, &links));
    out.push_str(&path_lines(lab, &paths));
    out
}

/// `GET /v1/links` as a matrix over the lab's nodes (links have no direction).
fn link_matrix(lab: &Lab, links: &[LinkView]) -> String {
    let nodes = lab.agent_nodes();
    let mut out = String::from(
        "\nMeasured links (controller, from in-tunnel probes: RTT ms / loss %; ? = not measured yet):\n",
    );
    out.push_str(&format!("{:<11}", ""));
    for n in &nodes {
        out.push_str(&format!("{n:>15}"));
    }
    out.push('\n');
    for a in &nodes {
        out.push_str(&format!("{a:<11}"));
        for b in &nodes {
            let link = links.iter().find(|l| {
                (l.a.as_str(), l.b.as_str()) == (a, b) || (l.a.as_str(), l.b.as_str()) == (b, a)
            });
            let cell = match link {
                _ if a == b => "-".to_string(),
                Some(l) if !l.up && l.rtt_ms.is_some() => "down".to_string(),
                Some(LinkView {
                    rtt_ms: Some(rtt),
                    loss,
                    ..
                }) => format!("{rtt:.1} / {:.1}%", loss.unwrap_or(0.0) * 100.0),
                _ => "?".to_string(),
            };
            out.push_str(&format!("{cell:>15}"));
        }
        out.push('\n');
    }
    out
}

/// `GET /v1/paths`, one line per pair in [`Lab::agent_nodes`] order, each node
/// named with its region.
fn path_lines(lab: &Lab, paths: &[PathView]) -> String {
    let nodes = lab.agent_nodes();
    let rank = |n: &str| nodes.iter().position(|x| *x == n).unwrap_or(usize::MAX);
    let label = |n: &str| match lab.topology.site(n) {
        Some(s) => format!("{n} ({})", s.region),
        None => n.to_string(),
    };
    let route = |via: &str| match via {
        "direct" => "direct".to_string(),
        transit => format!("via {}", label(transit)),
    };
    let ms = |cost: Option<f64>| match cost {
        Some(c) => format!("{c:.1} ms"),
        None => "unusable".to_string(),
    };
    let mut sorted: Vec<(&str, &str, &PathView)> = paths
        .iter()
        .map(|p| {
            if rank(&p.a) <= rank(&p.b) {
                (p.a.as_str(), p.b.as_str(), p)
            } else {
                (p.b.as_str(), p.a.as_str(), p)
            }
        })
        .collect();
    sorted.sort_by_key(|(a, b, _)| (rank(a), rank(b)));
    let mut out = String::from("\nPaths chosen by the controller:\n");
    for (a, b, p) in sorted {
        let backup = match &p.backup {
            Some(via) => format!("backup {} {}", route(via), ms(p.backup_cost_ms)),
            None => "no backup".to_string(),
        };
        out.push_str(&format!(
            "  {} <-> {}: {}, {}; {backup} — {}\n",
            label(a),
            label(b),
            route(&p.primary),
            ms(p.primary_cost_ms),
            p.reason
        ));
    }
    out
}

fn serve_control(listener: UnixListener, lab: &Lab) {
    for stream in listener.incoming().flatten() {
        let mut line = String::new();
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        if BufReader::new(reader).read_line(&mut line).is_err() {
            continue;
        }
        let answer = match serde_json::from_str::<WanRequest>(&line)
            .map_err(anyhow::Error::from)
            .and_then(|r| apply(lab, &r))
        {
            Ok(detail) => serde_json::json!({ "detail": detail }),
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
        let mut stream = stream;
        let _ = writeln!(stream, "{answer}");
    }
}

fn apply(lab: &Lab, r: &WanRequest) -> Result<String> {
    for s in [&r.a, &r.b] {
        if lab.topology.site(s).is_none() {
            let names: Vec<&str> = lab.sites.iter().map(|s| s.site.name.as_str()).collect();
            bail!("no site {s:?} in this lab (sites: {names:?})");
        }
    }
    let (pa, pb) = (port_name(&r.a), port_name(&r.b));
    if let Some(up) = r.up {
        lab.switch.set_up(&pa, &pb, up)?;
        return Ok(format!(
            "{} ↔ {}: {}",
            r.a,
            r.b,
            if up { "restored" } else { "cut" }
        ));
    }
    for (from, to) in [(&pa, &pb), (&pb, &pa)] {
        let mut shape: PairShape = lab.switch.shape(from, to)?;
        if let Some(d) = &r.delay {
            shape.delay = duration(d).with_context(|| format!("--delay {d:?}"))?;
        }
        if let Some(j) = &r.jitter {
            shape.jitter = duration(j).with_context(|| format!("--jitter {j:?}"))?;
        }
        if let Some(l) = &r.loss {
            shape.loss = percent(l).with_context(|| format!("--loss {l:?}"))?;
        }
        if let Some(x) = &r.rate {
            shape.rate_bps = Some(rate(x).with_context(|| format!("--rate {x:?}"))?);
        }
        if let Some(m) = r.mtu {
            shape.mtu = Some(m as usize);
        }
        lab.switch.set(from, to, shape)?;
    }
    let s = lab.switch.shape(&pa, &pb)?;
    Ok(format!(
        "{} ↔ {}: delay {:?}, jitter {:?}, loss {:.1}%, rate {}, mtu {}",
        r.a,
        r.b,
        s.delay,
        s.jitter,
        s.loss * 100.0,
        s.rate_bps
            .map(|b| format!("{} Mbit/s", b / 1_000_000))
            .unwrap_or_else(|| "unlimited".into()),
        s.mtu
            .map(|m| m.to_string())
            .unwrap_or_else(|| "unlimited".into())
    ))
}
