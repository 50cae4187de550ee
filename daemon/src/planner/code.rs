//! What a step's code is, as a digest: the wasm bytes, a Python step's code
//! directory (snapshotted into the store) with the runtime, a module's recorded
//! digest, a container's image ID, a transfer's destination. Every digest is
//! memoised per run (a [`Memo`]), so a file is hashed once however many steps or
//! attempts read it, and the warm interpreter is looked up once per recipe.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::definition::{self, Pipeline, StepKind, TransferMode};
use crate::executor::container::ResolvedImage;
use crate::executor::snapshot::{self, BaseReason, Snapshot, Variant};
use crate::store::Store;
use crate::store::artifacts::Mode;

/// What a run has already computed about its steps' code.
#[derive(Default)]
pub struct Memo {
    /// Digests, by path (and by `runtime:`/`snapshot:` pseudo-paths).
    digests: Mutex<HashMap<PathBuf, String>>,
    /// The warm interpreter of each recipe: built, or why not. Looked up once per
    /// run, so its keys and attempts agree even if a build lands mid-run.
    snapshots: Mutex<HashMap<String, Result<Snapshot, String>>>,
}

impl Memo {
    fn get(&self, key: &Path) -> Option<String> {
        self.digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn put(&self, key: PathBuf, digest: &str) {
        self.digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, digest.to_string());
    }

    /// The snapshot of `recipe`, found in `cache_dir` on the first call.
    fn snapshot(&self, cache_dir: &Path, recipe: &str) -> Result<Snapshot, String> {
        let mut map = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(recipe.to_string())
            .or_insert_with(|| snapshot::find(cache_dir, recipe))
            .clone()
    }
}

/// The Python runtime's digest: the interpreter module, the standard library and
/// packages zip, and matplotlib's data. A different runtime is different code.
pub fn runtime_digest(memo: &Memo, store: &Store) -> Result<String, String> {
    let runtime =
        crate::executor::python::Runtime::locate().ok_or_else(crate::executor::python::missing)?;
    runtime.check()?;
    let key = PathBuf::from(format!("runtime:{}", runtime.dir.display()));
    if let Some(d) = memo.get(&key) {
        return Ok(d);
    }
    let wasm = file_digest(memo, store, &runtime.wasm())
        .map_err(|e| format!("the Python runtime: {e}"))?;
    let lib = store
        .ingest(&runtime.dir.join("lib"), Mode::Hash)
        .map_err(|e| format!("the Python runtime's lib/: {e}"))?;
    let mpl = match runtime.dir.join("mpl-data") {
        d if d.is_dir() => {
            store
                .ingest(&d, Mode::Hash)
                .map_err(|e| format!("the Python runtime's mpl-data/: {e}"))?
                .digest
        }
        _ => String::new(),
    };
    let digest = blake3::hash(format!("{wasm}\n{}\n{mpl}", lib.digest).as_bytes())
        .to_hex()
        .to_string();
    memo.put(key, &digest);
    Ok(digest)
}

/// The runtime a Python step runs on, and the runtime digest its key names: the
/// warm interpreter's recipe digest, or the base runtime's digest. The lookup of
/// the snapshot is memoised, so a run's keys and attempts agree.
pub fn python_variant(
    memo: &Memo,
    store: &Store,
    python: &crate::config::Python,
    step: &definition::Step,
) -> Result<(Variant, String), String> {
    let base = runtime_digest(memo, store)?;
    let off = |why| Ok((Variant::Base(why), base.clone()));
    if !python.snapshot {
        return off(BaseReason::ConfigOff);
    }
    if let StepKind::Python {
        snapshot: false, ..
    } = &step.kind
    {
        return off(BaseReason::StepOff);
    }
    let mut names = step.env.iter().map(|(k, _)| k.get_ref().as_str());
    let memory = step.memory.unwrap_or(crate::executor::DEFAULT_MEMORY);
    if let Some(why) = snapshot::unsuitable(memory, &mut names) {
        return off(why);
    }
    let recipe = snapshot::recipe_digest(&base, &python.preload);
    match memo.snapshot(&store.wasm_cache_dir(), &recipe) {
        Ok(s) => Ok((Variant::Warm(s), recipe)),
        Err(why) => off(BaseReason::Unavailable(why)),
    }
}

/// Most bytes a Python step's code directory may hold.
const MAX_CODE_BYTES: u64 = 256 << 20;

