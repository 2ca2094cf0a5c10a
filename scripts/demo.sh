#!/usr/bin/env bash
# Set up, compile SmolLM2-135M-Instruct from its GGUF and answer one prompt (prints TTFT, tokens/s).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
bash scripts/setup.sh
GGUF=$(python -c "from edgellm.reference import smollm2_gguf; print(smollm2_gguf())")
# no flags: the GGUF's own Q4_1/Q8_0 blocks as they are, as C compiled for this CPU (the native
# target, where a C compiler is installed); -c, --int8_activations etc. trade accuracy for speed
edgellm compile "$GGUF" -o out/smollm2 -j 2 --resume
edgellm generate out/smollm2 --chat --prompt "${1:-Explain in two sentences why the sky is blue.}" -n 128
