//! The items of `foreach` steps: one row per item and run, with its key, how it
//! ended and its outputs. An item's cache is its key: the latest succeeded or
//! reused item with that key, in any run, whose outputs are all recorded.

use rusqlite::{OptionalExtension, params};

use super::{Batch, Result, now_ms};
use crate::model::StepStatus;

/// An earlier item a key found: its run and its outputs (name, artifact).
pub type CachedItem = (i64, Vec<(String, String)>);

/// One item of a `foreach` step in one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ItemRow {
    pub item: String,
    pub status: StepStatus,
    pub cache_key: String,
    pub reused_from: Option<i64>,
    pub attempts: i64,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl Batch<'_> {
    /// Item `item` of step `step` is decided: a row under its key, `status`
    /// pending (it will execute) or reused (from `reused_from`, with `outputs`).
    #[allow(clippy::too_many_arguments)]
    pub fn record_item(
        &self,
        run: i64,
        step: &str,
        item: &str,
        input: &str,
        key: &str,
        status: StepStatus,
        reused_from: Option<i64>,
        outputs: &[(String, String)],
    ) -> Result<()> {
        let now = now_ms();
        let finished = status.is_terminal().then_some(now);
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO step_items
                 (run_id, step, item, input, cache_key, status, reused_from, attempts, started_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?8)",
            )?
            .execute(params![
                run,
                step,
                item,
                input,
                key,
                status,
                reused_from,
                finished
            ])?;
        self.item_outputs(run, step, item, outputs)
    }

    fn item_outputs(
        &self,
        run: i64,
        step: &str,
        item: &str,
        outputs: &[(String, String)],
    ) -> Result<()> {
        for (o, d) in outputs {
            self.conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO item_outputs (run_id, step, item, output, artifact)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![run, step, item, o, d])?;
        }
        Ok(())
    }

    /// Attempt `attempt` of an item starts.
    pub fn start_item_attempt(&self, run: i64, step: &str, item: &str, attempt: u32) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE step_items SET status = ?5, attempts = ?4, error = NULL,
                   started_at = coalesce(started_at, ?6)
                 WHERE run_id = ?1 AND step = ?2 AND item = ?3",
            )?
            .execute(params![
                run,
                step,
                item,
                attempt,
                StepStatus::Running,
                now_ms()
            ])?;
        Ok(())
    }

    /// An item ended: succeeded with `outputs`, or failed (or cancelled) with
    /// `error`.
    pub fn finish_item(
        &self,
        run: i64,
        step: &str,
        item: &str,
        status: StepStatus,
        error: Option<&str>,
        outputs: &[(String, String)],
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE step_items SET status = ?4, error = ?5, finished_at = ?6
                 WHERE run_id = ?1 AND step = ?2 AND item = ?3",
            )?
            .execute(params![run, step, item, status, error, now_ms()])?;
        self.item_outputs(run, step, item, outputs)
    }

    /// Every item of a run's step that did not end is cancelled.
    pub fn cancel_items(&self, run: i64, step: &str, error: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE step_items SET status = ?3, error = ?4, finished_at = ?5
                 WHERE run_id = ?1 AND step = ?2 AND status IN (?6, ?7)",
            )?
            .execute(params![
                run,
                step,
                StepStatus::Cancelled,
                error,
                now_ms(),
                StepStatus::Pending,
                StepStatus::Running
            ])?;
        Ok(())
    }

    /// The latest item (any run, any step) that succeeded or was reused under
    /// `key`: its run and its outputs.
    pub fn item_cache(&self, key: &str) -> Result<Option<CachedItem>> {
        let found: Option<(i64, String, String)> = self
            .conn
            .prepare_cached(
                "SELECT run_id, step, item FROM step_items
                 WHERE cache_key = ?1 AND status IN (?2, ?3)
                 ORDER BY run_id DESC LIMIT 1",
            )?
            .query_row(
                params![key, StepStatus::Succeeded, StepStatus::Reused],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((run, step, item)) = found else {
            return Ok(None);
        };
        let outputs = self
            .conn
            .prepare_cached(
                "SELECT output, artifact FROM item_outputs
                 WHERE run_id = ?1 AND step = ?2 AND item = ?3 ORDER BY output",
            )?
            .query_map(params![run, step, item], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some((run, outputs)))
    }

    /// The items of a run's step, by name.
    pub fn items(&self, run: i64, step: &str) -> Result<Vec<ItemRow>> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT item, status, cache_key, reused_from, attempts, error, started_at, finished_at
                 FROM step_items WHERE run_id = ?1 AND step = ?2 ORDER BY item",
            )?
            .query_map(params![run, step], |r| {
                Ok(ItemRow {
                    item: r.get(0)?,
                    status: r.get(1)?,
                    cache_key: r.get(2)?,
                    reused_from: r.get(3)?,
                    attempts: r.get(4)?,
                    error: r.get(5)?,
                    started_at: r.get(6)?,
                    finished_at: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}
