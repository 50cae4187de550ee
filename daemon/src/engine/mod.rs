//! The run engine: runs are created, queued, started and resumed
//! (`lifecycle.rs`) and driven by the scheduler (`scheduler.rs`): steps start as
//! soon as their inputs exist, up to `max_parallel_steps` at once; each is reused
//! or executed (with retries, `step.rs`) as [`Planner::decide`] says. A failed
//! step skips its dependants while independent branches finish.
//!
//! Everything is recorded as it happens, so a killed process leaves a run that
//! `resume` can finish: completed steps keep their outputs, the rest run again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::definition::{self, Environment, ParamValue, Pipeline, StepKind};
use crate::diagnostic::Report;
use crate::executor::Executor;
use crate::executor::container::{self, ResolvedImage};
use crate::executor::wasm::WasmRuntime;
use crate::executor::workspace::WorkspacePool;
use crate::model::{RunStatus, StepStatus};
use crate::planner::code::{Memo, SNAPSHOTS, code_of, code_snapshot, file_digest, python_variant};
use crate::planner::{self, InputMode, PlanError, Planned, Planner};
use crate::store::{Store, StoreConfig, StoreError, walk};

mod attempt;
mod items;
mod lifecycle;
mod lock;
mod scheduler;
mod step;
#[cfg(test)]
mod tests;

pub use lock::RunLock;

pub use crate::executor::{DEFAULT_MEMORY, DEFAULT_TIMEOUT};
/// Largest log kept per step attempt, unless `MILLRACE_LOG_CAP` (a size such as
/// `"64MiB"`) says otherwise.
pub const LOG_CAP: u64 = 16 << 20;
/// Most bytes a step's outputs may hold together, unless `MILLRACE_OUTPUT_CAP`
/// says otherwise: a runaway step fails instead of filling the store.
pub const OUTPUT_CAP: u64 = 10 << 30;

/// Everything an [`Engine`] is built from: the daemon config's parts it uses
/// (none for `millrace run` without `--config`) and its limits, whose
/// environment overrides are read here and nowhere else. The engine is complete
/// once built from it.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Steps executing at once, across all runs (`max_parallel_steps`).
    pub max_parallel: usize,
    pub datastores: Datastores,
    /// Compute targets steps may name (`local` is implicit).
    pub computes: BTreeMap<String, crate::config::Compute>,
    /// `[python]`: the warm interpreter's preload list, and whether steps use it.
    pub python: crate::config::Python,
    /// Largest log kept per step attempt (`MILLRACE_LOG_CAP`, default [`LOG_CAP`]).
    pub log_cap: u64,
    /// Most bytes a step's outputs (and its /tmp) may hold together
    /// (`MILLRACE_OUTPUT_CAP`, default [`OUTPUT_CAP`]).
    pub output_cap: u64,
    /// The store's walk limits (`MILLRACE_MAX_DEPTH`, `MILLRACE_MAX_ENTRIES`) and
    /// compiled-code cache (`MILLRACE_CACHE`): the store the engine runs on is
    /// opened with it ([`Store::open_with`]).
    pub store: StoreConfig,
    /// `[secrets.NAME]` of the daemon config; `None` without a config, so that a
    /// pipeline naming a secret is refused, saying a config is needed.
    pub secrets: Option<BTreeMap<String, crate::config::Secret>>,
}

impl EngineConfig {
    /// No datastores or compute targets, the default `[python]`, `max_parallel`
    /// steps at once (at least one), and the limits' environment overrides.
    pub fn new(max_parallel: usize) -> EngineConfig {
        EngineConfig {
            max_parallel: max_parallel.max(1),
            datastores: Datastores::default(),
            computes: BTreeMap::new(),
            python: crate::config::Python::default(),
            log_cap: size_from_env("MILLRACE_LOG_CAP").unwrap_or(LOG_CAP),
            output_cap: size_from_env("MILLRACE_OUTPUT_CAP").unwrap_or(OUTPUT_CAP),
            store: EngineConfig::store_from_env(),
            secrets: None,
        }
    }

    /// The store's part alone, with its environment overrides: also for the
    /// commands that open a store without an engine. An unset, empty or
    /// unreadable variable (or a zero limit) leaves the default.
    pub fn store_from_env() -> StoreConfig {
        let count = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&n| n > 0)
        };
        StoreConfig {
            limits: walk::Limits {
                depth: count("MILLRACE_MAX_DEPTH")
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(walk::DEFAULT_MAX_DEPTH),
                entries: count("MILLRACE_MAX_ENTRIES").unwrap_or(walk::DEFAULT_MAX_ENTRIES),
            },
            wasm_cache: std::env::var_os("MILLRACE_CACHE")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
        }
    }

    /// With a daemon config's datastores, compute targets and `[python]` (its
    /// `max_parallel_steps` is the caller's to pass to [`EngineConfig::new`]: the
    /// CLI uses the host's CPUs instead).
    pub fn with_config(mut self, config: &crate::config::Config) -> EngineConfig {
        self.datastores = Datastores {
            paths: config
                .datastores
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        self.computes = config.computes.clone();
        self.python = config.python.clone();
        self.secrets = Some(config.secrets.clone());
        crate::executor::secrets::hide_from_children(&config.secrets);
        self
    }
}

