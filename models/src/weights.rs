//! Loading Hugging Face BERT safetensors into [`BertModel`] with burn-store, and writing
//! seeded random checkpoints in the same layout for tests that need no download.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn_store::{ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};

use crate::bert::BertModel;
use crate::config::BertConfig;
use crate::error::ModelError;

/// Parameters sentence-transformers does not use; a checkpoint may carry them.
const IGNORED_PREFIXES: [&str; 2] = ["pooler.", "embeddings.position_ids"];

/// Loads `model.safetensors` (Hugging Face `BertModel` names, optionally under a `bert.`
/// prefix) into a model of shape `config`.
pub fn load_bert<B: Backend>(
    config: &BertConfig,
    path: &Path,
    device: &B::Device,
) -> Result<BertModel<B>, ModelError> {
    if !path.is_file() {
        return Err(ModelError::ModelFileMissing {
            path: path.to_owned(),
        });
    }
    // Parse the header ourselves first: a truncated or foreign file gets a precise error
    // instead of whatever the store makes of it.
    check_safetensors(config, path)?;
    let store = SafetensorsStore::from_file(path);
    load_with_store(config, store, path, device)
}

fn load_with_store<B: Backend>(
    config: &BertConfig,
    store: SafetensorsStore,
    path: &Path,
    device: &B::Device,
) -> Result<BertModel<B>, ModelError> {
    let mut store = store
        .with_from_adapter(PyTorchToBurnAdapter)
        .with_key_remapping(r"^bert\.", "")
        .with_key_remapping(r"\.LayerNorm\.", ".layer_norm.")
        .with_key_remapping(r"\.attention\.self\.", ".attention.self_attention.")
        .allow_partial(false)
        .validate(true);
    let mut model = BertModel::<B>::init(config, device);
    let result = model
        .load_from(&mut store)
        .map_err(|error| ModelError::Weights {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    if !result.errors.is_empty() {
        let reasons: Vec<String> = result.errors.iter().map(|e| format!("{e:?}")).collect();
        return Err(ModelError::WeightsMismatch {
            path: path.to_owned(),
            reason: reasons.join("; "),
        });
    }
    if !result.missing.is_empty() {
        let names: Vec<&str> = result
            .missing
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        return Err(ModelError::WeightsMismatch {
            path: path.to_owned(),
            reason: format!("tensors missing from the file: {}", names.join(", ")),
        });
    }
    Ok(model)
}

/// Validates the file's header and the shapes of the tensors the encoder reads.
fn check_safetensors(config: &BertConfig, path: &Path) -> Result<(), ModelError> {
    let file = std::fs::File::open(path).map_err(ModelError::io(path))?;
    // SAFETY: the mapping is read-only and lives only inside this function; a concurrent
    // truncation of the file is the one hazard, as with any mmap-based loader.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(ModelError::io(path))?;
    let tensors =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|error| ModelError::Weights {
            path: path.to_owned(),
            reason: error.to_string(),
        })?;
    let h = config.hidden_size;
    let expected = [
        (
            "embeddings.word_embeddings.weight",
            vec![config.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight",
            vec![config.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight",
            vec![config.type_vocab_size, h],
        ),
    ];
    let names: HashMap<String, Vec<usize>> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let name = name.strip_prefix("bert.").unwrap_or(&name).to_owned();
            (name, view.shape().to_vec())
        })
        .collect();
    for (name, shape) in expected {
        match names.get(name) {
            None => {
                return Err(ModelError::WeightsMismatch {
                    path: path.to_owned(),
                    reason: format!("tensor {name} is missing"),
                })
            }
            Some(found) if *found != shape => {
                return Err(ModelError::WeightsMismatch {
                    path: path.to_owned(),
                    reason: format!(
                        "tensor {name} has shape {found:?}, config.json implies {shape:?}"
                    ),
                })
            }
            Some(_) => {}
        }
    }
    for (name, found) in &names {
        if IGNORED_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            continue;
        }
        if let Some(rest) = name.strip_prefix("encoder.layer.") {
            let index: Option<usize> = rest.split('.').next().and_then(|i| i.parse().ok());
            if index.is_none_or(|i| i >= config.num_hidden_layers) {
                return Err(ModelError::WeightsMismatch {
                    path: path.to_owned(),
                    reason: format!(
                        "tensor {name} belongs to a layer past num_hidden_layers {}",
                        config.num_hidden_layers
                    ),
                });
            }
            if found.is_empty() || found.contains(&0) {
                return Err(ModelError::WeightsMismatch {
                    path: path.to_owned(),
                    reason: format!("tensor {name} has empty shape {found:?}"),
                });
            }
        }
    }
    Ok(())
}

