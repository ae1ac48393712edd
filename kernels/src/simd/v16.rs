//! Sixteen lanes at a time: the vector the quantized kernels are written against.
//!
//! Every GGUF block format holds its values in runs of 16 (half a 32-value block, a Q6_K
//! scale group), so the quantized kernels work on 16 f32 lanes and on the 16 bytes they are
//! decoded from. [`V16`] is one zmm register on AVX-512 and two ymm registers on AVX2 (two
//! `wide::f32x8` on the portable path); the bytes are one xmm register (SSE2/SSSE3, present
//! on both x86 levels) or a plain array. Each implementation is used only inside a
//! `#[target_feature]` wrapper of its level, as in [`super::vec`].

use super::repack::k6_top;
use super::vec::{F32Vec, Portable};
use wide::{f32x4, u32x4};

/// 16 f32 lanes, and the 16-byte integer vectors block formats decode from.
pub(crate) trait V16: Copy {
    /// 16 bytes.
    type U8: Copy;
    /// Sixteen 32-bit lanes: four quant bytes (eight nibbles) of each of sixteen rows, as
    /// the repacked 4-, 5- and 6-bit formats hold them (see `simd::repack`).
    type U32: Copy;

    /// Loads 16 values.
    ///
    /// # Safety
    /// `p` must be valid for reading 16 f32 values.
    unsafe fn load(p: *const f32) -> Self;
    /// Stores 16 values.
    ///
    /// # Safety
    /// `p` must be valid for writing 16 f32 values.
    unsafe fn store(self, p: *mut f32);
    fn splat(v: f32) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// `self * b + c`, one rounding.
    fn fma(self, b: Self, c: Self) -> Self;
    /// Sum of the lanes, in a fixed order.
    fn reduce_add(self) -> f32;

    /// Loads 16 bytes.
    ///
    /// # Safety
    /// `p` must be valid for reading 16 bytes.
    unsafe fn load_u8(p: *const u8) -> Self::U8;
    /// Loads 64 bytes as sixteen little-endian 32-bit lanes.
    ///
    /// # Safety
    /// `p` must be valid for reading 64 bytes.
    unsafe fn load_u32(p: *const u8) -> Self::U32;
    /// Lane `i` = nibble `n` (0..8, bits `4n .. 4n + 4`) of lane `i` of `v`, plus 16 where
    /// bit `i` of `fifth` is set (a 5-bit format's fifth bits), plus `offset`, exactly, with
    /// `table` = [`iota16`](V16::iota16) + `offset`. AVX-512: one shift and one permute
    /// through `table`, and an add under a mask register; else the fifth bit joins the
    /// nibble as an integer before one conversion.
    fn nibble_value(table: Self, offset: Self, v: Self::U32, n: u32, fifth: Option<u16>) -> Self;
    /// The eight values of a chunk of `Q6_K` in lanes (`simd::repack`): value `n` (0..8) of
    /// lane `i` is a 6-bit `q` plus `offset`, exactly, nibble `n` of lane `i` of `lo` its low
    /// four bits and bits `2m, 2m + 1` of lane `i` of `hi`, `m = `[`k6_top`]`(e, n)`, its top
    /// two; `table` as for [`nibble_value`](V16::nibble_value). AVX-512: each nibble
    /// through `table`, each top field through a table of its own (a byte's two nibbles'
    /// top bits share a 4-bit window: one shift serves both), added; else nibbles and top
    /// bits joined as bytes, all lanes' bytes at once, and each byte converted.
    fn values6(table: Self, offset: Self, lo: Self::U32, hi: Self::U32, e: usize) -> [Self; 8];
    fn u8_splat(v: u8) -> Self::U8;
    fn u8_and(a: Self::U8, b: Self::U8) -> Self::U8;
    fn u8_or(a: Self::U8, b: Self::U8) -> Self::U8;
    /// Each byte shifted right by `n` (0..8), zeros shifted in.
    fn u8_shr(a: Self::U8, n: u32) -> Self::U8;
    /// Each byte shifted left by `n` (0..8), zeros shifted in.
    fn u8_shl(a: Self::U8, n: u32) -> Self::U8;
    /// Byte `i` is `0xff` where bit `i` of `bits` is set, else 0.
    fn u8_from_bits(bits: u16) -> Self::U8;
    /// The bytes as unsigned integers, converted exactly.
    fn u8_to_f32(a: Self::U8) -> Self;
    /// The bytes as signed integers, converted exactly.
    fn i8_to_f32(a: Self::U8) -> Self;
    /// Whether [`lookup16`](V16::lookup16) is one permute (AVX-512) rather than a slower
    /// emulation: block formats of 4-bit values then decode through a 16-entry table.
    const LOOKUP16: bool;
    /// `[0, 1, ..., 15]`.
    fn iota16() -> Self;
    /// Lane `i` = `table[idx[i] & 15]`, or `table[idx[i] >> 4]` with `high`. Used only where
    /// [`LOOKUP16`](V16::LOOKUP16) holds.
    fn lookup16(table: Self, idx: Self::U8, high: bool) -> Self;
    /// One IEEE half float (little-endian) as f32, exactly (F16C where the level has it).
    fn half(h: [u8; 2]) -> f32;
    /// 16 IEEE half floats (little-endian) at `p`, converted exactly.
    ///
    /// # Safety
    /// `p` must be valid for reading 32 bytes.
    unsafe fn load_f16(p: *const u8) -> Self;
    /// 16 bfloat16 values (little-endian) at `p`, converted exactly.
    ///
    /// # Safety
    /// `p` must be valid for reading 32 bytes.
    unsafe fn load_bf16(p: *const u8) -> Self;

