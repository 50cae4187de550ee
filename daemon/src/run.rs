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
use crate::executor::container::{self, ResolvedImage};
use crate::executor::transfer;
use crate::executor::wasm::{LogFile, Mount, Outcome, Sandbox, WasmRuntime};
use crate::executor::workspace::{Overrun, Workspace, WorkspacePool, checked_size, watch};
use crate::graph::Graph;
use crate::model::{
    AttemptStatus, ContainerPlacement, Placement, RunStatus, SlurmPlacement, StepStatus,
};
use crate::planner::code::{Memo, SNAPSHOTS, code_of, code_snapshot, file_digest, python_variant};
use crate::planner::{
    self, Decision, InputMode, Known, PlanError, Planned, Planner, Reusable, param_env_name,
};
use crate::store::artifacts::Mode;
use crate::store::db::NewRun;
use crate::store::{Store, StoreError};

pub use crate::model::DEFAULT_MEMORY;
/// A step without `timeout` is stopped after a day: wall time is always bounded.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
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

/// Most metric lines read from one step.
const MAX_METRIC_LINES: usize = 100_000;

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
        let name = step.compute.as_ref()?.get_ref();
        let c = self.computes.get(name)?;
        Some((name.clone(), c.slurm.clone()?))
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
                };
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
        runtime.check().map_err(RunError::Params)?;
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
fn safe_name(name: &str) -> String {
    name.chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' {
                ch
            } else {
                '-'
            }
        })
        .collect()
}

/// The directories a step may write, as the disk watch names them.
fn watched(out: &Path, tmp: &Path, meta: &Path) -> Vec<(String, PathBuf)> {
    vec![
        ("/out".into(), out.to_path_buf()),
        ("/tmp".into(), tmp.to_path_buf()),
        ("/millrace".into(), meta.to_path_buf()),
    ]
}

fn overrun_message(o: &Overrun) -> String {
    match o {
        Overrun::Bytes(used) => disk_cap_message(*used),
        Overrun::Limit(msg) => format!("{msg}; the step was stopped"),
    }
}

fn disk_cap_message(used: u64) -> String {
    format!(
        "/out, /tmp and /millrace hold {}, more than the cap of {} (MILLRACE_OUTPUT_CAP); the step was stopped",
        definition::format_size(used),
        definition::format_size(output_cap())
    )
}

/// How an attempt's program ended: `None` for exit 0, else (exit code, message).
type AttemptResult = Result<Option<(Option<i32>, String)>, (Option<i32>, String)>;

/// The failure, if any, a wasm or Python guest's outcome means.
fn wasm_failure(outcome: Outcome, memory: u64) -> Option<(Option<i32>, String)> {
    match outcome {
        Outcome::Exited(0) => None,
        Outcome::Exited(code) => Some((Some(code), format!("exited with code {code}"))),
        // One line already, with the trap's cause (the whole error is in the log).
        Outcome::Trapped(msg) => Some((None, format!("trapped: {msg}"))),
        Outcome::Limit { code, message } => Some((code, message)),
        Outcome::OutOfMemory(_) => Some((
            None,
            format!(
                "memory limit of {} exceeded",
                definition::format_size(memory)
            ),
        )),
        Outcome::TimedOut(d) => Some((
            None,
            format!("timed out after {}", humantime::format_duration(d)),
        )),
    }
}

