//! The REST API and `skymeshctl` against an in-process controller on loopback:
//! authentication on every route, the OpenAPI document in step with the routes,
//! the error shape, and every CLI command as an operator runs it.

use serde_json::{json, Value};
use skymesh_agent::control;
use skymesh_controller::api::ROUTES;
use skymesh_controller::config::Config;
use skymesh_controller::server::{self, Controller};
use skymesh_wire::control::Register;
use skymesh_wire::{JoinToken, PublicKey};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ctl: Controller,
    token: String,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().to_path_buf();
    let cfg = Config::parse(&format!(
        "[control]\nlisten = \"127.0.0.1:0\"\nadvertise = [\"127.0.0.1:7443\"]\n[api]\nlisten = \"127.0.0.1:0\"\nadmin_token_file = {:?}\n[state]\ndata_dir = {:?}\n",
        root.join("admin.token"),
        root.join("data")
    ))
    .expect("config");
    let ctl = server::start(&cfg).await.expect("start");
    let token = std::fs::read_to_string(root.join("admin.token"))
        .expect("generated admin token")
        .trim()
        .to_string();
    Fixture {
        _dir: dir,
        root,
        ctl,
        token,
    }
}

/// A raw HTTP call: status and JSON body.
fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = ureq::request(method, &format!("http://{base}{path}"));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let (code, r) = match resp {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(c, r)) => (c, r),
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let text = r.into_string().expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v)
}

struct Ctl<'a> {
    f: &'a Fixture,
}

impl Ctl<'_> {
    /// Runs skymeshctl with the env a user would set; (exit ok, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_skymeshctl"))
            .args(args)
            .env("SKYMESH_API", format!("http://{}", self.f.ctl.api_addr))
            .env("SKYMESH_TOKEN_FILE", self.f.root.join("admin.token"))
            .output()
            .expect("run skymeshctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "skymeshctl {args:?} failed: {err}");
        out
    }

    fn fails(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(!ok, "skymeshctl {args:?} should fail; printed {out}");
        err
    }
}

