//! Writes the seed corpora in `tests/fuzz/seeds/<target>/` from the real
//! encoders, the example configs and the in-process mesh, so that every
//! target starts from valid inputs. Run with `tests/fuzz.sh seeds`; the
//! output is committed.
//!
//! It links the instrumented build, so it carries an unused fuzz entry point.

use skymesh_agent::packet::internet_checksum;
use skymesh_agent::probe::Probe;
use skymesh_fuzz::config::KEY_PLACEHOLDER;
use skymesh_fuzz::control::sample_netmap;
use skymesh_fuzz::node::{Mesh, Setup};
use skymesh_fuzz::{join_chunks, node::NODE_ADDR};
use skymesh_wire::control::{
    encode, AgentMessage, ControllerMessage, EnrollRequest, Enrolled, FullNetMap, NetMapUpdate,
    Refusal, RefusalCode, Register, RejectedPrefix, SelfInfo,
};
use skymesh_wire::{LinkReport, LinkSample, PathSpec, PublicKey, Via};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seeds = root.join("seeds");
    let configs = root.join("../../configs");
    control_frames(&seeds.join("control_frame"));
    netmaps(&seeds.join("netmap"));
    agent_configs(&seeds.join("agent_config"), &configs);
    controller_configs(&seeds.join("controller_config"), &configs);
    packets(&seeds.join("packet"));
    node(&seeds.join("node_inner"), &seeds.join("node_datagram"));
    gateway(&seeds.join("gateway_request"));
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("seed dir");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn control_frames(dir: &Path) {
    let map = sample_netmap();
    let body = |frame: Vec<u8>| frame[4..].to_vec();
    let agent = [
        (
            "register",
            AgentMessage::Register(Register {
                public_key: PublicKey::from_bytes([1; 32]),
                listen_port: 51820,
                endpoints: vec!["203.0.113.10:51820".parse().expect("addr")],
                advertise: vec!["10.0.0.0/16".parse().expect("cidr")],
                underlay: vec!["203.0.113.0/24".parse().expect("cidr")],
                agent_version: "0.1.0".into(),
                transit: true,
                capability: 0,
            }),
        ),
        (
            "enroll",
            AgentMessage::Enroll(EnrollRequest {
                token_id: "tok1".into(),
                secret: "s3cr3t".into(),
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
            }),
        ),
        (
            "links",
            AgentMessage::Links(LinkReport {
                links: vec![LinkSample {
                    peer: "gcp-gw".into(),
                    up: true,
                    rtt_us: 20_150,
                    jitter_us: 310,
                    loss_ppm: 30_000,
                }],
            }),
        ),
    ];
    for (name, msg) in agent {
        write(dir, name, &body(encode(&msg).expect("encode")));
    }
    let node = SelfInfo {
        name: "aws-gw".into(),
        overlay_ip: "100.96.0.1".parse().expect("ip"),
        prefixes: vec!["10.0.0.0/16".parse().expect("cidr")],
        rejected_prefixes: vec![RejectedPrefix {
            cidr: "100.96.0.0/12".parse().expect("cidr"),
            reason: "overlaps the overlay pool".into(),
        }],
        transit: false,
    };
    let mut with_paths = map.clone();
    with_paths.paths = vec![PathSpec {
        dest: "gcp-gw".into(),
        primary: Via::Transit("aws-gw".into()),
        backup: Some(Via::Direct),
    }];
    let controller = [
        (
            "netmap",
            ControllerMessage::NetMap(FullNetMap {
                seq: 1,
                node: node.clone(),
                netmap: with_paths,
            }),
        ),
        (
            "update",
            ControllerMessage::Update(NetMapUpdate {
                seq: 2,
                node: Some(node),
                upsert: vec![map.peers[1].clone()],
                remove: vec!["aws-gw".into()],
                paths: Some(vec![PathSpec {
                    dest: "gcp-gw".into(),
                    primary: Via::Direct,
                    backup: None,
                }]),
                path_changes: Vec::new(),
            }),
        ),
        (
            "enrolled",
            ControllerMessage::Enrolled(Enrolled {
                node: "aws-gw".into(),
                certificate_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                    .into(),
                ca_pem: "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n".into(),
            }),
        ),
        (
            "refused",
            ControllerMessage::Refused(Refusal {
                code: RefusalCode::NameTaken,
                message: "a node named \"aws-gw\" is enrolled already".into(),
            }),
        ),
    ];
    for (name, msg) in controller {
        write(dir, name, &body(encode(&msg).expect("encode")));
    }
}

