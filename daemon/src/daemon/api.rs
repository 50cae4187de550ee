//! The REST API (SPEC "REST API"), served by axum. Mutating routes need the
//! bearer token (compared in constant time); reads need it only when
//! `public_read = false`. Errors have one shape:
//! `{"error": {"status": 404, "message": "…"}}`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{Daemon, SubmitError, Submitted};
use crate::definition::{Catchup, Overlap, Pipeline, TriggerKind};
use crate::diagnostic::display_path;
use crate::run::RunRequest;

/// The error shape of every failed call.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    status: u16,
    message: String,
}

/// A param's value in a request: converted to the param's declared type.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum ParamScalar {
    String(String),
    Number(f64),
    Boolean(bool),
}

/// A run's status.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RunsPage {
    runs: Vec<crate::store::db::RunRow>,
    /// `before` for the next page; null on the last one.
    next: Option<i64>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Queued {
    run_id: i64,
    status: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Cancelling {
    run_id: i64,
    cancelling: bool,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RunMetrics {
    run: i64,
    metrics: Vec<crate::store::db::MetricRow>,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "millrace", description = "The millrace daemon's REST API"),
    paths(healthz, status, pipelines, pipeline, create_run, runs, run, run_metrics, step_log, cancel, modules, prometheus),
    components(schemas(ErrorBody, ErrorDetail, RunStatus, ParamScalar, RunsPage, Queued, Cancelling, RunMetrics, CreateRun,
        crate::store::db::RunRow, crate::store::db::StepRow, crate::store::db::AttemptRow, crate::store::db::MetricRow)),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi() -> Response {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi()).into_response()
}

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/", get(ui))
        .route("/metrics", get(prometheus))
        .route("/api/v1/status", get(status))
        .route("/api/v1/pipelines", get(pipelines))
        .route("/api/v1/pipelines/{name}", get(pipeline))
        .route("/api/v1/pipelines/{name}/runs", post(create_run))
        .route("/api/v1/runs", get(runs))
        .route("/api/v1/runs/{id}", get(run))
        .route("/api/v1/runs/{id}/cancel", post(cancel))
        .route("/api/v1/runs/{id}/metrics", get(run_metrics))
        .route("/api/v1/runs/{id}/steps/{step}/logs", get(step_log))
        .route("/api/v1/modules", get(modules))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(d.clone(), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(d)
}

pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!("API: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": { "status": self.status.as_u16(), "message": self.message } })),
        )
            .into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

/// The bearer token on every mutating route, and on reads unless `public_read`.
async fn auth(State(d): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    // The UI page itself holds no data; it asks for the token when a call needs it.
    let open = matches!(req.uri().path(), "/healthz" | "/")
        || (d.config.api.public_read && req.method() == axum::http::Method::GET);
    if !open && !authorized(req.headers(), &d.token) {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this call needs `Authorization: Bearer <token>` (the token is in the daemon's token_file)",
        )
        .into_response();
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    next.run(req).await
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
    else {
        return false;
    };
    // Hash both sides first: equal lengths, and the comparison time does not
    // depend on where they differ.
    let a = blake3::hash(given.trim().as_bytes());
    let b = blake3::hash(token.as_bytes());
    constant_time_eq::constant_time_eq(a.as_bytes(), b.as_bytes())
}

#[utoipa::path(get, path = "/healthz", tag = "daemon",
    responses((status = 200, description = "The daemon is up", body = Object)))]
async fn healthz(State(d): State<Arc<Daemon>>) -> Json<Value> {
    Json(json!({
        "status": if d.shutdown.is_cancelled() { "stopping" } else { "ok" },
        "pipelines": d.pipelines().len(),
        "active_runs": d.active_runs().len(),
        "uptime_seconds": d.started.elapsed().as_secs(),
    }))
}

/// One pipeline as the API shows it.
fn pipeline_json(d: &Daemon, p: &Pipeline, path: &std::path::Path, loaded_at: i64) -> Value {
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
                TriggerKind::Watch { glob, debounce } => json!({
                    "kind": "watch", "watch": glob.get_ref(),
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
fn invalid_files(d: &Daemon) -> Vec<Value> {
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
async fn pipelines(State(d): State<Arc<Daemon>>) -> Json<Value> {
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
async fn pipeline(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult {
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
    responses((status = 200, description = "Pipelines, invalid files, running and queued runs", body = Object)))]
async fn status(State(d): State<Arc<Daemon>>) -> ApiResult {
    let queued = d
        .store()
        .db()
        .read()
        .runs_with_status("queued")
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
        "max_parallel_steps": d.engine.max_parallel,
    }))
    .into_response())
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
        (status = 413, description = "Body over 1 MiB"),
        (status = 422, description = "Unknown param, wrong type, or the pipeline no longer validates", body = ErrorBody),
        (status = 503, description = "The daemon is stopping", body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_run(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
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
            Json(json!({ "run_id": id, "status": "queued" })),
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
struct RunsQuery {
    pipeline: Option<String>,
    status: Option<String>,
    /// RFC 3339, or milliseconds since the epoch.
    since: Option<String>,
    /// Paging: runs with an id below this one (`next` of the previous page).
    before: Option<i64>,
    limit: Option<i64>,
}

const STATUSES: &[&str] = &[
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "interrupted",
];

#[utoipa::path(get, path = "/api/v1/runs", tag = "runs",
    params(("pipeline" = Option<String>, Query, description = "Only this pipeline's runs"),
        ("status" = Option<RunStatus>, Query, description = "Only runs in this status"),
        ("since" = Option<String>, Query, format = DateTime, description = "Created at or after (RFC 3339)"),
        ("before" = Option<i64>, Query, description = "Paging cursor: runs with a smaller id (`next` of the previous page)"),
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 50)")),
    responses((status = 200, description = "Newest first", body = RunsPage),
        (status = 400, description = "A bad filter", body = ErrorBody)))]
async fn runs(
    State(d): State<Arc<Daemon>>,
    q: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    if let Some(st) = &q.status
        && !STATUSES.contains(&st.as_str())
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("status `{st}`: expected one of {}", STATUSES.join(", ")),
        ));
    }
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
            status: q.status.as_deref(),
            since,
            before: q.before,
            limit,
        })
        .map_err(ApiError::internal)?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(Json(json!({ "runs": rows, "next": next })).into_response())
}

