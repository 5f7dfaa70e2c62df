//! The OpenAI-compatible HTTP API, on its own port (`--http`, DESIGN's 7703), for the RAG and
//! agent tools that speak OpenAI's API: `GET /v1/models`, `POST /v1/embeddings`,
//! `POST /v1/completions` and `POST /v1/chat/completions` (server-sent events with
//! `"stream": true`).
//!
//! Every request is served through the gRPC `Inference` service's own handlers, so it is
//! validated, routed (here or to a peer), limited and counted in `/metrics` exactly as an
//! `Embed` or `Generate` call is. The port has the API port's TLS and credentials: a bearer
//! token (`Authorization: Bearer TOKEN`) or a client certificate with a role, checked by the
//! same gate; errors come back in OpenAI's shape with the HTTP status of their gRPC code.
//!
//! - [`listener`]: accepting connections (TLS with HTTP/1.1 in ALPN, connection limits).
//! - [`wire`]: the requests' JSON, and how they become troupe requests.
//! - [`generation`]: completions and chat, whole or streamed.
//! - [`error`]: OpenAI's error body and the gRPC code to HTTP status table.

pub mod error;
pub mod generation;
pub mod listener;
pub mod wire;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::Code;
use troupe_consensus::metadata::ModelState;
use troupe_models::LoadedModel;
use troupe_proto::v1::inference_server::Inference;
use troupe_proto::v1::EmbedRequest;
use troupe_transport::api_gate::ApiAuth;
use troupe_transport::{ConnInfo, Refusal, Refusals, Role, Security};

use self::error::ApiError;
use self::listener::{HttpListener, HttpPeer};
use super::inference::{InferenceCore, InferenceService};

/// What the routes share.
#[derive(Clone)]
pub struct OpenAiState {
    pub inference: Arc<InferenceCore>,
    /// The API port's gate: the same verifier, denial counts and refusals.
    pub auth: Arc<ApiAuth>,
    pub refusals: Arc<Refusals>,
    /// `limits.max_message_bytes`: the largest request body.
    pub max_body_bytes: usize,
}

impl OpenAiState {
    fn service(&self) -> InferenceService {
        InferenceService(self.inference.clone())
    }

    fn knows_model(&self, model: &str) -> bool {
        self.inference.tree.table.knows_model(model)
    }
}

/// The role each route needs, as `server::rbac` says for the gRPC methods they stand for
/// (`Embed`, `Generate`: infer; listing models: read). Unlisted paths need admin.
pub fn required_role(path: &str) -> Option<Role> {
    match path {
        "/v1/models" => Some(Role::Read),
        path if path.starts_with("/v1/models/") => Some(Role::Read),
        "/v1/embeddings" | "/v1/completions" | "/v1/chat/completions" => Some(Role::Infer),
        _ => Some(Role::Admin),
    }
}

pub fn router(state: OpenAiState) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/completions", post(generation::completions))
        .route("/v1/chat/completions", post(generation::chat_completions))
        // Only matched routes are checked, so an unknown path is a plain 404.
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .fallback(not_found)
        .with_state(state)
        // A call is in flight (its connection not idle) until its body is sent.
        .layer(troupe_transport::ActivityLayer)
        .layer(middleware::from_fn(connection_info))
}

/// Serves `router` on `listener` until `shutdown` completes; connections in flight finish.
pub fn serve(
    listener: HttpListener,
    state: OpenAiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let app = router(state).into_make_service_with_connect_info::<HttpPeer>();
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "the OpenAI HTTP endpoint stopped");
        }
    })
}

/// Puts the connection's [`ConnInfo`] where the API gate and the activity layer look for it.
async fn connection_info(
    ConnectInfo(HttpPeer(info)): ConnectInfo<HttpPeer>,
    mut request: Request,
    next: Next,
) -> Response {
    request.extensions_mut().insert(info);
    next.run(request).await
}

