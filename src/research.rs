//! The research testbed: activations written to safetensors ([`dump`]) and the first point
//! where one backend departs from another ([`diverge`]), both through the model's
//! [`Observer`](crate::model::observe::Observer) hook.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::model::observe::{Activation, Observer, Point, Recorder};
use crate::model::{Model, ModelError, State};

/// A forward pass over `tokens` from an empty cache, logits for every token, with
/// `observer` attached.
fn run_all<B: Backend, O: Observer + ?Sized>(
    model: &Model<'_, B>,
    tokens: &[u32],
    observer: &mut O,
) -> Result<(), ModelError> {
    let mut state = State::new(
        &model.config,
        tokens.len().max(1),
        tokens.len().clamp(1, 512),
    );
    model.forward_all_observed(&mut state, tokens, observer)?;
    Ok(())
}

/// The name of a recorded activation: `layer.{l}.{point}` inside a layer, `{point}` outside.
pub fn tensor_name(layer: Option<usize>, point: Point) -> String {
    match layer {
        Some(l) => format!("layer.{l}.{point}"),
        None => point.name().to_string(),
    }
}

/// Records `points` (all when `None`) at `layers` (all when `None`) over a forward pass of
/// `tokens` and serialises them as safetensors: one f32 tensor `(tokens, cols)` per (layer,
/// point), named by [`tensor_name`], with `metadata` in the header.
pub fn dump<B: Backend>(
    model: &Model<'_, B>,
    tokens: &[u32],
    points: Option<Vec<Point>>,
    layers: Option<Vec<usize>>,
    metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>, ModelError> {
    if let Some(l) = layers
        .as_ref()
        .and_then(|ls| ls.iter().find(|&&l| l >= model.config.n_layers))
    {
        return Err(ModelError::Input(format!(
            "layer {l} does not exist: the model has layers 0 to {}",
            model.config.n_layers - 1
        )));
    }
    let mut rec = Recorder::new(points.clone(), layers);
    run_all(model, tokens, &mut rec)?;
    // A point asked for by name that the architecture never reaches (`q_norm` in a model
    // without q/k norms) is an error, not a file without it.
    if let Some(missing) = points
        .iter()
        .flatten()
        .find(|p| !rec.recorded.keys().any(|(_, q)| q == *p))
    {
        return Err(ModelError::Input(format!(
            "point {missing} does not occur in a forward pass of this model ({})",
            model.config.arch
        )));
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = rec
        .recorded
        .iter()
        .map(|(&(layer, point), (cols, data))| {
            // safetensors stores little-endian values, as x86-64 and AArch64 hold them.
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (
                tensor_name(layer, point),
                vec![data.len() / cols, *cols],
                bytes,
            )
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Input(format!("safetensors: {e}")))?;
    safetensors::tensor::serialize(views, Some(metadata.into_iter().collect()))
        .map_err(|e| ModelError::Input(format!("safetensors: {e}")))
}

/// How one activation of a backend compares with the reference's.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PointError {
    pub layer: Option<usize>,
    pub point: Point,
    /// Largest `|got - want|`.
    pub max_abs: f64,
    /// Largest `|got - want| / |want|` over elements with `want != 0`.
    pub max_rel: f64,
    /// `max_abs` over the reference's largest magnitude: the error on the activation's own
    /// scale, what the tolerance bounds.
    pub scaled: f64,
    /// Flat index (`token * cols + col`) of the element with the largest `|got - want|`.
    pub worst: usize,
    /// Values per token at the point.
    pub cols: usize,
    pub tolerance: f64,
}

/// Running maxima of a comparison over the batches of a pass.
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    max_abs: f64,
    max_rel: f64,
    /// The reference's largest finite magnitude.
    scale: f64,
    worst: usize,
}

impl Acc {
    /// Adds `got` against `want`, whose first element is element `base` of the whole pass.
    fn add(&mut self, got: &[f32], want: &[f32], base: usize) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let (g, w) = (g as f64, w as f64);
            // A NaN, or an infinity where the reference has none, is as far off as it gets.
            let e = if g == w { 0.0 } else { (g - w).abs() };
            let e = if e.is_nan() { f64::INFINITY } else { e };
            if e > self.max_abs {
                self.max_abs = e;
                self.worst = base + i;
            }
            if w != 0.0 {
                self.max_rel = self.max_rel.max(e / w.abs());
            }
            if w.is_finite() {
                self.scale = self.scale.max(w.abs());
            }
        }
    }

    fn error(self, layer: Option<usize>, point: Point, cols: usize, tolerance: f64) -> PointError {
        PointError {
            layer,
            point,
            max_abs: self.max_abs,
            max_rel: self.max_rel,
            scaled: if self.scale > 0.0 {
                self.max_abs / self.scale
            } else {
                self.max_abs
            },
            worst: self.worst,
            cols,
            tolerance,
        }
    }
}

