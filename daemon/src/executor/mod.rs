//! Executors: what runs one attempt of a step. One interface for all of them: the
//! engine builds an [`AttemptSpec`] (the program, its arguments, environment,
//! mounts and limits), picks an [`Executor`] with [`Executor::for_step`] and calls
//! [`Executor::run`], which ends in an [`Outcome`]; [`Outcome::failure`] is the one
//! place an outcome is worded for the user.
//!
//! The set is closed, one arm each:
//! - [`Executor::Wasm`]: a wasm step under wasmtime + WASI ([`wasm`]);
//! - [`Executor::Python`]: CPython on WASI, in the same sandbox ([`python`]);
//! - [`Executor::Container`]: an OS image through the Docker Engine API ([`container`]);
//! - [`Executor::Slurm`]: a wasm or Python attempt as a Slurm batch job ([`slurm`]);
//! - [`Executor::Transfer`]: an artifact copied into a datastore ([`transfer`]).
//!
//! A new executor is one file here plus one arm of [`Executor`] (and of its
//! `for_step` and `run`).
//!
//! An executor knows no pipeline, run or database. What it needs of its attempt
//! comes in the spec and the [`AttemptCtx`]; where it runs (a container, a Slurm
//! job) goes out through [`AttemptCtx::on_placement`], which the engine records.
//!
//! # What a step can do (deny by default)
//!
//! Every runtime starts from nothing and grants exactly this:
//! - **Files**: `/in` read-only (one directory per input), `/out` read-write (one
//!   empty directory per output), `/tmp` read-write scratch, `/millrace` with the
//!   metrics file; a Python step also sees its code at `/code` and the standard
//!   library under `/usr/local/lib`, read-only; a step naming `secrets` sees
//!   them under `/run/secrets`, read-only ([`secrets`]). No other host path. Under WASI,
//!   `..`, absolute paths and symlinks leading out of a mount are refused by its
//!   capability checks; in a container the root filesystem is the image's,
//!   read-only unless the step says otherwise.
//! - **Disk**: `/out`, `/tmp` and `/millrace` together hold at most the output cap
//!   (`MILLRACE_OUTPUT_CAP`), and their trees stay within the depth and entry
//!   limits; past them the step is stopped ([`workspace::watch`], on the node too
//!   for a Slurm job).
//! - **Arguments and environment**: as the step gives them, plus the `MILLRACE_*`
//!   variables and `TMPDIR=/tmp`. Nothing of the daemon's own environment.
//! - **Output**: stdout and stderr into one capped log file ([`LogFile`]); no stdin.
//! - **Network**: none. WASI grants no sockets; a container gets a network only
//!   when the step sets `network = true`.
//! - **Memory and time**: the step's `memory` (default [`DEFAULT_MEMORY`]) and
//!   `timeout` (default [`DEFAULT_TIMEOUT`]) always hold: wasm linear memory is
//!   bounded and a failed growth traps; a container gets the same limit with no
//!   swap; wall time is a timer that stops the guest (drops its future, kills the
//!   container, cancels the Slurm job).
//! - **Other resources**: the wasm call stack and open descriptors are bounded
//!   (see [`wasm`]); a container runs as the daemon's uid:gid, unprivileged, with
//!   every capability dropped, `no-new-privileges` and at most 4096 processes.
//! - **Transfer** runs no guest code: it copies one artifact to a datastore path.

pub mod container;
mod log;
pub mod python;
pub mod secrets;
pub mod slurm;
pub mod snapshot;
pub mod transfer;
pub mod wasm;
pub mod workspace;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{self, StepKind};
use crate::model::{Placement, SlurmPlacement};
use crate::store::artifacts::ArtifactStore;

pub use log::LogFile;

/// The memory limit of a step that sets no `memory`.
pub const DEFAULT_MEMORY: u64 = 2 << 30;
/// A step without `timeout` is stopped after a day: wall time is always bounded.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A host directory the guest sees at `guest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mount {
    pub host: PathBuf,
    pub guest: String,
    pub writable: bool,
}

