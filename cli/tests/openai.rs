//! The OpenAI-compatible HTTP API over real sockets, with the official `openai` Python client
//! (scripts/openai-venv.sh) and curl: a node serving an encoder and SmolLM2-135M-Instruct
//! answers completions, chat (whole and streamed) and embeddings as its gRPC Inference
//! service does, unknown models are OpenAI's 404, and on a TLS node the port takes the API
//! port's tokens and roles.
//!
//! Needs SmolLM2 (TROUPE_SMOLLM2_DIR, default $TROUPE_HOME/models/smollm2-135m) and the venv's
//! python (TROUPE_OPENAI_PYTHON, default $TROUPE_HOME/openai-venv/bin/python); without them
//! the parts that need them print SKIPPED, unless TROUPE_REQUIRE_MODEL is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use troupe_proto::v1::{ChatMessage, EmbedRequest, GenerateRequest};
use troupe_transport::Role;

const ENCODER: &str = "minilm";
const DECODER: &str = "smollm2";
const PROMPT: &str = "The capital of France is";
const QUESTION: &str = "What is the capital of France? Answer in one sentence.";
const TEXTS: [&str; 2] = ["A man is eating food.", "A cat sat on the mat."];

/// The venv's python with the `openai` package, or None (skipped) unless
/// TROUPE_REQUIRE_MODEL is set.
fn openai_python() -> Option<PathBuf> {
    let python = std::env::var_os("TROUPE_OPENAI_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| troupe_models::fetch::troupe_home().join("openai-venv/bin/python"));
    if python.is_file() {
        return Some(python);
    }
    assert!(
        std::env::var_os("TROUPE_REQUIRE_MODEL").is_none(),
        "TROUPE_REQUIRE_MODEL is set but there is no {}: run scripts/openai-venv.sh or set TROUPE_OPENAI_PYTHON",
        python.display()
    );
    eprintln!(
        "SKIPPED: the openai client checks: run scripts/openai-venv.sh or set TROUPE_OPENAI_PYTHON"
    );
    None
}

/// The encoder: the real all-MiniLM-L6-v2 when TROUPE_MODEL_DIR has it, else the tiny one.
fn encoder_dir(dir: &tempfile::TempDir) -> PathBuf {
    match std::env::var_os("TROUPE_MODEL_DIR").map(PathBuf::from) {
        Some(model) if model.join("model.safetensors").is_file() => model,
        _ => tiny_model_dir(dir),
    }
}

/// What the Python client saw, printed as one JSON object.
const CLIENT: &str = r#"
import json, ssl, sys
import openai

mode, base = sys.argv[1], sys.argv[2]

def status_error(call):
    try:
        call()
    except openai.APIStatusError as error:
        return {"class": type(error).__name__, "status": error.status_code, "body": error.body}
    return None

if mode == "tls":
    ca, token = sys.argv[3], sys.argv[4]
    def client(key):
        return openai.OpenAI(base_url=base, api_key=key, max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)))
    out = {
        "models": [m.id for m in client(token).models.list()],
        "unknown": status_error(lambda: client(token).embeddings.create(model="nope", input="x")),
        "bad_token": status_error(lambda: client("not-a-token").models.list()),
    }
    print(json.dumps(out))
    sys.exit(0)

prompt, question, texts = sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
out = {"models": sorted(m.id for m in client.models.list())}

c = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, logprobs=1)
out["completion"] = {
    "text": c.choices[0].text, "finish": c.choices[0].finish_reason, "usage": c.usage.model_dump(),
    "tokens": c.choices[0].logprobs.tokens, "token_logprobs": c.choices[0].logprobs.token_logprobs,
    "object": c.object,
}

messages = [{"role": "user", "content": question}]
r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0, logprobs=True)
out["chat"] = {
    "content": r.choices[0].message.content, "role": r.choices[0].message.role,
    "finish": r.choices[0].finish_reason, "usage": r.usage.model_dump(),
    "logprobs": [t.logprob for t in r.choices[0].logprobs.content],
}

roles, deltas, finishes, usage = [], [], [], None
for chunk in client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True}):
    if chunk.usage:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            deltas.append(choice.delta.content)
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
out["chat_stream"] = {"roles": roles, "deltas": deltas, "finishes": finishes, "usage": usage}

