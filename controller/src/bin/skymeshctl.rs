//! `skymeshctl`: the operator's CLI, a thin client of the controller's REST API.
//! Tables by default, `--json` for the API's JSON as is. A refused call exits 1
//! and prints the API's error and detail.

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use skymesh_controller::api::limits::{check_flag, parse_ttl, PrefixLen, WeightMs};
use skymesh_controller::config::{read_text_bounded, MAX_TOKEN_BYTES};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "skymeshctl", version, about = "Operate a skymesh controller")]
struct Cli {
    /// Base URL of the controller's REST API.
    #[arg(
        long,
        env = "SKYMESH_API",
        default_value = "http://127.0.0.1:7080",
        global = true
    )]
    api: String,
    /// File holding the admin bearer token (the controller's `[api] admin_token_file`).
    #[arg(
        long,
        env = "SKYMESH_TOKEN_FILE",
        default_value = "/var/lib/skymesh-controller/admin.token",
        global = true
    )]
    token_file: PathBuf,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrolled nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCmd,
    },
    /// Join tokens for new gateways.
    JoinToken {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Advertised prefixes, accepted or refused.
    Prefixes {
        #[command(subcommand)]
        command: PrefixesCmd,
    },
    /// Address planning.
    Ipam {
        #[command(subcommand)]
        command: IpamCmd,
    },
    /// The measured links between nodes, and operator overrides.
    Links {
        #[command(subcommand)]
        command: LinksCmd,
    },
    /// The path each pair of nodes uses (direct or through a transit), and why.
    Paths {
        #[command(subcommand)]
        command: PathsCmd,
    },
    /// The AI gateway.
    Ai {
        #[command(subcommand)]
        command: AiCmd,
    },
}

#[derive(Subcommand)]
enum AiCmd {
    /// Each upstream's site, region, circuit, fabric RTT and time to first byte.
    Upstreams,
}

