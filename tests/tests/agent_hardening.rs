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

/// CPU time (user + system) of process `pid`, from `/proc/PID/stat`.
fn cpu_time(pid: i32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("no value")?
        .parse()?)
}

fn open_fds(pid: i32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Issue 14.8: an agent out of file descriptors neither spins nor balloons. With a
/// low RLIMIT_NOFILE, admin-socket and `/metrics` connections (silent ones, and
/// ones trickling an endless request head) run it out of descriptors; meanwhile its
/// CPU use stays far from a spinning core and its memory bounded, and once the
/// connections close `status` answers again.
#[test]
fn out_of_descriptors_the_agent_neither_spins_nor_balloons() -> Result<()> {
    use std::io::Write as _;
    if !require_root() || !skymesh_tests::require_tool("prlimit") {
        return Ok(());
    }
    e2e("emfile", |env| {
        let ns = env.netns("a")?;
        let mut a = agent(env, &ns)?;
        a.start()?;
        let pid = a.pid().context("pid")?.as_raw();
        // A few scrapes and status calls first, so the baseline holds what a
        // normal run allocates.
        for _ in 0..3 {
            a.status()?;
            a.metrics()?;
        }
        let rss_before = status_kib(pid, "VmRSS")?;
        let prlimit = |limit: usize| {
            skymesh_tests::proc::check(std::process::Command::new("prlimit").args([
                "--pid",
                &pid.to_string(),
                &format!("--nofile={limit}:{limit}"),
            ]))
        };
        // First /metrics clients that fill their buffers, with room for all of them.
        prlimit(open_fds(pid)? + 200)?;
        let metrics_addr: std::net::SocketAddr = a.spec.metrics_listen.parse()?;
        let mut metrics = ns.run(|| -> Result<Vec<std::net::TcpStream>> {
            let mut v = Vec::new();
            for i in 0..120 {
                let s = std::net::TcpStream::connect_timeout(&metrics_addr, Duration::from_secs(2))
                    .with_context(|| format!("metrics connection {i}"))?;
                s.set_write_timeout(Some(Duration::from_millis(20)))?;
                v.push(s);
            }
            Ok(v)
        })??;
        // Most /metrics clients send 320 KiB of a request head that never ends, as
        // fast as it is read, and then hold the connection silently.
        let filler = [b'a'; 4096];
        let mut sent = vec![0usize; metrics.len()];
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            for (i, s) in metrics.iter_mut().enumerate() {
                if i % 4 == 3 || sent[i] >= 320 * 1024 {
                    continue;
                }
                if sent[i] == 0 {
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Filler: ");
                }
                sent[i] += s.write(&filler).unwrap_or(0);
            }
        }
        // Then the admin socket runs it out of descriptors: a few left, many
        // connections queued.
        let limit = open_fds(pid)? + 8;
        prlimit(limit)?;
        let mut admin = Vec::new();
        for _ in 0..100 {
            let s = std::os::unix::net::UnixStream::connect(&a.socket)?;
            admin.push(s);
        }
        std::thread::sleep(Duration::from_millis(500));
        let fds = open_fds(pid)?;
        ensure!(
            fds + 4 >= limit,
            "the agent holds {fds} of {limit} descriptors: the test did not exhaust them"
        );

        let cpu0 = cpu_time(pid)?;
        let t0 = std::time::Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let cpu = (cpu_time(pid)? - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        let rss = status_kib(pid, "VmRSS")?;
        let hwm = status_kib(pid, "VmHWM")?;
        eprintln!(
            "out of descriptors: cpu {:.0}%, rss {} -> {} KiB (peak {} KiB), {fds} fds",
            cpu * 100.0,
            rss_before,
            rss,
            hwm
        );
        ensure!(
            cpu < 0.20,
            "the agent used {:.0}% of a core while out of descriptors",
            cpu * 100.0
        );
        ensure!(
            hwm.saturating_sub(rss_before) < 16 * 1024,
            "the agent's memory grew from {rss_before} KiB to {hwm} KiB (peak) while out of descriptors"
        );
        a.ensure_running()?;

        drop(admin);
        drop(metrics);
        let back = skymesh_tests::wait_until(Duration::from_secs(10), || a.status().is_ok());
        ensure!(
            back.is_some(),
            "`status` did not answer within 10 s of the connections closing"
        );
        a.metrics().context("a scrape after the episode")?;
        Ok(())
    })
}

/// How long until the server closes `stream` (EOF or reset), reading and
/// discarding what it sends; `None` if still open after `max`.
fn closed_within(mut stream: std::net::TcpStream, max: Duration) -> Result<Option<Duration>> {
    use std::io::Read as _;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = max.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(Some(start.elapsed())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(Some(start.elapsed()))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns it whole.
fn read_response(stream: &mut std::net::TcpStream) -> Result<String> {
    use std::io::Read as _;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf)?;
        ensure!(n > 0, "connection closed mid-response");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .context("no content-length")?
                .parse()?;
            if body.len() >= len {
                return Ok(text);
            }
        }
    }
}

