//! The shared words: the states a run, a step and an attempt go through, and where
//! an attempt runs. The store keeps the states as the lowercase TEXT below
//! (`runs.status`, `steps.status`, `attempts.status`) and placements as JSON
//! (`attempts.placement`); the API and `--json` print the same strings, and every
//! other layer (engine, daemon, CLI) uses the types. A new state is one variant
//! here.

use std::fmt;
use std::str::FromStr;

/// A text that names no state of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} `{value}`: expected one of {}", .expected.join(", "))]
pub struct UnknownStatus {
    pub kind: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

/// One closed set of states: the enum, its text (`Display`, `FromStr`) and the list
/// of all of them, from one table. Serde and the OpenAPI document spell the
/// variants in lowercase (utoipa does not read a `rename` that a macro passes in);
/// `every_status_round_trips_through_its_text` and
/// `the_api_document_lists_the_stored_texts` prove the spellings agree.
macro_rules! status_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash,
            serde::Serialize, serde::Deserialize, utoipa::ToSchema,
        )]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every state, in the order a listing names them.
            pub const ALL: &[$name] = &[$($name::$variant,)+];
            const TEXTS: &[&str] = &[$($text,)+];

            /// The text the store, the API and `--json` use.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownStatus;

            fn from_str(s: &str) -> Result<$name, UnknownStatus> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownStatus {
                        kind: $kind,
                        value: s.to_string(),
                        expected: $name::TEXTS,
                    }),
                }
            }
        }
    };
}

status_enum! {
    /// Where a run is in its life.
    RunStatus, "run status" {
        /// Recorded, waiting for the daemon to start it (`max_runs`, order).
        Queued = "queued",
        /// A process holds its lock and drives it (or held it: see
        /// [`RunStatus::Interrupted`]).
        Running = "running",
        Succeeded = "succeeded",
        /// A step failed, or the run could not start or be recorded.
        Failed = "failed",
        Cancelled = "cancelled",
        /// Its process stopped (a crash, a kill, a daemon shutdown) before the end;
        /// it can be resumed.
        Interrupted = "interrupted",
    }
}

impl RunStatus {
    /// The status a reader is shown: a run still marked running whose process is
    /// gone was interrupted. `driven` says whether a process holds the run's lock
    /// (`run::RunLock::is_held`); it is asked only about a running run.
    pub fn shown(self, driven: impl FnOnce() -> bool) -> RunStatus {
        if self == RunStatus::Running && !driven() {
            RunStatus::Interrupted
        } else {
            self
        }
    }

    /// No process drives the run any more. An interrupted run is terminal too: it
    /// starts again only when something resumes it.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

status_enum! {
    /// Where one step of one run is. The engine reports only the terminal states
    /// ([`crate::engine::Event::StepFinished`]); the store also keeps the two before.
    StepStatus, "step status" {
        /// Not started (also: left for the resume by a daemon shutdown).
        Pending = "pending",
        Running = "running",
        /// An attempt succeeded; its outputs are recorded.
        Succeeded = "succeeded",
        /// The outputs of an earlier execution with the same cache key.
        Reused = "reused",
        /// Its last attempt failed, or it could not be keyed or recorded.
        Failed = "failed",
        /// An upstream step did not succeed.
        Skipped = "skipped",
        /// The run was cancelled before the step ended.
        Cancelled = "cancelled",
        /// Shown, never stored: still marked running in a run whose process is
        /// gone ([`StepStatus::shown`]).
        Interrupted = "interrupted",
    }
}

impl StepStatus {
    /// The status a reader is shown of a step of a run shown as `run`: a step still
    /// marked running in an interrupted run ([`RunStatus::shown`]) stopped with its
    /// process, and says so rather than "running N s so far". Only shown: the store
    /// keeps `running`, and a resume starts the step anew.
    pub fn shown(self, run: RunStatus) -> StepStatus {
        if self == StepStatus::Running && run == RunStatus::Interrupted {
            StepStatus::Interrupted
        } else {
            self
        }
    }

    /// The step will not change again in this run (a resume starts it anew).
    pub fn is_terminal(self) -> bool {
        !matches!(self, StepStatus::Pending | StepStatus::Running)
    }
}

status_enum! {
    /// How one attempt of a step went.
    AttemptStatus, "attempt status" {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// The run was cancelled while it ran; its work was stopped.
        Cancelled = "cancelled",
    }
}

impl AttemptStatus {
    pub fn is_terminal(self) -> bool {
        self != AttemptStatus::Running
    }
}

/// Where an attempt runs (or ran), in `attempts.placement` as JSON:
/// `{"kind": "container", …}` or `{"kind": "slurm", …}`. It is recorded before the
/// work starts, so a process that restarts finds the container or the job. An
/// attempt of an in-process runtime (wasm, Python, transfer) runs here, on this
/// host, and records none: `Option<Placement>` is `None`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Placement {
    Container(ContainerPlacement),
    Slurm(SlurmPlacement),
}

