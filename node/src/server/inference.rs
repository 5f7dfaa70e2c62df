//! `troupe.v1.Inference/Embed`: validate the request against the node's limits, pick the
//! nodes to try (the router), and serve it on this node's batcher or forward it to a peer,
//! moving on when a node is full or unavailable. `Peer/Forward` ends here too, served
//! locally only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Response, Status};
use troupe_actors::{Candidate, EmbedJob, PeerState, Router, ServeError, TreeView};
use troupe_proto::v1::inference_server::Inference;
use troupe_proto::v1::{EmbedRequest, EmbedResponse, Embedding};

use super::status::serve_error;
use crate::forward::{Forwarder, TraceContext, FORWARDED_BY_HEADER, MIN_REVISION_HEADER};
use crate::live::LiveLimits;
use crate::metrics::NodeMetrics;

/// Request metadata naming the API version the client speaks.
pub const API_VERSION_HEADER: &str = "x-troupe-api-version";

/// API versions this node serves.
pub const SUPPORTED_API_VERSIONS: std::ops::RangeInclusive<u32> = 1..=1;

/// What the Embed handler and the peer port's Forward handler share.
pub struct InferenceCore {
    pub(crate) node_id: u64,
    pub(crate) tree: TreeView,
    /// The node's request limits and attempts, as cluster settings leave them now.
    pub(crate) limits: LiveLimits,
    next_request: AtomicU64,
    pub(crate) router: Router,
    pub(crate) forwarder: Forwarder,
    /// This node is a backup: its router tries it after the primaries too.
    backup: bool,
    pub(crate) metrics: Arc<NodeMetrics>,
}

/// `troupe.v1.Inference` on the API port.
pub struct InferenceService(pub Arc<InferenceCore>);

/// How a node routes: its strategy, the nodes it tries per request, and its forwarding
/// connections.
pub struct RoutingParts {
    pub router: Router,
    pub forwarder: Forwarder,
    pub backup: bool,
    pub metrics: Arc<NodeMetrics>,
}

impl InferenceCore {
    pub fn new(node_id: u64, tree: TreeView, limits: LiveLimits, routing: RoutingParts) -> Self {
        Self {
            node_id,
            tree,
            limits,
            next_request: AtomicU64::new(1),
            router: routing.router,
            forwarder: routing.forwarder,
            backup: routing.backup,
            metrics: routing.metrics,
        }
    }
}

/// FAILED_PRECONDITION when the client names an API version this node does not speak.
pub fn check_api_version<T>(request: &Request<T>) -> Result<(), Status> {
    let Some(value) = request.metadata().get(API_VERSION_HEADER) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or_default().trim();
    let supported = format!(
        "{}..={}",
        SUPPORTED_API_VERSIONS.start(),
        SUPPORTED_API_VERSIONS.end()
    );
    match text.parse::<u32>() {
        Ok(version) if SUPPORTED_API_VERSIONS.contains(&version) => Ok(()),
        _ => Err(Status::failed_precondition(format!(
            "{API_VERSION_HEADER} {text:?} is not supported: this node speaks API versions {supported}; upgrade the client or the node"
        ))),
    }
}

