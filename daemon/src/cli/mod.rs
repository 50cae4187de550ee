//! The `millrace` command line: parses arguments, calls the engine and the store,
//! prints for people (or JSON with `--json`) and maps outcomes to exit codes
//! ([`error`]: 0 ok, 1 run failed, 2 usage, 78 bad configuration, 130 cancelled).
//!
//! By command group: [`validate`] (reading pipeline files), [`progress`] (`run`
//! and `resume` as they go), [`records`] (`runs`, `logs`, `metrics`, `lineage`,
//! `output`, `gc`), [`graph`], [`module`], [`service`] (the daemon and its
//! clients); here the arguments, the dispatch, `plan` and `explain`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::diagnostic::display_path;
use crate::engine::{Engine, EngineConfig, RunRequest};
use crate::graph::Graph;
use crate::planner::{Planned, short};
use crate::store::Store;
use crate::store::db::now_ms;

mod error;
mod graph;
mod module;
mod progress;
mod records;
mod service;
mod validate;

use progress::{cancel_on_signal, finish_run, progress, run_error};
use records::{gc, lineage, logs, metrics, output_cmd, runs_list, runs_show};
use validate::{
    environment, environment_for, expand_dirs, load, load_in, parse_params, validate, validate_with,
};

pub use error::{EXIT_CANCELLED, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Error};

