//! The SQLite database: pipeline definitions, runs, steps and their attempts,
//! artifacts, step inputs and outputs (lineage), cache entries, metrics and the stat
//! cache. WAL, foreign keys on, migrations embedded and applied at open.
//!
//! Here the connection, migrations, rows and runs' queries; the other tables' in `db/`:
//! `steps` (and attempts), `artifacts` (lineage, cache, metrics), `triggers`, `modules`.
//!
//! Commits use `synchronous = NORMAL`: in WAL mode a crash of the process or the
//! machine can lose the last transactions but never corrupts the database, and a
//! commit costs no fsync, which is what keeps per-step bookkeeping cheap.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::model::{AttemptStatus, Placement, RunStatus, StepStatus};

mod artifacts;
mod items;
mod migrations;
mod modules;
mod steps;
mod triggers;

use migrations::MIGRATIONS;

pub use items::{CachedItem, ItemRow};
pub use modules::ModuleVersion;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {path}: {}", describe(.source))]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    /// SQLite's message once (as a source too it would be printed twice).
    #[error("database: {}", describe(.0))]
    Sql(rusqlite::Error),
    #[error(
        "the database was written by a newer millrace (schema {found}, this binary knows {known})"
    )]
    TooNew { found: i64, known: i64 },
    /// A conditional update found the row changed by someone else.
    #[error("{0}")]
    Conflict(String),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        DbError::Sql(e)
    }
}

impl DbError {
    /// The write failed for want of disk space (the transaction was rolled back).
    pub fn is_disk_full(&self) -> bool {
        let (DbError::Sql(e) | DbError::Open { source: e, .. }) = self else {
            return false;
        };
        e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
    }
}

fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => {
            "the disk is full (free some space and try again)".into()
        }
        _ => match e {
            rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
            e => e.to_string(),
        },
    }
}

pub type Result<T> = std::result::Result<T, DbError>;