#[derive(Subcommand)]
enum LinksCmd {
    /// RTT, jitter, loss and state of every measured link.
    List {
        /// Only the links of this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Override one link (replaces any earlier override of it).
    Set {
        a: String,
        b: String,
        /// No path may use the link.
        #[arg(long)]
        disable: bool,
        /// Cost added to the link, in milliseconds (e.g. its egress price),
        /// from 0 to 3600000.
        #[arg(long, value_parser = |t: &str| check_flag(t, WeightMs::check).map(|WeightMs(w)| w))]
        weight_ms: Option<f64>,
        /// The pair's path while usable: "direct" or a transit node.
        #[arg(long)]
        pin: Option<String>,
    },
    /// Remove the override of one link.
    Clear { a: String, b: String },
}

#[derive(Subcommand)]
enum PathsCmd {
    /// Every pair's primary and backup path, cost and reason.
    List {
        /// Only the pairs this node is part of.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodesCmd {
    List,
    Show {
        name: String,
    },
    /// Remove a node from the mesh; its certificate is refused from now on.
    Revoke {
        name: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token and print it (only this once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        site: String,
        #[arg(long)]
        cloud: String,
        #[arg(long)]
        region: String,
        /// Lifetime: a whole number of s, m, h or d from 1s to 365d (like 24h,
        /// 30m, 7d), or "never". Default 24h.
        #[arg(long, value_parser = ttl_flag)]
        ttl: Option<String>,
        /// Allow several enrollments (names get a -2, -3, ... suffix).
        #[arg(long)]
        reusable: bool,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum PrefixesCmd {
    List,
}

#[derive(Subcommand)]
enum IpamCmd {
    /// List the conflicts a prefix would have.
    Check { cidr: String },
    /// The lowest free block of a length within a range.
    Suggest {
        #[arg(long)]
        within: String,
        /// From 0 to 128 (at most 32 for IPv4), and at least the range's own.
        #[arg(long, value_parser = |t: &str| check_flag(t, PrefixLen::check).map(|PrefixLen(n)| n))]
        prefix_len: u8,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Api {
    base: String,
    token: String,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let req = ureq::request(method, &url)
            .timeout(std::time::Duration::from_secs(30))
            .set("Authorization", &format!("Bearer {}", self.token));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => r
                .into_json::<Value>()
                .with_context(|| format!("{method} {path}: the answer is not JSON")),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) => Err(anyhow!(
                        "{} ({code}): {}",
                        v["error"].as_str().unwrap_or("error"),
                        v["detail"].as_str().unwrap_or(&text)
                    )),
                    Err(_) => Err(anyhow!("HTTP {code}: {text}")),
                }
            }
            Err(e) => Err(anyhow!(
                "cannot reach the controller API at {}: {e}; set --api or SKYMESH_API",
                self.base
            )),
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let token = read_text_bounded(
        &cli.token_file,
        MAX_TOKEN_BYTES,
        "the admin token file (--token-file, SKYMESH_TOKEN_FILE)",
    )?
    .trim()
    .to_string();
    let api = Api {
        base: cli.api.clone(),
        token,
    };
    let json_out = cli.json;
    let show = |v: &Value, table: &dyn Fn(&Value) -> String| {
        if json_out {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            print!("{}", table(v));
        }
    };
    match cli.command {
        Command::Nodes { command } => match command {
            NodesCmd::List => show(&api.call("GET", "/v1/nodes", None)?, &nodes_table),
            NodesCmd::Show { name } => show(
                &api.call(
                    "GET",
                    &format!("/v1/nodes/{}", segment("NAME", &name)?),
                    None,
                )?,
                &node_detail,
            ),
            NodesCmd::Revoke { name } => show(
                &api.call(
                    "DELETE",
                    &format!("/v1/nodes/{}", segment("NAME", &name)?),
                    None,
                )?,
                &|_| format!("revoked node {name}\n"),
            ),
        },
        Command::JoinToken { command } => match command {
            TokenCmd::Create {
                name,
                site,
                cloud,
                region,
                ttl,
                reusable,
            } => {
                let mut body = json!({"name": name, "site": site, "cloud": cloud, "region": region, "reusable": reusable});
                if let Some(t) = ttl {
                    body["ttl"] = Value::String(t);
                }
                let v = api.call("POST", "/v1/join-tokens", Some(body))?;
                // The token alone on stdout, so `TOKEN=$(skymeshctl join-token create ...)` works.
                show(&v, &|v| format!("{}\n", v["token"].as_str().unwrap_or("")));
                if !json_out {
                    eprintln!(
                        "join token {} for node {} ({}; expires {})",
                        v["id"].as_str().unwrap_or(""),
                        v["name"].as_str().unwrap_or(""),
                        if v["reusable"].as_bool() == Some(true) {
                            "reusable"
                        } else {
                            "single use"
                        },
                        v["expires_at"]
                            .as_u64()
                            .map(unix_time)
                            .unwrap_or_else(|| "never".into())
                    );
                }
            }
            TokenCmd::List => show(&api.call("GET", "/v1/join-tokens", None)?, &tokens_table),
            TokenCmd::Revoke { id } => show(
                &api.call(
                    "DELETE",
                    &format!("/v1/join-tokens/{}", segment("ID", &id)?),
                    None,
                )?,
                &|_| format!("revoked join token {id}\n"),
            ),
        },
        Command::Prefixes {
            command: PrefixesCmd::List,
        } => show(&api.call("GET", "/v1/prefixes", None)?, &prefixes_table),
        Command::Links { command } => match command {
            LinksCmd::List { node } => show(
                &api.call("GET", &format!("/v1/links{}", node_filter(node)?), None)?,
                &links_table,
            ),
            LinksCmd::Set {
                a,
                b,
                disable,
                weight_ms,
                pin,
            } => show(
                &api.call(
                    "PUT",
                    &format!("/v1/links/{}/{}", segment("A", &a)?, segment("B", &b)?),
                    Some(json!({"disabled": disable, "weight_ms": weight_ms, "pin": pin})),
                )?,
                &override_text,
            ),
            LinksCmd::Clear { a, b } => show(
                &api.call(
                    "PUT",
                    &format!("/v1/links/{}/{}", segment("A", &a)?, segment("B", &b)?),
                    Some(json!({})),
                )?,
                &override_text,
            ),
        },
        Command::Paths {
            command: PathsCmd::List { node },
        } => show(
            &api.call("GET", &format!("/v1/paths{}", node_filter(node)?), None)?,
            &paths_table,
        ),
        Command::Ai {
            command: AiCmd::Upstreams,
        } => show(
            &api.call("GET", "/v1/ai/upstreams", None)?,
            &ai_upstreams_table,
        ),
        Command::Ipam { command } => match command {
            IpamCmd::Check { cidr } => {
                let v = api.call("POST", "/v1/ipam/check", Some(json!({"cidr": cidr})))?;
                show(&v, &check_text);
            }
            IpamCmd::Suggest { within, prefix_len } => show(
                &api.call(
                    "POST",
                    "/v1/ipam/suggest",
                    Some(json!({"within": within, "prefix_len": prefix_len})),
                )?,
                &|v| format!("{}\n", v["cidr"].as_str().unwrap_or("")),
            ),
        },
    }
    Ok(())
}

/// Everything but RFC 3986's unreserved characters is escaped in a path segment.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `value` as one URL path segment, exactly as the API will read it back: a `/` or `%` in a name
/// never reaches another route. `.`, `..` and the empty name would be resolved away by the URL
/// parser, so they are refused, naming the argument.
fn segment(arg: &str, value: &str) -> Result<String> {
    if value.is_empty() || value == "." || value == ".." {
        return Err(anyhow!(
            "<{arg}> {value:?}: not a name the API can hold; give the name as `nodes list` \
             (or `join-token list`) shows it"
        ));
    }
    Ok(percent_encoding::utf8_percent_encode(value, SEGMENT).to_string())
}

/// `?node=NAME` (percent-encoded) for `--node`, or nothing.
fn node_filter(node: Option<String>) -> Result<String> {
    match node {
        None => Ok(String::new()),
        Some(n) if n.is_empty() => Err(anyhow!(
            "--node \"\": give a node's name as `nodes list` shows it"
        )),
        Some(n) => Ok(format!(
            "?node={}",
            percent_encoding::utf8_percent_encode(&n, percent_encoding::NON_ALPHANUMERIC)
        )),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Checks `--ttl` with the API's own rule, so an out-of-range lifetime is
/// refused before anything is sent.
fn ttl_flag(text: &str) -> Result<String, String> {
    parse_ttl(text)
        .map(|_| text.to_string())
        .map_err(|e| e.to_string())
}

/// The last second RFC 3339 can write (9999-12-31T23:59:59Z), as Unix seconds.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// A Unix time as RFC 3339 (UTC). Never panics: a time past what RFC 3339 can
/// write (stores from older versions may hold expiries up to u64::MAX seconds)
/// is shown as such, with its raw value.
fn unix_time(t: u64) -> String {
    if t > LAST_RFC3339_SECOND {
        return format!("after 9999-12-31 (unix {t})");
    }
    match std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(t)) {
        Some(at) => humantime::format_rfc3339_seconds(at).to_string(),
        None => format!("unix {t}"),
    }
}

fn ago(t: &Value) -> String {
    let Some(t) = t.as_u64() else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(t);
    format!("{}s ago", now.saturating_sub(t))
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.1} ms"))
        .unwrap_or_else(|| "-".into())
}

fn links_table(v: &Value) -> String {
    let rows = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let mut notes = Vec::new();
            if l["disabled"].as_bool() == Some(true) {
                notes.push("disabled".to_string());
            }
            if let Some(w) = l["weight_ms"].as_f64().filter(|w| *w > 0.0) {
                notes.push(format!("weight {w} ms"));
            }
            if let Some(p) = l["pin"].as_str() {
                notes.push(format!("pinned {p}"));
            }
            vec![
                format!("{}-{}", s(&l["a"]), s(&l["b"])),
                match (l["up"].as_bool(), l["usable"].as_bool()) {
                    (_, Some(true)) => "up".into(),
                    (Some(true), _) => "unusable".into(),
                    _ if l["rtt_ms"].is_null() => "unmeasured".into(),
                    _ => "down".into(),
                },
                ms(&l["rtt_ms"]),
                ms(&l["jitter_ms"]),
                l["loss"]
                    .as_f64()
                    .map(|x| format!("{:.1}%", x * 100.0))
                    .unwrap_or_else(|| "-".into()),
                ms(&l["cost_ms"]),
                if notes.is_empty() {
                    "-".into()
                } else {
                    notes.join(", ")
                },
            ]
        })
        .collect();
    table(
        &["LINK", "STATE", "RTT", "JITTER", "LOSS", "COST", "OVERRIDE"],
        rows,
    )
}

fn ai_upstreams_table(v: &Value) -> String {
    let ms = |x: &Value| {
        x.as_f64()
            .map(|m| format!("{m:.1}"))
            .unwrap_or_else(|| "-".into())
    };
    let rows = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|u| {
                    vec![
                        u["name"].as_str().unwrap_or("").to_string(),
                        u["site"].as_str().unwrap_or("").to_string(),
                        u["region"].as_str().unwrap_or("").to_string(),
                        u["circuit"].as_str().unwrap_or("").to_string(),
                        if u["up"].as_bool() == Some(true) {
                            "yes"
                        } else {
                            "no"
                        }
                        .to_string(),
                        ms(&u["fabric_rtt_ms"]),
                        ms(&u["ttfb_ms"]),
                        u["base_url"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "UPSTREAM", "SITE", "REGION", "CIRCUIT", "UP", "RTT_MS", "TTFB_MS", "BASE_URL",
        ],
        rows,
    )
}

fn paths_table(v: &Value) -> String {
    let rows = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                format!("{} <-> {}", s(&p["a"]), s(&p["b"])),
                s(&p["primary"]),
                ms(&p["primary_cost_ms"]),
                s(&p["backup"]),
                ms(&p["backup_cost_ms"]),
                s(&p["reason"]),
            ]
        })
        .collect();
    table(
        &["PAIR", "VIA", "COST", "BACKUP", "BACKUP COST", "REASON"],
        rows,
    )
}

