//! The warm Python interpreter: a Wizer snapshot of the runtime with the
//! `[python] preload` modules (numpy, pandas, scikit-learn) already imported, so a
//! Python step starts in milliseconds instead of paying ~3 s of imports.
//!
//! # How it is built (`millrace runtime prepare`)
//!
//! `python-snapshot.wasm` is a pre-initialised reactor (see `python.rs`). Three of
//! its internal functions, found by name in its `name` section, do what the wheel's
//! own `wizer.initialize` does: `run_private` runs code in the interpreter without
//! marking it as used (so `run` still works once on the restored instance),
//! `__wasilibc_reset_preopens` forgets the build's mounts (wasi-libc fills its
//! preopen table lazily; the step's mounts are found afresh) and
//! `clear_unused_stack` zeroes the dead stack so the bytes do not depend on it.
//! We export them, let Wizer instrument the module, run the imports in a build
//! sandbox that sees only the standard library, with a fixed clock, fixed
//! randomness and fixed file identities (inode numbers, link counts and times, see
//! `fixed_file_view`: the output is byte-identical across builds, wherever the
//! runtime is unpacked), reset the preopens and
//! snapshot the memory and globals into a new module with exactly the base's
//! exports. The run's own randomness comes back at `run`: the wheel's
//! `_reactor._refresh` reseeds `random` and `numpy.random`.
//!
//! It fails closed: a missing function, a failing import, other exports than the
//! base's or a failing smoke run leaves a `.failed` note with the reason and only
//! the base runtime in use.
//!
//! # Where it lives
//!
//! `<cache>/python/` (the precompile cache, mode 0700, never mounted into a guest):
//! `<recipe>.wasm`, `<recipe>.json` (written last: its presence means "built and
//! smoke-tested"), `<recipe>.failed`, `<recipe>.lock`, and the instrumented
//! module's compiled form, which depends only on the base runtime (a new preload
//! list skips that compile). The compiled snapshot goes to the ordinary `.cwasm`
//! cache beside it under its content digest.
//!
//! # Keys
//!
//! A step's cache key names the variant it ran on through its runtime digest: the
//! base runtime's digest, or the *recipe* digest (runtime, preload list, prelude,
//! wasmtime-wizer and millrace versions). The snapshot's bytes are not part of it:
//! the recipe fixes them and is known before a build of minutes, so a rebuilt
//! snapshot reuses earlier results and a changed preload list does not.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, Linker, Module, OptLevel, Store, Val};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use super::python::{ARGV0, PRELUDE, RUNTIME_NAME, Runtime};

mod view;
mod wasmbin;
use view::*;
use wasmbin::*;

/// The modules preloaded unless `[python] preload` says otherwise.
pub const DEFAULT_PRELOAD: &[&str] = &[
    "numpy",
    "pandas",
    "pandas.io.parsers",
    "scipy",
    "sklearn",
    "sklearn.linear_model",
    "sklearn.ensemble",
];

/// The wasmtime-wizer version the snapshot is made with (in the recipe digest).
pub const WIZER_VERSION: &str = "48.0.8";

/// Below this memory limit a step runs on the base runtime: the snapshot's linear
/// memory starts at ~108.5 MiB (the imported packages), and a limit below its
/// initial size fails instantiation.
pub const MEMORY_FLOOR: u64 = 128 << 20;

/// Env names the preloaded libraries read when imported: a step that sets one
/// runs on the base runtime, where its import sees it (in the snapshot the import
/// happened at build time, with an empty environment).
const IMPORT_TIME_ENV: &[&str] = &[
    "SKLEARN_",
    "PANDAS_",
    "NPY_",
    "NUMPY_",
    "SCIPY_",
    "JOBLIB_",
    "OMP_",
    "OPENBLAS_",
    "MKL_",
    "MPL",
];

const RESET: &str = "millrace.reset_preopens";
const CLEAR: &str = "millrace.clear_unused_stack";
const RUN_PRIVATE: &str = "millrace.run_private";

/// The wall clock of the build (2026-01-01, as the wheel's own snapshot uses).
const BUILD_EPOCH: Duration = Duration::from_secs(1_767_225_600);

/// Whether `s` is a dotted Python module name (`sklearn.linear_model`).
pub fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut c = part.chars();
            matches!(c.next(), Some(f) if f == '_' || f.is_ascii_alphabetic())
                && c.all(|ch| ch == '_' || ch.is_ascii_alphanumeric())
        })
}