fn sample(method: &str, path: &str) -> (String, Option<Value>) {
    let path = path.replace("{name}", "nobody").replace("{id}", "jt-none");
    let body = match (method, path.as_str()) {
        ("POST", "/v1/join-tokens") => {
            Some(json!({"name": "x", "site": "x", "cloud": "aws", "region": "r"}))
        }
        ("POST", "/v1/ipam/check") => Some(json!({"cidr": "10.0.0.0/16"})),
        ("POST", "/v1/ipam/suggest") => Some(json!({"within": "10.0.0.0/8", "prefix_len": 16})),
        _ => None,
    };
    (path, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_the_bearer_token() {
    let f = start().await;
    let base = f.ctl.api_addr.to_string();
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(f.root.join("admin.token"))
            .expect("token file")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600, "the generated admin token is private");
    let b = base.clone();
    tokio::task::spawn_blocking(move || {
        for (method, path, _) in ROUTES {
            let (p, body) = sample(method, path);
            for token in [None, Some("wrong-token-wrong-token")] {
                let (code, v) = http(&b, method, &p, token, body.clone());
                assert_eq!(code, 401, "{method} {p} with {token:?}");
                assert_eq!(v["error"], "unauthorized");
                assert!(v["detail"].as_str().expect("detail").contains("Bearer"));
            }
        }
        // Unknown routes too: nothing is visible without the token.
        assert_eq!(http(&b, "GET", "/v2/secret", None, None).0, 401);
    })
    .await
    .expect("blocking");
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_routes() {
    let f = start().await;
    let base = f.ctl.api_addr.to_string();
    let tok = f.token.clone();
    tokio::task::spawn_blocking(move || {
        let (code, doc) = http(&base, "GET", "/v1/openapi.json", Some(&tok), None);
        assert_eq!(code, 200);
        assert_eq!(doc["openapi"], "3.0.3");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("ops").keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        documented.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(
            documented, routes,
            "the OpenAPI document lists exactly the routes"
        );
        // Every documented route is served: no "no such route" 404, no 405.
        for (method, path) in &routes {
            let (p, body) = sample(method, path);
            let (code, v) = http(&base, method, &p, Some(&tok), body);
            assert_ne!(code, 405, "{method} {path}");
            if code == 404 {
                assert_ne!(
                    v["detail"].as_str().unwrap_or(""),
                    "no such route; GET /v1/openapi.json lists them",
                    "{method} {path} is documented but not routed"
                );
            }
        }
        // And undocumented ones are not.
        let (code, v) = http(&base, "GET", "/v1/unknown", Some(&tok), None);
        assert_eq!((code, v["error"].as_str()), (404, Some("not_found")));
        let (code, v) = http(&base, "PATCH", "/v1/nodes", Some(&tok), None);
        assert_eq!(
            (code, v["error"].as_str()),
            (405, Some("method_not_allowed"))
        );
    })
    .await
    .expect("blocking");
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_value_and_fix() {
    let f = start().await;
    let base = f.ctl.api_addr.to_string();
    let tok = f.token.clone();
    tokio::task::spawn_blocking(move || {
        // 400: the body does not match the document; 422: it does, but its
        // values do not fit together.
        let cases = [
            (
                400,
                "POST",
                "/v1/ipam/check",
                json!({"cidr": "banana"}),
                "cidr: \"banana\" is not a CIDR prefix",
            ),
            (
                422,
                "POST",
                "/v1/ipam/check",
                json!({"cidr": "10.0.0.1/16"}),
                "did you mean 10.0.0.0/16",
            ),
            (
                422,
                "POST",
                "/v1/ipam/check",
                json!({"cidr": "10.0.0.300/16"}),
                "cidr = \"10.0.0.300/16\"",
            ),
            (
                400,
                "POST",
                "/v1/ipam/check",
                json!({"prefix": "10.0.0.0/16"}),
                "unknown field `prefix`",
            ),
            (
                422,
                "POST",
                "/v1/ipam/suggest",
                json!({"within": "10.0.0.0/16", "prefix_len": 8}),
                "/8",
            ),
            (
                400,
                "POST",
                "/v1/ipam/suggest",
                json!({"within": "10.0.0.0/16", "prefix_len": 129}),
                "prefix_len: 129 is out of range",
            ),
            (
                400,
                "POST",
                "/v1/ipam/suggest",
                json!({"within": "10.0.0.0/16", "prefix_len": -1}),
                "prefix_len: -1 is out of range",
            ),
            (
                400,
                "POST",
                "/v1/join-tokens",
                json!({"name": "Bad Name", "site": "a", "cloud": "aws", "region": "r"}),
                "name = \"Bad Name\"",
            ),
            (
                400,
                "POST",
                "/v1/join-tokens",
                json!({"name": "ok", "site": "a", "cloud": "aws", "region": "r", "ttl": "soon"}),
                "ttl: \"soon\" is not a lifetime",
            ),
        ];
        for (want, method, path, body, needle) in cases {
            let (code, v) = http(&base, method, path, Some(&tok), Some(body.clone()));
            assert_eq!(code, want, "{path} {body}: {v}");
            assert_eq!(v["error"], "invalid_request");
            let detail = v["detail"].as_str().expect("detail");
            assert!(detail.contains(needle), "{body}: {detail}");
        }
        let (code, v) = http(&base, "GET", "/v1/nodes/nobody", Some(&tok), None);
        assert_eq!(code, 404);
        assert_eq!(v["error"], "not_found");
    })
    .await
    .expect("blocking");
    f.ctl.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skymeshctl_drives_the_whole_lifecycle() {
    let f = start().await;
    let ctl = Ctl { f: &f };
    // A token, printed alone on stdout.
    let text = ctl.ok(&[
        "join-token",
        "create",
        "--name",
        "aws-gw",
        "--site",
        "aws",
        "--cloud",
        "aws",
        "--region",
        "us-west-2",
        "--ttl",
        "2h",
    ]);
    let token = JoinToken::decode(text.trim()).expect("a join token");
    assert_eq!(token.ca_sha256, f.ctl.ca_fingerprint);
    assert_eq!(token.controllers, ["127.0.0.1:7443"]);
    let list = ctl.ok(&["join-token", "list"]);
    assert!(list.contains(&token.id) && list.contains("valid"), "{list}");

    // Enroll over the real control channel (at the controller's real address).
    let mut t = token.clone();
    t.controllers = vec![f.ctl.control_addr.to_string()];
    let dir = f.root.join("agent");
    let identity = control::enroll(&t, &dir).await.expect("enroll");
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let session = tokio::spawn(control::run_session(
        identity,
        Register {
            public_key: PublicKey::from_bytes([7; 32]),
            listen_port: 51820,
            endpoints: vec!["203.0.113.10:51820".parse().expect("addr")],
            advertise: vec![
                "10.0.0.0/16".parse().expect("cidr"),
                "127.0.0.0/24".parse().expect("cidr"),
            ],
            underlay: vec![],
            agent_version: "test".into(),
            transit: false,
            capability: 0,
        },
        tx,
    ));
    // Wait until registered.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("netmap")
        {
            Some(control::ControlEvent::NetMap(_)) => break,
            Some(_) => continue,
            None => panic!("session ended"),
        }
    }

    let nodes = ctl.ok(&["nodes", "list"]);
    assert!(
        nodes.contains("aws-gw") && nodes.contains("online") && nodes.contains("10.0.0.0/16"),
        "{nodes}"
    );
    assert!(
        nodes.contains("127.0.0.0/24"),
        "refused prefix shown: {nodes}"
    );
    let show = ctl.ok(&["nodes", "show", "aws-gw"]);
    assert!(
        show.contains("REFUSED") && show.contains("loopback"),
        "{show}"
    );
    let j: Value =
        serde_json::from_str(&ctl.ok(&["--json", "nodes", "show", "aws-gw"])).expect("json");
    for field in [
        "name",
        "site",
        "cloud",
        "region",
        "overlay_ip",
        "public_key",
        "endpoints",
        "prefixes",
        "rejected_prefixes",
        "online",
        "last_seen",
    ] {
        assert!(j.get(field).is_some(), "node JSON lacks {field}: {j}");
    }
    assert_eq!(j["online"], true);
    assert_eq!(j["public_key"], PublicKey::from_bytes([7; 32]).to_string());

    let prefixes = ctl.ok(&["prefixes", "list"]);
    assert!(
        prefixes.contains("accepted") && prefixes.contains("rejected"),
        "{prefixes}"
    );

    let check = ctl.ok(&["ipam", "check", "10.0.128.0/17"]);
    assert!(
        check.contains("1 conflict") && check.contains("aws-gw"),
        "{check}"
    );
    let free = ctl.ok(&["ipam", "check", "10.1.0.0/16"]);
    assert!(free.contains("free"), "{free}");
    let suggest = ctl.ok(&[
        "ipam",
        "suggest",
        "--within",
        "10.0.0.0/8",
        "--prefix-len",
        "16",
    ]);
    assert_eq!(suggest.trim(), "10.1.0.0/16");

    // Refused calls exit non-zero with the API's error and detail.
    let err = ctl.fails(&["nodes", "show", "nobody"]);
    assert!(err.contains("not_found") && err.contains("nobody"), "{err}");
    let err = ctl.fails(&[
        "ipam",
        "suggest",
        "--within",
        "10.0.0.0/16",
        "--prefix-len",
        "8",
    ]);
    assert!(err.contains("invalid_request"), "{err}");
    let (ok, _, err) = Command::new(env!("CARGO_BIN_EXE_skymeshctl"))
        .args(["nodes", "list"])
        .env("SKYMESH_API", format!("http://{}", f.ctl.api_addr))
        .env("SKYMESH_TOKEN_FILE", "/nonexistent/token")
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .expect("run");
    assert!(!ok && err.contains("SKYMESH_TOKEN_FILE"), "{err}");

    // Revoke the node and the token.
    ctl.ok(&["nodes", "revoke", "aws-gw"]);
    let err = ctl.fails(&["nodes", "show", "aws-gw"]);
    assert!(err.contains("not_found"), "{err}");
    let res = tokio::time::timeout(Duration::from_secs(5), session)
        .await
        .expect("session ends")
        .expect("join");
    assert!(res.is_err(), "the revoked agent's session is refused");
    ctl.ok(&["join-token", "revoke", &token.id]);
    let list: Value =
        serde_json::from_str(&ctl.ok(&["--json", "join-token", "list"])).expect("json");
    assert_eq!(list[0]["state"], "revoked");

    // Metrics come with the token and are Prometheus text.
    let base = f.ctl.api_addr.to_string();
    let tok = f.token.clone();
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://{base}/metrics"))
            .set("Authorization", &format!("Bearer {tok}"))
            .call()
            .expect("metrics")
            .into_string()
            .expect("text")
    })
    .await
    .expect("blocking");
    assert!(
        text.contains("skymesh_controller_enrollments_total{result=\"ok\"} 1"),
        "{text}"
    );
    f.ctl.shutdown().await;
}

/// Every way to give a join token an out-of-range lifetime is a 400 that names
/// the field, the value and the allowed range; the bounds themselves pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_ttl_out_of_range_is_refused() {
    let f = start().await;
    let base = f.ctl.api_addr.to_string();
    let tok = f.token.clone();
    tokio::task::spawn_blocking(move || {
        let body = |ttl: Value| {
            json!({"name": "gw", "site": "a", "cloud": "aws", "region": "r", "ttl": ttl})
        };
        let refused = [
            json!("0s"),
            json!("0"),
            json!("-1s"),
            json!("-5"),
            json!("1.5h"),
            json!("18446744073709551616s"),
            json!("18446744073709551615s"),
            json!("8000y"),
            json!("366d"),
            json!("31536001s"),
            json!("8761h"),
            json!(""),
            json!(0),
            json!(-1),
            json!(1.5),
            json!(18446744073709551615u64),
        ];
        for ttl in refused {
            let (code, v) = http(&base, "POST", "/v1/join-tokens", Some(&tok), Some(body(ttl.clone())));
            assert_eq!(code, 400, "ttl {ttl} must be refused: {v}");
            assert_eq!(v["error"], "invalid_request", "{v}");
            let detail = v["detail"].as_str().expect("detail");
            assert!(detail.contains("ttl"), "names the field: {detail}");
            assert!(detail.contains("365d"), "names the allowed range: {detail}");
            if let Some(text) = ttl.as_str().filter(|t| !t.is_empty()) {
                assert!(detail.contains(text), "names the value: {detail}");
            }
        }
        for (ttl, secs) in [("1s", 1), ("365d", 31_536_000), ("31536000s", 31_536_000), ("8760h", 31_536_000)] {
            let (code, v) = http(&base, "POST", "/v1/join-tokens", Some(&tok), Some(body(json!(ttl))));
            assert_eq!(code, 201, "ttl {ttl}: {v}");
            let created = v["created_at"].as_u64().expect("created_at");
            assert_eq!(v["expires_at"].as_u64(), Some(created + secs), "{ttl}: {v}");
        }
        let (code, v) = http(&base, "POST", "/v1/join-tokens", Some(&tok), Some(body(json!("never"))));
        assert_eq!((code, &v["expires_at"]), (201, &Value::Null), "{v}");
    })
    .await
    .expect("blocking");

    // skymeshctl refuses before sending, naming the flag: no token is created.
    let ctl = Ctl { f: &f };
    let before: Value =
        serde_json::from_str(&ctl.ok(&["--json", "join-token", "list"])).expect("json");
    for ttl in ["8000y", "0s", "366d", "18446744073709551616s", "-1s"] {
        let (ok, out, err) = ctl.run(&[
            "join-token",
            "create",
            "--name",
            "gw",
            "--site",
            "a",
            "--cloud",
            "aws",
            "--region",
            "r",
            &format!("--ttl={ttl}"),
        ]);
        assert!(!ok, "--ttl {ttl} must be refused; printed {out}");
        assert!(!err.contains("panicked"), "--ttl {ttl}: {err}");
        assert!(
            err.contains("--ttl") && err.contains("365d"),
            "--ttl {ttl}: {err}"
        );
    }
    let after: Value =
        serde_json::from_str(&ctl.ok(&["--json", "join-token", "list"])).expect("json");
    assert_eq!(before, after, "a refused --ttl sends nothing");
    f.ctl.shutdown().await;
}

