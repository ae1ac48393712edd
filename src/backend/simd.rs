//! The SIMD backend: chord-kernels' vector kernels at one instruction-set level.

use std::sync::Mutex;

use chord_kernels::quant::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
use chord_kernels::simd::{self, GemmScratch, Isa, Level, PackedWeight, qdot};
use rayon::prelude::*;

use super::{Backend, DType, Error, Op, RopeParams, SoftmaxParams, Support, WeightView, check};

/// How the SIMD backend computes on quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Dequantize once when prepared, compute in f32: the same numbers as an F32 model.
    Exact,
    /// Keep `Q4_0`, `Q4_1` and `Q8_0` weights as blocks; quantize each activation row to
    /// 8-bit blocks (`Q8_1` against `Q4_1`, `Q8_0` against the others) and take integer dot
    /// products, as ggml does. Other formats are dequantized, as in exact mode.
    Fast,
}

impl Mode {
    /// `exact` or `fast`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Exact => "exact",
            Mode::Fast => "fast",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "exact" => Ok(Mode::Exact),
            "fast" => Ok(Mode::Fast),
            _ => Err(format!("unknown mode '{s}': expected exact or fast")),
        }
    }
}

/// A weight prepared by [`SimdBackend`].
pub enum SimdWeight<'w> {
    /// f32 in the GEMM microkernel's panel layout.
    Packed(PackedWeight),
    /// Quantized blocks as the file stores them (fast mode): `rows` rows of `cols / 32` blocks.
    Blocks(QuantBlocks<'w>),
}

/// A quantized weight kept as the file stores it: `rows` rows of `cols / 32` blocks.
pub struct QuantBlocks<'w> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'w [u8],
}

/// Runs every op with explicit vector kernels at one [`Level`] (the widest this CPU runs,
/// unless forced). In [`Mode::Exact`] (the default) weights are dequantized and repacked
/// once, at [`prepare`](Backend::prepare), into the panel layout of the level's GEMM
/// microkernel; in [`Mode::Fast`] 4- and 8-bit weights stay in their blocks. Matmul is split
/// over the backend's own pool of `threads` threads (in exact mode bitwise identical for any
/// thread count); the per-row ops run on the calling thread.
#[derive(Debug)]
pub struct SimdBackend {
    isa: Isa,
    mode: Mode,
    pool: rayon::ThreadPool,
    scratch: GemmScratch,
    /// Quantized activation rows of fast mode, grown to the largest call.
    activations: Mutex<Vec<u8>>,
}

impl SimdBackend {
    /// The widest level this CPU runs, on `threads` threads, in exact mode.
    pub fn new(threads: usize) -> Result<Self, Error> {
        Self::build(Isa::best(), threads)
    }

    /// A forced level; an error if this CPU does not run it.
    pub fn with_level(level: Level, threads: usize) -> Result<Self, Error> {
        let isa = Isa::new(level).ok_or_else(|| {
            Error::Unavailable(format!(
                "this CPU does not run the {} kernels",
                level.name()
            ))
        })?;
        Self::build(isa, threads)
    }

    /// The same backend computing in `mode`.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    fn build(isa: Isa, threads: usize) -> Result<Self, Error> {
        Ok(SimdBackend {
            isa,
            mode: Mode::Exact,
            pool: super::thread_pool(threads)?,
            scratch: GemmScratch::new(threads),
            activations: Mutex::new(Vec::new()),
        })
    }

    /// The instruction-set level the kernels run at.
    pub fn level(&self) -> Level {
        self.isa.level()
    }

    /// How quantized weights are computed on.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn keeps_blocks(&self, dtype: DType) -> bool {
        self.mode == Mode::Fast && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
    }

    /// `y (m, n) = x (m, k) · Wᵀ` on blocks: quantize the rows of `x`, then integer dots.
    fn matmul_blocks(&self, x: &[f32], w: &QuantBlocks<'_>, y: &mut [f32], m: usize) {
        let QuantBlocks {
            dtype,
            rows: n,
            cols: k,
            bytes,
        } = *w;
        let blocks = k / 32;
        let act_block = if dtype == DType::Q4_1 {
            size_of::<BlockQ8_1>()
        } else {
            size_of::<BlockQ8_0>()
        };
        let (x_row_bytes, w_row_bytes) = (blocks * act_block, blocks * dtype.block_bytes());
        let mut act = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        if act.len() < m * x_row_bytes {
            act.resize(m * x_row_bytes, 0);
        }
        let act = &mut act[..m * x_row_bytes];
        for (xr, qr) in x.chunks_exact(k).zip(act.chunks_exact_mut(x_row_bytes)) {
            match dtype {
                DType::Q4_1 => quant::quantize_q8_1(xr, bytemuck::cast_slice_mut(qr)),
                _ => quant::quantize_q8_0(xr, bytemuck::cast_slice_mut(qr)),
            }
        }
        let isa = self.isa;
        let dot = |xq: &[u8], j: usize| -> f32 {
            let w = &bytes[j * w_row_bytes..][..w_row_bytes];
            match dtype {
                DType::Q4_1 => qdot::dot_q4_1_q8_1(
                    isa,
                    bytemuck::cast_slice::<u8, BlockQ4_1>(w),
                    bytemuck::cast_slice(xq),
                ),
                DType::Q4_0 => qdot::dot_q4_0_q8_0(
                    isa,
                    bytemuck::cast_slice::<u8, BlockQ4_0>(w),
                    bytemuck::cast_slice(xq),
                ),
                _ => qdot::dot_q8_0_q8_0(
                    isa,
                    bytemuck::cast_slice::<u8, BlockQ8_0>(w),
                    bytemuck::cast_slice(xq),
                ),
            }
        };
        let act: &[u8] = act;
        let threads = self.pool.current_num_threads();
        if m == 1 {
            // Decode: the weight rows split over the threads.
            let chunk = n.div_ceil(threads * 4).max(16);
            self.pool.install(|| {
                y.par_chunks_mut(chunk).enumerate().for_each(|(c, ys)| {
                    for (jj, out) in ys.iter_mut().enumerate() {
                        *out = dot(act, c * chunk + jj);
                    }
                })
            });
        } else {
            // Prefill: the activation rows split over the threads; each reads the whole
            // weight, which for one layer's matrix stays in cache.
            self.pool.install(|| {
                y.par_chunks_mut(n)
                    .zip(act.par_chunks(x_row_bytes))
                    .for_each(|(yr, xq)| {
                        for (j, out) in yr.iter_mut().enumerate() {
                            *out = dot(xq, j);
                        }
                    })
            });
        }
    }
}

