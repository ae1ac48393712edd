#!/usr/bin/env python3
"""llama.cpp's answers on GGUF tokenizer variants: special tokens, end of generation, BOS,
SentencePiece byte fallback. Writes reference.json beside this file.

What it does:
1. Builds every variant described in variants.json into /tmp/chord-special/ (nothing is
   written into the repository but reference.json):
   - base "default": the default model models/SmolLM2-135M-Instruct.Q4_1.gguf with every
     tensor (bytes and offsets unchanged) and every metadata entry kept in order, then the
     edits, in this order:
       spm_relabel  the GPT-2 byte-level vocabulary re-labelled as a SentencePiece one, ids
                    kept: each token of type 1 (normal) is decoded to bytes with GPT-2's
                    byte-to-unicode table; valid UTF-8 -> that text with " " replaced by
                    U+2581 (type stays 1); else a single byte -> "<0xXX>" (uppercase hex,
                    type 6); else the old text is kept with type 5 (unused). Other tokens keep
                    text and type. It also sets tokenizer.ggml.scores (f32 array, replaced in
                    place or appended) to -id for every id.
       tokens       {"id": text}: replace entries of tokenizer.ggml.tokens
       token_types  {"id": code}: replace entries of tokenizer.ggml.token_type
       set          {key: [type, value]}: replace the entry in place, or append it
       remove       [key]: drop entries
   - base "tiny": a GGUF v3 file with no tensors and no metadata; tiny_vocab's [text, score,
     type] triples become tokenizer.ggml.tokens (string array), tokenizer.ggml.scores (f32
     array) and tokenizer.ggml.token_type (i32 array), in that order, then the edits above
     (the "set" of every tiny variant carries general.architecture "llama" and
     tokenizer.ggml.model "llama"). llama.cpp loads such a file with vocab_only (as
     llama-tokenize does): the architecture's hyperparameters and tensors are not read.
   Value types of "set": string, bool, u32, i32, f32. Alignment 32 (no general.alignment).
2. Compiles a small driver over libllama's public API (probe.cpp, kept in this file as a
   string) with clang++ into /tmp/chord-special/, for what the command-line tools do not
   print: llama_detokenize, llama_token_to_piece, llama_vocab_is_eog over every id,
   llama_vocab_get_attr, the EOM id (from the load log) and generated ids.
3. Runs llama.cpp on every case (CASES below) and writes reference.json, a JSON array of
   records {"variant", "kind", inputs..., outputs..., "command", "note" (some)}:
   tokenize     text, add_special (llama_tokenize's flag: BOS if the vocabulary adds one),
                parse_special, ids, tokens (the file's texts of those ids), warning (what
                llama.cpp logged, e.g. the double-BOS warning); or error: how llama-tokenize
                ended, its error lines, where the exception was thrown, and what
                llama_tokenize threw when called directly. text_from: where the text came from.
                Run by llama-tokenize (-f FILE --no-escape) and checked against llama_tokenize
                (llama-tokenize passes the vocabulary's add_bos as add_special unless --no-bos;
                no variant here adds EOS, so the two calls mean the same).
   detokenize   ids, tokens, remove_special, unparse_special, bytes_hex (llama_detokenize's
                exact bytes), text (null if not UTF-8), pieces_hex (llama_token_to_piece with
                lstrip 0 and special true / false, per id); ids_from when computed.
   eog          ids (every id with llama_vocab_is_eog, sorted), eog_texts, eos, eot, eom (null:
                none), control_ids_corrected (ids llama.cpp made control although the file does
                not type them 3), attr_changes (every id whose attribute after loading differs
                from its file type: id, text, file_type, attr names), load_warnings.
   add_bos      add_bos (llama_vocab_get_add_bos), bos, add_eos.
   generate     prompt, add_special, parse_special (llama-simple tokenizes with both true),
                prompt_ids, n_predict, gen_ids (greedy, EOG not included), gen_text and
                gen_text_hex (what llama-simple printed after the prompt), stopped_at_eog,
                eog_id (the EOG token that stopped it, not printed).
   chat_prompt  messages, use_jinja, add_generation_prompt, rendered (the text the chat path
                tokenizes), template_output (the template's output before common/chat.cpp
                strips a leading BOS text), add_special, parse_special, prompt_ids.
   Tokenization is run twice, by llama-tokenize and by llama_tokenize through the driver, and
   the script stops if they disagree. Generation is run twice too, by llama-simple (whose
   printed text is recorded; it has no thread option, OMP_THREAD_LIMIT=2 caps it) and by the
   driver (same loop, 2 threads, for the ids).
   The output is deterministic: two runs give the same file.

Run from anywhere: python3 tests/data/special/make_reference.py
Needs: ../shared/tools/llamacpp-build (relative to the repository: prints llama.cpp's bin
directory on its last line, building it the first time), clang++, and the default model in
models/ (models/SmolLM2-135M-Instruct.Q4_1.gguf). About a minute on 2 cores; llama.cpp runs
with 2 threads and greedy sampling, a few tokens each.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD = REPO.parent / "shared" / "tools" / "llamacpp-build"
WORK = Path("/tmp/chord-special")
THREADS = "2"

# ---------------------------------------------------------------------------------------
# GGUF: read metadata (typed), keep tensor infos and data as bytes, write back
# ---------------------------------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
          U64: "Q", I64: "q", F64: "d"}
TYPE_NAMES = {"string": STR, "bool": BOOL, "u32": U32, "i32": I32, "f32": F32}


class Reader:
    def __init__(self, data):
        self.d, self.p = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.d, self.p)
        self.p += struct.calcsize("<" + fmt)
        return v[0]

    def string(self):
        n = self.take("Q")
        s = self.d[self.p:self.p + n]
        self.p += n
        return s.decode("utf-8", "surrogateescape")

    def value(self, t):
        if t == STR:
            return self.string()
        if t == ARR:
            at, n = self.take("I"), self.take("Q")
            if at in SCALAR:
                fmt = "<%d%s" % (n, SCALAR[at])
                v = list(struct.unpack_from(fmt, self.d, self.p))
                self.p += struct.calcsize(fmt)
                return (at, v)
            return (at, [self.value(at) for _ in range(n)])
        return self.take(SCALAR[t])


def read_gguf(path):
    """(metadata as [[key, type, value]], raw tensor-info bytes, n_tensors, data bytes)."""
    data = Path(path).read_bytes()
    r = Reader(data)
    assert data[:4] == b"GGUF"
    r.p = 4
    version, n_t, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    assert version == 3
    kvs = []
    for _ in range(n_kv):
        k = r.string()
        t = r.take("I")
        kvs.append([k, t, r.value(t)])
    assert not any(k == "general.alignment" for k, _, _ in kvs)
    start = r.p
    for _ in range(n_t):
        r.string()
        nd = r.take("I")
        r.p += 8 * nd + 4 + 8
    infos = data[start:r.p]
    data_start = r.p + (-r.p) % 32
    return kvs, infos, n_t, data[data_start:]


def enc_str(s):
    b = s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def enc_value(t, v):
    if t == STR:
        return enc_str(v)
    if t == ARR:
        at, items = v
        head = struct.pack("<IQ", at, len(items))
        if at in SCALAR:
            return head + struct.pack("<%d%s" % (len(items), SCALAR[at]), *items)
        return head + b"".join(enc_value(at, x) for x in items)
    return struct.pack("<" + SCALAR[t], v)


def write_gguf(path, kvs, infos=b"", n_tensors=0, data=b""):
    out = [b"GGUF", struct.pack("<IQQ", 3, n_tensors, len(kvs))]
    for k, t, v in kvs:
        out += [enc_str(k), struct.pack("<I", t), enc_value(t, v)]
    out.append(infos)
    body = b"".join(out)
    if n_tensors:
        body += b"\0" * ((-len(body)) % 32)
    Path(path).write_bytes(body + data)


def gpt2_byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def kv_get(kvs, key):
    for e in kvs:
        if e[0] == key:
            return e
    return None


def kv_set(kvs, key, t, v):
    e = kv_get(kvs, key)
    if e:
        e[1], e[2] = t, v
    else:
        kvs.append([key, t, v])


def spm_relabel(kvs):
    dec = gpt2_byte_decoder()
    toks = kv_get(kvs, "tokenizer.ggml.tokens")[2][1]
    types = kv_get(kvs, "tokenizer.ggml.token_type")[2][1]
    new_t, new_ty = [], []
    for text, ty in zip(toks, types):
        if ty != 1:
            new_t.append(text)
            new_ty.append(ty)
            continue
        raw = bytes(dec[c] for c in text)
        try:
            new_t.append(raw.decode("utf-8").replace(" ", "\u2581"))
            new_ty.append(1)
        except UnicodeDecodeError:
            if len(raw) == 1:
                new_t.append("<0x%02X>" % raw[0])
                new_ty.append(6)
            else:
                new_t.append(text)
                new_ty.append(5)
    assert len(set(new_t)) == len(new_t), "relabelled vocabulary has duplicate texts"
    kv_set(kvs, "tokenizer.ggml.tokens", ARR, (STR, new_t))
    kv_set(kvs, "tokenizer.ggml.token_type", ARR, (I32, new_ty))
    kv_set(kvs, "tokenizer.ggml.scores", ARR, (F32, [float(-i) for i in range(len(new_t))]))


def build_variant(name, spec, default):
    """Writes WORK/name.gguf; returns (path, final metadata)."""
    path = WORK / f"{name}.gguf"
    if spec["base"] == "default":
        kvs = [[k, t, (v[0], list(v[1])) if t == ARR else v] for k, t, v in default[0]]
        infos, n_t, data = default[1], default[2], default[3]
    else:
        assert spec["base"] == "tiny"
        voc = spec["tiny_vocab"]
        kvs = [["tokenizer.ggml.tokens", ARR, (STR, [e[0] for e in voc])],
               ["tokenizer.ggml.scores", ARR, (F32, [float(e[1]) for e in voc])],
               ["tokenizer.ggml.token_type", ARR, (I32, [int(e[2]) for e in voc])]]
        infos, n_t, data = b"", 0, b""
    if spec.get("spm_relabel"):
        spm_relabel(kvs)
    for i, text in spec.get("tokens", {}).items():
        kv_get(kvs, "tokenizer.ggml.tokens")[2][1][int(i)] = text
    for i, code in spec.get("token_types", {}).items():
        kv_get(kvs, "tokenizer.ggml.token_type")[2][1][int(i)] = int(code)
    for key, (tname, value) in spec.get("set", {}).items():
        kv_set(kvs, key, TYPE_NAMES[tname], value)
    for key in spec.get("remove", []):
        assert kv_get(kvs, key), f"{name}: no key {key} to remove"
        kvs = [e for e in kvs if e[0] != key]
    write_gguf(path, kvs, infos, n_t, data)
    return path, kvs


# ---------------------------------------------------------------------------------------
# llama.cpp: the tools, and a driver over libllama
# ---------------------------------------------------------------------------------------
PROBE_CPP = r'''
// probe: a small driver over libllama's public API, printing one JSON object on stdout.
//   probe info  MODEL                                   add_bos, bos/eos/eot/eom, EOG set, attributes
//   probe tok   MODEL ADD_SPECIAL PARSE_SPECIAL HEX     llama_tokenize (exceptions caught and reported)
//   probe detok MODEL REMOVE_SPECIAL UNPARSE_SPECIAL ID...  llama_detokenize and llama_token_to_piece
//   probe gen   MODEL N HEX                             llama-simple's loop (tokenize with add_special and
//                                                       parse_special true, greedy, stop at EOG), 2 threads
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

static std::string hex(const std::string & s) {
    static const char * d = "0123456789abcdef";
    std::string r;
    for (unsigned char c : s) { r += d[c >> 4]; r += d[c & 15]; }
    return r;
}
static std::string unhex(const char * h) {
    std::string r;
    for (size_t i = 0; h[i] && h[i + 1]; i += 2) {
        char b[3] = {h[i], h[i + 1], 0};
        r += (char) strtol(b, nullptr, 16);
    }
    return r;
}
static std::string g_log, g_warn;
static ggml_log_level g_last = GGML_LOG_LEVEL_NONE;
static void on_log(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_CONT) level = g_last; else g_last = level;
    g_log += text;
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        g_warn += text;
        if (!g_warn.empty() && g_warn.back() != '\n') g_warn += '\n';
    }
}
static std::string json_str(const std::string & s) {
    std::string r = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { r += '\\'; r += c; }
        else if (c < 0x20) { char b[8]; snprintf(b, sizeof b, "\\u%04x", c); r += b; }
        else r += c;
    }
    return r + "\"";
}
static int log_id(const char * label) {  // e.g. "print_info: EOM token             = 2 '<|eom_id|>'"
    size_t p = g_log.find(label);
    if (p == std::string::npos) return -1;
    p = g_log.find('=', p);
    return atoi(g_log.c_str() + p + 1);
}
static std::string ids_json(const std::vector<llama_token> & v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); i++) { if (i) s += ", "; s += std::to_string(v[i]); }
    return s + "]";
}
static std::string piece(const llama_vocab * vocab, llama_token t, bool special) {
    std::vector<char> buf(256);
    int n = llama_token_to_piece(vocab, t, buf.data(), buf.size(), 0, special);
    if (n < 0) { buf.resize(-n); n = llama_token_to_piece(vocab, t, buf.data(), buf.size(), 0, special); }
    return std::string(buf.data(), n);
}

int main(int argc, char ** argv) {
    if (argc < 3) { fprintf(stderr, "usage: probe MODE MODEL ...\n"); return 2; }
    std::string mode = argv[1];
    llama_log_set(on_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = mode != "gen";
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[2], mp);
    if (!model) { printf("{\"load_error\": %s}\n", json_str(g_warn).c_str()); return 3; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    if (mode == "info") {
        std::vector<llama_token> eog;
        std::string attrs = "[";
        for (int i = 0; i < n_vocab; i++) {
            if (llama_vocab_is_eog(vocab, i)) eog.push_back(i);
            if (i) attrs += ",";
            attrs += std::to_string((int) llama_vocab_get_attr(vocab, i));
        }
        attrs += "]";
        printf("{\"n_vocab\": %d, \"type\": %d, \"add_bos\": %s, \"add_eos\": %s, \"bos\": %d, \"eos\": %d, \"eot\": %d, "
               "\"eom\": %d, \"nl\": %d, \"pad\": %d, \"fim_pad\": %d, \"fim_rep\": %d, \"fim_sep\": %d, \"eog\": %s, "
               "\"attrs\": %s, \"load_warnings\": %s}\n",
               n_vocab, (int) llama_vocab_type(vocab), llama_vocab_get_add_bos(vocab) ? "true" : "false",
               llama_vocab_get_add_eos(vocab) ? "true" : "false", llama_vocab_bos(vocab), llama_vocab_eos(vocab),
               llama_vocab_eot(vocab), log_id("EOM token"), llama_vocab_nl(vocab), llama_vocab_pad(vocab),
               llama_vocab_fim_pad(vocab), llama_vocab_fim_rep(vocab), llama_vocab_fim_sep(vocab),
               ids_json(eog).c_str(), attrs.c_str(), json_str(g_warn).c_str());
    } else if (mode == "tok") {
        bool add_special = atoi(argv[3]), parse_special = atoi(argv[4]);
        std::string text = unhex(argc > 5 ? argv[5] : "");
        g_warn.clear();
        try {
            int n = -llama_tokenize(vocab, text.data(), text.size(), nullptr, 0, add_special, parse_special);
            std::vector<llama_token> ids(n > 0 ? n : 0);
            g_warn.clear();  // the size query above logged the same warnings
            if (n > 0) llama_tokenize(vocab, text.data(), text.size(), ids.data(), ids.size(), add_special, parse_special);
            printf("{\"ids\": %s, \"warnings\": %s}\n", ids_json(ids).c_str(), json_str(g_warn).c_str());
        } catch (const std::exception & e) {
            printf("{\"exception\": %s}\n", json_str(e.what()).c_str());
        }
    } else if (mode == "detok") {
        bool remove_special = atoi(argv[3]), unparse_special = atoi(argv[4]);
        std::vector<llama_token> ids;
        for (int i = 5; i < argc; i++) ids.push_back(atoi(argv[i]));
        std::vector<char> buf(1024);
        int n = llama_detokenize(vocab, ids.data(), ids.size(), buf.data(), buf.size(), remove_special, unparse_special);
        if (n < 0) { buf.resize(-n); n = llama_detokenize(vocab, ids.data(), ids.size(), buf.data(), buf.size(), remove_special, unparse_special); }
        std::string ps = "[", pn = "[";
        for (size_t i = 0; i < ids.size(); i++) {
            if (i) { ps += ", "; pn += ", "; }
            ps += "\"" + hex(piece(vocab, ids[i], true)) + "\"";
            pn += "\"" + hex(piece(vocab, ids[i], false)) + "\"";
        }
        printf("{\"bytes_hex\": \"%s\", \"pieces_special_hex\": %s], \"pieces_plain_hex\": %s]}\n",
               hex(std::string(buf.data(), n)).c_str(), ps.c_str(), pn.c_str());
    } else if (mode == "gen") {
        int n_predict = atoi(argv[3]);
        std::string prompt = unhex(argv[4]);
        const int n_prompt = -llama_tokenize(vocab, prompt.c_str(), prompt.size(), NULL, 0, true, true);
        std::vector<llama_token> pt(n_prompt);
        llama_tokenize(vocab, prompt.c_str(), prompt.size(), pt.data(), pt.size(), true, true);
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = n_prompt + n_predict - 1;
        cp.n_batch = n_prompt;
        cp.n_threads = 2;
        cp.n_threads_batch = 2;
        llama_context * ctx = llama_init_from_model(model, cp);
        llama_sampler * smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
        std::string prompt_text;
        for (auto id : pt) prompt_text += piece(vocab, id, true);
        llama_batch_ext * batch = llama_batch_ext_init(ctx);
        auto set = [&](const llama_token * toks, int n, llama_pos p0) {
            llama_batch_ext_clear(batch);
            for (int i = 0; i < n; i++) {
                int idx = llama_batch_ext_add_token(batch, 0, toks[i]);
                llama_pos pos = p0 + i;
                llama_batch_ext_set_pos(batch, idx, &pos);
            }
            llama_batch_ext_set_output_logits(batch, n - 1, true);
        };
        set(pt.data(), n_prompt, 0);
        int n_tokens = n_prompt;
        std::vector<llama_token> gen;
        std::string text;
        bool eog = false;
        llama_token eog_id = -1;
        for (int n_pos = 0; n_pos + n_tokens < n_prompt + n_predict;) {
            if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) { fprintf(stderr, "decode failed\n"); return 4; }
            n_pos += n_tokens;
            llama_token id = llama_sampler_sample(smpl, ctx, -1);
            if (llama_vocab_is_eog(vocab, id)) { eog = true; eog_id = id; break; }
            gen.push_back(id);
            text += piece(vocab, id, true);
            set(&id, 1, n_pos);
            n_tokens = 1;
        }
        printf("{\"prompt_ids\": %s, \"prompt_pieces_hex\": \"%s\", \"gen_ids\": %s, \"gen_text_hex\": \"%s\", "
               "\"stopped_at_eog\": %s, \"eog_id\": %d}\n",
               ids_json(pt).c_str(), hex(prompt_text).c_str(), ids_json(gen).c_str(), hex(text).c_str(),
               eog ? "true" : "false", eog_id);
        llama_batch_ext_free(batch);
        llama_sampler_free(smpl);
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}
'''


def llama_bin():
    out = subprocess.run([str(BUILD)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def build_probe(bindir):
    root = bindir.parent.parent  # .../llama.cpp-V/build/bin -> .../llama.cpp-V
    src = WORK / "probe.cpp"
    src.write_text(PROBE_CPP)
    exe = WORK / "probe"
    subprocess.run(["clang++", "-std=c++17", "-O1", str(src), "-o", str(exe),
                    f"-I{root / 'include'}", f"-I{root / 'ggml' / 'include'}", f"-L{bindir}",
                    "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{bindir}"], check=True)
    return exe


ENV = dict(os.environ, OMP_NUM_THREADS=THREADS, OMP_THREAD_LIMIT=THREADS, LC_ALL="C")


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                          timeout=600, **kw)


def probe(mode, path, *args):
    p = run([PROBE, mode, path, *args])
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        sys.exit(f"probe {mode} {path} {args}: rc {p.returncode}\n{p.stdout!r}\n{p.stderr.decode()[-2000:]}")


def crash_report(b):
    """The useful part of a failed tool's stderr: error lines, the uncaught exception, and the
    innermost llama.cpp frames of ggml's backtrace (where the exception was thrown)."""
    lines = b.decode("utf-8", "replace").splitlines()
    out = {}
    errors = [re.sub(r"^[0-9.]+ E ", "", l) for l in lines if re.match(r"^[0-9.]+ E ", l)]
    if errors:
        out["stderr"] = "\n".join(errors)
    i = next((k for k, l in enumerate(lines) if l.startswith("terminate called")), None)
    if i is not None:
        out["stderr"] = "\n".join(lines[i:i + 2])
        frames = [re.sub(r"\(.*", "", m.group(1)).strip() for l in lines
                  for m in [re.match(r"#\d+ +0x[0-9a-f]+ in (.*) from .*libllama\.so", l)] if m]
        if frames:
            out["thrown_in"] = " <- ".join(frames[:2])
    return out