/// Copies a step's code directory into the store and returns the tree's digest:
/// the guest runs this snapshot (an edit during the run cannot reach it, nor be
/// cached under the old key). Hidden entries (`.git`, `.millrace`, …),
/// `__pycache__` and the state directory are left out.
pub fn code_snapshot(memo: &Memo, store: &Store, dir: &Path) -> Result<String, String> {
    let key = PathBuf::from(format!("snapshot:{}", dir.display()));
    if let Some(d) = memo.get(&key) {
        return Ok(d);
    }
    let err = |e: String| format!("the code directory {}: {e}", dir.display());
    if store.inside(dir) {
        return Err(err(
            "it lies inside the state directory; a step must not see the state".into(),
        ));
    }
    let tmp = store.root.join("objects/tmp").join(format!(
        "code-{}-{}",
        std::process::id(),
        SNAPSHOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let state = std::fs::canonicalize(&store.root).unwrap_or_else(|_| store.root.clone());
    let copied = (|| -> Result<(), String> {
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let mut total = 0u64;
        let walk = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .min_depth(1)
            .into_iter()
            .filter_entry(|e| {
                let name = e.file_name().to_string_lossy();
                !name.starts_with('.')
                    && name != "__pycache__"
                    && std::fs::canonicalize(e.path()).map_or(true, |p| p != state)
            });
        for e in walk {
            let e = e.map_err(|e| e.to_string())?;
            let rel = e.path().strip_prefix(dir).map_err(|e| e.to_string())?;
            let dest = tmp.join(rel);
            if e.file_type().is_dir() {
                std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
            } else if e.file_type().is_file() {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
                if total > MAX_CODE_BYTES {
                    return Err(format!(
                        "holds more than {} of code; give the step a `code` directory of its own",
                        definition::format_size(MAX_CODE_BYTES)
                    ));
                }
                std::fs::copy(e.path(), &dest)
                    .map_err(|x| format!("{}: {x}", e.path().display()))?;
            }
            // Symlinks are not followed nor copied: code is what is inside.
        }
        Ok(())
    })();
    let result = copied.map_err(err).and_then(|()| {
        store
            .ingest(&tmp, Mode::Move)
            .map(|i| i.digest)
            .map_err(|e| err(e.to_string()))
    });
    let _ = crate::store::walk::remove_tree(&tmp);
    let digest = result?;
    memo.put(key, &digest);
    Ok(digest)
}

/// A process-wide sequence for unique scratch names (code snapshots, materialised
/// code).
pub static SNAPSHOTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The code snapshot of a Python step (see `code_snapshot`), for `module publish`.
pub fn snapshot_code_dir(store: &Store, dir: &Path) -> Result<String, String> {
    code_snapshot(&Memo::default(), store, dir)
}

/// A file's content digest, hashed once per process (and remembered by stat).
pub fn file_digest(memo: &Memo, store: &Store, path: &Path) -> Result<String, String> {
    if let Some(d) = memo.get(path) {
        return Ok(d);
    }
    let ingested = store.ingest(path, Mode::Hash).map_err(|e| e.to_string())?;
    // The tree wraps the one file; the digest is the file's own.
    let digest = store
        .artifacts
        .list(&ingested.digest)
        .ok()
        .and_then(|e| e.first().map(|e| e.digest.clone()))
        .unwrap_or(ingested.digest);
    memo.put(path.to_path_buf(), &digest);
    Ok(digest)
}

/// The content digest of a step's code (the wasm bytes; for a transfer, its
/// destination), hashed once per file and remembered by stat.
pub fn code_of(
    memo: &Memo,
    images: &HashMap<usize, Result<ResolvedImage, String>>,
    store: &Store,
    python: &crate::config::Python,
    p: &Pipeline,
    i: usize,
) -> Result<String, String> {
    match &p.steps[i].kind {
        StepKind::Wasm { resolved, .. } => file_digest(memo, store, resolved)
            .map_err(|e| format!("cannot read the wasm file: {e}")),
        // The script's whole code directory, its name, and the runtime: a change
        // to any of them re-executes the step.
        StepKind::Python {
            code_dir, entry, ..
        } => {
            let rt = python_variant(memo, store, python, &p.steps[i])?.1;
            let tree = code_snapshot(memo, store, code_dir)?;
            Ok(blake3::hash(
                format!(
                    "{}\n{rt}\n{tree}\n{entry}",
                    crate::executor::python::RUNTIME_NAME,
                )
                .as_bytes(),
            )
            .to_hex()
            .to_string())
        }
        // A Python module: its code tree (digest from the registry), its entry and
        // the runtime, as for a `python` step.
        StepKind::Module { module, .. } if module.kind == "python" => {
            let rt = python_variant(memo, store, python, &p.steps[i])?.1;
            Ok(blake3::hash(
                format!(
                    "{}\n{rt}\n{}\n{}",
                    crate::executor::python::RUNTIME_NAME,
                    module.digest,
                    module.entry.as_deref().unwrap_or_default()
                )
                .as_bytes(),
            )
            .to_hex()
            .to_string())
        }
        // The registry recorded the digest when the version was published; the
        // executor checks the bytes against it before compiling.
        StepKind::Module { module, .. } => Ok(module.digest.clone()),
        // The destination, and a merge's mode: a replace and a merge to the same
        // place leave different things there. A replace's part is what it was
        // before modes existed, so its earlier executions stay reusable; the mode
        // comes first so that `explain`'s shortened code part shows it.
        StepKind::Transfer {
            to,
            datastore,
            mode,
            ..
        } => Ok(match mode {
            TransferMode::Replace => format!("{}:{}", datastore.get_ref(), to.get_ref()),
            TransferMode::Merge => format!("merge:{}:{}", datastore.get_ref(), to.get_ref()),
        }),
        // The image's content digest, never its tag: a retagged image re-executes.
        StepKind::Container(_) => match images.get(&i) {
            Some(Ok(image)) => Ok(image.digest().to_string()),
            Some(Err(e)) => Err(e.clone()),
            None => Err("the image was not resolved".to_string()),
        },
    }
}
