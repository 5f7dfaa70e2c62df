//! Which burn backend runs the encoder. CPU (`Flex`) is the default; `Cuda` needs the
//! `cuda` feature. The CPU backend was chosen by measurement, see docs/benchmarks.md.

/// The default CPU backend.
pub type CpuBackend = burn_flex::Flex;
pub type CpuDevice = burn_flex::FlexDevice;

#[cfg(feature = "cuda")]
pub type CudaBackend = burn_cuda::Cuda;
#[cfg(feature = "cuda")]
pub type CudaDevice = burn_cuda::CudaDevice;

/// The CPU device.
pub fn cpu_device() -> CpuDevice {
    CpuDevice::default()
}
