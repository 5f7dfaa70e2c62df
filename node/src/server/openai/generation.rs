//! `/v1/completions` and `/v1/chat/completions`: one `Inference/Generate` stream each, sent
//! whole (its chunks gathered into one response) or as server-sent events, one per chunk that
//! releases text, then the finish reason, the usage if asked for, and `data: [DONE]`.
//!
//! The first chunk is awaited before the response starts, so a request that cannot start
//! (unknown model, full lanes, bad settings) gets an HTTP error status even when streamed;
//! a failure after that ends the stream with an `{"error": ...}` event, as OpenAI does.
//!
//! Log-probabilities are the chosen tokens' only: troupe does not compute the alternatives,
//! so `top_logprobs` is empty (chat) or null (completions).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use troupe_models::decoder::Decoder;
use troupe_models::LoadedModel;
use troupe_proto::v1::inference_server::Inference;
use troupe_proto::v1::{GenerateChunk, GenerateRequest};

use super::error::ApiError;
use super::wire::{self, ChatRequest, CompletionRequest};
use super::{inference_error, json_body, served_headers, OpenAiJson, OpenAiState};
use crate::server::generate::ChunkStream;

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<OpenAiState>,
    OpenAiJson(request): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let generate = request.generate_request()?;
    let shape = Shape {
        chat: false,
        model: request.model.clone(),
        logprobs: request.logprobs.is_some(),
        include_usage: request.sampling.include_usage(),
        id: String::new(),
        created: now(),
    };
    serve(state, generate, shape, request.sampling.stream()).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<OpenAiState>,
    OpenAiJson(request): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let generate = request.generate_request()?;
    let shape = Shape {
        chat: true,
        model: request.model.clone(),
        logprobs: request.logprobs(),
        include_usage: request.sampling.include_usage(),
        id: String::new(),
        created: now(),
    };
    serve(state, generate, shape, request.sampling.stream()).await
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the responses of one request look like.
struct Shape {
    chat: bool,
    model: String,
    logprobs: bool,
    include_usage: bool,
    /// `cmpl-<request id>` or `chatcmpl-<request id>`.
    id: String,
    created: u64,
}

/// One generated token, as a client sees it in `logprobs`.
struct Token {
    text: String,
    bytes: Vec<u8>,
    logprob: f32,
}

/// Token texts from the version's tokenizer when this node has the version loaded; from the
/// chunk's text otherwise (exact for a one-token chunk, which is how chunks come).
struct TokenTexts(Option<Arc<Decoder>>);

impl TokenTexts {
    fn of(state: &OpenAiState, model: &str, version: &str) -> Self {
        match state.inference.tree.table.route(model, version, "") {
            Ok(route) => match route.batcher.model() {
                LoadedModel::Decoder(decoder) => Self(Some(decoder.clone())),
                LoadedModel::Encoder(_) => Self(None),
            },
            Err(_) => Self(None),
        }
    }

    fn tokens(&self, chunk: &GenerateChunk) -> Vec<Token> {
        let alone = chunk.token_ids.len() == 1;
        chunk
            .token_ids
            .iter()
            .zip(&chunk.logprobs)
            .map(|(&id, &logprob)| {
                let (text, bytes) = match &self.0 {
                    Some(decoder) => (
                        decoder.tokenizer.decode(&[id]),
                        decoder.tokenizer.decode_bytes(&[id]),
                    ),
                    None if alone => (chunk.text.clone(), chunk.text.as_bytes().to_vec()),
                    None => (String::new(), Vec::new()),
                };
                Token {
                    text,
                    bytes,
                    logprob,
                }
            })
            .collect()
    }
}

async fn serve(
    state: OpenAiState,
    generate: GenerateRequest,
    mut shape: Shape,
    stream: bool,
) -> Result<Response, ApiError> {
    let model = generate.model.clone();
    let mut chunks = state
        .service()
        .generate(tonic::Request::new(generate))
        .await
        .map_err(|status| inference_error(&state, &model, status))?
        .into_inner();
    let first = match chunks.next().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(status)) => return Err(inference_error(&state, &model, status)),
        None => return Err(ended_early()),
    };
    shape.id = format!(
        "{}-{}",
        if shape.chat { "chatcmpl" } else { "cmpl" },
        first.request_id
    );
    let texts = if shape.logprobs {
        TokenTexts::of(&state, &model, &first.model_version)
    } else {
        TokenTexts(None)
    };
    let (request_id, served_by, version) = (
        first.request_id.clone(),
        first.served_by,
        first.model_version.clone(),
    );
    let mut response = if stream {
        streamed(shape, texts, first, chunks)
    } else {
        whole(&state, shape, texts, first, chunks).await?
    };
    served_headers(&mut response, &request_id, served_by, &version);
    Ok(response)
}

fn ended_early() -> ApiError {
    ApiError::from_status(&tonic::Status::unavailable(
        "the generation stream ended before its last chunk: retry",
    ))
}

