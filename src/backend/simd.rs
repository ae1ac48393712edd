//! The SIMD backend: chord-kernels' vector kernels at one instruction-set level.

use std::sync::Mutex;

use chord_kernels::quant::{self, BlockQ4_0, BlockQ4_1, BlockQ8_0, BlockQ8_1};
use chord_kernels::simd::{
    self, BlockScratch, BlockWeight, GemmScratch, Isa, Level, PackedWeight, qdot,
};
use chord_kernels::team::Team;

use super::{Backend, DType, Error, Op, RopeParams, SoftmaxParams, Support, WeightView, check};

/// How the SIMD backend computes on quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// f32 arithmetic on the weights' exact values: each block decoded in registers (or into
    /// a cache-resident panel when prefilling), never the whole weight at once. The same
    /// numbers as an F32 model, up to the order of sums.
    Exact,
    /// `Q4_0`, `Q4_1` and `Q8_0` weights multiply 8-bit quantized activations (`Q8_1`
    /// against `Q4_1`, `Q8_0` against the others) in integer dot products, as ggml does.
    /// Other formats compute as in exact mode.
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
    /// Rows of blocks as the file stores them, borrowed: every format, both modes.
    Blocks(BlockWeight<'w>),
    /// f32 in the GEMM microkernel's panel layout: rows whose length is no multiple of 32
    /// (the block kernels' unit), dequantized and packed once.
    Packed(PackedWeight),
}

/// Runs every op with explicit vector kernels at one [`Level`] (the widest this CPU runs,
/// unless forced). Weights stay as the file stores them and are decoded on the fly
/// ([`Mode::Exact`], the default) or multiplied in integers ([`Mode::Fast`]). Matmuls are
/// split over the backend's own [`Team`] of `threads` threads, by the task index, so results
/// are bitwise identical for any thread count; the per-row ops run on the calling thread.
#[derive(Debug)]
pub struct SimdBackend {
    isa: Isa,
    mode: Mode,
    team: Team,
    scratch: GemmScratch,
    block_scratch: BlockScratch,
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
        if threads == 0 {
            return Err(Error::Unavailable(
                "a backend needs at least one thread".into(),
            ));
        }
        let team = Team::new(threads)
            .map_err(|e| Error::Unavailable(format!("cannot start {threads} threads: {e}")))?;
        Ok(SimdBackend {
            isa,
            mode: Mode::Exact,
            team,
            scratch: GemmScratch::new(threads),
            block_scratch: BlockScratch::new(threads),
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

    /// Whether `dtype` weights take fast mode's integer dot products.
    fn integer_dots(&self, dtype: DType) -> bool {
        self.mode == Mode::Fast && matches!(dtype, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
    }

    /// `y (m, n) = x (m, k) · Wᵀ` on blocks: quantize the rows of `x`, then integer dots.
    fn matmul_integer(&self, x: &[f32], w: &BlockWeight<'_>, y: &mut [f32], m: usize) {
        let BlockWeight { dtype, n, k, bytes } = *w;
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
        // Tasks own disjoint ranges of weight rows, for every activation row.
        let rows_per_task = 64;
        let tasks = n.div_ceil(rows_per_task);
        let out = Out(y.as_mut_ptr());
        self.team.run(tasks, &|t| {
            let out = out.get();
            for j in t * rows_per_task..((t + 1) * rows_per_task).min(n) {
                for (i, xq) in act.chunks_exact(x_row_bytes).enumerate() {
                    // SAFETY: element (i, j) of y, j in this task's rows only.
                    unsafe { *out.add(i * n + j) = dot(xq, j) };
                }
            }
        });
    }
}

/// The output of a matmul shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Backend for SimdBackend {
    type Weight<'w> = SimdWeight<'w>;

    fn name(&self) -> String {
        format!("simd-{}", self.isa.level().name())
    }

    fn threads(&self) -> usize {
        self.team.threads()
    }

    /// Every format runs natively (rows of a multiple of 32 values; other rows are
    /// dequantized when prepared).
    fn supports(&self, _op: Op, _dtype: DType) -> Support {
        Support::Native
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<SimdWeight<'w>, Error> {
        let (rows, cols) = w.dims();
        if let Some(b) = BlockWeight::new(w.dtype(), rows, cols, w.bytes()) {
            return Ok(SimdWeight::Blocks(b));
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
            SimdWeight::Blocks(b) => (b.n, b.k),
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
                simd::matmul(&self.team, &self.scratch, x, p, y, m);
            }
            SimdWeight::Blocks(b) if self.integer_dots(b.dtype) => self.matmul_integer(x, b, y, m),
            SimdWeight::Blocks(b) => {
                simd::matmul_blocks(self.isa, &self.team, &self.block_scratch, x, b, y, m)
            }
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
            SimdWeight::Blocks(BlockWeight {
                dtype, k, bytes, ..
            }) => {
                let row = dtype.bytes_for(*k).expect("checked when prepared");
                simd::dequantize(self.isa, *dtype, &bytes[token * row..][..row], y);
            }
        }
        Ok(())
    }
}