/// A store written by older versions may hold a token whose expiry is absurd
/// (up to u64::MAX seconds): listing it works and shows it sensibly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_list_survives_an_absurd_stored_expiry() {
    use skymesh_controller::store::records::{self, TokenRecord};
    let f = start().await;
    for (id, expires_at) in [
        ("jt-000000000001", u64::MAX),
        ("jt-000000000002", 254_255_800_000u64), // now + 8000 years
        ("jt-000000000003", 253_402_300_800u64), // 10000-01-01T00:00:00Z
        ("jt-000000000004", 253_402_300_799u64), // the last second of 9999
    ] {
        let rec = TokenRecord {
            id: id.into(),
            secret_sha256: "00".repeat(32),
            name: "old".into(),
            site: "a".into(),
            cloud: "aws".into(),
            region: "r".into(),
            created_at: 1_700_000_000,
            expires_at: Some(expires_at),
            reusable: false,
            revoked: id.ends_with('1'),
            used_by: vec![],
        };
        f.ctl
            .registry
            .store()
            .put(&records::token_key(id), records::encode(&rec))
            .await
            .expect("put");
    }
    let ctl = Ctl { f: &f };
    let (ok, out, err) = ctl.run(&["join-token", "list"]);
    assert!(ok && !err.contains("panicked"), "list: {err}");
    for id in ["jt-000000000001", "jt-000000000002", "jt-000000000003"] {
        let line = out
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id}: {out}"));
        assert!(line.contains("after 9999-12-31"), "{line}");
    }
    assert!(out.contains("9999-12-31T23:59:59Z"), "{out}");
    let list: Value =
        serde_json::from_str(&ctl.ok(&["--json", "join-token", "list"])).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(4), "{list}");
    // Revoking it still works, and so does listing afterwards.
    ctl.ok(&["join-token", "revoke", "jt-000000000002"]);
    assert!(ctl.ok(&["join-token", "list"]).contains("revoked"));
    f.ctl.shutdown().await;
}

