"""Target `cpu`: ONNX Runtime on the host CPU.

The linked program per variant (group, single) is shape-generic in the KV length: ONNX Runtime's
CPU kernels do not need static shapes, and one program per variant (instead of one per bucket)
keeps one copy of the weights per session. The runtime still binds the smallest bucket that
covers the positions in use, so per-step attention cost follows the bucket size. The per-bucket
cache-accessor segments stay the unit of caching and what static-shape targets consume; here the
smallest bucket's segments are linked and their KV length relabelled as symbolic.

Filter sharing (--enable_filter_sharing): group and single programs already share one weights
file on disk (initializers are named by layer and storage, see graph/units.py), but each ONNX
Runtime session holds its own copy in memory. When every layer has the same precision in both
variants, the group program is linked generic in the tokens per call as well and serves decode
too ("shared.onnx"): one session, one copy of the weights in memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..graph.io import Spill, save_models
from ..graph.units import Unit

PROGRAM_FILES = ("group.onnx", "single.onnx", "shared.onnx")
log = logging.getLogger("edgellm.targets.cpu")


def compile_cpu(out: Path, cfg, options, units: list[Unit], plan, manifest, progress=None) -> Path:
    variants = {"group": True, "single": False}
    if options.enable_filter_sharing:
        differing = _layers_with_differing_precisions(units, plan)
        if differing:
            log.warning("filter sharing needs the same precision in group and single units; layers %s differ, "
                        "so each variant keeps its own copy in memory", differing)
        else:
            variants = {"shared": True}
    programs = {}
    target_dir = out / "compiled" / "cpu"
    target_dir.mkdir(parents=True, exist_ok=True)
    spill = Spill(target_dir / f".repacked.tmp{os.getpid()}")
    try:
        for variant, is_group in variants.items():
            programs[f"{variant}.onnx"] = _program(variant, is_group, units, plan, options, manifest, out, spill)
            if progress:
                progress("compile", len(programs), len(variants))
        save_models(programs, target_dir, weights_name="weights.bin")
    finally:
        spill.close()
    for stale in set(PROGRAM_FILES) - set(programs):
        (target_dir / stale).unlink(missing_ok=True)
    return target_dir


def _program(variant, is_group, units, plan, options, manifest, out, spill):
    """Link one variant's segments (weights left in their files) and lower it for ONNX Runtime."""
    from .link import link_quantized
    from .ort_lowering import lower_integer_matmuls

    program = link_quantized(out, units, is_group, plan, options, manifest, f"edgellm_{variant}",
                             seq_dim="tokens" if variant == "shared" else None)
    return lower_integer_matmuls(program, options.int8_activations, spill)


def _layers_with_differing_precisions(units: list[Unit], plan) -> list[int]:
    precision = {(u.is_group, u.part, u.index): plan.choice(u).precision for u in units if u.part in ("PRE", "CACHE", "POST")}
    return sorted({i for (g, part, i), p in precision.items() if g and precision[(False, part, i)] != p})
