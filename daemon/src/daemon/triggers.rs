//! The daemon's triggers: one tokio task per cron or watch trigger of each
//! loaded pipeline, the `after` triggers (fired by the run that ends), the
//! pipelines directory watcher and the systemd watchdog. Nothing here polls:
//! tasks sleep until the next firing or wait for inotify events.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use notify::Watcher;
use tokio_util::sync::CancellationToken;

use super::{Daemon, SubmitError};
use crate::definition::{Catchup, Pipeline, TriggerKind};
use crate::engine::RunRequest;
use crate::trigger::cron::{self, Schedule};
use crate::trigger::watch::{self, FileSet};

/// A firing later than this after its scheduled instant counts as missed (the
/// catchup policy decides); within it, it is simply late.
const ON_TIME: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Most firings `catchup = "all"` replays after a downtime.
const MAX_REPLAY: usize = 1000;

/// Starts the triggers of one pipeline version; `token` stops them.
pub(super) fn start(d: &Arc<Daemon>, p: Arc<Pipeline>, token: CancellationToken) {
    let mut seen_ids: std::collections::HashMap<String, usize> = Default::default();
    let mut rank = |id: String| {
        let n = seen_ids.entry(id.clone()).or_default();
        *n += 1;
        if *n == 1 { id } else { format!("{id} #{n}") }
    };
    for (i, t) in p.triggers.iter().enumerate() {
        let params = t.param_overrides();
        match &t.kind {
            TriggerKind::Cron { catchup, .. } => {
                let Some(schedule) = t.schedule() else {
                    continue; // validation reported it
                };
                let task = CronTask {
                    d: d.clone(),
                    pipeline: p.name.get_ref().clone(),
                    id: rank(format!("cron {} {}", schedule.expr, schedule.tz)),
                    schedule,
                    catchup: *catchup,
                    params,
                };
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = task.run() => {}
                        () = token.cancelled() => {}
                    }
                });
            }
            TriggerKind::Watch {
                glob,
                datastore,
                debounce,
            } => {
                // The same base as the pipeline's inputs: the datastore's directory.
                let datastores = &d.engine.config().datastores;
                let files = match FileSet::in_datastore(
                    glob.get_ref(),
                    datastore.get_ref(),
                    datastores,
                    &p.dir,
                ) {
                    Ok(f) => f.excluding(&d.store().root),
                    Err(e) => {
                        tracing::error!(pipeline = %p.name.get_ref(), "{}: trigger {}: {e}", p.name.get_ref(), i + 1);
                        continue;
                    }
                };
                let task = WatchTask {
                    d: d.clone(),
                    pipeline: p.name.get_ref().clone(),
                    // `watch GLOB` as before datastores could be named, so a
                    // default-datastore watch keeps its cursor.
                    id: rank(match datastore.get_ref().as_str() {
                        "default" => format!("watch {}", glob.get_ref()),
                        other => format!("watch {} in {other}", glob.get_ref()),
                    }),
                    files: Arc::new(files),
                    debounce: *debounce,
                    params,
                };
                tokio::spawn(task.run(token.clone()));
            }
            TriggerKind::After { .. } => {}
        }
    }
}

impl Daemon {
    /// `after = "pipeline"` triggers: fire when that pipeline's run succeeds.
    pub(super) fn fire_after(&self, upstream: &str, run: i64) {
        // The chain of `after` firings that led here: a pipeline already in it is
        // not fired again (a cycle of `after` triggers would run forever).
        let mut chain: Vec<String> = self
            .store()
            .db()
            .read()
            .run(run)
            .ok()
            .flatten()
            .and_then(|r| r.trigger_detail)
            .and_then(|d| serde_json::from_value(d["chain"].clone()).ok())
            .unwrap_or_default();
        chain.push(upstream.to_string());
        let downstream: Vec<(String, Vec<(String, String)>)> = self
            .state()
            .pipelines
            .values()
            .flat_map(|l| {
                l.pipeline
                    .triggers
                    .iter()
                    .filter_map(move |t| match &t.kind {
                        TriggerKind::After { pipeline } if pipeline.get_ref() == upstream => {
                            Some((l.pipeline.name.get_ref().clone(), t.param_overrides()))
                        }
                        _ => None,
                    })
            })
            .collect();
        for (name, params) in downstream {
            if chain.contains(&name) {
                tracing::warn!(
                    pipeline = %name,
                    "{name} not fired: `after` triggers form a cycle ({} -> {name})",
                    chain.join(" -> ")
                );
                continue;
            }
            let req = RunRequest {
                params,
                no_reuse: false,
                trigger: format!("after {upstream}"),
                trigger_detail: Some(serde_json::json!({
                    "upstream_pipeline": upstream,
                    "upstream_run": run,
                    "chain": chain,
                })),
            };
            if let Err(e) = self.submit(&name, req, |_| Ok(())) {
                tracing::error!(pipeline = %name, "{name}: after `{upstream}`: {e}");
            }
        }
    }
}

