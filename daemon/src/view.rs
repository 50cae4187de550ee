//! What a reader is shown of the records: one shape for `GET /api/v1/runs/{id}`,
//! `millrace runs show --json` and the web UI ([`RunView`]), one for the run
//! listings ([`RunRecord`]) and one for metrics ([`Metric`]). These types carry
//! the OpenAPI schemas; the store's rows (`store::db`) stay plain records, so a
//! column can change without changing what the API promises.

use serde::Serialize;

use crate::model::{AttemptStatus, Placement, RunStatus, StepStatus};
use crate::store::Store;
use crate::store::db::{AttemptRow, MetricRow, RunRow, StepRow};

/// A run's record, without its steps: what the run listings show.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub id: i64,
    pub pipeline: String,
    pub experiment: String,
    /// The digest of the pipeline text the run executes.
    pub definition: String,
    /// Param name → value, as the run resolved them.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// `cli`, `api`, `cron …`, `watch …`, `after PIPELINE`.
    pub trigger: String,
    /// What fired the run: changed paths, the scheduled instant, a missed interval.
    #[schema(value_type = Option<Object>)]
    pub trigger_detail: Option<serde_json::Value>,
    pub no_reuse: bool,
    pub status: RunStatus,
    /// Warnings recorded at creation (deprecated modules).
    pub warnings: Vec<String>,
    /// Module spec → the version it resolved to when the run was created.
    pub module_pins: std::collections::BTreeMap<String, String>,
    /// Milliseconds since the epoch, as every time here.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Why the run failed, was cancelled or interrupted.
    pub error: Option<String>,
}

impl From<RunRow> for RunRecord {
    fn from(r: RunRow) -> RunRecord {
        RunRecord {
            id: r.id,
            pipeline: r.pipeline,
            experiment: r.experiment,
            definition: r.definition,
            params: r.params,
            trigger: r.trigger,
            trigger_detail: r.trigger_detail,
            no_reuse: r.no_reuse,
            status: r.status,
            warnings: r.warnings,
            module_pins: r.module_pins,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            error: r.error,
        }
    }
}

/// One run in full: its record, its input datasets and every step.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunView {
    #[serde(flatten)]
    pub run: RunRecord,
    pub inputs: Vec<RunInput>,
    /// In pipeline order. A queued run has none yet.
    pub steps: Vec<StepView>,
}

/// A dataset the run read (`[inputs.NAME]`), by content.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunInput {
    pub name: String,
    pub path: String,
    pub artifact: String,
}

/// One step of a run: status, timing, key, reuse, module, where its attempts ran,
/// why it ran, what it read and wrote.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StepView {
    pub name: String,
    /// Its place in the pipeline (0 first).
    pub position: i64,
    /// `wasm`, `python`, `container`, `transfer`.
    pub runtime: String,
    pub status: StepStatus,
    pub cache_key: Option<String>,
    /// The parts the cache key is the digest of (code, inputs, params, args, env).
    #[schema(value_type = Option<Object>)]
    pub key_parts: Option<serde_json::Value>,
    /// The run whose result this step reused.
    pub reused_from: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Why it failed (its last attempt's error), or was skipped or cancelled.
    pub error: Option<String>,
    /// `name@version` of the module version the step ran.
    pub module: Option<String>,
    /// Where its latest attempt that left the process ran (see [`AttemptView`]);
    /// null for the in-process runtimes.
    #[schema(value_type = Option<Object>)]
    pub placement: Option<Placement>,
    /// A Python step's interpreter: `{"variant":"warm","recipe":…,"detail":…}` or
    /// `{"variant":"base","reason":…,"detail":…}` (`reason`: `config_off`,
    /// `step_off`, `memory_below_floor`, `import_time_env`, `unavailable`); null
    /// for other runtimes and for steps that did not run (reused, skipped).
    pub python: Option<crate::executor::snapshot::VariantRecord>,
    /// Every attempt, first to last (a retried step has several).
    pub attempts: Vec<AttemptView>,
    /// What the step read, mounted at `/in/MOUNT`.
    pub inputs: Vec<StepInput>,
    pub outputs: Vec<StepOutput>,
    /// Why it ran or which run it reused; null when that cannot be told.
    pub explain: Option<Why>,
    /// A `foreach` step's items and how each ended; null for any other step.
    pub items: Option<ItemsView>,
}

/// A `foreach` step's items: counted by how they ended, and each listed.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ItemsView {
    pub total: usize,
    pub executed: usize,
    pub reused: usize,
    pub failed: usize,
    /// Not ended: pending, running, or cancelled with the run.
    pub other: usize,
    /// By name.
    pub list: Vec<ItemView>,
}

/// One item of a `foreach` step: a top-level entry of its foreach input.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ItemView {
    /// The entry's name (`$MILLRACE_ITEM`); its attempts and log are recorded
    /// under `STEP[NAME]`.
    pub name: String,
    pub status: StepStatus,
    pub cache_key: String,
    /// The run whose item this one reused.
    pub reused_from: Option<i64>,
    pub attempts: i64,
    pub error: Option<String>,
}

impl ItemsView {
    pub fn of(rows: Vec<crate::store::db::ItemRow>) -> ItemsView {
        let mut v = ItemsView {
            total: rows.len(),
            ..ItemsView::default()
        };
        for r in rows {
            match r.status {
                StepStatus::Succeeded => v.executed += 1,
                StepStatus::Reused => v.reused += 1,
                StepStatus::Failed => v.failed += 1,
                _ => v.other += 1,
            }
            v.list.push(ItemView {
                name: r.item,
                status: r.status,
                cache_key: r.cache_key,
                reused_from: r.reused_from,
                attempts: r.attempts,
                error: r.error,
            });
        }
        v
    }

