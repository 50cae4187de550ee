//! Steps on a real single-node Slurm cluster (`scripts/setup-slurm.sh` starts it:
//! munge, slurmctld, slurmd; no accounting storage). The target's `shared_dir` is
//! a directory of the test project, which the one node sees like this host.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Project, eventually, plugin, stderr, step_log, step_statuses};
use crate::daemon::Daemon;

const TARGET: &str = "\n[compute.cluster]\nkind = \"slurm\"\nshared_dir = \"shared\"\n";

fn config(p: &Project, extra: &str) -> String {
    crate::daemon::config(p, &format!("{TARGET}{extra}"))
        .display()
        .to_string()
}

/// `scontrol show job -o ID` as key → value.
fn job(id: &str) -> std::collections::HashMap<String, String> {
    let out = std::process::Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .expect("scontrol (run scripts/setup-slurm.sh)");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn step<'a>(show: &'a Value, name: &str) -> &'a Value {
    show["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {show}"))
}

fn placement(show: &Value, name: &str) -> Value {
    step(show, name)["attempts"]
        .as_array()
        .unwrap()
        .last()
        .map(|a| a["placement"].clone())
        .unwrap_or(Value::Null)
}

fn train_pipeline(p: &Project, on_cluster: bool) -> String {
    let copy = plugin("copy");
    let compute = if on_cluster {
        "compute = \"cluster\""
    } else {
        ""
    };
    p.write("data/rows.csv", "x\n1\n2\n3\n");
    p.write(
        "code/train.py",
        r#"
import json, os
rows = open("/in/data/rows.csv").read().split()[1:]
os.makedirs("/out/model", exist_ok=True)
with open("/out/model/model.txt", "w") as f:
    f.write(f"sum={sum(int(r) for r in rows)} c={os.environ['MILLRACE_PARAM_C']}\n")
with open(os.environ["MILLRACE_METRICS"], "a") as m:
    m.write(json.dumps({"name": "rows", "value": len(rows)}) + "\n")
print("trained on", len(rows), "rows")
"#,
    );
    p.write(
        "train.toml",
        &format!(
            r#"
[params]
c = 0.5
[inputs.rows]
path = "data/rows.csv"
[[step]]
name = "prepare"
wasm = "{copy}"
inputs = {{ x = "inputs.rows" }}
outputs = ["out"]
[[step]]
name = "train"
python = {{ script = "train.py", code = "code" }}
params = ["c"]
inputs = {{ data = "prepare.out" }}
outputs = ["model"]
{compute}
[[step]]
name = "evaluate"
wasm = "{copy}"
inputs = {{ x = "train.model" }}
outputs = ["out"]
"#
        ),
    )
    .display()
    .to_string()
}

