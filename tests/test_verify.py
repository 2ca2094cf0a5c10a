"""A build's files against what the build wrote (issue 15, group 6): `edgellm verify` finds any
changed byte; loading refuses a truncated program or library, or a changed library, with one line
instead of a crash. And what compile checks before it builds (group 5), and what it cleans up
after a killed build (group 9)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import build
from tiny_models import save_tiny

CLI = [sys.executable, "-m", "edgellm.cli"]
SMALL = dict(max_num_tokens=64, language_group_size=16, future_token_mask_size=64)


def run(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()  # (compile's progress bars come before the error)
    assert "Traceback" not in result.stderr and lines[-1].startswith("error:"), result.stderr
    assert sum("error" in line for line in lines) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("verify") / "model")


@pytest.fixture(scope="module", params=["cpu", "native"])
def tiny_build(request, tiny_model, tmp_path_factory, fp32_plan):
    return build(tiny_model, tmp_path_factory.mktemp(request.param) / "out", fp32_plan, target=request.param, **SMALL)


@pytest.fixture
def damaged(tiny_build, tmp_path):
    return Path(shutil.copytree(tiny_build, tmp_path / "build"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_accepts_the_build_as_written(tiny_build):
    result = run("verify", tiny_build)
    assert result.returncode == 0 and "verified" in result.stderr, result.stderr
    listed = json.loads((tiny_build / "build.json").read_text())["files"]
    target = json.loads((tiny_build / "build.json").read_text())["target"]
    assert f"compiled/{target}/weights.bin" in listed and "runtime/tokenizer.json" in listed
    assert not any(name.startswith(("onnx/", "quant/")) for name in listed)  # the build's own stages


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_verify_finds_one_changed_byte_in_the_weights(tiny_build, damaged, where):
    target = json.loads((tiny_build / "build.json").read_text())["target"]
    weights = damaged / "compiled" / target / "weights.bin"
    flip_byte(weights, int(where * (weights.stat().st_size - 1)))
    assert_one_line_error(run("verify", damaged), "weights.bin: its contents differ")


def test_verify_names_an_edited_runtime_file(damaged):
    path = damaged / "runtime" / "runtime_config.json"
    path.write_text(path.read_text().replace("}", ' , "x": 1}', 1))
    assert_one_line_error(run("verify", damaged), "runtime_config.json")


def test_a_truncated_weights_file_is_refused_at_load(tiny_build, damaged):
    target = json.loads((tiny_build / "build.json").read_text())["target"]
    weights = damaged / "compiled" / target / "weights.bin"
    os.truncate(weights, weights.stat().st_size // 2)
    assert_one_line_error(run("generate", damaged, "-p", "w1", "-n", "2"), "weights.bin", "bytes, but the build wrote")


def test_a_damaged_library_is_refused_at_load_not_run(tiny_model, tmp_path, fp32_plan):
    out = build(tiny_model, tmp_path / "out", fp32_plan, target="native", **SMALL)
    library = out / "compiled" / "native" / "libmodel.so"
    original = library.read_bytes()
    os.truncate(library, len(original) // 2)  # mapped and run, this dies of SIGBUS
    assert_one_line_error(run("generate", out, "-p", "w1", "-n", "2"), "libmodel.so", "bytes, but the build wrote")
    library.write_bytes(original)
    flip_byte(library, len(original) // 3)
    assert_one_line_error(run("generate", out, "-p", "w1", "-n", "2"), "libmodel.so: its contents differ")


def test_a_build_without_digests_cannot_be_verified(damaged):
    record = json.loads((damaged / "build.json").read_text())
    del record["files"]  # as an older edgellm wrote it: still runs
    (damaged / "build.json").write_text(json.dumps(record))
    assert_one_line_error(run("verify", damaged), "lists no file digests")
    assert run("generate", damaged, "-p", "w1", "-n", "2").returncode == 0


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def rewrite_tensor(model: Path, name: str, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, model / "model.safetensors")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_compile_refuses_weights_that_are_not_finite(model_copy, tmp_path, value):
    def poison(w):
        w = w.copy()
        w.flat[w.size // 2] = value
        return w

    rewrite_tensor(model_copy, "model.layers.1.mlp.down_proj.weight", poison)
    result = run("compile", model_copy, "-o", tmp_path / "out", "--target", "cpu", "--max_num_tokens", "64",
                 "--future_token_mask_size", "64", "--language_group_size", "16")
    assert_one_line_error(result, "model.layers.1.mlp.down_proj.weight holds NaN or infinite values")
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


@pytest.mark.parametrize("name", ["model.layers.0.input_layernorm.weight", "model.norm.weight"])
def test_compile_refuses_a_norm_of_the_wrong_shape(model_copy, tmp_path, name):
    rewrite_tensor(model_copy, name, lambda w: np.concatenate([w, w[:3]]))
    result = run("compile", model_copy, "-o", tmp_path / "out", "--target", "cpu")
    assert_one_line_error(result, f"hidden_size 64 = (64,), but {name} has shape (67,)")


def test_a_build_removes_what_a_killed_build_left(tiny_model, tmp_path, fp32_plan):
    out = build(tiny_model, tmp_path / "out", fp32_plan, target="cpu", **SMALL)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended
    left = [out / f".weights.bin.tmp{dead_pid}", out / "onnx" / "group" / f".layer000.spill{dead_pid}",
            out / "compiled" / f".tmp{dead_pid}-x1y2" / "weights.bin"]
    kept = [out / "onnx" / f".model.tmp{os.getpid()}", out / "onnx" / ".notes"]  # a running build's; not a temporary
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    build(tiny_model, out, fp32_plan, target="cpu", resume=True, **SMALL)
    assert not any(p.exists() for p in left) and not (out / "compiled" / f".tmp{dead_pid}-x1y2").exists()
    assert all(p.exists() for p in kept)
