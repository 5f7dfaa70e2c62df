//! The requests of the OpenAI routes as clients send them, and how they become troupe's
//! `GenerateRequest`. Unknown fields are ignored (clients send many), explicit `null`s are
//! absent fields, and the fields OpenAI lets be a string or a list take either.
//!
//! Where OpenAI's defaults differ from troupe's, OpenAI's win here, so that a client gets
//! what it would get from OpenAI: `temperature` defaults to 1 (troupe's gRPC API: 0, greedy),
//! and a request without a `seed` gets a fresh one (troupe: seed 0), so two sampled requests
//! differ. `max_tokens` absent is the node's `limits.default_max_tokens`.

use std::hash::{BuildHasher, Hasher};

use serde::Deserialize;
use serde_json::Value;
use troupe_proto::v1::{ChatMessage, GenerateRequest};

use super::error::ApiError;

/// OpenAI's most alternatives per token (`logprobs` on completions, `top_logprobs` on chat).
const MAX_LOGPROBS: u32 = 5;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct EmbeddingsRequest {
    pub model: String,
    pub input: Value,
    /// `float` (the default) or `base64` (little-endian f32s: what the Python client asks
    /// for unless told otherwise).
    pub encoding_format: Option<String>,
    pub dimensions: Option<u64>,
}

/// Settings `/v1/completions` and `/v1/chat/completions` share.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not OpenAI's, but other OpenAI-compatible servers take it.
    pub top_k: Option<u32>,
    /// Not OpenAI's (llama.cpp's and vLLM's): generate `max_tokens` whatever the model says,
    /// for benchmarks.
    pub ignore_eos: Option<bool>,
    pub stop: Value,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    /// Chosen-token log-probabilities when present (any value up to 5; the alternatives are
    /// not computed).
    pub logprobs: Option<u32>,
    pub best_of: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// OpenAI's newer name for `max_tokens`; it wins when both are given.
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, or a list of content parts of which only `text` parts are taken.
    pub content: Value,
}

impl Sampling {
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The GenerateRequest these settings ask for (prompt and messages left to the caller).
    fn request(&self, model: &str, max_tokens: Option<u32>) -> Result<GenerateRequest, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("n = {n}: this server makes one choice per request; send n = 1 (or leave it out) and repeat the request for more"),
                ));
            }
        }
        if max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        let seed = match self.seed {
            Some(seed) => seed as u64,
            None if temperature > 0.0 => fresh_seed(),
            None => 0,
        };
        Ok(GenerateRequest {
            model: model.to_owned(),
            max_tokens: max_tokens.unwrap_or(0),
            temperature,
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            seed,
            stop: strings("stop", &self.stop)?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            ..GenerateRequest::default()
        })
    }
}

/// A seed no other request is likely to have: the process's random hash keys over a counter.
fn fresh_seed() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.finish()
}

/// A field that is a string, a list of strings, or absent.
fn strings(field: &'static str, value: &Value) -> Result<Vec<String>, ApiError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok(vec![text.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(text.clone()),
                _ => Err(ApiError::invalid(
                    field,
                    format!("{field} must be a string or a list of strings"),
                )),
            })
            .collect(),
        _ => Err(ApiError::invalid(
            field,
            format!("{field} must be a string or a list of strings"),
        )),
    }
}

/// The texts of an embeddings request: `input` as a string or a list of strings (token
/// arrays are refused: troupe tokenises itself).
pub fn texts(input: &Value) -> Result<Vec<String>, ApiError> {
    let texts = match input {
        Value::Array(items) if items.iter().any(|i| !i.is_string()) => {
            return Err(ApiError::invalid(
                "input",
                "input must be a string or a list of strings (token arrays are not taken: send the text)",
            ))
        }
        Value::Null => Vec::new(),
        other => strings("input", other)?,
    };
    if texts.is_empty() {
        return Err(ApiError::invalid(
            "input",
            "input is empty: send a string or a list of strings",
        ));
    }
    Ok(texts)
}

impl CompletionRequest {
    /// The GenerateRequest for this completion.
    pub fn generate_request(&self) -> Result<GenerateRequest, ApiError> {
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid(
                "best_of",
                "best_of must be 1 (or left out): this server makes one choice per request",
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid(
                "echo",
                "echo is not supported: the client has the prompt already",
            ));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "suffix",
                "suffix (insertion) is not supported",
            ));
        }
        if self.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs must be at most {MAX_LOGPROBS}"),
            ));
        }
        let prompt = match &self.prompt {
            Value::String(text) => text.clone(),
            Value::Array(items) if items.len() == 1 && items[0].is_string() => {
                items[0].as_str().unwrap_or_default().to_owned()
            }
            Value::Array(items) if items.iter().all(Value::is_string) => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "{} prompts in one request: send one prompt per request",
                        items.len()
                    ),
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "prompt must be a string (token arrays are not taken: send the text)",
                ))
            }
        };
        let mut request = self
            .sampling
            .request(&self.model, self.sampling.max_tokens)?;
        request.prompt = prompt;
        Ok(request)
    }
}

