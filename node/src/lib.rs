//! troupe, the node binary's library half.
//!
//! - [`cli`]: the `troupe` command line: argument parsing and one module per command group.
//! - [`error`]: the CLI's error type; every command fails with one line that names the
//!   problem and the fix.
//!
//! `main.rs` only sets up the allocator and tracing and calls [`cli::run`].

pub mod cli;
pub mod error;
