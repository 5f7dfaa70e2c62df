//! Errors a `troupe` command can end with, and the exit code each maps to.

use std::path::PathBuf;

use troupe_models::{FetchError, ModelError};
pub use troupe_node::server::status::code_name;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    Fetch(#[from] FetchError),

    #[error("cannot read input {path}: {source}")]
    Input {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("input {path} is not UTF-8 text: {reason}")]
    InputEncoding { path: PathBuf, reason: String },

    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),

    #[error("{0}")]
    Usage(String),

    #[error("cannot start the thread pool: {0}")]
    ThreadPool(String),

    #[error("{}: {message}", code_name(*.code))]
    Rpc { code: tonic::Code, message: String },

    #[error("cannot reach troupe at {addr}: {reason} (is the node running and is --addr its API address?)")]
    Connect { addr: String, reason: String },

    #[error(transparent)]
    Node(#[from] troupe_node::NodeError),

    #[error(transparent)]
    Config(#[from] troupe_node::config::ConfigError),

    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        // A status made on this side from a transport error says little ("transport error");
        // its sources say what failed (refused, a TLS handshake, a certificate).
        let mut message = status.message().to_owned();
        let mut source = std::error::Error::source(&status);
        while let Some(error) = source {
            let text = error.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = error.source();
        }
        CliError::Rpc {
            code: status.code(),
            message,
        }
    }
}

/// An error with its chain of sources, for a one-line message.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(error) = source {
        let text = error.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = error.source();
    }
    message
}

impl CliError {
    /// 2 for misuse (bad flags, bad input, bad config), 3 for a lost compare-and-set, 1 for
    /// everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) | CliError::InputEncoding { .. } => 2,
            CliError::Model(ModelError::EmptyInput | ModelError::BatchSize { .. }) => 2,
            CliError::Config(_) => 2,
            // A node that cannot start on its configuration or its certificates.
            CliError::Node(
                troupe_node::NodeError::Config(_)
                | troupe_node::NodeError::Tls(_)
                | troupe_node::NodeError::Auth(_)
                | troupe_node::NodeError::WrongIdentity { .. },
            ) => 2,
            // A lost compare-and-set: re-read and retry.
            CliError::Rpc {
                code: tonic::Code::Aborted,
                ..
            } => 3,
            _ => 1,
        }
    }
}
