//! Fast mode's activations: rows of `f32` quantized to 8 bits in blocks of 32, as ggml's
//! `Q8_0`/`Q8_1` do (`d = max|x| / 127`, `q = round(x / d)`, halves away from zero), with
//! each block's `Σq` and `s = d Σq` beside it for the weights that need them. ggml stores `d`
//! and `s` as halves; these keep them in f32, which moves fast mode nearer exact mode at no
//! cost. Each weight format's reference dot with these rows sits in its own file
//! (`dot_q8`), beside the vector kernels of `simd::qint`.

use std::sync::Mutex;

use crate::team::Team;

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

/// The buffers [`QuantizedRows::quantize`] fills, sized for `x`.
struct Blocks<'a> {
    qs: &'a mut [i8],
    d: &'a mut [f32],
    sum: &'a mut [i32],
    s: &'a mut [f32],
    sum16: &'a mut [i32],
}

impl<'a> Blocks<'a> {
    /// The first `blocks` blocks' buffers, and the rest's.
    fn split_at(self, blocks: usize) -> (Blocks<'a>, Blocks<'a>) {
        let (qs, qs1) = self.qs.split_at_mut(32 * blocks);
        let (d, d1) = self.d.split_at_mut(blocks);
        let (sum, sum1) = self.sum.split_at_mut(blocks);
        let (s, s1) = self.s.split_at_mut(blocks);
        let (sum16, sum16_1) = self.sum16.split_at_mut(2 * blocks);
        (
            Blocks {
                qs,
                d,
                sum,
                s,
                sum16,
            },
            Blocks {
                qs: qs1,
                d: d1,
                sum: sum1,
                s: s1,
                sum16: sum16_1,
            },
        )
    }
}

/// Rows of activations from which [`QuantizedRows::quantize_on`] gives each thread a task
/// (a decoded token's row stays on the calling thread).
pub const ROWS_PER_TASK: usize = 16;

/// Quantizes `x` block by block into `out`. Written for the compiler to vectorise, and
/// compiled again for AVX-512 and AVX2 (below): one loop for every level, every level's
/// bytes the same.
#[inline(always)]
fn quantize_blocks(x: &[f32], out: Blocks<'_>) {
    for (b, xb) in x.chunks_exact(32).enumerate() {
        // max |x| as `f32::max` folds it (NaN ignored): 16 running maxima as compares,
        // which vectorise, then folded (max neither rounds nor depends on the order).
        let mut lanes = [0.0f32; 16];
        for xs in xb.chunks_exact(16) {
            for (m, v) in lanes.iter_mut().zip(xs) {
                *m = if v.abs() > *m { v.abs() } else { *m };
            }
        }
        let amax = lanes.iter().fold(0.0f32, |a, &v| if v > a { v } else { a });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let qs = &mut out.qs[32 * b..32 * b + 32];
        let mut half = [0i32; 2];
        for (h, (qs, xs)) in half
            .iter_mut()
            .zip(qs.chunks_exact_mut(16).zip(xb.chunks_exact(16)))
        {
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = round_half_away(v * id);
                *h += *q as i32;
            }
        }
        let sum = half[0] + half[1];
        out.sum16[2 * b..2 * b + 2].copy_from_slice(&half);
        out.d[b] = d;
        out.sum[b] = sum;
        out.s[b] = d * sum as f32;
    }
}

/// [`quantize_blocks`] at the widest level this CPU runs.
fn fill(x: &[f32], out: Blocks<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has the features.
            return unsafe { quantize_avx512(x, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { quantize_avx2(x, out) };
        }
    }
    quantize_blocks(x, out);
}