fn netmaps(dir: &Path) {
    // control_frame also reads its input as a join token's JSON.
    let token = skymesh_wire::JoinToken {
        controllers: vec!["203.0.113.2:7443".into(), "[2001:db8::2]:7443".into()],
        ca_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        id: "tok1".into(),
        secret: "s3cr3t".into(),
    };
    let frames = dir.parent().expect("seeds").join("control_frame");
    write(
        &frames,
        "join-token",
        &serde_json::to_vec(&token).expect("json"),
    );

    let mut map = sample_netmap();
    write(dir, "two-peers", &serde_json::to_vec(&map).expect("json"));
    map.transit = true;
    map.paths = vec![PathSpec {
        dest: "gcp-gw".into(),
        primary: Via::Transit("aws-gw".into()),
        backup: Some(Via::Direct),
    }];
    map.peers[0].persistent_keepalive = Some(25);
    write(
        dir,
        "transit-paths",
        &serde_json::to_vec_pretty(&map).expect("json"),
    );
}

/// The example configs, with their key file standing for the fuzzer's.
fn agent_configs(dir: &Path, configs: &Path) {
    for name in ["agent.example.toml", "agent.controller.example.toml"] {
        let text = std::fs::read_to_string(configs.join(name)).expect("example config");
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("private_key_file") {
                    format!("private_key_file = \"{KEY_PLACEHOLDER}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        write(dir, name, text.as_bytes());
    }
    let minimal = format!(
        "[interface]\nprivate_key_file = \"{KEY_PLACEHOLDER}\"\naddress = \"100.96.0.1/32\"\n\n\
         [[peers]]\nname = \"b\"\npublic_key = \"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\"\n\
         endpoint = \"[2001:db8::7]:51820\"\nallowed_ips = [\"100.96.0.2/32\", \"fd00:20::/48\"]\n"
    );
    write(dir, "minimal-v6", minimal.as_bytes());
}

fn controller_configs(dir: &Path, configs: &Path) {
    let text =
        std::fs::read_to_string(configs.join("controller.example.toml")).expect("example config");
    write(dir, "controller.example.toml", text.as_bytes());
    // The commented-out [ai_gateway] example, switched on.
    if let (Some(start), Some(end)) = (
        text.find("# --- ai_gateway example ---"),
        text.find("# --- end ai_gateway example ---"),
    ) {
        let block: String = text[start..end]
            .lines()
            .skip(1)
            .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
            .collect::<Vec<_>>()
            .join("\n");
        let full = format!("[control]\nadvertise = [\"203.0.113.2:7443\"]\n{block}\n");
        write(dir, "ai_gateway", full.as_bytes());
    }
    write(
        dir,
        "minimal",
        b"[control]\nadvertise = [\"controller.example.com:7443\"]\n[network]\noverlay_pool = \"fd00:100::/40\"\n",
    );
}

/// An IPv4 packet with a valid header checksum.
fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = ttl;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let sum = internet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..].copy_from_slice(payload);
    p
}

fn ipv6(src: &str, dst: &str, hops: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 17;
    p[7] = hops;
    let a: std::net::Ipv6Addr = src.parse().expect("ip");
    let b: std::net::Ipv6Addr = dst.parse().expect("ip");
    p[8..24].copy_from_slice(&a.octets());
    p[24..40].copy_from_slice(&b.octets());
    p[40..].copy_from_slice(payload);
    p
}

fn probe(src: Ipv4Addr, dst: Ipv4Addr, down: Vec<Ipv4Addr>) -> Vec<u8> {
    let probe = Probe {
        seq: 7,
        echo: Some((6, Duration::from_micros(250))),
        rx_count: 7,
        down,
    };
    let mut buf = vec![0u8; 20 + 12 + 4 * 64];
    let len = probe.encode(src, dst, &mut buf);
    buf.truncate(len);
    buf
}

fn packets(dir: &Path) {
    write(
        dir,
        "udp4",
        &ipv4(
            [10, 2, 0, 5],
            [10, 0, 0, 7],
            17,
            64,
            b"\x04\xd2\x16\x2e\x00\x0chello",
        ),
    );
    let mut options = ipv4([10, 2, 0, 5], [10, 0, 0, 7], 6, 2, b"tcp");
    options[0] = 0x46;
    write(dir, "ipv4-ttl2", &options);
    write(dir, "udp6", &ipv6("fd00:2::5", "fd00:3::7", 64, b"hello"));
    write(
        dir,
        "probe",
        &probe(
            Ipv4Addr::new(100, 96, 0, 2),
            NODE_ADDR,
            vec![Ipv4Addr::new(100, 96, 0, 3)],
        ),
    );
}

