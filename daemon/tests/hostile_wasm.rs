//! Hostile and clumsy guests against the wasm/Python sandbox host (issue 13): each
//! attack fails its step with a message that names the limit, the process survives,
//! and the daemon answers `/healthz` while it runs and after.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Project, eventually, plugin, shared_cache, stderr, step_error, step_log};
use crate::daemon::{Daemon, config};

/// `/healthz` answers, and promptly (a blocked runtime worker or exhausted
/// descriptors made it time out).
fn healthy(d: &Daemon) {
    let start = Instant::now();
    assert_eq!(d.get("/healthz")["status"], "ok");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "/healthz took {:?}",
        start.elapsed()
    );
}

/// Starts the daemon on the compile cache the tests share (the daemon does not get
/// `MILLRACE_CACHE`; compiling the Python runtime afresh takes minutes).
fn start(p: &Project) -> Daemon {
    std::fs::create_dir_all(p.path(".state/cache")).unwrap();
    std::os::unix::fs::symlink(shared_cache(), p.path(".state/cache/wasm")).unwrap();
    Daemon::start(p)
}

/// A step of the run as the API shows it.
fn api_step(run: &Value, name: &str) -> Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {run}"))
        .clone()
}

#[test]
fn unbounded_recursion_is_a_named_trap_and_deep_python_still_runs() {
    let p = Project::new();
    p.write(
        "code/nest.py",
        "l = []\nfor _ in range(200_000):\n    l = [l]\nprint(len(repr(l)))\n",
    );
    // Ordinary deep code: the standard library, pandas, ~900 Python frames.
    p.write(
        "code/deep.py",
        r#"
import json, decimal, collections, re, pandas
def down(n):
    return 0 if n == 0 else 1 + down(n - 1)
print("depth", down(900), json.dumps({"ok": True}))
"#,
    );
    let f = p.write(
        "recurse.toml",
        &format!(
            r#"
[[step]]
name = "p2"
wasm = "{attack}"
args = ["recurse"]
[[step]]
name = "p1"
wasm = "{attack_p1}"
args = ["recurse"]
[[step]]
name = "io"
wasm = "{attack_p1}"
args = ["recurse-io"]
[[step]]
name = "nest"
python = "code/nest.py"
[[step]]
name = "deep"
python = "code/deep.py"
"#,
            attack = plugin("attack"),
            attack_p1 = plugin("attack-p1"),
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    // A trap is a failed step; the process was not aborted by a signal.
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // `io` makes a host call at the deepest point: it runs in the room the fiber
    // stack keeps above the wasm stack limit.
    for step in ["p2", "p1", "io", "nest"] {
        let e = step_error(&p, step);
        assert_eq!(
            e,
            "wasm stack limit of 8MiB exceeded (unbounded recursion?)",
            "{step}: {}",
            step_log(&p, step)
        );
        // The log has the cause and the backtrace.
        assert!(
            step_log(&p, step).contains("call stack exhausted"),
            "{}",
            step_log(&p, step)
        );
    }
    assert_eq!(step_error(&p, "deep"), "", "{}", step_log(&p, "deep"));
    assert!(step_log(&p, "deep").contains("depth 900"));
}

#[test]
fn a_trap_message_keeps_its_cause() {
    let p = Project::new();
    let f = p.write(
        "trap.toml",
        &format!(
            r#"
[[step]]
name = "p2"
wasm = "{fail}"
args = ["--trap"]
[[step]]
name = "p1"
wasm = "{fail_p1}"
args = ["--trap"]
"#,
            fail = plugin("fail"),
            fail_p1 = plugin("fail-p1"),
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    for step in ["p2", "p1"] {
        let e = step_error(&p, step);
        // Not "trapped: error while executing at wasm backtrace:" (its first line).
        assert!(
            e.starts_with("trapped: wasm trap: wasm `unreachable` instruction executed (in "),
            "{e}"
        );
        assert!(!e.contains('\n') && e.len() < 700, "{e}");
    }
}

#[test]
fn wasip1_sleeps_end_at_the_timeout_and_on_sigint() {
    let p = Project::new();
    p.write(
        "code/select.py",
        "import select\nprint('selecting', flush=True)\nselect.select([], [], [], 30)\n",
    );
    p.write(
        "code/nap.py",
        "import time\nprint('napping', flush=True)\ntime.sleep(30)\n",
    );
    let sleep_p1 = plugin("sleep-p1");
    let f = p.write(
        "naps.toml",
        &format!(
            r#"
[[step]]
name = "p1"
wasm = "{sleep_p1}"
args = ["--secs", "600"]
timeout = "1s"
[[step]]
name = "select"
python = "code/select.py"
timeout = "3s"
[[step]]
name = "nap"
python = "code/nap.py"
timeout = "3s"
"#
        ),
    );
    let start = Instant::now();
    let out = p.run_within(&["run", f.to_str().unwrap()], 60);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "the sleeps outlived their timeouts: {:?}",
        start.elapsed()
    );
    assert_eq!(step_error(&p, "p1"), "timed out after 1s");
    assert_eq!(step_error(&p, "select"), "timed out after 3s");
    assert_eq!(step_error(&p, "nap"), "timed out after 3s");

    // SIGINT stops a sleeping guest at once, not when its sleep ends.
    let f = p.write(
        "long.toml",
        &format!(
            "[[step]]\nname = \"p1\"\nwasm = \"{sleep_p1}\"\nargs = [\"--secs\", \"600\"]\ntimeout = \"10m\"\n"
        ),
    );
    let mut child = p
        .cmd(&["run", f.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let stopped = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("SIGINT did not stop a wasip1 sleep");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    assert!(stopped.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_daemon_serves_while_two_guests_sleep_and_cancels_them() {
    let p = Project::new();
    config(&p, "");
    p.write(
        "code/select.py",
        "import select\nprint('selecting', flush=True)\nselect.select([], [], [], 600)\n",
    );
    p.write(
        "pipelines/naps.toml",
        &format!(
            r#"
name = "naps"
[[step]]
name = "p1"
wasm = "{sleep_p1}"
args = ["--secs", "600"]
reuse = false
[[step]]
name = "select"
python = {{ script = "select.py", code = "../code" }}
reuse = false
"#,
            sleep_p1 = plugin("sleep-p1"),
        ),
    );
    let d = start(&p);
    let id = d.trigger("naps");
    d.wait_run(id, "ran both steps", |r| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().filter(|s| s["status"] == "running").count() == 2)
    });
    // Both runtime workers would be asleep in `thread::sleep` now.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        healthy(&d);
    }
    let start = Instant::now();
    let (status, v) = d.post(
        &format!("/api/v1/runs/{id}/cancel"),
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 202, "{v}");
    d.wait_status(id, "cancelled");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "cancelling took {:?}",
        start.elapsed()
    );
    healthy(&d);
    assert_eq!(d.stop(), 0);
}

#[test]
fn descriptors_are_capped_per_guest_and_the_daemon_keeps_serving() {
    let p = Project::new();
    config(&p, "");
    p.write("data/x.txt", "x\n");
    // Opens until refused, says how far it got, then holds them all while asleep.
    p.write(
        "code/hoard.py",
        r#"
import select
held = []
try:
    while True:
        held.append(open("/in/a/x.txt"))
except OSError as e:
    print("opened", len(held), "then:", e, flush=True)
select.select([], [], [], 600)
"#,
    );
    p.write(
        "code/fds.py",
        "held = []\nwhile True:\n    held.append(open('/in/a/x.txt'))\n",
    );
    p.write(
        "pipelines/fds.toml",
        &format!(
            r#"
name = "fds"
[inputs.a]
path = "../data"
[[step]]
name = "p2"
wasm = "{attack}"
args = ["fds", "--file", "/in/a/x.txt", "--count", "100000"]
inputs = {{ a = "inputs.a" }}
reuse = false
[[step]]
name = "p1"
wasm = "{attack_p1}"
args = ["fds", "--file", "/in/a/x.txt", "--count", "100000"]
inputs = {{ a = "inputs.a" }}
reuse = false
[[step]]
name = "python"
python = {{ script = "fds.py", code = "../code" }}
inputs = {{ a = "inputs.a" }}
reuse = false
"#,
            attack = plugin("attack"),
            attack_p1 = plugin("attack-p1"),
        ),
    );
    p.write(
        "pipelines/hoard.toml",
        r#"
name = "hoard"
[inputs.a]
path = "../data"
[[step]]
name = "hoard"
python = { script = "hoard.py", code = "../code" }
inputs = { a = "inputs.a" }
reuse = false
"#,
    );
    let d = start(&p);
    let id = d.trigger("fds");
    let run = d.wait_run(id, "ended", |r| r["status"] == "failed");
    assert_eq!(
        api_step(&run, "p2")["error"],
        "handle limit of 4096 open files, directories and streams exceeded",
        "{run}"
    );
    for step in ["p1", "python"] {
        assert_eq!(
            api_step(&run, step)["error"],
            "exited with code 1 after the descriptor limit of 1024 open files refused an open (EMFILE)",
            "{run}"
        );
    }
    healthy(&d);

    // A guest holding its whole allowance leaves the daemon serving.
    let id = d.trigger("hoard");
    d.wait_run(id, "ran its step", |r| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["status"] == "running"))
    });
    let log = eventually(60, || {
        let log = step_log(&p, "hoard");
        if log.contains("opened ") {
            Ok(log)
        } else {
            Err(format!("no `opened` line yet: {log}"))
        }
    });
    assert!(
        log.contains("opened 10") && log.contains("No file descriptors available"),
        "{log}"
    );
    for _ in 0..5 {
        healthy(&d);
    }
    let (status, v) = d.post(
        &format!("/api/v1/runs/{id}/cancel"),
        serde_json::json!({}),
        None,
    );
    assert_eq!(status, 202, "{v}");
    d.wait_status(id, "cancelled");
    healthy(&d);
    assert_eq!(d.stop(), 0);
}
