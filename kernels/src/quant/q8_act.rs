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

/// Rows `i0 ..` of a [`QuantizedRows`], read by pointer: for the vector kernels that read
/// several rows' blocks in their innermost loop. Through four [`Q8Row`]s, each with five
/// slices, the pointers and lengths lived on the stack and every read checked one: `Q4_0`
/// and `Q4_1` prefill ran at 140 GOP/s or 198, by how the registers fell. Through this view
/// every 32-value format runs at 218-245 GOP/s (SmolLM's `ffn_up`, m = 512, one Zen 4
/// thread), and `Q6_K` at 184 where it ran at 136.
#[derive(Clone, Copy, Debug)]
pub struct Q8Rows<'a> {
    qs: *const i8,
    d: *const f32,
    sum: *const i32,
    s: *const f32,
    sum16: *const i32,
    k: usize,
    rows: usize,
    _rows: std::marker::PhantomData<&'a QuantizedRows>,
}

impl Q8Rows<'_> {
    /// Rows in the view.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `r`'s quants of block `a` (32 bytes).
    ///
    /// # Safety
    /// `r` below [`rows`](Self::rows), `a` below `k / 32`.
    #[inline(always)]
    pub unsafe fn qs(&self, r: usize, a: usize) -> *const i8 {
        debug_assert!(r < self.rows && a < self.k / 32);
        // SAFETY: inside the rows (the caller's contract).
        unsafe { self.qs.add(r * self.k + 32 * a) }
    }

    /// Row `r`'s block `a`: its scale `d`, `Σq` and `d Σq`.
    ///
    /// # Safety
    /// As [`qs`](Self::qs).
    #[inline(always)]
    pub unsafe fn block(&self, r: usize, a: usize) -> (f32, i32, f32) {
        debug_assert!(r < self.rows && a < self.k / 32);
        let at = r * (self.k / 32) + a;
        // SAFETY: as above.
        unsafe { (*self.d.add(at), *self.sum.add(at), *self.s.add(at)) }
    }

    /// Row `r`'s `Σq` of half block `h` (16 values).
    ///
    /// # Safety
    /// `r` below [`rows`](Self::rows), `h` below `k / 16`.
    #[inline(always)]
    pub unsafe fn sum16(&self, r: usize, h: usize) -> i32 {
        debug_assert!(r < self.rows && h < self.k / 16);
        // SAFETY: as above.
        unsafe { *self.sum16.add(r * (self.k / 16) + h) }
    }
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

    /// Rows `i0 .. i0 + rows`, by pointer.
    pub fn rows_from(&self, i0: usize, rows: usize) -> Q8Rows<'_> {
        assert!(
            i0 + rows <= self.m,
            "rows {i0}..{} of {}",
            i0 + rows,
            self.m
        );
        let b = self.k / 32;
        Q8Rows {
            qs: self.qs[i0 * self.k..].as_ptr(),
            d: self.d[i0 * b..].as_ptr(),
            sum: self.sum[i0 * b..].as_ptr(),
            s: self.s[i0 * b..].as_ptr(),
            sum16: self.sum16[2 * i0 * b..].as_ptr(),
            k: self.k,
            rows,
            _rows: std::marker::PhantomData,
        }
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
