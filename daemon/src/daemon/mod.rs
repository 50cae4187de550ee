//! The daemon: the long-running service behind `millrace daemon`, as a library
//! function ([`serve`]) that the CLI and the tests call alike.
//!
//! ```text
//! pipelines dir ──reload──▶ pipelines.rs: last valid version of each pipeline
//!                             │ starts/stops each pipeline's triggers
//! triggers.rs: cron / watch / after, and the API ──▶ queue.rs: submit
//!                             │ runs row `queued` (+ trigger cursor, one tx)
//!                             │ overlap: queue | skip | cancel
//! queue.rs: dispatch ──▶ Engine::start (max_runs per pipeline, max_parallel_steps shared)
//! signal.rs: SIGHUP ──▶ reload; SIGTERM/SIGINT (or any future) ──▶ shutdown
//! ```
//!
//! Everything a restart needs is in SQLite: queued runs, cron firings, watch
//! cursors. At start (recover.rs), runs left `running` by a crash become
//! `interrupted` and (with `resume_interrupted`) are queued again to finish,
//! reusing what succeeded.

pub mod api;
pub mod metrics;
mod pipelines;
mod queue;
mod recover;
pub mod signal;
mod triggers;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
use crate::store::Store;

pub use pipelines::{FileState, Loaded};
pub use queue::{SubmitError, Submitted};
pub use recover::MAX_CRASHES;
pub use signal::Signal;

/// Why the daemon could not start (or stopped with an error). Its messages are
/// the CLI's; the I/O causes are kept as they are.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Db(#[from] crate::store::db::DbError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the API token file {} is empty", .0.display())]
    EmptyToken(PathBuf),
    // `error`, not `source`: the message already says it, once.
    #[error("cannot read the API token file {}: {error}", path.display())]
    Token {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "another millrace daemon is using the state directory {} (it holds {})",
        state_dir.display(),
        lock.display()
    )]
    Busy { state_dir: PathBuf, lock: PathBuf },
}

struct Active {
    pipeline: String,
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    pipelines: BTreeMap<String, Loaded>,
    files: BTreeMap<PathBuf, FileState>,
    active: HashMap<i64, Active>,
}

pub struct Daemon {
    pub config: Config,
    pub engine: Arc<Engine>,
    state: Mutex<State>,
    /// Wakes the dispatcher: a run was queued or finished.
    wake: tokio::sync::Notify,
    /// Cancelled when a shutdown is asked: triggers and the dispatcher stop.
    pub shutdown: CancellationToken,
    /// Wakes the shutdown sequence when a run ends.
    run_ended: tokio::sync::Notify,
    pub started: Instant,
    pub token: String,
    /// The one file watcher every watch trigger and the reloader share.
    watch: Arc<triggers::WatchHub>,
    pub metrics: metrics::Metrics,
    pub counters: Counters,
}

impl Daemon {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.engine.store
    }
}

/// What the daemon has done since it started, in `GET /api/v1/status`: the
/// facts a test (or an operator) can wait for instead of a clock, such as "the
/// watch trigger has looked at the files since they changed".
#[derive(Default)]
pub struct Counters {
    reloads: AtomicU64,
    runs_ended: AtomicU64,
    triggers: Mutex<BTreeMap<(String, String), TriggerCounts>>,
}

/// One cron or watch trigger, by pipeline and trigger identity (the
/// `trigger_state` key); kept across reloads that leave the trigger unchanged.
#[derive(Default, Clone)]
pub struct TriggerCounts {
    /// Times it looked: a cron trigger worked out which firings were due (and
    /// queued them), a watch trigger hashed its files (and fired if they changed).
    pub checks: u64,
    /// Times its cursor moved: the cron firing it records, the watch trigger's
    /// content baseline (the first look included).
    pub cursor_moves: u64,
    /// A watch trigger saw a change that it has not finished checking.
    pub pending: bool,
}

impl Counters {
    fn reloaded(&self) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    fn run_ended(&self) {
        self.runs_ended.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets the triggers of pipelines that are no longer loaded.
    fn keep_pipelines(&self, loaded: impl Fn(&str) -> bool) {
        let mut t = self.triggers.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|(pipeline, _), _| loaded(pipeline));
    }

