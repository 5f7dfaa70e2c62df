//! How the tree's actors (MetadataSync) ask the supervisor to start and stop batchers.

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use troupe_models::LoadedModel;

use super::SupervisorMsg;
use crate::batcher::BatcherHandle;
use crate::stats::{call, ActorStats};
use crate::table::ModelKey;

/// How the node talks to its supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    pub(super) actor: ActorRef<SupervisorMsg>,
    pub(super) stats: Arc<ActorStats>,
}

/// Generous bound for supervisor calls that only touch in-memory state.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl SupervisorHandle {
    pub async fn start_model(
        &self,
        key: ModelKey,
        model: LoadedModel,
    ) -> Result<BatcherHandle, String> {
        match call(
            &self.actor,
            &self.stats,
            |reply| SupervisorMsg::StartModel { key, model, reply },
            Some(CALL_TIMEOUT),
        )
        .await
        {
            Ok(ractor::rpc::CallResult::Success(result)) => result,
            Ok(_) => Err("the supervisor did not answer".into()),
            Err(error) => Err(format!("the supervisor is gone: {error}")),
        }
    }

    pub async fn stop_model(&self, key: ModelKey) {
        let _ = call(
            &self.actor,
            &self.stats,
            |reply| SupervisorMsg::StopModel { key, reply },
            Some(CALL_TIMEOUT),
        )
        .await;
    }
}