impl ChatRequest {
    /// The GenerateRequest for this conversation, rendered by the model's chat template.
    pub fn generate_request(&self) -> Result<GenerateRequest, ApiError> {
        if self.top_logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("top_logprobs must be at most {MAX_LOGPROBS}"),
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "messages is empty: send at least one message",
            ));
        }
        let messages = self
            .messages
            .iter()
            .map(|message| {
                Ok(ChatMessage {
                    // OpenAI's newer name for the system role.
                    role: match message.role.as_str() {
                        "developer" => "system".to_owned(),
                        role => role.to_owned(),
                    },
                    content: content(&message.content)?,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let max_tokens = self.max_completion_tokens.or(self.sampling.max_tokens);
        let mut request = self.sampling.request(&self.model, max_tokens)?;
        request.messages = messages;
        Ok(request)
    }

    pub fn logprobs(&self) -> bool {
        self.logprobs.unwrap_or(false)
    }
}

/// A message's text: a string, or its `text` parts joined.
fn content(value: &Value) -> Result<String, ApiError> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(piece))) => text.push_str(piece),
                    _ => return Err(ApiError::invalid(
                        "messages",
                        "only text content parts are taken ({\"type\": \"text\", \"text\": ...})",
                    )),
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::invalid(
            "messages",
            "a message's content must be a string or a list of text parts",
        )),
    }
}

/// OpenAI's finish reason for troupe's: the end-of-sequence token and a stop string both
/// are `stop`.
pub fn finish_reason(troupe: &str) -> &'static str {
    match troupe {
        "length" => "length",
        _ => "stop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(body: Value) -> Result<GenerateRequest, ApiError> {
        serde_json::from_value::<CompletionRequest>(body)
            .unwrap()
            .generate_request()
    }

    fn chat(body: Value) -> Result<GenerateRequest, ApiError> {
        serde_json::from_value::<ChatRequest>(body)
            .unwrap()
            .generate_request()
    }

    #[test]
    fn completions_take_openai_fields_and_ignore_unknown_ones() {
        let request = completion(json!({
            "model": "m", "prompt": "Once", "max_tokens": 7, "temperature": 0, "top_p": null,
            "stop": "\n", "seed": 3, "logprobs": null, "n": 1, "stream": false,
            "frequency_penalty": 0.5, "user": "someone", "logit_bias": {}
        }))
        .unwrap();
        assert_eq!(request.prompt, "Once");
        assert_eq!(request.max_tokens, 7);
        assert_eq!(request.temperature, 0.0);
        assert_eq!(request.top_p, 1.0);
        assert_eq!(request.stop, ["\n"]);
        assert_eq!(request.seed, 3);
        assert!(!request.ignore_eos);
        assert!(
            completion(json!({"prompt": "x", "ignore_eos": true}))
                .unwrap()
                .ignore_eos
        );
        assert_eq!(
            completion(json!({"prompt": ["one"]})).unwrap().prompt,
            "one"
        );
        // OpenAI's defaults: temperature 1, and a fresh seed each time.
        let (a, b) = (
            completion(json!({"prompt": "x"})).unwrap(),
            completion(json!({"prompt": "x"})).unwrap(),
        );
        assert_eq!(a.temperature, 1.0);
        assert_ne!(a.seed, b.seed);
        assert_eq!(a.max_tokens, 0, "absent: the node's default");
    }

    #[test]
    fn unsupported_completion_fields_are_named() {
        for (body, param) in [
            (json!({"prompt": "x", "n": 2}), "n"),
            (json!({"prompt": "x", "best_of": 3}), "best_of"),
            (json!({"prompt": "x", "echo": true}), "echo"),
            (json!({"prompt": "x", "logprobs": 9}), "logprobs"),
            (json!({"prompt": [1, 2]}), "prompt"),
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": "x", "stop": [1]}), "stop"),
            (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        ] {
            let error = completion(body).unwrap_err();
            assert_eq!((error.status.as_u16(), error.param), (400, Some(param)));
        }
    }

    #[test]
    fn chat_messages_take_strings_and_text_parts() {
        let request = chat(json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null}
            ],
            "max_tokens": 5, "max_completion_tokens": 9, "stop": ["a", "b"], "logprobs": true
        }))
        .unwrap();
        let roles: Vec<_> = request.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert_eq!(request.messages[1].content, "Hi there");
        assert_eq!(request.max_tokens, 9);
        assert_eq!(request.stop, ["a", "b"]);
        let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]});
        assert_eq!(chat(image).unwrap_err().param, Some("messages"));
        assert_eq!(
            chat(json!({"messages": []})).unwrap_err().param,
            Some("messages")
        );
    }

    #[test]
    fn embedding_inputs_are_strings() {
        assert_eq!(texts(&json!("a")).unwrap(), ["a"]);
        assert_eq!(texts(&json!(["a", "b"])).unwrap(), ["a", "b"]);
        for bad in [
            json!([1, 2]),
            json!([[1]]),
            json!([]),
            json!(null),
            json!(3),
        ] {
            assert_eq!(texts(&bad).unwrap_err().param, Some("input"), "{bad}");
        }
        assert_eq!(finish_reason("eos"), "stop");
        assert_eq!(finish_reason("stop"), "stop");
        assert_eq!(finish_reason("length"), "length");
    }
}
