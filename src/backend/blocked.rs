//! The cache-blocked backend: chord-kernels' blocked kernels on a rayon pool it owns.

use chord_kernels::blocked;

use super::{Backend, Error, F32Weight, RopeParams, SoftmaxParams, WeightView, check};

/// Runs every op with the cache-tiled, compiler-vectorised kernels, split over its own pool
/// of `threads` threads. Results do not depend on the thread count.
#[derive(Debug)]
pub struct BlockedBackend {
    pool: rayon::ThreadPool,
}

impl BlockedBackend {
    /// A blocked backend with its own pool of `threads` threads.
    pub fn new(threads: usize) -> Result<Self, Error> {
        Ok(BlockedBackend {
            pool: super::thread_pool(threads)?,
        })
    }
}

impl Backend for BlockedBackend {
    type Weight<'w> = F32Weight<'w>;

    fn name(&self) -> String {
        "blocked".into()
    }

    fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<F32Weight<'w>, Error> {
        Ok(F32Weight::from_view(w))
    }

    /// F32 data borrowed where the view's bytes were aligned; dequantized copies otherwise.
    fn borrows_view(&self, w: &F32Weight<'_>) -> bool {
        matches!(w.data, std::borrow::Cow::Borrowed(_))
    }

    fn matmul(&self, x: &[f32], w: &F32Weight<'_>, y: &mut [f32], m: usize) -> Result<(), Error> {
        check::matmul(x.len(), (w.rows, w.cols), y.len(), m)?;
        blocked::matmul(&self.pool, x, &w.data, y, m, w.rows, w.cols);
        Ok(())
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        check::rmsnorm(x.len(), weight.len(), y.len(), eps)?;
        blocked::rmsnorm(&self.pool, x, weight, y, weight.len(), eps);
        Ok(())
    }

    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        check::rope(x.len(), rows, pos, p)?;
        blocked::rope(&self.pool, x, rows, pos, p);
        Ok(())
    }

    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        check::softmax(x.len(), cols, p)?;
        blocked::softmax(&self.pool, x, cols, p);
        Ok(())
    }

    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check::swiglu(a.len(), b.len(), y.len())?;
        blocked::swiglu(&self.pool, a, b, y);
        Ok(())
    }

    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check::geglu(a.len(), b.len(), y.len())?;
        blocked::geglu(&self.pool, a, b, y);
        Ok(())
    }

    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        check::add(y.len(), x.len())?;
        blocked::add(&self.pool, y, x);
        Ok(())
    }

    fn embedding(&self, table: &F32Weight<'_>, token: usize, y: &mut [f32]) -> Result<(), Error> {
        check::embedding((table.rows, table.cols), token, y.len())?;
        y.copy_from_slice(table.row(token));
        Ok(())
    }
}
