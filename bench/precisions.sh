#!/usr/bin/env bash
# What each precision costs in accuracy on SmolLM2-135M: builds every variant
# and runs `edgellm eval` on all of them against the FP32 build of the same weights.
#   bash bench/precisions.sh [WORK_DIR]      (about 5 minutes on 2 cores; prints two tables)
# GGUF source (Q4_1 layers, Q8_0 embeddings): int4 takes the Q4_1 blocks as they are.
# HF source (the same GGUF dequantized to fp32): int4/int8 come from edgellm's own quantizer.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ]; then . .venv/bin/activate; fi
work=${1:-/tmp/edgellm-precisions}
mkdir -p "$work"
gguf=$(python -c "from edgellm.reference import smollm2_gguf; print(smollm2_gguf())")
hf=$(python -c "from edgellm.reference import hf_dir_from_gguf, smollm2_gguf, DEFAULT_CACHE_DIR as d; print(hf_dir_from_gguf(smollm2_gguf(), d / 'SmolLM2-135M-Instruct.Q4_1-hf'))")
build() {  # name source flags...
  local name=$1 src=$2; shift 2
  edgellm compile "$src" -o "$work/$name" -j 2 --resume "$@" >/dev/null 2>"$work/$name.log" || { cat "$work/$name.log"; exit 1; }
  tail -1 "$work/$name.log" >&2
}
build fp32 "$gguf" -c fp32
build bf16 "$gguf"
build int8 "$gguf" -c int8
build int4 "$gguf" -c int4
build int4-int8act "$gguf" -c int4 --int8_activations
build int4-qemb "$gguf" -c int4 --quantize_embeddings
build hf-fp32 "$hf" -c fp32
build hf-int8 "$hf" -c int8
build hf-int4 "$hf" -c int4
build hf-int4-asym "$hf" -c int4 --asymmetric
cd "$work"
edgellm eval fp32 bf16 int8 int4 int4-int8act int4-qemb --reference fp32 --threads 2
edgellm eval hf-fp32 hf-int8 hf-int4 hf-int4-asym --reference hf-fp32 --threads 2
