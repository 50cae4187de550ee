//! Slurm compute targets: a step's attempt becomes a batch job. The daemon stages
//! the step's sandbox directories under the target's `shared_dir` (a directory the
//! submit host and every node see), submits `millrace exec-step SPEC` with
//! `sbatch --parsable`, follows the job with `scontrol show job -o` (no accounting
//! storage needed), streams the guest's log back, and copies the outputs back into
//! the local sandbox, where they are captured exactly as for a local step: where a
//! step ran never enters its cache key.
//!
//! On the node, `exec-step` runs the same wasm/Python executor as the daemon and
//! writes `result.json`; the daemon reads it to report the same messages as for a
//! local step, and falls back on the job's state (TIMEOUT, OUT_OF_MEMORY,
//! NODE_FAIL, PREEMPTED, CANCELLED) when the job ended before it could write one.
//!
//! The stages, one file each: [`stage`] (the files of the job), submit (here),
//! [`follow`] (the job until it ends), [`collect`] (its outcome and outputs);
//! [`cli`] holds Slurm's commands and [`node`] the `exec-step` side.

mod cli;
mod collect;
mod follow;
mod node;
mod stage;

use std::path::PathBuf;

use crate::executor::{AttemptCtx, AttemptSpec, Outcome};
use crate::model::{Placement, SlurmPlacement};

pub use cli::{
    CancelOnDrop, JobInfo, RUNTIME_OVERHEAD_MIB, cancel, copy_tree, failure_message, job_by_name,
    job_info, sbatch_args, state_message, submit,
};
pub use node::{JobResult, JobSpec, exec_step};

/// A `[compute.NAME] kind = "slurm"` target.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// `--time` when the step has no `timeout`.
    pub time_limit: Option<String>,
    pub gpus: Option<String>,
    pub gres: Option<String>,
    /// `--cpus-per-task` when the step has no `cpus`.
    pub cpus_per_task: Option<u32>,
    /// `--mem` when the step has no `memory`.
    pub mem: Option<String>,
    pub extra_args: Vec<String>,
    pub shared_dir: PathBuf,
}

/// Why a Slurm attempt could not be run or followed. The text is the step's failure.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    /// A client command did not answer in time (it may still have acted).
    #[error("{0}")]
    NoAnswer(String),
    /// A client command could not run, or refused, or answered nonsense.
    #[error("{0}")]
    Command(String),
    /// The job's files could not be staged or copied back.
    #[error("{0}")]
    Stage(String),
    /// Slurm stopped answering about a job it had accepted.
    #[error("lost track of Slurm job {job}: {source}")]
    Lost {
        job: String,
        source: Box<SlurmError>,
    },
}

/// Runs a wasm or Python attempt as a Slurm job on `compute`: the sandbox
/// directories of the run's work dir are staged under the target's `shared_dir`,
/// the job runs `millrace exec-step` there, and `/out` and `/millrace` come back
/// into the local sandbox, so outputs and metrics are captured as for a local step.
pub async fn run_attempt(
    compute: &str,
    target: &Target,
    spec: AttemptSpec,
    ctx: &AttemptCtx<'_>,
) -> Result<Outcome, SlurmError> {
    let label = &ctx.label;
    let safe = label.safe_step();
    let files = stage::Files::new(
        target
            .shared_dir
            .join(format!("millrace-{}", label.instance))
            .join(format!("{}-{safe}-{}", label.run, label.attempt)),
    );
    let job_name = format!(
        "millrace-{}-{}-{safe}-{}",
        label.instance.get(..8).unwrap_or(&label.instance),
        label.run,
        label.attempt
    );
    let staged = stage::plan(&spec.mounts, &ctx.work_dir, &files.dir);
    let adopted = adopt(ctx, &files, &spec).await?;
    // From here on, whatever ends this attempt early (cancel, an error) also
    // cancels its job and removes its staged files; a daemon shutdown leaves
    // both for the next start to adopt.
    let mut guard = CancelOnDrop {
        job: adopted.as_ref().map(|(id, _)| id.clone()),
        staging: files.dir.clone(),
        keep: ctx.keep_on_drop.clone(),
    };
    let (job, placement) = match adopted {
        Some(a) => a,
        None => {
            tokio::task::block_in_place(|| stage::write(&files, &staged, &spec, label))?;
            let mut placement = SlurmPlacement {
                compute: compute.to_string(),
                staging: files.dir.display().to_string(),
                job_name: job_name.clone(),
                job_id: None,
                node: None,
            };
            // Recorded before sbatch: a crash in between leaves a named job to
            // find, not an unknown one.
            (ctx.on_placement)(&Placement::Slurm(placement.clone()));
            let args = sbatch_args(
                target,
                &job_name,
                &files.job_out,
                spec.timeout,
                spec.memory,
                spec.cpus,
            );
            let id = submit(&args, &files.script).await?;
            placement.job_id = Some(id.clone());
            (ctx.on_placement)(&Placement::Slurm(placement.clone()));
            spec.log
                .note(&format!("submitted Slurm job {id} to `{compute}`"));
            (id, placement)
        }
    };
    guard.job = Some(job.clone());
    let limit = spec.timeout();
    let last = match follow::follow(&job, placement, &files, &spec.log, limit, ctx).await? {
        follow::Ended::Done(last) => last,
        follow::Ended::PastDeadline => {
            cancel(&job).await;
            guard.job = None;
            let _ = crate::store::walk::remove_tree(&files.dir);
            return Ok(Outcome::TimedOut {
                after: limit,
                then: Some(format!("Slurm job {job} was cancelled")),
            });
        }
    };
    guard.job = None;
    let outcome = collect::outcome(&job, &files, last.as_ref(), &spec);
    tokio::task::block_in_place(|| collect::copy_back(&staged, &files, &outcome, spec.walk.depth))?;
    Ok(outcome)
}

/// A job this attempt already submitted (the process that submitted it died):
/// adopted while Slurm knows it or its result is there, as (id, placement).
async fn adopt(
    ctx: &AttemptCtx<'_>,
    files: &stage::Files,
    spec: &AttemptSpec,
) -> Result<Option<(String, SlurmPlacement)>, SlurmError> {
    let Some(p) = &ctx.adopt else {
        return Ok(None);
    };
    if p.staging != files.dir.display().to_string() {
        return Ok(None);
    }
    // The id, or (a crash between sbatch and recording its answer) the job found
    // by its unique name.
    let id = match &p.job_id {
        Some(id) => Some(id.clone()),
        None => job_by_name(&p.job_name).await?,
    };
    let Some(id) = id else {
        return Ok(None);
    };
    let known = job_info(&id).await?.is_some();
    if !known && !files.result.exists() {
        return Ok(None);
    }
    spec.log.reset();
    spec.log
        .note(&format!("re-adopted Slurm job {id} after a restart"));
    let mut p = p.clone();
    p.job_id = Some(id.clone());
    (ctx.on_placement)(&Placement::Slurm(p.clone()));
    Ok(Some((id, p)))
}
