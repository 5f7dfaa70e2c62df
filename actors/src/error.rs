//! Why a request was not served. The node maps each variant to one gRPC code, in one table
//! (node/src/server/status.rs); the messages say what the caller can change.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("model '{model}' is not registered: register it with `troupe models register {model} --version V --dir DIR`")]
    UnknownModel { model: String },

    #[error("model '{model}' has no version '{version}': `troupe models list` shows the registered ones")]
    UnknownVersion { model: String, version: String },

    #[error("model '{model}' has no active version: activate one with `troupe models activate {model} VERSION`")]
    NoActiveVersion { model: String },

    #[error("model '{model}' version '{version}' is {state}, not served: activate it, or omit the version to use the active one")]
    VersionNotServed {
        model: String,
        version: String,
        state: String,
    },

    #[error("model '{model}' has no active version yet: version '{version}' is being rolled out to every node; retry shortly")]
    RollingOut { model: String, version: String },

    #[error("model '{model}' version '{version}' is still loading on this node: retry shortly")]
    Loading { model: String, version: String },

    #[error("model '{model}' version '{version}' failed to load on this node: {reason}")]
    LoadFailed {
        model: String,
        version: String,
        reason: String,
    },

    #[error("task '{task}' has no priority: set one with `troupe priorities set {task} N`, or send no task for the default lane")]
    UnknownTask { task: String },

    #[error("the queue of model '{model}' version '{version}' lane {lane} is full ({capacity} waiting): retry later or on another node")]
    QueueFull {
        model: String,
        version: String,
        lane: usize,
        capacity: usize,
    },

    #[error("the request's deadline passed after {waited_ms} ms in the queue, before it reached the model: allow a longer deadline or retry")]
    DeadlineExceeded { waited_ms: u64 },

    #[error("text {index} could not be tokenised: {reason}")]
    InvalidText { index: usize, reason: String },

    #[error("the inference worker of model '{model}' version '{version}' failed during this batch ({reason}): it is being restarted, retry")]
    WorkerFailed {
        model: String,
        version: String,
        reason: String,
    },

    #[error("model '{model}' version '{version}' cannot serve: {reason}")]
    Unavailable {
        model: String,
        version: String,
        reason: String,
    },

    #[error("model '{model}' version '{version}' is a {serves} model and cannot {asked}: use the {serves} API (`troupe {serves}`), or a model of the other kind")]
    WrongKind {
        model: String,
        version: String,
        serves: &'static str,
        asked: &'static str,
    },

    #[error("the request does not fit model '{model}': {reason}")]
    TooLong { model: String, reason: String },

    #[error("the node is shutting down: retry on another node")]
    ShuttingDown,
}

impl ServeError {
    /// An answer that holds on every node, since every node applies the same metadata: no
    /// point in asking a peer.
    pub fn cluster_wide(&self) -> bool {
        matches!(
            self,
            ServeError::UnknownModel { .. }
                | ServeError::UnknownVersion { .. }
                | ServeError::UnknownTask { .. }
                | ServeError::NoActiveVersion { .. }
        )
    }
}
