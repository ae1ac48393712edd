//! The SIMD backend: chord-kernels' vector kernels at one instruction-set level.

use chord_kernels::arena::Arena;
use chord_kernels::simd::{
    self, AttentionScratch, AttentionShape, BlockScratch, BlockWeight, GemmScratch, IntScratch,
    Isa, Layout, Level, PackedWeight, RepackedWeight, RopeTable,
};
use chord_kernels::team::Team;
use std::sync::Mutex;

use super::{
    Arithmetic, AttentionParams, Backend, DType, Error, PreparedWeight, RopeParams, SoftmaxParams,
    Support, WeightView, check,
};

/// How the SIMD backend computes on quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// f32 arithmetic on the weights' exact values: each block decoded in registers (or into
    /// a cache-resident panel when prefilling), never the whole weight at once. The same
    /// numbers as an F32 model, up to the order of sums.
    Exact,
    /// Weights of every block format, repacked sixteen rows together when prepared, multiply
    /// 8-bit quantized activations in integer dot products, as ggml does (see
    /// `chord_kernels::simd::qint`). The float formats compute as in exact mode, and so does
    /// the classifier (`output.weight`, or the tied `token_embd.weight`): rounding its input
    /// to 8 bits goes straight into the logits, and measured a third of fast mode's KL
    /// divergence from exact mode (0.0030 against 0.0022 over the GPL-3 text).
    Fast,
}

impl Mode {
    /// `exact` or `fast`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Exact => "exact",
            Mode::Fast => "fast",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "exact" => Ok(Mode::Exact),
            "fast" => Ok(Mode::Fast),
            _ => Err(format!("unknown mode '{s}': expected exact or fast")),
        }
    }
}

/// A weight prepared by [`SimdBackend`].
pub enum SimdWeight<'w> {
    /// Rows of blocks as the file stores them, borrowed: the formats that are not repacked.
    Blocks(BlockWeight<'w>),
    /// Every block format: the same bytes regrouped sixteen rows at a time, in the layout of
    /// the mode's kernels (`Values` for exact f32 math, `Dots` for fast mode's integer dot
    /// products).
    Repacked(RepackedWeight),
    /// f32 in the GEMM microkernel's panel layout: rows whose length is no multiple of 32
    /// (the block kernels' unit), dequantized and packed once.
    Packed(PackedWeight),
}

impl PreparedWeight for SimdWeight<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            SimdWeight::Packed(p) => (p.rows(), p.cols()),
            SimdWeight::Blocks(b) => (b.n, b.k),
            SimdWeight::Repacked(r) => (r.rows(), r.cols()),
        }
    }

    /// Every format runs natively (rows of a multiple of 32 values; other rows are
    /// dequantized when prepared).
    fn support(_dtype: DType) -> Support {
        Support::Native
    }
}

/// Runs every op with explicit vector kernels at one [`Level`] (the widest this CPU runs,
/// unless forced). Weights stay as the file stores them and are decoded on the fly
/// ([`Mode::Exact`], the default) or multiplied in integers ([`Mode::Fast`]). Matmuls are
/// split over the backend's own [`Team`] of `threads` threads, by the task index, so results
/// are bitwise identical for any thread count; attention and the per-row ops split over the
/// same team where the rows pay for it.
#[derive(Debug)]
pub struct SimdBackend {
    isa: Isa,
    mode: Mode,
    team: Team,
    scratch: GemmScratch,
    block_scratch: BlockScratch,
    attention_scratch: AttentionScratch,
    /// RoPE angles of the last few runs of positions and bases (`ROPE_RUNS`): the queries
    /// and keys of every layer of a forward pass share them.
    rope_table: Mutex<RopeTable>,
    /// Quantized activation rows of fast mode, grown to the largest call.
    int_scratch: IntScratch,
    /// Where prepared (repacked, packed) weights live: side by side on huge pages, which
    /// fast-mode decode streamed up to 1.45x as fast as from scattered 4 KiB pages
    /// (see `chord_kernels::arena`).
    arena: Arena,
}

impl SimdBackend {
    /// The widest level this CPU runs, on `threads` threads, in exact mode.
    pub fn new(threads: usize) -> Result<Self, Error> {
        Self::build(Isa::best(), threads)
    }

