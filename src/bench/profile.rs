//! `chord profile`: where the time of a real forward pass goes, op by op.
//!
//! [`Profiled`] wraps any backend and times every call it forwards: the model runs unchanged
//! on top of it. Matmuls are told apart by the tensor they multiply (`attn_q`, `ffn_down`,
//! `output`...), from the names the file gives the weights; every other op is one row. A call
//! is attributed to the layer of the last matmul before it (so a layer's first RMSNorm
//! counts in the layer before: the rows per layer are for comparing layers, not for sums).
//!
//! Rates: a decode matmul (one row) in GB/s of weight bytes as the file stores them, against
//! the read roof; a batched matmul in GFLOP/s (`2·m·n·k`) against the FMA roof; attention in
//! GFLOP/s (`4·heads·head_dim` per query row and cached position); the per-row ops in GB/s
//! of the values they read and write.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::backend::{
    Arithmetic, AttentionParams, Backend, DType, Error, Op, PreparedWeight, RopeParams,
    SoftmaxParams, Support, WeightView,
};

/// A weight of the wrapped backend, with what a profile reports about it.
pub struct Labeled<W> {
    inner: W,
    /// `attn_q`, `ffn_down`, `token_embd`...
    label: String,
    layer: Option<usize>,
    /// Bytes as the file stores them.
    bytes: usize,
    /// The arithmetic its matmul runs in.
    arithmetic: Arithmetic,
}

impl<W: PreparedWeight> PreparedWeight for Labeled<W> {
    fn dims(&self) -> (usize, usize) {
        self.inner.dims()
    }
    fn support(dtype: DType) -> Support {
        W::support(dtype)
    }
}

/// Totals of one profile row.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub calls: u64,
    pub seconds: f64,
    /// Floating-point or, for 8-bit matmuls, integer operations.
    pub flops: f64,
    pub bytes: f64,
    /// Of `bytes`, the weights' (as the file stores them).
    pub weight_bytes: f64,
    /// The operations were 8-bit integer ones.
    pub int8: bool,
}

impl Totals {
    fn add(&mut self, seconds: f64, flops: f64, bytes: f64, weight_bytes: f64) {
        self.calls += 1;
        self.seconds += seconds;
        self.flops += flops;
        self.bytes += bytes;
        self.weight_bytes += weight_bytes;
    }
}

/// What a [`Profiled`] backend recorded.
pub struct Recorded {
    /// Per op (a matmul per weight label): the totals.
    pub rows: Vec<(Op, String, Totals)>,
    /// Seconds per layer (`None`: outside the layers).
    pub layers: Vec<(Option<usize>, f64)>,
}

#[derive(Default)]
struct Record {
    /// (op, matmul label and shape) -> totals.
    rows: BTreeMap<(Op, String), Totals>,
    /// layer -> seconds (`None`: embedding and classifier).
    layers: BTreeMap<Option<usize>, f64>,
    layer: Option<usize>,
}

/// A backend that times every op of another.
pub struct Profiled<B> {
    inner: B,
    record: Mutex<Record>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled {
            inner,
            record: Mutex::new(Record::default()),
        }
    }

    /// Forgets what was recorded (between a prefill and a decode measurement).
    pub fn reset(&self) {
        *self.record.lock().unwrap_or_else(|e| e.into_inner()) = Record::default();
    }

    /// What was recorded so far, emptying the record.
    pub fn take(&self) -> Recorded {
        let r = std::mem::take(&mut *self.record.lock().unwrap_or_else(|e| e.into_inner()));
        Recorded {
            rows: r.rows.into_iter().map(|((op, l), t)| (op, l, t)).collect(),
            layers: r.layers.into_iter().collect(),
        }
    }

    fn timed<T>(
        &self,
        op: Op,
        weight: Option<(&str, Option<usize>, Arithmetic, f64)>,
        flops: f64,
        bytes: f64,
        f: impl FnOnce() -> T,
    ) -> T {
        let t = Instant::now();
        let out = f();
        let s = t.elapsed().as_secs_f64();
        let mut r = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let (label, int8, weight_bytes) = match weight {
            Some((label, layer, arithmetic, weight_bytes)) => {
                r.layer = layer;
                (
                    label.to_string(),
                    arithmetic == Arithmetic::Int8,
                    weight_bytes,
                )
            }
            None => (String::new(), false, 0.0),
        };
        let row = r.rows.entry((op, label)).or_default();
        row.add(s, flops, bytes, weight_bytes);
        row.int8 = int8;
        let layer = r.layer;
        *r.layers.entry(layer).or_default() += s;
        out
    }
}