fn run_id(id: &str) -> Result<i64, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no run `{id}`: run ids are numbers"),
        )
    })
}

/// A run with its inputs and, per step: status, timing, attempts, module version,
/// reuse source, why it ran or was reused, inputs and outputs with digests.
#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 200, description = "The run, its inputs, and per step: status, timing, attempts, module, reuse source, explain, inputs and outputs with digests", body = Object),
        (status = 404, description = "No such run", body = ErrorBody)))]
async fn run(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    let id = run_id(&id)?;
    let store = d.store();
    let r = store.db().read().run(id).map_err(ApiError::internal)?;
    let Some(r) = r else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")));
    };
    let steps = store.db().read().steps(id).map_err(ApiError::internal)?;
    let inputs = store
        .db()
        .read()
        .run_inputs(id)
        .map_err(ApiError::internal)?;
    let mut detail = Vec::with_capacity(steps.len());
    for s in &steps {
        let (attempts, outputs, step_inputs) = {
            let db = store.db();
            (
                db.read()
                    .attempts(id, &s.name)
                    .map_err(ApiError::internal)?,
                db.read()
                    .step_outputs(id, &s.name)
                    .map_err(ApiError::internal)?,
                db.read()
                    .step_inputs(id, &s.name)
                    .map_err(ApiError::internal)?,
            )
        };
        let explain = crate::planner::explain(store, &r, s).ok();
        let mut v = serde_json::to_value(s).map_err(ApiError::internal)?;
        v["attempts_detail"] = serde_json::to_value(&attempts).map_err(ApiError::internal)?;
        v["outputs"] = outputs
            .iter()
            .map(|(o, a)| json!({ "output": o, "artifact": a }))
            .collect();
        v["inputs"] = step_inputs
            .iter()
            .map(|(m, rf, a)| json!({ "mount": m, "reference": rf, "artifact": a }))
            .collect();
        v["explain"] = serde_json::to_value(&explain).map_err(ApiError::internal)?;
        detail.push(v);
    }
    let mut v = serde_json::to_value(&r).map_err(ApiError::internal)?;
    v["inputs"] = inputs
        .iter()
        .map(|(n, p, a)| json!({ "name": n, "path": p, "artifact": a }))
        .collect();
    v["steps"] = Value::Array(detail);
    Ok(Json(v).into_response())
}

/// A run's metrics: `{"metrics": [{step, name, value, step_index}]}`.
#[utoipa::path(get, path = "/api/v1/runs/{id}/metrics", tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 200, description = "The run's metrics", body = RunMetrics),
        (status = 404, description = "No such run", body = ErrorBody)))]
async fn run_metrics(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
    let id = run_id(&id)?;
    let db = d.store().db();
    if db.read().run(id).map_err(ApiError::internal)?.is_none() {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    let m = db.read().metrics(id).map_err(ApiError::internal)?;
    Ok(Json(json!({ "run": id, "metrics": m })).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
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
async fn step_log(
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
fn async_stream(
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
                    .is_none_or(|r| !matches!(r.status.as_str(), "queued" | "running"));
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

async fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
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

#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = i64, Path, description = "Run id")),
    responses((status = 202, description = "Cancelling", body = Cancelling),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 404, description = "No such run", body = ErrorBody),
        (status = 409, description = "Neither queued nor running", body = ErrorBody)),
    security(("bearer" = [])))]
async fn cancel(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult {
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

#[utoipa::path(get, path = "/api/v1/modules", tag = "modules",
    responses((status = 200, description = "Every published module version", body = Object)))]
async fn modules(State(d): State<Arc<Daemon>>) -> ApiResult {
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

/// `GET /metrics`: the Prometheus text format, or OpenMetrics when the scraper
/// asks for it (`Accept: application/openmetrics-text`).
#[utoipa::path(get, path = "/metrics", tag = "daemon",
    responses((status = 200, description = "Prometheus text format (OpenMetrics with Accept: application/openmetrics-text)", content_type = "text/plain", body = String)))]
async fn prometheus(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> ApiResult {
    let queued = d
        .store()
        .db()
        .read()
        .runs_with_status("queued")
        .map_err(ApiError::internal)?
        .len();
    let body = d.metrics.render(
        queued,
        d.active_runs().len(),
        d.engine.running_steps(),
        d.engine.wasm_stats(),
    );
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        return Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response());
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::to_prometheus_text(&body),
    )
        .into_response())
}

/// The web UI: one page, its script and style inline, no network needed.
async fn ui() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("ui.html"),
    )
        .into_response()
}
