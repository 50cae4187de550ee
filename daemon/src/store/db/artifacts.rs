//! Artifacts and where they are used: run and step inputs, step outputs, the
//! cache of keys, metrics, the stat cache, lineage, and what gc deletes.

use std::path::Path;

use rusqlite::{OptionalExtension, params};

use super::{Batch, LineageRow, MetricRow, Result, now_ms};
use crate::model::RunStatus;
use crate::store::artifacts::FileStat;

impl Batch<'_> {
    pub fn record_artifact(&self, digest: &str, size: u64, files: u64) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO artifacts (digest, size, files, created_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![digest, size as i64, files as i64, now_ms()])?;
        Ok(())
    }

    pub fn artifact(&self, digest: &str) -> Result<Option<(u64, u64)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT size, files FROM artifacts WHERE digest = ?1",
                [digest],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()?)
    }

    /// Artifacts whose digest starts with `prefix` (users type short digests).
    pub fn artifacts_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT digest FROM artifacts WHERE digest >= ?1 AND digest < ?2 LIMIT 10",
        )?;
        let upper = format!("{prefix}~");
        let rows = stmt
            .query_map(params![prefix, upper], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn record_run_input(&self, run: i64, name: &str, path: &str, artifact: &str) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO run_inputs (run_id, name, path, artifact) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![run, name, path, artifact])?;
        Ok(())
    }

    pub fn run_inputs(&self, run: i64) -> Result<Vec<(String, String, String)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, path, artifact FROM run_inputs WHERE run_id = ?1 ORDER BY name",
        )?;
        let rows = stmt
            .query_map([run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn record_step_input(
        &self,
        run: i64,
        step: &str,
        mount: &str,
        reference: &str,
        artifact: &str,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO step_inputs (run_id, step, mount, reference, artifact) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![run, step, mount, reference, artifact])?;
        Ok(())
    }

    pub fn step_inputs(&self, run: i64, step: &str) -> Result<Vec<(String, String, String)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT mount, reference, artifact FROM step_inputs WHERE run_id = ?1 AND step = ?2 ORDER BY mount",
        )?;
        let rows = stmt
            .query_map(params![run, step], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn record_step_output(
        &self,
        run: i64,
        step: &str,
        output: &str,
        artifact: &str,
    ) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO step_outputs (run_id, step, output, artifact) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![run, step, output, artifact])?;
        Ok(())
    }

    pub fn step_outputs(&self, run: i64, step: &str) -> Result<Vec<(String, String)>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT output, artifact FROM step_outputs WHERE run_id = ?1 AND step = ?2 ORDER BY output")?;
        let rows = stmt
            .query_map(params![run, step], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn set_cache_entry(&self, key: &str, run: i64, step: &str) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO cache_entries (key, run_id, step, created_at) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![key, run, step, now_ms()])?;
        Ok(())
    }

    /// The execution a cache key points at: (run, step).
    pub fn cache_entry(&self, key: &str) -> Result<Option<(i64, String)>> {
        Ok(self
            .conn
            .prepare_cached("SELECT run_id, step FROM cache_entries WHERE key = ?1")?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    pub fn drop_cache_entry(&self, key: &str) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM cache_entries WHERE key = ?1")?
            .execute([key])?;
        Ok(())
    }

    pub fn record_metric(
        &self,
        run: i64,
        step: &str,
        name: &str,
        value: f64,
        index: Option<i64>,
        seq: i64,
    ) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO metrics (run_id, step, name, value, idx, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
            .execute(params![run, step, name, value, index, seq])?;
        Ok(())
    }

    pub fn clear_metrics(&self, run: i64, step: &str) -> Result<()> {
        self.conn
            .prepare_cached("DELETE FROM metrics WHERE run_id = ?1 AND step = ?2")?
            .execute(params![run, step])?;
        Ok(())
    }

    pub fn metrics(&self, run: i64) -> Result<Vec<MetricRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT step, name, value, idx FROM metrics WHERE run_id = ?1 ORDER BY step, name, seq",
        )?;
        let rows = stmt
            .query_map([run], |r| {
                Ok(MetricRow {
                    step: r.get(0)?,
                    name: r.get(1)?,
                    value: r.get(2)?,
                    step_index: r.get(3)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Copies the metrics a reused step's source execution logged.
    pub fn copy_metrics(&self, from_run: i64, from_step: &str, run: i64, step: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO metrics (run_id, step, name, value, idx, seq)
                 SELECT ?3, ?4, name, value, idx, seq FROM metrics WHERE run_id = ?1 AND step = ?2",
            )?
            .execute(params![from_run, from_step, run, step])?;
        Ok(())
    }

    pub fn stat_lookup(&self, path: &Path, stat: &FileStat) -> Result<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT digest FROM stat_cache WHERE path = ?1 AND size = ?2 AND mtime_ns = ?3 AND ino = ?4 AND ctime_ns = ?5")?
            .query_row(
                params![path.to_string_lossy(), stat.size as i64, stat.mtime_ns, stat.ino as i64, stat.ctime_ns],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn stat_record(&self, path: &Path, stat: &FileStat, digest: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO stat_cache (path, size, mtime_ns, ino, digest, ctime_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![path.to_string_lossy(), stat.size as i64, stat.mtime_ns, stat.ino as i64, digest, stat.ctime_ns])?;
        Ok(())
    }

    /// Where an artifact was produced, reused and read. A reused step records the
    /// outputs it took over too; its role is `reused` (with the run that produced
    /// them), never `output`: only the execution that wrote the bytes produced them.
    pub fn lineage(&self, artifact: &str) -> Result<Vec<LineageRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT o.run_id, r.pipeline, o.step, o.output,
                    CASE WHEN s.reused_from IS NULL THEN 'output' ELSE 'reused' END, s.reused_from
               FROM step_outputs o JOIN runs r ON r.id = o.run_id
               LEFT JOIN steps s ON s.run_id = o.run_id AND s.name = o.step
               WHERE o.artifact = ?1
             UNION ALL
             SELECT i.run_id, r.pipeline, i.step, i.mount, 'input', NULL FROM step_inputs i JOIN runs r ON r.id = i.run_id
               WHERE i.artifact = ?1
             UNION ALL
             SELECT p.run_id, r.pipeline, '', p.name, 'pipeline input', NULL FROM run_inputs p JOIN runs r ON r.id = p.run_id
               WHERE p.artifact = ?1
             ORDER BY 1, 3",
        )?;
        let rows = stmt
            .query_map([artifact], |r| {
                Ok(LineageRow {
                    run_id: r.get(0)?,
                    pipeline: r.get(1)?,
                    step: r.get(2)?,
                    name: r.get(3)?,
                    role: r.get(4)?,
                    reused_from: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Run ids to keep for `gc --keep N`: the newest N runs of each pipeline, plus
    /// every run still running.
    pub fn runs_to_keep(&self, keep: i64) -> Result<Vec<i64>> {
        let mut stmt = self.conn.prepare(
            "SELECT id FROM (SELECT id, status, row_number() OVER (PARTITION BY pipeline ORDER BY id DESC) AS n FROM runs)
             WHERE n <= ?1 OR status IN (?2, ?3)",
        )?;
        let rows = stmt
            .query_map(params![keep, RunStatus::Running, RunStatus::Queued], |r| {
                r.get(0)
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn delete_runs_except(&self, keep: &[i64]) -> Result<usize> {
        self.conn.execute_batch("CREATE TEMP TABLE IF NOT EXISTS keep_runs (id INTEGER PRIMARY KEY); DELETE FROM keep_runs;")?;
        for id in keep {
            self.conn
                .execute("INSERT OR IGNORE INTO keep_runs (id) VALUES (?1)", [id])?;
        }
        // A run queued or started since `keep` was read is not in it, and is kept.
        let n = self.conn.execute(
            "DELETE FROM runs WHERE id NOT IN (SELECT id FROM keep_runs)
               AND status NOT IN (?1, ?2)",
            params![RunStatus::Running, RunStatus::Queued],
        )?;
        self.conn.execute(
            "DELETE FROM artifacts WHERE digest NOT IN (SELECT artifact FROM step_outputs)
               AND digest NOT IN (SELECT artifact FROM step_inputs) AND digest NOT IN (SELECT artifact FROM run_inputs)
               AND digest NOT IN (SELECT artifact FROM modules)
               AND digest NOT IN (SELECT artifact FROM item_outputs)",
            [],
        )?;
        self.conn.execute(
            "DELETE FROM stat_cache WHERE path LIKE '%/objects/blobs/%'",
            [],
        )?;
        Ok(n)
    }
}
