//! The `millrace` command line: parses arguments, calls the engine and the store,
//! prints for people (or JSON with `--json`) and maps outcomes to exit codes
//! ([`error`]: 0 ok, 1 run failed, 2 usage, 78 bad configuration, 130 cancelled).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::definition::{self, Pipeline};
use crate::diagnostic::{Report, display_path};
use crate::graph::Graph;
use crate::model::{Placement, RunStatus, StepStatus};
use crate::planner::{Decision, short};
use crate::run::{Datastores, Engine, Event, RunError, RunRequest, RunSummary};
use crate::store::Store;
use crate::store::db::now_ms;

mod error;
mod graph;
mod module;
mod service;

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
        #[arg(long, num_args = 2, value_names = ["FROM", "TO"])]
        simulate: Option<Vec<String>>,
        /// Firings listed per trigger.
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
}

#[derive(Subcommand, Debug)]
enum RuntimeCommand {
    /// Compile the Python runtime into the cache (minutes, once per machine and
    /// version; later steps load it in milliseconds).
    Prepare,
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
            cmd: RuntimeCommand::Prepare,
        } => {
            let engine = engine(&cli.state, None)?;
            let started = std::time::Instant::now();
            eprintln!("preparing the Python runtime (the first time takes a few minutes)…");
            let (dir, digest, cached) = engine.prepare_python().await.map_err(run_error)?;
            let what = if cached {
                "already compiled"
            } else {
                "compiled"
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({"runtime": display_path(&dir), "digest": digest, "cached": cached, "seconds": started.elapsed().as_secs_f64()})
                );
            } else {
                println!(
                    "python runtime {} ({}) {what} in {:.1}s; cache {}",
                    display_path(&dir),
                    short(&digest),
                    started.elapsed().as_secs_f64(),
                    display_path(&engine.store.wasm_cache_dir())
                );
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
                        Decision::Reuse { run, .. } => {
                            println!("{step:width$}  reuse  from run {run}")
                        }
                        Decision::Run { reason } => println!("{step:width$}  run    {reason}"),
                        Decision::Pending { upstream } => {
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

fn engine(state: &Path, max_parallel: Option<usize>) -> anyhow::Result<Arc<Engine>> {
    let store = open_store(state)?;
    let parallel = max_parallel.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    Ok(Arc::new(Engine::new(
        store,
        parallel,
        Datastores::default(),
    )))
}

/// An engine whose compute targets and datastores come from a daemon config.
fn engine_for(
    state: &Path,
    max_parallel: Option<usize>,
    config: Option<Config>,
) -> anyhow::Result<Arc<Engine>> {
    let engine = engine(state, max_parallel)?;
    let Some(config) = config else {
        return Ok(engine);
    };
    let mut engine = Arc::into_inner(engine).context("engine in use")?;
    engine.computes = config.computes;
    engine.datastores = Datastores {
        paths: config.datastores.into_iter().collect(),
    };
    Ok(Arc::new(engine))
}

/// What pipelines are checked against: the state's registry (read only if it
/// exists: a bad file must leave nothing behind) and a config's targets.
fn environment_for(
    state: &Path,
    config: Option<&Config>,
) -> anyhow::Result<definition::Environment> {
    let mut env = environment(state)?;
    if let Some(c) = config {
        let from = c.environment();
        env.datastores = from.datastores;
        env.computes = from.computes;
    }
    Ok(env)
}

/// Loads and checks a pipeline file; bad configuration exits 78 with every error.
fn load(path: &Path, state: &Path) -> anyhow::Result<(Pipeline, String)> {
    load_in(path, &environment(state)?)
}

fn load_in(path: &Path, env: &definition::Environment) -> anyhow::Result<(Pipeline, String)> {
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

fn summary_line(report: &Report) -> String {
    let n = report.error_count();
    format!(
        "error: {} has {n} error{}\n",
        display_path(&report.source.path),
        if n == 1 { "" } else { "s" }
    )
}

/// Files named, and the `*.toml` files of directories named.
fn expand_dirs(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
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

fn validate(paths: &[PathBuf], state: &Path, json: bool) -> anyhow::Result<i32> {
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

fn validate_with(
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

fn parse_params(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                let k = k.trim();
                crate::definition::check_param_value(k, v).map_err(Error::usage)?;
                Ok((k.to_string(), v.to_string()))
            }
            _ => Err(Error::usage(format!("--param expects KEY=VALUE, got `{p}`")).into()),
        })
        .collect()
}

fn run_error(e: RunError) -> anyhow::Error {
    match e {
        RunError::Params(m) => Error::usage(m).into(),
        RunError::Definition(r) => Error::Report(format!("{r}{}", summary_line(&r))).into(),
        RunError::Input { .. } => Error::config(e.to_string()).into(),
        RunError::NoSuchRun(_) | RunError::AlreadySucceeded(_) | RunError::Busy(_) => {
            Error::usage(e.to_string()).into()
        }
        other => anyhow::Error::new(other),
    }
}

fn finish_run(summary: Result<RunSummary, RunError>, json: bool) -> anyhow::Result<i32> {
    let s = summary.map_err(run_error)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        eprintln!(
            "run {} {}: {} executed, {} reused, {} failed, {} skipped in {:.2}s",
            s.run_id, s.status, s.executed, s.reused, s.failed, s.skipped, s.seconds
        );
    }
    Ok(error::run_exit_code(s.status))
}

/// Ctrl-C / SIGTERM cancel the run; the steps are stopped and the run recorded
/// as cancelled (resumable).
fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("millrace: stopping the run (it can be finished later with `millrace resume`)");
        t.cancel();
    });
    token
}