/// Every (method, path) the router in src/api.rs serves, read from its source:
/// the router cannot be listed at run time, and a route added there without a
/// line in the document is what this test must catch.
fn routed_operations() -> Vec<(String, String)> {
    let src = include_str!("../src/api.rs");
    let mut out = Vec::new();
    for (i, _) in src.match_indices(".route(\"") {
        let rest = &src[i + ".route(\"".len()..];
        let path = &rest[..rest.find('"').expect("route path ends")];
        // The text of this `.route(...)` call, up to its closing parenthesis.
        let mut depth = 1;
        let mut end = 0;
        for (j, c) in src[i + ".route(".len()..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = j;
                break;
            }
        }
        let call = &src[i + ".route(".len()..i + ".route(".len() + end];
        for m in ["get", "post", "put", "delete", "patch", "head", "options"] {
            let routed = call.match_indices(&format!("{m}(")).any(|(k, _)| {
                k == 0
                    || !call.as_bytes()[k - 1].is_ascii_alphanumeric()
                        && call.as_bytes()[k - 1] != b'_'
            });
            if routed {
                out.push((m.to_uppercase(), path.to_string()));
            }
        }
    }
    out.sort();
    out
}

/// The document lists every routed operation with every status it can give
/// (auth, not found, the body rejections), and the server's rejections of bad
/// bodies are those documented statuses with the API's JSON error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_routed_operation_and_its_statuses() {
    let f = start().await;
    let base = f.ctl.api_addr.to_string();
    let tok = f.token.clone();
    tokio::task::spawn_blocking(move || {
        let routed = routed_operations();
        assert!(
            routed.len() >= 16,
            "the router's routes were read: {routed:?}"
        );
        let (code, doc) = http(&base, "GET", "/v1/openapi.json", Some(&tok), None);
        assert_eq!(code, 200);
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("ops").keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        documented.sort();
        assert_eq!(
            documented, routed,
            "the document lists exactly the routed operations"
        );
        let schemas = &doc["components"]["schemas"];
        let resolve = |s: &Value| -> Value {
            match s["$ref"].as_str() {
                Some(r) => schemas[r.trim_start_matches("#/components/schemas/")].clone(),
                None => s.clone(),
            }
        };
        for (method, path) in &routed {
            assert!(
                skymesh_controller::api::is_documented(method, path),
                "{method} {path} is routed but has no entry in api/openapi.rs"
            );
            let op = &doc["paths"][path][method.to_lowercase()];
            let statuses: Vec<&String> = op["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .collect();
            let has = |s: &str| statuses.iter().any(|x| *x == s);
            assert!(has("401") && has("503"), "{method} {path}: {statuses:?}");
            assert!(
                statuses.iter().any(|s| s.starts_with('2')),
                "{method} {path}: {statuses:?}"
            );
            for (status, resp) in op["responses"].as_object().expect("responses") {
                let content = resp["content"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{method} {path} {status}: no content"));
                for (media, m) in content {
                    assert!(
                        m["schema"].is_object(),
                        "{method} {path} {status} {media}: no schema"
                    );
                }
            }
            let params: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            if !params.is_empty() {
                assert!(has("404"), "{method} {path}: {statuses:?}");
                let names: Vec<&str> = op["parameters"]
                    .as_array()
                    .expect("parameters")
                    .iter()
                    .map(|p| p["name"].as_str().expect("name"))
                    .collect();
                assert_eq!(names, params, "{method} {path}");
            }
            if op.get("requestBody").is_some() {
                for s in ["400", "413", "415"] {
                    assert!(
                        has(s),
                        "{method} {path} takes a body but does not document {s}: {statuses:?}"
                    );
                }
                let body = resolve(&op["requestBody"]["content"]["application/json"]["schema"]);
                assert_eq!(
                    body["additionalProperties"], false,
                    "{method} {path}: {body}"
                );
                for (name, prop) in body["properties"].as_object().expect("properties") {
                    let ty = prop["type"].as_str().unwrap_or("");
                    if ty == "string" {
                        assert!(
                            prop.get("pattern").is_some() || prop.get("enum").is_some(),
                            "{method} {path} {name}: {prop}"
                        );
                        assert!(
                            prop.get("maxLength").is_some() || prop.get("enum").is_some(),
                            "{method} {path} {name}: {prop}"
                        );
                    }
                    if ty == "integer" || ty == "number" {
                        assert!(
                            prop.get("minimum").is_some() && prop.get("maximum").is_some(),
                            "{method} {path} {name}: {prop}"
                        );
                    }
                }
                // The server's rejections: each a documented status, each our error shape.
                let url = format!(
                    "http://{base}{}",
                    path.replace("{a}", "x").replace("{b}", "y")
                );
                let send = |ctype: &str, body: &str| {
                    let r = ureq::request(method, &url)
                        .set("Authorization", &format!("Bearer {tok}"))
                        .set("Content-Type", ctype)
                        .send_string(body);
                    let r = match r {
                        Ok(r) => r,
                        Err(ureq::Error::Status(_, r)) => r,
                        Err(e) => panic!("{method} {path}: {e}"),
                    };
                    let code = r.status();
                    let v: Value = serde_json::from_str(&r.into_string().expect("body"))
                        .unwrap_or(Value::Null);
                    (code, v)
                };
                // Just over the limit: far larger ones are cut off while being sent.
                let big = format!(
                    "{{\"x\": \"{}\"}}",
                    "a".repeat(skymesh_controller::api::MAX_BODY_BYTES)
                );
                for (ctype, body, want) in [
                    ("text/plain", "{}", 415),
                    ("application/json", "{", 400),
                    ("application/json", "[]", 400),
                    ("application/json", "{\"no_such_field\": 1}", 400),
                    ("application/json", big.as_str(), 413),
                ] {
                    let (code, v) = send(ctype, body);
                    assert_eq!(
                        code,
                        want,
                        "{method} {path} {ctype} {}: {v}",
                        &body[..body.len().min(40)]
                    );
                    assert!(
                        has(&code.to_string()),
                        "{method} {path}: {code} is not documented"
                    );
                    assert!(
                        v["error"].is_string() && v["detail"].is_string(),
                        "{method} {path} {code}: {v}"
                    );
                }
            }
        }
        // A path segment that is not UTF-8 once decoded: a documented 400, our shape.
        for (method, path) in [
            ("GET", "/v1/nodes/{name}"),
            ("DELETE", "/v1/join-tokens/{id}"),
        ] {
            let raw = path.replace("{name}", "%FF").replace("{id}", "%FF");
            let (code, v) = http(&base, method, &raw, Some(&tok), None);
            assert_eq!(
                (code, v["error"].as_str()),
                (400, Some("invalid_request")),
                "{raw}: {v}"
            );
            assert!(doc["paths"][path][method.to_lowercase()]["responses"]["400"].is_object());
        }
        // Without an AI gateway, its route answers a documented 404.
        let (code, v) = http(&base, "GET", "/v1/ai/upstreams", Some(&tok), None);
        assert_eq!((code, v["error"].as_str()), (404, Some("ai_gateway_off")));
        assert!(doc["paths"]["/v1/ai/upstreams"]["get"]["responses"]["404"].is_object());
    })
    .await
    .expect("blocking");
    f.ctl.shutdown().await;
}

/// skymeshctl checks every numeric flag with the API's own rule before sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skymeshctl_refuses_out_of_range_numbers_naming_the_flag() {
    let f = start().await;
    let ctl = Ctl { f: &f };
    for (args, flag, range) in [
        (
            vec![
                "ipam",
                "suggest",
                "--within",
                "10.0.0.0/8",
                "--prefix-len=200",
            ],
            "--prefix-len",
            "128",
        ),
        (
            vec![
                "ipam",
                "suggest",
                "--within",
                "10.0.0.0/8",
                "--prefix-len=-1",
            ],
            "--prefix-len",
            "128",
        ),
        (
            vec!["links", "set", "a", "b", "--weight-ms=1e12"],
            "--weight-ms",
            "3600000",
        ),
        (
            vec!["links", "set", "a", "b", "--weight-ms=-5"],
            "--weight-ms",
            "3600000",
        ),
    ] {
        let (ok, out, err) = ctl.run(&args);
        assert!(!ok, "{args:?} must be refused; printed {out}");
        assert!(
            err.contains(flag) && err.contains(range) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        ctl.ok(&[
            "ipam",
            "suggest",
            "--within",
            "10.0.0.0/8",
            "--prefix-len",
            "16"
        ])
        .trim(),
        "10.0.0.0/16"
    );
    f.ctl.shutdown().await;
}

/// A name is one path segment: `nodes show ../../healthz` asks for a node by that name, never
/// for another route; names the API cannot hold (`.`, `..`, empty) are refused naming the
/// argument; `--node` is one query value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skymeshctl_sends_each_argument_as_one_path_segment() {
    let f = start().await;
    let ctl = Ctl { f: &f };
    let created = ctl.ok(&[
        "--json",
        "join-token",
        "create",
        "--name",
        "victim",
        "--site",
        "s1",
        "--cloud",
        "aws",
        "--region",
        "eu-west-1",
    ]);
    let id = serde_json::from_str::<Value>(&created).expect("json")["id"]
        .as_str()
        .expect("token id")
        .to_owned();
    let err = ctl.fails(&["nodes", "show", "../../healthz"]);
    assert!(err.contains("404") || err.contains("not found"), "{err}");
    let err = ctl.fails(&["nodes", "revoke", &format!("../join-tokens/{id}")]);
    assert!(err.contains("404") || err.contains("not found"), "{err}");
    let err = ctl.fails(&["nodes", "revoke", "%2e%2e"]);
    assert!(err.contains("404") || err.contains("not found"), "{err}");
    for name in ["..", ".", ""] {
        let err = ctl.fails(&["nodes", "show", name]);
        assert!(
            err.contains("NAME") || err.contains("name"),
            "{name:?}: the refusal names the argument: {err}"
        );
    }
    let listed = ctl.ok(&["--json", "join-token", "list"]);
    assert!(listed.contains(&id), "the token was not revoked: {listed}");
    // --node goes as one query value: `&` and `=` in it add no parameter (that
    // would be a 400 naming `colour`), and an empty one is refused first.
    for what in ["paths", "links"] {
        let err = ctl.fails(&[what, "list", "--node", "x&colour=red"]);
        assert!(
            err.contains("404") && err.contains("x&colour=red"),
            "{what}: {err}"
        );
        let err = ctl.fails(&[what, "list", "--node", ""]);
        assert!(err.contains("--node"), "{what}: {err}");
    }
    f.ctl.shutdown().await;
}

/// The admin token file is read up to a bound: a huge file (or a device that never ends) is
/// refused naming the path and the limit, not read into memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skymeshctl_refuses_a_token_file_over_its_limit() {
    let f = start().await;
    let big = f.root.join("big.token");
    std::fs::write(&big, vec![b'a'; 200 * 1024]).expect("big token file");
    for file in [big.as_path(), Path::new("/dev/zero")] {
        let out = Command::new(env!("CARGO_BIN_EXE_skymeshctl"))
            .args(["nodes", "list"])
            .env("SKYMESH_API", format!("http://{}", f.ctl.api_addr))
            .env("SKYMESH_TOKEN_FILE", file)
            .output()
            .expect("run skymeshctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: accepted", file.display());
        assert!(
            err.contains(&file.display().to_string()) && err.contains("64 KiB"),
            "{}: the error names the file and the limit: {err}",
            file.display()
        );
    }
    f.ctl.shutdown().await;
}
