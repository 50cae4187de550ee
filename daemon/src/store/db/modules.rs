//! The module registry's tables (SPEC "Modules"): published versions, the default
//! of each name, and every change of status. The rules of the registry (what may
//! be published, deprecated, disabled) are [`crate::module`]'s.

use rusqlite::params;
use semver::Version;

use super::{Batch, Result, now_ms};
use crate::model::StepStatus;

/// One published version: a row of `modules`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleVersion {
    pub name: String,
    pub version: String,
    /// `wasm` or `python`.
    pub kind: String,
    pub digest: String,
    /// The artifact (a tree) that holds the code in the store.
    pub artifact: String,
    pub size: u64,
    /// The entry script of a Python module.
    pub entry: Option<String>,
    pub description: Option<String>,
    pub status: String,
    /// The deprecation (or disable) message.
    pub message: Option<String>,
    pub published_at: i64,
}

impl ModuleVersion {
    pub fn semver(&self) -> Option<Version> {
        Version::parse(&self.version).ok()
    }

    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

impl Batch<'_> {
    /// Published versions (of one module, or all).
    pub fn module_versions(&self, name: Option<&str>) -> Result<Vec<ModuleVersion>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, version, kind, digest, artifact, size, entry, description, status, message, published_at
             FROM modules WHERE (?1 IS NULL OR name = ?1) ORDER BY name, published_at",
        )?;
        let rows = stmt
            .query_map([name], |r| {
                Ok(ModuleVersion {
                    name: r.get(0)?,
                    version: r.get(1)?,
                    kind: r.get(2)?,
                    digest: r.get(3)?,
                    artifact: r.get(4)?,
                    size: r.get::<_, i64>(5)? as u64,
                    entry: r.get(6)?,
                    description: r.get(7)?,
                    status: r.get(8)?,
                    message: r.get(9)?,
                    published_at: r.get(10)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn module_defaults(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, version FROM module_defaults")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Records a new version. Returns the digest already recorded under this name
    /// and version, if any (then nothing is written). One INSERT decides, so two
    /// processes publishing the same version leave one record.
    pub fn publish_module(&self, m: &ModuleVersion) -> Result<Option<String>> {
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO modules (name, version, kind, digest, artifact, size, entry, description, status, published_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'active', ?9)",
            params![
                m.name,
                m.version,
                m.kind,
                m.digest,
                m.artifact,
                m.size as i64,
                m.entry,
                m.description,
                m.published_at
            ],
        )?;
        if inserted == 0 {
            return Ok(Some(self.conn.query_row(
                "SELECT digest FROM modules WHERE name = ?1 AND version = ?2",
                params![m.name, m.version],
                |r| r.get(0),
            )?));
        }
        self.module_event(&m.name, &m.version, "published", None)?;
        Ok(None)
    }

    pub fn set_module_status(
        &self,
        name: &str,
        version: &str,
        status: &str,
        message: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE modules SET status = ?3, message = ?4 WHERE name = ?1 AND version = ?2",
            params![name, version, status, message],
        )?;
        let event = match status {
            "active" => "enabled",
            other => other,
        };
        self.module_event(name, version, event, message)
    }

    pub fn set_module_default(&self, name: &str, version: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO module_defaults (name, version, set_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version, set_at = excluded.set_at",
            params![name, version, now_ms()],
        )?;
        self.module_event(name, version, "made default", None)
    }

    fn module_event(
        &self,
        name: &str,
        version: &str,
        event: &str,
        message: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO module_events (name, version, event, message, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, version, event, message, now_ms()],
        )?;
        Ok(())
    }

    /// A version's history: (event, message, at), oldest first.
    pub fn module_events(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Vec<(String, Option<String>, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT event, message, at FROM module_events WHERE name = ?1 AND version = ?2 ORDER BY rowid",
        )?;
        let rows = stmt
            .query_map(params![name, version], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// The latest step executions of `name@version`: (run, pipeline, step, status).
    pub fn module_uses(
        &self,
        id: &str,
        limit: i64,
    ) -> Result<Vec<(i64, String, String, StepStatus)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.run_id, r.pipeline, s.name, s.status FROM steps s JOIN runs r ON r.id = s.run_id
             WHERE s.module = ?1 ORDER BY s.run_id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![id, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}
