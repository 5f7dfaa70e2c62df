//! Texts in, sentence embeddings out: tokenise, sort by length so each batch pads as little
//! as possible, run the encoder batch by batch, and put the results back in input order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::bert::{Encoder, PaddedBatch};
use crate::config::BertConfig;
use crate::error::ModelError;
use crate::kernels::EncoderBackend;
use crate::precision::Precision;
use crate::tokenizer::SentenceTokenizer;
use crate::weights;

/// Largest batch one forward pass accepts. A larger request is split by the caller.
pub const MAX_BATCH_SIZE: usize = 1024;

/// Default rows per forward pass, as sentence-transformers' `encode`.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// A loaded sentence-embedding model on backend `B`.
#[derive(Debug, Clone)]
pub struct Embedder<B: EncoderBackend> {
    tokenizer: SentenceTokenizer,
    encoder: Encoder<B>,
}

impl<B: EncoderBackend> Embedder<B> {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`, in fp32.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        Self::load_with_precision(dir, device, Precision::Fp32)
    }

    /// Loads the model from `dir` with its linear layers in `precision` (int8 weights are
    /// quantised from the fp32 file here, at load).
    pub fn load_with_precision(
        dir: &Path,
        device: &B::Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::ModelDirMissing {
                path: dir.to_owned(),
            });
        }
        let config = BertConfig::from_model_dir(dir)?;
        let tokenizer =
            SentenceTokenizer::from_file(&dir.join("tokenizer.json"), config.max_seq_length)?;
        let model = weights::load_bert::<B>(&config, &dir.join("model.safetensors"), device)?;
        let encoder = Encoder::from_model_with_precision(&config, &model, device, precision)?;
        Ok(Self { tokenizer, encoder })
    }

    pub fn precision(&self) -> Precision {
        self.encoder.precision()
    }

    pub fn config(&self) -> &BertConfig {
        self.encoder.config()
    }

    pub fn tokenizer(&self) -> &SentenceTokenizer {
        &self.tokenizer
    }

    pub fn dimension(&self) -> usize {
        self.config().hidden_size
    }

    /// Embeds `texts` in batches of at most `batch_size`, returning one vector per text in
    /// input order.
    pub fn embed<S: AsRef<str>>(
        &self,
        texts: &[S],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if texts.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        check_batch_size(batch_size)?;
        let ids = self.tokenizer.encode(texts)?;
        self.embed_token_ids(&ids, batch_size)
    }

    /// Embeds already tokenised sequences (with `[CLS]`/`[SEP]`), sorted by length into
    /// batches of at most `batch_size`, results in input order.
    pub fn embed_token_ids(
        &self,
        ids: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if ids.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        check_batch_size(batch_size)?;
        self.check_ids(ids)?;
        // Longest first, stable, as sentence-transformers does.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let hidden = self.dimension();
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(batch_size) {
            let sequences: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let flat = self.run_batch(&PaddedBatch::new(&sequences))?;
            for (&index, row) in chunk.iter().zip(flat.chunks_exact(hidden)) {
                out[index] = row.to_vec();
            }
        }
        Ok(out)
    }

    fn check_ids(&self, ids: &[Vec<u32>]) -> Result<(), ModelError> {
        let config = self.config();
        for (index, sequence) in ids.iter().enumerate() {
            if sequence.is_empty() || sequence.len() > config.max_seq_length {
                return Err(ModelError::Tokenize {
                    index,
                    reason: format!(
                        "{} tokens, a sequence needs 1..={} (max_seq_length)",
                        sequence.len(),
                        config.max_seq_length
                    ),
                });
            }
            if let Some(&id) = sequence
                .iter()
                .find(|&&id| id as usize >= config.vocab_size)
            {
                return Err(ModelError::TokenOutOfVocabulary {
                    index,
                    id,
                    vocab_size: config.vocab_size,
                });
            }
        }
        Ok(())
    }

    /// One forward pass. A panic inside the backend fails this batch only.
    fn run_batch(&self, batch: &PaddedBatch) -> Result<Vec<f32>, ModelError> {
        catch_unwind(AssertUnwindSafe(|| self.encoder.embed(batch))).map_err(|panic| {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".to_owned());
            ModelError::Backend { reason }
        })?
    }
}

/// What a server needs from a loaded model, object safe so the actor tree does not depend on
/// the compute backend. Calls block for the length of a forward pass: make them on a
/// dedicated thread.
pub trait SentenceEmbedder: Send + Sync + 'static {
    /// Token ids per text, with `[CLS]`/`[SEP]`, truncated to the model's `max_seq_length`.
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, ModelError>;
    /// One embedding per sequence, in input order, in forward passes of at most `batch_size`.
    fn embed_token_ids(
        &self,
        ids: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
    fn dimension(&self) -> usize;
}

impl<B: EncoderBackend> SentenceEmbedder for Embedder<B>
where
    Embedder<B>: Send + Sync,
{
    fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, ModelError> {
        self.tokenizer.encode(texts)
    }

    fn embed_token_ids(
        &self,
        ids: &[Vec<u32>],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        Embedder::embed_token_ids(self, ids, batch_size)
    }

    fn dimension(&self) -> usize {
        Embedder::dimension(self)
    }
}

fn check_batch_size(batch_size: usize) -> Result<(), ModelError> {
    if batch_size == 0 || batch_size > MAX_BATCH_SIZE {
        return Err(ModelError::BatchSize {
            requested: batch_size,
            max: MAX_BATCH_SIZE,
        });
    }
    Ok(())
}

/// Writes a complete model directory (config.json, tokenizer.json, model.safetensors,
/// sentence_bert_config.json) for [`BertConfig::tiny`] with weights drawn from `seed`.
/// It loads through the same path as a real model.
pub fn write_tiny_model_dir(dir: &Path, seed: u64) -> Result<(), ModelError> {
    let config = BertConfig::tiny();
    std::fs::create_dir_all(dir).map_err(ModelError::io(dir))?;
    let config_json = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
    });
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(ModelError::io(path))
    };
    write("config.json", config_json.to_string().as_bytes())?;
    write(
        "sentence_bert_config.json",
        serde_json::json!({"max_seq_length": config.max_seq_length, "do_lower_case": false})
            .to_string()
            .as_bytes(),
    )?;
    write(
        "model.safetensors",
        &weights::random_checkpoint(&config, seed),
    )?;
    SentenceTokenizer::tiny(config.max_seq_length)?.save(&dir.join("tokenizer.json"))
}