const PLAINTEXT: &str = "plain HTTP sent to this HTTPS port: use https:// and trust the cluster CA (curl --cacert ca.crt)";

/// The API gate's check (credential, then role), answered in OpenAI's shape.
async fn authorize(State(state): State<OpenAiState>, mut request: Request, next: Next) -> Response {
    if let Some(ConnInfo {
        security: Security::Plaintext,
        remote,
        ..
    }) = request.extensions().get::<ConnInfo>()
    {
        state
            .refusals
            .refuse(Refusal::Plaintext, "http", *remote, PLAINTEXT);
        return ApiError::from_status(&tonic::Status::unauthenticated(PLAINTEXT)).into_response();
    }
    match state.auth.check(&request) {
        Ok(principal) => {
            if let Some(principal) = principal {
                request.extensions_mut().insert(principal);
            }
            next.run(request).await
        }
        Err(status) => ApiError::from_status(&status).into_response(),
    }
}

async fn not_found(request: Request) -> ApiError {
    let path = request.uri().path();
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!(
            "no route {} {}: this server has GET /v1/models, POST /v1/embeddings, /v1/completions and /v1/chat/completions",
            request.method(),
            &path[..path.floor_char_boundary(128)]
        ),
        param: None,
        code: None,
    }
}

/// A JSON response body.
pub(crate) fn json_body(value: &Value) -> ([(header::HeaderName, HeaderValue); 1], Vec<u8>) {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

/// A JSON body read within `limits.max_message_bytes`; anything malformed is a 400 in
/// OpenAI's shape (not axum's plain-text rejection).
pub struct OpenAiJson<T>(pub T);

/// How far past the limit a body is read (and dropped) before the 413 is sent: a server that
/// answers before the client has sent its body, then closes, resets the connection, and the
/// client sees a broken pipe instead of the answer.
const DRAIN_BYTES: usize = 16 << 20;

impl<T: DeserializeOwned> FromRequest<OpenAiState> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &OpenAiState) -> Result<Self, ApiError> {
        let limit = state.max_body_bytes;
        let too_large = || {
            ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!(
                "the request body is larger than {limit} bytes (limits.max_message_bytes): send less per request"
            ),
            param: None,
            code: None,
        }
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > (limit + DRAIN_BYTES) as u64) {
            return Err(too_large());
        }
        let mut frames = request.into_body().into_data_stream();
        let (mut body, mut seen) = (Vec::new(), 0usize);
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(|error| {
                ApiError::malformed(format!("cannot read the request body: {error}"))
            })?;
            seen += frame.len();
            if seen <= limit {
                body.extend_from_slice(&frame);
            } else if seen > limit + DRAIN_BYTES {
                break;
            }
        }
        if seen > limit {
            return Err(too_large());
        }
        serde_json::from_slice(&body).map(Self).map_err(|error| {
            ApiError::malformed(format!(
                "the body is not the JSON this route takes: {error}"
            ))
        })
    }
}

/// The names of models with an active version.
fn active_models(state: &OpenAiState) -> BTreeSet<String> {
    state
        .inference
        .tree
        .table
        .versions()
        .into_iter()
        .filter(|(_, record)| record.state == ModelState::Active)
        .map(|(key, _)| key.name)
        .collect()
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "troupe"})
}

