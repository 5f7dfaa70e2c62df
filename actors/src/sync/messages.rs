//! What MetadataSync is sent.

use troupe_models::LoadedModel;

use crate::table::ModelKey;

pub enum SyncMsg {
    /// Metadata changed (models or tasks), or a resync happened: reconcile.
    Changed,
    /// A load started by this actor finished.
    Loaded {
        key: ModelKey,
        result: Result<LoadedModel, String>,
    },
    /// A readiness report's proposal returned: `proposed` if Raft took it, false if it
    /// failed (after a back-off). The next report of that version may go.
    Reported { key: ModelKey, proposed: bool },
    /// A readiness report is overdue in the metadata: look again.
    Recheck,
}

impl std::fmt::Debug for SyncMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncMsg::Changed => f.write_str("Changed"),
            SyncMsg::Loaded { key, result } => f
                .debug_struct("Loaded")
                .field("key", key)
                .field("ok", &result.is_ok())
                .finish(),
            SyncMsg::Reported { key, proposed } => f
                .debug_struct("Reported")
                .field("key", key)
                .field("proposed", proposed)
                .finish(),
            SyncMsg::Recheck => f.write_str("Recheck"),
        }
    }
}
