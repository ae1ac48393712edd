//! Special tokens as llama.cpp resolves them (`src/llama-vocab.cpp`, `llama_vocab::impl::load`,
//! llama.cpp b11312): ids from the metadata keys, with each vocabulary kind's defaults;
//! end-of-turn, end-of-message and fill-in-the-middle tokens found by name where no key names
//! them; the types of such tokens corrected to control; and the end-of-generation set.

use super::TokenType;
use super::vocab::Vocab;
use crate::gguf::{Gguf, Value};

/// End-of-turn tokens, looked for by name when `tokenizer.ggml.eot_token_id` is absent.
const EOT_NAMES: [&str; 11] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle tokens by role, looked for by name when their key is absent. The pad,
/// repo and file-separator tokens also end generation.
const FIM_NAMES: [(&str, &[&str]); 6] = [
    (
        "tokenizer.ggml.fim_pre_token_id",
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_suf_token_id",
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_mid_token_id",
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_pad_token_id",
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        "tokenizer.ggml.fim_rep_token_id",
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    ("tokenizer.ggml.fim_sep_token_id", &["<|file_sep|>"]),
];

/// Tokens that end generation wherever they appear in a vocabulary, by name.
const EOG_NAMES: [&str; 22] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Pre-tokenizers whose byte-level BPE vocabularies add BOS when the file does not say.
const BPE_ADDS_BOS: [&str; 11] = [
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "tekken",
    "chameleon",
];

/// The special tokens of a vocabulary and how generation ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Specials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// End of turn (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`...).
    pub eot: Option<u32>,
    /// End of message (`<|eom_id|>`).
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    /// Prepend BOS when encoding: `tokenizer.ggml.add_bos_token`, else the vocabulary's
    /// default (SentencePiece: yes; byte-level BPE: only the pre-tokenizers of
    /// [`BPE_ADDS_BOS`]).
    pub add_bos: bool,
    /// Whether `add_bos` came from the file (`false`: the default for its kind).
    pub add_bos_from_file: bool,
    /// The end-of-generation set: generation stops on any member. Sorted.
    pub eog: Vec<u32>,
    /// Tokens whose type llama.cpp corrects: `(id, type in the file, type used)`.
    pub corrected: Vec<(u32, TokenType, TokenType)>,
}

/// Resolves the special tokens of a vocabulary (`spm`: SentencePiece, else byte-level BPE
/// with pre-tokenizer `pre`), correcting `types` in place.
pub(super) fn resolve(
    g: &Gguf,
    spm: bool,
    pre: &str,
    vocab: &Vocab,
    types: &mut [TokenType],
) -> Specials {
    let n = vocab.len();
    // An id key out of range keeps the default, as llama.cpp does (with a warning).
    let key = |k: &str, default: Option<u32>| -> Option<u32> {
        let default = default.filter(|&d| (d as usize) < n);
        match g.get(k).and_then(Value::as_usize) {
            Some(id) if id < n => Some(id as u32),
            _ => default,
        }
    };
    let (bos_default, eos_default, unk_default) = if spm {
        (Some(1), Some(2), Some(0))
    } else {
        (Some(11), Some(11), None)
    };
    let mut s = Specials {
        bos: key("tokenizer.ggml.bos_token_id", bos_default),
        eos: key("tokenizer.ggml.eos_token_id", eos_default),
        eot: key("tokenizer.ggml.eot_token_id", None),
        eom: key("tokenizer.ggml.eom_token_id", None),
        unk: key("tokenizer.ggml.unknown_token_id", unk_default),
        ..Specials::default()
    };
    let mut fim: Vec<Option<u32>> = FIM_NAMES.iter().map(|(k, _)| key(k, None)).collect();

    let file_types = types.to_vec();
    let make_control = |id: u32, types: &mut [TokenType]| {
        types[id as usize] = TokenType::Control;
    };
    // The lowest id among `names` present in the vocabulary.
    let by_name = |names: &[&str]| names.iter().filter_map(|t| vocab.id(t)).min();
    if s.eot.is_none() {
        s.eot = by_name(&EOT_NAMES);
        s.eot.inspect(|&id| make_control(id, types));
    }
    if s.eom.is_none() {
        s.eom = by_name(&["<|eom_id|>"]);
        s.eom.inspect(|&id| make_control(id, types));
    }
    for (slot, (_, names)) in fim.iter_mut().zip(FIM_NAMES) {
        if slot.is_none() {
            *slot = by_name(names);
            slot.inspect(|&id| make_control(id, types));
        }
    }

    let mut eog: Vec<u32> = fim[3..].iter().flatten().copied().collect();
    for name in EOG_NAMES {
        if let Some(id) = vocab.id(name) {
            eog.push(id);
            make_control(id, types);
        }
    }
    // gpt-oss renders these structural tokens as text.
    for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(id) = vocab.id(name) {
            types[id as usize] = TokenType::UserDefined;
        }
    }
    eog.extend([s.eos, s.eot, s.eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();
    let text = |id: &u32| vocab.text(*id).expect("ids from the vocabulary");
    let has = |eog: &[u32], name: &str| eog.iter().any(|id| text(id) == name);
    // Harmony (gpt-oss) and solar-open end a turn with <|return|>/<|call|>, not <|end|>.
    if has(&eog, "<|end|>")
        && (has(&eog, "<|call|>") || has(&eog, "<|calls|>"))
        && (has(&eog, "<|return|>") || has(&eog, "<|flush|>"))
    {
        let end = *eog
            .iter()
            .find(|id| text(id) == "<|end|>")
            .expect("present");
        eog.retain(|&id| id != end);
        types[end as usize] = TokenType::UserDefined;
    }
    // Gemma 4 and PLaMo use </s> as a normal token.
    if has(&eog, "</s>") && (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) {
        let s_id = *eog.iter().find(|id| text(id) == "</s>").expect("present");
        eog.retain(|&id| id != s_id);
        types[s_id as usize] = TokenType::Normal;
    }
    s.eog = eog;
    s.corrected = (0..n)
        .filter(|&i| types[i] != file_types[i])
        .map(|i| (i as u32, file_types[i], types[i]))
        .collect();

    let add_bos_default = spm || BPE_ADDS_BOS.contains(&pre);
    (s.add_bos, s.add_bos_from_file) = match g.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => (*b, true),
        _ => (add_bos_default, false),
    };
    // A vocabulary without a BOS token cannot add one.
    s.add_bos &= s.bos.is_some();
    s
}
