//! What an ended job means: its result (or, without one, Slurm's word on it) as
//! an [`Outcome`], and `/out` and `/millrace` copied back into the local sandbox.

use super::stage::{Files, Staged};
use super::{JobInfo, JobResult, SlurmError, copy_tree, failure_message};
use crate::executor::{AttemptSpec, Kill, Outcome};
use crate::store::walk::remove_tree;

/// The outcome of `job`, from the result `exec-step` wrote, else from what Slurm
/// last said (`last`) and the job's own output, which goes into the log.
pub(super) fn outcome(
    job: &str,
    files: &Files,
    last: Option<&JobInfo>,
    spec: &AttemptSpec,
) -> Outcome {
    let result: Option<JobResult> = std::fs::read_to_string(&files.result)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let job_text = std::fs::read_to_string(&files.job_out).unwrap_or_default();
    if !job_text.trim().is_empty() {
        spec.log.note(&format!("Slurm job {job} output:"));
        spec.log.append(job_text.as_bytes());
    }
    let on_node = |o: Outcome| Outcome::OnSlurm {
        job: job.to_string(),
        outcome: Box::new(o),
    };
    match (result, last) {
        (Some(JobResult::Exited { code }), _) => on_node(Outcome::Exited(code)),
        (Some(JobResult::Trapped { message }), _) => on_node(Outcome::Trapped(message)),
        (Some(JobResult::Limit { code, message }), _) => on_node(Outcome::Limit { code, message }),
        (Some(JobResult::OutOfMemory), _) => on_node(Outcome::OutOfMemory {
            limit: spec.memory(),
            kill: Kill::Refused,
        }),
        (Some(JobResult::TimedOut { ms }), _) => on_node(Outcome::TimedOut {
            after: std::time::Duration::from_millis(ms),
            then: None,
        }),
        (Some(JobResult::DiskFull { used }), _) => on_node(Outcome::DiskFull {
            used,
            cap: spec.disk_cap,
        }),
        (Some(JobResult::Error { message }), _) => Outcome::NodeError {
            job: job.to_string(),
            message,
        },
        (None, Some(info)) => Outcome::Lost {
            code: info.exit_code(),
            message: failure_message(job, info, &job_text),
        },
        (None, None) => Outcome::Lost {
            code: None,
            message: format!(
                "Slurm job {job} ended without a result (it is no longer known to Slurm)"
            ),
        },
    }
}

/// Copies `/out` and `/millrace` back over the local sandbox's (only `/millrace`,
/// the metrics, after a failure), then removes the staging directory.
pub(super) fn copy_back(
    staged: &[Staged],
    files: &Files,
    outcome: &Outcome,
    depth_limit: usize,
) -> Result<(), SlurmError> {
    if outcome.failure().is_none() {
        for s in staged {
            let (host, guest) = (&s.mount.host, &s.mount.guest);
            if let Some(c) = &s.copy
                && (guest == "/out" || guest == "/millrace")
            {
                remove_tree(host)
                    .map_err(|e| SlurmError::Stage(format!("{}: {e}", host.display())))?;
                copy_tree(c, host, depth_limit)
                    .map_err(|e| SlurmError::Stage(format!("cannot copy {guest} back: {e}")))?;
            }
        }
    } else if let Some(s) = staged.iter().find(|s| s.mount.guest == "/millrace")
        && let Some(c) = &s.copy
    {
        // Metrics of a failed step are still recorded.
        let _ = remove_tree(&s.mount.host).and_then(|()| copy_tree(c, &s.mount.host, depth_limit));
    }
    let _ = remove_tree(&files.dir);
    Ok(())
}