/// A container step's attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerPlacement {
    /// The engine's socket (`unix:///run/podman/podman.sock`).
    pub engine: String,
    /// The container's name (`millrace-<run>-<step>-<attempt>-<nonce>`).
    pub container: String,
    /// The image as the step names it, and the digest it resolved to.
    pub image: String,
    pub image_id: String,
}

/// A wasm or Python attempt run as a Slurm batch job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlurmPlacement {
    /// The `[compute.NAME]` target.
    pub compute: String,
    /// The attempt's directory under the target's `shared_dir`.
    pub staging: String,
    /// Unique per attempt: a crash between `sbatch` and recording its answer
    /// leaves a job to find by this name.
    pub job_name: String,
    /// Null until `sbatch` answers.
    pub job_id: Option<String>,
    /// Null until Slurm reports the node the job runs on.
    pub node: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_step_of_an_interrupted_run_is_shown_interrupted() {
        let interrupted = RunStatus::Interrupted;
        assert_eq!(
            StepStatus::Running.shown(interrupted),
            StepStatus::Interrupted
        );
        assert_eq!(
            StepStatus::Running.shown(RunStatus::Running),
            StepStatus::Running
        );
        assert_eq!(
            StepStatus::Succeeded.shown(interrupted),
            StepStatus::Succeeded
        );
        assert_eq!(StepStatus::Pending.shown(interrupted), StepStatus::Pending);
    }

    #[test]
    fn a_running_run_nobody_drives_is_shown_interrupted() {
        assert_eq!(RunStatus::Running.shown(|| true), RunStatus::Running);
        assert_eq!(RunStatus::Running.shown(|| false), RunStatus::Interrupted);
        let asked = std::cell::Cell::new(false);
        let failed = RunStatus::Failed.shown(|| {
            asked.set(true);
            false
        });
        assert_eq!(failed, RunStatus::Failed);
        assert!(!asked.get(), "the lock is looked at only for a running run");
    }

    /// The text is what the store holds and the API prints: serde, Display and
    /// FromStr agree on it, for every state.
    #[test]
    fn every_status_round_trips_through_its_text() {
        fn check<T>(all: &[T])
        where
            T: Copy + PartialEq + fmt::Debug + fmt::Display + FromStr + serde::Serialize,
            T: serde::de::DeserializeOwned,
            <T as FromStr>::Err: fmt::Debug,
        {
            for &s in all {
                let text = s.to_string();
                assert_eq!(text.parse::<T>().unwrap(), s);
                assert_eq!(serde_json::to_value(s).unwrap(), text.as_str());
                assert_eq!(serde_json::from_value::<T>(text.clone().into()).unwrap(), s);
            }
        }
        check(RunStatus::ALL);
        check(StepStatus::ALL);
        check(AttemptStatus::ALL);
    }

    #[test]
    fn an_unknown_status_names_the_known_ones() {
        let e = "done".parse::<RunStatus>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "run status `done`: expected one of queued, running, succeeded, failed, cancelled, interrupted"
        );
    }

    /// The OpenAPI document names the same texts as the store.
    #[test]
    fn the_api_document_lists_the_stored_texts() {
        fn listed<T: utoipa::PartialSchema>() -> serde_json::Value {
            serde_json::to_value(T::schema()).unwrap()["enum"].clone()
        }
        assert_eq!(listed::<RunStatus>(), serde_json::json!(RunStatus::TEXTS));
        assert_eq!(listed::<StepStatus>(), serde_json::json!(StepStatus::TEXTS));
        assert_eq!(
            listed::<AttemptStatus>(),
            serde_json::json!(AttemptStatus::TEXTS)
        );
    }

    /// The JSON the store holds (and the API prints) for each placement.
    #[test]
    fn placements_keep_their_json() {
        let slurm = serde_json::json!({
            "kind": "slurm", "compute": "hpc", "staging": "/shared/m/1-s-1",
            "job_name": "millrace-1-s-1", "job_id": null, "node": null,
        });
        let p: Placement = serde_json::from_value(slurm.clone()).unwrap();
        assert!(matches!(&p, Placement::Slurm(s) if s.job_id.is_none()));
        assert_eq!(serde_json::to_value(&p).unwrap(), slurm);
        let container = serde_json::json!({
            "kind": "container", "engine": "unix:///e.sock", "container": "millrace-1-s-1-0",
            "image": "busybox:1", "image_id": "sha256:ab",
        });
        let p: Placement = serde_json::from_value(container.clone()).unwrap();
        assert_eq!(serde_json::to_value(&p).unwrap(), container);
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = RunStatus::ALL.iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(
            terminal,
            [
                &RunStatus::Succeeded,
                &RunStatus::Failed,
                &RunStatus::Cancelled,
                &RunStatus::Interrupted
            ]
        );
        assert!(!StepStatus::Pending.is_terminal() && StepStatus::Skipped.is_terminal());
        assert!(!AttemptStatus::Running.is_terminal() && AttemptStatus::Failed.is_terminal());
    }
}
