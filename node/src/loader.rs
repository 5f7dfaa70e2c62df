//! Loads model directories onto the node's compute backend, for the actor tree.

use std::path::Path;
use std::sync::Arc;

use troupe_actors::ModelLoader;
use troupe_models::{Embedder, ModelError, SentenceEmbedder};

/// The CPU backend (burn Flex with troupe's fused kernels).
pub struct CpuLoader;

impl ModelLoader for CpuLoader {
    fn load(&self, dir: &Path) -> Result<Arc<dyn SentenceEmbedder>, ModelError> {
        let device = troupe_models::cpu_device();
        Ok(Arc::new(Embedder::<troupe_models::CpuBackend>::load(
            dir, &device,
        )?))
    }
}

/// NVIDIA GPUs through burn-cuda.
#[cfg(feature = "cuda")]
pub struct CudaLoader;

#[cfg(feature = "cuda")]
impl ModelLoader for CudaLoader {
    fn load(&self, dir: &Path) -> Result<Arc<dyn SentenceEmbedder>, ModelError> {
        let device = troupe_models::backend::CudaDevice::default();
        Ok(Arc::new(
            Embedder::<troupe_models::backend::CudaBackend>::load(dir, &device)?,
        ))
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