/// The code run in the interpreter before the snapshot: the imports, then a
/// collection and `gc.freeze()` (the frozen objects are never scanned again).
pub fn preload_code(preload: &[String]) -> String {
    let mut code = String::new();
    if !preload.is_empty() {
        code.push_str(&format!("import {}\n", preload.join(", ")));
    }
    code.push_str("import gc\ngc.collect()\ngc.freeze()\n");
    code
}

/// The recipe digest: what a step's cache key names when it runs on the snapshot.
pub fn recipe_digest(runtime_digest: &str, preload: &[String]) -> String {
    blake3::hash(
        format!(
            // 2: the build's fixed file view (`fixed_file_view`).
            "millrace-python-snapshot/2\n{RUNTIME_NAME}\n{runtime_digest}\n{}\n{PRELUDE}\nwasmtime-wizer {WIZER_VERSION}\nmillrace {}",
            preload_code(preload),
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    )
    .to_hex()
    .to_string()
}

/// `<cache>/python`.
pub fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("python")
}

/// A built, smoke-tested snapshot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The recipe digest (the steps' runtime digest).
    pub recipe: String,
    /// The blake3 of the snapshot's bytes (its `.cwasm` key).
    pub content: String,
    pub preload: Vec<String>,
    /// Initial linear memory, in bytes.
    pub memory: u64,
    pub bytes: u64,
    /// Seconds the build took (instrument, imports, snapshot; not the compiles).
    pub build_seconds: f64,
    #[serde(skip)]
    pub wasm: PathBuf,
}

/// The snapshot of `recipe`, if it is built; else why not.
pub fn find(cache_dir: &Path, recipe: &str) -> Result<Snapshot, String> {
    let d = dir(cache_dir);
    let wasm = d.join(format!("{recipe}.wasm"));
    let meta = d.join(format!("{recipe}.json"));
    match std::fs::read(&meta) {
        Ok(bytes) => {
            let mut s: Snapshot = serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "the snapshot's record {} is unreadable ({e}): run `millrace runtime prepare`",
                    meta.display()
                )
            })?;
            if !wasm.is_file() {
                return Err(format!(
                    "the snapshot {} is missing: run `millrace runtime prepare`",
                    wasm.display()
                ));
            }
            s.wasm = wasm;
            Ok(s)
        }
        Err(_) => match std::fs::read_to_string(d.join(format!("{recipe}.failed"))) {
            Ok(why) => Err(format!("the snapshot could not be built: {}", why.trim())),
            Err(_) => Err("no snapshot is built for this runtime and preload list: run `millrace runtime prepare`".into()),
        },
    }
}

/// Why a step with this memory limit and env must run on the base runtime, if it
/// must: pure in the step's config, decided before its cache key.
pub fn unsuitable(memory: u64, env_names: &mut dyn Iterator<Item = &str>) -> Option<BaseReason> {
    if memory < MEMORY_FLOOR {
        return Some(BaseReason::MemoryBelowFloor {
            memory,
            floor: MEMORY_FLOOR,
        });
    }
    for name in env_names {
        if IMPORT_TIME_ENV.iter().any(|p| name.starts_with(p)) {
            return Some(BaseReason::ImportTimeEnv {
                name: name.to_string(),
            });
        }
    }
    None
}

/// Why a Python step runs on the base runtime rather than the warm interpreter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseReason {
    /// `[python] snapshot = false` in the daemon config.
    ConfigOff,
    /// `python = { …, snapshot = false }` on the step.
    StepOff,
    /// The step's memory limit is below the snapshot's initial memory.
    MemoryBelowFloor { memory: u64, floor: u64 },
    /// The step's env sets a variable a preloaded library reads when imported.
    ImportTimeEnv { name: String },
    /// No usable snapshot: none built, its build failed, or its files are gone.
    Unavailable(String),
}

impl BaseReason {
    /// The reason's name in records and the API (`VariantRecord::reason`).
    pub fn code(&self) -> BaseCode {
        match self {
            BaseReason::ConfigOff => BaseCode::ConfigOff,
            BaseReason::StepOff => BaseCode::StepOff,
            BaseReason::MemoryBelowFloor { .. } => BaseCode::MemoryBelowFloor,
            BaseReason::ImportTimeEnv { .. } => BaseCode::ImportTimeEnv,
            BaseReason::Unavailable(_) => BaseCode::Unavailable,
        }
    }
}

