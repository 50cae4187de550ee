//! The engine's configuration and compiled code: the precompiled cache under
//! `<state>/cache/wasm/` (see [`super`]) and the in-process `InstancePre`s.

use std::io::Write;
use std::path::Path;

use wasmtime::component::Component;
use wasmtime::{Config, InstanceAllocationStrategy, Module, PoolingAllocationConfig};
use wasmtime_wasi::p2::bindings::CommandPre;

use super::{Compiled, HOST_STACK_HEADROOM, MAX_WASM_STACK, WasmError, WasmRuntime};

impl WasmRuntime {
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
    pub(super) fn prepare(&self, path: &Path, digest: &str) -> Result<Compiled, WasmError> {
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
