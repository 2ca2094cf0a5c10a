"""What a build will need in memory to run, estimated from the plan before anything is compiled,
so a build that cannot run on this machine stops before it writes gigabytes.

An estimate that errs low rather than refuse a build that fits: each tensor at the widest
precision its units have (a layer whose group and single units differ holds both on the native
target; counted once), the source's own bytes under SOURCE (8-bit blocks for a type the source
cannot keep), BF16 at 4 bytes on the cpu target (widened at load), and the cpu target's two
copies (group and single programs) unless --enable_filter_sharing. KV cache: layers x 2 x
context x KV width at the cache's width.
"""

from __future__ import annotations

import math
import os
import re

from .errors import EdgeLLMError

# bytes per weight, scales included (blocks of 32 with a float16 scale; codebooks per 256)
BYTES_PER_WEIGHT = {"FP32": 4.0, "BF16": 2.0, "A_BF16_W_INT8": 34 / 32, "A_BF16_W_INT4": 18 / 32,
                    "A_BF16_W_CB4": 5 / 8, "A_BF16_W_CB3": 3.5 / 8, "A_BF16_W_CB2": 2.25 / 8}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _tensor_bytes(source, name: str, count: int, precision: str, target: str) -> float:
    if precision == "SOURCE":
        stored = source.stored_bytes(name) if hasattr(source, "stored_bytes") else None
        if stored is None:  # converted (or a source without its own blocks): about 8 bits
            return BYTES_PER_WEIGHT["A_BF16_W_INT8"] * count
        # the cpu target runs 5-, 6- and 8-bit blocks as 8-bit MatMulNBits
        return max(stored, BYTES_PER_WEIGHT["A_BF16_W_INT8"] * count) if target == "cpu" else stored
    if precision == "BF16" and target == "cpu":
        return 4.0 * count
    return BYTES_PER_WEIGHT[precision] * count


def run_bytes(source, cfg, plan, target: str, max_tokens: int, kv_bytes: int, shared: bool) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) of the build when it runs."""
    by_scope: dict[str, set[str]] = {}
    vision_precisions: set[str] = set()  # an image encoder's units: one program, one copy
    for unit_name, choice in plan.choices.items():
        if unit_name.startswith("vision/"):
            vision_precisions.add(choice.precision)
            continue
        layer = re.search(r"layer(\d+)", unit_name)
        key = str(int(layer.group(1))) if layer else unit_name.split("/")[-1].upper()
        by_scope.setdefault(key, set()).add(choice.precision)
    vision = _vision_tensors(cfg)
    text = {cfg.tensor_name(role, i) for role in cfg.layer_tensors for i in range(cfg.num_layers)}
    text |= set(cfg.global_tensors.values())
    weights = vision_weights = 0.0
    for name in source.tensor_names():
        if name not in text and name not in vision:  # not compiled (LLaVA's last encoder layer, ...)
            continue
        shape = source.tensor_shape(name)
        count = math.prod(shape)
        if name in vision:
            vision_weights += max(_tensor_bytes(source, name, count, p if len(shape) >= 2 else "FP32", target)
                                  for p in vision_precisions or {"FP32"})
            continue
        layer = _LAYER.search(name)
        if len(shape) < 2:  # norms, biases: float
            precisions = {"FP32"}
        elif layer:
            precisions = by_scope.get(str(int(layer.group(1))), {"FP32"})
        elif "embed_tokens" in name:
            precisions = by_scope.get("EMBED", {"FP32"}) | (by_scope.get("HEAD", set()) if cfg.tie_word_embeddings else set())
        elif "lm_head" in name:
            precisions = by_scope.get("HEAD", {"FP32"})
        else:
            precisions = {"FP32"}
        weights += max(_tensor_bytes(source, name, count, p, target) for p in precisions)
    if target == "cpu" and not shared:
        weights *= 2
    weights += vision_weights
    cache = cfg.num_layers * 2 * max_tokens * cfg.num_kv_heads * cfg.head_dim * kv_bytes
    return int(weights), cache


def _vision_tensors(cfg) -> set[str]:
    v = cfg.vision
    if v is None:
        return set()
    layers = [None] + list(range(v.num_layers))
    return {name for role in v.tensors for i in layers if (name := v.tensor_name(role, i)) is not None}


def check_fits(model: str, source, cfg, plan, options) -> None:
    """Stops a build whose weights and KV cache exceed this machine's memory (cross-compiled
    builds run elsewhere: not checked)."""
    if options.target == "aarch64-linux":
        return
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    weights, cache = run_bytes(source, cfg, plan, options.target, options.max_num_tokens,
                               2 if options.kv_cache_dtype == "float16" else 4, options.enable_filter_sharing)
    if weights + cache > 0.9 * total:
        gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
        raise EdgeLLMError(
            f"{model}: this build would need about {gb(weights + cache)} of memory to run ({gb(weights)} of weights "
            f"as planned, {gb(cache)} of KV cache), more than this machine's {gb(total)}; plan a smaller precision "
            f"(-c int4) or a shorter context (--max_num_tokens)")
