#!/usr/bin/env bash
# The test command (README): every test, real-model ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -d .venv ]; then . .venv/bin/activate; fi
python -m pytest -q "$@"