/// Steps of node inputs: op byte then bytes (see `Mesh::step`).
fn step(op: u8, bytes: &[u8]) -> Vec<u8> {
    let mut s = vec![op];
    s.extend_from_slice(bytes);
    s
}

fn node(inner_dir: &Path, datagram_dir: &Path) {
    let b = [10, 2, 0, 5];
    let c = [10, 3, 0, 9];
    let local = [10, 0, 0, 7];
    let b_to_local = ipv4(b, local, 17, 64, b"from b");
    let b_to_c = ipv4(b, c, 17, 64, b"b to c via the transit");
    let c_to_b = ipv4(c, b, 17, 1, b"ttl 1");
    let spoofed = ipv4(c, local, 17, 64, b"b says it is c");
    let v6 = ipv6("fd00:2::5", "fd00:3::9", 64, b"v6 b to c");
    let b_probe = probe(Ipv4Addr::new(100, 96, 0, 2), NODE_ADDR, vec![]);
    let tun_to_c = ipv4(local, c, 17, 64, b"from the node's VPC");

    let mut seeds: Vec<(&str, Setup, Vec<Vec<u8>>)> = Vec::new();
    let plain = Setup::from_byte(0);
    let hub = Setup {
        transit: true,
        path: [0, 1],
    };
    seeds.push((
        "local",
        plain,
        vec![step(0, &b_to_local), step(1, &ipv4(c, local, 17, 64, b"c"))],
    ));
    seeds.push((
        "transit",
        hub,
        vec![step(0, &b_to_c), step(1, &c_to_b), step(0, &v6)],
    ));
    seeds.push(("spoof", hub, vec![step(0, &spoofed), step(1, &spoofed)]));
    seeds.push((
        "probe-and-time",
        hub,
        vec![step(0, &b_probe), step(3 + 5 * 10, &[]), step(0, &b_probe)],
    ));
    seeds.push((
        "from-tun",
        hub,
        vec![
            step(2, &tun_to_c),
            step(2, &ipv6("fd00::1", "fd00:2::1", 64, b"x")),
        ],
    ));
    for (name, setup, steps) in &seeds {
        let mut data = vec![setup.to_byte()];
        data.extend(join_chunks(steps.iter().map(Vec::as_slice)));
        write(inner_dir, name, &data);
    }

    // Raw datagrams: real handshake and data messages of another session
    // (the right receiver index, a key the node no longer has), and garbage.
    let mut mesh = Mesh::new(hub);
    mesh.establish();
    mesh.peer_sends(0, &b_to_c);
    mesh.peer_sends(1, &c_to_b);
    let mut steps: Vec<Vec<u8>> = mesh
        .wire_log
        .iter()
        .enumerate()
        .map(|(n, d)| step(n as u8 % 4, d))
        .collect();
    steps.push(step(2, &[1, 0, 0, 0]));
    steps.push(step(3, &[4; 48]));
    let mut data = vec![hub.to_byte()];
    data.extend(join_chunks(steps.iter().map(Vec::as_slice)));
    write(datagram_dir, "captured", &data);
}

fn gateway(dir: &Path) {
    let seeds: [(&str, &[u8]); 6] = [
        ("chat", b"/v1/chat/completions\n{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}"),
        ("escaped", b"/openai/deployments/gpt%2D4o/chat%7Bx%7D\n{\"messages\":[],\"model\":\"qwen-plus\",\"n\":1.5,\"stop\":null}"),
        ("dup-key", b"/v1/embeddings\n{\"model\":\"a\",\"input\":\"x\",\"model\":\"b\"}"),
        ("traversal", b"/v1/..;/admin/%2e%2e/%252e\n {\"Model\":\"x\",\"model\":\"y\"}"),
        ("nested", b"/v1/responses/\n{\"input\":[{\"a\":{\"model\":1}}],\"model\":\"\\u0067pt\"}"),
        ("empty", b"/\n"),
    ];
    for (name, bytes) in seeds {
        write(dir, name, bytes);
    }
}
