//! End-to-end harness.
pub mod apiserver;
