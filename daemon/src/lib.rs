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
//! - [`definition`]: a pipeline file → [`definition::Pipeline`], every mistake reported.
//! - [`graph`]: references and cycles checked; the DAG of steps; text/dot/mermaid.
//! - [`module`]: the versioned module registry; `module = "name@^1.2"` resolution.
//! - [`trigger`]: cron schedules (DST-aware) and watched globs.
//! - [`planner`]: cache keys over code, inputs, params, args and env; reuse decisions.
//! - [`executor`]: what runs one attempt, behind one interface: an
//!   [`executor::AttemptSpec`] in, an [`executor::Outcome`] out (with the one table
//!   of failure messages), [`executor::Executor::for_step`] picking the arm:
//!   [`executor::wasm`] (wasmtime + WASI), [`executor::python`] (CPython on WASI, in
//!   the same sandbox), [`executor::container`] (an OS image through the Docker
//!   Engine API), [`executor::slurm`] (a wasm or Python attempt as a Slurm batch
//!   job: stage, submit, follow, collect), [`executor::transfer`] (copy into a
//!   datastore). An executor knows no run or database: it reports where it runs
//!   through a callback the engine records. A new executor is one file there plus
//!   one arm of [`executor::Executor`]; what a step can do (deny by default) is
//!   written once, in [`executor`].
//! - [`run`]: one run's scheduler: parallel steps, retries, skips, resume; one
//!   attempt's spec, executor and outputs in `run/attempt.rs`.
//! - [`store`]: SQLite records and the BLAKE3 artifact store.
//! - [`daemon`]: the service: loads and hot-reloads pipelines, fires triggers,
//!   queues runs under each pipeline's concurrency, recovers after a crash, and
//!   serves the REST API with its OpenAPI document and the web UI ([`daemon::api`])
//!   and Prometheus metrics ([`daemon::metrics`]).
//! - [`cli`]: the `millrace` command line over all of the above.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod daemon;
pub mod definition;
pub mod diagnostic;
pub mod executor;
pub mod graph;
pub mod model;
pub mod module;
pub mod planner;
pub mod run;
pub mod store;
pub mod trigger;
