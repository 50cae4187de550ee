//! A temporary project directory with its own state dir, the real binary, and
//! a daemon (the real binary, or `millrace::daemon::serve` in this process).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    }

    /// `millrace --state <tmp>/.state ARGS…`, run in the project directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_millrace"));
        c.current_dir(self.dir.path())
            .arg("--state")
            .arg(self.path(".state"))
            .args(args);
        c.env_remove("MILLRACE_STATE");
        // One compile of the Python runtime for all tests (scripts/test.sh prepares it).
        c.env("MILLRACE_CACHE", shared_cache());
        c
    }

    /// Runs to completion, killing the process (and failing the test) after two
    /// minutes: a hung run must fail CI, not stall it.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_within(args, 120)
    }

    /// As `run`, with another limit in seconds.
    pub fn run_within(&self, args: &[&str], secs: u64) -> Output {
        let mut child = self
            .cmd(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run millrace");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        // Drain the pipes on threads so a chatty child cannot block on a full pipe.
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut v).ok();
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut stderr, &mut v).ok();
            v
        });
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("millrace {args:?} did not finish within {secs} s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        Output {
            status,
            stdout: out.join().expect("stdout"),
            stderr: err.join().expect("stderr"),
        }
    }

    /// Runs and parses stdout as JSON (`--json` is added).
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: stdout={} stderr={}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// Absolute path of a built example plugin.
pub fn plugin(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-plugins.sh first",
        p.display()
    );
    p.canonicalize().expect("canonical").display().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `check` every 50 ms until it gives `Ok`, and fails the test with its
