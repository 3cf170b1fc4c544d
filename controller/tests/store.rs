//! The state store as an operator meets it, through the real `skymesh-controller` binary and
//! real files: a store file that is empty, truncated, damaged or not a file stops the start
//! and is left as it is; `backup` copies a running controller's store and `restore` puts a
//! checked copy back; a full disk makes `/healthz` say so until space is freed, and the store
//! recovers without a restart; a flipped bit in a stored record is detected, reported with its
//! key, and the other records are still listed.

use redb::ReadableTable;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Each test runs controller processes; in parallel on a small machine they would only slow
/// each other down, and the full-disk test must not share its tmpfs.
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

    /// Runs `run` expecting it to refuse to start: its exit status and its stderr.
    fn start_refused(&mut self) -> (ExitStatus, String) {
        let start = self.spawn();
        let mut child = self.child.take().expect("child");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return (status, self.read_log(start));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the controller started on a store it should have refused:\n{}",
                    self.read_log(start)
                );
            }
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

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn read_log(&self, start: usize) -> String {
        std::fs::read_to_string(self.log(start)).unwrap_or_default()
    }

    /// A controller subcommand other than `run`: (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run skymesh-controller");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
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

    /// The CA fingerprint the latest start logged.
    fn ca_fingerprint(&self) -> String {
        let log = self.read_log(self.starts);
        let at = log
            .find("ca_fingerprint=")
            .expect("ca_fingerprint in the log");
        log[at + "ca_fingerprint=".len()..]
            .split_whitespace()
            .next()
            .expect("fingerprint")
            .to_owned()
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

// ---- point 4: unusable store files, backup and restore ----

#[test]
fn an_empty_truncated_or_damaged_store_file_stops_the_start_and_is_kept() {
    let _serial = serial();
    let (mut site, good) = written_store(&["t0", "t1", "t2"]);
    let len = good.len();
    let mut variants: Vec<(String, Vec<u8>)> = vec![("empty".into(), Vec::new())];
    for cut in [
        1,
        8,
        9,
        64,
        320,
        512,
        4096,
        4097,
        len / 2,
        len - 4096,
        len - 1,
    ] {
        variants.push((
            format!("truncated to {cut} of {len} bytes"),
            good[..cut].to_vec(),
        ));
    }
    let mut garbage = good.clone();
    for (i, b) in garbage.iter_mut().take(4096).enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    variants.push(("garbage header".into(), garbage));
    let mut magic = good.clone();
    magic[0] ^= 0x01;
    variants.push(("one bit of the magic flipped".into(), magic));
    let mut header = good.clone();
    for b in header.iter_mut().skip(9).take(128) {
        *b = 0xff;
    }
    variants.push(("header fields overwritten".into(), header));
    variants.push(("text file".into(), b"not a database\n".to_vec()));

    let store = site.store();
    for (what, bytes) in &variants {
        std::fs::write(&store, bytes).expect("write the variant");
        let (status, log) = site.start_refused();
        assert_eq!(
            status.code(),
            Some(1),
            "{what}: exit status {status}:\n{log}"
        );
        assert!(
            log.contains(&store.display().to_string())
                && log.contains("skymesh-controller restore"),
            "{what}: the error must name the file and the fix:\n{log}"
        );
        assert!(
            !log.contains("panicked"),
            "{what}: a panic, not an error:\n{log}"
        );
        assert_eq!(
            &std::fs::read(&store).expect("read back"),
            bytes,
            "{what}: the file was changed"
        );
    }

    std::fs::remove_file(&store).expect("remove");
    std::fs::create_dir(&store).expect("a directory at the store path");
    let (status, log) = site.start_refused();
    assert_eq!(status.code(), Some(1), "directory: {status}:\n{log}");
    assert!(
        log.contains("is a directory") && log.contains("skymesh-controller restore"),
        "directory:\n{log}"
    );
    std::fs::remove_dir(&store).expect("remove the directory");

    // Only a path where nothing exists is a new store, and only once the marker of the lost one
    // is removed on purpose.
    std::fs::remove_file(site.data.join("store.id")).expect("remove the marker");
    site.start();
    assert_eq!(site.token_names(), Vec::<String>::new());
    site.stop();
}

#[test]
fn backup_copies_a_running_controller_and_restore_puts_it_back() {
    let _serial = serial();
    let mut site = Site::new();
    site.start();
    let ca = site.ca_fingerprint();
    site.token("before-backup");
    let backup = site.dir.path().join("backup-1.redb");
    let (ok, out, err) = site.cli(&["backup", "--out", backup.to_str().expect("utf-8")]);
    assert!(ok, "backup while running: {out}{err}");
    assert!(out.contains("records at revision"), "{out}{err}");
    let mode = std::fs::metadata(&backup)
        .expect("backup")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the backup holds the CA key");
    // It refuses to overwrite a file.
    let (ok, _, err) = site.cli(&["backup", "--out", backup.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("exists"), "{err}");
    site.token("after-backup");

    // Refused while the controller runs, and nothing changes.
    let live = std::fs::read(site.store()).expect("store");
    let (ok, _, err) = site.cli(&["restore", "--from", backup.to_str().expect("utf-8")]);
    assert!(
        !ok && err.contains("in use"),
        "restore while running: {err}"
    );
    assert_eq!(std::fs::read(site.store()).expect("store"), live);
    site.stop();

    // The accident: an emptied store file.
    std::fs::write(site.store(), b"").expect("truncate");
    let (status, log) = site.start_refused();
    assert_eq!(status.code(), Some(1), "{log}");

    // A damaged backup is refused and the store is left as it is.
    let mut damaged = std::fs::read(&backup).expect("backup");
    let at = find(&damaged, b"before-backup").expect("the token in the backup");
    damaged[at] ^= 0x04;
    let damaged_path = site.dir.path().join("damaged.redb");
    std::fs::write(&damaged_path, &damaged).expect("write");
    let (ok, _, err) = site.cli(&["restore", "--from", damaged_path.to_str().expect("utf-8")]);
    assert!(
        !ok && err.contains("cannot be restored") && err.contains("damaged.redb"),
        "damaged backup: {err}"
    );
    let empty = site.dir.path().join("empty.redb");
    std::fs::write(&empty, b"").expect("write");
    let (ok, _, err) = site.cli(&["restore", "--from", empty.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("empty"), "empty backup: {err}");
    assert_eq!(std::fs::read(site.store()).expect("store"), b"");

    let (ok, out, err) = site.cli(&["restore", "--from", backup.to_str().expect("utf-8")]);
    assert!(ok, "restore: {out}{err}");
    let aside: Vec<PathBuf> = std::fs::read_dir(&site.data)
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains("before-restore"))
        .collect();
    assert_eq!(aside.len(), 1, "the replaced file is kept: {aside:?}");
    assert_eq!(std::fs::read(&aside[0]).expect("kept file"), b"");
    assert!(out.contains(&aside[0].display().to_string()), "{out}");

    site.start();
    assert_eq!(site.ca_fingerprint(), ca, "the same CA after the restore");
    assert_eq!(site.token_names(), vec!["before-backup".to_owned()]);
    site.stop();

    // A stopped controller's store is backed up from the file directly.
    let offline = site.dir.path().join("backup-2.redb");
    let (ok, out, err) = site.cli(&["backup", "--out", offline.to_str().expect("utf-8")]);
    assert!(ok, "backup while stopped: {out}{err}");
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

// ---- point 5: a full disk ----

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// A small tmpfs mounted on a temp dir, unmounted (lazily, so a failing test cannot leave it
/// busy) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount a tmpfs");
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Writes a ballast file until the file system is full.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).expect("ballast");
    let chunk = vec![0x5au8; 16 * 1024];
    let mut written = 0;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(_) => break,
        }
    }
    // Fill the last partial page too.
    while f.write(&[0u8]).is_ok_and(|n| n == 1) {
        written += 1;
    }
    written
}

