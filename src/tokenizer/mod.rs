//! Tokenizers read from GGUF metadata: GPT-2 byte-level BPE with the pre-tokenizer that
//! `tokenizer.ggml.pre` names, matching llama.cpp's ids exactly.
//!
//! Encoding: special tokens are split out first (control tokens only on request, as
//! llama.cpp does; user-defined tokens always); each remaining fragment is cut into pieces
//! by the pre-tokenizer's expressions, each piece's UTF-8 bytes are mapped to GPT-2's
//! printable byte alphabet, and merges are applied lowest rank first.

mod pretok;
mod special;
mod vocab;

// foldhash: the vocabulary's maps are built once per load (about 100k strings and pairs) and
// read per piece; std's SipHash made building them a third of the default model's load time.
use foldhash::{HashMap, HashMapExt};

use crate::gguf::{Array, Gguf, Strings, Value};
pub use pretok::PreTokenizer;
pub use special::Specials;
use vocab::Vocab;

/// An error building a tokenizer or decoding ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    UnknownId { id: u32, vocab: usize },
}

/// What a vocabulary entry is (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    /// `<|im_start|>` and the like: parsed only on request, rendered only on request.
    Control,
    /// Added by the model's authors: always parsed, rendered as written.
    UserDefined,
    Unused,
    /// `<0x0A>`-style byte tokens (SentencePiece vocabularies).
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> TokenType {
        match code {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

/// How a vocabulary turns text into tokens.
enum Algorithm {
    /// GPT-2 byte-level BPE (`tokenizer.ggml.model = gpt2`).
    Bpe {
        /// The merges by the symbol ids of their two sides: (rank, symbol id of the result).
        /// A symbol id below the vocabulary size is that token; above it, a string that takes
        /// part in merges without being a token (`extra_symbols`).
        merges: HashMap<(u32, u32), (u32, u32)>,
        extra_symbols: Vec<String>,
        /// The symbol id of each byte's GPT-2 character.
        byte_symbol: Box<[u32; 256]>,
        pre: PreTokenizer,
        /// GPT-2's byte-to-character table and its inverse.
        byte_char: Box<[char; 256]>,
        char_byte: HashMap<char, u8>,
    },
    /// SentencePiece (`tokenizer.ggml.model = llama`): spaces become `▁`, adjacent symbols
    /// merge by the highest score of the merged piece, and what stays outside the vocabulary
    /// falls back to `<0xXX>` byte tokens.
    Spm {
        scores: Vec<f32>,
        byte_ids: Box<[Option<u32>; 256]>,
        add_space_prefix: bool,
    },
}

/// A tokenizer read from GGUF metadata: byte-level BPE or SentencePiece.
pub struct Tokenizer {
    vocab: Vocab,
    types: Vec<TokenType>,
    algorithm: Algorithm,
    /// Tokens split out before pre-tokenization, longest first.
    pieces: Vec<SpecialPiece>,
    /// `tokenizer.ggml.add_eos_token`: append EOS when encoding with `add_special`.
    add_eos: bool,
    /// Detokenizing removes the spaces BPE vocabularies put before punctuation (llama.cpp's
    /// `clean_spaces`: byte-level BPE but for the `smollm` and `command-r` pre-tokenizers).
    clean_spaces: bool,
    /// Every special token, the end-of-generation set and the type corrections, as
    /// resolved from the metadata.
    specials: Specials,
    /// Detokenizing drops the first piece's leading space (`tokenizer.ggml.add_space_prefix`,
    /// for any vocabulary kind, as llama.cpp's `llama_detokenize` does).
    strip_prefix: bool,
}

/// A token recognised in text before pre-tokenization.
struct SpecialPiece {
    text: String,
    id: u32,
    /// Control and unknown tokens: only with `parse_special`. User-defined: always.
    needs_flag: bool,
    /// The whitespace after it is dropped (Phi-3).
    rstrip: bool,
}

/// GPT-2's table: printable bytes map to themselves, the others to U+0100 onwards.
pub(crate) fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("a Latin-1 code point")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143")
        };
    }
    table
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let meta = |m: String| TokenizerError::Metadata(m);
        let model = g
            .str("tokenizer.ggml.model")
            .map_err(|e| meta(e.to_string()))?;
        let tokens: Strings = match g.get("tokenizer.ggml.tokens") {
            // As llama.cpp reads them: up to a NUL byte (C strings), and an empty token named
            // `[EMPTY_i]`.
            Some(Value::Array(Array::String(t))) => t
                .iter()
                .enumerate()
                .map(|(i, w)| match w.split('\0').next().unwrap_or("") {
                    "" => std::borrow::Cow::Owned(format!("[EMPTY_{i}]")),
                    w => std::borrow::Cow::Borrowed(w),
                })
                .collect(),
            _ => {
                return Err(meta(
                    "tokenizer.ggml.tokens: missing or not an array of strings".into(),
                ));
            }
        };
        let mut types: Vec<TokenType> = match g.get("tokenizer.ggml.token_type") {
            Some(Value::Array(Array::I32(t))) if t.len() == tokens.len() => {
                t.iter().map(|&c| TokenType::from_code(c as i64)).collect()
            }
            Some(_) => {
                return Err(meta(
                    "tokenizer.ggml.token_type: not one i32 per token".into(),
                ));
            }
            None => vec![TokenType::Normal; tokens.len()],
        };
        let vocab = Vocab::new(tokens); // a token listed twice: the last id, as llama.cpp
        let pre_name = g.str("tokenizer.ggml.pre").unwrap_or("default");
        let resolved = special::resolve(g, model == "llama", pre_name, &vocab, &mut types);
        // Split out before pre-tokenization: control and unknown tokens on request,
        // user-defined ones always; longest first. Phi-3's files (by `general.name`, as
        // llama.cpp decides) swallow the whitespace after a special token.
        let name = g.str("general.name").unwrap_or("").to_lowercase();
        let phi3 = name.contains("phi-3") || name.contains("phi3");
        let mut pieces: Vec<SpecialPiece> = types
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let needs_flag = match t {
                    TokenType::Control | TokenType::Unknown => true,
                    TokenType::UserDefined => false,
                    _ => return None,
                };
                let text = vocab.text(i as u32).expect("one type per token");
                let rstrip = phi3 && !matches!(text, "<unk>" | "<s>" | "<|endoftext|>");
                Some(SpecialPiece {
                    text: text.to_owned(),
                    id: i as u32,
                    needs_flag,
                    rstrip,
                })
            })
            .collect();
        pieces.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        // llama.cpp's default: SentencePiece prefixes a space, byte-level BPE does not.
        let strip_prefix = match g.get("tokenizer.ggml.add_space_prefix") {
            Some(Value::Bool(b)) => *b,
            _ => model == "llama",
        };
        let algorithm = match model {
            "gpt2" => {
                let pre = PreTokenizer::named(pre_name).ok_or_else(|| {
                    TokenizerError::Unsupported(format!("tokenizer.ggml.pre '{pre_name}'"))
                })?;
                let merges = match g.get("tokenizer.ggml.merges") {
                    Some(Value::Array(Array::String(m))) => m,
                    _ => {
                        return Err(meta(
                            "tokenizer.ggml.merges: missing or not an array of strings".into(),
                        ));
                    }
                };
                // Every string that takes part in a merge gets a symbol id: its token id, or
                // one past the vocabulary for the few that are not tokens.
                let mut extra_ids: HashMap<String, u32> = HashMap::new();
                let mut extra_symbols = Vec::new();
                let mut symbol = |text: &str| -> u32 {
                    if let Some(id) = vocab.id(text) {
                        return id;
                    }
                    *extra_ids.entry(text.to_string()).or_insert_with(|| {
                        extra_symbols.push(text.to_string());
                        (vocab.len() + extra_symbols.len() - 1) as u32
                    })
                };
                let byte_char = Box::new(byte_alphabet());
                let byte_symbol = Box::new(std::array::from_fn(|b| {
                    symbol(byte_char[b].encode_utf8(&mut [0; 4]))
                }));
                let mut merge_table = HashMap::with_capacity(merges.len());
                let mut joined = String::new();
                for (rank, m) in merges.iter().enumerate() {
                    // Split at the first space after the first byte, as llama.cpp does (a
                    // symbol may itself be a space); a merge without one merges nothing.
                    let Some(at) = m.bytes().skip(1).position(|b| b == b' ') else {
                        continue;
                    };
                    let (a, b) = (&m[..at + 1], &m[at + 2..]);
                    let pair = (symbol(a), symbol(b));
                    joined.clear();
                    joined.push_str(a);
                    joined.push_str(b);
                    let merged = symbol(&joined);
                    // The first (lowest) rank of a merge listed twice wins.
                    merge_table.entry(pair).or_insert((rank as u32, merged));
                }
                let char_byte = byte_char
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| (c, b as u8))
                    .collect();
                Algorithm::Bpe {
                    merges: merge_table,
                    extra_symbols,
                    byte_symbol,
                    pre,
                    byte_char,
                    char_byte,
                }
            }
            "llama" => {
                let scores = match g.get("tokenizer.ggml.scores") {
                    Some(Value::Array(Array::F32(s))) if s.len() == vocab.len() => s.clone(),
                    _ => {
                        return Err(meta(
                            "tokenizer.ggml.scores: missing or not one f32 per token".into(),
                        ));
                    }
                };
                let byte_ids = Box::new(std::array::from_fn(|b| vocab.id(&format!("<0x{b:02X}>"))));
                // llama.cpp's default for SentencePiece vocabularies is to add the prefix space.
                let add_space_prefix = !matches!(
                    g.get("tokenizer.ggml.add_space_prefix"),
                    Some(Value::Bool(false))
                );
                Algorithm::Spm {
                    scores,
                    byte_ids,
                    add_space_prefix,
                }
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer.ggml.model '{other}' (chord reads gpt2 byte-level BPE and llama SentencePiece)"
                )));
            }
        };
        Ok(Tokenizer {
            vocab,
            types,
            strip_prefix,
            algorithm,
            add_eos: matches!(
                g.get("tokenizer.ggml.add_eos_token"),
                Some(Value::Bool(true))
            ) && resolved.eos.is_some(),
            clean_spaces: model == "gpt2" && !matches!(pre_name, "smollm" | "command-r"),
            pieces,
            specials: resolved,
        })
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The token's text as the vocabulary stores it.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.text(id)
    }

    /// Token ids of `text`, with BOS (and EOS) where the vocabulary adds them. With
    /// `parse_special`, control tokens written in the text (such as `<|im_start|>`) become
    /// their ids; without it they are tokenized as plain text. See [`tokenize`](Self::tokenize).
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        self.tokenize(text, true, parse_special)
    }

    /// Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`
    /// gives them, but for BOS: with `add_special`, BOS comes first where the vocabulary asks
    /// for it (`add_bos`) exactly once, not again when the text already starts with it (a
    /// chat template that writes `{{ bos_token }}`, parsed with `parse_special`); and EOS
    /// last where it asks for that (`tokenizer.ggml.add_eos_token`).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special
            && self.specials.add_bos
            && let Some(b) = self.specials.bos
        {
            out.push(b);
        }
        // Fragments: Ok(raw text) or Err(special id), in order.
        let mut fragments: Vec<Result<&str, u32>> = if text.is_empty() {
            Vec::new() // no text, no prefix space: nothing but BOS/EOS
        } else {
            vec![Ok(text)]
        };
        for special in &self.pieces {
            if special.needs_flag && !parse_special {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len());
            for f in fragments {
                match f {
                    Ok(raw) => {
                        let mut rest = raw;
                        while let Some(at) = rest.find(special.text.as_str()) {
                            if at > 0 {
                                next.push(Ok(&rest[..at]));
                            }
                            next.push(Err(special.id));
                            rest = &rest[at + special.text.len()..];
                            if special.rstrip {
                                rest = rest.trim_start_matches(|c: char| {
                                    c.is_ascii_whitespace() || c == '\x0b'
                                });
                            }
                        }
                        if !rest.is_empty() {
                            next.push(Ok(rest));
                        }
                    }
                    special => next.push(special),
                }
            }
            fragments = next;
        }
        // SentencePiece prefixes a space to the text and to every fragment after a special
        // token, as llama.cpp does.
        let mut after_special = true;
        for f in fragments {
            match f {
                Err(id) => {
                    out.push(id);
                    after_special = true;
                }
                Ok(raw) => {
                    match &self.algorithm {
                        Algorithm::Bpe { pre, .. } => {
                            for piece in pre.split(raw) {
                                self.bpe(piece, &mut out);
                            }
                        }
                        Algorithm::Spm {
                            add_space_prefix, ..
                        } => {
                            let prefix = if *add_space_prefix && after_special {
                                "▁"
                            } else {
                                ""
                            };
                            self.spm(&format!("{prefix}{}", raw.replace(' ', "▁")), &mut out);
                        }
                    }
                    after_special = false;
                }
            }
        }
        // The text began with BOS itself: it is not added twice.
        if add_special && self.specials.add_bos && out.len() >= 2 && out[1] == out[0] {
            out.remove(0);
        }
        if add_special
            && self.add_eos
            && let Some(e) = self.specials.eos
        {
            out.push(e);
        }
        out
    }

    /// SentencePiece on one fragment whose spaces are already `▁`, appending ids to `out`.
    ///
    /// Symbols start as single characters. Repeatedly, of all adjacent pairs whose merged
    /// text is a token, the one with the highest score (the leftmost on ties) merges; a pair
    /// made stale by an earlier merge is skipped. What remains is looked up, and a symbol
    /// outside the vocabulary becomes its UTF-8 bytes as `<0xXX>` tokens.
    fn spm(&self, text: &str, out: &mut Vec<u32>) {
        use std::cmp::Ordering;
        use std::collections::BinaryHeap;
        let Algorithm::Spm {
            scores, byte_ids, ..
        } = &self.algorithm
        else {
            unreachable!("spm on a BPE vocabulary")
        };
        // Symbols: byte ranges of `text`, linked; `len == 0` marks one merged away.
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            })
            .collect();
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        #[derive(PartialEq)]
        struct Pair {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Eq for Pair {}
        impl Ord for Pair {
            fn cmp(&self, o: &Self) -> Ordering {
                self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Pair {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        let pair = |syms: &[Sym], left: usize, right: usize| -> Option<Pair> {
            let len = syms[left].len + syms[right].len;
            let id = self
                .vocab
                .id(&text[syms[left].start..syms[left].start + len])?;
            Some(Pair {
                score: scores[id as usize],
                left,
                right,
                len,
            })
        };
        let mut heap = BinaryHeap::new();
        for i in 1..syms.len() {
            heap.extend(pair(&syms, i - 1, i));
        }
        while let Some(p) = heap.pop() {
            let (l, r) = (p.left, p.right);
            if syms[l].len == 0
                || syms[r].len == 0
                || syms[l].len + syms[r].len != p.len
                || syms[l].next != Some(r)
            {
                continue; // stale
            }
            syms[l].len = p.len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            if let Some(prev) = syms[l].prev {
                heap.extend(pair(&syms, prev, l));
            }
            if let Some(next) = syms[l].next {
                heap.extend(pair(&syms, l, next));
            }
        }
        let mut i = (!syms.is_empty()).then_some(0);
        while let Some(s) = i {
            let piece = &text[syms[s].start..syms[s].start + syms[s].len];
            match self.vocab.id(piece) {
                Some(id) => out.push(id),
                None => {
                    // Byte fallback, character by character: each byte as `<0xXX>`, else an
                    // ASCII byte's one-character token (as llama.cpp); a character some byte
                    // of which has neither becomes one unknown token (as SentencePiece does;
                    // llama.cpp aborts).
                    for c in piece.chars() {
                        let mut buf = [0; 4];
                        let bytes = c.encode_utf8(&mut buf).as_bytes();
                        let byte_token = |b: u8| {
                            byte_ids[b as usize].or_else(|| {
                                b.is_ascii()
                                    .then(|| self.vocab.id((b as char).encode_utf8(&mut [0; 4])))
                                    .flatten()
                            })
                        };
                        match bytes
                            .iter()
                            .map(|&b| byte_token(b))
                            .collect::<Option<Vec<u32>>>()
                        {
                            Some(ids) => out.extend(ids),
                            None => out.extend(self.specials.unk),
                        }
                    }
                }
            }
            i = syms[s].next;
        }
    }

    /// Byte-level BPE of one pre-tokenized piece, appending ids to `out`.
    ///
    /// Symbols start as the piece's bytes (as GPT-2 characters). Repeatedly, the adjacent pair
    /// with the lowest merge rank merges, the leftmost on ties. The pairs wait in a priority
    /// queue ordered by (rank, position) over a linked list of symbols; a pair made stale by
    /// an earlier merge is skipped when it comes up. O(n log n) in the piece's length.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let Algorithm::Bpe {
            merges,
            extra_symbols,
            byte_symbol,
            pre,
            byte_char,
            ..
        } = &self.algorithm
        else {
            unreachable!("bpe on a SentencePiece vocabulary")
        };
        if piece.is_empty() {
            return;
        }
        // Llama 3's vocabularies take a piece that is a whole token as it is (ignore_merges).
        if pre.ignores_merges() {
            let mapped: String = piece.bytes().map(|b| byte_char[b as usize]).collect();
            if let Some(id) = self.vocab.id(&mapped) {
                out.push(id);
                return;
            }
        }
        const NONE: usize = usize::MAX;
        struct Sym {
            id: u32,
            prev: usize,
            next: usize,
        }
        let n = piece.len();
        let mut syms: Vec<Sym> = piece
            .bytes()
            .enumerate()
            .map(|(i, b)| Sym {
                id: byte_symbol[b as usize],
                prev: i.wrapping_sub(1), // NONE for the first
                next: if i + 1 < n { i + 1 } else { NONE },
            })
            .collect();
        // (rank, left position, right position, left id, right id), smallest first.
        let mut queue = BinaryHeap::new();
        let pair = |syms: &[Sym], l: usize, r: usize| {
            merges
                .get(&(syms[l].id, syms[r].id))
                .map(|&(rank, _)| Reverse((rank, l, r, syms[l].id, syms[r].id)))
        };
        for i in 1..n {
            queue.extend(pair(&syms, i - 1, i));
        }
        while let Some(Reverse((_, l, r, left_id, right_id))) = queue.pop() {
            // Stale: either side has merged since (its id changed, or it is gone from the list).
            if syms[l].next != r || syms[l].id != left_id || syms[r].id != right_id {
                continue;
            }
            syms[l].id = merges[&(left_id, right_id)].1;
            syms[l].next = syms[r].next;
            syms[r].prev = NONE;
            syms[r].next = NONE;
            syms[r].id = u32::MAX; // merged away
            if syms[l].next != NONE {
                let next = syms[l].next;
                syms[next].prev = l;
                queue.extend(pair(&syms, l, next));
            }
            if syms[l].prev != NONE {
                queue.extend(pair(&syms, syms[l].prev, l));
            }
        }
        let mut i = 0;
        while i != NONE {
            let id = syms[i].id;
            match extra_symbols.get((id as usize).wrapping_sub(self.vocab.len())) {
                None => out.push(id),
                // A symbol outside the vocabulary (a byte the vocabulary lacks): each of its
                // UTF-8 bytes that is a token alone, as llama.cpp does; the rest is lost.
                Some(text) => out.extend(
                    text.bytes()
                        .filter(u8::is_ascii)
                        .filter_map(|b| self.vocab.id((b as char).encode_utf8(&mut [0; 4]))),
                ),
            }
            i = syms[i].next;
        }
    }

    /// The bytes of one token: byte-level symbols decoded; control tokens only with
    /// `special`.
    pub fn token_bytes(&self, id: u32, special: bool) -> Result<Vec<u8>, TokenizerError> {
        let i = id as usize;
        let text = self.vocab.text(id).ok_or(TokenizerError::UnknownId {
            id,
            vocab: self.vocab.len(),
        })?;
        Ok(match self.types[i] {
            TokenType::Normal => match &self.algorithm {
                Algorithm::Bpe { char_byte, .. } => {
                    let mut bytes = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match char_byte.get(&c) {
                            Some(&b) => bytes.push(b),
                            // A character outside the byte alphabet: its own UTF-8.
                            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                    bytes
                }
                Algorithm::Spm { .. } => text.replace('▁', " ").into_bytes(),
            },
            // `<0x0A>`: the byte itself.
            TokenType::Byte => match text
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => vec![b],
                None => text.as_bytes().to_vec(),
            },
            TokenType::UserDefined => text.as_bytes().to_vec(),
            TokenType::Control | TokenType::Unknown if special => text.as_bytes().to_vec(),
            _ => Vec::new(),
        })
    }

    /// The bytes of a whole sequence of ids (which may not be valid UTF-8 on their own),
    /// control tokens rendered with `special`: `detokenize(ids, false, special)`.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<Vec<u8>, TokenizerError> {
        self.detokenize(ids, false, special)
    }

    /// The bytes of a whole sequence of ids, as llama.cpp's `llama_detokenize(ids,
    /// remove_special, unparse_special)` gives them:
    /// - a SentencePiece vocabulary that prefixes a space drops it from the first piece,
    ///   whatever that piece is (an invisible control token uses the strip up);
    /// - with `remove_special`, a leading BOS (where the vocabulary adds one) is dropped and
    ///   the space after it kept, and a trailing EOS (where it adds one) is dropped;
    /// - control tokens render only with `unparse_special`;
    /// - byte-level BPE vocabularies but `smollm` and `command-r` then remove the spaces
    ///   before `?!.,` and around lone quotes, as llama.cpp's `clean_spaces` does.
    pub fn detokenize(
        &self,
        ids: &[u32],
        remove_special: bool,
        unparse_special: bool,
    ) -> Result<Vec<u8>, TokenizerError> {
        let mut ids = ids;
        let mut strip = self.strips_prefix_space();
        // add_bos and add_eos imply the token exists.
        if remove_special && self.specials.add_bos && ids.first() == self.specials.bos.as_ref() {
            strip = false;
            ids = &ids[1..];
        }
        if remove_special && self.add_eos && ids.last() == self.specials.eos.as_ref() {
            ids = &ids[..ids.len() - 1];
        }
        let mut out = Vec::new();
        for &id in ids {
            let bytes = self.token_bytes(id, unparse_special)?;
            let skip = (std::mem::take(&mut strip) && bytes.first() == Some(&b' ')) as usize;
            out.extend_from_slice(&bytes[skip..]);
        }
        if self.clean_spaces {
            clean_spaces(&mut out);
        }
        Ok(out)
    }

    fn strips_prefix_space(&self) -> bool {
        self.strip_prefix
    }

    /// The special tokens, the end-of-generation set and the type corrections.
    pub fn specials(&self) -> &Specials {
        &self.specials
    }

    /// The BOS token, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.specials.bos
    }

    /// The EOS token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.specials.eos
    }

    /// Whether encoding prepends BOS (see [`tokenize`](Self::tokenize)).
    pub fn add_bos(&self) -> bool {
        self.specials.add_bos
    }

    /// The end-of-generation set: generation stops on any member. Sorted.
    pub fn eog(&self) -> &[u32] {
        &self.specials.eog
    }
}