impl std::fmt::Display for BaseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BaseReason::ConfigOff => f.write_str("`[python] snapshot = false`"),
            BaseReason::StepOff => f.write_str("the step says `snapshot = false`"),
            BaseReason::MemoryBelowFloor { memory, floor } => write!(
                f,
                "its memory limit of {} is below the snapshot's floor of {}",
                crate::definition::format_size(*memory),
                crate::definition::format_size(*floor)
            ),
            BaseReason::ImportTimeEnv { name } => write!(
                f,
                "its env sets {name}, which a preloaded library reads when it is imported"
            ),
            BaseReason::Unavailable(why) => f.write_str(why),
        }
    }
}

/// The runtime a Python step runs on.
#[derive(Debug, Clone)]
pub enum Variant {
    /// The snapshot with the preload list imported.
    Warm(Snapshot),
    /// `python-snapshot.wasm`, and why not the warm one.
    Base(BaseReason),
}

impl Variant {
    /// The line the step's log gets.
    pub fn note(&self) -> String {
        match self {
            Variant::Warm(s) => format!(
                "python: the warm interpreter ({} preloaded; snapshot {}, {:.1} MiB initial memory)",
                s.preload.join(", "),
                &s.recipe[..12.min(s.recipe.len())],
                s.memory as f64 / f64::from(1 << 20)
            ),
            Variant::Base(why) => {
                format!("python: the base runtime, not the warm interpreter: {why}")
            }
        }
    }

    /// What the step's record keeps of the choice (`steps.python`).
    pub fn record(&self) -> VariantRecord {
        match self {
            Variant::Warm(s) => VariantRecord {
                variant: VariantName::Warm,
                recipe: Some(s.recipe.clone()),
                reason: None,
                detail: format!("{} preloaded", s.preload.join(", ")),
            },
            Variant::Base(why) => VariantRecord {
                variant: VariantName::Base,
                recipe: None,
                reason: Some(why.code()),
                detail: why.to_string(),
            },
        }
    }
}

/// `warm` or `base`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum VariantName {
    /// The warm interpreter: the snapshot with the preload list imported.
    Warm,
    /// The base runtime: every import at the step's start.
    Base,
}

/// Why the base runtime, by name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum BaseCode {
    /// `[python] snapshot = false` in the daemon config.
    ConfigOff,
    /// `snapshot = false` on the step.
    StepOff,
    /// The step's memory limit is below the snapshot's floor (128 MiB).
    MemoryBelowFloor,
    /// The step's env sets a variable a preloaded library reads at import.
    ImportTimeEnv,
    /// No snapshot is built, its build failed, or its files are missing.
    Unavailable,
}

/// Which interpreter a Python step ran on, as its record keeps it (`steps.python`
/// as JSON) and `runs show`, `explain` and the API print it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct VariantRecord {
    pub variant: VariantName,
    /// The warm interpreter's recipe digest (the runtime part of the step's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// Why the base runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BaseCode>,
    /// In words: the preload list, or why the base runtime.
    pub detail: String,
}

impl std::fmt::Display for VariantRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.variant {
            VariantName::Warm => write!(
                f,
                "the warm interpreter (snapshot {})",
                &self.recipe.as_deref().unwrap_or_default()
                    [..12.min(self.recipe.as_deref().map_or(0, str::len))]
            ),
            VariantName::Base => write!(f, "the base runtime: {}", self.detail),
        }
    }
}

/// What `runtime prepare` did about the snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prepared {
    pub recipe: String,
    pub path: PathBuf,
    /// Already built (nothing to do).
    pub cached: bool,
    pub preload: Vec<String>,
    pub bytes: u64,
    pub memory: u64,
    /// Seconds of the snapshot build (0 if cached).
    pub build_seconds: f64,
    /// Seconds of its compile with the daemon's engine.
    pub compile_seconds: f64,
}