    /// A forced level; an error if this CPU does not run it.
    pub fn with_level(level: Level, threads: usize) -> Result<Self, Error> {
        let isa = Isa::new(level).ok_or_else(|| {
            Error::Unavailable(format!(
                "this CPU does not run the {} kernels",
                level.name()
            ))
        })?;
        Self::build(isa, threads)
    }

    /// The same backend computing in `mode`.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    fn build(isa: Isa, threads: usize) -> Result<Self, Error> {
        if threads == 0 {
            return Err(Error::Unavailable(
                "a backend needs at least one thread".into(),
            ));
        }
        let team = Team::new(threads)
            .map_err(|e| Error::Unavailable(format!("cannot start {threads} threads: {e}")))?;
        Ok(SimdBackend {
            isa,
            mode: Mode::Exact,
            team,
            scratch: GemmScratch::new(threads),
            block_scratch: BlockScratch::new(threads),
            attention_scratch: AttentionScratch::new(threads),
            rope_table: Mutex::new(RopeTable::default()),
            int_scratch: IntScratch::new(),
            arena: Arena::promoted_later(),
        })
    }

    /// The instruction-set level the kernels run at.
    pub fn level(&self) -> Level {
        self.isa.level()
    }

    /// How quantized weights are computed on.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The repacked layout a weight takes: fast mode's integer dot products for every
    /// weight but the classifier; exact mode's otherwise.
    fn layout(&self, name: &str) -> Layout {
        if self.mode == Mode::Fast && !is_classifier(name) {
            Layout::Dots
        } else {
            Layout::Values
        }
    }
}

/// The output of an op shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}
impl Out {
    /// Rows `r` of `width` values.
    ///
    /// # Safety
    /// The rows lie inside the output, and no other task touches them meanwhile.
    unsafe fn rows<'a>(self, r: std::ops::Range<usize>, width: usize) -> &'a mut [f32] {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(r.start * width), r.len() * width) }
    }
}

impl SimdBackend {
    /// Repacked weights of one layout that read the same `x`, as one job.
    fn matmuls_repacked(&self, x: &[f32], ws: &[&RepackedWeight], ys: &mut [&mut [f32]], m: usize) {
        match ws.first().map(|w| w.layout()) {
            Some(Layout::Dots) => {
                simd::matmuls_int(self.isa, &self.team, &self.int_scratch, x, ws, ys, m)
            }
            Some(Layout::Values) => {
                simd::matmuls_grouped(self.isa, &self.team, &self.block_scratch, x, ws, ys, m)
            }
            None => {}
        }
    }
}

