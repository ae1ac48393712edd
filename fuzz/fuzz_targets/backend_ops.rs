//! Every op of every backend on arbitrary shapes and parameters, most of them invalid: the
//! call must return `Ok` or an error, never panic. Debug assertions are on under cargo-fuzz,
//! so an input that slips past the boundary checks trips a kernel's precondition.
//!
//! Run: `cargo +nightly fuzz run backend_ops` (from the repository root).
#![no_main]

use arbitrary::Arbitrary;
use chord::backend::{Backend, RopeLayout, RopeParams, SoftmaxParams, WeightView};
use chord::{BlockedBackend, ScalarBackend, SimdBackend};
use libfuzzer_sys::fuzz_target;

/// Lengths are kept small (below 2^10) so each input runs fast; anything else is free.
#[derive(Arbitrary, Debug)]
enum Call {
    Matmul {
        x: u16,
        w_rows: u8,
        w_cols: u8,
        y: u16,
        m: u8,
    },
    RmsNorm {
        x: u16,
        weight: u16,
        y: u16,
        eps: f32,
    },
    Rope {
        x: u16,
        rows: u8,
        pos: u32,
        head_dim: u8,
        theta: f32,
        neox: bool,
    },
    Softmax {
        x: u16,
        cols: u16,
        scale: f32,
        causal: Option<u16>,
    },
    SwiGlu {
        a: u16,
        b: u16,
        y: u16,
    },
    GeGlu {
        a: u16,
        b: u16,
        y: u16,
    },
    Add {
        y: u16,
        x: u16,
    },
    Embedding {
        rows: u8,
        cols: u8,
        token: u16,
        y: u16,
    },
}

fn v(n: u16) -> Vec<f32> {
    (0..(n % 1024) as usize)
        .map(|i| (i % 13) as f32 - 6.0)
        .collect()
}

fn run<B: Backend>(b: &B, call: &Call) {
    let _ = match *call {
        Call::Matmul {
            x,
            w_rows,
            w_cols,
            y,
            m,
        } => {
            let w = vec![0.5f32; w_rows as usize * w_cols as usize];
            match WeightView::f32(&w, w_rows as usize, w_cols as usize)
                .and_then(|view| b.prepare(view))
            {
                Ok(w) => b.matmul(&v(x), &w, &mut v(y), m as usize),
                Err(e) => Err(e),
            }
        }
        Call::RmsNorm { x, weight, y, eps } => b.rmsnorm(&v(x), &v(weight), &mut v(y), eps),
        Call::Rope {
            x,
            rows,
            pos,
            head_dim,
            theta,
            neox,
        } => {
            let layout = if neox {
                RopeLayout::Neox
            } else {
                RopeLayout::Interleaved
            };
            let p = RopeParams {
                head_dim: head_dim as usize,
                theta,
                layout,
            };
            b.rope(&mut v(x), rows as usize, pos as usize, &p)
        }
        Call::Softmax {
            x,
            cols,
            scale,
            causal,
        } => {
            let p = SoftmaxParams {
                scale,
                causal: causal.map(usize::from),
            };
            b.softmax(&mut v(x), cols as usize, &p)
        }
        Call::SwiGlu { a, b: bb, y } => b.swiglu(&v(a), &v(bb), &mut v(y)),
        Call::GeGlu { a, b: bb, y } => b.geglu(&v(a), &v(bb), &mut v(y)),
        Call::Add { y, x } => b.add(&mut v(y), &v(x)),
        Call::Embedding {
            rows,
            cols,
            token,
            y,
        } => {
            let t = vec![1.0f32; rows as usize * cols as usize];
            match WeightView::f32(&t, rows as usize, cols as usize).and_then(|view| b.prepare(view))
            {
                Ok(t) => b.embedding(&t, token as usize, &mut v(y)),
                Err(e) => Err(e),
            }
        }
    };
}

fuzz_target!(|call: Call| {
    run(&ScalarBackend::new(), &call);
    run(&BlockedBackend::new(1).unwrap(), &call);
    run(&SimdBackend::new(1).unwrap(), &call);
});
