//! Reading and editing the activations of a forward pass.
//!
//! The model (not the backend) calls an [`Observer`] at each named [`Point`] of the forward
//! pass with the activation there, as `&mut [f32]` of `(rows, cols)`: one row per token of
//! the batch, at the positions [`Activation::positions`] says. An observer may record it or
//! change it (zero a head, patch in an activation from another prompt, add a steering
//! vector); the pass goes on with what the observer left. [`NoObserver`], the one
//! [`Model::forward`](super::Model::forward) uses, does nothing and compiles away.
//!
//! The points, in the order a layer calls them (names as `chord dump --points` takes them;
//! cols: `dim`, `attn` = `n_heads · head_dim` (`dim` in llama models, not in Gemma 3 or
//! Qwen3), `kv_dim` = `n_kv_heads · head_dim`, `ffn` = the feed-forward width):
//!
//! | point | layer | cols | what |
//! |---|---|---|---|
//! | `embedding` | — | dim | the token embeddings (times `sqrt(dim)` in Gemma) |
//! | `attn_norm` | l | dim | RMSNorm before attention |
//! | `q`, `k`, `v` | l | attn, kv_dim, kv_dim | the projections (with their biases in Qwen2), before RoPE |
//! | `q_norm`, `k_norm` | l | attn, kv_dim | after the per-head norms (Gemma 3, Qwen3 only) |
//! | `q_rope`, `k_rope` | l | attn, kv_dim | after RoPE (`k_rope` is what the KV cache stores) |
//! | `attn` | l | attn | attention's output per head (head `h` at cols `h·head_dim ..`), before `attn_output` |
//! | `attn_out` | l | dim | after the `attn_output` projection |
//! | `attn_post_norm` | l | dim | `attn_out` after its post-norm (Gemma 3 only) |
//! | `resid_attn` | l | dim | the residual stream after attention |
//! | `ffn_norm` | l | dim | RMSNorm before the feed-forward |
//! | `gate`, `up` | l | ffn | the two projections |
//! | `act` | l | ffn | `silu(gate) · up`, or `gelu(gate) · up` (Gemma) |
//! | `ffn_out` | l | dim | after `ffn_down` |
//! | `ffn_post_norm` | l | dim | `ffn_out` after its post-norm (Gemma 3 only) |
//! | `resid_ffn` | l | dim | the residual stream after the layer (the next layer's input) |
//! | `final_norm` | — | dim | the final RMSNorm, of the rows whose logits are computed |
//! | `logits` | — | vocab | the classifier's output, of those rows |
//!
//! `final_norm` and `logits` cover the rows whose logits the call computes: the last token
//! for [`Model::forward`](super::Model::forward), every token for
//! [`Model::forward_all`](super::Model::forward_all).

use std::ops::Range;

/// A named point of the forward pass (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Point {
    Embedding,
    AttnNorm,
    Q,
    K,
    V,
    /// After the per-head norm of q (models with q/k norms only).
    QNorm,
    /// After the per-head norm of k (models with q/k norms only).
    KNorm,
    QRope,
    KRope,
    Attn,
    AttnOut,
    /// The attention output after its post-norm (models with post-norms only).
    AttnPostNorm,
    ResidAttn,
    FfnNorm,
    Gate,
    Up,
    Act,
    FfnOut,
    /// The feed-forward output after its post-norm (models with post-norms only).
    FfnPostNorm,
    ResidFfn,
    FinalNorm,
    Logits,
}

impl Point {
    /// Every point, in the order a forward pass reaches them.
    pub const ALL: [Point; 22] = [
        Point::Embedding,
        Point::AttnNorm,
        Point::Q,
        Point::K,
        Point::V,
        Point::QNorm,
        Point::KNorm,
        Point::QRope,
        Point::KRope,
        Point::Attn,
        Point::AttnOut,
        Point::AttnPostNorm,
        Point::ResidAttn,
        Point::FfnNorm,
        Point::Gate,
        Point::Up,
        Point::Act,
        Point::FfnOut,
        Point::FfnPostNorm,
        Point::ResidFfn,
        Point::FinalNorm,
        Point::Logits,
    ];

