//! Executors: what runs a step. A closed set, one `match` in the run:
//! `wasm` (wasmtime + WASI), `python` (CPython on WASI, in the same sandbox) and
//! `transfer` (copy into a datastore) today; container and slurm arrive with their
//! issues.

pub mod python;
pub mod transfer;
pub mod wasm;
pub mod workspace;
