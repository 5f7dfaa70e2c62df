//! The encoder's architecture, read from a Hugging Face `config.json` (and the
//! sentence-transformers files beside it), validated before any weight is touched.

use std::path::Path;

use serde::Deserialize;

use crate::error::ModelError;

/// Longest input the sentence-transformers pipeline of all-MiniLM-L6-v2 keeps.
pub const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// A BERT encoder's shape, as far as the forward pass needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Tokens kept per text, `[CLS]` and `[SEP]` included.
    pub max_seq_length: usize,
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_pos")]
    position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".to_owned()
}
fn default_pos() -> String {
    "absolute".to_owned()
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

impl BertConfig {
    /// A 2-layer, 32-wide encoder over a 64-token vocabulary: fast tests with seeded weights.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 64,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 64,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            max_seq_length: 32,
        }
    }

    /// Reads `config.json`, plus `sentence_bert_config.json` and `1_Pooling/config.json`
    /// when present, from a model directory.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = read_required(&path)?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(model_type) = &hf.model_type {
            if model_type != "bert" {
                return Err(unsupported(&path, "model_type", model_type, "\"bert\""));
            }
        }
        if hf.hidden_act != "gelu" {
            return Err(unsupported(
                &path,
                "hidden_act",
                &hf.hidden_act,
                "\"gelu\" (exact erf GELU)",
            ));
        }
        if hf.position_embedding_type != "absolute" {
            return Err(unsupported(
                &path,
                "position_embedding_type",
                &hf.position_embedding_type,
                "\"absolute\"",
            ));
        }

        let mut max_seq_length = DEFAULT_MAX_SEQ_LENGTH;
        let st_path = dir.join("sentence_bert_config.json");
        if st_path.exists() {
            let text = read_required(&st_path)?;
            let st: SentenceBertConfig =
                serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
                    path: st_path.clone(),
                    reason: e.to_string(),
                })?;
            max_seq_length = st.max_seq_length;
        }
        let pooling_path = dir.join("1_Pooling").join("config.json");
        if pooling_path.exists() {
            let text = read_required(&pooling_path)?;
            let pooling: PoolingConfig =
                serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
                    path: pooling_path.clone(),
                    reason: e.to_string(),
                })?;
            let only_mean = pooling.pooling_mode_mean_tokens
                && !pooling.pooling_mode_cls_token
                && !pooling.pooling_mode_max_tokens
                && !pooling.pooling_mode_mean_sqrt_len_tokens;
            if !only_mean {
                return Err(unsupported(
                    &pooling_path,
                    "pooling mode",
                    "not plain mean pooling",
                    "pooling_mode_mean_tokens only",
                ));
            }
        }

        let config = Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            intermediate_size: hf.intermediate_size,
            max_position_embeddings: hf.max_position_embeddings,
            type_vocab_size: hf.type_vocab_size,
            layer_norm_eps: hf.layer_norm_eps,
            // sentence-transformers keeps min(max_seq_length, max_position_embeddings).
            max_seq_length: max_seq_length.min(hf.max_position_embeddings),
        };
        config
            .validate()
            .map_err(|reason| ModelError::InvalidConfig { path, reason })?;
        Ok(config)
    }

    /// Checks the shape is one the forward pass can run.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.max_seq_length < 2 {
            return Err(format!(
                "max_seq_length {} leaves no room for [CLS] and [SEP]",
                self.max_seq_length
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps {} must be a small positive number",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Floating-point operations of one forward pass over `tokens` positions
    /// (multiply-add = 2), counting the matrix products, which dominate.
    pub fn forward_flops(&self, tokens: usize) -> f64 {
        let (h, i, l) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            tokens as f64,
        );
        let per_layer_linear = 2.0 * l * (3.0 * h * h + h * h + 2.0 * h * i);
        let per_layer_attention = 2.0 * 2.0 * l * l * h;
        self.num_hidden_layers as f64 * (per_layer_linear + per_layer_attention)
    }
}

fn read_required(path: &Path) -> Result<String, ModelError> {
    if !path.exists() {
        return Err(ModelError::ModelFileMissing {
            path: path.to_owned(),
        });
    }
    std::fs::read_to_string(path).map_err(ModelError::io(path))
}

fn unsupported(
    path: &Path,
    field: &'static str,
    value: &str,
    supported: &'static str,
) -> ModelError {
    ModelError::UnsupportedConfig {
        path: path.to_owned(),
        field,
        value: value.to_owned(),
        supported,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minilm_costs_about_2_87_gflop_per_128_tokens() {
        let config = BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            max_seq_length: 256,
        };
        let gflop = config.forward_flops(128) / 1e9;
        assert!((gflop - 2.87).abs() < 0.05, "{gflop}");
    }

    #[test]
    fn validate_rejects_heads_that_do_not_divide_hidden() {
        let mut config = BertConfig::tiny();
        config.num_attention_heads = 5;
        assert!(config.validate().unwrap_err().contains("multiple"));
    }
}
