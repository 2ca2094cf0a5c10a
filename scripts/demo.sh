#!/usr/bin/env bash
# Set up, compile SmolLM2-135M-Instruct from its GGUF and answer one prompt (prints TTFT, tokens/s).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
bash scripts/setup.sh
GGUF=$(python -c "from edgellm.reference import smollm2_gguf; print(smollm2_gguf())")
# int4 runs the GGUF's own Q4_1/Q8_0 blocks, as C compiled for this CPU (--target native) with
# int8 dot products: perplexity +0.2-0.4% of the float model (docs/BENCHMARKS.md)
edgellm compile "$GGUF" -o out/smollm2 -c int4 --quantize_embeddings --target native --int8_activations -j 2 --resume
edgellm generate out/smollm2 --chat --prompt "${1:-Explain in two sentences why the sky is blue.}" -n 128
