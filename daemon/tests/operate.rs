//! What an operator does to runs that are going wrong: `millrace cancel` (through
//! the daemon, or to the process driving the run, or of an interrupted run),
//! `POST /api/v1/runs/{id}/resume`, and the cause of a failed step printed where
//! the run ends (`run`, `trigger --wait`).

use std::process::Stdio;

use crate::common::{
    Daemon, Project, eventually, plugin, stderr, step_statuses, wait_until_running,
};

fn slow(p: &Project) -> std::path::PathBuf {
    p.write(
        "pipelines/slow.toml",
        &format!(
            "name = \"slow\"\n[[step]]\nname = \"nap\"\nwasm = \"{}\"\nargs = [\"--secs\", \"60\"]\nreuse = false\n",
            plugin("sleep")
        ),
    )
}

#[test]
fn cancel_stops_the_millrace_run_process_that_drives_the_run() {
    let p = Project::new();
    let f = slow(&p);
    let child = p
        .cmd(&["run", f.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_running(&p, "nap");
    let out = p.run(&["cancel", "latest"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("run 1 cancelled (process "), "{text}");
    // The run's own process saw it as Ctrl-C: recorded cancelled, exit 130.
    let run = child.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(130), "{}", stderr(&run));
    assert_eq!(
        step_statuses(&p, "1"),
        vec![("nap".into(), "cancelled".into())]
    );

    // Nothing left to cancel: a usage error that says why.
    let again = p.run(&["cancel", "1"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("run 1 already ended (cancelled)"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn cancel_of_an_interrupted_run_records_it_cancelled_so_nothing_resumes_it() {
    let p = Project::new();
    let f = slow(&p);
    let mut child = p
        .cmd(&["run", f.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_running(&p, "nap");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(p.json(&["runs", "show", "1"])["status"], "interrupted");

    let out = p.run(&["cancel", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("it was interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let show = p.json(&["runs", "show", "1"]);
    assert_eq!(show["status"], "cancelled");
    assert_eq!(show["steps"][0]["status"], "cancelled");
    assert_eq!(show["steps"][0]["attempts"][0]["status"], "cancelled");
}

#[test]
fn cancel_goes_through_the_daemon_and_the_api_resumes_a_run() {
    let p = Project::new();
    slow(&p);
    p.write(
        "pipelines/quick.toml",
        &format!(
            "name = \"quick\"\n[[step]]\nname = \"a\"\nwasm = \"{}\"\n",
            plugin("noop")
        ),
    );
    let d = Daemon::in_process(&p);
    let config = p.path("millrace.toml");
    let id = d.trigger("slow");
    d.wait_run(id, "running", |r| r["steps"][0]["status"] == "running");
    let out = p
        .cmd(&["cancel", &id.to_string(), "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("run {id} cancelled (through the daemon)")
    );
    d.wait_status(id, "cancelled");

    // The cancelled run, resumed through the API, runs its step again.
    let (status, v) = resume(&d, id);
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["queued"], true);
    d.wait_run(id, "running again", |r| {
        r["steps"][0]["status"] == "running"
    });
    let (status, v) = d.post(
        &format!("/api/v1/runs/{id}/resume"),
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 409, "{v}");
    let (status, v) = d.post(
        &format!("/api/v1/runs/{id}/cancel"),
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 202, "{v}");
    d.wait_status(id, "cancelled");

    // A succeeded run, or one that is not there, is refused with the reason.
    let id = d.trigger("quick");
    d.wait_status(id, "succeeded");
    let (status, v) = resume(&d, id);
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("succeeded"),
        "{v}"
    );
    let (status, _) = d.post("/api/v1/runs/999/resume", serde_json::json!({}), None);
    assert_eq!(status, 404);
}

/// `POST /api/v1/runs/{id}/resume` once the daemon has recorded the run's end
/// (until then the run is still its own: 409 "finishing").
fn resume(d: &Daemon, id: i64) -> (u16, serde_json::Value) {
    eventually(30, || {
        match d.post(
            &format!("/api/v1/runs/{id}/resume"),
            serde_json::json!({}),
            None,
        ) {
            (409, v) if v.to_string().contains("finishing") => Err(v.to_string()),
            other => Ok(other),
        }
    })
}

/// A failing step that prints 30 lines before its error.
fn failing(p: &Project) -> std::path::PathBuf {
    p.write(
        "pipelines/broken.toml",
        &format!(
            "name = \"broken\"\n[[step]]\nname = \"clean\"\nwasm = \"{}\"\nargs = [\"--lines\", \"30\", \"--message\", \"unknown column \\\"acidity\\\"\"]\noutputs = [\"out\"]\n",
            plugin("fail")
        ),
    )
}

fn assert_reports_the_cause(text: &str, run: i64) {
    assert!(
        text.contains("step `clean` failed: exited with code 1"),
        "{text}"
    );
    assert!(text.contains("    | unknown column \"acidity\""), "{text}");
    assert!(text.contains("    | fail: line 29"), "{text}");
    // Only the end of the log: 20 lines.
    assert!(!text.contains("    | fail: line 5\n"), "{text}");
    assert!(text.contains("last 20 of"), "{text}");
    assert!(
        text.contains(&format!("(the whole log: millrace logs {run} clean)")),
        "{text}"
    );
}

#[test]
fn a_failed_step_is_reported_with_its_error_and_the_end_of_its_log() {
    let p = Project::new();
    let f = failing(&p);
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_reports_the_cause(&stderr(&out), 1);

    let d = Daemon::in_process(&p);
    let out = p
        .cmd(&["trigger", "broken", "--wait", "--config"])
        .arg(p.path("millrace.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("run 2 failed"), "{stdout}");
    assert_reports_the_cause(&stdout, 2);
    drop(d);
}
