//! End-to-end harness.
pub mod apiserver;
pub mod cluster;
pub mod demo;
pub mod netbench;
pub mod prom;
pub mod scale;
pub mod sim;