/// The states are TEXT columns holding [`crate::model`]'s words: bound and read as
/// the typed values, so no query spells a state.
macro_rules! status_column {
    ($($t:ty),+) => {$(
        impl rusqlite::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $t {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<$t> {
                v.as_str()?
                    .parse()
                    .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    )+};
}

status_column!(RunStatus, StepStatus, AttemptStatus);

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

pub struct Db {
    conn: Connection,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: i64,
    pub pipeline: String,
    pub experiment: String,
    pub definition: String,
    pub params: serde_json::Value,
    pub trigger: String,
    /// What fired the run: changed paths, the scheduled instant, a missed interval.
    pub trigger_detail: Option<serde_json::Value>,
    pub no_reuse: bool,
    pub status: RunStatus,
    /// Warnings recorded at creation (deprecated modules).
    pub warnings: Vec<String>,
    /// Module spec → the version it resolved to when the run was created.
    pub module_pins: std::collections::BTreeMap<String, String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRow {
    pub run_id: i64,
    pub name: String,
    pub position: i64,
    pub runtime: String,
    pub status: StepStatus,
    pub cache_key: Option<String>,
    pub key_parts: Option<serde_json::Value>,
    pub reused_from: Option<i64>,
    pub attempts: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
    /// `name@version` of the module version the step ran.
    pub module: Option<String>,
    /// A Python step's interpreter: warm or base, and why the base.
    pub python: Option<crate::executor::snapshot::VariantRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptRow {
    pub attempt: i64,
    pub status: AttemptStatus,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub log_path: Option<String>,
    /// Where the attempt ran (`model::Placement`):
    /// `{"kind":"container","engine":…,"container":…,"image":…,"image_id":…}` or
    /// `{"kind":"slurm","compute":…,"staging":…,"job_name":…,"job_id":…,"node":…}`;
    /// absent for the in-process runtimes.
    pub placement: Option<Placement>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricRow {
    pub step: String,
    pub name: String,
    pub value: f64,
    pub step_index: Option<i64>,
}

/// Where an artifact is used: produced as an output, reused, or read as an input.
#[derive(Debug, Clone, Serialize)]
pub struct LineageRow {
    pub run_id: i64,
    pub pipeline: String,
    pub step: String,
    pub name: String,
    /// `output` (this execution wrote it), `reused` (the step took it over from
    /// `reused_from`), `input` (a step read it) or `pipeline input`.
    pub role: String,
    /// For `reused`: the run whose execution produced it.
    pub reused_from: Option<i64>,
}

const RUN_COLUMNS: &str = "id, pipeline, experiment, definition, params, trigger, no_reuse, status, created_at, started_at, finished_at, error, trigger_detail, warnings, module_pins";
const STEP_COLUMNS: &str = "run_id, name, position, runtime, status, cache_key, key_parts, reused_from, attempts, started_at, finished_at, error, module, python";

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let params: String = r.get(4)?;
    Ok(RunRow {
        id: r.get(0)?,
        pipeline: r.get(1)?,
        experiment: r.get(2)?,
        definition: r.get(3)?,
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        trigger: r.get(5)?,
        no_reuse: r.get(6)?,
        status: r.get(7)?,
        created_at: r.get(8)?,
        started_at: r.get(9)?,
        finished_at: r.get(10)?,
        error: r.get(11)?,
        trigger_detail: r
            .get::<_, Option<String>>(12)?
            .and_then(|d| serde_json::from_str(&d).ok()),
        warnings: r
            .get::<_, Option<String>>(13)?
            .and_then(|d| serde_json::from_str(&d).ok())
            .unwrap_or_default(),
        module_pins: r
            .get::<_, Option<String>>(14)?
            .and_then(|d| serde_json::from_str(&d).ok())
            .unwrap_or_default(),
    })
}

fn step_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StepRow> {
    let parts: Option<String> = r.get(6)?;
    Ok(StepRow {
        run_id: r.get(0)?,
        name: r.get(1)?,
        position: r.get(2)?,
        runtime: r.get(3)?,
        status: r.get(4)?,
        cache_key: r.get(5)?,
        key_parts: parts.and_then(|p| serde_json::from_str(&p).ok()),
        reused_from: r.get(7)?,
        attempts: r.get(8)?,
        started_at: r.get(9)?,
        finished_at: r.get(10)?,
        error: r.get(11)?,
        module: r.get(12)?,
        python: r
            .get::<_, Option<String>>(13)?
            .and_then(|p| serde_json::from_str(&p).ok()),
    })
}

/// Which runs a listing wants.
#[derive(Debug, Default)]
pub struct RunFilter<'a> {
    pub pipeline: Option<&'a str>,
    pub status: Option<RunStatus>,
    pub since: Option<i64>,
    pub before: Option<i64>,
    pub limit: i64,
}

/// A new run's identity.
pub struct NewRun<'a> {
    pub pipeline: &'a str,
    pub experiment: &'a str,
    pub definition: &'a str,
    pub params: &'a serde_json::Value,
    pub trigger: &'a str,
    pub trigger_detail: Option<&'a serde_json::Value>,
    pub no_reuse: bool,
    /// `running` (started at once, by `millrace run`) or `queued` (the daemon).
    pub status: RunStatus,
    pub warnings: &'a [String],
    pub module_pins: &'a std::collections::BTreeMap<String, String>,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path).map_err(|source| DbError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Db::init(conn)
    }

    pub fn open_in_memory() -> Result<Db> {
        Db::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Db> {
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Fold the WAL back into the database every ~40 MB rather than every 4 MB:
        // each checkpoint costs two fsyncs, and a 1000-step run writes tens of MB of
        // WAL frames.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
        // Closing does not checkpoint: a short CLI command would otherwise pay two
        // fsyncs on exit. The WAL is still folded back every 10 000 pages.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
        let mut db = Db { conn };
        db.migrate()?;
        Ok(db)
    }

    /// Applies missing migrations. The version is read inside an immediate
    /// transaction, so two processes opening a new database do not both migrate.
    fn migrate(&mut self) -> Result<()> {
        let known = MIGRATIONS.len() as i64;
        // An up-to-date database is only read: a read command must work on a full
        // disk, and a reader must not wait for a writer's lock.
        let current: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if current == known {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > known {
            return Err(DbError::TooNew {
                found: version,
                known,
            });
        }
        if version == known {
            return Ok(());
        }
        for m in MIGRATIONS.iter().skip(version as usize) {
            tx.execute_batch(m)?;
        }
        tx.pragma_update(None, "user_version", known)?;
        tx.commit()?;
        Ok(())
    }

    /// Runs `f` in one transaction: several writes, one commit.
    pub fn batch<T>(&mut self, f: impl FnOnce(&Batch<'_>) -> Result<T>) -> Result<T> {
        let tx = self.conn.transaction()?;
        let out = f(&Batch { conn: &tx })?;
        tx.commit()?;
        Ok(out)
    }

    /// Read access (every write method of [`Batch`] also works outside a batch).
    pub fn read(&self) -> Batch<'_> {
        Batch { conn: &self.conn }
    }
}

/// Statements over a connection or a transaction.
pub struct Batch<'c> {
    conn: &'c Connection,
}

impl Batch<'_> {
    pub fn record_definition(
        &self,
        digest: &str,
        pipeline: &str,
        path: &str,
        text: &str,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO definitions (digest, pipeline, path, text, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![digest, pipeline, path, text, now_ms()],
        )?;
        Ok(())
    }

    pub fn definition(&self, digest: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT path, text FROM definitions WHERE digest = ?1",
                [digest],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    pub fn create_run(&self, r: &NewRun<'_>) -> Result<i64> {
        let now = now_ms();
        let started = (r.status == RunStatus::Running).then_some(now);
        self.conn.execute(
            "INSERT INTO runs (pipeline, experiment, definition, params, trigger, trigger_detail, no_reuse, status, created_at, started_at, warnings, module_pins)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                r.pipeline,
                r.experiment,
                r.definition,
                r.params.to_string(),
                r.trigger,
                r.trigger_detail.map(|d| d.to_string()),
                r.no_reuse,
                r.status,
                now,
                started,
                (!r.warnings.is_empty()).then(|| serde_json::json!(r.warnings).to_string()),
                (!r.module_pins.is_empty()).then(|| serde_json::json!(r.module_pins).to_string()),
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn set_run_status(&self, id: i64, status: RunStatus, error: Option<&str>) -> Result<()> {
        let now = now_ms();
        let finished = status.is_terminal().then_some(now);
        let started = (status == RunStatus::Running).then_some(now);
        self.conn.execute(
            "UPDATE runs SET status = ?2, error = ?3, finished_at = ?4, started_at = coalesce(started_at, ?5)
             WHERE id = ?1",
            params![id, status, error, finished, started],
        )?;
        Ok(())
    }

    /// A run found `running` with no process driving it: it becomes `interrupted`
    /// and its crash count goes up by one. Returns the new count.
    pub fn record_crash(&self, id: i64, error: &str) -> Result<i64> {
        Ok(self.conn.query_row(
            "UPDATE runs SET status = ?4, error = ?2, finished_at = ?3, crashes = crashes + 1
             WHERE id = ?1 RETURNING crashes",
            params![id, error, now_ms(), RunStatus::Interrupted],
            |r| r.get(0),
        )?)
    }

    /// How many times a process stopped while running this run (0 for no such run).
    pub fn run_crashes(&self, id: i64) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT crashes FROM runs WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    /// Fails a run that is not to be resumed, with the steps and attempts a crash
    /// left `running` (nothing runs them any more). Use inside a batch.
    pub fn fail_abandoned_run(&self, id: i64, error: &str) -> Result<()> {
        self.end_abandoned_run(id, RunStatus::Failed, error)
    }

    /// Ends as cancelled a run no process drives any more (`millrace cancel` of an
    /// interrupted run): its steps and attempts still marked running are cancelled,
    /// so nothing resumes it. Use inside a batch.
    pub fn cancel_abandoned_run(&self, id: i64, error: &str) -> Result<()> {
        self.end_abandoned_run(id, RunStatus::Cancelled, error)
    }

    fn end_abandoned_run(&self, id: i64, end: RunStatus, error: &str) -> Result<()> {
        let (step, attempt) = match end {
            RunStatus::Cancelled => (StepStatus::Cancelled, AttemptStatus::Cancelled),
            _ => (StepStatus::Failed, AttemptStatus::Failed),
        };
        let now = now_ms();
        self.conn.execute(
            "UPDATE steps SET status = ?4, error = ?2, finished_at = ?3
             WHERE run_id = ?1 AND status = ?5",
            params![id, error, now, step, StepStatus::Running],
        )?;
        self.conn.execute(
            "UPDATE attempts SET status = ?4, error = ?2, finished_at = ?3
             WHERE run_id = ?1 AND status = ?5",
            params![id, error, now, attempt, AttemptStatus::Running],
        )?;
        self.set_run_status(id, end, Some(error))
    }

    /// Whether any run ever had a container step.
    pub fn has_container_steps(&self) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM steps WHERE runtime = 'container' LIMIT 1",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Failed runs the process stopped in at least `crashes` times: those the
    /// daemon gave up resuming (for `/metrics`).
    pub fn runs_given_up(&self, crashes: i64) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM runs WHERE status = ?1 AND crashes >= ?2",
            params![RunStatus::Failed, crashes],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// A pipeline's newest ended run's status (succeeded, failed or cancelled)
    /// and when its newest succeeded run finished (ms): `/metrics` at start.
    pub fn last_outcomes(&self, pipeline: &str) -> Result<(Option<RunStatus>, Option<i64>)> {
        let last = self
            .conn
            .query_row(
                "SELECT status FROM runs WHERE pipeline = ?1 AND status IN (?2, ?3, ?4)
                 ORDER BY finished_at DESC, id DESC LIMIT 1",
                params![
                    pipeline,
                    RunStatus::Succeeded,
                    RunStatus::Failed,
                    RunStatus::Cancelled
                ],
                |r| r.get(0),
            )
            .optional()?;
        let success = self.conn.query_row(
            "SELECT max(finished_at) FROM runs WHERE pipeline = ?1 AND status = ?2",
            params![pipeline, RunStatus::Succeeded],
            |r| r.get(0),
        )?;
        Ok((last, success))
    }

    /// Runs in one status, oldest first (`queued` runs start in this order).
    pub fn runs_with_status(&self, status: RunStatus) -> Result<Vec<RunRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status = ?1 ORDER BY id"
        ))?;
        let rows = stmt
            .query_map([status], run_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn run(&self, id: i64) -> Result<Option<RunRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                run_row,
            )
            .optional()?)
    }

    pub fn latest_run_id(&self) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row("SELECT max(id) FROM runs", [], |r| r.get(0))?)
    }

    pub fn runs(&self, pipeline: Option<&str>, limit: i64) -> Result<Vec<RunRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR pipeline = ?1) ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt
            .query_map(params![pipeline, limit], run_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Newest first: of one pipeline, in one status, created at or after `since`
    /// (ms), with an id below `before` (the paging cursor).
    pub fn runs_filtered(&self, f: &RunFilter<'_>) -> Result<Vec<RunRow>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR pipeline = ?1) AND (?2 IS NULL OR status = ?2)
               AND (?3 IS NULL OR created_at >= ?3) AND (?4 IS NULL OR id < ?4)
             ORDER BY id DESC LIMIT ?5"
        ))?;
        let rows = stmt
            .query_map(
                params![f.pipeline, f.status, f.since, f.before, f.limit],
                run_row,
            )?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn all_artifacts(&self) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare("SELECT digest FROM artifacts")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests;
