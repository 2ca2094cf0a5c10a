"""The LoRA adapters compiled into a build (quant/adapters.py), as a program's branch inputs.

A LORA_BRANCH program takes, per branch site, lora.layerNNN.<site>.a [K, C] and .b [C, N] with
C = rank x parts (graph/segments.py), and lora.scale [1]. An adapter's stored factors are placed
into arrays of those shapes once, on first use, and kept: a switch back costs a rebinding, not a
file read. No adapter is zero arrays (one shared buffer) with scale 0.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..config.model_config import ModelConfig
from ..errors import EdgeLLMError
from ..graph.segments import LORA_SCALE, branch_parts, part_widths
from ..quant.adapters import ADAPTERS_DIR, list_adapters


class AdapterStore:
    def __init__(self, build_dir: Path, cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]):
        """shapes: the program's branch inputs (lora.*) and their shapes; empty without branches."""
        self.build_dir, self.cfg = Path(build_dir), cfg
        self.shapes = {name: tuple(shape) for name, shape in shapes.items() if name != LORA_SCALE}
        self.available = list_adapters(build_dir) if self.shapes else {}
        self._loaded: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()  # the server's sessions may switch from several threads
        zeros = np.zeros(max((int(np.prod(s)) for s in self.shapes.values()), default=0), np.float32)
        self.none = {name: zeros[: int(np.prod(shape))].reshape(shape) for name, shape in self.shapes.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self.available)

    def inputs(self, name: str) -> dict[str, np.ndarray]:
        if name not in self.available:
            if not self.shapes:
                raise EdgeLLMError(f"adapter {name!r}: {self.build_dir} has no LoRA branches (compile it with a plan "
                                   "whose layers are LORA_BRANCH)")
            known = ", ".join(self.names) or "none compiled yet: edgellm compile-lora"
            raise EdgeLLMError(f"unknown adapter {name!r} in {self.build_dir} (adapters: {known})")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._place(name)
            return self._loaded[name]

    def _place(self, name: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        path = self.build_dir / ADAPTERS_DIR / name / "adapter.safetensors"
        try:
            stored = load_file(str(path))
        except (OSError, ValueError) as e:
            raise EdgeLLMError(f"{path}: cannot read the adapter ({e})") from None
        arrays = {n: np.zeros(s, np.float32) for n, s in self.shapes.items()}
        placed = set()
        for layer_site in {n.removeprefix("lora.").rsplit(".", 1)[0] for n in self.shapes}:
            scope, site = layer_site.split(".", 1)
            a, b = arrays[f"lora.{layer_site}.a"], arrays[f"lora.{layer_site}.b"]
            parts = branch_parts(self.cfg, site)
            rank = a.shape[1] // len(parts)
            offset = 0
            for p, (part, width) in enumerate(zip(parts, part_widths(self.cfg, site))):
                key = f"{scope}.{part}"
                if f"{key}.a" in stored:
                    fa, fb = _factor(stored, f"{key}.a", 0), _factor(stored, f"{key}.b", 1)
                    r = fa.shape[1]
                    if r > rank:
                        raise EdgeLLMError(f"{path}: {key} has rank {r}; this build's branches have rank {rank}")
                    a[:, p * rank : p * rank + r] = fa
                    b[p * rank : p * rank + r, offset : offset + width] = fb
                    placed.add(key)
                offset += width
        stray = sorted({k.split(".a")[0] for k in stored if k.endswith(".a")} - placed)
        if stray:
            raise EdgeLLMError(f"{path}: changes {stray[0]}, which this build has no LoRA branch for")
        return arrays


def _factor(stored: dict, key: str, axis: int) -> np.ndarray:
    """A stored factor as float32 (int8 values times their per-rank-component scale)."""
    values = stored[key]
    if values.dtype == np.int8:
        return values.astype(np.float32) * np.expand_dims(stored[f"{key}.scale"], axis)
    return values.astype(np.float32, copy=False)