fn usage_json(chunk: &GenerateChunk) -> Value {
    let usage = chunk.usage.unwrap_or_default();
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

impl Shape {
    /// `logprobs` of a choice: completions' parallel lists, or chat's `content` entries.
    fn logprobs(&self, tokens: &[Token]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        if self.chat {
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    json!({"token": t.text, "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": []})
                })
                .collect();
            json!({ "content": content })
        } else {
            let texts: Vec<&str> = tokens.iter().map(|t| t.text.as_str()).collect();
            let logprobs: Vec<f32> = tokens.iter().map(|t| t.logprob).collect();
            json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": null})
        }
    }

    /// A streamed chunk's JSON: one choice with `text` (or chat's `delta`).
    fn event(&self, delta: Value, tokens: &[Token], finish: Option<&str>) -> Value {
        let mut choice = json!({
            "index": 0,
            "logprobs": self.logprobs(tokens),
            "finish_reason": finish.map(wire::finish_reason),
        });
        if self.chat {
            choice["delta"] = delta;
        } else {
            choice["text"] = delta;
        }
        let mut event = json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            event["usage"] = Value::Null;
        }
        event
    }

    /// The delta for `text`: the text itself, or chat's `{"content": text}`.
    fn delta(&self, text: &str) -> Value {
        match (self.chat, text.is_empty()) {
            (false, _) => json!(text),
            (true, true) => json!({}),
            (true, false) => json!({ "content": text }),
        }
    }
}

/// The whole generation in one response.
async fn whole(
    state: &OpenAiState,
    shape: Shape,
    texts: TokenTexts,
    first: GenerateChunk,
    mut chunks: ChunkStream,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut next = Some(first);
    let last = loop {
        let Some(chunk) = next.take() else {
            match chunks.next().await {
                Some(Ok(chunk)) => {
                    next = Some(chunk);
                    continue;
                }
                Some(Err(status)) => return Err(inference_error(state, &shape.model, status)),
                None => return Err(ended_early()),
            }
        };
        text.push_str(&chunk.text);
        tokens.extend(texts.tokens(&chunk));
        if !chunk.finish_reason.is_empty() {
            break chunk;
        }
    };
    let finish = wire::finish_reason(&last.finish_reason);
    let choice = if shape.chat {
        json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": shape.logprobs(&tokens),
            "finish_reason": finish,
        })
    } else {
        json!({
            "index": 0,
            "text": text,
            "logprobs": shape.logprobs(&tokens),
            "finish_reason": finish,
        })
    };
    let body = json!({
        "id": shape.id,
        "object": if shape.chat { "chat.completion" } else { "text_completion" },
        "created": shape.created,
        "model": shape.model,
        "choices": [choice],
        "usage": usage_json(&last),
    });
    Ok(json_body(&body).into_response())
}

fn sse(value: &Value) -> Bytes {
    let mut line = b"data: ".to_vec();
    line.extend(serde_json::to_vec(value).unwrap_or_default());
    line.extend(b"\n\n");
    Bytes::from(line)
}

/// The generation as server-sent events. A client that goes away drops the stream, and the
/// scheduler frees the sequence.
fn streamed(
    shape: Shape,
    texts: TokenTexts,
    first: GenerateChunk,
    chunks: ChunkStream,
) -> Response {
    let (events, receiver) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(stream_events(shape, texts, first, chunks, events));
    let body = Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(receiver).map(Ok::<_, Infallible>),
    );
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn stream_events(
    shape: Shape,
    texts: TokenTexts,
    first: GenerateChunk,
    mut chunks: ChunkStream,
    events: tokio::sync::mpsc::Sender<Bytes>,
) {
    if shape.chat {
        let opening = shape.event(json!({"role": "assistant", "content": ""}), &[], None);
        if events.send(sse(&opening)).await.is_err() {
            return;
        }
    }
    let mut next = Some(first);
    loop {
        let chunk = match next.take() {
            Some(chunk) => chunk,
            None => {
                let received = tokio::select! {
                    received = chunks.next() => received,
                    () = events.closed() => return,
                };
                match received {
                    Some(Ok(chunk)) => chunk,
                    Some(Err(status)) => {
                        let error = ApiError::from_status(&status);
                        let _ = events.send(sse(&error.body())).await;
                        return;
                    }
                    None => {
                        let _ = events.send(sse(&ended_early().body())).await;
                        return;
                    }
                }
            }
        };
        let tokens = texts.tokens(&chunk);
        let finish = (!chunk.finish_reason.is_empty()).then_some(chunk.finish_reason.as_str());
        let worth_sending =
            !chunk.text.is_empty() || finish.is_some() || (shape.logprobs && !tokens.is_empty());
        if worth_sending {
            let event = shape.event(shape.delta(&chunk.text), &tokens, finish);
            if events.send(sse(&event)).await.is_err() {
                return;
            }
        }
        if finish.is_some() {
            if shape.include_usage {
                let usage = json!({
                    "id": shape.id,
                    "object": if shape.chat { "chat.completion.chunk" } else { "text_completion" },
                    "created": shape.created,
                    "model": shape.model,
                    "choices": [],
                    "usage": usage_json(&chunk),
                });
                if events.send(sse(&usage)).await.is_err() {
                    return;
                }
            }
            let _ = events.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            return;
        }
    }
}
