//! `troupe generate`: text from a decoder model, one JSON line per prompt. Locally from a
//! GGUF file (`--model-dir`), or from a cluster through `Inference/Generate` (`--addr`).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use troupe_models::chat::Message;
use troupe_models::decoder::Decoder;
use troupe_models::generate::SamplingParams;
use troupe_proto::v1::{ChatMessage, GenerateRequest};

use super::init_threads;
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model on this machine: a GGUF file, or a directory holding one (what `troupe
    /// models fetch smollm2-135m` prints).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "addr",
        conflicts_with = "addr"
    )]
    pub model_dir: Option<PathBuf>,
    /// Generate on a cluster instead: the API address of any node.
    #[arg(long, value_name = "API", requires = "model")]
    pub addr: Option<String>,
    /// With --addr: the registered model name, e.g. smollm2-135m.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// With --addr: a specific version (default: the active one).
    #[arg(long, value_name = "VERSION", requires = "addr")]
    pub version: Option<String>,
    /// With --addr: the task, whose priority picks the lane.
    #[arg(long, requires = "addr")]
    pub task: Option<String>,
    /// Tokens to generate at most, per prompt.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler: the same seed, prompt and settings give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this text (repeat the flag for several).
    #[arg(long, value_name = "STR")]
    pub stop: Vec<String>,
    /// Each prompt is a user message, put through the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Read prompts from FILE: JSON lines, each {"prompt": "..."} ('-' for stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "prompts")]
    pub input: Option<PathBuf>,
    /// Compute threads for local generation (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// With --addr: seconds to wait for each generation.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Prompts (when no --input is given).
    pub prompts: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: String,
}

#[derive(serde::Serialize)]
struct OutputLine<'a> {
    prompt_ids: &'a [u32],
    token_ids: &'a [u32],
    text: &'a str,
    finish_reason: &'a str,
}

fn read_prompts(path: &std::path::Path) -> Result<Vec<String>, CliError> {
    let text = super::embed::read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str::<PromptLine>(line)
                .map(|p| p.prompt)
                .map_err(|e| {
                    CliError::Usage(format!(
                        "{} line {}: {e}: each line must be a JSON object {{\"prompt\": \"...\"}}",
                        path.display(),
                        n + 1
                    ))
                })
        })
        .collect()
}

pub fn run(args: GenerateArgs) -> Result<(), CliError> {
    let prompts = match &args.input {
        Some(path) => read_prompts(path)?,
        None => args.prompts.clone(),
    };
    if prompts.is_empty() {
        return Err(CliError::Usage(
            "no prompts: pass PROMPT arguments or --input FILE with JSON lines {\"prompt\": \"...\"}".into(),
        ));
    }
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        stop: args.stop.clone(),
        ignore_eos: false,
    };
    params.check().map_err(CliError::Usage)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut write = |line: &OutputLine<'_>| -> Result<(), CliError> {
        serde_json::to_writer(&mut out, line)
            .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
        out.write_all(b"\n").map_err(CliError::Output)?;
        out.flush().map_err(CliError::Output)
    };
    if let Some(addr) = &args.addr {
        return super::remote::block_on(remote(&args, addr, &prompts, &params, &mut write));
    }
    let dir = args.model_dir.as_ref().ok_or_else(|| {
        CliError::Usage("give --model-dir DIR, or --addr API --model NAME".into())
    })?;
    init_threads(args.threads)?;
    let decoder = Decoder::load(dir).map_err(|e| CliError::Usage(e.to_string()))?;
    for prompt in &prompts {
        let text = if args.chat {
            decoder
                .render_chat(&[Message::new("user", prompt)])
                .map_err(CliError::Usage)?
        } else {
            prompt.clone()
        };
        let prompt_ids = decoder.tokenizer.encode(&text);
        let generation = decoder
            .generate(&prompt_ids, &params, |_| {})
            .map_err(CliError::Usage)?;
        write(&OutputLine {
            prompt_ids: &prompt_ids,
            token_ids: &generation.token_ids,
            text: &generation.text,
            finish_reason: generation.finish_reason.as_str(),
        })?;
    }
    Ok(())
}

/// Each prompt through `Inference/Generate`, its stream gathered into one line.
async fn remote(
    args: &GenerateArgs,
    addr: &str,
    prompts: &[String],
    params: &SamplingParams,
    write: &mut impl FnMut(&OutputLine<'_>) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let timeout = Duration::from_secs(args.timeout);
    let mut client = super::remote::inference(addr, timeout).await?;
    for prompt in prompts {
        let (prompt_text, messages) = if args.chat {
            (
                String::new(),
                vec![ChatMessage {
                    role: "user".into(),
                    content: prompt.clone(),
                }],
            )
        } else {
            (prompt.clone(), Vec::new())
        };
        let mut request = tonic::Request::new(GenerateRequest {
            model: args.model.clone().unwrap_or_default(),
            version: args.version.clone().unwrap_or_default(),
            prompt: prompt_text,
            messages,
            max_tokens: params.max_tokens as u32,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k as u32,
            seed: params.seed,
            stop: params.stop.clone(),
            task: args.task.clone().unwrap_or_default(),
            ..GenerateRequest::default()
        });
        request.set_timeout(timeout);
        let mut stream = client.generate(request).await?.into_inner();
        let (mut prompt_ids, mut token_ids, mut text, mut finish) =
            (Vec::new(), Vec::new(), String::new(), String::new());
        while let Some(chunk) = stream.message().await? {
            if !chunk.prompt_ids.is_empty() {
                prompt_ids = chunk.prompt_ids;
            }
            token_ids.extend(chunk.token_ids);
            text.push_str(&chunk.text);
            if !chunk.finish_reason.is_empty() {
                finish = chunk.finish_reason;
            }
        }
        if finish.is_empty() {
            return Err(CliError::Runtime(
                "the generation stream ended without a finish reason: retry".into(),
            ));
        }
        write(&OutputLine {
            prompt_ids: &prompt_ids,
            token_ids: &token_ids,
            text: &text,
            finish_reason: &finish,
        })?;
    }
    Ok(())
}
