//! The shell's own words over the inference API: `embed` and `similar` on the rest of the
//! line, `generate` streaming its text, and `chat` keeping the conversation between lines.
//! (The `troupe embed` and `troupe generate` commands read files and print JSON lines; these
//! are for a person at the prompt.)

use std::time::Duration;

use troupe_proto::v1::{ChatMessage, GenerateRequest, ReadRequest};

use crate::error::CliError;
use crate::remote::{self, admin, print_json};

/// How long `embed` and `similar` wait for an answer.
const EMBED_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `generate` and `chat` wait for a whole answer.
const GENERATE_TIMEOUT: Duration = Duration::from_secs(300);

/// `chat`: MESSAGE goes to the model with `conversation`, and the answer joins it.
pub async fn chat(
    addr: &str,
    conversation: &mut Vec<ChatMessage>,
    model: Option<String>,
    request: GenerateRequest,
    message: String,
    json: bool,
) -> Result<(), CliError> {
    let mut messages = conversation.clone();
    messages.push(ChatMessage {
        role: "user".into(),
        content: message,
    });
    let request = GenerateRequest {
        messages: messages.clone(),
        ..request
    };
    let answer = stream_generation(addr, model, request, json).await?;
    messages.push(ChatMessage {
        role: "assistant".into(),
        content: answer,
    });
    *conversation = messages;
    Ok(())
}

/// Streams a generation into the terminal (or prints its chunks as JSON lines); returns its
/// text.
pub async fn stream_generation(
    addr: &str,
    model: Option<String>,
    mut request: troupe_proto::v1::GenerateRequest,
    json: bool,
) -> Result<String, CliError> {
    use std::io::Write;
    request.model = pick_model_of(addr, model, "generate").await?;
    let mut client = remote::inference(addr, GENERATE_TIMEOUT).await?;
    let mut call = tonic::Request::new(request);
    call.set_timeout(GENERATE_TIMEOUT);
    let mut stream = client.generate(call).await?.into_inner();
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.message().await? {
        text.push_str(&chunk.text);
        if json {
            print_json(&serde_json::json!({
                "token_ids": chunk.token_ids,
                "text": chunk.text,
                "finish_reason": chunk.finish_reason,
                "served_by": chunk.served_by,
            }))?;
            continue;
        }
        print!("{}", chunk.text);
        let _ = stdout.flush();
        if let Some(usage) = chunk.usage {
            println!(
                "\n({}, {} prompt + {} generated tokens)",
                chunk.finish_reason, usage.prompt_tokens, usage.completion_tokens
            );
        }
    }
    Ok(text)
}

/// The model to embed with: `model`, or the one name with an active version.
async fn pick_model(addr: &str, model: Option<String>) -> Result<String, CliError> {
    pick_model_of(addr, model, "embed").await
}

/// `model`, or the one model of `kind` (`embed` or `generate`) with an active version.
async fn pick_model_of(addr: &str, model: Option<String>, kind: &str) -> Result<String, CliError> {
    if let Some(model) = model {
        return Ok(model);
    }
    let models = admin(addr)
        .await?
        .list_models(ReadRequest {
            stale: true,
            min_revision: 0,
        })
        .await?
        .into_inner()
        .models;
    let mut active: Vec<String> = models
        .into_iter()
        .filter(|m| {
            m.state == "active" && troupe_models::ModelFormat::from_name(&m.format).kind() == kind
        })
        .map(|m| m.name)
        .collect();
    active.dedup();
    match active.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CliError::Usage(format!(
            "no {kind} model is active: `models push` and `models activate --wait` one first"
        ))),
        many => Err(CliError::Usage(format!(
            "several models are active ({}): name one with --model",
            many.join(", ")
        ))),
    }
}

async fn embed_texts(
    addr: &str,
    model: Option<String>,
    texts: Vec<String>,
) -> Result<(String, troupe_proto::v1::EmbedResponse), CliError> {
    let model = pick_model(addr, model).await?;
    let reply = remote::embed_texts(addr, &model, texts, EMBED_TIMEOUT).await?;
    Ok((model, reply))
}

pub async fn embed(
    addr: &str,
    model: Option<String>,
    text: String,
    json: bool,
) -> Result<(), CliError> {
    let (model, reply) = embed_texts(addr, model, vec![text]).await?;
    let values = reply
        .embeddings
        .into_iter()
        .next()
        .map(|e| e.values)
        .unwrap_or_default();
    if json {
        return print_json(&serde_json::json!({
            "model": model,
            "version": reply.model_version,
            "served_by": reply.served_by,
            "embedding": values,
        }));
    }
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    let head: Vec<String> = values.iter().take(6).map(|v| format!("{v:+.4}")).collect();
    println!(
        "{model}@{} on node {}: {} dims, norm {norm:.4}\n[{}, ...]",
        reply.model_version,
        reply.served_by,
        values.len(),
        head.join(", ")
    );
    Ok(())
}

pub(super) fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE)
}

pub async fn similar(
    addr: &str,
    model: Option<String>,
    line: &str,
    json: bool,
) -> Result<(), CliError> {
    let (first, second) = line
        .split_once('|')
        .map(|(a, b)| (a.trim().to_owned(), b.trim().to_owned()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| CliError::Usage("usage: similar TEXT1 | TEXT2".into()))?;
    let (model, reply) = embed_texts(addr, model, vec![first.clone(), second.clone()]).await?;
    let [a, b] = reply.embeddings.as_slice() else {
        return Err(CliError::Usage(format!(
            "the node answered {} embeddings for 2 texts",
            reply.embeddings.len()
        )));
    };
    let score = cosine(&a.values, &b.values);
    if json {
        return print_json(&serde_json::json!({
            "model": model,
            "version": reply.model_version,
            "texts": [first, second],
            "cosine": score,
        }));
    }
    println!("cosine {score:.4}  ({model}@{})", reply.model_version);
    Ok(())
}
