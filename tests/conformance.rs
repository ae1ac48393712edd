//! The conformance suite run against every built-in backend and every kernel variant this
//! CPU supports, at several thread counts.

use chord::backend::{Backend, DType, Mode, Variant, WeightView};
use chord::conformance::assert_conforms;
use chord::kernels::simd::Level;
use chord::{BlockedBackend, ScalarBackend, SimdBackend};

#[test]
fn scalar_backend_conforms() {
    assert_conforms(&ScalarBackend::new());
}

#[test]
fn blocked_backend_conforms_on_1_2_and_3_threads() {
    for threads in [1, 2, 3] {
        assert_conforms(&BlockedBackend::new(threads).unwrap());
    }
}

#[test]
fn simd_backend_conforms_at_every_level_this_cpu_runs() {
    let levels: Vec<Level> = Level::ALL
        .into_iter()
        .filter(|l| l.is_supported())
        .collect();
    assert!(
        levels.contains(&Level::Portable),
        "the portable level runs everywhere"
    );
    for level in levels {
        for threads in [1, 2, 3] {
            for mode in [Mode::Exact, Mode::Fast] {
                eprintln!(
                    "conformance: simd-{} on {threads} threads, {} mode",
                    level.name(),
                    mode.name()
                );
                assert_conforms(
                    &SimdBackend::with_level(level, threads)
                        .unwrap()
                        .with_mode(mode),
                );
            }
        }
    }
}

/// A backend mixed op by op passes like its parts: matmul from simd, softmax from scalar
/// (so attention runs as the composite over it), the rest from blocked; and one that names
/// attention too.
#[test]
fn mixed_backends_conform() {
    use chord::backend::{Mixed, Op};
    let best = chord::kernels::simd::Isa::best().level();
    let mixed = Mixed::from_variants(
        SimdBackend::new(2).unwrap(),
        Variant::Simd(best),
        &[(Op::Softmax, Variant::Scalar)],
        Variant::Blocked,
        2,
    )
    .unwrap();
    assert!(mixed.name().contains("softmax=scalar"), "{}", mixed.name());
    assert!(
        mixed.name().contains("attention=default-body"),
        "{}",
        mixed.name()
    );
    assert_conforms(&mixed);
    let mixed = Mixed::from_variants(
        ScalarBackend::new(),
        Variant::Scalar,
        &[
            (Op::Attention, Variant::Simd(best)),
            (Op::RmsNorm, Variant::Blocked),
        ],
        Variant::Simd(Level::Portable),
        2,
    )
    .unwrap();
    assert_conforms(&mixed);
}

#[test]
fn every_variant_name_round_trips_and_unknown_names_are_errors() {
    for v in Variant::available() {
        assert_eq!(v.to_string().parse::<Variant>(), Ok(v));
    }
    let err = "simd-neon".parse::<Variant>().unwrap_err();
    assert!(err.contains("unknown backend 'simd-neon'"), "{err}");
}

#[test]
fn forcing_a_level_the_cpu_lacks_is_an_error() {
    for level in Level::ALL.into_iter().filter(|l| !l.is_supported()) {
        let err = SimdBackend::with_level(level, 1).unwrap_err();
        assert!(err.to_string().contains(level.name()), "{err}");
    }
}

/// Matmul results must not depend on the thread count: each output element is summed by
/// one task in an order fixed by the blocking constants alone.
#[test]
fn matmul_is_bitwise_identical_for_any_thread_count() {
    let (m, n, k) = (37, 301, 419);
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
        .collect();
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 104_729) % 2011) as f32 / 2011.0 - 0.5)
        .collect();
    let view = WeightView::f32(&w, n, k).unwrap();
    fn run<B: Backend>(b: &B, view: WeightView<'_>, x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let w = b.prepare(view).unwrap();
        [1, m]
            .iter()
            .map(|&rows| {
                let (n, k) = b.weight_dims(&w);
                let mut y = vec![0.0; rows * n];
                b.matmul(&x[..rows * k], &w, &mut y, rows).unwrap();
                y
            })
            .collect()
    }
    for level in Level::ALL.into_iter().filter(|l| l.is_supported()) {
        let one = run(&SimdBackend::with_level(level, 1).unwrap(), view, &x, m);
        for threads in [2, 3] {
            assert_eq!(
                one,
                run(
                    &SimdBackend::with_level(level, threads).unwrap(),
                    view,
                    &x,
                    m
                ),
                "simd-{} on {threads} threads",
                level.name()
            );
        }
    }
    let one = run(&BlockedBackend::new(1).unwrap(), view, &x, m);
    assert_eq!(
        one,
        run(&BlockedBackend::new(2).unwrap(), view, &x, m),
        "blocked on 2 threads"
    );
}

