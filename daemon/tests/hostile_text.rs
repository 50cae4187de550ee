//! Non-ASCII and non-UTF-8 text in pipeline files and the daemon config: every
//! command gives a result or an error at its line and column (never exit 101), and
//! the daemon starts with such files present and reloads them when they change.

use std::time::{Duration, Instant};

use crate::common::{Project, plugin, stderr};
use crate::daemon::{Daemon, config};

fn unicode_pipeline(env_plugin: &str) -> String {
    format!(
        r#"# Ünïcödé in a comment: 日本語 🦀 e{comb}
name = "unicode"
description = "café ☕"
[params]
greeting = "héllo wörld"
[[step]]
name = "show"
wasm = "{env_plugin}"
args = ["café", "${{params.greeting}}", "日本語", "e{comb}", "$${{é}}"]
env = {{ LANG_NAME = "français ${{params.greeting}}", EMOJI = "🦀" }}
outputs = ["out"]
"#,
        comb = '\u{301}'
    )
}

fn status(out: &std::process::Output) -> Option<i32> {
    assert_ne!(out.status.code(), Some(101), "panicked: {}", stderr(out));
    out.status.code()
}

#[test]
fn non_ascii_args_env_params_and_comments_validate_plan_and_run() {
    let p = Project::new();
    let f = p.write("unicode.toml", &unicode_pipeline(&plugin("env")));
    let f = f.to_str().unwrap();
    for args in [vec!["validate", f], vec!["plan", f]] {
        let out = p.run(&args);
        assert_eq!(status(&out), Some(0), "{args:?}: {}", stderr(&out));
    }
    let out = p.run(&["run", f, "--param", "greeting=ça va"]);
    assert_eq!(status(&out), Some(0), "{}", stderr(&out));
    let env = String::from_utf8_lossy(&p.run(&["output", "1", "show.out"]).stdout).into_owned();
    for want in [
        "argv[01]=café",
        "argv[02]=ça va",
        "argv[03]=日本語",
        "argv[04]=e\u{301}",
        "argv[05]=${é}",
        "LANG_NAME=français ça va",
        "EMOJI=🦀",
    ] {
        assert!(env.contains(want), "{want} missing from {env}");
    }
}

#[test]
fn non_ascii_names_and_interpolations_are_errors_at_their_column() {
    let p = Project::new();
    let noop = plugin("noop");
    let f = p.write(
        "names.toml",
        &format!(
            "name = \"café\"\n[params]\n\"é\" = 1\n[[step]]\nname = \"日本\"\nwasm = \"{noop}\"\nargs = [\"日本 ${{params.nö}}\", \"${{é}}\"]\noutputs = [\"ü\"]\n"
        ),
    );
    let f = f.to_str().unwrap();
    for cmd in ["validate", "plan", "run"] {
        let out = p.run(&[cmd, f]);
        assert_eq!(status(&out), Some(78), "{cmd}: {}", stderr(&out));
        let err = stderr(&out);
        for want in [
            "names.toml:1:8: error: bad pipeline name `café`",
            "names.toml:3:1: error: bad param name `é`",
            "names.toml:5:8: error: bad step name `日本`",
            // Columns count characters: `日本 ` is 3 of them.
            "names.toml:7:13: error: unknown param `nö`",
            "names.toml:7:29: error: bad interpolation `${é}`",
            "names.toml:8:12: error: bad output name `ü`",
        ] {
            assert!(err.contains(want), "{cmd}: {want} missing from\n{err}");
        }
        // The caret lines up under the wide characters (2 cells each): 8 + 1 +
        // 2 × 2 + 1 cells before it, one `^` per character of `${params.nö}`.
        let caret = format!(
            "   7 | args = [\"日本 ${{params.nö}}\", \"${{é}}\"]\n     | {}{}\n",
            " ".repeat(14),
            "^".repeat(12)
        );
        assert!(err.contains(&caret), "{err}");
    }
}

