//! The candle engine shared by every mode: model loading, tokenization, chat templates
//! and generation.

pub mod adapter;
pub mod chat;
pub mod generate;
pub mod loader;
pub mod model;
pub mod sampling;
pub mod tokenizer;

use candle_core::Device;

pub use adapter::Adapter;
pub use generate::{FinishReason, GenerateRequest, Generation, Sequence, decode_step, generate, generate_batch};
pub use loader::{LoadedModel, WeightFormat, load};
pub use sampling::SamplingParams;

/// The device work runs on: the first CUDA GPU when built with `cuda` and one is
/// present, else the CPU.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return device;
    }
    Device::Cpu
}
