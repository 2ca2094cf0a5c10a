from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edgellm import reference
from edgellm.build import BuildOptions, compile_model

MODEL_CACHE = Path(os.path.expanduser("~/.cache/edgellm-test-models"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return reference.smollm2_gguf()


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return reference.gemma3_gguf(MODEL_CACHE)


@pytest.fixture(scope="session")
def fp32_plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "fp32.json"
    path.write_text('{"default": {"precision": "FP32"}}')
    return path


def build(model, out, plan=None, **options) -> Path:
    return compile_model(model, out, BuildOptions(configuration_file=str(plan) if plan else None, **options))


def edited_copy(model_dir: Path, out: Path, edit) -> Path:
    """A copy of a Hugging Face model directory at out whose config.json edit(raw) changed in place."""
    shutil.copytree(model_dir, out)
    raw = json.loads((out / "config.json").read_text())
    edit(raw)
    (out / "config.json").write_text(json.dumps(raw))
    return out
