"""Apply a weight precision to a float segment.

Every MatMul / Gather weight of a segment is a float32 [K, N] (or [V, H]) initializer. A precision
rewrites how that initializer is stored; the arithmetic stays float32 on the CPU target.
  FP32  as emitted (edgellm's exact reference precision)
  BF16  stored as bfloat16 + Cast to float: half the artifact size. ONNX Runtime's CPU kernels
        have no bf16 MatMul, so the Cast is constant-folded at load: same speed and memory as FP32.
Integer precisions (A_BF16_W_INT8, A_BF16_W_INT4) arrive with the quantization work.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PRECISIONS = ("FP32", "BF16")
WEIGHT_CONSUMERS = {"MatMul": 1, "Gather": 0}  # op -> input slot holding the weight


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


def weight_initializers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int, onnx.TensorProto]]:
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        slot = WEIGHT_CONSUMERS.get(node.op_type)
        if slot is not None and node.input[slot] in inits:
            found.append((node, slot, inits[node.input[slot]]))
    return found


def apply_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    if precision == "FP32":
        return model
    if precision != "BF16":
        raise ValueError(f"unknown precision {precision}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    new_nodes = []
    for node, slot, init in weight_initializers(model):
        w = numpy_helper.to_array(init)
        bf16 = helper.make_tensor(init.name + ".bf16", TensorProto.BFLOAT16, w.shape, to_bfloat16_bits(w).tobytes(), raw=True)
        model.graph.initializer.remove(init)
        model.graph.initializer.append(bf16)
        cast_out = init.name + ".f32"
        new_nodes.append((node, helper.make_node("Cast", [bf16.name], [cast_out], name=init.name + "/Cast", to=TensorProto.FLOAT)))
        node.input[slot] = cast_out
    for consumer, cast in new_nodes:
        index = list(model.graph.node).index(consumer)
        model.graph.node.insert(index, cast)
    return model
