//! The module registry (SPEC "Modules"): versioned, content-addressed step code.
//!
//! A module version is a name, a semver version, a kind (`wasm`, or `python` with
//! an entry script), and the digest of its code in the artifact store: the blob of
//! a wasm file, the tree of a Python code directory. A version is immutable; its
//! status is `active`, `deprecated` or `disabled`, and every change is kept in
//! `module_events`. A pipeline step says `module = "name"`, `"name@1.2.0"` or
//! `"name@^1.2"`; [`ModuleIndex::resolve`] picks the version at validation time.
//! The registry's rules live here too, for every caller (the CLI today, the API
//! later): what may be published ([`check_publish`], [`record`]), deprecated,
//! disabled ([`check_disable`]), enabled or made the default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use semver::{Version, VersionReq};

pub use crate::store::db::ModuleVersion;

/// "module `n@v` is deprecated: use 1.1"
fn status_line(m: &ModuleVersion) -> String {
    let why = m
        .message
        .as_deref()
        .map(|m| format!(": {m}"))
        .unwrap_or_default();
    format!("module `{}` is {}{why}", m.id(), m.status)
}

/// A snapshot of the registry, for resolving `module = "…"` while a pipeline is
/// checked.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// Name → versions, lowest first.
    versions: BTreeMap<String, Vec<ModuleVersion>>,
    /// Name → explicit default version.
    defaults: BTreeMap<String, String>,
    /// Where code blobs and trees live: `objects/` of the state directory.
    objects: Option<PathBuf>,
    /// Spec → exact version: a run resolves its specs as when it was created.
    pins: BTreeMap<String, String>,
}

/// The outcome of resolving one `module = "…"`.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub module: ModuleVersion,
    /// The wasm file (a blob of the store) or, for Python, the code tree's digest.
    pub path: PathBuf,
    /// Set when the version is deprecated.
    pub warning: Option<String>,
}

/// Why a spec does not resolve, with what exists.
#[derive(Debug, Clone)]
pub struct ResolveError {
    pub message: String,
    pub help: Option<String>,
}

/// What a module version's digest is the digest of, as the CLI labels it: the
/// wasm file's bytes, or the Python code tree (what `module list`, `module show`,
/// `runs show` and `lineage` all print; a step's cache key adds the runtime and
/// entry to a Python module's, so its `key_parts.code` is another digest).
pub fn digest_label(kind: &str) -> &'static str {
    if kind == "python" {
        "code tree"
    } else {
        "wasm file"
    }
}

