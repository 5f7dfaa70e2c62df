//! `troupe.v1.Peer` on the peer port: heartbeats (health gossip) and inference forwarded by
//! another node's router.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;
use troupe_proto::v1::peer_server::Peer;
use troupe_proto::v1::{EmbedRequest, EmbedResponse, HeartbeatRequest, HeartbeatResponse};

use super::heartbeat::HeartbeatResponder;
use super::inference::InferenceCore;

pub struct PeerService {
    pub inference: Arc<InferenceCore>,
    /// The node's serving runtime. The peer port runs on Raft's runtime; forwarded inference
    /// is client work, and goes back to the serving runtime.
    pub serving: tokio::runtime::Handle,
    pub heartbeats: HeartbeatResponder,
}

#[tonic::async_trait]
impl Peer for PeerService {
    type ForwardGenerateStream = super::generate::ChunkStream;

    async fn forward_generate(
        &self,
        request: Request<troupe_proto::v1::GenerateRequest>,
    ) -> Result<Response<Self::ForwardGenerateStream>, Status> {
        let inference = self.inference.clone();
        self.serving
            .spawn(async move { inference.generate_forwarded(request).await })
            .await
            .map_err(|e| Status::internal(format!("a forwarded request's task failed: {e}")))?
            .map(Response::new)
    }

    #[tracing::instrument(level = "trace", skip_all, fields(from = request.get_ref().from_node))]
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Ok(Response::new(self.heartbeats.answer(request.get_ref())))
    }

    #[tracing::instrument(
        skip_all,
        fields(
            node_id,
            model,
            task,
            request_id,
            version,
            trace_id,
            span_id,
            parent_id,
            sampled,
            forwarded_by,
            served_by
        )
    )]
    async fn forward(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        let inference = self.inference.clone();
        self.serving
            .spawn(
                async move { inference.embed_forwarded(request).await }
                    .instrument(tracing::Span::current()),
            )
            .await
            .map_err(|e| Status::internal(format!("a forwarded request's task failed: {e}")))?
    }
}