async fn list_models(State(state): State<OpenAiState>) -> Response {
    let data: Vec<Value> = active_models(&state)
        .iter()
        .map(|name| model_object(name))
        .collect();
    json_body(&json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(state): State<OpenAiState>, Path(model): Path<String>) -> Response {
    if active_models(&state).contains(&model) {
        json_body(&model_object(&model)).into_response()
    } else {
        ApiError::model_not_found(&model).into_response()
    }
}

/// A status from the inference service as an OpenAI error; NOT_FOUND for a model that is
/// not registered is OpenAI's `model_not_found`.
pub(crate) fn inference_error(state: &OpenAiState, model: &str, status: tonic::Status) -> ApiError {
    if status.code() == Code::NotFound && !state.knows_model(model) {
        return ApiError::model_not_found(model);
    }
    ApiError::from_status(&status)
}

/// `POST /v1/embeddings`. `usage.prompt_tokens` is the model's own token count (with
/// `[CLS]`/`[SEP]`, and cut at its sequence limit as the model reads it) when this node has
/// the version loaded; when a peer served the request and this node has no copy, it is the
/// number of whitespace-separated words.
async fn embeddings(
    State(state): State<OpenAiState>,
    OpenAiJson(request): OpenAiJson<wire::EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    let texts = wire::texts(&request.input)?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "encoding_format",
                "encoding_format must be \"float\" or \"base64\"",
            ))
        }
    };
    let model = request.model;
    let response = state
        .service()
        .embed(tonic::Request::new(EmbedRequest {
            model: model.clone(),
            texts: texts.clone(),
            ..EmbedRequest::default()
        }))
        .await
        .map_err(|status| inference_error(&state, &model, status))?
        .into_inner();
    if let (Some(asked), Some(first)) = (request.dimensions, response.embeddings.first()) {
        if asked != first.values.len() as u64 {
            return Err(ApiError::invalid(
                "dimensions",
                format!(
                    "this model's embeddings have {} dimensions and cannot be shortened: leave dimensions out",
                    first.values.len()
                ),
            ));
        }
    }
    let tokens = prompt_tokens(&state, &model, &response.model_version, texts).await;
    let data: Vec<Value> = response
        .embeddings
        .iter()
        .enumerate()
        .map(|(index, embedding)| {
            let vector = if base64 {
                let bytes: Vec<u8> = embedding
                    .values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(embedding.values)
            };
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    let mut response_http = json_body(&body).into_response();
    served_headers(
        &mut response_http,
        &response.request_id,
        response.served_by,
        &response.model_version,
    );
    Ok(response_http)
}

/// The texts' token count (see [`embeddings`]), tokenised off the async workers.
async fn prompt_tokens(state: &OpenAiState, model: &str, version: &str, texts: Vec<String>) -> u64 {
    let words = |texts: &[String]| {
        texts
            .iter()
            .map(|t| t.split_whitespace().count() as u64)
            .sum()
    };
    let encoder = match state.inference.tree.table.route(model, version, "") {
        Ok(route) => match route.batcher.model() {
            LoadedModel::Encoder(encoder) => Some(encoder.clone()),
            LoadedModel::Decoder(_) => None,
        },
        Err(_) => None,
    };
    let Some(encoder) = encoder else {
        return words(&texts);
    };
    tokio::task::spawn_blocking(move || match encoder.tokenize(&texts) {
        Ok(ids) => ids.iter().map(|ids| ids.len() as u64).sum(),
        Err(_) => words(&texts),
    })
    .await
    .unwrap_or(0)
}

/// Which request this was and who served it, for clients and logs.
pub(crate) fn served_headers(
    response: &mut Response,
    request_id: &str,
    served_by: u64,
    model_version: &str,
) {
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-request-id", request_id.to_owned()),
        ("x-troupe-served-by", served_by.to_string()),
        ("x-troupe-model-version", model_version.to_owned()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_roles_of_their_rpcs() {
        assert_eq!(required_role("/v1/models"), Some(Role::Read));
        assert_eq!(required_role("/v1/models/x"), Some(Role::Read));
        for path in ["/v1/embeddings", "/v1/completions", "/v1/chat/completions"] {
            assert_eq!(required_role(path), Some(Role::Infer), "{path}");
            assert_eq!(
                super::super::rbac::required_role(match path {
                    "/v1/embeddings" => "/troupe.v1.Inference/Embed",
                    _ => "/troupe.v1.Inference/Generate",
                }),
                Some(Role::Infer)
            );
        }
        assert_eq!(required_role("/v1/files"), Some(Role::Admin));
    }
}
