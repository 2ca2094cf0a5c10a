"""Write a float Hugging Face model as a compressed-tensors "pack-quantized" checkpoint.

What llm-compressor produces for GPTQ/AWQ-style int4/int8 weights (see sources/prequantized.py
for the layout), made here with edgellm's own round-to-nearest quantizer. No such checkpoint can be
downloaded on these machines; this makes them for tests and for trying the pre-quantized path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .blocks import quantize

LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                   "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def pack_int32(values: np.ndarray, bits: int, axis: int = 1) -> np.ndarray:
    """uint8 values [rows, cols] -> int32 words, packed densely from the low bits along axis."""
    if axis == 0:
        return pack_int32(values.T, bits, axis=1).T.copy()
    per_word = 32 // bits
    rows, cols = values.shape
    padded = np.zeros((rows, -(-cols // per_word) * per_word), np.uint32)
    padded[:, :cols] = values
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    words = (padded.reshape(rows, -1, per_word) << shifts).sum(axis=2, dtype=np.uint32)
    return words.view(np.int32)


def export_compressed_tensors(model_dir: Path, out_dir: Path, bits: int = 4, group_size: int = 32,
                              symmetric: bool = True) -> Path:
    from safetensors.numpy import save_file

    from ..sources.safetensors_dir import SafetensorsDirSource

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    source = SafetensorsDirSource(model_dir)
    tensors = {}
    for name in source.tensor_names():
        w = source.tensor(name)
        if not name.endswith(LINEAR_SUFFIXES):
            tensors[name] = np.ascontiguousarray(w)
            continue
        prefix = name[: -len(".weight")]
        if w.shape[1] % group_size:  # the compressed-tensors library cannot decompress a short last group
            raise ValueError(f"{name}: group_size {group_size} does not divide its {w.shape[1]} inputs")
        blocks = quantize(w, bits, group_size, "symmetric" if symmetric else "zero_point")
        offset = 1 << (bits - 1)
        stored = (blocks.q.astype(np.int16) + offset).astype(np.uint8) if symmetric else blocks.q  # values + 2^(bits-1)
        tensors[f"{prefix}.weight_packed"] = pack_int32(stored, bits)
        tensors[f"{prefix}.weight_scale"] = blocks.scale
        tensors[f"{prefix}.weight_shape"] = np.array(w.shape, np.int64)
        if not symmetric:
            tensors[f"{prefix}.weight_zero_point"] = pack_int32(blocks.zero_point, bits, axis=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = dict(source.raw_config)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }},
        "ignore": ["lm_head"],
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                  "special_tokens_map.json"):
        if (model_dir / extra).is_file():
            shutil.copy(model_dir / extra, out_dir / extra)
    return out_dir
