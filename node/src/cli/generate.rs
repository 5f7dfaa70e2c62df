//! `troupe generate`: text from a decoder model (a GGUF file) on this machine, one JSON line
//! per prompt.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Args;
use troupe_models::chat::{ChatTemplate, Message};
use troupe_models::generate::{Generator, SamplingParams};

use super::{init_threads, with_backend, DeviceKind};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model: a GGUF file, or a directory holding one (what `troupe models fetch
    /// smollm2-135m` prints).
    #[arg(long, value_name = "DIR")]
    pub model_dir: PathBuf,
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
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
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
    };
    params.check().map_err(CliError::Usage)?;
    init_threads(args.threads)?;
    args.device.check_available()?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    with_backend!(args.device, |Backend, device| {
        let generator = Generator::<Backend>::load(&args.model_dir, &device)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        let template = match (&generator.chat_template, args.chat) {
            (Some(source), true) => {
                let text = |id: Option<u32>| {
                    id.and_then(|id| generator.tokenizer.token(id))
                        .unwrap_or("")
                        .to_owned()
                };
                let config = generator.model.config();
                Some(
                    ChatTemplate::new(source, &text(config.bos), &text(Some(config.eos)))
                        .map_err(CliError::Usage)?,
                )
            }
            (None, true) => {
                return Err(CliError::Usage(format!(
                "{} has no chat template: drop --chat and write the prompt in the model's format",
                args.model_dir.display()
            )))
            }
            (_, false) => None,
        };
        for prompt in &prompts {
            let text = match &template {
                Some(template) => template
                    .render(&[Message::new("user", prompt)], true)
                    .map_err(CliError::Usage)?,
                None => prompt.clone(),
            };
            let prompt_ids = generator.tokenizer.encode(&text);
            if prompt_ids.is_empty() {
                return Err(CliError::Usage("an empty prompt: give it some text".into()));
            }
            let context = generator.model.config().context;
            if prompt_ids.len() + params.max_tokens > context {
                return Err(CliError::Usage(format!(
                    "the prompt is {} tokens and --max-tokens {}: more than the model's context of {context} tokens",
                    prompt_ids.len(),
                    params.max_tokens
                )));
            }
            let generation = generator.generate(&prompt_ids, &params, |_| {});
            serde_json::to_writer(
                &mut out,
                &OutputLine {
                    prompt_ids: &prompt_ids,
                    token_ids: &generation.token_ids,
                    text: &generation.text,
                    finish_reason: generation.finish_reason.as_str(),
                },
            )
            .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
            out.write_all(b"\n").map_err(CliError::Output)?;
            out.flush().map_err(CliError::Output)?;
        }
        Ok::<(), CliError>(())
    })?;
    Ok(())
}
