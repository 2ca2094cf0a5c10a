"""Apply a weight precision to a float segment.

The onnx stage emits every MatMul weight as a float32 [K, N] initializer and the embedding table
as a float32 [V, H] Gather input. A precision rewrites how such a weight is stored:
  FP32           as emitted (edgellm's exact reference precision)
  BF16           bfloat16 + Cast to float: half the size; ONNX Runtime's CPU kernels have no bf16
                 MatMul, so the Cast is constant-folded at load (FP32 speed and memory)
  A_BF16_W_INT8  int8 blocks along K: DequantizeLinear(axis=0, block_size) -> MatMul (an image
                 encoder's: one block per output channel, QuantOptions.int8_per_channel)
  A_BF16_W_INT4  int4 blocks along K, the same pattern
  SOURCE         every weight as the model file stores it: a GGUF's own types (Q4_K, Q6_K, Q5_0,
                 ... mapped exactly, mixed per tensor as the file has them), float tensors FP32;
                 what a GGUF compiles to without a plan ("quantization already applied")
  A_BF16_W_CB4/3/2  per-block K-means codebooks of 16/8/4 float16 entries and an index per weight
                 (quant/codebooks.py): GatherElements over the codebooks -> Transpose -> MatMul
ONNX Runtime fuses DequantizeLinear + MatMul into its MatMulNBits kernel, which reads the integer
blocks directly; no float copy of the weight exists at run time. Activations stay float32 on CPU
("A_BF16" is the manual's name; the target decides the float type).

GGUF Q4_1 blocks (and blocks re-quantized with --asymmetric, the "minimum" scheme of
quant/blocks.py) carry a float minimum per block: value = d * q + m. An integer zero point cannot
express m, so such weights are emitted exactly as
    y = x @ DequantizeLinear(q, d) + blocksum(x) @ m,    blocksum(x)[b] = sum of x over block b
which is the same sum, regrouped.

Values of 5 and 6 bits (GGUF Q5_*, Q6_K) are INT8 / UINT8 tensors in the IR (ONNX has no narrower
byte-aligned types); a target stores them in as few bits as hold them. A K-quant's scale (and
minimum) is unit * integer per block (quant/blocks.py Factored), written as such:
    scale = Mul(Cast(integer: INT8 [blocks, N]), unit: float [blocks, N])
ONNX Runtime folds it at load; the native target stores the factors at the file's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph.io import to_array
from .blocks import BlockQuantized, pack_int4, quantize
from .codebooks import Codebooked, quantize_codebooks

PRECISIONS = ("FP32", "BF16", "SOURCE", "A_BF16_W_INT8", "A_BF16_W_INT4", "A_BF16_W_CB4", "A_BF16_W_CB3", "A_BF16_W_CB2")
INTEGER_BITS = {"A_BF16_W_INT8": 8, "A_BF16_W_INT4": 4}
CODEBOOK_BITS = {"A_BF16_W_CB4": 4, "A_BF16_W_CB3": 3, "A_BF16_W_CB2": 2}
WEIGHT_CONSUMERS = {"MatMul": 1, "Gather": 0}  # op -> input slot holding the weight

# initializer name -> (the source's own integer blocks for that weight (HF layout) if it has them,
#                      how the source stores it, e.g. "GGUF Q6_K" or "float")
PackedFn = Callable[[str], "tuple[BlockQuantized | None, str]"]


@dataclass(frozen=True)
class QuantOptions:
    block_size: int = 32
    scheme: str = "symmetric"  # quant/blocks.py SCHEMES
    # int8 matmul weights quantized per output channel (one symmetric block spanning K), not in
    # blocks: an image encoder's, which ONNX Runtime runs as integer GEMMs with per-column
    # scales (targets/ort_lowering.py lower_per_channel_matmuls)
    int8_per_channel: bool = False


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, np.uint16)
    step = 1 << 22  # in chunks: this runs on whole embedding tables
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        bits = part.view(np.uint32)
        rounded = (bits >> 16) & 1
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        out[start : start + step] = rounded
        out[start : start + step][np.isnan(part)] = 0x7FC0
    return out.reshape(np.shape(x))


def weight_initializers(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int, onnx.TensorProto]]:
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for node in model.graph.node:
        slot = WEIGHT_CONSUMERS.get(node.op_type)
        # a Gather's table is a weight when token ids index it (the embedding), not when positions
        # do (M-RoPE's rotary tables: graph/segments.py _pre), which stay float32
        if node.op_type == "Gather" and node.input[1] != "input_ids":
            continue
        if slot is not None and node.input[slot] in inits:
            found.append((node, slot, inits[node.input[slot]]))
    return found


def apply_precision(
    model: onnx.ModelProto, precision: str, options: QuantOptions = QuantOptions(), packed: PackedFn | None = None,
    spill=None,
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Rewrites the model in place; returns it and, per weight, how it was stored (for the compile log)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision}")
    if precision == "FP32":
        return model, {}
    rewriter = _Rewriter(model, spill)
    report = {}
    for node, slot, init in weight_initializers(model):
        if precision == "BF16":
            report[init.name] = _to_bf16(rewriter, node, slot, init, to_array(init))
            continue
        if precision in CODEBOOK_BITS:
            if node.op_type != "MatMul":
                raise ValueError(f"{init.name}: codebook precisions apply to matmul weights, not lookup tables")
            bits = CODEBOOK_BITS[precision]
            stored = packed(init.name)[1] if packed else "float"
            report[init.name] = f"{stored} {'quantized' if stored == 'float' else 'converted'} to {bits}-bit codebooks"
            rewriter.drop(init)
            w = to_array(init)
            _codebook_matmul(rewriter, node, init.name, quantize_codebooks(np.ascontiguousarray(w.T, dtype=np.float32), bits))
            continue
        source_blocks, stored = packed(init.name) if packed else (None, "float")
        if precision == "SOURCE" and source_blocks is None:
            if stored == "float":  # float32 in the file: kept
                report[init.name] = "float32"
                continue
            if stored in ("GGUF F16", "GGUF BF16"):  # half the bytes of float32 (F16 loses 3 mantissa bits)
                report[init.name] = f"{stored} as {_to_bf16(rewriter, node, slot, init, to_array(init))}"
                continue
        if precision == "SOURCE":  # the source's own blocks, or for a type edgellm cannot run as it is
            # (IQ types, Q2_K / Q3_K; a merged adapter's new values) the nearest integer width
            bits = source_blocks.bits if source_blocks is not None else (4 if _low_bit(stored) else 8)
        else:
            bits = INTEGER_BITS[precision]
        exact = source_blocks is not None and source_blocks.bits == bits
        # a lookup reads blocks as stored: act-order columns, minimums and factored scales only fit a matmul
        if exact and (node.op_type == "MatMul" or _plain(source_blocks)):
            blocks, report[init.name] = source_blocks, f"{stored} mapped exactly"
        else:
            if precision == "SOURCE" and source_blocks is not None:  # a table the lookup cannot read as stored
                bits = 8
            # (the float values are read only here: the source's own blocks never need them)
            w = to_array(init)
            hf_layout = w.T if node.op_type == "MatMul" else w  # blocks run along the HF input dim
            scheme, block = options.scheme, options.block_size
            if options.int8_per_channel and bits == 8 and node.op_type == "MatMul":
                scheme, block = "symmetric", hf_layout.shape[1]
            if scheme == "minimum" and (node.op_type != "MatMul" or hf_layout.shape[1] % block):
                scheme = "zero_point"  # a lookup, or blocks not tiling K, cannot carry a float minimum
            blocks = quantize(np.ascontiguousarray(hf_layout, dtype=np.float32), bits, block, scheme)
            report[init.name] = f"{stored} {'quantized' if stored == 'float' else 'converted'} to int{bits}"
        rewriter.drop(init)
        if node.op_type == "MatMul":
            _integer_matmul(rewriter, node, init.name, blocks)
        else:
            _integer_gather(rewriter, node, init.name, blocks)
    return rewriter.finish(), report


class _Rewriter:
    """Collects new initializers and nodes placed before / after existing nodes (by node name:
    protobuf hands out a new Python object per access, so object identity is no key), keeping
    the graph in topological order."""

    def __init__(self, model: onnx.ModelProto, spill=None):
        self.model = model
        self.spill = spill  # graph.io.Spill: new weights go to a scratch file, not into memory
        self.before: dict[str, list[onnx.NodeProto]] = {}
        self.leading: list[onnx.NodeProto] = []  # computed from initializers alone: placed first
        self.after: dict[str, list[onnx.NodeProto]] = {}

    def drop(self, init: onnx.TensorProto) -> None:
        self.model.graph.initializer.remove(init)

    def add(self, tensor: onnx.TensorProto) -> str:
        self.model.graph.initializer.append(tensor)
        return tensor.name

    def array(self, name: str, value: np.ndarray, data_type: int | None = None, dims=None) -> str:
        """value: an array, or with data_type and dims the raw bytes of one (as uint8)."""
        if self.spill is not None:
            return self.add(self.spill.tensor(name, value, data_type, dims))
        if data_type is None:
            return self.add(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return self.add(helper.make_tensor(name, data_type, dims, np.ascontiguousarray(value).tobytes(), raw=True))

    def integers(self, name: str, values: np.ndarray, bits: int) -> str:
        signed = values.dtype == np.int8
        if bits == 4:
            dtype = TensorProto.INT4 if signed else TensorProto.UINT4
            return self.array(name, np.frombuffer(pack_int4(values), np.uint8), dtype, values.shape)
        return self.array(name, values)

    def insert_before(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        self.before.setdefault(node.name, []).append(new)

    def insert_after(self, node: onnx.NodeProto, new: onnx.NodeProto) -> None:
        self.after.setdefault(node.name, []).append(new)

    def finish(self) -> onnx.ModelProto:
        ordered = list(self.leading)
        for node in self.model.graph.node:
            ordered += self.before.get(node.name, []) + [node] + self.after.get(node.name, [])
        del self.model.graph.node[:]
        self.model.graph.node.extend(ordered)
        return self.model


def _to_bf16(rw: _Rewriter, node, slot, init, w) -> str:
    name = rw.array(init.name + ".bf16", to_bfloat16_bits(w).view(np.uint8), TensorProto.BFLOAT16, w.shape)
    rw.drop(init)
    rw.insert_before(node, helper.make_node("Cast", [name], [init.name + ".f32"], name=init.name + "/Cast", to=TensorProto.FLOAT))
    node.input[slot] = init.name + ".f32"
    return "bfloat16"


def _low_bit(stored: str) -> bool:
    """A GGUF type of about 4 bits or fewer per weight (converted to int4 under SOURCE)."""
    return stored.startswith(("GGUF IQ", "GGUF Q2_", "GGUF Q3_", "GGUF TQ"))


def _plain(blocks: BlockQuantized) -> bool:
    """Blocks a lookup (Gather of q and scale rows, then DequantizeLinear) can read as stored."""
    return blocks.order is None and blocks.minimum is None and blocks.scale_factors is None


def _tag(blocks: BlockQuantized) -> str:
    """Names say how a weight is stored, so a group and a single unit share a weight exactly when
    they store it the same way."""
    kind = "s" if blocks.signed else ("m" if blocks.minimum is not None else "a")
    return (f"w{blocks.bits}{kind}{blocks.block}" + ("o" if blocks.order is not None else "")
            + ("k" if blocks.scale_factors is not None else ""))


def _per_block(rw: _Rewriter, name: str, values: np.ndarray, factors, t) -> str:
    """A per-block float (scale or minimum): an initializer, or unit * integer for factored ones."""
    if factors is None:
        return rw.array(name, t(values))
    integer = rw.array(f"{name}.integer", t(factors.integer))
    unit = rw.array(f"{name}.unit", t(factors.unit))
    rw.leading.append(helper.make_node("Cast", [integer], [f"{name}.integer.f32"], name=f"{name}/Cast", to=TensorProto.FLOAT))
    rw.leading.append(helper.make_node("Mul", [f"{name}.integer.f32", unit], [name], name=f"{name}/Mul"))
    return name


def _quantized_inputs(rw: _Rewriter, base: str, blocks: BlockQuantized, transpose: bool) -> list[str]:
    t = (lambda a: a.T) if transpose else (lambda a: a)  # noqa: E731
    inputs = [rw.integers(f"{base}.q", t(blocks.q), blocks.bits),
              _per_block(rw, f"{base}.scale", blocks.scale, blocks.scale_factors, t)]
    if blocks.zero_point is not None:
        inputs.append(rw.integers(f"{base}.zero_point", t(blocks.zero_point), blocks.bits))
    return inputs


def _integer_matmul(rw: _Rewriter, node: onnx.NodeProto, name: str, blocks: BlockQuantized) -> None:
    base = f"{name}.{_tag(blocks)}"
    inputs = _quantized_inputs(rw, base, blocks, transpose=True)  # MatMul layout [K, N]: blocks on axis 0
    rw.insert_before(node, helper.make_node("DequantizeLinear", inputs, [base + ".f32"], name=base + "/Dequantize",
                                            axis=0, block_size=blocks.block))
    node.input[1] = base + ".f32"
    if blocks.order is not None:  # act-order: feed the input columns in the order the blocks hold them
        order = rw.array(f"{base}.order", blocks.order.astype(np.int64))
        rw.insert_before(node, helper.make_node("Gather", [node.input[0], order], [base + ".xordered"], name=base + "/Order", axis=-1))
        node.input[0] = base + ".xordered"
    if blocks.minimum is None:
        return
    k = blocks.q.shape[1]
    if k % blocks.block:
        raise ValueError(f"{name}: blocks with a minimum must tile K exactly")
    y = node.output[0]
    node.output[0] = y + ".unshifted"
    shape = rw.array(f"{base}.blockshape", np.array([0, 0, k // blocks.block, blocks.block], np.int64))
    last = rw.array(f"{base}.lastaxis", np.array([-1], np.int64))
    minimum = _per_block(rw, f"{base}.minimum", blocks.minimum, blocks.minimum_factors, lambda a: a.T)
    x = node.input[0]
    steps = [
        helper.make_node("Reshape", [x, shape], [base + ".xblocks"], name=base + "/Reshape"),
        helper.make_node("ReduceSum", [base + ".xblocks", last], [base + ".xsum"], name=base + "/BlockSum", keepdims=0),
        helper.make_node("MatMul", [base + ".xsum", minimum], [base + ".shift"], name=base + "/MinimumMatMul"),
        helper.make_node("Add", [y + ".unshifted", base + ".shift"], [y], name=base + "/Shift"),
    ]
    for step in steps:
        rw.insert_after(node, step)


def _codebook_matmul(rw: _Rewriter, node: onnx.NodeProto, name: str, cb: Codebooked) -> None:
    """w[n, k] = codebook[n, k // block][index[n, k]], written as one GatherElements over each
    row's codebooks laid end to end, then transposed into the MatMul's [K, N]. All constant: ONNX
    Runtime folds it into a float weight at load; the native target reads index and codebooks."""
    rows, cols = cb.index.shape
    entries = 1 << cb.bits
    base = f"{name}.cb{cb.bits}b{cb.block}"
    index = rw.array(f"{base}.index", cb.index)
    codebook = rw.array(f"{base}.codebook", cb.codebook.reshape(rows, -1))
    offsets = rw.array(f"{base}.blockoffset", ((np.arange(cols) // cb.block) * entries).astype(np.int64)[None, :])
    steps = [
        helper.make_node("Cast", [index], [base + ".index64"], name=base + "/Cast", to=TensorProto.INT64),
        helper.make_node("Add", [base + ".index64", offsets], [base + ".entry"], name=base + "/Entry"),
        helper.make_node("GatherElements", [codebook, base + ".entry"], [base + ".rows"], name=base + "/Lookup", axis=1),
        helper.make_node("Transpose", [base + ".rows"], [base + ".f32"], name=base + "/Transpose", perm=[1, 0]),
    ]
    for step in steps:
        rw.insert_before(node, step)
    node.input[1] = base + ".f32"


def _integer_gather(rw: _Rewriter, node: onnx.NodeProto, name: str, blocks: BlockQuantized) -> None:
    """Embedding lookup on integer rows: gather the rows' blocks, then dequantize only those."""
    base = f"{name}.{_tag(blocks)}"
    ids, out = node.input[1], node.output[0]
    inputs = _quantized_inputs(rw, base, blocks, transpose=False)
    gathered = []
    for tensor in inputs:
        gathered.append(tensor + ".rows")
        rw.insert_before(node, helper.make_node("Gather", [tensor, ids], [tensor + ".rows"], name=tensor + "/Gather", axis=0))
    # The float Gather is replaced in place (keeping its name) by the last step of the lookup.
    node.CopyFrom(helper.make_node("DequantizeLinear", gathered, [out], name=node.name, axis=-1, block_size=blocks.block))
