//! Pre-tokenizers: how text is cut into pieces before BPE, per `tokenizer.ggml.pre`.
//!
//! The expressions are llama.cpp's (themselves the models' own). The `regex` crate has no
//! look-ahead, so `\s+(?!\S)` is done by hand: a whitespace run that is not at the end of
//! its piece gives back its last character, which then joins the word after it.

use std::sync::LazyLock;

use regex::Regex;

/// GPT-2's expression, without its `\s+(?!\S)` alternative (see the module docs).
static GPT2: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
        .expect("a valid expression")
});

/// Llama 3's expression, likewise.
static LLAMA3: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+")
        .expect("a valid expression")
});

/// llama.cpp's default (a file without `tokenizer.ggml.pre`): punctuation runs first.
static PUNCTUATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[\p{P}\$\+<=>\^~\|]+").expect("a valid expression"));
static NUMBERS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\p{N}+").expect("a valid expression"));
static THREE_DIGITS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[0-9][0-9][0-9]").expect("a valid expression"));

/// A pre-tokenizer of byte-level BPE vocabularies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's expression.
    Gpt2,
    /// Every digit alone (`\p{N}`), then GPT-2's expression: `smollm`, `starcoder`, `refact`,
    /// `command-r`, `codeshell`.
    DigitsThenGpt2,
    /// Llama 3's expression (`llama-bpe`).
    Llama3,
    /// llama.cpp's default for a file that names none: punctuation runs, GPT-2's
    /// expression, number runs, then runs of three digits, each splitting what the one
    /// before left (matches and the text between them alike).
    Default,
}

impl PreTokenizer {
    /// The pre-tokenizer `tokenizer.ggml.pre` names, if chord has it.
    pub fn named(name: &str) -> Option<PreTokenizer> {
        match name {
            // llama.cpp spells GPT-2's own `gpt-2` (phi-2 shares it); `gpt2` is accepted too.
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" => {
                Some(PreTokenizer::DigitsThenGpt2)
            }
            "llama-bpe" | "llama3" => Some(PreTokenizer::Llama3),
            "default" => Some(PreTokenizer::Default),
            _ => None,
        }
    }

    /// Whether a piece that is a whole token is taken as it is, without merging (llama.cpp's
    /// `ignore_merges`, set for Llama 3's vocabularies).
    pub fn ignores_merges(&self) -> bool {
        matches!(self, PreTokenizer::Llama3)
    }

    /// Cuts `text` into pieces (which concatenate back to `text`).
    pub fn split<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut out = Vec::new();
        match self {
            PreTokenizer::Gpt2 => split_with(&GPT2, text, false, &mut out),
            PreTokenizer::Llama3 => split_with(&LLAMA3, text, true, &mut out),
            PreTokenizer::Default => {
                let mut pieces = Vec::new();
                split_keeping_gaps(&PUNCTUATION, text, &mut pieces);
                for p in pieces {
                    split_with(&GPT2, p, false, &mut out);
                }
                for re in [&*NUMBERS, &*THREE_DIGITS] {
                    let pieces = std::mem::take(&mut out);
                    for p in pieces {
                        split_keeping_gaps(re, p, &mut out);
                    }
                }
            }
            PreTokenizer::DigitsThenGpt2 => {
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        // `char::is_numeric` is exactly \p{N} (Nd, Nl, No).
                        split_with(&GPT2, &text[start..i], false, &mut out);
                        out.push(&text[i..i + c.len_utf8()]);
                        start = i + c.len_utf8();
                    }
                }
                split_with(&GPT2, &text[start..], false, &mut out);
            }
        }
        out
    }
}

/// Appends the matches of `re` over `piece` and the runs of text between them, in order.
fn split_keeping_gaps<'a>(re: &Regex, piece: &'a str, out: &mut Vec<&'a str>) {
    let mut pos = 0;
    for m in re.find_iter(piece) {
        if m.start() > pos {
            out.push(&piece[pos..m.start()]);
        }
        out.push(m.as_str());
        pos = m.end();
    }
    if pos < piece.len() {
        out.push(&piece[pos..]);
    }
}

/// Appends the matches of `re` over `piece`, applying `\s+(?!\S)`: an all-whitespace match of
/// more than one character that does not reach the end of the piece gives back its last
/// character. With `keep_newline_runs`, runs ending in a line break came from `\s*[\r\n]+` and
/// are kept whole.
fn split_with<'a>(re: &Regex, piece: &'a str, keep_newline_runs: bool, out: &mut Vec<&'a str>) {
    let mut pos = 0;
    while pos < piece.len() {
        let Some(m) = re.find_at(piece, pos) else {
            out.push(&piece[pos..]);
            return;
        };
        if m.start() > pos {
            out.push(&piece[pos..m.start()]); // not reached: every character starts a match
        }
        let mut end = m.end();
        let s = m.as_str();
        let all_space = s.chars().all(char::is_whitespace);
        let newline_run = keep_newline_runs && s.ends_with(['\r', '\n']);
        if all_space && !newline_run && end < piece.len() && s.chars().count() > 1 {
            end -= s.chars().next_back().map_or(0, char::len_utf8);
        }
        out.push(&piece[m.start()..end]);
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_gives_the_last_space_of_a_run_to_the_next_word() {
        assert_eq!(PreTokenizer::Gpt2.split("a   b"), vec!["a", "  ", " b"]);
        assert_eq!(
            PreTokenizer::Gpt2.split("a\n\nb  "),
            vec!["a", "\n", "\n", "b", "  "]
        );
        assert_eq!(
            PreTokenizer::Gpt2.split("I'm 42!"),
            vec!["I", "'m", " 42", "!"]
        );
    }

    #[test]
    fn smollm_splits_every_digit() {
        assert_eq!(
            PreTokenizer::DigitsThenGpt2.split("x 123"),
            vec!["x", " ", "1", "2", "3"]
        );
    }

    #[test]
    fn pieces_concatenate_back_to_the_text() {
        let text = "Héllo,  wörld!\n\n 12 ½ 日本語 \t end  ";
        for p in [
            PreTokenizer::Gpt2,
            PreTokenizer::DigitsThenGpt2,
            PreTokenizer::Llama3,
            PreTokenizer::Default,
        ] {
            assert_eq!(p.split(text).concat(), text, "{p:?}");
        }
    }
}
