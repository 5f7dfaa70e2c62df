//! `troupe.v1.Admin`: membership, metadata writes and reads, node status.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use troupe_actors::table::LocalState;
use troupe_actors::{ModelKey, TreeView};
use troupe_consensus::metadata::ModelState;
use troupe_consensus::metadata::{Command, Proposal};
use troupe_consensus::Metadata;
use troupe_models::artifact::ArtifactStore;
use troupe_proto::v1::admin_server::Admin;
use troupe_proto::v1::{
    ActorEntry, ActorTreeRequest, ActorTreeResponse, AddLearnerRequest, BatcherEntry,
    ClusterInitRequest, ClusterInitResponse, GetSettingRequest, GetSettingResponse, HistoryRequest,
    HistoryResponse, ListModelsResponse, ListPrioritiesResponse, ListSettingsResponse,
    MembershipResponse, NodeRef, NodeStatusRequest, NodeStatusResponse, PushModelChunk,
    PushModelResponse, ReadRequest, RegisterModelRequest, RestartActorRequest,
    RestartActorResponse, SetModelStateRequest, SetPriorityRequest, SetSettingRequest,
    WatchRequest, WatchResponse, WriteResponse,
};

use super::status::{metadata_error, watch_error, write_error, write_outcome};

/// Longest RestartActor waits for the new incarnation to run.
const RESTART_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Changes buffered per watch stream before the sender waits for the client.
const WATCH_STREAM_BUFFER: usize = 256;

pub struct AdminService {
    metadata: Arc<Metadata>,
    /// `[limits] max_setting_value_bytes`: checked before a setting is proposed.
    max_setting_value_bytes: usize,
    tree: TreeView,
    store: ArtifactStore,
    /// Becomes true when the node stops; open watch streams end then, so they do not hold
    /// graceful shutdown open.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl AdminService {
    pub fn new(
        metadata: Arc<Metadata>,
        stopping: tokio::sync::watch::Receiver<bool>,
        tree: TreeView,
        store: ArtifactStore,
        max_setting_value_bytes: usize,
    ) -> Self {
        Self {
            metadata,
            max_setting_value_bytes,
            tree,
            store,
            stopping,
        }
    }

    /// This node's view of a version: loading, ready, failed: REASON, or "" when not loaded.
    fn local_state(&self, name: &str, version: &str) -> String {
        let key = ModelKey {
            name: name.to_owned(),
            version: version.to_owned(),
        };
        match self.tree.table.local(&key) {
            None => String::new(),
            Some(LocalState::Loading) => "loading".into(),
            Some(LocalState::Ready(_)) => "ready".into(),
            Some(LocalState::Failed(reason)) => format!("failed: {reason}"),
        }
    }

    fn membership(&self) -> MembershipResponse {
        let status = self.metadata.status();
        MembershipResponse {
            voters: status.voters,
            learners: status.learners,
        }
    }

    async fn write(
        &self,
        command: Command,
        expected_revision: Option<u64>,
        request_id: String,
    ) -> Result<Response<WriteResponse>, Status> {
        check_request_id(&request_id)?;
        let proposal = Proposal {
            command,
            expected_revision,
            request_id: (!request_id.is_empty()).then_some(request_id),
        };
        let outcome = self.metadata.propose(proposal).await.map_err(write_error)?;
        let (revision, changed) = write_outcome(outcome)?;
        Ok(Response::new(WriteResponse { revision, changed }))
    }
}

mod entries;

pub(crate) use entries::check_member;
pub(super) use entries::check_request_id;
use entries::{consistency, member, model_entries, setting_entries, setting_entry, task_entries};