#[test]
fn a_full_disk_shows_in_healthz_and_the_store_recovers_without_a_restart() {
    let _serial = serial();
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !in_ci(),
            "CI is set but not running as root: the full-disk test cannot run"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: not running as root (mounting a small tmpfs needs root)"
        );
        return;
    }
    let disk = Tmpfs::mount("4m");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = Site::with_data_dir(dir, disk.dir.path().join("data"));
    site.start();
    let pid = site.pid();
    site.token("before-full");
    let (code, _) = site.http("GET", "/healthz", None);
    assert_eq!(code, 200);

    let ballast = disk.dir.path().join("ballast");
    fill(&ballast);
    // redb may still have free pages inside its file: write until a write fails.
    let mut failed = None;
    for i in 0..500 {
        let (code, body) = site.create_token(&format!("while-full-{i}"));
        if code != 201 {
            failed = Some((code, body));
            break;
        }
    }
    let (code, body) = failed.expect("a write fails on a full disk");
    assert!(code >= 500, "{code} {body}");

    let (code, body) = site.http("GET", "/healthz", None);
    assert_eq!(code, 503, "healthz on a full disk: {body}");
    assert_eq!(body["error"], "store_not_writable", "{body}");
    let metrics = site.metrics();
    assert_eq!(
        metric(&metrics, "skymesh_controller_store_writable"),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "skymesh_controller_store_write_errors_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    // Reads still answer.
    assert!(site.token_names().contains(&"before-full".to_owned()));

    std::fs::remove_file(&ballast).expect("free the space");
    let deadline = Instant::now() + Duration::from_secs(20);
    let recovered = loop {
        let (code, _) = site.create_token("after-free");
        if code == 201 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        recovered,
        "writes work again once space is free:\n{}",
        site.read_log(1)
    );
    assert_eq!(site.pid(), pid, "no restart");
    let (code, body) = site.http("GET", "/healthz", None);
    assert_eq!(code, 200, "{body}");
    let metrics = site.metrics();
    assert_eq!(
        metric(&metrics, "skymesh_controller_store_writable"),
        Some(1.0),
        "{metrics}"
    );

    // And the store opens cleanly afterwards with everything that was acknowledged.
    site.stop();
    site.start();
    let names = site.token_names();
    assert!(names.contains(&"before-full".to_owned()) && names.contains(&"after-free".to_owned()));
    site.stop();
    let mut log = String::new();
    let _ = std::fs::File::open(site.log(1)).and_then(|mut f| f.read_to_string(&mut log));
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn healthz_recovers_by_itself_when_nothing_writes() {
    let _serial = serial();
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !in_ci(),
            "CI is set but not running as root: the full-disk test cannot run"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: not running as root (mounting a small tmpfs needs root)"
        );
        return;
    }
    let disk = Tmpfs::mount("4m");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = Site::with_data_dir(dir, disk.dir.path().join("data"));
    site.start();
    let ballast = disk.dir.path().join("ballast");
    fill(&ballast);
    let mut failed = false;
    for i in 0..500 {
        if site.create_token(&format!("while-full-{i}")).0 != 201 {
            failed = true;
            break;
        }
    }
    assert!(failed, "a write fails on a full disk");
    assert_eq!(site.http("GET", "/healthz", None).0, 503);
    std::fs::remove_file(&ballast).expect("free the space");
    // No write comes from clients: /healthz itself finds the store writable again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while site.http("GET", "/healthz", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "healthz stays 503 after space was freed"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    site.stop();
}

