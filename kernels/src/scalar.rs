//! Reference kernels, generic over [`Float`]: the slowest and the easiest to read.
//!
//! Run in `f64` on inputs widened from `f32` they are the oracle: the conformance suite
//! compares every other kernel against them. Every reduction runs left to right in one
//! accumulator, so results are bitwise reproducible.

use num_traits::Float;

use crate::{RopeLayout, RopeParams, SoftmaxParams};

/// `y (m, n) = x (m, k) · W (n, k)ᵀ`: each output is the dot product of a row of `x` with a
/// row of `W` (row-major, `n` rows of `k`, as GGUF stores a weight).
///
/// Outputs are computed [`CHAINS`] at a time, each in its own accumulator, left to right:
/// the same sums, bit for bit, as one output at a time, but independent chains of adds
/// rather than one waiting on the last (the tests run whole models on this backend).
pub fn matmul<T: Float>(x: &[T], w: &[T], y: &mut [T], m: usize, n: usize, k: usize) {
    debug_assert!(x.len() == m * k && w.len() == n * k && y.len() == m * n);
    debug_assert!(m > 0 && n > 0 && k > 0);
    for (x_row, y_row) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        let mut w_rows = w.chunks_exact(CHAINS * k);
        let mut y_outs = y_row.chunks_exact_mut(CHAINS);
        for (ws, outs) in (&mut w_rows).zip(&mut y_outs) {
            let rows: [&[T]; CHAINS] = std::array::from_fn(|c| &ws[c * k..][..k]);
            let mut acc = [T::zero(); CHAINS];
            for (i, &a) in x_row.iter().enumerate() {
                for (acc, row) in acc.iter_mut().zip(&rows) {
                    *acc = *acc + a * row[i];
                }
            }
            outs.copy_from_slice(&acc);
        }
        // The last n % CHAINS outputs, one at a time.
        let rest = w_rows.remainder().chunks_exact(k);
        for (w_row, out) in rest.zip(y_outs.into_remainder()) {
            let mut acc = T::zero();
            for (&a, &b) in x_row.iter().zip(w_row) {
                acc = acc + a * b;
            }
            *out = acc;
        }
    }
}

/// Outputs [`matmul`] computes side by side.
const CHAINS: usize = 8;

/// RMSNorm of rows: `y[r, i] = x[r, i] / sqrt(mean_i(x[r, ..]²) + eps) * weight[i]`.
///
/// `x`, `y`: `(rows, dim)`; `weight`: `(dim,)`.
pub fn rmsnorm<T: Float>(x: &[T], weight: &[T], y: &mut [T], dim: usize, eps: T) {
    debug_assert!(x.len() == y.len() && weight.len() == dim && x.len().is_multiple_of(dim));
    for (x_row, y_row) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let mut sum_sq = T::zero();
        for &v in x_row {
            sum_sq = sum_sq + v * v;
        }
        let mean = sum_sq / T::from(dim).unwrap();
        let inv_rms = T::one() / (mean + eps).sqrt();
        for ((out, &v), &g) in y_row.iter_mut().zip(x_row).zip(weight) {
            *out = v * inv_rms * g;
        }
    }
}

/// Rotary position embedding, in place.
///
/// `x`: `(rows, n_heads * head_dim)`; row `r` holds the heads of the token at position
/// `pos + r`. Each pair `i` of each head turns by `(pos + r) * theta^(-2i/head_dim)`:
/// `(a, b) -> (a cos - b sin, a sin + b cos)`, pairs as [`RopeLayout`] says.
pub fn rope<T: Float>(x: &mut [T], rows: usize, pos: usize, p: &RopeParams) {
    let d = p.head_dim;
    debug_assert!(d.is_multiple_of(2) && rows > 0 && x.len().is_multiple_of(rows * d));
    let half = d / 2;
    let theta = T::from(p.theta).unwrap();
    let row_len = x.len() / rows;
    for (r, row) in x.chunks_exact_mut(row_len).enumerate() {
        let position = T::from(pos + r).unwrap();
        for head in row.chunks_exact_mut(d) {
            for i in 0..half {
                let exponent = -T::from(2 * i).unwrap() / T::from(d).unwrap();
                let angle = position * theta.powf(exponent);
                let (sin, cos) = angle.sin_cos();
                let (ia, ib) = match p.layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Neox => (i, i + half),
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * cos - b * sin;
                head[ib] = a * sin + b * cos;
            }
        }
    }
}

