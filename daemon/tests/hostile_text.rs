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
