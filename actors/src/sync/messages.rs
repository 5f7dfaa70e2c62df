//! What MetadataSync is sent.

use std::sync::Arc;

use troupe_models::SentenceEmbedder;

use crate::table::ModelKey;

pub enum SyncMsg {
    /// Metadata changed (models or tasks), or a resync happened: reconcile.
    Changed,
    /// A load started by this actor finished.
    Loaded {
        key: ModelKey,
        result: Result<Arc<dyn SentenceEmbedder>, String>,
    },
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
        }
    }
}
