//! The agent's and the controller's TOML configuration, as `check-config` and
//! `run` read it.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Stands for a readable mode-0600 private key file in agent config inputs:
/// the agent reads the key while it validates `[interface]`, so without one no
/// input would get past the first table. Seeds spell `private_key_file =
/// "@KEY@"`.
pub const KEY_PLACEHOLDER: &str = "@KEY@";

/// A private key file for [`KEY_PLACEHOLDER`], made once per process in
/// `$SKYMESH_FUZZ_SCRATCH` (tests/fuzz.sh's scratch dir) or the temp dir.
fn key_file() -> &'static Path {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    KEY.get_or_init(|| {
        let base = std::env::var_os("SKYMESH_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("agent-key.{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("key dir");
        let path = dir.join("private.key");
        // Any 32 bytes do: X25519 clamps the scalar where it is used.
        let key = skymesh_agent::keys::PrivateKey::from_bytes([0x10; 32]);
        std::fs::write(&path, format!("{}\n", key.to_base64())).expect("key file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod key file");
        path
    })
}

/// Target `agent_config`: `data` is an agent config file.
///
/// Invariants: a refusal prints; an accepted static-mode config is a netmap
/// that validates and does not route the node's own address to a peer; an
/// accepted controller-mode config has no address and no peers of its own.
pub fn agent_config(data: &[u8]) {
    use skymesh_agent::config::Config;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let key = key_file().to_string_lossy();
    let text = text.replace(KEY_PLACEHOLDER, &key);
    let config = match Config::parse(Path::new("agent.toml"), &text) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    match &config.controller {
        None => {
            let map = config.netmap().expect("static mode has a netmap");
            assert_eq!(map.validate(), Ok(()), "accepted config, invalid netmap");
            let own = map.address.addr();
            for p in &map.peers {
                assert!(
                    !p.allowed_ips.iter().any(|net| net.contains(&own)),
                    "own address {own} routed to peer {:?}",
                    p.name
                );
            }
        }
        Some(_) => {
            assert!(config.netmap().is_none());
            assert!(
                config.interface.address.is_none(),
                "controller mode with an address"
            );
            assert!(config.peers.is_empty(), "controller mode with static peers");
        }
    }
    assert!(
        (1280..=9000).contains(&config.interface.mtu),
        "mtu {}",
        config.interface.mtu
    );
    assert_ne!(config.interface.listen_port, 0);
    agent_values(&config);
}

/// What issue 14's review found `check-config` accepting, and the rules that
/// came of it, restated from first principles: a usable interface name, a
/// unicast host address that claims no more than a /8, peers that are not
/// the node itself and can form a session, endpoints that can be sent to, and
/// an admin socket that is no other configured path.
fn agent_values(config: &skymesh_agent::config::Config) {
    use boringtun::x25519::PublicKey as XPublic;
    let name = &config.interface.name;
    assert!(
        (1..=15).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && name != "."
            && name != "..",
        "interface name {name:?}"
    );
    let unicast = |ip: IpAddr| {
        let ip = ip.to_canonical();
        !ip.is_unspecified()
            && !ip.is_multicast()
            && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
    };
    if let Some(net) = config.interface.address {
        assert!(
            unicast(net.addr()) && !net.addr().is_loopback(),
            "address {net}"
        );
        assert!(net.prefix_len() >= 8, "address {net} claims more than a /8");
    }
    let own = &config.interface.private_key;
    let endpoints = config.peers.iter().filter_map(|p| p.endpoint);
    let node_endpoints = config
        .controller
        .iter()
        .flat_map(|c| c.endpoints.iter().copied());
    for ep in endpoints.chain(node_endpoints) {
        assert!(ep.port() != 0 && unicast(ep.ip()), "endpoint {ep}");
    }
    for p in &config.peers {
        assert_ne!(
            p.public_key,
            own.public_key(),
            "peer {:?} has the node's key",
            p.name
        );
        let shared = own
            .secret()
            .diffie_hellman(&XPublic::from(*p.public_key.as_bytes()));
        assert_ne!(
            shared.as_bytes(),
            &[0; 32],
            "peer {:?}: a low-order key",
            p.name
        );
    }
    assert_ne!(config.metrics_listen.port(), 0);
    let socket = lexical(&config.admin_socket);
    assert_ne!(
        socket,
        lexical(&config.interface.private_key_file),
        "admin socket is the key"
    );
    assert!(
        !socket.starts_with(lexical(&config.state_dir)),
        "admin socket {socket:?} inside the state dir"
    );
}

/// `path` with `.`, `..` and repeated separators resolved as text.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Target `controller_config`: `data` is a controller config file.
///
/// Invariants: a refusal prints; an accepted config has a network-address
/// pool big enough for a mesh, an MTU in range and somewhere to advertise.
pub fn controller_config(data: &[u8]) {
    use skymesh_controller::config::Config;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text) {
        Ok(c) => c,
        Err(e) => {
            let _ = format!("{e:#}");
            return;
        }
    };
    let pool = config.overlay_pool;
    assert_eq!(pool.trunc(), pool, "pool {pool} has host bits");
    assert!(pool.prefix_len() <= if pool.addr().is_ipv4() { 30 } else { 126 });
    assert!((1280..=9000).contains(&config.mtu), "mtu {}", config.mtu);
    assert!(!config.control_advertise.is_empty());
}