fn override_text(v: &Value) -> String {
    let o = &v["override"];
    let mut out = format!(
        "link override: disabled={} weight_ms={} pin={}\n",
        o["disabled"].as_bool().unwrap_or(false),
        s(&o["weight_ms"]),
        s(&o["pin"])
    );
    let p = &v["path"];
    if p.is_object() {
        out += &format!(
            "path {} <-> {}: via {} ({})\n",
            s(&p["a"]),
            s(&p["b"]),
            s(&p["primary"]),
            s(&p["reason"])
        );
    }
    out
}

fn nodes_table(v: &Value) -> String {
    let rows = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    vec![
                        s(&n["name"]),
                        s(&n["site"]),
                        s(&n["cloud"]),
                        s(&n["region"]),
                        s(&n["overlay_ip"]),
                        s(&n["prefixes"]),
                        n["rejected_prefixes"]
                            .as_array()
                            .map(|r| {
                                r.iter()
                                    .map(|x| s(&x["cidr"]))
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .filter(|x| !x.is_empty())
                            .unwrap_or_else(|| "-".into()),
                        if n["transit"].as_bool() == Some(true) {
                            "yes".into()
                        } else {
                            "-".into()
                        },
                        if n["online"].as_bool() == Some(true) {
                            "online".into()
                        } else {
                            format!("offline ({})", ago(&n["last_seen"]))
                        },
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "NAME",
            "SITE",
            "CLOUD",
            "REGION",
            "OVERLAY IP",
            "PREFIXES",
            "REFUSED",
            "TRANSIT",
            "STATE",
        ],
        rows,
    )
}

fn node_detail(n: &Value) -> String {
    let mut out = String::new();
    for k in [
        "name",
        "site",
        "cloud",
        "region",
        "overlay_ip",
        "public_key",
        "endpoints",
        "advertised",
        "prefixes",
        "online",
        "transit",
        "agent_version",
    ] {
        out += &format!("{k:<14} {}\n", s(&n[k]));
    }
    out += &format!("{:<14} {}\n", "last_seen", ago(&n["last_seen"]));
    if let Some(r) = n["rejected_prefixes"].as_array() {
        for x in r {
            out += &format!("{:<14} {}: {}\n", "REFUSED", s(&x["cidr"]), s(&x["reason"]));
        }
    }
    out
}

fn tokens_table(v: &Value) -> String {
    let rows = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    vec![
                        s(&t["id"]),
                        s(&t["name"]),
                        s(&t["site"]),
                        s(&t["state"]),
                        if t["reusable"].as_bool() == Some(true) {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                        t["expires_at"]
                            .as_u64()
                            .map(unix_time)
                            .unwrap_or_else(|| "never".into()),
                        s(&t["used_by"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "ID", "NAME", "SITE", "STATE", "REUSABLE", "EXPIRES", "USED BY",
        ],
        rows,
    )
}

fn prefixes_table(v: &Value) -> String {
    let rows = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    vec![
                        s(&p["cidr"]),
                        s(&p["node"]),
                        s(&p["status"]),
                        s(&p["reason"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["PREFIX", "NODE", "STATUS", "REASON"], rows)
}

fn check_text(v: &Value) -> String {
    let conflicts = v["conflicts"].as_array().cloned().unwrap_or_default();
    if conflicts.is_empty() {
        return format!("{}: free, no conflict\n", s(&v["cidr"]));
    }
    let mut out = format!("{}: {} conflict(s)\n", s(&v["cidr"]), conflicts.len());
    for c in conflicts {
        out += &format!("  {}\n", s(&c["message"]));
    }
    out
}