/// Weights in blocks (rows a multiple of 32 values): several weights through one
/// `matmuls` call give bitwise what one `matmul` each gives, on any thread count, in both
/// modes, decoding and prefilling.
#[test]
fn matmuls_on_block_weights_equal_one_matmul_each_on_any_thread_count() {
    let k = 576;
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n * k)
            .map(|i| ((i * 7919 + seed * 104_729) % 2011) as f32 / 2011.0 - 0.5)
            .collect()
    };
    let (wa, wb, wc) = (values(192, 1), values(576, 2), values(100, 3));
    let q4 = chord::kernels::quant::quantize(DType::Q4_1, &wb).unwrap();
    let views = [
        WeightView::f32(&wa, 192, k).unwrap(),
        WeightView::new(DType::Q4_1, 576, k, &q4).unwrap(),
        WeightView::f32(&wc, 100, k).unwrap(),
    ];
    for mode in [Mode::Exact, Mode::Fast] {
        for m in [1, 2, 3, 5] {
            let x = &values(m, 9)[..m * k];
            let mut first: Option<Vec<Vec<f32>>> = None;
            for threads in [1, 2, 3] {
                let b = SimdBackend::new(threads).unwrap().with_mode(mode);
                let ws: Vec<_> = views.iter().map(|v| b.prepare(*v).unwrap()).collect();
                let mut separate: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| vec![f32::NAN; m * b.weight_dims(w).0])
                    .collect();
                for (w, y) in ws.iter().zip(separate.iter_mut()) {
                    b.matmul(x, w, y, m).unwrap();
                }
                let mut together: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| vec![f32::NAN; m * b.weight_dims(w).0])
                    .collect();
                let mut outs: Vec<&mut [f32]> =
                    together.iter_mut().map(|y| y.as_mut_slice()).collect();
                b.matmuls(x, &ws.iter().collect::<Vec<_>>(), &mut outs, m)
                    .unwrap();
                assert_eq!(separate, together, "{mode:?} m {m}, {threads} threads");
                match &first {
                    None => first = Some(together),
                    Some(f) => assert_eq!(
                        f, &together,
                        "{mode:?} m {m}: {threads} threads differ from 1"
                    ),
                }
            }
        }
    }
}

/// A backend that is wrong in one op, by a little: the suite must catch it and say where.
mod broken {
    use chord::backend::{
        AttentionParams, Backend, Error, Op, RopeParams, SoftmaxParams, WeightView,
    };
    use chord::conformance::{Config, check};
    use chord::{ScalarBackend, SimdBackend};

    /// Delegates to `inner`, but perturbs one output element of `op` by `rel` (relative).
    struct Broken<B> {
        inner: B,
        op: Op,
        rel: f32,
    }

    impl<B: Backend> Broken<B> {
        fn spoil(&self, op: Op, y: &mut [f32]) {
            if op == self.op
                && let Some(v) = y.last_mut()
            {
                *v += v.abs().max(1e-30) * self.rel;
            }
        }
    }

