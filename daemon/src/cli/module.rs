//! `millrace module …`: publish, list, show, deprecate, disable, enable, default,
//! export, import (SPEC "Modules").

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{Error, open_store, time};
use crate::definition::{self, StepKind};
use crate::diagnostic::display_path;
use crate::module::{self as registry, CodeKind, ModuleIndex, ModuleVersion, RegistryError};
use crate::planner::short;
use crate::store::Store;
use crate::store::artifacts::Mode;
use crate::store::db::now_ms;

#[derive(clap::Subcommand, Debug)]
pub enum ModuleCommand {
    /// Store a .wasm file, or a Python code directory (with --entry), as NAME@VERSION.
    #[command(after_help = "Examples:
  millrace module publish plugins/dist/normalise.wasm --name normalise --version 1.0.0
  millrace module publish code/ --name features --version 0.2.0 --entry features.py
  millrace module publish model.wasm --name model --version 2.0.0-rc.1 --description \"new loss\"")]
    Publish {
        /// The .wasm file, or the Python code directory.
        path: PathBuf,
        /// The module's name (`module = \"NAME\"` in a step).
        #[arg(long)]
        name: String,
        /// Semver: 1.2.0, 2.0.0-rc.1
        #[arg(long)]
        version: String,
        /// A line saying what the version is (shown by `module show`).
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// The entry script of a Python code directory, e.g. train.py.
        #[arg(long, value_name = "SCRIPT")]
        entry: Option<String>,
    },
    /// Published modules (every version of NAME).
    List {
        /// Only this module's versions.
        name: Option<String>,
    },
    /// One module (NAME) or version (NAME@VERSION): details, history, the pipelines
    /// that resolve to it today and the last runs that used it.
    Show {
        /// NAME or NAME@VERSION.
        module: String,
        #[command(flatten)]
        pipelines: PipelinesArgs,
    },
    /// Mark NAME@VERSION deprecated: it still runs, with a warning.
    Deprecate {
        /// NAME@VERSION.
        module: String,
        /// Why, and what to use instead (shown with the warning).
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
        #[command(flatten)]
        pipelines: PipelinesArgs,
    },
    /// Mark NAME@VERSION disabled: pipelines resolving to it fail validation.
    Disable {
        /// NAME@VERSION.
        module: String,
        /// Why (shown in the validation error).
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
        /// Disable even though pipelines still resolve to it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        pipelines: PipelinesArgs,
    },
    /// Make a deprecated or disabled version active again.
    Enable {
        /// NAME@VERSION.
        module: String,
    },
    /// Make VERSION what `module = "NAME"` resolves to.
    Default {
        /// The module's name.
        name: String,
        /// The version a bare `module = "NAME"` then resolves to.
        version: String,
    },
    /// Write NAME@VERSION (code and metadata) to one archive file.
    Export {
        /// NAME@VERSION.
        module: String,
        /// The archive file to write.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Publish a module from an archive written by `module export`.
    Import {
        /// The archive file.
        file: PathBuf,
    },
}

