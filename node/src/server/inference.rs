//! `troupe.v1.Inference/Embed`: admit the request (API version, limits, deadline, trace),
//! hand it to the dispatcher (troupe_actors::dispatch), which serves it on this node's
//! batcher or forwards it to a peer through [`EmbedHops`], and map what comes back to a
//! status. `Peer/Forward` ends here too, served on this node only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Response, Status};
use troupe_actors::{
    Ask, Dispatcher, EmbedJob, Failure, ForwardGuard, Hops, OwnedInFlightGuard, PeerView, Route,
    Router, ServeError, TreeView,
};
use troupe_proto::v1::inference_server::Inference;
use troupe_proto::v1::{EmbedRequest, EmbedResponse, Embedding};

use super::status::serve_error;
use crate::forward::{Forwarder, Hop, TraceContext, FORWARDED_BY_HEADER, MIN_REVISION_HEADER};
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
    /// Where each request goes: candidates, order, attempts, deadline.
    pub(crate) dispatcher: Dispatcher,
    pub(crate) forwarder: Forwarder,
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
        let dispatcher = Dispatcher::new(
            node_id,
            routing.backup,
            routing.router,
            tree.table.clone(),
            tree.peers.clone(),
            tree.in_flight.clone(),
        );
        Self {
            node_id,
            tree,
            limits,
            next_request: AtomicU64::new(1),
            dispatcher,
            forwarder: routing.forwarder,
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
pub(crate) struct Admitted<R> {
    pub(crate) request: R,
    pub(crate) received: Instant,
    pub(crate) deadline: Instant,
    pub(crate) trace: TraceContext,
}

/// What admission and the dispatcher read of a request (Embed or Generate).
pub(crate) trait Named {
    fn model(&self) -> &str;
    fn version(&self) -> &str;
    fn task(&self) -> &str;
    fn request_id(&mut self) -> &mut String;
}

macro_rules! named {
    ($request:ty) => {
        impl Named for $request {
            fn model(&self) -> &str {
                &self.model
            }
            fn version(&self) -> &str {
                &self.version
            }
            fn task(&self) -> &str {
                &self.task
            }
            fn request_id(&mut self) -> &mut String {
                &mut self.request_id
            }
        }
    };
}
named!(EmbedRequest);
named!(troupe_proto::v1::GenerateRequest);

impl<R: Named> Admitted<R> {
    /// The request as the dispatcher routes it.
    pub(crate) fn ask(&self, max_attempts: usize) -> Ask<'_> {
        Ask {
            model: self.request.model(),
            version: self.request.version(),
            task: self.request.task(),
            deadline: self.deadline,
            max_attempts,
        }
    }

    /// How the request goes to a peer now: what is left of its deadline, its trace, and
    /// the revision this node routed at.
    pub(crate) fn hop(&self, min_revision: u64) -> Hop {
        Hop {
            remaining: self.deadline.saturating_duration_since(Instant::now()),
            traceparent: self.trace.traceparent(),
            min_revision,
        }
    }
}

/// Codes after which the next node is tried: the node was full, or could not serve now.
pub(crate) fn try_next_node(code: Code) -> bool {
    matches!(code, Code::ResourceExhausted | Code::Unavailable)
}