/// What an attempt runs.
enum Program {
    Wasm(PathBuf),
    Python { code_dir: PathBuf, entry: PathBuf },
    Container(ResolvedImage),
}

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

    /// One attempt in a fresh sandbox directory; outputs are ingested only on success.
    async fn attempt(
        &self,
        i: usize,
        attempt: u32,
        inputs: &BTreeMap<String, String>,
        log_path: &Path,
    ) -> Result<Vec<(String, String)>, (Option<i32>, String)> {
        let step = &self.pipeline.steps[i];
        match &step.kind {
            StepKind::Transfer { .. } => {
                let source = inputs.get("from").cloned().unwrap_or_default();
                let dest = self.transfer_destination(i);
                if self.engine.store.overlaps(&dest) {
                    return Err((
                        None,
                        format!(
                            "transfer to {}: the destination overlaps the state directory {}; choose a path outside it",
                            dest.display(),
                            self.engine.store.root.display()
                        ),
                    ));
                }
                tokio::task::block_in_place(|| {
                    transfer::publish(&self.engine.store.artifacts, &source, &dest)
                })
                .map(|()| Vec::new())
                .map_err(|e| (None, format!("transfer to {}: {e}", dest.display())))
            }
            StepKind::Wasm { resolved, .. } => {
                self.attempt_wasm(i, attempt, resolved, inputs, log_path)
                    .await
            }
            StepKind::Module {
                resolved, module, ..
            } if module.kind == "wasm" => {
                self.attempt_wasm(i, attempt, resolved, inputs, log_path)
                    .await
            }
            StepKind::Module { module, .. } if module.kind == "python" => {
                let code_dir = self
                    .materialised_code(&module.digest, attempt)
                    .map_err(|(c, e)| (c, format!("module {}: {e}", module.id)))?;
                let program = Program::Python {
                    code_dir,
                    entry: PathBuf::from(module.entry.as_deref().unwrap_or_default()),
                };
                self.attempt_program(i, attempt, &program, inputs, log_path)
                    .await
            }
            StepKind::Python {
                code_dir, entry, ..
            } => {
                let digest = code_snapshot(&self.code_digests, self.store(), code_dir)
                    .map_err(|e| (None, e))?;
                let program = Program::Python {
                    code_dir: self.materialised_code(&digest, attempt)?,
                    entry: PathBuf::from(entry),
                };
                self.attempt_program(i, attempt, &program, inputs, log_path)
                    .await
            }
            StepKind::Module { module, .. } => Err((
                None,
                format!("module {} is of unknown kind `{}`", module.id, module.kind),
            )),
            StepKind::Container(_) => {
                let image = match self.images.get(&i) {
                    Some(Ok(image)) => image.clone(),
                    Some(Err(e)) => return Err((None, e.clone())),
                    None => return Err((None, "the image was not resolved".into())),
                };
                self.attempt_program(i, attempt, &Program::Container(image), inputs, log_path)
                    .await
            }
        }
    }

    /// A code tree of the store, read-only in this run's work directory (hard links
    /// to the store's read-only blobs), shared by the run's steps.
    fn materialised_code(
        &self,
        digest: &str,
        attempt: u32,
    ) -> Result<PathBuf, (Option<i32>, String)> {
        let code_dir = self
            .engine
            .store
            .work_dir(self.run_id)
            .join("code")
            .join(digest);
        if code_dir.is_dir() {
            return Ok(code_dir);
        }
        let part = code_dir.with_extension(format!(
            "part{attempt}-{}",
            SNAPSHOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = remove_tree(&part);
        tokio::task::block_in_place(|| {
            self.engine.store.artifacts.materialise(digest, &part)?;
            match std::fs::rename(&part, &code_dir) {
                // Another step of this run put it there first.
                Err(_) if code_dir.is_dir() => {
                    let _ = remove_tree(&part);
                    Ok(())
                }
                r => r.map_err(|e| crate::store::artifacts::ArtifactError::Io {
                    path: code_dir.clone(),
                    source: e,
                }),
            }
        })
        .map_err(|e| (None, format!("the code: {e}")))?;
        Ok(code_dir)
    }

    async fn attempt_wasm(
        &self,
        i: usize,
        attempt: u32,
        wasm_path: &Path,
        inputs: &BTreeMap<String, String>,
        log_path: &Path,
    ) -> Result<Vec<(String, String)>, (Option<i32>, String)> {
        let program = Program::Wasm(wasm_path.to_path_buf());
        self.attempt_program(i, attempt, &program, inputs, log_path)
            .await
    }

    async fn attempt_program(
        &self,
        i: usize,
        attempt: u32,
        program: &Program,
        inputs: &BTreeMap<String, String>,
        log_path: &Path,
    ) -> Result<Vec<(String, String)>, (Option<i32>, String)> {
        let mut ws = self
            .workspaces
            .take()
            .map_err(|e| (None, format!("cannot create the sandbox directories: {e}")))?;
        let result = self
            .attempt_in(&mut ws, i, attempt, program, inputs, log_path)
            .await;
        self.workspaces.give_back(ws);
        result
    }

    async fn attempt_in(
        &self,
        ws: &mut Workspace,
        i: usize,
        attempt: u32,
        program: &Program,
        inputs: &BTreeMap<String, String>,
        log_path: &Path,
    ) -> Result<Vec<(String, String)>, (Option<i32>, String)> {
        let step = &self.pipeline.steps[i];
        let name = step.name.get_ref();
        let fail = |e: String| (None, e);
        let log = LogFile::create(log_path, log_cap())
            .map_err(|e| fail(format!("cannot create log {}: {e}", log_path.display())))?;
        let (dir_in, dir_out, dir_tmp, dir_meta) =
            (ws.dir_in(), ws.dir_out(), ws.dir_tmp(), ws.dir_meta());
        // Renames and hard links only: cheap enough to do on the worker.
        (|| -> Result<(), String> {
            let mounts: Vec<&str> = inputs.keys().map(String::as_str).collect();
            let outputs: Vec<&str> = step.outputs.iter().map(|o| o.get_ref().as_str()).collect();
            ws.prepare(&mounts, &outputs)
                .map_err(|e| format!("sandbox directories: {e}"))?;
            for (mount, digest) in inputs {
                self.engine
                    .store
                    .artifacts
                    .materialise(digest, &dir_in.join(mount))
                    .map_err(|e| format!("input `{mount}`: {e}"))?;
            }
            Ok(())
        })()
        .map_err(fail)?;
        let (args, env) = planner::interpolated(step, &self.params);
        let mut full_env: Vec<(String, String)> = vec![
            ("MILLRACE_RUN_ID".into(), self.run_id.to_string()),
            (
                "MILLRACE_PIPELINE".into(),
                self.pipeline.name.get_ref().clone(),
            ),
            ("MILLRACE_STEP".into(), name.clone()),
            ("MILLRACE_ATTEMPT".into(), attempt.to_string()),
            ("MILLRACE_METRICS".into(), "/millrace/metrics.jsonl".into()),
            ("TMPDIR".into(), "/tmp".into()),
        ];
        full_env.extend(
            self.params
                .iter()
                .map(|(k, v)| (param_env_name(k), v.to_string())),
        );
        full_env.extend(env);
        let mut mounts = vec![
            Mount {
                host: dir_in.clone(),
                guest: "/in".into(),
                writable: false,
            },
            Mount {
                host: dir_out.clone(),
                guest: "/out".into(),
                writable: true,
            },
            Mount {
                host: dir_tmp.clone(),
                guest: "/tmp".into(),
                writable: true,
            },
            Mount {
                host: dir_meta.clone(),
                guest: "/millrace".into(),
                writable: true,
            },
        ];
        let stopped_by: Arc<Mutex<Option<String>>> = Arc::default();
        // What runs: the step's wasm, the Python runtime with the script, or a
        // container. Each ends in `None` (exit 0) or the failure.
        let run: std::pin::Pin<Box<dyn std::future::Future<Output = AttemptResult> + Send + '_>> =
            match program {
                Program::Container(image) => Box::pin(self.run_container(
                    i,
                    attempt,
                    image,
                    args,
                    full_env,
                    mounts,
                    log.clone(),
                    {
                        // The container's stop carries a number: the message of a
                        // limit comes back beside it.
                        let stopped_by = stopped_by.clone();
                        let dirs = watched(&dir_out, &dir_tmp, &dir_meta);
                        async move {
                            let over = watch(dirs, output_cap()).await;
                            let used = match &over {
                                Overrun::Bytes(used) => *used,
                                Overrun::Limit(_) => 0,
                            };
                            *stopped_by.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(overrun_message(&over));
                            used
                        }
                    },
                    stopped_by.clone(),
                )),
                Program::Wasm(_) | Program::Python { .. } => {
                    let (wasm_path, run_digest, args, extra_mounts) = match program {
                        Program::Wasm(path) => {
                            let argv0 = path
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|| name.clone());
                            let code = code_of(
                                &self.code_digests,
                                &self.images,
                                self.store(),
                                &self.engine.python,
                                &self.pipeline,
                                i,
                            )
                            .map_err(fail)?;
                            (
                                path.clone(),
                                code,
                                std::iter::once(argv0).chain(args).collect::<Vec<_>>(),
                                Vec::new(),
                            )
                        }
                        Program::Python { code_dir, entry } => {
                            let runtime = crate::executor::python::Runtime::locate()
                                .ok_or_else(|| fail(crate::executor::python::missing()))?;
                            runtime.check().map_err(fail)?;
                            // The variant the step's key named (the choice is memoised
                            // for the run): the warm interpreter, or the base runtime.
                            let (variant, _) = python_variant(
                                &self.code_digests,
                                self.store(),
                                &self.engine.python,
                                step,
                            )
                            .map_err(fail)?;
                            log.note(&variant.note());
                            let (program, digest) = match variant {
                                crate::executor::snapshot::Variant::Warm(s) => (s.wasm, s.content),
                                crate::executor::snapshot::Variant::Base(_) => (
                                    runtime.wasm(),
                                    file_digest(&self.code_digests, self.store(), &runtime.wasm())
                                        .map_err(|e| fail(format!("the Python runtime: {e}")))?,
                                ),
                            };
                            // HOME: a fresh directory of this attempt's scratch space.
                            std::fs::create_dir_all(dir_tmp.join(".home"))
                                .map_err(|e| fail(format!("sandbox directories: {e}")))?;
                            full_env.push(("HOME".into(), "/tmp/.home".into()));
                            full_env.push(("PYTHONTZPATH".into(), String::new()));
                            let mut mounts = runtime.mounts();
                            mounts.push(Mount {
                                host: code_dir.clone(),
                                guest: "/code".into(),
                                writable: false,
                            });
                            (
                                program,
                                digest,
                                crate::executor::python::argv(entry, args),
                                mounts,
                            )
                        }
                        Program::Container(_) => unreachable!("matched above"),
                    };
                    mounts.extend(extra_mounts);
                    let memory = step.memory.unwrap_or(DEFAULT_MEMORY);
                    let sandbox = Sandbox {
                        args,
                        env: full_env,
                        mounts,
                        log: log.clone(),
                        memory,
                        timeout: Some(step.timeout.unwrap_or(DEFAULT_TIMEOUT)),
                        disk: output_cap(),
                    };
                    if let Some((compute, target)) = self.engine.slurm_target(step) {
                        let stage_program = matches!(program, Program::Wasm(_));
                        Box::pin(self.run_slurm(
                            i,
                            attempt,
                            (compute, target),
                            (wasm_path, run_digest, stage_program),
                            sandbox,
                        ))
                    } else {
                        let wasm = self.engine.wasm().await.map_err(|e| fail(e.to_string()))?;
                        Box::pin(async move {
                            let outcome = wasm
                                .run(&wasm_path, &run_digest, sandbox)
                                .await
                                .map_err(|e| fail(e.to_string()))?;
                            Ok(wasm_failure(outcome, memory))
                        })
                    }
                }
            };
        // The disk a step fills while it runs (/out, /tmp, /millrace) is watched
        // too: past the cap or a limit the guest is stopped, before it fills the
        // state directory's disk.
        // (A container's watch is its own: it must be removed before the sandbox
        // directories go to the next step.)
        let watch_here = !matches!(program, Program::Container(_));
        let failure = tokio::select! {
            f = run => f?,
            over = watch(watched(&dir_out, &dir_tmp, &dir_meta), output_cap()), if watch_here => {
                let msg = overrun_message(&over);
                log.note(&format!("step failed: {msg}"));
                return Err((None, msg));
            }
        };
        let metrics_file = ws.metrics_file();
        tokio::task::block_in_place(|| {
            self.record_metrics(name, &metrics_file, &log);
            if let Some((code, msg)) = failure {
                log.note(&format!("step failed: {msg}"));
                return Err((code, msg));
            }
            if let Ok(rd) = std::fs::read_dir(&dir_out) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !step.outputs.iter().any(|o| *o.get_ref() == n) {
                        log.note(&format!(
                            "/out/{} is not a declared output and was discarded",
                            crate::store::artifacts::escape_controls(&n)
                        ));
                    }
                }
            }
            let mut size = 0u64;
            for o in &step.outputs {
                size += checked_size(
                    &dir_out.join(o.get_ref()),
                    &format!("output `{}`", o.get_ref()),
                )
                .map_err(|msg| {
                    log.note(&format!("step failed: {msg}"));
                    (None, msg)
                })?;
            }
            if size > output_cap() {
                let msg = format!(
                    "outputs hold {}, more than the cap of {} (MILLRACE_OUTPUT_CAP)",
                    definition::format_size(size),
                    definition::format_size(output_cap())
                );
                log.note(&format!("step failed: {msg}"));
                return Err((None, msg));
            }
            let mut outs = Vec::new();
            for o in &step.outputs {
                let ingested = self
                    .store()
                    .ingest(&dir_out.join(o.get_ref()), Mode::Move)
                    .map_err(|e| (None, format!("output `{}`: {e}", o.get_ref())))?;
                outs.push((o.get_ref().clone(), ingested.digest));
            }
            Ok(outs)
        })
    }

    /// Runs a wasm or Python attempt as a Slurm job: the sandbox directories of
    /// the run's work dir are staged under the target's `shared_dir`, the job runs
    /// `millrace exec-step` there, and `/out` and `/millrace` come back into the
    /// local sandbox, so outputs and metrics are captured as for a local step.
    async fn run_slurm(
        &self,
        i: usize,
        attempt: u32,
        (compute, target): (String, crate::executor::slurm::Target),
        (program, digest, stage_program): (PathBuf, String, bool),
        sandbox: Sandbox,
    ) -> AttemptResult {
        use crate::executor::slurm::{self, JobInfo, JobMount, JobResult, JobSpec};
        let step = &self.pipeline.steps[i];
        let name = step.name.get_ref();
        let fail = |e: String| (None, e);
        let log = sandbox.log.clone();
        let safe = safe_name(name);
        let staging = target
            .shared_dir
            .join(format!("millrace-{}", self.engine.instance()))
            .join(format!("{}-{safe}-{attempt}", self.run_id));
        let work = self.store().work_dir(self.run_id);
        // Mounts inside the run's work dir are staged (m0, m1, …, in order); the
        // others (the Python runtime) are expected at the same path on the nodes.
        let staged: Vec<(PathBuf, Option<PathBuf>, String, bool)> = sandbox
            .mounts
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let copy = m
                    .host
                    .starts_with(&work)
                    .then(|| staging.join(format!("m{k}")));
                (m.host.clone(), copy, m.guest.clone(), m.writable)
            })
            .collect();
        let result_path = staging.join("result.json");
        let step_log = staging.join("step.log");
        let job_out = staging.join("job.out");
        let job_name = format!(
            "millrace-{}-{}-{safe}-{attempt}",
            &self.engine.instance()[..8],
            self.run_id
        );
        let db_placement = |p: &SlurmPlacement| {
            let p = Placement::Slurm(p.clone());
            if let Err(e) =
                self.store()
                    .db()
                    .read()
                    .set_attempt_placement(self.run_id, name, attempt, &p)
            {
                tracing::error!(step = %name, error = %e, "cannot record the Slurm job");
            }
        };
        // A job this attempt already submitted (the process that submitted it
        // died): adopt it while Slurm knows it or its result is there.
        let earlier = self
            .store()
            .db()
            .read()
            .attempt_placement(self.run_id, name, attempt)
            .ok()
            .flatten()
            .and_then(|p| match p {
                Placement::Slurm(p) if p.staging == staging.display().to_string() => Some(p),
                _ => None,
            });
        let mut adopted = None;
        let adopting = self
            .adopting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(i, attempt));
        if adopting && let Some(p) = &earlier {
            // The id, or (a crash between sbatch and recording its answer) the
            // job found by its unique name.
            let id = match &p.job_id {
                Some(id) => Some(id.clone()),
                None => slurm::job_by_name(&p.job_name).await.map_err(fail)?,
            };
            if let Some(id) = id {
                let known = slurm::job_info(&id).await.map_err(fail)?.is_some();
                if known || result_path.exists() {
                    log.reset();
                    log.note(&format!("re-adopted Slurm job {id} after a restart"));
                    let mut p = p.clone();
                    p.job_id = Some(id.clone());
                    db_placement(&p);
                    adopted = Some((id, p));
                }
            }
        }
        // From here on, whatever ends this attempt early (cancel, an error) also
        // cancels its job and removes its staged files; a daemon shutdown leaves
        // both for the next start to adopt.
        let mut guard = slurm::CancelOnDrop {
            job: adopted.as_ref().map(|(id, _)| id.clone()),
            staging: staging.clone(),
            keep: Box::new({
                let engine = self.engine.clone();
                move || engine.is_draining()
            }),
        };
        let (job, mut placement) = match adopted {
            Some(a) => a,
            None => {
                let spec = tokio::task::block_in_place(|| -> Result<JobSpec, String> {
                    let _ = remove_tree(&staging);
                    std::fs::create_dir_all(&staging)
                        .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
                    // Only this daemon's user may read or plant files there.
                    if let Some(dir) = staging.parent() {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                            .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
                    }
                    let mut mounts = Vec::new();
                    for (host, copy, guest, writable) in &staged {
                        if let Some(c) = copy {
                            slurm::copy_tree(host, c).map_err(|e| {
                                format!("cannot stage {guest} into {}: {e}", c.display())
                            })?;
                        }
                        mounts.push(JobMount {
                            host: copy.clone().unwrap_or_else(|| host.clone()),
                            guest: guest.clone(),
                            writable: *writable,
                        });
                    }
                    let program = if stage_program {
                        let p = staging.join("program.wasm");
                        std::fs::copy(&program, &p)
                            .map_err(|e| format!("cannot stage the program: {e}"))?;
                        p
                    } else {
                        program.clone()
                    };
                    Ok(JobSpec {
                        program,
                        digest: digest.clone(),
                        args: sandbox.args.clone(),
                        env: sandbox.env.clone(),
                        mounts,
                        memory: sandbox.memory,
                        timeout_ms: sandbox.timeout.unwrap_or(DEFAULT_TIMEOUT).as_millis() as u64,
                        log: step_log.clone(),
                        log_cap: log_cap(),
                        result: result_path.clone(),
                        output_cap: output_cap(),
                    })
                })
                .map_err(fail)?;
                let exe = std::env::current_exe()
                    .map_err(|e| fail(format!("cannot find the millrace binary: {e}")))?;
                let spec_path = staging.join("spec.json");
                let script = staging.join("job.sh");
                let quote =
                    |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
                std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).expect("plain data"))
                    .and_then(|()| {
                        std::fs::write(
                            &script,
                            format!(
                                "#!/bin/sh\n# millrace: run {} step {name} attempt {attempt}\nexec {} exec-step {}\n",
                                self.run_id,
                                quote(&exe),
                                quote(&spec_path)
                            ),
                        )
                    })
                    .map_err(|e| fail(format!("cannot write the job files: {e}")))?;
                let mut placement = SlurmPlacement {
                    compute: compute.clone(),
                    staging: staging.display().to_string(),
                    job_name: job_name.clone(),
                    job_id: None,
                    node: None,
                };
                // Recorded before sbatch: a crash in between leaves a named job to
                // find, not an unknown one.
                db_placement(&placement);
                let args = slurm::sbatch_args(
                    &target,
                    &job_name,
                    &job_out,
                    step.timeout,
                    step.memory,
                    step.cpus,
                );
                let id = slurm::submit(&args, &script).await.map_err(fail)?;
                placement.job_id = Some(id.clone());
                db_placement(&placement);
                log.note(&format!("submitted Slurm job {id} to `{compute}`"));
                (id, placement)
            }
        };
        guard.job = Some(job.clone());
        let limit = sandbox.timeout.unwrap_or(DEFAULT_TIMEOUT);
        // The executor on the node stops the guest at its timeout; Slurm's --time
        // has a minute more; past both (and two minutes of grace) after the job
        // started running, it is cancelled from here. Time in the queue does not
        // count: a busy cluster is not a step's fault.
        let mut deadline: Option<Instant> = None;
        let mut offset = 0u64;
        let tail = |offset: &mut u64| {
            use std::io::{Read, Seek};
            if let Ok(mut f) = std::fs::File::open(&step_log)
                && f.seek(std::io::SeekFrom::Start(*offset)).is_ok()
            {
                let mut buf = Vec::new();
                if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                    *offset += buf.len() as u64;
                    log.append(&buf);
                }
            }
        };
        // The result file (written by exec-step as its last act) is looked for
        // every 50 ms; Slurm is asked every 50 ms at first, then less often.
        let mut pause = Duration::from_millis(50);
        let mut next_query = Instant::now();
        let mut errors = 0;
        let mut last: Option<JobInfo> = None;
        let grace = limit + Duration::from_secs(120);
        let note_node = |info: &JobInfo, placement: &mut SlurmPlacement| {
            if placement.node.is_none()
                && let Some(n) = info.nodes()
            {
                placement.node = Some(n.to_string());
                db_placement(placement);
                log.note(&format!("Slurm job {job} runs on {n}"));
            }
        };
        loop {
            tail(&mut offset);
            if result_path.exists() {
                if let Ok(Some(info)) = slurm::job_info(&job).await {
                    note_node(&info, &mut placement);
                    last = Some(info);
                }
                break;
            }
            if Instant::now() >= next_query {
                match slurm::job_info(&job).await {
                    Ok(Some(info)) => {
                        errors = 0;
                        note_node(&info, &mut placement);
                        if deadline.is_none() && info.state() != "PENDING" {
                            deadline = Some(Instant::now() + grace);
                        }
                        let finished = info.is_finished();
                        last = Some(info);
                        if finished {
                            break;
                        }
                    }
                    Ok(None) => {
                        last = None;
                        break;
                    }
                    Err(e) => {
                        errors += 1;
                        if errors >= 20 {
                            return Err(fail(format!("lost track of Slurm job {job}: {e}")));
                        }
                    }
                }
                next_query = Instant::now() + pause;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                slurm::cancel(&job).await;
                guard.job = None;
                let _ = remove_tree(&staging);
                return Ok(Some((
                    None,
                    format!(
                        "timed out after {}; Slurm job {job} was cancelled",
                        humantime::format_duration(limit)
                    ),
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        guard.job = None;
        tail(&mut offset);
        let result: Option<JobResult> = std::fs::read_to_string(&result_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let job_text = std::fs::read_to_string(&job_out).unwrap_or_default();
        if !job_text.trim().is_empty() {
            log.note(&format!("Slurm job {job} output:"));
            log.append(job_text.as_bytes());
        }
        let memory = sandbox.memory;
        let failure = match (result, &last) {
            (Some(JobResult::Exited { code: 0 }), _) => None,
            (Some(JobResult::Exited { code }), _) => Some((
                Some(code),
                format!("exited with code {code} (Slurm job {job})"),
            )),
            (Some(JobResult::Trapped { message }), _) => {
                Some((None, format!("trapped: {message} (Slurm job {job})")))
            }
            (Some(JobResult::Limit { code, message }), _) => {
                Some((code, format!("{message} (Slurm job {job})")))
            }
            (Some(JobResult::OutOfMemory), _) => Some((
                None,
                format!(
                    "memory limit of {} exceeded",
                    definition::format_size(memory)
                ),
            )),
            (Some(JobResult::TimedOut { ms }), _) => Some((
                None,
                format!(
                    "timed out after {}",
                    humantime::format_duration(Duration::from_millis(ms))
                ),
            )),
            (Some(JobResult::DiskFull { used }), _) => Some((None, disk_cap_message(used))),
            (Some(JobResult::Error { message }), _) => {
                Some((None, format!("on the node (Slurm job {job}): {message}")))
            }
            (None, Some(info)) => Some((
                info.exit_code(),
                slurm::failure_message(&job, info, &job_text),
            )),
            (None, None) => Some((
                None,
                format!("Slurm job {job} ended without a result (it is no longer known to Slurm)"),
            )),
        };
        let copied = tokio::task::block_in_place(|| -> Result<(), String> {
            if failure.is_none() {
                for (host, copy, guest, _) in &staged {
                    if let Some(c) = copy
                        && (guest == "/out" || guest == "/millrace")
                    {
                        remove_tree(host).map_err(|e| format!("{}: {e}", host.display()))?;
                        slurm::copy_tree(c, host)
                            .map_err(|e| format!("cannot copy {guest} back: {e}"))?;
                    }
                }
            } else if let Some((host, Some(c), _, _)) =
                staged.iter().find(|(_, _, g, _)| g == "/millrace")
            {
                // Metrics of a failed step are still recorded.
                let _ = remove_tree(host).and_then(|()| slurm::copy_tree(c, host));
            }
            let _ = remove_tree(&staging);
            Ok(())
        });
        copied.map_err(fail)?;
        Ok(failure)
    }

    /// Runs a container step's attempt on its engine: the sandbox directories
    /// bind-mounted where the step contract puts them.
    #[allow(clippy::too_many_arguments)]
    async fn run_container(
        &self,
        i: usize,
        attempt: u32,
        image: &ResolvedImage,
        args: Vec<String>,
        mut env: Vec<(String, String)>,
        mounts: Vec<Mount>,
        log: LogFile,
        disk_full: impl std::future::Future<Output = u64> + Send,
        stopped_by: Arc<Mutex<Option<String>>>,
    ) -> AttemptResult {
        let step = &self.pipeline.steps[i];
        let StepKind::Container(c) = &step.kind else {
            return Err((None, "not a container step".into()));
        };
        let name = step.name.get_ref();
        let docker = self
            .engine
            .containers
            .connect(&image.socket)
            .await
            .map_err(|e| (None, e))?;
        if !env.iter().any(|(k, _)| k == "HOME") {
            env.push(("HOME".into(), "/tmp".into()));
        }
        let memory = step.memory.unwrap_or(DEFAULT_MEMORY);
        let timeout = step.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let safe = safe_name(name);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let container_name = format!("millrace-{}-{safe}-{attempt}-{nanos:08x}", self.run_id);
        let labels = HashMap::from([
            (
                container::LABEL_INSTANCE.to_string(),
                self.engine.instance(),
            ),
            (container::LABEL_RUN.to_string(), self.run_id.to_string()),
            (container::LABEL_STEP.to_string(), name.clone()),
            (container::LABEL_ATTEMPT.to_string(), attempt.to_string()),
        ]);
        let placement = Placement::Container(ContainerPlacement {
            engine: image.socket.clone(),
            container: container_name.clone(),
            image: image.name.clone(),
            image_id: image.id.clone(),
        });
        if let Err(e) =
            self.store()
                .db()
                .read()
                .set_attempt_placement(self.run_id, name, attempt, &placement)
        {
            tracing::error!(step = %name, error = %e, "cannot record where the step runs");
        }
        let spec = container::Spec {
            name: container_name,
            image: image.clone(),
            cmd: planner::container_command(step, &self.params, &args),
            entrypoint: c
                .entrypoint
                .as_ref()
                .map(|e| e.iter().map(|x| x.get_ref().clone()).collect()),
            env,
            workdir: c.workdir.as_ref().map(|w| w.get_ref().clone()),
            user: c
                .user
                .as_ref()
                .map(|u| u.get_ref().clone())
                .unwrap_or_else(|| self.engine.containers.default_user(&image.socket)),
            network: c.network,
            read_only_root: c.read_only_root,
            memory,
            cpus: step.cpus,
            binds: mounts
                .into_iter()
                .map(|m| container::Bind {
                    host: m.host,
                    guest: m.guest,
                    writable: m.writable,
                })
                .collect(),
            tmp_size: Some(output_cap()),
            labels,
            timeout,
            log,
        };
        let limit = definition::format_size(memory);
        Ok(
            match container::run(&docker, spec, disk_full)
                .await
                .map_err(|e| (None, e))?
            {
                container::Outcome::Stopped(used) => Some((
                    None,
                    stopped_by
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take()
                        .unwrap_or_else(|| disk_cap_message(used)),
                )),
                container::Outcome::Exited(0) => None,
                container::Outcome::Exited(code) => {
                    Some((i32::try_from(code).ok(), format!("exited with code {code}")))
                }
                container::Outcome::OutOfMemory(true) => Some((
                    Some(137),
                    format!(
                        "killed by the OOM killer: memory limit of {limit} exceeded (exit 137)"
                    ),
                )),
                container::Outcome::OutOfMemory(false) => Some((
                    Some(137),
                    format!(
                        "killed (exit 137, SIGKILL): most likely the memory limit of {limit} was exceeded"
                    ),
                )),
                container::Outcome::TimedOut(d) => Some((
                    None,
                    format!(
                        "timed out after {}; the container was killed and removed",
                        humantime::format_duration(d)
                    ),
                )),
            },
        )
    }

    /// Reads the metrics file protocol: one JSON object per line,
    /// `{"name": …, "value": …, "step": optional int}`.
    fn record_metrics(&self, step: &str, path: &Path, log: &LogFile) {
        // A guest controls this file: read a bounded prefix only.
        const MAX_METRICS_BYTES: u64 = 64 << 20;
        // Neither a symlink out of the sandbox nor a FIFO that would block.
        let opened = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(path)
                .and_then(|f| {
                    if f.metadata()?.is_file() {
                        Ok(f)
                    } else {
                        Err(std::io::Error::other("not a regular file"))
                    }
                })
        };
        if let Err(e) = &opened
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log.note(&format!("the metrics file was not read: {e}"));
        }
        let text = opened.and_then(|f| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_METRICS_BYTES), &mut s)
                .map(|_| s)
        });
        let Ok(text) = text else {
            return;
        };
        let mut rows = Vec::new();
        for (n, line) in text.lines().enumerate().take(MAX_METRIC_LINES) {
            if line.trim().is_empty() {
                continue;
            }
            let parsed: Option<(String, f64, Option<i64>)> =
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| {
                        Some((
                            v.get("name")?.as_str()?.to_string(),
                            v.get("value")?.as_f64()?,
                            v.get("step").and_then(|s| s.as_i64()),
                        ))
                    });
            match parsed {
                Some(row) => rows.push(row),
                None => log.note(&format!(
                    "metrics line {} ignored: expected {{\"name\": …, \"value\": number}}",
                    n + 1
                )),
            }
        }
        let result = self.store().db().batch(|b| {
            b.clear_metrics(self.run_id, step)?;
            for (seq, (name, value, index)) in rows.iter().enumerate() {
                b.record_metric(self.run_id, step, name, *value, *index, seq as i64)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            log.note(&format!("cannot record metrics: {e}"));
        }
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