/// The `grpc-timeout` header as a duration (`<digits><unit>`, unit one of H M S m u n).
pub(crate) fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl InferenceCore {
    fn validate(&self, request: &EmbedRequest) -> Result<(), Status> {
        let limits = self.limits.get();
        troupe_proto::convert::check_embed_names(request).map_err(|e| super::status::status(&e))?;
        if request.texts.is_empty() {
            return Err(Status::invalid_argument(
                "texts is empty: send at least one text",
            ));
        }
        if request.texts.len() > limits.max_texts_per_request {
            return Err(Status::invalid_argument(format!(
                "{} texts in one request, the limit is {} (limits.max_texts_per_request): split the request",
                request.texts.len(),
                limits.max_texts_per_request
            )));
        }
        for (index, text) in request.texts.iter().enumerate() {
            // Cheap bound first: a text of n bytes has at most n characters.
            if text.len() > limits.max_chars_per_text {
                let chars = text.chars().count();
                if chars > limits.max_chars_per_text {
                    return Err(Status::invalid_argument(format!(
                        "text {index} has {chars} characters, the limit is {} (limits.max_chars_per_text): shorten or split it (the model reads only its first 256 tokens anyway)",
                        limits.max_chars_per_text
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A request as it is served: validated, with its id, deadline and trace context.
pub(crate) struct Admitted {
    request: EmbedRequest,
    received: Instant,
    deadline: Instant,
    trace: TraceContext,
}

/// Codes after which the next node is tried: the node was full, or could not serve now.
pub(crate) fn try_next_node(code: Code) -> bool {
    matches!(code, Code::ResourceExhausted | Code::Unavailable)
}

/// Route errors that hold on every node (the metadata is the same everywhere): no point in
/// asking a peer.
fn cluster_wide(error: &ServeError) -> bool {
    matches!(
        error,
        ServeError::UnknownModel { .. }
            | ServeError::UnknownVersion { .. }
            | ServeError::UnknownTask { .. }
            | ServeError::NoActiveVersion { .. }
    )
}

impl InferenceCore {
    /// Checks the API version and the request, names it, and fixes its deadline.
    pub(crate) fn admit(&self, request: Request<EmbedRequest>) -> Result<Admitted, Status> {
        let received = Instant::now();
        check_api_version(&request)?;
        let timeout = Duration::from_millis(self.limits.get().request_timeout_ms);
        let timeout = grpc_timeout(&request).map_or(timeout, |t| t.min(timeout));
        let forwarded_by = request
            .metadata()
            .get(FORWARDED_BY_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let seed = format!("{}-{:?}", self.node_id, received);
        let trace = TraceContext::of(&request, &seed);
        let mut request = request.into_inner();
        if request.request_id.is_empty() {
            request.request_id = self.new_request_id();
        }
        // Validated before any field is used (a span field, a log line, a lookup).
        self.validate(&request)?;
        let span = tracing::Span::current();
        span.record("model", request.model.as_str());
        span.record("task", request.task.as_str());
        span.record("request_id", request.request_id.as_str());
        span.record("node_id", self.node_id);
        span.record("trace_id", trace.trace_id.as_str());
        span.record("span_id", trace.span_id.as_str());
        if let Some(parent) = &trace.parent_id {
            span.record("parent_id", parent.as_str());
        }
        if !trace.sampled() {
            span.record("sampled", false);
        }
        if !forwarded_by.is_empty() {
            span.record("forwarded_by", forwarded_by.as_str());
        }
        Ok(Admitted {
            request,
            received,
            deadline: received + timeout,
            trace,
        })
    }

    /// Serves a request on this node's batcher, or says why it cannot.
    async fn serve_local(&self, admitted: &Admitted) -> Result<EmbedResponse, Status> {
        let _in_flight = self.tree.in_flight.enter();
        let request = &admitted.request;
        let route = self
            .tree
            .table
            .route(&request.model, &request.version, &request.task)
            .map_err(serve_error)?;
        tracing::Span::current().record("version", route.version.as_str());
        let (reply, answer) = tokio::sync::oneshot::channel();
        route.batcher.submit(EmbedJob {
            texts: request.texts.clone(),
            request_id: request.request_id.clone(),
            task: request.task.clone(),
            lane: route.lane,
            deadline: Some(admitted.deadline),
            received: admitted.received,
            reply,
        });
        let answered = tokio::time::timeout_at(admitted.deadline.into(), answer).await;
        let embeddings = match answered {
            Ok(Ok(result)) => result.map_err(serve_error)?,
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no answer within {} ms (the client's grpc-timeout or limits.request_timeout_ms): allow longer, or retry when the node is less busy",
                    admitted.deadline.duration_since(admitted.received).as_millis()
                )))
            }
            Ok(Err(_)) => {
                return Err(serve_error(ServeError::Unavailable {
                    model: request.model.clone(),
                    version: route.version,
                    reason: "its batcher stopped before answering (it is being restarted): retry"
                        .into(),
                }))
            }
        };
        tracing::debug!(
            elapsed_ms = admitted.received.elapsed().as_secs_f64() * 1e3,
            "embedded"
        );
        Ok(EmbedResponse {
            embeddings: embeddings
                .into_iter()
                .map(|values| Embedding { values })
                .collect(),
            model_version: route.version,
            revision: route.revision,
            request_id: request.request_id.clone(),
            served_by: self.node_id,
        })
    }

    /// A new request id for a request that came without one.
    pub(crate) fn new_request_id(&self) -> String {
        format!(
            "{}-{}",
            self.node_id,
            self.next_request.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The order to try nodes in for a request with routing `key`.
    pub(crate) fn order(
        &self,
        candidates: &[Candidate],
        routing_key: impl FnOnce() -> Vec<u8>,
    ) -> Vec<u64> {
        // Only consistent hashing reads the ring and the routing key: the other strategies
        // never pay for listing the members or joining a request's texts.
        let (members, key): (Vec<u64>, Vec<u8>) = match self.router.strategy() {
            troupe_actors::Strategy::ConsistentHash => (
                std::iter::once(self.node_id)
                    .chain(self.tree.peers.snapshot().iter().map(|p| p.node_id))
                    .collect(),
                routing_key(),
            ),
            _ => (Vec::new(), Vec::new()),
        };
        self.router.order(self.node_id, candidates, &members, &key)
    }

    /// The nodes that can serve the request now, this one included when it can.
    pub(crate) fn candidates(
        &self,
        model: &str,
        version: &str,
        task: &str,
    ) -> Result<(Vec<Candidate>, Option<Status>), Status> {
        let mut candidates = Vec::new();
        let mut local_error = None;
        match self.tree.table.route(model, version, task) {
            Ok(_) => candidates.push(Candidate {
                node_id: self.node_id,
                outstanding: self.tree.in_flight.get(),
                backup: self.backup,
                suspect: false,
            }),
            Err(error) if cluster_wide(&error) => return Err(serve_error(error)),
            Err(error) => local_error = Some(serve_error(error)),
        }
        for peer in self.tree.peers.snapshot() {
            let reachable = matches!(peer.state, PeerState::Up | PeerState::Suspect);
            if peer.node_id == self.node_id || !reachable || !peer.serves(model, version) {
                continue;
            }
            candidates.push(Candidate {
                node_id: peer.node_id,
                outstanding: peer.in_flight + self.router.forwarded_to(peer.node_id),
                backup: peer.backup,
                suspect: peer.state == PeerState::Suspect,
            });
        }
        Ok((candidates, local_error))
    }

    /// Serves a client's request here or on a peer, trying the next node when one is full or
    /// unavailable, at most `routing.max_attempts` nodes in all.
    pub(crate) async fn embed_routed(&self, admitted: Admitted) -> Result<EmbedResponse, Status> {
        let request = &admitted.request;
        // Peers must serve at least what this node's table knows now.
        let revision = self.tree.table.revision();
        let (candidates, local_error) =
            self.candidates(&request.model, &request.version, &request.task)?;
        let order = self.order(&candidates, || {
            if request.routing_key.is_empty() {
                request.texts.join("\u{0}").into_bytes()
            } else {
                request.routing_key.clone().into_bytes()
            }
        });
        let mut last_error = local_error;
        for node in order.into_iter().take(self.limits.get().max_attempts) {
            let now = Instant::now();
            if now >= admitted.deadline {
                return Err(Status::deadline_exceeded(format!(
                    "the request's deadline passed while trying nodes (last error: {})",
                    last_error.as_ref().map_or("none", |s| s.message())
                )));
            }
            let result = if node == self.node_id {
                self.serve_local(&admitted).await
            } else {
                let Some(peer) = self.tree.peers.get(node) else {
                    continue;
                };
                let _counted = self.router.forwarding(node);
                let forwarded = self
                    .forwarder
                    .forward(
                        node,
                        &peer.peer_addr,
                        request.clone(),
                        admitted.deadline - now,
                        &admitted.trace.traceparent(),
                        revision,
                    )
                    .await;
                self.metrics
                    .record_forward(node, forwarded.as_ref().err().map(Status::code));
                forwarded
            };
            match result {
                Ok(response) => {
                    tracing::Span::current().record("served_by", response.served_by);
                    if response.served_by != self.node_id {
                        tracing::debug!(peer = response.served_by, "served by a peer");
                    }
                    return Ok(response);
                }
                Err(status) if try_next_node(status.code()) => {
                    tracing::debug!(node, code = ?status.code(), message = status.message(), "node could not take the request; trying the next");
                    last_error = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            Status::unavailable(format!(
                "no node serves model '{}' now (none has it loaded and reachable): retry shortly, or see `troupe models list` and `troupe cluster status`",
                request.model
            ))
        }))
    }

    /// A request another node's router sent here: served on this node or refused, never
    /// forwarded again (so a request is forwarded at most once and cannot loop).
    pub async fn embed_forwarded(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        let min_revision = min_revision(&request)?;
        let admitted = self.admit(request)?;
        self.wait_for_revision(min_revision, admitted.deadline)
            .await?;
        self.serve_local(&admitted).await.map(Response::new)
    }

    /// Waits until this node's serving table is at `revision` or later, up to `deadline`.
    pub(crate) async fn wait_for_revision(
        &self,
        revision: u64,
        deadline: Instant,
    ) -> Result<(), Status> {
        let table = &self.tree.table;
        let mut changes = table.subscribe();
        let caught_up = tokio::time::timeout_at(deadline.into(), async {
            while table.revision() < revision {
                if changes.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        match caught_up {
            Ok(true) => Ok(()),
            _ => Err(Status::unavailable(format!(
                "node {} has not caught up with metadata revision {revision} (it is at {}): another node may serve",
                self.node_id,
                table.revision()
            ))),
        }
    }
}

/// The revision a forwarding node asks this one to have applied first (its
/// [`MIN_REVISION_HEADER`]); 0 when absent.
pub(crate) fn min_revision<T>(request: &Request<T>) -> Result<u64, Status> {
    match request.metadata().get(MIN_REVISION_HEADER) {
        None => Ok(0),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("{MIN_REVISION_HEADER} must be a revision number"))
            }),
    }
}

/// The metric label of a model or task that is not registered.
const OTHER: &str = "other";

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = super::generate::ChunkStream;

    #[tracing::instrument(
        skip_all,
        fields(node_id = self.0.node_id, model = %request.get_ref().model)
    )]
    async fn generate(
        &self,
        request: Request<troupe_proto::v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let started = Instant::now();
        let model = if self.0.tree.table.knows_model(&request.get_ref().model) {
            request.get_ref().model.clone()
        } else {
            OTHER.to_owned()
        };
        let task = request.get_ref().task.clone();
        let task = if task.is_empty() || self.0.tree.table.knows_task(&task) {
            task
        } else {
            OTHER.to_owned()
        };
        let result = match self.0.admit_generate(request) {
            Ok(admitted) => self.0.generate_routed(admitted).await,
            Err(status) => Err(status),
        };
        // The latency recorded is the time to the first chunk.
        self.0.metrics.record_request(
            &model,
            &task,
            result.as_ref().err().map(Status::code),
            started.elapsed(),
        );
        result.map(Response::new)
    }

    #[tracing::instrument(
        skip_all,
        fields(node_id = self.0.node_id, model, task, request_id, version, trace_id, span_id, parent_id, sampled, forwarded_by, served_by)
    )]
    async fn embed(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        let started = Instant::now();
        // Metric labels name only registered models and tasks with a priority: a client's
        // made-up names all count as "other", so they cannot grow /metrics.
        let (model, task) = {
            let (model, task) = (&request.get_ref().model, &request.get_ref().task);
            let table = &self.0.tree.table;
            (
                if table.knows_model(model) {
                    model.clone()
                } else {
                    OTHER.to_owned()
                },
                if task.is_empty() || table.knows_task(task) {
                    task.clone()
                } else {
                    OTHER.to_owned()
                },
            )
        };
        let result = match self.0.admit(request) {
            Ok(admitted) => self.0.embed_routed(admitted).await,
            Err(status) => Err(status),
        };
        self.0.metrics.record_request(
            &model,
            &task,
            result.as_ref().err().map(Status::code),
            started.elapsed(),
        );
        result.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let with = |value: &str| {
            let mut request = Request::new(());
            request
                .metadata_mut()
                .insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&request)
        };
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("7u"), Some(Duration::from_micros(7)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("x"), None);
        assert_eq!(with("10Q"), None);
    }
}
