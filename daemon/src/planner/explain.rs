//! Why a step runs or ran, in words: for `plan` (what will happen, one line per
//! step) and for `millrace explain`, the API and the UI (what happened, from the
//! records). One function compares the step's key with its latest earlier
//! execution for both, so they cannot disagree on what changed.

use std::path::PathBuf;

use serde::Serialize;

use super::key::{KeyParts, short};
use crate::model::StepStatus;
use crate::store::Store;
use crate::store::db::{Result, RunRow, StepRow};

/// Why [`super::Planner::decide`] says a step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The step says `reuse = false`.
    ReuseOff,
    /// The run was started with `--no-reuse`.
    NoReuse,
    /// No intact earlier execution has this key.
    NotCached,
    /// An earlier execution of this transfer has the key, but its destination
    /// no longer holds the artifact it published (changed or deleted since).
    DestinationChanged { run: i64, destination: PathBuf },
    /// A resumed run's step completed before the resume, but its outputs are gone
    /// or damaged.
    LostSinceResume,
}

/// A step's latest earlier execution (with a key), before a run.
struct Earlier {
    row: StepRow,
    parts: Option<KeyParts>,
}

fn earlier(store: &Store, pipeline: &str, step: &str, before_run: i64) -> Result<Option<Earlier>> {
    let prev = store
        .db()
        .read()
        .previous_step(pipeline, step, before_run)?;
    Ok(prev.map(|row| Earlier {
        parts: parts_of(&row),
        row,
    }))
}

fn parts_of(s: &StepRow) -> Option<KeyParts> {
    s.key_parts
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// A key against the latest earlier execution's.
enum Comparison {
    /// None with a readable key.
    NoEarlier,
    /// The same key, yet not reused.
    SameKey { run: i64 },
    /// What changed.
    Changed { run: i64, changes: Vec<String> },
}

fn compare(earlier: Option<&Earlier>, parts: &KeyParts) -> Comparison {
    match earlier.and_then(|e| Some((e.row.run_id, e.parts.as_ref()?))) {
        None => Comparison::NoEarlier,
        Some((run, old)) => {
            let changes = parts.changes_since(old);
            if changes.is_empty() {
                Comparison::SameKey { run }
            } else {
                Comparison::Changed { run, changes }
            }
        }
    }
}

/// Why a step with `parts` will run (`plan`'s reason column).
pub fn why_run(
    store: &Store,
    pipeline: &str,
    step: &str,
    parts: &KeyParts,
    reason: &Reason,
) -> Result<String> {
    Ok(match reason {
        Reason::ReuseOff => "reuse = false".into(),
        Reason::NoReuse => "--no-reuse".into(),
        Reason::DestinationChanged { run, destination } => format!(
            "same key as run {run}, but the destination {} no longer holds what it published",
            destination.display()
        ),
        Reason::LostSinceResume => "its outputs from before the resume are gone or damaged".into(),
        Reason::NotCached => {
            let prev = earlier(store, pipeline, step, i64::MAX)?;
            match compare(prev.as_ref(), parts) {
                Comparison::NoEarlier => "never ran before".into(),
                Comparison::SameKey { run } => {
                    format!("same key as run {run}, but its outputs are gone or damaged")
                }
                Comparison::Changed { run, changes } => {
                    format!("vs run {run}: {}", changes.join("; "))
                }
            }
        }
    })
}

/// Why a recorded step ran or was reused (`millrace explain`, the API).
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub explanation: String,
    /// The components of the key that changed, vs `compared_with`.
    pub changes: Vec<String>,
    /// The run of the latest earlier execution of this step, if any.
    pub compared_with: Option<i64>,
}

pub fn explain(store: &Store, run: &RunRow, s: &StepRow) -> Result<Explanation> {
    let parts = parts_of(s);
    let prev = earlier(store, &run.pipeline, &s.name, run.id)?;
    let (explanation, changes): (String, Vec<String>) = match (s.status, s.reused_from, &parts) {
        (_, Some(from), _) => (
            format!(
                "reused the outputs of run {from} (same cache key {})",
                short(s.cache_key.as_deref().unwrap_or(""))
            ),
            vec![],
        ),
        (StepStatus::Skipped, _, _) => (
            format!("skipped: {}", s.error.clone().unwrap_or_default()),
            vec![],
        ),
        (_, None, None) => ("did not get as far as computing a cache key".into(), vec![]),
        (_, None, Some(_)) if run.no_reuse => (
            "executed: the run was started with --no-reuse".into(),
            vec![],
        ),
        (_, None, Some(parts)) => match compare(prev.as_ref(), parts) {
            Comparison::NoEarlier => ("executed: no earlier execution of this step".into(), vec![]),
            Comparison::SameKey { run } => (
                format!(
                    "executed: same key as run {run}, but that result was not reusable (reuse = false, failed, or its outputs were missing or damaged)"
                ),
                vec![],
            ),
            Comparison::Changed { run, mut changes } => {
                // A Python step's code digest names its interpreter: say so when
                // that is what moved, rather than only "code changed".
                if let (Some(now), Some(then)) =
                    (&s.python, prev.as_ref().and_then(|p| p.row.python.as_ref()))
                    && now.variant != then.variant
                {
                    changes.insert(0, format!("python interpreter changed: {then} → {now}"));
                }
                (format!("executed: compared with run {run}:"), changes)
            }
        },
    };
    Ok(Explanation {
        explanation,
        changes,
        compared_with: prev.map(|p| p.row.run_id),
    })
}