/// A deterministic stream of uniform floats (SplitMix64).
struct SeededUniform(u64);

impl SeededUniform {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 24 high bits -> [0, 1) -> [-1, 1)
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn fill(&mut self, len: usize, center: f32, spread: f32) -> Vec<f32> {
        (0..len).map(|_| center + spread * self.next()).collect()
    }
}

/// A Hugging Face style checkpoint of shape `config` with weights drawn from `seed`.
pub fn random_checkpoint(config: &BertConfig, seed: u64) -> Vec<u8> {
    let mut rng = SeededUniform(seed);
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, center: f32, spread: f32| {
        let len = shape.iter().product();
        let data = rng.fill(len, center, spread);
        tensors.push((name, shape, data));
    };
    push(
        "embeddings.word_embeddings.weight".into(),
        vec![config.vocab_size, h],
        0.0,
        0.5,
    );
    push(
        "embeddings.position_embeddings.weight".into(),
        vec![config.max_position_embeddings, h],
        0.0,
        0.1,
    );
    push(
        "embeddings.token_type_embeddings.weight".into(),
        vec![config.type_vocab_size, h],
        0.0,
        0.1,
    );
    push("embeddings.LayerNorm.weight".into(), vec![h], 1.0, 0.1);
    push("embeddings.LayerNorm.bias".into(), vec![h], 0.0, 0.1);
    let linear_spread = |d_in: usize| 1.0 / (d_in as f32).sqrt();
    for layer in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{layer}.");
        for part in ["query", "key", "value"] {
            push(
                format!("{p}attention.self.{part}.weight"),
                vec![h, h],
                0.0,
                linear_spread(h),
            );
            push(format!("{p}attention.self.{part}.bias"), vec![h], 0.0, 0.05);
        }
        push(
            format!("{p}attention.output.dense.weight"),
            vec![h, h],
            0.0,
            linear_spread(h),
        );
        push(
            format!("{p}attention.output.dense.bias"),
            vec![h],
            0.0,
            0.05,
        );
        push(
            format!("{p}attention.output.LayerNorm.weight"),
            vec![h],
            1.0,
            0.1,
        );
        push(
            format!("{p}attention.output.LayerNorm.bias"),
            vec![h],
            0.0,
            0.05,
        );
        push(
            format!("{p}intermediate.dense.weight"),
            vec![i, h],
            0.0,
            linear_spread(h),
        );
        push(format!("{p}intermediate.dense.bias"), vec![i], 0.0, 0.05);
        push(
            format!("{p}output.dense.weight"),
            vec![h, i],
            0.0,
            linear_spread(i),
        );
        push(format!("{p}output.dense.bias"), vec![h], 0.0, 0.05);
        push(format!("{p}output.LayerNorm.weight"), vec![h], 1.0, 0.1);
        push(format!("{p}output.LayerNorm.bias"), vec![h], 0.0, 0.05);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .unwrap_or_else(|_| unreachable!("shape and buffer length agree by construction"));
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None)
        .unwrap_or_else(|_| unreachable!("in-memory serialisation of valid views cannot fail"))
}
