//! The agent's offline commands, run as a user would: `check-config` on each class of bad
//! file, and `genkey`/`pubkey` against the stock `wg` tool. No namespaces, no root.

use anyhow::{ensure, Context, Result};
use skymesh_tests::agent::{agent_command, check_config, pubkey_of, write_secret};
use skymesh_tests::proc::{check, output_with_stdin};
use skymesh_tests::{e2e, require_tool, Keypair, TestEnv};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A valid config with two peers, and the key file it points to.
struct ConfigCase {
    text: String,
    key_file: PathBuf,
}

impl ConfigCase {
    /// Writes a fresh private key file into `env` and renders the valid base config.
    fn new(env: &TestEnv) -> Result<Self> {
        let key_file = env.path("private.key");
        write_secret(&key_file, &format!("{}\n", Keypair::generate()?.private))?;
        let gcp = Keypair::generate()?.public;
        let aws = Keypair::generate()?.public;
        let text = format!(
            r#"[interface]
name = "skymesh0"
private_key_file = "{key}"
listen_port = 51820
address = "100.96.0.1/32"
mtu = 1420

[metrics]
listen = "127.0.0.1:9586"

[admin]
socket = "{dir}/agent.sock"

[state]
dir = "{dir}/state"

[[peers]]
name = "gcp-gw"
public_key = "{gcp}"
endpoint = "198.51.100.7:51820"
allowed_ips = ["100.96.0.2/32", "10.10.0.0/16"]
persistent_keepalive = 25

[[peers]]
name = "aws-gw"
public_key = "{aws}"
allowed_ips = ["100.96.0.3/32", "10.20.0.0/16"]
"#,
            key = key_file.display(),
            dir = env.dir.display(),
        );
        Ok(Self { text, key_file })
    }

    /// The base text with the first occurrence of `from` replaced by `to` (which must exist).
    fn edit(&self, from: &str, to: &str) -> Result<String> {
        ensure!(
            self.text.contains(from),
            "test bug: {from:?} not in base config"
        );
        Ok(self.text.replacen(from, to, 1))
    }
}

