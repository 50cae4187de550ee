//! Runs: create, list, one in full ([`RunView`]), metrics, step logs (followed
//! too), cancel.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, ErrorBody, MAX_BODY, ParamScalar};
use crate::daemon::{Daemon, SubmitError, Submitted};
use crate::engine::RunRequest;
use crate::model::RunStatus;
use crate::view::{Metric, RunRecord, RunView};

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RunsPage {
    runs: Vec<RunRecord>,
    /// `before` for the next page; null on the last one.
    next: Option<i64>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Queued {
    run_id: i64,
    status: RunStatus,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Cancelling {
    run_id: i64,
    cancelling: bool,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Resuming {
    run_id: i64,
    queued: bool,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RunMetrics {
    run: i64,
    metrics: Vec<Metric>,
}

#[derive(serde::Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// Param name → value (a string, number or boolean, converted to the param's type).
    #[serde(default)]
    #[schema(value_type = std::collections::HashMap<String, ParamScalar>)]
    params: serde_json::Map<String, Value>,
    #[serde(default)]
    no_reuse: bool,
}

#[utoipa::path(post, path = "/api/v1/pipelines/{name}/runs", tag = "runs",
    params(("name" = String, Path, description = "Pipeline name")),
    request_body(content = Option<CreateRun>, description = "Params (by name) and no_reuse; an empty body is `{}`"),
    responses((status = 202, description = "Queued", body = Queued),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such pipeline", body = ErrorBody),
        (status = 409, description = "Skipped: overlap = \"skip\" and the pipeline is busy", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Unknown param, wrong type, a control character in a value, or the pipeline no longer validates", body = ErrorBody),
        (status = 503, description = "The daemon is stopping", body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn create_run(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult {
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                format!(
                    "the request body is over the limit of {} MiB",
                    MAX_BODY >> 20
                ),
            )
        } else {
            ApiError::new(status, format!("request body: {}", e.body_text()))
        }
    })?;
    // No body at all (or `null`) is an empty request: `curl -X POST …/runs` works.
    let trimmed = body.trim_ascii();
    let body: CreateRun = if trimmed.is_empty() || trimmed == b"null" {
        CreateRun::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            let status = if e.is_data() {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError::new(status, format!("request body: {e}"))
        })?
    };
    let params = body
        .params
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s,
                Value::Number(_) | Value::Bool(_) => v.to_string(),
                other => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("param `{k}`: expected a string, number or boolean, got {other}"),
                    ));
                }
            };
            // Control characters are refused with the other param checks, once the
            // pipeline is known (an unknown pipeline is a 404 whatever the params).
            Ok((k, text))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let req = RunRequest {
        params,
        no_reuse: body.no_reuse,
        trigger: "api".into(),
        trigger_detail: None,
    };
    match d.submit(&name, req, |_| Ok(())) {
        Ok(Submitted::Queued(id)) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "run_id": id, "status": RunStatus::Queued })),
        )
            .into_response()),
        Ok(Submitted::Skipped(why)) => Err(ApiError::new(StatusCode::CONFLICT, why)),
        Err(SubmitError::NoSuchPipeline(n)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no pipeline named `{n}` is loaded"),
        )),
        Err(SubmitError::Params(e)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e)),
        Err(SubmitError::Invalid(e)) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e)),
        Err(e @ SubmitError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RunsQuery {
    pipeline: Option<String>,
    status: Option<String>,
    /// RFC 3339, or milliseconds since the epoch.
    since: Option<String>,
    /// Paging: runs with an id below this one (`next` of the previous page).
    before: Option<i64>,
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/runs", tag = "runs",
    params(("pipeline" = Option<String>, Query, description = "Only this pipeline's runs"),
        ("status" = Option<RunStatus>, Query, description = "Only runs in this status"),
        ("since" = Option<String>, Query, format = DateTime, description = "Created at or after (RFC 3339)"),
        ("before" = Option<i64>, Query, description = "Paging cursor: runs with a smaller id (`next` of the previous page)"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 50)")),
    responses((status = 200, description = "Newest first", body = RunsPage),
        (status = 400, description = "A bad filter", body = ErrorBody)))]
pub(super) async fn runs(
    State(d): State<Arc<Daemon>>,
    q: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let status: Option<RunStatus> = q.status.as_deref().map(str::parse).transpose().map_err(
        |e: crate::model::UnknownStatus| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "status `{}`: expected one of {}",
                    e.value,
                    e.expected.join(", ")
                ),
            )
        },
    )?;
    let since = match &q.since {
        None => None,
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "since `{s}`: expected an RFC 3339 instant like 2026-11-28T00:00:00Z"
                        ),
                    )
                })?,
        ),
    };
    let rows = d
        .store()
        .db()
        .read()
        .runs_filtered(&crate::store::db::RunFilter {
            pipeline: q.pipeline.as_deref(),
            status,
            since,
            before: q.before,
            limit,
        })
        .map_err(ApiError::internal)?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    let page = RunsPage {
        runs: rows.into_iter().map(RunRecord::from).collect(),
        next,
    };
    Ok(Json(page).into_response())
}