/// A size such as `"64MiB"` from the environment; unset or unreadable is `None`
/// (the default applies).
fn size_from_env(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|v| definition::parse_size(&v).ok())
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
    config: EngineConfig,
    wasm: tokio::sync::OnceCell<Arc<WasmRuntime>>,
    /// Container engine clients, by socket.
    containers: container::Engines,
    /// This state's instance id (see [`container::instance_of`]).
    instance: std::sync::OnceLock<String>,
    /// Step slots shared by every run of this engine (`max_parallel_steps`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Set when the daemon shuts down: runs start no new step, and a run stopped
    /// now ends `interrupted` (to be resumed), not `cancelled`.
    draining: std::sync::atomic::AtomicBool,
    /// What runs an attempt's spec in the scheduler's unit tests, in place of the
    /// executor (`engine/tests.rs`).
    #[cfg(test)]
    fake: Option<FakeExecutor>,
}

/// An attempt's spec to its outcome: the scheduler's unit tests' executor.
#[cfg(test)]
pub(crate) type FakeExecutor = Arc<
    dyn Fn(
            crate::executor::AttemptSpec,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::executor::Outcome> + Send>>
        + Send
        + Sync,
>;

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
    pub fn new(store: Arc<Store>, config: EngineConfig) -> Engine {
        let max_parallel = config.max_parallel.max(1);
        Engine {
            store,
            config: EngineConfig {
                max_parallel,
                ..config
            },
            wasm: tokio::sync::OnceCell::new(),
            containers: container::Engines::default(),
            instance: std::sync::OnceLock::new(),
            slots: Arc::new(tokio::sync::Semaphore::new(max_parallel)),
            draining: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fake: None,
        }
    }

    /// An engine whose attempts `fake` runs instead of the executors.
    #[cfg(test)]
    pub(crate) fn with_fake_executor(self, fake: FakeExecutor) -> Engine {
        Engine {
            fake: Some(fake),
            ..self
        }
    }

    /// Runs an attempt's spec on `executor` (in unit tests, on the fake if one
    /// was given).
    async fn execute_attempt(
        &self,
        executor: &Executor,
        spec: crate::executor::AttemptSpec,
        ctx: &crate::executor::AttemptCtx<'_>,
    ) -> Result<crate::executor::Outcome, crate::executor::ExecError> {
        #[cfg(test)]
        if let Some(fake) = &self.fake {
            return Ok(fake(spec).await);
        }
        executor.run(spec, ctx).await
    }

    /// What the engine was built from.
    pub fn config(&self) -> &EngineConfig {
        &self.config
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
        let mut env = self.config.datastores.environment();
        for (name, c) in &self.config.computes {
            env.computes.insert(name.clone(), c.kind.clone());
        }
        env.secrets = self
            .config
            .secrets
            .as_ref()
            .map(|s| s.keys().cloned().collect());
        env.modules = crate::module::ModuleIndex::load(&self.store)?;
        Ok(env)
    }

    /// The Slurm target a step runs on, if its `compute` names one.
    fn slurm_target(
        &self,
        step: &definition::Step,
    ) -> Option<(String, crate::executor::slurm::Target)> {
        Executor::slurm_target(step, &self.config.computes)
    }

    /// The container engine a step runs on: its compute target's socket (and
    /// whether it may pull), else the default engine.
    fn container_engine(&self, step: &definition::Step) -> (String, bool) {
        let target = step
            .compute
            .as_ref()
            .and_then(|c| self.config.computes.get(c.get_ref()));
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
            .config
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
        let memo = Memo::default();
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
        let memo = Memo::default();
        let digest = tokio::task::block_in_place(|| {
            crate::planner::code::runtime_digest(&memo, &self.store)
        })?;
        let wasm = self.wasm().await.map_err(|e| e.to_string())?;
        crate::executor::snapshot::prepare(
            &wasm,
            &runtime,
            &digest,
            &self.config.python.preload,
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
        self.config.max_parallel - self.slots.available_permits()
    }

    /// The wasm engine, built on first use (a no-op rerun never needs it).
    async fn wasm(&self) -> Result<Arc<WasmRuntime>, RunError> {
        let dir = self.store.wasm_cache_dir();
        let parallel = self.config.max_parallel;
        Ok(self
            .wasm
            .get_or_try_init(|| async move { WasmRuntime::new(&dir, parallel) })
            .await?
            .clone())
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
        let inputs = planner::pipeline_inputs(
            &self.store,
            &self.config.datastores,
            p,
            &params,
            InputMode::Hash,
        )?;
        let images = self.resolve_images(p).await;
        let planner = Planner::new(
            self.store.clone(),
            Arc::new(p.clone()),
            params.into(),
            Arc::new(images),
            self.config.datastores.clone(),
            no_reuse,
        )
        .with_python(self.config.python.clone());
        Ok(planner.plan(inputs)?)
    }
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

impl RunContext {
    fn store(&self) -> &Store {
        &self.engine.store
    }

    fn transfer_destination(&self, i: usize) -> PathBuf {
        self.planner
            .destination(i)
            .unwrap_or_else(|| unreachable!("only transfers have a destination"))
    }
}

/// Removes a directory that holds what a guest wrote (a sandbox, with read-only
/// hard links to blobs): at any depth, never recursing (see `walk::remove_tree`).
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    crate::store::walk::remove_tree(dir)
}
