//! chord: transformer inference on the CPU, built around one [`Backend`] trait.
//!
//! - [`backend`]: the trait, shape checks, and the built-in backends (scalar, blocked, SIMD);
//! - [`harness`]: one table of op cases (inputs, oracle, tolerance, work) for the
//!   conformance suite and the benchmarks;
//! - [`conformance`]: the suite any backend runs to prove it matches the f64 reference;
//! - [`gguf`]: the GGUF reader (memory-mapped, hostile-file safe) and writer;
//! - [`tokenizer`]: byte-level BPE read from the GGUF, matching llama.cpp's ids;
//! - [`generate`]: the generation loop with streaming;
//! - [`model`]: the transformer (llama, Qwen2, Qwen3, Gemma 3), generic over the backend;
//! - [`synth`]: synthetic llama-family models of any shape, seeded, written as a stream;
//! - [`bench`]: the measurements behind `chord bench kernels`, roofs included;
//! - [`research`]: activations dumped to safetensors, and where a backend departs from another
//!   (through [`model::observe`], the hook that reads and edits every activation).
//!
//! The kernels themselves live in the `chord-kernels` crate, re-exported as [`kernels`].

pub mod backend;
pub mod bench;
pub mod chat;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod convert;
pub mod generate;
pub mod gguf;
pub mod harness;
pub mod kld;
pub mod model;
pub mod perplexity;
pub mod research;
pub mod sample;
pub mod synth;
pub mod tokenizer;

pub use backend::{Backend, BlockedBackend, Error, ScalarBackend, SimdBackend, Variant};
pub use chord_kernels as kernels;
