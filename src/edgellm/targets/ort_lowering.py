"""Lower the IR's integer matmuls to ONNX Runtime's MatMulNBits, choosing each one's arithmetic.

The IR writes an integer weight as DequantizeLinear(axis=0, block_size) -> MatMul. ONNX Runtime
would fuse that into MatMulNBits itself at load, but with one accuracy level for the whole session.
Its CPU kernels differ by weight width (ONNX Runtime 1.32, 2 threads, K=576, N=49152, one token):
int4 with float activations 0.8 ms, int8 with float activations 79 ms (no fast path), int8 with
activations quantized to int8 per block 0.7 ms. So the target decides per node: int8 weights
always run with int8 activations, int4 weights with float activations unless the build asks
for --int8_activations. Lowering here also spares every load the fusion work.

MatMulNBits layout (com.microsoft): B uint8 [N, blocks, block * bits / 8], values unsigned with
the first of two 4-bit values in the low nibble; scales [N * blocks]; zero points uint8, packed
like B, defaulting to 2^(bits-1) when absent, which is how signed blocks are stored.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph.io import INTEGER_TYPES, integer_values, to_array
from ..quant.blocks import pack_int4

FLOAT_ACTIVATIONS, INT8_ACTIVATIONS = 1, 4  # MatMulNBits accuracy_level values


def lower_integer_matmuls(model: onnx.ModelProto, int8_activations: bool, spill=None) -> onnx.ModelProto:
    """spill: a graph.io.Spill that takes the repacked weights out of memory as they are made."""
    make = _maker(spill)
    graph = model.graph
    _fold_factored_scales(graph, make)
    inits, consumers = {t.name: t for t in graph.initializer}, _consumers(graph)
    dead, new_inits = set(), {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or inits[node.input[0]].data_type not in INTEGER_TYPES:
            continue
        users = consumers.get(node.output[0], [])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis") != 0 or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != node.output[0]:
            continue
        block = attrs.get("block_size", 0)
        if block < 16 or block & (block - 1):  # MatMulNBits' blocks: powers of two from 16
            continue
        matmul = users[0]
        bits, signed = INTEGER_TYPES[inits[node.input[0]].data_type]
        names = _packed_weight(inits, node, bits, signed, attrs["block_size"], new_inits, make)
        k, n = inits[node.input[0]].dims
        level = INT8_ACTIVATIONS if bits == 8 or int8_activations else FLOAT_ACTIVATIONS
        matmul.CopyFrom(helper.make_node(
            "MatMulNBits", [matmul.input[0], *names], list(matmul.output), name=matmul.name, domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=attrs["block_size"], accuracy_level=level,
        ))
        dead.add(node.name)
    return _replaced(model, dead, new_inits)


def lower_per_channel_matmuls(model: onnx.ModelProto, spill=None) -> onnx.ModelProto:
    """Int8 weights in one symmetric block per output channel (an image encoder's:
    quant/precision.py QuantOptions.int8_per_channel), DequantizeLinear(axis=0, block_size=K)
    -> MatMul, become ONNX Runtime's DynamicQuantizeMatMul: the activations quantized to uint8 per
    call, the weight read as stored, one scale per column, through MLAS's integer GEMM, which at
    an image's 1024 rows is about 1.7x MatMulNBits' int8 blocks (docs/BENCHMARKS.md). On x86
    CPUs without VNNI, uint8 x int8 products can saturate; the session that runs such a program
    sets session.x64quantprecision there (runtime/images.py integer_products_saturate), with
    which ONNX Runtime widens them."""
    make, graph = _maker(spill), model.graph
    inits, consumers = {t.name: t for t in graph.initializer}, _consumers(graph)
    dead, scales = set(), {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 2 or node.input[0] not in inits:
            continue
        q, users = inits[node.input[0]], consumers.get(node.output[0], [])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (q.data_type != onnx.TensorProto.INT8 or len(q.dims) != 2 or attrs.get("axis") != 0
                or attrs.get("block_size") != q.dims[0] or len(users) != 1 or users[0].op_type != "MatMul"
                or users[0].input[1] != node.output[0] or node.input[1] not in inits):
            continue
        scale = f"{node.input[1]}.columns"
        scales[scale] = make(scale, to_array(inits[node.input[1]]).astype(np.float32).reshape(-1))
        matmul = users[0]
        matmul.CopyFrom(helper.make_node("DynamicQuantizeMatMul", [matmul.input[0], node.input[0], scale],
                                         list(matmul.output), name=matmul.name, domain="com.microsoft"))
        dead.add(node.name)
    return _replaced(model, dead, scales)


def _maker(spill):
    """How a lowering makes a new initializer: into the spill file, or in memory."""
    return spill.tensor if spill is not None else (lambda name, value: numpy_helper.from_array(np.ascontiguousarray(value), name))


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _replaced(model: onnx.ModelProto, dead: set[str], new_inits: dict) -> onnx.ModelProto:
    """The model with the DequantizeLinear nodes `dead` gone (their MatMuls rewritten into
    com.microsoft ops), the initializers only they read dropped and `new_inits` added."""
    if not dead:
        return model
    _drop_nodes(model.graph, dead)
    model.graph.initializer.extend(new_inits.values())
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _fold_factored_scales(graph: onnx.GraphProto, make) -> None:
    """K-quant scales and minimums are Mul(Cast(integer factors), units) in the IR
    (quant/precision.py); MatMulNBits takes float scales: each becomes its float32 product, which
    holds it exactly."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    folded = set()
    for node in graph.node:
        cast = producer.get(node.input[0]) if node.op_type == "Mul" else None
        if (cast is None or cast.op_type != "Cast" or cast.input[0] not in inits or node.input[1] not in inits
                or helper.get_attribute_value(cast.attribute[0]) != onnx.TensorProto.FLOAT):
            continue
        product = integer_values(inits[cast.input[0]]).astype(np.float32) * to_array(inits[node.input[1]])
        graph.initializer.append(make(node.output[0], product.astype(np.float32)))
        folded.update([cast.name, node.name])
    if folded:
        _drop_nodes(graph, folded)