/// [`quantize_blocks`] in explicit AVX-512, the same bytes (a test compares them on
/// halves, ties, overflow, infinities and NaN): compiled from the generic loop, quantizing
/// took 3.1 ns a value on a Xeon (model 207), a quarter of fast prefill's `ffn_up` with AMX
/// tiles and nearly half its `ffn_down`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(x: &[f32], out: Blocks<'_>) {
    use std::arch::x86_64::*;
    let (zero, lo, hi) = (
        _mm512_setzero_ps(),
        _mm512_set1_ps(i8::MIN as f32),
        _mm512_set1_ps(i8::MAX as f32),
    );
    let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_epi32(1));
    for (b, xb) in x.chunks_exact(32).enumerate() {
        // SAFETY: 32 values in, 32 bytes out.
        unsafe {
            let v = [
                _mm512_loadu_ps(xb.as_ptr()),
                _mm512_loadu_ps(xb.as_ptr().add(16)),
            ];
            // `max(a, b)` is `a > b ? a : b`: the generic loop's running maxima (NaN
            // ignored), in its order; the fold's order cannot matter.
            let lanes = _mm512_max_ps(
                _mm512_abs_ps(v[1]),
                _mm512_max_ps(_mm512_abs_ps(v[0]), zero),
            );
            let amax = _mm512_reduce_max_ps(lanes);
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let mut sums = [0i32; 2];
            for (h, v) in v.iter().enumerate() {
                // round_half_away: clamped (max and min return their second operand, y,
                // when it is NaN), truncated, one away from zero where the cut is a half.
                let y = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(*v, id)));
                let t = _mm512_cvttps_epi32(y);
                let cut = _mm512_sub_ps(y, _mm512_cvtepi32_ps(t));
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(cut, half);
                let down = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(cut, _mm512_sub_ps(zero, half));
                let q = _mm512_mask_add_epi32(t, up, t, one);
                let q = _mm512_mask_sub_epi32(q, down, q, one);
                // Truncated to bytes: NaN's 0x80000000 becomes 0, as `NaN as i32` is.
                let q8 = _mm512_cvtepi32_epi8(q);
                let at = out.qs.as_mut_ptr().add(32 * b + 16 * h);
                _mm_storeu_si128(at as *mut __m128i, q8);
                sums[h] = _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q8));
            }
            let sum = sums[0] + sums[1];
            out.sum16[2 * b..2 * b + 2].copy_from_slice(&sums);
            out.d[b] = d;
            out.sum[b] = sum;
            out.s[b] = d * sum as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], out: Blocks<'_>) {
    quantize_blocks(x, out)
}