def exit_status(rc):
    if rc < 0:
        return f"killed by signal {-rc} ({signal.Signals(-rc).name}; a shell reports exit status {128 - rc})"
    return f"exit code {rc}"


# ---------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------
def both(*texts):
    """tokenize cases: each text with add_special false and true, parse_special false."""
    return [("tokenize", t, a, False) for t in texts for a in (False, True)]


def parse_both(*texts, add=(False,)):
    return [("tokenize", t, a, p) for t in texts for a in add for p in (False, True)]


def detok_all(*seqs):
    return [("detokenize", s, r, u) for s in seqs for r in (False, True) for u in (False, True)]


CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CLEAN = "Hello , world ! Is it ? I 'm sure they 're here , don 't you think ? He said ' yes ' ."

CASES = {
    "default": [("eog",), ("add_bos",), ("chat_prompt", "Hi", False), ("chat_prompt", "Hi", True),
                ("detokenize_text", CLEAN, False, False), ("tokenize", "x = 1234567", False, False)],
    "spm_relabel": both("The capital of France is", " leading space", "Hello world", "héllo 日本 🍕", "a\n\nb")
                   + parse_both("<|im_start|>user\nHi<|im_end|>\n")
                   + [("eog",), ("add_bos",), ("generate", "The capital of France is", 4),
                      ("detokenize", [7042, 30, 198, 198], False, False),
                      ("detokenize_after_prompt", "The capital of France is", [7042, 30, 198, 198], False, False),
                      ("detokenize", [7042, 30, 198, 198], True, False),
                      ("detokenize", [1, 7042, 30, 198, 198], True, False),
                      ("detokenize", [1, 7042, 30, 198, 198], False, True)],
    "spm_relabel_no_add_bos": [("add_bos",), ("tokenize", "Hello world", True, False),
                               ("tokenize", "Hello world", False, False),
                               ("detokenize", [1, 7042, 30], True, False)],
    "eom_rename": [("eog",), ("tokenize", CHAT_PROMPT, False, True), ("generate", CHAT_PROMPT, 32)],
    "im_end_normal": [("eog",)] + parse_both("<|im_start|>user\nHi<|im_end|>\n")
                     + detok_all([1, 4093, 198, 2, 198]),
    "bos_chatml": [("add_bos",), ("chat_prompt", "Hi", False), ("chat_prompt", "Hi", True),
                   ("tokenize_chat_render", "Hi", False), ("tokenize_chat_render", "Hi", True),
                   ("tokenize", "<|endoftext|>Hello", True, True), ("tokenize", "<|endoftext|>Hello", True, False)],
    "bpe_llama_bpe_no_add_bos": [("add_bos",), ("tokenize", "Hello world", True, False),
                                 ("tokenize", "Hello world", False, False), ("detokenize_text", CLEAN, False, False),
                                 ("detokenize", [1, 19556, 905], True, False), ("detokenize", [1, 19556, 905], True, True)],
    "bpe_smollm_no_add_bos": [("add_bos",), ("tokenize", "Hello world", True, False),
                              ("detokenize_text", CLEAN, False, False)],
    "bpe_no_pre": [("add_bos",), ("tokenize", "Hello world", True, False), ("tokenize", "x = 1234567", False, False),
                   ("detokenize_text", CLEAN, False, False)],
    "phi3_name": [("tokenize", "Hello world", False, False), ("eog",)],
    "spm_no_bytes": [("add_bos",), ("eog",)]
                    + [("tokenize", t, False, False) for t in ("hello", "ab", "", "héllo", "日", "a\tb", "x", "a\nb")]
                    + [("tokenize", "hello", True, False)] + detok_all(["▁hello"], ["<s>", "▁hello", "</s>"]),
    "spm_bytes": [("add_bos",), ("eog",)]
                 + parse_both("日本", "héllo", "a<|tool|>b", "a <|tool|> b", "a <custom> b", "a▁<custom>b",
                              "x<unused0>y", "</s>", "<unk>", "<s>hello", "a<ctrl_unused_1>b", "a<|ctl|>b",
                              "hello\n", " hello", "", add=(False, True))
                 + detok_all(["<0xE6>", "<0x97>", "<0xA5>"], ["<0xFF>"], ["<0xE6>", "<0x97>"],
                             ["▁hello", "<0xC3>", "<0xA9>", "▁word"], ["<0xC3>", "<0xA9>", "▁word"],
                             ["<|tool|>"], ["▁<custom>"], ["a", "<|tool|>", "b"], ["▁<custom>", "▁word"],
                             ["<unused0>"], ["a", "<unused0>", "b"], ["<ctrl_unused_1>"], ["<|ctl|>"], ["<unk>"],
                             ["<s>", "▁word", "</s>"], ["</s>", "▁word"], ["▁word"], ["<s>", "▁word"],
                             ["<s>", "<s>", "▁word"], ["▁", "▁word"], ["<0x20>", "▁word"]),
    "eog_names_control": [("eog",)] + parse_both("a<|im_end|>b", "a<|eos|>b")
                         + detok_all(["a", "<|im_end|>", "<|eos|>"]),
    "eog_names_normal": [("eog",)] + parse_both("a<|im_end|>b", "a<|eos|>b", "a<end>b")
                        + detok_all(["a", "<|im_end|>", "<|eos|>"]),
    "eog_end_return_call": [("eog",)] + parse_both("a<|end|>b", "a<|return|>b") + detok_all(["a", "<|end|>", "<|return|>"]),
    "eog_end_return_only": [("eog",)],
    "eog_end_calls_flush": [("eog",)],
    "harmony": [("eog",)] + parse_both("<|start|>a<|channel|>b<|message|>c<|end|>")
               + detok_all(["<|start|>", "a", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"]),
    "eos_s_with_tool_response": [("eog",)] + parse_both("a</s>b") + detok_all(["a", "</s>"]),
    "eog_fim": [("eog",)] + parse_both("a<PAD>b", "a<|fim_pad|>b", "a<|fim_prefix|>b") + detok_all(["a", "<PAD>", "[PAD]", "<|fim_pad|>"]),
    "eog_key_ids": [("eog",)],
    "phi3_tiny": [("eog",)] + parse_both("<|user|>  hi<|end|>  a", "<s>  hi</s>  a", "<|endoftext|>  a",
                                         "<|tool|>  a")
                 + detok_all(["<|user|>", "▁", "h", "i", "<|end|>"]),
}
HASH_ORDER = ("llama.cpp takes the first matching token in std::unordered_map (token text -> id) iteration order, "
              "libstdc++'s bucket order: not id order, and it changes with the vocabulary's size and contents. ")
NOTES = {
    ("default", "eog"): HASH_ORDER + "eot is 0 (<|endoftext|>) here although 2 (<|im_end|>) is an EOT name too; "
                        "spm_relabel, with the same special tokens, gets eot 2. Id 4 <reponame> is EOG as the FIM "
                        "repo token ('<reponame>' is a Granite FIM name).",
    ("spm_relabel", "eog"): HASH_ORDER + "eot is 2 here but 0 with the unedited model.",
    ("eog_names_control", "eog"): HASH_ORDER + "That decides eot among the EOT names; every EOG name is EOG anyway.",
    ("eog_names_normal", "eog"): HASH_ORDER + "That decides eot among the EOT names; every EOG name is EOG anyway, "
                                 "and gains the control attribute.",
    ("eog_fim", "eog"): HASH_ORDER + "That decides which ONE token per FIM role (pad: <|fim_pad|>, <PAD>, [PAD]; "
                        "repo: <|repo_name|>, <reponame>; sep: <|file_sep|>) is taken: it becomes EOG and control, the "
                        "other candidates stay as they are. FIM prefix/suffix/middle are made control, not EOG.",
    ("spm_relabel", "generate"): "bug report: ids [7042, 30, 198, 198], printed ' Paris.\\n\\n'",
    ("bos_chatml", "chat_prompt"): "bug report: 11 tokens [0, 1, ...]",
}


def main():
    global PROBE
    WORK.mkdir(exist_ok=True)
    bindir = llama_bin()
    PROBE = build_probe(bindir)
    variants = json.loads((HERE / "variants.json").read_text())
    assert set(variants) == set(CASES), set(variants) ^ set(CASES)
    default = read_gguf(MODEL)
    paths, metas = {}, {}
    for name, spec in variants.items():
        paths[name], metas[name] = build_variant(name, spec, default)
    records = []
    for name in variants:
        path, kvs = paths[name], metas[name]
        texts = kv_get(kvs, "tokenizer.ggml.tokens")[2][1]
        ftypes = kv_get(kvs, "tokenizer.ggml.token_type")[2][1]
        index = {t: i for i, t in enumerate(texts)}
        info = probe("info", path)
        for case in CASES[name]:
            kind = case[0]
            rec = {"variant": name}
            if kind == "tokenize":
                rec.update(tokenize(bindir, path, *case[1:], texts))
            elif kind == "detokenize":
                ids = [index[x] if isinstance(x, str) else x for x in case[1]]
                rec.update(detokenize(path, ids, case[2], case[3], texts))
            elif kind == "detokenize_text":  # ids from tokenizing the text with the unedited model
                ids = probe("tok", MODEL, "0", "0", case[1].encode().hex())["ids"]
                rec.update(detokenize(path, ids, case[2], case[3], texts))
                rec["ids_from"] = f"llama_tokenize of {case[1]!r} with the default model"
            elif kind == "detokenize_after_prompt":
                prompt_ids = probe("tok", path, "1", "1", case[1].encode().hex())["ids"]
                rec.update(detokenize(path, prompt_ids + case[2], case[3], case[4], texts))
                rec["ids_from"] = f"the ids of {case[1]!r} (add_special and parse_special true) + {case[2]}"
            elif kind == "eog":
                rec.update(eog(info, texts, ftypes))
            elif kind == "add_bos":
                rec.update(add_bos(info))
            elif kind == "generate":
                rec.update(generate(bindir, path, case[1], case[2]))
            elif kind == "chat_prompt":
                rec.update(chat_prompt(bindir, path, case[1], case[2], kvs))
            elif kind == "tokenize_chat_render":
                cp = chat_prompt(bindir, path, case[1], case[2], kvs)
                text = cp["template_output"]
                rec.update(tokenize(bindir, path, text, True, True, texts))
                rec["text_from"] = ("the template output of the chat path (" + ("jinja" if case[2] else "legacy")
                                    + ") for the user message " + repr(case[1]) + ", before any BOS is stripped")
            else:
                raise ValueError(kind)
            note = NOTES.get((name, rec["kind"]))
            if note:
                rec["note"] = note
            records.append(rec)
            print(name, rec["kind"], {k: v for k, v in rec.items() if k in ("text", "ids", "error", "gen_ids")},
                  file=sys.stderr)
    records = [{k: v for k, v in r.items() if k not in ("command", "note")}
               | {k: r[k] for k in ("command", "note") if k in r} for r in records]
    out = HERE / "reference.json"
    out.write_text(dump(records) + "\n")
    counts = {}
    for r in records:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    print(f"wrote {len(records)} records to {out}: {counts}")


def dump(v, level=0):
    """json.dumps(v, indent=1, ensure_ascii=False), except that lists of scalars and small
    objects of scalars stay on one line."""
    flat = lambda x: not isinstance(x, (list, dict))
    if isinstance(v, list) and all(flat(x) for x in v):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict) and all(flat(x) for x in v.values()) and len(json.dumps(v, ensure_ascii=False)) < 100:
        return json.dumps(v, ensure_ascii=False)
    pad = " " * (level + 1)
    if isinstance(v, list):
        return "[\n" + ",\n".join(pad + dump(x, level + 1) for x in v) + "\n" + " " * level + "]"
    if isinstance(v, dict):
        return "{\n" + ",\n".join(pad + json.dumps(k, ensure_ascii=False) + ": " + dump(x, level + 1)
                                   for k, x in v.items()) + "\n" + " " * level + "}"
    return json.dumps(v, ensure_ascii=False)


def load_failed(info):
    return "load_error" in info


def tokenize(bindir, path, text, add_special, parse_special, texts):
    rec = {"kind": "tokenize", "text": text, "add_special": add_special, "parse_special": parse_special}
    f = WORK / "text.txt"
    f.write_bytes(text.encode())
    cmd = [bindir / "llama-tokenize", "-m", path, "-f", f, "--no-escape", "--ids"]
    if not add_special:
        cmd.append("--no-bos")
    if not parse_special:
        cmd.append("--no-parse-special")
    p = run(cmd)
    rec["command"] = (f"llama-tokenize -m {path.name} -f text.txt --no-escape --ids"
                      + ("" if add_special else " --no-bos") + ("" if parse_special else " --no-parse-special")
                      + "  (text.txt holds the text's UTF-8 bytes; cross-checked with llama_tokenize(vocab, text, len, "
                      + f"ids, n, add_special={str(add_special).lower()}, parse_special={str(parse_special).lower()}))")
    api = probe("tok", path, str(int(add_special)), str(int(parse_special)), text.encode().hex())
    if p.returncode == 0:
        ids = json.loads(p.stdout.decode().strip().splitlines()[-1])
        assert api.get("ids") == ids, (text, ids, api)
        rec["ids"] = ids
        rec["tokens"] = [texts[i] for i in ids]
        if api["warnings"].strip():
            rec["warning"] = api["warnings"].strip()
    else:
        err = {"llama_tokenize": exit_status(p.returncode)}
        err.update(crash_report(p.stderr + p.stdout))
        if "exception" in api:
            err["exception"] = api["exception"]
        if "load_error" in api:
            err["load_error"] = True
        rec["error"] = err
    return rec


def detokenize(path, ids, remove_special, unparse_special, texts):
    d = probe("detok", path, str(int(remove_special)), str(int(unparse_special)), *map(str, ids))
    b = bytes.fromhex(d["bytes_hex"])
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"kind": "detokenize", "ids": ids, "tokens": [texts[i] for i in ids], "remove_special": remove_special,
            "unparse_special": unparse_special, "bytes_hex": d["bytes_hex"], "text": text,
            "pieces_hex": {"special_true": d["pieces_special_hex"], "special_false": d["pieces_plain_hex"]},
            "command": f"llama_detokenize(vocab, ids, n, buf, len, remove_special={str(remove_special).lower()}, "
                       f"unparse_special={str(unparse_special).lower()}); pieces: llama_token_to_piece(vocab, id, buf, "
                       f"len, /*lstrip*/ 0, special) per id  (vocab_only load of {path.name})"}


