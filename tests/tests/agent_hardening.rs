//! Issue 14, agent side, run as a user or an attacker would meet it: the real
//! `skymesh-agent run` in a namespace of its own. A config typo must not delete a
//! file (14.3); running out of descriptors must not spin or balloon the agent
//! (14.8); silent connections must not lock an operator out of `/metrics` (14.7).

use anyhow::{ensure, Context, Result};
use skymesh_tests::{e2e, require_root, Agent, AgentSpec, Keypair, PeerSpec, TestEnv};
use std::os::unix::fs::FileTypeExt as _;
use std::time::Duration;

/// One static-mode agent with one peer, in a namespace of its own.
fn agent(env: &TestEnv, ns: &skymesh_tests::Netns) -> Result<Agent> {
    let peer = Keypair::generate()?;
    let spec =
        AgentSpec::new("100.96.0.1/32").peer(PeerSpec::new("b", &peer.public, &["100.96.0.2/32"]));
    Agent::new(env, ns, "a", Keypair::generate()?, spec)
}

/// What a careless operator may have left at the admin socket path.
#[derive(Debug, Clone, Copy)]
enum AtSocketPath {
    RegularFile,
    Directory,
    Fifo,
    SymlinkToKey,
}

/// `run` never deletes what is not a socket: it refuses, naming the path and the key,
/// and the file is there afterwards, unchanged. A stale socket is still replaced.
#[test]
fn run_never_deletes_a_non_socket_at_the_admin_socket_path() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("socket-not-deleted", |env| {
        let ns = env.netns("a")?;
        let mut a = agent(env, &ns)?;
        for what in [
            AtSocketPath::RegularFile,
            AtSocketPath::Directory,
            AtSocketPath::Fifo,
            AtSocketPath::SymlinkToKey,
        ] {
            match what {
                AtSocketPath::RegularFile => std::fs::write(&a.socket, "precious\n")?,
                AtSocketPath::Directory => std::fs::create_dir(&a.socket)?,
                AtSocketPath::Fifo => {
                    nix::unistd::mkfifo(&a.socket, nix::sys::stat::Mode::S_IRWXU)?
                }
                AtSocketPath::SymlinkToKey => std::os::unix::fs::symlink(&a.key_file, &a.socket)?,
            }
            let kind = std::fs::symlink_metadata(&a.socket)?.file_type();
            a.spawn_with_env(&[])?;
            let exit = a
                .wait_exit(Duration::from_secs(15))?
                .with_context(|| format!("{what:?}: the agent started over it"))?;
            let log = a.log();
            let socket = a.socket.display().to_string();
            ensure!(!exit.success(), "{what:?}: exit {exit}");
            ensure!(
                log.contains(&socket) && log.contains("socket"),
                "{what:?}: the error does not name the path and the key:\n{log}"
            );
            let after = std::fs::symlink_metadata(&a.socket)
                .with_context(|| format!("{what:?}: {socket} was deleted"))?
                .file_type();
            ensure!(after == kind, "{what:?}: the file type changed");
            if let AtSocketPath::RegularFile = what {
                ensure!(std::fs::read_to_string(&a.socket)? == "precious\n");
            }
            ensure!(
                std::fs::read_to_string(&a.key_file)? == format!("{}\n", a.keys.private),
                "{what:?}: the private key changed"
            );
            match what {
                AtSocketPath::Directory => std::fs::remove_dir(&a.socket)?,
                _ => std::fs::remove_file(&a.socket)?,
            }
        }
        // A stale socket (a killed agent's) is replaced, and removed on a clean stop.
        drop(std::os::unix::net::UnixListener::bind(&a.socket)?);
        a.start()?;
        a.stop()?;
        ensure!(
            std::fs::symlink_metadata(&a.socket).is_err(),
            "the agent left its socket behind"
        );
        // A live socket of another daemon is neither stolen nor deleted.
        let _other = std::os::unix::net::UnixListener::bind(&a.socket)?;
        a.spawn_with_env(&[])?;
        let exit = a
            .wait_exit(Duration::from_secs(15))?
            .context("the agent started over a live socket")?;
        ensure!(!exit.success() && a.log().contains("in use"), "{}", a.log());
        ensure!(
            std::fs::symlink_metadata(&a.socket)?
                .file_type()
                .is_socket(),
            "the live socket was deleted"
        );
        Ok(())
    })
}
