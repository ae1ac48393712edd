//! The research testbed on the default model: the observer hook, `dump`, and `diverge`
//! catching a broken backend at the layer and point where it breaks.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chord::backend::{
    Backend, Error, RopeParams, ScalarBackend, SimdBackend, SoftmaxParams, WeightView,
};
use chord::gguf::GgufFile;
use chord::model::observe::{Activation, Observer, Point, Recorder};
use chord::model::{Model, State};
use common::model_path;

const PROMPT: [u32; 5] = [504, 3575, 282, 4649, 314];

/// An observer that only reads leaves the logits bit for bit as `forward` gives them, and
/// sees every point of every layer once per batch, with the shapes the docs give.
#[test]
fn observing_changes_nothing_and_sees_every_point() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
    let c = model.config.clone();
    // Batches of two: the recorder appends each point's rows in order of position.
    let mut s1 = State::new(&c, 16, 2);
    let plain = model.forward(&mut s1, &PROMPT).unwrap().to_vec();
    let mut s2 = State::new(&c, 16, 2);
    let mut rec = Recorder::new(None, None);
    let mut positions = Vec::new();
    let mut both = |a: Activation<'_>| {
        if a.point == Point::Q && a.layer == Some(0) {
            positions.push(a.positions.clone());
        }
        rec.observe(a)
    };
    let observed = model.forward_observed(&mut s2, &PROMPT, &mut both).unwrap();
    assert_eq!(positions, [0..2, 2..4, 4..5]);
    assert!(
        plain
            .iter()
            .zip(observed)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let n = PROMPT.len();
    assert_eq!(rec.recorded.len(), 15 * c.n_layers + 3);
    for (&(layer, point), (cols, data)) in &rec.recorded {
        assert_eq!(layer.is_some(), point.in_layer(), "{point}");
        let want_cols = match point {
            Point::K | Point::V | Point::KRope => c.kv_dim(),
            Point::Gate | Point::Up | Point::Act => c.ffn_dim,
            Point::Logits => c.vocab,
            _ => c.dim,
        };
        let rows = if matches!(point, Point::FinalNorm | Point::Logits) {
            1 // forward computes the last token's logits only
        } else {
            n
        };
        assert_eq!(
            (*cols, data.len()),
            (want_cols, rows * want_cols),
            "{point}"
        );
    }
    // The recorded logits are the returned ones.
    assert_eq!(rec.recorded[&(None, Point::Logits)].1, plain);
}

/// Editing an activation changes what follows: zeroing one head of layer 3's attention
/// output changes the logits; recording layer 3's residual from one prompt and patching it
/// into another makes the second prompt's later layers see the first's residual.
#[test]
fn editing_and_patching_change_the_pass() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
    let c = model.config.clone();
    let logits = |tokens: &[u32], obs: &mut dyn FnMut(Activation<'_>)| {
        let mut s = State::new(&c, 16, 8);
        let mut f = |a: Activation<'_>| obs(a);
        model
            .forward_observed(&mut s, tokens, &mut f)
            .unwrap()
            .to_vec()
    };
    let base = logits(&PROMPT, &mut |_| {});
    let head = 2;
    let zeroed = logits(&PROMPT, &mut |a: Activation<'_>| {
        if a.point == Point::Attn && a.layer == Some(3) {
            for row in a.data.chunks_exact_mut(a.cols) {
                row[head * c.head_dim..][..c.head_dim].fill(0.0);
            }
        }
    });
    assert!(base.iter().zip(&zeroed).any(|(a, b)| a != b));

    // Patch: the residual after layer 3 at the last position, from prompt A into prompt B.
    let (a_prompt, b_prompt) = (
        [504u32, 3575, 282, 4649, 314],
        [504u32, 3575, 282, 5403, 314],
    );
    let mut from_a = Vec::new();
    logits(&a_prompt, &mut |a: Activation<'_>| {
        if a.point == Point::ResidFfn && a.layer == Some(3) {
            from_a = a.data[(a.rows - 1) * a.cols..].to_vec();
        }
    });
    let mut seen_in_b = Vec::new();
    let patched = logits(&b_prompt, &mut |a: Activation<'_>| {
        if a.point == Point::ResidFfn && a.layer == Some(3) {
            let last = (a.rows - 1) * a.cols;
            a.data[last..].copy_from_slice(&from_a);
        }
        if a.point == Point::AttnNorm && a.layer == Some(4) {
            seen_in_b = a.data[(a.rows - 1) * a.cols..].to_vec();
        }
    });
    // Layer 4 normalised the patched residual: the same input as in prompt A's pass.
    let mut in_a = Vec::new();
    logits(&a_prompt, &mut |a: Activation<'_>| {
        if a.point == Point::AttnNorm && a.layer == Some(4) {
            in_a = a.data[(a.rows - 1) * a.cols..].to_vec();
        }
    });
    assert_eq!(seen_in_b, in_a);
    let unpatched = logits(&b_prompt, &mut |_| {});
    assert!(patched.iter().zip(&unpatched).any(|(a, b)| a != b));
}

