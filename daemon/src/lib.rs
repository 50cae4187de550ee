//! millrace: TOML pipelines of sandboxed steps, with content-addressed reuse and
//! their history in SQLite.
//!
//! # Layout
//!
//! The modules in the order data flows through them, after the words they share:
//!
//! - [`model`]: the shared words: the states of a run, a step and an attempt, and
//!   where an attempt runs, as the store keeps them and the API prints them.
//! - [`diagnostic`]: `file:line:col` errors with the offending text and a caret.
//! - [`config`]: the daemon config (pipelines directory, state, API, datastores,
//!   compute targets: local, container engines, Slurm clusters).
//! - [`definition`]: a pipeline file → [`definition::Pipeline`], every mistake reported;
//!   split by what it walks (`params`, `steps`, `container`, `triggers`, `values`, and
//!   the `walker` shared with the daemon config).
//! - [`graph`]: references and cycles checked; the DAG of steps; [`graph::load`]
//!   reads a pipeline file completely (the walk, then these checks).
//! - [`module`]: the versioned module registry; `module = "name@^1.2"` resolution;
//!   the registry's rules (publish, deprecate, disable, enable, default).
//! - [`trigger`]: cron schedules (DST-aware) and watched globs.
//! - [`planner`]: does a step run, under which key, and why: cache keys over code,
//!   inputs, params, args and env ([`planner::key`], [`planner::code`],
//!   [`planner::inputs`]), the one reuse decision ([`planner::Planner::decide`],
//!   called by both `plan` and the run) and its explanation ([`planner::explain`]).
//! - [`executor`]: what runs one attempt, behind one interface: an
//!   [`executor::AttemptSpec`] in, an [`executor::Outcome`] out (with the one table
//!   of failure messages), [`executor::Executor::for_step`] picking the arm:
//!   [`executor::wasm`] (wasmtime + WASI), [`executor::python`] (CPython on WASI, in
//!   the same sandbox; it starts from [`executor::snapshot`], an interpreter with
//!   numpy, pandas and sklearn imported), [`executor::container`] (an OS image
//!   through the Docker Engine API), [`executor::slurm`] (a wasm or Python attempt
//!   as a Slurm batch job: stage, submit, follow, collect), [`executor::transfer`]
//!   (copy into a datastore). An executor knows no run or database: it reports
//!   where it runs through a callback the engine records. A new executor is one
//!   file there plus one arm of [`executor::Executor`]; what a step can do (deny by
//!   default) is written once, in [`executor`].
//! - [`engine`]: drives runs, built whole from one [`engine::EngineConfig`] (the
//!   daemon config's datastores, compute targets and `[python]`; the log and output
//!   caps, the walk limits and the compiled-code cache, with their environment
//!   overrides, read there and nowhere else): the lifecycle (`engine/lifecycle.rs`:
//!   create, enqueue, start, resume, the locks a run holds), the ready-queue loop
//!   (`engine/scheduler.rs`: each step decided by the planner, dependants released
//!   or skipped, cancel and shutdown sweeps), one step's attempts and retries (`engine/step.rs`), a
//!   `foreach` step's items, each reused or executed, and their merged outputs
//!   (`engine/items.rs`), one
//!   attempt's spec, executor and outputs (`engine/attempt.rs`) and the run lock
//!   (`engine/lock.rs`); the scheduler's unit tests run attempts on a fake executor
//!   (`engine/tests.rs`).
//! - [`store`]: SQLite records, the BLAKE3 artifact store, and `gc`.
//! - [`view`]: what readers are shown: one [`view::RunView`] for the API,
//!   `runs show --json` and the UI, with the OpenAPI schemas.
//! - [`daemon`]: the service, one library function ([`daemon::serve`]: a config, a
//!   bound listener, a stream of [`daemon::signal::Signal`]s): the pipeline
//!   registry and its hot reload (`daemon/pipelines.rs`), cron, watch and `after`
//!   triggers (`daemon/triggers.rs`), the run queue under each pipeline's
//!   concurrency (`daemon/queue.rs`), crash recovery (`daemon/recover.rs`), the
//!   process's signals ([`daemon::signal`]), the REST API with its OpenAPI document
//!   and the web UI ([`daemon::api`]) and Prometheus metrics ([`daemon::metrics`]).
//! - [`schema`]: JSON Schemas of the pipeline file and the daemon config, their keys
//!   asked of the parser (`millrace schema`, `docs/schema/`).
//! - [`cli`]: the `millrace` command line over all of the above, by command group;
//!   its exit codes in one place (`cli/error.rs`); graph drawing (`cli/graph.rs`).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod daemon;
pub mod definition;
pub mod diagnostic;
pub mod engine;
pub mod executor;
pub mod graph;
pub mod model;
pub mod module;
pub mod planner;
pub mod schema;
pub mod store;
pub mod trigger;
pub mod view;
