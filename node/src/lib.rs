//! troupe, the node binary's library half.
//!
//! - [`cli`]: the `troupe` command line: argument parsing and one module per command group.
//! - [`config`]: node configuration (TOML, then `TROUPE_*` environment, then flags).
//! - [`run`]: [`run()`] and [`start`], how a node starts and stops.
//! - [`server`]: the gRPC services (Inference, Admin), the one error-to-status table, and
//!   the OpenAI-compatible HTTP API over Inference (`server::openai`, on `--http`).
//! - [`forward`]: forwarding requests to peers (their connections, trace context).
//! - [`gossip`]: heartbeating peers for Health (a connection of its own per peer).
//! - [`metrics`]: the Prometheus series, served on the metrics port.
//! - [`loader`]: loads model directories onto the configured compute backend.
//! - [`error`]: the CLI's error type; every command fails with one line that names the
//!   problem and the fix.
//!
//! - `fuzz_entry`: the edges the fuzz targets in `fuzz/` drive (hidden from the docs).
//!
//! `main.rs` only sets up the allocator and tracing and calls [`cli::run`].

pub mod cli;
pub mod config;
pub mod error;
pub mod forward;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod gossip;
pub mod loader;
pub mod metrics;
pub mod pull;
pub mod run;
pub mod server;
#[cfg(feature = "otel")]
pub mod telemetry;

pub use run::{run, start, NodeError, RunningNode};
