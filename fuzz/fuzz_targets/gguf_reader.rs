//! The GGUF reader on arbitrary bytes: parsing must return `Ok` or an error, never panic or
//! allocate beyond the input; whatever parses must yield weight views that dequantize.
//!
//! Run: `cargo +nightly fuzz run gguf_reader fuzz/seeds/gguf` (from the repository root).
#![no_main]

use chord::backend::WeightView;
use chord::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(data) else { return };
    // A tensor of zero bytes (a placeholder with a zero dimension) is no weight.
    for t in g.tensors.iter().filter(|t| t.size > 0) {
        let Some(dtype) = t.dtype() else { continue }; // a type chord only lists
        let bytes = &data[t.offset..t.offset + t.size];
        let view = WeightView::new(dtype, t.rows(), t.cols(), bytes).expect("a parsed tensor is a valid view");
        if t.size <= 1 << 16 {
            let values = view.to_f32();
            assert_eq!(values.len(), t.rows() * t.cols());
        }
    }
});
