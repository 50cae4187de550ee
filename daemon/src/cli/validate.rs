//! Reading pipeline files for the commands that take one (`validate`, `run`,
//! `plan`, `graph`): every error reported, bad configuration exits 78.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{EXIT_CONFIG, Error, open_store};
use crate::config::Config;
use crate::definition::{self, Pipeline};
use crate::diagnostic::{Report, display_path};

/// What pipelines are checked against: the state's registry (read only if it
/// exists: a bad file must leave nothing behind) and a config's targets.
pub(super) fn environment_for(
    state: &Path,
    config: Option<&Config>,
) -> anyhow::Result<definition::Environment> {
    let mut env = environment(state)?;
    if let Some(c) = config {
        let from = c.environment();
        env.datastores = from.datastores;
        env.datastore_paths = from.datastore_paths;
        env.computes = from.computes;
        env.secrets = from.secrets;
    }
    Ok(env)
}

/// Loads and checks a pipeline file; bad configuration exits 78 with every error.
pub(super) fn load_in(
    path: &Path,
    env: &definition::Environment,
) -> anyhow::Result<(Pipeline, String)> {
    let (pipeline, report) = crate::graph::load(path, env)
        .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
    match pipeline {
        Some(p) => {
            if !report.diagnostics.is_empty() {
                eprint!("{report}");
            }
            Ok((p, report.source.text))
        }
        None => Err(Error::Report(format!("{report}{}", summary_line(&report))).into()),
    }
}

pub(super) fn summary_line(report: &Report) -> String {
    let n = report.error_count();
    format!(
        "error: {} has {n} error{}\n",
        display_path(&report.source.path),
        if n == 1 { "" } else { "s" }
    )
}

/// Files named, and the `*.toml` files of directories named.
pub(super) fn expand_dirs(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|e| e == "toml"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

pub(super) fn validate(paths: &[PathBuf], state: &Path, json: bool) -> anyhow::Result<i32> {
    validate_with(paths, &environment(state)?, json)
}

/// What pipelines are checked against outside the daemon: the module registry of
/// the state directory, if there is one (nothing is created to find out).
pub(crate) fn environment(state: &Path) -> anyhow::Result<definition::Environment> {
    let mut env = definition::Environment::default();
    if state.join("millrace.db").is_file() {
        let store = open_store(state)?;
        env.modules = crate::module::ModuleIndex::load(&store)?;
    }
    Ok(env)
}

pub(super) fn validate_with(
    paths: &[PathBuf],
    env: &definition::Environment,
    json: bool,
) -> anyhow::Result<i32> {
    let files = expand_dirs(paths)?;
    let mut bad = 0;
    let mut out = Vec::new();
    for f in &files {
        match crate::graph::load(f, env) {
            Err(e) => {
                bad += 1;
                if json {
                    out.push(serde_json::json!({"file": display_path(f), "valid": false, "errors": [{"message": e.to_string()}]}));
                } else {
                    eprintln!("{}: error: cannot read: {e}", display_path(f));
                }
            }
            Ok((pipeline, report)) => {
                if pipeline.is_none() {
                    bad += 1;
                }
                if json {
                    out.push(serde_json::json!({
                        "file": display_path(f),
                        "valid": pipeline.is_some(),
                        "pipeline": pipeline.as_ref().map(|p| p.name.get_ref().clone()),
                        "diagnostics": report.to_json(),
                    }));
                } else if pipeline.is_some() {
                    eprint!("{report}");
                    println!(
                        "{}: ok ({} steps)",
                        display_path(f),
                        pipeline.as_ref().map_or(0, |p| p.steps.len())
                    );
                } else {
                    eprint!("{report}{}", summary_line(&report));
                }
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if bad > 0 { EXIT_CONFIG } else { 0 })
}

/// `--param K=V…` as given: each key once, nothing around the `=`. A repeated key
/// is refused (which one should win is a guess), and so is `n= 5` or `n =5`: the
/// shell split or quoted something the user did not mean, and a trimmed value
/// would run with another param than the one typed.
pub(super) fn parse_params(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(raw.len());
    for p in raw {
        let Some((k, v)) = p.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
            return Err(Error::usage(format!("--param expects KEY=VALUE, got `{p}`")).into());
        };
        if k.trim() != k || v.starts_with(char::is_whitespace) {
            return Err(Error::usage(format!(
                "--param `{p}`: no spaces around `=` (write `{}={}`)",
                k.trim(),
                v.trim_start()
            ))
            .into());
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(Error::usage(format!("--param `{k}` is given more than once")).into());
        }
        crate::definition::check_param_value(k, v).map_err(Error::usage)?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &[&str]) -> Result<Vec<(String, String)>, String> {
        let raw: Vec<String> = raw.iter().map(|s| s.to_string()).collect();
        parse_params(&raw).map_err(|e| e.to_string())
    }

    #[test]
    fn params_are_key_equals_value_each_key_once_without_spaces() {
        assert_eq!(
            parsed(&["n=5", "c=0.7", "s=a b"]).unwrap(),
            vec![
                ("n".into(), "5".into()),
                ("c".into(), "0.7".into()),
                ("s".into(), "a b".into())
            ]
        );
        assert_eq!(parsed(&["e="]).unwrap(), vec![("e".into(), "".into())]);
        let twice = parsed(&["n=5", "n=6"]).unwrap_err();
        assert!(twice.contains("`n` is given more than once"), "{twice}");
        for spaced in ["n= 5", "n =5", " n=5", "n = 5"] {
            let e = parsed(&[spaced]).unwrap_err();
            assert!(
                e.contains("no spaces around `=` (write `n=5`)"),
                "{spaced}: {e}"
            );
        }
        for bad in ["n", "=5", " =5"] {
            let e = parsed(&[bad]).unwrap_err();
            assert!(e.contains("expects KEY=VALUE"), "{bad}: {e}");
        }
    }
}