#[test]
fn invalid_utf8_is_an_error_at_its_line_and_column() {
    let p = Project::new();
    let noop = plugin("noop");
    let f = p.path("latin1.toml");
    let mut bytes =
        format!("[[step]]\nname = \"a\"\nwasm = \"{noop}\"\nargs = [\"caf").into_bytes();
    bytes.extend_from_slice(b"\xe9\"]\n");
    std::fs::write(&f, &bytes).unwrap();
    let f = f.to_str().unwrap();
    for cmd in ["validate", "plan", "run"] {
        let out = p.run(&[cmd, f]);
        assert_eq!(status(&out), Some(78), "{cmd}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(
                "latin1.toml:4:13: error: invalid UTF-8: byte 0xE9 is not part of a valid character\n   4 | args = [\"caf\u{FFFD}\"]\n     |             ^\n"
            ),
            "{cmd}: {err}"
        );
    }
    let out = p.run(&["--json", "validate", f]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["diagnostics"][0]["line"], 4, "{v}");
    assert_eq!(v[0]["diagnostics"][0]["column"], 13, "{v}");

    // The daemon config too.
    let c = p.path("millrace.toml");
    std::fs::write(
        &c,
        b"pipelines = \"pipelines\"\n# r\xc3sum\xc3\xa9\nstate_dir = \".state\"\n",
    )
    .unwrap();
    let out = p.run(&["validate", "--config", c.to_str().unwrap(), "--config-only"]);
    assert_eq!(status(&out), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("millrace.toml:2:4: error: invalid UTF-8: byte 0xC3"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_daemon_starts_with_non_ascii_and_non_utf8_files_and_reloads_them() {
    let p = Project::new();
    config(&p, "");
    let noop = plugin("noop");
    // In file order: an invalid one first, so the ones after it must still load.
    std::fs::create_dir_all(p.path("pipelines")).unwrap();
    std::fs::write(p.path("pipelines/a-latin1.toml"), b"name = \"caf\xe9\"\n").unwrap();
    p.write(
        "pipelines/b-names.toml",
        "name = \"b-names\"\n[[step]]\nname = \"日本\"\nwasm = \"x.wasm\"\n",
    );
    p.write("pipelines/c-unicode.toml", &unicode_pipeline(&noop));
    let d = Daemon::start(&p);
    let v = d.get("/api/v1/pipelines");
    let names: Vec<&str> = v["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["unicode"], "{v}");
    let invalid = v["invalid_files"].to_string();
    assert!(invalid.contains("a-latin1.toml:1:12"), "{invalid}");
    assert!(invalid.contains("b-names.toml:3:8"), "{invalid}");
    let id = d.trigger("unicode");
    d.wait_status(id, "succeeded");

    // Changed on disk: the watcher reloads it (and the file after the bad one).
    std::fs::write(
        p.path("pipelines/a-latin1.toml"),
        b"name = \"caf\xc3\xa9\"\n",
    )
    .unwrap();
    p.write(
        "pipelines/c-unicode.toml",
        &unicode_pipeline(&noop).replace("café ☕", "thé 🍵"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.get("/api/v1/pipelines/unicode")["description"] != "thé 🍵" {
        assert!(Instant::now() < deadline, "not reloaded: {}", d.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let invalid = d.get("/api/v1/pipelines")["invalid_files"].to_string();
    assert!(
        invalid.contains("a-latin1.toml:1:8: error: bad pipeline name `café`"),
        "{invalid}"
    );
    // SIGHUP re-reads them all; the daemon carries on.
    let endpoint: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.path(".state/daemon.json")).unwrap())
            .unwrap();
    let pid = endpoint["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    std::thread::sleep(Duration::from_millis(500));
    let id = d.trigger("unicode");
    d.wait_status(id, "succeeded");
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(d.stop(), 0);
}

/// Defence in depth: a checker that panics on one file (injected, debug builds
/// only) costs that file alone. The daemon starts, logs the error with the file's
/// name, loads the files after it, and its watcher and SIGHUP keep reloading.
#[test]
fn a_panic_while_checking_one_file_spares_the_daemon_and_the_other_files() {
    let p = Project::new();
    let config = config(&p, "");
    let noop = plugin("noop");
    let good =
        |name: &str| format!("name = \"{name}\"\n[[step]]\nname = \"a\"\nwasm = \"{noop}\"\n");
    p.write("pipelines/a-panics.toml", &good("first"));
    p.write("pipelines/b-good.toml", &good("second"));
    let log = p.path("daemon.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_millrace"))
        .current_dir(p.dir.path())
        .args(["daemon", "--config"])
        .arg(&config)
        .env("MILLRACE_LOG", "info")
        .env("MILLRACE_TEST_PANIC_IN_CHECK", "a-panics.toml")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let endpoint = crate::common::eventually(60, || {
        std::fs::read_to_string(p.path(".state/daemon.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .ok_or_else(|| format!("not started: {}", log_text()))
    });
    let url = endpoint["url"].as_str().unwrap().to_string();
    let pid = endpoint["pid"].as_i64().unwrap() as i32;
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    );
    let get = |path: &str| -> serde_json::Value {
        agent
            .get(format!("{url}{path}"))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    };
    let loaded = || -> Vec<String> {
        get("/api/v1/pipelines")["pipelines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(loaded(), ["second"], "{}", log_text());
    let invalid = get("/api/v1/pipelines")["invalid_files"].to_string();
    assert!(
        invalid.contains("a-panics.toml:1:1: error: internal error while checking this file"),
        "{invalid}"
    );
    assert!(
        log_text().contains(
            "a-panics.toml:1:1: error: internal error while checking this file: injected"
        ),
        "{}",
        log_text()
    );
    // The watcher still reloads: both files change, the one after the bad one loads.
    p.write("pipelines/a-panics.toml", &good("first-again"));
    p.write("pipelines/b-good.toml", &good("third"));
    crate::common::eventually(20, || match loaded() {
        l if l == ["third"] => Ok(()),
        l => Err(format!("{l:?}: {}", log_text())),
    });
    // And SIGHUP: a new file is loaded, the daemon carries on.
    p.write("pipelines/c-new.toml", &good("fourth"));
    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    crate::common::eventually(20, || match loaded() {
        l if l == ["fourth", "third"] => Ok(()),
        l => Err(format!("{l:?}: {}", log_text())),
    });
    assert!(child.try_wait().unwrap().is_none(), "{}", log_text());
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", log_text());
}
