//! A backend written outside chord, in one file: it counts the calls to each op and hands
//! the work to another backend. Run it with `cargo run --release --example custom_backend`.
//!
//! It shows the three things every backend author does:
//! 1. implement [`Backend`]: the associated `Weight` type, `name`, `prepare` and the seven
//!    core ops (`threads`, `supports`, `weight_dims` and the composites `matmuls` and
//!    `attention` have defaults); a wrapper like this one forwards only what it changes;
//! 2. validate shapes at the boundary: here the inner backend does it, a backend with its
//!    own kernels calls `chord::backend::check` first;
//! 3. prove it: `chord::conformance::check` runs every op against the f64 reference.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chord::SimdBackend;
use chord::backend::{AttentionParams, Backend, Error, Op, RopeParams, SoftmaxParams, WeightView};
use chord::conformance::{self, Config};

/// Counts calls per op, then delegates to `inner`.
struct Counting<B> {
    inner: B,
    calls: Mutex<BTreeMap<Op, u64>>,
}

impl<B: Backend> Counting<B> {
    fn new(inner: B) -> Self {
        Counting {
            inner,
            calls: Mutex::new(BTreeMap::new()),
        }
    }

    fn count(&self, op: Op) {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
    }
}

impl<B: Backend> Backend for Counting<B> {
    // The inner backend's prepared weights serve as ours.
    type Weight<'w>
        = B::Weight<'w>
    where
        Self: 'w;

    fn name(&self) -> String {
        format!("counting({})", self.inner.name())
    }

    fn threads(&self) -> usize {
        self.inner.threads()
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<Self::Weight<'w>, Error> {
        self.inner.prepare(w)
    }

    // The inner backend may finish its weights in the background once they are all
    // prepared (the SIMD backend moves them onto huge pages): pass the calls on.
    fn prepared(&self) {
        self.inner.prepared()
    }

    fn settle(&self) {
        self.inner.settle()
    }

    fn matmul(
        &self,
        x: &[f32],
        w: &Self::Weight<'_>,
        y: &mut [f32],
        m: usize,
    ) -> Result<(), Error> {
        self.count(Op::Matmul);
        self.inner.matmul(x, w, y, m)
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        self.count(Op::RmsNorm);
        self.inner.rmsnorm(x, weight, y, eps)
    }

    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        self.count(Op::Rope);
        self.inner.rope(x, rows, pos, p)
    }

    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        self.count(Op::Softmax);
        self.inner.softmax(x, cols, p)
    }

    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        self.count(Op::SwiGlu);
        self.inner.swiglu(a, b, y)
    }

    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        self.count(Op::GeGlu);
        self.inner.geglu(a, b, y)
    }

    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        self.count(Op::Add);
        self.inner.add(y, x)
    }

    fn embedding(
        &self,
        table: &Self::Weight<'_>,
        token: usize,
        y: &mut [f32],
    ) -> Result<(), Error> {
        self.count(Op::Embedding);
        self.inner.embedding(table, token, y)
    }

    // A composite: its default body would count as the core ops it calls; delegating the
    // whole call keeps the inner backend's own version (and counts it once).
    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        out: &mut [f32],
        scores: &mut [f32],
        p: &AttentionParams,
    ) -> Result<(), Error> {
        self.count(Op::Attention);
        self.inner.attention(q, k_cache, v_cache, out, scores, p)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = Counting::new(SimdBackend::new(2)?);
    conformance::check(&backend, &Config::default())?;
    println!(
        "{} passes the conformance suite; calls per op:",
        backend.name()
    );
    for (op, n) in backend.calls.lock().unwrap().iter() {
        println!("  {op:<10} {n}");
    }
    Ok(())
}

#[test]
fn counting_backend_conforms_and_counts_every_op() {
    let backend = Counting::new(SimdBackend::new(2).unwrap());
    conformance::assert_conforms(&backend);
    let calls = backend.calls.lock().unwrap();
    for op in Op::ALL {
        assert!(
            calls.get(&op).copied().unwrap_or(0) > 0,
            "{op} was never called"
        );
    }
}
