"""LoRA in a build: where the plan puts branches or merges, and adapters compiled for the branches.

The plan's "lora" key per unit (quant/plan.py):
    LORA_BRANCH  the unit's matmuls get low-rank branches whose factors are program inputs
                 (graph/segments.py); any adapter compiled for the build is switched in at run time
    LORA_MERGED  the one adapter given is added to the unit's float weights before they are
                 quantized to the unit's precision: no branch, no switching
A layer's group and single units must agree (an adapter applies to prefill and decode alike).

A compiled adapter is OUT/adapters/<name>/: adapter.json (its source, rank, storage) and
adapter.safetensors, per changed module (role as ModelConfig names it):
    layerNNN.<role>.a  [in, r]   A transposed
    layerNNN.<role>.b  [r, out]  (scale * B) transposed: alpha / r folded in
int8 by default (the compile manual's choice), one float32 scale per rank component
(.a.scale [r], .b.scale [r]: column j of a, row j of b), or float32 with --lora_dtype float32.
runtime/adapters.py places them into the program's branch inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.model_config import ModelConfig
from ..errors import EdgeLLMError
from ..graph.segments import BRANCH_SITES, branch_parts
from ..graph.units import Unit
from ..sources.lora import LoraAdapter

ADAPTERS_DIR = "adapters"
DTYPES = ("int8", "float32")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_RANK = 16  # branch rank when a plan asks for branches and no adapter is given to size them


@dataclass(frozen=True)
class LoraLayout:
    mode: str  # LORA_DISABLED, LORA_BRANCH or LORA_MERGED (one per build)
    sites: frozenset[tuple[int, str]]  # (layer, matmul site of graph/segments.py BRANCH_SITES)
    rank: int = 0  # branch rank per part (LORA_BRANCH)

    @property
    def key(self) -> str:
        """What an adapter compiled for this layout fits (its rank and sites): kept in adapter.json,
        so a build compiled again with other branches does not offer adapters it cannot run."""
        return layout_key(self.rank, [f"layer{layer:03d}.{site}" for layer, site in self.sites])

    def site_of(self, cfg: ModelConfig, role: str, layer: int) -> tuple[int, str] | None:
        """The branch site holding module role of layer, if the layout covers it."""
        for part_sites in BRANCH_SITES.values():
            for site in part_sites:
                if role in branch_parts(cfg, site) and (layer, site) in self.sites:
                    return layer, site
        return None


def layout_key(rank: int, sites) -> str:
    return hashlib.sha256(json.dumps([rank, sorted(sites)]).encode()).hexdigest()[:16]


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name == "none":
        raise EdgeLLMError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' (and not 'none')")
    return name


def lora_layout(choices: dict[str, str], cfg: ModelConfig, adapters: dict[str, LoraAdapter],
                where: str | None) -> LoraLayout:
    """choices: unit name -> lora mode, for every unit of the build. Checks the plan and the
    adapters against each other; the layout the build compiles."""
    modes: dict[tuple[int, str], dict[bool, str]] = {}
    for is_group in (True, False):
        for part in BRANCH_SITES:
            for layer in range(cfg.num_layers):
                modes.setdefault((layer, part), {})[is_group] = choices[Unit(is_group, part, layer).name]
    for (layer, part), by_variant in modes.items():
        if by_variant[True] != by_variant[False]:
            raise EdgeLLMError(f"{where}: layer {layer} {part} is {by_variant[True]} in the group variant but "
                               f"{by_variant[False]} in the single one; an adapter must apply to prefill and decode alike")
    used = {m[True] for m in modes.values()} - {"LORA_DISABLED"}
    if len(used) > 1:
        raise EdgeLLMError(f"{where}: the plan mixes LORA_BRANCH and LORA_MERGED; choose one per build")
    mode = used.pop() if used else "LORA_DISABLED"
    sites = frozenset((layer, site) for (layer, part), m in modes.items() if m[True] == mode != "LORA_DISABLED"
                      for site in BRANCH_SITES[part])
    if mode == "LORA_DISABLED":
        if adapters:
            raise EdgeLLMError(f"--lora_path given, but the plan ({where or 'default'}) compiles no layer with "
                               "LORA_BRANCH or LORA_MERGED")
        return LoraLayout(mode, sites)
    if mode == "LORA_MERGED" and len(adapters) != 1:
        raise EdgeLLMError(f"{where}: LORA_MERGED merges exactly one adapter; {len(adapters)} given with --lora_path")
    rank = max((a.rank for a in adapters.values()), default=DEFAULT_RANK)
    layout = LoraLayout(mode, sites, rank if mode == "LORA_BRANCH" else 0)
    for name, adapter in adapters.items():
        check_adapter(adapter, layout, cfg, name)
    return layout


def check_adapter(adapter: LoraAdapter, layout: LoraLayout, cfg: ModelConfig, name: str) -> None:
    """Every factor of the adapter lands on a site of the layout, within its rank."""
    for (role, layer), factors in sorted(adapter.factors.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        module = cfg.tensor_name(role, layer).removesuffix(".weight")
        if layout.site_of(cfg, role, layer) is None:
            raise EdgeLLMError(f"{adapter.path}: adapter {name} changes {module}, which the build compiles "
                               f"LORA_DISABLED (the plan's lora for layer {layer})")
        if layout.mode == "LORA_BRANCH" and factors.rank > layout.rank:
            raise EdgeLLMError(f"{adapter.path}: adapter {name} has rank {factors.rank} at {module}; the build's "
                               f"branches have rank {layout.rank} (compile the base with the larger adapter)")


def write_adapter(adapter: LoraAdapter, out: Path, name: str, dtype: str, key: str) -> Path:
    """OUT/adapters/<name>/, written whole or not at all (a temporary directory renamed into place);
    key: the build's LoraLayout.key."""
    if dtype not in DTYPES:
        raise EdgeLLMError(f"--lora_dtype {dtype}: use {' or '.join(DTYPES)}")
    final = Path(out) / ADAPTERS_DIR / check_name(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_files(adapter, tmp, name, dtype, key)
        if final.exists():  # replaced by a rename, then the old one removed: never half of either
            old = final.with_name(f".{name}.old{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_files(adapter: LoraAdapter, tmp: Path, name: str, dtype: str, key: str) -> None:
    from safetensors.numpy import save_file

    from .. import __version__

    tensors = {}
    for (role, layer), f in adapter.factors.items():
        module = f"layer{layer:03d}.{role}"
        a = np.ascontiguousarray(f.a.astype(np.float32).T)
        b = np.ascontiguousarray((np.float32(f.scale) * f.b.astype(np.float32)).T)
        if dtype == "int8":
            tensors[f"{module}.a"], tensors[f"{module}.a.scale"] = _int8(a, axis=0)
            tensors[f"{module}.b"], tensors[f"{module}.b.scale"] = _int8(b, axis=1)
        else:
            tensors[f"{module}.a"], tensors[f"{module}.b"] = a, b
    save_file(tensors, str(tmp / "adapter.safetensors"))
    info = {"name": name, "source": str(Path(adapter.path).resolve()), "format": adapter.format, "rank": adapter.rank,
            "dtype": dtype, "modules": len(adapter.factors), "layout": key, "edgellm": __version__}
    (tmp / "adapter.json").write_text(json.dumps(info, indent=1))


def _int8(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per rank component (x reduced over axis): values, float32 scales."""
    scale = np.abs(x).max(axis=axis) / 127
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.rint(x / np.expand_dims(scale, axis)).clip(-127, 127).astype(np.int8)
    return q, scale


def list_adapters(out: Path, key: str | None = None) -> dict[str, dict]:
    """name -> adapter.json of every adapter compiled into the build (with key: only those
    compiled for that layout; an earlier build's are left for `inspect` to show as stale)."""
    found = {}
    for info in sorted((Path(out) / ADAPTERS_DIR).glob("*/adapter.json")):
        if info.parent.name.startswith("."):  # a write in progress or interrupted
            continue
        try:
            data = json.loads(info.read_text())
        except json.JSONDecodeError as e:
            raise EdgeLLMError(f"{info}: malformed JSON ({e})") from None
        if key is None or data.get("layout") == key:
            found[info.parent.name] = data
    return found


def add_adapter(build_dir: Path, path: Path, name: str, dtype: str = "int8") -> Path:
    """`edgellm compile-lora`: compile one more adapter for a finished LORA_BRANCH build; the base
    and its other adapters are not touched."""
    from ..record import BuildRecord
    from ..sources.lora import read_adapter

    build_dir = Path(build_dir)
    check_name(name)
    record = BuildRecord.load(build_dir)
    if record.lora_mode != "LORA_BRANCH":
        raise EdgeLLMError(f"{build_dir}: compiled without LoRA branches (no LORA_BRANCH layer in its plan); "
                           "compile the base again with a plan that has them")
    if (build_dir / ADAPTERS_DIR / name).exists():
        raise EdgeLLMError(f"{build_dir / ADAPTERS_DIR / name}: an adapter named {name} exists; remove it or "
                           "choose another --name")
    cfg = ModelConfig.load(build_dir / "model_config.json")
    sites = frozenset((int(s[5:8]), s.split(".", 1)[1]) for s in record.lora_sites)
    adapter = read_adapter(path, cfg)
    layout = LoraLayout("LORA_BRANCH", sites, record.lora_rank)
    check_adapter(adapter, layout, cfg, name)
    return write_adapter(adapter, build_dir, name, dtype, layout.key)
