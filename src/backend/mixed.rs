//! A backend built from others, op by op.
//!
//! The matmul backend prepares the weights and runs everything that reads them (`matmul`,
//! `matmuls`, `embedding`); each op that reads no weights (`rmsnorm`, `rope`, `softmax`,
//! `swiglu`, `geglu`, `add`, `attention`) runs on the backend chosen for it. On the command line:
//! `--backend matmul=simd-avx512,softmax=scalar,*=blocked`, where `*` stands for every op
//! not named.
//!
//! Attention is a composite. Named (`attention=B`), it runs as `B`'s own attention, softmax
//! included; not named while `softmax` is, it runs as the trait's default body on this
//! backend, so that the chosen softmax is the one attention uses; neither named, it runs as
//! the `*` backend's attention. So naming `softmax` changes attention even when it names the
//! same backend as `*` (the default body runs instead of that backend's own attention, on
//! one thread); and with `attention` named, a named `softmax` has nothing left to call it.

use std::sync::Arc;

use super::{
    AttentionParams, Backend, DType, Error, Op, RopeParams, SoftmaxParams, Support, Variant,
    WeightView,
};

/// The ops of a [`Backend`] that read no weights, callable through `dyn`: what a [`Mixed`]
/// backend takes from each of its parts. Every backend has them.
pub trait ActivationOps: Send + Sync {
    fn name(&self) -> String;
    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error>;
    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error>;
    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error>;
    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error>;
    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error>;
    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error>;
    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        out: &mut [f32],
        scores: &mut [f32],
        p: &AttentionParams,
    ) -> Result<(), Error>;
}

impl<B: Backend> ActivationOps for B {
    fn name(&self) -> String {
        Backend::name(self)
    }
    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        Backend::rmsnorm(self, x, weight, y, eps)
    }
    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        Backend::rope(self, x, rows, pos, p)
    }
    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        Backend::softmax(self, x, cols, p)
    }
    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        Backend::swiglu(self, a, b, y)
    }
    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        Backend::geglu(self, a, b, y)
    }
    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        Backend::add(self, y, x)
    }
    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        out: &mut [f32],
        scores: &mut [f32],
        p: &AttentionParams,
    ) -> Result<(), Error> {
        Backend::attention(self, q, k_cache, v_cache, out, scores, p)
    }
}

/// The ops a [`Mixed`] backend assigns, besides matmul.
pub const MIXED_OPS: [Op; 7] = [
    Op::RmsNorm,
    Op::Rope,
    Op::Softmax,
    Op::SwiGlu,
    Op::GeGlu,
    Op::Add,
    Op::Attention,
];

/// A backend whose ops come from several backends (see the module docs).
pub struct Mixed<M> {
    matmul: Arc<M>,
    /// The backend of each of [`MIXED_OPS`], in that order; `None` for attention when it
    /// runs as the trait's default body on this backend.
    parts: [Option<Arc<dyn ActivationOps>>; MIXED_OPS.len()],
}

impl<M: Backend> Mixed<M> {
    /// `matmul` for the weights, `assigned` for the ops named explicitly, `rest` for the
    /// others (see the module docs for attention). An error names an op that is not one of
    /// [`MIXED_OPS`] (embedding goes with matmul).
    pub fn new(
        matmul: Arc<M>,
        assigned: Vec<(Op, Arc<dyn ActivationOps>)>,
        rest: Arc<dyn ActivationOps>,
    ) -> Result<Mixed<M>, Error> {
        let mut parts: [Option<Arc<dyn ActivationOps>>; MIXED_OPS.len()] = Default::default();
        for (op, b) in assigned {
            let i = slot(op).ok_or_else(|| Error::Unavailable(not_mixed(op)))?;
            parts[i] = Some(b);
        }
        let softmax_named = parts[slot(Op::Softmax).expect("a mixed op")].is_some();
        for (i, p) in parts.iter_mut().enumerate() {
            let default_body = MIXED_OPS[i] == Op::Attention && softmax_named;
            if p.is_none() && !default_body {
                *p = Some(Arc::clone(&rest));
            }
        }
        Ok(Mixed { matmul, parts })
    }

    fn part(&self, op: Op) -> &dyn ActivationOps {
        self.parts[slot(op).expect("a mixed op")]
            .as_deref()
            .expect("every op but a default-body attention has a backend")
    }
}

