//! Step-scoped params and `${…}` in paths: a step's key and environment hold only
//! the params it uses; `${params.x}` picks input directories and transfer
//! targets and never leaves a datastore; `${inputs.M}`/`${outputs.O}` expand to
//! the sandbox's mount paths.

use crate::common::{Project, plugin, stderr};

/// The retrain shape: prepare reads `test_size`, train reads `c` (both straight
/// from the environment, so they name them), evaluate and publish read neither.
fn retrain(p: &Project) -> String {
    p.write("data/wine.csv", "a,b\n1,2\n");
    p.write(
        "retrain.toml",
        &format!(
            r#"
[params]
c = 1.0
test_size = 0.3
[inputs.wine]
path = "data/wine.csv"
[[step]]
name = "prepare"
wasm = "{env}"
params = ["test_size"]
inputs = {{ raw = "inputs.wine" }}
outputs = ["out"]
[[step]]
name = "train"
wasm = "{env}"
params = ["c"]
inputs = {{ split = "prepare.out" }}
outputs = ["out"]
[[step]]
name = "evaluate"
wasm = "{copy}"
args = ["--per-input"]
inputs = {{ model = "train.out", split = "prepare.out" }}
outputs = ["out"]
[[step]]
name = "publish"
transfer = {{ from = "train.out", to = "models/latest" }}
"#,
            env = plugin("env"),
            copy = plugin("copy"),
        ),
    )
    .to_str()
    .unwrap()
    .to_string()
}

