//! The REST API (SPEC "REST API"), served by axum over hyper. Mutating routes
//! need the bearer token (compared in constant time); reads (GET and HEAD) need
//! it only when `public_read = false`. Only requests addressed to an allowed host
//! are answered (`Host` is checked against loopback names and addresses, the
//! listen address and `[api] allowed_hosts`), so a page whose DNS name rebinds to
//! this machine cannot read through a visitor's browser. Errors have one shape,
//! also those of the layers under the handlers (body and header limits,
//! rejections, hyper's own answers to malformed requests):
//! `{"error": {"status": 404, "message": "…"}}`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use tokio_util::sync::CancellationToken;

use super::{Daemon, SubmitError, Submitted};
use crate::definition::{Catchup, Overlap, Pipeline, TriggerKind};
use crate::diagnostic::display_path;
use crate::model::{AttemptStatus, RunStatus, StepStatus};
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

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RunsPage {
    runs: Vec<crate::store::db::RunRow>,
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
pub struct RunMetrics {
    run: i64,
    metrics: Vec<crate::store::db::MetricRow>,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "millrace", description = "The millrace daemon's REST API"),
    paths(healthz, status, pipelines, pipeline, create_run, runs, run, run_metrics, step_log, cancel, modules, prometheus),
    components(schemas(ErrorBody, ErrorDetail, RunStatus, StepStatus, AttemptStatus, ParamScalar, RunsPage, Queued, Cancelling, RunMetrics, CreateRun,
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
/// Request limits checked before routing, answered in the error shape: more
/// headers, header bytes or URI than any client of this API sends.
const MAX_HEADERS: usize = 100;
const MAX_HEADER_BYTES: usize = 64 << 10;
const MAX_URI: usize = 8 << 10;
/// hyper's own limits, above ours so that ours answer first. Beyond them hyper
/// answers by itself (431, 414 or 400 without a body), which [`PlainErrors`]
/// turns into the error shape.
const HYPER_MAX_HEADERS: usize = 512;
const HYPER_MAX_BUF: usize = 512 << 10;
/// A client must send a request's headers within this time (slow-loris).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn router(d: Arc<Daemon>) -> Router {
    let hosts = Arc::new(AllowedHosts::new(&d.config.api));
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
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(d.clone(), auth))
        .layer(axum::middleware::from_fn_with_state(hosts, check_host))
        .layer(axum::middleware::from_fn(check_limits))
        .layer(axum::middleware::from_fn(error_shape))
        .with_state(d)
}

/// The hosts a request may be addressed to.
pub struct AllowedHosts {
    /// From `[api] allowed_hosts` (lowercase names and addresses).
    names: Vec<String>,
    /// The listen address; an unspecified one (0.0.0.0, ::) accepts every
    /// address, since the daemon is then reached at any of the machine's.
    listen: std::net::IpAddr,
}

impl AllowedHosts {
    pub fn new(api: &crate::config::Api) -> AllowedHosts {
        AllowedHosts {
            names: api.allowed_hosts.clone(),
            listen: api.listen.ip(),
        }
    }

    /// Whether `authority` (a `Host` value: a host, optionally `:port`) is ours.
    /// The port is not compared: DNS rebinding changes the name, not the port,
    /// and a proxy may forward a public port.
    pub fn allows(&self, authority: &str) -> bool {
        if authority.contains('@') {
            return false; // userinfo has no place in a Host
        }
        let Ok(a) = authority.parse::<axum::http::uri::Authority>() else {
            return false;
        };
        let Some(host) = crate::config::host_name(a.host()) else {
            return false;
        };
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            // An address is never a rebinding: the browser's origin is the address.
            return ip.is_loopback()
                || ip.to_canonical().is_loopback()
                || ip == self.listen
                || self.listen.is_unspecified()
                || self.names.contains(&host);
        }
        // `localhost` and its subdomains resolve to loopback by definition
        // (RFC 6761); browsers answer them without asking DNS.
        host == "localhost" || host.ends_with(".localhost") || self.names.contains(&host)
    }
}

