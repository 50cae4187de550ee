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
pub fn unsuitable(memory: u64, env_names: &mut dyn Iterator<Item = &str>) -> Option<String> {
    if memory < MEMORY_FLOOR {
        return Some(format!(
            "its memory limit of {} is below the snapshot's floor of {}",
            crate::definition::format_size(memory),
            crate::definition::format_size(MEMORY_FLOOR)
        ));
    }
    for name in env_names {
        if IMPORT_TIME_ENV.iter().any(|p| name.starts_with(p)) {
            return Some(format!(
                "its env sets {name}, which a preloaded library reads when it is imported"
            ));
        }
    }
    None
}

/// The runtime a Python step runs on.
#[derive(Debug, Clone)]
pub enum Variant {
    /// The snapshot with the preload list imported.
    Warm(Snapshot),
    /// `python-snapshot.wasm`, and why not the warm one.
    Base(String),
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
        &engine,
        BuildState {
            wasi: b.build_p1(),
            inodes: std::collections::HashMap::new(),
        },
    );
    let mut linker: Linker<BuildState> = Linker::new(&engine);
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
        .instantiate(&mut store, &module)
        .map_err(|e| format!("cannot instantiate the instrumented runtime: {e:#}"))?;
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

struct BuildState {
    wasi: WasiP1Ctx,
    /// The build's inode numbers: the host's (a hash of device and inode), numbered
    /// in the order the guest first sees them.
    inodes: std::collections::HashMap<u64, u64>,
}

const P1: &str = "wasi_snapshot_preview1";

