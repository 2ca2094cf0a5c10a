"""What checking a build's files costs (issue 15): the check at load and `edgellm verify`, on a
native build of SmolLM2-135M-Instruct.Q4_1.gguf (built once into OUT, default /tmp/verify-cost),
against loading the build.

    python bench/verify_cost.py [OUT]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import edgellm
from edgellm import reference
from edgellm.build import BuildOptions, compile_model
from edgellm.record import BuildRecord


def timed(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/verify-cost")
    if not (out / "build.json").is_file():
        compile_model(reference.smollm2_gguf(), out, BuildOptions(target="native"))
    record = BuildRecord.load(out)
    print(f"{len(record.files)} files, {sum(size for size, _ in record.files.values()) / 2**20:.1f} MB")
    for full in (False, True):
        read = record.check_files(out, full=full) / 2**20
        times = timed(lambda: record.check_files(out, full=full), 5)
        print(f"{'verify' if full else 'load check'}: reads {read:.1f} MB, median {statistics.median(times) * 1000:.1f} ms")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "edgellm.cli", "verify", str(out)], capture_output=True, text=True)
    print(f"`edgellm verify`: {time.perf_counter() - start:.2f} s with the command's start: {run.stderr.strip()}")
    times = timed(lambda: edgellm.load(out), 3)
    print(f"edgellm.load: median {statistics.median(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
