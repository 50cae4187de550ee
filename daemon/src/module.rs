//! The module registry (SPEC "Modules"): versioned, content-addressed step code.
//!
//! A module version is a name, a semver version, a kind (`wasm`, or `python` with
//! an entry script), and the digest of its code in the artifact store: the blob of
//! a wasm file, the tree of a Python code directory. A version is immutable; its
//! status is `active`, `deprecated` or `disabled`, and every change is kept in
//! `module_events`. A pipeline step says `module = "name"`, `"name@1.2.0"` or
//! `"name@^1.2"`; [`ModuleIndex::resolve`] picks the version at validation time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use semver::{Version, VersionReq};

/// One published version.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleVersion {
    pub name: String,
    pub version: String,
    /// `wasm` or `python`.
    pub kind: String,
    pub digest: String,
    /// The artifact (a tree) that holds the code in the store.
    pub artifact: String,
    pub size: u64,
    /// The entry script of a Python module.
    pub entry: Option<String>,
    pub description: Option<String>,
    pub status: String,
    /// The deprecation (or disable) message.
    pub message: Option<String>,
    pub published_at: i64,
}

impl ModuleVersion {
    pub fn semver(&self) -> Option<Version> {
        Version::parse(&self.version).ok()
    }

    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// "module `n@v` is deprecated: use 1.1"
    fn status_line(&self) -> String {
        let why = self
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        format!("module `{}` is {}{why}", self.id(), self.status)
    }
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
                message: chosen.status_line(),
                help: Some(format!(
                    "{}; pin another version, or `millrace module enable {}`",
                    self.listing(&name),
                    chosen.id()
                )),
            });
        }
        let warning = (chosen.status == "deprecated").then(|| chosen.status_line());
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