struct CronTask {
    d: Arc<Daemon>,
    pipeline: String,
    /// The trigger's identity in `trigger_state`: its expression and zone (and its
    /// rank among identical ones), so an edited schedule starts afresh and an
    /// unchanged one survives reloads.
    id: String,
    schedule: Schedule,
    catchup: Catchup,
    params: Vec<(String, String)>,
}

impl CronTask {
    async fn run(self) {
        loop {
            let last = self
                .d
                .store()
                .db()
                .read()
                .trigger_last_fired(&self.pipeline, &self.id);
            let last = match last {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(pipeline = %self.pipeline, "{}: cron: {e}", self.pipeline);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            };
            let now = Utc::now();
            let Some(last_ms) = last else {
                // First sight of this schedule: firings count from now.
                let moved = self.d.store().db().read().advance_trigger(
                    &self.pipeline,
                    &self.id,
                    None,
                    now.timestamp_millis(),
                );
                if moved.is_ok() {
                    self.counted(|t| t.cursor_moves += 1);
                }
                continue;
            };
            let last = cron::from_ms(last_ms);
            // Firings are computed off the runtime's threads: a long downtime of a
            // per-second schedule is many of them.
            let schedule = self.schedule.clone();
            let due = tokio::task::spawn_blocking(move || {
                let (tail, count) = schedule.between(last, now, MAX_REPLAY);
                let first = schedule.first_between(last, now);
                (tail, count, first)
            })
            .await;
            let Ok((due, count, first)) = due else { return };
            if !due.is_empty() {
                self.fire(last_ms, &due, count, first, now);
            }
            // Counted once what was due is queued (or consumed).
            self.counted(|t| t.checks += 1);
            if due.is_empty() {
                let Some(next) = self.schedule.next_after(last.max(now)) else {
                    tracing::warn!(pipeline = %self.pipeline, "{}: cron `{}` never fires again", self.pipeline, self.schedule.expr);
                    return;
                };
                // Sleep in bounded steps so a wall-clock jump is noticed.
                let wait = (next - Utc::now())
                    .to_std()
                    .unwrap_or_default()
                    .min(Duration::from_secs(60));
                tokio::time::sleep(wait).await;
            }
        }
    }

    fn counted(&self, f: impl FnOnce(&mut super::TriggerCounts)) {
        self.d.counters.trigger(&self.pipeline, &self.id, f);
    }