/// `y.round() as i8` (halves away from zero, saturating, NaN to 0) without a call to
/// `roundf`, so that the quantizing loop vectorises: `y` truncated, plus one away from zero
/// where the part cut off (exact in f32) is at least a half. Quantizing with `roundf` took
/// 19% of fast-mode prefill (`Q4_0`, one thread, `perf`); vectorised, 13%.
#[inline(always)]
fn round_half_away(y: f32) -> i8 {
    // Clamped first (NaN stays NaN), so that `t` and the sum below stay in an i8's range.
    let y = y.clamp(i8::MIN as f32, i8::MAX as f32);
    let t = y as i32; // toward zero; NaN to 0
    let cut = y - t as f32;
    (t + (cut >= 0.5) as i32 - (cut <= -0.5) as i32) as i8
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
        self.resize(x, m, k);
        fill(x, self.blocks());
    }

    /// [`quantize`](Self::quantize) with the rows split over `team`, from
    /// [`ROWS_PER_TASK`] rows a task: the same bytes. On one thread, quantizing a prompt's
    /// activations kept the other core waiting (it is 13% of fast prefill on one thread);
    /// split, fast pp512 on two threads ran 11% faster (default model, Zen 4).
    pub fn quantize_on(&mut self, team: &Team, x: &[f32], m: usize, k: usize) {
        let tasks = (m / ROWS_PER_TASK).clamp(1, team.threads());
        if tasks == 1 {
            return self.quantize(x, m, k);
        }
        self.resize(x, m, k);
        // Each task's rows, and its part of every buffer.
        let mut parts = Vec::with_capacity(tasks);
        let (mut rest, mut r0) = (self.blocks(), 0);
        for t in 0..tasks {
            let r1 = m * (t + 1) / tasks;
            let (part, tail) = rest.split_at((r1 - r0) * k / 32);
            parts.push(Mutex::new(Some((&x[r0 * k..r1 * k], part))));
            (rest, r0) = (tail, r1);
        }
        team.run(tasks, &|t| {
            let part = parts[t].lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some((x, out)) = part {
                fill(x, out);
            }
        });
    }

    /// Sizes the buffers for `x (m, k)`.
    fn resize(&mut self, x: &[f32], m: usize, k: usize) {
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
    }

    /// The buffers, to be filled.
    fn blocks(&mut self) -> Blocks<'_> {
        Blocks {
            qs: &mut self.qs,
            d: &mut self.d,
            sum: &mut self.sum,
            s: &mut self.s,
            sum16: &mut self.sum16,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compiled path quantizes as the plain formula does (`d = max|x| / 127`,
    /// `q = round(x / d)`), bit for bit, on blocks with ties, zeros, wide ranges, a NaN
    /// and an infinity.
    #[test]
    fn every_path_quantizes_as_the_formula() {
        let (m, k) = (3, 160);
        let mut x: Vec<f32> = (0..m * k)
            .map(|i| ((i as u32).wrapping_mul(0x9e37_79b9) >> 8) as f32 / (1 << 20) as f32 - 8.0)
            .collect();
        x[32..64].fill(0.0); // an all-zero block: d = 0
        x[64] = 127.0; // a block whose values land on halves
        for (i, v) in x[65..96].iter_mut().enumerate() {
            *v = i as f32 + 0.5;
        }
        x[100] = -1e30; // one huge value
        x[101..128].fill(0.75);
        x[130] = f32::NAN; // ignored by max |x|; quantized to 0
        x[170] = f32::INFINITY; // d = ∞: every value to 0
        let want = |b: usize| {
            let xb = &x[32 * b..32 * b + 32];
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<i8> = xb.iter().map(|v| (v * id).round() as i8).collect();
            (d, q)
        };
        let run = |f: &dyn Fn(&[f32], Blocks<'_>)| {
            let mut r = QuantizedRows::default();
            r.quantize(&x, m, k); // sizes the buffers
            f(&x, r.blocks());
            r
        };
        let mut paths: Vec<(&str, QuantizedRows)> = vec![("plain", run(&quantize_blocks))];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has the features.
                paths.push(("avx2", run(&|x, o| unsafe { quantize_avx2(x, o) })));
            }
            if std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: as above.
                paths.push(("avx512", run(&|x, o| unsafe { quantize_avx512(x, o) })));
            }
        }
        for (name, r) in &paths {
            for b in 0..m * k / 32 {
                let (d, q) = want(b);
                assert_eq!(r.d[b].to_bits(), d.to_bits(), "{name} block {b}");
                assert_eq!(&r.qs[32 * b..32 * b + 32], &q[..], "{name} block {b}");
                let sum: i32 = q.iter().map(|&v| v as i32).sum();
                let h0: i32 = q[..16].iter().map(|&v| v as i32).sum();
                assert_eq!((r.sum[b], r.sum16[2 * b]), (sum, h0), "{name} block {b}");
                assert_eq!(
                    r.s[b].to_bits(),
                    (d * sum as f32).to_bits(),
                    "{name} block {b}"
                );
            }
        }
    }

    /// Split over teams of 1 to 3 threads, the rows quantize to the same bytes as on one
    /// thread, for row counts below, at and around the split points (every part of every
    /// buffer written, none twice).
    #[test]
    fn quantizing_on_a_team_gives_the_same_bytes() {
        let k = 64;
        let teams: Vec<Team> = (1..=3).map(|t| Team::new(t).unwrap()).collect();
        for m in [
            1,
            ROWS_PER_TASK - 1,
            ROWS_PER_TASK,
            2 * ROWS_PER_TASK + 1,
            3 * ROWS_PER_TASK + 2,
            100,
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| {
                    ((i as u32).wrapping_mul(0x9e37_79b9) >> 9) as f32 / (1 << 18) as f32 - 16.0
                })
                .collect();
            let mut want = QuantizedRows::default();
            want.quantize(&x, m, k);
            for team in &teams {
                let mut got = QuantizedRows::default();
                // Stale contents from a larger call first: every byte must be rewritten.
                got.quantize(&vec![1.0; 128 * k], 128, k);
                got.quantize_on(team, &x, m, k);
                let t = team.threads();
                assert_eq!((got.m, got.k), (m, k), "m {m}, {t} threads");
                assert_eq!(got.qs, want.qs, "m {m}, {t} threads");
                assert_eq!(got.d, want.d, "m {m}, {t} threads");
                assert_eq!(
                    (&got.sum, &got.sum16),
                    (&want.sum, &want.sum16),
                    "m {m}, {t} threads"
                );
                assert_eq!(got.s, want.s, "m {m}, {t} threads");
            }
        }
    }

    /// `round_half_away` is `round() as i8` on halves, the values next to them, the ends of
    /// an i8 and past them, infinities, NaN and a sweep of bit patterns.
    #[test]
    fn round_half_away_is_round_as_i8() {
        let mut ys = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e10,
            -1e10,
        ];
        for i in -130..=130 {
            let h = i as f32 + 0.5;
            ys.extend([h, h.next_up(), h.next_down(), i as f32]);
        }
        ys.extend((0..1u32 << 20).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9))));
        for y in ys {
            assert_eq!(round_half_away(y), y.round() as i8, "{y:e}");
        }
    }
}
