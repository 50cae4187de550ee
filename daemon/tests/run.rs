//! Runs, reuse, failures, retries, resume and damaged artifacts.

use crate::common::{Project, plugin, stderr, step_statuses, wait_until_running};

/// A fan-out/fan-in: two inputs, a branch per input, and a join.
fn fan_pipeline(p: &Project) -> std::path::PathBuf {
    p.write("data/a.txt", "alpha\n");
    p.write("data/b.txt", "beta\n");
    let copy = plugin("copy");
    p.write(
        "fan.toml",
        &format!(
            r#"
name = "fan"
[inputs.a]
path = "data/a.txt"
[inputs.b]
path = "data/b.txt"

[[step]]
name = "left"
wasm = "{copy}"
inputs = {{ x = "inputs.a" }}
outputs = ["out"]

[[step]]
name = "left2"
wasm = "{copy}"
env = {{ TAG = "two" }}
inputs = {{ x = "left.out" }}
outputs = ["out"]

[[step]]
name = "right"
wasm = "{copy}"
env = {{ TAG = "right" }}
inputs = {{ x = "inputs.b" }}
outputs = ["out"]

[[step]]
name = "join"
wasm = "{copy}"
args = ["--record-args", "join"]
inputs = {{ l = "left2.out", r = "right.out" }}
outputs = ["out"]
"#
        ),
    )
}

pub(crate) fn summary(p: &Project, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    p.json(&all)
}