    impl<B: Backend> Backend for Broken<B> {
        type Weight<'w>
            = B::Weight<'w>
        where
            Self: 'w;
        fn name(&self) -> String {
            format!("broken-{}", self.inner.name())
        }
        fn threads(&self) -> usize {
            self.inner.threads()
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
            self.inner.matmul(x, w, y, m)?;
            self.spoil(Op::Matmul, y);
            Ok(())
        }
        fn rmsnorm(&self, x: &[f32], g: &[f32], y: &mut [f32], eps: f32) -> Result<(), Error> {
            self.inner.rmsnorm(x, g, y, eps)?;
            self.spoil(Op::RmsNorm, y);
            Ok(())
        }
        fn rope(
            &self,
            x: &mut [f32],
            rows: usize,
            pos: usize,
            p: &RopeParams,
        ) -> Result<(), Error> {
            self.inner.rope(x, rows, pos, p)?;
            self.spoil(Op::Rope, x);
            Ok(())
        }
        fn softmax(&self, x: &mut [f32], cols: usize, p: &SoftmaxParams) -> Result<(), Error> {
            self.inner.softmax(x, cols, p)?;
            self.spoil(Op::Softmax, x);
            Ok(())
        }
        fn swiglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
            self.inner.swiglu(a, b, y)?;
            self.spoil(Op::SwiGlu, y);
            Ok(())
        }
        fn geglu(&self, a: &[f32], b: &[f32], y: &mut [f32]) -> Result<(), Error> {
            self.inner.geglu(a, b, y)?;
            self.spoil(Op::GeGlu, y);
            Ok(())
        }
        fn add(&self, y: &mut [f32], x: &[f32]) -> Result<(), Error> {
            self.inner.add(y, x)?;
            self.spoil(Op::Add, y);
            Ok(())
        }
        fn embedding(
            &self,
            t: &Self::Weight<'_>,
            token: usize,
            y: &mut [f32],
        ) -> Result<(), Error> {
            self.inner.embedding(t, token, y)?;
            self.spoil(Op::Embedding, y);
            Ok(())
        }
        fn attention(
            &self,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            out: &mut [f32],
            scores: &mut [f32],
            p: &AttentionParams,
        ) -> Result<(), Error> {
            self.inner.attention(q, k, v, out, scores, p)?;
            self.spoil(Op::Attention, out);
            Ok(())
        }
    }

    #[test]
    fn a_small_error_in_any_op_is_caught_and_located() {
        let cfg = Config::default();
        for op in Op::ALL {
            // 1e-3 relative: well above every tolerance except RoPE's at huge positions, which
            // the suite also draws small positions for.
            let b = Broken {
                inner: SimdBackend::new(2).unwrap(),
                op,
                rel: 1e-3,
            };
            let f = check(&b, &cfg).expect_err(&format!("a wrong {op} must fail"));
            assert_eq!(f.op, op, "{f}");
            let msg = f.to_string();
            assert!(
                msg.contains("worst element") && msg.contains("tolerance"),
                "{msg}"
            );
            assert!(msg.contains(&format!("broken-{}", b.inner.name())), "{msg}");
        }
    }

    #[test]
    fn the_reference_itself_passes_while_a_one_ulp_nudge_to_embedding_fails() {
        // Embedding is a copy: exact, no tolerance at all.
        let b = Broken {
            inner: ScalarBackend::new(),
            op: Op::Embedding,
            rel: f32::EPSILON,
        };
        let f = check(&b, &Config::default()).unwrap_err();
        assert_eq!(f.op, Op::Embedding, "{f}");
    }
}

/// The window's first visible position at its boundaries, by llama.cpp's rule (the query at
/// `p` sees `t` when `p - t < window`).
#[test]
fn the_first_visible_position_follows_llama_cpps_window_rule() {
    use chord::backend::AttentionParams;
    let p = |window| AttentionParams {
        m: 1,
        pos: 0,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 2,
        scale: 1.0,
        window,
    };
    for (w, at, first) in [
        (512, 510, 0),
        (512, 511, 0),
        (512, 512, 1),
        (512, 513, 2),
        (1, 0, 0),
        (1, 7, 7),
        (3, 2, 0),
        (3, 3, 1),
    ] {
        assert_eq!(p(Some(w)).first_visible(at), first, "window {w} at {at}");
    }
    assert_eq!(p(None).first_visible(100_000), 0);
}

/// The fused path (several weights, one input) checks every weight's shapes and returns an
/// error naming the op, in both modes, for weights of blocks, repacked and f32: its kernels
/// read the input by pointer and would otherwise read past it.
#[test]
fn fused_matmuls_refuse_mismatched_shapes_with_an_error() {
    use chord::kernels::quant;
    let (m, k) = (3, 64);
    let x = vec![0.5f32; m * k];
    let wide = vec![0.25f32; 16 * 2 * k];
    for dtype in [DType::Q8_0, DType::Q4_0, DType::F32] {
        let bytes = |v: &[f32]| match dtype {
            DType::F32 => bytemuck::cast_slice(v).to_vec(),
            _ => quant::quantize(dtype, v).unwrap(),
        };
        let (a, b) = (bytes(&wide[..16 * k]), bytes(&wide));
        for mode in [Mode::Exact, Mode::Fast] {
            let be = SimdBackend::new(1).unwrap().with_mode(mode);
            let wa = be
                .prepare(WeightView::new(dtype, 16, k, &a).unwrap())
                .unwrap();
            // The second weight's rows are twice as long as x's.
            let wb = be
                .prepare(WeightView::new(dtype, 16, 2 * k, &b).unwrap())
                .unwrap();
            let (mut ya, mut yb) = (vec![0.0; m * 16], vec![0.0; m * 16]);
            let r = be.matmuls(&x, &[&wa, &wb], &mut [&mut ya, &mut yb], m);
            assert!(r.is_err(), "{dtype} {mode:?}: {r:?}");
            // An output of the wrong length.
            let mut short = vec![0.0; m * 16 - 1];
            let r = be.matmuls(&x, &[&wa, &wa], &mut [&mut ya, &mut short], m);
            assert!(r.is_err(), "{dtype} {mode:?}: {r:?}");
            // And the right shapes still run.
            let mut yc = vec![0.0; m * 16];
            be.matmuls(&x, &[&wa, &wa], &mut [&mut ya, &mut yc], m)
                .unwrap();
            assert_eq!(ya, yc, "{dtype} {mode:?}");
        }
    }
}
