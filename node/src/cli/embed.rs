//! `troupe embed`: local embedding, no cluster.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use troupe_models::{Embedder, DEFAULT_BATCH_SIZE};

use super::{init_threads, with_backend, DeviceKind, ModelSource};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub source: ModelSource,
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
    let text = String::from_utf8(bytes).map_err(|e| CliError::InputEncoding {
        path: path.to_owned(),
        reason: e.utf8_error().to_string(),
    })?;
    Ok(split_lines(&text))
}

pub fn run(args: EmbedArgs) -> Result<(), CliError> {
    init_threads(args.threads)?;
    let texts = match &args.input {
        Some(path) => read_input(path)?,
        None => args.texts.clone(),
    };
    if texts.is_empty() {
        return Err(CliError::Usage(
            "no texts to embed: pass TEXT arguments or --input FILE with one text per line".into(),
        ));
    }
    args.device.check_available()?;
    let dir = args.source.resolve()?;
    let embeddings = with_backend!(args.device, |Backend, device| {
        Embedder::<Backend>::load(&dir, &device)?.embed(&texts, args.batch_size)?
    });
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for embedding in &embeddings {
        serde_json::to_writer(&mut out, embedding)
            .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
        out.write_all(b"\n").map_err(CliError::Output)?;
    }
    out.flush().map_err(CliError::Output)
}