    fn trigger(&self, pipeline: &str, id: &str, f: impl FnOnce(&mut TriggerCounts)) {
        let mut t = self.triggers.lock().unwrap_or_else(|e| e.into_inner());
        f(t.entry((pipeline.to_string(), id.to_string())).or_default());
    }

    /// `reloads` (pipeline directory reads), `runs_ended` (runs driven to their
    /// end, their `after` triggers fired) and per trigger its counts.
    pub fn to_json(&self) -> serde_json::Value {
        let triggers: Vec<serde_json::Value> = self
            .triggers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((pipeline, id), t)| {
                serde_json::json!({
                    "pipeline": pipeline,
                    "trigger": id,
                    "checks": t.checks,
                    "cursor_moves": t.cursor_moves,
                    "pending": t.pending,
                })
            })
            .collect();
        serde_json::json!({
            "reloads": self.reloads.load(Ordering::Relaxed),
            "runs_ended": self.runs_ended.load(Ordering::Relaxed),
            "triggers": triggers,
        })
    }
}

/// Where a running daemon can be reached: written to `<state>/daemon.json` once
/// the listener is bound, removed at exit.
pub fn endpoint_file(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon.json")
}

/// Reads the API token, creating `<state>/api-token` (0600) on first start when
/// the config names no token file.
fn load_token(config: &Config) -> Result<String, ServeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.token_path();
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => return Err(ServeError::EmptyToken(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && config.api.token_file.is_none() => {}
        Err(error) => return Err(ServeError::Token { path, error }),
    }
    let mut bytes = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes)?;
    let token = blake3::hash(&bytes).to_hex().to_string();
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    out.write_all(token.as_bytes())?;
    out.write_all(b"\n")?;
    tracing::info!("created the API token file {}", path.display());
    Ok(token)
}