/// Issue 14.7: `/metrics` closes a silent connection and a half-sent or trickled
/// request head 10 s after the connection opened or the head began, and an idle
/// keep-alive connection after 60 s.
#[test]
fn metrics_closes_silent_half_sent_trickled_and_idle_connections() -> Result<()> {
    use std::io::Write as _;
    if !require_root() {
        return Ok(());
    }
    e2e("metrics-deadlines", |env| {
        let ns = env.netns("a")?;
        let mut a = agent(env, &ns)?;
        a.start()?;
        let addr: std::net::SocketAddr = a.spec.metrics_listen.parse()?;
        let connect = || -> Result<std::net::TcpStream> {
            Ok(ns.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??)
        };
        let silent = connect()?;
        let mut half = connect()?;
        half.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n")?;
        let trickle = connect()?;
        let mut keepalive = connect()?;
        keepalive.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")?;
        let answer = read_response(&mut keepalive)?;
        ensure!(answer.starts_with("HTTP/1.1 200"), "{answer:.200}");

        let (silent, half, trickled, idle) = std::thread::scope(|s| {
            let silent = s.spawn(|| closed_within(silent, Duration::from_secs(20)));
            let half = s.spawn(|| closed_within(half, Duration::from_secs(20)));
            let trickled = s.spawn(|| -> Result<Option<Duration>> {
                let mut writer = trickle.try_clone()?;
                s.spawn(move || {
                    // One byte of a head a second, for longer than the deadline.
                    for b in b"GET /metrics HTTP/1.1\r\nHost: agent-with-a-long-name\r\n".iter() {
                        if writer.write_all(&[*b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                });
                closed_within(trickle, Duration::from_secs(20))
            });
            let idle = s.spawn(|| closed_within(keepalive, Duration::from_secs(70)));
            (silent.join(), half.join(), trickled.join(), idle.join())
        });
        let took = |r: std::thread::Result<Result<Option<Duration>>>, what: &str| {
            r.map_err(|_| anyhow::anyhow!("{what}: reader panicked"))?
        };
        let silent = took(silent, "silent")?;
        let half = took(half, "half-sent")?;
        let trickled = took(trickled, "trickled")?;
        let idle = took(idle, "idle keep-alive")?;
        eprintln!("closed after: silent {silent:?}, half-sent {half:?}, trickled {trickled:?}, idle keep-alive {idle:?}");
        for (what, closed) in [
            ("silent", silent),
            ("half-sent", half),
            ("trickled", trickled),
        ] {
            let closed =
                closed.with_context(|| format!("a {what} connection is open after 20 s"))?;
            ensure!(
                closed >= Duration::from_secs(9) && closed <= Duration::from_secs(13),
                "a {what} connection was closed after {closed:?}; want about 10 s"
            );
        }
        let idle = idle.context("an idle keep-alive connection is open after 70 s")?;
        ensure!(
            idle >= Duration::from_secs(58) && idle <= Duration::from_secs(63),
            "an idle keep-alive connection was closed after {idle:?}; want about 60 s"
        );
        a.metrics().context("a scrape afterwards")?;
        Ok(())
    })
}

/// Issue 14.7: an operator's scrape succeeds while an attacker holds as many
/// silent or half-sent connections as it can open, and the agent's descriptors
/// stay bounded by the connection cap.
#[test]
fn a_scrape_succeeds_while_attackers_hold_every_connection() -> Result<()> {
    use std::io::Write as _;
    if !require_root() || !skymesh_tests::require_tool("prlimit") {
        return Ok(());
    }
    e2e("metrics-cap", |env| {
        let ns = env.netns("a")?;
        let mut a = agent(env, &ns)?;
        a.start()?;
        let pid = a.pid().context("pid")?.as_raw();
        // A descriptor budget the attacker can exhaust (a systemd default is 1024).
        let base = open_fds(pid)?;
        let limit = base + 200;
        skymesh_tests::proc::check(std::process::Command::new("prlimit").args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ]))?;
        let addr: std::net::SocketAddr = a.spec.metrics_listen.parse()?;
        let (held, failed) = ns.run(|| -> (Vec<std::net::TcpStream>, Vec<String>) {
            let mut held = Vec::new();
            let mut failed = Vec::new();
            for i in 0..400 {
                match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(mut s) => {
                        if i % 2 == 0 {
                            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                        }
                        held.push(s);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (held, failed)
        })?;
        eprintln!("{} connections failed: {:?}", failed.len(), failed.first());
        std::thread::sleep(Duration::from_millis(300));
        let fds = open_fds(pid)?;
        for i in 0..5 {
            let t = std::time::Instant::now();
            let m = a.metrics().with_context(|| {
                format!(
                    "scrape {i} while {} attacker connections are open",
                    held.len()
                )
            })?;
            ensure!(
                m.get("skymesh_build_info", &[]).is_some(),
                "scrape {i}: {:.300}",
                m.text
            );
            ensure!(
                t.elapsed() < Duration::from_secs(5),
                "scrape {i} took {:?}",
                t.elapsed()
            );
        }
        a.status()
            .context("status while the attackers hold their connections")?;
        eprintln!(
            "{} attacker connections, the agent holds {fds} descriptors ({base} at rest)",
            held.len()
        );
        ensure!(
            fds <= base + 64 + 8,
            "the agent holds {fds} descriptors ({base} at rest): the connection cap did not hold"
        );
        Ok(())
    })
}

/// Issue 14.8: the admin socket caps its connections and closes a silent one after
/// its 5 s deadline; `status` answers at once while silent clients hold more
/// connections than the cap and the agent's descriptor budget.
#[test]
fn status_answers_while_silent_admin_clients_hold_the_cap() -> Result<()> {
    use std::io::Read as _;
    if !require_root() || !skymesh_tests::require_tool("prlimit") {
        return Ok(());
    }
    e2e("admin-cap", |env| {
        let ns = env.netns("a")?;
        let mut a = agent(env, &ns)?;
        a.start()?;
        let pid = a.pid().context("pid")?.as_raw();
        let base = open_fds(pid)?;
        let limit = base + 100;
        skymesh_tests::proc::check(std::process::Command::new("prlimit").args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ]))?;
        let mut silent = std::os::unix::net::UnixStream::connect(&a.socket)?;
        let opened = std::time::Instant::now();
        // More silent clients than the cap (64) and than the descriptors left,
        // paced so the backlog never fills.
        let mut held = Vec::new();
        for _ in 0..150 {
            held.push(std::os::unix::net::UnixStream::connect(&a.socket)?);
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(200));
        let fds = open_fds(pid)?;
        for i in 0..3 {
            let t = std::time::Instant::now();
            // `timeout` so that a status stuck behind the attackers fails the test
            // instead of hanging it.
            let out = skymesh_tests::proc::output(
                std::process::Command::new("timeout")
                    .arg("5")
                    .arg(skymesh_tests::agent_bin()?)
                    .args(["status", "--json", "--config", a.config_arg()?]),
            )?;
            ensure!(
                out.status.success(),
                "status {i} failed while {} silent clients are connected: {}",
                held.len(),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                t.elapsed() < Duration::from_secs(3),
                "status {i} took {:?}",
                t.elapsed()
            );
        }
        eprintln!(
            "{} silent admin clients; the agent holds {fds} descriptors ({base} at rest)",
            held.len()
        );
        ensure!(
            fds <= base + 64 + 8,
            "the agent holds {fds} descriptors ({base} at rest): the admin connection cap did not hold"
        );
        // The first silent client was evicted or timed out; either way it is closed.
        silent.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = [0u8; 64];
        let n = silent
            .read(&mut buf)
            .context("the first silent client is still open after 10 s")?;
        ensure!(n == 0, "the first silent client got {n} bytes");
        ensure!(
            opened.elapsed() < Duration::from_secs(7),
            "closed only after {:?}",
            opened.elapsed()
        );
        drop(held);
        // Alone, a silent client is closed by the 5 s deadline.
        let mut alone = std::os::unix::net::UnixStream::connect(&a.socket)?;
        let t = std::time::Instant::now();
        alone.set_read_timeout(Some(Duration::from_secs(10)))?;
        let n = alone
            .read(&mut buf)
            .context("a silent admin client is open after 10 s")?;
        ensure!(
            n == 0
                && t.elapsed() >= Duration::from_secs(4)
                && t.elapsed() <= Duration::from_secs(7),
            "a silent admin client was closed after {:?} (want about 5 s)",
            t.elapsed()
        );
        Ok(())
    })
}

/// A live socket of another program that a stream `connect` cannot reach.
#[derive(Debug, Clone, Copy)]
enum LiveSocket {
    /// Like /run/systemd/journal/socket: connect gives EPROTOTYPE.
    Datagram,
    /// A seqpacket listener: connect gives EPROTOTYPE.
    SeqpacketListener,
    /// A stream listener whose backlog is full: connect gives EAGAIN.
    FullBacklog,
}

/// Binds `what` at `path`; the descriptors returned keep it alive.
fn bind_live(what: LiveSocket, path: &std::path::Path) -> Result<Vec<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{
        bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd as _;
    let addr = UnixAddr::new(path)?;
    let kind = match what {
        LiveSocket::Datagram => SockType::Datagram,
        LiveSocket::SeqpacketListener => SockType::SeqPacket,
        LiveSocket::FullBacklog => SockType::Stream,
    };
    let fd = socket(AddressFamily::Unix, kind, SockFlag::empty(), None)?;
    bind(fd.as_raw_fd(), &addr)?;
    let mut keep = Vec::new();
    if !matches!(what, LiveSocket::Datagram) {
        listen(&fd, Backlog::new(0)?)?;
    }
    keep.push(fd);
    if let LiveSocket::FullBacklog = what {
        for _ in 0..64 {
            let c = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )?;
            match connect(c.as_raw_fd(), &addr) {
                Ok(()) => keep.push(c),
                Err(nix::errno::Errno::EAGAIN) => return Ok(keep),
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::bail!("the backlog of {} never filled", path.display());
    }
    Ok(keep)
}

/// Issue 14.1 re-review: a live socket the agent's stream connect cannot reach (a
/// datagram socket, a seqpacket listener, a stream listener with a full backlog) is
/// not stale: `run` refuses, naming the path, and the socket survives. Only a socket
/// nobody listens on (ECONNREFUSED) is replaced.
#[test]
fn run_never_deletes_a_live_socket_it_cannot_connect_to() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    e2e("live-socket-kept", |env| {
        let ns = env.netns("a")?;
        let mut a = agent(env, &ns)?;
        for what in [
            LiveSocket::Datagram,
            LiveSocket::SeqpacketListener,
            LiveSocket::FullBacklog,
        ] {
            let keep = bind_live(what, &a.socket)?;
            let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(&a.socket)?);
            a.spawn_with_env(&[])?;
            let exit = a
                .wait_exit(Duration::from_secs(15))?
                .with_context(|| format!("{what:?}: the agent started over a live socket"))?;
            let log = a.log();
            let socket = a.socket.display().to_string();
            ensure!(!exit.success(), "{what:?}: exit {exit}");
            ensure!(
                log.contains(&socket),
                "{what:?}: the error does not name the path:\n{log}"
            );
            let after = std::fs::symlink_metadata(&a.socket)
                .with_context(|| format!("{what:?}: the live socket {socket} was deleted"))?;
            ensure!(
                std::os::unix::fs::MetadataExt::ino(&after) == ino,
                "{what:?}: the live socket was replaced"
            );
            drop(keep);
            std::fs::remove_file(&a.socket)?;
        }
        // A stale stream socket (bound, then closed) is still replaced.
        drop(std::os::unix::net::UnixListener::bind(&a.socket)?);
        a.start()?;
        a.stop()?;
        Ok(())
    })
}
