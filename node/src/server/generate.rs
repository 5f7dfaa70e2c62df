//! `troupe.v1.Inference/Generate`: admit the request, hand it to the dispatcher
//! (troupe_actors::dispatch), which streams the generation from this node's scheduler or
//! relays a peer's stream chunk by chunk through [`GenerateHops`].
//!
//! A node is tried until one accepts: the stream is handed to the client only once its
//! first chunk has arrived, so a full lane (`RESOURCE_EXHAUSTED`) or an unavailable node
//! moves on to the next node before the client has seen anything. After that the stream is
//! the client's; a failure mid-stream ends it with the error.

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Status};
use troupe_actors::{
    ForwardGuard, GenEvent, GenJob, Hops, OwnedInFlightGuard, PeerView, Route, ServeError,
};
use troupe_models::chat::Message;
use troupe_models::generate::SamplingParams;
use troupe_models::LoadedModel;
use troupe_proto::v1::{GenerateChunk, GenerateRequest, Usage};

use super::inference::{min_revision, try_next_node, Admitted, InferenceCore};
use super::status::serve_error;

/// A generation as the client receives it.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

/// Stop strings one request may give, and their longest length in bytes.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// A Generate as it is served: validated, with its id, deadline and trace context.
pub(crate) type AdmittedGeneration = Admitted<GenerateRequest>;

/// The setting that bounds the wait for a generation's first token.
const GENERATE_LIMIT: &str = "limits.generate_timeout_ms";

impl InferenceCore {
    /// Checks a Generate and fixes its deadline (`limits.generate_timeout_ms`).
    pub(crate) fn admit_generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<AdmittedGeneration, Status> {
        let timeout = Duration::from_millis(self.limits.get().generate_timeout_ms);
        self.admit(request, timeout, Self::validate_generate)
    }