impl InferenceCore {
    /// Checks the API version, names the request and fixes its deadline (the client's
    /// `grpc-timeout`, at most `timeout`), then checks its fields with `validate`, before any
    /// of them is used (a span field, a log line, a lookup).
    pub(crate) fn admit<R: Named>(
        &self,
        request: Request<R>,
        timeout: Duration,
        validate: impl FnOnce(&Self, &R) -> Result<(), Status>,
    ) -> Result<Admitted<R>, Status> {
        let received = Instant::now();
        check_api_version(&request)?;
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
        if request.request_id().is_empty() {
            *request.request_id() = self.new_request_id();
        }
        validate(self, &request)?;
        let span = tracing::Span::current();
        span.record("model", request.model());
        span.record("task", request.task());
        span.record("request_id", request.request_id().as_str());
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

    /// What the client is told when the dispatcher did not serve its request. `limit` names
    /// the setting that bounds the request's time; `awaited` what it waited for.
    pub(crate) fn unserved<R: Named>(
        &self,
        failure: Failure<Status>,
        admitted: &Admitted<R>,
        limit: &str,
        awaited: &str,
    ) -> Status {
        match failure {
            Failure::Failed(status) => status,
            Failure::Deadline { waiting_on, last } => {
                let waiting = waiting_on
                    .map(|node| format!(", waiting on node {node}"))
                    .unwrap_or_default();
                let last = last
                    .map(|s| format!("; the node tried before answered: {}", s.message()))
                    .unwrap_or_default();
                Status::deadline_exceeded(format!(
                    "no {awaited} within {} ms (the client's grpc-timeout or {limit}){waiting}{last}: allow longer, or retry when the cluster is less busy",
                    admitted.deadline.duration_since(admitted.received).as_millis()
                ))
            }
            Failure::NoNode => Status::unavailable(format!(
                "no node serves model '{}' now (none has it loaded and reachable): retry shortly, or see `troupe models list` and `troupe cluster status`",
                admitted.request.model()
            )),
            Failure::Behind { wanted, at } => Status::unavailable(format!(
                "node {} has not caught up with metadata revision {wanted} (it is at {at}): another node may serve",
                self.node_id
            )),
        }
    }

    /// Serves an Embed on this node's batcher, on the route the dispatcher resolved.
    async fn embed_here(
        &self,
        admitted: &Admitted<EmbedRequest>,
        route: Route,
    ) -> Result<EmbedResponse, Status> {
        let request = &admitted.request;
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
        let embeddings = match answer.await {
            Ok(result) => result.map_err(serve_error)?,
            Err(_) => {
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

    /// Checks an Embed and fixes its deadline (`limits.request_timeout_ms`).
    fn admit_embed(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Admitted<EmbedRequest>, Status> {
        let timeout = Duration::from_millis(self.limits.get().request_timeout_ms);
        self.admit(request, timeout, Self::validate)
    }

    /// Serves a client's Embed here or on a peer (the dispatcher's way).
    pub(crate) async fn embed_routed(
        &self,
        admitted: Admitted<EmbedRequest>,
    ) -> Result<EmbedResponse, Status> {
        let hops = EmbedHops {
            core: self,
            admitted: &admitted,
        };
        let ask = admitted.ask(self.limits.get().max_attempts);
        match self.dispatcher.dispatch(&hops, ask).await {
            Ok(response) => {
                tracing::Span::current().record("served_by", response.served_by);
                if response.served_by != self.node_id {
                    tracing::debug!(peer = response.served_by, "served by a peer");
                }
                Ok(response)
            }
            Err(failure) => Err(self.unserved(failure, &admitted, EMBED_LIMIT, "answer")),
        }
    }

    /// An Embed another node's dispatcher sent here: served on this node or refused, never
    /// forwarded again (so a request is forwarded at most once and cannot loop).
    pub async fn embed_forwarded(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        let min_revision = min_revision(&request)?;
        let admitted = self.admit_embed(request)?;
        let hops = EmbedHops {
            core: self,
            admitted: &admitted,
        };
        let ask = admitted.ask(1);
        match self
            .dispatcher
            .serve_forwarded(&hops, ask, min_revision)
            .await
        {
            Ok(response) => Ok(Response::new(response)),
            Err(failure) => Err(self.unserved(failure, &admitted, EMBED_LIMIT, "answer")),
        }
    }
}

/// The setting that bounds an Embed's time.
const EMBED_LIMIT: &str = "limits.request_timeout_ms";

/// One Embed's hops: this node's batcher, or a peer's Forward.
struct EmbedHops<'a> {
    core: &'a InferenceCore,
    admitted: &'a Admitted<EmbedRequest>,
}

impl Hops for EmbedHops<'_> {
    type Answer = EmbedResponse;
    type Error = Status;

    async fn here(
        &self,
        route: Route,
        _counted: OwnedInFlightGuard,
    ) -> Result<EmbedResponse, Status> {
        self.core.embed_here(self.admitted, route).await
    }

    async fn forward(
        &self,
        peer: PeerView,
        min_revision: u64,
        _counted: ForwardGuard,
    ) -> Result<EmbedResponse, Status> {
        let hop = self.admitted.hop(min_revision);
        let request = self.admitted.request.clone();
        self.core.forwarder.forward(&peer, request, hop).await
    }

    fn routing_key(&self) -> Vec<u8> {
        let request = &self.admitted.request;
        if request.routing_key.is_empty() {
            request.texts.join("\u{0}").into_bytes()
        } else {
            request.routing_key.clone().into_bytes()
        }
    }

    fn refusal(&self, error: ServeError) -> Status {
        serve_error(error)
    }

    fn try_next(error: &Status) -> bool {
        try_next_node(error.code())
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
        let result = match self.0.admit_embed(request) {
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
