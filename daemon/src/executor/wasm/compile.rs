//! The engine's configuration and compiled code: the precompiled cache under
//! `<state>/cache/wasm/` (see [`super`]) and the in-process `InstancePre`s.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::{Compiled, HOST_STACK_HEADROOM, MAX_WASM_STACK, WasmError, WasmRuntime};

impl WasmRuntime {
    /// Compiles `path` into the cache ahead of its first use (`millrace runtime
    /// prepare`). Returns whether it was already there.
    pub fn precompile(&self, path: &Path, digest: &str) -> Result<bool, WasmError> {
        let key = self.cache_key(digest);
        let was_cached = self.cache_dir.join(format!("{key}.cwasm")).is_file();
        self.prepare(path, digest)?;
        Ok(was_cached)
    }

    /// The name of the compiled form of the code with content digest `digest`
    /// in the cache: this engine's code only.
    fn cache_key(&self, digest: &str) -> String {
        blake3::hash(format!("{digest}\n{}", self.engine_key).as_bytes())
            .to_hex()
            .to_string()
    }

    /// Compiles (or loads the precompiled form of) the wasm at `path`, whose
    /// content digest is `digest`.
    pub(super) fn prepare(&self, path: &Path, digest: &str) -> Result<Compiled, WasmError> {
        if let Some(c) = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
        {
            return Ok(c.clone());
        }
        let key = self.cache_key(digest);
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
        let link_err = |e: wasmtime::Error| WasmError::Link {
            path: path.to_path_buf(),
            detail: format!("{e:#}"),
        };
        let compiled = if is_component(path)? {
            let component: Component = self.load_or_compile(path, digest, &cached)?;
            let pre = self
                .p2_linker
                .instantiate_pre(&component)
                .map_err(link_err)?;
            Compiled::Component(CommandPre::new(pre).map_err(link_err)?)
        } else {
            let module: Module = self.load_or_compile(path, digest, &cached)?;
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

    /// The code at `path` (content digest `digest`): loaded from its precompiled
    /// form `cached` when this engine can load that, otherwise compiled and
    /// stored there.
    fn load_or_compile<C: Code>(
        &self,
        path: &Path,
        digest: &str,
        cached: &Path,
    ) -> Result<C, WasmError> {
        // SAFETY: `cached` lives in our state directory and is only ever written
        // by `store_precompiled` below from this engine's own output.
        let loaded = cached
            .is_file()
            .then(|| unsafe { C::load(&self.engine, cached) }.ok())
            .flatten();
        if let Some(code) = loaded {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(code);
        }
        let bytes = read_checked(path, digest)?;
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let code = C::compile(&self.engine, &bytes).map_err(|e| WasmError::Compile {
            path: path.to_path_buf(),
            detail: format!("{e:#}"),
        })?;
        match code.to_bytes() {
            Ok(bin) => store_precompiled(&self.cache_dir, cached, &bin),
            Err(e) => tracing::warn!("cannot serialize {}: {e:#}", path.display()),
        }
        release_compiler_memory();
        Ok(code)
    }
}

/// What the engine compiles and the cache keeps: a wasip2 component or a core
/// module, compiled, serialized and loaded alike.
trait Code: Sized {
    /// # Safety
    ///
    /// `path` must hold what [`Code::to_bytes`] wrote for this engine: loading
    /// maps it as executable code without checking it.
    unsafe fn load(engine: &Engine, path: &Path) -> wasmtime::Result<Self>;
    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self>;
    fn to_bytes(&self) -> wasmtime::Result<Vec<u8>>;
}

impl Code for Component {
    unsafe fn load(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: the caller's.
        unsafe { Component::deserialize_file(engine, path) }
    }

    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        Component::new(engine, bytes)
    }

    fn to_bytes(&self) -> wasmtime::Result<Vec<u8>> {
        self.serialize()
    }
}

impl Code for Module {
    unsafe fn load(engine: &Engine, path: &Path) -> wasmtime::Result<Self> {
        // SAFETY: the caller's.
        unsafe { Module::deserialize_file(engine, path) }
    }

    fn compile(engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        Module::new(engine, bytes)
    }

    fn to_bytes(&self) -> wasmtime::Result<Vec<u8>> {
        self.serialize()
    }
}

/// Whether the wasm at `path` is a component (wasip2) rather than a core module
/// (wasip1), told by its header.
fn is_component(path: &Path) -> Result<bool, WasmError> {
    let mut header = [0u8; 8];
    let mut f = std::fs::File::open(path).map_err(|source| WasmError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    std::io::Read::read_exact(&mut f, &mut header).map_err(|_| WasmError::NotWasm {
        path: path.to_path_buf(),
    })?;
    match header {
        [0, b'a', b's', b'm', 1, 0, 0, 0] => Ok(false),
        [0, b'a', b's', b'm', _, _, 1, 0] => Ok(true),
        _ => Err(WasmError::NotWasm {
            path: path.to_path_buf(),
        }),
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

pub(super) fn config(pool: Option<usize>) -> Config {
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