def _drop_nodes(graph: onnx.GraphProto, names: set[str]) -> None:
    """Removes the named nodes, then every initializer no node reads any more."""
    kept = [n for n in graph.node if n.name not in names]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in graph.node for name in n.input}
    for t in list(graph.initializer):
        if t.name not in used:
            graph.initializer.remove(t)


def _packed_weight(inits, dq: onnx.NodeProto, bits: int, signed: bool, block: int, new_inits: dict, make) -> list[str]:
    q_init, scale_init = inits[dq.input[0]], inits[dq.input[1]]
    k, n = q_init.dims
    blocks = -(-k // block)
    q = integer_values(q_init).reshape(k, n)
    offset = 1 << (bits - 1)
    unsigned = (q.astype(np.int16) + offset).astype(np.uint8) if signed else q.astype(np.uint8)
    padded = np.zeros((n, blocks * block), np.uint8)
    padded[:, :k] = unsigned.T
    if signed:  # the padding must dequantize to zero too
        padded[:, k:] = offset
    base = q_init.name
    names = [f"{base}.nbits", f"{scale_init.name}.nbits"]
    if bits == 4:
        b = np.frombuffer(pack_int4(padded), np.uint8).reshape(n, blocks, block // 2)
    else:
        b = padded.reshape(n, blocks, block)
    new_inits[names[0]] = make(names[0], b)
    scale = to_array(scale_init).astype(np.float32).T.reshape(-1)
    new_inits[names[1]] = make(names[1], scale)
    if len(dq.input) > 2 and dq.input[2]:
        zp = integer_values(inits[dq.input[2]]).reshape(blocks, n).T.astype(np.uint8)  # [N, blocks]
        zp_name = f"{dq.input[2]}.nbits"
    elif not signed:  # DequantizeLinear's absent zero point is 0; MatMulNBits' is 2^(bits-1)
        zp, zp_name = np.zeros((n, blocks), np.uint8), f"{base}.zero.nbits"
    else:
        return names
    if bits == 4:
        zp = np.concatenate([zp, np.zeros((n, blocks % 2), np.uint8)], axis=1)
        zp = np.frombuffer(pack_int4(zp), np.uint8)
    names.append(zp_name)
    new_inits[zp_name] = make(zp_name, zp.reshape(-1))
    return names

