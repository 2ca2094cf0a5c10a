"""The command line's own errors: a usage error is one line naming the problem and exit code 2;
no arguments prints the help; Ctrl-C stops a build with exit code 130, never 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "edgellm.cli"]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, fp32_plan):
    from conftest import build
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("tiny-cli")
    return build(save_tiny("llama", root / "model"), root / "out", fp32_plan, target="cpu", max_num_tokens=64,
                 language_group_size=16, future_token_mask_size=64)


@pytest.fixture
def tiny_build_copy(tiny_build, tmp_path):
    """A complete build to damage."""
    import shutil

    return Path(shutil.copytree(tiny_build, tmp_path / "build"))


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


@pytest.mark.parametrize("damage,needle", [
    (("manifest.json", "{not json"), "manifest.json: unreadable"),
    (("model_config.json", '{"family": "llama"}'), "model_config.json: not a model configuration this edgellm reads"),
    (("runtime/tokenizer.json", "[1, 2]"), "tokenizer.json: not a tokenizer"),
    (("runtime/runtime_config.json", "[]"), "runtime_config.json: unreadable"),
])
def test_a_damaged_build_is_one_line_naming_the_file(tiny_build_copy, damage, needle):
    """Outputs are read with the care inputs are (issue 15, group 6): a damaged file is one line."""
    name, text = damage
    (tiny_build_copy / name).write_text(text)
    run = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", str(tiny_build_copy), "-p", "w1 w2", "-n", "2"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr and needle in run.stderr, run.stderr


def test_a_chat_template_that_does_not_parse_fails_chat_not_generate(tiny_build_copy):
    import json

    settings = json.loads((tiny_build_copy / "runtime" / "runtime_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}"
    (tiny_build_copy / "runtime" / "runtime_config.json").write_text(json.dumps(settings))
    plain = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", str(tiny_build_copy), "-p", "w1", "-n", "2"],
                           capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    chat = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", str(tiny_build_copy), "-p", "w1", "-n", "2",
                           "--chat"], capture_output=True, text=True)
    assert chat.returncode == 2 and "the chat template does not parse" in chat.stderr and "Traceback" not in chat.stderr


def test_compile_never_writes_into_the_model_directory(tiny_build, tmp_path):
    import shutil

    model = Path(shutil.copytree(tiny_build.parent / "model", tmp_path / "model"))
    before = sorted(p.name for p in model.iterdir())
    for args in ([], ["-o", str(model)], ["-o", str(model / "out")]):
        run = subprocess.run(CLI + ["compile", "model", *args], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 2 and "inside the model directory" in run.stderr, run.stderr
    assert sorted(p.name for p in model.iterdir()) == before


def test_an_error_quoting_control_characters_stays_one_line(tmp_path):
    odd = tmp_path / "a\nb\tc\x1b[31m"
    result = subprocess.run(CLI + ["generate", str(odd), "-p", "hi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "a\\nb\\tc\\x1b[31m: not an edgellm output directory" in result.stderr


def test_a_tokenizer_that_fails_on_the_prompt_is_one_line(tiny_build_copy):
    import json

    path = tiny_build_copy / "runtime" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["unk_token"] = "[NOT IN THE VOCABULARY]"  # (found by the fuzz suite)
    path.write_text(json.dumps(tokenizer))
    run = subprocess.run(CLI + ["generate", str(tiny_build_copy), "-p", "zzz", "-n", "2"], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "tokenizer.json: the tokenizer cannot encode this text" in run.stderr
