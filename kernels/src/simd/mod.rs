//! Explicit vector kernels, one generic body per op stamped out per instruction set.
//!
//! How a path is chosen: [`Isa::best`] asks the CPU once, at run time
//! (`is_x86_feature_detected!`), and takes the widest level it runs: [`Level::Amx`]
//! (AVX-512 with AMX int8 tiles for fast mode's prefill), then [`Level::Avx512`]
//! (zmm, `avx512f`), then [`Level::Avx2`] (ymm with FMA), else [`Level::Portable`] (`wide`,
//! whose width is fixed when the crate is compiled). Any level the CPU runs can be forced
//! with [`Isa::new`]; a level it does not run cannot be constructed, so the unsafe
//! `#[target_feature]` wrappers behind these functions are only ever entered on a CPU
//! that has the features.

#[cfg(target_arch = "x86_64")]
mod amx;
mod attention;
mod dequant;
mod elementwise;
mod gemm;
pub mod probe;
mod qgroup;
mod qint;
mod qmatmul;
mod repack;
pub(crate) mod v16;
mod vec;

pub use attention::{AttentionScratch, AttentionShape, attention};
pub use dequant::dequantize;
pub use elementwise::{
    ROPE_MAX_HEAD_DIM, RopeRun, RopeTable, add, geglu, rmsnorm, rope, rope_rows, softmax, swiglu,
};
pub use gemm::{GemmScratch, PackedWeight, matmul, pack_weight};
pub use qgroup::matmuls as matmuls_grouped;
pub use qint::{
    IntScratch, int_kernel_name, int8_probe, int8_probe_ops_per_iter, matmuls as matmuls_int,
};
pub use qmatmul::{
    BlockScratch, BlockWeight, GEMV_ROWS, matmul as matmul_blocks, matmuls as matmuls_blocks,
};
pub use repack::{GROUP, Layout, RepackedWeight, prefetching, repackable};

/// A SIMD instruction-set level, widest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// [`Level::Avx512`], with AMX int8 tiles (`amx-tile`, `amx-int8`) for fast mode's
    /// prefill (`simd::amx`). Everything else runs as at `Avx512`.
    Amx,
    /// 512-bit vectors (`avx512f`, with AVX2, FMA and F16C).
    Avx512,
    /// 256-bit vectors with fused multiply-add and half-float conversion (`avx2`, `fma`, `f16c`).
    Avx2,
    /// `wide::f32x8`: SSE2 on the baseline x86-64 target, NEON on aarch64.
    Portable,
}

impl Level {
    /// Every level, widest first.
    pub const ALL: [Level; 4] = [Level::Amx, Level::Avx512, Level::Avx2, Level::Portable];

    /// Short lower-case name, as the CLI and benchmark tables print it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Amx => "amx",
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2",
            Level::Portable => "portable",
        }
    }

    /// Whether this CPU runs the level.
    pub fn is_supported(self) -> bool {
        match self {
            // The tile kernels sit on the VNNI ones (decode, rows past the last full tile).
            #[cfg(target_arch = "x86_64")]
            Level::Amx => {
                Level::Avx512.is_supported()
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512bw")
                    && amx::granted()
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Level::Amx | Level::Avx512 | Level::Avx2 => false,
            Level::Portable => true,
        }
    }
}

/// A [`Level`] that this CPU has been checked to run: the token every SIMD kernel takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Isa(Level);

impl Isa {
    /// The widest level this CPU runs.
    pub fn best() -> Isa {
        Level::ALL
            .into_iter()
            .find(|l| l.is_supported())
            .map(Isa)
            .unwrap_or(Isa(Level::Portable))
    }

    /// `level`, if this CPU runs it.
    pub fn new(level: Level) -> Option<Isa> {
        level.is_supported().then_some(Isa(level))
    }

    /// Every level this CPU runs, widest first.
    pub fn available() -> Vec<Isa> {
        Level::ALL.into_iter().filter_map(Isa::new).collect()
    }

