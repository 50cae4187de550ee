//! Crash recovery, at start: runs a crash left `running` become `interrupted`,
//! and (with `resume_interrupted`) are queued again to finish, reusing what
//! succeeded, unless they keep taking the process down.

use super::Daemon;
use crate::model::{RunStatus, StepStatus};

/// How many times the process may stop while running one run before the daemon
/// stops resuming it: the first stop can be anything (a kill, the OOM killer, a
/// power cut); two more while it was being resumed mean the run itself is what
/// takes the process down (a step that aborts it), and resuming it again would
/// crash-loop the service until systemd gives up (start-limit-hit).
pub const MAX_CRASHES: i64 = 3;

impl Daemon {
    /// At start: runs a crash left `running` are `interrupted`; interrupted runs
    /// the daemon owned are queued again to finish (`resume_interrupted`), unless
    /// the process already stopped [`MAX_CRASHES`] times while running them.
    pub(super) fn recover(&self) -> crate::store::db::Result<()> {
        let mut db = self.store().db();
        for r in db.read().runs_with_status(RunStatus::Running)? {
            if crate::engine::RunLock::is_held(self.store(), r.id) {
                continue; // a `millrace run` in another process
            }
            // Counted before the run is resumed: if the resume kills the process
            // too, the next start knows.
            let crashes = db
                .read()
                .record_crash(r.id, "the process running it stopped (crash or kill)")?;
            tracing::warn!(pipeline = %r.pipeline, run = r.id, crashes, "run {} of {} interrupted: its process stopped while it was running", r.id, r.pipeline);
        }
        if !self.config.resume_interrupted {
            return Ok(());
        }
        for r in db.read().runs_with_status(RunStatus::Interrupted)? {
            if r.trigger == "cli" {
                continue; // `millrace resume` is the owner's call
            }
            if db.read().run_crashes(r.id)? >= MAX_CRASHES {
                let running: Vec<String> = db
                    .read()
                    .steps(r.id)?
                    .into_iter()
                    .filter(|s| s.status == StepStatus::Running)
                    .map(|s| format!("`{}`", s.name))
                    .collect();
                let during = match running.len() {
                    0 => String::new(),
                    1 => format!(" (step {} was running)", running[0]),
                    _ => format!(" (steps {} were running)", running.join(", ")),
                };
                let msg = format!(
                    "the engine stopped while running this run twice after it was resumed{during}; \
                     it is not resumed again (`millrace resume {}` tries once more)",
                    r.id
                );
                tracing::error!(pipeline = %r.pipeline, run = r.id, "run {} of {} failed: {msg}", r.id, r.pipeline);
                db.batch(|b| b.fail_abandoned_run(r.id, &msg))?;
                continue;
            }
            tracing::info!(pipeline = %r.pipeline, run = r.id, "run {} of {} queued to resume", r.id, r.pipeline);
            db.read().set_run_status(r.id, RunStatus::Queued, None)?;
        }
        Ok(())
    }
}
