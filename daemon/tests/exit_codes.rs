//! One exit code per outcome, whichever command waited for the run (README "Exit
//! codes"): `trigger --wait` exits as `run` and `resume` do.

use std::process::Stdio;

use crate::common::{Daemon, Project, eventually, plugin};

#[test]
fn trigger_wait_exits_130_for_a_run_cancelled_through_the_api() {
    let p = Project::new();
    let (sleep, noop) = (plugin("sleep"), plugin("noop"));
    p.write(
        "pipelines/slow.toml",
        &format!(
            "[[step]]\nname = \"nap\"\nwasm = \"{sleep}\"\nargs = [\"--secs\", \"60\"]\nreuse = false\n"
        ),
    );
    p.write(
        "pipelines/quick.toml",
        &format!("[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n"),
    );
    let d = Daemon::start(&p);
    let config = p.path("millrace.toml");
    let trigger = |pipeline: &str| {
        p.cmd(&["trigger", pipeline, "--wait", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A run that succeeds: 0.
    let ok = trigger("quick").wait_with_output().unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let waiting = trigger("slow");
    let id = eventually(60, || {
        let runs = d.runs("slow");
        match runs.first() {
            Some(r) if r["status"] == "running" => Ok(r["id"].as_i64().unwrap()),
            other => Err(format!("no running run yet: {other:?}")),
        }
    });
    let (status, v) = d.post(
        &format!("/api/v1/runs/{id}/cancel"),
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 202, "{v}");
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("run {id} cancelled")),
        "{stdout}"
    );
    d.wait_status(id, "cancelled");
}
