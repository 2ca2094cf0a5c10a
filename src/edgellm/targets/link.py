"""Linking: join the segments of one variant into one program.

Segments name their boundary tensors identically (see graph/segments.py), so linking is a union:
nodes in pipeline order, initializers deduplicated by name (same name must mean same bytes),
graph inputs = inputs nobody produces, graph outputs = logits and the updated caches.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..errors import EdgeLLMError
from ..graph.builder import OPSET
from ..graph.io import load_lazy, tensor_bytes
from ..graph.units import VISION_PARTS


def link_quantized(out, units, is_group: bool, plan, options, manifest, name: str, seq_dim: str | None = None) -> onnx.ModelProto:
    """One variant's quantized segments (smallest cache bucket), linked, weights left in their files."""
    chosen = [u for u in units if u.is_group == is_group and u.bucket in (0, options.buckets[0]) and u.part not in VISION_PARTS]
    return link(_quantized(out, chosen, plan, options, manifest), name, kv_dim="kv_len", seq_dim=seq_dim)


def link_vision(out, units, plan, options, manifest):
    """The image encoder's quantized segments, linked: pixel_patches -> image_features."""
    chosen = [u for u in units if u.part in VISION_PARTS]
    return link(_quantized(out, chosen, plan, options, manifest), "edgellm_vision", outputs=("image_features",))


def _quantized(out, chosen, plan, options, manifest) -> list[onnx.ModelProto]:
    for u in chosen:
        entry = manifest.data.get("units", {}).get(f"quantize:{u.name}")
        if entry is not None and not entry.get("dropped"):
            continue
        if entry is not None and plan.choice(u).compile:
            raise EdgeLLMError(f"{out}: {u.name}'s quantized segment was removed once it was compiled (the build keeps "
                               f"them with --keep-intermediates); run the quantize stage again")
        if not plan.choice(u).compile:
            raise EdgeLLMError(f"{options.configuration_file}: {u.name} has compile: False and no earlier build of it "
                               f"to reuse in {out} (the {options.target} target runs every unit; build it once with --keep-intermediates, "
                               f"then --resume)")
        raise EdgeLLMError(f"{out}: {u.name} has not been quantized; run the quantize stage first")
    return [load_lazy(out / "quant" / f"{u.name}.onnx") for u in chosen]


def link(segments: list[onnx.ModelProto], name: str, kv_dim: str | None = None, seq_dim: str | None = None,
         outputs: tuple[str, ...] = ("logits",)) -> onnx.ModelProto:
    """kv_dim / seq_dim: if given, the cache length / the tokens per call become symbolic
    dimensions of the program's inputs and outputs (shape-generic programs). outputs: the
    program's outputs besides the updated caches."""
    nodes, inits, inputs, produced = [], {}, {}, set()
    for seg in segments:
        for t in seg.graph.initializer:
            if t.name in inits:  # shared constants (rope tables): must be the same bytes
                if tensor_bytes(t) != tensor_bytes(inits[t.name]):
                    raise ValueError(f"initializer {t.name} differs between segments")
                continue
            inits[t.name] = t
        for vi in seg.graph.input:
            inputs.setdefault(vi.name, vi)
        for node in seg.graph.node:
            nodes.append(node)
            produced.update(node.output)
    graph_inputs = [vi for n, vi in inputs.items() if n not in produced]
    declared = {vi.name: vi for seg in segments for vi in seg.graph.output}
    graph_outputs = [vi for n, vi in declared.items() if n in outputs or n.startswith("present.")]
    for vi in graph_inputs + graph_outputs:
        dims = vi.type.tensor_type.shape.dim
        if kv_dim and vi.name.startswith(("cache.", "present.")):
            dims[1].dim_param = kv_dim
        if seq_dim and vi.name in ("input_ids", "position_ids", "attend_until", "embeddings", "rope_positions"):
            dims[1].dim_param = seq_dim
    graph = helper.make_graph(nodes, name, graph_inputs, graph_outputs, list(inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgellm")
    model.ir_version = segments[0].ir_version
    return model
