//! The SIMD backend: chord-kernels' vector kernels at one instruction-set level.

use chord_kernels::simd::{self, GemmScratch, Isa, Level, PackedWeight};

use super::{Backend, DType, Error, Op, RopeParams, SoftmaxParams, Support, WeightView, check};

/// Runs every op with explicit vector kernels at one [`Level`] (the widest this CPU runs,
/// unless forced). Weights are repacked once, at [`prepare`](Backend::prepare), into the
/// panel layout of the level's GEMM microkernel. Matmul is split over the backend's own pool
/// of `threads` threads (bitwise identical for any thread count); the per-row ops run on the
/// calling thread.
#[derive(Debug)]
pub struct SimdBackend {
    isa: Isa,
    pool: rayon::ThreadPool,
    scratch: GemmScratch,
}

impl SimdBackend {
    /// The widest level this CPU runs, on `threads` threads.
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

    fn build(isa: Isa, threads: usize) -> Result<Self, Error> {
        Ok(SimdBackend {
            isa,
            pool: super::thread_pool(threads)?,
            scratch: GemmScratch::new(threads),
        })
    }

    /// The instruction-set level the kernels run at.
    pub fn level(&self) -> Level {
        self.isa.level()
    }
}

impl Backend for SimdBackend {
    type Weight<'w> = PackedWeight;

    fn name(&self) -> String {
        format!("simd-{}", self.isa.level().name())
    }

    fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn supports(&self, _op: Op, dtype: DType) -> Support {
        match dtype {
            DType::F32 => Support::Native,
            _ => Support::Dequantized,
        }
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<PackedWeight, Error> {
        let (rows, cols) = w.dims();
        Ok(simd::pack_weight(self.isa, &w.to_f32(), rows, cols))
    }

    fn weight_dims(&self, w: &PackedWeight) -> (usize, usize) {
        (w.rows(), w.cols())
    }

    fn matmul(&self, x: &[f32], w: &PackedWeight, y: &mut [f32], m: usize) -> Result<(), Error> {
        check::matmul(x.len(), (w.rows(), w.cols()), y.len(), m)?;
        if w.isa() != self.isa {
            return Err(Error::Param {
                op: "matmul",
                detail: format!(
                    "weight packed for {}, backend runs {}",
                    w.isa().level().name(),
                    self.isa.level().name()
                ),
            });
        }
        simd::matmul(&self.pool, &self.scratch, x, w, y, m);
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

    fn embedding(&self, table: &PackedWeight, token: usize, y: &mut [f32]) -> Result<(), Error> {
        check::embedding((table.rows(), table.cols()), token, y.len())?;
        table.copy_row(token, y);
        Ok(())
    }
}
