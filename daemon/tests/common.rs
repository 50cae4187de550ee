//! A temporary project directory with its own state dir, and the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new() -> Project {
        Project {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    }

    /// `millrace --state <tmp>/.state ARGS…`, run in the project directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_millrace"));
        c.current_dir(self.dir.path())
            .arg("--state")
            .arg(self.path(".state"))
            .args(args);
        c.env_remove("MILLRACE_STATE");
        // One compile of the Python runtime for all tests (scripts/test.sh prepares it).
        c.env("MILLRACE_CACHE", shared_cache());
        c
    }

    /// Runs to completion, killing the process (and failing the test) after two
    /// minutes: a hung run must fail CI, not stall it.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_within(args, 120)
    }

    /// As `run`, with another limit in seconds.
    pub fn run_within(&self, args: &[&str], secs: u64) -> Output {
        let mut child = self
            .cmd(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run millrace");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        // Drain the pipes on threads so a chatty child cannot block on a full pipe.
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut v).ok();
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut stderr, &mut v).ok();
            v
        });
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("millrace {args:?} did not finish within {secs} s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        Output {
            status,
            stdout: out.join().expect("stdout"),
            stderr: err.join().expect("stderr"),
        }
    }

    /// Runs and parses stdout as JSON (`--json` is added).
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: stdout={} stderr={}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// Absolute path of a built example plugin.
pub fn plugin(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-plugins.sh first",
        p.display()
    );
    p.canonicalize().expect("canonical").display().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `check` every 50 ms until it gives `Ok`, and fails the test with its
/// last `Err` (what the state was) after `secs` seconds.
pub fn eventually<T>(secs: u64, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > deadline => panic!("after {secs} s: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// The error recorded for `step` of the latest run ("" when none).
pub fn step_error(p: &Project, step: &str) -> String {
    let v = p.json(&["runs", "show", "latest"]);
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == step)
        .map(|s| s["error"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The log of `step` in the latest run.
pub fn step_log(p: &Project, step: &str) -> String {
    String::from_utf8_lossy(&p.run(&["logs", "latest", step]).stdout).into_owned()
}

/// Step name → status of a run, from `runs show --json`.
pub fn step_statuses(p: &Project, run: &str) -> Vec<(String, String)> {
    let v = p.json(&["runs", "show", run]);
    v["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Waits until step `step` of the latest run is running (a minute at most).
pub fn wait_until_running(p: &Project, step: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if p.path(".state/millrace.db").exists() {
            let show = p.json(&["runs", "show", "latest"]);
            let running = show["steps"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|s| s["name"] == step && s["status"] == "running")
            });
            if running {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "step `{step}` never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The precompile cache the tests share (`scripts/test.sh` fills it first).
pub fn shared_cache() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("millrace-cache")
}

/// Every blob of the store still hashes to its name (an attack changed no
/// stored content); the store must hold some.
pub fn rehash_store(p: &Project) {
    let blobs = p.path(".state/objects/blobs");
    let Ok(shards) = std::fs::read_dir(&blobs) else {
        return;
    };
    let mut n = 0;
    for shard in shards {
        let shard = shard.unwrap().path();
        for f in std::fs::read_dir(&shard).unwrap() {
            let f = f.unwrap().path();
            let name = format!(
                "{}{}",
                shard.file_name().unwrap().to_str().unwrap(),
                f.file_name().unwrap().to_str().unwrap()
            );
            let got = blake3::hash(&std::fs::read(&f).unwrap())
                .to_hex()
                .to_string();
            assert_eq!(got, name, "blob {} changed", f.display());
            n += 1;
        }
    }
    assert!(n > 0, "the store holds blobs");
}