/// `blk.3.attn_q.weight` -> (`attn_q`, Some(3)); `output.weight` -> (`output`, None).
fn parse_name(name: &str) -> (String, Option<usize>) {
    let base = name.strip_suffix(".weight").unwrap_or(name);
    if let Some(rest) = base.strip_prefix("blk.")
        && let Some((n, label)) = rest.split_once('.')
        && let Ok(layer) = n.parse()
    {
        return (label.to_string(), Some(layer));
    }
    (base.to_string(), None)
}

const F32: f64 = 4.0;

impl<B: Backend> Backend for Profiled<B> {
    type Weight<'w>
        = Labeled<B::Weight<'w>>
    where
        Self: 'w;

    fn name(&self) -> String {
        self.inner.name()
    }

    fn threads(&self) -> usize {
        self.inner.threads()
    }

    fn supports(&self, op: Op, dtype: DType) -> Support {
        self.inner.supports(op, dtype)
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<Self::Weight<'w>, Error> {
        let (label, layer) = parse_name(w.name());
        let (rows, cols) = w.dims();
        let label = format!("{label} {rows}×{cols} {}", w.dtype());
        let bytes = w.bytes().len();
        let inner = self.inner.prepare(w)?;
        Ok(Labeled {
            bytes,
            arithmetic: self.inner.arithmetic(&inner),
            inner,
            label,
            layer,
        })
    }

    fn prepared(&self) {
        self.inner.prepared()
    }

    fn settle(&self) {
        self.inner.settle()
    }

    fn borrows_view(&self, w: &Self::Weight<'_>) -> bool {
        self.inner.borrows_view(&w.inner)
    }

    fn arithmetic(&self, w: &Self::Weight<'_>) -> Arithmetic {
        w.arithmetic
    }

    fn matmul(
        &self,
        x: &[f32],
        w: &Self::Weight<'_>,
        y: &mut [f32],
        m: usize,
    ) -> Result<(), Error> {
        let (n, k) = w.inner.dims();
        let flops = 2.0 * (m * n * k) as f64;
        let bytes = w.bytes as f64 + F32 * (x.len() + y.len()) as f64;
        self.timed(
            Op::Matmul,
            Some((&w.label, w.layer, w.arithmetic, w.bytes as f64)),
            flops,
            bytes,
            || self.inner.matmul(x, &w.inner, y, m),
        )
    }

    fn matmuls(
        &self,
        x: &[f32],
        ws: &[&Self::Weight<'_>],
        ys: &mut [&mut [f32]],
        m: usize,
    ) -> Result<(), Error> {
        let mut flops = 0.0;
        let (mut bytes, mut weight_bytes) = (F32 * x.len() as f64, 0.0);
        for (w, y) in ws.iter().zip(ys.iter()) {
            let (n, k) = w.inner.dims();
            flops += 2.0 * (m * n * k) as f64;
            bytes += w.bytes as f64 + F32 * y.len() as f64;
            weight_bytes += w.bytes as f64;
        }
        let label: Vec<&str> = ws
            .iter()
            .map(|w| w.label.split(' ').next().unwrap_or(""))
            .collect();
        let label = format!(
            "{} {}",
            label.join("+"),
            ws.first()
                .map_or("", |w| w.label.rsplit(' ').next().unwrap_or(""))
        );
        let layer = ws.first().and_then(|w| w.layer);
        let arithmetic = ws.first().map_or(Arithmetic::F32, |w| w.arithmetic);
        let inner: Vec<&B::Weight<'_>> = ws.iter().map(|w| &w.inner).collect();
        self.timed(
            Op::Matmul,
            Some((&label, layer, arithmetic, weight_bytes)),
            flops,
            bytes,
            || self.inner.matmuls(x, &inner, ys, m),
        )
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        let bytes = F32 * (2 * x.len() + weight.len()) as f64;
        self.timed(Op::RmsNorm, None, 0.0, bytes, || {
            self.inner.rmsnorm(x, weight, y, eps)
        })
    }

    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        let bytes = F32 * 2.0 * x.len() as f64;
        self.timed(Op::Rope, None, 0.0, bytes, || {
            self.inner.rope(x, rows, pos, p)
        })
    }

    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        let bytes = F32 * 2.0 * x.len() as f64;
        self.timed(Op::Softmax, None, 0.0, bytes, || {
            self.inner.softmax(x, cols, p)
        })
    }

    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        let bytes = F32 * 3.0 * y.len() as f64;
        self.timed(Op::SwiGlu, None, 0.0, bytes, || self.inner.swiglu(a, b, y))
    }

    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        let bytes = F32 * 3.0 * y.len() as f64;
        self.timed(Op::GeGlu, None, 0.0, bytes, || self.inner.geglu(a, b, y))
    }

    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        let bytes = F32 * 3.0 * y.len() as f64;
        self.timed(Op::Add, None, 0.0, bytes, || self.inner.add(y, x))
    }

    fn embedding(
        &self,
        table: &Self::Weight<'_>,
        token: usize,
        y: &mut [f32],
    ) -> Result<(), Error> {
        let bytes = F32 * y.len() as f64;
        self.timed(
            Op::Embedding,
            Some(("", None, Arithmetic::F32, 0.0)),
            0.0,
            bytes,
            || self.inner.embedding(&table.inner, token, y),
        )
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
        // Per query row i: pos + i + 1 cached positions, each a dot and an axpy per head.
        let positions: usize = (0..p.m)
            .map(|i| p.pos + i + 1 - p.first_visible(p.pos + i))
            .sum();
        let flops = 4.0 * (positions * p.n_heads * p.head_dim) as f64;
        let bytes = F32 * (q.len() + out.len() + k_cache.len() + v_cache.len()) as f64;
        self.timed(Op::Attention, None, flops, bytes, || {
            self.inner.attention(q, k_cache, v_cache, out, scores, p)
        })
    }
}