    /// `due`: the latest firings since the one recorded (`last_ms`), oldest first,
    /// `count` of them in all, `first` the oldest. The latest is on time if the
    /// daemon was not down long. Each run is queued in the transaction that moves
    /// the cursor from the value read, so a firing is consumed once.
    fn fire(
        &self,
        last_ms: i64,
        due: &[chrono::DateTime<chrono_tz::Tz>],
        count: usize,
        first: Option<chrono::DateTime<chrono_tz::Tz>>,
        now: chrono::DateTime<Utc>,
    ) {
        let Some(latest) = due.last().map(|t| t.with_timezone(&Utc)) else {
            return;
        };
        let on_time = now - latest <= ON_TIME;
        let gap = cron::missed(due, count, first, on_time);
        let missed = gap.count;
        let mut cursor = last_ms;
        let mut submit = |at: chrono::DateTime<Utc>, detail: Option<serde_json::Value>| {
            let (pipeline, id, ms) = (&self.pipeline, &self.id, at.timestamp_millis());
            let old = cursor;
            let result = match detail {
                Some(detail) => {
                    let req = RunRequest {
                        params: self.params.clone(),
                        no_reuse: false,
                        trigger: format!("cron {}", self.schedule.expr),
                        trigger_detail: Some(detail),
                    };
                    self.d
                        .submit(pipeline, req, |b| {
                            b.advance_trigger(pipeline, id, Some(old), ms)
                        })
                        .map(|_| ())
                }
                None => self
                    .d
                    .store()
                    .db()
                    .read()
                    .advance_trigger(pipeline, id, Some(old), ms)
                    .map_err(SubmitError::from),
            };
            match result {
                Ok(()) => {
                    cursor = ms;
                    self.counted(|t| t.cursor_moves += 1);
                }
                Err(SubmitError::AlreadyFired(_)) => {}
                Err(e) => {
                    tracing::error!(pipeline = %self.pipeline, "{}: cron: {e}", self.pipeline);
                    // The firing is consumed all the same: never fire it twice.
                    if self
                        .d
                        .store()
                        .db()
                        .read()
                        .advance_trigger(pipeline, id, Some(old), ms)
                        .is_ok()
                    {
                        cursor = ms;
                        self.counted(|t| t.cursor_moves += 1);
                    }
                }
            }
        };
        let scheduled = |t: chrono::DateTime<Utc>| self.schedule.local(t).to_rfc3339();
        if missed > 0 {
            tracing::info!(
                pipeline = %self.pipeline,
                "{}: cron `{}`: {missed} firing(s) missed while the daemon was down (catchup = {:?})",
                self.pipeline, self.schedule.expr, self.catchup
            );
        }
        let plain = serde_json::json!({ "scheduled": scheduled(latest) });
        match self.catchup {
            _ if missed == 0 => submit(latest, Some(plain)),
            Catchup::None => submit(latest, on_time.then_some(plain)),
            Catchup::Latest => submit(
                latest,
                Some(serde_json::json!({ "scheduled": scheduled(latest), "missed_count": missed })),
            ),
            Catchup::All => {
                if count > due.len() {
                    tracing::warn!(
                        pipeline = %self.pipeline,
                        "{}: cron: only the latest {MAX_REPLAY} of {count} missed firings are replayed",
                        self.pipeline
                    );
                }
                for t in due {
                    let t = t.with_timezone(&Utc);
                    submit(
                        t,
                        Some(serde_json::json!({ "scheduled": scheduled(t), "catchup": true })),
                    );
                }
            }
            Catchup::Coalesce => {
                // The same count as `latest` reports: an on-time latest firing is
                // the one this run is, not a missed one.
                let utc = |t: Option<chrono::DateTime<chrono_tz::Tz>>| {
                    t.map_or(latest, |t| t.with_timezone(&Utc))
                };
                submit(
                    latest,
                    Some(serde_json::json!({
                        "scheduled": scheduled(latest),
                        "missed_from": scheduled(utc(gap.from)),
                        "missed_to": scheduled(utc(gap.to)),
                        "missed_count": missed,
                    })),
                );
            }
        }
    }
}

struct WatchTask {
    d: Arc<Daemon>,
    pipeline: String,
    /// The trigger's identity: `watch GLOB` (and its rank among identical ones).
    id: String,
    files: Arc<FileSet>,
    debounce: Duration,
    params: Vec<(String, String)>,
}

/// How long a watched file may keep changing before the check gives up (and
/// waits for its next event).
const SETTLE_PATIENCE: Duration = Duration::from_secs(600);

