//! Reading what the state holds: `runs`, `runs show`, `logs`, `metrics`,
//! `lineage`, `output`, and `gc`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::{Error, duration, run_id, time};
use crate::model::{Placement, RunStatus, StepStatus};
use crate::planner::short;
use crate::store::Store;

/// What a reader is told of a run's status ([`RunStatus::shown`]).
pub(super) fn shown_status(store: &Store, id: i64, status: RunStatus) -> RunStatus {
    status.shown(|| crate::engine::RunLock::is_held(store, id))
}

pub(super) fn runs_list(
    store: &Store,
    pipeline: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<i32> {
    let mut runs: Vec<crate::view::RunRecord> = store
        .db()
        .read()
        .runs(pipeline, limit)?
        .into_iter()
        .map(Into::into)
        .collect();
    for r in &mut runs {
        r.status = shown_status(store, r.id, r.status);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(0);
    }
    if runs.is_empty() {
        println!("no runs yet");
        return Ok(0);
    }
    println!(
        "{:>5}  {:20}  {:11}  {:20}  {:>10}  trigger",
        "run", "pipeline", "status", "started", "duration"
    );
    for r in runs {
        println!(
            "{:>5}  {:20}  {:11}  {:20}  {:>10}  {}",
            r.id,
            r.pipeline,
            r.status,
            time(r.started_at),
            if r.status == RunStatus::Interrupted {
                "-".to_string()
            } else {
                duration(r.started_at, r.finished_at)
            },
            r.trigger
        );
    }
    Ok(0)
}

/// `tool@1.1.0 (wasm file 1a2b3c4d)`: a module version with the digest the
/// registry lists for it (`module list`), not the step's `key_parts.code` (for a
/// Python module that also covers the runtime and entry).
pub(super) fn module_shown(store: &Store, id: &str) -> String {
    let digest = id.split_once('@').and_then(|(name, version)| {
        let versions = store.db().read().module_versions(Some(name)).ok()?;
        let m = versions.into_iter().find(|m| m.version == version)?;
        Some(format!(
            " ({} {})",
            crate::module::digest_label(&m.kind),
            short(&m.digest)
        ))
    });
    format!("{id}{}", digest.unwrap_or_default())
}

pub(super) fn runs_show(store: &Store, run: &str, json: bool) -> anyhow::Result<i32> {
    let id = run_id(store, run)?;
    let mut v = crate::view::RunView::load(store, id)?.context("run vanished")?;
    v.run.status = shown_status(store, id, v.run.status);
    for s in &mut v.steps {
        s.status = s.status.shown(v.run.status);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let r = &v.run;
    println!("run {}  {}  {}", r.id, r.pipeline, r.status);
    println!("  experiment  {}", r.experiment);
    println!("  definition  {}", short(&r.definition));
    println!("  trigger     {}", r.trigger);
    println!(
        "  params      {}",
        crate::store::artifacts::escape_controls(&r.params.to_string())
    );
    // An interrupted run has no end: "N s so far" would grow forever.
    let took = if r.status == RunStatus::Interrupted {
        "interrupted".to_string()
    } else {
        duration(r.started_at, r.finished_at)
    };
    println!("  started     {}  ({took})", time(r.started_at));
    if let Some(e) = &r.error {
        println!("  error       {e}");
    }
    for w in &r.warnings {
        println!("  warning     {w}");
    }
    for i in &v.inputs {
        println!("  input {}  {}  {}", i.name, short(&i.artifact), i.path);
    }
    println!();
    let width = v.steps.iter().map(|s| s.name.len()).max().unwrap_or(4);
    for s in &v.steps {
        let extra = match (s.reused_from, &s.error) {
            (Some(from), _) => format!("from run {from}"),
            (None, Some(e)) => e.clone(),
            _ => String::new(),
        };
        let attempts = if s.attempts.len() > 1 {
            format!("  {} attempts", s.attempts.len())
        } else {
            String::new()
        };
        let status = s.status;
        let took = if status == StepStatus::Interrupted {
            "-".to_string()
        } else {
            duration(s.started_at, s.finished_at)
        };
        println!(
            "  {:width$}  {status:11}  {took:>8}{attempts}  {extra}",
            s.name,
        );
        if let Some(m) = &s.module {
            println!("  {:width$}    module {}", "", module_shown(store, m));
        }
        match &s.placement {
            Some(Placement::Slurm(p)) => println!(
                "  {:width$}    slurm job {} on {}  (compute {})",
                "",
                p.job_id.as_deref().unwrap_or("?"),
                p.node.as_deref().unwrap_or("(not started)"),
                p.compute,
            ),
            Some(Placement::Container(p)) => println!(
                "  {:width$}    image {} {}  container {} on {}",
                "",
                p.image,
                short(p.image_id.trim_start_matches("sha256:")),
                p.container,
                p.engine,
            ),
            None => {}
        }
        if let Some(py) = &s.python {
            println!("  {:width$}    python: {py}", "");
        }
        if let Some(items) = &s.items {
            println!("  {:width$}    {}", "", items.summary());
            let failed = items.list.iter().filter(|i| i.status == StepStatus::Failed);
            for i in failed.take(10) {
                println!(
                    "  {:width$}      failed {}: {}",
                    "",
                    crate::store::artifacts::escape_controls(&i.name),
                    i.error.as_deref().unwrap_or("")
                );
            }
        }
        for o in &s.outputs {
            println!("  {:width$}    → {} {}", "", o.output, short(&o.artifact));
        }
    }
    Ok(0)
}

pub(super) async fn logs(
    store: &Store,
    run: &str,
    step: Option<&str>,
    follow: bool,
) -> anyhow::Result<i32> {
    let id = run_id(store, run)?;
    let steps = store.db().read().steps(id)?;
    let names: Vec<String> = match step {
        Some(s) => {
            if !steps.iter().any(|x| x.name == s) {
                let known: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::usage(format!(
                    "run {id} has no step `{s}` (steps: {})",
                    known.join(", ")
                ))
                .into());
            }
            vec![s.to_string()]
        }
        None => steps.iter().map(|s| s.name.clone()).collect(),
    };
    let mut offsets: std::collections::HashMap<String, u64> = Default::default();
    let mut out = std::io::stdout().lock();
    // A foreach step's items log under `STEP[ITEM]`.
    let mut rows: Vec<String> = Vec::new();
    for name in &names {
        rows.push(name.clone());
        for item in store.db().read().items(id, name)? {
            rows.push(format!("{name}[{}]", item.item));
        }
    }
    let names = rows;
    loop {
        for name in &names {
            for a in store.db().read().attempts(id, name)? {
                let Some(path) = a.log_path else { continue };
                let key = path.clone();
                let seen = offsets.get(&key).copied().unwrap_or(0);
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                if bytes.len() as u64 > seen {
                    if seen == 0 && names.len() + usize::from(a.attempt > 1) > 1 {
                        writeln!(out, "==> {name} (attempt {}) <==", a.attempt)?;
                    }
                    out.write_all(&bytes[seen as usize..])?;
                    offsets.insert(key, bytes.len() as u64);
                }
            }
        }
        out.flush()?;
        let r = store.db().read().run(id)?.context("run vanished")?;
        if !follow || r.status != RunStatus::Running || !crate::engine::RunLock::is_held(store, id)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(0)
}

pub(super) fn metrics(store: &Store, runs: &[String], json: bool) -> anyhow::Result<i32> {
    let ids: Vec<i64> = runs
        .iter()
        .map(|r| run_id(store, r))
        .collect::<anyhow::Result<_>>()?;
    let mut table: std::collections::BTreeMap<(String, String), Vec<Option<String>>> =
        Default::default();
    let mut all = Vec::new();
    for (col, id) in ids.iter().enumerate() {
        let rows = store.db().read().metrics(*id)?;
        for m in &rows {
            let cell = table
                .entry((m.step.clone(), m.name.clone()))
                .or_insert_with(|| vec![None; ids.len()]);
            // A curve (with `step` indexes) shows its last value and its length.
            let shown = match m.step_index {
                Some(ix) => format!("{} (@{ix})", fmt_num(m.value)),
                None => fmt_num(m.value),
            };
            cell[col] = Some(shown);
        }
        all.push(serde_json::json!({"run": id, "metrics": rows}));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    if table.is_empty() {
        println!("no metrics recorded");
        return Ok(0);
    }
    let width = table
        .keys()
        .map(|(s, n)| s.len() + n.len() + 1)
        .max()
        .unwrap_or(6);
    print!("{:width$}", "metric");
    for id in &ids {
        print!("  {:>16}", format!("run {id}"));
    }
    println!();
    for ((step, name), cells) in table {
        // Metric names are the guest's text.
        let shown = crate::store::artifacts::escape_controls(&format!("{step}.{name}"));
        print!("{shown:width$}");
        for c in cells {
            print!("  {:>16}", c.unwrap_or_else(|| "-".into()));
        }
        println!();
    }
    Ok(0)
}

pub(super) fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() < 1e-4 || v.abs() >= 1e9 {
        format!("{v:.3e}")
    } else {
        format!("{v:.6}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

pub(super) fn resolve_artifact(store: &Store, text: &str) -> anyhow::Result<String> {
    let matches = store.db().read().artifacts_with_prefix(text)?;
    match matches.len() {
        1 => Ok(matches[0].clone()),
        0 => Err(Error::usage(format!("no artifact starts with `{text}`")).into()),
        _ => Err(Error::usage(format!(
            "`{text}` matches several artifacts; give more digits"
        ))
        .into()),
    }
}

pub(super) fn lineage(store: &Store, artifact: &str, json: bool) -> anyhow::Result<i32> {
    // Accept RUN STEP.OUTPUT's artifact too: `lineage 12:train.model`.
    let digest = match artifact.split_once(':') {
        Some((run, out)) => {
            let id = run_id(store, run)?;
            let (step, o) = out
                .split_once('.')
                .ok_or_else(|| Error::usage("write RUN:STEP.OUTPUT"))?;
            store
                .db()
                .read()
                .step_outputs(id, step)?
                .into_iter()
                .find(|(n, _)| n == o)
                .map(|(_, d)| d)
                .ok_or_else(|| Error::usage(format!("run {id} has no output {out}")))?
        }
        None => resolve_artifact(store, artifact)?,
    };
    let rows = store.db().read().lineage(&digest)?;
    let (size, files) = store.db().read().artifact(&digest)?.unwrap_or((0, 0));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"artifact": digest, "size": size, "files": files, "uses": rows})
            )?
        );
        return Ok(0);
    }
    println!("artifact {digest}  ({files} files, {size} bytes)");
    for r in rows {
        let module = || {
            // (The read ends before module_shown reads again.)
            let step = store.db().read().step(r.run_id, &r.step).ok().flatten();
            step.and_then(|s| Some(format!(" by module {}", module_shown(store, &s.module?))))
                .unwrap_or_default()
        };
        match r.role.as_str() {
            "output" => println!(
                "  produced by run {} {}.{} ({}){}",
                r.run_id,
                r.step,
                r.name,
                r.pipeline,
                module()
            ),
            "reused" => println!(
                "  reused by   run {} {}.{} (from run {}) ({})",
                r.run_id,
                r.step,
                r.name,
                r.reused_from.map_or("?".to_string(), |f| f.to_string()),
                r.pipeline
            ),
            "input" => println!(
                "  read by     run {} {} as /in/{} ({})",
                r.run_id, r.step, r.name, r.pipeline
            ),
            _ => println!(
                "  input       run {} inputs.{} ({})",
                r.run_id, r.name, r.pipeline
            ),
        }
    }
    Ok(0)
}

