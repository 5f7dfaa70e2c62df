//! `troupe.v1.Inference/Embed`: validate the request against the node's limits, route it to
//! the batcher of the model version it names (through the serving table), and wait for the
//! batch that carries it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};
use troupe_actors::{EmbedJob, ServeError, TreeView};
use troupe_proto::v1::inference_server::Inference;
use troupe_proto::v1::{EmbedRequest, EmbedResponse, Embedding};

use super::status::serve_error;
use crate::config::LimitSettings;

/// Request metadata naming the API version the client speaks.
pub const API_VERSION_HEADER: &str = "x-troupe-api-version";

/// API versions this node serves.
pub const SUPPORTED_API_VERSIONS: std::ops::RangeInclusive<u32> = 1..=1;

pub struct InferenceService {
    node_id: u64,
    tree: TreeView,
    limits: LimitSettings,
    next_request: AtomicU64,
}

impl InferenceService {
    pub fn new(node_id: u64, tree: TreeView, limits: LimitSettings) -> Self {
        Self {
            node_id,
            tree,
            limits,
            next_request: AtomicU64::new(1),
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
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
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

impl InferenceService {
    fn validate(&self, request: &EmbedRequest) -> Result<(), Status> {
        let limits = &self.limits;
        if request.model.is_empty() {
            return Err(Status::invalid_argument(
                "model is empty: name a registered model, e.g. all-MiniLM-L6-v2 (`troupe models list` shows them)",
            ));
        }
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

#[tonic::async_trait]
impl Inference for InferenceService {
    #[tracing::instrument(
        skip_all,
        fields(node_id = self.node_id, model, task, request_id, version)
    )]
    async fn embed(
        &self,
        request: Request<EmbedRequest>,
    ) -> Result<Response<EmbedResponse>, Status> {
        let received = Instant::now();
        check_api_version(&request)?;
        let timeout = Duration::from_millis(self.limits.request_timeout_ms);
        let timeout = grpc_timeout(&request).map_or(timeout, |t| t.min(timeout));
        let mut request = request.into_inner();
        if request.request_id.is_empty() {
            request.request_id = format!(
                "{}-{}",
                self.node_id,
                self.next_request.fetch_add(1, Ordering::Relaxed)
            );
        }
        let span = tracing::Span::current();
        span.record("model", request.model.as_str());
        span.record("task", request.task.as_str());
        span.record("request_id", request.request_id.as_str());
        self.validate(&request)?;
        let route = self
            .tree
            .table
            .route(&request.model, &request.version, &request.task)
            .map_err(serve_error)?;
        span.record("version", route.version.as_str());
        let (reply, answer) = tokio::sync::oneshot::channel();
        route.batcher.submit(EmbedJob {
            texts: request.texts,
            request_id: request.request_id.clone(),
            task: request.task,
            lane: route.lane,
            deadline: Some(received + timeout),
            received,
            reply,
        });
        let answered = tokio::time::timeout_at((received + timeout).into(), answer).await;
        let embeddings = match answered {
            Ok(Ok(result)) => result.map_err(serve_error)?,
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no answer within {} ms (the client's grpc-timeout or limits.request_timeout_ms): allow longer, or retry when the node is less busy",
                    timeout.as_millis()
                )))
            }
            Ok(Err(_)) => {
                return Err(serve_error(ServeError::Unavailable {
                    model: request.model,
                    version: route.version,
                    reason: "its batcher stopped before answering (it is being restarted): retry"
                        .into(),
                }))
            }
        };
        tracing::debug!(
            elapsed_ms = received.elapsed().as_secs_f64() * 1e3,
            "embedded"
        );
        Ok(Response::new(EmbedResponse {
            embeddings: embeddings
                .into_iter()
                .map(|values| Embedding { values })
                .collect(),
            model_version: route.version,
            revision: route.revision,
            request_id: request.request_id,
        }))
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
