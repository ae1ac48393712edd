//! Shape and parameter checks at the library boundary: one function per op, each returning
//! an [`Error`] that names the op and the shapes it was given.

use super::{AttentionParams, Error, RopeParams, SoftmaxParams};

fn shape(op: &'static str, detail: String) -> Error {
    Error::Shape { op, detail }
}

fn param(op: &'static str, detail: String) -> Error {
    Error::Param { op, detail }
}

/// `x (m, k) · W (n, k)ᵀ -> y (m, n)`, with `(n, k) = w_dims`.
pub fn matmul(x: usize, w_dims: (usize, usize), y: usize, m: usize) -> Result<(), Error> {
    let (n, k) = w_dims;
    if m == 0 || n == 0 || k == 0 {
        return Err(shape(
            "matmul",
            format!("empty dimension: m = {m}, W is {n} × {k}"),
        ));
    }
    if m.checked_mul(k) != Some(x) {
        return Err(shape(
            "matmul",
            format!("x has {x} values, expected m × k = {m} × {k} (W is {n} × {k})"),
        ));
    }
    if m.checked_mul(n) != Some(y) {
        return Err(shape(
            "matmul",
            format!("y has {y} values, expected m × n = {m} × {n} (W is {n} × {k})"),
        ));
    }
    Ok(())
}

/// `x (rows, dim)`, `weight (dim,)`, `y (rows, dim)`, finite non-negative `eps`.
pub fn rmsnorm(x: usize, weight: usize, y: usize, eps: f32) -> Result<(), Error> {
    if weight == 0 || x == 0 || !x.is_multiple_of(weight) {
        return Err(shape(
            "rmsnorm",
            format!("x has {x} values, not a positive multiple of the weight's {weight}"),
        ));
    }
    if y != x {
        return Err(shape("rmsnorm", format!("y has {y} values, x has {x}")));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(param(
            "rmsnorm",
            format!("eps = {eps}, expected a finite value >= 0"),
        ));
    }
    Ok(())
}

/// `x (rows, n_heads * head_dim)` with an even `head_dim`, positions that fit in f32 exactly.
pub fn rope(x: usize, rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
    let d = p.head_dim;
    if d == 0 || !d.is_multiple_of(2) {
        return Err(param(
            "rope",
            format!("head_dim = {d}, expected a positive even number"),
        ));
    }
    if !(p.theta.is_finite() && p.theta > 1.0) {
        return Err(param(
            "rope",
            format!("theta = {}, expected a finite value > 1", p.theta),
        ));
    }
    if rows == 0 || x == 0 || rows.checked_mul(d).is_none_or(|rd| !x.is_multiple_of(rd)) {
        return Err(shape(
            "rope",
            format!("x has {x} values, not {rows} rows of whole heads of {d}"),
        ));
    }
    if pos.checked_add(rows).is_none_or(|end| end > 1 << 24) {
        return Err(param(
            "rope",
            format!("positions {pos}..{pos}+{rows} exceed 2^24"),
        ));
    }
    Ok(())
}

/// `x (rows, cols)`, finite positive scale.
pub fn softmax(x: usize, cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
    if cols == 0 || x == 0 || !x.is_multiple_of(cols) {
        return Err(shape(
            "softmax",
            format!("x has {x} values, not a positive number of rows of {cols}"),
        ));
    }
    if !(p.scale.is_finite() && p.scale > 0.0) {
        return Err(param(
            "softmax",
            format!("scale = {}, expected a finite value > 0", p.scale),
        ));
    }
    Ok(())
}

/// `a`, `b`, `y` of one length.
pub fn swiglu(a: usize, b: usize, y: usize) -> Result<(), Error> {
    gate("swiglu", a, b, y)
}

/// `a`, `b`, `y` of one length.
pub fn geglu(a: usize, b: usize, y: usize) -> Result<(), Error> {
    gate("geglu", a, b, y)
}

fn gate(op: &'static str, a: usize, b: usize, y: usize) -> Result<(), Error> {
    if a != b || a != y {
        return Err(shape(
            op,
            format!("a has {a} values, b {b}, y {y}; expected equal lengths"),
        ));
    }
    Ok(())
}

/// `y`, `x` of one length.
pub fn add(y: usize, x: usize) -> Result<(), Error> {
    if y != x {
        return Err(shape(
            "add",
            format!("y has {y} values, x {x}; expected equal lengths"),
        ));
    }
    Ok(())
}

/// Row `token` of a `(vocab, dim)` table into `y (dim,)`.
pub fn embedding(table: (usize, usize), token: usize, y: usize) -> Result<(), Error> {
    let (vocab, dim) = table;
    if token >= vocab {
        return Err(shape(
            "embedding",
            format!("token {token} is outside the table's {vocab} rows"),
        ));
    }
    if y != dim {
        return Err(shape(
            "embedding",
            format!("y has {y} values, the table's rows have {dim}"),
        ));
    }
    Ok(())
}

/// `q`, `out (m, n_heads * head_dim)`; caches of at least `pos + m` rows of
/// `n_kv_heads * head_dim`; `scores` of at least `pos + m`.
pub fn attention(
    q: usize,
    k_cache: usize,
    v_cache: usize,
    out: usize,
    scores: usize,
    p: &AttentionParams,
) -> Result<(), Error> {
    let op = "attention";
    if p.m == 0
        || p.n_heads == 0
        || p.n_kv_heads == 0
        || p.head_dim == 0
        || !p.n_heads.is_multiple_of(p.n_kv_heads)
    {
        return Err(param(
            op,
            format!(
                "m = {}, {} heads over {} kv heads of {}: expected positive sizes, kv heads dividing heads",
                p.m, p.n_heads, p.n_kv_heads, p.head_dim
            ),
        ));
    }
    if !(p.scale.is_finite() && p.scale > 0.0) || p.window == Some(0) {
        return Err(param(
            op,
            format!(
                "scale {} and window {:?}: expected a positive finite scale and a window of at least one position",
                p.scale, p.window
            ),
        ));
    }
    let t_len = p
        .pos
        .checked_add(p.m)
        .ok_or_else(|| param(op, "position overflows".into()))?;
    let q_len = p.m.checked_mul(p.n_heads * p.head_dim);
    if q_len != Some(q) || q_len != Some(out) {
        return Err(shape(
            op,
            format!(
                "q has {q} values, out {out}; expected m × n_heads × head_dim = {} × {} × {}",
                p.m, p.n_heads, p.head_dim
            ),
        ));
    }
    let cache = t_len.checked_mul(p.n_kv_heads * p.head_dim);
    if cache.is_none_or(|c| k_cache < c || v_cache < c) {
        return Err(shape(
            op,
            format!(
                "caches of {k_cache} and {v_cache} values cannot hold {t_len} positions of {} kv heads × {}",
                p.n_kv_heads, p.head_dim
            ),
        ));
    }
    if scores < t_len {
        return Err(shape(
            op,
            format!("scores has {scores} values, needs {t_len}"),
        ));
    }
    Ok(())
}
