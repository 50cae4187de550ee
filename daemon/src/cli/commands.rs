//! The commands that load a pipeline and drive the engine (`run`, `resume`,
//! `plan`, `graph`, `runtime prepare`) and the ones that describe the CLI itself
//! (`completions`, `manpage`); `dispatch` in `cli/mod.rs` routes to them.

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::progress::{cancel_on_signal, finish_run, progress, run_error};
use super::validate::{environment_for, load_in, parse_params};
use super::{Cli, CompletionShell, engine_for, engine_with_cache, graph, run_id, service, style};
use crate::diagnostic::display_path;
use crate::engine::RunRequest;
use crate::graph::Graph;
use crate::planner::{Planned, short};

/// `millrace run`'s arguments.
pub struct RunArgs {
    pub pipeline: PathBuf,
    pub params: Vec<String>,
    pub no_reuse: bool,
    pub max_parallel: Option<usize>,
    pub config: Option<PathBuf>,
}

/// `millrace run PIPELINE`: one run in this process, progress on stderr.
pub async fn run(state: &Path, args: RunArgs, json: bool) -> anyhow::Result<i32> {
    let config = args
        .config
        .as_deref()
        .map(service::load_config)
        .transpose()?;
    let (p, text) = load_in(&args.pipeline, &environment_for(state, config.as_ref())?)?;
    let params = parse_params(&args.params)?;
    let engine = engine_for(state, args.max_parallel, config)?;
    let cancel = cancel_on_signal();
    let events = progress(json, p.steps.len());
    let req = RunRequest {
        params,
        no_reuse: args.no_reuse,
        trigger: "cli".into(),
        trigger_detail: None,
    };
    let summary = engine
        .run(
            &p,
            &text,
            &std::path::absolute(&args.pipeline)?,
            req,
            events.sink(),
            cancel,
        )
        .await;
    events.finish();
    finish_run(summary, &engine.store, json)
}

/// `millrace resume RUN`: the run's remaining steps, under its own definition.
pub async fn resume(
    state: &Path,
    run: &str,
    config: Option<&Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let config = config.map(service::load_config).transpose()?;
    let engine = engine_for(state, None, config)?;
    let id = run_id(&engine.store, run)?;
    // Containers a killed `millrace run` left behind go first.
    engine.remove_orphan_containers().await;
    let steps = engine.store.db().read().steps(id)?.len();
    let events = progress(json, steps);
    let summary = engine.resume(id, events.sink(), cancel_on_signal()).await;
    events.finish();
    finish_run(summary, &engine.store, json)
}