#[derive(Parser, Debug)]
#[command(
    name = "millrace",
    version,
    about = "Sandboxed ML pipelines with content-addressed reuse"
)]
pub struct Cli {
    /// State directory: database, artifacts, logs.
    #[arg(
        long,
        global = true,
        env = "MILLRACE_STATE",
        default_value = ".millrace"
    )]
    state: PathBuf,
    /// Machine-readable output on read commands.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a pipeline in this process; the exit code is the result.
    Run {
        pipeline: PathBuf,
        /// Override a param: `--param c=0.7` (repeatable).
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        /// Execute every step, even when an earlier result could be reused.
        #[arg(long)]
        no_reuse: bool,
        /// Steps run at once (default: number of CPUs).
        #[arg(long)]
        max_parallel: Option<usize>,
        /// Take compute targets and datastores from this daemon config (the state
        /// directory stays --state).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check pipeline files (or every *.toml in directories): all errors at once.
    /// With --config: the daemon config and every file of its pipelines directory.
    Validate {
        #[arg(required_unless_present = "config")]
        paths: Vec<PathBuf>,
        /// A daemon config to check (and whose pipelines to check).
        #[arg(long)]
        config: Option<PathBuf>,
        /// With --config: check only the config. The daemon keeps running with an
        /// invalid pipeline file (its last valid version stays), so this is what
        /// systemd checks before a start or reload.
        #[arg(long, requires = "config")]
        config_only: bool,
    },
    /// Print the execution graph.
    Graph {
        pipeline: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: graph::GraphFormat,
    },
    /// Show which steps would run or be reused, and why, without running anything.
    Plan {
        pipeline: PathBuf,
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        #[arg(long)]
        no_reuse: bool,
        /// Compute targets and datastores from this daemon config.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run one staged step on this node (what a Slurm job runs).
    #[command(hide = true)]
    ExecStep { spec: PathBuf },
    /// Run history; `runs show RUN` for one run.
    Runs {
        #[command(subcommand)]
        show: Option<RunsCommand>,
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Print a step's log (every step's, without STEP).
    Logs {
        run: String,
        step: Option<String>,
        /// Keep printing while the run goes on.
        #[arg(short, long)]
        follow: bool,
    },
    /// Metrics of one or more runs, side by side.
    Metrics {
        #[arg(required = true)]
        runs: Vec<String>,
    },
    /// Why a step ran (what changed in its key, vs which run) or which run it reused.
    Explain { run: String, step: String },
    /// Where an artifact came from and where it was used.
    Lineage { artifact: String },
    /// Copy an output out of the store; a single file goes to stdout without -o.
    Output {
        run: String,
        /// `STEP.OUTPUT`
        output: String,
        #[arg(short = 'o', long)]
        dir: Option<PathBuf>,
    },
    /// Finish a failed or interrupted run, reusing the steps that succeeded.
    Resume {
        run: String,
        /// Compute targets and datastores from this daemon config.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Delete runs beyond the newest N per pipeline and the artifacts only they used.
    Gc {
        #[arg(long, default_value_t = 10)]
        keep: i64,
    },
    /// The Python runtime: `runtime prepare` compiles it ahead of its first use.
    Runtime {
        #[command(subcommand)]
        cmd: RuntimeCommand,
    },
    /// The module registry: versioned step code (publish, list, show, deprecate,
    /// disable, enable, default, export, import).
    Module {
        #[command(subcommand)]
        cmd: module::ModuleCommand,
    },
    /// Run the service: load and watch the pipelines directory, fire triggers,
    /// queue and run pipelines, serve the REST API. Stops on SIGTERM/SIGINT.
    Daemon {
        /// The daemon config (default: $MILLRACE_CONFIG, else /etc/millrace/millrace.toml).
        #[arg(long, env = "MILLRACE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Ask the running daemon to run a pipeline.
    Trigger {
        pipeline: String,
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        #[arg(long)]
        no_reuse: bool,
        /// Wait for the run to end; the exit code is its result.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        connect: service::Connect,
    },
    /// What the running daemon has loaded, which files are invalid, what runs.
    Status {
        #[command(flatten)]
        connect: service::Connect,
    },
    /// Next firings of cron triggers, in each trigger's time zone; with
    /// --simulate FROM TO every firing in that window (across DST changes).
    Schedule {
        /// Pipeline files or directories (default: the config's pipelines directory).
        paths: Vec<PathBuf>,
        #[arg(long, env = "MILLRACE_CONFIG")]
        config: Option<PathBuf>,
        /// Every firing in the window FROM..TO instead of the next ones from now
        /// (RFC 3339, or YYYY-MM-DD[THH:MM] in UTC); --count caps what is listed.
        #[arg(long, num_args = 2, value_names = ["FROM", "TO"])]
        simulate: Option<Vec<String>>,
        /// Firings listed per trigger (the earliest ones; "… N more" counts the rest).
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
}

#[derive(Subcommand, Debug)]
enum RuntimeCommand {
    /// Compile the Python runtime into the cache, then build and compile the warm
    /// interpreter with the `[python] preload` modules imported (minutes, once per
    /// machine, version and preload list; later steps load it in milliseconds).
    Prepare {
        /// The daemon config whose `[python]` section and state directory apply.
        #[arg(long, env = "MILLRACE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum RunsCommand {
    /// One run: its steps, status, timing, reuse and outputs.
    Show { run: String },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(matches!(cli.command, Command::Daemon { .. }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return EXIT_FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // A compile still running on a blocking thread (its run was cancelled) must
    // not hold the exit: its output is written by rename, so leaving is safe.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => code,
        Err(e) => {
            let (code, text) = error::report(&e);
            eprintln!("{text}");
            code
        }
    }
}

/// Logs go to stderr (level from `MILLRACE_LOG`, default `warn`; `info` for the
/// daemon), or to journald when systemd started us with `JOURNAL_STREAM`.
fn init_logging(daemon: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MILLRACE_LOG")
        .unwrap_or_else(|_| if daemon { "info" } else { "warn" }.into());
    let registry = tracing_subscriber::registry().with(filter);
    if daemon
        && std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        registry.with(journald).init();
        return;
    }
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let json = cli.json;
    match cli.command {
        Command::Validate {
            paths,
            config: Some(config),
            config_only,
        } => service::validate_config(&config, &paths, config_only, json),
        Command::Validate {
            paths,
            config: None,
            ..
        } => validate(&paths, &cli.state, json),
        Command::Daemon { config } => service::daemon(config.as_deref()).await,
        Command::Module { cmd } => module::run(&cli.state, cmd, json),
        Command::Runtime {
            cmd: RuntimeCommand::Prepare { config },
        } => {
            let config = config.as_deref().map(service::load_config).transpose()?;
            let state = config
                .as_ref()
                .map_or(cli.state.clone(), |c| c.state_dir.clone());
            let engine = engine_for(&state, None, config)?;
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
            // The warm interpreter fails closed: without it, steps run on the base.
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
            } else {
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
                    Some(Err(why)) => eprintln!(
                        "warning: no warm interpreter: {why}; Python steps run on the base runtime"
                    ),
                    None => println!("warm interpreter: off (`[python] snapshot = false`)"),
                }
            }
            Ok(0)
        }
        Command::Trigger {
            pipeline,
            params,
            no_reuse,
            wait,
            connect,
        } => {
            let params = parse_params(&params)?;
            service::trigger(
                &connect, &cli.state, &pipeline, &params, no_reuse, wait, json,
            )
        }
        Command::Status { connect } => service::status(&connect, &cli.state, json),
        Command::Schedule {
            paths,
            config,
            simulate,
            count,
        } => service::schedule(config.as_deref(), &paths, simulate.as_deref(), count, json),
        Command::Graph { pipeline, format } => {
            let (p, _) = load(&pipeline, &cli.state)?;
            print!("{}", graph::render(&Graph::new(&p), &p, format));
            Ok(0)
        }
        Command::Run {
            pipeline,
            params,
            no_reuse,
            max_parallel,
            config,
        } => {
            let config = config.as_deref().map(service::load_config).transpose()?;
            let (p, text) = load_in(&pipeline, &environment_for(&cli.state, config.as_ref())?)?;
            let params = parse_params(&params)?;
            let engine = engine_for(&cli.state, max_parallel, config)?;
            let cancel = cancel_on_signal();
            let events = progress(json, p.steps.len());
            let req = RunRequest {
                params,
                no_reuse,
                trigger: "cli".into(),
                trigger_detail: None,
            };
            let summary = engine
                .run(
                    &p,
                    &text,
                    &std::path::absolute(&pipeline)?,
                    req,
                    events.sink(),
                    cancel,
                )
                .await;
            events.finish();
            finish_run(summary, json)
        }
        Command::ExecStep { spec } => Ok(crate::executor::slurm::exec_step(&spec).await),
        Command::Resume { run, config } => {
            let config = config.as_deref().map(service::load_config).transpose()?;
            let engine = engine_for(&cli.state, None, config)?;
            let id = run_id(&engine.store, &run)?;
            // Containers a killed `millrace run` left behind go first.
            engine.remove_orphan_containers().await;
            let steps = engine.store.db().read().steps(id)?.len();
            let events = progress(json, steps);
            let summary = engine.resume(id, events.sink(), cancel_on_signal()).await;
            events.finish();
            finish_run(summary, json)
        }
        Command::Plan {
            pipeline,
            params,
            no_reuse,
            config,
        } => {
            let config = config.as_deref().map(service::load_config).transpose()?;
            let (p, _) = load_in(&pipeline, &environment_for(&cli.state, config.as_ref())?)?;
            let params = parse_params(&params)?;
            let engine = engine_for(&cli.state, None, config)?;
            let plan = engine
                .plan(&p, &params, no_reuse)
                .await
                .map_err(run_error)?;
            if json {
                let rows: Vec<_> = plan
                    .iter()
                    .map(|(s, d)| serde_json::json!({"step": s, "plan": d}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let width = plan.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
                for (step, d) in &plan {
                    match d {
                        Planned::Reuse { run, .. } => {
                            println!("{step:width$}  reuse  from run {run}")
                        }
                        Planned::Run { reason } => println!("{step:width$}  run    {reason}"),
                        Planned::Pending { upstream } => {
                            println!(
                                "{step:width$}  run?   after {} (reused if its inputs come out unchanged)",
                                upstream.join(", ")
                            )
                        }
                    }
                }
            }
            Ok(0)
        }
        Command::Runs {
            show: Some(RunsCommand::Show { run }),
            ..
        } => {
            let store = open_store(&cli.state)?;
            runs_show(&store, &run, json)
        }
        Command::Runs {
            show: None,
            pipeline,
            limit,
        } => {
            let store = open_store(&cli.state)?;
            runs_list(&store, pipeline.as_deref(), limit, json)
        }
        Command::Logs { run, step, follow } => {
            let store = open_store(&cli.state)?;
            logs(&store, &run, step.as_deref(), follow).await
        }
        Command::Metrics { runs } => {
            let store = open_store(&cli.state)?;
            metrics(&store, &runs, json)
        }
        Command::Explain { run, step } => {
            let store = open_store(&cli.state)?;
            explain(&store, &run, &step, json)
        }
        Command::Lineage { artifact } => {
            let store = open_store(&cli.state)?;
            lineage(&store, &artifact, json)
        }
        Command::Output { run, output, dir } => {
            let store = open_store(&cli.state)?;
            output_cmd(&store, &run, &output, dir.as_deref())
        }
        Command::Gc { keep } => {
            let store = open_store(&cli.state)?;
            gc(&store, keep, json)
        }
    }
}

fn open_store(state: &Path) -> anyhow::Result<Arc<Store>> {
    Ok(Arc::new(Store::open(state).with_context(|| {
        format!("cannot open the state directory {}", state.display())
    })?))
}

/// The engine of `state`, its datastores, compute targets and `[python]` from
/// a daemon config when one is given; `max_parallel` steps at once, else as
/// many as the host has CPUs.
fn engine_for(
    state: &Path,
    max_parallel: Option<usize>,
    config: Option<Config>,
) -> anyhow::Result<Arc<Engine>> {
    let store = open_store(state)?;
    let parallel = max_parallel.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let mut engine_config = EngineConfig::new(parallel);
    if let Some(config) = &config {
        engine_config = engine_config.with_config(config);
    }
    Ok(Arc::new(Engine::new(store, engine_config)))
}

/// `42`, or `latest`/`last` for the newest run.
fn run_id(store: &Store, text: &str) -> anyhow::Result<i64> {
    if text == "latest" || text == "last" {
        return store
            .db()
            .read()
            .latest_run_id()?
            .ok_or_else(|| Error::usage("there are no runs yet").into());
    }
    let id: i64 = text
        .parse()
        .map_err(|_| Error::usage(format!("`{text}` is not a run id (a number or `latest`)")))?;
    if store.db().read().run(id)?.is_none() {
        return Err(Error::usage(format!("run {id} not found")).into());
    }
    Ok(id)
}

fn time(ms: Option<i64>) -> String {
    match ms {
        Some(ms) => {
            let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        }
        None => "-".into(),
    }
}

fn duration(start: Option<i64>, end: Option<i64>) -> String {
    match (start, end) {
        (Some(s), Some(e)) => format!("{:.2}s", (e - s) as f64 / 1000.0),
        (Some(s), None) => format!("{:.0}s so far", (now_ms() - s) as f64 / 1000.0),
        _ => "-".into(),
    }
}

fn explain(store: &Store, run: &str, step: &str, json: bool) -> anyhow::Result<i32> {
    let id = run_id(store, run)?;
    let r = store.db().read().run(id)?.context("run vanished")?;
    let s = store
        .db()
        .read()
        .step(id, step)?
        .ok_or_else(|| Error::usage(format!("run {id} has no step `{step}`")))?;
    let e = crate::planner::explain(store, &r, &s)?;
    let (verdict, changes, prev) = (e.explanation, e.changes, e.compared_with);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "run": id, "step": step, "status": s.status, "cache_key": s.cache_key,
                "reused_from": s.reused_from, "compared_with": prev,
                "explanation": verdict, "changes": changes, "key_parts": s.key_parts,
            }))?
        );
        return Ok(0);
    }
    println!("run {id} step {step}: {}", s.status);
    println!("  {verdict}");
    for c in &changes {
        println!("    - {c}");
    }
    if let Some(k) = &s.cache_key {
        println!("  cache key {}", short(k));
    }
    Ok(0)
}