/// `name`, `name@1.2.0` (exact), `name@^1.2`, `name@~1.2`, `name@>=1, <2`.
pub fn parse_spec(spec: &str) -> Result<(String, Option<String>), String> {
    let (name, req) = match spec.split_once('@') {
        Some((n, r)) => (n.trim(), Some(r.trim())),
        None => (spec.trim(), None),
    };
    if !valid_name(name) {
        return Err(format!(
            "`{name}` is not a module name: lowercase letters, digits and `-`"
        ));
    }
    match req {
        Some("") => Err(format!(
            "`{spec}`: a version requirement is missing after `@`"
        )),
        Some(r) => {
            if Version::parse(r).is_err() && VersionReq::parse(r).is_err() {
                return Err(format!(
                    "`{r}` is not a version or a requirement (1.2.0, ^1.2, ~1.2, >=1, <2)"
                ));
            }
            Ok((name.to_string(), Some(r.to_string())))
        }
        None => Ok((name.to_string(), None)),
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

impl ModuleIndex {
    pub fn new(
        versions: Vec<ModuleVersion>,
        defaults: BTreeMap<String, String>,
        objects: Option<PathBuf>,
    ) -> ModuleIndex {
        let mut by_name: BTreeMap<String, Vec<ModuleVersion>> = BTreeMap::new();
        for v in versions {
            by_name.entry(v.name.clone()).or_default().push(v);
        }
        for list in by_name.values_mut() {
            list.sort_by_key(ModuleVersion::semver);
        }
        ModuleIndex {
            versions: by_name,
            defaults,
            objects,
            pins: BTreeMap::new(),
        }
    }

    /// Reads the registry of a store.
    pub fn load(store: &crate::store::Store) -> crate::store::db::Result<Arc<ModuleIndex>> {
        let db = store.db();
        let versions = db.read().module_versions(None)?;
        let defaults = db.read().module_defaults()?;
        Ok(Arc::new(ModuleIndex::new(
            versions,
            defaults,
            Some(store.root.join("objects")),
        )))
    }

    /// The same registry, resolving each spec in `pins` to its recorded version.
    pub fn pinned(&self, pins: BTreeMap<String, String>) -> ModuleIndex {
        ModuleIndex {
            pins,
            ..self.clone()
        }
    }

    pub fn versions(&self, name: &str) -> &[ModuleVersion] {
        self.versions.get(name).map_or(&[], Vec::as_slice)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.versions.keys()
    }

    pub fn default_of(&self, name: &str) -> Option<&str> {
        self.defaults.get(name).map(String::as_str)
    }

    fn listing(&self, name: &str) -> String {
        let list: Vec<String> = self
            .versions(name)
            .iter()
            .map(|v| {
                let mut s = v.version.clone();
                if v.status != "active" {
                    s.push_str(&format!(" ({})", v.status));
                }
                if self.default_of(name) == Some(&v.version) {
                    s.push_str(" (default)");
                }
                s
            })
            .collect();
        format!("versions of `{name}`: {}", list.join(", "))
    }

    /// Resolves a spec: the explicit default (else the highest active version)
    /// without a requirement, the exact version for `@1.2.0`, the highest active
    /// match for a range (a deprecated one only when no active version matches).
    pub fn resolve(&self, spec: &str) -> Result<Resolved, ResolveError> {
        let (name, req) = parse_spec(spec).map_err(|m| ResolveError {
            message: m,
            help: None,
        })?;
        let versions = self.versions(&name);
        if versions.is_empty() {
            let known: Vec<&str> = self.names().map(String::as_str).collect();
            return Err(ResolveError {
                message: format!("unknown module `{name}`"),
                help: Some(match crate::diagnostic::closest(&name, known.iter().copied()) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None if known.is_empty() => {
                        "the registry is empty: publish with `millrace module publish PATH --name N --version X.Y.Z`".into()
                    }
                    None => format!("published modules: {}", known.join(", ")),
                }),
            });
        }
        let pinned = self.pins.get(spec).cloned();
        let exact = pinned.clone().or_else(|| {
            req.as_deref()
                .filter(|r| Version::parse(r).is_ok())
                .map(str::to_string)
        });
        let chosen: &ModuleVersion = if let Some(v) = exact {
            let want = Version::parse(&v).ok();
            versions
                .iter()
                .find(|m| m.semver() == want)
                .ok_or_else(|| ResolveError {
                    message: format!("module `{name}` has no version {v}"),
                    help: Some(self.listing(&name)),
                })?
        } else if let Some(r) = &req {
            let req = VersionReq::parse(r).map_err(|e| ResolveError {
                message: format!("`{r}`: {e}"),
                help: None,
            })?;
            let matching = |status: &str| {
                versions
                    .iter()
                    .rev()
                    .find(|m| m.status == status && m.semver().is_some_and(|v| req.matches(&v)))
            };
            matching("active")
                .or_else(|| matching("deprecated"))
                .ok_or_else(|| ResolveError {
                    message: format!("no usable version of `{name}` matches `{r}`"),
                    help: Some(self.listing(&name)),
                })?
        } else if let Some(d) = self.default_of(&name) {
            versions
                .iter()
                .find(|m| m.version == d)
                .ok_or_else(|| ResolveError {
                    message: format!("the default version {d} of `{name}` is not in the registry"),
                    help: Some(self.listing(&name)),
                })?
        } else {
            let stable = |m: &&ModuleVersion| m.semver().is_some_and(|v| v.pre.is_empty());
            versions
                .iter()
                .rev()
                .filter(|m| m.status == "active")
                .find(stable)
                .or_else(|| versions.iter().rev().find(|m| m.status == "active"))
                .or_else(|| versions.iter().rev().find(|m| m.status == "deprecated"))
                .ok_or_else(|| ResolveError {
                    message: format!("module `{name}` has no usable version"),
                    help: Some(self.listing(&name)),
                })?
        };
        if chosen.status == "disabled" {
            return Err(ResolveError {
                message: status_line(chosen),
                help: Some(format!(
                    "{}; pin another version, or `millrace module enable {}`",
                    self.listing(&name),
                    chosen.id()
                )),
            });
        }
        let warning = (chosen.status == "deprecated").then(|| status_line(chosen));
        let objects = self.objects.clone().unwrap_or_default();
        let path = if chosen.kind == "wasm" {
            objects
                .join("blobs")
                .join(&chosen.digest[..2])
                .join(&chosen.digest[2..])
        } else {
            objects
                .join("trees")
                .join(&chosen.digest[..2])
                .join(&chosen.digest[2..])
        };
        Ok(Resolved {
            module: chosen.clone(),
            path,
            warning,
        })
    }
}

/// Why the registry refuses a change.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request breaks a rule of the registry, or names what it does not hold.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Db(#[from] crate::store::db::DbError),
}

