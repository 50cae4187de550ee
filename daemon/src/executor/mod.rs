//! Executors: what runs a step. A closed set, one `match` in the run:
//! `wasm` (wasmtime + WASI) and `transfer` (copy into a datastore) today;
//! python, container and slurm arrive with their issues.

pub mod transfer;
pub mod wasm;
pub mod workspace;
