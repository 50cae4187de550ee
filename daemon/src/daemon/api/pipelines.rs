//! What the daemon has loaded and what it is doing: `/healthz`, `/api/v1/status`,
//! the pipelines (with their triggers, next firings, last run, diagnostics) and
//! the module registry.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, ErrorBody};
use crate::daemon::Daemon;
use crate::definition::{Catchup, Overlap, Pipeline, TriggerKind};
use crate::diagnostic::display_path;
use crate::model::RunStatus;

#[utoipa::path(get, path = "/healthz", tag = "daemon",
    responses((status = 200, description = "The daemon is up", body = Object)))]
pub(super) async fn healthz(State(d): State<Arc<Daemon>>) -> Json<Value> {
    Json(json!({
        "status": if d.shutdown.is_cancelled() { "stopping" } else { "ok" },
        "pipelines": d.pipelines().len(),
        "active_runs": d.active_runs().len(),
        "uptime_seconds": d.started.elapsed().as_secs(),
    }))
}

/// One pipeline as the API shows it.
pub(super) fn pipeline_json(
    d: &Daemon,
    p: &Pipeline,
    path: &std::path::Path,
    loaded_at: i64,
) -> Value {
    let now = chrono::Utc::now();
    let triggers: Vec<Value> = p
        .triggers
        .iter()
        .map(|t| {
            let params: serde_json::Map<String, Value> = t
                .params
                .iter()
                .map(|(k, v)| (k.get_ref().clone(), v.to_json()))
                .collect();
            match &t.kind {
                TriggerKind::Cron {
                    expr,
                    timezone,
                    catchup,
                } => {
                    let tz = timezone.as_ref().map(|z| z.get_ref().as_str());
                    let next = t
                        .schedule()
                        .and_then(|s| s.next_after(now).map(|n| s.local(n).to_rfc3339()));
                    json!({
                        "kind": "cron", "cron": expr.get_ref(), "timezone": tz.unwrap_or("UTC"),
                        "catchup": match catchup {
                            Catchup::None => "none", Catchup::Latest => "latest",
                            Catchup::All => "all", Catchup::Coalesce => "coalesce",
                        },
                        "next": next, "params": params,
                    })
                }
                TriggerKind::Watch {
                    glob,
                    datastore,
                    debounce,
                } => json!({
                    "kind": "watch", "watch": glob.get_ref(), "datastore": datastore.get_ref(),
                    "debounce_ms": debounce.as_millis() as u64, "params": params,
                }),
                TriggerKind::After { pipeline } => json!({
                    "kind": "after", "after": pipeline.get_ref(), "params": params,
                }),
            }
        })
        .collect();
    let name = p.name.get_ref();
    let last = d
        .store()
        .db()
        .read()
        .runs(Some(name), 1)
        .ok()
        .and_then(|r| r.into_iter().next())
        .map(|r| json!({ "id": r.id, "status": r.status, "created_at": r.created_at }));
    let errors = d
        .files()
        .into_iter()
        .find(|(fp, _)| fp == path)
        .map(|(_, f)| f.diagnostics)
        .unwrap_or_default();
    let g = crate::graph::Graph::new(p);
    let steps: Vec<Value> = p
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({
                "name": s.name.get_ref(),
                "runtime": s.kind.runtime_name(),
                "after": g.deps[i].iter().map(|&d| p.steps[d].name.get_ref().clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "name": name,
        "description": p.description,
        "experiment": p.experiment,
        "path": display_path(path),
        "digest": p.digest,
        "loaded_at": loaded_at,
        "concurrency": {
            "max_runs": p.concurrency.max_runs,
            "overlap": match p.concurrency.overlap {
                Overlap::Queue => "queue", Overlap::Skip => "skip", Overlap::Cancel => "cancel",
            },
        },
        "params": p.params.iter().map(|x| (x.name.get_ref().clone(), x.value.to_json())).collect::<serde_json::Map<_, _>>(),
        "steps": steps,
        "triggers": triggers,
        "last_run": last,
        // Diagnostics of the file's latest text: errors here mean the version
        // above is the last valid one, not what the file says now.
        "diagnostics": errors,
    })
}

/// Files that failed to load (their pipelines keep their last valid version).
pub(super) fn invalid_files(d: &Daemon) -> Vec<Value> {
    d.files()
        .into_iter()
        .filter(|(_, f)| f.diagnostics.iter().any(|x| x["severity"] == "error"))
        .map(|(path, f)| {
            json!({
                "path": display_path(&path),
                "pipeline": f.pipeline,
                "errors": f.diagnostics,
                "text": f.errors,
            })
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v1/pipelines", tag = "pipelines",
    responses((status = 200, description = "Loaded pipelines (triggers, next firing, last run, diagnostics) and invalid files", body = Object)))]
pub(super) async fn pipelines(State(d): State<Arc<Daemon>>) -> Json<Value> {
    let list: Vec<Value> = d
        .pipelines()
        .iter()
        .map(|(p, path, at)| pipeline_json(&d, p, path, *at))
        .collect();
    Json(json!({ "pipelines": list, "invalid_files": invalid_files(&d) }))
}

#[utoipa::path(get, path = "/api/v1/pipelines/{name}", tag = "pipelines",
    params(("name" = String, Path, description = "Pipeline name")),
    responses((status = 200, description = "One pipeline", body = Object),
        (status = 404, description = "No such pipeline", body = ErrorBody)))]