#[tonic::async_trait]
impl Admin for AdminService {
    type WatchStream = tonic::codegen::BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let from = request.into_inner().from_revision;
        let mut watch = self.metadata.watch(from).map_err(watch_error)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(WATCH_STREAM_BUFFER);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = watch.next() => next,
                    _ = async { drop(stopping.wait_for(|stopping| *stopping).await) } => {
                        let _ = sender.send(Err(Status::unavailable("the node is shutting down: reconnect to another node"))).await;
                        return;
                    }
                };
                let item = match next {
                    Ok(change) => match serde_json::to_string(&change.value) {
                        Ok(value_json) => Ok(WatchResponse {
                            revision: change.revision,
                            key: change.key,
                            value_json,
                        }),
                        Err(error) => {
                            Err(Status::internal(format!("cannot encode change: {error}")))
                        }
                    },
                    Err(error) => Err(watch_error(error)),
                };
                let last = item.is_err();
                // The client went away, or the stream ended with an error: stop.
                if sender.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        let stream = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(receiver);
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, fields(node_id = self.metadata.node_id()))]
    async fn cluster_init(
        &self,
        request: Request<ClusterInitRequest>,
    ) -> Result<Response<ClusterInitResponse>, Status> {
        let mut members = BTreeMap::new();
        for member in request.into_inner().members {
            let (id, addr) = check_member(Some(member))?;
            if members.insert(id, addr).is_some() {
                return Err(Status::invalid_argument(format!(
                    "member id {id} appears twice"
                )));
            }
        }
        if members.is_empty() {
            return Err(Status::invalid_argument(
                "give at least one member: --members 1=HOST:PEERPORT,...",
            ));
        }
        let status = self.metadata.status();
        let already = !status.voters.is_empty();
        if already {
            // Initialising a formed cluster is a no-op only when it names the same members;
            // anything else would be silently ignored, so it is refused.
            let mut have: Vec<u64> = status
                .voters
                .iter()
                .chain(&status.learners)
                .copied()
                .collect();
            have.sort_unstable();
            have.dedup();
            let asked: Vec<u64> = members.keys().copied().collect();
            if asked != have {
                let list = |ids: &[u64]| {
                    ids.iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(Status::failed_precondition(format!(
                    "the cluster is already formed with members {}; init cannot change them (asked for {}): use `troupe cluster add-learner`, `promote` and `remove`",
                    list(&have),
                    list(&asked)
                )));
            }
        }
        self.metadata
            .initialize(members)
            .await
            .map_err(metadata_error)?;
        Ok(Response::new(ClusterInitResponse {
            initialized: !already,
            leader: self.metadata.status().leader,
        }))
    }

    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        let (id, addr) = check_member(request.into_inner().member)?;
        self.metadata
            .add_learner(id, addr)
            .await
            .map_err(metadata_error)?;
        Ok(Response::new(self.membership()))
    }

    async fn promote(
        &self,
        request: Request<NodeRef>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.metadata
            .promote(request.into_inner().id)
            .await
            .map_err(metadata_error)?;
        Ok(Response::new(self.membership()))
    }

    async fn remove(
        &self,
        request: Request<NodeRef>,
    ) -> Result<Response<MembershipResponse>, Status> {
        self.metadata
            .remove(request.into_inner().id)
            .await
            .map_err(metadata_error)?;
        Ok(Response::new(self.membership()))
    }

    async fn node_status(
        &self,
        _request: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let status = self.metadata.status();
        Ok(Response::new(NodeStatusResponse {
            id: status.node_id,
            role: serde_json::to_value(status.role)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            term: status.term,
            leader: status.leader,
            last_log_index: status.last_log_index,
            applied_revision: status.applied_revision,
            snapshot_revision: status.snapshot_revision,
            voters: status.voters,
            learners: status.learners,
            members: status
                .nodes
                .iter()
                .map(|(id, addr)| member(*id, addr))
                .collect(),
            applied_index: status.applied_index,
            snapshot_index: status.snapshot_index,
            purged_index: status.purged_index,
            peers: {
                let now = std::time::Instant::now();
                self.tree
                    .peers
                    .snapshot()
                    .iter()
                    .map(|view| super::heartbeat::peer_health_entry(view, now))
                    .collect()
            },
            sync_lag: self.tree.peers.own_sync_lag(),
            committed_index: status.committed_index,
            leader_changes: status.leader_changes,
            insecure: self.metadata.transport().tls_state().is_none(),
            removed: status.removed.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(node_id = self.metadata.node_id()))]
    async fn set_priority(
        &self,
        request: Request<SetPriorityRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let command = Command::SetTaskPriority {
            name: request.name,
            priority: request.priority,
        };
        self.write(command, request.expected_revision, request.request_id)
            .await
    }

    async fn list_priorities(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<ListPrioritiesResponse>, Status> {
        let consistency = consistency(request.get_ref());
        let (tasks, revision) = self
            .metadata
            .read(consistency, |state| (task_entries(state), state.revision))
            .await
            .map_err(metadata_error)?;
        Ok(Response::new(ListPrioritiesResponse { tasks, revision }))
    }

    #[tracing::instrument(skip_all, fields(node_id = self.metadata.node_id()))]
    async fn register_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let command = Command::RegisterModelVersion {
            name: request.name,
            version: request.version,
            digest: request.digest,
            size_bytes: request.size_bytes,
            format: request.format,
            source: (!request.source_dir.is_empty()).then_some(request.source_dir),
            precision: (!request.precision.is_empty()).then_some(request.precision),
        };
        self.write(command, request.expected_revision, request.request_id)
            .await
    }

    #[tracing::instrument(skip_all, fields(node_id = self.metadata.node_id()))]
    async fn set_model_state(
        &self,
        request: Request<SetModelStateRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        // Activation is a rollout: the version becomes wanted, and the leader's rollout
        // controller makes it active once every live serving node has it ready.
        let state = match request.state.as_str() {
            "active" | "wanted" => ModelState::Wanted,
            "retired" => ModelState::Retired,
            other => {
                return Err(Status::invalid_argument(format!(
                    "state {other:?} cannot be set: use active (starts a rollout) or retired"
                )))
            }
        };
        let requested_at_unix_ms = (state == ModelState::Wanted).then(|| {
            troupe_failpoints::wall_now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        });
        let command = Command::SetModelState {
            name: request.name,
            version: request.version,
            state,
            traffic_weight: request.traffic_weight,
            reason: None,
            requested_at_unix_ms,
        };
        self.write(command, request.expected_revision, request.request_id)
            .await
    }

    #[tracing::instrument(skip_all, fields(node_id = self.metadata.node_id()))]
    async fn push_model(
        &self,
        request: Request<tonic::Streaming<PushModelChunk>>,
    ) -> Result<Response<PushModelResponse>, Status> {
        super::push::receive(&self.metadata, &self.store, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn actor_tree(
        &self,
        _request: Request<ActorTreeRequest>,
    ) -> Result<Response<ActorTreeResponse>, Status> {
        let actors = self
            .tree
            .actors()
            .into_iter()
            .map(|a| ActorEntry {
                path: a.path,
                kind: a.kind,
                status: a.status,
                mailbox_depth: a.mailbox_depth,
                restarts: a.restarts,
                detail: a.detail,
            })
            .collect();
        let mut batchers: Vec<BatcherEntry> = self
            .tree
            .batchers()
            .into_iter()
            .map(|b| {
                let c = b.shared().counters();
                BatcherEntry {
                    model: b.key.name.clone(),
                    version: b.key.version.clone(),
                    batches: c.batches,
                    rows: c.rows,
                    requests: c.jobs,
                    rejected_full: c.rejected_full,
                    expired: c.expired,
                    cancelled: c.cancelled,
                    failed: c.failed,
                    queued: c.queued,
                    in_flight: c.in_flight,
                    worker_restarts: c.worker_restarts,
                    lane_depths: b
                        .shared()
                        .lane_depths()
                        .into_iter()
                        .map(|d| d as u64)
                        .collect(),
                }
            })
            .collect();
        batchers.sort_by(|a, b| (&a.model, &a.version).cmp(&(&b.model, &b.version)));
        let health = self.tree.health.borrow().clone();
        Ok(Response::new(ActorTreeResponse {
            actors,
            batchers,
            serving: health.serving,
            not_serving_reasons: health.reasons,
            revision: self.tree.table.revision(),
        }))
    }

    #[tracing::instrument(skip_all, fields(node_id = self.metadata.node_id()))]
    async fn set_setting(
        &self,
        request: Request<SetSettingRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        if request.value.len() > self.max_setting_value_bytes {
            return Err(Status::invalid_argument(format!(
                "setting value: {} bytes, the limit is {} ([limits] max_setting_value_bytes)",
                request.value.len(),
                self.max_setting_value_bytes
            )));
        }
        crate::live::check(&request.key, &request.value)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let command = Command::SetSetting {
            key: request.key,
            value: request.value,
        };
        self.write(command, request.expected_revision, request.request_id)
            .await
    }

    async fn get_setting(
        &self,
        request: Request<GetSettingRequest>,
    ) -> Result<Response<GetSettingResponse>, Status> {
        let request = request.into_inner();
        let consistency = consistency(&request.read.unwrap_or_default());
        let (setting, revision) = self
            .metadata
            .read(consistency, |state| {
                let setting = state
                    .settings
                    .get(&request.key)
                    .map(|record| setting_entry(&request.key, record));
                (setting, state.revision)
            })
            .await
            .map_err(metadata_error)?;
        Ok(Response::new(GetSettingResponse { setting, revision }))
    }

    async fn list_settings(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<ListSettingsResponse>, Status> {
        let consistency = consistency(request.get_ref());
        let (settings, revision) = self
            .metadata
            .read(consistency, |state| {
                (setting_entries(state), state.revision)
            })
            .await
            .map_err(metadata_error)?;
        Ok(Response::new(ListSettingsResponse { settings, revision }))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let revision = request.into_inner().revision;
        let state = self
            .metadata
            .state_at(revision)
            .await
            .map_err(|e| super::status::status(&e))?;
        Ok(Response::new(HistoryResponse {
            revision: state.revision,
            models: model_entries(&state),
            tasks: task_entries(&state),
            settings: setting_entries(&state),
            oldest_revision: self.metadata.oldest_revision(),
        }))
    }

    #[tracing::instrument(skip_all, fields(node_id = self.metadata.node_id()))]
    async fn restart_actor(
        &self,
        request: Request<RestartActorRequest>,
    ) -> Result<Response<RestartActorResponse>, Status> {
        let path = request.into_inner().path;
        tracing::warn!(actor = %troupe_proto::names::bounded(&path), "restart requested by an operator");
        let restarts = self
            .tree
            .restart(&path, RESTART_TIMEOUT)
            .await
            .map_err(|error| super::status::status(&error))?;
        Ok(Response::new(RestartActorResponse { path, restarts }))
    }

    async fn list_models(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let consistency = consistency(request.get_ref());
        let (models, revision) = self
            .metadata
            .read(consistency, |state| (model_entries(state), state.revision))
            .await
            .map_err(metadata_error)?;
        let models = models
            .into_iter()
            .map(|mut entry| {
                entry.local_state = self.local_state(&entry.name, &entry.version);
                entry
            })
            .collect();
        Ok(Response::new(ListModelsResponse { models, revision }))
    }
}