impl WatchTask {
    async fn run(self, token: CancellationToken) {
        loop {
            // The base directory may not exist yet: wait for it.
            let (_subscription, mut events) = loop {
                if self.files.base.is_dir() {
                    match self.d.watch.subscribe(&self.files.base, true) {
                        Ok(w) => break w,
                        Err(e) => tracing::error!(
                            pipeline = %self.pipeline,
                            "{}: watch `{}`: cannot watch {}: {e}", self.pipeline, self.files.glob, self.files.base.display()
                        ),
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = token.cancelled() => return,
                }
            };
            // Changes made while the daemon was down (or the directory away) fire
            // now: pending until this first look is done.
            self.counted(|t| t.pending = true);
            self.check().await;
            let mut deadline: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    e = events.recv() => {
                        let Some(e) = e else { return };
                        // The directory itself was removed or replaced: watch it afresh.
                        let base_gone = e.paths.iter().any(|p| *p == self.files.base)
                            && matches!(e.kind, notify::EventKind::Remove(_) | notify::EventKind::Modify(notify::event::ModifyKind::Name(_)));
                        if base_gone || e.need_rescan() {
                            tracing::info!(pipeline = %self.pipeline, "{}: watch `{}`: {} changed; watching it afresh", self.pipeline, self.files.glob, self.files.base.display());
                            break;
                        }
                        if e.paths.iter().any(|p| self.files.matches(p)) {
                            deadline = Some(tokio::time::Instant::now() + self.debounce);
                            self.counted(|t| t.pending = true);
                        }
                    }
                    () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                        if deadline.is_some() => {
                        deadline = None;
                        self.check().await;
                    }
                    () = token.cancelled() => return,
                }
            }
        }
    }

    fn counted(&self, f: impl FnOnce(&mut super::TriggerCounts)) {
        self.d.counters.trigger(&self.pipeline, &self.id, f);
    }

    /// [`WatchTask::look`], counted: once it has fired (or found no change),
    /// the changes seen before it are checked.
    async fn check(&self) {
        self.look().await;
        self.counted(|t| {
            t.checks += 1;
            t.pending = false;
        });
    }

    /// Hashes the matching files once they hold still and fires if any content
    /// differs from the cursor.
    async fn look(&self) {
        let files = self.files.clone();
        let Ok(Some(now)) =
            tokio::task::spawn_blocking(move || files.settle_and_hash(SETTLE_PATIENCE)).await
        else {
            tracing::warn!(pipeline = %self.pipeline, "{}: watch `{}`: files kept changing; waiting for the next change", self.pipeline, self.files.glob);
            return;
        };
        let (id, glob) = (&self.id, &self.files.glob);
        let (seen, before) = {
            let db = self.d.store().db();
            let seen = db.read().trigger_last_fired(&self.pipeline, id);
            let before = db.read().watch_cursor(&self.pipeline, id);
            (seen, before)
        };
        let (seen, before) = match (seen, before) {
            (Ok(s), Ok(b)) => (s, b),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(pipeline = %self.pipeline, "{}: watch: {e}", self.pipeline);
                return;
            }
        };
        let Some(before) = before else {
            // First look: what is there now is the baseline.
            let set = self
                .d
                .store()
                .db()
                .batch(|b| b.set_watch_cursor(&self.pipeline, id, None, &now));
            if set.is_ok() {
                self.counted(|t| t.cursor_moves += 1);
            }
            return;
        };
        let changed = watch::changed(&before, &now);
        if changed.is_empty() {
            return;
        }
        tracing::info!(pipeline = %self.pipeline, "{}: watch `{glob}`: {} file(s) changed", self.pipeline, changed.len());
        let req = RunRequest {
            params: self.params.clone(),
            no_reuse: false,
            trigger: format!("watch {glob}"),
            trigger_detail: Some(serde_json::json!({ "changed": changed })),
        };
        match self.d.submit(&self.pipeline, req, |b| {
            b.set_watch_cursor(&self.pipeline, id, seen, &now)
        }) {
            Ok(_) => self.counted(|t| t.cursor_moves += 1),
            Err(SubmitError::AlreadyFired(_)) => {}
            Err(e) => tracing::error!(pipeline = %self.pipeline, "{}: watch: {e}", self.pipeline),
        }
    }
}

/// One inotify instance (and one notify thread) for the whole daemon: the watch
/// triggers and the pipelines directory subscribe to directories, and each event
/// goes to the subscribers whose directory holds its path.
pub(super) struct WatchHub {
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    routes: Arc<Mutex<Vec<Route>>>,
    next: std::sync::atomic::AtomicU64,
}

struct Route {
    id: u64,
    dir: PathBuf,
    recursive: bool,
    tx: tokio::sync::mpsc::UnboundedSender<notify::Event>,
}

/// A subscription; dropping it unsubscribes (and unwatches a directory no one
/// else wants).
pub(super) struct Subscription {
    hub: Arc<WatchHub>,
    id: u64,
}