impl Backend for SimdBackend {
    type Weight<'w> = SimdWeight<'w>;

    fn name(&self) -> String {
        format!("simd-{}", self.isa.level().name())
    }

    fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn supports(&self, _op: Op, dtype: DType) -> Support {
        match dtype {
            DType::F32 => Support::Native,
            d if self.keeps_blocks(d) => Support::Native,
            _ => Support::Dequantized,
        }
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<SimdWeight<'w>, Error> {
        let (rows, cols) = w.dims();
        if self.keeps_blocks(w.dtype()) {
            return Ok(SimdWeight::Blocks(QuantBlocks {
                dtype: w.dtype(),
                rows,
                cols,
                bytes: w.bytes(),
            }));
        }
        Ok(SimdWeight::Packed(simd::pack_weight(
            self.isa,
            &w.to_f32(),
            rows,
            cols,
        )))
    }

    fn weight_dims(&self, w: &SimdWeight<'_>) -> (usize, usize) {
        match w {
            SimdWeight::Packed(p) => (p.rows(), p.cols()),
            SimdWeight::Blocks(b) => (b.rows, b.cols),
        }
    }

    fn matmul(&self, x: &[f32], w: &SimdWeight<'_>, y: &mut [f32], m: usize) -> Result<(), Error> {
        check::matmul(x.len(), self.weight_dims(w), y.len(), m)?;
        match w {
            SimdWeight::Packed(p) => {
                if p.isa() != self.isa {
                    return Err(Error::Param {
                        op: "matmul",
                        detail: format!(
                            "weight packed for {}, backend runs {}",
                            p.isa().level().name(),
                            self.isa.level().name()
                        ),
                    });
                }
                simd::matmul(&self.pool, &self.scratch, x, p, y, m);
            }
            SimdWeight::Blocks(b) => self.matmul_blocks(x, b, y, m),
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        check::rmsnorm(x.len(), weight.len(), y.len(), eps)?;
        simd::rmsnorm(self.isa, x, weight, y, weight.len(), eps);
        Ok(())
    }

    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        check::rope(x.len(), rows, pos, p)?;
        simd::rope(self.isa, x, rows, pos, p);
        Ok(())
    }

    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        check::softmax(x.len(), cols, p)?;
        simd::softmax(self.isa, x, cols, p);
        Ok(())
    }

    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check::swiglu(a.len(), b.len(), y.len())?;
        simd::swiglu(self.isa, a, b, y);
        Ok(())
    }

    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        check::add(y.len(), x.len())?;
        simd::add(self.isa, y, x);
        Ok(())
    }

    fn embedding(&self, table: &SimdWeight<'_>, token: usize, y: &mut [f32]) -> Result<(), Error> {
        check::embedding(self.weight_dims(table), token, y.len())?;
        match table {
            SimdWeight::Packed(p) => p.copy_row(token, y),
            SimdWeight::Blocks(QuantBlocks {
                dtype, cols, bytes, ..
            }) => {
                let row = dtype.bytes_for(*cols).expect("checked when prepared");
                quant::dequantize(*dtype, &bytes[token * row..][..row], y);
            }
        }
        Ok(())
    }
}
