//! The one place errors become gRPC status codes.

use tonic::{Code, Status};
use troupe_consensus::metadata::{Outcome, Rejection};
use troupe_consensus::{MetadataError, WatchError};

/// Metadata on an ABORTED (lost compare-and-set) status: the key's current revision.
pub const CURRENT_REVISION_HEADER: &str = "x-troupe-current-revision";

pub fn metadata_error(error: MetadataError) -> Status {
    let code = match &error {
        MetadataError::NoLeader
        | MetadataError::LeaderUnreachable { .. }
        | MetadataError::ShutDown => Code::Unavailable,
        MetadataError::Timeout { .. } => Code::DeadlineExceeded,
        MetadataError::NotLeader { .. } => Code::FailedPrecondition,
        MetadataError::Membership(_) => Code::FailedPrecondition,
        MetadataError::Config(_) | MetadataError::StorageOpen { .. } | MetadataError::Raft(_) => {
            Code::Internal
        }
    };
    Status::new(code, error.to_string())
}

/// A write's outcome as `(revision, changed)`, or the status a refused write maps to.
pub fn write_outcome(outcome: Outcome) -> Result<(u64, bool), Status> {
    match outcome {
        Outcome::Applied { revision } => Ok((revision, true)),
        Outcome::Unchanged { revision } => Ok((revision, false)),
        Outcome::Conflict {
            key,
            current_revision,
        } => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert(CURRENT_REVISION_HEADER, current_revision.into());
            Err(Status::with_metadata(
                Code::Aborted,
                format!(
                    "compare-and-set lost: {key} is at revision {current_revision}; re-read it and retry with --expected-revision {current_revision}"
                ),
                metadata,
            ))
        }
        Outcome::Rejected { reason } => Err(match reason {
            Rejection::UnknownModelVersion { .. } => Status::not_found(reason.to_string()),
            Rejection::VersionExists { .. } => Status::already_exists(reason.to_string()),
            Rejection::Invalid { .. } => Status::invalid_argument(reason.to_string()),
        }),
    }
}

pub fn watch_error(error: WatchError) -> Status {
    match error {
        WatchError::Compacted {
            snapshot_revision, ..
        } => {
            let mut status = Status::out_of_range(format!("{error}"));
            if let Ok(value) = snapshot_revision.to_string().parse() {
                status
                    .metadata_mut()
                    .insert("x-troupe-snapshot-revision", value);
            }
            status
        }
        WatchError::Lagged => Status::out_of_range(error.to_string()),
        WatchError::Closed => Status::unavailable(error.to_string()),
    }
}

/// A request the actor tree could not serve.
pub fn serve_error(error: troupe_actors::ServeError) -> Status {
    use troupe_actors::ServeError as E;
    let code = match &error {
        E::UnknownModel { .. } | E::UnknownVersion { .. } | E::UnknownTask { .. } => Code::NotFound,
        E::NoActiveVersion { .. } | E::VersionNotServed { .. } => Code::FailedPrecondition,
        E::LoadFailed { .. } => Code::FailedPrecondition,
        E::Loading { .. }
        | E::RollingOut { .. }
        | E::WorkerFailed { .. }
        | E::Unavailable { .. }
        | E::ShuttingDown => Code::Unavailable,
        E::QueueFull { .. } => Code::ResourceExhausted,
        E::DeadlineExceeded { .. } => Code::DeadlineExceeded,
        E::InvalidText { .. } => Code::InvalidArgument,
    };
    Status::new(code, error.to_string())
}
