"""The command line's own errors: a usage error is one line naming the problem and exit code 2;
no arguments prints the help; Ctrl-C stops a build with exit code 130, never 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "edgellm.cli"]


@pytest.mark.parametrize("args, needle", [
    (["compile"], "Missing argument 'model'"),
    (["compile", "--bogus", "x"], "No such option: --bogus"),
    (["generate", "x", "-n", "abc"], "--max-new-tokens"),
    (["generate", "x"], "Missing option '--prompt'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["serve", "x", "--port", "http"], "--port"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    result = subprocess.run(CLI + args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-5"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["-n", "0"], "--max-new-tokens"),
    (["--threads", "100000"], "--threads"),
    (["--threads", "0"], "--threads"),
])
def test_runtime_flags_out_of_range_are_refused_before_anything_runs(tmp_path, flags, needle):
    # checked before the build is even opened: tmp_path is no build, and the flag is what is named
    result = subprocess.run(CLI + ["generate", str(tmp_path), "--prompt", "hi", *flags], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_no_arguments_prints_the_commands():
    result = subprocess.run(CLI, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for command in ("compile", "generate", "chat", "serve"):
        assert command in result.stdout


def test_ctrl_c_during_a_build_exits_130_with_a_message(smollm2_gguf, tmp_path):
    # Python's own SIGINT handler, as in a terminal: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored, and then Python installs none
    interactive = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "sys.argv[0] = 'edgellm'; from edgellm.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", interactive, "compile", str(smollm2_gguf), "-o",
                             str(tmp_path / "out"), "-c", "int8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(4)  # well into the build (it takes ~20 s)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
