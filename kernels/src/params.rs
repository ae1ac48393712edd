//! Parameters shared by every family of kernels.

/// How a head's dimensions are paired for rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeLayout {
    /// Adjacent pairs `(x[2i], x[2i+1])`, as llama.cpp's `LLAMA_ROPE_TYPE_NORM`
    /// (llama, SmolLM, TinyLlama GGUF files).
    Interleaved,
    /// Split halves `(x[i], x[i + d/2])`, as GPT-NeoX (`LLAMA_ROPE_TYPE_NEOX`: Qwen, Phi...).
    Neox,
}

/// Rotary position embedding of rows of heads.
///
/// Pair `i` of a head (`0 <= i < head_dim/2`) at position `pos` turns by the angle
/// `pos * theta^(-2i/head_dim)` radians.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    /// Values per head; even.
    pub head_dim: usize,
    /// Base of the frequencies (10000 for llama 1/2, 100000 for SmolLM2, 500000 for llama 3).
    pub theta: f32,
    /// Which dimensions are paired.
    pub layout: RopeLayout,
}

/// Softmax over rows, as attention needs it.
///
/// Row `r` becomes `softmax(scale * x[r, ..])`. With `causal = Some(offset)`, row `r`
/// attends only to columns `0 ..= r + offset` (the query at position `offset + r` sees the
/// keys up to itself); the other columns become 0. Entries equal to `-inf` get probability
/// 0; a row with no finite entry in its window becomes all zeros rather than NaN.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftmaxParams {
    /// Multiplies every entry before the exponential (`1/sqrt(head_dim)` in attention). Must
    /// be finite and positive.
    pub scale: f32,
    /// Causal mask offset, see above. `None`: every column is visible.
    pub causal: Option<usize>,
}

impl SoftmaxParams {
    /// Plain softmax: scale 1, no mask.
    pub const PLAIN: SoftmaxParams = SoftmaxParams {
        scale: 1.0,
        causal: None,
    };

    /// The number of visible columns of row `r` in a row of `cols` entries.
    #[inline]
    pub fn visible(&self, r: usize, cols: usize) -> usize {
        match self.causal {
            Some(offset) => (r + offset + 1).min(cols),
            None => cols,
        }
    }
}

/// The first position the query at position `p` sees under a sliding window of `window`
/// positions: `p + 1 - window` (llama.cpp's `LLAMA_SWA_TYPE_STANDARD` masks `t` when
/// `p - t >= window`), or 0 without a window.
pub fn first_visible(p: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (p + 1).saturating_sub(w),
        None => 0,
    }
}