fn env_of(p: &Project, run: &str, step: &str) -> String {
    let out = p.run(&["output", run, &format!("{step}.out"), "-o", "got"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(p.path("got/env.txt")).unwrap();
    std::fs::remove_dir_all(p.path("got")).unwrap();
    text
}

#[test]
fn a_new_c_reuses_prepare_and_runs_train() {
    let p = Project::new();
    let f = retrain(&p);
    let first = p.json(&["run", &f]);
    assert_eq!(
        (first["status"].as_str(), first["executed"].as_u64()),
        (Some("succeeded"), Some(4)),
        "{first}"
    );

    let plan = p.json(&["plan", &f, "--param", "c=0.5"]);
    let rows: Vec<(String, String, String)> = plan
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["step"].as_str().unwrap().to_string(),
                d["plan"]["decision"].as_str().unwrap().to_string(),
                d["params"].to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("prepare".into(), "reuse".into(), r#"["test_size"]"#.into()),
            ("train".into(), "run".into(), r#"["c"]"#.into()),
            ("evaluate".into(), "pending".into(), "[]".into()),
            ("publish".into(), "pending".into(), "[]".into()),
        ]
    );
    let text =
        String::from_utf8_lossy(&p.run(&["plan", &f, "--param", "c=0.5"]).stdout).into_owned();
    assert!(
        text.contains(
            "train     run    vs run 1: param `c` changed: float:1.0 → float:0.5  (params: c)"
        ),
        "{text}"
    );
    assert!(
        text.contains("prepare   reuse  from run 1  (params: test_size)"),
        "{text}"
    );

    let second = p.json(&["run", &f, "--param", "c=0.5"]);
    assert_eq!(
        (
            second["status"].as_str(),
            second["executed"].as_u64(),
            second["reused"].as_u64()
        ),
        (Some("succeeded"), Some(3), Some(1)),
        "{second}"
    );
    // The key holds the params the step uses, and `runs show` says so.
    let show = p.json(&["runs", "show", "2"]);
    let params_of = |step: &str| {
        show["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == step)
            .unwrap()["key_parts"]["params"]
            .clone()
    };
    assert_eq!(params_of("train"), serde_json::json!({"c": "float:0.5"}));
    assert_eq!(
        params_of("prepare"),
        serde_json::json!({"test_size": "float:0.3"})
    );
    assert_eq!(params_of("evaluate"), serde_json::json!({}));
    let explain = String::from_utf8_lossy(&p.run(&["explain", "2", "train"]).stdout).into_owned();
    assert!(explain.contains("params: c = float:0.5"), "{explain}");
}

#[test]
fn a_param_a_step_does_not_use_is_invisible_to_it() {
    let p = Project::new();
    let f = retrain(&p);
    let out = p.run(&["run", &f, "--param", "c=0.25"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let train = env_of(&p, "1", "train");
    assert!(train.contains("MILLRACE_PARAM_C=0.25\n"), "{train}");
    assert!(!train.contains("MILLRACE_PARAM_TEST_SIZE"), "{train}");
    let prepare = env_of(&p, "1", "prepare");
    assert!(
        prepare.contains("MILLRACE_PARAM_TEST_SIZE=0.3\n"),
        "{prepare}"
    );
    assert!(!prepare.contains("MILLRACE_PARAM_C"), "{prepare}");
}

#[test]
fn naming_an_undeclared_param_is_a_located_error() {
    let p = Project::new();
    let f = p.write(
        "p.toml",
        &format!(
            "[params]\nc = 1\n[[step]]\nname = \"s\"\nwasm = \"{}\"\nparams = [\"c\", \"nope\"]\n",
            plugin("env")
        ),
    );
    let out = p.run(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("p.toml:6:16: error: unknown param `nope`"),
        "{}",
        stderr(&out)
    );
}

fn daily(p: &Project) -> String {
    p.write("data/2026-11-30/rows.csv", "x\n1\n");
    p.write("data/2026-12-01/rows.csv", "x\n2\n");
    p.write(
        "daily.toml",
        &format!(
            r#"
[params]
day = "2026-11-30"
[inputs.rows]
path = "data/${{params.day}}"
[[step]]
name = "copy"
wasm = "{}"
inputs = {{ rows = "inputs.rows" }}
outputs = ["out"]
[[step]]
name = "publish"
transfer = {{ from = "copy.out", to = "published/${{params.day}}" }}
"#,
            plugin("copy")
        ),
    )
    .to_str()
    .unwrap()
    .to_string()
}

#[test]
fn a_param_selects_the_input_directory_and_the_transfer_target() {
    let p = Project::new();
    let f = daily(&p);
    let out = p.run(&["run", &f]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.run(&["run", &f, "--param", "day=2026-12-01"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |rel: &str| std::fs::read_to_string(p.path(rel)).unwrap();
    assert_eq!(read("published/2026-11-30/rows.csv"), "x\n1\n");
    assert_eq!(read("published/2026-12-01/rows.csv"), "x\n2\n");
    assert!(!p.path("published/${params.day}").exists());
    // The run records the directory it read.
    let show = p.json(&["runs", "show", "2"]);
    let path = show["inputs"][0]["path"].as_str().unwrap();
    assert!(path.ends_with("data/2026-12-01"), "{show}");
}

#[test]
fn a_param_that_would_leave_the_datastore_is_refused_before_anything_runs() {
    let p = Project::new();
    let f = daily(&p);
    p.write("x/rows.csv", "secret\n");
    for cmd in ["run", "plan"] {
        let out = p.run(&[cmd, &f, "--param", "day=../x"]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(
                "input `rows` path `data/${params.day}` resolves to `data/../x` (with day = \"../x\"), which has a `..` component: it would leave its datastore"
            ),
            "{}",
            stderr(&out)
        );
    }
    // Nothing was recorded, nothing published.
    assert_eq!(p.json(&["runs"]).as_array().map(Vec::len), Some(0));
    assert!(!p.path("published").exists());
}

#[test]
fn inputs_and_outputs_in_args_and_env_expand_to_the_mount_paths() {
    let p = Project::new();
    p.write("data/rows.csv", "x\n1\n");
    let f = p.write(
        "mounts.toml",
        &format!(
            r#"
[inputs.rows]
path = "data/rows.csv"
[[step]]
name = "show"
wasm = "{}"
args = ["--data=${{inputs.data}}", "--model", "${{outputs.out}}/model.bin", "$${{inputs.data}}"]
env = {{ DATA = "${{inputs.data}}/rows.csv" }}
inputs = {{ data = "inputs.rows" }}
outputs = ["out"]
"#,
            plugin("env")
        ),
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let env = env_of(&p, "1", "show");
    for want in [
        "argv[01]=--data=/in/data\n",
        "argv[03]=/out/out/model.bin\n",
        "argv[04]=${inputs.data}\n",
        "DATA=/in/data/rows.csv\n",
    ] {
        assert!(env.contains(want), "{want} missing from {env}");
    }
}

/// A container sees the same mount paths and only the params it uses, through its
/// own settings (`command`, `workdir`) as through `args`.
#[test]
fn a_container_step_expands_mounts_and_params_in_its_settings() {
    let p = Project::new();
    p.write("data/rows.txt", "b\na\n");
    let f = p.write(
        "c.toml",
        r#"
[params]
sep = "-"
unused = 7
[inputs.rows]
path = "data/rows.txt"
[[step]]
name = "sort"
container = { image = "localhost/millrace-busybox:1", command = ["sh", "-c"], workdir = "${inputs.rows}" }
args = ["sort rows.txt > ${outputs.out}/sorted.txt; pwd > ${outputs.out}/pwd.txt; env | grep MILLRACE_PARAM_ | sort > ${outputs.out}/env.txt; echo ${params.sep} >> ${outputs.out}/env.txt"]
inputs = { rows = "inputs.rows" }
outputs = ["out"]
"#,
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.run(&["output", "1", "sort.out", "-o", "got"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = |f: &str| std::fs::read_to_string(p.path(&format!("got/{f}"))).unwrap();
    assert_eq!(read("sorted.txt"), "a\nb\n");
    assert_eq!(read("pwd.txt"), "/in/rows\n");
    assert_eq!(read("env.txt"), "MILLRACE_PARAM_SEP=-\n-\n");
}

/// A Python step: argparse-style paths from `${inputs.M}`/`${outputs.O}` are the
/// paths its sandbox mounts, and it sees only the params it names.
#[test]
fn a_python_step_reads_and_writes_where_its_args_say() {
    let p = Project::new();
    p.write("data/rows.csv", "x\n1\n2\n");
    p.write(
        "code/count.py",
        r#"
import os, sys
src, dst = sys.argv[1], sys.argv[2]
rows = open(os.path.join(src, "rows.csv")).read().split()[1:]
os.makedirs(dst, exist_ok=True)
seen = sorted(k for k in os.environ if k.startswith("MILLRACE_PARAM_"))
with open(os.path.join(dst, "count.txt"), "w") as f:
    f.write(f"{src} {dst} {len(rows)} {' '.join(seen)}\n")
"#,
    );
    let f = p.write(
        "py.toml",
        r#"
[params]
scale = 2
other = "x"
[inputs.rows]
path = "data/rows.csv"
[[step]]
name = "count"
python = { script = "count.py", code = "code" }
args = ["${inputs.data}", "${outputs.result}"]
params = ["scale"]
inputs = { data = "inputs.rows" }
outputs = ["result"]
"#,
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = p.run(&["output", "1", "count.result", "-o", "got"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(p.path("got/count.txt")).unwrap(),
        "/in/data /out/result 2 MILLRACE_PARAM_SCALE\n"
    );
}

/// Through the API: a run whose params would resolve a path out of its datastore
/// is refused (422) and never recorded; a good one records the directory it read.
#[test]
fn the_api_refuses_a_param_that_leaves_the_datastore_and_shows_the_resolved_path() {
    use crate::common::Daemon;
    let p = Project::new();
    p.write("pipelines/data/2026-12-01/rows.csv", "x\n2\n");
    p.write("pipelines/data/2026-11-30/rows.csv", "x\n1\n");
    p.write(
        "pipelines/daily.toml",
        &format!(
            "[params]\nday = \"2026-11-30\"\n[inputs.rows]\npath = \"data/${{params.day}}\"\n[[step]]\nname = \"copy\"\nwasm = \"{}\"\ninputs = {{ rows = \"inputs.rows\" }}\noutputs = [\"out\"]\n",
            plugin("copy")
        ),
    );
    let d = Daemon::in_process(&p);
    let (status, v) = d.post(
        "/api/v1/pipelines/daily/runs",
        serde_json::json!({"params": {"day": "../../x"}}),
        None,
    );
    assert_eq!(status, 422, "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(m.contains("it would leave its datastore"), "{m}");
    assert!(d.runs("daily").is_empty());
    let (status, v) = d.post(
        "/api/v1/pipelines/daily/runs",
        serde_json::json!({"params": {"day": "2026-12-01"}}),
        None,
    );
    assert_eq!(status, 202, "{v}");
    let id = v["run_id"].as_i64().unwrap();
    let run = d.wait_status(id, "succeeded");
    let path = run["inputs"][0]["path"].as_str().unwrap();
    assert!(path.ends_with("data/2026-12-01"), "{run}");
    assert_eq!(d.stop(), 0);
}

#[test]
fn a_script_reading_a_param_its_step_does_not_use_is_warned_about() {
    // The environment holds only the params a step uses: a script that reads
    // MILLRACE_PARAM_C without `params = ["c"]` would fail at run time with a
    // KeyError. `validate` says so first, at the step's `python`.
    let p = Project::new();
    p.write("src/train.py", "import os\nc = float(os.environ['MILLRACE_PARAM_C'])\nn = os.environ.get('MILLRACE_PARAM_N_JOBS')\n");
    let f = p.write(
        "t.toml",
        "[params]\nc = 1.0\nn-jobs = 2\nunused = 3\n[[step]]\nname = \"train\"\npython = { script = \"train.py\", code = \"src\" }\noutputs = [\"m\"]\n",
    );
    let out = p.run(&["validate", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("t.toml:7:21: warning: step `train`'s script train.py reads MILLRACE_PARAM_C, MILLRACE_PARAM_N_JOBS, but the step does not use `c`, `n-jobs`"),
        "{err}"
    );
    assert!(err.contains("params = [\"c\", \"n-jobs\"]"), "{err}");
    let fixed = p.write(
        "ok.toml",
        "[params]\nc = 1.0\nn-jobs = 2\n[[step]]\nname = \"train\"\npython = { script = \"train.py\", code = \"src\" }\nparams = [\"c\", \"n-jobs\"]\noutputs = [\"m\"]\n",
    );
    let out = p.run(&["validate", fixed.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}