/// last `Err` (what the state was) after `secs` seconds.
pub fn eventually<T>(secs: u64, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > deadline => panic!("after {secs} s: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// The error recorded for `step` of the latest run ("" when none).
pub fn step_error(p: &Project, step: &str) -> String {
    let v = p.json(&["runs", "show", "latest"]);
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == step)
        .map(|s| s["error"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The log of `step` in the latest run.
pub fn step_log(p: &Project, step: &str) -> String {
    String::from_utf8_lossy(&p.run(&["logs", "latest", step]).stdout).into_owned()
}

/// Step name → status of a run, from `runs show --json`.
pub fn step_statuses(p: &Project, run: &str) -> Vec<(String, String)> {
    let v = p.json(&["runs", "show", run]);
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until step `step` of the latest run is running (a minute at most).
pub fn wait_until_running(p: &Project, step: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        // The database exists a moment before the run's row: until then `runs show
        // latest` says "there are no runs yet" (exit 2), which is not JSON.
        let out = p
            .path(".state/millrace.db")
            .exists()
            .then(|| p.run(&["--json", "runs", "show", "latest"]));
        if let Some(out) = out.filter(|o| o.status.success()) {
            let show: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let running = show["steps"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|s| s["name"] == step && s["status"] == "running")
            });
            if running {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "step `{step}` never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The precompile cache the tests share (`scripts/test.sh` fills it first).
pub fn shared_cache() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("millrace-cache")
}

/// Every blob of the store still hashes to its name (an attack changed no
/// stored content); the store must hold some.
pub fn rehash_store(p: &Project) {
    let blobs = p.path(".state/objects/blobs");
    let Ok(shards) = std::fs::read_dir(&blobs) else {
        return;
    };
    let mut n = 0;
    for shard in shards {
        let shard = shard.unwrap().path();
        for f in std::fs::read_dir(&shard).unwrap() {
            let f = f.unwrap().path();
            let name = format!(
                "{}{}",
                shard.file_name().unwrap().to_str().unwrap(),
                f.file_name().unwrap().to_str().unwrap()
            );
            let got = blake3::hash(&std::fs::read(&f).unwrap())
                .to_hex()
                .to_string();
            assert_eq!(got, name, "blob {} changed", f.display());
            n += 1;
        }
    }
    assert!(n > 0, "the store holds blobs");
}

/// The config `Daemon::start` uses unless the test wrote its own: pipelines in
/// `pipelines/`, state in `.state/`, two step slots, a 2 s grace, port 0.
pub(crate) fn config(p: &Project, extra: &str) -> PathBuf {
    p.write(
        "millrace.toml",
        &format!(
            "pipelines = \"pipelines\"\nstate_dir = \".state\"\nmax_parallel_steps = 2\nshutdown_grace = \"2s\"\n{extra}\n[api]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
}

/// A daemon on a project's `millrace.toml`: either the real binary
/// ([`Daemon::start`], for real signals, `kill -9` and the environment
/// variables the daemon reads), or `millrace::daemon::serve` on a runtime of
/// this process ([`Daemon::in_process`]), stopped through a oneshot.
pub(crate) struct Daemon {
    how: How,
    url: String,
    token: String,
    log: PathBuf,
}

enum How {
    Process(Option<Child>),
    InProcess(Option<InProcess>),
}

struct InProcess {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Daemon {
    /// `millrace daemon --config millrace.toml` as a child process.
    pub(crate) fn start(p: &Project) -> Daemon {
        let (config, log) = Self::prepare(p);
        let child = Command::new(env!("CARGO_BIN_EXE_millrace"))
            .current_dir(p.dir.path())
            .args(["daemon", "--config"])
            .arg(&config)
            .env("MILLRACE_LOG", "info")
            // One compile of the Python runtime (and of each plugin) for all tests.
            .env("MILLRACE_CACHE", shared_cache())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the daemon");
        Self::ready(p, How::Process(Some(child)), log)
    }

    /// `millrace::daemon::serve` on its own multi-threaded runtime in this
    /// process, on 127.0.0.1:0, its log (level info) in `daemon-N.log`. It
    /// shares this process's environment and working directory, so a test
    /// that needs either set for the daemon uses [`Daemon::start`].
    pub(crate) fn in_process(p: &Project) -> Daemon {
        let (config, log) = Self::prepare(p);
        let (loaded, report) = millrace::config::load(&config).expect("read the config");
        let config = loaded.unwrap_or_else(|| panic!("{report}"));
        let writer = std::sync::Mutex::new(std::fs::File::create(&log).unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            // The daemon's log goes to its file from every thread of its runtime
            // (workers and blocking threads), and from no other test's.
            let logs = tracing::Dispatch::new(
                tracing_subscriber::fmt()
                    .with_writer(writer)
                    .with_ansi(false)
                    .with_max_level(tracing::Level::INFO)
                    .finish(),
            );
            let on_start = logs.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start(move || {
                    // For the thread's lifetime: it belongs to this runtime.
                    std::mem::forget(tracing::dispatcher::set_default(&on_start));
                })
                .build()
                .map_err(|e| e.to_string())?;
            let _logs = tracing::dispatcher::set_default(&logs);
            let result = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| e.to_string())?;
                let shutdown = async move {
                    // A dropped sender (the test panicked) stops it too.
                    let _ = stopped.await;
                };
                millrace::daemon::serve(config, listener, millrace::daemon::signal::until(shutdown))
                    .await
                    .map_err(|e| format!("{e:#}"))
            });
            // As `millrace daemon` does: a step's blocking thread (a compile, a
            // hash) may outlive the daemon by a little, not by forever.
            runtime.shutdown_timeout(Duration::from_secs(2));
            result
        });
        let how = How::InProcess(Some(InProcess { stop, thread }));
        Self::ready(p, how, log)
    }

    /// The config (written if the test did not), the pipelines directory and
    /// the next free `daemon-N.log`.
    fn prepare(p: &Project) -> (PathBuf, PathBuf) {
        let config = p.path("millrace.toml");
        if !config.exists() {
            self::config(p, "");
        }
        std::fs::create_dir_all(p.path("pipelines")).unwrap();
        let _ = std::fs::remove_file(p.path(".state/daemon.json"));
        let n = std::fs::read_dir(p.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("daemon-"))
            })
            .count();
        (config, p.path(&format!("daemon-{n}.log")))
    }

    /// Waits for `<state>/daemon.json`, which the daemon writes once it serves.
    fn ready(p: &Project, how: How, log: PathBuf) -> Daemon {
        let mut d = Daemon {
            how,
            url: String::new(),
            token: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        d.url = loop {
            if let Some(url) = std::fs::read_to_string(p.path(".state/daemon.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["url"].as_str().map(str::to_string))
            {
                break url;
            }
            if let How::InProcess(Some(i)) = &d.how
                && i.thread.is_finished()
            {
                let How::InProcess(Some(i)) = std::mem::replace(&mut d.how, How::InProcess(None))
                else {
                    unreachable!()
                };
                panic!("the daemon did not start: {:?}", i.thread.join());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not start: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        d.token = std::fs::read_to_string(p.path(".state/api-token"))
            .unwrap()
            .trim()
            .to_string();
        d
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    pub(crate) fn agent() -> ureq::Agent {
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .timeout_global(Some(Duration::from_secs(30)))
                .build(),
        )
    }

    pub(crate) fn get(&self, path: &str) -> Value {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.url))
            .call()
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.body_mut().read_json().unwrap()
    }

    /// POST with the token (or `token` if given); (status, body).
    pub(crate) fn post(&self, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
        let mut req = Self::agent().post(format!("{}{path}", self.url));
        let t = token.unwrap_or(&self.token);
        if !t.is_empty() {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut r = req.send_json(body).unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub(crate) fn trigger(&self, pipeline: &str) -> i64 {
        let (status, v) = self.post(
            &format!("/api/v1/pipelines/{pipeline}/runs"),
            serde_json::json!({}),
            None,
        );
        assert_eq!(status, 202, "{v}");
        v["run_id"].as_i64().unwrap()
    }

    pub(crate) fn runs(&self, pipeline: &str) -> Vec<Value> {
        let v = self.get(&format!("/api/v1/runs?pipeline={pipeline}&limit=1000"));
        let mut runs = v["runs"].as_array().unwrap().clone();
        runs.reverse();
        runs
    }

    /// Waits until `pred` holds for the run (a minute at most).
    pub(crate) fn wait_run(&self, id: i64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(60, || {
            let r = self.get(&format!("/api/v1/runs/{id}"));
            if pred(&r) {
                return Ok(r);
            }
            Err(format!("run {id} never {what}: {r}\n{}", self.log_text()))
        })
    }

    pub(crate) fn wait_status(&self, id: i64, status: &str) -> Value {
        self.wait_run(id, status, |r| r["status"] == status)
    }

    /// `counters` of `GET /api/v1/status`: what the daemon has done so far.
    pub(crate) fn counters(&self) -> Value {
        self.get("/api/v1/status")["counters"].clone()
    }

    /// The counts of each of `pipeline`'s cron and watch triggers, in the order
    /// of their identities (`cron EXPR ZONE`, `watch GLOB`).
    pub(crate) fn trigger_counts(&self, pipeline: &str) -> Vec<Value> {
        self.counters()["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["pipeline"] == pipeline)
            .cloned()
            .collect()
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn child(&self) -> &Child {
        match &self.how {
            How::Process(Some(c)) => c,
            _ => panic!("only a daemon started as a process has a pid"),
        }
    }

    /// Sends `sig` to the daemon's process (`Daemon::start` only).
    pub(crate) fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child().id() as i32, sig);
        }
    }

    /// Stops it (SIGTERM for a process, the oneshot in process) and waits for
    /// the end; returns its exit code (in process: 0 if `serve` returned Ok).
    pub(crate) fn stop(mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        match std::mem::replace(&mut self.how, How::Process(None)) {
            How::Process(Some(mut child)) => {
                // SAFETY: kill(2) on our own child's pid.
                unsafe {
                    libc::kill(child.id() as i32, libc::SIGTERM);
                }
                loop {
                    if let Some(s) = child.try_wait().unwrap() {
                        return s.code().unwrap_or(-1);
                    }
                    assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            How::InProcess(Some(i)) => {
                let _ = i.stop.send(());
                while !i.thread.is_finished() {
                    assert!(Instant::now() < deadline, "the daemon did not stop");
                    std::thread::sleep(Duration::from_millis(20));
                }
                match i.thread.join() {
                    Ok(Ok(())) => 0,
                    Ok(Err(e)) => {
                        eprintln!("the daemon failed: {e}");
                        1
                    }
                    Err(_) => panic!("the daemon's thread panicked"),
                }
            }
            _ => unreachable!("a daemon is stopped once"),
        }
    }

    /// SIGKILL and wait (`Daemon::start` only).
    pub(crate) fn kill9(mut self) {
        let How::Process(Some(mut child)) = std::mem::replace(&mut self.how, How::Process(None))
        else {
            panic!("only a daemon started as a process can be killed");
        };
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.how, How::Process(None)) {
            How::Process(Some(mut c)) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            // A failed test: stop it, but do not wait for its grace period.
            How::InProcess(Some(i)) => drop(i.stop),
            _ => {}
        }
    }
}