// ---- a store path that is a symlink ----

#[test]
fn a_dangling_symlink_at_the_store_or_data_dir_stops_the_start_and_is_kept() {
    let _serial = serial();
    let mut site = Site::new();
    std::fs::create_dir_all(&site.data).expect("data dir");
    let unmounted = site.dir.path().join("unmounted-disk/state.redb");
    let store = site.store();
    std::os::unix::fs::symlink(&unmounted, &store).expect("symlink");
    let (status, log) = site.start_refused();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&store.display().to_string())
            && log.contains(&unmounted.display().to_string())
            && log.contains("mount"),
        "the error names the link, its target and the fix:\n{log}"
    );
    assert_eq!(
        std::fs::read_link(&store).expect("still a symlink"),
        unmounted
    );
    assert!(!unmounted.exists(), "nothing created at the target");
    assert!(!log.contains("ca_fingerprint"), "no CA created:\n{log}");

    // The same for the data dir itself.
    std::fs::remove_file(&store).expect("remove the link");
    std::fs::remove_dir(&site.data).expect("remove the data dir");
    let unmounted_dir = site.dir.path().join("unmounted-disk/data");
    std::os::unix::fs::symlink(&unmounted_dir, &site.data).expect("symlink");
    let (status, log) = site.start_refused();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&site.data.display().to_string()) && log.contains("mount"),
        "data dir:\n{log}"
    );
    assert_eq!(
        std::fs::read_link(&site.data).expect("still a symlink"),
        unmounted_dir
    );

    // A symlink to a valid store is opened through: the disk is mounted.
    std::fs::remove_file(&site.data).expect("remove the link");
    let (mut real, _) = written_store(&["kept"]);
    std::fs::create_dir_all(&site.data).expect("data dir");
    std::os::unix::fs::symlink(real.store(), &store).expect("symlink");
    site.start();
    assert_eq!(site.token_names(), vec!["kept".to_owned()]);
    site.stop();
    real.stop();
}

