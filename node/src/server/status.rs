//! The one place errors become gRPC status codes. Every error a handler can meet implements
//! [`ServiceError`] (its code), and [`status`] is the one conversion to a `Status`: the code
//! from the table, the message from `Display`, bounded. (quickwit's `ServiceError::error_code`
//! is the model.)

use tonic::{Code, Status};
use troupe_actors::RestartError;
use troupe_consensus::metadata::{Outcome, Rejection};
use troupe_consensus::{HistoryError, MetadataError, WatchError};
use troupe_proto::convert::ProtoError;

/// gRPC code names as the spec spells them: `NOT_FOUND`, `ABORTED`, ...
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error that knows the gRPC code it is answered with.
pub trait ServiceError: std::fmt::Display {
    fn code(&self) -> Code;
}

/// The longest message a status carries from here (the API gate cuts anything longer too).
const MAX_MESSAGE_BYTES: usize = 1024;

/// The one conversion: the error's code and its message, cut to a bounded length so that no
/// client string echoed in it can crowd the real code out.
pub fn status(error: &impl ServiceError) -> Status {
    let mut message = error.to_string();
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (cut)");
    }
    Status::new(error.code(), message)
}

impl ServiceError for MetadataError {
    fn code(&self) -> Code {
        match self {
            MetadataError::NoLeader
            | MetadataError::LeaderUnreachable { .. }
            | MetadataError::ShutDown => Code::Unavailable,
            // gRPC's DEADLINE_EXCEEDED: a change may have happened even so.
            MetadataError::Timeout { .. } => Code::DeadlineExceeded,
            // This node's Raft core stopped (a full disk): another node may serve the retry.
            MetadataError::OutcomeUnknown(cause) if matches!(**cause, MetadataError::Raft(_)) => {
                Code::Unavailable
            }
            MetadataError::OutcomeUnknown(_) => Code::DeadlineExceeded,
            MetadataError::NotLeader { .. } | MetadataError::Membership(_) => {
                Code::FailedPrecondition
            }
            // The Raft core failed (a full disk, a storage fault): this node cannot write,
            // another node may.
            MetadataError::Raft(_) => Code::Unavailable,
            MetadataError::Config(_) | MetadataError::StorageOpen { .. } => Code::Internal,
        }
    }
}

impl ServiceError for Rejection {
    fn code(&self) -> Code {
        match self {
            Rejection::UnknownModelVersion { .. } => Code::NotFound,
            Rejection::VersionExists { .. } => Code::AlreadyExists,
            Rejection::Invalid { .. } => Code::InvalidArgument,
        }
    }
}

impl ServiceError for ProtoError {
    fn code(&self) -> Code {
        Code::InvalidArgument
    }
}

impl ServiceError for HistoryError {
    fn code(&self) -> Code {
        Code::OutOfRange
    }
}

impl ServiceError for RestartError {
    fn code(&self) -> Code {
        match self {
            RestartError::NoSuchActor(_) => Code::NotFound,
            RestartError::Root | RestartError::Thread { .. } => Code::InvalidArgument,
            RestartError::Gone(_) | RestartError::NotRestarted { .. } => Code::FailedPrecondition,
        }
    }
}

impl ServiceError for troupe_actors::ServeError {
    fn code(&self) -> Code {
        use troupe_actors::ServeError as E;
        match self {
            E::UnknownModel { .. } | E::UnknownVersion { .. } | E::UnknownTask { .. } => {
                Code::NotFound
            }
            E::NoActiveVersion { .. } | E::VersionNotServed { .. } | E::LoadFailed { .. } => {
                Code::FailedPrecondition
            }
            E::Loading { .. }
            | E::RollingOut { .. }
            | E::WorkerFailed { .. }
            | E::Unavailable { .. }
            | E::ShuttingDown => Code::Unavailable,
            E::QueueFull { .. } => Code::ResourceExhausted,
            E::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            E::InvalidText { .. } | E::TooLong { .. } => Code::InvalidArgument,
            E::WrongKind { .. } => Code::FailedPrecondition,
        }
    }
}

impl ServiceError for WatchError {
    fn code(&self) -> Code {
        match self {
            WatchError::Compacted { .. } | WatchError::Lagged => Code::OutOfRange,
            WatchError::Closed => Code::Unavailable,
        }
    }
}

/// Metadata on an ABORTED (lost compare-and-set) status: the key's current revision.
pub const CURRENT_REVISION_HEADER: &str = "x-troupe-current-revision";
/// Metadata on an ABORTED (lost compare-and-set) status: the key's current value (binary
/// metadata, the value's UTF-8 bytes); absent when the key does not exist or the value is
/// longer than [`MAX_VALUE_TRAILER_BYTES`]. With the revision a loser can retry at once,
/// without reading the key back.
pub const CURRENT_VALUE_HEADER: &str = "x-troupe-current-value-bin";
/// The longest value sent back in [`CURRENT_VALUE_HEADER`]. HTTP/2 peers bound a header list
/// (16 KiB by default), and a setting may hold 64 KiB: a longer trailer broke the connection
/// with a protocol error instead of answering ABORTED. A longer value is left out, and the
/// client reads it back.
pub const MAX_VALUE_TRAILER_BYTES: usize = 4 * 1024;

pub fn metadata_error(error: MetadataError) -> Status {
    status(&error)
}

/// Metadata on a failed write: `not-applied` when it certainly did not apply (it reached no
/// leader's log), `unknown` when it may have.
pub const OUTCOME_HEADER: &str = "x-troupe-outcome";

/// A failed write's status, with the [`OUTCOME_HEADER`] trailer: `unknown` for
/// [`MetadataError::OutcomeUnknown`], `not-applied` for every other failure (it happened before
/// the write reached a leader's log).
pub fn write_error(error: MetadataError) -> Status {
    let outcome = match error {
        MetadataError::OutcomeUnknown(_) => "unknown",
        _ => "not-applied",
    };
    let mut status = status(&error);
    status.metadata_mut().insert(
        OUTCOME_HEADER,
        tonic::metadata::MetadataValue::from_static(outcome),
    );
    status
}

/// A write's outcome as `(revision, changed)`, or the status a refused write maps to.
pub fn write_outcome(outcome: Outcome) -> Result<(u64, bool), Status> {
    match outcome {
        Outcome::Applied { revision } => Ok((revision, true)),
        Outcome::Unchanged { revision } => Ok((revision, false)),
        Outcome::Conflict {
            key,
            current_revision,
            current_value,
        } => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert(CURRENT_REVISION_HEADER, current_revision.into());
            if let Some(value) = current_value.filter(|v| v.len() <= MAX_VALUE_TRAILER_BYTES) {
                metadata.insert_bin(
                    CURRENT_VALUE_HEADER,
                    tonic::metadata::MetadataValue::from_bytes(value.as_bytes()),
                );
            }
            Err(Status::with_metadata(
                Code::Aborted,
                format!(
                    "compare-and-set lost: {key} is at revision {current_revision}; re-read it and retry with --expected-revision {current_revision}"
                ),
                metadata,
            ))
        }
        Outcome::Rejected { reason } => Err(status(&reason)),
    }
}

pub fn watch_error(error: WatchError) -> Status {
    let mut status = status(&error);
    if let WatchError::Compacted {
        snapshot_revision, ..
    } = error
    {
        status
            .metadata_mut()
            .insert("x-troupe-snapshot-revision", snapshot_revision.into());
    }
    status
}

/// A request the actor tree could not serve.
pub fn serve_error(error: troupe_actors::ServeError) -> Status {
    status(&error)
}