/// Where impact analysis looks for pipelines.
#[derive(clap::Args, Debug, Clone)]
pub struct PipelinesArgs {
    /// A directory of pipeline files (default: the daemon config's pipelines directory).
    #[arg(long = "pipelines", value_name = "DIR")]
    dir: Vec<PathBuf>,
    /// The daemon config whose pipelines directory to look in.
    #[arg(long, env = "MILLRACE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(state: &Path, cmd: ModuleCommand, json: bool) -> anyhow::Result<i32> {
    let store = open_store(state)?;
    match cmd {
        ModuleCommand::Publish {
            path,
            name,
            version,
            description,
            entry,
        } => {
            // (An import publishes from its staging inside the state: not this way.)
            if store.inside(&path) {
                return Err(Error::usage(format!(
                    "{} lies inside the state directory {}; publish code from outside it",
                    path.display(),
                    store.root.display()
                ))
                .into());
            }
            publish(&store, &path, &name, &version, description, entry, json)
        }
        ModuleCommand::List { name } => list(&store, name.as_deref(), json),
        ModuleCommand::Show { module, pipelines } => show(&store, &module, &pipelines, json),
        ModuleCommand::Deprecate {
            module,
            message,
            pipelines,
        } => {
            let m = find(&store, &module)?;
            if m.status != "disabled" {
                print_impact(&store, &m, &pipelines)?;
            }
            registry::deprecate(&store, &m, message.as_deref()).map_err(refused)?;
            println!("{} is deprecated", m.id());
            Ok(0)
        }
        ModuleCommand::Disable {
            module,
            message,
            force,
            pipelines,
        } => {
            let m = find(&store, &module)?;
            let using = print_impact(&store, &m, &pipelines)?;
            registry::check_disable(&store, &m, using.len(), force).map_err(refused)?;
            registry::disable(&store, &m, message.as_deref()).map_err(refused)?;
            println!("{} is disabled", m.id());
            Ok(0)
        }
        ModuleCommand::Enable { module } => {
            let m = find(&store, &module)?;
            registry::enable(&store, &m).map_err(refused)?;
            println!("{} is active", m.id());
            Ok(0)
        }
        ModuleCommand::Default { name, version } => {
            let m = find(&store, &format!("{name}@{version}"))?;
            registry::make_default(&store, &m).map_err(refused)?;
            println!("`module = \"{name}\"` now resolves to {}", m.id());
            Ok(0)
        }
        ModuleCommand::Export { module, output } => export(&store, &module, &output),
        ModuleCommand::Import { file } => import(&store, &file, json),
    }
}

/// NAME@VERSION (exact) in the registry, or a usage error listing what exists.
fn find(store: &Store, spec: &str) -> anyhow::Result<ModuleVersion> {
    registry::find(store, spec).map_err(refused)
}

/// The registry's refusals are usage errors; its database failing is not.
fn refused(e: RegistryError) -> anyhow::Error {
    match e {
        RegistryError::Refused(m) => Error::usage(m).into(),
        other => anyhow::Error::new(other),
    }
}

fn publish(
    store: &Store,
    path: &Path,
    name: &str,
    version: &str,
    description: Option<String>,
    entry: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let checked = registry::check_publish(path, name, version, entry).map_err(refused)?;
    // The code enters the store before a row names it: no gc may sweep meanwhile.
    let _store_lock = store.lock_shared()?;
    // A code directory is stored as the steps see it: without hidden entries (a
    // state directory, .git), __pycache__ or symlinks.
    let (artifact, size, digest) = match checked.kind {
        CodeKind::Wasm => {
            let i = store.ingest(path, Mode::Copy)?;
            let digest = store
                .artifacts
                .list(&i.digest)?
                .first()
                .map(|e| e.digest.clone())
                .context("the stored wasm tree is empty")?;
            (i.digest, i.size, digest)
        }
        CodeKind::Python => {
            let d = crate::planner::code::snapshot_code_dir(store, path).map_err(Error::usage)?;
            let size = store.db().read().artifact(&d)?.map_or(0, |(s, _)| s);
            (d.clone(), size, d)
        }
    };
    let kind = checked.kind.as_str();
    let m = ModuleVersion {
        name: name.to_string(),
        version: checked.version,
        kind: kind.to_string(),
        digest,
        artifact,
        size,
        entry: checked.entry,
        description,
        status: "active".into(),
        message: None,
        published_at: now_ms(),
    };
    let published = registry::record(store, &m).map_err(refused)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"module": m.id(), "digest": m.digest, "published": published})
        );
    } else if published {
        println!(
            "published {} ({kind}, {} bytes) {}",
            m.id(),
            m.size,
            short(&m.digest)
        );
    } else {
        println!(
            "{} is already published with this content ({})",
            m.id(),
            short(&m.digest)
        );
    }
    Ok(0)
}

