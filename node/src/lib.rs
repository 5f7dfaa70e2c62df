//! troupe-node: the node runtime, as a library. The `troupe` command line (the `troupe` crate,
//! `cli/`) starts a node with [`run()`]; tests start them in-process with [`start`].
//!
//! - [`background`]: the node's background tasks, one shutdown signal and completion guards.
//! - [`config`]: node configuration (TOML, then `TROUPE_*` environment, then flags).
//! - [`run`]: [`run()`] and [`start`], how a node starts and stops.
//! - [`server`]: the gRPC services (Inference, Admin), the one error-to-status table, and
//!   the OpenAI-compatible HTTP API over Inference (`server::openai`, on `--http`).
//! - [`forward`]: forwarding requests to peers (their connections, trace context).
//! - [`gossip`]: heartbeating peers for Health (a connection of its own per peer).
//! - [`live`]: cluster settings that take effect at run time (request limits, attempts).
//! - [`metrics`]: the Prometheus series, served on the metrics port.
//! - [`loader`]: loads model directories onto the configured compute backend.
//!
//! - `fuzz_entry`: the edges the fuzz targets in `fuzz/` drive (hidden from the docs).

pub mod background;
pub mod config;
pub mod forward;
#[doc(hidden)]
pub mod fuzz_entry;
pub mod gossip;
pub mod live;
pub mod loader;
pub mod metrics;
pub mod pull;
pub mod run;
pub mod server;
#[cfg(feature = "otel")]
pub mod telemetry;

pub use run::{run, start, NodeError, RunningNode};