impl<M: Backend + 'static> Mixed<M> {
    /// `matmul` (built from `matmul_variant`) for the weights; each op of `ops` on its
    /// variant's backend and the rest on `rest`'s, built with `threads` threads. Ops on the
    /// same variant share one backend (and so one team of threads), the matmul backend
    /// included.
    pub fn from_variants(
        matmul: M,
        matmul_variant: Variant,
        ops: &[(Op, Variant)],
        rest: Variant,
        threads: usize,
    ) -> Result<Mixed<M>, Error> {
        let matmul = Arc::new(matmul);
        let mut built: Vec<(Variant, Arc<dyn ActivationOps>)> = vec![(
            matmul_variant,
            Arc::clone(&matmul) as Arc<dyn ActivationOps>,
        )];
        let mut get = |v: Variant| -> Result<Arc<dyn ActivationOps>, Error> {
            if let Some((_, b)) = built.iter().find(|(w, _)| *w == v) {
                return Ok(Arc::clone(b));
            }
            let b: Arc<dyn ActivationOps> =
                crate::with_variant!(v, threads, super::Mode::Exact, b => Arc::new(b));
            built.push((v, Arc::clone(&b)));
            Ok(b)
        };
        let assigned = ops
            .iter()
            .map(|&(op, v)| Ok((op, get(v)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let rest = get(rest)?;
        Mixed::new(matmul, assigned, rest)
    }
}

/// The index of `op` in [`MIXED_OPS`], if it is one.
pub(super) fn slot(op: Op) -> Option<usize> {
    MIXED_OPS.iter().position(|&o| o == op)
}

/// Why `op` cannot be assigned in a mixed backend.
pub(super) fn not_mixed(op: Op) -> String {
    let names: Vec<&str> = MIXED_OPS.iter().map(|o| o.name()).collect();
    format!(
        "a mixed backend assigns matmul, {}, not {op} (embedding goes with matmul)",
        names.join(", ")
    )
}

impl<M: Backend> Backend for Mixed<M> {
    type Weight<'w>
        = M::Weight<'w>
    where
        Self: 'w;

    /// `mixed(matmul=…,rmsnorm=…,…)`; `attention=default-body` when attention runs as the
    /// composite over the chosen softmax.
    fn name(&self) -> String {
        let mut parts = vec![format!("matmul={}", self.matmul.name())];
        for (op, p) in MIXED_OPS.iter().zip(&self.parts) {
            let who = p.as_ref().map_or("default-body".into(), |b| b.name());
            parts.push(format!("{op}={who}"));
        }
        format!("mixed({})", parts.join(","))
    }

    fn threads(&self) -> usize {
        self.matmul.threads()
    }

    fn supports(&self, op: Op, dtype: DType) -> Support {
        self.matmul.supports(op, dtype)
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<Self::Weight<'w>, Error> {
        self.matmul.prepare(w)
    }

    fn prepared(&self) {
        self.matmul.prepared()
    }

    fn settle(&self) {
        self.matmul.settle()
    }

    fn borrows_view(&self, w: &Self::Weight<'_>) -> bool {
        self.matmul.borrows_view(w)
    }

    fn arithmetic(&self, w: &Self::Weight<'_>) -> super::Arithmetic {
        self.matmul.arithmetic(w)
    }

    fn weight_dims(&self, w: &Self::Weight<'_>) -> (usize, usize) {
        self.matmul.weight_dims(w)
    }

    fn matmul(
        &self,
        x: &[f32],
        w: &Self::Weight<'_>,
        y: &mut [f32],
        m: usize,
    ) -> Result<(), Error> {
        self.matmul.matmul(x, w, y, m)
    }

    fn matmuls(
        &self,
        x: &[f32],
        ws: &[&Self::Weight<'_>],
        ys: &mut [&mut [f32]],
        m: usize,
    ) -> Result<(), Error> {
        self.matmul.matmuls(x, ws, ys, m)
    }

    fn embedding(
        &self,
        table: &Self::Weight<'_>,
        token: usize,
        y: &mut [f32],
    ) -> Result<(), Error> {
        self.matmul.embedding(table, token, y)
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        self.part(Op::RmsNorm).rmsnorm(x, weight, y, eps)
    }

    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        self.part(Op::Rope).rope(x, rows, pos, p)
    }

    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        self.part(Op::Softmax).softmax(x, cols, p)
    }

    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        self.part(Op::SwiGlu).swiglu(a, b, y)
    }

    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        self.part(Op::GeGlu).geglu(a, b, y)
    }

    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        self.part(Op::Add).add(y, x)
    }

    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        out: &mut [f32],
        scores: &mut [f32],
        p: &AttentionParams,
    ) -> Result<(), Error> {
        match &self.parts[slot(Op::Attention).expect("a mixed op")] {
            Some(b) => b.attention(q, k_cache, v_cache, out, scores, p),
            None => super::default_attention(self, q, k_cache, v_cache, out, scores, p),
        }
    }
}