/// Refuses requests addressed to any other host (421), or to none (400).
async fn check_host(State(hosts): State<Arc<AllowedHosts>>, req: Request, next: Next) -> Response {
    // The URI's authority (absolute-form requests) wins over `Host` (RFC 9112
    // 3.2.2); both must be ours when both are given.
    let header = req
        .headers()
        .get(axum::http::header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"));
    let uri = req.uri().authority().map(|a| a.as_str());
    // RFC 9112 3.2: more than one `Host` is a bad request (a proxy and we might
    // each read another one).
    if req
        .headers()
        .get_all(axum::http::header::HOST)
        .iter()
        .count()
        > 1
    {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request has more than one `Host` header",
        )
        .into_response();
    }
    if header.is_none() && uri.is_none() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request has no `Host` header: this API answers only requests addressed to it",
        )
        .into_response();
    }
    for host in [uri, header].into_iter().flatten() {
        if !hosts.allows(host) {
            tracing::debug!("API: refused a request for host `{}`", host.escape_debug());
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this daemon does not answer to host `{}`; it answers to loopback names and \
                     addresses and its listen address; add other names to `allowed_hosts` in the \
                     [api] section of the daemon config",
                    host.escape_debug()
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Our limits on a request's head, below hyper's so the answer has the error shape.
async fn check_limits(req: Request, next: Next) -> Response {
    let uri = req.uri().to_string().len();
    if uri > MAX_URI {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the request URI has {uri} bytes; the limit is {MAX_URI}"),
        )
        .into_response();
    }
    let headers = req.headers();
    if headers.len() > MAX_HEADERS {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has {} header fields; the limit is {MAX_HEADERS}",
                headers.len()
            ),
        )
        .into_response();
    }
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request's header fields have {bytes} bytes; the limit is {} KiB",
                MAX_HEADER_BYTES >> 10
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Every error leaves in the error shape: a rejection of axum's (a body over the
/// limit, a bad path or query) is plain text, so its text becomes the message.
async fn error_shape(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    let json = r
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return r;
    }
    let (parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut out = ApiError::new(status, message).into_response();
    // Headers that say how to retry (WWW-Authenticate, Allow, Retry-After) stay.
    for (k, v) in &parts.headers {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().append(k, v.clone());
        }
    }
    out
}

/// Serves the API on `listener` until `stop`, then lets open responses finish
/// (a followed log ends when the daemon stops) for up to 10 s. hyper directly,
/// rather than `axum::serve`, for its limits, the header timeout and
/// [`PlainErrors`].
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;

