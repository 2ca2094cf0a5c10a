#!/usr/bin/env bash
# A/B of native builds' standalone programs, interleaved on the same prompt (the machine's load
# drifts, so only programs measured side by side compare):
#   bash bench/native_ab.sh RUNS OUT_A OUT_B ...     (OUT_*: edgellm compile ... --target native)
# prints, per build, the median TTFT and decode tokens/s of RUNS runs (100-token prompt, 128
# tokens, 2 threads).
set -euo pipefail
runs=$1; shift
prompt=$(python3 -c "print(','.join(str(i % 1000 + 100) for i in range(100)))")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for _ in $(seq "$runs"); do
  for out in "$@"; do
    echo "$out $("$out/compiled/native/model_main" --tokens "$prompt" --gen 128 --threads 2 | tail -1)" >> "$log"
  done
done
python3 - "$log" "$@" <<'PY'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
for out in sys.argv[2:]:
    runs = [re.search(r"TTFT ([\d.]+) ms, decode ([\d.]+)", l) for l in lines if l.split()[0] == out]
    ttft, tps = [float(m.group(1)) for m in runs], [float(m.group(2)) for m in runs]
    print(f"{out}: TTFT median {statistics.median(ttft):.1f} ms, decode median {statistics.median(tps):.1f} tok/s")
PY
