"""Build round trips (determinism, --resume after a kill) and bad input through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import build
from edgellm.errors import EdgeLLMError
from tiny_models import save_tiny

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)
CLI = [sys.executable, "-m", "edgellm.cli"]


def artifact_hashes(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    return {k: v["files"] for k, v in manifest["units"].items()}


def compiled_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in (out / "compiled" / "cpu").iterdir()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny("gemma3", tmp_path_factory.mktemp("tiny") / "hf")


def test_compile_twice_gives_identical_artifacts(tiny, tmp_path):
    a = build(tiny, tmp_path / "a", **OPTIONS)
    b = build(tiny, tmp_path / "b", **OPTIONS, jobs=2)
    assert artifact_hashes(a) == artifact_hashes(b)
    assert compiled_bytes(a) == compiled_bytes(b)


def test_killed_compile_resumes_to_identical_artifacts(tiny, tmp_path):
    reference = build(tiny, tmp_path / "ref", **OPTIONS)
    out = tmp_path / "killed"
    args = CLI + ["compile", str(tiny), "-o", str(out), "--max_num_tokens", "128",
                  "--language_group_size", "16", "--future_token_mask_size", "32", "--target", "cpu"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    # kill once some, but not all, units are recorded
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text() or "{}").get("units", {})) > 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"]
    done_before = set(state["units"])
    result = subprocess.run(args + ["--resume", "--log_level", "INFO"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(manifest.read_text())["complete"]
    assert artifact_hashes(out) == artifact_hashes(reference)
    assert compiled_bytes(out) == compiled_bytes(reference)
    assert done_before  # some units were kept from the killed run


def run_cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)


def assert_clean_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_missing_config_json(tmp_path):
    (tmp_path / "m").mkdir()
    assert_clean_error(run_cli("compile", tmp_path / "m", "-o", tmp_path / "o"), "config.json", "missing")


def test_malformed_config_json(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text("{not json")
    assert_clean_error(run_cli("compile", bad, "-o", tmp_path / "o"), "config.json", "malformed")


def test_unknown_architecture(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tiny / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    assert_clean_error(run_cli("compile", bad, "-o", tmp_path / "o"), "mamba", "supported: ")


def test_truncated_safetensors(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    assert_clean_error(run_cli("compile", bad, "-o", tmp_path / "o"), "model.safetensors", "truncated")


def test_truncated_gguf(smollm2_gguf, tmp_path):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    assert_clean_error(run_cli("compile", bad, "-o", tmp_path / "o"), "bad.gguf")


def test_bad_bucket_multiple(tiny, tmp_path):
    result = run_cli("compile", tiny, "-o", tmp_path / "o", "--max_num_tokens", "100", "--future_token_mask_size", "64")
    assert_clean_error(result, "--max_num_tokens 100", "multiple")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the permission check cannot fail")
def test_unwritable_output(tiny, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert_clean_error(run_cli("compile", tiny, "-o", ro / "out"), "not writable")


def test_output_under_a_file_is_an_error(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clean_error(run_cli("compile", tiny, "-o", blocker / "out"), "not writable")


def test_prompt_longer_than_context(tiny, tmp_path):
    out = build(tiny, tmp_path / "o", **OPTIONS)
    result = run_cli("generate", out, "--prompt", " ".join(["w5"] * 200))
    assert_clean_error(result, "200 tokens", "128")


def test_incomplete_build_is_not_loadable(tiny, tmp_path):
    out = tmp_path / "o"
    result = run_cli("compile", tiny, "-o", out, "--onnx", "--max_num_tokens", "128", "--language_group_size", "16",
                     "--future_token_mask_size", "32")
    assert result.returncode == 0, result.stderr
    assert_clean_error(run_cli("generate", out, "--prompt", "w1"), "incomplete")


def test_json_output_is_one_line(tiny, tmp_path):
    out = build(tiny, tmp_path / "o", **OPTIONS)
    result = run_cli("generate", out, "--prompt", "w1 w2 w3", "-n", "5", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert set(data) == {"text", "prompt_tokens", "gen_tokens", "ttft_s", "decode_tps", "peak_rss_mb"}
    assert data["gen_tokens"] == 5 and data["prompt_tokens"] == 3


def test_every_segment_and_program_passes_the_onnx_checker(tiny, tmp_path):
    import onnx

    out = build(tiny, tmp_path / "o", keep_intermediates=True, **OPTIONS)
    files = sorted((out / "onnx").rglob("*.onnx")) + sorted((out / "quant").rglob("*.onnx"))
    files += sorted((out / "compiled" / "cpu").glob("*.onnx"))
    assert len(files) > 2 * 2 * 3 * 4
    for f in files:
        onnx.checker.check_model(str(f), full_check=True)


def test_integer_segments_pass_the_onnx_checker(tiny, tmp_path):
    """Integer weights stay standard ONNX in the IR (DequantizeLinear + MatMul); only the cpu
    target's program uses ONNX Runtime's MatMulNBits."""
    import onnx

    out = build(tiny, tmp_path / "o", plan="int4", keep_intermediates=True, **OPTIONS)
    files = sorted((out / "quant").rglob("*.onnx"))
    ops = set()
    for f in files:
        onnx.checker.check_model(str(f), full_check=True)
        ops |= {n.op_type for n in onnx.load(str(f), load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    program = onnx.load(str(out / "compiled" / "cpu" / "single.onnx"), load_external_data=False)
    assert {n.domain for n in program.graph.node if n.op_type == "MatMulNBits"} == {"com.microsoft"}


def test_compile_false_keeps_the_earlier_build_of_a_unit(tiny, tmp_path):
    """The manual's `compile: False`: the unit is not built in this run. On --resume over an
    earlier build its files are reused as they are; with nothing to reuse the link stops, naming it."""
    plan = tmp_path / "plan.py"
    plan.write_text(
        "def get_layer_configuration(model_properties, layer):\n"
        "    if layer['index'] == 1 and not layer['is_group']:\n"
        "        return {'compile': False}\n"
        "    return {'precision': 'A_BF16_W_INT4'}\n")
    fresh = tmp_path / "fresh"
    result = run_cli("compile", tiny, "-o", fresh, "-c", plan, "--max_num_tokens", 128,
                     "--language_group_size", 16, "--future_token_mask_size", 32)
    assert_clean_error(result, "single/layer001_pre has compile: False and no earlier build")
    out = build(tiny, tmp_path / "out", plan=None, keep_intermediates=True, **OPTIONS)  # everything, BF16
    kept = out / "quant" / "single" / "layer001_post.onnx"
    before = kept.read_bytes()
    build(tiny, out, plan=plan, resume=True, keep_intermediates=True, **OPTIONS)
    assert kept.read_bytes() == before  # not rebuilt as int4
    rebuilt = (out / "quant" / "single" / "layer002_post.onnx").read_bytes()
    assert b"DequantizeLinear" in rebuilt
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_single_stages_run_one_after_another(tiny, tmp_path):
    """--onnx, then --quantize, then --compile (no --resume) build on each other, and rerunning an
    early stage leaves the build incomplete until the later ones run again."""
    out = tmp_path / "o"
    args = ["compile", tiny, "-o", out, "--max_num_tokens", 128, "--language_group_size", 16, "--future_token_mask_size", 32,
            "--target", "cpu"]
    for stage in ("--devkit", "--onnx", "--quantize", "--compile"):
        result = run_cli(*args, stage)
        assert result.returncode == 0, (stage, result.stderr)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"]
    assert run_cli(*args, "--onnx").returncode == 0
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert run_cli(*args, "--quantize", "--compile").returncode == 0
    assert json.loads((out / "manifest.json").read_text())["complete"]
    reference = build(tiny, tmp_path / "ref", **OPTIONS)
    assert compiled_bytes(out) == compiled_bytes(reference)


def test_a_stage_run_with_other_options_does_not_complete_a_stale_build(tiny, tmp_path):
    out = build(tiny, tmp_path / "o", **OPTIONS)
    args = ["compile", tiny, "-o", out, "--max_num_tokens", 128, "--language_group_size", 16, "--future_token_mask_size", 32]
    result = run_cli(*args[:4], "--max_num_tokens", 256, *args[6:], "--quantize", "--compile")
    assert_clean_error(result, "onnx stage has not produced")  # the earlier stages were built without it
    assert not json.loads((out / "manifest.json").read_text())["complete"]


def test_the_build_record_holds_the_resolved_plan_and_a_py_plan_runs_once(tiny, tmp_path):
    """build.json: what was built, written when the build completes; a .py plan is asked once per
    build (it used to run once per stage), and the runtime reads its settings from the record."""
    import edgellm
    from edgellm.errors import EdgeLLMError
    from edgellm.record import BuildRecord

    runs = tmp_path / "runs.txt"
    plan = tmp_path / "plan.py"
    plan.write_text(f"open({str(runs)!r}, 'a').write('ran\\n')\n"
                    "def get_layer_configuration(model_properties, layer):\n"
                    "    return {'precision': 'A_BF16_W_INT8' if layer['is_group'] else 'A_BF16_W_INT4'}\n")
    out = build(tiny, tmp_path / "out", plan, **OPTIONS)
    assert runs.read_text() == "ran\n"
    record = BuildRecord.load(out)
    assert (record.target, record.group_size, record.max_num_tokens, record.buckets) == ("cpu", 16, 128, (32, 64, 96, 128))
    assert record.precisions["group/layer000_pre"] == "A_BF16_W_INT8"
    assert record.precisions["single/layer001_post"] == "A_BF16_W_INT4"
    assert record.summary() == "plan.py"
    assert edgellm.load(out).engine.spec.group_size == 16
    (out / "build.json").write_text('{"format": 1, "target": "cpu"}')
    with pytest.raises(EdgeLLMError, match=r"build.json: not a build record this edgellm reads \(KeyError"):
        edgellm.load(out)
    (out / "build.json").unlink()
    result = subprocess.run(CLI + ["generate", str(out), "--prompt", "w1 w2"], capture_output=True, text=True)
    assert_clean_error(result, "no build.json", "--resume")
    build(tiny, out, plan, resume=True, **OPTIONS)  # writes it again, running nothing else
    assert BuildRecord.load(out) == record


def test_a_build_that_would_not_fit_in_memory_stops_before_writing(tiny, tmp_path, monkeypatch):
    """The estimate (footprint.py) against a machine of 16 kB: a clear error, the output untouched."""
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 4 if name == "SC_PHYS_PAGES" else real(name))
    with pytest.raises(EdgeLLMError, match=r"would need about .* of memory to run .* more than this machine's"):
        build(tiny, tmp_path / "o", **OPTIONS)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _target_files(out: Path, target: str) -> dict:
    """What a build's target reads, byte for byte (the native target's binaries aside: they are
    compiled from model.c, and the linker may record where)."""
    names = ("model.c", "weights.bin", "program.json") if target == "native" else ("group.onnx", "single.onnx", "weights.bin")
    return {name: (out / "compiled" / target / name).read_bytes() for name in names}


@pytest.mark.parametrize("target", ["cpu", "native"])
def test_a_build_keeps_no_intermediates_unless_asked(tiny, tmp_path, target):
    """Without --keep-intermediates no float segment is written and quant/ is gone once the build
    is complete: the target's files are byte for byte those of a build that keeps them, the
    manifest still says how each weight is stored, and --resume makes the same build again."""
    lean = build(tiny, tmp_path / "lean", "int4", target=target, **OPTIONS)
    kept = build(tiny, tmp_path / "kept", "int4", target=target, keep_intermediates=True, **OPTIONS)
    assert not (lean / "onnx").exists() and not (lean / "quant").exists()
    assert any((kept / "onnx").rglob("*.onnx")) and any((kept / "quant").rglob("*.data"))
    assert _target_files(lean, target) == _target_files(kept, target)
    units = json.loads((lean / "manifest.json").read_text())["units"]
    assert not any(key.startswith("onnx:") for key in units)  # made inside each quantize job
    assert units and all(entry["dropped"] for entry in units.values())
    assert {k: v["files"] for k, v in units.items()} == {k: v for k, v in artifact_hashes(kept).items() if k.startswith("quantize:")}
    # --resume over it: up to date (its units hash as recorded, its files are intact), nothing made
    stamps = {p: p.stat().st_mtime_ns for p in (lean / "compiled").rglob("*")}
    build(tiny, lean, "int4", target=target, resume=True, **OPTIONS)
    assert {p: p.stat().st_mtime_ns for p in (lean / "compiled").rglob("*")} == stamps
    # a damaged file is not up to date: the build is made again, from the source
    weights = lean / "compiled" / target / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    build(tiny, lean, "int4", target=target, resume=True, **OPTIONS)
    assert _target_files(lean, target) == _target_files(kept, target)
    assert not (lean / "quant").exists()


def test_the_native_compile_removes_each_quantized_file_once_it_is_read(tiny, tmp_path, monkeypatch):
    """quant/ shrinks while weights.bin grows: by the time the weights are written no weights file
    of the language model's segments is left (one copy of the weights on disk, not two). A compile
    that fails after that, or halfway through the removals, resumes to the same build."""
    from edgellm.errors import EdgeLLMError
    from edgellm.targets import native, stage_files

    reference = _target_files(build(tiny, tmp_path / "ref", "int4", target="native", **OPTIONS), "native")
    left = {}

    def no_compiler(toolchain, target_dir):
        left["data"] = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "out" / "quant").rglob("*.data")
                              if p.stat().st_size)  # (units without weights have an empty one)
        raise EdgeLLMError("cc: killed (test)")

    monkeypatch.setattr(native, "build_programs", no_compiler)
    with pytest.raises(EdgeLLMError, match="killed"):
        build(tiny, tmp_path / "out", "int4", target="native", **OPTIONS)
    assert left["data"] == []
    units = json.loads((tmp_path / "out" / "manifest.json").read_text())["units"]
    for key, entry in units.items():  # the manifest vouches for no file that is gone
        assert entry.get("dropped") or all((tmp_path / "out" / "quant" / name).is_file() for name in entry["files"]), key
    monkeypatch.undo()
    build(tiny, tmp_path / "out", "int4", target="native", resume=True, **OPTIONS)
    assert _target_files(tmp_path / "out", "native") == reference

    release, calls = stage_files.StageFiles.release, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        release(self)

    monkeypatch.setattr(stage_files.StageFiles, "release", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(tiny, tmp_path / "half", "int4", target="native", **OPTIONS)
    # some read and removed (their units dropped), some not yet
    assert any(p.stat().st_size for p in (tmp_path / "half" / "quant").rglob("*.data"))
    assert any(e.get("dropped") for e in json.loads((tmp_path / "half" / "manifest.json").read_text())["units"].values())
    monkeypatch.undo()
    build(tiny, tmp_path / "half", "int4", target="native", resume=True, **OPTIONS)
    assert _target_files(tmp_path / "half", "native") == reference


def test_resume_over_a_complete_build_still_writes_what_its_hashes_do_not_cover(tiny, tmp_path):
    """Up to date, --resume makes no unit again, but the runtime files (a chat template added to
    tokenizer_config.json is in no unit's hash) are written as a build writes them."""
    import shutil

    model = Path(shutil.copytree(tiny, tmp_path / "hf"))
    out = build(model, tmp_path / "o", "int4", target="native", **OPTIONS)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "compiled").rglob("*")}
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    build(model, out, "int4", target="native", resume=True, **OPTIONS)
    assert {p: p.stat().st_mtime_ns for p in (out / "compiled").rglob("*")} == stamps
    assert json.loads((out / "runtime" / "runtime_config.json").read_text())["chat_template"] == "{{ messages[0]['content'] }}"
    from edgellm.record import BuildRecord

    BuildRecord.load(out).check_files(out, full=True)  # the record follows the new runtime files
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_a_compile_stage_alone_after_the_intermediates_went_says_so(tiny, tmp_path):
    out = build(tiny, tmp_path / "o", "int4", **OPTIONS)
    args = ["compile", tiny, "-o", out, "--max_num_tokens", 128, "--language_group_size", 16, "--future_token_mask_size", 32,
            "--target", "cpu", "-c", "int4"]
    assert_clean_error(run_cli(*args, "--compile"), "quantized segment was removed once it was compiled",
                       "--keep-intermediates")


