//! The AI gateway under test: sample backends (`skymesh-ai-backend`), a lab CA
//! for the TLS one, client keys made by `skymesh-controller ai-key create`, and
//! the real clients: curl and the official `openai` Python package.

use crate::agent::{workspace_bin, write_secret};
use crate::proc::Spawned;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Where the README's test command installs the `openai` package.
pub const DEFAULT_PYTHON: &str = "/opt/skymesh-venv/bin/python3";

/// A command, inside the namespace called `ns` when given.
pub fn command(ns: Option<&str>, program: &str, args: &[&str]) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]).args(args);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    }
}

/// The Python with the `openai` package: `SKYMESH_PYTHON`, else
/// [`DEFAULT_PYTHON`]. Missing is an error with the fix, never a skip.
pub fn python() -> Result<PathBuf> {
    let path =
        PathBuf::from(std::env::var("SKYMESH_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.into()));
    let ok = Command::new(&path)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "{} cannot import the openai package; create it as the README's test command does: \
             python3 -m venv /opt/skymesh-venv && /opt/skymesh-venv/bin/pip install openai",
            path.display()
        );
    }
    Ok(path)
}

/// Runs a Python script (with `openai`) and parses the JSON object it prints last.
pub fn run_python(ns: Option<&str>, script: &str, env: &[(&str, &str)]) -> Result<Value> {
    let py = python()?;
    let mut cmd = command(ns, py.to_str().context("python path")?, &["-c", script]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = crate::proc::output(&mut cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    let value: Value = serde_json::from_str(last).with_context(|| {
        format!(
            "python printed no JSON result ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok(value)
}

/// The status of the last response head in `curl -i` output (after any
/// interim `100 Continue`).
pub fn http_status(text: &str) -> Option<u16> {
    text.lines()
        .rev()
        .find(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
}

/// A response header's value in `curl -i` output.
pub fn http_header<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// curl with `args`; returns the whole output whatever the exit code.
pub fn curl(ns: Option<&str>, args: &[&str]) -> Result<Output> {
    let mut full = vec!["-sS", "--max-time", "30"];
    full.extend_from_slice(args);
    crate::proc::output(&mut command(ns, "curl", &full))
}

/// A client key made by `skymesh-controller ai-key create`: the key, and the
/// `[[ai_gateway.keys]]` entry holding its hash.
pub struct ClientKey {
    pub key: String,
    pub entry: String,
}

pub fn create_key(dir: &Path, name: &str, routes: &str, rpm: u32) -> Result<ClientKey> {
    let out = dir.join(format!("{name}.ai-key"));
    let bin = workspace_bin("skymesh-controller", "SKYMESH_CONTROLLER_BIN")?;
    let entry = crate::proc::check(Command::new(bin).args([
        "ai-key",
        "create",
        "--name",
        name,
        "--out",
        out.to_str().context("key path")?,
        "--routes",
        routes,
        "--rpm",
        &rpm.to_string(),
    ]))?;
    let key = std::fs::read_to_string(&out)?.trim().to_string();
    Ok(ClientKey { key, entry })
}

/// A lab CA and a server certificate for `ip`, as PEM files in `dir`:
/// (ca, cert, key).
pub fn tls_files(
    dir: &Path,
    name: &str,
    ip: std::net::IpAddr,
) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "skymesh lab AI CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.subject_alt_names.push(SanType::IpAddress(ip));
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    write_secret(&paths.2, &key.serialize_pem())?;
    Ok(paths)
}

/// One sample backend process.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// `https` when it serves TLS.
    pub scheme: &'static str,
    /// The credential it requires (mode 0600), which the gateway injects.
    pub key_file: PathBuf,
    /// The CA that signed its certificate, for TLS backends.
    pub ca_file: Option<PathBuf>,
    ns: Option<String>,
    pub process: Spawned,
}

impl Backend {
    /// Starts a backend on `addr` (inside `ns` when given) that requires a
    /// fresh credential; with `tls`, a certificate from a fresh lab CA.
    pub fn start(
        ns: Option<&str>,
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        models: &str,
        tls: bool,
    ) -> Result<Self> {
        let key_file = dir.join(format!("{name}.credential"));
        write_secret(
            &key_file,
            &format!("sk-upstream-{name}-{}\n", crate::next_id()),
        )?;
        let bin = workspace_bin("skymesh-ai-backend", "SKYMESH_AI_BACKEND_BIN")?;
        let listen = addr.to_string();
        let mut args = vec![
            "--listen".to_string(),
            listen,
            "--name".into(),
            name.into(),
            "--api-key-file".into(),
            key_file.display().to_string(),
            "--models".into(),
            models.into(),
        ];
        let mut ca_file = None;
        if tls {
            let (ca, cert, key) = tls_files(dir, name, addr.ip())?;
            args.extend([
                "--tls-cert".into(),
                cert.display().to_string(),
                "--tls-key".into(),
                key.display().to_string(),
            ]);
            ca_file = Some(ca);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = command(ns, bin.to_str().context("backend path")?, &args);
        let mut process = Spawned::start(name, cmd, &dir.join(format!("backend-{name}.log")))?;
        if crate::wait_until(Duration::from_secs(10), || {
            process.log().contains("listening")
        })
        .is_none()
        {
            process.ensure_running()?;
            bail!("backend {name} did not start listening:\n{}", process.log());
        }
        Ok(Self {
            name: name.into(),
            addr,
            scheme: if tls { "https" } else { "http" },
            key_file,
            ca_file,
            ns: ns.map(String::from),
            process,
        })
    }

    fn lab_call(&self, method: &str, path: &str, body: Option<&str>) -> Result<String> {
        let url = format!("{}://{}{path}", self.scheme, self.addr);
        let mut args = vec!["-sS", "--fail", "--max-time", "10", "-X", method];
        let ca;
        if let Some(c) = &self.ca_file {
            ca = c.display().to_string();
            args.extend(["--cacert", &ca]);
        }
        if let Some(b) = body {
            args.extend(["-H", "content-type: application/json", "-d", b]);
        }
        args.push(&url);
        let out = crate::proc::output(&mut command(self.ns.as_deref(), "curl", &args))?;
        if !out.status.success() {
            bail!("{method} {url}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets the backend's fault (see `skymesh-ai-backend`'s `/_lab/fault`).
    pub fn fault(&self, fault: Value) -> Result<()> {
        self.lab_call("POST", "/_lab/fault", Some(&fault.to_string()))
            .map(|_| ())
    }

    pub fn clear_fault(&self) -> Result<()> {
        self.lab_call("DELETE", "/_lab/fault", None).map(|_| ())
    }

    /// Requests it served (its `/_lab/stats`).
    pub fn requests(&self) -> Result<u64> {
        self.stat("requests")
    }

    /// Connections it accepted, this call's own included (its `/_lab/stats`).
    pub fn connections(&self) -> Result<u64> {
        self.stat("connections")
    }

    fn stat(&self, name: &str) -> Result<u64> {
        let v: Value = serde_json::from_str(&self.lab_call("GET", "/_lab/stats", None)?)?;
        v[name]
            .as_u64()
            .with_context(|| format!("stats without {name}: {v}"))
    }

    /// The `[[ai_gateway.upstreams]]` entry for this backend.
    pub fn upstream_toml(&self, site: &str, region: &str, public: bool, extra: &str) -> String {
        let mut t = format!(
            "[[ai_gateway.upstreams]]\nname = {:?}\nsite = {site:?}\nregion = {region:?}\nbase_url = \"{}://{}/v1\"\npublic = {public}\ncredential_file = {:?}\n",
            self.name,
            self.scheme,
            self.addr,
            self.key_file.display().to_string()
        );
        if let Some(ca) = &self.ca_file {
            t.push_str(&format!("ca_file = {:?}\n", ca.display().to_string()));
        }
        t.push_str(extra);
        t.push('\n');
        t
    }
}

/// A free TCP port on loopback (bound and released: good enough for tests that
/// start the server right away).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