/// llama.cpp's `clean_spaces` after detokenizing, in its three passes over the bytes: drop
/// the space before `?`, `!`, `.` and `,`; drop both spaces around a lone `'` between spaces;
/// drop the space before `'s`, `'m`, `'re` and `'ve`.
fn clean_spaces(text: &mut Vec<u8>) {
    // Pass 1: " ?", " !", " .", " ,".
    let t: Vec<u8> = std::mem::take(text);
    let mut out = Vec::with_capacity(t.len());
    for (i, &x) in t.iter().enumerate() {
        if i > 0 && t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            out.pop();
        }
        out.push(x);
    }
    // Pass 2: " ' " becomes "'". llama.cpp blanks the space after the quote with a NUL in
    // its buffer as it skips it, so a quote right after that does not see a space before it.
    let mut t = std::mem::take(&mut out);
    let mut i = 0;
    while i < t.len() {
        let x = t[i];
        if i > 0 && x == b'\'' && i + 1 < t.len() && t[i - 1] == b' ' && t[i + 1] == b' ' {
            out.pop();
            out.push(x);
            t[i + 1] = 0;
            i += 2; // the space after it goes too
            continue;
        }
        out.push(x);
        i += 1;
    }
    // Pass 3: " 's", " 'm", " 're", " 've".
    let t = std::mem::take(&mut out);
    for (i, &x) in t.iter().enumerate() {
        if i > 0 && t[i - 1] == b' ' && x == b'\'' && i + 1 < t.len() {
            let next = t[i + 1];
            let two = t.get(i + 2).copied();
            if matches!(next, b's' | b'm')
                || (next, two) == (b'r', Some(b'e'))
                || (next, two) == (b'v', Some(b'e'))
            {
                out.pop();
            }
        }
        out.push(x);
    }
    *text = out;
}