#[test]
fn a_train_step_runs_on_slurm_the_rest_locally_and_reuse_ignores_where() {
    let p = Project::new();
    let cfg = config(&p, "");
    let f = train_pipeline(&p, true);
    let out = p.run(&["run", &f, "--config", &cfg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let show = p.json(&["runs", "show", "latest"]);
    let where_ = placement(&show, "train");
    assert_eq!(where_["kind"], "slurm", "{show}");
    assert_eq!(where_["node"], "localhost", "{show}");
    let id = where_["job_id"].as_str().unwrap().to_string();
    assert_eq!(job(&id)["JobState"], "COMPLETED");
    assert_eq!(
        placement(&show, "prepare"),
        Value::Null,
        "prepare ran locally"
    );
    let model = p.run(&["output", "latest", "train.model"]);
    assert_eq!(String::from_utf8_lossy(&model.stdout), "sum=6 c=0.5\n");
    let log = step_log(&p, "train");
    assert!(log.contains("trained on 3 rows"), "{log}");
    assert!(log.contains(&format!("submitted Slurm job {id}")), "{log}");
    assert!(p.json(&["metrics", "latest"]).to_string().contains("rows"));
    let text = String::from_utf8_lossy(&p.run(&["runs", "show", "latest"]).stdout).into_owned();
    assert!(
        text.contains(&format!("slurm job {id} on localhost")),
        "{text}"
    );
    // The same step locally: its key does not depend on where it ran.
    let f = train_pipeline(&p, false);
    let out = p.run(&["run", &f, "--config", &cfg]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        step_statuses(&p, "latest")
            .iter()
            .all(|(_, s)| s == "reused"),
        "{:?}",
        step_statuses(&p, "latest")
    );
    // Executed locally, it produces the very artifact the cluster produced.
    let cluster_model = step(&show, "train")["outputs"][0]["artifact"].clone();
    let out = p.run(&["run", &f, "--config", &cfg, "--no-reuse"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let local = p.json(&["runs", "show", "latest"]);
    assert_eq!(
        step(&local, "train")["outputs"][0]["artifact"],
        cluster_model
    );
    assert_eq!(placement(&local, "train"), Value::Null);
}

#[test]
fn a_failing_job_and_a_job_past_its_slurm_time_limit_are_reported() {
    let p = Project::new();
    // A one-minute limit from the target: Slurm ends the job (TIMEOUT) a minute
    // or so after it starts.
    let cfg = crate::daemon::config(
        &p,
        "\n[compute.cluster]\nkind = \"slurm\"\nshared_dir = \"shared\"\ntime_limit = \"1\"\n",
    )
    .display()
    .to_string();
    let sleep = plugin("sleep");
    p.write(
        "code/fail.py",
        "import sys\nprint('failing on purpose')\nsys.exit(3)\n",
    );
    let f = p.write(
        "f.toml",
        &format!(
            r#"
[[step]]
name = "fails"
python = {{ script = "fail.py", code = "code" }}
compute = "cluster"
[[step]]
name = "overruns"
wasm = "{sleep}"
args = ["--secs", "600"]
compute = "cluster"
"#
        ),
    );
    let started = Instant::now();
    let out = p.run_within(&["run", f.to_str().unwrap(), "--config", &cfg], 240);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let show = p.json(&["runs", "show", "latest"]);
    let e = step(&show, "fails")["error"].as_str().unwrap().to_string();
    assert!(e.contains("exited with code 3 (Slurm job"), "{e}");
    let log = step_log(&p, "fails");
    assert!(log.contains("failing on purpose"), "{log}");
    let e = step(&show, "overruns")["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(e.contains("reached its time limit (TIMEOUT)"), "{e}");
    let id = placement(&show, "overruns")["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(job(&id)["JobState"], "TIMEOUT");
    assert!(
        started.elapsed() > Duration::from_secs(55),
        "Slurm's limit, not ours"
    );
}

fn wait_job(d: &Daemon, run: i64, step_name: &str) -> String {
    let r = d.wait_run(run, "submitted its job", |r| {
        r["steps"].as_array().is_some_and(|steps| {
            steps.iter().any(|s| {
                s["name"] == step_name
                    && s["attempts"]
                        .as_array()
                        .and_then(|a| a.last())
                        .is_some_and(|a| a["placement"]["job_id"].is_string())
            })
        })
    });
    let s = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == step_name)
        .unwrap();
    s["attempts"].as_array().unwrap().last().unwrap()["placement"]["job_id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_job_state(id: &str, want: &str) {
    eventually(60, || {
        let state = job(id).get("JobState").cloned().unwrap_or_default();
        (state == want)
            .then_some(())
            .ok_or(format!("job {id} never {want} (is {state})"))
    });
}

#[test]
fn a_killed_or_stopped_daemon_adopts_its_running_job_and_cancel_scancels() {
    let p = Project::new();
    config(&p, "");
    let sleep = plugin("sleep");
    for (name, secs) in [("nap", 4), ("long", 600)] {
        p.write(
            &format!("pipelines/{name}.toml"),
            &format!(
                r#"
[[step]]
name = "sleep"
wasm = "{sleep}"
args = ["--secs", "{secs}"]
compute = "cluster"
reuse = false
"#
            ),
        );
    }
    let d = Daemon::start(&p);
    let run = d.trigger("nap");
    let id = wait_job(&d, run, "sleep");
    wait_job_state(&id, "RUNNING");
    d.kill9();
    assert_eq!(
        job(&id)["JobState"],
        "RUNNING",
        "the job outlives the daemon"
    );
    // As if the daemon had died between sbatch's answer and recording it: only
    // the job's name is known. The restart finds the job by that name.
    let db = rusqlite::Connection::open(p.path(".state/millrace.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE attempts SET placement = json_set(placement, '$.job_id', NULL) WHERE run_id = ?1",
            [run],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let d = Daemon::start(&p);
    let r = d.wait_status(run, "succeeded");
    let s = &r["steps"][0];
    assert_eq!(
        s["attempts"].as_array().unwrap().len(),
        1,
        "not resubmitted: {r}"
    );
    assert_eq!(
        s["attempts"][0]["placement"]["job_id"], id,
        "the same job: {r}"
    );
    assert_eq!(job(&id)["JobState"], "COMPLETED");
    assert!(d.log_text().contains("interrupted"), "{}", d.log_text());
    let log =
        String::from_utf8_lossy(&p.run(&["logs", &run.to_string(), "sleep"]).stdout).into_owned();
    assert_eq!(log.matches("re-adopted Slurm job").count(), 1, "{log}");
    assert_eq!(
        log.matches("slept").count(),
        1,
        "the guest's output once: {log}"
    );

    // A clean shutdown (SIGTERM, past its grace) leaves the job running too: the
    // next start adopts it.
    let run = d.trigger("nap");
    let id = wait_job(&d, run, "sleep");
    wait_job_state(&id, "RUNNING");
    assert_eq!(d.stop(), 0);
    assert_eq!(
        job(&id)["JobState"],
        "RUNNING",
        "not cancelled by a shutdown"
    );
    let d = Daemon::start(&p);
    let r = d.wait_status(run, "succeeded");
    assert_eq!(
        r["steps"][0]["attempts"][0]["placement"]["job_id"], id,
        "{r}"
    );

    // Cancel: the run's job is cancelled in Slurm.
    let run = d.trigger("long");
    let id = wait_job(&d, run, "sleep");
    wait_job_state(&id, "RUNNING");
    // `millrace status` says where the running step runs.
    eventually(30, || {
        let out = p.run(&["status", "--config", "millrace.toml"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(&format!(
            "run {run} step sleep: slurm job {id} on localhost"
        ))
        .then_some(())
        .ok_or(text)
    });
    let (status, v) = d.post(
        &format!("/api/v1/runs/{run}/cancel"),
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 202, "{v}");
    d.wait_status(run, "cancelled");
    wait_job_state(&id, "CANCELLED");
}

#[test]
fn resuming_a_failed_run_submits_a_new_job_instead_of_adopting_the_old_one() {
    let p = Project::new();
    let cfg = config(&p, "");
    p.write("code/fail.py", "import sys\nsys.exit(3)\n");
    let f = p.write(
        "f.toml",
        "[[step]]\nname = \"fails\"\npython = { script = \"fail.py\", code = \"code\" }\ncompute = \"cluster\"\n",
    );
    let out = p.run(&["run", f.to_str().unwrap(), "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let first = placement(&p.json(&["runs", "show", "latest"]), "fails")["job_id"].clone();
    let out = p.run(&["resume", "latest", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let show = p.json(&["runs", "show", "latest"]);
    let second = placement(&show, "fails")["job_id"].clone();
    assert!(
        second.is_string() && second != first,
        "{first} then {second}"
    );
    let e = step(&show, "fails")["error"].as_str().unwrap().to_string();
    assert!(e.contains("exited with code 3"), "{e}");
}