/// What an attempt runs.
#[derive(Debug, Clone)]
pub enum Program {
    /// A WASI program (a step's wasm, or the Python runtime) and its content digest,
    /// the precompile cache key. `shared`: the file is at the same path on every
    /// Slurm node (the Python runtime), so it is not staged.
    Wasm {
        path: PathBuf,
        digest: String,
        shared: bool,
    },
    /// A container image and how to start it.
    Image(Box<container::Launch>),
    /// Copy the artifact `from` (a digest) to the datastore path `to`, replacing
    /// it whole or merging into it.
    Publish {
        from: String,
        to: PathBuf,
        mode: crate::definition::TransferMode,
    },
}

/// Everything one attempt needs, whatever runs it.
pub struct AttemptSpec {
    pub program: Program,
    /// `argv`, program name first, for a WASI program (a container's command is
    /// in its [`container::Launch`]).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// What the step asked for; `None` is the default ([`AttemptSpec::memory`], a
    /// Slurm target's own `--mem`).
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub timeout: Option<Duration>,
    pub log: LogFile,
    /// The log's cap (for a log written elsewhere: a Slurm node's).
    pub log_cap: u64,
    /// What `/out`, `/tmp` and `/millrace` may hold together.
    pub disk_cap: u64,
    /// The depth and entry limits of their walks.
    pub walk: crate::store::walk::Limits,
}

impl AttemptSpec {
    /// The memory limit that holds.
    pub fn memory(&self) -> u64 {
        self.memory.unwrap_or(DEFAULT_MEMORY)
    }

    /// The wall-time limit that holds.
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The host directories the disk cap watches, with their names in the sandbox.
    pub fn watched(&self) -> Vec<(String, PathBuf)> {
        ["/out", "/tmp", "/millrace"]
            .iter()
            .filter_map(|g| {
                self.mounts
                    .iter()
                    .find(|m| m.guest == *g)
                    .map(|m| (m.guest.clone(), m.host.clone()))
            })
            .collect()
    }
}

/// Which attempt this is: what names its container, its Slurm job and its staging
/// directory, so that two attempts (or two state directories) never meet.
#[derive(Debug, Clone)]
pub struct Label {
    /// The state directory's instance id ([`container::instance_of`]).
    pub instance: String,
    pub run: i64,
    pub step: String,
    pub attempt: u32,
}

impl Label {
    /// The step's name as a file or container name may hold it.
    pub fn safe_step(&self) -> String {
        self.step
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' {
                    ch
                } else {
                    '-'
                }
            })
            .collect()
    }
}

/// What the engine lends an executor for one attempt.
pub struct AttemptCtx<'a> {
    pub label: Label,
    /// Called with where the attempt runs, before it starts there (a Slurm job is
    /// recorded before `sbatch`, so a crash in between leaves a named job to find)
    /// and again as it learns more (the job id, the node).
    pub on_placement: &'a (dyn Fn(&Placement) + Send + Sync),
    /// A Slurm job this attempt submitted from a process that died: followed
    /// again, not submitted anew, while Slurm knows it or its result is there.
    pub adopt: Option<SlurmPlacement>,
    /// Asked when the attempt is dropped half-way: `true` leaves its Slurm job
    /// running for the next start to adopt (the daemon is shutting down).
    pub keep_on_drop: Arc<dyn Fn() -> bool + Send + Sync>,
    /// The wasm runtime, for a WASI program run on this host.
    pub wasm: Option<Arc<wasm::WasmRuntime>>,
    pub containers: &'a container::Engines,
    pub artifacts: &'a ArtifactStore,
    /// The run's work directory: the mounts under it are staged for a Slurm job.
    pub work_dir: PathBuf,
}

/// Why an executor could not run an attempt at all (as opposed to an [`Outcome`],
/// how the program it ran ended). The text is the step's failure.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Wasm(#[from] wasm::WasmError),
    #[error(transparent)]
    Container(#[from] container::ContainerError),
    #[error(transparent)]
    Slurm(#[from] slurm::SlurmError),
    #[error("transfer to {}: {source}", to.display())]
    Transfer {
        to: PathBuf,
        source: transfer::TransferError,
    },
    /// The spec asks this executor for what it cannot run.
    #[error("{0}")]
    Unsupported(String),
}

/// How a memory limit stopped the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// A memory growth past the limit was refused (wasm).
    Refused,
    /// The container engine says its OOM killer killed it.
    OomKiller,
    /// A bare SIGKILL (exit 137) the engine did not explain.
    Sigkill,
}