/// `millrace plan PIPELINE`: what each step would do, without running anything.
pub async fn plan(
    state: &Path,
    pipeline: &Path,
    params: &[String],
    no_reuse: bool,
    config: Option<&Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let config = config.map(service::load_config).transpose()?;
    let (p, _) = load_in(pipeline, &environment_for(state, config.as_ref())?)?;
    let params = parse_params(params)?;
    let engine = engine_for(state, None, config)?;
    let plan = engine
        .plan(&p, &params, no_reuse)
        .await
        .map_err(run_error)?;
    // The params each step uses: the only ones in its key and its environment.
    let uses = |step: &str| p.step(step).map(|s| s.uses.clone()).unwrap_or_default();
    if json {
        let rows: Vec<_> = plan
            .iter()
            .map(|(s, d)| serde_json::json!({"step": s, "plan": d, "params": uses(s)}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let width = plan.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    for (step, d) in &plan {
        let line = match d {
            Planned::Reuse { run, .. } => format!("{step:width$}  reuse  from run {run}"),
            Planned::Run { reason } => format!("{step:width$}  run    {reason}"),
            Planned::Items {
                executed,
                reused,
                run,
            } => format!(
                "{step:width$}  items  {executed} to execute, {reused} reused{}",
                crate::view::items_named(run)
            ),
            Planned::Pending { upstream } => format!(
                "{step:width$}  run?   after {} (reused if its inputs come out unchanged)",
                upstream.join(", ")
            ),
        };
        match uses(step).as_slice() {
            [] => println!("{line}"),
            used => println!("{line}  (params: {})", used.join(", ")),
        }
    }
    Ok(0)
}

/// `millrace graph PIPELINE`: the DAG as text, dot or mermaid, or as JSON.
pub fn graph(
    state: &Path,
    pipeline: &Path,
    format: graph::GraphFormat,
    config: Option<&Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let config = config.map(service::load_config).transpose()?;
    let (p, _) = load_in(pipeline, &environment_for(state, config.as_ref())?)?;
    let g = Graph::new(&p);
    if json {
        println!("{}", serde_json::to_string_pretty(&graph::json(&g, &p))?);
    } else {
        print!("{}", graph::render(&g, &p, format));
    }
    Ok(0)
}

/// `millrace runtime prepare`: compiles the Python runtime and builds its warm
/// interpreter (which fails closed: without it, steps run on the base runtime).
pub async fn runtime_prepare(
    state: &Path,
    config: Option<&Path>,
    cache: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<i32> {
    let config = config.map(service::load_config).transpose()?;
    let (engine, _scratch) = match cache {
        None => {
            let state = config
                .as_ref()
                .map_or(state.to_path_buf(), |c| c.state_dir.clone());
            (engine_for(&state, None, config)?, None)
        }
        // Only the cache is wanted: the hashing the compile does needs a store, so a
        // throwaway one unless a config names the state.
        Some(dir) => {
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("the cache directory {}", dir.display()))?;
            let (state, scratch) = match &config {
                Some(c) => (c.state_dir.clone(), None),
                None => {
                    let d = std::env::temp_dir()
                        .join(format!("millrace-prepare-{}", std::process::id()));
                    (d.clone(), Some(Scratch(d)))
                }
            };
            (engine_with_cache(&state, None, config, Some(dir))?, scratch)
        }
    };
    let started = std::time::Instant::now();
    eprintln!("preparing the Python runtime (the first time takes a few minutes)…");
    let (dir, digest, cached) = engine.prepare_python().await.map_err(run_error)?;
    let base_seconds = started.elapsed().as_secs_f64();
    let what = if cached {
        "already compiled"
    } else {
        "compiled"
    };
    if !json {
        println!(
            "python runtime {} ({}) {what} in {base_seconds:.1}s; cache {}",
            display_path(&dir),
            short(&digest),
            display_path(&engine.store.wasm_cache_dir())
        );
    }
    let snapshot = if engine.config().python.snapshot {
        if !json {
            eprintln!(
                "building the warm interpreter with {} imported (the first time takes a few minutes)…",
                engine.config().python.preload.join(", ")
            );
        }
        Some(engine.prepare_python_snapshot().await)
    } else {
        None
    };
    if json {
        let snap = match &snapshot {
            Some(Ok(p)) => serde_json::json!(p),
            Some(Err(why)) => serde_json::json!({"error": why}),
            None => serde_json::json!({"error": "`[python] snapshot = false`"}),
        };
        println!(
            "{}",
            serde_json::json!({"runtime": display_path(&dir), "digest": digest, "cached": cached, "seconds": base_seconds, "snapshot": snap})
        );
        return Ok(0);
    }
    match &snapshot {
        Some(Ok(p)) => println!(
            "warm interpreter {} ({}) {} in {:.1}s + compiled in {:.1}s; {} preloaded; {:.1} MB, {:.1} MiB initial memory",
            display_path(&p.path),
            short(&p.recipe),
            if p.cached { "already built" } else { "built" },
            p.build_seconds,
            p.compile_seconds,
            p.preload.join(", "),
            p.bytes as f64 / 1e6,
            p.memory as f64 / f64::from(1 << 20)
        ),
        Some(Err(why)) => style::eprint_lines(&format!(
            "warning: no warm interpreter: {why}; Python steps run on the base runtime"
        )),
        None => println!("warm interpreter: off (`[python] snapshot = false`)"),
    }
    Ok(0)
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `millrace completions SHELL`: the completion script on stdout.
pub fn completions(shell: CompletionShell) -> anyhow::Result<i32> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "millrace",
        &mut std::io::stdout(),
    );
    Ok(0)
}

/// `millrace manpage [-o DIR]`: the manual page on stdout, or one page per
/// command into DIR.
pub fn manpage(dir: Option<&Path>) -> anyhow::Result<i32> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the pages into {}", dir.display()))?;
            eprintln!("manual pages written to {}", display_path(dir));
        }
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
    }
    Ok(0)
}
