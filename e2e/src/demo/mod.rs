//! The local demo (`cargo run -p peerfill-e2e --bin peerfill-demo`): a
//! whole peerfill cluster on this machine — the API stand-in, the operator,
//! N agents each on its own loopback address and data directory, an HTTP
//! origin — one Distribution applied from `examples/http.yaml`, live
//! progress, and a summary of what came from where.

pub mod artifact;
pub mod baseline;
pub mod build;
pub mod manifest;
pub mod progress;
pub mod run;
pub mod summary;
pub mod units;

pub use run::{DemoError, DemoOptions, WorkDir, run};