/// `dump` writes a safetensors file that reads back (with the safetensors crate, as numpy
/// and torch read it) as the recorded activations, named and shaped as documented.
#[test]
fn dump_writes_the_recorded_activations_as_safetensors() {
    let file = GgufFile::open(model_path()).unwrap();
    let model = Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
    let c = model.config.clone();
    let meta = [("prompt".to_string(), "test".to_string())].into();
    let bytes = chord::research::dump(
        &model,
        &PROMPT,
        Some(vec![Point::ResidFfn, Point::Logits]),
        Some(vec![0, 5]),
        meta,
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["layer.0.resid_ffn", "layer.5.resid_ffn", "logits"]);
    let logits = st.tensor("logits").unwrap();
    assert_eq!(logits.shape(), [PROMPT.len(), c.vocab]);
    assert_eq!(logits.dtype(), safetensors::Dtype::F32);
    // The rows are what forward_all returns for the prompt.
    let mut s = State::new(&c, 16, 8);
    let want = model.forward_all(&mut s, &PROMPT).unwrap();
    let got: Vec<f32> = logits
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        st.tensor("layer.5.resid_ffn").unwrap().shape(),
        [PROMPT.len(), c.dim]
    );
    let err = chord::research::dump(&model, &PROMPT, None, Some(vec![30]), Default::default());
    assert!(
        err.unwrap_err()
            .to_string()
            .contains("layer 30 does not exist")
    );
    // A point this architecture never reaches (llama has no q/k norms) is named, not
    // silently left out of the file.
    let err = chord::research::dump(
        &model,
        &PROMPT,
        Some(vec![Point::Q, Point::QNorm]),
        None,
        Default::default(),
    );
    let err = err.unwrap_err().to_string();
    assert!(err.contains("point q_norm does not occur"), "{err}");
}

/// The scalar backend with its softmax rounded to bf16 (8 bits of mantissa) in one layer
/// only. The model calls RoPE twice per layer before attention, so the layer a softmax
/// belongs to is the number of RoPE pairs so far; attention is the trait's default body,
/// which calls this softmax.
struct BrokenSoftmax {
    inner: ScalarBackend,
    layer: usize,
    n_layers: usize,
    ropes: AtomicUsize,
}

impl Backend for BrokenSoftmax {
    type Weight<'w> = <ScalarBackend as Backend>::Weight<'w>;
    fn name(&self) -> String {
        format!("scalar, softmax in bf16 in layer {}", self.layer)
    }
    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<Self::Weight<'w>, Error> {
        self.inner.prepare(w)
    }
    fn matmul(
        &self,
        x: &[f32],
        w: &Self::Weight<'_>,
        y: &mut [f32],
        m: usize,
    ) -> Result<(), Error> {
        self.inner.matmul(x, w, y, m)
    }
    fn rmsnorm(&self, x: &[f32], g: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        self.inner.rmsnorm(x, g, y, eps)
    }
    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        self.ropes.fetch_add(1, Ordering::Relaxed);
        self.inner.rope(x, rows, pos, p)
    }
    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        self.inner.softmax(x, cols, p)?;
        let layer = (self.ropes.load(Ordering::Relaxed) / 2 - 1) % self.n_layers;
        if layer == self.layer {
            for v in x.iter_mut() {
                // Round to nearest bf16 (ties away), as a bf16 store would keep it.
                *v = f32::from_bits((v.to_bits() + 0x8000) & 0xffff_0000);
            }
        }
        Ok(())
    }
    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        self.inner.swiglu(a, b, y)
    }
    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        self.inner.geglu(a, b, y)
    }
    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        self.inner.add(y, x)
    }
    fn embedding(&self, t: &Self::Weight<'_>, token: usize, y: &mut [f32]) -> Result<(), Error> {
        self.inner.embedding(t, token, y)
    }
}

