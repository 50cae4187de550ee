//! `foreach`: one execution per top-level entry of an artifact, each on its own
//! key, the outputs merged into the step's.

use crate::common::{Project, plugin, stderr, step_error, step_log};

/// `score` copies each item of `inputs.inbox` into `scored`; `count` reads the
/// merged output whole (fan-in needs nothing new).
fn copy_pipeline(p: &Project, extra_args: &str) -> String {
    let copy = plugin("copy");
    p.write(
        "fe.toml",
        &format!(
            r#"
name = "fe"
[inputs.inbox]
path = "inbox"
[[step]]
name = "score"
wasm = "{copy}"
args = ["--out", "scored"{extra_args}]
inputs = {{ inbox = "inputs.inbox" }}
foreach = "inputs.inbox"
outputs = ["scored"]
[[step]]
name = "count"
wasm = "{copy}"
args = ["--out", "all"]
inputs = {{ scored = "score.scored" }}
outputs = ["all"]
"#
        ),
    )
    .display()
    .to_string()
}

/// The `items` of step `step` in the latest run.
fn items(p: &Project, step: &str) -> serde_json::Value {
    let v = p.json(&["runs", "show", "latest"]);
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == step)
        .map(|s| s["items"].clone())
        .expect("the step")
}

fn counts(items: &serde_json::Value) -> (u64, u64, u64, u64) {
    let n = |k: &str| items[k].as_u64().unwrap_or(u64::MAX);
    (n("total"), n("executed"), n("reused"), n("failed"))
}