/// How an attempt's program ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Exited(i32),
    /// A trap or a host error, with its one-line message.
    Trapped(String),
    /// Another limit of the sandbox stopped the guest (`code` is `None`), or refused
    /// it something before it exited non-zero (`code`): the message names the limit.
    Limit {
        code: Option<i32>,
        message: String,
    },
    OutOfMemory {
        limit: u64,
        kill: Kill,
    },
    /// `then`: what was done about it, when more than dropping the guest ("the
    /// container was killed and removed").
    TimedOut {
        after: Duration,
        then: Option<String>,
    },
    /// `/out`, `/tmp` and `/millrace` grew past the cap.
    DiskFull {
        used: u64,
        cap: u64,
    },
    /// A depth or entry limit of the writable directories, with its message.
    Overgrown(String),
    /// The executor lost the program (a Slurm job ended without a result, an exit
    /// code outside `i32`): the message says how.
    Lost {
        code: Option<i32>,
        message: String,
    },
    /// An outcome on a Slurm node, reported by `millrace exec-step` there.
    OnSlurm {
        job: String,
        outcome: Box<Outcome>,
    },
    /// `millrace exec-step` itself failed on the node.
    NodeError {
        job: String,
        message: String,
    },
}

/// A failed attempt: the exit code when the program gave one, and the message the
/// step's record, its log and the user see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub exit_code: Option<i32>,
    pub message: String,
}

impl Failure {
    pub fn new(exit_code: Option<i32>, message: impl Into<String>) -> Failure {
        Failure {
            exit_code,
            message: message.into(),
        }
    }
}

impl Outcome {
    /// The failure this outcome means, `None` for success: the one table of
    /// failure messages for every executor.
    pub fn failure(&self) -> Option<Failure> {
        let size = |b: u64| definition::format_size(b);
        let (code, message) = match self {
            Outcome::Exited(0) => return None,
            Outcome::Exited(code) => (Some(*code), format!("exited with code {code}")),
            // One line already, with the trap's cause (the whole error is in the log).
            Outcome::Trapped(msg) => (None, format!("trapped: {msg}")),
            Outcome::Limit { code, message } => (*code, message.clone()),
            Outcome::OutOfMemory { limit, kill } => match kill {
                Kill::Refused => (None, format!("memory limit of {} exceeded", size(*limit))),
                Kill::OomKiller => (
                    Some(137),
                    format!(
                        "killed by the OOM killer: memory limit of {} exceeded (exit 137)",
                        size(*limit)
                    ),
                ),
                Kill::Sigkill => (
                    Some(137),
                    format!(
                        "killed (exit 137, SIGKILL): most likely the memory limit of {} was exceeded",
                        size(*limit)
                    ),
                ),
            },
            Outcome::TimedOut { after, then } => {
                let mut m = format!("timed out after {}", humantime::format_duration(*after));
                if let Some(then) = then {
                    m.push_str("; ");
                    m.push_str(then);
                }
                (None, m)
            }
            Outcome::DiskFull { used, cap } => (
                None,
                format!(
                    "/out, /tmp and /millrace hold {}, more than the cap of {} (MILLRACE_OUTPUT_CAP); the step was stopped",
                    size(*used),
                    size(*cap)
                ),
            ),
            Outcome::Overgrown(msg) => (None, format!("{msg}; the step was stopped")),
            Outcome::Lost { code, message } => (*code, message.clone()),
            Outcome::OnSlurm { job, outcome } => {
                let inner = outcome.failure()?;
                match **outcome {
                    // What the guest did says which job it was; what a limit did
                    // reads the same wherever it ran.
                    Outcome::Exited(_) | Outcome::Trapped(_) | Outcome::Limit { .. } => (
                        inner.exit_code,
                        format!("{} (Slurm job {job})", inner.message),
                    ),
                    _ => return Some(inner),
                }
            }
            Outcome::NodeError { job, message } => {
                (None, format!("on the node (Slurm job {job}): {message}"))
            }
        };
        Some(Failure {
            exit_code: code,
            message,
        })
    }