fn refused(message: impl Into<String>) -> RegistryError {
    RegistryError::Refused(message.into())
}

/// What a version's code is, once [`check_publish`] accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeKind {
    /// A .wasm file (component or module).
    Wasm,
    /// A Python code directory with an entry script.
    Python,
}

impl CodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CodeKind::Wasm => "wasm",
            CodeKind::Python => "python",
        }
    }
}

/// A publish request that passed the rules: the version, normalised, and the kind
/// of code at the path.
#[derive(Debug, Clone)]
pub struct Checked {
    pub version: String,
    pub kind: CodeKind,
    pub entry: Option<String>,
}

/// The rules a new version must pass before its code enters the store: a module
/// name, a semver version without build metadata (at most 64 characters), and
/// either a WebAssembly file or a directory with `entry`, a `.py` file inside it.
pub fn check_publish(
    path: &std::path::Path,
    name: &str,
    version: &str,
    entry: Option<String>,
) -> Result<Checked, RegistryError> {
    if !valid_name(name) {
        return Err(refused(format!(
            "`{name}` is not a module name: lowercase letters, digits and `-`"
        )));
    }
    let parsed = Version::parse(version).map_err(|e| {
        refused(format!(
            "`{version}` is not a semver version ({e}); write MAJOR.MINOR.PATCH, e.g. 1.2.0"
        ))
    })?;
    if !parsed.build.is_empty() || version.len() > 64 {
        return Err(refused(format!(
            "`{version}`: write MAJOR.MINOR.PATCH[-PRERELEASE] without build metadata (`+…`), at most 64 characters"
        )));
    }
    let meta = std::fs::metadata(path)
        .map_err(|e| refused(format!("cannot read {}: {e}", path.display())))?;
    let (kind, entry) = if meta.is_dir() {
        let Some(entry) = entry else {
            return Err(refused(format!(
                "{} is a directory: a Python module needs --entry SCRIPT.py",
                path.display()
            )));
        };
        let inside = std::path::Path::new(&entry)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside || !entry.ends_with(".py") || !path.join(&entry).is_file() {
            return Err(refused(format!(
                "--entry {entry}: no such .py file in {}",
                path.display()
            )));
        }
        (CodeKind::Python, Some(entry))
    } else {
        if entry.is_some() {
            return Err(refused("--entry applies to a Python code directory"));
        }
        let mut magic = [0u8; 4];
        let is_wasm = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\0asm";
        if !is_wasm {
            return Err(refused(format!(
                "{} is not a WebAssembly file (component or module)",
                path.display()
            )));
        }
        (CodeKind::Wasm, None)
    };
    Ok(Checked {
        version: parsed.to_string(),
        kind,
        entry,
    })
}

/// Records a version whose code is in the store. Versions are immutable: the same
/// content again is no change (`Ok(false)`), other content, or the same content
/// as another kind or entry, is refused. `Ok(true)`: newly published.
pub fn record(store: &crate::store::Store, m: &ModuleVersion) -> Result<bool, RegistryError> {
    let existing = store.db().batch(|b| b.publish_module(m))?;
    match existing {
        None => Ok(true),
        Some(d) if d == m.digest => {
            let recorded = store.db().read().module_versions(Some(&m.name))?;
            if let Some(r) = recorded.iter().find(|r| r.version == m.version)
                && (r.kind != m.kind || r.entry != m.entry)
            {
                return Err(refused(format!(
                    "{} is already published with this content but as {} (entry {}); versions are immutable, publish a new version",
                    m.id(),
                    r.kind,
                    r.entry.as_deref().unwrap_or("-")
                )));
            }
            Ok(false)
        }
        Some(d) => Err(refused(format!(
            "{} is already published with other content: registry {d}, this {}; versions are immutable, publish a new version",
            m.id(),
            m.digest
        ))),
    }
}

