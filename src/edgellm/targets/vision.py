"""A vision-language model's image encoder for target cpu: its segments linked into one program
that ONNX Runtime runs once per image (compiled/vision/encoder.onnx + encoder.bin). The C targets
lower the same linked program into their library instead (targets/native/encoder.py).
Its int8 weights are per output channel and run as integer GEMMs (ort_lowering.py
lower_per_channel_matmuls); int4 and a GGUF mmproj's blocks run as MatMulNBits.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..graph.io import Spill, save_models
from .link import link_vision
from .ort_lowering import lower_integer_matmuls, lower_per_channel_matmuls

PROGRAM = "encoder.onnx"


def compile_vision(out: Path, units, plan, options, manifest) -> Path:
    target_dir = out / "compiled" / "vision"
    target_dir.mkdir(parents=True, exist_ok=True)
    spill = Spill(target_dir / f".repacked.tmp{os.getpid()}")
    try:
        program = lower_per_channel_matmuls(link_vision(out, units, plan, options, manifest), spill)
        program = lower_integer_matmuls(program, options.int8_activations, spill)
        save_models({PROGRAM: program}, target_dir, weights_name="encoder.bin")
    finally:
        spill.close()
    return target_dir
