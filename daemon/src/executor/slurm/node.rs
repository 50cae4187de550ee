//! `millrace exec-step` on a Slurm node: the staged spec in, the guest run by the
//! same wasm runtime as on the daemon's host, `result.json` out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::executor::Mount;

/// What `millrace exec-step` runs on the node (the staged `spec.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// The wasm program (the step's, staged; or the Python runtime on the node).
    pub program: PathBuf,
    /// Its content digest: the precompile cache key.
    pub digest: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub memory: u64,
    pub timeout_ms: u64,
    /// The guest's stdout and stderr.
    pub log: PathBuf,
    pub log_cap: u64,
    /// Where the outcome is written.
    pub result: PathBuf,
    /// What `/out`, `/tmp` and `/millrace` may hold together (MILLRACE_OUTPUT_CAP of
    /// the daemon).
    #[serde(default = "no_cap")]
    pub output_cap: u64,
    /// The daemon's walk limits (MILLRACE_MAX_DEPTH, MILLRACE_MAX_ENTRIES).
    #[serde(default)]
    pub walk: crate::store::walk::Limits,
    /// The step's secret values, masked in the node's log as in the daemon's
    /// (this file is its owner's alone, and removed with the job's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<Vec<u8>>,
}

fn no_cap() -> u64 {
    u64::MAX
}

/// How the guest ended on the node (`result.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum JobResult {
    Exited {
        code: i32,
    },
    Trapped {
        message: String,
    },
    OutOfMemory,
    TimedOut {
        ms: u64,
    },
    /// Another limit of the sandbox (the wasm stack, descriptors); the message names it.
    Limit {
        code: Option<i32>,
        message: String,
    },
    /// `/out` and `/tmp` grew past the output cap; the guest was stopped.
    DiskFull {
        used: u64,
    },
    /// exec-step itself failed (bad spec, cannot compile, …).
    Error {
        message: String,
    },
}

/// `millrace exec-step SPEC`: runs the staged step on this node and writes its
/// result. Exit code: the guest's (0 success), 1 for anything else.
pub async fn exec_step(spec_path: &Path) -> i32 {
    let spec: JobSpec = match std::fs::read_to_string(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("exec-step: cannot read {}: {e}", spec_path.display());
            return 1;
        }
    };
    let result = run_spec(&spec).await;
    let code = match &result {
        JobResult::Exited { code } => *code,
        JobResult::Error { message } => {
            eprintln!("exec-step: {message}");
            1
        }
        _ => 1,
    };
    let text = serde_json::to_string(&result).expect("plain data serialises");
    let tmp = spec.result.with_extension("json.part");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &spec.result)) {
        eprintln!("exec-step: cannot write {}: {e}", spec.result.display());
        return 1;
    }
    code
}

async fn run_spec(spec: &JobSpec) -> JobResult {
    use crate::executor::wasm::{Sandbox, WasmRuntime};
    use crate::executor::{LogFile, Outcome};
    let log = match LogFile::create(&spec.log, spec.log_cap) {
        Ok(l) => l,
        Err(e) => {
            return JobResult::Error {
                message: format!("cannot create the log {}: {e}", spec.log.display()),
            };
        }
    };
    log.redact(spec.redact.iter().cloned());
    let cache = match std::env::var_os("MILLRACE_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => spec
            .result
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("cache"))
            .unwrap_or_else(|| PathBuf::from(".millrace-cache")),
    };
    let wasm = match WasmRuntime::new(&cache, 1) {
        Ok(w) => w,
        Err(e) => {
            return JobResult::Error {
                message: e.to_string(),
            };
        }
    };
    let sandbox = Sandbox {
        args: spec.args.clone(),
        env: spec.env.clone(),
        mounts: spec.mounts.clone(),
        log,
        memory: spec.memory,
        timeout: Some(Duration::from_millis(spec.timeout_ms)),
        disk: spec.output_cap,
    };
    // The cap on what the guest writes holds here as on the daemon's host.
    let watched: Vec<PathBuf> = spec
        .mounts
        .iter()
        .filter(|m| m.writable && matches!(m.guest.as_str(), "/out" | "/tmp" | "/millrace"))
        .map(|m| m.host.clone())
        .collect();
    let ran = tokio::select! {
        r = wasm.run(&spec.program, &spec.digest, sandbox) => r,
        used = crate::executor::workspace::watch_disk(watched, spec.output_cap, spec.walk) => {
            return JobResult::DiskFull { used };
        }
    };
    match ran {
        Ok(Outcome::Exited(code)) => JobResult::Exited { code },
        Ok(Outcome::Trapped(message)) => JobResult::Trapped { message },
        Ok(Outcome::OutOfMemory { .. }) => JobResult::OutOfMemory,
        Ok(Outcome::Limit { code, message }) => JobResult::Limit { code, message },
        Ok(Outcome::TimedOut { after, .. }) => JobResult::TimedOut {
            ms: after.as_millis() as u64,
        },
        Ok(Outcome::DiskFull { used, .. }) => JobResult::DiskFull { used },
        // Not what the wasm runtime reports; worded, should it ever.
        Ok(other) => JobResult::Error {
            message: other
                .failure()
                .map(|f| f.message)
                .unwrap_or_else(|| format!("{other:?}")),
        },
        Err(e) => JobResult::Error {
            message: e.to_string(),
        },
    }
}