pub async fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // At the cap, the next connection waits in the kernel's backlog: idle
        // clients cannot take the descriptors that steps, SQLite and the store
        // need (the guests' caps leave the daemon 512).
        while conns.len() >= MAX_CONNECTIONS {
            tokio::select! {
                _ = conns.join_next() => {}
                () = stop.cancelled() => break,
            }
        }
        if stop.is_cancelled() {
            break;
        }
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, typically: wait for one, do not spin.
                    tracing::warn!("API: cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        while conns.try_join_next().is_some() {}
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        conns.spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_headers(HYPER_MAX_HEADERS)
                .max_buf_size(HYPER_MAX_BUF);
            let conn = b.serve_connection(TokioIo::new(PlainErrors::new(stream)), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stop.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

/// A connection whose first response, if it is one hyper wrote by itself for a
/// request it could not parse (400, 414 or 431 with an empty body; the handlers
/// never answer an error without a body), gets a body in the error shape.
/// Only the first: there the stream surely begins with a response head, while
/// later a write may begin inside a body. Later requests meet our own limits
/// first ([`check_limits`]), which are below hyper's.
pub struct PlainErrors<S> {
    inner: S,
    state: Rewrite,
}

enum Rewrite {
    /// Nothing written yet.
    First,
    /// Writing the replacement of hyper's head; `consumed` is that head's length.
    Replacing {
        bytes: Vec<u8>,
        written: usize,
        consumed: usize,
    },
    Pass,
}

impl<S> PlainErrors<S> {
    pub fn new(inner: S) -> PlainErrors<S> {
        PlainErrors {
            inner,
            state: Rewrite::First,
        }
    }
}

/// The replacement of a bodiless error head written by hyper, or None if `head`
/// (the bytes up to and including the blank line) is not one.
fn shaped_error(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let code: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()?;
    let message = match code {
        400 => "malformed HTTP request",
        414 => "the request URI is too long",
        431 => "the request's header fields are too large",
        _ => return None,
    };
    let mut kept = Vec::new();
    let mut empty = false;
    for l in lines.filter(|l| !l.is_empty()) {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("content-type:") {
            return None;
        }
        if let Some(n) = lower.strip_prefix("content-length:") {
            empty = n.trim() == "0";
            continue;
        }
        kept.push(l);
    }
    if !empty {
        return None;
    }
    let body = json!({ "error": { "status": code, "message": message } }).to_string();
    let mut out = format!("{status_line}\r\n");
    for l in kept {
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    Some(out.into_bytes())
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for PlainErrors<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for PlainErrors<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Rewrite::First = this.state {
            // hyper hands a whole head to one write (its flat buffer: this type
            // does not do vectored writes).
            this.state = match buf.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(end) => match shaped_error(&buf[..end + 4]) {
                    Some(bytes) => Rewrite::Replacing {
                        bytes,
                        written: 0,
                        consumed: end + 4,
                    },
                    None => Rewrite::Pass,
                },
                None => Rewrite::Pass,
            };
        }
        match &mut this.state {
            Rewrite::Replacing {
                bytes,
                written,
                consumed,
            } => {
                while *written < bytes.len() {
                    match std::pin::Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                        }
                        Poll::Ready(Ok(n)) => *written += n,
                        other => return other,
                    }
                }
                let n = *consumed;
                this.state = Rewrite::Pass;
                Poll::Ready(Ok(n))
            }
            _ => std::pin::Pin::new(&mut this.inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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
    // HEAD is a GET without the body: open when GET is.
    let read = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    let open = matches!(req.uri().path(), "/healthz" | "/") || (d.config.api.public_read && read);
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
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 422, description = "Unknown param, wrong type, a control character in a value, or the pipeline no longer validates", body = ErrorBody),
        (status = 503, description = "The daemon is stopping", body = ErrorBody)),
    security(("bearer" = [])))]
async fn create_run(
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
struct RunsQuery {
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
async fn runs(
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
        .runs_with_status(RunStatus::Queued)
        .map_err(ApiError::internal)?
        .len();
    let given_up = d
        .store()
        .db()
        .read()
        .runs_given_up(super::MAX_CRASHES)
        .map_err(ApiError::internal)?;
    let body = d.metrics.render(
        queued,
        d.active_runs().len(),
        d.engine.running_steps(),
        d.engine.wasm_stats(),
        given_up,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(listen: &str, names: &[&str]) -> AllowedHosts {
        AllowedHosts {
            names: names.iter().map(|n| n.to_string()).collect(),
            listen: listen.parse().unwrap(),
        }
    }

    #[test]
    fn only_our_hosts_are_answered() {
        let h = hosts("127.0.0.1", &["millrace.example.org"]);
        for ok in [
            "127.0.0.1:8640",
            "127.9.9.9",
            "localhost",
            "LOCALHOST.:8640",
            "ui.localhost:1",
            "[::1]:8640",
            "[::ffff:127.0.0.1]",
            "millrace.example.org",
            "Millrace.Example.Org:443",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8640",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.5:8640",
            "user@127.0.0.1",
            "",
            "[::1",
            "a b",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
        // Listening on every address: any address is ours, names still are not.
        let any = hosts("0.0.0.0", &[]);
        assert!(any.allows("10.0.0.5:8640"));
        assert!(any.allows("[2001:db8::1]:8640"));
        assert!(!any.allows("evil.example"));
        // A specific address: that one.
        let one = hosts("10.0.0.5", &[]);
        assert!(one.allows("10.0.0.5"));
        assert!(!one.allows("10.0.0.6"));
    }

    #[test]
    fn hypers_bodiless_errors_get_the_error_shape() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(shaped_error(head).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["status"], 431);
        // Our own answers (they have a body) and successes pass unchanged.
        assert!(shaped_error(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n").is_none());
        assert!(shaped_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
