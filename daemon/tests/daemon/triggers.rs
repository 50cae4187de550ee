//! The daemon's triggers: cron (each second, DST, catchup after a downtime,
//! identical schedules), watch (a file still being written, a burst of writes,
//! a change while the daemon was down) and `after`. Every "nothing more fired"
//! is asserted once the trigger has looked again with no change pending (the
//! `counters` of `/api/v1/status`), not after a sleep.

use std::time::{Duration, Instant};

use millrace::model::RunStatus;
use serde_json::Value;

use super::{runs_ended, sleep_pipeline};
use crate::common::{Daemon, Project, eventually, plugin};

/// The fewest checks any cron or watch trigger of `pipeline` has made (0 before
/// its task first reports).
fn checks(d: &Daemon, pipeline: &str) -> u64 {
    d.trigger_counts(pipeline)
        .iter()
        .map(|t| t["checks"].as_u64().unwrap())
        .min()
        .unwrap_or(0)
}

/// Waits until every trigger of `pipeline` has checked at least `n` times and
/// none has a change pending: what they would fire is queued by then. Returns
/// the checks made.
fn settled(d: &Daemon, pipeline: &str, n: u64) -> u64 {
    eventually(60, || {
        let counts = d.trigger_counts(pipeline);
        let pending = counts.iter().any(|t| t["pending"] == true);
        let checks = checks(d, pipeline);
        if counts.is_empty() || pending || checks < n {
            return Err(format!(
                "`{pipeline}` did not settle after {n} check(s): {counts:?}\n{}",
                d.log_text()
            ));
        }
        Ok(checks)
    })
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
    let d = Daemon::in_process(&p);
    let runs = eventually(30, || {
        let runs = d.runs("tick");
        if runs.len() >= 4 {
            return Ok(runs);
        }
        Err(format!("{} runs: {runs:?}\n{}", runs.len(), d.log_text()))
    });
    assert_eq!(d.stop(), 0);
    let scheduled: Vec<i64> = runs
        .iter()
        .map(|r| {
            let s = r["trigger_detail"]["scheduled"].as_str().unwrap();
            assert_eq!(
                r["params"]["scheduled"], s,
                "the firing is a declared param"
            );
            let at = chrono::DateTime::parse_from_rfc3339(s).unwrap();
            assert!(
                r["created_at"].as_i64().unwrap() >= at.timestamp_millis(),
                "never before its second: {r}"
            );
            at.timestamp()
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
    let d = Daemon::in_process(&p);
    let expect = [("none", 0), ("latest", 1), ("all", 5), ("coalesce", 1)];
    // A trigger's first look queues (or drops) everything it missed at once.
    for (n, _) in expect {
        settled(&d, n, 1);
    }
    for (n, want) in expect {
        eventually(30, || {
            let runs = d.runs(n);
            if runs.iter().all(|r| r["status"] == "succeeded") {
                return Ok(());
            }
            Err(format!("catchup = {n} (want {want}): {runs:?}"))
        });
    }
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
    // A restart neither repeats nor invents firings: once each trigger has
    // looked, what it would fire is queued.
    let d = Daemon::in_process(&p);
    for (n, _) in expect {
        settled(&d, n, 1);
    }
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
    eventually(30, || {
        let runs = d.runs(pipeline);
        if runs.len() >= n && runs.iter().all(|r| r["status"] == "succeeded") {
            return Ok(runs);
        }
        Err(format!("{runs:?}\n{}", d.log_text()))
    })
}

#[test]
fn a_file_still_being_written_fires_one_run_once_complete() {
    let p = Project::new();
    watch_pipeline(&p);
    let d = Daemon::in_process(&p);
    // The first look, the baseline, is done before the file appears.
    let looked = settled(&d, "ingest", 1);
    let path = p.path("pipelines/drop/big.csv");
    let mut f = std::fs::File::create(&path).unwrap();
    for i in 0..15 {
        std::io::Write::write_all(&mut f, format!("{i},{}\n", "x".repeat(1000)).as_bytes())
            .unwrap();
        // The scenario, not a wait: a writer that takes 1.5 s over its file.
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(f);
    let written = chrono::Utc::now().timestamp_millis();
    let runs = wait_runs(&d, "ingest", 1);
    // The check that fired is over and no change is pending: nothing more fires.
    let looked = settled(&d, "ingest", looked + 1);
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
    settled(&d, "ingest", looked + 1);
    assert_eq!(d.runs("ingest").len(), 1, "identical content does not fire");
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_thousand_writes_in_a_second_fire_one_run_and_a_downtime_change_fires_on_start() {
    let p = Project::new();
    watch_pipeline(&p);
    p.write("pipelines/drop/a.csv", "start\n");
    let d = Daemon::in_process(&p);
    // Asserted once the first look is done (before it, no run proves nothing).
    let looked = settled(&d, "ingest", 1);
    assert_eq!(d.runs("ingest").len(), 0, "the first look is the baseline");
    let path = p.path("pipelines/drop/a.csv");
    let start = Instant::now();
    for i in 0..1000 {
        let mut f = std::fs::File::options().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, format!("{i}\n").as_bytes()).unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    wait_runs(&d, "ingest", 1);
    settled(&d, "ingest", looked + 1);
    assert_eq!(d.runs("ingest").len(), 1);
    assert_eq!(d.stop(), 0);
    // Changed while the daemon was down: fires on start, once.
    p.write("pipelines/drop/b.csv", "new\n");
    let d = Daemon::in_process(&p);
    let runs = wait_runs(&d, "ingest", 2);
    assert_eq!(
        runs[1]["trigger_detail"]["changed"],
        serde_json::json!(["drop/b.csv"])
    );
    settled(&d, "ingest", 1);
    assert_eq!(d.runs("ingest").len(), 2);
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
    let d = Daemon::in_process(&p);
    let up = d.trigger("upstream");
    d.wait_status(up, "succeeded");
    let broken = d.trigger("broken");
    d.wait_status(broken, "failed");
    let down = wait_runs(&d, "downstream", 1);
    // Upstream, broken and downstream have ended: what they fire is queued.
    runs_ended(&d, 3);
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
    let d = Daemon::in_process(&p);
    for id in [first, second, third] {
        d.wait_status(id, "succeeded");
    }
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
    let d = Daemon::in_process(&p);
    let count = |runs: &[Value], region: &str| {
        runs.iter()
            .filter(|r| r["params"]["region"] == region)
            .count()
    };
    let runs = eventually(30, || {
        let runs = d.runs("regions");
        if count(&runs, "eu") >= 2 && count(&runs, "us") >= 2 {
            return Ok(runs);
        }
        Err(format!("{runs:?}\n{}", d.log_text()))
    });
    assert_eq!(d.stop(), 0);
    assert!(
        count(&runs, "eu").abs_diff(count(&runs, "us")) <= 1,
        "{runs:?}"
    );
}

#[test]
fn with_a_default_datastore_in_the_config_a_drop_into_its_inbox_is_scored() {
    let p = Project::new();
    let copy = plugin("copy");
    // As config/millrace.toml and the systemd install have it: the default
    // datastore elsewhere than the pipelines, and a second one.
    crate::daemon::config(
        &p,
        "[datastores.default]\npath = \"data\"\n[datastores.drops]\npath = \"drops\"\n",
    );
    p.write("data/inbox/.keep", "");
    p.write("drops/in/.keep", "");
    p.write(
        "pipelines/score.toml",
        &format!(
            r#"
[params]
changed = ""
[inputs.inbox]
path = "inbox"
[[trigger]]
watch = "inbox/*.csv"
debounce = "300ms"
[[step]]
name = "score"
wasm = "{copy}"
inputs = {{ x = "inputs.inbox" }}
outputs = ["scored"]
args = ["--out", "scored"]
[[step]]
name = "deliver"
transfer = {{ from = "score.scored", to = "outbox", mode = "merge" }}
"#
        ),
    );
    // A watch may name its datastore, as an input does.
    p.write(
        "pipelines/named.toml",
        &format!(
            r#"
[params]
changed = ""
[inputs.d]
path = "in"
datastore = "drops"
[[trigger]]
watch = "in/*.csv"
datastore = "drops"
debounce = "300ms"
[[step]]
name = "a"
wasm = "{copy}"
inputs = {{ d = "inputs.d" }}
outputs = ["out"]
[[step]]
name = "deliver"
transfer = {{ from = "a.out", to = "got", datastore = "drops" }}
"#
        ),
    );
    let d = Daemon::in_process(&p);
    settled(&d, "score", 1);
    settled(&d, "named", 1);
    // Beside the pipeline file: not the datastore, not watched. Then into the
    // datastore's inbox: fires, and the run reads it.
    p.write("pipelines/inbox/beside.csv", "no\n");
    p.write("data/inbox/a.csv", "a,1\n");
    let runs = wait_runs(&d, "score", 1);
    assert_eq!(
        runs[0]["trigger_detail"]["changed"],
        serde_json::json!(["inbox/a.csv"]),
        "{runs:?}"
    );
    assert_eq!(runs[0]["params"]["changed"], "inbox/a.csv");
    assert_eq!(
        std::fs::read_to_string(p.path("data/outbox/a.csv")).unwrap(),
        "a,1\n"
    );
    p.write("drops/in/b.csv", "b,1\n");
    let named = wait_runs(&d, "named", 1);
    assert_eq!(
        named[0]["trigger_detail"]["changed"],
        serde_json::json!(["in/b.csv"])
    );
    assert_eq!(
        std::fs::read_to_string(p.path("drops/got/b.csv")).unwrap(),
        "b,1\n"
    );
    settled(&d, "score", 1);
    assert_eq!(d.runs("score").len(), 1, "{:?}", d.runs("score"));
    assert!(!p.path("pipelines/outbox").exists());
    assert_eq!(d.stop(), 0);
}

#[test]
fn validate_with_a_config_refuses_a_watch_outside_every_datastore() {
    let p = Project::new();
    let noop = plugin("noop");
    let config = crate::daemon::config(&p, "[datastores.default]\npath = \"data\"\n");
    let step = format!("[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n");
    p.write(
        "pipelines/etc.toml",
        &format!("[[trigger]]\nwatch = \"/etc/*.conf\"\n{step}"),
    );
    p.write(
        "pipelines/up.toml",
        &format!("[[trigger]]\nwatch = \"../../*.csv\"\n{step}"),
    );
    // Inside the datastore, by a relative or an absolute glob: accepted.
    p.write(
        "pipelines/ok.toml",
        &format!(
            "[[trigger]]\nwatch = \"inbox/*.csv\"\n[[trigger]]\nwatch = \"{}/in/*.csv\"\n{step}",
            p.path("data").display()
        ),
    );
    let out = p.run(&["validate", "--config", config.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(78),
        "{}",
        crate::common::stderr(&out)
    );
    let err = crate::common::stderr(&out);
    assert!(
        err.contains("etc.toml:2:9: error: the watch `/etc/*.conf` looks at /etc, outside every datastore and the pipeline's directory"),
        "{err}"
    );
    assert!(
        err.contains("up.toml:2:9: error: the watch `../../*.csv`"),
        "{err}"
    );
    assert!(!err.contains("ok.toml"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok.toml: ok"), "{stdout}");
}