/// `diverge` finds a backend that breaks in one layer at that layer's attention, under the
/// default tolerance, with every earlier point agreeing exactly; and finds nothing between
/// two correct backends.
#[test]
fn diverge_reports_a_broken_softmax_at_its_layer() {
    let file = GgufFile::open(model_path()).unwrap();
    let reference = Model::load(&file, ScalarBackend::new()).unwrap();
    let broken = BrokenSoftmax {
        inner: ScalarBackend::new(),
        layer: 7,
        n_layers: reference.config.n_layers,
        ropes: AtomicUsize::new(0),
    };
    let model = Model::load(&file, broken).unwrap();
    let tol = chord::research::default_tolerance(false);
    let d = chord::research::diverge(&model, &reference, &PROMPT, tol).unwrap();
    let first = &d.local[d.first.expect("the broken softmax is found")];
    assert_eq!(
        (first.layer, first.point),
        (Some(7), Point::Attn),
        "{first:?}"
    );
    // Every point before it is bit for bit the reference's.
    let at = d.first.unwrap();
    assert!(d.local[..at].iter().all(|e| e.max_abs == 0.0));
    // The free-running pass carries the error on from layer 7, not before.
    assert!(
        d.growth
            .iter()
            .filter(|e| matches!(e.layer, Some(l) if l < 7))
            .all(|e| e.max_abs == 0.0)
    );
    eprintln!("layer 7 attn: scaled error {:e}", first.scaled);
    assert!(
        d.growth
            .iter()
            .any(|e| e.layer == Some(7) && e.max_abs > 0.0)
    );

    let simd = Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
    let d = chord::research::diverge(&simd, &reference, &PROMPT, tol).unwrap();
    assert_eq!(
        d.first,
        None,
        "{:?}",
        d.local.iter().map(|e| e.scaled).fold(0.0, f64::max)
    );
    assert_eq!(d.local.len(), 15 * reference.config.n_layers + 3);
}

/// A mixed backend runs the model; `diverge` against it isolates one op's numerical effect:
/// SIMD for everything but RoPE and softmax, taken from the broken backend, is reported at
/// layer 7's attention, as the broken backend alone is.
#[test]
fn a_mixed_backend_runs_the_model_and_isolates_one_op() {
    use chord::backend::{ActivationOps, Mixed, Op};
    let file = GgufFile::open(model_path()).unwrap();
    let reference = Model::load(&file, ScalarBackend::new()).unwrap();
    let simd = Arc::new(SimdBackend::new(2).unwrap());
    let broken: Arc<dyn ActivationOps> = Arc::new(BrokenSoftmax {
        inner: ScalarBackend::new(),
        layer: 7,
        n_layers: reference.config.n_layers,
        ropes: AtomicUsize::new(0),
    });
    let mixed = Mixed::new(
        Arc::clone(&simd),
        vec![(Op::Rope, Arc::clone(&broken)), (Op::Softmax, broken)],
        simd.clone(),
    )
    .unwrap();
    let model = Model::load(&file, mixed).unwrap();
    let tol = chord::research::default_tolerance(false);
    let d = chord::research::diverge(&model, &reference, &PROMPT, tol).unwrap();
    let first = &d.local[d.first.expect("the broken softmax is found")];
    assert_eq!(
        (first.layer, first.point),
        (Some(7), Point::Attn),
        "{first:?}"
    );

    // Built from names, as --backend takes them, it agrees with the reference everywhere.
    let spec: chord::backend::BackendSpec = "matmul=simd,softmax=scalar,*=blocked".parse().unwrap();
    let chord::backend::BackendSpec::Mixed { matmul, ops, rest } = spec else {
        panic!("a mixed spec")
    };
    let mixed = Mixed::from_variants(SimdBackend::new(2).unwrap(), matmul, &ops, rest, 2).unwrap();
    let model = Model::load(&file, mixed).unwrap();
    let d = chord::research::diverge(&model, &reference, &PROMPT, tol).unwrap();
    assert_eq!(d.first, None);
}