/// NAME@VERSION (exact) in the registry, or a refusal listing what exists.
pub fn find(store: &crate::store::Store, spec: &str) -> Result<ModuleVersion, RegistryError> {
    let Some((name, version)) = spec.split_once('@') else {
        return Err(refused(format!("write NAME@VERSION, e.g. {spec}@1.0.0")));
    };
    let versions = store.db().read().module_versions(Some(name))?;
    if versions.is_empty() {
        return Err(refused(format!("unknown module `{name}`")));
    }
    let want = Version::parse(version).ok();
    versions
        .iter()
        .find(|m| m.version == version || (want.is_some() && m.semver() == want))
        .cloned()
        .ok_or_else(|| {
            let list: Vec<&str> = versions.iter().map(|m| m.version.as_str()).collect();
            refused(format!(
                "module `{name}` has no version {version} (versions: {})",
                list.join(", ")
            ))
        })
}

/// Deprecates a version: it still runs, with a warning. A disabled version must be
/// enabled first.
pub fn deprecate(
    store: &crate::store::Store,
    m: &ModuleVersion,
    message: Option<&str>,
) -> Result<(), RegistryError> {
    if m.status == "disabled" {
        return Err(refused(format!(
            "{} is disabled; `millrace module enable {}` first if it should run again",
            m.id(),
            m.id()
        )));
    }
    store
        .db()
        .read()
        .set_module_status(&m.name, &m.version, "deprecated", message)?;
    Ok(())
}

/// Whether `disable` may go ahead: not the default of its name, and no pipeline
/// (`resolving` of them, counted by the caller) resolves to it, unless `force`.
pub fn check_disable(
    store: &crate::store::Store,
    m: &ModuleVersion,
    resolving: usize,
    force: bool,
) -> Result<(), RegistryError> {
    let is_default = store.db().read().module_defaults()?.get(&m.name) == Some(&m.version);
    if is_default && !force {
        return Err(refused(format!(
            "{} is the default of `{}`: `module = \"{}\"` would fail validation; make another version the default, or pass --force",
            m.id(),
            m.name,
            m.name
        )));
    }
    if resolving > 0 && !force {
        return Err(refused(format!(
            "{resolving} pipeline(s) still resolve to {}: they would fail validation; pin them to another version, or pass --force",
            m.id()
        )));
    }
    Ok(())
}

/// Disables a version that passed [`check_disable`]: pipelines resolving to it
/// fail validation.
pub fn disable(
    store: &crate::store::Store,
    m: &ModuleVersion,
    message: Option<&str>,
) -> Result<(), RegistryError> {
    store
        .db()
        .read()
        .set_module_status(&m.name, &m.version, "disabled", message)?;
    Ok(())
}

/// Makes a deprecated or disabled version active again.
pub fn enable(store: &crate::store::Store, m: &ModuleVersion) -> Result<(), RegistryError> {
    store
        .db()
        .read()
        .set_module_status(&m.name, &m.version, "active", None)?;
    Ok(())
}

