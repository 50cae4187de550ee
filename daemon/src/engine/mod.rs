//! A run: the scheduler that walks one pipeline's graph. Steps start as soon as
//! their inputs exist, up to `max_parallel_steps` at once; each is reused or
//! executed (with retries) as [`Planner::decide`] says. A failed step skips its
//! dependants while independent branches finish.
//!
//! Everything is recorded as it happens, so a killed process leaves a run that
//! `resume` can finish: completed steps keep their outputs, the rest run again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::definition::{self, Environment, ParamValue, Pipeline, StepKind};
use crate::diagnostic::Report;
use crate::executor::Executor;
use crate::executor::container::{self, ResolvedImage};
use crate::executor::transfer;
use crate::executor::wasm::WasmRuntime;
use crate::executor::workspace::WorkspacePool;
use crate::graph::Graph;
use crate::model::{AttemptStatus, Placement, RunStatus, StepStatus};
use crate::planner::code::{Memo, SNAPSHOTS, code_of, code_snapshot, file_digest, python_variant};
use crate::planner::{self, Decision, InputMode, Known, PlanError, Planned, Planner, Reusable};
use crate::store::db::NewRun;
use crate::store::{Store, StoreError};

mod attempt;

pub use crate::executor::{DEFAULT_MEMORY, DEFAULT_TIMEOUT};
/// Largest log kept per step attempt, unless `MILLRACE_LOG_CAP` (a size such as
/// `"64MiB"`) says otherwise.
pub const LOG_CAP: u64 = 16 << 20;

fn log_cap() -> u64 {
    static CAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("MILLRACE_LOG_CAP")
            .ok()
            .and_then(|v| definition::parse_size(&v).ok())
            .unwrap_or(LOG_CAP)
    })
}
/// Most bytes a step's outputs may hold together (`MILLRACE_OUTPUT_CAP`, default
/// 10GiB): a runaway step fails instead of filling the store.
fn output_cap() -> u64 {
    static CAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("MILLRACE_OUTPUT_CAP")
            .ok()
            .and_then(|v| definition::parse_size(&v).ok())
            .unwrap_or(10 << 30)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Params(String),
    #[error("{}", .0)]
    Definition(Box<Report>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] crate::store::db::DbError),
    #[error("run {0} not found")]
    NoSuchRun(i64),
    #[error("run {0} is still running in another process")]
    Busy(i64),
    #[error("run {0} already succeeded: nothing to resume")]
    AlreadySucceeded(i64),
    #[error("input `{name}`: {detail}")]
    Input { name: String, detail: String },
    #[error(transparent)]
    Wasm(#[from] crate::executor::wasm::WasmError),
}

impl From<PlanError> for RunError {
    fn from(e: PlanError) -> RunError {
        match e {
            PlanError::Input { name, detail } => RunError::Input { name, detail },
            PlanError::Db(e) => RunError::Db(e),
        }
    }
}

/// What a run or step reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    RunStarted {
        run: i64,
        pipeline: String,
        steps: usize,
    },
    StepStarted {
        step: String,
        attempt: u32,
    },
    /// Also an attempt that failed and is retried (`status` failed, `detail`
    /// ending in "retrying"). `status` is always terminal.
    StepFinished {
        step: String,
        status: StepStatus,
        detail: String,
        elapsed: Duration,
    },
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    pub run_id: i64,
    pub pipeline: String,
    pub status: RunStatus,
    pub executed: usize,
    pub reused: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cancelled: usize,
    pub seconds: f64,
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

pub use crate::config::Datastores;

/// The engine behind `millrace run`, `resume` and (later) the daemon.
pub struct Engine {
    pub store: Arc<Store>,
    pub max_parallel: usize,
    pub datastores: Datastores,
    wasm: tokio::sync::OnceCell<Arc<WasmRuntime>>,
    /// Compute targets steps may name (from the daemon config; `local` is implicit).
    pub computes: BTreeMap<String, crate::config::Compute>,
    /// `[python]`: the warm interpreter's preload list, and whether steps use it.
    pub python: crate::config::Python,
    /// Container engine clients, by socket.
    containers: container::Engines,
    /// This state's instance id (see [`container::instance_of`]).
    instance: std::sync::OnceLock<String>,
    /// Step slots shared by every run of this engine (`max_parallel_steps`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Set when the daemon shuts down: runs start no new step, and a run stopped
    /// now ends `interrupted` (to be resumed), not `cancelled`.
    draining: std::sync::atomic::AtomicBool,
}

/// A request to run a pipeline.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub params: Vec<(String, String)>,
    pub no_reuse: bool,
    /// What fired the run: `cli`, `api`, `cron 0 3 * * *`, `watch data/*.csv`, …
    pub trigger: String,
    pub trigger_detail: Option<serde_json::Value>,
}