    #[inline(always)]
    fn zero() -> Self {
        Self::splat(0.0)
    }

    /// Transposes a 16 × 16 tile in place: lane `j` of vector `i` becomes lane `i` of vector
    /// `j`. This default goes through memory; a level with the shuffles does it in registers.
    #[inline(always)]
    fn transpose16(rows: &mut [Self; 16]) {
        let mut tile = [0.0f32; 256];
        for (i, r) in rows.iter().enumerate() {
            // SAFETY: 16 values at row i of the tile.
            unsafe { r.store(tile.as_mut_ptr().add(16 * i)) };
        }
        let mut col = [0.0f32; 16];
        for (j, r) in rows.iter_mut().enumerate() {
            for (i, c) in col.iter_mut().enumerate() {
                *c = tile[16 * i + j];
            }
            // SAFETY: 16 values.
            *r = unsafe { Self::load(col.as_ptr()) };
        }
    }

    /// Lane `i` = the sum of `rows[i]`'s lanes, for all sixteen at once (sixteen dot
    /// products finished together). The order of each sum is fixed per level. This default
    /// takes sixteen [`reduce_add`](V16::reduce_add)s; the x86 levels add pairs of lanes in
    /// a tree of shuffles instead.
    #[inline(always)]
    fn reduce16(rows: [Self; 16]) -> Self {
        let mut sums = [0.0f32; 16];
        for (s, r) in sums.iter_mut().zip(rows) {
            *s = r.reduce_add();
        }
        // SAFETY: 16 values.
        unsafe { Self::load(sums.as_ptr()) }
    }

    /// `self + v` in the lanes whose bit of `bits` is set (bit `i`, lane `i`); `self`
    /// elsewhere. This default goes through [`u8_from_bits`](V16::u8_from_bits); AVX-512
    /// adds under a mask register.
    #[inline(always)]
    fn add_where(self, bits: u16, v: Self) -> Self {
        let ones = Self::u8_and(Self::u8_from_bits(bits), Self::u8_splat(1));
        self.add(Self::u8_to_f32(ones).mul(v))
    }

    /// The lanes of `u8` nibbles `a & 0x0f` as f32.
    #[inline(always)]
    fn low_nibbles(a: Self::U8) -> Self::U8 {
        Self::u8_and(a, Self::u8_splat(0x0f))
    }

    /// The lanes of `a >> 4` (high nibbles).
    #[inline(always)]
    fn high_nibbles(a: Self::U8) -> Self::U8 {
        Self::u8_shr(a, 4)
    }
}

/// Four IEEE halves (little-endian, `h` 8 bytes) as f32, exactly as
/// [`crate::quant::f16_to_f32`] converts them, four at a time: the magnitude's bits moved to
/// f32's place and scaled by 2¹¹² (exact for normal and subnormal halves), infinities and
/// NaNs (payload kept) given f32's all-ones exponent, then the sign: the portable level's
/// half loads ([`V16::load_f16`], and the fast kernel's record scales). One at a time, the
/// conversions of each record's scales took a tenth of that level's fast decoding. The scaling
/// assumes subnormals are not flushed (Rust never sets the FPU's DAZ mode; a host process
/// that does would zero subnormal scales here, and in every f32 kernel's inputs).
#[inline(always)]
pub(crate) fn halves4(h: &[u8]) -> f32x4 {
    let at = |t: usize| u32::from(u16::from_le_bytes([h[2 * t], h[2 * t + 1]]));
    let v = u32x4::new([at(0), at(1), at(2), at(3)]);
    let moved = (v & u32x4::splat(0x7fff)) << 13;
    let magnitude: f32x4 = bytemuck::cast(moved);
    // 2^112: a half's exponent bias (15) to f32's (127).
    let scaled: u32x4 = bytemuck::cast(magnitude * f32x4::splat(f32::from_bits(0x7780_0000)));
    let special = (v & u32x4::splat(0x7c00)).simd_eq(u32x4::splat(0x7c00));
    let bits = scaled ^ ((scaled ^ (moved | u32x4::splat(0x7f80_0000))) & special);
    bytemuck::cast(bits | ((v & u32x4::splat(0x8000)) << 16))
}

/// Two 8-lane vectors as one of 16: the f32 half of [`V16`] for AVX2 and the portable path.
#[derive(Clone, Copy)]
pub(crate) struct Pair<V>([V; 2]);

impl<V: F32Vec> Pair<V> {
    /// Lanes 0..8 and 8..16.
    #[inline(always)]
    pub(crate) fn halves(self) -> [V; 2] {
        self.0
    }

    #[inline(always)]
    unsafe fn load_pair(p: *const f32) -> Self {
        // SAFETY: 16 values, per the caller.
        unsafe { Pair([V::load(p), V::load(p.add(8))]) }
    }
    #[inline(always)]
    unsafe fn store_pair(self, p: *mut f32) {
        // SAFETY: as above.
        unsafe {
            self.0[0].store(p);
            self.0[1].store(p.add(8));
        }
    }
    #[inline(always)]
    fn map2(self, o: Self, f: impl Fn(V, V) -> V) -> Self {
        Pair([f(self.0[0], o.0[0]), f(self.0[1], o.0[1])])
    }
}