// ---- the store file removed or replaced under a running controller ----

#[test]
fn a_store_file_removed_or_replaced_while_running_refuses_writes_and_the_next_start() {
    let _serial = serial();
    let mut site = Site::new();
    site.start();
    site.token("before");
    let store = site.store();

    // Replaced: another file now sits at the path.
    let copy = site.data.join("copy.redb");
    std::fs::copy(&store, &copy).expect("copy");
    let held = site.dir.path().join("held.redb");
    std::fs::rename(&store, &held).expect("move the store away");
    std::fs::rename(&copy, &store).expect("replace");
    let (code, body) = site.http("GET", "/healthz", None);
    assert_eq!(code, 503, "healthz with the store replaced: {body}");
    assert!(body.to_string().contains("replaced"), "{body}");
    let (code, body) = site.create_token("during-replace");
    assert!(
        code >= 500,
        "a write into the old file is refused: {code} {body}"
    );
    assert_eq!(
        metric(&site.metrics(), "skymesh_controller_store_writable"),
        Some(0.0)
    );

    // Removed: nothing at the path.
    std::fs::remove_file(&store).expect("remove");
    let (code, body) = site.http("GET", "/healthz", None);
    assert_eq!(code, 503, "healthz with the store removed: {body}");
    assert!(body.to_string().contains("removed"), "{body}");
    let (code, body) = site.create_token("during-remove");
    assert!(
        code >= 500,
        "a write into the unlinked file is refused: {code} {body}"
    );

    // Put back: the same file again, and writes resume.
    std::fs::rename(&held, &store).expect("put back");
    let (code, body) = site.http("GET", "/healthz", None);
    assert_eq!(code, 200, "healthz with the store back: {body}");
    site.token("after");
    site.stop();

    // The store is gone at the next start: refused, nothing created.
    std::fs::remove_file(&store).expect("remove");
    let (status, log) = site.start_refused();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("store.id") && log.contains("skymesh-controller restore"),
        "the error names the marker and the fix:\n{log}"
    );
    assert!(!store.exists(), "no new store was created");
    assert!(!log.contains("ca_fingerprint"), "no CA created:\n{log}");
}

// ---- backup and restore never touch the store's own files ----

#[test]
fn backup_and_restore_refuse_the_stores_own_files() {
    let _serial = serial();
    let (site, _) = written_store(&["t0"]);
    let good = site.dir.path().join("good.redb");
    let (ok, out, err) = site.cli(&["backup", "--out", good.to_str().expect("utf-8")]);
    assert!(ok, "backup while stopped: {out}{err}");
    let live = std::fs::read(site.store()).expect("store");
    assert_eq!(
        std::fs::read(site.store()).expect("store"),
        live,
        "a backup of a stopped store leaves the store file as it is"
    );

    // --out may not be a name the store uses for itself, however it is spelled.
    let data = site.data.display().to_string();
    for out in [
        format!("{data}/state.redb.restoring"),
        format!("{data}/state.redb.creating"),
        format!("{data}/./state.redb.creating"),
        format!("{data}/../data/state.redb.restoring"),
        format!("{data}/state.redb.anything"),
    ] {
        let (ok, _, err) = site.cli(&["backup", "--out", &out]);
        assert!(
            !ok && err.contains("--out") && err.contains("store"),
            "{out}: {err}"
        );
        assert!(!Path::new(&out).exists(), "{out} was written");
    }

    // restore --from a file that is the staging file, or the live store: refused, kept intact.
    let backup = std::fs::read(&good).expect("backup");
    let staging = site.data.join("state.redb.restoring");
    std::fs::write(&staging, &backup).expect("a backup under the staging name");
    let linked = site.dir.path().join("linked.redb");
    std::fs::hard_link(site.store(), &linked).expect("hard link to the store");
    for from in [staging.clone(), site.store(), linked] {
        let (ok, _, err) = site.cli(&["restore", "--from", from.to_str().expect("utf-8")]);
        assert!(!ok && err.contains("--from"), "{}: {err}", from.display());
    }
    assert_eq!(
        std::fs::read(&staging).expect("the staging-named backup is kept"),
        backup
    );
    assert_eq!(std::fs::read(site.store()).expect("store"), live);
}