    /// `N items: X executed, Y reused[, Z failed][, W not ended]`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} item{}: {} executed, {} reused",
            self.total,
            if self.total == 1 { "" } else { "s" },
            self.executed,
            self.reused
        );
        if self.failed > 0 {
            s += &format!(", {} failed", self.failed);
        }
        if self.other > 0 {
            s += &format!(", {} not ended", self.other);
        }
        s
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StepInput {
    pub mount: String,
    /// `inputs.NAME` or `STEP.OUTPUT`.
    pub reference: String,
    pub artifact: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StepOutput {
    pub output: String,
    pub artifact: String,
}

/// One execution of a step.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// 1 first.
    pub attempt: i64,
    pub status: AttemptStatus,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i64>,
    pub error: Option<String>,
    pub log_path: Option<String>,
    /// Where the attempt ran:
    /// `{"kind":"container","engine":…,"container":…,"image":…,"image_id":…}` or
    /// `{"kind":"slurm","compute":…,"staging":…,"job_name":…,"job_id":…,"node":…}`;
    /// null for the in-process runtimes.
    #[schema(value_type = Option<Object>)]
    pub placement: Option<Placement>,
}

impl From<AttemptRow> for AttemptView {
    fn from(a: AttemptRow) -> AttemptView {
        AttemptView {
            attempt: a.attempt,
            status: a.status,
            started_at: a.started_at,
            finished_at: a.finished_at,
            exit_code: a.exit_code,
            error: a.error,
            log_path: a.log_path,
            placement: a.placement,
        }
    }
}

/// Why a step ran (what changed in its key) or which run it reused.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Why {
    pub explanation: String,
    /// The parts of the key that changed, vs `compared_with`.
    pub changes: Vec<String>,
    /// The run of the latest earlier execution of this step.
    pub compared_with: Option<i64>,
}

/// One metric value a step reported (the last of a curve, with its index).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Metric {
    pub step: String,
    pub name: String,
    pub value: f64,
    pub step_index: Option<i64>,
}

impl From<MetricRow> for Metric {
    fn from(m: MetricRow) -> Metric {
        Metric {
            step: m.step,
            name: m.name,
            value: m.value,
            step_index: m.step_index,
        }
    }
}

impl RunView {
    /// The run `id` as recorded, or None if there is none.
    pub fn load(store: &Store, id: i64) -> crate::store::db::Result<Option<RunView>> {
        let Some(run) = store.db().read().run(id)? else {
            return Ok(None);
        };
        let (steps, inputs) = {
            let db = store.db();
            (db.read().steps(id)?, db.read().run_inputs(id)?)
        };
        let foreach = foreach_steps(store, &run);
        let mut views = Vec::with_capacity(steps.len());
        for s in steps {
            let is_foreach = foreach.contains(&s.name);
            views.push(step_view(store, &run, s, is_foreach)?);
        }
        Ok(Some(RunView {
            run: run.into(),
            inputs: inputs
                .into_iter()
                .map(|(name, path, artifact)| RunInput {
                    name,
                    path,
                    artifact,
                })
                .collect(),
            steps: views,
        }))
    }
}

fn step_view(
    store: &Store,
    run: &RunRow,
    s: StepRow,
    foreach: bool,
) -> crate::store::db::Result<StepView> {
    let (attempts, outputs, inputs, items) = {
        let db = store.db();
        (
            db.read().attempts(run.id, &s.name)?,
            db.read().step_outputs(run.id, &s.name)?,
            db.read().step_inputs(run.id, &s.name)?,
            db.read().items(run.id, &s.name)?,
        )
    };
    // A foreach step whose input holds nothing has no item rows: it is told
    // apart by its definition.
    let items = (foreach || !items.is_empty()).then(|| ItemsView::of(items));
    let explain = crate::planner::explain(store, run, &s).ok().map(|e| Why {
        explanation: e.explanation,
        changes: e.changes,
        compared_with: e.compared_with,
    });
    let placement = attempts.iter().rev().find_map(|a| a.placement.clone());
    Ok(StepView {
        name: s.name,
        position: s.position,
        runtime: s.runtime,
        status: s.status,
        cache_key: s.cache_key,
        key_parts: s.key_parts,
        reused_from: s.reused_from,
        started_at: s.started_at,
        finished_at: s.finished_at,
        error: s.error,
        module: s.module,
        placement,
        python: s.python,
        attempts: attempts.into_iter().map(AttemptView::from).collect(),
        inputs: inputs
            .into_iter()
            .map(|(mount, reference, artifact)| StepInput {
                mount,
                reference,
                artifact,
            })
            .collect(),
        outputs: outputs
            .into_iter()
            .map(|(output, artifact)| StepOutput { output, artifact })
            .collect(),
        explain,
        items,
    })
}

/// The steps of `run`'s definition that have `foreach` (the recorded text, read
/// as plain TOML: only its keys matter here).
fn foreach_steps(store: &Store, run: &RunRow) -> std::collections::HashSet<String> {
    let Ok(Some((_, text))) = store.db().read().definition(&run.definition) else {
        return Default::default();
    };
    let Ok(doc) = text.parse::<toml::Table>() else {
        return Default::default();
    };
    doc.get("step")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
        .filter(|t| t.get("foreach").is_some())
        .filter_map(|t| Some(t.get("name")?.as_str()?.to_string()))
        .collect()
}

/// `: a, b, c` for up to ten names, then `and N more`; empty for none.
pub fn items_named(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    // Item names are file names a user or a step chose.
    let shown: Vec<String> = names
        .iter()
        .take(10)
        .map(|n| crate::store::artifacts::escape_controls(n))
        .collect();
    let more = match names.len().saturating_sub(10) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!(": {}{more}", shown.join(", "))
}