/// Builds (once) the snapshot of `runtime` (whose digest is `runtime_digest`) with
/// `preload`, compiles it with the daemon's engine and smoke-tests it. An error
/// says why there is no snapshot; the base runtime stays in use, and the reason is
/// recorded for the steps' logs.
pub async fn prepare(
    wasm: &std::sync::Arc<super::wasm::WasmRuntime>,
    runtime: &Runtime,
    runtime_digest: &str,
    preload: &[String],
    cache_dir: &Path,
) -> Result<Prepared, String> {
    let recipe = recipe_digest(runtime_digest, preload);
    let lock = {
        let (d, r) = (cache_dir.to_path_buf(), recipe.clone());
        tokio::task::spawn_blocking(move || lock(&d, &r))
            .await
            .map_err(|e| e.to_string())??
    };
    let result = prepare_locked(wasm, runtime, &recipe, preload, cache_dir).await;
    if let Err(why) = &result {
        fail(cache_dir, &recipe, why);
    }
    drop(lock);
    result
}

async fn prepare_locked(
    wasm: &std::sync::Arc<super::wasm::WasmRuntime>,
    runtime: &Runtime,
    recipe: &str,
    preload: &[String],
    cache_dir: &Path,
) -> Result<Prepared, String> {
    if let Ok(s) = find(cache_dir, recipe) {
        let started = Instant::now();
        // Built earlier; its compiled form may be gone (a new engine): compile again.
        tokio::task::block_in_place(|| wasm.precompile(&s.wasm, &s.content))
            .map_err(|e| e.to_string())?;
        return Ok(Prepared {
            recipe: recipe.to_string(),
            path: s.wasm.clone(),
            cached: true,
            preload: s.preload.clone(),
            bytes: s.bytes,
            memory: s.memory,
            build_seconds: 0.0,
            compile_seconds: started.elapsed().as_secs_f64(),
        });
    }
    let _ = std::fs::remove_file(dir(cache_dir).join(format!("{recipe}.failed")));
    // Its own thread: wasmtime-wasi's sync calls start their own tokio runtime, and
    // the interpreter's deep C stacks want a large native stack.
    let built = {
        let (rt, pre, r, d) = (
            runtime.clone(),
            preload.to_vec(),
            recipe.to_string(),
            cache_dir.to_path_buf(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("millrace-snapshot".into())
            .stack_size(64 << 20)
            .spawn(move || {
                let _ = tx.send(build(&rt, &pre, &r, &d));
            })
            .map_err(|e| format!("cannot start the build thread: {e}"))?;
        rx.await
            .map_err(|_| "the snapshot build stopped".to_string())??
    };
    let s = built.snapshot;
    let started = Instant::now();
    tokio::task::block_in_place(|| wasm.precompile(&s.wasm, &s.content))
        .map_err(|e| format!("cannot compile the snapshot: {e}"))?;
    let compile_seconds = started.elapsed().as_secs_f64();
    smoke(wasm, runtime, &s, cache_dir).await?;
    commit(cache_dir, &s)?;
    Ok(Prepared {
        recipe: recipe.to_string(),
        path: s.wasm.clone(),
        cached: false,
        preload: s.preload.clone(),
        bytes: s.bytes,
        memory: s.memory,
        build_seconds: s.build_seconds,
        compile_seconds,
    })
}

/// Two runs of a script on the snapshot, as a step runs: the preloaded modules are
/// there before the script starts, the preopens are the run's, and each run draws
/// its own random numbers.
async fn smoke(
    wasm: &std::sync::Arc<super::wasm::WasmRuntime>,
    runtime: &Runtime,
    s: &Snapshot,
    cache_dir: &Path,
) -> Result<(), String> {
    let work = dir(cache_dir).join(format!("smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let code = work.join("code");
    std::fs::create_dir_all(&code).map_err(|e| format!("{}: {e}", code.display()))?;
    let first = s.preload.first().cloned().unwrap_or_else(|| "sys".into());
    let script = format!(
        "import sys, random\nprint('preloaded', {first:?} in sys.modules)\nprint('draw', random.random())\n"
    );
    std::fs::write(code.join("smoke.py"), script).map_err(|e| e.to_string())?;
    let mut draws = Vec::new();
    for n in 0..2 {
        let log_path = work.join(format!("log{n}"));
        let log = super::LogFile::create(&log_path, 1 << 20).map_err(|e| e.to_string())?;
        let mut mounts = runtime.mounts();
        mounts.push(super::Mount {
            host: code.clone(),
            guest: "/code".into(),
            writable: false,
        });
        let sandbox = super::wasm::Sandbox {
            args: super::python::argv(Path::new("smoke.py"), Vec::new()),
            env: Vec::new(),
            mounts,
            log,
            memory: 1 << 30,
            timeout: Some(Duration::from_secs(120)),
            // The smoke script writes nothing; a small budget all the same.
            disk: 64 << 20,
        };
        let outcome = wasm
            .run(&s.wasm, &s.content, sandbox)
            .await
            .map_err(|e| format!("the smoke run: {e}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !matches!(outcome, super::wasm::Outcome::Exited(0)) || !text.contains("preloaded True") {
            let _ = std::fs::remove_dir_all(&work);
            return Err(format!(
                "the smoke run ended {outcome:?}: {}",
                text.trim().chars().take(600).collect::<String>()
            ));
        }
        draws.push(
            text.lines()
                .find(|l| l.starts_with("draw"))
                .unwrap_or_default()
                .to_string(),
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    if draws[0] == draws[1] {
        return Err(format!(
            "two runs drew the same random number ({}): the snapshot's randomness is not reseeded",
            draws[0]
        ));
    }
    Ok(())
}

/// What `build` made.
pub struct Built {
    pub snapshot: Snapshot,
    /// The instrumented module was compiled now (not loaded from the cache).
    pub compiled_instrumented: bool,
}

/// Builds the snapshot of `runtime` with `preload` into `<cache>/python/<recipe>.wasm`
/// (not its record: the caller writes that after the smoke run). Blocking, minutes
/// the first time: run it on its own thread, outside any tokio runtime.
pub fn build(
    runtime: &Runtime,
    preload: &[String],
    recipe: &str,
    cache_dir: &Path,
) -> Result<Built, String> {
    let started = Instant::now();
    let d = dir(cache_dir);
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    set_private(&d);
    let base =
        std::fs::read(runtime.wasm()).map_err(|e| format!("{}: {e}", runtime.wasm().display()))?;
    let names = [
        "__wasilibc_reset_preopens",
        "clear_unused_stack",
        "run_private",
    ];
    let idx = func_indices(&base, &names)?;
    let base_exports = exports(&base)?;
    let with = rewrite_exports(&base, |e| {
        for (name, i) in [RESET, CLEAR, RUN_PRIVATE].iter().zip(&idx) {
            e.push(((*name).to_string(), 0, *i));
        }
    })?;
    let mut wizer = wasmtime_wizer::Wizer::new();
    // The rewrite drops the init function's export; the other two are stripped below.
    wizer.init_func(RESET);
    let (cx, instrumented) = wizer
        .instrument(&with)
        .map_err(|e| format!("wizer cannot instrument the runtime: {e:#}"))?;
    let engine = build_engine()?;
    let (module, compiled_instrumented) = instrumented_module(&engine, &instrumented, &d)?;
    drop(instrumented);

    let (mut store, instance, err) = build_instance(&engine, &module, runtime)?;
    let guest_err = |e: wasmtime::Error, what: &str| {
        let stderr = String::from_utf8_lossy(&err.contents()).into_owned();
        format!(
            "{what}: {}{}",
            format!("{e:#}").chars().take(600).collect::<String>(),
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!("\n{}", stderr.trim_end())
            }
        )
    };

    let mut code = preload_code(preload).into_bytes();
    code.push(0);
    let len = i32::try_from(code.len()).map_err(|_| "the preload list is too long".to_string())?;
    let ptr = instance
        .get_typed_func::<i32, i32>(&mut store, "host_alloc")
        .and_then(|f| f.call(&mut store, len))
        .map_err(|e| guest_err(e, "host_alloc"))?;
    let memory = instance
        .get_memory(&mut store, "memory")
        .ok_or("the runtime exports no `memory`")?;
    memory
        .write(
            &mut store,
            usize::try_from(ptr).unwrap_or(usize::MAX),
            &code,
        )
        .map_err(|e| format!("cannot write the preload code: {e}"))?;
    // `run_private` aborts (a trap) on an exception: the traceback is on stderr.
    instance
        .get_typed_func::<i32, ()>(&mut store, RUN_PRIVATE)
        .and_then(|f| f.call(&mut store, ptr))
        .map_err(|e| guest_err(e, "the preload failed"))?;
    for helper in [RESET, CLEAR] {
        instance
            .get_typed_func::<(), ()>(&mut store, helper)
            .and_then(|f| f.call(&mut store, ()))
            .map_err(|e| guest_err(e, helper))?;
    }
    let mut state = Snap {
        store: &mut store,
        instance,
        missing: None,
    };
    let snapshot = poll_once(wizer.snapshot(&cx, &mut state))
        .ok_or("wizer's snapshot waited (it never should)")?
        .map_err(|e| format!("wizer cannot snapshot the instance: {e:#}"))?;
    if let Some(m) = state.missing {
        return Err(format!("wizer asked for `{m}`, which the instance lacks"));
    }
    drop(store);
    drop(module);
    let snapshot = rewrite_exports(&snapshot, |e| {
        e.retain(|(n, _, _)| n != CLEAR && n != RUN_PRIVATE)
    })?;
    let got = exports(&snapshot)?;
    let names_of = |v: &[(String, u8, u32)]| {
        let mut n: Vec<(String, u8)> = v.iter().map(|(n, k, _)| (n.clone(), *k)).collect();
        n.sort();
        n
    };
    if names_of(&got) != names_of(&base_exports) {
        return Err(format!(
            "the snapshot's exports {:?} differ from the runtime's {:?}",
            names_of(&got),
            names_of(&base_exports)
        ));
    }
    let initial = initial_memory(&snapshot)?;
    let content = blake3::hash(&snapshot).to_hex().to_string();
    let wasm = d.join(format!("{recipe}.wasm"));
    write_atomically(&wasm, &snapshot)?;
    Ok(Built {
        snapshot: Snapshot {
            recipe: recipe.to_string(),
            content,
            preload: preload.to_vec(),
            memory: initial,
            bytes: snapshot.len() as u64,
            build_seconds: started.elapsed().as_secs_f64(),
            wasm,
        },
        compiled_instrumented,
    })
}

/// Writes the record that makes the snapshot usable (after the smoke run).
pub fn commit(cache_dir: &Path, s: &Snapshot) -> Result<(), String> {
    let d = dir(cache_dir);
    let _ = std::fs::remove_file(d.join(format!("{}.failed", s.recipe)));
    let json = serde_json::to_vec_pretty(s).map_err(|e| e.to_string())?;
    write_atomically(&d.join(format!("{}.json", s.recipe)), &json)
}

/// Records why the snapshot of `recipe` cannot be used (steps say it in their log),
/// and removes what a failed build left.
pub fn fail(cache_dir: &Path, recipe: &str, why: &str) {
    let d = dir(cache_dir);
    let _ = std::fs::remove_file(d.join(format!("{recipe}.json")));
    let _ = std::fs::remove_file(d.join(format!("{recipe}.wasm")));
    let _ = std::fs::create_dir_all(&d);
    let _ = write_atomically(&d.join(format!("{recipe}.failed")), why.as_bytes());
}

/// Holds the build lock of `recipe` (one build at a time, across processes).
pub fn lock(cache_dir: &Path, recipe: &str) -> Result<std::fs::File, String> {
    let d = dir(cache_dir);
    std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    set_private(&d);
    let path = d.join(format!("{recipe}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.lock().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(f)
}

/// The instrumented runtime instantiated in the build's sandbox: only the
/// standard library mounted, fixed clocks, randomness and file identities.
/// Returns the store, the instance and the guest's stderr (for error messages).
fn build_instance(
    engine: &Engine,
    module: &Module,
    runtime: &Runtime,
) -> Result<(Store<BuildState>, wasmtime::Instance, MemoryOutputPipe), String> {
    let out = MemoryOutputPipe::new(1 << 20);
    let err = MemoryOutputPipe::new(1 << 20);
    let mut b = WasiCtxBuilder::new();
    b.args(&[ARGV0])
        .stdout(out.clone())
        .stderr(err.clone())
        .secure_random(wasmtime_wasi::Deterministic::new(vec![0]))
        .insecure_random(wasmtime_wasi::Deterministic::new(vec![0]))
        .insecure_random_seed(0)
        .wall_clock(FixedWall)
        .monotonic_clock(FixedMonotonic);
    // Only the standard library: nothing of the machine's enters the snapshot.
    b.preopened_dir(runtime.dir.join("lib"), "/usr/local/lib", FsPerms::ReadOnly)
        .map_err(|e| format!("the build sandbox: {e:#}"))?;
    let mut store = Store::new(
        engine,
        BuildState {
            wasi: b.build_p1(),
            inodes: std::collections::HashMap::new(),
        },
    );
    let mut linker: Linker<BuildState> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut BuildState| &mut s.wasi)
        .map_err(|e| format!("the build linker: {e:#}"))?;
    fixed_file_view(&mut linker).map_err(|e| format!("the build linker: {e:#}"))?;
    linker
        .func_wrap(
            "host",
            "call",
            |_: wasmtime::Caller<'_, BuildState>, _: i32, _: i32, _: i32, _: i32| -> i32 { -1 },
        )
        .map_err(|e| format!("the build linker: {e:#}"))?;
    let instance = linker
        .instantiate(&mut store, module)
        .map_err(|e| format!("cannot instantiate the instrumented runtime: {e:#}"))?;
    Ok((store, instance, err))
}

/// The engine that runs the instrumented module once. Unoptimised code: the
/// imports run a few seconds slower, the compile of a 100 MB module is minutes
/// shorter, and the snapshot's bytes (memory and globals) are the same.
fn build_engine() -> Result<Engine, String> {
    let mut c = Config::new();
    // Calls run synchronously on the build thread's 64 MiB stack; the async
    // stack size only has to admit the wasm stack limit.
    c.async_stack_size(super::wasm::MAX_WASM_STACK + (4 << 20));
    c.max_wasm_stack(super::wasm::MAX_WASM_STACK);
    c.cranelift_opt_level(OptLevel::None);
    Engine::new(&c).map_err(|e| format!("the build engine: {e:#}"))
}

/// The instrumented module, compiled once per base runtime and kept in the cache.
fn instrumented_module(
    engine: &Engine,
    bytes: &[u8],
    dir: &Path,
) -> Result<(Module, bool), String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let key = blake3::hash(
        format!(
            "instrumented\n{}\n{}-{:016x}",
            blake3::hash(bytes).to_hex(),
            super::wasm::WASMTIME_VERSION,
            h.finish()
        )
        .as_bytes(),
    )
    .to_hex()
    .to_string();
    let cached = dir.join(format!("instrumented-{key}.cwasm"));
    if cached.is_file() {
        // SAFETY: `cached` is in our private cache directory and only ever written
        // below, from this engine's own serialization.
        if let Ok(m) = unsafe { Module::deserialize_file(engine, &cached) } {
            return Ok((m, false));
        }
    }
    let m = Module::new(engine, bytes)
        .map_err(|e| format!("cannot compile the instrumented runtime: {e:#}"))?;
    if let Ok(bin) = m.serialize() {
        let _ = write_atomically(&cached, &bin);
    }
    Ok((m, true))
}

/// Reads the instance for Wizer.
struct Snap<'a> {
    store: &'a mut Store<BuildState>,
    instance: wasmtime::Instance,
    /// A global or memory Wizer asked for and the instance does not have.
    missing: Option<String>,
}

impl wasmtime_wizer::InstanceState for Snap<'_> {
    async fn global_get(
        &mut self,
        name: &str,
        _: wasmtime_wizer::ValType,
    ) -> wasmtime_wizer::SnapshotVal {
        use wasmtime_wizer::SnapshotVal as S;
        let v = self
            .instance
            .get_global(&mut *self.store, name)
            .map(|g| g.get(&mut *self.store));
        match v {
            Some(Val::I32(x)) => S::I32(x),
            Some(Val::I64(x)) => S::I64(x),
            Some(Val::F32(x)) => S::F32(x),
            Some(Val::F64(x)) => S::F64(x),
            Some(Val::V128(x)) => S::V128(x.as_u128()),
            // Wizer refuses reference-typed mutable globals before this; noted
            // all the same, and the build fails.
            _ => {
                self.missing = Some(name.to_string());
                S::I32(0)
            }
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.instance.get_memory(&mut *self.store, name) {
            Some(m) => contents(m.data(&*self.store)),
            None => {
                self.missing = Some(name.to_string());
                contents(&[])
            }
        }
    }
}

/// Polls a future that never waits (Wizer's snapshot reads our instance
/// synchronously); `None` if it did wait.
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

fn set_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, dest))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", dest.display())
        })
}

#[cfg(test)]
mod tests;
