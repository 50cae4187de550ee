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

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use tokio_util::sync::CancellationToken;

use super::Daemon;
use crate::model::{AttemptStatus, RunStatus, StepStatus};
use crate::view::{
    AttemptView, ItemView, ItemsView, Metric, RunInput, RunRecord, RunView, StepInput, StepOutput,
    StepView, Why,
};

mod pipelines;
mod runs;

use pipelines::{healthz, modules, pipeline, pipelines, status};
use runs::{cancel, create_run, resume, run, run_metrics, runs, step_log};

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

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "millrace", description = "The millrace daemon's REST API"),
    paths(pipelines::healthz, pipelines::status, pipelines::pipelines, pipelines::pipeline, runs::create_run, runs::runs, runs::run,
        runs::run_metrics, runs::step_log, runs::cancel, runs::resume, pipelines::modules, prometheus),
    components(schemas(ErrorBody, ErrorDetail, RunStatus, StepStatus, AttemptStatus, ParamScalar, runs::RunsPage, runs::Queued, runs::Cancelling, runs::Resuming, runs::RunMetrics, runs::CreateRun,
        RunRecord, RunView, RunInput, StepView, StepInput, StepOutput, AttemptView, Why, Metric,
        crate::executor::snapshot::VariantRecord, crate::executor::snapshot::VariantName, crate::executor::snapshot::BaseCode, ItemsView, ItemView)),
    modifiers(&Bearer, &RequestLimits)
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

/// The request limits hold for every request, before routing: each operation
/// documents their answers (a URI over [`MAX_URI`], headers over
/// [`MAX_HEADER_BYTES`]) in the error shape.
struct RequestLimits;

impl utoipa::Modify for RequestLimits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let answer = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                for (status, description) in [
                    ("414", "Request URI over 8 KiB"),
                    ("431", "Request headers over 64 KiB or 100 fields"),
                ] {
                    op.responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| answer(description).into());
                }
            }
        }
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
        .route("/api/v1/runs/{id}/resume", post(resume))
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
    use serde_json::Value;

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