    /// The level.
    pub fn level(self) -> Level {
        self.0
    }
}

/// An output pointer shared by the tasks of one team job, each writing (or, after a job that
/// wrote, reading) elements no other task of the job touches. Only the pointer crosses
/// threads: every dereference is an `unsafe` block whose SAFETY comment says why its
/// elements are that task's alone.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: a raw pointer carries no access by itself; see the type's docs.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    /// The pointer (a method, so that closures capture the whole `Out`, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Writes `pub fn $name(isa: Isa, args...)` that runs `$body::<V>(args...)` with the
/// vector type of `isa`, inside a wrapper compiled for that instruction set.
macro_rules! stamp {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) = $body:ident;) => {
        $crate::simd::stamp! {
            $(#[$meta])* pub fn $name($($arg: $ty),*) -> () = $body;
        }
    };
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty = $body:ident;) => {
        $(#[$meta])*
        pub fn $name(isa: $crate::simd::Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) -> $ret {
                $body::<$crate::simd::vec::Avx512>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret {
                $body::<$crate::simd::vec::Avx2>($($arg),*)
            }
            match isa.level() {
                // SAFETY: an `Isa` holding this level exists only if the CPU runs it.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Level::Amx | $crate::simd::Level::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::simd::Level::Avx2 => unsafe { avx2($($arg),*) },
                _ => $body::<$crate::simd::vec::Portable>($($arg),*),
            }
        }
    };
}
pub(crate) use stamp;

/// The kernels' shared check of a quantized matmul against its dequantized weight.
#[cfg(test)]
pub(crate) mod testing {
    use super::Isa;
    use crate::team::Team;

    /// Checks that `run(isa, team, threads, x, y, m)`, which writes `y (m, n) = x · Wᵀ`,
    /// multiplies as the dequantized weight `wf (n, k)`: within `k` ulp of the sum of the
    /// products' magnitudes of the f64 product, for decode and prefill row counts (prefills
    /// of 100 and 151 rows split by rows, `qmatmul::ROW_SPLIT`, on some team sizes and by
    /// panels on others), on every level, and with the same bits for teams of 1, 2 and 3
    /// threads.
    pub(crate) fn multiplies_as_dequantized(
        label: &str,
        wf: &[f32],
        n: usize,
        k: usize,
        run: impl Fn(Isa, &Team, usize, &[f32], &mut [f32], usize),
    ) {
        for m in [1, 2, 3, 4, 7, 13, 100, 151] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919 % 1009) as f32 / 504.5) - 1.0)
                .collect();
            let mut want = vec![0.0f64; m * n];
            let mut bound = vec![0.0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    for p in 0..k {
                        let t = x[i * k + p] as f64 * wf[j * k + p] as f64;
                        want[i * n + j] += t;
                        bound[i * n + j] += t.abs();
                    }
                }
            }
            for isa in Isa::available() {
                let mut first: Option<Vec<f32>> = None;
                for threads in [1, 2, 3] {
                    let team = Team::new(threads).unwrap();
                    let mut y = vec![f32::NAN; m * n];
                    run(isa, &team, threads, &x, &mut y, m);
                    for (e, ((g, w), b)) in y.iter().zip(&want).zip(&bound).enumerate() {
                        // f32 sums of k terms: k ulp of the sum of magnitudes, generously.
                        let tol = (k as f64) * f32::EPSILON as f64 * b + 1e-30;
                        assert!(
                            (*g as f64 - w).abs() <= tol,
                            "{label} m {m} {:?} t{threads} y[{e}] = {g}, want {w}",
                            isa.level()
                        );
                    }
                    match &first {
                        None => first = Some(y),
                        Some(f) => assert!(
                            f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{label} m {m} {:?}: thread counts differ",
                            isa.level()
                        ),
                    }
                }
            }
        }
    }
}