pieces, finishes = [], []
for chunk in client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stream=True):
    for choice in chunk.choices:
        pieces.append(choice.text)
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
out["completion_stream"] = {"text": "".join(pieces), "finishes": finishes}

e = client.embeddings.create(model="minilm", input=texts)
f = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
out["embeddings"] = {
    "base64": [d.embedding for d in e.data], "float": f.data[0].embedding,
    "indexes": [d.index for d in e.data], "usage": e.usage.model_dump(), "model": e.model,
}

out["unknown_chat"] = status_error(lambda: client.chat.completions.create(model="nope", messages=messages))
out["unknown_embed"] = status_error(lambda: client.embeddings.create(model="nope", input="x"))
out["wrong_kind"] = status_error(lambda: client.embeddings.create(model="smollm2", input="x"))
out["n2"] = status_error(lambda: client.completions.create(model="smollm2", prompt=prompt, n=2))
print(json.dumps(out))
"#;

/// Runs the client script; its JSON.
async fn run_client(python: &Path, args: Vec<String>) -> Value {
    let python = python.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg("-c")
            .arg(CLIENT)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "the openai client failed:\n{stderr}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

/// `curl` with `args`; the HTTP status and the body.
async fn curl(args: Vec<String>) -> (u16, String) {
    let shown = args.last().cloned().unwrap_or_default();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "-N", "--max-time", "300", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "curl {shown} failed: {stderr}");
    let (body, status) = stdout.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

fn post(url: String, body: &str) -> Vec<String> {
    args(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        url.as_str(),
    ])
}

/// A greedy generation through gRPC: its text, log-probabilities and finish reason.
async fn grpc_generate(
    client: &mut InferenceClient,
    request: GenerateRequest,
) -> (String, Vec<f32>, String) {
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let (mut text, mut logprobs, mut finish) = (String::new(), Vec::new(), String::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&chunk.text);
        logprobs.extend(chunk.logprobs);
        if !chunk.finish_reason.is_empty() {
            finish = chunk.finish_reason;
        }
    }
    (text, logprobs, finish)
}

/// A gauge or counter of the node's decoder, from /metrics.
async fn metric(node: &troupe_node::RunningNode, name: &str) -> f64 {
    let (status, body) = http_get(node.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find(|line| line.starts_with(&format!("{name}{{")))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("/metrics has no {name}"))
}

/// Starts a long streamed completion, reads its first event, and hangs up.
async fn abandon_a_stream(http: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({
        "model": DECODER, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": true,
        "temperature": 0, "stream": true,
    })
    .to_string();
    let mut socket = tokio::net::TcpStream::connect(http).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let read = socket.read(&mut buffer).await.unwrap();
        assert!(
            read > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buffer[..read]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
}

fn openai_finish(troupe: &str) -> &'static str {
    if troupe == "length" {
        "length"
    } else {
        "stop"
    }
}