/// Turns a stream of token ids into text, emitting only whole UTF-8 characters: the bytes of
/// a character split across tokens are held until it is complete.
///
/// A stream is a continuation: every token's text is kept whole, the leading space of a
/// SentencePiece piece included (" Paris", as llama.cpp prints it). Only a decoder made with
/// [`at_sequence_start`](Self::at_sequence_start) drops the dummy prefix space of the first
/// piece, as a whole sequence's [`Tokenizer::decode`] does.
pub struct IncrementalDecoder<'t> {
    tokenizer: &'t Tokenizer,
    special: bool,
    pending: Vec<u8>,
    /// The first token is still to come and its SentencePiece prefix space is to drop.
    strip_next: bool,
}

impl<'t> IncrementalDecoder<'t> {
    /// A decoder of a continuation, rendering control tokens when `special` is set.
    pub fn new(tokenizer: &'t Tokenizer, special: bool) -> Self {
        IncrementalDecoder {
            tokenizer,
            special,
            pending: Vec::new(),
            strip_next: false,
        }
    }

    /// The same decoder for a sequence from its very start: the first piece's SentencePiece
    /// prefix space is dropped.
    pub fn at_sequence_start(mut self) -> Self {
        self.strip_next = self.tokenizer.strips_prefix_space();
        self
    }

    /// Adds one token; returns the text that is now complete (possibly empty). Bytes that
    /// can never form a character become U+FFFD at once; the first bytes of a character that
    /// a later token may complete are held.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let bytes = self.tokenizer.token_bytes(id, self.special)?;
        let strip = std::mem::take(&mut self.strip_next) && bytes.first() == Some(&b' ');
        self.pending.extend_from_slice(&bytes[strip as usize..]);
        let mut out = String::new();
        let mut done = 0;
        loop {
            match std::str::from_utf8(&self.pending[done..]) {
                Ok(s) => {
                    out.push_str(s);
                    done = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[done..done + valid])
                            .expect("valid up to here"),
                    );
                    done += valid;
                    match e.error_len() {
                        // Invalid whatever follows: one U+FFFD, as String::from_utf8_lossy.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            done += n;
                        }
                        // Incomplete at the end: wait for the next token.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..done);
        Ok(out)
    }

    /// The bytes still held at the end of a stream, as text with U+FFFD for what is incomplete.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}
