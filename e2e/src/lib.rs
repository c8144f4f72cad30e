//! End-to-end harness.
pub mod apiserver;
pub mod demo;
pub mod netbench;