/// The layout of the first weight, if it is repacked.
fn first_layout(ws: &[&SimdWeight<'_>]) -> Option<Layout> {
    match ws.first() {
        Some(SimdWeight::Repacked(r)) => Some(r.layout()),
        _ => None,
    }
}

/// Rows of a per-row op (RMSNorm, RoPE, softmax) below which it runs on one thread.
const ROWS_PER_TASK: usize = 32;
/// Values of an elementwise op (SwiGLU, GEGLU, add) below which it runs on one thread.
const VALUES_PER_TASK: usize = 32 * 1024;

impl SimdBackend {
    /// Runs `f` over `0..units` split into contiguous ranges of at least `min` units, one per
    /// task: the whole range on the calling thread when it is small (a decoded token's rows).
    fn split(&self, units: usize, min: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let tasks = (units / min.max(1)).clamp(1, self.team.threads());
        if tasks == 1 {
            return f(0..units);
        }
        self.team
            .run(tasks, &|t| f(units * t / tasks..units * (t + 1) / tasks));
    }

    /// An elementwise gate kernel `f(isa, a, b, y)` over the team.
    fn gate(&self, a: &[f32], b: &[f32], y: &mut [f32], f: fn(Isa, &[f32], &[f32], &mut [f32])) {
        let out = Out(y.as_mut_ptr());
        self.split(y.len(), VALUES_PER_TASK, &|r| {
            // SAFETY: values r of y belong to this task alone.
            let y = unsafe { out.rows(r.clone(), 1) };
            f(self.isa, &a[r.clone()], &b[r], y);
        });
    }
}

impl Backend for SimdBackend {
    type Weight<'w> = SimdWeight<'w>;

    fn name(&self) -> String {
        format!("simd-{}", self.isa.level().name())
    }

    fn threads(&self) -> usize {
        self.team.threads()
    }

    fn prepare<'w>(&self, w: WeightView<'w>) -> Result<SimdWeight<'w>, Error> {
        let (rows, cols) = w.dims();
        if let Some(b) = BlockWeight::new(w.dtype(), rows, cols, w.bytes()) {
            let layout = self.layout(w.name());
            let release = |part: &[u8]| w.release(part);
            return Ok(
                match RepackedWeight::new(&self.arena, &self.team, &b, layout, release) {
                    Some(r) => SimdWeight::Repacked(r),
                    None => SimdWeight::Blocks(b),
                },
            );
        }
        Ok(SimdWeight::Packed(simd::pack_weight(
            &self.arena,
            self.isa,
            &w.to_f32(),
            rows,
            cols,
        )))
    }

    /// Moves the repacked and packed weights onto huge pages, in the background.
    fn prepared(&self) {
        self.arena.promote()
    }

    fn settle(&self) {
        self.arena.settle()
    }

    /// Rows of blocks read the view; repacked and packed weights are copies.
    fn borrows_view(&self, w: &SimdWeight<'_>) -> bool {
        matches!(w, SimdWeight::Blocks(_))
    }

    fn arithmetic(&self, w: &SimdWeight<'_>) -> Arithmetic {
        match w {
            SimdWeight::Repacked(r) if r.layout() == Layout::Dots => Arithmetic::Int8,
            _ => Arithmetic::F32,
        }
    }

    fn matmul(&self, x: &[f32], w: &SimdWeight<'_>, y: &mut [f32], m: usize) -> Result<(), Error> {
        check::matmul(x.len(), self.weight_dims(w), y.len(), m)?;
        match w {
            SimdWeight::Packed(p) => {
                if p.isa() != self.isa {
                    return Err(Error::Param {
                        op: "matmul",
                        detail: format!(
                            "weight packed for {}, backend runs {}",
                            p.isa().level().name(),
                            self.isa.level().name()
                        ),
                    });
                }
                simd::matmul(&self.team, &self.scratch, x, p, y, m);
            }
            SimdWeight::Repacked(r) => self.matmuls_repacked(x, &[r], &mut [y], m),
            SimdWeight::Blocks(b) => {
                simd::matmul_blocks(self.isa, &self.team, &self.block_scratch, x, b, y, m)
            }
        }
        Ok(())
    }

    /// Block weights in exact mode run as one job (one dispatch for q, k and v); others one
    /// by one.
    fn matmuls(
        &self,
        x: &[f32],
        ws: &[&SimdWeight<'_>],
        ys: &mut [&mut [f32]],
        m: usize,
    ) -> Result<(), Error> {
        if ws.len() != ys.len() {
            return Err(Error::Shape {
                op: "matmuls",
                detail: format!("{} weights but {} outputs", ws.len(), ys.len()),
            });
        }
        // The fused kernels below take the shapes on trust: check them all first.
        for (w, y) in ws.iter().zip(ys.iter()) {
            check::matmul(x.len(), self.weight_dims(w), y.len(), m)?;
        }
        // Up to four at once, all of one kind, without allocating.
        if ws.len() <= 4 {
            if let Some(blocks) = all_of(ws, |w| match w {
                SimdWeight::Blocks(b) => Some(*b),
                _ => None,
            }) {
                let blocks = &blocks[..ws.len()];
                simd::matmuls_blocks(self.isa, &self.team, &self.block_scratch, x, blocks, ys, m);
                return Ok(());
            }
            if let Some(reps) = all_of(ws, |w| match w {
                SimdWeight::Repacked(r) if Some(r.layout()) == first_layout(ws) => Some(r),
                _ => None,
            }) {
                self.matmuls_repacked(x, &reps[..ws.len()], ys, m);
                return Ok(());
            }
        }
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            self.matmul(x, w, y, m)?;
        }
        Ok(())
    }

    /// Vector dots and sums, the (row, head) pairs split over the team; `scores` is unused
    /// (each task keeps its own).
    fn attention(
        &self,
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        out: &mut [f32],
        scores: &mut [f32],
        p: &AttentionParams,
    ) -> Result<(), Error> {
        check::attention(
            q.len(),
            k_cache.len(),
            v_cache.len(),
            out.len(),
            scores.len(),
            p,
        )?;
        let shape = AttentionShape {
            m: p.m,
            pos: p.pos,
            n_heads: p.n_heads,
            n_kv_heads: p.n_kv_heads,
            head_dim: p.head_dim,
            scale: p.scale,
            window: p.window,
        };
        simd::attention(
            self.isa,
            &self.team,
            &self.attention_scratch,
            q,
            k_cache,
            v_cache,
            out,
            &shape,
        );
        Ok(())
    }

    fn rmsnorm(&self, x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
        check::rmsnorm(x.len(), weight.len(), y.len(), eps)?;
        let dim = weight.len();
        let out = Out(y.as_mut_ptr());
        self.split(x.len() / dim, ROWS_PER_TASK, &|r| {
            // SAFETY: rows r of y belong to this task alone.
            let y = unsafe { out.rows(r.clone(), dim) };
            simd::rmsnorm(
                self.isa,
                &x[r.start * dim..r.end * dim],
                weight,
                y,
                dim,
                eps,
            );
        });
        Ok(())
    }

    fn rope(&self, x: &mut [f32], rows: usize, pos: usize, p: &RopeParams) -> Result<(), Error> {
        check::rope(x.len(), rows, pos, p)?;
        let width = x.len() / rows;
        if p.head_dim > simd::ROPE_MAX_HEAD_DIM {
            simd::rope(self.isa, x, rows, pos, p);
            return Ok(());
        }
        let mut table = self.rope_table.lock().unwrap_or_else(|e| e.into_inner());
        let table = table.prepare(&self.team, rows, pos, p);
        let out = Out(x.as_mut_ptr());
        self.split(rows, ROWS_PER_TASK, &|r| {
            // SAFETY: rows r of x belong to this task alone.
            let x = unsafe { out.rows(r.clone(), width) };
            let (cos, sin) = table.rows(r, p.head_dim);
            simd::rope_rows(self.isa, x, cos, sin, p);
        });
        Ok(())
    }

    fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
        check::softmax(x.len(), cols, p)?;
        let out = Out(x.as_mut_ptr());
        self.split(x.len() / cols, ROWS_PER_TASK, &|r| {
            // SAFETY: rows r of x belong to this task alone.
            let x = unsafe { out.rows(r.clone(), cols) };
            let p = SoftmaxParams {
                causal: p.causal.map(|offset| offset + r.start),
                ..*p
            };
            simd::softmax(self.isa, x, cols, &p);
        });
        Ok(())
    }

    fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check::swiglu(a.len(), b.len(), y.len())?;
        self.gate(a, b, y, simd::swiglu);
        Ok(())
    }

    fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
        check::geglu(a.len(), b.len(), y.len())?;
        self.gate(a, b, y, simd::geglu);
        Ok(())
    }

    fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
        check::add(y.len(), x.len())?;
        let out = Out(y.as_mut_ptr());
        self.split(y.len(), VALUES_PER_TASK, &|r| {
            // SAFETY: values r of y belong to this task alone.
            let y = unsafe { out.rows(r.clone(), 1) };
            simd::add(self.isa, y, &x[r]);
        });
        Ok(())
    }

    fn embedding(&self, table: &SimdWeight<'_>, token: usize, y: &mut [f32]) -> Result<(), Error> {
        check::embedding(self.weight_dims(table), token, y.len())?;
        match table {
            SimdWeight::Packed(p) => p.copy_row(token, y),
            SimdWeight::Repacked(r) => r.dequantize_row(token, y),
            SimdWeight::Blocks(BlockWeight {
                dtype, k, bytes, ..
            }) => {
                let row = dtype.bytes_for(*k).expect("checked when prepared");
                simd::dequantize(self.isa, *dtype, &bytes[token * row..][..row], y);
            }
        }
        Ok(())
    }
}

/// The first four of `ws` mapped by `f`, if `f` maps every one.
fn all_of<'a, 'w, T: Copy>(
    ws: &[&'a SimdWeight<'w>],
    f: impl Fn(&'a SimdWeight<'w>) -> Option<T>,
) -> Option<[T; 4]> {
    let first = f(ws.first()?)?;
    let mut out = [first; 4];
    for (o, w) in out.iter_mut().zip(ws) {
        *o = f(w)?;
    }
    Some(out)
}

/// Whether a tensor is the classifier, by GGUF's names: `output.weight`, or `token_embd.weight`
/// (the embedding table, tied as the classifier when there is no `output.weight`).
fn is_classifier(name: &str) -> bool {
    matches!(name, "output.weight" | "token_embd.weight")
}
