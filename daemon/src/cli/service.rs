//! The commands that run or talk to the daemon: `daemon`, `trigger`, `cancel`,
//! `status`, `schedule`, and `validate --config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{EXIT_CONFIG, Error};
use crate::config::{self, Config};
use crate::definition::{self, TriggerKind};
use crate::diagnostic::display_path;
use crate::model::{Placement, RunStatus, StepStatus};

/// Where the packaged service keeps its config.
pub const SYSTEM_CONFIG: &str = "/etc/millrace/millrace.toml";

/// How a command finds the daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// The daemon config (default: $MILLRACE_CONFIG, else /etc/millrace/millrace.toml).
    #[arg(long, env = "MILLRACE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The daemon's URL, e.g. http://127.0.0.1:8640 (default: from the config).
    #[arg(long, env = "MILLRACE_URL")]
    pub url: Option<String>,
    /// File holding the API token (default: the config's token_file).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// The config file to use: given, else the system one if present.
pub fn config_path(given: Option<&Path>) -> Option<PathBuf> {
    match given {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(SYSTEM_CONFIG)).filter(|p| p.exists()),
    }
}

/// Loads and checks the daemon config; a bad one exits 78 with every error.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    let (config, report) = config::load(path)
        .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
    match config {
        Some(c) => Ok(c),
        None => Err(Error::Report(format!(
            "{report}error: the daemon config {} has {} error(s)",
            display_path(path),
            report.error_count()
        ))
        .into()),
    }
}

/// The config's datastores and compute targets, and the registry of its state.
pub fn config_env(c: &Config) -> anyhow::Result<definition::Environment> {
    let mut env = c.environment();
    env.modules = super::environment(&c.state_dir)?.modules;
    Ok(env)
}

/// `millrace daemon`.
pub async fn daemon(config: Option<&Path>) -> anyhow::Result<i32> {
    let Some(path) = config_path(config) else {
        return Err(Error::usage(format!(
            "no daemon config: pass --config FILE (or set MILLRACE_CONFIG); {SYSTEM_CONFIG} does not exist"
        ))
        .into());
    };
    let config = load_config(&path)?;
    // The signal handlers first: a SIGTERM while the daemon starts stops it
    // cleanly once it is up, instead of killing it half-started.
    let signals = crate::daemon::signal::os_signals()?;
    let listener = match tokio::net::TcpListener::bind(config.api.listen).await {
        Ok(l) => l,
        // Taken, most likely, by a daemon of this very state directory: that
        // is the error to report (serve's lock check, before the bind moved here).
        Err(e) => {
            if config.state_dir.join("daemon.lock").exists() {
                crate::daemon::lock_state_dir(&config)?;
            }
            anyhow::bail!("cannot listen on {}: {e}", config.api.listen)
        }
    };
    crate::daemon::serve(config, listener, signals).await?;
    Ok(0)
}

/// `millrace validate --config FILE [PATH…]`: the config, then every pipeline
/// file of its pipelines directory (and any PATH), checked against its datastores
/// and compute targets.
pub fn validate_config(
    path: &Path,
    extra: &[PathBuf],
    config_only: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let (config, report) = config::load(path)
        .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
    let Some(config) = config else {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!([{
                    "file": display_path(path), "valid": false, "diagnostics": report.to_json()
                }]))?
            );
        } else {
            eprint!("{report}");
            eprintln!(
                "error: the daemon config {} has {} error(s)",
                display_path(path),
                report.error_count()
            );
        }
        return Ok(EXIT_CONFIG);
    };
    if !json {
        eprint!("{report}");
        println!("{}: ok", display_path(path));
    }
    if config_only {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!([{
                    "file": display_path(path), "valid": true, "diagnostics": report.to_json()
                }]))?
            );
        }
        return Ok(0);
    }
    let mut paths = vec![config.pipelines.clone()];
    paths.extend(extra.iter().cloned());
    super::validate_with(&paths, &config_env(&config)?, json)
}

/// An HTTP client for the daemon's API.
/// The daemon config `c` names (if any) and the state directory it uses (else
/// `--state`).
fn daemon_state(c: &Connect, state: &Path) -> anyhow::Result<(Option<Config>, PathBuf)> {
    let config = match config_path(c.config.as_deref()) {
        Some(p) => Some(load_config(&p)?),
        None => None,
    };
    let state_dir = config
        .as_ref()
        .map_or_else(|| state.to_path_buf(), |c| c.state_dir.clone());
    Ok((config, state_dir))
}

struct Client {
    agent: ureq::Agent,
    url: String,
    token: Option<String>,
}

