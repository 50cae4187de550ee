//! The daemon: queueing, reload, crash recovery, signals, the API and its
//! token; its triggers in `daemon/triggers.rs`. Each test starts a daemon on a temporary state dir and port 0, in this
//! process (`millrace::daemon::serve`) unless it needs the real process: real
//! SIGTERM and SIGHUP (systemd sends them) and `kill -9`. Every wait is on
//! what the daemon reports (runs, and the `counters` of `/api/v1/status`:
//! trigger checks, cursor moves, runs ended), never on a clock.

use std::process::Stdio;
use std::time::{Duration, Instant};

use millrace::model::{RunStatus, StepStatus};
use serde_json::Value;

/// Other test files start their daemons through here.
pub(crate) use crate::common::{Daemon, config};
use crate::common::{Project, eventually, plugin};

mod triggers;

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

/// Waits until `n` runs have ended (and fired their `after` triggers).
fn runs_ended(d: &Daemon, n: u64) {
    eventually(60, || {
        let c = d.counters();
        if c["runs_ended"].as_u64().unwrap() >= n {
            return Ok(());
        }
        Err(format!("{n} runs never ended: {c}\n{}", d.log_text()))
    })
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
    let d = Daemon::in_process(&p);

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
    // A process: the test is a `kill -9`.
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
    // A process: the real SIGTERM that systemd sends.
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
    // A process: the real SIGHUP of `systemctl reload`.
    let d = Daemon::start(&p);
    // SIGHUP reads the files again although none changed (the file watcher,
    // subscribed after the first read, has seen nothing): the count moves.
    let reloads = |d: &Daemon| d.counters()["reloads"].as_u64().unwrap();
    assert_eq!(reloads(&d), 1, "the first read");
    d.signal(libc::SIGHUP);
    eventually(10, || match reloads(&d) {
        n if n >= 2 => Ok(()),
        n => Err(format!("{n} reload(s) after one SIGHUP")),
    });
    let before = d.get("/api/v1/pipelines/keep");
    std::fs::write(
        p.path("pipelines/keep.toml"),
        format!("{good}[[step]]\nname = \"b\"\nwasm = \"{noop}\"\nretries = \"many\"\n"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let v = eventually(10, || {
        let v = d.get("/api/v1/pipelines");
        if !v["invalid_files"].as_array().unwrap().is_empty() {
            return Ok(v);
        }
        Err(v.to_string())
    });
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
    eventually(10, || {
        let v = d.get("/api/v1/pipelines/keep");
        if v["steps"][0]["name"] == "c" {
            return Ok(());
        }
        Err(v.to_string())
    });
    assert!(
        d.get("/api/v1/pipelines")["invalid_files"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(d.stop(), 0);
}

#[test]
fn mutating_calls_need_the_token_and_bad_requests_are_named() {
    let p = Project::new();
    let noop = plugin("noop");
    p.write(
        "pipelines/api.toml",
        &format!("[params]\nc = 0.5\n[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n"),
    );
    let d = Daemon::in_process(&p);
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
    let d = Daemon::in_process(&p);
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
    // A process: a panic anywhere in it (a handler, a connection) reaches its
    // log through the panic hook, which this test checks is empty of them.
    let d = Daemon::start(&p);
    let first = d.trigger("api2");
    // Follow the log of a step before and while it runs: the stream ends with the run.
    let url = format!("{}/api/v1/runs/{first}/steps/nap/logs?follow=true", d.url());
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
        .get(format!("{}/api/v1/runs/{second}/steps/nap/logs", d.url()))
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
            .get(format!("{}{path}", d.url()))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{path}");
    }
    api_metrics(&d);
    api_bodies_and_document(&d);
}

/// `/metrics` after two runs of `api2` (one step reused), in both formats.
fn api_metrics(d: &Daemon) {
    // A run's counters move when the daemon is done with it, a little after its
    // status is written.
    runs_ended(d, 2);
    let metrics = Daemon::agent()
        .get(format!("{}/metrics", d.url()))
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
        .get(format!("{}/metrics", d.url()))
        .header("Accept", "application/openmetrics-text")
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");
}

/// Bodies the create call refuses or accepts, and the OpenAPI document.
fn api_bodies_and_document(d: &Daemon) {
    let (status, v) = d.post("/api/v1/pipelines/api2/runs", serde_json::json!(null), None);
    assert_eq!(status, 202, "a null body is an empty request: {v}");
    d.wait_status(v["run_id"].as_i64().unwrap(), "succeeded");
    let (status, v) = d.post("/api/v1/pipelines/api2/runs", serde_json::json!([1]), None);
    assert_eq!(status, 422, "{v}");
    let big = format!("{{\"params\": {{\"x\": \"{}\"}}}}", "a".repeat(2 << 20));
    let runs_before = d.runs("api2").len();
    let r = Daemon::agent()
        .post(format!("{}/api/v1/pipelines/api2/runs", d.url()))
        .header("Authorization", &format!("Bearer {}", d.token()))
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
        .post(format!("{}/api/v1/pipelines/api2/runs", d.url()))
        .header("Authorization", &format!("Bearer {}", d.token()))
        .header("Content-Type", "application/json")
        .send("{not json")
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

/// The log (the terminal's, and journald's MESSAGE) says which run of which
/// pipeline, and what fired it, in its text; the fields stay for machines.
#[test]
fn log_lines_name_the_run_the_pipeline_and_the_trigger() {
    let p = Project::new();
    let noop = plugin("noop");
    p.write(
        "pipelines/hello.toml",
        &format!("[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n"),
    );
    let d = Daemon::in_process(&p);
    let id = d.trigger("hello");
    runs_ended(&d, 1);
    let log = d.log_text();
    for line in [
        format!("run {id} of hello queued (api)"),
        format!("run {id} of hello started"),
        format!("run {id} of hello succeeded in "),
    ] {
        assert!(log.contains(&line), "no `{line}` in:\n{log}");
    }
    assert!(log.contains(": 1 executed, 0 reused, 0 failed"), "{log}");
    // The structured fields are still there.
    assert!(log.contains(&format!("run={id}")), "{log}");
}
