//! The trainer library: configuration, model, segment engine, optimizer and training loop.
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod data;
pub mod engine;
pub mod hf;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod params;
pub mod plan;
pub mod preempt;
pub mod report;
pub mod train;
pub mod zero;