/// Shadows the three WASI calls that tell the guest a file's identity and times
/// (`fd_filestat_get`, `path_filestat_get`, `fd_readdir`) with ones that present a
/// fixed view: inode numbers counted from 1 in the order the build meets them,
/// one link, every timestamp the build's epoch. What the guest learns there ends
/// up in the snapshot (in `os.stat` results and the heap they leave behind), and
/// the host's values depend on where and how the runtime was unpacked: a copy of
/// the same files at another path gave 751 different bytes.
fn fixed_file_view(linker: &mut Linker<BuildState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p1::wasi_snapshot_preview1 as p1;
    use wasmtime_wasi::runtime::in_tokio;
    linker.allow_shadowing(true);
    linker.func_wrap(
        P1,
        "fd_filestat_get",
        |mut c: wasmtime::Caller<'_, BuildState>, fd: i32, buf: i32| {
            let errno = {
                let (mut mem, state) = p1_parts(&mut c)?;
                in_tokio(p1::fd_filestat_get(&mut state.wasi, &mut mem, fd, buf))?
            };
            if errno == 0 {
                fix_filestat(&mut c, buf)?;
            }
            Ok(errno)
        },
    )?;
    linker.func_wrap(
        P1,
        "path_filestat_get",
        |mut c: wasmtime::Caller<'_, BuildState>,
         fd: i32,
         flags: i32,
         path: i32,
         len: i32,
         buf: i32| {
            let errno = {
                let (mut mem, state) = p1_parts(&mut c)?;
                in_tokio(p1::path_filestat_get(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    flags,
                    path,
                    len,
                    buf,
                ))?
            };
            if errno == 0 {
                fix_filestat(&mut c, buf)?;
            }
            Ok(errno)
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_readdir",
        |mut c: wasmtime::Caller<'_, BuildState>,
         fd: i32,
         buf: i32,
         len: i32,
         cookie: i64,
         used: i32| {
            let errno = {
                let (mut mem, state) = p1_parts(&mut c)?;
                in_tokio(p1::fd_readdir(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    buf,
                    len,
                    cookie,
                    used,
                ))?
            };
            if errno == 0 {
                fix_dirents(&mut c, buf, used)?;
            }
            Ok(errno)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// What wasmtime-wasi's wasip1 functions take: the guest's memory and the context.
fn p1_parts<'a>(
    c: &'a mut wasmtime::Caller<'_, BuildState>,
) -> wasmtime::Result<(wiggle::GuestMemory<'a>, &'a mut BuildState)> {
    use wasmtime::AsContextMut;
    use wasmtime_wasi::p1::wasi_snapshot_preview1::WasiSnapshotPreview1 as _;
    let fuel = c.as_context_mut().hostcall_fuel();
    let memory = c
        .get_export("memory")
        .and_then(wasmtime::Extern::into_memory)
        .ok_or_else(|| wasmtime::format_err!("the runtime exports no `memory`"))?;
    let (bytes, state) = memory.data_and_store_mut(c);
    state.wasi.set_hostcall_fuel(fuel);
    Ok((wiggle::GuestMemory::Unshared(bytes), state))
}

/// The guest's memory and the build's inode numbering.
fn guest<'a>(
    c: &'a mut wasmtime::Caller<'_, BuildState>,
) -> wasmtime::Result<(&'a mut [u8], &'a mut std::collections::HashMap<u64, u64>)> {
    let memory = c
        .get_export("memory")
        .and_then(wasmtime::Extern::into_memory)
        .ok_or_else(|| wasmtime::format_err!("the runtime exports no `memory`"))?;
    let (data, state) = memory.data_and_store_mut(c);
    Ok((data, &mut state.inodes))
}

/// The build's number for the host's inode `ino` (0, a pipe's, stays 0).
fn build_inode(inodes: &mut std::collections::HashMap<u64, u64>, ino: u64) -> u64 {
    if ino == 0 {
        return 0;
    }
    let next = inodes.len() as u64 + 1;
    *inodes.entry(ino).or_insert(next)
}

fn field(data: &mut [u8], at: usize) -> wasmtime::Result<&mut [u8; 8]> {
    at.checked_add(8)
        .and_then(|end| data.get_mut(at..end))
        .and_then(|b| <&mut [u8; 8]>::try_from(b).ok())
        .ok_or_else(|| wasmtime::format_err!("a WASI result outside the guest's memory"))
}

/// A preview-1 `filestat` at `buf`: dev u64, ino u64, filetype u8, nlink u64 at
/// 24, size at 32, atim, mtim, ctim at 40, 48, 56.
fn fix_filestat(c: &mut wasmtime::Caller<'_, BuildState>, buf: i32) -> wasmtime::Result<()> {
    let (data, inodes) = guest(c)?;
    fixed_filestat(data, inodes, buf)
}

fn fixed_filestat(
    data: &mut [u8],
    inodes: &mut std::collections::HashMap<u64, u64>,
    buf: i32,
) -> wasmtime::Result<()> {
    let at = buf as u32 as usize;
    // All of it or nothing (the inode numbering is not advanced for a fault).
    field(data, at + 56)?;
    let ino = field(data, at + 8)?;
    *ino = build_inode(inodes, u64::from_le_bytes(*ino)).to_le_bytes();
    *field(data, at + 24)? = 1u64.to_le_bytes();
    let epoch = (BUILD_EPOCH.as_nanos() as u64).to_le_bytes();
    for time in [40, 48, 56] {
        *field(data, at + time)? = epoch;
    }
    Ok(())
}

/// The `dirent`s `fd_readdir` wrote at `buf` (`*used` bytes; the last may be cut
/// short): d_next u64, d_ino u64, d_namlen u32, d_type u8, then the name.
fn fix_dirents(
    c: &mut wasmtime::Caller<'_, BuildState>,
    buf: i32,
    used: i32,
) -> wasmtime::Result<()> {
    let (data, inodes) = guest(c)?;
    fixed_dirents(data, inodes, buf, used)
}

fn fixed_dirents(
    data: &mut [u8],
    inodes: &mut std::collections::HashMap<u64, u64>,
    buf: i32,
    used: i32,
) -> wasmtime::Result<()> {
    let used_at = used as u32 as usize;
    let used = data
        .get(used_at..used_at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| wasmtime::format_err!("a WASI result outside the guest's memory"))?;
    let (start, end) = (buf as u32 as usize, buf as u32 as usize + used as usize);
    let mut at = start;
    while at + 24 <= end {
        let ino = field(data, at + 8)?;
        *ino = build_inode(inodes, u64::from_le_bytes(*ino)).to_le_bytes();
        let namlen = data
            .get(at + 16..at + 20)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(u32::MAX);
        at = at.saturating_add(24).saturating_add(namlen as usize);
    }
    Ok(())
}

struct FixedWall;

impl HostWallClock for FixedWall {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        BUILD_EPOCH
    }
}

struct FixedMonotonic;

impl HostMonotonicClock for FixedMonotonic {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
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

// ---- The few bytes of the module format the recipe reads and rewrites. ----

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }

    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.pos).ok_or("truncated module")?;
        self.pos += 1;
        Ok(v)
    }

    fn leb(&mut self) -> Result<u32, String> {
        let mut v: u64 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return u32::try_from(v).map_err(|_| "LEB128 out of range".to_string());
            }
        }
        Err("LEB128 too long".into())
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("truncated module")?;
        let v = self.b.get(self.pos..end).ok_or("truncated module")?;
        self.pos = end;
        Ok(v)
    }

    fn name(&mut self) -> Result<&'a str, String> {
        let n = self.leb()? as usize;
        std::str::from_utf8(self.bytes(n)?).map_err(|_| "a name is not UTF-8".to_string())
    }
}