pub(super) fn output_cmd(
    store: &Store,
    run: &str,
    output: &str,
    dir: Option<&Path>,
) -> anyhow::Result<i32> {
    let id = run_id(store, run)?;
    let (step, name) = output
        .split_once('.')
        .ok_or_else(|| Error::usage(format!("`{output}`: write STEP.OUTPUT")))?;
    let outs = store.db().read().step_outputs(id, step)?;
    let Some((_, digest)) = outs.iter().find(|(o, _)| o == name) else {
        let known: Vec<String> = outs.iter().map(|(o, _)| format!("{step}.{o}")).collect();
        return Err(Error::usage(format!(
            "run {id} has no output `{output}`{}",
            if known.is_empty() {
                String::new()
            } else {
                format!(" (outputs: {})", known.join(", "))
            }
        ))
        .into());
    };
    store
        .verify(digest)
        .with_context(|| format!("artifact {} is not intact", short(digest)))?;
    match dir {
        Some(d) => {
            store.artifacts.export(digest, d)?;
            eprintln!("{output} of run {id} → {}", d.display());
        }
        None => {
            let entries = store.artifacts.list(digest)?;
            match entries.as_slice() {
                [one] if one.kind == crate::store::artifacts::EntryKind::File => {
                    let bytes = std::fs::read(store.artifacts.blob_path(&one.digest))?;
                    std::io::stdout().write_all(&bytes)?;
                }
                _ => {
                    // Names are the guest's: escaped, so no terminal takes one for a command.
                    let names: Vec<String> = entries
                        .iter()
                        .map(|e| crate::store::artifacts::escape_controls(&e.name))
                        .collect();
                    return Err(Error::usage(format!(
                        "{output} holds {} entries ({}); use -o DIR to copy them",
                        entries.len(),
                        names.join(", ")
                    ))
                    .into());
                }
            }
        }
    }
    Ok(0)
}

pub(super) fn gc(store: &Store, keep: i64, json: bool) -> anyhow::Result<i32> {
    use crate::store::gc::{self, GcError};
    let held = |id| crate::engine::RunLock::is_held(store, id);
    let c = gc::collect(store, keep, &held).map_err(|e| match e {
        GcError::Refused(m) => Error::usage(m).into(),
        other => anyhow::Error::new(other),
    })?;
    if json {
        println!("{}", serde_json::to_string(&c)?);
    } else {
        println!(
            "deleted {} runs and {} objects ({} bytes)",
            c.runs_deleted, c.objects_deleted, c.bytes_freed
        );
    }
    Ok(0)
}