impl Client {
    fn connect(c: &Connect, state: &Path) -> anyhow::Result<Client> {
        let (config, state_dir) = daemon_state(c, state)?;
        let endpoint: Option<Value> =
            std::fs::read_to_string(crate::daemon::endpoint_file(&state_dir))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        let url = c
            .url
            .clone()
            .or_else(|| endpoint.as_ref().and_then(|e| e["url"].as_str().map(str::to_string)))
            .or_else(|| config.as_ref().map(|c| format!("http://{}", c.api.listen)))
            .ok_or_else(|| {
                Error::usage(format!(
                    "cannot find the daemon: no daemon.json in {} and no config; pass --config FILE or --url URL",
                    display_path(&state_dir)
                ))
            })?;
        let token_path = c.token_file.clone().or_else(|| {
            Some(
                config
                    .as_ref()
                    .map_or_else(|| state_dir.join("api-token"), Config::token_path),
            )
        });
        let token = std::env::var("MILLRACE_TOKEN").ok().or_else(|| {
            token_path
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|t| t.trim().to_string())
        });
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .timeout_global(Some(Duration::from_secs(30)))
                .build(),
        );
        Ok(Client {
            agent,
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
        let (status, text) = self.request(method, path, body)?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// The status and the body as text (a step's log is not JSON).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.url);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = tokio::task::block_in_place(|| match (method, body) {
            ("POST", b) => {
                let mut r = self.agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_json(b.unwrap_or(Value::Null))
            }
            _ => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
        });
        let mut resp = result.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the daemon at {}: {e} (is `millrace daemon` running?)",
                self.url
            )
        })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        Ok((status, text))
    }
}