/// Makes `m` what `module = "NAME"` resolves to; a disabled version cannot be.
pub fn make_default(store: &crate::store::Store, m: &ModuleVersion) -> Result<(), RegistryError> {
    if m.status == "disabled" {
        return Err(refused(format!(
            "{} is disabled: enable it before making it the default",
            m.id()
        )));
    }
    store
        .db()
        .batch(|b| b.set_module_default(&m.name, &m.version))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(version: &str, status: &str) -> ModuleVersion {
        ModuleVersion {
            name: "clean".into(),
            version: version.into(),
            kind: "wasm".into(),
            digest: format!("{:0>64}", version.replace('.', "")),
            artifact: String::new(),
            size: 1,
            entry: None,
            description: None,
            status: status.into(),
            message: None,
            published_at: 0,
        }
    }

    fn index(defaults: &[(&str, &str)]) -> ModuleIndex {
        ModuleIndex::new(
            vec![
                v("1.0.0", "active"),
                v("1.2.0", "active"),
                v("1.2.5", "deprecated"),
                v("1.3.0", "disabled"),
                v("2.0.0-rc.1", "active"),
                v("0.9.0", "active"),
            ],
            defaults
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            None,
        )
    }

    fn pick(i: &ModuleIndex, spec: &str) -> Result<String, String> {
        i.resolve(spec)
            .map(|r| r.module.version)
            .map_err(|e| e.message)
    }

    #[test]
    fn publishing_needs_a_name_a_plain_semver_and_wasm_or_an_entry_script() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("a.wasm");
        std::fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
        let code = dir.path().join("code");
        std::fs::create_dir(&code).unwrap();
        std::fs::write(code.join("main.py"), "print(1)\n").unwrap();
        let refused = |path: &std::path::Path, name: &str, version: &str, entry: Option<&str>| {
            match check_publish(path, name, version, entry.map(str::to_string)) {
                Err(RegistryError::Refused(m)) => m,
                other => panic!("{name}@{version}: {other:?}"),
            }
        };
        let ok = check_publish(&wasm, "clean", "1.2.0", None).unwrap();
        assert_eq!((ok.kind, ok.version.as_str()), (CodeKind::Wasm, "1.2.0"));
        let py = check_publish(&code, "train", "0.1.0-rc.1", Some("main.py".into())).unwrap();
        assert_eq!(
            (py.kind, py.entry.as_deref()),
            (CodeKind::Python, Some("main.py"))
        );
        assert!(refused(&wasm, "Clean", "1.0.0", None).contains("not a module name"));
        assert!(refused(&wasm, "clean", "1.0", None).contains("not a semver version"));
        assert!(refused(&wasm, "clean", "1.0.0+build", None).contains("build metadata"));
        assert!(refused(&code, "train", "1.0.0", None).contains("needs --entry"));
        assert!(refused(&code, "train", "1.0.0", Some("../main.py")).contains("no such .py"));
        assert!(refused(&wasm, "clean", "1.0.0", Some("main.py")).contains("--entry applies"));
        assert!(refused(&code.join("main.py"), "x", "1.0.0", None).contains("not a WebAssembly"));
    }

    #[test]
    fn every_spec_form_resolves_to_the_highest_usable_match() {
        let i = index(&[]);
        assert_eq!(pick(&i, "clean").unwrap(), "1.2.0", "highest active stable");
        assert_eq!(pick(&i, "clean@1.0.0").unwrap(), "1.0.0");
        assert_eq!(pick(&i, "clean@^1.0").unwrap(), "1.2.0");
        assert_eq!(pick(&i, "clean@~1.2").unwrap(), "1.2.0");
        assert_eq!(pick(&i, "clean@>=1, <2").unwrap(), "1.2.0");
        assert_eq!(
            pick(&i, "clean@=1.2.5").unwrap(),
            "1.2.5",
            "deprecated runs"
        );
        assert!(i.resolve("clean@1.2.5").unwrap().warning.is_some());
        assert!(pick(&i, "clean@1.3.0").unwrap_err().contains("disabled"));
        assert!(
            pick(&i, "clean@^3")
                .unwrap_err()
                .contains("no usable version")
        );
        assert!(
            pick(&i, "clean@4.0.0")
                .unwrap_err()
                .contains("no version 4.0.0")
        );
        assert!(pick(&i, "clena").unwrap_err().contains("unknown module"));
        assert_eq!(pick(&i, "clean@>=2.0.0-rc.1").unwrap(), "2.0.0-rc.1");
        let d = index(&[("clean", "1.0.0")]);
        assert_eq!(pick(&d, "clean").unwrap(), "1.0.0", "explicit default");
        let pinned = i.pinned([("clean@^1.0".to_string(), "1.0.0".to_string())].into());
        assert_eq!(pick(&pinned, "clean@^1.0").unwrap(), "1.0.0");
        assert!(parse_spec("clean@").is_err());
        assert!(parse_spec("clean@banana").is_err());
        assert!(parse_spec("Clean").is_err());
    }
}