    /// What a watch of the writable directories found, as the outcome it causes.
    pub fn from_overrun(over: workspace::Overrun, cap: u64) -> Outcome {
        match over {
            workspace::Overrun::Bytes(used) => Outcome::DiskFull { used, cap },
            workspace::Overrun::Limit(msg) => Outcome::Overgrown(msg),
        }
    }
}

/// The executors, one arm each (atuin's `AnyComponent`): what runs an attempt.
#[derive(Debug, Clone)]
pub enum Executor {
    /// A wasm program on this host.
    Wasm,
    /// CPython on WASI on this host (the spec's program is the runtime).
    Python,
    /// An OS image on a container engine.
    Container,
    /// A wasm or Python attempt as a batch job on the `[compute.NAME]` cluster.
    Slurm {
        compute: String,
        target: Box<slurm::Target>,
    },
    /// A copy into a datastore.
    Transfer,
}

impl Executor {
    /// What runs `step`: its kind, and for a wasm or Python step the compute
    /// target it names (a Slurm cluster, or this host).
    pub fn for_step(
        step: &definition::Step,
        computes: &BTreeMap<String, crate::config::Compute>,
    ) -> Executor {
        let on_host = match &step.kind {
            StepKind::Transfer { .. } => return Executor::Transfer,
            StepKind::Container(_) => return Executor::Container,
            StepKind::Python { .. } => Executor::Python,
            StepKind::Module { module, .. } if module.kind == "python" => Executor::Python,
            StepKind::Wasm { .. } | StepKind::Module { .. } => Executor::Wasm,
        };
        match Executor::slurm_target(step, computes) {
            Some((compute, target)) => Executor::Slurm {
                compute,
                target: Box::new(target),
            },
            None => on_host,
        }
    }

    /// The Slurm target a step runs on, if its `compute` names one.
    pub fn slurm_target(
        step: &definition::Step,
        computes: &BTreeMap<String, crate::config::Compute>,
    ) -> Option<(String, slurm::Target)> {
        let name = step.compute.as_ref()?.get_ref();
        let c = computes.get(name)?;
        Some((name.clone(), c.slurm.clone()?))
    }

    /// Whether the attempt runs a WASI program on this host (and needs the wasm
    /// runtime in its context).
    pub fn needs_wasm(&self) -> bool {
        matches!(self, Executor::Wasm | Executor::Python)
    }