fn list(store: &Store, name: Option<&str>, json: bool) -> anyhow::Result<i32> {
    let versions = store.db().read().module_versions(name)?;
    let defaults = store.db().read().module_defaults()?;
    if let Some(n) = name
        && versions.is_empty()
    {
        return Err(Error::usage(format!("unknown module `{n}`")).into());
    }
    let index = ModuleIndex::new(versions.clone(), defaults.clone(), None);
    if json {
        let rows: Vec<serde_json::Value> = versions
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["default"] = (defaults.get(&m.name) == Some(&m.version)).into();
                v["resolves_bare_name"] = (index.resolve(&m.name).ok().map(|r| r.module.version)
                    == Some(m.version.clone()))
                .into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if versions.is_empty() {
        println!(
            "no modules: publish one with `millrace module publish PATH --name N --version X.Y.Z`"
        );
        return Ok(0);
    }
    println!(
        "{:<20} {:<12} {:<7} {:<11} {:<8} {:<20} digest",
        "module", "version", "kind", "status", "default", "published"
    );
    for name in index.names() {
        let bare = index.resolve(name).ok().map(|r| r.module.version);
        for m in index.versions(name) {
            let default = if defaults.get(name) == Some(&m.version) {
                "yes"
            } else if bare.as_deref() == Some(&m.version) {
                "(latest)"
            } else {
                ""
            };
            println!(
                "{:<20} {:<12} {:<7} {:<11} {:<8} {:<20} {}",
                m.name,
                m.version,
                m.kind,
                m.status,
                default,
                time(Some(m.published_at)),
                short(&m.digest)
            );
        }
    }
    Ok(0)
}

/// The pipeline files impact analysis reads.
fn pipeline_files(args: &PipelinesArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = args.dir.clone();
    if dirs.is_empty()
        && let Some(c) = super::service::config_path(args.config.as_deref())
    {
        dirs.push(super::service::load_config(&c)?.pipelines);
    }
    super::expand_dirs(&dirs)
}

/// (pipeline, step, file) of every step that resolves to `m` today.
fn resolving_to(
    store: &Store,
    m: &ModuleVersion,
    args: &PipelinesArgs,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let mut env = match super::service::config_path(args.config.as_deref()) {
        Some(c) => super::service::load_config(&c)?.environment(),
        None => definition::Environment::default(),
    };
    env.modules = ModuleIndex::load(store)?;
    let mut out = Vec::new();
    for f in pipeline_files(args)? {
        let Ok((Some(p), _)) = crate::graph::load(&f, &env) else {
            // Cannot tell what it uses: say so rather than leave it out.
            super::style::eprint_lines(&format!(
                "warning: {} does not validate: its use of {} is unknown",
                display_path(&f),
                m.id()
            ));
            continue;
        };
        for s in &p.steps {
            if let StepKind::Module { module, .. } = &s.kind
                && module.id == m.id()
            {
                out.push((
                    p.name.get_ref().clone(),
                    s.name.get_ref().clone(),
                    display_path(&f),
                ));
            }
        }
    }
    Ok(out)
}

/// Prints who uses `m` (pipelines resolving to it, recent runs); returns the former.
fn print_impact(
    store: &Store,
    m: &ModuleVersion,
    args: &PipelinesArgs,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let using = resolving_to(store, m, args)?;
    let runs = store.db().read().module_uses(&m.id(), 10)?;
    if using.is_empty() {
        println!("no pipeline resolves to {} today", m.id());
    } else {
        println!("pipelines resolving to {} today:", m.id());
        for (p, s, f) in &using {
            println!("  {p} (step {s}, {f})");
        }
    }
    if !runs.is_empty() {
        println!("last runs that used it:");
        for (run, p, s, status) in &runs {
            println!("  run {run} {p}.{s} {status}");
        }
    }
    Ok(using)
}

fn show(store: &Store, spec: &str, args: &PipelinesArgs, json: bool) -> anyhow::Result<i32> {
    let versions: Vec<ModuleVersion> = match spec.split_once('@') {
        Some(_) => vec![find(store, spec)?],
        None => {
            let v = store.db().read().module_versions(Some(spec))?;
            if v.is_empty() {
                return Err(Error::usage(format!("unknown module `{spec}`")).into());
            }
            v
        }
    };
    let defaults = store.db().read().module_defaults()?;
    let mut out = Vec::new();
    for m in &versions {
        let history = store.db().read().module_events(&m.name, &m.version)?;
        let using = resolving_to(store, m, args)?;
        let runs = store.db().read().module_uses(&m.id(), 10)?;
        if json {
            let mut v = serde_json::to_value(m)?;
            v["default"] = (defaults.get(&m.name) == Some(&m.version)).into();
            v["history"] = history
                .iter()
                .map(|(e, msg, at)| serde_json::json!({"event": e, "message": msg, "at": at}))
                .collect();
            v["pipelines"] = using
                .iter()
                .map(|(p, s, f)| serde_json::json!({"pipeline": p, "step": s, "file": f}))
                .collect();
            v["runs"] = runs
                .iter()
                .map(|(r, p, s, st)| serde_json::json!({"run": r, "pipeline": p, "step": s, "status": st}))
                .collect();
            out.push(v);
            continue;
        }
        println!("{}", m.id());
        println!(
            "  kind        {}{}",
            m.kind,
            m.entry
                .as_deref()
                .map(|e| format!(" (entry {e})"))
                .unwrap_or_default()
        );
        println!(
            "  digest      {} ({})",
            m.digest,
            registry::digest_label(&m.kind)
        );
        println!("  size        {} bytes", m.size);
        println!(
            "  status      {}{}",
            m.status,
            m.message
                .as_deref()
                .map(|x| format!(": {x}"))
                .unwrap_or_default()
        );
        println!(
            "  default     {}",
            if defaults.get(&m.name) == Some(&m.version) {
                "yes"
            } else {
                "no"
            }
        );
        println!("  published   {}", time(Some(m.published_at)));
        if let Some(d) = &m.description {
            println!(
                "  description {}",
                crate::store::artifacts::escape_controls(d)
            );
        }
        println!("  history");
        for (e, msg, at) in &history {
            println!(
                "    {}  {e}{}",
                time(Some(*at)),
                msg.as_deref().map(|x| format!(": {x}")).unwrap_or_default()
            );
        }
        if using.is_empty() {
            println!("  pipelines   none resolve to it today");
        } else {
            println!("  pipelines");
            for (p, s, f) in &using {
                println!("    {p} (step {s}, {f})");
            }
        }
        if !runs.is_empty() {
            println!("  last runs");
            for (run, p, s, st) in &runs {
                println!("    run {run} {p}.{s} {st}");
            }
        }
        println!();
    }
    if json {
        let v = if spec.contains('@') {
            out.remove(0)
        } else {
            serde_json::Value::Array(out)
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(0)
}

/// The archive's metadata file.
const META: &str = "millrace-module.json";

fn export(store: &Store, spec: &str, output: &Path) -> anyhow::Result<i32> {
    let m = find(store, spec)?;
    let tmp = tempdir_in(store)?;
    let result = export_in(store, &m, &tmp, output);
    let _ = crate::store::walk::remove_tree(&tmp);
    result
}

fn export_in(store: &Store, m: &ModuleVersion, tmp: &Path, output: &Path) -> anyhow::Result<i32> {
    let code = tmp.join("code");
    store
        .artifacts
        .export(&m.artifact, &code)
        .with_context(|| format!("the code of {} is missing from the store", m.id()))?;
    let meta = serde_json::json!({
        "format": 1,
        "name": m.name, "version": m.version, "kind": m.kind,
        "digest": m.digest, "entry": m.entry, "description": m.description,
    });
    std::fs::write(tmp.join(META), serde_json::to_string_pretty(&meta)?)?;
    // Written beside the target, then renamed: never a half-written archive.
    let part = output.with_extension("part");
    {
        let f = std::fs::File::create(&part)
            .map_err(|e| Error::usage(format!("cannot write {}: {e}", output.display())))?;
        let mut tar = tar::Builder::new(f);
        tar.mode(tar::HeaderMode::Deterministic);
        tar.append_path_with_name(tmp.join(META), META)?;
        tar.append_dir_all("code", &code)?;
        tar.into_inner()?.sync_all()?;
    }
    std::fs::rename(&part, output)
        .map_err(|e| Error::usage(format!("cannot write {}: {e}", output.display())))?;
    println!("exported {} to {}", m.id(), output.display());
    Ok(0)
}

fn tempdir_in(store: &Store) -> anyhow::Result<PathBuf> {
    let dir =
        store
            .root
            .join("objects/tmp")
            .join(format!("module-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn entry_kind(kind: tar::EntryType) -> &'static str {
    if kind.is_symlink() {
        "symbolic link"
    } else if kind.is_hard_link() {
        "hard link"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_character_special() || kind.is_block_special() {
        "device"
    } else {
        "special entry"
    }
}

fn import(store: &Store, file: &Path, json: bool) -> anyhow::Result<i32> {
    // Its staging directory is under objects/tmp, which gc empties.
    let _store_lock = store.lock_shared()?;
    let tmp = tempdir_in(store)?;
    let result = (|| -> anyhow::Result<i32> {
        let f = std::fs::File::open(file)
            .map_err(|e| Error::usage(format!("cannot read {}: {e}", file.display())))?;
        if !std::fs::metadata(file).is_ok_and(|m| m.is_file()) {
            return Err(Error::usage(format!("{} is not a file", file.display())).into());
        }
        let not_archive = |e: std::io::Error| {
            Error::config(format!(
                "{} is not a module archive (from `millrace module export`): {e}",
                file.display()
            ))
        };
        let mut archive = tar::Archive::new(f);
        archive.set_preserve_permissions(false);
        archive.set_overwrite(false);
        let mut entries: u64 = 0;
        for entry in archive.entries().map_err(not_archive)? {
            let mut entry = entry.map_err(not_archive)?;
            // Only files and directories: a symlink or hard link would import
            // whatever host file it names (and its digest would tell a guess).
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                let what = entry
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                return Err(Error::config(format!(
                    "{}: the archive entry `{}` is a {}; a module archive holds only regular files and directories; nothing was imported",
                    file.display(),
                    what.escape_debug(),
                    entry_kind(kind)
                ))
                .into());
            }
            // Bounded before anything is unpacked: a deep archive costs unpack_in
            // time cubic in its depth, and the store would refuse it anyway.
            let depth = entry.path().map(|p| p.components().count()).unwrap_or(0);
            entries += 1;
            let limits = store.limits();
            if depth > limits.depth + 2 || entries > limits.entries {
                return Err(Error::config(format!(
                    "{}: the archive nests deeper than {} levels or holds more than {} entries (MILLRACE_MAX_DEPTH, MILLRACE_MAX_ENTRIES); nothing was imported",
                    file.display(),
                    limits.depth,
                    limits.entries
                ))
                .into());
            }
            // unpack_in refuses paths that escape the directory.
            if !entry.unpack_in(&tmp).map_err(not_archive)? {
                return Err(Error::config(format!(
                    "{}: the archive holds a path outside its root",
                    file.display()
                ))
                .into());
            }
        }
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.join(META)).map_err(|_| {
                Error::config(format!(
                    "{} is not a module archive (no {META})",
                    file.display()
                ))
            })?)
            .map_err(|e| Error::config(format!("{}: bad {META}: {e}", file.display())))?;
        let field = |k: &str| meta[k].as_str().map(str::to_string);
        let (Some(name), Some(version), Some(kind), Some(digest)) = (
            field("name"),
            field("version"),
            field("kind"),
            field("digest"),
        ) else {
            return Err(Error::config(format!(
                "{}: {META} lacks name, version, kind or digest",
                file.display()
            ))
            .into());
        };
        let code = tmp.join("code");
        let path = if kind == "wasm" {
            let files: Vec<PathBuf> = std::fs::read_dir(&code)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            match files.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(Error::config(format!(
                        "{}: a wasm module archive holds exactly one file under code/",
                        file.display()
                    ))
                    .into());
                }
            }
        } else {
            code.clone()
        };
        // The content must be what the metadata says.
        let hashed = store.ingest(&path, Mode::Hash)?;
        let actual = if kind == "wasm" {
            store
                .artifacts
                .list(&hashed.digest)
                .ok()
                .and_then(|e| e.first().map(|e| e.digest.clone()))
                .unwrap_or_default()
        } else {
            hashed.digest
        };
        if actual != digest {
            return Err(Error::config(format!(
                "{}: the code does not match its digest (archive says {digest}, content is {actual}): the archive was altered or damaged; nothing was imported",
                file.display()
            ))
            .into());
        }
        publish(
            store,
            &path,
            &name,
            &version,
            field("description"),
            field("entry"),
            json,
        )
    })();
    let _ = crate::store::walk::remove_tree(&tmp);
    result
}