/// Softmax over rows of `cols` entries, in place, with the scale and causal mask of
/// [`SoftmaxParams`]. Subtracts the row maximum before exponentiating, so no finite input
/// overflows.
pub fn softmax<T: Float>(x: &mut [T], cols: usize, p: &SoftmaxParams) {
    debug_assert!(cols > 0 && x.len().is_multiple_of(cols));
    let scale = T::from(p.scale).unwrap();
    for (r, row) in x.chunks_exact_mut(cols).enumerate() {
        let (visible, masked) = row.split_at_mut(p.visible(r, cols));
        masked.fill(T::zero());
        let mut max = T::neg_infinity();
        for v in visible.iter_mut() {
            *v = *v * scale;
            max = max.max(*v);
        }
        if max == T::neg_infinity() {
            visible.fill(T::zero());
            continue;
        }
        let mut sum = T::zero();
        for v in visible.iter_mut() {
            *v = (*v - max).exp();
            sum = sum + *v;
        }
        let inv = T::one() / sum;
        for v in visible.iter_mut() {
            *v = *v * inv;
        }
    }
}

/// SwiGLU gate: `y[i] = silu(a[i]) * b[i]`, with `silu(a) = a / (1 + exp(-a))`.
pub fn swiglu<T: Float>(a: &[T], b: &[T], y: &mut [T]) {
    debug_assert!(a.len() == b.len() && a.len() == y.len());
    for ((out, &g), &u) in y.iter_mut().zip(a).zip(b) {
        *out = g / (T::one() + (-g).exp()) * u;
    }
}

/// GELU gate: `y[i] = gelu(a[i]) * b[i]`, GELU in its tanh approximation (Hendrycks &
/// Gimpel 2016, eq. 3; PyTorch's `gelu(approximate="tanh")`, ggml's `ggml_gelu_f32`):
/// `gelu(a) = a/2 (1 + tanh(u))`, `u = sqrt(2/π) (a + 0.044715 a³)`, computed in the equal
/// form `a / (1 + exp(-2u))` (since `(1 + tanh u)/2 = 1/(1 + e^(-2u))`), which shares
/// SiLU's shape and stays finite for every finite `a`.
pub fn geglu<T: Float>(a: &[T], b: &[T], y: &mut [T]) {
    debug_assert!(a.len() == b.len() && a.len() == y.len());
    let c = T::from(GELU_2_SQRT_2_OVER_PI).unwrap_or_else(T::one);
    let k = T::from(GELU_COEF_A).unwrap_or_else(T::zero);
    for ((out, &g), &u) in y.iter_mut().zip(a).zip(b) {
        let z = c * (g + k * g * g * g);
        *out = g / (T::one() + (-z).exp()) * u;
    }
}

/// `2 sqrt(2/π)`: the GELU tanh approximation's `sqrt(2/π)`, doubled for the sigmoid form.
pub const GELU_2_SQRT_2_OVER_PI: f64 = 1.595_769_121_605_730_7;
/// The cubic coefficient of the GELU tanh approximation (Hendrycks & Gimpel 2016).
pub const GELU_COEF_A: f64 = 0.044715;

/// Residual add, in place: `y[i] += x[i]`.
pub fn add<T: Float>(y: &mut [T], x: &[T]) {
    debug_assert!(y.len() == x.len());
    for (out, &v) in y.iter_mut().zip(x) {
        *out = *out + v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each output of [`matmul`] is its row's dot product summed left to right in one
    /// accumulator, bit for bit, whether it falls in a group of [`CHAINS`] or in the rest.
    #[test]
    fn matmul_sums_each_output_left_to_right() {
        let (m, k) = (3, 37);
        for n in [1, CHAINS - 1, CHAINS, CHAINS + 1, 2 * CHAINS + 3] {
            let val = |i: usize, s: u32| ((i as u32).wrapping_mul(s) >> 8) as f32 / 65536.0 - 128.0;
            let x: Vec<f32> = (0..m * k).map(|i| val(i, 0x9e37_79b9)).collect();
            let w: Vec<f32> = (0..n * k).map(|i| val(i, 0x85eb_ca6b)).collect();
            let mut y = vec![0.0f32; m * n];
            matmul(&x, &w, &mut y, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f32;
                    for t in 0..k {
                        acc += x[i * k + t] * w[j * k + t];
                    }
                    assert_eq!(y[i * n + j].to_bits(), acc.to_bits(), "n {n}: ({i}, {j})");
                }
            }
        }
    }
}