    fn validate_generate(&self, request: &GenerateRequest) -> Result<(), Status> {
        let limits = self.limits.get();
        troupe_proto::convert::check_generate_names(request)
            .map_err(|e| super::status::status(&e))?;
        match (request.prompt.is_empty(), request.messages.is_empty()) {
            (true, true) => {
                return Err(Status::invalid_argument(
                    "no input: send a prompt, or messages for the chat template",
                ))
            }
            (false, false) => {
                return Err(Status::invalid_argument(
                    "both prompt and messages are set: send one of them",
                ))
            }
            _ => {}
        }
        let chars: usize = request.prompt.chars().count()
            + request
                .messages
                .iter()
                .map(|m| m.content.chars().count() + m.role.chars().count())
                .sum::<usize>();
        if chars > limits.max_prompt_chars {
            return Err(Status::invalid_argument(format!(
                "the prompt has {chars} characters, the limit is {} (limits.max_prompt_chars): shorten it",
                limits.max_prompt_chars
            )));
        }
        for message in &request.messages {
            if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
                return Err(Status::invalid_argument(format!(
                    "message role {:?} is not one of system, user, assistant",
                    message.role
                )));
            }
        }
        if request.max_tokens as usize > limits.max_tokens {
            return Err(Status::invalid_argument(format!(
                "max_tokens {} is above the limit {} (limits.max_tokens)",
                request.max_tokens, limits.max_tokens
            )));
        }
        if request.stop.len() > MAX_STOP_STRINGS
            || request.stop.iter().any(|s| s.len() > MAX_STOP_BYTES)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_BYTES} bytes each"
            )));
        }
        self.sampling(request)
            .check()
            .map_err(Status::invalid_argument)?;
        Ok(())
    }

    /// The request's sampling settings, with the server's defaults filled in.
    pub(crate) fn sampling(&self, request: &GenerateRequest) -> SamplingParams {
        SamplingParams {
            max_tokens: if request.max_tokens == 0 {
                self.limits.get().default_max_tokens
            } else {
                request.max_tokens as usize
            },
            temperature: request.temperature,
            top_p: if request.top_p == 0.0 {
                1.0
            } else {
                request.top_p
            },
            top_k: request.top_k as usize,
            seed: request.seed,
            stop: request.stop.clone(),
            ignore_eos: request.ignore_eos,
        }
    }

    /// Starts the generation on this node, on the route the dispatcher resolved. Returns once
    /// its first chunk is out, or with the error that kept it from starting. The stream holds
    /// `in_flight` until it ends.
    async fn generate_here(
        &self,
        admitted: &AdmittedGeneration,
        route: Route,
        in_flight: OwnedInFlightGuard,
    ) -> Result<ChunkStream, Status> {
        let request = &admitted.request;
        let LoadedModel::Decoder(decoder) = route.batcher.model().clone() else {
            return Err(serve_error(ServeError::WrongKind {
                model: request.model.clone(),
                version: route.version.clone(),
                serves: "embed",
                asked: "generate",
            }));
        };
        let text = if request.messages.is_empty() {
            request.prompt.clone()
        } else {
            let messages: Vec<Message> = request
                .messages
                .iter()
                .map(|m| Message::new(&m.role, &m.content))
                .collect();
            decoder
                .render_chat(&messages)
                .map_err(Status::invalid_argument)?
        };
        let prompt_ids = decoder.tokenizer.encode(&text);
        let params = self.sampling(request);
        let context = decoder.model.config().context;
        if prompt_ids.is_empty() || prompt_ids.len() + params.max_tokens > context {
            return Err(serve_error(ServeError::TooLong {
                model: request.model.clone(),
                reason: format!(
                    "the prompt is {} tokens and max_tokens {}; together they must fit the model's context of {context} tokens",
                    prompt_ids.len(),
                    params.max_tokens
                ),
            }));
        }
        let (events, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        route.batcher.generate(GenJob {
            prompt_ids: prompt_ids.clone(),
            params,
            request_id: request.request_id.clone(),
            lane: route.lane,
            deadline: Some(admitted.deadline),
            received: admitted.received,
            events,
        });
        let first = match receiver.recv().await {
            None => {
                return Err(serve_error(ServeError::Unavailable {
                    model: request.model.clone(),
                    version: route.version.clone(),
                    reason: "its scheduler stopped before answering (it is being restarted): retry"
                        .into(),
                }))
            }
            Some(GenEvent::Failed(error)) => return Err(serve_error(error)),
            Some(event) => event,
        };
        let head = GenerateChunk {
            prompt_ids,
            model_version: route.version.clone(),
            served_by: self.node_id,
            request_id: request.request_id.clone(),
            ..GenerateChunk::default()
        };
        let (model, version) = (request.model.clone(), route.version.clone());
        let stream = async_stream(move |sender| async move {
            // Held while the stream lives: the node counts it as in flight.
            let _in_flight = in_flight;
            let mut head = Some(head);
            let mut next = Some(first);
            loop {
                let event = match next.take() {
                    Some(event) => event,
                    None => match receiver.recv().await {
                        Some(event) => event,
                        None => {
                            let _ = sender
                                .send(Err(serve_error(ServeError::Unavailable {
                                    model: model.clone(),
                                    version: version.clone(),
                                    reason: "its scheduler stopped mid-generation: retry".into(),
                                })))
                                .await;
                            return;
                        }
                    },
                };
                let mut chunk = head.take().unwrap_or_default();
                let done = match event {
                    GenEvent::Token { id, logprob, text } => {
                        chunk.token_ids.push(id);
                        chunk.logprobs.push(logprob);
                        chunk.text = text;
                        false
                    }
                    GenEvent::Done {
                        finish,
                        text,
                        prompt_tokens,
                        completion_tokens,
                    } => {
                        chunk.text = text;
                        chunk.finish_reason = finish.as_str().to_owned();
                        chunk.usage = Some(Usage {
                            prompt_tokens: prompt_tokens as u32,
                            completion_tokens: completion_tokens as u32,
                        });
                        true
                    }
                    GenEvent::Failed(error) => {
                        let _ = sender.send(Err(serve_error(error))).await;
                        return;
                    }
                };
                // A client that went away ends the stream; the scheduler sees the dropped
                // receiver and frees the sequence's blocks.
                if sender.send(Ok(chunk)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(stream)
    }

    /// Serves a client's Generate here or on a peer (the dispatcher's way).
    pub(crate) async fn generate_routed(
        &self,
        admitted: AdmittedGeneration,
    ) -> Result<ChunkStream, Status> {
        let hops = GenerateHops {
            core: self,
            admitted: &admitted,
        };
        let ask = admitted.ask(self.limits.get().max_attempts);
        self.dispatcher
            .dispatch(&hops, ask)
            .await
            .map_err(|failure| self.unserved(failure, &admitted, GENERATE_LIMIT, "first token"))
    }

    /// A generation another node's dispatcher sent here: served on this node or refused,
    /// never forwarded again.
    pub async fn generate_forwarded(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<ChunkStream, Status> {
        let min_revision = min_revision(&request)?;
        let admitted = self.admit_generate(request)?;
        tracing::debug!(request_id = %admitted.request.request_id, "generation forwarded here");
        let hops = GenerateHops {
            core: self,
            admitted: &admitted,
        };
        self.dispatcher
            .serve_forwarded(&hops, admitted.ask(1), min_revision)
            .await
            .map_err(|failure| self.unserved(failure, &admitted, GENERATE_LIMIT, "first token"))
    }
}

/// One Generate's hops: this node's scheduler, or a peer's ForwardGenerate.
struct GenerateHops<'a> {
    core: &'a InferenceCore,
    admitted: &'a AdmittedGeneration,
}

impl Hops for GenerateHops<'_> {
    type Answer = ChunkStream;
    type Error = Status;

    async fn here(&self, route: Route, counted: OwnedInFlightGuard) -> Result<ChunkStream, Status> {
        self.core.generate_here(self.admitted, route, counted).await
    }

    async fn forward(
        &self,
        peer: PeerView,
        min_revision: u64,
        counted: ForwardGuard,
    ) -> Result<ChunkStream, Status> {
        let hop = self.admitted.hop(min_revision);
        let request = self.admitted.request.clone();
        let forwarded = self
            .core
            .forwarder
            .forward_generate(&peer, request, hop)
            .await;
        // The peer counts as busy with this request until its stream ends.
        forwarded.map(|stream| -> ChunkStream {
            Box::pin(stream.map(move |item| {
                let _counted = &counted;
                item
            }))
        })
    }

    fn routing_key(&self) -> Vec<u8> {
        let request = &self.admitted.request;
        if request.routing_key.is_empty() {
            let mut key = request.prompt.clone().into_bytes();
            for message in &request.messages {
                key.extend(message.content.as_bytes());
            }
            key
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

/// A stream fed by `body` through a small channel: the body stops when the client is gone.
fn async_stream<F, Fut>(body: F) -> ChunkStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<GenerateChunk, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(sender));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))
}