/// The files of an output, exported.
fn exported(p: &Project, output: &str) -> Vec<String> {
    let dir = p.path(&format!("export-{}", output.replace('.', "-")));
    let _ = std::fs::remove_dir_all(&dir);
    let out = p.run(&["output", "latest", output, "-o", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_new_file_in_the_inbox_executes_one_item_and_reuses_the_others() {
    let p = Project::new();
    for k in 0..200 {
        p.write(&format!("inbox/f{k:03}.csv"), &format!("row {k}\n"));
    }
    let f = copy_pipeline(&p, "");
    let out = p.run(&["run", &f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(counts(&items(&p, "score")), (200, 200, 0, 0));
    assert_eq!(exported(&p, "score.scored").len(), 200);

    // Nothing changed: every item reused, and so is what reads their union.
    let out = p.run(&["run", &f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(counts(&items(&p, "score")), (200, 0, 200, 0));
    let show = p.json(&["runs", "show", "latest"]);
    assert_eq!(show["steps"][1]["status"], "reused", "{show}");

    p.write("inbox/new.csv", "row new\n");
    let plan = p.run(&["plan", &f]);
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert!(
        plan.contains("items  1 to execute, 200 reused: new.csv"),
        "{plan}"
    );
    let out = p.run(&["run", &f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(counts(&items(&p, "score")), (201, 1, 200, 0));
    let scored = exported(&p, "score.scored");
    assert_eq!(scored.len(), 201);
    assert!(scored.contains(&"new.csv".to_string()));
    assert_eq!(exported(&p, "count.all").len(), 201);
    let shown = p.run(&["runs", "show", "latest"]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains("201 items: 1 executed, 200 reused"),
        "{shown}"
    );
}

#[test]
fn a_failing_item_fails_the_step_naming_it_and_only_it_runs_again() {
    let p = Project::new();
    for k in ["a.csv", "b.csv", "c.csv"] {
        p.write(&format!("inbox/{k}"), &format!("good {k}\n"));
    }
    p.write("inbox/bad.csv", "bad\n");
    p.write(
        "code/score.py",
        r#"
import os, sys
item = os.environ["MILLRACE_ITEM"]
# The mount holds this item and nothing else.
assert os.listdir("/in/inbox") == [item], os.listdir("/in/inbox")
text = open(f"/in/inbox/{item}").read()
if text.startswith("bad"):
    print(f"cannot score {item}", file=sys.stderr)
    sys.exit(4)
os.makedirs("/out/scored", exist_ok=True)
with open(f"/out/scored/{item}", "w") as f:
    f.write(text.upper())
"#,
    );
    let f = p.write(
        "py.toml",
        r#"
name = "fe-py"
[inputs.inbox]
path = "inbox"
[[step]]
name = "score"
python = { script = "score.py", code = "code" }
inputs = { inbox = "inputs.inbox" }
foreach = "inputs.inbox"
outputs = ["scored"]
[[step]]
name = "after"
wasm = "PLUGIN"
inputs = { s = "score.scored" }
outputs = ["out"]
"#
        .replace("PLUGIN", &plugin("copy"))
        .as_str(),
    );
    let f = f.to_str().unwrap();
    let out = p.run(&["run", f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = step_error(&p, "score");
    assert!(error.contains("1 of 4 items failed: `bad.csv`:"), "{error}");
    assert_eq!(counts(&items(&p, "score")), (4, 3, 0, 1));
    let log = step_log(&p, "score");
    assert!(log.contains("cannot score bad.csv"), "{log}");
    let show = p.json(&["runs", "show", "latest"]);
    assert_eq!(show["steps"][1]["status"], "skipped", "{show}");

    // Resumed: the items that succeeded in this run keep their outputs; only
    // the failed one executes again (and fails again).
    let out = p.run(&["resume", "latest"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(counts(&items(&p, "score")), (4, 0, 3, 1));

    // A new run, unchanged: the same.
    let out = p.run(&["run", f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(counts(&items(&p, "score")), (4, 0, 3, 1));

    p.write("inbox/bad.csv", "fixed\n");
    let out = p.run(&["run", f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(counts(&items(&p, "score")), (4, 1, 3, 0));
    assert_eq!(
        exported(&p, "score.scored"),
        ["a.csv", "b.csv", "bad.csv", "c.csv"]
    );
}

#[test]
fn two_items_writing_one_path_fail_the_step_naming_both() {
    let p = Project::new();
    p.write("inbox/x.csv", "x\n");
    p.write("inbox/y.csv", "y\n");
    // `--record-args` makes every item write `args.txt`.
    let f = copy_pipeline(&p, ", \"--record-args\"");
    let out = p.run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = step_error(&p, "score");
    assert!(
        error.contains("items `x.csv` and `y.csv` both wrote `args.txt`"),
        "{error}"
    );
}

#[test]
fn an_empty_input_is_zero_items_and_succeeds() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("inbox")).unwrap();
    let f = copy_pipeline(&p, "");
    let out = p.run(&["run", &f]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(counts(&items(&p, "score")), (0, 0, 0, 0));
    let shown = p.run(&["runs", "show", "latest"]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains("0 items: 0 executed, 0 reused"), "{shown}");
    assert!(exported(&p, "score.scored").is_empty());
}

#[test]
fn foreach_over_a_file_input_fails_saying_so() {
    let p = Project::new();
    let f = copy_pipeline(&p, "");
    p.write("inbox", "a file, not a directory\n");
    let out = p.run(&["run", &f]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = step_error(&p, "score");
    assert!(
        error.contains("is a single file; foreach runs once per entry of a directory"),
        "{error}"
    );
}

#[test]
fn foreach_over_a_step_output_runs_once_per_entry_it_wrote() {
    let p = Project::new();
    p.write("inbox/a.csv", "a\n");
    p.write("inbox/sub/b.csv", "b\n");
    let copy = plugin("copy");
    let f = p.write(
        "fe.toml",
        &format!(
            r#"
[inputs.inbox]
path = "inbox"
[[step]]
name = "split"
wasm = "{copy}"
args = ["--out", "parts"]
inputs = {{ inbox = "inputs.inbox" }}
outputs = ["parts"]
[[step]]
name = "each"
wasm = "{copy}"
args = ["--out", "done"]
inputs = {{ part = "split.parts" }}
foreach = "split.parts"
outputs = ["done"]
"#
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Two entries: the file `a.csv` and the directory `sub`.
    let items = items(&p, "each");
    assert_eq!(counts(&items), (2, 2, 0, 0));
    let names: Vec<&str> = items["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a.csv", "sub"]);
    assert_eq!(exported(&p, "each.done"), ["a.csv", "sub"]);
}

#[test]
fn a_script_whose_code_directory_holds_the_inbox_is_warned_about() {
    // The code directory is part of the key: an inbox inside it would make every
    // drop re-execute every item. `validate` says so at the step's `python`.
    let p = Project::new();
    p.write("inbox/a.csv", "1\n");
    p.write("score.py", "print(1)\n");
    p.write("src/score.py", "print(1)\n");
    let beside = p.write(
        "beside.toml",
        "[inputs.inbox]\npath = \"inbox\"\n[[step]]\nname = \"score\"\npython = \"score.py\"\ninputs = { inbox = \"inputs.inbox\" }\nforeach = \"inputs.inbox\"\n",
    );
    let out = p.run(&["validate", beside.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("beside.toml:5:10: warning: step `score`'s code directory (the pipeline's directory) holds data: input `inbox` (inbox)"),
        "{err}"
    );
    assert!(err.contains("code = \"src\""), "{err}");
    let own = p.write(
        "own.toml",
        "[inputs.inbox]\npath = \"inbox\"\n[[step]]\nname = \"score\"\npython = { script = \"score.py\", code = \"src\" }\ninputs = { inbox = \"inputs.inbox\" }\nforeach = \"inputs.inbox\"\n",
    );
    let out = p.run(&["validate", own.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}