/// One row of a profile: an op (a matmul by the weight it multiplies), per token.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRow {
    pub op: String,
    /// The weight's role, shape and format, for matmuls; empty otherwise.
    pub weight: String,
    pub calls_per_token: f64,
    pub ms_per_token: f64,
    /// Share of the phase's time.
    pub share: f64,
    /// GB/s or GFLOP/s, as `unit` says.
    pub rate: f64,
    pub unit: &'static str,
    /// `rate` over the roof it is compared with.
    pub of_roof: f64,
}

/// A phase of a profile: prefill of `tokens` tokens in one pass, or decoding them one by one.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub tokens: usize,
    pub ms_per_token: f64,
    pub rows: Vec<ProfileRow>,
    /// Milliseconds per token of each layer (see the module docs for the attribution).
    pub layers_ms_per_token: Vec<f64>,
    /// Milliseconds per token outside the layers (embedding, final norm, classifier).
    pub outside_layers_ms_per_token: f64,
    /// Decode only: the weight bytes the matmuls read per token over the whole token's time
    /// (GB/s; how close decode comes to streaming the weights at the read roof), and that
    /// over the read roof.
    pub weights_gbs: Option<f64>,
    pub weights_of_roof: Option<f64>,
    /// Weight bytes read per token (MB).
    pub weights_mb_per_token: f64,
}

/// Profiles a prefill of `pp` tokens and a decode of `tg` tokens (each after `depth` cached
/// positions, 0 for an empty cache, and after one unrecorded warm-up), against the roofs
/// `roof` (at the backend's thread count).
pub fn run<B: Backend>(
    model: &crate::model::Model<'_, Profiled<B>>,
    pp: usize,
    tg: usize,
    depth: usize,
    roof: &super::Roof,
) -> Result<Vec<Phase>, crate::model::ModelError> {
    let super::Workload { tokens, mut state } = super::Workload::new(model, pp, tg, depth)?;
    let profiler = model.backend();
    let mut phases = Vec::new();
    let mut measure =
        |name: String, n: usize, decode: bool| -> Result<(), crate::model::ModelError> {
            for recorded in [false, true] {
                profiler.reset();
                state.pos = depth;
                let t = Instant::now();
                if decode {
                    for &tok in &tokens[..n] {
                        model.forward(&mut state, &[tok])?;
                    }
                } else {
                    model.forward(&mut state, &tokens[..n])?;
                }
                let wall = t.elapsed().as_secs_f64();
                if recorded {
                    let r = profiler.take();
                    phases.push(phase(name.clone(), n, wall, r, decode, roof));
                }
            }
            Ok(())
        };
    if pp > 0 {
        measure(
            format!("prefill ({})", super::test_name(&format!("pp{pp}"), depth)),
            pp,
            false,
        )?;
    }
    if tg > 0 {
        measure(
            format!("decode ({})", super::test_name(&format!("tg{tg}"), depth)),
            tg,
            true,
        )?;
    }
    Ok(phases)
}

