"""The LoRA adapters compiled into a build (quant/adapters.py), placed for a program's branches.

A LORA_BRANCH program has a branch per site (a matmul: "layer007.qkv_proj") of C = rank x parts
columns (graph/segments.py). An adapter's stored factors are placed once, on first use, into one
SiteFactors per site: A [C, K] and B [C, N] with the parts side by side (B block-diagonal), a
smaller adapter zero-padded; then the engine turns them into what its target binds (ONNX
Runtime: float inputs; native: em_lora branches over the int8 factors as stored) and the result
is kept: a switch back costs a rebinding, not a file read.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.model_config import ModelConfig
from ..errors import EdgeLLMError
from ..graph.segments import branch_parts, part_widths
from ..quant.adapters import ADAPTERS_DIR, layout_key, list_adapters


@dataclass
class SiteFactors:
    a: np.ndarray  # [C, K] int8 or float32: each rank component's input weights
    b: np.ndarray  # [C, N]: (scale * B) transposed, each component's weights over the outputs
    a_scale: np.ndarray | None = None  # [C] float32 for int8 factors
    b_scale: np.ndarray | None = None
    blocks: tuple[tuple[int, int], ...] = ()  # per part of a fused matmul: its outputs (first, count), in order

    def float_a(self) -> np.ndarray:
        return self.a if self.a_scale is None else self.a.astype(np.float32) * self.a_scale[:, None]

    def float_b(self) -> np.ndarray:
        return self.b if self.b_scale is None else self.b.astype(np.float32) * self.b_scale[:, None]


class AdapterStore:
    def __init__(self, build_dir: Path, cfg: ModelConfig, engine):
        """engine: its branch_sites() (site -> K, N, columns; empty without branches) and
        branch_arrays(factors) (the target's form of one adapter)."""
        self.build_dir, self.cfg, self.engine = Path(build_dir), cfg, engine
        self.sites = engine.branch_sites()
        self.available = list_adapters(build_dir, self._key()) if self.sites else {}
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()  # the server's sessions may switch from several threads

    def _key(self) -> str:
        """The layout key of the program's branches (quant/adapters.py LoraLayout.key)."""
        site, (_, _, columns) = next(iter(self.sites.items()))
        return layout_key(columns // len(branch_parts(self.cfg, site.split(".", 1)[1])), list(self.sites))

    @property
    def names(self) -> list[str]:
        return sorted(self.available)

    def inputs(self, name: str):
        """The adapter in the engine's form, for EngineSession.set_adapter."""
        if name not in self.available:
            if not self.sites:
                raise EdgeLLMError(f"adapter {name!r}: {self.build_dir} has no LoRA branches (compile it with a plan "
                                   "whose layers are LORA_BRANCH)")
            known = ", ".join(self.names) or "none compiled yet: edgellm compile-lora"
            raise EdgeLLMError(f"unknown adapter {name!r} in {self.build_dir} (adapters: {known})")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self.engine.branch_arrays(self.place(name))
            return self._loaded[name]

    def place(self, name: str) -> dict[str, SiteFactors]:
        from safetensors.numpy import load_file

        path = self.build_dir / ADAPTERS_DIR / name / "adapter.safetensors"
        try:
            stored = load_file(str(path))
        except (OSError, ValueError) as e:
            raise EdgeLLMError(f"{path}: cannot read the adapter ({e})") from None
        int8 = any(v.dtype == np.int8 for v in stored.values())
        placed, factors = set(), {}
        for site, (k, n, columns) in self.sites.items():
            scope, role = site.split(".", 1)
            parts = branch_parts(self.cfg, role)
            rank = columns // len(parts)
            widths = part_widths(self.cfg, role)
            f = SiteFactors(np.zeros((columns, k), np.int8 if int8 else np.float32),
                            np.zeros((columns, n), np.int8 if int8 else np.float32),
                            np.zeros(columns, np.float32) if int8 else None, np.zeros(columns, np.float32) if int8 else None,
                            tuple((sum(widths[:p]), w) for p, w in enumerate(widths)))
            offset = 0
            for p, (part, width) in enumerate(zip(parts, widths)):
                key = f"{scope}.{part}"
                if f"{key}.a" in stored:
                    a, b = stored[f"{key}.a"], stored[f"{key}.b"]  # [K, r], [r, width]
                    r = a.shape[1]
                    if r > rank or a.shape[0] != k or b.shape != (r, width):
                        raise EdgeLLMError(f"{path}: {key} has factors {a.shape}, {b.shape}; this build's branch there "
                                           f"is [{k}, {rank}], [{rank}, {width}]")
                    f.a[p * rank : p * rank + r] = a.T
                    f.b[p * rank : p * rank + r, offset : offset + width] = b
                    if int8:
                        f.a_scale[p * rank : p * rank + r] = stored[f"{key}.a.scale"]
                        f.b_scale[p * rank : p * rank + r] = stored[f"{key}.b.scale"]
                    placed.add(key)
                offset += width
            factors[site] = f
        stray = sorted({k.removesuffix(".a") for k in stored if k.endswith(".a")} - placed)
        if stray:
            raise EdgeLLMError(f"{path}: changes {stray[0]}, which this build has no LoRA branch for")
        return factors
