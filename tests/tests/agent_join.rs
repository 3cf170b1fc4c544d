//! `skymesh-agent join`, run as a user runs it against the real controller
//! binary: a join that cannot succeed ends with a non-zero exit and says why,
//! instead of retrying forever. No namespaces, no root.

use anyhow::{ensure, Context, Result};
use skymesh_tests::agent::{agent_bin, workspace_bin, write_secret, Keypair};
use skymesh_tests::TestEnv;
use skymesh_wire::JoinToken;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child on drop, so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A token whose CA pin is not the controller's: the agent must refuse the
/// controller during the handshake, name both fingerprints and what to check,
/// and exit non-zero at once (it used to retry with back-off forever).
#[test]
fn join_with_a_wrong_ca_pin_exits_and_names_both_fingerprints() -> Result<()> {
    let env = TestEnv::new("agent-join-pin")?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let ctl_config = env.path("controller.toml");
    std::fs::write(
        &ctl_config,
        format!(
            "[control]\nlisten = \"127.0.0.1:{port}\"\nadvertise = [\"127.0.0.1:{port}\"]\n\
             [api]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = {:?}\n[state]\ndata_dir = {:?}\n",
            env.path("admin.token"),
            env.path("controller-data")
        ),
    )?;
    let _controller = Child(
        Command::new(workspace_bin(
            "skymesh-controller",
            "SKYMESH_CONTROLLER_BIN",
        )?)
        .args(["run", "--config"])
        .arg(&ctl_config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting skymesh-controller")?,
    );
    // The controller's CA is created at its first start.
    let up = Instant::now() + Duration::from_secs(30);
    while !env.path("controller-data").join("state.redb").exists() {
        ensure!(Instant::now() < up, "the controller did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));

    let key_file = env.path("private.key");
    write_secret(&key_file, &format!("{}\n", Keypair::generate()?.private))?;
    let config = env.path("agent.toml");
    write_secret(
        &config,
        &format!(
            "[interface]\nprivate_key_file = {key:?}\nlisten_port = 51820\n\
             [state]\ndir = {state:?}\n[controller]\n[node]\nadvertise = [\"10.0.0.0/16\"]\n",
            key = key_file,
            state = env.path("state"),
        ),
    )?;
    let wrong_pin = "ab".repeat(32);
    let token = JoinToken {
        controllers: vec![format!("127.0.0.1:{port}")],
        ca_sha256: wrong_pin.clone(),
        id: "jt-000000000000".into(),
        secret: "00".repeat(32),
    }
    .encode();

    let started = Instant::now();
    let mut join = Child(
        Command::new(agent_bin()?)
            .args(["join", &token, "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting skymesh-agent join")?,
    );
    let status = loop {
        if let Some(status) = join.0.try_wait()? {
            break status;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "join still retrying after {:?} with a wrong CA pin",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = join.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    eprintln!(
        "join exited with {status} after {:?}: {}",
        started.elapsed(),
        stderr.lines().last().unwrap_or_default()
    );
    ensure!(!status.success(), "join succeeded with a wrong pin");
    let presented = stderr
        .split("presented a CA with SHA-256 fingerprint ")
        .nth(1)
        .map(|rest| rest.chars().take(64).collect::<String>())
        .unwrap_or_default();
    ensure!(
        presented.len() == 64
            && presented.chars().all(|c| c.is_ascii_hexdigit())
            && presented != wrong_pin,
        "the presented fingerprint is not named: {stderr}"
    );
    ensure!(
        stderr.contains(&wrong_pin)
            && stderr.contains("check that the token was created by this controller"),
        "the pinned fingerprint and the fix are not named: {stderr}"
    );
    Ok(())
}