ATTR = {1: "unknown", 2: "unused", 4: "normal", 8: "control", 16: "user_defined", 32: "byte", 64: "normalized",
        128: "lstrip", 256: "rstrip", 512: "single_word"}
TYPE_ATTR = {1: 4, 2: 1, 3: 8, 4: 16, 5: 2, 6: 32}


def attr_names(a):
    return [n for bit, n in ATTR.items() if a & bit] or ["undefined"]


def eog(info, texts, ftypes):
    cmd = ("llama_vocab_is_eog(vocab, id) for every id; llama_vocab_eos / llama_vocab_eot; eom from the load log "
           "('EOM token = ...'); llama_vocab_get_attr(vocab, id) compared with tokenizer.ggml.token_type")
    if load_failed(info):
        return {"kind": "eog", "error": {"load_error": info["load_error"].strip().splitlines()[-1]}, "command": cmd}
    changes = []
    for i, (ft, a) in enumerate(zip(ftypes, info["attrs"])):
        if TYPE_ATTR.get(ft, 0) != a:
            changes.append({"id": i, "text": texts[i], "file_type": ft, "attr": attr_names(a)})
    none = lambda x: None if x < 0 else x
    return {"kind": "eog", "ids": info["eog"], "eog_texts": [texts[i] for i in info["eog"]],
            "eos": none(info["eos"]), "eot": none(info["eot"]), "eom": none(info["eom"]),
            "control_ids_corrected": [c["id"] for c in changes if ftypes[c["id"]] != 3 and "control" in c["attr"]],
            "attr_changes": changes,
            "load_warnings": [l.strip() for l in info["load_warnings"].splitlines() if l.strip()],
            "command": cmd}


