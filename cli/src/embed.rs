//! `troupe embed`: embed texts locally (no cluster), or with `--addr` on a running node over
//! gRPC. Both print one JSON array per text, in input order.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use troupe_models::{Embedder, Precision, DEFAULT_BATCH_SIZE};

use std::time::Duration;

use troupe_proto::v1::EmbedRequest;

use super::remote::{block_on, inference};
use super::{init_threads, with_backend, DeviceKind, ModelSource};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// Embed on the node at this API address instead of locally; --model is then the
    /// registered model name.
    #[arg(long, value_name = "API")]
    pub addr: Option<String>,
    /// With --addr: a specific version (default: the active one).
    #[arg(long, requires = "addr")]
    pub version: Option<String>,
    /// With --addr: the task whose priority picks the queue lane.
    #[arg(long, requires = "addr")]
    pub task: Option<String>,
    /// With --addr and routing.strategy = consistent_hash: requests with the same key are
    /// served by the same node while it is up (default: the texts are the key).
    #[arg(long, requires = "addr")]
    pub routing_key: Option<String>,
    /// With --addr: how long to wait for the answer, in milliseconds.
    #[arg(long, requires = "addr", default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Read texts from FILE, one per line ('-' for stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "texts")]
    pub input: Option<PathBuf>,
    /// Rows per forward pass.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Compute threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Local embedding: linear layers in fp32, or int8 (cosine ≥ 0.999 against fp32):
    /// fp32 or int8. With --addr the node's setting for the version applies.
    #[arg(long, default_value_t = Precision::Fp32, conflicts_with = "addr")]
    pub precision: Precision,
    /// Texts to embed (when no --input is given).
    pub texts: Vec<String>,
}

/// Lines of a text file: split on '\n' only, a final newline adds no line, a trailing '\r'
/// is dropped, nothing else is stripped (tabs and spaces are part of the text).
pub fn split_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last().is_some_and(|line| line.is_empty()) {
        lines.pop();
    }
    lines
        .into_iter()
        .map(|line| line.strip_suffix('\r').unwrap_or(line).to_owned())
        .collect()
}

fn read_input(path: &Path) -> Result<Vec<String>, CliError> {
    Ok(split_lines(&read_text(path)?))
}

/// A UTF-8 text file ('-' for stdin), whole.
pub(crate) fn read_text(path: &Path) -> Result<String, CliError> {
    let mut bytes = Vec::new();
    let result = if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|mut file| file.read_to_end(&mut bytes))
    };
    result.map_err(|source| CliError::Input {
        path: path.to_owned(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| CliError::InputEncoding {
        path: path.to_owned(),
        reason: e.utf8_error().to_string(),
    })
}

pub fn run(args: EmbedArgs) -> Result<(), CliError> {
    let texts = match &args.input {
        Some(path) => read_input(path)?,
        None => args.texts.clone(),
    };
    if texts.is_empty() {
        return Err(CliError::Usage(
            "no texts to embed: pass TEXT arguments or --input FILE with one text per line".into(),
        ));
    }
    let embeddings = match &args.addr {
        Some(addr) => block_on(embed_remote(&args, addr, texts))?,
        None => {
            init_threads(args.threads)?;
            args.device.check_available()?;
            let dir = args.source.resolve()?;
            with_backend!(args.device, |Backend, device| {
                Embedder::<Backend>::load_with_precision(&dir, &device, args.precision)?
                    .embed(&texts, args.batch_size)?
            })
        }
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for embedding in &embeddings {
        serde_json::to_writer(&mut out, embedding)
            .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
        out.write_all(b"\n").map_err(CliError::Output)?;
    }
    out.flush().map_err(CliError::Output)
}

async fn embed_remote(
    args: &EmbedArgs,
    addr: &str,
    texts: Vec<String>,
) -> Result<Vec<Vec<f32>>, CliError> {
    let model = match (&args.source.model, &args.source.model_dir) {
        (Some(model), None) => model.clone(),
        _ => {
            return Err(CliError::Usage(
                "with --addr, name the registered model with --model NAME (--model-dir is for local embedding)".into(),
            ))
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut client = inference(addr, timeout).await?;
    let mut request = tonic::Request::new(EmbedRequest {
        model,
        version: args.version.clone().unwrap_or_default(),
        texts,
        task: args.task.clone().unwrap_or_default(),
        request_id: String::new(),
        routing_key: args.routing_key.clone().unwrap_or_default(),
    });
    request.set_timeout(timeout);
    let reply = client.embed(request).await?.into_inner();
    Ok(reply.embeddings.into_iter().map(|e| e.values).collect())
}