impl V16 for Pair<Portable> {
    type U8 = [u8; 16];
    type U32 = [u32; 16];

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: per the trait's contract.
        unsafe { Self::load_pair(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: per the trait's contract.
        unsafe { self.store_pair(p) }
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Pair([Portable::splat(v); 2])
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self.map2(o, Portable::add)
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self.map2(o, Portable::sub)
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self.map2(o, Portable::mul)
    }
    #[inline(always)]
    fn fma(self, b: Self, c: Self) -> Self {
        Pair([self.0[0].fma(b.0[0], c.0[0]), self.0[1].fma(b.0[1], c.0[1])])
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        self.0[0].add(self.0[1]).reduce_add()
    }
    #[inline(always)]
    unsafe fn load_u8(p: *const u8) -> [u8; 16] {
        // SAFETY: 16 readable bytes, per the trait's contract.
        unsafe { std::ptr::read_unaligned(p as *const [u8; 16]) }
    }
    #[inline(always)]
    unsafe fn load_u32(p: *const u8) -> [u32; 16] {
        // SAFETY: 64 readable bytes, per the trait's contract.
        let b = unsafe { std::ptr::read_unaligned(p as *const [u8; 64]) };
        std::array::from_fn(|i| {
            u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
        })
    }
    #[inline(always)]
    fn nibble_value(_: Self, offset: Self, v: [u32; 16], n: u32, fifth: Option<u16>) -> Self {
        debug_assert!(n < 8);
        let h = fifth.unwrap_or(0);
        let q: [f32; 16] =
            std::array::from_fn(|i| (v[i] >> (4 * n) & 15 | (h as u32 >> i & 1) << 4) as f32);
        // SAFETY: 16 values.
        unsafe { Self::load(q.as_ptr()) }.add(offset)
    }
    #[inline(always)]
    fn values6(_: Self, offset: Self, lo: [u32; 16], hi: [u32; 16], e: usize) -> [Self; 8] {
        std::array::from_fn(|n| {
            let m = k6_top(e, n);
            let q: [f32; 16] = std::array::from_fn(|i| {
                (lo[i] >> (4 * n) & 15 | (hi[i] >> (2 * m) & 3) << 4) as f32
            });
            // SAFETY: 16 values.
            unsafe { Self::load(q.as_ptr()) }.add(offset)
        })
    }
    #[inline(always)]
    fn u8_splat(v: u8) -> [u8; 16] {
        [v; 16]
    }
    #[inline(always)]
    fn u8_and(a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
        std::array::from_fn(|i| a[i] & b[i])
    }
    #[inline(always)]
    fn u8_or(a: [u8; 16], b: [u8; 16]) -> [u8; 16] {
        std::array::from_fn(|i| a[i] | b[i])
    }
    #[inline(always)]
    fn u8_shr(a: [u8; 16], n: u32) -> [u8; 16] {
        std::array::from_fn(|i| a[i] >> n)
    }
    #[inline(always)]
    fn u8_shl(a: [u8; 16], n: u32) -> [u8; 16] {
        std::array::from_fn(|i| a[i] << n)
    }
    #[inline(always)]
    fn u8_from_bits(bits: u16) -> [u8; 16] {
        std::array::from_fn(|i| if bits >> i & 1 == 1 { 0xff } else { 0 })
    }
    #[inline(always)]
    fn u8_to_f32(a: [u8; 16]) -> Self {
        let v: [f32; 16] = std::array::from_fn(|i| a[i] as f32);
        // SAFETY: 16 values.
        unsafe { Self::load(v.as_ptr()) }
    }
    #[inline(always)]
    fn i8_to_f32(a: [u8; 16]) -> Self {
        let v: [f32; 16] = std::array::from_fn(|i| a[i] as i8 as f32);
        // SAFETY: 16 values.
        unsafe { Self::load(v.as_ptr()) }
    }
    const LOOKUP16: bool = false;
    #[inline(always)]
    fn iota16() -> Self {
        let v: [f32; 16] = std::array::from_fn(|i| i as f32);
        // SAFETY: 16 values.
        unsafe { Self::load(v.as_ptr()) }
    }
    fn lookup16(table: Self, idx: [u8; 16], high: bool) -> Self {
        let mut t = [0.0f32; 16];
        // SAFETY: 16 values.
        unsafe { table.store(t.as_mut_ptr()) };
        let v: [f32; 16] =
            std::array::from_fn(|i| t[(if high { idx[i] >> 4 } else { idx[i] & 15 }) as usize]);
        // SAFETY: 16 values.
        unsafe { Self::load(v.as_ptr()) }
    }
    #[inline(always)]
    fn half(h: [u8; 2]) -> f32 {
        crate::quant::f16_to_f32(h)
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> Self {
        // SAFETY: 32 readable bytes, per the trait's contract.
        let h = unsafe { std::slice::from_raw_parts(p, 32) };
        let mut v = [0.0f32; 16];
        for (v, h) in v.chunks_exact_mut(4).zip(h.chunks_exact(8)) {
            v.copy_from_slice(&halves4(h).to_array());
        }
        // SAFETY: 16 values.
        unsafe { Self::load(v.as_ptr()) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> Self {
        let v: [f32; 16] = std::array::from_fn(|i| {
            // SAFETY: 32 readable bytes, per the trait's contract.
            crate::quant::bf16_to_f32(unsafe { [*p.add(2 * i), *p.add(2 * i + 1)] })
        });
        // SAFETY: 16 values.
        unsafe { Self::load(v.as_ptr()) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::vec::{Avx2, Avx512, F32Vec};
    use super::{Pair, V16, k6_top};

    /// Half to f32 in one instruction (F16C); exact, as `quant::f16_to_f32`.
    #[inline(always)]
    unsafe fn half_f16c(h: [u8; 2]) -> f32 {
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(
                _mm_cvtsi32_si128(u16::from_le_bytes(h) as i32),
            ))
        }
    }

    /// Each 32-bit lane `>> 4n` (`n` < 8): an immediate shift once `n` is known where the
    /// kernel is inlined (its loops over nibbles are unrolled), so one instruction.
    #[inline(always)]
    unsafe fn nibble_down(v: __m512i, n: u32) -> __m512i {
        debug_assert!(n < 8);
        unsafe {
            match n {
                0 => v,
                1 => _mm512_srli_epi32::<4>(v),
                2 => _mm512_srli_epi32::<8>(v),
                3 => _mm512_srli_epi32::<12>(v),
                4 => _mm512_srli_epi32::<16>(v),
                5 => _mm512_srli_epi32::<20>(v),
                6 => _mm512_srli_epi32::<24>(v),
                _ => _mm512_srli_epi32::<28>(v),
            }
        }
    }

    /// Bytes `>> n` within each byte: a 16-bit shift, then the bits that crossed in cleared.
    #[inline(always)]
    unsafe fn shr_bytes(a: __m128i, n: u32) -> __m128i {
        unsafe {
            let shifted = _mm_srl_epi16(a, _mm_cvtsi32_si128(n as i32));
            _mm_and_si128(shifted, _mm_set1_epi8((0xffu32 >> n) as u8 as i8))
        }
    }

    /// Bytes `<< n` within each byte.
    #[inline(always)]
    unsafe fn shl_bytes(a: __m128i, n: u32) -> __m128i {
        unsafe {
            let shifted = _mm_sll_epi16(a, _mm_cvtsi32_si128(n as i32));
            _mm_and_si128(shifted, _mm_set1_epi8((0xffu32 << n) as u8 as i8))
        }
    }

    /// Byte `i` = 0xff where bit `i` of `bits` is set: the low byte of `bits` spread over
    /// bytes 0..8 and the high byte over 8..16, each tested against its bit.
    #[inline(always)]
    unsafe fn bits_to_bytes(bits: u16) -> __m128i {
        unsafe {
            let v = _mm_cvtsi32_si128(bits as i32);
            let spread = _mm_shuffle_epi8(v, _mm_set_epi64x(0x0101_0101_0101_0101, 0));
            let masks = _mm_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            _mm_cmpeq_epi8(_mm_and_si128(spread, masks), masks)
        }
    }

    // SAFETY (every `unsafe` block below): these methods are only reached from functions
    // compiled with `avx512f` (and `avx2`, `fma`, `f16c`) enabled, after run-time detection.
    impl V16 for Avx512 {
        type U8 = __m128i;
        type U32 = __m512i;

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { <Avx512 as F32Vec>::load(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { <Avx512 as F32Vec>::store(self, p) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            <Avx512 as F32Vec>::splat(v)
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            <Avx512 as F32Vec>::add(self, o)
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            <Avx512 as F32Vec>::sub(self, o)
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            <Avx512 as F32Vec>::mul(self, o)
        }
        #[inline(always)]
        fn fma(self, b: Self, c: Self) -> Self {
            <Avx512 as F32Vec>::fma(self, b, c)
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            <Avx512 as F32Vec>::reduce_add(self)
        }
        #[inline(always)]
        unsafe fn load_u8(p: *const u8) -> __m128i {
            unsafe { _mm_loadu_si128(p as *const __m128i) }
        }
        #[inline(always)]
        unsafe fn load_u32(p: *const u8) -> __m512i {
            unsafe { _mm512_loadu_si512(p as *const _) }
        }
        #[inline(always)]
        fn u8_splat(v: u8) -> __m128i {
            unsafe { _mm_set1_epi8(v as i8) }
        }
        #[inline(always)]
        fn u8_and(a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_and_si128(a, b) }
        }
        #[inline(always)]
        fn u8_or(a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_or_si128(a, b) }
        }
        #[inline(always)]
        fn u8_shr(a: __m128i, n: u32) -> __m128i {
            unsafe { shr_bytes(a, n) }
        }
        #[inline(always)]
        fn u8_shl(a: __m128i, n: u32) -> __m128i {
            unsafe { shl_bytes(a, n) }
        }
        #[inline(always)]
        fn u8_from_bits(bits: u16) -> __m128i {
            unsafe { bits_to_bytes(bits) }
        }
        #[inline(always)]
        fn u8_to_f32(a: __m128i) -> Self {
            unsafe { Avx512::from_raw(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a))) }
        }
        #[inline(always)]
        fn i8_to_f32(a: __m128i) -> Self {
            unsafe { Avx512::from_raw(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a))) }
        }
        const LOOKUP16: bool = true;
        #[inline(always)]
        fn iota16() -> Self {
            unsafe {
                Avx512::from_raw(_mm512_set_ps(
                    15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0,
                    1.0, 0.0,
                ))
            }
        }
        #[inline(always)]
        fn add_where(self, bits: u16, v: Self) -> Self {
            unsafe { Avx512::from_raw(_mm512_mask_add_ps(self.raw(), bits, self.raw(), v.raw())) }
        }
        /// `vpermps` reads the low 4 bits of each index lane: one shift brings nibble `n`
        /// there, and the nibbles above it need no mask.
        #[inline(always)]
        fn nibble_value(table: Self, _: Self, v: __m512i, n: u32, fifth: Option<u16>) -> Self {
            let q =
                unsafe { Avx512::from_raw(_mm512_permutexvar_ps(nibble_down(v, n), table.raw())) };
            match fifth {
                Some(h) => q.add_where(h, <Self as V16>::splat(16.0)),
                None => q,
            }
        }
        /// `vpermps` reads the low 4 bits of each index lane: the bits above the nibble, or
        /// above the window of top bits, need no mask.
        #[inline(always)]
        fn values6(table: Self, _: Self, lo: __m512i, hi: __m512i, e: usize) -> [Self; 8] {
            /// Value `n` (a literal at each call: its shifts are immediates).
            #[inline(always)]
            fn value(table: Avx512, lo: __m512i, hi: __m512i, e: usize, n: usize) -> Avx512 {
                let m = k6_top(e, n);
                unsafe {
                    let q = _mm512_permutexvar_ps(nibble_down(lo, n as u32), table.raw());
                    // Window m / 2 holds field m in its low (m even) or high two bits.
                    let top = if m.is_multiple_of(2) {
                        _mm512_setr_ps(
                            0.0, 16.0, 32.0, 48.0, 0.0, 16.0, 32.0, 48.0, 0.0, 16.0, 32.0, 48.0,
                            0.0, 16.0, 32.0, 48.0,
                        )
                    } else {
                        _mm512_setr_ps(
                            0.0, 0.0, 0.0, 0.0, 16.0, 16.0, 16.0, 16.0, 32.0, 32.0, 32.0, 32.0,
                            48.0, 48.0, 48.0, 48.0,
                        )
                    };
                    let t = _mm512_permutexvar_ps(nibble_down(hi, (m / 2) as u32), top);
                    Avx512::from_raw(_mm512_add_ps(q, t))
                }
            }
            [
                value(table, lo, hi, e, 0),
                value(table, lo, hi, e, 1),
                value(table, lo, hi, e, 2),
                value(table, lo, hi, e, 3),
                value(table, lo, hi, e, 4),
                value(table, lo, hi, e, 5),
                value(table, lo, hi, e, 6),
                value(table, lo, hi, e, 7),
            ]
        }
        /// `vpermps` reads the low 4 bits of each index lane: the low nibble needs no mask.
        #[inline(always)]
        fn lookup16(table: Self, idx: __m128i, high: bool) -> Self {
            unsafe {
                let mut i = _mm512_cvtepu8_epi32(idx);
                if high {
                    i = _mm512_srli_epi32::<4>(i);
                }
                Avx512::from_raw(_mm512_permutexvar_ps(i, table.raw()))
            }
        }
        #[inline(always)]
        fn half(h: [u8; 2]) -> f32 {
            unsafe { half_f16c(h) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u8) -> Self {
            unsafe { Avx512::from_raw(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))) }
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u8) -> Self {
            unsafe {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
                Avx512::from_raw(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(h)))
            }
        }
        /// Four rounds, each halving the vectors: 32-bit interleaves of row pairs (lanes `e`
        /// and `e + 2` of each 128-bit block summed), 64-bit picks (the other pair), then two
        /// rounds of 128-bit block picks. 30 shuffles and 15 adds for 16 rows, where 16
        /// horizontal sums take 64 shuffles and 64 adds.
        #[inline(always)]
        fn reduce16(rows: [Self; 16]) -> Self {
            unsafe {
                // Per 128-bit block, rows a, b: [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
                let mut s = [_mm512_setzero_ps(); 8];
                for (i, s) in s.iter_mut().enumerate() {
                    let (a, b) = (rows[2 * i].raw(), rows[2 * i + 1].raw());
                    *s = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
                }
                // Per block, rows 4i .. 4i + 4: that block's four lanes summed, row by row.
                let mut u = [_mm512_setzero_ps(); 4];
                for (i, u) in u.iter_mut().enumerate() {
                    let (x, y) = (s[2 * i], s[2 * i + 1]);
                    *u = _mm512_add_ps(
                        _mm512_shuffle_ps::<0x44>(x, y),
                        _mm512_shuffle_ps::<0xee>(x, y),
                    );
                }
                // Blocks 0 + 1 and 2 + 3 of rows 8i .. 8i + 4, then of 8i + 4 .. 8i + 8.
                let mut w = [_mm512_setzero_ps(); 2];
                for (i, w) in w.iter_mut().enumerate() {
                    let (x, y) = (u[2 * i], u[2 * i + 1]);
                    *w = _mm512_add_ps(
                        _mm512_shuffle_f32x4::<0x88>(x, y),
                        _mm512_shuffle_f32x4::<0xdd>(x, y),
                    );
                }
                Avx512::from_raw(_mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(w[0], w[1]),
                    _mm512_shuffle_f32x4::<0xdd>(w[0], w[1]),
                ))
            }
        }

        /// In registers: 32-bit, 64-bit, then two rounds of 128-bit interleaves. Loops, not
        /// closures, so that everything compiles inside the caller's target features.
        #[inline(always)]
        fn transpose16(rows: &mut [Self; 16]) {
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for i in 0..16 {
                    r[i] = rows[i].raw();
                }
                let mut t = [_mm512_setzero_ps(); 16];
                for i in (0..16).step_by(2) {
                    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
                    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
                }
                let mut u = [_mm512_setzero_ps(); 16];
                for g in (0..16).step_by(4) {
                    u[g] = _mm512_shuffle_ps::<0x44>(t[g], t[g + 2]);
                    u[g + 1] = _mm512_shuffle_ps::<0xee>(t[g], t[g + 2]);
                    u[g + 2] = _mm512_shuffle_ps::<0x44>(t[g + 1], t[g + 3]);
                    u[g + 3] = _mm512_shuffle_ps::<0xee>(t[g + 1], t[g + 3]);
                }
                let mut v = [_mm512_setzero_ps(); 16];
                for g in (0..16).step_by(8) {
                    for j in 0..4 {
                        v[g + j] = _mm512_shuffle_f32x4::<0x88>(u[g + j], u[g + j + 4]);
                        v[g + j + 4] = _mm512_shuffle_f32x4::<0xdd>(u[g + j], u[g + j + 4]);
                    }
                }
                for j in 0..8 {
                    rows[j] = Avx512::from_raw(_mm512_shuffle_f32x4::<0x88>(v[j], v[j + 8]));
                    rows[j + 8] = Avx512::from_raw(_mm512_shuffle_f32x4::<0xdd>(v[j], v[j + 8]));
                }
            }
        }
    }

    // SAFETY (every `unsafe` block below): only reached from functions compiled with `avx2`,
    // `fma` and `f16c` enabled, after run-time detection.
    impl V16 for Pair<Avx2> {
        type U8 = __m128i;
        type U32 = [__m256i; 2];

        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Self::load_pair(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { self.store_pair(p) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            Pair([Avx2::splat(v); 2])
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            self.map2(o, Avx2::add)
        }
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            self.map2(o, Avx2::sub)
        }
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            self.map2(o, Avx2::mul)
        }
        #[inline(always)]
        fn fma(self, b: Self, c: Self) -> Self {
            Pair([self.0[0].fma(b.0[0], c.0[0]), self.0[1].fma(b.0[1], c.0[1])])
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            self.0[0].add(self.0[1]).reduce_add()
        }
        #[inline(always)]
        unsafe fn load_u8(p: *const u8) -> __m128i {
            unsafe { _mm_loadu_si128(p as *const __m128i) }
        }
        #[inline(always)]
        unsafe fn load_u32(p: *const u8) -> [__m256i; 2] {
            unsafe {
                [
                    _mm256_loadu_si256(p as *const __m256i),
                    _mm256_loadu_si256(p.add(32) as *const __m256i),
                ]
            }
        }
        #[inline(always)]
        fn nibble_value(
            _: Self,
            offset: Self,
            v: [__m256i; 2],
            n: u32,
            fifth: Option<u16>,
        ) -> Self {
            unsafe {
                let count = _mm_cvtsi32_si128(4 * n as i32);
                let fifteen = _mm256_set1_epi32(15);
                let mut lo = _mm256_and_si256(_mm256_srl_epi32(v[0], count), fifteen);
                let mut hi = _mm256_and_si256(_mm256_srl_epi32(v[1], count), fifteen);
                if let Some(h) = fifth {
                    // Lane i's bit of h, as 16: each half's lanes test their own bits.
                    let b = _mm256_set1_epi32(h as i32);
                    let bits_lo = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
                    let bits_hi = _mm256_slli_epi32::<8>(bits_lo);
                    let sixteen = _mm256_set1_epi32(16);
                    // Not a closure: it would not inherit the level's target features.
                    let on_lo = _mm256_cmpeq_epi32(_mm256_and_si256(b, bits_lo), bits_lo);
                    let on_hi = _mm256_cmpeq_epi32(_mm256_and_si256(b, bits_hi), bits_hi);
                    lo = _mm256_or_si256(lo, _mm256_and_si256(on_lo, sixteen));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(on_hi, sixteen));
                }
                let q = Pair([
                    Avx2::from_raw(_mm256_cvtepi32_ps(lo)),
                    Avx2::from_raw(_mm256_cvtepi32_ps(hi)),
                ]);
                q.add(offset)
            }
        }
        /// The low nibbles (`odd` false) or high nibbles of every byte of `lo`, each with
        /// its top bits from `hi` ([`k6_top`]: at one distance from the byte for every byte),
        /// as bytes; then byte `t` of each lane converted. A literal `t` and `e` at each call
        /// make every shift an immediate.
        #[inline(always)]
        fn values6(
            _: Self,
            offset: Self,
            lo: [__m256i; 2],
            hi: [__m256i; 2],
            e: usize,
        ) -> [Self; 8] {
            #[inline(always)]
            fn joined(lo: __m256i, hi: __m256i, e: usize, odd: bool) -> __m256i {
                debug_assert_eq!(k6_top(e, odd as usize) * 2, 4 * (1 - e) + 2 * odd as usize);
                unsafe {
                    let l = if odd { _mm256_srli_epi32::<4>(lo) } else { lo };
                    // Bits 4(1 - e) + 2 odd .. of each byte's window to bits 4, 5.
                    let h = match (e, odd) {
                        (0, false) => hi,
                        (0, true) => _mm256_srli_epi32::<2>(hi),
                        (_, false) => _mm256_slli_epi32::<4>(hi),
                        (_, true) => _mm256_slli_epi32::<2>(hi),
                    };
                    let (low, top) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
                    _mm256_or_si256(_mm256_and_si256(l, low), _mm256_and_si256(h, top))
                }
            }
            #[inline(always)]
            fn byte(j: [__m256i; 2], t: usize, offset: Pair<Avx2>) -> Pair<Avx2> {
                unsafe {
                    let six = _mm256_set1_epi32(0x3f);
                    // Not a closure or a loop: t must stay a literal.
                    let [a, b] = match t {
                        0 => [_mm256_and_si256(j[0], six), _mm256_and_si256(j[1], six)],
                        1 => [
                            _mm256_and_si256(_mm256_srli_epi32::<8>(j[0]), six),
                            _mm256_and_si256(_mm256_srli_epi32::<8>(j[1]), six),
                        ],
                        2 => [
                            _mm256_and_si256(_mm256_srli_epi32::<16>(j[0]), six),
                            _mm256_and_si256(_mm256_srli_epi32::<16>(j[1]), six),
                        ],
                        _ => [_mm256_srli_epi32::<24>(j[0]), _mm256_srli_epi32::<24>(j[1])],
                    };
                    Pair([
                        Avx2::from_raw(_mm256_cvtepi32_ps(a)),
                        Avx2::from_raw(_mm256_cvtepi32_ps(b)),
                    ])
                    .add(offset)
                }
            }
            let even = [
                joined(lo[0], hi[0], e, false),
                joined(lo[1], hi[1], e, false),
            ];
            let odd = [joined(lo[0], hi[0], e, true), joined(lo[1], hi[1], e, true)];
            [
                byte(even, 0, offset),
                byte(odd, 0, offset),
                byte(even, 1, offset),
                byte(odd, 1, offset),
                byte(even, 2, offset),
                byte(odd, 2, offset),
                byte(even, 3, offset),
                byte(odd, 3, offset),
            ]
        }
        #[inline(always)]
        fn u8_splat(v: u8) -> __m128i {
            unsafe { _mm_set1_epi8(v as i8) }
        }
        #[inline(always)]
        fn u8_and(a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_and_si128(a, b) }
        }
        #[inline(always)]
        fn u8_or(a: __m128i, b: __m128i) -> __m128i {
            unsafe { _mm_or_si128(a, b) }
        }
        #[inline(always)]
        fn u8_shr(a: __m128i, n: u32) -> __m128i {
            unsafe { shr_bytes(a, n) }
        }
        #[inline(always)]
        fn u8_shl(a: __m128i, n: u32) -> __m128i {
            unsafe { shl_bytes(a, n) }
        }
        #[inline(always)]
        fn u8_from_bits(bits: u16) -> __m128i {
            unsafe { bits_to_bytes(bits) }
        }
        #[inline(always)]
        fn u8_to_f32(a: __m128i) -> Self {
            unsafe {
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(a)));
                Pair([Avx2::from_raw(lo), Avx2::from_raw(hi)])
            }
        }
        #[inline(always)]
        fn i8_to_f32(a: __m128i) -> Self {
            unsafe {
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(a)));
                Pair([Avx2::from_raw(lo), Avx2::from_raw(hi)])
            }
        }
        const LOOKUP16: bool = false;
        #[inline(always)]
        fn iota16() -> Self {
            unsafe {
                Pair([
                    Avx2::from_raw(_mm256_set_ps(7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0)),
                    Avx2::from_raw(_mm256_set_ps(15.0, 14.0, 13.0, 12.0, 11.0, 10.0, 9.0, 8.0)),
                ])
            }
        }
        fn lookup16(table: Self, idx: __m128i, high: bool) -> Self {
            let mut t = [0.0f32; 16];
            let mut b = [0u8; 16];
            unsafe {
                table.store(t.as_mut_ptr());
                _mm_storeu_si128(b.as_mut_ptr() as *mut __m128i, idx);
            }
            let v: [f32; 16] =
                std::array::from_fn(|i| t[(if high { b[i] >> 4 } else { b[i] & 15 }) as usize]);
            unsafe { Self::load(v.as_ptr()) }
        }
        #[inline(always)]
        fn half(h: [u8; 2]) -> f32 {
            unsafe { half_f16c(h) }
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u8) -> Self {
            unsafe {
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
                Pair([Avx2::from_raw(lo), Avx2::from_raw(hi)])
            }
        }
        #[inline(always)]
        unsafe fn load_bf16(p: *const u8) -> Self {
            unsafe {
                let widen = |q: *const u8| {
                    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(q as *const __m128i));
                    Avx2::from_raw(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)))
                };
                Pair([widen(p), widen(p.add(16))])
            }
        }
        /// Each row's halves added, then AVX-512's tree on eight lanes: 32-bit interleaves,
        /// 64-bit picks, and one round of 128-bit block picks per half of the result.
        #[inline(always)]
        fn reduce16(rows: [Self; 16]) -> Self {
            unsafe {
                let mut r = [_mm256_setzero_ps(); 16];
                for (r, row) in r.iter_mut().zip(rows) {
                    let [lo, hi] = row.halves();
                    *r = _mm256_add_ps(lo.raw(), hi.raw());
                }
                let mut s = [_mm256_setzero_ps(); 8];
                for (i, s) in s.iter_mut().enumerate() {
                    let (a, b) = (r[2 * i], r[2 * i + 1]);
                    *s = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
                }
                let mut u = [_mm256_setzero_ps(); 4];
                for (i, u) in u.iter_mut().enumerate() {
                    let (x, y) = (s[2 * i], s[2 * i + 1]);
                    *u = _mm256_add_ps(
                        _mm256_shuffle_ps::<0x44>(x, y),
                        _mm256_shuffle_ps::<0xee>(x, y),
                    );
                }
                // Not a closure: it would not inherit the level's target features.
                let mut halves = [_mm256_setzero_ps(); 2];
                for (i, h) in halves.iter_mut().enumerate() {
                    let (x, y) = (u[2 * i], u[2 * i + 1]);
                    *h = _mm256_add_ps(
                        _mm256_permute2f128_ps::<0x20>(x, y),
                        _mm256_permute2f128_ps::<0x31>(x, y),
                    );
                }
                Pair([Avx2::from_raw(halves[0]), Avx2::from_raw(halves[1])])
            }
        }
    }
}