def add_bos(info):
    return {"kind": "add_bos", "add_bos": info["add_bos"], "bos": info["bos"], "add_eos": info["add_eos"],
            "command": "llama_vocab_get_add_bos(vocab), llama_vocab_bos(vocab), llama_vocab_get_add_eos(vocab)"}


def generate(bindir, path, prompt, n):
    g = probe("gen", path, str(n), prompt.encode().hex())
    p = run([bindir / "llama-simple", "-m", path, "-n", n, prompt])
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    printed = p.stdout
    pre = bytes.fromhex(g["prompt_pieces_hex"])
    assert printed.startswith(pre) and printed.endswith(b"\n"), printed
    gen = printed[len(pre):-1]
    assert gen.hex() == g["gen_text_hex"], (gen, g)
    return {"kind": "generate", "prompt": prompt, "add_special": True, "parse_special": True,
            "prompt_ids": g["prompt_ids"], "n_predict": n, "gen_ids": g["gen_ids"],
            "gen_text": gen.decode("utf-8", "replace"), "gen_text_hex": gen.hex(),
            "stopped_at_eog": g["stopped_at_eog"], "eog_id": g["eog_id"] if g["stopped_at_eog"] else None,
            "command": f"llama-simple -m {path.name} -n {n} PROMPT (prints the prompt's pieces, then each generated "
                       "token's llama_token_to_piece(special=true) until an EOG token, which is not printed, then "
                       "'\\n'; gen_text is what it printed after the prompt, without that final newline); ids from "
                       "the same loop through libllama with 2 threads"}