impl PointError {
    /// Whether the error is over the tolerance (a NaN error always is).
    pub fn exceeds(&self) -> bool {
        self.scaled.is_nan() || self.scaled > self.tolerance
    }
}

/// The default tolerance of [`diverge`] on [`PointError::scaled`]: `1e-4` for f32 backends
/// (on the default model the built-in SIMD and scalar backends agree within `2e-6` at every
/// point, and a softmax rounded to bf16, 8 bits of mantissa, in one layer departs by
/// `1.6e-3` there: `tests/research.rs`), or `5e-2` when the backend computes in 8-bit
/// integers (fast mode rounds each activation block to 8 bits, `1/254` of its largest
/// value, before each matmul; it measured up to `1.9e-2` against scalar).
pub fn default_tolerance(int8: bool) -> f64 {
    if int8 { 5e-2 } else { 1e-4 }
}

/// What [`diverge`] found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Divergence {
    /// Every point, in the order of the pass: each op's own error, its inputs forced to the
    /// reference's.
    pub local: Vec<PointError>,
    /// The residual stream after each layer (`resid_ffn`) and the logits with nothing
    /// forced: how the error grows through the model.
    pub growth: Vec<PointError>,
    /// Index into `local` of the first point over its tolerance.
    pub first: Option<usize>,
}

/// Runs `model` and `reference` (the same file on two backends) over `tokens` and compares
/// them at every point of every layer.
///
/// The reference runs first, recording every activation; `model` then runs with each
/// activation compared and then replaced by the reference's, so that every op starts from
/// the reference's inputs and each error is that op's own (the first point past `tolerance`
/// is where the backend departs). A second pass of `model`, with nothing replaced, measures
/// how the error grows layer by layer. Works for any backend, inside this crate or outside
/// it. Memory: the reference's activations at every point, `tokens × n_layers × (8 dim +
/// 3 kv_dim + 3 ffn) + tokens × vocab` f32 (about 2.3 MB per token on the default model):
/// meant for prompts of tens to hundreds of tokens.
pub fn diverge<A: Backend, R: Backend>(
    model: &Model<'_, A>,
    reference: &Model<'_, R>,
    tokens: &[u32],
    tolerance: f64,
) -> Result<Divergence, ModelError> {
    if tolerance.is_nan() || tolerance < 0.0 {
        return Err(ModelError::Input(format!(
            "diverge: the tolerance {tolerance} is not a number >= 0"
        )));
    }
    if model.config != reference.config {
        return Err(ModelError::Input(
            "diverge: the two models have different configurations".into(),
        ));
    }
    let mut rec = Recorder::new(None, None);
    run_all(reference, tokens, &mut rec)?;
    let want = rec.recorded;
    // Running maxima per (layer, point), in the order the pass reaches them: a prompt longer
    // than a batch arrives in parts.
    let mut local: BTreeMap<(Option<usize>, Point), Acc> = BTreeMap::new();
    let mut order = Vec::new();
    let mut forced = |a: Activation<'_>| {
        let key = (a.layer, a.point);
        let Some((cols, w)) = want.get(&key) else {
            return;
        };
        let w = &w[a.positions.start * cols..a.positions.end * cols];
        local
            .entry(key)
            .or_insert_with(|| {
                order.push(key);
                Acc::default()
            })
            .add(a.data, w, a.positions.start * cols);
        a.data.copy_from_slice(w);
    };
    run_all(model, tokens, &mut forced)?;
    let local: Vec<PointError> = order
        .iter()
        .map(|&(layer, point)| {
            local[&(layer, point)].error(layer, point, want[&(layer, point)].0, tolerance)
        })
        .collect();
    let mut free = Recorder::new(Some(vec![Point::ResidFfn, Point::Logits]), None);
    run_all(model, tokens, &mut free)?;
    // Layers in order, then the logits.
    let mut growth: Vec<PointError> = free
        .recorded
        .iter()
        .map(|(&(layer, point), (cols, got))| {
            let mut acc = Acc::default();
            acc.add(got, &want[&(layer, point)].1, 0);
            acc.error(layer, point, *cols, tolerance)
        })
        .collect();
    growth.sort_by_key(|e| e.layer.map_or(usize::MAX, |l| l));
    let first = local.iter().position(PointError::exceeds);
    Ok(Divergence {
        local,
        growth,
        first,
    })
}

