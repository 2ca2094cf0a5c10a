"""Saving and loading ONNX files atomically, weights in external data files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data

ALIGN = 64  # external tensors start on cache-line boundaries
SMALL = 1024  # tensors below this many bytes stay inside the .onnx file


def save_segment(model: onnx.ModelProto, path: Path) -> None:
    """Write path (.onnx) and its weights (path.data) so that neither is ever seen half-written."""
    save_models({path.name: model}, path.parent, weights_name=path.stem + ".data")


def save_models(models: dict[str, onnx.ModelProto], directory: Path, weights_name: str) -> None:
    """Save several models whose large initializers share one weights file.

    Initializers with the same name must hold the same bytes (they are the same weight seen from
    two programs, e.g. the group and single variants); they are stored once.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        placed: dict[str, tuple[int, int, bytes]] = {}
        with open(tmp / weights_name, "wb") as f:
            for model in models.values():
                for t in model.graph.initializer:
                    if len(t.raw_data) < SMALL:
                        continue
                    if t.name in placed:
                        offset, length, data = placed[t.name]
                        if data != t.raw_data:
                            raise ValueError(f"initializer {t.name} differs between linked programs")
                    else:
                        offset = f.tell()
                        pad = (-offset) % ALIGN
                        f.write(b"\0" * pad)
                        offset += pad
                        f.write(t.raw_data)
                        length = len(t.raw_data)
                        placed[t.name] = (offset, length, t.raw_data)
                    set_external_data(t, weights_name, offset, length)
                    t.ClearField("raw_data")
        for name, model in models.items():
            onnx.save_model(model, tmp / name)
        # weights first: an .onnx that exists always finds its weights complete
        os.replace(tmp / weights_name, directory / weights_name)
        for name in models:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)