#[test]
fn a_noop_rerun_reuses_every_step() {
    let p = Project::new();
    let f = fan_pipeline(&p);
    let f = f.to_str().unwrap();
    let cold = summary(&p, &[f]);
    assert_eq!(
        (cold["status"].as_str(), cold["executed"].as_u64()),
        (Some("succeeded"), Some(4)),
        "{cold}"
    );
    let again = summary(&p, &[f]);
    assert_eq!(
        (again["executed"].as_u64(), again["reused"].as_u64()),
        (Some(0), Some(4)),
        "{again}"
    );
    let out = p.run(&["output", "2", "join.out", "-o", "exported"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(p.path("exported/a.txt")).unwrap(),
        "alpha\n"
    );
    assert_eq!(
        std::fs::read_to_string(p.path("exported/b.txt")).unwrap(),
        "beta\n"
    );
    let explain = p.run(&["explain", "2", "join"]);
    assert!(String::from_utf8_lossy(&explain.stdout).contains("reused the outputs of run 1"));
    // --no-reuse executes everything again.
    let forced = summary(&p, &[f, "--no-reuse"]);
    assert_eq!(forced["executed"].as_u64(), Some(4), "{forced}");
}

#[test]
fn changing_one_input_reruns_exactly_its_dependants() {
    let p = Project::new();
    let f = fan_pipeline(&p);
    let f = f.to_str().unwrap();
    summary(&p, &[f]);
    p.write("data/b.txt", "BETA\n");
    let plan = p.json(&["plan", f]);
    let decisions: Vec<(&str, &str)> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["step"].as_str().unwrap(),
                d["plan"]["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        vec![
            ("left", "reuse"),
            ("left2", "reuse"),
            ("right", "run"),
            ("join", "pending")
        ]
    );
    let s = summary(&p, &[f]);
    assert_eq!(
        (s["executed"].as_u64(), s["reused"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    let statuses = step_statuses(&p, "2");
    assert_eq!(
        statuses,
        vec![
            ("left".into(), "reused".into()),
            ("left2".into(), "reused".into()),
            ("right".into(), "succeeded".into()),
            ("join".into(), "succeeded".into())
        ]
    );
    let explain = String::from_utf8_lossy(&p.run(&["explain", "2", "right"]).stdout).into_owned();
    assert!(
        explain.contains("compared with run 1") && explain.contains("input `x` changed"),
        "{explain}"
    );
}

#[test]
fn a_param_change_reruns_and_is_explained() {
    let p = Project::new();
    p.write("data/a.txt", "alpha\n");
    let f = p.write(
        "param.toml",
        &format!(
            r#"
[params]
level = 3
[inputs.a]
path = "data/a.txt"
[[step]]
name = "s"
wasm = "{}"
args = ["--record-args", "--level=${{params.level}}"]
inputs = {{ x = "inputs.a" }}
outputs = ["out"]
"#,
            plugin("copy")
        ),
    );
    let f = f.to_str().unwrap();
    summary(&p, &[f]);
    let s = summary(&p, &[f, "--param", "level=4"]);
    assert_eq!(s["executed"].as_u64(), Some(1));
    let out = p.run(&["output", "2", "s.out", "-o", "o"]);
    assert!(out.status.success());
    assert!(
        std::fs::read_to_string(p.path("o/args.txt"))
            .unwrap()
            .contains("--level=4")
    );
    let explain = String::from_utf8_lossy(&p.run(&["explain", "2", "s"]).stdout).into_owned();
    assert!(
        explain.contains("param `level` changed: integer:3 → integer:4"),
        "{explain}"
    );
    // A param of the wrong type, or one not declared, is a usage error.
    assert_eq!(
        p.run(&["run", f, "--param", "level=high"]).status.code(),
        Some(2)
    );
    assert_eq!(
        p.run(&["run", f, "--param", "nope=1"]).status.code(),
        Some(2)
    );
}

#[test]
fn a_failing_step_skips_its_dependants_and_the_run_exits_1() {
    let p = Project::new();
    p.write("data/a.txt", "a\n");
    let f = p.write(
        "fail.toml",
        &format!(
            r#"
[inputs.a]
path = "data/a.txt"
[[step]]
name = "broken"
wasm = "{fail}"
args = ["--code", "7"]
outputs = ["out"]
[[step]]
name = "after-broken"
wasm = "{copy}"
inputs = {{ x = "broken.out" }}
outputs = ["out"]
[[step]]
name = "independent"
wasm = "{copy}"
inputs = {{ x = "inputs.a" }}
outputs = ["out"]
[[step]]
name = "core-module"
wasm = "{fail_p1}"
args = ["--code", "7"]
"#,
            fail = plugin("fail"),
            fail_p1 = plugin("fail-p1"),
            copy = plugin("copy")
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let statuses = step_statuses(&p, "1");
    assert!(
        statuses.contains(&("broken".into(), "failed".into())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("after-broken".into(), "skipped".into())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("independent".into(), "succeeded".into())),
        "{statuses:?}"
    );
    let show = p.json(&["runs", "show", "1"]);
    let broken = show["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "broken")
        .unwrap();
    // A wasip2 component can only report success or failure: its exit code 7
    // arrives as 1 (wasi:cli/exit carries a result, not a number).
    assert_eq!(broken["error"], "exited with code 1");
    assert_eq!(broken["attempts"][0]["exit_code"], 1);
    // A wasip1 core module keeps its exit code.
    let core = show["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "core-module")
        .unwrap();
    assert_eq!(core["error"], "exited with code 7");
    let log = String::from_utf8_lossy(&p.run(&["logs", "1", "broken"]).stdout).into_owned();
    assert!(log.contains("fail"), "{log}");
}

#[test]
fn retries_run_until_an_attempt_succeeds() {
    let p = Project::new();
    let write = |attempts: u32| {
        p.write(
            "flaky.toml",
            &format!(
                r#"
[[step]]
name = "flaky"
wasm = "{}"
args = ["--succeed-on", "2"]
outputs = ["out"]
retries = {{ attempts = {attempts}, backoff = "50ms" }}
"#,
                plugin("flaky")
            ),
        )
    };
    let f = write(1);
    assert_eq!(p.run(&["run", f.to_str().unwrap()]).status.code(), Some(1));
    let f = write(3);
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let show = p.json(&["runs", "show", "2"]);
    let step = &show["steps"][0];
    assert_eq!(step["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(step["attempts"][0]["status"], "failed");
    assert_eq!(step["attempts"][1]["status"], "succeeded");
}

#[test]
fn a_killed_run_leaves_no_partial_artifact_and_resume_finishes_it() {
    let p = Project::new();
    p.write("data/a.txt", "a\n");
    let f = p.write(
        "slow.toml",
        &format!(
            r#"
[inputs.a]
path = "data/a.txt"
[[step]]
name = "first"
wasm = "{copy}"
inputs = {{ x = "inputs.a" }}
outputs = ["out"]
[[step]]
name = "slow"
wasm = "{sleep}"
args = ["--secs", "2"]
inputs = {{ x = "first.out" }}
outputs = ["out"]
"#,
            copy = plugin("copy"),
            sleep = plugin("sleep")
        ),
    );
    let mut child = p
        .cmd(&["run", f.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Once `slow` is running, kill the process outright.
    wait_until_running(&p, "slow");
    child.kill().unwrap();
    child.wait().unwrap();
    let show = p.json(&["runs", "show", "1"]);
    assert_eq!(show["status"], "interrupted");
    let slow = show["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "slow")
        .unwrap();
    assert_eq!(
        slow["outputs"].as_array().unwrap().len(),
        0,
        "no output recorded for the killed step"
    );
    let out = p.run(&["--json", "resume", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            s["run_id"].as_i64(),
            s["executed"].as_u64(),
            s["reused"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(p.json(&["runs", "show", "1"])["status"], "succeeded");
    // Resuming a finished run is refused.
    assert_eq!(p.run(&["resume", "1"]).status.code(), Some(2));
}

#[test]
fn a_damaged_artifact_is_detected_and_the_step_executes_again() {
    let p = Project::new();
    let f = fan_pipeline(&p);
    let f = f.to_str().unwrap();
    summary(&p, &[f]);
    // Damage the blob of a file only `join` produced (its args.txt).
    assert!(
        p.run(&["output", "1", "join.out", "-o", "before"])
            .status
            .success()
    );
    let content = std::fs::read(p.path("before/args.txt")).unwrap();
    let digest = blake3::hash(&content).to_hex().to_string();
    let blob = p.path(&format!(
        ".state/objects/blobs/{}/{}",
        &digest[..2],
        &digest[2..]
    ));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut damaged = content.clone();
    damaged[0] ^= 0x20;
    std::fs::write(&blob, &damaged).unwrap();
    let s = summary(&p, &[f]);
    assert_eq!(s["status"], "succeeded", "{s}");
    let statuses = step_statuses(&p, "2");
    assert_eq!(
        statuses,
        vec![
            ("left".into(), "reused".into()),
            ("left2".into(), "reused".into()),
            ("right".into(), "reused".into()),
            ("join".into(), "succeeded".into())
        ]
    );
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        content,
        "the blob was written again"
    );
    let explain = String::from_utf8_lossy(&p.run(&["explain", "2", "join"]).stdout).into_owned();
    assert!(explain.contains("same key as run 1"), "{explain}");
}

#[test]
fn a_transfer_publishes_an_output_and_replaces_it_whole() {
    let p = Project::new();
    p.write("data/a.txt", "v1\n");
    let f = p.write(
        "publish.toml",
        &format!(
            r#"
[inputs.a]
path = "data/a.txt"
[[step]]
name = "make"
wasm = "{}"
inputs = {{ x = "inputs.a" }}
outputs = ["model"]
args = ["--out", "model"]
[[step]]
name = "publish"
transfer = {{ from = "make.model", to = "models/latest" }}
"#,
            plugin("copy")
        ),
    );
    let f = f.to_str().unwrap();
    assert!(p.run(&["run", f]).status.success());
    assert_eq!(
        std::fs::read_to_string(p.path("models/latest/a.txt")).unwrap(),
        "v1\n"
    );
    std::fs::write(p.path("models/latest/stale.txt"), "left over").unwrap();
    p.write("data/a.txt", "v2\n");
    assert!(p.run(&["run", f]).status.success());
    assert_eq!(
        std::fs::read_to_string(p.path("models/latest/a.txt")).unwrap(),
        "v2\n"
    );
    assert!(
        !p.path("models/latest/stale.txt").exists(),
        "the old tree is replaced whole"
    );
    // Unchanged: reused, as long as the destination still holds it.
    let s = summary(&p, &[f]);
    assert_eq!(s["reused"].as_u64(), Some(2), "{s}");
    std::fs::remove_dir_all(p.path("models/latest")).unwrap();
    let s = summary(&p, &[f]);
    assert_eq!(s["executed"].as_u64(), Some(1), "{s}");
    assert!(p.path("models/latest/a.txt").exists());
}

/// `plan --json` as (step, decision, reason).
pub(crate) fn plan_of(p: &Project, f: &str) -> Vec<(String, String, String)> {
    p.json(&["plan", f])
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["step"].as_str().unwrap().to_string(),
                d["plan"]["decision"].as_str().unwrap().to_string(),
                d["plan"]["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Runs `f` and checks that every step did what `plan` said just before: a
/// reuse is reused, a run is executed (a pending step may do either).
pub(crate) fn run_as_planned(p: &Project, f: &str) -> Vec<(String, String, String)> {
    let plan = plan_of(p, f);
    let s = summary(p, &[f]);
    let run = s["run_id"].as_i64().unwrap().to_string();
    let did = step_statuses(p, &run);
    assert_eq!(did.len(), plan.len(), "plan {plan:?}, run {did:?}");
    for ((step, decision, _), (name, status)) in plan.iter().zip(&did) {
        let agree = match decision.as_str() {
            "reuse" => status == "reused",
            "run" => status == "succeeded",
            _ => true,
        };
        assert!(step == name && agree, "plan {plan:?}, run {did:?}");
    }
    plan
}

#[test]
fn plan_and_run_agree_on_a_transfer_whose_destination_changed() {
    let p = Project::new();
    p.write("data/a.txt", "v1\n");
    let f = p.write(
        "publish.toml",
        &format!(
            r#"
[inputs.a]
path = "data/a.txt"
[[step]]
name = "make"
wasm = "{}"
inputs = {{ x = "inputs.a" }}
outputs = ["model"]
args = ["--out", "model"]
[[step]]
name = "publish"
transfer = {{ from = "make.model", to = "models/latest" }}
"#,
            plugin("copy")
        ),
    );
    let f = f.to_str().unwrap();
    let first = run_as_planned(&p, f);
    assert_eq!(first[1].1, "pending", "{first:?}");
    let unchanged = run_as_planned(&p, f);
    assert_eq!(
        (unchanged[0].1.as_str(), unchanged[1].1.as_str()),
        ("reuse", "reuse"),
        "{unchanged:?}"
    );

    // Someone edits what the transfer published: the cache entry still matches,
    // but the destination no longer holds it.
    std::fs::write(p.path("models/latest/a.txt"), "edited by hand\n").unwrap();
    let edited = run_as_planned(&p, f);
    assert_eq!(edited[0].1, "reuse", "{edited:?}");
    let (_, decision, reason) = &edited[1];
    assert_eq!(decision, "run", "{edited:?}");
    assert!(
        reason.starts_with("same key as run ")
            && reason.contains("models/latest no longer holds what it published"),
        "{reason}"
    );
    assert_eq!(
        std::fs::read_to_string(p.path("models/latest/a.txt")).unwrap(),
        "v1\n"
    );

    // Deleted: the same.
    std::fs::remove_dir_all(p.path("models/latest")).unwrap();
    let deleted = run_as_planned(&p, f);
    assert_eq!(deleted[1].1, "run", "{deleted:?}");
    assert!(p.path("models/latest/a.txt").exists());

    // Published again: reused again, and the text plan prints says so.
    run_as_planned(&p, f);
    let text = p.run(&["plan", f]);
    assert_eq!(
        String::from_utf8_lossy(&text.stdout),
        "make     reuse  from run 5\npublish  reuse  from run 5\n"
    );
}

#[test]
fn metrics_env_and_core_modules() {
    let p = Project::new();
    let f = p.write(
        "env.toml",
        &format!(
            r#"
name = "envy"
[params]
c = 0.5
[[step]]
name = "show"
wasm = "{env}"
env = {{ GREETING = "hi ${{params.c}}" }}
outputs = ["out"]
[[step]]
name = "p1"
wasm = "{p1}"
"#,
            env = plugin("env"),
            p1 = plugin("noop-p1")
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let env = String::from_utf8_lossy(&p.run(&["output", "1", "show.out"]).stdout).into_owned();
    for want in [
        "MILLRACE_RUN_ID=1",
        "MILLRACE_PIPELINE=envy",
        "MILLRACE_STEP=show",
        "MILLRACE_ATTEMPT=1",
        "MILLRACE_PARAM_C=0.5",
        "GREETING=hi 0.5",
    ] {
        assert!(env.contains(want), "{want} missing from {env}");
    }
    let m = p.json(&["metrics", "1"]);
    let rows = m[0]["metrics"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["name"] == "answer" && r["value"] == 42.0)
    );
    assert_eq!(
        rows.iter().filter(|r| r["name"] == "loss").count(),
        5,
        "a curve of 5 points"
    );
}

#[test]
fn bad_configuration_exits_78_and_records_nothing() {
    let p = Project::new();
    let f = p.write(
        "bad.toml",
        "[[step]]\nname = \"x\"\nwasm = \"missing.wasm\"\n",
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("bad.toml:3:8: error: wasm file not found"),
        "{}",
        stderr(&out)
    );
    assert!(
        !p.path(".state/millrace.db").exists(),
        "nothing was written"
    );
    // A missing dataset is a configuration error too.
    let f = p.write(
        "nodata.toml",
        &format!("[inputs.a]\npath = \"nope.csv\"\n[[step]]\nname = \"x\"\nwasm = \"{}\"\ninputs = {{ a = \"inputs.a\" }}\n", plugin("copy")),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("input `a`: not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn lineage_names_producer_and_readers_and_gc_keeps_what_kept_runs_use() {
    let p = Project::new();
    let f = fan_pipeline(&p);
    let f = f.to_str().unwrap();
    summary(&p, &[f]);
    let l = p.json(&["lineage", "1:left.out"]);
    let uses = l["uses"].as_array().unwrap();
    assert!(
        uses.iter()
            .any(|u| u["role"] == "output" && u["step"] == "left"),
        "{l}"
    );
    assert!(
        uses.iter()
            .any(|u| u["role"] == "input" && u["step"] == "left2"),
        "{l}"
    );
    p.write("data/b.txt", "second\n");
    summary(&p, &[f]);
    let g = p.json(&["gc", "--keep", "1"]);
    assert_eq!(g["runs_deleted"], 1, "{g}");
    assert!(
        g["objects_deleted"].as_u64().unwrap() > 0,
        "the first run's b.txt is gone: {g}"
    );
    assert_eq!(p.run(&["runs", "show", "1"]).status.code(), Some(2));
    assert!(
        !p.path(".state/logs/1").exists(),
        "the deleted run's logs went with it"
    );
    // What the kept run references is intact and still reusable.
    let again = summary(&p, &[f]);
    assert_eq!(again["reused"].as_u64(), Some(4), "{again}");
}

#[test]
fn sigterm_cancels_the_run_and_resume_finishes_it() {
    let p = Project::new();
    let f = p.write(
        "slow.toml",
        &format!(
            "[[step]]\nname = \"slow\"\nwasm = \"{}\"\nargs = [\"--secs\", \"1\"]\noutputs = [\"out\"]\n",
            plugin("sleep")
        ),
    );
    let child = p
        .cmd(&["run", f.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_running(&p, "slow");
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let show = p.json(&["runs", "show", "1"]);
    assert_eq!(show["status"], "cancelled");
    assert_eq!(show["steps"][0]["status"], "cancelled");
    let out = p.run(&["resume", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(p.json(&["runs", "show", "1"])["status"], "succeeded");
}
