//! Every denial the sandbox promises, proven with a real guest.

use crate::common::{Project, plugin, stderr, wait_until_running};

fn one_step(p: &Project, body: &str) -> String {
    p.write("data/secret/x.txt", "x\n");
    let f = p.write("s.toml", &format!("[inputs.a]\npath = \"data/secret\"\n[[step]]\nname = \"s\"\ninputs = {{ a = \"inputs.a\" }}\n{body}\n"));
    f.display().to_string()
}

fn step_error(p: &Project) -> String {
    let show = p.json(&["runs", "show", "latest"]);
    show["steps"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_busy_loop_is_stopped_by_the_timeout() {
    let p = Project::new();
    let f = one_step(
        &p,
        &format!("wasm = \"{}\"\ntimeout = \"1s\"", plugin("spin")),
    );
    let started = std::time::Instant::now();
    let out = p.run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(started.elapsed().as_secs() < 30);
    assert_eq!(step_error(&p), "timed out after 1s");
}

#[test]
fn a_guest_sleeping_in_a_host_call_is_stopped_by_the_timeout() {
    let p = Project::new();
    let f = one_step(
        &p,
        &format!(
            "wasm = \"{}\"\nargs = [\"--secs\", \"600\"]\ntimeout = \"1s\"",
            plugin("sleep")
        ),
    );
    let started = std::time::Instant::now();
    let out = p.run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        started.elapsed().as_secs() < 30,
        "the sleep was not interrupted"
    );
    assert_eq!(step_error(&p), "timed out after 1s");
}

#[test]
fn memory_beyond_the_limit_fails_the_step() {
    let p = Project::new();
    let f = one_step(
        &p,
        &format!(
            "wasm = \"{}\"\nargs = [\"--mib\", \"512\"]\nmemory = \"64MiB\"",
            plugin("alloc")
        ),
    );
    let out = p.run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(step_error(&p), "memory limit of 64MiB exceeded");
    // Within the limit the same plugin succeeds.
    let f = one_step(
        &p,
        &format!(
            "wasm = \"{}\"\nargs = [\"--mib\", \"32\"]\nmemory = \"128MiB\"",
            plugin("alloc")
        ),
    );
    assert!(p.run(&["run", &f]).status.success());
}

#[test]
fn file_escapes_and_writes_to_inputs_are_denied() {
    let p = Project::new();
    p.write("secret.txt", "top secret\n");
    let secret = p.path("secret.txt").display().to_string();
    let f = one_step(
        &p,
        &format!(
            "wasm = \"{}\"\nargs = [\"--path\", \"{secret}\"]\noutputs = [\"out\"]",
            plugin("escape")
        ),
    );
    let out = p.run(&["run", &f]);
    let log = String::from_utf8_lossy(&p.run(&["logs", "latest", "s"]).stdout).into_owned();
    assert!(out.status.success(), "an escape was allowed:\n{log}");
    assert!(log.contains("DENIED") && !log.contains("ALLOWED"), "{log}");
    assert!(!p.path("data/secret/escape").exists());
}

#[test]
fn a_symlink_in_a_dataset_or_an_output_is_refused() {
    let p = Project::new();
    let f = one_step(&p, &format!("wasm = \"{}\"", plugin("noop")));
    std::os::unix::fs::symlink("/etc/passwd", p.path("data/secret/link")).unwrap();
    let out = p.run(&["run", &f]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("symbolic links cannot be part of an artifact"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sigterm_stops_a_busy_guest_that_has_no_timeout() {
    let p = Project::new();
    let f = one_step(&p, &format!("wasm = \"{}\"", plugin("spin")));
    let mut child = p
        .cmd(&["run", &f])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until_running(&p, "s");
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stop_by = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > stop_by {
            child.kill().unwrap();
            panic!("a spinning guest kept the run alive after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    assert_eq!(p.json(&["runs", "show", "1"])["status"], "cancelled");
}

#[test]
fn a_step_log_is_capped() {
    let p = Project::new();
    let f = one_step(
        &p,
        &format!(
            "wasm = \"{}\"\nargs = [\"--lines\", \"2000\"]",
            plugin("chatty")
        ),
    );
    let out = p
        .cmd(&["run", &f])
        .env("MILLRACE_LOG_CAP", "10KiB")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = p.run(&["logs", "latest", "s"]).stdout;
    assert!(
        log.len() < 10 * 1024 + 200,
        "the log has {} bytes",
        log.len()
    );
    assert!(
        String::from_utf8_lossy(&log)
            .contains("log truncated: output beyond 10240 bytes was dropped")
    );
}
