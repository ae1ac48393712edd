//! The research testbed: activations written to safetensors ([`dump`]) and the first point
//! where one backend departs from another ([`diverge`]), both through the model's
//! [`Observer`](crate::model::observe::Observer) hook.

use std::collections::BTreeMap;

use crate::backend::Backend;
use crate::model::observe::{Activation, Observer, Point, Recorder};
use crate::model::{Model, ModelError, State};

/// A forward pass over `tokens` from an empty cache, logits for every token, with
/// `observer` attached.
fn run_all<B: Backend, O: Observer>(
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
    let mut rec = Recorder::new(points, layers);
    run_all(model, tokens, &mut rec)?;
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
    /// Flat index (`row * cols + col`) of the element with the largest `|got - want|`.
    pub worst: usize,
    pub tolerance: f64,
}

impl PointError {
    fn of(layer: Option<usize>, point: Point, got: &[f32], want: &[f32], tolerance: f64) -> Self {
        let (mut max_abs, mut max_rel, mut worst, mut scale) = (0.0f64, 0.0f64, 0, 0.0f64);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let (g, w) = (g as f64, w as f64);
            // A NaN, or an infinity where the reference has none, is as far off as it gets.
            let e = if g == w { 0.0 } else { (g - w).abs() };
            let e = if e.is_nan() { f64::INFINITY } else { e };
            if e > max_abs {
                max_abs = e;
                worst = i;
            }
            if w != 0.0 {
                max_rel = max_rel.max(e / w.abs());
            }
            if w.is_finite() {
                scale = scale.max(w.abs());
            }
        }
        PointError {
            layer,
            point,
            max_abs,
            max_rel,
            scaled: if scale > 0.0 {
                max_abs / scale
            } else {
                max_abs
            },
            worst,
            tolerance,
        }
    }

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
/// In lockstep: the reference runs first, recording every activation; `model` then runs
/// with each activation compared and then replaced by the reference's, so that every op
/// starts from the reference's inputs and each error is that op's own (the first point past
/// `tolerance` is where the backend departs). A second pass of `model`, with nothing
/// replaced, measures how the error grows layer by layer. Works for any backend, inside
/// this crate or outside it.
pub fn diverge<A: Backend, R: Backend>(
    model: &Model<'_, A>,
    reference: &Model<'_, R>,
    tokens: &[u32],
    tolerance: f64,
) -> Result<Divergence, ModelError> {
    if model.config != reference.config {
        return Err(ModelError::Input(
            "diverge: the two models have different configurations".into(),
        ));
    }
    let mut rec = Recorder::new(None, None);
    run_all(reference, tokens, &mut rec)?;
    let want = rec.recorded;
    // Positions seen so far per (layer, point): prompts longer than a batch arrive in parts.
    let mut local: BTreeMap<(Option<usize>, Point), PointError> = BTreeMap::new();
    let mut order = Vec::new();
    let mut forced = |a: Activation<'_>| {
        let key = (a.layer, a.point);
        let Some((cols, w)) = want.get(&key) else {
            return;
        };
        let w = &w[a.positions.start * cols..a.positions.end * cols];
        let e = PointError::of(a.layer, a.point, a.data, w, tolerance);
        match local.get_mut(&key) {
            Some(prev) if prev.scaled >= e.scaled => {}
            Some(prev) => {
                let base = a.positions.start * cols;
                *prev = PointError {
                    worst: base + e.worst,
                    ..e
                };
            }
            None => {
                order.push(key);
                local.insert(key, e);
            }
        }
        a.data.copy_from_slice(w);
    };
    run_all(model, tokens, &mut forced)?;
    let local: Vec<PointError> = order.iter().map(|k| local[k].clone()).collect();
    let mut free = Recorder::new(Some(vec![Point::ResidFfn, Point::Logits]), None);
    run_all(model, tokens, &mut free)?;
    let growth = free
        .recorded
        .iter()
        .map(|(&(layer, point), (_, got))| {
            PointError::of(layer, point, got, &want[&(layer, point)].1, tolerance)
        })
        .collect();
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
    let free: BTreeMap<Option<usize>, &PointError> = d
        .growth
        .iter()
        .map(|e| {
            (
                if e.point == Point::Logits {
                    None
                } else {
                    e.layer
                },
                e,
            )
        })
        .collect();
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
