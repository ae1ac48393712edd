//! chord-kernels: the compute kernels under chord's `Backend` trait.
//!
//! Pure functions over slices, with no knowledge of models or tensors. Each op comes in
//! three families:
//! - [`scalar`]: the reference, generic over [`num_traits::Float`]. Run in `f64` it is the
//!   oracle every other kernel is checked against.
//! - [`blocked`]: plain Rust written for the auto-vectoriser, cache-tiled and parallel with
//!   rayon over a pool the caller passes in.
//! - [`simd`]: explicit vector code, one generic body stamped out per instruction set
//!   (AVX-512, AVX2+FMA via `std::arch`; a portable path on `wide`), chosen at run time.
//!
//! Layout conventions shared by every kernel:
//! - matrices are row-major; a weight `W (n, k)` is `n` rows of `k` contiguous values, as
//!   GGUF stores it, and `matmul` computes `y (m, n) = x (m, k) · Wᵀ`;
//! - per-row ops (RMSNorm, RoPE, softmax) take `rows × row_len` contiguous values.
//!
//! Kernels assume valid shapes (checked by `debug_assert!`); callers validate them once,
//! at the library boundary (`chord::backend::check`).

// Kernels index lanes, tiles and accumulator sets by number: the loops say which.
#![allow(clippy::needless_range_loop)]

pub mod arena;
pub mod blocked;
mod params;
pub mod quant;
pub mod scalar;
pub mod simd;
pub mod team;

pub use params::{RopeLayout, RopeParams, SoftmaxParams, first_visible};