/// Writes `text` as `<case>.toml`, runs `check-config`, and asserts exit code 1 with a message
/// (stdout or stderr) that contains every string in `must_name`.
fn refused(env: &TestEnv, case: &str, text: &str, must_name: &[&str]) -> Result<()> {
    let path = env.path(&format!("{case}.toml"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let out = check_config(&path)?;
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        out.status.code() == Some(1),
        "{case}: check-config exited with {} (want 1); output:\n{msg}",
        out.status
    );
    let path_text = path.display().to_string();
    for needle in std::iter::once(path_text.as_str()).chain(must_name.iter().copied()) {
        ensure!(
            msg.contains(needle),
            "{case}: the message does not name {needle:?}; output:\n{msg}"
        );
    }
    Ok(())
}

/// Runs one bad-config case built from the base config by a single text edit.
fn bad_edit(name: &str, from: &str, to: &str, must_name: &[&str]) -> Result<()> {
    e2e(name, |env| {
        let base = ConfigCase::new(env)?;
        refused(env, name, &base.edit(from, to)?, must_name)
    })
}

#[test]
fn check_config_accepts_a_valid_file() -> Result<()> {
    e2e("cfg-valid", |env| {
        let base = ConfigCase::new(env)?;
        let path = env.path("valid.toml");
        std::fs::write(&path, &base.text)?;
        let out = check_config(&path)?;
        ensure!(
            out.status.success(),
            "valid config refused ({}):\n{}{}\n--- config ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            base.text
        );
        Ok(())
    })
}

#[test]
fn check_config_refuses_unknown_top_level_key() -> Result<()> {
    bad_edit(
        "cfg-top",
        "[interface]\n",
        "colour = \"blue\"\n\n[interface]\n",
        &["colour"],
    )
}

#[test]
fn check_config_refuses_unknown_interface_key() -> Result<()> {
    bad_edit(
        "cfg-iface",
        "mtu = 1420\n",
        "mtu = 1420\nlisten_addr = \"0.0.0.0\"\n",
        &["listen_addr"],
    )
}

#[test]
fn check_config_refuses_unknown_peer_key() -> Result<()> {
    bad_edit(
        "cfg-peer",
        "persistent_keepalive = 25\n",
        "persistent_keepalive = 25\npubkey = \"abc\"\n",
        &["pubkey"],
    )
}

#[test]
fn check_config_refuses_malformed_public_key() -> Result<()> {
    e2e("cfg-pub", |env| {
        let base = ConfigCase::new(env)?;
        let aws_line = base
            .text
            .lines()
            .filter(|l| l.starts_with("public_key"))
            .nth(1)
            .context("second public_key line")?
            .to_string();
        for (case, bad) in [
            ("cfg-pub-text", "not-a-wireguard-key"),
            ("cfg-pub-short", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ] {
            let text = base.edit(&aws_line, &format!("public_key = \"{bad}\""))?;
            refused(env, case, &text, &["public_key", bad])?;
        }
        Ok(())
    })
}

#[test]
fn check_config_refuses_malformed_private_key_file() -> Result<()> {
    e2e("cfg-privbad", |env| {
        let base = ConfigCase::new(env)?;
        write_secret(&base.key_file, "this is not a key\n")?;
        let key = base.key_file.display().to_string();
        refused(env, "cfg-privbad", &base.text, &["private_key_file", &key])
    })
}

#[test]
fn check_config_refuses_missing_private_key_file() -> Result<()> {
    e2e("cfg-privgone", |env| {
        let base = ConfigCase::new(env)?;
        let missing = env.path("no-such.key").display().to_string();
        let text = base.edit(&base.key_file.display().to_string(), &missing)?;
        refused(env, "cfg-privgone", &text, &["private_key_file", &missing])
    })
}

#[test]
fn check_config_refuses_prefix_length_33() -> Result<()> {
    bad_edit(
        "cfg-cidr33",
        "\"10.10.0.0/16\"",
        "\"10.0.0.0/33\"",
        &["allowed_ips", "10.0.0.0/33"],
    )
}

#[test]
fn check_config_refuses_nonsense_cidr() -> Result<()> {
    bad_edit(
        "cfg-cidrjunk",
        "\"10.10.0.0/16\"",
        "\"nonsense\"",
        &["allowed_ips", "nonsense"],
    )
}

#[test]
fn check_config_refuses_bad_interface_address() -> Result<()> {
    bad_edit(
        "cfg-addr",
        "address = \"100.96.0.1/32\"",
        "address = \"100.96.0.1/40\"",
        &["address", "100.96.0.1/40"],
    )
}

#[test]
fn check_config_refuses_host_bits_set() -> Result<()> {
    bad_edit(
        "cfg-hostbits",
        "\"10.10.0.0/16\"",
        "\"10.10.0.1/16\"",
        &["allowed_ips", "10.10.0.1/16"],
    )
}

#[test]
fn check_config_refuses_overlapping_peer_prefixes() -> Result<()> {
    bad_edit(
        "cfg-overlap",
        "\"10.20.0.0/16\"",
        "\"10.10.128.0/17\"",
        &["allowed_ips", "10.10.128.0/17", "10.10.0.0/16"],
    )
}

#[test]
fn check_config_refuses_port_out_of_range() -> Result<()> {
    bad_edit(
        "cfg-port",
        "listen_port = 51820",
        "listen_port = 70000",
        &["listen_port", "70000"],
    )
}

#[test]
fn check_config_refuses_bad_endpoint() -> Result<()> {
    e2e("cfg-endpoint", |env| {
        let base = ConfigCase::new(env)?;
        for (case, bad) in [
            ("cfg-ep-text", "not-an-endpoint"),
            ("cfg-ep-noport", "198.51.100.7"),
            ("cfg-ep-port", "198.51.100.7:99999"),
        ] {
            let text = base.edit("\"198.51.100.7:51820\"", &format!("\"{bad}\""))?;
            refused(env, case, &text, &["endpoint", bad])?;
        }
        Ok(())
    })
}

/// Runs `program args` with `input` on stdin; returns stdout, failing on a non-zero exit.
fn pipe(program: &Path, args: &[&str], input: &str) -> Result<String> {
    let out = output_with_stdin(Command::new(program).args(args), input.as_bytes())?;
    ensure!(
        out.status.success(),
        "{} {args:?} failed ({}): {}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).context("output is not UTF-8")
}

#[test]
fn genkey_and_pubkey_are_interchangeable_with_wg() -> Result<()> {
    if !require_tool("wg") {
        return Ok(());
    }
    let bin = skymesh_tests::agent_bin()?;
    let wg = PathBuf::from("wg");
    for _ in 0..5 {
        // wg's private key → our pubkey == wg pubkey, byte for byte (newline included).
        let private = check(Command::new("wg").arg("genkey"))?;
        let theirs = pipe(&wg, &["pubkey"], &private)?;
        let ours = pipe(&bin, &["pubkey"], &private)?;
        ensure!(
            ours == theirs,
            "pubkey of {private:?}: ours {ours:?}, wg {theirs:?}"
        );

        // Our genkey looks like wg's, and wg accepts it and agrees on the public key.
        let private = check(&mut agent_command(&["genkey"])?)?;
        ensure!(
            private.len() == 45 && private.ends_with('\n') && private.ends_with("=\n"),
            "genkey printed {private:?}; want 44 base64 characters and a newline"
        );
        let theirs = pipe(&wg, &["pubkey"], &private)?;
        let ours = pipe(&bin, &["pubkey"], &private)?;
        ensure!(
            ours == theirs,
            "pubkey of our {private:?}: ours {ours:?}, wg {theirs:?}"
        );
        ensure!(
            pubkey_of(private.trim())? == theirs.trim(),
            "pubkey_of disagrees"
        );
    }
    let bad = output_with_stdin(&mut agent_command(&["pubkey"])?, b"not a key\n")?;
    ensure!(
        !bad.status.success(),
        "pubkey accepted garbage and printed {:?}",
        String::from_utf8_lossy(&bad.stdout)
    );
    Ok(())
}

/// Issue 14.3: `[admin] socket` pointing at another configured path (the private key,
/// the config itself, the state dir or a file in it), however spelt, is refused by
/// `check-config` and by `run`, and the file it names survives.
#[test]
fn socket_path_equal_to_another_configured_path_is_refused() -> Result<()> {
    e2e("cfg-socket-paths", |env| {
        let base = ConfigCase::new(env)?;
        let key = base.key_file.display().to_string();
        let d = env.dir.display().to_string();
        std::fs::create_dir_all(env.path("state"))?;
        let link = env.path("key-link");
        std::os::unix::fs::symlink(&base.key_file, &link)?;
        let key_text = std::fs::read_to_string(&base.key_file)?;
        let sock_line = format!("socket = \"{d}/agent.sock\"");
        for (i, (socket, names)) in [
            (key.clone(), "interface.private_key_file"),
            (format!("{d}/./private.key"), "interface.private_key_file"),
            (format!("{d}//private.key"), "interface.private_key_file"),
            (
                format!("{d}/state/../private.key"),
                "interface.private_key_file",
            ),
            (link.display().to_string(), "interface.private_key_file"),
            (format!("{d}/state"), "state.dir"),
            (format!("{d}/state/agent.sock"), "state.dir"),
            (
                format!("{d}/cfg-socket-{}.toml", 7),
                "the config file itself",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let case = format!("cfg-socket-{i}");
            let text = base.edit(&sock_line, &format!("socket = {socket:?}"))?;
            refused(env, &case, &text, &["admin.socket", &socket, names])?;
            // `run` loads the same config: it must refuse before touching the path.
            let config = env.path(&format!("{case}.toml"));
            let out = skymesh_tests::proc::output(&mut agent_command(&[
                "run",
                "--config",
                config.to_str().context("utf-8 path")?,
            ])?)?;
            ensure!(
                !out.status.success()
                    && String::from_utf8_lossy(&out.stderr).contains("admin.socket"),
                "{case}: run did not refuse: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                std::fs::read_to_string(&base.key_file)? == key_text,
                "{case}: the private key file changed"
            );
            ensure!(env.path("state").is_dir(), "{case}: the state dir is gone");
        }
        Ok(())
    })
}

/// Issue 14.12: nonsense in any address, endpoint, key or name field is refused,
/// naming the key and the value.
#[test]
fn check_config_refuses_nonsense_values() -> Result<()> {
    e2e("cfg-nonsense", |env| {
        let base = ConfigCase::new(env)?;
        let private = std::fs::read_to_string(&base.key_file)?;
        let own = pubkey_of(private.trim())?;
        let gcp_line = base
            .text
            .lines()
            .find(|l| l.starts_with("public_key"))
            .context("first public_key line")?
            .to_string();
        let zero = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let cases: Vec<(&str, String, String)> = vec![
            (
                "address = \"100.96.0.1/32\"",
                "address = \"0.0.0.0/0\"".into(),
                "0.0.0.0/0".into(),
            ),
            (
                "address = \"100.96.0.1/32\"",
                "address = \"::/0\"".into(),
                "::/0".into(),
            ),
            (
                "address = \"100.96.0.1/32\"",
                "address = \"100.96.0.1/1\"".into(),
                "100.96.0.1/1".into(),
            ),
            (
                "address = \"100.96.0.1/32\"",
                "address = \"239.1.1.1/32\"".into(),
                "239.1.1.1/32".into(),
            ),
            (
                "address = \"100.96.0.1/32\"",
                "address = \"255.255.255.255/32\"".into(),
                "255.255.255.255/32".into(),
            ),
            (
                "name = \"skymesh0\"",
                "name = \".\"".into(),
                "interface.name = \".\"".into(),
            ),
            (
                "name = \"skymesh0\"",
                "name = \"..\"".into(),
                "interface.name = \"..\"".into(),
            ),
            (
                "name = \"skymesh0\"",
                "name = \"a:b\"".into(),
                "interface.name = \"a:b\"".into(),
            ),
            (&gcp_line, format!("public_key = \"{own}\""), own.clone()),
            (&gcp_line, format!("public_key = \"{zero}\""), zero.into()),
            (
                "\"198.51.100.7:51820\"",
                "\"198.51.100.7:0\"".into(),
                "198.51.100.7:0".into(),
            ),
            (
                "\"198.51.100.7:51820\"",
                "\"0.0.0.0:51820\"".into(),
                "0.0.0.0:51820".into(),
            ),
            (
                "\"198.51.100.7:51820\"",
                "\"[::]:51820\"".into(),
                "[::]:51820".into(),
            ),
            (
                "\"198.51.100.7:51820\"",
                "\"255.255.255.255:51820\"".into(),
                "255.255.255.255:51820".into(),
            ),
            (
                "\"198.51.100.7:51820\"",
                "\"224.0.0.1:51820\"".into(),
                "224.0.0.1:51820".into(),
            ),
            (
                "\"127.0.0.1:9586\"",
                "\"127.0.0.1:0\"".into(),
                "127.0.0.1:0".into(),
            ),
        ];
        for (i, (from, to, names)) in cases.iter().enumerate() {
            let text = base.edit(from, to)?;
            refused(env, &format!("cfg-nonsense-{i}"), &text, &[names])?;
        }
        write_secret(&base.key_file, &format!("{zero}\n"))?;
        refused(
            env,
            "cfg-nonsense-zero-private",
            &base.text,
            &["private_key_file", "all-zero"],
        )
    })
}

/// Runs `skymesh-agent ARGS` with `input` on stdin and returns its exit code and
/// everything it printed.
fn run_with_stdin(args: &[&str], input: &[u8]) -> Result<(Option<i32>, String)> {
    let out = output_with_stdin(&mut agent_command(args)?, input)?;
    let msg = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok((out.status.code(), msg))
}

/// Issue 14.5 re-review: every input read whole is capped. A config over 1 MiB, a
/// private key file, a join token file and a `join -` token over 64 KiB are refused,
/// naming the path (or stdin) and the limit, instead of read until the OOM killer.
#[test]
fn oversized_inputs_are_refused_naming_the_limit() -> Result<()> {
    e2e("oversized-inputs", |env| {
        let base = ConfigCase::new(env)?;
        let mut big = base.text.clone();
        big.push_str(&"# padding\n".repeat(110_000));
        refused(env, "big-config", &big, &["1048576"])?;

        let big_key = env.path("big.key");
        write_secret(&big_key, &"A".repeat(70_000))?;
        let with_big_key = base.edit(
            &base.key_file.display().to_string(),
            &big_key.display().to_string(),
        )?;
        refused(env, "big-key", &with_big_key, &["big.key", "65536"])?;

        let key = base.key_file.display().to_string();
        let state = env.path("state");
        let controller = env.path("controller.toml");
        std::fs::write(
            &controller,
            format!(
                "[interface]\nprivate_key_file = \"{key}\"\n[state]\ndir = \"{}\"\n[controller]\n[node]\nadvertise = [\"10.0.0.0/16\"]\n",
                state.display()
            ),
        )?;
        let controller = controller.to_str().context("UTF-8 path")?;
        let (code, msg) =
            run_with_stdin(&["join", "-", "--config", controller], &vec![b'x'; 70_000])?;
        ensure!(code == Some(1), "join - with 70 KB: exit {code:?}\n{msg}");
        ensure!(
            msg.contains("stdin") && msg.contains("65536"),
            "join -: the message does not name stdin and the limit:\n{msg}"
        );
        Ok(())
    })
}

/// Issue 14.12 re-review: check-config refuses, naming the key, the value and why,
/// prefixes that can never be a VPC or overlay destination, repeated entries,
/// endpoints routed into the tunnel, a shared endpoint and an overlong peer name.
#[test]
fn check_config_refuses_prefixes_and_endpoints_that_cannot_route() -> Result<()> {
    let long_name = "a".repeat(300);
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "loopback",
            "10.20.0.0/16",
            "127.0.0.0/8",
            &["peers[1]", "127.0.0.0/8", "loopback"],
        ),
        (
            "multicast",
            "10.20.0.0/16",
            "224.0.0.0/4",
            &["peers[1]", "224.0.0.0/4", "multicast"],
        ),
        (
            "unspecified",
            "10.20.0.0/16",
            "0.0.0.0/32",
            &["peers[1]", "0.0.0.0/32"],
        ),
        (
            "broadcast",
            "10.20.0.0/16",
            "255.255.255.255/32",
            &["peers[1]", "255.255.255.255/32"],
        ),
        (
            "link-local",
            "10.20.0.0/16",
            "169.254.0.0/16",
            &["peers[1]", "169.254.0.0/16", "link-local"],
        ),
        (
            "default-route",
            "10.20.0.0/16",
            "::/0",
            &["peers[1]", "::/0", "default route"],
        ),
        (
            "repeated-prefix",
            "\"10.20.0.0/16\"]",
            "\"10.20.0.0/16\", \"10.20.0.0/16\"]",
            &["peers[1]", "allowed_ips[2]", "listed twice"],
        ),
        (
            "endpoint-in-own-prefix",
            "10.10.0.0/16",
            "198.51.100.0/24",
            &[
                "peers[0]",
                "endpoint",
                "198.51.100.7:51820",
                "198.51.100.0/24",
            ],
        ),
        (
            "endpoint-in-other-prefix",
            "10.20.0.0/16",
            "198.51.100.0/24",
            &["peers[0]", "endpoint", "198.51.100.7:51820", "aws-gw"],
        ),
        (
            "shared-endpoint",
            "allowed_ips = [\"100.96.0.3/32\"",
            "endpoint = \"198.51.100.7:51820\"\nallowed_ips = [\"100.96.0.3/32\"",
            &["peers[1]", "endpoint", "gcp-gw", "same endpoint"],
        ),
        (
            "long-name",
            "name = \"aws-gw\"",
            "",
            &["peers[1].name", "63"],
        ),
    ];
    e2e("routing-nonsense", |env| {
        let base = ConfigCase::new(env)?;
        let mut failed = Vec::new();
        for (case, from, to, must_name) in cases {
            let to = if *case == "long-name" {
                format!("name = \"{long_name}\"")
            } else {
                (*to).to_string()
            };
            if let Err(e) = refused(env, case, &base.edit(from, &to)?, must_name) {
                failed.push(format!("{e:#}"));
            }
        }
        ensure!(failed.is_empty(), "{}", failed.join("\n---\n"));
        Ok(())
    })
}

/// Issue 14.4 re-review: `join` with a token whose controller can never be dialled
/// stops at once, naming the address, instead of retrying for ever.
#[test]
fn join_with_an_undialable_controller_stops_naming_it() -> Result<()> {
    e2e("join-undialable", |env| {
        let base = ConfigCase::new(env)?;
        let config = env.path("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[interface]\nprivate_key_file = \"{}\"\n[state]\ndir = \"{}\"\n[controller]\n[node]\nadvertise = [\"10.0.0.0/16\"]\n",
                base.key_file.display(),
                env.path("state").display()
            ),
        )?;
        let config = config.to_str().context("UTF-8 path")?;
        for bad in ["0.0.0.0:0", "255.255.255.255:1", "224.0.0.1:7443"] {
            let token = skymesh_wire::JoinToken {
                controllers: vec![bad.into()],
                ca_sha256: "ab".repeat(32),
                id: "t-1".into(),
                secret: "s".into(),
            }
            .encode();
            // A join that retries is stopped by timeout(1) after 10 s (exit 124).
            let mut cmd = Command::new("timeout");
            cmd.arg("10").arg(skymesh_tests::agent_bin()?);
            cmd.args(["join", &token, "--config", config]);
            let out = skymesh_tests::proc::output(&mut cmd)?;
            let msg = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
            ensure!(
                out.status.code() == Some(1),
                "{bad}: exit {}\n{msg}",
                out.status
            );
            ensure!(
                msg.contains(bad),
                "{bad}: the message does not name it:\n{msg}"
            );
        }
        Ok(())
    })
}
