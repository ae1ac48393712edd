//! The generation loop: the iterator and the callback over one loop, stop sequences held
//! back across tokens, end tokens, and stopping from the callback.

mod common;

use chord::SimdBackend;
use chord::generate::{Event, Request, Stream, generate};
use chord::gguf::GgufFile;
use chord::model::{Model, State};
use chord::sample::{GenerationConfig, Sampler};
use chord::tokenizer::Tokenizer;

fn setup() -> GgufFile {
    GgufFile::open(common::model_path()).unwrap()
}

#[test]
fn a_stop_sequence_spanning_tokens_is_never_shown_and_the_iterator_matches_the_callback() {
    let file = setup();
    let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
    let model = Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
    let prompt = tok.encode("The capital of France is", false);
    // Greedy continues " Paris.\n\nThe answer is:": ".\n\nThe" spans four tokens.
    let stop = vec![".\n\nThe".to_string()];
    let req = Request {
        prompt_ids: &prompt,
        max_new: 30,
        ignore_eos: true,
        stop: &stop,
    };

    let mut state = State::new(&model.config, 256, 64);
    let mut sampler = Sampler::new(GenerationConfig::greedy()).unwrap();
    let mut streamed = String::new();
    let mut done = None;
    for event in Stream::new(&model, &mut state, &tok, &mut sampler, req) {
        match event.unwrap() {
            Event::Token { text, .. } => {
                streamed.push_str(&text);
                assert!(
                    " Paris".starts_with(streamed.as_str()),
                    "shown beyond the stop sequence: {streamed:?}"
                );
            }
            Event::Done(g) => done = Some(g),
        }
    }
    let g = done.expect("a Done event");
    assert_eq!(
        (streamed.as_str(), g.text.as_str(), g.stop_reason),
        (" Paris", " Paris", "stop_sequence")
    );

    let mut state = State::new(&model.config, 256, 64);
    let mut sampler = Sampler::new(GenerationConfig::greedy()).unwrap();
    let mut via_callback = String::new();
    let g2 = generate(&model, &mut state, &tok, &mut sampler, req, |_, t| {
        via_callback.push_str(t);
        true
    })
    .unwrap();
    assert_eq!(
        (via_callback.as_str(), &g2.generated_ids),
        (" Paris", &g.generated_ids)
    );
}

#[test]
fn end_tokens_end_a_reply_and_the_callback_can_stop_it() {
    let file = setup();
    let tok = Tokenizer::from_gguf(file.gguf()).unwrap();
    let model = Model::load(&file, SimdBackend::new(2).unwrap()).unwrap();
    let prompt = tok.encode(
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
        true,
    );
    let run = |max_new: usize, limit: usize| {
        let mut state = State::new(&model.config, 512, 64);
        let mut sampler = Sampler::new(GenerationConfig::greedy()).unwrap();
        let mut n = 0;
        let req = Request {
            prompt_ids: &prompt,
            max_new,
            ignore_eos: false,
            stop: &[],
        };
        generate(&model, &mut state, &tok, &mut sampler, req, |_, _| {
            n += 1;
            n < limit
        })
        .unwrap()
    };
    let g = run(200, usize::MAX);
    assert_eq!(g.stop_reason, "end_token", "{g:?}");
    assert!(tok.eog().contains(g.generated_ids.last().unwrap()));
    assert!(!g.text.contains("<|im_end|>"));
    let stopped = run(200, 3);
    assert_eq!(
        (stopped.stop_reason, stopped.generated_ids.len()),
        ("stopped", 3)
    );
    let short = run(2, usize::MAX);
    assert_eq!(
        (short.stop_reason, short.generated_ids.len()),
        ("length", 2)
    );
}
