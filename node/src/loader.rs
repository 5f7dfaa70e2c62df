//! Loads model directories onto the node's compute backend, for the actor tree: a directory
//! of safetensors is an encoder, one GGUF file a decoder.

use std::path::Path;
use std::sync::Arc;

use troupe_actors::ModelLoader;
use troupe_models::{Decoder, Embedder, LoadedModel, ModelError, ModelFormat};

/// Decoders run on the CPU with their weights quantised (troupe_models::decoder), whatever
/// the device: the fused kernels are CPU code.
fn load_decoder(dir: &Path) -> Result<LoadedModel, ModelError> {
    Ok(LoadedModel::Decoder(Arc::new(Decoder::load(dir)?)))
}

/// The CPU backend (burn Flex with troupe's fused kernels).
pub struct CpuLoader;

impl ModelLoader for CpuLoader {
    fn load(&self, dir: &Path) -> Result<LoadedModel, ModelError> {
        if ModelFormat::of_dir(dir) == ModelFormat::Gguf {
            return load_decoder(dir);
        }
        let device = troupe_models::cpu_device();
        Ok(LoadedModel::Encoder(Arc::new(Embedder::<
            troupe_models::CpuBackend,
        >::load(
            dir, &device
        )?)))
    }
}

/// NVIDIA GPUs through burn-cuda.
#[cfg(feature = "cuda")]
pub struct CudaLoader;

#[cfg(feature = "cuda")]
impl ModelLoader for CudaLoader {
    fn load(&self, dir: &Path) -> Result<LoadedModel, ModelError> {
        if ModelFormat::of_dir(dir) == ModelFormat::Gguf {
            return load_decoder(dir);
        }
        let device = troupe_models::backend::CudaDevice::default();
        Ok(LoadedModel::Encoder(Arc::new(Embedder::<
            troupe_models::backend::CudaBackend,
        >::load(
            dir, &device
        )?)))
    }
}

/// The loader for `serving.device` (validated by the config).
pub fn for_device(device: &str) -> Arc<dyn ModelLoader> {
    match device {
        #[cfg(feature = "cuda")]
        "cuda" => Arc::new(CudaLoader),
        _ => Arc::new(CpuLoader),
    }
}