pub(super) async fn pipeline(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
    let Some((p, path)) = d.pipeline(&name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no pipeline named `{name}` is loaded"),
        ));
    };
    let at = d
        .pipelines()
        .into_iter()
        .find(|(x, _, _)| x.name.get_ref() == &name)
        .map_or(0, |(_, _, at)| at);
    Ok(Json(pipeline_json(&d, &p, &path, at)).into_response())
}

#[utoipa::path(get, path = "/api/v1/status", tag = "daemon",
    responses((status = 200, description = "Pipelines, invalid files, running and queued runs, and `counters`: reloads, runs ended, and per cron or watch trigger its checks, cursor moves and whether a change is pending", body = Object)))]
pub(super) async fn status(State(d): State<Arc<Daemon>>) -> ApiResult {
    let queued = d
        .store()
        .db()
        .read()
        .runs_with_status(RunStatus::Queued)
        .map_err(ApiError::internal)?;
    let list: Vec<Value> = d
        .pipelines()
        .iter()
        .map(|(p, path, at)| pipeline_json(&d, p, path, *at))
        .collect();
    Ok(Json(json!({
        "pid": std::process::id(),
        "uptime_seconds": d.started.elapsed().as_secs(),
        "pipelines_dir": display_path(&d.config.pipelines),
        "state_dir": display_path(&d.config.state_dir),
        "pipelines": list,
        "invalid_files": invalid_files(&d),
        "active_runs": d.active_runs().iter().map(|(id, p)| json!({ "id": id, "pipeline": p })).collect::<Vec<_>>(),
        "queued_runs": queued.iter().map(|r| json!({ "id": r.id, "pipeline": r.pipeline })).collect::<Vec<_>>(),
        "running_steps": d.engine.running_steps(),
        "max_parallel_steps": d.engine.config().max_parallel,
        "counters": d.counters.to_json(),
    }))
    .into_response())
}

#[utoipa::path(get, path = "/api/v1/modules", tag = "modules",
    responses((status = 200, description = "Every published module version", body = Object)))]
pub(super) async fn modules(State(d): State<Arc<Daemon>>) -> ApiResult {
    let db = d.store().db();
    let versions = db
        .read()
        .module_versions(None)
        .map_err(ApiError::internal)?;
    let defaults = db.read().module_defaults().map_err(ApiError::internal)?;
    let list: Vec<Value> = versions
        .iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).unwrap_or_default();
            v["default"] = (defaults.get(&m.name) == Some(&m.version)).into();
            v
        })
        .collect();
    Ok(Json(json!({ "modules": list })).into_response())
}
