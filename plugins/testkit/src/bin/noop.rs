//! noop: does nothing and exits 0 (ignores its arguments). Also built for wasm32-wasip1.
fn main() {}