def test_kept_intermediates_compiled_without_keeping_are_removed_as_read(tiny, tmp_path, monkeypatch):
    """quant/ kept by one build (separate group and single files, no hard links) and compiled by a
    later run without --keep-intermediates: a file goes when its initializers are read, whichever
    variant's file they were read from."""
    from edgellm.errors import EdgeLLMError
    from edgellm.targets import native

    out = build(tiny, tmp_path / "o", "int4", target="native", keep_intermediates=True, **OPTIONS)
    assert (out / "quant" / "group" / "layer001_post.data").stat().st_nlink == 1
    left = {}

    def no_compiler(toolchain, target_dir):
        left["data"] = sorted(p.name for p in (out / "quant").rglob("*.data") if p.stat().st_size)
        raise EdgeLLMError("cc: killed (test)")

    monkeypatch.setattr(native, "build_programs", no_compiler)
    with pytest.raises(EdgeLLMError, match="killed"):
        build(tiny, out, "int4", target="native", stages=("compile",), **OPTIONS)
    assert left["data"] == []


def test_a_layers_group_and_single_files_are_one_file_on_disk(tiny, tmp_path):
    """Until the build completes, a layer's two variants at one precision share their weights file
    (a hard link); the kept intermediates stay separate files (onnx's checker refuses hard links)."""
    out = tmp_path / "o"
    args = ["compile", tiny, "-o", out, "--max_num_tokens", 128, "--language_group_size", 16, "--future_token_mask_size", 32,
            "--target", "cpu", "-c", "int4"]
    assert run_cli(*args, "--devkit", "--onnx", "--quantize").returncode == 0
    group, single = (out / "quant" / variant / "layer001_post.data" for variant in ("group", "single"))
    assert group.stat().st_ino == single.stat().st_ino and group.stat().st_nlink == 2
    assert run_cli(*args, "--compile").returncode == 0
    assert not (out / "quant").exists()
    kept = build(tiny, tmp_path / "kept", "int4", keep_intermediates=True, **OPTIONS)
    assert (kept / "quant" / "group" / "layer001_post.data").stat().st_nlink == 1
