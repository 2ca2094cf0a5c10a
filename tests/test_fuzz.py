"""The fuzz suite (tests/fuzz.py) at a fixed seed and a small budget: 30 mutated inputs of each
category, every one of which must work or be refused with one line (issue 15). The long run, and
its measured results, are in docs/RELIABILITY.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).parent / "fuzz.py"


def test_fuzzed_inputs_work_or_are_refused_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(FUZZ), "--cases", "240", "--seed", "7", "--seeds-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "240 cases" in run.stdout and "findings: 0" in run.stdout, run.stdout
