//! Following a submitted job until it ends: its log streamed into the attempt's,
//! its node reported once known, and the attempt's deadline kept.

use std::time::{Duration, Instant};

use super::stage::Files;
use super::{JobInfo, SlurmError, job_info};
use crate::executor::{AttemptCtx, LogFile};
use crate::model::{Placement, SlurmPlacement};

/// How following a job ended.
pub(super) enum Ended {
    /// It wrote its result or Slurm says it ended, with what Slurm last said of
    /// it (`None`: it no longer knows the job).
    Done(Option<JobInfo>),
    /// It ran past the attempt's timeout and the grace after it.
    PastDeadline,
}

/// Follows `job` until it ends. The executor on the node stops the guest at its
/// timeout; Slurm's `--time` has a minute more; past both (and two minutes of
/// grace) after the job started running, it is given up here. Time in the queue
/// does not count: a busy cluster is not a step's fault.
pub(super) async fn follow(
    job: &str,
    mut placement: SlurmPlacement,
    files: &Files,
    log: &LogFile,
    limit: Duration,
    ctx: &AttemptCtx<'_>,
) -> Result<Ended, SlurmError> {
    let mut deadline: Option<Instant> = None;
    let mut offset = 0u64;
    // The result file is looked for every 50 ms; Slurm is asked every 50 ms at
    // first, then less often.
    let mut pause = Duration::from_millis(50);
    let mut next_query = Instant::now();
    let mut errors = 0;
    let grace = limit + Duration::from_secs(120);
    let mut note_node = |info: &JobInfo| {
        if placement.node.is_none()
            && let Some(n) = info.nodes()
        {
            placement.node = Some(n.to_string());
            (ctx.on_placement)(&Placement::Slurm(placement.clone()));
            log.note(&format!("Slurm job {job} runs on {n}"));
        }
    };
    let ended = loop {
        tail(files, log, &mut offset);
        if files.result.exists() {
            let mut last = None;
            if let Ok(Some(info)) = job_info(job).await {
                note_node(&info);
                last = Some(info);
            }
            break Ended::Done(last);
        }
        if Instant::now() >= next_query {
            match job_info(job).await {
                Ok(Some(info)) => {
                    errors = 0;
                    note_node(&info);
                    if deadline.is_none() && info.state() != "PENDING" {
                        deadline = Some(Instant::now() + grace);
                    }
                    if info.is_finished() {
                        break Ended::Done(Some(info));
                    }
                }
                Ok(None) => break Ended::Done(None),
                Err(e) => {
                    errors += 1;
                    if errors >= 20 {
                        return Err(SlurmError::Lost {
                            job: job.to_string(),
                            source: Box::new(e),
                        });
                    }
                }
            }
            next_query = Instant::now() + pause;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Ok(Ended::PastDeadline);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tail(files, log, &mut offset);
    Ok(ended)
}

/// Appends what the node's step log holds past `offset` to the attempt's log.
fn tail(files: &Files, log: &LogFile, offset: &mut u64) {
    use std::io::{Read, Seek};
    if let Ok(mut f) = std::fs::File::open(&files.step_log)
        && f.seek(std::io::SeekFrom::Start(*offset)).is_ok()
    {
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
            *offset += buf.len() as u64;
            log.append(&buf);
        }
    }
}