fn put_leb(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The sections of a core module: (id, start of the section header, payload).
fn sections(wasm: &[u8]) -> Result<Vec<(u8, usize, std::ops::Range<usize>)>, String> {
    if wasm.get(..8) != Some(&[0, b'a', b's', b'm', 1, 0, 0, 0]) {
        return Err("not a core wasm module".into());
    }
    let mut r = Reader::new(wasm);
    r.pos = 8;
    let mut out = Vec::new();
    while !r.done() {
        let start = r.pos;
        let id = r.byte()?;
        let len = r.leb()? as usize;
        let body = r.pos..r.pos.checked_add(len).ok_or("truncated module")?;
        r.bytes(len)?;
        out.push((id, start, body));
    }
    Ok(out)
}

/// The function indices of `names`, from the `name` section; an error names the
/// first one missing (a runtime whose internals moved: no snapshot).
fn func_indices(wasm: &[u8], names: &[&str]) -> Result<Vec<u32>, String> {
    let mut found: Vec<Option<u32>> = vec![None; names.len()];
    for (id, _, body) in sections(wasm)? {
        if id != 0 {
            continue;
        }
        let mut r = Reader::new(&wasm[body]);
        if r.name()? != "name" {
            continue;
        }
        while !r.done() {
            let sub = r.byte()?;
            let len = r.leb()? as usize;
            let data = r.bytes(len)?;
            if sub != 1 {
                continue;
            }
            let mut f = Reader::new(data);
            for _ in 0..f.leb()? {
                let index = f.leb()?;
                let name = f.name()?;
                if let Some(k) = names.iter().position(|n| *n == name) {
                    found[k].get_or_insert(index);
                }
            }
        }
    }
    names
        .iter()
        .zip(found)
        .map(|(n, i)| {
            i.ok_or_else(|| {
                format!("the runtime has no function `{n}` (an unknown wheel version?)")
            })
        })
        .collect()
}

/// The export section: (name, kind, index).
fn exports(wasm: &[u8]) -> Result<Vec<(String, u8, u32)>, String> {
    let mut out = Vec::new();
    for (id, _, body) in sections(wasm)? {
        if id != 7 {
            continue;
        }
        let mut r = Reader::new(&wasm[body]);
        for _ in 0..r.leb()? {
            let name = r.name()?.to_string();
            let kind = r.byte()?;
            let index = r.leb()?;
            out.push((name, kind, index));
        }
    }
    Ok(out)
}

/// The module with its export section replaced by `edit` of its exports.
fn rewrite_exports(
    wasm: &[u8],
    edit: impl FnOnce(&mut Vec<(String, u8, u32)>),
) -> Result<Vec<u8>, String> {
    let mut list = exports(wasm)?;
    edit(&mut list);
    let mut body = Vec::new();
    put_leb(&mut body, list.len() as u32);
    for (name, kind, index) in &list {
        put_leb(&mut body, name.len() as u32);
        body.extend_from_slice(name.as_bytes());
        body.push(*kind);
        put_leb(&mut body, *index);
    }
    let mut out = Vec::with_capacity(wasm.len() + 64);
    out.extend_from_slice(&wasm[..8]);
    let mut replaced = false;
    for (id, start, range) in sections(wasm)? {
        if id == 7 {
            out.push(7);
            put_leb(&mut out, body.len() as u32);
            out.extend_from_slice(&body);
            replaced = true;
        } else {
            out.extend_from_slice(&wasm[start..range.end]);
        }
    }
    if !replaced {
        return Err("the module has no export section".into());
    }
    Ok(out)
}

/// The initial size of the module's (first) memory, in bytes.
fn initial_memory(wasm: &[u8]) -> Result<u64, String> {
    for (id, _, body) in sections(wasm)? {
        if id != 5 {
            continue;
        }
        let mut r = Reader::new(&wasm[body]);
        if r.leb()? == 0 {
            break;
        }
        let flags = r.byte()?;
        if flags & 0x04 != 0 {
            return Err("a 64-bit memory is not expected here".into());
        }
        return Ok(u64::from(r.leb()?) << 16);
    }
    Err("the module defines no memory".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_dotted_identifiers() {
        assert!(is_module_name("sklearn.linear_model"));
        assert!(is_module_name("_x1.y"));
        for bad in ["", "a..b", "1a", "os; import x", "a.b ", "a-b", ".a"] {
            assert!(!is_module_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_recipe_names_the_preload_list() {
        let a = recipe_digest("rt", &["numpy".into()]);
        assert_ne!(a, recipe_digest("rt", &["numpy".into(), "pandas".into()]));
        assert_ne!(a, recipe_digest("rt2", &["numpy".into()]));
        assert_eq!(a, recipe_digest("rt", &["numpy".into()]));
    }

    #[test]
    fn exports_are_rewritten_and_read_back() {
        // (module (memory 3) (func) (export "f" (func 0)) (export "memory" (memory 0)))
        let wasm: Vec<u8> = vec![
            0, b'a', b's', b'm', 1, 0, 0, 0, // header
            1, 4, 1, 0x60, 0, 0, // type: () -> ()
            3, 2, 1, 0, // func 0: type 0
            5, 3, 1, 0, 3, // memory: min 3
            7, 14, 2, 1, b'f', 0, 0, 6, b'm', b'e', b'm', b'o', b'r', b'y', 2, 0, // exports
            10, 4, 1, 2, 0, 0x0b, // code
        ];
        assert_eq!(initial_memory(&wasm).unwrap(), 3 << 16);
        let more = rewrite_exports(&wasm, |e| e.push(("g".into(), 0, 0))).unwrap();
        let names: Vec<String> = exports(&more).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["f", "memory", "g"]);
        let back = rewrite_exports(&more, |e| e.retain(|x| x.0 != "g")).unwrap();
        assert_eq!(back, wasm);
        assert!(func_indices(&wasm, &["f"]).unwrap_err().contains("`f`"));
    }

    #[test]
    fn the_build_sees_fixed_file_identities() {
        let mut inodes = std::collections::HashMap::new();
        // A filestat at 8: dev 1, a host inode hash, a regular file, two links,
        // size 5, real times.
        let mut mem = vec![0u8; 8 + 64];
        let put = |m: &mut [u8], at: usize, v: u64| m[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut mem, 8, 1);
        put(&mut mem, 16, 0xdead_beef_1234);
        mem[24] = 4;
        put(&mut mem, 32, 2);
        put(&mut mem, 40, 5);
        for t in [48, 56, 64] {
            put(&mut mem, t, 1_764_000_000_123_456_789);
        }
        fixed_filestat(&mut mem, &mut inodes, 8).unwrap();
        let get = |m: &[u8], at: usize| u64::from_le_bytes(m[at..at + 8].try_into().unwrap());
        assert_eq!((get(&mem, 8), get(&mem, 16), mem[24]), (1, 1, 4));
        assert_eq!((get(&mem, 32), get(&mem, 40)), (1, 5));
        for t in [48, 56, 64] {
            assert_eq!(get(&mem, t), BUILD_EPOCH.as_nanos() as u64);
        }
        assert!(fixed_filestat(&mut mem, &mut inodes, 16).is_err());

        // Two dirents ("." of the same file, then "zip" of another), the second cut
        // short after its header; `used` at 0.
        let mut mem = vec![0u8; 4 + 24 + 1 + 24 + 2];
        mem[..4].copy_from_slice(&(24u32 + 1 + 24 + 2).to_le_bytes());
        put(&mut mem, 4 + 8, 0xdead_beef_1234);
        mem[4 + 16..4 + 20].copy_from_slice(&1u32.to_le_bytes());
        put(&mut mem, 4 + 25 + 8, 0x5555);
        mem[4 + 25 + 16..4 + 25 + 20].copy_from_slice(&3u32.to_le_bytes());
        fixed_dirents(&mut mem, &mut inodes, 4, 0).unwrap();
        assert_eq!((get(&mem, 4 + 8), get(&mem, 4 + 25 + 8)), (1, 2));
        assert_eq!(build_inode(&mut inodes, 0), 0);
    }

    #[test]
    fn unsuitable_steps_say_why() {
        assert!(
            unsuitable(64 << 20, &mut std::iter::empty())
                .unwrap()
                .contains("floor")
        );
        let env = ["HOME", "SKLEARN_ASSUME_FINITE"];
        assert!(
            unsuitable(2 << 30, &mut env.into_iter())
                .unwrap()
                .contains("SKLEARN_ASSUME_FINITE")
        );
        assert!(unsuitable(2 << 30, &mut ["SEED"].into_iter()).is_none());
    }
}