pub(super) fn run_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no run `{id}`: run ids are numbers"),
        )
    })
}

/// A run with its inputs and, per step: status, timing, attempts and where they
/// ran, module version, reuse source, why it ran or was reused, inputs and outputs
/// with digests: the [`RunView`] that `millrace runs show --json` prints too.
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 200, description = "The run, its inputs, and per step: status, timing, attempts, placement, Python interpreter (warm or base, and why), module, reuse source, explain, inputs and outputs with digests", body = RunView),
        (status = 404, description = "No such run", body = ErrorBody)))]
pub(super) async fn run(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    let id = run_id(&id)?;
    match RunView::load(d.store(), id).map_err(ApiError::internal)? {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}"))),
    }
}

/// A run's metrics: `{"metrics": [{step, name, value, step_index}]}`.
#[utoipa::path(get, path = "/api/v1/runs/{id}/metrics", tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 200, description = "The run's metrics", body = RunMetrics),
        (status = 404, description = "No such run", body = ErrorBody)))]
pub(super) async fn run_metrics(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    let id = run_id(&id)?;
    let db = d.store().db();
    if db.read().run(id).map_err(ApiError::internal)?.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    let metrics = db.read().metrics(id).map_err(ApiError::internal)?;
    let body = RunMetrics {
        run: id,
        metrics: metrics.into_iter().map(Metric::from).collect(),
    };
    Ok(Json(body).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogQuery {
    attempt: Option<u32>,
    #[serde(default)]
    follow: bool,
}

/// A step's log (its latest attempt, or `?attempt=N`) as text; with
/// `?follow=true` the response streams until the run is over.
#[utoipa::path(get, path = "/api/v1/runs/{id}/steps/{step}/logs", tag = "runs",
    params(("id" = i64, Path, description = "Run id"), ("step" = String, Path, description = "Step name"),
        ("attempt" = Option<u32>, Query, description = "Attempt (default: the latest)"),
        ("follow" = Option<bool>, Query, description = "Stream until the run ends")),
    responses((status = 200, description = "The log", content_type = "text/plain", body = String),
        (status = 400, description = "A bad query", body = ErrorBody),
        (status = 404, description = "No such run, step or attempt", body = ErrorBody)))]
