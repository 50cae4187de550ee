//! Shared code for the millrace plugins, on `serde_json`, `csv` and `lexopt`.
//!
//! Everything that does not touch `/in`, `/out` or the process lives in pure functions
//! here so that it can be unit-tested natively
//! (`cargo test --target x86_64-unknown-linux-gnu -p csvkit`).

pub mod args;
pub mod csv;
pub mod filter;
pub mod json;
pub mod ops;
pub mod stats;
pub mod step;

pub use args::{Error, run};