def chat_prompt(bindir, path, user, jinja, kvs):
    cmd = [bindir / "llama-completion", "-m", path, "-cnv", "-st", "-p", user, "--verbose-prompt", "-n", "1",
           "-t", THREADS, "--temp", "0", "-v", "--jinja" if jinja else "--no-jinja"]
    p = run(cmd, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    log = p.stderr.decode("utf-8", "replace")
    m = re.search(r'\bD prompt: "(.*?)"\n\S+ D tokens: \[', log, re.S)
    rendered = m.group(1)
    m = re.search(r"number of tokens in prompt = (\d+)\n", log)
    n = int(m.group(1))
    ids = [int(x) for x in re.findall(r"^\S+ I +(-?\d+) -> '", log[m.end():], re.M)[:n]]
    api = probe("tok", path, "1", "1", rendered.encode().hex())["ids"]
    assert api == ids, (ids, api)
    info = probe("info", path)
    bos_text = bytes.fromhex(probe("detok", path, "0", "1", str(info["bos"]))["pieces_special_hex"][0]).decode()
    # common/chat.cpp (jinja path) strips one leading bos_token from the template output when add_bos is true
    template = kv_get(kvs, "tokenizer.chat_template")[2]
    stripped = jinja and info["add_bos"] and template.startswith("{{ bos_token }}")
    return {"kind": "chat_prompt", "messages": [{"role": "user", "content": user}], "use_jinja": jinja,
            "add_generation_prompt": True, "rendered": rendered,
            "template_output": (bos_text + rendered) if stripped else rendered,
            "add_special": True, "parse_special": True, "prompt_ids": ids,
            "command": f"llama-completion -m {path.name} -cnv -st -p {user!r} --verbose-prompt -n 1 -t {THREADS} --temp 0 -v "
                       + ("--jinja" if jinja else "--no-jinja")
                       + " (rendered: its debug line 'prompt: \"...\"', which it tokenizes with common_tokenize(ctx, "
                         "prompt, add_special=true, parse_special=true); prompt_ids: its --verbose-prompt listing)"
                       + ("; without --jinja (llama-completion's default) the template is not run: "
                          "llama_chat_apply_template recognises it as 'chatml' and uses its built-in ChatML"
                          if not jinja else "; with --jinja common/chat.cpp runs the template and strips one leading "
                                            "bos_token from its output when the vocabulary adds BOS")}


if __name__ == "__main__":
    main()