impl WatchHub {
    pub(super) fn new() -> Arc<WatchHub> {
        let routes: Arc<Mutex<Vec<Route>>> = Arc::default();
        let r = routes.clone();
        let watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            let Ok(e) = e else { return };
            if matches!(e.kind, notify::EventKind::Access(_)) {
                return;
            }
            for route in lock(&r).iter() {
                let hit = e.paths.iter().any(|p| {
                    if route.recursive {
                        p.starts_with(&route.dir)
                    } else {
                        p.parent() == Some(route.dir.as_path()) || *p == route.dir
                    }
                });
                if hit {
                    let _ = route.tx.send(e.clone());
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(
                    "cannot start the file watcher: {e}; watch triggers and hot reload are off"
                );
                None
            }
        };
        Arc::new(WatchHub {
            watcher: Mutex::new(watcher),
            routes,
            next: std::sync::atomic::AtomicU64::new(1),
        })
    }

    pub(super) fn subscribe(
        self: &Arc<Self>,
        dir: &Path,
        recursive: bool,
    ) -> Result<
        (
            Subscription,
            tokio::sync::mpsc::UnboundedReceiver<notify::Event>,
        ),
        String,
    > {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut routes = lock(&self.routes);
            routes.push(Route {
                id,
                dir: dir.to_path_buf(),
                recursive,
                tx,
            });
        }
        if let Err(e) = self.rewatch(dir) {
            lock(&self.routes).retain(|r| r.id != id);
            return Err(e);
        }
        Ok((
            Subscription {
                hub: self.clone(),
                id,
            },
            rx,
        ))
    }

    /// Watches `dir` as its subscribers need (recursively if any of them asks),
    /// or not at all when none is left.
    fn rewatch(&self, dir: &Path) -> Result<(), String> {
        let wanted: Vec<bool> = lock(&self.routes)
            .iter()
            .filter(|r| r.dir == dir)
            .map(|r| r.recursive)
            .collect();
        let mut w = lock(&self.watcher);
        let Some(w) = w.as_mut() else {
            return Err("the file watcher is not running".into());
        };
        let _ = w.unwatch(dir);
        if wanted.is_empty() {
            return Ok(());
        }
        let mode = if wanted.contains(&true) {
            notify::RecursiveMode::Recursive
        } else {
            notify::RecursiveMode::NonRecursive
        };
        w.watch(dir, mode).map_err(|e| e.to_string())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let dir = {
            let mut routes = lock(&self.hub.routes);
            let dir = routes
                .iter()
                .find(|r| r.id == self.id)
                .map(|r| r.dir.clone());
            routes.retain(|r| r.id != self.id);
            dir
        };
        if let Some(dir) = dir {
            let _ = self.hub.rewatch(&dir);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reloads when a pipeline file changes (after 300 ms of quiet).
pub(super) fn watch_pipelines_dir(d: &Arc<Daemon>) {
    let dir = d.config.pipelines.clone();
    let (watcher, mut events) = match d.watch.subscribe(&dir, false) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!("cannot watch {}: {e}; reload with SIGHUP", dir.display());
            return;
        }
    };
    let d = d.clone();
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                e = events.recv() => {
                    let Some(e) = e else { return };
                    if e.paths.iter().any(|p| p.extension().is_some_and(|x| x == "toml")) {
                        deadline = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                    }
                }
                () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await },
                    if deadline.is_some() => {
                    deadline = None;
                    d.reload();
                }
                () = d.shutdown.cancelled() => return,
            }
        }
    });
}

/// `WATCHDOG=1` at half the interval systemd asks for, from the runtime that
/// runs the scheduler, after taking the daemon's state lock (a deadlock stops the
/// pings and systemd restarts the service).
pub(super) fn watchdog(d: &Arc<Daemon>) -> tokio::task::JoinHandle<()> {
    let interval = sd_notify::watchdog_enabled();
    let d = d.clone();
    tokio::spawn(async move {
        let Some(interval) = interval.filter(|i| !i.is_zero()) else {
            return;
        };
        let every = interval / 2;
        loop {
            tokio::time::sleep(every).await;
            drop(d.state());
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    })
}