/// A kernel written once against [`V16`], run at one level by [`dispatch16`].
pub(crate) trait Kernel16 {
    type Output;
    /// The kernel's body. Implementations mark it `#[inline(always)]`, so that it compiles
    /// inside the level's `#[target_feature]` wrapper.
    fn run<V: V16>(self) -> Self::Output;
}

/// Runs `k` with the [`V16`] of `isa`'s level, inside a wrapper compiled for that level.
#[inline]
pub(crate) fn dispatch16<K: Kernel16>(isa: super::Isa, k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn avx512<K: Kernel16>(k: K) -> K::Output {
        k.run::<super::vec::Avx512>()
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn avx2<K: Kernel16>(k: K) -> K::Output {
        k.run::<Pair<super::vec::Avx2>>()
    }
    match isa.level() {
        // SAFETY: an `Isa` holding this level exists only if the CPU runs it.
        #[cfg(target_arch = "x86_64")]
        super::Level::Amx | super::Level::Avx512 => unsafe { avx512(k) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        super::Level::Avx2 => unsafe { avx2(k) },
        _ => k.run::<Pair<Portable>>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Isa;

    /// The portable level's four-at-a-time half conversion gives `f16_to_f32`'s bits for
    /// every half: zeros, subnormals, normals, infinities and NaNs of both signs.
    #[test]
    fn halves4_converts_every_half_as_f16_to_f32_does() {
        for first in (0..1u32 << 16).step_by(4) {
            let hs: Vec<u8> = (first..first + 4)
                .flat_map(|h| (h as u16).to_le_bytes())
                .collect();
            let got = halves4(&hs).to_array();
            for (t, g) in got.iter().enumerate() {
                let want = crate::quant::f16_to_f32([hs[2 * t], hs[2 * t + 1]]);
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "half {:#06x}",
                    first + t as u32
                );
            }
        }
    }

    struct Transpose;
    impl Kernel16 for Transpose {
        type Output = [[f32; 16]; 16];
        #[inline(always)]
        fn run<V: V16>(self) -> [[f32; 16]; 16] {
            let m: [[f32; 16]; 16] =
                std::array::from_fn(|i| std::array::from_fn(|j| (16 * i + j) as f32));
            // SAFETY: 16 values each.
            let mut rows: [V; 16] = std::array::from_fn(|i| unsafe { V::load(m[i].as_ptr()) });
            V::transpose16(&mut rows);
            let mut out = [[0.0f32; 16]; 16];
            for (r, o) in rows.iter().zip(out.iter_mut()) {
                // SAFETY: 16 values.
                unsafe { r.store(o.as_mut_ptr()) };
            }
            out
        }
    }

    struct Reduce;
    impl Kernel16 for Reduce {
        type Output = [f32; 16];
        #[inline(always)]
        fn run<V: V16>(self) -> [f32; 16] {
            // Row i: lanes 1000 i + 3^j mod 97 (integers: every order sums them exactly).
            let m: [[f32; 16]; 16] = std::array::from_fn(|i| {
                std::array::from_fn(|j| (1000 * i + 3usize.pow(j as u32) % 97) as f32)
            });
            // SAFETY: 16 values each.
            let rows: [V; 16] = std::array::from_fn(|i| unsafe { V::load(m[i].as_ptr()) });
            let mut out = [0.0f32; 16];
            // SAFETY: 16 values.
            unsafe { V::reduce16(rows).store(out.as_mut_ptr()) };
            out
        }
    }

    #[test]
    fn reduce16_sums_each_row_into_its_lane_at_every_level() {
        let lanes: usize = (0..16).map(|j| 3usize.pow(j) % 97).sum();
        for isa in Isa::available() {
            let r = dispatch16(isa, Reduce);
            for (i, got) in r.iter().enumerate() {
                assert_eq!(
                    *got,
                    (16_000 * i + lanes) as f32,
                    "{:?} lane {i}",
                    isa.level()
                );
            }
        }
    }

    #[test]
    fn transpose16_transposes_at_every_level() {
        for isa in Isa::available() {
            let t = dispatch16(isa, Transpose);
            for i in 0..16 {
                for j in 0..16 {
                    assert_eq!(t[j][i], (16 * i + j) as f32, "{:?} [{j}][{i}]", isa.level());
                }
            }
        }
    }

    struct AddWhere(u16);
    impl Kernel16 for AddWhere {
        type Output = [f32; 16];
        #[inline(always)]
        fn run<V: V16>(self) -> [f32; 16] {
            let mut out = [0.0f32; 16];
            // SAFETY: 16 values.
            unsafe {
                V::iota16()
                    .add_where(self.0, V::splat(16.0))
                    .store(out.as_mut_ptr())
            };
            out
        }
    }

    #[test]
    fn add_where_adds_in_the_lanes_of_the_set_bits_at_every_level() {
        for isa in Isa::available() {
            for bits in [0u16, 1, 0x8000, 0xa5c3, 0xffff] {
                let got = dispatch16(isa, AddWhere(bits));
                for (i, g) in got.iter().enumerate() {
                    let want = i as f32 + if bits >> i & 1 == 1 { 16.0 } else { 0.0 };
                    assert_eq!(*g, want, "{:?} bits {bits:#x} lane {i}", isa.level());
                }
            }
        }
    }
}
