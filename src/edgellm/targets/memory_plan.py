"""Static memory plan for a linked program: every activation at a fixed offset in one arena.

The native target (targets/native) runs a call with no allocation: each
intermediate tensor lives in one arena at an offset chosen at compile time, and two tensors share
bytes only when their lifetimes (first write to last read, in node order) do not overlap. Offsets
are assigned greedily, largest tensor first, each at the lowest offset free of every placed
tensor alive at the same time. The report compares the arena with the sum of all activation
sizes (no reuse) and with a lower bound, the most bytes alive at any one step, which no plan
can go below.

Activation sizes come from running the program once on zeros with ONNX Runtime: the graph's
shape-generic parts (the mask reads the KV length from the cache's shape) defeat static shape
inference, and a run gives every intermediate's real size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

ALIGN = 64


@dataclass(frozen=True)
class Placement:
    name: str
    offset: int
    size: int
    first: int  # index of the node that writes it
    last: int  # index of the last node that reads it


@dataclass
class MemoryPlan:
    placements: list[Placement]
    arena: int  # bytes
    total: int  # sum of all activation sizes
    lower_bound: int  # most bytes alive at one step

    def report(self) -> str:
        return (f"arena {_size(self.arena)} for {len(self.placements)} activations "
                f"(no reuse: {_size(self.total)}; lower bound, the most alive at once: {_size(self.lower_bound)})")


def plan_memory(model: onnx.ModelProto, dims: dict[str, int]) -> MemoryPlan:
    """model: a linked program in standard ONNX with its weights loaded; dims: values of its
    symbolic dimensions (e.g. {"kv_len": 128}). Graph inputs and outputs (bound by the caller:
    the KV cache, logits) are not activations, nor is anything computed from constants alone
    (a dequantized or widened weight: kernels read the stored weight directly)."""
    sizes = _activation_sizes(model, dims)
    nodes = list(model.graph.node)
    constant = {t.name for t in model.graph.initializer}
    for node in nodes:
        if node.input and all(name in constant or not name for name in node.input):
            constant.update(node.output)
    external = {v.name for v in model.graph.input} | {v.name for v in model.graph.output} | constant
    first, last = {}, {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name in first:
                last[name] = i
        for name in node.output:
            if name and name not in external:
                first[name] = last[name] = i
    return place({name: (first[name], last[name], sizes[name]) for name in first}, len(nodes))


def place(lifetimes: dict[str, tuple[int, int, int]], steps: int) -> MemoryPlan:
    """lifetimes: tensor -> (first step, last step, bytes). Greedy offsets, largest first."""
    placed: list[Placement] = []
    for name in sorted(lifetimes, key=lambda n: (-lifetimes[n][2], lifetimes[n][0])):
        lo, hi, size = lifetimes[name]
        size = _aligned(size)
        busy = sorted((p.offset, p.offset + p.size) for p in placed if p.first <= hi and lo <= p.last)
        offset = 0
        for start, end in busy:
            if offset + size <= start:
                break
            offset = max(offset, end)
        placed.append(Placement(name, offset, size, lo, hi))
    live = np.zeros(max(steps, 1), np.int64)
    for p in placed:
        live[p.first : p.last + 1] += p.size
    return MemoryPlan(
        placements=sorted(placed, key=lambda p: (p.first, p.name)),
        arena=max((p.offset + p.size for p in placed), default=0),
        total=sum(p.size for p in placed),
        lower_bound=int(live.max()),
    )


def _activation_sizes(model: onnx.ModelProto, dims: dict[str, int]) -> dict[str, int]:
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    feeds = {}
    for vi in probe.graph.input:
        shape = []
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param and d.dim_param not in dims:
                raise ValueError(f"no value given for dimension {d.dim_param!r} of {vi.name}")
            shape.append(dims[d.dim_param] if d.dim_param else d.dim_value)
        feeds[vi.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
    outputs = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in outputs:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                outputs.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every intermediate
    options.log_severity_level = 3  # unbound caches: ORT warns that it copies them, which is fine here
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return {name: int(np.asarray(value).nbytes) for name, value in zip(names, session.run(names, feeds))}


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _aligned(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)
