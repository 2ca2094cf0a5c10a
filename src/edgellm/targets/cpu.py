"""Target `cpu`: ONNX Runtime on the host CPU.

The linked program per variant (group, single) is shape-generic in the KV length: ONNX Runtime's
CPU kernels do not need static shapes, and one program per variant (instead of one per bucket)
keeps one copy of the weights per session. The runtime still binds the smallest bucket that
covers the positions in use, so per-step attention cost follows the bucket size. The per-bucket
cache-accessor segments stay the unit of caching and what static-shape targets consume; here the
smallest bucket's segments are linked and their KV length relabelled as symbolic.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeLLMError
from ..graph.io import load, save_models
from ..graph.units import Unit


def compile_cpu(out: Path, cfg, options, units: list[Unit], manifest, progress=None) -> Path:
    from ..quant.plan import PrecisionPlan
    from .link import link
    from .ort_lowering import lower_integer_matmuls

    plan = PrecisionPlan(options.configuration_file, cfg.num_layers, options.quantize_embeddings)
    template_bucket = options.buckets[0]
    programs = {}
    for variant, is_group in (("group", True), ("single", False)):
        chosen = [u for u in units if u.is_group == is_group and u.bucket in (0, template_bucket)]
        skipped = [u.name for u in chosen if not plan.choice(u).compile]
        if skipped:
            raise EdgeLLMError(f"{options.configuration_file}: the cpu target runs the whole model; unit {skipped[0]} has compile: False")
        for u in chosen:
            if f"quantize:{u.name}" not in manifest.data.get("units", {}):
                raise EdgeLLMError(f"{out}: {u.name} has not been quantized; run the quantize stage first")
        segments = [load(out / "quant" / f"{u.name}.onnx") for u in chosen]
        program = link(segments, f"edgellm_{variant}", kv_dim="kv_len")
        programs[f"{variant}.onnx"] = lower_integer_matmuls(program, options.int8_activations)
        if progress:
            progress("compile", len(programs), 2)
    target_dir = out / "compiled" / "cpu"
    save_models(programs, target_dir, weights_name="weights.bin")
    return target_dir