fn phase(
    name: String,
    tokens: usize,
    wall: f64,
    Recorded { rows, layers }: Recorded,
    decode: bool,
    roof: &super::Roof,
) -> Phase {
    let per_token = |s: f64| 1e3 * s / tokens as f64;
    let weight_bytes: f64 = rows.iter().map(|(_, _, t)| t.weight_bytes).sum();
    let weights_gbs = decode.then(|| weight_bytes / wall / 1e9);
    let mut rows: Vec<ProfileRow> = rows
        .into_iter()
        .map(|(op, weight, t)| {
            let by_flops = matches!(op, Op::Attention) || (op == Op::Matmul && !decode);
            let (rate, unit, roof) = if by_flops && t.int8 {
                (t.flops / t.seconds / 1e9, "GOP/s", roof.int8_gops)
            } else if by_flops {
                (t.flops / t.seconds / 1e9, "GFLOP/s", roof.fma_gflops)
            } else {
                (t.bytes / t.seconds / 1e9, "GB/s", roof.read_gbs)
            };
            ProfileRow {
                op: op.name().to_string(),
                weight,
                calls_per_token: t.calls as f64 / tokens as f64,
                ms_per_token: per_token(t.seconds),
                share: t.seconds / wall,
                rate,
                unit,
                of_roof: rate / roof,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.ms_per_token.total_cmp(&a.ms_per_token));
    let outside = layers
        .iter()
        .filter(|(l, _)| l.is_none())
        .map(|(_, s)| *s)
        .sum();
    Phase {
        name,
        tokens,
        ms_per_token: per_token(wall),
        rows,
        layers_ms_per_token: layers
            .iter()
            .filter(|(l, _)| l.is_some())
            .map(|(_, s)| per_token(*s))
            .collect(),
        outside_layers_ms_per_token: per_token(outside),
        weights_gbs,
        weights_of_roof: weights_gbs.map(|r| r / roof.read_gbs),
        weights_mb_per_token: weight_bytes / tokens as f64 / 1e6,
    }
}

/// The phase as a table, with the time not spent inside any op (the model's own work:
/// copies into the KV cache, dispatch).
pub fn format(p: &Phase) -> String {
    let mut out = format!(
        "{}: {:.3} ms/token ({:.1} tokens/s)\n",
        p.name,
        p.ms_per_token,
        1e3 / p.ms_per_token
    );
    out += &format!(
        "  {:<10} {:<28} {:>9} {:>9} {:>7} {:>16} {:>7}\n",
        "op", "weight", "calls/tok", "ms/tok", "share", "rate", "roof"
    );
    let mut in_ops = 0.0;
    for r in &p.rows {
        in_ops += r.share;
        out += &format!(
            "  {:<10} {:<28} {:>9.1} {:>9.4} {:>6.1}% {:>8.1} {:<7} {:>6.0}%\n",
            r.op,
            r.weight,
            r.calls_per_token,
            r.ms_per_token,
            100.0 * r.share,
            r.rate,
            r.unit,
            100.0 * r.of_roof
        );
    }
    out += &format!(
        "  {:<39} {:>9} {:>9.4} {:>6.1}%\n",
        "outside the ops",
        "",
        p.ms_per_token * (1.0 - in_ops),
        100.0 * (1.0 - in_ops)
    );
    if !p.layers_ms_per_token.is_empty() {
        let mut l = p.layers_ms_per_token.clone();
        l.sort_by(f64::total_cmp);
        out += &format!(
            "  layers: {} of min {:.4} / median {:.4} / max {:.4} ms/token; outside the layers {:.4} ms/token\n",
            l.len(),
            l[0],
            l[l.len() / 2],
            l[l.len() - 1],
            p.outside_layers_ms_per_token
        );
    }
    if let (Some(gbs), Some(of_roof)) = (p.weights_gbs, p.weights_of_roof) {
        out += &format!(
            "  weights: {:.1} MB per token, read at {gbs:.1} GB/s over the whole token ({:.0}% of the read roof)\n",
            p.weights_mb_per_token,
            100.0 * of_roof
        );
    }
    out
}
