//! Errors a `troupe` command can end with, and the exit code each maps to.

use std::path::PathBuf;

use troupe_models::{FetchError, ModelError};

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
}

impl CliError {
    /// 2 for misuse (bad flags, bad input), 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) | CliError::InputEncoding { .. } => 2,
            CliError::Model(ModelError::EmptyInput | ModelError::BatchSize { .. }) => 2,
            _ => 1,
        }
    }
}
