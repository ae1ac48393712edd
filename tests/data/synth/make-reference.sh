#!/bin/sh
# Remakes llama.cpp's reference for tests/synth.rs: the synthetic F32 model below, each
# prompt's token ids (llama-tokenize) and its 32-token greedy continuation (llama-completion,
# F32 KV cache), the continuation stored as raw bytes without the two newlines that
# llama-completion prints after it.
#
# usage: tests/data/synth/make-reference.sh LLAMA_CPP_BIN_DIR   (from the repository root,
# after `cargo build --release`; ../shared/tools/llamacpp-build makes the llama.cpp tools)
set -eu
bin=$1
out=tests/data/synth
model=models/synth/s320-f32-seed1.gguf
mkdir -p models/synth
target/release/chord synth "$model" --dim 320 --layers 5 --heads 5 --kv-heads 1 \
  --ffn 864 --vocab 2000 --dtype f32 --seed 1
sha256sum "$model" | cut -d' ' -f1 > "$out/s320-f32-seed1.sha256"
n=0
while IFS= read -r prompt; do
  n=$((n + 1))
  "$bin/llama-tokenize" -m "$model" -p "$prompt" --ids --log-disable 2>/dev/null \
    > "$out/prompt$n.ids"
  "$bin/llama-completion" -m "$model" -p "$prompt" -n 32 --temp 0 -ctk f32 -ctv f32 -t 2 \
    --no-display-prompt -no-cnv --seed 1 2>/dev/null > "$out/prompt$n.raw"
  python3 - "$out/prompt$n.raw" "$out/prompt$n.greedy" <<'PY'
import sys
raw = open(sys.argv[1], 'rb').read()
assert raw.endswith(b'\n\n'), raw[-8:]
open(sys.argv[2], 'wb').write(raw[:-2])
PY
  rm "$out/prompt$n.raw"
done < "$out/prompts.txt"