/// The report `chord diverge` prints: the first departure, then per layer its worst local
/// error and the free-running error of its output.
pub fn format_divergence(d: &Divergence, backend: &str, reference: &str) -> String {
    let mut out = String::new();
    match d.first.map(|i| &d.local[i]) {
        Some(e) => {
            out += &format!(
                "{backend} departs from {reference} at {}: scaled error {:.3e} > tolerance {:.1e} (max abs {:.3e}, max rel {:.3e}, worst element {})\n",
                tensor_name(e.layer, e.point),
                e.scaled,
                e.tolerance,
                e.max_abs,
                e.max_rel,
                e.worst
            );
        }
        None => {
            out += &format!(
                "{backend} agrees with {reference} at every point (tolerance {:.1e} on the scaled error)\n",
                d.local.first().map_or(0.0, |e| e.tolerance)
            );
        }
    }
    out += &format!(
        "\n{:<7} {:<12} {:>12} {:>12}   {:>18}\n",
        "layer", "worst point", "local err", "max rel", "resid_ffn, free"
    );
    // resid_ffn per layer, and the logits (outside the layers) on the last line.
    let free: BTreeMap<Option<usize>, &PointError> =
        d.growth.iter().map(|e| (e.layer, e)).collect();
    let mut rows: BTreeMap<Option<usize>, &PointError> = BTreeMap::new();
    for e in &d.local {
        let slot = rows.entry(e.layer).or_insert(e);
        if e.scaled > slot.scaled {
            *slot = e;
        }
    }
    // Layers in order, then the points outside them (embedding, final norm, logits).
    let mut keys: Vec<Option<usize>> = rows.keys().copied().filter(Option::is_some).collect();
    keys.push(None);
    for l in keys {
        let Some(e) = rows.get(&l) else { continue };
        let layer = l.map_or("-".to_string(), |l| l.to_string());
        let free = free
            .get(&l)
            .map_or(String::new(), |f| format!("{:.3e}", f.scaled));
        out += &format!(
            "{layer:<7} {:<12} {:>12.3e} {:>12.3e}   {free:>18}{}\n",
            e.point.name(),
            e.scaled,
            e.max_rel,
            if e.exceeds() { "  <- over" } else { "" }
        );
    }
    out += "(errors scaled by the reference's largest magnitude at the point; \"free\": the \
            second pass, nothing forced, at resid_ffn, or the logits on the last line)\n";
    out
}