pub(super) async fn step_log(
    State(d): State<Arc<Daemon>>,
    Path((id, step)): Path<(String, String)>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let id = run_id(&id)?;
    let attempts = {
        let db = d.store().db();
        let Some(run) = db.read().run(id).map_err(ApiError::internal)? else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")));
        };
        // A queued run has no step rows yet: its recorded definition names them.
        let known = db
            .read()
            .step(id, &step)
            .map_err(ApiError::internal)?
            .is_some()
            || db
                .read()
                .definition(&run.definition)
                .ok()
                .flatten()
                .and_then(|(_, text)| text.parse::<toml::Table>().ok())
                .and_then(|t| t.get("step").and_then(|s| s.as_array()).cloned())
                .is_some_and(|steps| {
                    steps
                        .iter()
                        .any(|s| s.get("name").and_then(|n| n.as_str()) == Some(step.as_str()))
                });
        if !known {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("run {id} has no step `{step}`"),
            ));
        }
        db.read().attempts(id, &step).map_err(ApiError::internal)?
    };
    let chosen = match q.attempt {
        Some(n) => attempts
            .iter()
            .find(|a| a.attempt == i64::from(n))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "step `{step}` of run {id} has no attempt {n} ({} so far)",
                        attempts.len()
                    ),
                )
            })?
            .into(),
        None => attempts.last().cloned(),
    };
    let path = chosen
        .and_then(|a| a.log_path)
        .map(std::path::PathBuf::from);
    let text_headers = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; charset=utf-8",
    )];
    if !q.follow {
        let body = match &path {
            Some(p) => tokio::fs::read(p).await.unwrap_or_default(),
            None => Vec::new(),
        };
        return Ok((text_headers, body).into_response());
    }
    // Follow: send what is there, then what is appended, until the step's run ends
    // (or the daemon stops).
    let stream = async_stream(d.clone(), id, step.clone(), path);
    Ok((text_headers, axum::body::Body::from_stream(stream)).into_response())
}

/// The chunks of a followed log.
pub(super) fn async_stream(
    d: Arc<Daemon>,
    id: i64,
    step: String,
    mut path: Option<std::path::PathBuf>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    let state = (0u64, false);
    futures_util::stream::unfold(state, move |(offset, done)| {
        let d = d.clone();
        let step = step.clone();
        if path.is_none() {
            path = d
                .store()
                .db()
                .read()
                .attempts(id, &step)
                .ok()
                .and_then(|a| a.last().and_then(|a| a.log_path.clone()))
                .map(std::path::PathBuf::from);
        }
        let p = path.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let chunk = match &p {
                    Some(p) => read_from(p, offset).await,
                    None => Vec::new(),
                };
                if !chunk.is_empty() {
                    let n = chunk.len() as u64;
                    return Some((Ok(bytes::Bytes::from(chunk)), (offset + n, false)));
                }
                let over = d
                    .store()
                    .db()
                    .read()
                    .run(id)
                    .ok()
                    .flatten()
                    .is_none_or(|r| r.status.is_terminal());
                if over || d.shutdown.is_cancelled() {
                    // One last read for what was written at the very end.
                    let tail = match &p {
                        Some(p) => read_from(p, offset).await,
                        None => Vec::new(),
                    };
                    return (!tail.is_empty()).then(|| {
                        let n = tail.len() as u64;
                        (Ok(bytes::Bytes::from(tail)), (offset + n, true))
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                if p.is_none() {
                    return Some((Ok(bytes::Bytes::new()), (offset, false)));
                }
            }
        }
    })
}

pub(super) async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Vec::new();
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(1 << 20).read_to_end(&mut buf).await;
    buf
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/resume", tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 202, description = "Queued to finish, reusing what succeeded", body = Resuming),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "Neither failed, cancelled nor interrupted", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down", body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn resume(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    let id = run_id(&id)?;
    let exists = d
        .store()
        .db()
        .read()
        .run(id)
        .map_err(ApiError::internal)?
        .is_some();
    if !exists {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    match d.resume(id) {
        Ok(Ok(())) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "run_id": id, "queued": true })),
        )
            .into_response()),
        Ok(Err(why)) => Err(ApiError::new(StatusCode::CONFLICT, why)),
        Err(crate::daemon::SubmitError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 202, description = "Cancelling", body = Cancelling),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "Neither queued nor running", body = ErrorBody)),
    security(("bearer" = [])))]
pub(super) async fn cancel(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    let id = run_id(&id)?;
    let exists = d
        .store()
        .db()
        .read()
        .run(id)
        .map_err(ApiError::internal)?
        .is_some();
    if !exists {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    match d.cancel(id) {
        Ok(true) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "run_id": id, "cancelling": true })),
        )
            .into_response()),
        Ok(false) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("run {id} is neither queued nor running"),
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}