    /// Runs one attempt to its end. The disk cap on the writable directories is
    /// watched meanwhile; past it the program is stopped.
    pub async fn run(&self, spec: AttemptSpec, ctx: &AttemptCtx<'_>) -> Result<Outcome, ExecError> {
        let cap = spec.disk_cap;
        let watch = workspace::watch(spec.watched(), cap, spec.walk);
        match (self, &spec.program) {
            (Executor::Transfer, Program::Publish { from, to, mode }) => {
                tokio::task::block_in_place(|| transfer::publish(ctx.artifacts, from, to, *mode))
                    .map(|()| Outcome::Exited(0))
                    .map_err(|source| ExecError::Transfer {
                        to: to.clone(),
                        source,
                    })
            }
            // A container's stop is its own: it must be removed before the sandbox
            // directories go to the next step.
            (Executor::Container, Program::Image(_)) => {
                Ok(container::run_attempt(spec, ctx, async move {
                    Outcome::from_overrun(watch.await, cap)
                })
                .await?)
            }
            (Executor::Wasm | Executor::Python, Program::Wasm { path, digest, .. }) => {
                let wasm = ctx.wasm.clone().ok_or_else(|| {
                    ExecError::Unsupported("the wasm runtime is not ready".into())
                })?;
                let (path, digest) = (path.clone(), digest.clone());
                let sandbox = wasm::Sandbox {
                    memory: spec.memory(),
                    timeout: Some(spec.timeout()),
                    disk: spec.disk_cap,
                    args: spec.args,
                    env: spec.env,
                    mounts: spec.mounts,
                    log: spec.log,
                };
                tokio::select! {
                    o = wasm.run(&path, &digest, sandbox) => Ok(o?),
                    over = watch => Ok(Outcome::from_overrun(over, cap)),
                }
            }
            (Executor::Slurm { compute, target }, Program::Wasm { .. }) => {
                let job = slurm::run_attempt(compute, target, spec, ctx);
                tokio::select! {
                    o = job => Ok(o?),
                    over = watch => Ok(Outcome::from_overrun(over, cap)),
                }
            }
            (executor, program) => Err(ExecError::Unsupported(format!(
                "the {executor:?} executor cannot run {program:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(o: Outcome) -> Option<(Option<i32>, String)> {
        o.failure().map(|f| (f.exit_code, f.message))
    }

    /// The table is what steps' records and the tests read: one wording per
    /// outcome, and the Slurm job named where the guest's own ending is told.
    /// The kind picks the executor, and a wasm or Python step's `compute` moves it
    /// to a Slurm cluster; a container's stays on its engine.
    #[test]
    fn a_step_s_kind_and_compute_pick_its_executor() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.py"), "print(1)\n").unwrap();
        let mut env = definition::Environment::default();
        env.computes.insert("hpc".into(), "slurm".into());
        let text = r#"
[[step]]
name = "on_slurm"
python = "t.py"
outputs = ["o"]
compute = "hpc"
[[step]]
name = "here"
python = "t.py"
outputs = ["o"]
[[step]]
name = "image"
container = { image = "busybox" }
outputs = ["o"]
"#;
        let (p, report) = crate::graph::parse(&dir.path().join("p.toml"), text.into(), &env);
        let p = p.unwrap_or_else(|| panic!("{report:?}"));
        let computes = BTreeMap::from([(
            "hpc".to_string(),
            crate::config::Compute {
                kind: "slurm".into(),
                socket: None,
                pull: false,
                slurm: Some(slurm::Target::default()),
            },
        )]);
        let picked: Vec<_> = p
            .steps
            .iter()
            .map(|s| Executor::for_step(s, &computes))
            .collect();
        assert!(
            matches!(&picked[0], Executor::Slurm { compute, .. } if compute == "hpc"),
            "{picked:?}"
        );
        assert!(matches!(picked[1], Executor::Python), "{picked:?}");
        assert!(matches!(picked[2], Executor::Container), "{picked:?}");
        assert!(picked[1].needs_wasm() && !picked[0].needs_wasm());
    }

    #[test]
    fn every_outcome_has_its_message() {
        assert_eq!(message(Outcome::Exited(0)), None);
        assert_eq!(
            message(Outcome::Exited(3)),
            Some((Some(3), "exited with code 3".into()))
        );
        let gib = 1 << 30;
        assert_eq!(
            message(Outcome::OutOfMemory {
                limit: gib,
                kill: Kill::Refused
            }),
            Some((None, "memory limit of 1GiB exceeded".into()))
        );
        assert_eq!(
            message(Outcome::TimedOut {
                after: Duration::from_secs(2),
                then: Some("the container was killed and removed".into())
            }),
            Some((
                None,
                "timed out after 2s; the container was killed and removed".into()
            ))
        );
        let on = |o| Outcome::OnSlurm {
            job: "17".into(),
            outcome: Box::new(o),
        };
        assert_eq!(
            message(on(Outcome::Exited(3))),
            Some((Some(3), "exited with code 3 (Slurm job 17)".into()))
        );
        assert_eq!(message(on(Outcome::Exited(0))), None);
        assert_eq!(
            message(on(Outcome::TimedOut {
                after: Duration::from_secs(1),
                then: None
            })),
            Some((None, "timed out after 1s".into()))
        );
        assert_eq!(
            message(Outcome::Overgrown("the entry limit".into())),
            Some((None, "the entry limit; the step was stopped".into()))
        );
    }
}