/// `millrace daemon`: serves the API on `listener` (bound by the caller: a
/// configured address, or port 0 in a test), fires triggers and runs queued runs
/// until `signals` asks for a shutdown or ends. [`signal::os_signals`] gives the
/// process's signals; [`signal::until`] makes any future the shutdown. Nothing
/// here reads the process's signals, environment or working directory for its
/// paths: two daemons on two state directories can run in one process.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    signals: impl Stream<Item = Signal>,
) -> Result<(), ServeError> {
    let engine_config = EngineConfig::new(config.max_parallel_steps).with_config(&config);
    let store = Arc::new(Store::open_with(&config.state_dir, &engine_config.store)?);
    // Held until this returns.
    let _lock = lock_state_dir(&config)?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && config.api.public_read {
        tracing::warn!(
            "the API listens on {addr}, which is not a loopback address, and `public_read = true`: \
             anyone who can reach it reads every pipeline, run, param and step log without a token; \
             set `public_read = false` in [api], or listen on 127.0.0.1 behind a proxy that authenticates"
        );
    }
    let d = Arc::new(Daemon::new(config, store, engine_config)?);
    d.recover()?;
    // Containers of steps that were running when the last process died: found by
    // label and removed before their runs resume.
    let orphans = d.engine.remove_orphan_containers().await;
    if orphans > 0 {
        tracing::warn!(
            count = orphans,
            "removed containers left by interrupted steps"
        );
    }
    d.reload();
    {
        // What alerts are written on outlives the process: the last success and
        // status of each loaded pipeline, from the store.
        let names: Vec<String> = d.state().pipelines.keys().cloned().collect();
        let db = d.store().db();
        if let Err(e) = d
            .metrics
            .restore(&db.read(), names.iter().map(String::as_str))
        {
            tracing::warn!("/metrics: the pipelines' last runs cannot be read: {e}");
        }
    }
    tokio::spawn(d.clone().dispatch());
    d.wake.notify_one();
    triggers::watch_pipelines_dir(&d);

    let server = tokio::spawn(api::serve(
        listener,
        api::router(d.clone()),
        d.shutdown.clone(),
    ));
    let endpoint = endpoint_file(&d.config.state_dir);
    let url = format!("http://{addr}");
    let _ = std::fs::write(
        &endpoint,
        serde_json::json!({ "url": url, "pid": std::process::id() }).to_string(),
    );
    tracing::info!(
        "millrace daemon ready: {} pipeline(s), API on {url}",
        d.state().pipelines.len()
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = triggers::watchdog(&d);

    let mut signals = std::pin::pin!(signals);
    while let Some(Signal::Reload) = signals.next().await {
        tracing::info!("SIGHUP: reloading pipelines");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        d.reload_with(true);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown(&d).await;
    watchdog.abort();
    let _ = server.await;
    let _ = std::fs::remove_file(&endpoint);
    Ok(())
}

impl Daemon {
    /// The daemon of one state directory, complete, before anything of it runs.
    fn new(
        config: Config,
        store: Arc<Store>,
        engine_config: EngineConfig,
    ) -> Result<Daemon, ServeError> {
        let engine = Engine::new(store, engine_config);
        let token = load_token(&config)?;
        Ok(Daemon {
            config,
            engine: Arc::new(engine),
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            shutdown: CancellationToken::new(),
            run_ended: tokio::sync::Notify::new(),
            started: Instant::now(),
            token,
            watch: triggers::WatchHub::new(),
            metrics: metrics::Metrics::new(),
            counters: Counters::default(),
        })
    }
}

/// One daemon per state directory: two would fire every trigger twice. The
/// lock is the returned file's; it ends when the file is dropped (or the
/// process dies).
pub fn lock_state_dir(config: &Config) -> Result<std::fs::File, ServeError> {
    let lock_path = config.state_dir.join("daemon.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    if lock.try_lock().is_err() {
        return Err(ServeError::Busy {
            state_dir: config.state_dir.clone(),
            lock: lock_path,
        });
    }
    Ok(lock)
}

/// Stops triggers, lets running steps finish until the grace deadline, then
/// stops them; their runs end `interrupted`. Queued runs stay queued.
async fn shutdown(d: &Arc<Daemon>) {
    let grace = d.config.shutdown_grace;
    let running = d.state().active.len();
    tracing::info!(
        "stopping: no new triggers or steps; {running} run(s) have {}s to finish their running steps",
        grace.as_secs()
    );
    d.shutdown.cancel();
    d.engine.drain();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let ended = d.run_ended.notified();
        if d.state().active.is_empty() {
            break;
        }
        tokio::select! {
            () = ended => {}
            () = tokio::time::sleep_until(deadline) => {
                {
                    let st = d.state();
                    tracing::warn!("grace period over: stopping {} run(s)", st.active.len());
                    for a in st.active.values() {
                        a.cancel.cancel();
                    }
                }
                // Cancelled steps stop within milliseconds (epoch interruption).
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while !d.state().active.is_empty() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await;
                break;
            }
        }
    }
    tracing::info!("stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let text = format!(
            "pipelines = \"p\"\nstate_dir = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("state").display()
        );
        let (c, report) = crate::config::parse(&dir.join("millrace.toml"), text);
        let c = c.unwrap_or_else(|| panic!("{report}"));
        std::fs::create_dir_all(&c.state_dir).unwrap();
        c
    }

    #[test]
    fn a_second_lock_on_a_state_directory_names_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let _held = lock_state_dir(&c).unwrap();
        let err = lock_state_dir(&c).unwrap_err();
        assert!(matches!(err, ServeError::Busy { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "another millrace daemon is using the state directory {} (it holds {})",
                c.state_dir.display(),
                c.state_dir.join("daemon.lock").display()
            )
        );
    }

    #[test]
    fn the_token_is_created_once_and_an_empty_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let token = load_token(&c).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(load_token(&c).unwrap(), token);
        std::fs::write(c.token_path(), "\n").unwrap();
        assert_eq!(
            load_token(&c).unwrap_err().to_string(),
            format!("the API token file {} is empty", c.token_path().display())
        );
    }
}