impl Engine {
    pub fn new(store: Arc<Store>, max_parallel: usize, datastores: Datastores) -> Engine {
        Engine {
            store,
            max_parallel: max_parallel.max(1),
            datastores,
            wasm: tokio::sync::OnceCell::new(),
            computes: BTreeMap::new(),
            python: crate::config::Python::default(),
            containers: container::Engines::default(),
            instance: std::sync::OnceLock::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(max_parallel.max(1))),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// From now on no run starts a new step; what is stopped is `interrupted`.
    pub fn drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What pipelines are checked against now: the datastores, the compute
    /// targets and the current module registry.
    pub fn environment(&self) -> Result<Environment, RunError> {
        let mut env = self.datastores.environment();
        for (name, c) in &self.computes {
            env.computes.insert(name.clone(), c.kind.clone());
        }
        env.modules = crate::module::ModuleIndex::load(&self.store)?;
        Ok(env)
    }

    /// The Slurm target a step runs on, if its `compute` names one.
    fn slurm_target(
        &self,
        step: &definition::Step,
    ) -> Option<(String, crate::executor::slurm::Target)> {
        Executor::slurm_target(step, &self.computes)
    }

    /// The container engine a step runs on: its compute target's socket (and
    /// whether it may pull), else the default engine.
    fn container_engine(&self, step: &definition::Step) -> (String, bool) {
        let target = step
            .compute
            .as_ref()
            .and_then(|c| self.computes.get(c.get_ref()));
        match target {
            Some(c) if c.kind == "container" => (
                c.socket.clone().unwrap_or_else(container::default_socket),
                c.pull,
            ),
            _ => (container::default_socket(), false),
        }
    }

    /// Every container step's image, resolved to its content digest on its
    /// engine (once per engine and image). A failure is kept per step: that step
    /// fails with it, the others go on.
    pub async fn resolve_images(
        &self,
        p: &Pipeline,
    ) -> HashMap<usize, Result<ResolvedImage, String>> {
        let mut seen: HashMap<(String, String), Result<ResolvedImage, String>> = HashMap::new();
        let mut out = HashMap::new();
        for (i, step) in p.steps.iter().enumerate() {
            let StepKind::Container(c) = &step.kind else {
                continue;
            };
            let (socket, pull) = self.container_engine(step);
            let image = c.image.get_ref().clone();
            let key = (socket.clone(), image.clone());
            if !seen.contains_key(&key) {
                let resolved = match self.containers.connect(&socket).await {
                    Ok(docker) => container::resolve_image(&docker, &socket, &image, pull).await,
                    Err(e) => Err(e),
                }
                .map_err(|e| e.to_string());
                seen.insert(key.clone(), resolved);
            }
            out.insert(i, seen[&key].clone());
        }
        out
    }

    /// This store's mark on the containers it starts: two state directories on
    /// one engine never touch each other's containers.
    pub fn instance(&self) -> String {
        self.instance
            .get_or_init(|| container::instance_of(&self.store.root))
            .clone()
    }

    /// Removes the containers of steps no live process runs any more (a crash
    /// left them), on every engine the config names. Returns how many.
    pub async fn remove_orphan_containers(&self) -> usize {
        // A store whose runs never had a container step has none to leave:
        // no engine is contacted (podman's version handshake alone costs ~0.3 s).
        if !self.store.db().read().has_container_steps().unwrap_or(true) {
            return 0;
        }
        let mut sockets: Vec<String> = self
            .computes
            .values()
            .filter(|c| c.kind == "container")
            .map(|c| c.socket.clone().unwrap_or_else(container::default_socket))
            .collect();
        sockets.push(container::default_socket());
        sockets.sort();
        sockets.dedup();
        let instance = self.instance();
        let mut removed = 0;
        for socket in sockets {
            let docker = match self.containers.connect(&socket).await {
                Ok(d) => d,
                // No engine there: nothing of ours can be running on it.
                Err(_) => continue,
            };
            let store = self.store.clone();
            match container::remove_orphans(&docker, &instance, |run| RunLock::is_held(&store, run))
                .await
            {
                Ok(n) => removed += n,
                Err(e) => {
                    tracing::warn!(engine = %socket, error = %e, "cannot look for orphan containers")
                }
            }
        }
        removed
    }

    /// Compiles the Python runtime into the precompile cache, once per runtime,
    /// wasmtime version and engine configuration. Returns (the runtime's
    /// directory, its digest, whether it was already compiled).
    pub async fn prepare_python(&self) -> Result<(PathBuf, String, bool), RunError> {
        let runtime = crate::executor::python::Runtime::locate()
            .ok_or_else(|| RunError::Params(crate::executor::python::missing()))?;
        runtime
            .check()
            .map_err(|e| RunError::Params(e.to_string()))?;
        let memo = Mutex::new(HashMap::new());
        let digest = file_digest(&memo, &self.store, &runtime.wasm()).map_err(RunError::Params)?;
        let wasm = self.wasm().await?;
        let cached = tokio::task::block_in_place(|| wasm.precompile(&runtime.wasm(), &digest))?;
        Ok((runtime.dir, digest, cached))
    }

    /// Builds and compiles the warm interpreter (`executor::snapshot`) for the
    /// `[python] preload` list, once per recipe. The error says why there is
    /// none; Python steps then run on the base runtime.
    pub async fn prepare_python_snapshot(
        &self,
    ) -> Result<crate::executor::snapshot::Prepared, String> {
        let runtime = crate::executor::python::Runtime::locate()
            .ok_or_else(crate::executor::python::missing)?;
        runtime.check()?;
        let memo = Mutex::new(HashMap::new());
        let digest = tokio::task::block_in_place(|| {
            crate::planner::code::runtime_digest(&memo, &self.store)
        })?;
        let wasm = self.wasm().await.map_err(|e| e.to_string())?;
        crate::executor::snapshot::prepare(
            &wasm,
            &runtime,
            &digest,
            &self.python.preload,
            &self.store.wasm_cache_dir(),
        )
        .await
    }

    /// (precompiled code loaded from the cache, compiles) since the engine started.
    pub fn wasm_stats(&self) -> (u64, u64) {
        self.wasm.get().map_or((0, 0), |w| {
            (
                w.cache_hits.load(std::sync::atomic::Ordering::Relaxed),
                w.compiles.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    /// Steps executing now, across all runs.
    pub fn running_steps(&self) -> usize {
        self.max_parallel - self.slots.available_permits()
    }

    /// The wasm engine, built on first use (a no-op rerun never needs it).
    async fn wasm(&self) -> Result<Arc<WasmRuntime>, RunError> {
        let dir = self.store.wasm_cache_dir();
        let parallel = self.max_parallel;
        Ok(self
            .wasm
            .get_or_try_init(|| async move { WasmRuntime::new(&dir, parallel) })
            .await?
            .clone())
    }

    /// Starts a new run of `p` (read from `text`) and drives it to the end.
    pub async fn run(
        self: &Arc<Self>,
        p: &Pipeline,
        text: &str,
        path: &Path,
        req: RunRequest,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let params = p.resolve_params(&req.params).map_err(RunError::Params)?;
        let run_id =
            self.create_run(p, text, path, &req, &params, RunStatus::Running, |_| Ok(()))?;
        self.execute(
            run_id,
            Arc::new(p.clone()),
            params,
            req.no_reuse,
            events,
            cancel,
        )
        .await
    }

    /// Records a new run of `p` as `queued`, with the definition it will run, and in
    /// the same transaction whatever `also` writes (a trigger's cursor): a firing is
    /// never recorded without its run, nor the run without the firing. The daemon
    /// starts it with [`Engine::start`].
    pub fn enqueue(
        &self,
        p: &Pipeline,
        text: &str,
        path: &Path,
        req: &RunRequest,
        also: impl FnOnce(&crate::store::db::Batch<'_>) -> crate::store::db::Result<()>,
    ) -> Result<i64, RunError> {
        let params = p.resolve_params(&req.params).map_err(RunError::Params)?;
        self.create_run(p, text, path, req, &params, RunStatus::Queued, also)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_run(
        &self,
        p: &Pipeline,
        text: &str,
        path: &Path,
        req: &RunRequest,
        params: &[(String, ParamValue)],
        status: RunStatus,
        also: impl FnOnce(&crate::store::db::Batch<'_>) -> crate::store::db::Result<()>,
    ) -> Result<i64, RunError> {
        Ok(self.store.db().batch(|b| {
            b.record_definition(
                &p.digest,
                p.name.get_ref(),
                &path.display().to_string(),
                text,
            )?;
            let id = b.create_run(&NewRun {
                pipeline: p.name.get_ref(),
                experiment: &p.experiment,
                definition: &p.digest,
                params: &planner::params_json(params),
                trigger: &req.trigger,
                trigger_detail: req.trigger_detail.as_ref(),
                no_reuse: req.no_reuse,
                status,
                warnings: &p.warnings(),
                module_pins: &p.module_pins(),
            })?;
            also(b)?;
            Ok(id)
        })?)
    }

    /// Starts a queued run (or finishes an interrupted one) with the definition it
    /// was recorded with.
    pub async fn start(
        self: &Arc<Self>,
        run_id: i64,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        self.resume(run_id, events, cancel).await
    }

    /// Finishes a failed, cancelled or interrupted run, reusing what succeeded.
    pub async fn resume(
        self: &Arc<Self>,
        run_id: i64,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let run = self
            .store
            .db()
            .read()
            .run(run_id)?
            .ok_or(RunError::NoSuchRun(run_id))?;
        if run.status == RunStatus::Succeeded {
            return Err(RunError::AlreadySucceeded(run_id));
        }
        let (path, text) = self
            .store
            .db()
            .read()
            .definition(&run.definition)?
            .ok_or(RunError::NoSuchRun(run_id))?;
        // Module specs resolve to the versions the run was created with; a version
        // disabled since then fails the run here, with the reason.
        let mut env = self.environment()?;
        env.modules = Arc::new(env.modules.pinned(run.module_pins.clone()));
        let (pipeline, report) = crate::graph::parse(Path::new(&path), text, &env);
        let p = pipeline.ok_or_else(|| RunError::Definition(Box::new(report)))?;
        let overrides: Vec<(String, String)> = match &run.params {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect(),
            _ => Vec::new(),
        };
        let params = p.resolve_params(&overrides).map_err(RunError::Params)?;
        self.execute(run_id, Arc::new(p), params, run.no_reuse, events, cancel)
            .await
    }

    async fn execute(
        self: &Arc<Self>,
        run_id: i64,
        p: Arc<Pipeline>,
        params: Vec<(String, ParamValue)>,
        no_reuse: bool,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<RunSummary, RunError> {
        let started = Instant::now();
        let _lock = match RunLock::acquire(&self.store, run_id) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(RunError::Busy(run_id)),
            Err(source) => {
                return Err(RunError::Store(StoreError::Dir {
                    path: self.store.root.join("locks"),
                    source,
                }));
            }
        };
        // Held until the run ends; a `gc` sweeping now finishes first (a cancel or
        // a shutdown meanwhile ends the wait).
        let stop = || cancel.is_cancelled() || self.is_draining();
        let Some(_store_lock) =
            tokio::task::block_in_place(|| self.store.lock_shared_unless(&stop))?
        else {
            let status = if self.is_draining() {
                // Left as it was (queued or running): the next start takes it up.
                RunStatus::Interrupted
            } else {
                self.store.db().read().set_run_status(
                    run_id,
                    RunStatus::Cancelled,
                    Some("cancelled while it waited for gc to finish"),
                )?;
                RunStatus::Cancelled
            };
            return Ok(RunSummary {
                run_id,
                pipeline: p.name.get_ref().clone(),
                status,
                executed: 0,
                reused: 0,
                failed: 0,
                skipped: 0,
                cancelled: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        };
        let result = self
            .execute_locked(run_id, p, params, no_reuse, events, cancel, started)
            .await;
        if let Err(e @ (RunError::Db(_) | RunError::Store(_))) = &result {
            // A record could not be written mid-run (most often: the disk is full).
            // Removing the sandboxes frees what the steps wrote; then the failure
            // may fit, and the run is not left `running` (it can be resumed).
            let _ = tokio::task::block_in_place(|| remove_tree(&self.store.work_dir(run_id)));
            let _ = self.store.db().read().set_run_status(
                run_id,
                RunStatus::Failed,
                Some(&e.to_string()),
            );
        }
        result
    }

    /// [`Engine::execute`] once the run and the store are locked.
    #[allow(clippy::too_many_arguments)]
    async fn execute_locked(
        self: &Arc<Self>,
        run_id: i64,
        p: Arc<Pipeline>,
        params: Vec<(String, ParamValue)>,
        no_reuse: bool,
        events: EventSink,
        cancel: tokio_util::sync::CancellationToken,
        started: Instant,
    ) -> Result<RunSummary, RunError> {
        // Only the process holding the lock may mark the run as running (a resume
        // that finds it busy must not touch its status).
        self.store
            .db()
            .read()
            .set_run_status(run_id, RunStatus::Running, None)?;
        let graph = Graph::new(&p);
        let completed: HashSet<usize> = {
            let mut db = self.store.db();
            db.batch(|b| {
                for (pos, &i) in graph.order.iter().enumerate() {
                    let s = &p.steps[i];
                    let module = match &s.kind {
                        StepKind::Module { module, .. } => Some(module.id.as_str()),
                        _ => None,
                    };
                    b.insert_step(run_id, s.name.get_ref(), pos, s.kind.runtime_name(), module)?;
                }
                Ok(())
            })?;
            // A resume keeps the steps that completed before it.
            let earlier: HashMap<String, StepStatus> = db
                .read()
                .steps(run_id)?
                .into_iter()
                .map(|s| (s.name, s.status))
                .collect();
            (0..p.steps.len())
                .filter(|&i| {
                    matches!(
                        earlier.get(p.steps[i].name.get_ref()),
                        Some(StepStatus::Succeeded | StepStatus::Reused)
                    )
                })
                .collect()
        };
        events(&Event::RunStarted {
            run: run_id,
            pipeline: p.name.get_ref().clone(),
            steps: p.steps.len(),
        });

        // Hashing (and on first sight copying) datasets is blocking work.
        let inputs = match tokio::task::block_in_place(|| {
            planner::pipeline_inputs(
                &self.store,
                &self.datastores,
                &p,
                InputMode::Snapshot { run: run_id },
            )
        }) {
            Ok(i) => i,
            Err(e) => {
                let e = RunError::from(e);
                self.store.db().read().set_run_status(
                    run_id,
                    RunStatus::Failed,
                    Some(&e.to_string()),
                )?;
                return Err(e);
            }
        };
        let images = Arc::new(self.resolve_images(&p).await);
        let params: Arc<[(String, ParamValue)]> = params.into();
        let planner = Planner::new(
            self.store.clone(),
            p.clone(),
            params.clone(),
            images.clone(),
            self.datastores.clone(),
            no_reuse,
        )
        .with_python(self.python.clone())
        .resuming(run_id, completed);
        let ctx = Arc::new(RunContext {
            engine: self.clone(),
            run_id,
            pipeline: p.clone(),
            params,
            events: events.clone(),
            semaphore: self.slots.clone(),
            code_digests: planner.memo(),
            images,
            planner,
            adopting: Mutex::new(Default::default()),
            workspaces: WorkspacePool::new(self.store.work_dir(run_id)),
        });

        let n = p.steps.len();
        let mut waiting: Vec<usize> = graph.deps.iter().map(Vec::len).collect();
        let mut status: Vec<Option<StepStatus>> = vec![None; n];
        let mut known = Known::new(inputs, n);
        let mut ready: VecDeque<usize> = graph
            .order
            .iter()
            .copied()
            .filter(|&i| waiting[i] == 0)
            .collect();
        let mut running: JoinSet<(usize, Result<StepDone, StepFailure>)> = JoinSet::new();
        let mut cancelled = false;
        // Keys and reuse records of the decisions made between two awaits, written
        // in one transaction: a no-op rerun of 1000 steps commits a handful of times.
        let mut deferred: Vec<Deferred> = Vec::new();

        loop {
            if cancelled || self.is_draining() {
                // Nothing new starts once the run is cancelled or the daemon stops.
                ready.clear();
            }
            while let Some(i) = ready.pop_front() {
                let name = p.steps[i].name.get_ref().clone();
                let (parts, reuse) = match ctx.planner.decide(i, &known)? {
                    Decision::Reuse { key, from } => (key, Some(from)),
                    Decision::Run { key, .. } => (key, None),
                    // An upstream step did not produce what this one reads: handled
                    // as skipped.
                    Decision::Pending { .. } => continue,
                    Decision::Unkeyed { error: detail } => {
                        self.store.db().read().finish_step(
                            run_id,
                            &name,
                            StepStatus::Failed,
                            None,
                            Some(&detail),
                        )?;
                        events(&Event::StepFinished {
                            step: name,
                            status: StepStatus::Failed,
                            detail,
                            elapsed: Duration::ZERO,
                        });
                        status[i] = Some(StepStatus::Failed);
                        skip_dependants(&ctx, &graph, i, &mut status)?;
                        continue;
                    }
                };
                let key = parts.key();
                deferred.push(Deferred::Key {
                    i,
                    key: key.clone(),
                    parts: parts.to_json(),
                });
                let step_inputs = parts.inputs;
                if let Some(from) = reuse {
                    // Its own outputs from before a resume: nothing new to record.
                    let resumed = from.run == run_id && from.step == name;
                    let detail = if resumed {
                        "completed before the resume".to_string()
                    } else if from.run == run_id {
                        // Another step of this run with the very same key.
                        format!("from step {} of this run", from.step)
                    } else {
                        format!("from run {}", from.run)
                    };
                    if let Some(dest) = ctx.planner.destination(i) {
                        // What a killed transfer left beside its destination: the
                        // next transfer there removes it, and a reuse is one too.
                        transfer::remove_stale_staging(&dest);
                    }
                    let outs = from.outputs.clone();
                    if !resumed {
                        deferred.push(Deferred::Reuse {
                            i,
                            key,
                            from,
                            inputs: step_inputs,
                        });
                    }
                    events(&Event::StepFinished {
                        step: name,
                        status: StepStatus::Reused,
                        detail,
                        elapsed: Duration::ZERO,
                    });
                    status[i] = Some(StepStatus::Reused);
                    known.settle(i, outs);
                    release(&graph, i, &mut waiting, &mut ready);
                    continue;
                }
                let ctx = ctx.clone();
                running.spawn(async move {
                    let r = ctx.execute_step(i, step_inputs, key).await;
                    (i, r)
                });
            }
            ctx.write_deferred(&mut deferred)?;
            let joined = tokio::select! {
                j = running.join_next() => j,
                () = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    running.abort_all();
                    continue;
                }
            };
            let Some(joined) = joined else { break };
            let (i, result) = match joined {
                Ok(r) => r,
                Err(e) if e.is_cancelled() => continue,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            match result {
                Ok(done) => {
                    status[i] = Some(StepStatus::Succeeded);
                    known.settle(i, done.outputs);
                    if !cancelled {
                        release(&graph, i, &mut waiting, &mut ready);
                    }
                }
                Err(StepFailure::NotStarted) => {}
                Err(StepFailure::Failed) => {
                    status[i] = Some(StepStatus::Failed);
                    skip_dependants(&ctx, &graph, i, &mut status)?;
                }
            }
        }
        // Stopped by a daemon shutdown: what did not finish stays pending for the
        // resume.
        let interrupted = self.is_draining() && status.iter().any(Option::is_none);
        if cancelled && !interrupted {
            // Their jobs or containers were stopped: nothing to adopt on a resume.
            self.store.db().read().cancel_running_attempts(run_id)?;
            for (i, s) in status.iter_mut().enumerate() {
                if s.is_none() {
                    *s = Some(StepStatus::Cancelled);
                    let name = p.steps[i].name.get_ref();
                    self.store.db().read().finish_step(
                        run_id,
                        name,
                        StepStatus::Cancelled,
                        None,
                        Some("the run was cancelled"),
                    )?;
                }
            }
        }
        let count = |want: StepStatus| status.iter().filter(|s| **s == Some(want)).count();
        let failed = count(StepStatus::Failed);
        let run_status = if interrupted {
            for (i, s) in status.iter().enumerate() {
                if s.is_none() {
                    self.store.db().read().finish_step(
                        run_id,
                        p.steps[i].name.get_ref(),
                        StepStatus::Pending,
                        None,
                        Some("interrupted by the daemon's shutdown"),
                    )?;
                }
            }
            RunStatus::Interrupted
        } else if cancelled {
            RunStatus::Cancelled
        } else if failed > 0 || status.iter().any(Option::is_none) {
            RunStatus::Failed
        } else {
            RunStatus::Succeeded
        };
        let error = if interrupted {
            Some("interrupted by the daemon's shutdown".to_string())
        } else {
            (failed > 0).then(|| format!("{failed} step(s) failed"))
        };
        self.store
            .db()
            .read()
            .set_run_status(run_id, run_status, error.as_deref())?;
        drop(ctx);
        let executed = count(StepStatus::Succeeded) + failed;
        let _ = tokio::task::block_in_place(|| {
            if executed > 0 {
                self.store.artifacts.sync();
            }
            remove_tree(&self.store.work_dir(run_id))
        });
        Ok(RunSummary {
            run_id,
            pipeline: p.name.get_ref().clone(),
            status: run_status,
            executed,
            reused: count(StepStatus::Reused),
            failed,
            skipped: count(StepStatus::Skipped),
            cancelled: count(StepStatus::Cancelled),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// `millrace plan`: what each step would do, without running anything. Inputs
    /// are hashed, not stored.
    pub async fn plan(
        &self,
        p: &Pipeline,
        overrides: &[(String, String)],
        no_reuse: bool,
    ) -> Result<Vec<(String, Planned)>, RunError> {
        let params = p.resolve_params(overrides).map_err(RunError::Params)?;
        let inputs = planner::pipeline_inputs(&self.store, &self.datastores, p, InputMode::Hash)?;
        let images = self.resolve_images(p).await;
        let planner = Planner::new(
            self.store.clone(),
            Arc::new(p.clone()),
            params.into(),
            Arc::new(images),
            self.datastores.clone(),
            no_reuse,
        )
        .with_python(self.python.clone());
        Ok(planner.plan(inputs)?)
    }
}

/// A step name as it may appear in a container's, a job's or a directory's
/// name: anything but ASCII letters, digits, `-` and `_` becomes `-`.
fn release(graph: &Graph, i: usize, waiting: &mut [usize], ready: &mut VecDeque<usize>) {
    for &d in &graph.dependants[i] {
        waiting[d] -= 1;
        if waiting[d] == 0 {
            ready.push_back(d);
        }
    }
}

/// Marks every step downstream of a failed one as skipped.
fn skip_dependants(
    ctx: &RunContext,
    graph: &Graph,
    failed: usize,
    status: &mut [Option<StepStatus>],
) -> Result<(), RunError> {
    let mut stack = vec![failed];
    while let Some(i) = stack.pop() {
        for &d in &graph.dependants[i] {
            if status[d].is_none() {
                status[d] = Some(StepStatus::Skipped);
                let name = ctx.pipeline.steps[d].name.get_ref();
                let cause = ctx.pipeline.steps[i].name.get_ref();
                let detail = format!("upstream step `{cause}` did not succeed");
                ctx.engine.store.db().read().finish_step(
                    ctx.run_id,
                    name,
                    StepStatus::Skipped,
                    None,
                    Some(&detail),
                )?;
                (ctx.events)(&Event::StepFinished {
                    step: name.clone(),
                    status: StepStatus::Skipped,
                    detail,
                    elapsed: Duration::ZERO,
                });
                stack.push(d);
            }
        }
    }
    Ok(())
}

/// What a run's step tasks share.
struct RunContext {
    engine: Arc<Engine>,
    run_id: i64,
    pipeline: Arc<Pipeline>,
    params: Arc<[(String, ParamValue)]>,
    events: EventSink,
    semaphore: Arc<tokio::sync::Semaphore>,
    /// The planner's, so an attempt reads the code digest its key holds.
    code_digests: Arc<Memo>,
    /// Container steps' images, resolved when the run started (shared with the
    /// planner, as are the params).
    images: Arc<HashMap<usize, Result<ResolvedImage, String>>>,
    /// Decides each step's reuse (see [`Planner::decide`]).
    planner: Planner,
    /// (step, attempt) whose Slurm job is to be followed again, not submitted.
    adopting: Mutex<std::collections::HashSet<(usize, u32)>>,
    workspaces: WorkspacePool,
}

/// A record of the scheduler's, written with the next batch.
enum Deferred {
    Key {
        i: usize,
        key: String,
        parts: serde_json::Value,
    },
    Reuse {
        i: usize,
        key: String,
        from: Reusable,
        inputs: BTreeMap<String, String>,
    },
}

struct StepDone {
    outputs: Vec<(String, String)>,
}

enum StepFailure {
    Failed,
    /// The daemon began to stop before the step (or its next attempt) started: it
    /// stays pending for the resume.
    NotStarted,
}

impl RunContext {
    fn store(&self) -> &Store {
        &self.engine.store
    }

    fn transfer_destination(&self, i: usize) -> PathBuf {
        self.planner
            .destination(i)
            .unwrap_or_else(|| unreachable!("only transfers have a destination"))
    }

    /// Writes the deferred records in one transaction. A reused step's cache entry
    /// moves to this run, which now holds the same outputs, so deleting older runs
    /// (`gc`) keeps the entry alive.
    fn write_deferred(&self, deferred: &mut Vec<Deferred>) -> Result<(), RunError> {
        if deferred.is_empty() {
            return Ok(());
        }
        self.store().db().batch(|b| {
            for d in deferred.iter() {
                match d {
                    Deferred::Key { i, key, parts } => b.set_step_key(
                        self.run_id,
                        self.pipeline.steps[*i].name.get_ref(),
                        key,
                        parts,
                    )?,
                    Deferred::Reuse {
                        i,
                        key,
                        from,
                        inputs,
                    } => {
                        let step = &self.pipeline.steps[*i];
                        let name = step.name.get_ref();
                        record_inputs(b, self.run_id, step, inputs)?;
                        for (o, d) in &from.outputs {
                            b.record_step_output(self.run_id, name, o, d)?;
                        }
                        b.copy_metrics(from.run, &from.step, self.run_id, name)?;
                        if step.reuse {
                            b.set_cache_entry(key, self.run_id, name)?;
                        }
                        b.finish_step(self.run_id, name, StepStatus::Reused, Some(from.run), None)?;
                    }
                }
            }
            Ok(())
        })?;
        deferred.clear();
        Ok(())
    }

    /// Runs a step's attempts until one succeeds or they are used up.
    async fn execute_step(
        self: Arc<Self>,
        i: usize,
        inputs: BTreeMap<String, String>,
        key: String,
    ) -> Result<StepDone, StepFailure> {
        // A step on a Slurm cluster waits for its job, not for this host's CPUs:
        // it takes no local slot, so a run can keep many jobs in the queue.
        let _permit = if self.engine.slurm_target(&self.pipeline.steps[i]).is_some() {
            None
        } else {
            Some(
                self.semaphore
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| StepFailure::Failed)?,
            )
        };
        if self.engine.is_draining() {
            return Err(StepFailure::NotStarted);
        }
        let step = &self.pipeline.steps[i];
        let name = step.name.get_ref().clone();
        let started = Instant::now();
        let record = |r: crate::store::db::Result<()>| {
            if let Err(e) = r {
                tracing::error!(step = %name, error = %e, "cannot record step state");
            }
        };
        let mut last_error = String::new();
        // A Slurm job of this step that was running when the last process died is
        // followed again (adopted) as the attempt it was, not submitted anew.
        let adopt = self.adoptable_attempt(i);
        if let Some(a) = adopt {
            self.adopting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((i, a));
        }
        let first = adopt.unwrap_or(1);
        for attempt in first..=step.retries.attempts.max(first) {
            if attempt > first {
                let backoff = step
                    .retries
                    .backoff
                    .saturating_mul(1 << (attempt - 2).min(16));
                tokio::time::sleep(backoff).await;
                if self.engine.is_draining() {
                    return Err(StepFailure::NotStarted);
                }
            }
            (self.events)(&Event::StepStarted {
                step: name.clone(),
                attempt,
            });
            let log_path = self
                .engine
                .store
                .log_dir(self.run_id)
                .join(format!("{name}.{attempt}.log"));
            record(self.store().db().batch(|b| {
                if attempt == first {
                    record_inputs(b, self.run_id, step, &inputs)?;
                    b.start_step(self.run_id, &name)?;
                }
                b.start_attempt(
                    self.run_id,
                    &name,
                    attempt,
                    &log_path.display().to_string(),
                    adopt == Some(attempt),
                )
            }));
            let result = self.attempt(i, attempt, &inputs, &log_path).await;
            match result {
                Ok(outputs) => {
                    let recorded = self.store().db().batch(|b| {
                        b.finish_attempt(
                            self.run_id,
                            &name,
                            attempt,
                            AttemptStatus::Succeeded,
                            Some(0),
                            None,
                        )?;
                        for (o, d) in &outputs {
                            b.record_step_output(self.run_id, &name, o, d)?;
                        }
                        if step.reuse {
                            b.set_cache_entry(&key, self.run_id, &name)?;
                        }
                        b.finish_step(self.run_id, &name, StepStatus::Succeeded, None, None)
                    });
                    // A success that cannot be recorded is a failure: nothing would
                    // find its outputs (`output`, `resume`, reuse).
                    if let Err(e) = recorded {
                        return self.fail_step(
                            &name,
                            format!("cannot record the step's outputs: {e}"),
                            started,
                        );
                    }
                    let detail = if attempt > 1 {
                        format!("attempt {attempt}")
                    } else {
                        String::new()
                    };
                    (self.events)(&Event::StepFinished {
                        step: name.clone(),
                        status: StepStatus::Succeeded,
                        detail,
                        elapsed: started.elapsed(),
                    });
                    return Ok(StepDone { outputs });
                }
                Err((exit_code, error)) => {
                    record(self.store().db().read().finish_attempt(
                        self.run_id,
                        &name,
                        attempt,
                        AttemptStatus::Failed,
                        exit_code,
                        Some(&error),
                    ));
                    if attempt < step.retries.attempts {
                        (self.events)(&Event::StepFinished {
                            step: name.clone(),
                            status: StepStatus::Failed,
                            detail: format!(
                                "attempt {attempt}/{}: {error}; retrying",
                                step.retries.attempts
                            ),
                            elapsed: started.elapsed(),
                        });
                    }
                    last_error = error;
                }
            }
        }
        let detail = if step.retries.attempts > 1 {
            format!("{last_error} (after {} attempts)", step.retries.attempts)
        } else {
            last_error
        };
        self.fail_step(&name, detail, started)
    }

    /// The attempt of step `i` whose Slurm job a previous process submitted and
    /// did not see end (its row is still `running`).
    fn adoptable_attempt(&self, i: usize) -> Option<u32> {
        self.engine.slurm_target(&self.pipeline.steps[i])?;
        let name = self.pipeline.steps[i].name.get_ref();
        let attempts = self.store().db().read().attempts(self.run_id, name).ok()?;
        let last = attempts.last()?;
        (last.status == AttemptStatus::Running
            && matches!(last.placement, Some(Placement::Slurm(_))))
        .then_some(last.attempt as u32)
    }

    /// Records and reports a step's final failure.
    fn fail_step(
        &self,
        name: &str,
        detail: String,
        started: Instant,
    ) -> Result<StepDone, StepFailure> {
        if let Err(e) = self.store().db().read().finish_step(
            self.run_id,
            name,
            StepStatus::Failed,
            None,
            Some(&detail),
        ) {
            tracing::error!(step = %name, error = %e, "cannot record step state");
        }
        (self.events)(&Event::StepFinished {
            step: name.to_string(),
            status: StepStatus::Failed,
            detail,
            elapsed: started.elapsed(),
        });
        Err(StepFailure::Failed)
    }
}

fn record_inputs(
    b: &crate::store::db::Batch<'_>,
    run: i64,
    step: &definition::Step,
    inputs: &BTreeMap<String, String>,
) -> crate::store::db::Result<()> {
    let name = step.name.get_ref();
    for (mount, r) in step.references() {
        if let Some(digest) = inputs.get(mount) {
            b.record_step_input(run, name, mount, &r.get_ref().to_string(), digest)?;
        }
    }
    Ok(())
}

/// Removes a sandbox directory, including read-only hard links to blobs.
/// Removes a directory that holds what a guest wrote: at any depth, never
/// recursing (see `walk::remove_tree`).
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    crate::store::walk::remove_tree(dir)
}
/// Held while a process drives a run; `resume` refuses a run whose lock is held.
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// The lock, `None` while another process holds it, or the error that kept
    /// us from asking (out of descriptors, say: that is not "busy", and a
    /// dispatcher taking it for busy would pick the run again at once).
    pub fn acquire(store: &Store, run: i64) -> std::io::Result<Option<RunLock>> {
        let dir = store.root.join("locks");
        std::fs::create_dir_all(&dir)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("run-{run}.lock")))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RunLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Whether some process is driving the run now (when we cannot tell, yes:
    /// the safe answer for gc, recovery and the orphan sweep).
    pub fn is_held(store: &Store, run: i64) -> bool {
        !matches!(RunLock::acquire(store, run), Ok(Some(_)))
    }
}
