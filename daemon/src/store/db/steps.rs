//! A run's steps and their attempts: keys, status, timing, placement.

use rusqlite::{OptionalExtension, params};

use super::{AttemptRow, Batch, Result, STEP_COLUMNS, StepRow, now_ms, step_row};
use crate::model::{AttemptStatus, Placement, StepStatus};

impl Batch<'_> {
    pub fn insert_step(
        &self,
        run: i64,
        name: &str,
        position: usize,
        runtime: &str,
        module: Option<&str>,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO steps (run_id, name, position, runtime, status, module) VALUES (?1, ?2, ?3, ?4, ?6, ?5)",
            )?
            .execute(params![run, name, position as i64, runtime, module, StepStatus::Pending])?;
        Ok(())
    }

    pub fn set_step_key(
        &self,
        run: i64,
        step: &str,
        key: &str,
        parts: &serde_json::Value,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE steps SET cache_key = ?3, key_parts = ?4 WHERE run_id = ?1 AND name = ?2",
            )?
            .execute(params![run, step, key, parts.to_string()])?;
        Ok(())
    }

    /// The interpreter a Python step runs on (`snapshot::Variant::record`).
    pub fn set_step_python(
        &self,
        run: i64,
        step: &str,
        variant: &crate::executor::snapshot::VariantRecord,
    ) -> Result<()> {
        let variant = serde_json::to_string(variant).expect("plain data");
        self.conn
            .prepare_cached("UPDATE steps SET python = ?3 WHERE run_id = ?1 AND name = ?2")?
            .execute(params![run, step, variant])?;
        Ok(())
    }

    pub fn start_step(&self, run: i64, step: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE steps SET status = ?4, started_at = coalesce(started_at, ?3), error = NULL
                 WHERE run_id = ?1 AND name = ?2",
            )?
            .execute(params![run, step, now_ms(), StepStatus::Running])?;
        Ok(())
    }

    pub fn finish_step(
        &self,
        run: i64,
        step: &str,
        status: StepStatus,
        reused_from: Option<i64>,
        error: Option<&str>,
    ) -> Result<()> {
        let now = now_ms();
        self.conn
            .prepare_cached(
                "UPDATE steps SET status = ?3, reused_from = ?4, error = ?5, finished_at = ?6,
                 started_at = coalesce(started_at, ?6) WHERE run_id = ?1 AND name = ?2",
            )?
            .execute(params![run, step, status, reused_from, error, now])?;
        Ok(())
    }

    /// Starts (or restarts) an attempt; its placement is kept only when `adopt`
    /// (the attempt's Slurm job is followed again).
    pub fn start_attempt(
        &self,
        run: i64,
        step: &str,
        attempt: u32,
        log_path: &str,
        adopt: bool,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO attempts (run_id, step, attempt, status, started_at, log_path)
                 VALUES (?1, ?2, ?3, ?7, ?4, ?5)
                 ON CONFLICT (run_id, step, attempt) DO UPDATE SET status = excluded.status,
                   started_at = excluded.started_at, log_path = excluded.log_path,
                   finished_at = NULL, exit_code = NULL, error = NULL,
                   placement = CASE WHEN ?6 THEN placement ELSE NULL END",
            )?
            .execute(params![
                run,
                step,
                attempt,
                now_ms(),
                log_path,
                adopt,
                AttemptStatus::Running
            ])?;
        self.conn
            .prepare_cached("UPDATE steps SET attempts = ?3 WHERE run_id = ?1 AND name = ?2")?
            .execute(params![run, step, attempt])?;
        Ok(())
    }

    /// Attempts still `running` when their run was cancelled: their work was
    /// stopped with it.
    pub fn cancel_running_attempts(&self, run: i64) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE attempts SET status = ?3, finished_at = ?2,
                 error = coalesce(error, 'the run was cancelled')
                 WHERE run_id = ?1 AND status = ?4",
            )?
            .execute(params![
                run,
                now_ms(),
                AttemptStatus::Cancelled,
                AttemptStatus::Running
            ])?;
        Ok(())
    }

    /// Where an attempt ran (or runs), as recorded.
    pub fn attempt_placement(
        &self,
        run: i64,
        step: &str,
        attempt: u32,
    ) -> Result<Option<Placement>> {
        let p: Option<Option<String>> = self
            .conn
            .query_row(
                "SELECT placement FROM attempts WHERE run_id = ?1 AND step = ?2 AND attempt = ?3",
                params![run, step, attempt],
                |r| r.get(0),
            )
            .optional()?;
        Ok(p.flatten().and_then(|p| serde_json::from_str(&p).ok()))
    }

    pub fn set_attempt_placement(
        &self,
        run: i64,
        step: &str,
        attempt: u32,
        placement: &Placement,
    ) -> Result<()> {
        let placement = serde_json::to_string(placement).expect("plain data");
        self.conn
            .prepare_cached(
                "UPDATE attempts SET placement = ?4 WHERE run_id = ?1 AND step = ?2 AND attempt = ?3",
            )?
            .execute(params![run, step, attempt, placement])?;
        Ok(())
    }

    pub fn finish_attempt(
        &self,
        run: i64,
        step: &str,
        attempt: u32,
        status: AttemptStatus,
        exit_code: Option<i32>,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE attempts SET status = ?4, finished_at = ?5, exit_code = ?6, error = ?7
                 WHERE run_id = ?1 AND step = ?2 AND attempt = ?3",
            )?
            .execute(params![
                run,
                step,
                attempt,
                status,
                now_ms(),
                exit_code,
                error
            ])?;
        Ok(())
    }

    pub fn steps(&self, run: i64) -> Result<Vec<StepRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ?1 ORDER BY position"
        ))?;
        let rows = stmt
            .query_map([run], step_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn step(&self, run: i64, name: &str) -> Result<Option<StepRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ?1 AND name = ?2"),
                params![run, name],
                step_row,
            )
            .optional()?)
    }

    /// The latest execution of the same step of the same pipeline before `run` that
    /// got as far as computing a cache key: what `explain` compares with.
    pub fn previous_step(
        &self,
        pipeline: &str,
        step: &str,
        before_run: i64,
    ) -> Result<Option<StepRow>> {
        let sql = format!(
            "SELECT {} FROM steps s JOIN runs r ON r.id = s.run_id
             WHERE r.pipeline = ?1 AND s.name = ?2 AND s.run_id < ?3 AND s.cache_key IS NOT NULL
             ORDER BY s.run_id DESC LIMIT 1",
            STEP_COLUMNS
                .split(", ")
                .map(|c| format!("s.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(self
            .conn
            .query_row(&sql, params![pipeline, step, before_run], step_row)
            .optional()?)
    }

    pub fn attempts(&self, run: i64, step: &str) -> Result<Vec<AttemptRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT attempt, status, started_at, finished_at, exit_code, error, log_path, placement FROM attempts
             WHERE run_id = ?1 AND step = ?2 ORDER BY attempt",
        )?;
        let rows = stmt
            .query_map(params![run, step], |r| {
                Ok(AttemptRow {
                    attempt: r.get(0)?,
                    status: r.get(1)?,
                    started_at: r.get(2)?,
                    finished_at: r.get(3)?,
                    exit_code: r.get(4)?,
                    error: r.get(5)?,
                    log_path: r.get(6)?,
                    placement: r
                        .get::<_, Option<String>>(7)?
                        .and_then(|p| serde_json::from_str(&p).ok()),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}
