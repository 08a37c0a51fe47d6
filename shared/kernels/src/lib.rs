//! Fedge's CPU training path: the forward pass, backward pass and SGD update of the small
//! classifiers federated learning trains on devices (McMahan et al.'s CNN and 2NN), fused and
//! over plain slices.
//!
//! burn stays the definition of the models, the GPU path and the reference; this crate is what
//! makes a CPU training step fast (see `docs/benchmarks.md`). It knows nothing of burn, of
//! Fedge's parameter format or of datasets: `fedge-learn` maps burn's parameters in and out.
//!
//! - [`gemm`]: the bounds-checked safe front for the `gemm` crate (the crate's only `unsafe`).
//! - [`conv`]: whole-batch im2col / col2im (NHWC) and fused bias + ReLU + 2x2 max-pooling.
//! - [`winograd`]: Winograd F(2x2, 5x5) transforms for 5x5 convolutions with several input
//!   channels (36 small GEMMs instead of one im2col GEMM, 2.8x fewer multiplications), and
//!   [`ConvAlgorithm`], the choice between the two.
//! - [`net`]: [`Net`], the layers, the loss, the fused step and evaluation.

pub mod conv;
pub mod gemm;
pub mod net;
pub mod winograd;

pub use gemm::Threads;
pub use net::{LayerSpec, Net, NetError, NetSpec, Scores};
pub use winograd::ConvAlgorithm;

#[cfg(test)]
mod tests;
