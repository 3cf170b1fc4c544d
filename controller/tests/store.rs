//! The state store as an operator meets it, through the real `skymesh-controller` binary and
//! real files: a flipped bit in a stored record is detected, reported with its key, and the
//! other records are still listed.

use redb::ReadableTable;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Each test runs controller processes; in parallel on a small machine they would only slow
/// each other down.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const ADMIN_TOKEN: &str = "store-test-admin-token-0123456789abcdef";
const BIN: &str = env!("CARGO_BIN_EXE_skymesh-controller");

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A controller's config, admin token and data dir in a temp dir; the process is started and
/// stopped as an operator would (`run`, SIGTERM).
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    data: PathBuf,
    api: SocketAddr,
    child: Option<Child>,
    starts: usize,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        Self::with_data_dir(dir, data)
    }

    fn with_data_dir(dir: tempfile::TempDir, data: PathBuf) -> Self {
        let api = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free TCP port");
        let token_file = dir.path().join("admin.token");
        std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).expect("admin token");
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod admin token");
        let config = dir.path().join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[control]\nlisten = \"127.0.0.1:0\"\nadvertise = [\"127.0.0.1:7443\"]\n\
                 [api]\nlisten = \"{api}\"\nadmin_token_file = {token_file:?}\n\
                 [state]\ndata_dir = {data:?}\n"
            ),
        )
        .expect("config");
        Site {
            dir,
            config,
            data,
            api,
            child: None,
            starts: 0,
        }
    }

    fn store(&self) -> PathBuf {
        self.data.join("state.redb")
    }

    fn log(&self, start: usize) -> PathBuf {
        self.dir.path().join(format!("controller-{start}.log"))
    }

    fn spawn(&mut self) -> usize {
        self.starts += 1;
        let log = std::fs::File::create(self.log(self.starts)).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn skymesh-controller");
        self.child = Some(child);
        self.starts
    }

    /// Starts the controller and waits until its API answers.
    fn start(&mut self) {
        let start = self.spawn();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the controller exited ({status}) at start:\n{}",
                    self.read_log(start)
                );
            }
            if std::net::TcpStream::connect(self.api).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "controller did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().expect("wait").is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.wait();
        }
    }

    fn read_log(&self, start: usize) -> String {
        std::fs::read_to_string(self.log(start)).unwrap_or_default()
    }

    /// An API call: status and body (JSON when it parses, else a string).
    fn http(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = ureq::request(method, &format!("http://{}{path}", self.api))
            .set("Authorization", &format!("Bearer {ADMIN_TOKEN}"))
            .timeout(Duration::from_secs(20));
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

    fn create_token(&self, name: &str) -> (u16, Value) {
        self.http(
            "POST",
            "/v1/join-tokens",
            Some(json!({"name": name, "site": "s1", "cloud": "aws", "region": "eu-west-1"})),
        )
    }

    /// Creates a token and returns its id.
    fn token(&self, name: &str) -> String {
        let (code, body) = self.create_token(name);
        assert_eq!(code, 201, "create token {name}: {body}");
        body["id"].as_str().expect("token id").to_owned()
    }

    /// Names of the listed tokens, sorted.
    fn token_names(&self) -> Vec<String> {
        let (code, body) = self.http("GET", "/v1/join-tokens", None);
        assert_eq!(code, 200, "list tokens: {body}");
        let mut names: Vec<String> = body
            .as_array()
            .expect("array")
            .iter()
            .map(|t| t["name"].as_str().expect("name").to_owned())
            .collect();
        names.sort();
        names
    }

    fn metrics(&self) -> String {
        let (code, body) = self.http("GET", "/metrics", None);
        assert_eq!(code, 200, "metrics: {body}");
        body.as_str().expect("metrics text").to_owned()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of an unlabelled metric line `name value`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A store written by a real controller: three tokens, then a clean stop. Returns the site
/// (stopped) and the file's bytes.
fn written_store(names: &[&str]) -> (Site, Vec<u8>) {
    let mut site = Site::new();
    site.start();
    for name in names {
        site.token(name);
    }
    site.stop();
    let bytes = std::fs::read(site.store()).expect("read the store");
    (site, bytes)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

// ---- point 6: record checksums ----

/// Lists tokens on the damaged store and checks the damage is reported with `key`.
fn check_detected(site: &mut Site, what: &str, key: &str, intact: &[&str]) {
    site.start();
    assert_eq!(
        site.token_names(),
        intact,
        "{what}: the intact tokens are listed"
    );
    let metrics = site.metrics();
    assert!(
        metrics.contains(&format!(
            "skymesh_controller_store_corrupt_record{{key=\"{key}\"}} 1"
        )),
        "{what}: the key is in the metrics:\n{metrics}"
    );
    assert!(
        metric(&metrics, "skymesh_controller_store_corrupt_records_total").unwrap_or(0.0) >= 1.0,
        "{what}:\n{metrics}"
    );
    site.stop();
    let log = site.read_log(site.starts);
    assert!(
        log.contains(key) && log.contains("corrupt"),
        "{what}: the key is in the log:\n{log}"
    );
}

#[test]
fn flipped_bits_in_stored_records_are_detected_and_listings_keep_the_others() {
    let _serial = serial();
    let names = ["keep-a", "victim-record-name", "keep-b", "keep-c"];
    let (mut site, good) = written_store(&names);
    let intact = ["keep-a", "keep-b", "keep-c"];
    let victim_key = {
        let db = redb::Database::open(site.store()).expect("open");
        let rtx = db.begin_read().expect("read");
        let kv = rtx.open_table(KV).expect("kv");
        let mut found = None;
        for entry in kv.iter().expect("iter") {
            let (key, value) = entry.expect("entry");
            if find(value.value(), b"victim-record-name").is_some() {
                found = Some(key.value().to_owned());
            }
        }
        found.expect("the victim's record")
    };

    // In the file: one bit of the victim's name, wherever redb has a copy of it.
    for bit in [0u8, 3, 7] {
        let mut bytes = good.clone();
        let hits = find_all(&bytes, b"victim-record-name");
        assert!(!hits.is_empty());
        for at in hits {
            bytes[at + 7] ^= 1 << bit;
        }
        std::fs::write(site.store(), &bytes).expect("write");
        check_detected(
            &mut site,
            &format!("file bit {bit} of the name"),
            &victim_key,
            &intact,
        );
    }

    // Through redb: one bit at several places of the stored record, from its first byte to its
    // last (envelope version, revisions, value, checksum).
    std::fs::write(site.store(), &good).expect("restore the good file");
    let record = raw_record(&site.store(), &victim_key);
    let positions = [
        0,
        1,
        8,
        9,
        16,
        17,
        record.len() / 2,
        record.len() - 5,
        record.len() - 1,
    ];
    for at in positions {
        for bit in [0u8, 5] {
            std::fs::write(site.store(), &good).expect("restore the good file");
            let mut flipped = record.clone();
            flipped[at] ^= 1 << bit;
            put_raw(&site.store(), &victim_key, &flipped);
            check_detected(
                &mut site,
                &format!("record byte {at} bit {bit}"),
                &victim_key,
                &intact,
            );
        }
    }

    // A bit flipped in the key: the record now sits under another key, which must not pass.
    std::fs::write(site.store(), &good).expect("restore the good file");
    let mut moved = victim_key.clone().into_bytes();
    let last = moved.len() - 1;
    moved[last] ^= 0x01;
    let moved = String::from_utf8(moved).expect("utf-8");
    {
        let db = redb::Database::open(site.store()).expect("open");
        let wtx = db.begin_write().expect("write");
        {
            let mut kv = wtx.open_table(KV).expect("kv");
            kv.remove(victim_key.as_str()).expect("remove");
            kv.insert(moved.as_str(), record.as_slice())
                .expect("insert");
        }
        wtx.commit().expect("commit");
    }
    check_detected(&mut site, "a bit of the key", &moved, &intact);
}

const KV: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("kv");

fn raw_record(store: &Path, key: &str) -> Vec<u8> {
    let db = redb::Database::open(store).expect("open");
    let rtx = db.begin_read().expect("read");
    let kv = rtx.open_table(KV).expect("kv");
    let record = kv
        .get(key)
        .expect("get")
        .expect("the record")
        .value()
        .to_vec();
    record
}

fn put_raw(store: &Path, key: &str, record: &[u8]) {
    let db = redb::Database::open(store).expect("open");
    let wtx = db.begin_write().expect("write");
    wtx.open_table(KV)
        .expect("kv")
        .insert(key, record)
        .expect("insert");
    wtx.commit().expect("commit");
}