    /// The name `chord dump --points` takes and tensors are named with.
    pub fn name(self) -> &'static str {
        match self {
            Point::Embedding => "embedding",
            Point::AttnNorm => "attn_norm",
            Point::Q => "q",
            Point::K => "k",
            Point::V => "v",
            Point::QNorm => "q_norm",
            Point::KNorm => "k_norm",
            Point::QRope => "q_rope",
            Point::KRope => "k_rope",
            Point::Attn => "attn",
            Point::AttnOut => "attn_out",
            Point::AttnPostNorm => "attn_post_norm",
            Point::ResidAttn => "resid_attn",
            Point::FfnNorm => "ffn_norm",
            Point::Gate => "gate",
            Point::Up => "up",
            Point::Act => "act",
            Point::FfnOut => "ffn_out",
            Point::FfnPostNorm => "ffn_post_norm",
            Point::ResidFfn => "resid_ffn",
            Point::FinalNorm => "final_norm",
            Point::Logits => "logits",
        }
    }

    /// Whether the point is inside a layer (it then comes with the layer's index).
    pub fn in_layer(self) -> bool {
        !matches!(self, Point::Embedding | Point::FinalNorm | Point::Logits)
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Point {
    type Err = String;
    fn from_str(s: &str) -> Result<Point, String> {
        Point::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Point::ALL.iter().map(|p| p.name()).collect();
                format!("unknown point '{s}': expected one of {}", names.join(", "))
            })
    }
}

/// The activation at a point: `data (rows, cols)`, row `r` the token at position
/// `positions.start + r`.
#[derive(Debug)]
pub struct Activation<'a> {
    pub point: Point,
    /// The layer, for points inside one ([`Point::in_layer`]).
    pub layer: Option<usize>,
    pub positions: Range<usize>,
    pub rows: usize,
    pub cols: usize,
    /// Row-major; what the observer leaves here is what the pass goes on with.
    pub data: &'a mut [f32],
}

/// Called by the model at every [`Point`] of a forward pass (see the module docs).
pub trait Observer {
    fn observe(&mut self, a: Activation<'_>);
}

/// Observes nothing; the calls compile away.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    #[inline(always)]
    fn observe(&mut self, _: Activation<'_>) {}
}

/// Any closure over an [`Activation`] is an observer.
impl<F: FnMut(Activation<'_>)> Observer for F {
    fn observe(&mut self, a: Activation<'_>) {
        self(a)
    }
}

/// Records copies of the activations at chosen points and layers, in order of position: a
/// prompt run in several batches gives one `(tokens, cols)` matrix per (layer, point).
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    points: Option<Vec<Point>>,
    layers: Option<Vec<usize>>,
    /// `(layer, point)` -> (cols, rows appended in order).
    pub recorded: std::collections::BTreeMap<(Option<usize>, Point), (usize, Vec<f32>)>,
}

impl Recorder {
    /// Records `points` (all when `None`) at `layers` (all when `None`; points outside the
    /// layers are recorded whenever chosen).
    pub fn new(points: Option<Vec<Point>>, layers: Option<Vec<usize>>) -> Recorder {
        Recorder {
            points,
            layers,
            recorded: Default::default(),
        }
    }

    /// Whether `(layer, point)` is recorded.
    pub fn wants(&self, layer: Option<usize>, point: Point) -> bool {
        self.points.as_ref().is_none_or(|p| p.contains(&point))
            && match (layer, &self.layers) {
                (Some(l), Some(ls)) => ls.contains(&l),
                _ => true,
            }
    }
}

impl Observer for Recorder {
    fn observe(&mut self, a: Activation<'_>) {
        if self.wants(a.layer, a.point) {
            let (cols, data) = self
                .recorded
                .entry((a.layer, a.point))
                .or_insert_with(|| (a.cols, Vec::new()));
            data.extend_from_slice(a.data);
            debug_assert_eq!(*cols, a.cols);
        }
    }
}
