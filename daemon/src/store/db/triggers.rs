//! Trigger state that survives a restart: the last firing of each cron trigger
//! and the files a watch trigger has seen.

use rusqlite::{OptionalExtension, params};

use super::{Batch, DbError, Result, now_ms};

impl Batch<'_> {
    /// The last persisted firing of a cron trigger, in ms since the epoch.
    pub fn trigger_last_fired(&self, pipeline: &str, trigger: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_fired FROM trigger_state WHERE pipeline = ?1 AND trigger = ?2",
                params![pipeline, trigger],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn set_trigger_last_fired(&self, pipeline: &str, trigger: &str, at_ms: i64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO trigger_state (pipeline, trigger, last_fired) VALUES (?1, ?2, ?3)
             ON CONFLICT (pipeline, trigger) DO UPDATE SET last_fired = excluded.last_fired",
            params![pipeline, trigger, at_ms],
        )?;
        Ok(())
    }

    /// Moves a trigger's cursor from `old` to `new` only if no one moved it since:
    /// two tasks of one trigger (an old version being replaced by a reload) cannot
    /// both consume a firing. The error aborts the caller's transaction.
    pub fn advance_trigger(
        &self,
        pipeline: &str,
        trigger: &str,
        old: Option<i64>,
        new: i64,
    ) -> Result<()> {
        let moved = match old {
            Some(old) => self.conn.execute(
                "UPDATE trigger_state SET last_fired = ?4 WHERE pipeline = ?1 AND trigger = ?2 AND last_fired = ?3",
                params![pipeline, trigger, old, new],
            )?,
            None => self.conn.execute(
                "INSERT OR IGNORE INTO trigger_state (pipeline, trigger, last_fired) VALUES (?1, ?2, ?3)",
                params![pipeline, trigger, new],
            )?,
        };
        if moved == 0 {
            return Err(DbError::Conflict(format!(
                "trigger `{trigger}` of `{pipeline}` fired elsewhere"
            )));
        }
        Ok(())
    }

    /// Path → content digest as a watch trigger last saw them; `None` before its
    /// first look.
    pub fn watch_cursor(
        &self,
        pipeline: &str,
        glob: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        if self.trigger_last_fired(pipeline, glob)?.is_none() {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, digest FROM watch_cursor WHERE pipeline = ?1 AND glob = ?2",
        )?;
        let rows = stmt
            .query_map(params![pipeline, glob], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(Some(rows))
    }

    /// Replaces a watch trigger's cursor with what it saw now, if no one replaced
    /// it since `seen` (its `trigger_state` stamp when the cursor was read).
    pub fn set_watch_cursor(
        &self,
        pipeline: &str,
        glob: &str,
        seen: Option<i64>,
        files: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let stamp = now_ms().max(seen.map_or(0, |s| s + 1));
        self.advance_trigger(pipeline, glob, seen, stamp)?;
        self.conn.execute(
            "DELETE FROM watch_cursor WHERE pipeline = ?1 AND glob = ?2",
            params![pipeline, glob],
        )?;
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO watch_cursor (pipeline, glob, path, digest) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (path, digest) in files {
            insert.execute(params![pipeline, glob, path, digest])?;
        }
        Ok(())
    }
}
