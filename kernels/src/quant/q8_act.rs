//! Fast mode's activations: rows of `f32` quantized to 8 bits in blocks of 32, as ggml's
//! `Q8_0`/`Q8_1` do (`d = max|x| / 127`, `q = round(x / d)`, halves away from zero), with
//! each block's `Σq` and `s = d Σq` beside it for the weights that need them. ggml stores `d`
//! and `s` as halves; these keep them in f32, which moves fast mode nearer exact mode at no
//! cost. Each weight format's reference dot with these rows sits in its own file
//! (`dot_q8`), beside the vector kernels of `simd::qint`.

/// Rows of activations in 8-bit blocks of 32.
#[derive(Clone, Debug, Default)]
pub struct QuantizedRows {
    k: usize,
    m: usize,
    /// `(m, k)` quants.
    qs: Vec<i8>,
    /// `(m, k / 32)`: each block's scale, `Σq` and `d Σq`.
    d: Vec<f32>,
    sum: Vec<i32>,
    s: Vec<f32>,
    /// `(m, k / 16)`: `Σq` of each half block (for `Q6_K`'s groups of 16).
    sum16: Vec<i32>,
}

/// One quantized row: `k` quants and `k / 32` blocks' scale, `Σq` and `d Σq`.
#[derive(Clone, Copy, Debug)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub sum: &'a [i32],
    pub s: &'a [f32],
    /// `Σq` of each half block of 16.
    pub sum16: &'a [i32],
}

impl QuantizedRows {
    /// Quantizes `x (m, k)`, `k` a multiple of 32, reusing this value's buffers.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        assert!(
            k.is_multiple_of(32) && x.len() == m * k,
            "quantize: x is not (m, k) rows of whole blocks"
        );
        let blocks = m * k / 32;
        self.k = k;
        self.m = m;
        self.qs.resize(m * k, 0);
        self.d.resize(blocks, 0.0);
        self.sum.resize(blocks, 0);
        self.s.resize(blocks, 0.0);
        self.sum16.resize(2 * blocks, 0);
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let qs = &mut self.qs[32 * b..32 * b + 32];
            let mut half = [0i32; 2];
            for (h, (qs, xs)) in half
                .iter_mut()
                .zip(qs.chunks_exact_mut(16).zip(xb.chunks_exact(16)))
            {
                for (q, &v) in qs.iter_mut().zip(xs) {
                    *q = (v * id).round() as i8;
                    *h += *q as i32;
                }
            }
            let sum = half[0] + half[1];
            self.sum16[2 * b..2 * b + 2].copy_from_slice(&half);
            self.d[b] = d;
            self.sum[b] = sum;
            self.s[b] = d * sum as f32;
        }
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> Q8Row<'_> {
        let (k, b) = (self.k, self.k / 32);
        Q8Row {
            qs: &self.qs[i * k..(i + 1) * k],
            d: &self.d[i * b..(i + 1) * b],
            sum: &self.sum[i * b..(i + 1) * b],
            s: &self.s[i * b..(i + 1) * b],
            sum16: &self.sum16[2 * i * b..2 * (i + 1) * b],
        }
    }
}
