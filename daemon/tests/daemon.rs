//! The daemon as a real process: triggers, queueing, reload, crash recovery, the
//! API's token. Each test starts `millrace daemon` on a temporary state dir and
//! port 0, and finds it through `<state>/daemon.json`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use millrace::model::{RunStatus, StepStatus};
use serde_json::Value;

use crate::common::{Project, plugin};

pub(crate) struct Daemon {
    child: Option<Child>,
    url: String,
    token: String,
    log: PathBuf,
}

pub(crate) fn config(p: &Project, extra: &str) -> PathBuf {
    p.write(
        "millrace.toml",
        &format!(
            "pipelines = \"pipelines\"\nstate_dir = \".state\"\nmax_parallel_steps = 2\nshutdown_grace = \"2s\"\n{extra}\n[api]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
}

impl Daemon {
    pub(crate) fn start(p: &Project) -> Daemon {
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
        let log = p.path(&format!("daemon-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_millrace"))
            .current_dir(p.dir.path())
            .args(["daemon", "--config"])
            .arg(&config)
            .env("MILLRACE_LOG", "info")
            // One compile of the Python runtime (and of each plugin) for all tests.
            .env("MILLRACE_CACHE", crate::common::shared_cache())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the daemon");
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            if let Some(url) = std::fs::read_to_string(p.path(".state/daemon.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["url"].as_str().map(str::to_string))
            {
                break url;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let token = std::fs::read_to_string(p.path(".state/api-token"))
            .unwrap()
            .trim()
            .to_string();
        Daemon {
            child: Some(child),
            url,
            token,
            log,
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    fn agent() -> ureq::Agent {
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
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get(&format!("/api/v1/runs/{id}"));
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} never {what}: {r}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub(crate) fn wait_status(&self, id: i64, status: &str) -> Value {
        self.wait_run(id, status, |r| r["status"] == status)
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGTERM, then waits for the exit; returns its code.
    pub(crate) fn stop(mut self) -> i32 {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sleep_pipeline(p: &Project, name: &str, secs: f64, concurrency: &str) {
    let sleep = plugin("sleep");
    p.write(
        &format!("pipelines/{name}.toml"),
        &format!(
            r#"
name = "{name}"
concurrency = {concurrency}
[[step]]
name = "nap"
wasm = "{sleep}"
args = ["--secs", "{secs}"]
reuse = false
"#
        ),
    );
}

#[test]
fn a_cron_every_second_fires_each_second_without_duplicates() {
    let p = Project::new();
    let noop = plugin("noop");
    p.write(
        "pipelines/tick.toml",
        &format!(
            r#"
[params]
scheduled = ""
[[trigger]]
cron = "*/1 * * * * *"
[[step]]
name = "a"
wasm = "{noop}"
"#
        ),
    );
    let d = Daemon::start(&p);
    std::thread::sleep(Duration::from_millis(4500));
    let runs = d.runs("tick");
    assert_eq!(d.stop(), 0);
    assert!(
        (3..=6).contains(&runs.len()),
        "{} runs in 4.5 s: {runs:?}",
        runs.len()
    );
    let scheduled: Vec<i64> = runs
        .iter()
        .map(|r| {
            let s = r["trigger_detail"]["scheduled"].as_str().unwrap();
            assert_eq!(
                r["params"]["scheduled"], s,
                "the firing is a declared param"
            );
            chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp()
        })
        .collect();
    for w in scheduled.windows(2) {
        assert_eq!(
            w[1] - w[0],
            1,
            "consecutive seconds, none twice: {scheduled:?}"
        );
    }
}

#[test]
fn schedule_simulates_both_stockholm_dst_transitions() {
    let p = Project::new();
    let noop = plugin("noop");
    let f = p.write(
        "nightly.toml",
        &format!(
            r#"
[[trigger]]
cron = "30 2 * * *"
timezone = "Europe/Stockholm"
[[step]]
name = "a"
wasm = "{noop}"
"#
        ),
    );
    let f = f.to_str().unwrap();
    let spring = p.json(&[
        "schedule",
        f,
        "--simulate",
        "2026-03-28T00:00:00Z",
        "2026-03-31T00:00:00Z",
    ]);
    assert_eq!(
        spring[0]["firings"],
        serde_json::json!([
            "2026-03-28T02:30:00+01:00",
            "2026-03-29T03:00:00+02:00",
            "2026-03-30T02:30:00+02:00"
        ]),
        "02:30 does not exist on 29 March: it fires once, at 03:00"
    );
    let autumn = p.json(&[
        "schedule",
        f,
        "--simulate",
        "2026-10-24T00:00:00Z",
        "2026-10-27T00:00:00Z",
    ]);
    assert_eq!(
        autumn[0]["firings"],
        serde_json::json!([
            "2026-10-24T02:30:00+02:00",
            "2026-10-25T02:30:00+02:00",
            "2026-10-26T02:30:00+01:00"
        ]),
        "02:30 happens twice on 25 October: it fires once"
    );
    let text = p.run(&[
        "schedule",
        f,
        "--simulate",
        "2026-03-29T00:00:00Z",
        "2026-03-29T23:00:00Z",
    ]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("2026-03-29T03:00:00+02:00  (2026-03-29T01:00:00+00:00)"),
        "{text}"
    );
}

#[test]
fn catchup_policies_after_a_downtime() {
    let p = Project::new();
    let noop = plugin("noop");
    // An hourly schedule whose last firing was half an hour ago: after five hours
    // down, five firings were missed and none is on time.
    let now = chrono::Utc::now();
    let minute = (now - chrono::TimeDelta::minutes(30))
        .format("%M")
        .to_string()
        .parse::<u32>()
        .unwrap();
    let expr = format!("{minute} * * * *");
    for policy in ["none", "latest", "all", "coalesce"] {
        p.write(
            &format!("pipelines/{policy}.toml"),
            &format!(
                r#"
[params]
missed_count = 0
missed_from = ""
[[trigger]]
cron = "{expr}"
catchup = "{policy}"
[[step]]
name = "a"
wasm = "{noop}"
"#
            ),
        );
    }
    {
        let db = millrace::store::db::Db::open(&{
            std::fs::create_dir_all(p.path(".state")).unwrap();
            p.path(".state/millrace.db")
        })
        .unwrap();
        let down_since = (now - chrono::TimeDelta::minutes(5 * 60 + 1)).timestamp_millis();
        for policy in ["none", "latest", "all", "coalesce"] {
            db.read()
                .set_trigger_last_fired(policy, &format!("cron {expr} UTC"), down_since)
                .unwrap();
        }
    }
    let d = Daemon::start(&p);
    let expect = [("none", 0), ("latest", 1), ("all", 5), ("coalesce", 1)];
    let deadline = Instant::now() + Duration::from_secs(30);
    while expect.iter().any(|(n, want)| {
        d.runs(n)
            .iter()
            .filter(|r| r["status"] == "succeeded")
            .count()
            < *want
    }) {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    for (n, want) in expect {
        assert_eq!(d.runs(n).len(), want, "catchup = {n}");
    }
    let latest = &d.runs("latest")[0];
    assert_eq!(latest["params"]["missed_count"], 5);
    let co = &d.runs("coalesce")[0];
    assert_eq!(co["params"]["missed_count"], 5);
    let from = co["params"]["missed_from"].as_str().unwrap();
    let to = co["trigger_detail"]["missed_to"].as_str().unwrap();
    let span = chrono::DateTime::parse_from_rfc3339(to).unwrap()
        - chrono::DateTime::parse_from_rfc3339(from).unwrap();
    assert_eq!(span, chrono::TimeDelta::hours(4), "{from} .. {to}");
    let all: Vec<String> = d
        .runs("all")
        .iter()
        .map(|r| {
            r["trigger_detail"]["scheduled"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut sorted = all.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "each missed firing once: {all:?}");
    assert_eq!(d.stop(), 0);
    // A restart neither repeats nor invents firings.
    let d = Daemon::start(&p);
    std::thread::sleep(Duration::from_millis(1500));
    for (n, want) in expect {
        assert_eq!(d.runs(n).len(), want, "after a restart, catchup = {n}");
    }
}

fn watch_pipeline(p: &Project) {
    let copy = plugin("copy");
    p.write("pipelines/drop/.keep", "");
    p.write(
        "pipelines/ingest.toml",
        &format!(
            r#"
[params]
changed = ""
[inputs.drop]
path = "drop"
[[trigger]]
watch = "drop/*.csv"
debounce = "400ms"
[[step]]
name = "a"
wasm = "{copy}"
inputs = {{ d = "inputs.drop" }}
outputs = ["out"]
"#
        ),
    );
}

fn wait_runs(d: &Daemon, pipeline: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let runs = d.runs(pipeline);
        if runs.len() >= n && runs.iter().all(|r| r["status"] == "succeeded") {
            return runs;
        }
        assert!(Instant::now() < deadline, "{runs:?}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn a_file_still_being_written_fires_one_run_once_complete() {
    let p = Project::new();
    watch_pipeline(&p);
    let d = Daemon::start(&p);
    std::thread::sleep(Duration::from_millis(300));
    let path = p.path("pipelines/drop/big.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..15 {
        std::io::Write::write_all(&mut f, format!("{i},{}\n", "x".repeat(1000)).as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(f);
    let written = chrono::Utc::now().timestamp_millis();
    let runs = wait_runs(&d, "ingest", 1);
    std::thread::sleep(Duration::from_millis(1500));
    let runs_after = d.runs("ingest");
    assert_eq!(runs_after.len(), 1, "{runs_after:?}");
    assert!(runs[0]["created_at"].as_i64().unwrap() >= written);
    assert_eq!(runs[0]["params"]["changed"], "drop/big.csv");
    // Touching it, or rewriting the same bytes, is no change.
    let same = std::fs::read(&path).unwrap();
    std::fs::write(&path, &same).unwrap();
    let now = std::time::SystemTime::now();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(now)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.runs("ingest").len(), 1, "identical content does not fire");
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_thousand_writes_in_a_second_fire_one_run_and_a_downtime_change_fires_on_start() {
    let p = Project::new();
    watch_pipeline(&p);
    p.write("pipelines/drop/a.csv", "start\n");
    let d = Daemon::start(&p);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(d.runs("ingest").len(), 0, "the first look is the baseline");
    let path = p.path("pipelines/drop/a.csv");
    let start = Instant::now();
    for i in 0..1000 {
        let mut f = std::fs::File::options().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, format!("{i}\n").as_bytes()).unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    wait_runs(&d, "ingest", 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.runs("ingest").len(), 1);
    assert_eq!(d.stop(), 0);
    // Changed while the daemon was down: fires on start, once.
    p.write("pipelines/drop/b.csv", "new\n");
    let d = Daemon::start(&p);
    let runs = wait_runs(&d, "ingest", 2);
    assert_eq!(
        runs[1]["trigger_detail"]["changed"],
        serde_json::json!(["drop/b.csv"])
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(d.runs("ingest").len(), 2);
}

#[test]
fn overlap_policies_queue_skip_and_cancel() {
    let p = Project::new();
    sleep_pipeline(&p, "queued", 0.4, r#"{ max_runs = 1, overlap = "queue" }"#);
    sleep_pipeline(&p, "skipped", 1.5, r#"{ max_runs = 1, overlap = "skip" }"#);
    sleep_pipeline(
        &p,
        "cancelled",
        30.0,
        r#"{ max_runs = 1, overlap = "cancel" }"#,
    );
    let d = Daemon::start(&p);

    let ids: Vec<i64> = (0..3).map(|_| d.trigger("queued")).collect();
    let done: Vec<Value> = ids
        .iter()
        .map(|&id| d.wait_status(id, "succeeded"))
        .collect();
    for w in done.windows(2) {
        assert!(
            w[1]["started_at"].as_i64() >= w[0]["finished_at"].as_i64(),
            "max_runs = 1: one at a time: {w:?}"
        );
    }

    let first = d.trigger("skipped");
    d.wait_status(first, "running");
    let (status, v) = d.post(
        "/api/v1/pipelines/skipped/runs",
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("skip"),
        "{v}"
    );
    d.wait_status(first, "succeeded");

    let old = d.trigger("cancelled");
    d.wait_run(old, "ran its step", |r| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["status"] == "running"))
    });
    let new = d.trigger("cancelled");
    d.wait_status(old, "cancelled");
    d.wait_run(new, "started", |r| r["status"] == "running");
    let (status, _) = d.post(
        &format!("/api/v1/runs/{new}/cancel"),
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 202);
    d.wait_status(new, "cancelled");
    assert_eq!(d.stop(), 0);
}

#[test]
fn kill_9_mid_step_then_restart_resumes_the_run() {
    let p = Project::new();
    let copy = plugin("copy");
    let sleep = plugin("sleep");
    p.write("data.txt", "payload\n");
    p.write(
        "pipelines/two.toml",
        &format!(
            r#"
[inputs.x]
path = "../data.txt"
[[step]]
name = "first"
wasm = "{copy}"
inputs = {{ x = "inputs.x" }}
outputs = ["out"]
[[step]]
name = "second"
wasm = "{sleep}"
args = ["--secs", "2"]
inputs = {{ x = "first.out" }}
"#
        ),
    );
    let d = Daemon::start(&p);
    let id = d.trigger("two");
    d.wait_run(id, "reached its second step", |r| {
        r["steps"][1]["status"] == "running"
    });
    d.kill9();
    let d = Daemon::start(&p);
    let r = d.wait_status(id, "succeeded");
    let log = d.log_text();
    assert!(log.contains("interrupted"), "{log}");
    assert!(log.contains("queued to resume"), "{log}");
    assert_eq!(
        r["steps"][0]["attempts"].as_array().unwrap().len(),
        1,
        "the first step is not run again: {r}"
    );
    assert_eq!(r["steps"][1]["status"], "succeeded");
    assert_eq!(d.runs("two").len(), 1, "resumed, not re-run");
}

#[test]
fn sigterm_lets_running_steps_finish_then_interrupts_and_a_restart_resumes() {
    let p = Project::new();
    let sleep = plugin("sleep");
    // Two step slots for three steps: whichever two start first, the third waits
    // for a slot, and a slot freed while stopping must start nothing.
    p.write(
        "pipelines/slow.toml",
        &format!(
            r#"
[[step]]
name = "short"
wasm = "{sleep}"
args = ["--secs", "0.8"]
[[step]]
name = "long"
wasm = "{sleep}"
args = ["--secs", "4"]
[[step]]
name = "longer"
wasm = "{sleep}"
args = ["--secs", "4"]
"#
        ),
    );
    let d = Daemon::start(&p);
    let id = d.trigger("slow");
    d.wait_run(id, "ran two steps", |r| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().filter(|s| s["status"] == "running").count() == 2)
    });
    let start = Instant::now();
    assert_eq!(d.stop(), 0);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "the grace is 2 s"
    );
    let db = millrace::store::db::Db::open(&p.path(".state/millrace.db")).unwrap();
    let run = db.read().run(id).unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Interrupted);
    let steps = db.read().steps(id).unwrap();
    let never_started: Vec<&str> = steps
        .iter()
        .filter(|s| s.attempts == 0)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        never_started.len(),
        1,
        "the third step never starts: {steps:?}"
    );
    let short = steps.iter().find(|s| s.name == "short").unwrap();
    if short.attempts == 1 {
        assert_eq!(
            short.status,
            StepStatus::Succeeded,
            "finished within the grace"
        );
    }
    assert!(
        steps
            .iter()
            .filter(|s| s.name != "short")
            .all(|s| s.status == StepStatus::Pending),
        "the 4 s steps were stopped at the deadline or never started: {steps:?}"
    );
    drop(db);
    let d = Daemon::start(&p);
    let r = d.wait_status(id, "succeeded");
    if short.attempts == 1 {
        let again = r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "short")
            .unwrap()
            .clone();
        assert_eq!(
            again["attempts"].as_array().unwrap().len(),
            1,
            "not run again: {r}"
        );
    }
    assert_eq!(d.stop(), 0);
}

#[test]
fn sighup_with_an_invalid_file_keeps_the_old_version_and_reports_it() {
    let p = Project::new();
    let noop = plugin("noop");
    let good = format!("[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n");
    p.write("pipelines/keep.toml", &good);
    let d = Daemon::start(&p);
    let before = d.get("/api/v1/pipelines/keep");
    std::fs::write(
        p.path("pipelines/keep.toml"),
        format!("{good}[[step]]\nname = \"b\"\nwasm = \"{noop}\"\nretries = \"many\"\n"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = d.get("/api/v1/pipelines");
        if !v["invalid_files"].as_array().unwrap().is_empty() {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(25));
    };
    let err = &v["invalid_files"][0];
    assert!(
        err["text"].as_str().unwrap().contains("keep.toml:7:11"),
        "{err}"
    );
    let after = d.get("/api/v1/pipelines/keep");
    assert_eq!(
        after["digest"], before["digest"],
        "the last valid version stays"
    );
    assert_eq!(after["steps"].as_array().unwrap().len(), 1);
    // It still runs, with the old version.
    let id = d.trigger("keep");
    d.wait_status(id, "succeeded");
    // `millrace status` shows the error and exits 78.
    let out = p
        .cmd(&[
            "status",
            "--config",
            p.path("millrace.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{text}");
    assert!(text.contains("keep.toml:7:11"), "{text}");
    // Fixing the file loads the new version for new runs.
    std::fs::write(
        p.path("pipelines/keep.toml"),
        good.replace("\"a\"", "\"c\""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.get("/api/v1/pipelines/keep")["steps"][0]["name"] != "c" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        d.get("/api/v1/pipelines")["invalid_files"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn mutating_calls_need_the_token_and_bad_requests_are_named() {
    let p = Project::new();
    let noop = plugin("noop");
    p.write(
        "pipelines/api.toml",
        &format!("[params]\nc = 0.5\n[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n"),
    );
    let d = Daemon::start(&p);
    let (status, v) = d.post(
        "/api/v1/pipelines/api/runs",
        serde_json::json!({}),
        Some(""),
    );
    assert_eq!(status, 401, "{v}");
    let (status, _) = d.post(
        "/api/v1/pipelines/api/runs",
        serde_json::json!({}),
        Some("wrong"),
    );
    assert_eq!(status, 401);
    assert_eq!(d.get("/healthz")["status"], "ok");
    let (status, v) = d.post(
        "/api/v1/pipelines/api/runs",
        serde_json::json!({"params": {"nope": 1}}),
        None,
    );
    assert_eq!(status, 422);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nope"),
        "{v}"
    );
    let (status, v) = d.post(
        "/api/v1/pipelines/api/runs",
        serde_json::json!({"params": {"c": "high"}}),
        None,
    );
    assert_eq!(status, 422, "{v}");
    let (status, _) = d.post("/api/v1/pipelines/ghost/runs", serde_json::json!({}), None);
    assert_eq!(status, 404);
    // `millrace trigger` finds the daemon and its token through the config.
    let out = p
        .cmd(&[
            "trigger",
            "api",
            "--param",
            "c=0.9",
            "--config",
            p.path("millrace.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs = d.runs("api");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["params"]["c"], 0.9);
    assert_eq!(runs[0]["trigger"], "api");
    d.wait_status(runs[0]["id"].as_i64().unwrap(), "succeeded");
}

#[test]
fn after_triggers_fire_on_success_only_and_queued_runs_survive_a_restart() {
    let p = Project::new();
    let noop = plugin("noop");
    let fail = plugin("fail");
    p.write(
        "pipelines/upstream.toml",
        &format!("[params]\nok = true\n[[step]]\nname = \"a\"\nwasm = \"{noop}\"\nreuse = false\n"),
    );
    p.write(
        "pipelines/broken.toml",
        &format!("[[step]]\nname = \"a\"\nwasm = \"{fail}\"\n"),
    );
    p.write(
        "pipelines/downstream.toml",
        &format!(
            r#"
[params]
upstream_run = 0
label = "x"
[[trigger]]
after = "upstream"
params = {{ label = "from-upstream" }}
[[trigger]]
after = "broken"
[[step]]
name = "a"
wasm = "{noop}"
"#
        ),
    );
    sleep_pipeline(&p, "serial", 1.0, r#"{ max_runs = 1, overlap = "queue" }"#);
    let d = Daemon::start(&p);
    let up = d.trigger("upstream");
    d.wait_status(up, "succeeded");
    let broken = d.trigger("broken");
    d.wait_status(broken, "failed");
    let down = wait_runs(&d, "downstream", 1);
    std::thread::sleep(Duration::from_millis(500));
    let down_all = d.runs("downstream");
    assert_eq!(down_all.len(), 1, "only the success fires: {down_all:?}");
    assert_eq!(down[0]["params"]["upstream_run"], up);
    assert_eq!(down[0]["params"]["label"], "from-upstream");
    assert_eq!(down[0]["trigger"], "after upstream");

    // Two queued behind a running one; a stop keeps them queued, a start runs them.
    let first = d.trigger("serial");
    let second = d.trigger("serial");
    let third = d.trigger("serial");
    d.wait_status(first, "running");
    assert_eq!(d.get(&format!("/api/v1/runs/{second}"))["status"], "queued");
    assert_eq!(d.stop(), 0);
    let db = millrace::store::db::Db::open(&p.path(".state/millrace.db")).unwrap();
    for id in [second, third] {
        assert_eq!(
            db.read().run(id).unwrap().unwrap().status,
            RunStatus::Queued
        );
    }
    drop(db);
    let d = Daemon::start(&p);
    for id in [first, second, third] {
        d.wait_status(id, "succeeded");
    }
}

#[test]
fn a_bad_daemon_config_is_reported_at_its_lines_and_the_daemon_does_not_start() {
    let p = Project::new();
    p.write(
        "bad.toml",
        "pipelines = \"pipelines\"\nstate_dir = 3\nmax_parallel_steps = 0\n[api]\nlisten = \"localhost\"\ntoken = \"x\"\n",
    );
    let out = p.run(&["validate", "--config", "bad.toml", "--config-only"]);
    assert_eq!(out.status.code(), Some(78));
    let err = crate::common::stderr(&out);
    for want in [
        "bad.toml:2:13: error: state_dir must be a string",
        "bad.toml:3:22: error: max_parallel_steps must be between 1 and 1024",
        "bad.toml:5:10: error: api.listen: `localhost` is not an address",
        "bad.toml:6:1: error: unknown key `token` in [api]",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
    let out = p.run(&["daemon", "--config", "bad.toml"]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        crate::common::stderr(&out)
    );
    assert!(!p.path(".state").exists(), "nothing was created");
    // A config whose pipelines are bad is itself fine; `validate --config` checks both.
    config(&p, "");
    p.write(
        "pipelines/x.toml",
        "[[step]]\nname = \"a\"\nwasm = \"nope.wasm\"\n",
    );
    assert!(
        p.run(&["validate", "--config", "millrace.toml", "--config-only"])
            .status
            .success()
    );
    let out = p.run(&["validate", "--config", "millrace.toml"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        crate::common::stderr(&out).contains("pipelines/x.toml:3:8"),
        "{}",
        crate::common::stderr(&out)
    );
}

#[test]
fn a_module_disabled_while_a_run_is_queued_fails_that_run_clearly() {
    let p = Project::new();
    let out = p.run(&[
        "module",
        "publish",
        &plugin("noop"),
        "--name",
        "tool",
        "--version",
        "1.0.0",
    ]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let sleep = plugin("sleep");
    p.write(
        "pipelines/modular.toml",
        &format!(
            r#"
concurrency = {{ max_runs = 1, overlap = "queue" }}
[[step]]
name = "nap"
wasm = "{sleep}"
args = ["--secs", "1"]
reuse = false
[[step]]
name = "tool"
module = "tool@^1"
after = ["nap"]
"#
        ),
    );
    let d = Daemon::start(&p);
    let first = d.trigger("modular");
    let queued = d.trigger("modular");
    d.wait_status(first, "running");
    let out = p.run(&[
        "module",
        "disable",
        "tool@1.0.0",
        "--force",
        "--message",
        "broken build",
        "--pipelines",
        "pipelines",
    ]);
    assert!(out.status.success(), "{}", crate::common::stderr(&out));
    let r = d.wait_status(queued, "failed");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("module `tool@1.0.0` is disabled: broken build"),
        "{err}"
    );
    // New requests are refused up front, naming the reason.
    let (status, v) = d.post(
        "/api/v1/pipelines/modular/runs",
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("disabled"),
        "{v}"
    );
    let modules = d.get("/api/v1/modules");
    assert_eq!(modules["modules"][0]["status"], "disabled");
}

#[test]
fn identical_schedules_with_different_params_fire_separately() {
    let p = Project::new();
    let noop = plugin("noop");
    p.write(
        "pipelines/regions.toml",
        &format!(
            r#"
[params]
region = "none"
[[trigger]]
cron = "*/1 * * * * *"
params = {{ region = "eu" }}
[[trigger]]
cron = "*/1 * * * * *"
params = {{ region = "us" }}
[[step]]
name = "a"
wasm = "{noop}"
"#
        ),
    );
    let d = Daemon::start(&p);
    std::thread::sleep(Duration::from_millis(3500));
    let runs = d.runs("regions");
    assert_eq!(d.stop(), 0);
    let count = |region: &str| {
        runs.iter()
            .filter(|r| r["params"]["region"] == region)
            .count()
    };
    assert!(count("eu") >= 2 && count("us") >= 2, "{runs:?}");
    assert!(count("eu").abs_diff(count("us")) <= 1, "{runs:?}");
}

#[test]
fn the_api_pages_runs_explains_steps_and_streams_logs() {
    let p = Project::new();
    let chatty = plugin("sleep");
    let copy = plugin("copy");
    p.write("data.txt", "x\n");
    p.write(
        "pipelines/api2.toml",
        &format!(
            r#"
[inputs.x]
path = "../data.txt"
[[step]]
name = "copy"
wasm = "{copy}"
inputs = {{ x = "inputs.x" }}
outputs = ["out"]
[[step]]
name = "nap"
wasm = "{chatty}"
args = ["--secs", "1"]
after = ["copy"]
reuse = false
"#
        ),
    );
    let d = Daemon::start(&p);
    let first = d.trigger("api2");
    // Follow the log of a step before and while it runs: the stream ends with the run.
    let url = format!("{}/api/v1/runs/{first}/steps/nap/logs?follow=true", d.url);
    let mut r = Daemon::agent().get(&url).call().unwrap();
    assert_eq!(r.status(), 200);
    let streamed = r.body_mut().read_to_string().unwrap();
    assert!(
        streamed.contains("sleeping 1s") && streamed.contains("slept 1s"),
        "{streamed:?}"
    );
    d.wait_status(first, "succeeded");
    let second = d.trigger("api2");
    d.wait_status(second, "succeeded");

    let run = d.get(&format!("/api/v1/runs/{second}"));
    let copy_step = &run["steps"][0];
    assert_eq!(copy_step["status"], "reused");
    assert_eq!(copy_step["reused_from"], first);
    assert!(
        copy_step["explain"]["explanation"]
            .as_str()
            .unwrap()
            .contains("reused the outputs of run")
    );
    assert_eq!(copy_step["outputs"][0]["output"], "out");
    assert_eq!(
        copy_step["outputs"][0]["artifact"].as_str().unwrap().len(),
        64
    );
    assert_eq!(run["inputs"][0]["name"], "x");
    let nap = &run["steps"][1];
    assert!(
        nap["explain"]["explanation"]
            .as_str()
            .unwrap()
            .contains("executed"),
        "{nap}"
    );
    assert_eq!(nap["attempts"][0]["status"], "succeeded");
    let plain = Daemon::agent()
        .get(format!("{}/api/v1/runs/{second}/steps/nap/logs", d.url))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(plain.contains("slept 1s"));

    // Paging: newest first, `next` is the cursor.
    let page1 = d.get("/api/v1/runs?pipeline=api2&limit=1");
    assert_eq!(page1["runs"][0]["id"], second);
    let next = page1["next"].as_i64().unwrap();
    let page2 = d.get(&format!("/api/v1/runs?pipeline=api2&limit=1&before={next}"));
    assert_eq!(page2["runs"][0]["id"], first);
    let succeeded = d.get("/api/v1/runs?status=succeeded&since=2000-01-01T00:00:00Z");
    assert_eq!(succeeded["runs"].as_array().unwrap().len(), 2);
    assert!(d.get(&format!("/api/v1/runs/{second}/metrics"))["metrics"].is_array());
    for (path, want) in [
        ("/api/v1/runs/999/steps/nap/logs", 404),
        (
            &format!("/api/v1/runs/{second}/steps/ghost/logs") as &str,
            404,
        ),
        ("/api/v1/runs?status=sleeping", 400),
        ("/api/v1/runs?since=yesterday", 400),
        ("/api/v1/runs/abc", 404),
    ] {
        let r = Daemon::agent()
            .get(format!("{}{path}", d.url))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
    let metrics = Daemon::agent()
        .get(format!("{}/metrics", d.url))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    for want in [
        "millrace_runs_started_total{pipeline=\"api2\"} 2",
        "millrace_runs_finished_total{pipeline=\"api2\",status=\"succeeded\"} 2",
        "millrace_reuse_total{result=\"hit\"} 1",
        "millrace_reuse_total{result=\"miss\"} 3",
        "millrace_step_duration_seconds_count{runtime=\"wasm\"} 3",
        "millrace_trigger_to_first_step_seconds_count 2",
        "millrace_queue_depth 0",
        "millrace_running_steps 0",
        "# TYPE millrace_runs_started_total counter",
    ] {
        assert!(metrics.contains(want), "{want}\n{metrics}");
    }
    // promtool's own check (scripts/test.sh installs it and sets MILLRACE_REQUIRE_PROMTOOL).
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    match promtool {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(metrics.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool: {}{}\n{metrics}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => assert!(
            std::env::var_os("MILLRACE_REQUIRE_PROMTOOL").is_none(),
            "promtool is required here but missing"
        ),
    }
    let om = Daemon::agent()
        .get(format!("{}/metrics", d.url))
        .header("Accept", "application/openmetrics-text")
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");
    let (status, v) = d.post("/api/v1/pipelines/api2/runs", serde_json::json!(null), None);
    assert_eq!(status, 202, "a null body is an empty request: {v}");
    d.wait_status(v["run_id"].as_i64().unwrap(), "succeeded");
    let (status, v) = d.post("/api/v1/pipelines/api2/runs", serde_json::json!([1]), None);
    assert_eq!(status, 422, "{v}");
    let big = format!("{{\"params\": {{\"x\": \"{}\"}}}}", "a".repeat(2 << 20));
    let runs_before = d.runs("api2").len();
    let r = Daemon::agent()
        .post(format!("{}/api/v1/pipelines/api2/runs", d.url))
        .header("Authorization", &format!("Bearer {}", d.token))
        .header("Content-Type", "application/json")
        .send(big.as_str());
    // The daemon answers 413 as soon as the limit is passed and closes the
    // connection: the client may still be writing, and then sees the close.
    match r {
        Ok(r) => assert_eq!(r.status().as_u16(), 413, "a body over 1 MiB"),
        Err(ureq::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => panic!("a body over 1 MiB: {e}"),
    }
    assert_eq!(
        d.runs("api2").len(),
        runs_before,
        "no run from a refused body"
    );
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
    let doc = d.get("/api/v1/openapi.json");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/runs/{id}",
        "/api/v1/pipelines/{name}/runs",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
    let r = Daemon::agent()
        .post(format!("{}/api/v1/pipelines/api2/runs", d.url))
        .header("Authorization", &format!("Bearer {}", d.token))
        .header("Content-Type", "application/json")
        .send("{not json")
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}