fn assert_close(got: &Value, want: &[f32], tolerance: f32, what: &str) {
    let got: Vec<f32> = got
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {got}"))
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tolerance, "{what}: max |diff| {worst}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_clients_get_what_grpc_gives() {
    let Some(smollm2) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let encoder = encoder_dir(&dir);
    let node = serving_node(&dir, &encoder, ENCODER, |config| {
        config.http = Some("127.0.0.1:0".into());
    })
    .await;
    register_and_activate(&node, &smollm2, DECODER, "1").await;
    let http = node.http_addr.expect("the node serves HTTP");
    let base = format!("http://{http}/v1");

    // What gRPC gives for the same requests.
    let mut client = inference_client(&node).await;
    let (completion, completion_logprobs, completion_finish) = grpc_generate(
        &mut client,
        GenerateRequest {
            model: DECODER.into(),
            prompt: PROMPT.into(),
            max_tokens: 16,
            ..GenerateRequest::default()
        },
    )
    .await;
    assert!(!completion.is_empty());
    let (chat, chat_logprobs, chat_finish) = grpc_generate(
        &mut client,
        GenerateRequest {
            model: DECODER.into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: QUESTION.into(),
            }],
            max_tokens: 24,
            ..GenerateRequest::default()
        },
    )
    .await;
    assert!(!chat.is_empty());
    eprintln!("gRPC greedy: completion {completion:?} ({completion_finish}), chat {chat:?} ({chat_finish})");
    let embedded = client
        .embed(EmbedRequest {
            model: ENCODER.into(),
            texts: TEXTS.iter().map(|t| (*t).to_owned()).collect(),
            ..EmbedRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings;

    // curl: a streamed chat is server-sent events ending in [DONE], the same text.
    let body = json!({
        "model": DECODER, "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 24, "temperature": 0, "stream": true,
    })
    .to_string();
    let (status, events) = curl(post(format!("{base}/chat/completions"), &body)).await;
    assert_eq!(status, 200, "{events}");
    let lines: Vec<&str> = events.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.iter().all(|l| l.starts_with("data: ")), "{events}");
    assert_eq!(lines.last(), Some(&"data: [DONE]"), "{events}");
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(&l["data: ".len()..]).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, chat);
    let last = &chunks[chunks.len() - 1]["choices"][0];
    assert_eq!(last["finish_reason"], openai_finish(&chat_finish));

    // curl: errors in OpenAI's shape.
    let (status, body) = curl(post(format!("{base}/completions"), "{\"model\": ")).await;
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(error["error"]["type"], "invalid_request_error", "{body}");
    let (status, body) = curl(post(
        format!("{base}/completions"),
        &json!({"model": ENCODER, "prompt": "x"}).to_string(),
    ))
    .await;
    assert_eq!(status, 400, "an encoder does not generate: {body}");
    let (status, body) = curl(args(&[&format!("{base}/nothing")])).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = curl(args(&[&format!("{base}/models/{DECODER}")])).await;
    assert_eq!(status, 200, "{body}");

    // A client that goes away mid-stream cancels its generation.
    let before = metric(&node, "troupe_generated_tokens_total").await;
    abandon_a_stream(http).await;
    wait_for(
        "the abandoned sequence to end",
        Duration::from_secs(30),
        || async { (metric(&node, "troupe_running_sequences").await == 0.0).then_some(()) },
    )
    .await;
    let generated = metric(&node, "troupe_generated_tokens_total").await - before;
    eprintln!("an abandoned stream made {generated} tokens");
    assert!(
        generated < 2000.0,
        "the sequence ran on after its client left ({generated} tokens)"
    );

    // The official client.
    let Some(python) = openai_python() else {
        return;
    };
    let out = run_client(
        &python,
        vec![
            "plain".into(),
            base.clone(),
            PROMPT.into(),
            QUESTION.into(),
            json!(TEXTS).to_string(),
        ],
    )
    .await;
    assert_eq!(out["models"], json!([ENCODER, DECODER]));

    let c = &out["completion"];
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["text"], completion, "the greedy completion is gRPC's");
    assert_eq!(c["finish"], openai_finish(&completion_finish));
    assert_eq!(c["usage"]["completion_tokens"], completion_logprobs.len());
    assert_eq!(
        c["usage"]["total_tokens"],
        c["usage"]["prompt_tokens"].as_u64().unwrap() + completion_logprobs.len() as u64
    );
    assert_eq!(
        c["tokens"].as_array().unwrap().len(),
        completion_logprobs.len()
    );
    assert_eq!(
        c["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect::<String>(),
        completion,
        "the tokens spell the text"
    );
    assert_close(&c["token_logprobs"], &completion_logprobs, 1e-4, "logprobs");

    let chat_out = &out["chat"];
    assert_eq!(chat_out["content"], chat);
    assert_eq!(chat_out["role"], "assistant");
    assert_eq!(chat_out["finish"], openai_finish(&chat_finish));
    assert_close(&chat_out["logprobs"], &chat_logprobs, 1e-4, "chat logprobs");

    let stream = &out["chat_stream"];
    let deltas: String = stream["deltas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(deltas, chat, "the streamed deltas are the whole content");
    assert_eq!(stream["roles"], json!(["assistant"]));
    assert_eq!(stream["finishes"], json!([openai_finish(&chat_finish)]));
    assert_eq!(stream["usage"], chat_out["usage"]);
    assert_eq!(out["completion_stream"]["text"], completion);
    assert_eq!(
        out["completion_stream"]["finishes"],
        json!([openai_finish(&completion_finish)])
    );

    let embeddings = &out["embeddings"];
    for (i, embedding) in embedded.iter().enumerate() {
        assert_close(
            &embeddings["base64"][i],
            &embedding.values,
            1e-5,
            "base64 embedding",
        );
    }
    assert_close(
        &embeddings["float"],
        &embedded[0].values,
        1e-5,
        "float embedding",
    );
    assert_eq!(embeddings["indexes"], json!([0, 1]));
    assert_eq!(embeddings["model"], ENCODER);
    assert!(embeddings["usage"]["prompt_tokens"].as_u64().unwrap() >= 10);

    for case in ["unknown_chat", "unknown_embed"] {
        let error = &out[case];
        assert_eq!(error["class"], "NotFoundError", "{case}: {error}");
        assert_eq!(error["status"], 404);
        assert_eq!(error["body"]["code"], "model_not_found", "{error}");
        assert_eq!(error["body"]["type"], "invalid_request_error");
    }
    assert_eq!(out["wrong_kind"]["status"], 400, "{}", out["wrong_kind"]);
    assert_eq!(out["n2"]["body"]["param"], "n", "{}", out["n2"]);
    node.shutdown().await.unwrap();
}

/// On a TLS node the port serves HTTPS (HTTP/1.1) with the API port's credentials: no token
/// is 401, a read token lists models but may not infer (403), an infer token may; plain HTTP
/// is told to use https; a body over the limit is 413. All in OpenAI's error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_port_takes_the_api_ports_tls_tokens_and_roles() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    troupe_transport::certs::init(&certs, 1, &[]).unwrap();
    let node = start_node_with(1, &dir, |config| {
        config.insecure = false;
        config.tls.dir = Some(certs.clone());
        config.http = Some("127.0.0.1:0".into());
        config.limits.max_message_bytes = 64 * 1024;
    })
    .await;
    node.metadata.initialize(Default::default()).await.unwrap();
    node.metadata
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let http = node.http_addr.unwrap();
    let base = format!("https://{http}/v1");
    let ca = certs.join("ca.crt").display().to_string();
    let (read, infer) = (mint(&certs, Role::Read), mint(&certs, Role::Infer));
    let bearer = |token: &str| format!("Authorization: Bearer {token}");
    let embed = json!({"model": "nope", "input": "x"}).to_string();

    let with_ca = |mut rest: Vec<String>| {
        let mut all = args(&["--cacert", &ca]);
        all.append(&mut rest);
        all
    };
    let (status, body) = curl(with_ca(args(&[&format!("{base}/models")]))).await;
    assert_eq!(status, 401, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["type"], "authentication_error", "{body}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no credential"),
        "{body}"
    );

    let (status, body) = curl(with_ca(args(&[
        "-H",
        &bearer(&read),
        &format!("{base}/models"),
    ])))
    .await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed, json!({"object": "list", "data": []}));
    let mut as_read = args(&["-H", &bearer(&read)]);
    as_read.extend(post(format!("{base}/embeddings"), &embed));
    let (status, body) = curl(with_ca(as_read)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("needs 'infer'"), "{body}");
    let mut as_infer = args(&["-H", &bearer(&infer)]);
    as_infer.extend(post(format!("{base}/embeddings"), &embed));
    let (status, body) = curl(with_ca(as_infer)).await;
    assert_eq!(status, 404, "past the gate, the model is unknown: {body}");
    assert!(body.contains("model_not_found"), "{body}");

    let (status, body) = curl(args(&[&format!("http://{http}/v1/models")])).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("use https://"), "{body}");

    let big = json!({"model": "nope", "input": "x".repeat(100 * 1024)}).to_string();
    let path = dir.path().join("big.json");
    std::fs::write(&path, big).unwrap();
    let mut too_big = args(&[
        "-H",
        &bearer(&infer),
        "-H",
        "Content-Type: application/json",
    ]);
    too_big.extend(args(&[
        "--data-binary",
        &format!("@{}", path.display()),
        &format!("{base}/embeddings"),
    ]));
    let (status, body) = curl(with_ca(too_big)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("limits.max_message_bytes"), "{body}");

    if let Some(python) = openai_python() {
        let out = run_client(&python, vec!["tls".into(), base.clone(), ca.clone(), infer]).await;
        assert_eq!(out["models"], json!([]));
        assert_eq!(out["unknown"]["class"], "NotFoundError", "{out}");
        assert_eq!(out["bad_token"]["class"], "AuthenticationError", "{out}");
        assert_eq!(out["bad_token"]["status"], 401);
    }
    node.shutdown().await.unwrap();
}
