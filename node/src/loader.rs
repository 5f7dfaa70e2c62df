//! Loads model directories onto the node's compute backend, for the actor tree: a directory
//! of safetensors is an encoder, one GGUF file a decoder.

use std::path::Path;
use std::sync::Arc;

use troupe_actors::ModelLoader;
use troupe_models::{Decoder, Embedder, LoadedModel, ModelError, ModelFormat, Precision};

/// Decoders run on the CPU with their weights quantised (troupe_models::decoder), whatever
/// the device: the fused kernels are CPU code. They keep their file's quantisation: a version
/// that asks for int8 is refused (the node-wide `serving.precision` applies to encoders only).
fn load_decoder(dir: &Path, precision: Option<Precision>) -> Result<LoadedModel, ModelError> {
    if precision == Some(Precision::Int8) {
        return Err(ModelError::PrecisionNotForDecoder {
            precision: Precision::Int8.name().to_owned(),
            path: dir.to_owned(),
        });
    }
    Ok(LoadedModel::Decoder(Arc::new(Decoder::load(dir)?)))
}

/// The CPU backend (burn Flex with troupe's fused kernels); encoders in the version's
/// precision, else in `precision` (`serving.precision`).
pub struct CpuLoader {
    pub precision: Precision,
}

impl ModelLoader for CpuLoader {
    fn load(&self, dir: &Path, precision: Option<Precision>) -> Result<LoadedModel, ModelError> {
        if ModelFormat::of_dir(dir) == ModelFormat::Gguf {
            return load_decoder(dir, precision);
        }
        let device = troupe_models::cpu_device();
        Ok(LoadedModel::Encoder(Arc::new(Embedder::<
            troupe_models::CpuBackend,
        >::load_with_precision(
            dir,
            &device,
            precision.unwrap_or(self.precision),
        )?)))
    }
}

/// NVIDIA GPUs through burn-cuda (int8 linear layers run on the host CPU).
#[cfg(feature = "cuda")]
pub struct CudaLoader {
    pub precision: Precision,
}

#[cfg(feature = "cuda")]
impl ModelLoader for CudaLoader {
    fn load(&self, dir: &Path, precision: Option<Precision>) -> Result<LoadedModel, ModelError> {
        if ModelFormat::of_dir(dir) == ModelFormat::Gguf {
            return load_decoder(dir, precision);
        }
        let device = troupe_models::backend::CudaDevice::default();
        Ok(LoadedModel::Encoder(Arc::new(Embedder::<
            troupe_models::backend::CudaBackend,
        >::load_with_precision(
            dir,
            &device,
            precision.unwrap_or(self.precision),
        )?)))
    }
}

/// The loader for `serving.device` and `serving.precision` (validated by the config).
pub fn for_device(device: &str, precision: Precision) -> Arc<dyn ModelLoader> {
    match device {
        #[cfg(feature = "cuda")]
        "cuda" => Arc::new(CudaLoader { precision }),
        _ => Arc::new(CpuLoader { precision }),
    }
}
