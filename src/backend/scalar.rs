//! The reference backend: chord-kernels' scalar kernels in f32, on one thread.

use chord_kernels::scalar;

use super::{Backend, Error, F32Weight, RopeParams, SoftmaxParams, WeightView, check};

/// Runs every op with the scalar reference kernels, in f32, on the calling thread.
/// Slow and simple: the baseline the other backends are measured against.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScalarBackend;

impl ScalarBackend {
    /// The scalar backend.
    pub fn new() -> Self {
        ScalarBackend
    }
}

impl Backend for ScalarBackend {
    type Weight<'w> = F32Weight<'w>;

    fn name(&self) -> String {
        "scalar".into()
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
        scalar::matmul(x, &w.data, y, m, w.rows, w.cols);
        Ok(())
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        check::rmsnorm(x.len(), weight.len(), y.len(), eps)?;
        scalar::rmsnorm(x, weight, y, weight.len(), eps);
        Ok(())
    }

    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        check::rope(x.len(), rows, pos, p)?;
        scalar::rope(x, rows, pos, p);
        Ok(())
    }

    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        check::softmax(x.len(), cols, p)?;
        scalar::softmax(x, cols, p);
        Ok(())
    }

    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check::swiglu(a.len(), b.len(), y.len())?;
        scalar::swiglu(a, b, y);
        Ok(())
    }

    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check::geglu(a.len(), b.len(), y.len())?;
        scalar::geglu(a, b, y);
        Ok(())
    }

    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        check::add(y.len(), x.len())?;
        scalar::add(y, x);
        Ok(())
    }

    fn embedding(&self, table: &F32Weight<'_>, token: usize, y: &mut [f32]) -> Result<(), Error> {
        check::embedding((table.rows, table.cols), token, y.len())?;
        y.copy_from_slice(table.row(token));
        Ok(())
    }
}
