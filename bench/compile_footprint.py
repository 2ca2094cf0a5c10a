"""What a compile costs: wall time, peak RSS and peak disk of its output directory.

    python bench/compile_footprint.py OUT -- edgellm compile MODEL -o OUT [flags]

Runs the command and samples, every 0.3 s, the resident memory of its process tree (summed, and
the largest single process: `-j N` workers each map the source) and the bytes under OUT (hard
links counted once). Prints the peaks, the wall time and what OUT holds at the end. Memory and
disk only: run it alone on the machine if the time matters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil


def disk_bytes(path: str) -> int:
    total, seen = 0, set()
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # (removed while walking)
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def main() -> int:
    if "--" not in sys.argv or sys.argv.index("--") != 2:
        raise SystemExit(__doc__)
    out, command = sys.argv[1], sys.argv[3:]
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    root = psutil.Process(proc.pid)
    peak_sum = peak_one = peak_disk = 0
    while proc.poll() is None:
        try:
            each = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            each = [0]
        peak_sum, peak_one = max(peak_sum, sum(each)), max(peak_one, max(each))
        peak_disk = max(peak_disk, disk_bytes(out))
        time.sleep(0.3)
    mb = 1e6
    print(f"exit {proc.returncode}, {time.perf_counter() - started:.1f} s; peak RSS {peak_sum / mb:.0f} MB summed over "
          f"its processes ({peak_one / mb:.0f} MB the largest); {out}: peak {peak_disk / mb:.0f} MB, at the end "
          f"{disk_bytes(out) / mb:.0f} MB")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
