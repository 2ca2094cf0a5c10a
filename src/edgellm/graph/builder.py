"""A small helper over onnx.helper that keeps segment emitters short and names unique."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 24  # TensorScatter (in-place KV cache updates) is opset 24
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL


class GraphBuilder:
    def __init__(self, name: str, prefix: str, weight_scope: str, spill=None):
        """spill: a graph.io.Spill taking large constants out of memory as they are added."""
        self.spill = spill
        self.name = name
        self.weight_scope = weight_scope
        self.prefix = prefix  # makes every internal tensor name unique across linked segments
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def input(self, name: str, elem_type: int, shape: list) -> str:
        value = helper.make_tensor_value_info(name, elem_type, shape)
        earlier = next((vi for vi in self.inputs if vi.name == name), None)
        if earlier is not None:  # read by several nodes (lora.scale): the same input, or a bug
            if earlier != value:
                raise ValueError(f"graph input {name} declared twice with different types or shapes")
            return name
        self.inputs.append(value)
        return name

    def output(self, tensor: str, name: str, elem_type: int, shape: list) -> str:
        if tensor != name:
            self.op("Identity", [tensor], name=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer. Names without the prefix are shared between segments (rope tables)."""
        if name not in self.initializers:
            if self.spill is not None:
                self.initializers[name] = self.spill.tensor(name, value)
            else:
                self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def weight(self, role: str, value: np.ndarray) -> str:
        return self.const(f"{self.weight_scope}.{role}", value)

    def op(self, op_type: str, inputs: list[str], name: str | None = None, n_out: int = 1, **attrs):
        self._count += 1
        node_name = f"{self.prefix}/{op_type}_{self._count}"
        outs = [name] if name else [f"{self.prefix}.t{self._count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs[0] if n_out == 1 else outs

    def shape_const(self, values) -> str:
        self._count += 1
        return self.const(f"{self.prefix}.shape{self._count}", np.array(values, dtype=np.int64))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgellm")
        model.ir_version = 11
        return model