/// Progress for `run`: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
}

fn progress(json: bool, steps: usize) -> Arc<Progress> {
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    Arc::new(Progress { bar, json })
}

impl Progress {
    fn sink(self: &Arc<Self>) -> crate::run::EventSink {
        let me = self.clone();
        Arc::new(move |e: &Event| me.event(e))
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None if !self.json => eprintln!("{s}"),
            None => {}
        }
    }

    fn event(&self, e: &Event) {
        match e {
            Event::RunStarted {
                run,
                pipeline,
                steps,
            } => self.line(format!("run {run} of {pipeline}: {steps} steps")),
            Event::StepStarted { step, attempt } => {
                if let Some(b) = &self.bar {
                    b.set_message(step.clone());
                } else if *attempt > 1 {
                    self.line(format!("  {step}: attempt {attempt}"));
                }
            }
            Event::StepFinished {
                step,
                status,
                detail,
                elapsed,
            } => {
                let retrying = *status == StepStatus::Failed && detail.ends_with("retrying");
                if let Some(b) = &self.bar
                    && !retrying
                {
                    b.inc(1);
                }
                let time = if elapsed.is_zero() {
                    String::new()
                } else {
                    format!(" ({:.2}s)", elapsed.as_secs_f64())
                };
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                };
                self.line(format!("  {step} {status}{time}{detail}"));
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
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

/// What a reader is told of a run's status ([`RunStatus::shown`]).
fn shown_status(store: &Store, id: i64, status: RunStatus) -> RunStatus {
    status.shown(|| crate::run::RunLock::is_held(store, id))
}

fn runs_list(store: &Store, pipeline: Option<&str>, limit: i64, json: bool) -> anyhow::Result<i32> {
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
            duration(r.started_at, r.finished_at),
            r.trigger
        );
    }
    Ok(0)
}

fn runs_show(store: &Store, run: &str, json: bool) -> anyhow::Result<i32> {
    let id = run_id(store, run)?;
    let mut v = crate::view::RunView::load(store, id)?.context("run vanished")?;
    v.run.status = shown_status(store, id, v.run.status);
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
    println!(
        "  started     {}  ({})",
        time(r.started_at),
        duration(r.started_at, r.finished_at)
    );
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
        println!(
            "  {:width$}  {:9}  {:>8}{attempts}  {extra}",
            s.name,
            s.status,
            duration(s.started_at, s.finished_at)
        );
        if let Some(m) = &s.module {
            let digest = s
                .key_parts
                .as_ref()
                .and_then(|k| k["code"].as_str())
                .map(|d| format!(" {}", short(d)))
                .unwrap_or_default();
            println!("  {:width$}    module {m}{digest}", "");
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
        for o in &s.outputs {
            println!("  {:width$}    → {} {}", "", o.output, short(&o.artifact));
        }
    }
    Ok(0)
}

async fn logs(store: &Store, run: &str, step: Option<&str>, follow: bool) -> anyhow::Result<i32> {
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
        if !follow || r.status != RunStatus::Running || !crate::run::RunLock::is_held(store, id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(0)
}

fn metrics(store: &Store, runs: &[String], json: bool) -> anyhow::Result<i32> {
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

fn fmt_num(v: f64) -> String {
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

fn resolve_artifact(store: &Store, text: &str) -> anyhow::Result<String> {
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

fn lineage(store: &Store, artifact: &str, json: bool) -> anyhow::Result<i32> {
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
            store
                .db()
                .read()
                .step(r.run_id, &r.step)
                .ok()
                .flatten()
                .and_then(|s| {
                    let code = s.key_parts.as_ref()?["code"].as_str()?.to_string();
                    Some(format!(" by module {} {}", s.module?, short(&code)))
                })
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

fn output_cmd(store: &Store, run: &str, output: &str, dir: Option<&Path>) -> anyhow::Result<i32> {
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

fn gc(store: &Store, keep: i64, json: bool) -> anyhow::Result<i32> {
    use crate::store::gc::{self, GcError};
    let held = |id| crate::run::RunLock::is_held(store, id);
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
