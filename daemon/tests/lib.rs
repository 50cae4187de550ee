//! The one integration-test binary: every test runs the real `millrace` binary
//! against a real SQLite file, real wasmtime and the example plugins
//! (`scripts/build-plugins.sh` builds them into `plugins/dist/`).

#![allow(clippy::unwrap_used)]

mod cli;
mod common;
mod container;
mod crash;
mod daemon;
mod exit_codes;
mod foreach;
mod fuzz;
mod hostile_api;
mod hostile_fs;
mod hostile_store;
mod hostile_text;
mod hostile_wasm;
mod metrics;
mod modules;
mod operate;
mod params;
mod python;
mod python_warm;
mod run;
mod sandbox;
mod schedule;
mod secrets;
mod slurm;
mod transfer;
mod ui;