fn api_error(status: u16, v: &Value) -> anyhow::Error {
    let msg = v["error"]["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string());
    Error::Api {
        status,
        message: msg,
    }
    .into()
}

/// `millrace trigger PIPELINE [--param k=v]…`.
pub fn trigger(
    c: &Connect,
    state: &Path,
    pipeline: &str,
    params: &[(String, String)],
    no_reuse: bool,
    wait: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let client = Client::connect(c, state)?;
    let params: serde_json::Map<String, Value> = params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let (status, v) = client.call(
        "POST",
        &format!("/api/v1/pipelines/{pipeline}/runs"),
        Some(serde_json::json!({ "params": params, "no_reuse": no_reuse })),
    )?;
    if status != 202 {
        return Err(api_error(status, &v));
    }
    let id = v["run_id"].as_i64().unwrap_or(0);
    if !wait {
        if json {
            println!("{v}");
        } else {
            println!("run {id} queued");
        }
        return Ok(0);
    }
    if !json {
        eprintln!("run {id} queued; waiting for it to end");
    }
    loop {
        let (code, r) = client.call("GET", &format!("/api/v1/runs/{id}"), None)?;
        if code != 200 {
            return Err(api_error(code, &r));
        }
        let status = r["status"]
            .as_str()
            .and_then(|s| s.parse::<RunStatus>().ok());
        if let Some(status) = status.filter(|s| s.is_terminal()) {
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("run {id} {status}");
                if let Some(e) = r["error"].as_str() {
                    println!("  {e}");
                }
                let log_of = |step: &str| match client.request(
                    "GET",
                    &format!("/api/v1/runs/{id}/steps/{step}/logs"),
                    None,
                ) {
                    Ok((200, text)) => Some(text),
                    _ => None,
                };
                print!("{}", super::progress::failed_steps(&r, log_of));
            }
            return Ok(super::error::run_exit_code(status));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `millrace cancel RUN`: through the daemon when it owns the run (queued, or
/// running in the daemon), else by signalling the `millrace run`/`resume` process
/// that drives it (it stops the run as Ctrl-C would); an interrupted run, which
/// no process drives, is recorded as cancelled so nothing resumes it.
pub fn cancel(c: &Connect, state: &Path, run: &str, json: bool) -> anyhow::Result<i32> {
    let (_, state_dir) = daemon_state(c, state)?;
    let store = super::open_store(&state_dir)?;
    let id = super::run_id(&store, run)?;
    let status = |store: &crate::store::Store| -> anyhow::Result<RunStatus> {
        let r = store.db().read().run(id)?;
        Ok(r.map_or(RunStatus::Failed, |r| r.status))
    };
    let done = |how: &str, status: RunStatus| -> anyhow::Result<i32> {
        if json {
            println!(
                "{}",
                serde_json::json!({ "run_id": id, "status": status, "how": how })
            );
        } else {
            println!("run {id} {status} ({how})");
        }
        Ok(0)
    };
    let daemon_pid = std::fs::read_to_string(crate::daemon::endpoint_file(&state_dir))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|e| e["pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| alive(p));
    let holder = crate::engine::RunLock::holder(&store, id);
    match (status(&store)?, holder) {
        (s, _) if s.is_terminal() && s != RunStatus::Interrupted => Err(Error::usage(format!(
            "run {id} already ended ({s}): there is nothing to cancel"
        ))
        .into()),
        // A queued run waits for the daemon's dispatcher; only it may take it off.
        (s @ (RunStatus::Queued | RunStatus::Running), _)
            if daemon_pid.is_some() && (s == RunStatus::Queued || holder == daemon_pid) =>
        {
            let client = Client::connect(c, state)?;
            let (code, v) = client.call("POST", &format!("/api/v1/runs/{id}/cancel"), None)?;
            if code != 202 {
                return Err(api_error(code, &v));
            }
            let end = wait_terminal(|| status(&store))?;
            done("through the daemon", end)
        }
        (RunStatus::Running, Some(pid)) => {
            // SIGTERM: `run` and `resume` stop the run as for Ctrl-C (recorded
            // cancelled, resumable); a signal is all another process can be sent.
            let pid_t = libc::pid_t::try_from(pid)
                .map_err(|_| anyhow::anyhow!("run {id}: bad pid {pid} in its lock"))?;
            // SAFETY: kill(2) with a pid read from the run's lock, which that
            // process holds (checked just now), and a plain termination signal.
            if unsafe { libc::kill(pid_t, libc::SIGTERM) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(anyhow::anyhow!(
                    "cannot signal process {pid}, which drives run {id}: {e}"
                ));
            }
            let end = wait_terminal(|| status(&store))?;
            done(&format!("process {pid} stopped it"), end)
        }
        (RunStatus::Queued, _) => Err(Error::usage(format!(
            "run {id} is queued for a daemon that is not running; start it, or cancel with --url"
        ))
        .into()),
        _ if crate::engine::RunLock::is_held(&store, id) => Err(anyhow::anyhow!(
            "run {id} is being started by another process; try again"
        )),
        _ => {
            let mut db = store.db();
            db.batch(|b| b.cancel_abandoned_run(id, "cancelled after its process had stopped"))?;
            done(
                "it was interrupted; nothing will resume it",
                RunStatus::Cancelled,
            )
        }
    }
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    libc::pid_t::try_from(pid).is_ok_and(|p| unsafe { libc::kill(p, 0) } == 0)
}

/// Waits (up to a minute: a step is stopped within its grace period) for the
/// run to end, and gives its status.
fn wait_terminal(status: impl Fn() -> anyhow::Result<RunStatus>) -> anyhow::Result<RunStatus> {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = status()?;
        if s.is_terminal() {
            return Ok(s);
        }
        if std::time::Instant::now() > until {
            return Err(anyhow::anyhow!(
                "asked to cancel, but the run is still {s} after 60 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `millrace status`: loaded pipelines, invalid files, running and queued work,
/// next firings.
pub fn status(c: &Connect, state: &Path, json: bool) -> anyhow::Result<i32> {
    let client = Client::connect(c, state)?;
    let (code, v) = client.call("GET", "/api/v1/status", None)?;
    if code != 200 {
        return Err(api_error(code, &v));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let empty = Vec::new();
    println!(
        "daemon pid {} up {}s · {} · {} of {} step slots busy",
        v["pid"], v["uptime_seconds"], client.url, v["running_steps"], v["max_parallel_steps"]
    );
    let pipelines = v["pipelines"].as_array().unwrap_or(&empty);
    println!(
        "\n{} pipeline(s) from {}",
        pipelines.len(),
        v["pipelines_dir"].as_str().unwrap_or("")
    );
    for p in pipelines {
        let last = match &p["last_run"] {
            Value::Null => "never run".to_string(),
            l => format!(
                "last run {} {}",
                l["id"],
                l["status"].as_str().unwrap_or("")
            ),
        };
        println!("  {:<24} {last}", p["name"].as_str().unwrap_or(""));
        for t in p["triggers"].as_array().unwrap_or(&empty) {
            let what = match t["kind"].as_str() {
                Some("cron") => format!(
                    "cron `{}` {} next {}",
                    t["cron"].as_str().unwrap_or(""),
                    t["timezone"].as_str().unwrap_or(""),
                    t["next"].as_str().unwrap_or("never")
                ),
                Some("watch") => format!("watch `{}`", t["watch"].as_str().unwrap_or("")),
                Some("after") => format!("after `{}`", t["after"].as_str().unwrap_or("")),
                _ => t.to_string(),
            };
            println!("      {what}");
        }
    }
    let invalid = v["invalid_files"].as_array().unwrap_or(&empty);
    if !invalid.is_empty() {
        println!(
            "\n{} invalid file(s) (the last valid version stays active):",
            invalid.len()
        );
        for f in invalid {
            print!("{}", f["text"].as_str().unwrap_or(""));
        }
    }
    let active = v["active_runs"].as_array().unwrap_or(&empty);
    let queued = v["queued_runs"].as_array().unwrap_or(&empty);
    println!("\nrunning: {}", list_runs(active));
    // Where each running step runs: a container, a Slurm job on its node.
    for r in active {
        let Some(id) = r["id"].as_i64() else { continue };
        let Ok((200, run)) = client.call("GET", &format!("/api/v1/runs/{id}"), None) else {
            continue;
        };
        for s in run["steps"].as_array().unwrap_or(&empty) {
            if s["status"].as_str().and_then(|s| s.parse().ok()) != Some(StepStatus::Running) {
                continue;
            }
            let placement = s["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .and_then(|a| Placement::deserialize(&a["placement"]).ok());
            let place = match placement {
                Some(Placement::Slurm(p)) => format!(
                    "slurm job {} on {}",
                    p.job_id.as_deref().unwrap_or("(submitting)"),
                    p.node.as_deref().unwrap_or("(pending)")
                ),
                Some(Placement::Container(p)) => format!("container {} ({})", p.container, p.image),
                None => "here".to_string(),
            };
            println!(
                "  run {id} step {}: {place}",
                s["name"].as_str().unwrap_or("?")
            );
        }
    }
    println!("queued:  {}", list_runs(queued));
    Ok(if invalid.is_empty() { 0 } else { EXIT_CONFIG })
}

fn list_runs(runs: &[Value]) -> String {
    if runs.is_empty() {
        return "none".into();
    }
    runs.iter()
        .map(|r| format!("{} ({})", r["id"], r["pipeline"].as_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses an instant for `--simulate`: RFC 3339, or `YYYY-MM-DD[THH:MM[:SS]]` in UTC.
fn parse_instant(s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    Err(Error::usage(format!(
        "`{s}` is not an instant: use RFC 3339 (2026-03-29T01:00:00+01:00) or YYYY-MM-DD[THH:MM] (UTC)"
    ))
    .into())
}

/// `millrace schedule [PATH…] [--simulate FROM TO]`: the firings of every cron
/// trigger, computed here (no daemon needed), in each trigger's zone.
pub fn schedule(
    config: Option<&Path>,
    paths: &[PathBuf],
    simulate: Option<&[String]>,
    count: usize,
    json: bool,
) -> anyhow::Result<i32> {
    let (env, mut files) = match config_path(config) {
        Some(c) if paths.is_empty() => {
            let c = load_config(&c)?;
            (config_env(&c)?, vec![c.pipelines.clone()])
        }
        Some(c) => (config_env(&load_config(&c)?)?, Vec::new()),
        None => (definition::Environment::default(), Vec::new()),
    };
    files.extend(paths.iter().cloned());
    if files.is_empty() {
        return Err(
            Error::usage("name pipeline files or directories, or pass --config FILE").into(),
        );
    }
    let files = super::expand_dirs(&files)?;
    let (from, to) = match simulate {
        Some([a, b]) => {
            let (from, to) = (parse_instant(a)?, parse_instant(b)?);
            if to <= from {
                return Err(Error::usage(format!(
                    "--simulate {a} {b}: the window ends before it starts (FROM must be earlier than TO)"
                ))
                .into());
            }
            (from, Some(to))
        }
        _ => (chrono::Utc::now(), None),
    };
    let mut out = Vec::new();
    let mut bad = false;
    for f in &files {
        let (p, report) = crate::graph::load(f, &env)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", f.display())))?;
        let Some(p) = p else {
            eprint!("{report}");
            bad = true;
            continue;
        };
        for t in &p.triggers {
            let TriggerKind::Cron { expr, .. } = &t.kind else {
                continue;
            };
            let Some(s) = t.schedule() else { continue };
            let (firings, total) = s.earliest(from, to, count);
            out.push(serde_json::json!({
                "pipeline": p.name.get_ref(),
                "cron": expr.get_ref(),
                "timezone": s.tz.to_string(),
                "firings": firings.iter().map(|t| t.to_rfc3339()).collect::<Vec<_>>(),
                "utc": firings.iter().map(|t| t.with_timezone(&chrono::Utc).to_rfc3339()).collect::<Vec<_>>(),
                "total": total,
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if out.is_empty() {
        println!("no cron triggers");
    } else {
        for e in &out {
            println!(
                "{} · cron `{}` · {}",
                e["pipeline"].as_str().unwrap_or(""),
                e["cron"].as_str().unwrap_or(""),
                e["timezone"].as_str().unwrap_or("")
            );
            let local = e["firings"].as_array().cloned().unwrap_or_default();
            let utc = e["utc"].as_array().cloned().unwrap_or_default();
            for (l, u) in local.iter().zip(&utc) {
                println!(
                    "  {}  ({})",
                    l.as_str().unwrap_or(""),
                    u.as_str().unwrap_or("")
                );
            }
            let total = e["total"].as_u64().unwrap_or(0) as usize;
            if total > local.len() {
                println!("  … {} more", total - local.len());
            }
        }
    }
    Ok(if bad { EXIT_CONFIG } else { 0 })
}
