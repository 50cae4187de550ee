//! The `millrace` command line: parses arguments, calls the engine and the store,
//! prints for people (or JSON with `--json`) and maps outcomes to exit codes
//! ([`error`]: 0 ok, 1 run failed, 2 usage, 78 bad configuration, 130 cancelled).
//!
//! By command group: [`validate`] (reading pipeline files), [`progress`] (`run`
//! and `resume` as they go), [`records`] (`runs`, `logs`, `metrics`, `lineage`,
//! `output`, `gc`), [`graph`], [`module`], [`service`] (the daemon and its
//! clients), [`style`] (coloured `error:`/`warning:`); here the arguments (with
//! their help, which `completions` and `manpage` render too), the dispatch,
//! `plan`, `explain` and `--version`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::diagnostic::display_path;
use crate::engine::{Engine, EngineConfig};
use crate::planner::short;
use crate::store::Store;
use crate::store::db::now_ms;

mod commands;
mod error;
mod graph;
mod module;
mod progress;
mod records;
mod service;
mod style;
mod validate;

use records::{gc, lineage, logs, metrics, output_cmd, runs_list, runs_show};
use validate::{environment, expand_dirs, parse_params, validate, validate_with};

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
    #[command(after_help = "Examples:
  millrace run pipelines/train.toml
  millrace run train.toml --param c=0.7 --param epochs=5
  millrace run train.toml --no-reuse --max-parallel 2
  millrace run train.toml --config /etc/millrace/millrace.toml   # its datastores and compute targets")]
    Run {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// Override a param: `--param c=0.7` (repeatable, each key once, no spaces
        /// around `=`).
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        /// Execute every step, even when an earlier result could be reused.
        #[arg(long)]
        no_reuse: bool,
        /// Steps run at once (default: number of CPUs).
        #[arg(long, value_name = "N")]
        max_parallel: Option<usize>,
        /// Take compute targets and datastores from this daemon config (the state
        /// directory stays --state).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check pipeline files (or every *.toml in directories): all errors at once.
    /// With --config: the daemon config and every file of its pipelines directory.
    #[command(after_help = "Examples:
  millrace validate train.toml
  millrace validate pipelines/            # every *.toml in it
  millrace validate --config /etc/millrace/millrace.toml
  millrace validate --config millrace.toml --config-only   # what systemd runs before a start")]
    Validate {
        /// Pipeline files, or directories whose *.toml files to check.
        #[arg(required_unless_present = "config", value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// A daemon config to check (and whose pipelines to check).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// With --config: check only the config. The daemon keeps running with an
        /// invalid pipeline file (its last valid version stays), so this is what
        /// systemd checks before a start or reload.
        #[arg(long, requires = "config")]
        config_only: bool,
    },
    /// Print the execution graph (with --json: its nodes and edges).
    #[command(after_help = "Examples:
  millrace graph train.toml
  millrace graph train.toml --format dot | dot -Tsvg > train.svg
  millrace --json graph train.toml
  millrace graph train.toml --config /etc/millrace/millrace.toml   # a pipeline naming a datastore")]
    Graph {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// How to draw it: one line per step, Graphviz dot, or Mermaid (--json
        /// prints JSON whatever this says).
        #[arg(long, value_enum, default_value = "text")]
        format: graph::GraphFormat,
        /// Take the datastores from this daemon config (a pipeline naming a datastore
        /// needs it).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Show which steps would run or be reused, and why, without running anything.
    #[command(after_help = "Examples:
  millrace plan train.toml
  millrace plan train.toml --param c=0.7
  millrace --json plan train.toml")]
    Plan {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// Override a param: `--param c=0.7` (repeatable, each key once).
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        /// Plan as `run --no-reuse` would: every step runs.
        #[arg(long)]
        no_reuse: bool,
        /// Compute targets and datastores from this daemon config.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run one staged step on this node (what a Slurm job runs).
    #[command(hide = true)]
    ExecStep {
        /// The staged step's spec file.
        spec: PathBuf,
    },
    /// Run history; `runs show RUN` for one run.
    #[command(after_help = "Examples:
  millrace runs
  millrace runs --pipeline train --limit 5
  millrace runs show latest
  millrace --json runs show 42")]
    Runs {
        #[command(subcommand)]
        show: Option<RunsCommand>,
        /// Only the runs of this pipeline (its name).
        #[arg(long, value_name = "NAME")]
        pipeline: Option<String>,
        /// How many runs to list, newest first.
        #[arg(long, value_name = "N", default_value_t = 20)]
        limit: i64,
    },
    /// Print a step's log (every step's, without STEP).
    Logs {
        /// A run id, or `latest`.
        run: String,
        /// The step whose log to print (default: every step's, one after another).
        step: Option<String>,
        /// Keep printing while the run goes on.
        #[arg(short, long)]
        follow: bool,
    },
    /// Metrics of one or more runs, side by side.
    Metrics {
        /// Run ids (or `latest`), one column each.
        #[arg(required = true, value_name = "RUN")]
        runs: Vec<String>,
    },
    /// Why a step ran (what changed in its key, vs which run) or which run it reused.
    #[command(after_help = "Examples:
  millrace explain latest train
  millrace --json explain 42 features")]
    Explain {
        /// A run id, or `latest`.
        run: String,
        /// The step's name.
        step: String,
    },
    /// Where an artifact came from and where it was used.
    Lineage {
        /// A digest (a unique prefix is enough) or RUN:STEP.OUTPUT, e.g. `12:train.model`.
        artifact: String,
    },
    /// Copy an output out of the store; a single file goes to stdout without -o.
    Output {
        /// A run id, or `latest`.
        run: String,
        /// `STEP.OUTPUT`
        output: String,
        /// Copy into this directory (needed for an output of several files).
        #[arg(short = 'o', long)]
        dir: Option<PathBuf>,
    },
    /// Finish a failed or interrupted run, reusing the steps that succeeded.
    Resume {
        /// A run id, or `latest`.
        run: String,
        /// Compute targets and datastores from this daemon config.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Delete runs beyond the newest N per pipeline and the artifacts only they used.
    Gc {
        /// Runs kept per pipeline (the newest; running and queued runs are kept too).
        #[arg(long, value_name = "N", default_value_t = 10)]
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
    #[command(after_help = "Examples:
  millrace daemon --config config/dev.toml     # a development config in the checkout
  MILLRACE_CONFIG=/etc/millrace/millrace.toml millrace daemon
  systemctl start millrace                     # as installed by scripts/install-service.sh")]
    Daemon {
        /// The daemon config (default: $MILLRACE_CONFIG, else /etc/millrace/millrace.toml).
        #[arg(long, env = "MILLRACE_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Ask the running daemon to run a pipeline.
    #[command(after_help = "Examples:
  millrace trigger train
  millrace trigger train --param c=0.7 --wait     # the exit code is the run's result
  millrace trigger train --url http://127.0.0.1:8640 --token-file ~/.millrace-token")]
    Trigger {
        /// The pipeline's name (as `status` lists it), not its file.
        pipeline: String,
        /// Override a param: `--param c=0.7` (repeatable, each key once).
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        /// Execute every step, even when an earlier result could be reused.
        #[arg(long)]
        no_reuse: bool,
        /// Wait for the run to end; the exit code is its result.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        connect: service::Connect,
    },
    /// Stop a queued or running run: through the daemon when it owns the run, else
    /// by stopping the `millrace run`/`resume` process that drives it.
    #[command(after_help = "Examples:
  millrace cancel 42
  millrace cancel latest --config /etc/millrace/millrace.toml

An interrupted run (its process is gone) is recorded as cancelled, so that
neither the daemon nor `millrace resume` takes it up again.")]
    Cancel {
        /// A run id, or `latest`.
        run: String,
        #[command(flatten)]
        connect: service::Connect,
    },
    /// What the running daemon has loaded, which files are invalid, what runs.
    Status {
        #[command(flatten)]
        connect: service::Connect,
    },
    /// Print a shell completion script to stdout.
    #[command(after_help = "Examples:
  millrace completions bash > /etc/bash_completion.d/millrace
  millrace completions zsh > \"${fpath[1]}/_millrace\"
  millrace completions fish > ~/.config/fish/completions/millrace.fish")]
    Completions {
        /// The shell the script is for.
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the manual page (roff) to stdout, or write one page per command to a
    /// directory.
    #[command(after_help = "Examples:
  millrace manpage | man -l -
  millrace manpage -o /usr/local/share/man/man1   # millrace.1, millrace-run.1, …")]
    Manpage {
        /// Write millrace.1 and a page per command (millrace-run.1, …) into this
        /// directory instead.
        #[arg(short = 'o', long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print the JSON Schema of a pipeline file or of the daemon config (for taplo
    /// and editors; docs/schema/ holds them, scripts/schema.sh rewrites them).
    #[command(after_help = "Examples:
  millrace schema pipeline > docs/schema/pipeline.schema.json
  taplo check --schema file://$PWD/docs/schema/config.schema.json config/millrace.toml")]
    Schema {
        /// Which file the schema is for.
        #[arg(value_enum)]
        which: SchemaWhich,
    },
    /// Next firings of cron triggers, in each trigger's time zone; with
    /// --simulate FROM TO every firing in that window (across DST changes).
    Schedule {
        /// Pipeline files or directories (default: the config's pipelines directory).
        paths: Vec<PathBuf>,
        /// The daemon config whose pipelines directory to read.
        #[arg(long, env = "MILLRACE_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Every firing in the window FROM..TO instead of the next ones from now
        /// (RFC 3339, or YYYY-MM-DD[THH:MM] in UTC); --count caps what is listed.
        #[arg(long, num_args = 2, value_names = ["FROM", "TO"])]
        simulate: Option<Vec<String>>,
        /// Firings listed per trigger (the earliest ones; "… N more" counts the rest).
        #[arg(long, value_name = "N", default_value_t = 10)]
        count: usize,
    },
}

/// The files `schema` describes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SchemaWhich {
    /// A pipeline file (`*.toml` in the pipelines directory).
    Pipeline,
    /// The daemon config (`millrace.toml`).
    Config,
}

/// The shells `completions` writes for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
enum RuntimeCommand {
    /// Compile the Python runtime into the cache, then build and compile the warm
    /// interpreter with the `[python] preload` modules imported (minutes, once per
    /// machine, version and preload list; later steps load it in milliseconds).
    #[command(after_help = "Examples:\n  \
        millrace runtime prepare --config /etc/millrace/millrace.toml\n  \
        millrace runtime prepare --cache /var/cache/millrace/wasm")]
    Prepare {
        /// The daemon config whose `[python]` section and state directory apply.
        #[arg(long, env = "MILLRACE_CONFIG")]
        config: Option<PathBuf>,
        /// Compile into this cache directory (what the daemon then reads as
        /// `MILLRACE_CACHE`); no state directory is needed.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum RunsCommand {
    /// One run: its steps, status, timing, reuse and outputs.
    Show {
        /// A run id, or `latest`.
        run: String,
    },
}

/// The wasmtime this binary embeds: the `=` pin in daemon/Cargo.toml
/// (`the_wasmtime_version_is_the_pinned_one` keeps the two equal).
pub(crate) const WASMTIME_VERSION: &str = "48.0.8";

/// `--version`: ours, wasmtime's and the Python runtime's (where it is found, as a
/// Python step would find it: `$MILLRACE_PYTHON_RUNTIME`, else beside the binary).
fn long_version() -> String {
    use crate::executor::python::{RUNTIME_NAME, Runtime};
    let python = match Runtime::locate() {
        Some(rt) if rt.dir.is_dir() => match rt.check() {
            Ok(()) => {
                // The MANIFEST's first line is `python X.Y.Z`.
                let cpython = std::fs::read_to_string(rt.dir.join("MANIFEST"))
                    .ok()
                    .and_then(|m| {
                        let v = m
                            .lines()
                            .next()?
                            .strip_prefix("python ")?
                            .trim()
                            .to_string();
                        Some(format!(" (CPython {v})"))
                    })
                    .unwrap_or_default();
                format!("{RUNTIME_NAME}{cpython} at {}", display_path(&rt.dir))
            }
            Err(e) => format!(
                "incomplete at {} ({} is missing)",
                display_path(&e.dir),
                e.needed
            ),
        },
        _ => "not installed".to_string(),
    };
    format!(
        "{}\nwasmtime {WASMTIME_VERSION}\npython runtime: {python}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The parsed command line, `--version` with the runtimes' versions.
fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    // Leaked once per process: clap keeps a `'static` text.
    let version: &'static str = Box::leak(long_version().into_boxed_str());
    let matches = Cli::command().long_version(version).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = parse();
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
            style::eprint_lines(&text);
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
            cmd: RuntimeCommand::Prepare { config, cache },
        } => commands::runtime_prepare(&cli.state, config.as_deref(), cache, json).await,
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
        Command::Cancel { run, connect } => service::cancel(&connect, &cli.state, &run, json),
        Command::Schedule {
            paths,
            config,
            simulate,
            count,
        } => service::schedule(config.as_deref(), &paths, simulate.as_deref(), count, json),
        Command::Graph {
            pipeline,
            format,
            config,
        } => commands::graph(&cli.state, &pipeline, format, config.as_deref(), json),
        Command::Run {
            pipeline,
            params,
            no_reuse,
            max_parallel,
            config,
        } => {
            let run = commands::RunArgs {
                pipeline,
                params,
                no_reuse,
                max_parallel,
                config,
            };
            commands::run(&cli.state, run, json).await
        }
        Command::Completions { shell } => commands::completions(shell),
        Command::Manpage { dir } => commands::manpage(dir.as_deref()),
        Command::Schema { which } => {
            let which = match which {
                SchemaWhich::Pipeline => crate::schema::Which::Pipeline,
                SchemaWhich::Config => crate::schema::Which::Config,
            };
            print!(
                "{}",
                crate::schema::text(which).map_err(anyhow::Error::msg)?
            );
            Ok(0)
        }
        Command::ExecStep { spec } => Ok(crate::executor::slurm::exec_step(&spec).await),
        Command::Resume { run, config } => {
            commands::resume(&cli.state, &run, config.as_deref(), json).await
        }
        Command::Plan {
            pipeline,
            params,
            no_reuse,
            config,
        } => {
            commands::plan(
                &cli.state,
                &pipeline,
                &params,
                no_reuse,
                config.as_deref(),
                json,
            )
            .await
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

pub(super) fn open_store(state: &Path) -> anyhow::Result<Arc<Store>> {
    open_store_with(state, &EngineConfig::store_from_env())
}

fn open_store_with(state: &Path, config: &crate::store::StoreConfig) -> anyhow::Result<Arc<Store>> {
    Ok(Arc::new(Store::open_with(state, config).with_context(
        || format!("cannot open the state directory {}", state.display()),
    )?))
}

/// The engine of `state`, its datastores, compute targets and `[python]` from
/// a daemon config when one is given; `max_parallel` steps at once, else as
/// many as the host has CPUs.
fn engine_for(
    state: &Path,
    max_parallel: Option<usize>,
    config: Option<Config>,
) -> anyhow::Result<Arc<Engine>> {
    engine_with_cache(state, max_parallel, config, None)
}

/// As [`engine_for`], compiling into `cache` (over `MILLRACE_CACHE`) when given.
fn engine_with_cache(
    state: &Path,
    max_parallel: Option<usize>,
    config: Option<Config>,
    cache: Option<PathBuf>,
) -> anyhow::Result<Arc<Engine>> {
    let parallel = max_parallel.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let mut engine_config = EngineConfig::new(parallel);
    if let Some(config) = &config {
        engine_config = engine_config.with_config(config);
    }
    if let Some(dir) = cache {
        engine_config.store.wasm_cache = Some(dir);
    }
    let store = open_store_with(state, &engine_config.store)?;
    Ok(Arc::new(Engine::new(store, engine_config)))
}

/// `42`, or `latest`/`last` for the newest run.
pub(super) fn run_id(store: &Store, text: &str) -> anyhow::Result<i64> {
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
    // A foreach step: each item was reused or executed on its own key.
    let rows = store.db().read().items(id, step)?;
    let items = (!rows.is_empty()).then(|| crate::view::ItemsView::of(rows));
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "run": id, "step": step, "status": s.status, "cache_key": s.cache_key,
                "reused_from": s.reused_from, "compared_with": prev,
                "explanation": verdict, "changes": changes, "key_parts": s.key_parts,
                "python": s.python,
                "items": items,
            }))?
        );
        return Ok(0);
    }
    println!("run {id} step {step}: {}", s.status);
    println!("  {verdict}");
    for c in &changes {
        println!("    - {c}");
    }
    if let Some(items) = &items {
        println!("  {}", items.summary());
        let ran: Vec<&crate::view::ItemView> = items
            .list
            .iter()
            .filter(|i| i.status != crate::model::StepStatus::Reused)
            .collect();
        for i in ran.iter().take(20) {
            let name = crate::store::artifacts::escape_controls(&i.name);
            match &i.error {
                Some(e) => println!("    - {name} {}: {e}", i.status),
                None => println!("    - {name} {} (no earlier item had its key)", i.status),
            }
        }
        if ran.len() > 20 {
            println!("    … and {} more", ran.len() - 20);
        }
    }
    if let Some(k) = &s.cache_key {
        println!("  cache key {}", short(k));
    }
    if let Some(py) = &s.python {
        println!("  python: {py}");
    }
    // The params in the key: the ones the step uses, and only those.
    if let Some(params) = s
        .key_parts
        .as_ref()
        .and_then(|k| k.get("params"))
        .and_then(|p| p.as_object())
    {
        if params.is_empty() {
            println!("  params: none (the step uses no param)");
        } else {
            let shown: Vec<String> = params
                .iter()
                .map(|(k, v)| format!("{k} = {}", v.as_str().unwrap_or_default()))
                .collect();
            println!("  params: {}", shown.join(", "));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument and option of every command, and every command, says what
    /// it is in `--help`.
    #[test]
    fn every_command_argument_and_option_has_help() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in c.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                let here = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(here.clone());
                }
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "millrace", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    #[test]
    fn the_main_commands_have_examples() {
        let cli = Cli::command();
        for path in [
            &["run"][..],
            &["plan"],
            &["trigger"],
            &["runs"],
            &["explain"],
            &["validate"],
            &["daemon"],
            &["graph"],
            &["module", "publish"],
        ] {
            let mut c = &cli;
            for name in path {
                c = c
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("{path:?}"));
            }
            let after = c
                .get_after_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            assert!(
                after.starts_with("Examples:\n  millrace "),
                "{path:?}: {after}"
            );
        }
    }

    #[test]
    fn the_wasmtime_version_is_the_pinned_one() {
        let manifest = include_str!("../../Cargo.toml");
        let pin = format!("wasmtime = {{ version = \"={WASMTIME_VERSION}\"");
        assert!(manifest.contains(&pin), "daemon/Cargo.toml lacks `{pin}`");
    }
}
