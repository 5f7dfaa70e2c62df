//! What the NodeSupervisor is sent.

use ractor::RpcReplyPort;
use troupe_models::LoadedModel;

use crate::batcher::BatcherHandle;
use crate::table::ModelKey;

pub enum SupervisorMsg {
    /// Start a batcher (and its workers) for a loaded model version.
    StartModel {
        key: ModelKey,
        model: LoadedModel,
        reply: RpcReplyPort<Result<BatcherHandle, String>>,
    },
    /// Drain and stop a version's batcher; answers once it is stopped.
    StopModel {
        key: ModelKey,
        reply: RpcReplyPort<()>,
    },
    /// Drain every batcher (graceful shutdown); answers once all are empty.
    DrainAll(RpcReplyPort<()>),
}

impl std::fmt::Debug for SupervisorMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SupervisorMsg::StartModel { key, .. } => write!(f, "StartModel({key})"),
            SupervisorMsg::StopModel { key, .. } => write!(f, "StopModel({key})"),
            SupervisorMsg::DrainAll(_) => f.write_str("DrainAll"),
        }
    }
}
