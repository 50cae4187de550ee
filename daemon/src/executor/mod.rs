//! Executors: what runs a step. A closed set, one `match` in the run:
//! `wasm` (wasmtime + WASI), `python` (CPython on WASI, in the same sandbox),
//! `container` (an OS image through the Docker Engine API) and `transfer` (copy
//! into a datastore).

pub mod container;
pub mod python;
pub mod slurm;
pub mod snapshot;
pub mod transfer;
pub mod wasm;
pub mod workspace;
