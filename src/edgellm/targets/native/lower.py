"""Lower a linked program (the IR the ONNX Runtime target runs) to kernel calls for the native target.

Nodes are visited in graph order and each op pattern becomes one call of a kernel in
kernels/edgellm_kernels.c:
    Gather on a weight (float, bf16 Cast, or integer rows + DequantizeLinear)  -> em_embed
    [Gather(order)] DequantizeLinear / Cast / constant -> MatMul [-> Q4_1 shift]  -> em_matmul
    Mul(Sigmoid(g) * g, up) / Mul(Gelu(g), up)                                   -> em_silu_mul / em_gelu_tanh_mul
    RMSNormalization -> em_rmsnorm, RotaryEmbedding -> em_rope, Split -> em_columns,
    TensorScatter -> em_cache_write_keys or _values, Attention -> em_attention, elementwise ops -> em_add, ...
An RMSNorm or gated product read by one MatMul, and an Add of the MatMul's output to an
activation (the residual), become part of that MatMul's call: em_matmul_fused. In the decode
variant the attention (em_team_attention) also takes in the RotaryEmbeddings only it reads and
the cache writes, and the MatMul reading its output merges its chunks (prologue EM_ATTENTION).
The MASK segment's nodes are not lowered: em_attention derives causality (and a sliding window,
read from the segment's window constant) from the positions it is called with. Reshape is a
view: its output shares its input's buffer; so is a Split of one row (the decode variant).

Every activation is a row-major matrix of rows x cols floats, where rows is a multiple of the
tokens in the call (S) or fixed (the head's one gathered row). A call is C text whose activation
operands are {placeholders}, filled in once the memory plan has given each activation its
offset in the arena (codegen.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ...errors import EdgeLLMError
from ...graph.io import INTEGER_TYPES, integer_values, to_array
from ...quant.blocks import Factored
from ..stage_files import StageFiles
from .weights import WeightsFile

# How many chunks a decode step's attention splits the context into, at most: the kernels' constant.
DECODE_CHUNKS = int(re.search(r"#define EM_DECODE_CHUNKS (\d+)",
                              (Path(__file__).parent / "kernels" / "edgellm_kernels.h").read_text()).group(1))

# Graph inputs and outputs the generated functions take as parameters.
PARAMETERS = {"input_ids": "ids", "logits": "logits", "embeddings": "embeddings", "rope_positions": "rope",
              "pixel_patches": "pixels", "image_features": "features"}  # (the last two: an image encoder's)
MASK_OUTPUTS = ("mask.full", "mask.sliding", "write_index")


@dataclass
class Activation:
    name: str
    rows: int  # rows per token, or fixed rows if not per_token
    cols: int
    per_token: bool = True
    tokens: str = "S"  # the call's rows, or R: the rows whose logits are returned (the head's)

    def rows_expr(self) -> str:
        return (f"{self.tokens} * {self.rows}" if self.rows != 1 else self.tokens) if self.per_token else str(self.rows)

    def count_expr(self) -> str:
        return f"{self.rows_expr()} * {self.cols}"

    def bytes(self, tokens: int) -> int:
        return 4 * self.cols * self.rows * (tokens if self.per_token else 1)


@dataclass
class Call:
    code: str  # C statement; activations appear as {name} (quoted by codegen)
    reads: list[str]
    writes: list[str]
    nodes: list[str]  # ONNX node names, for the comment above the call
    team: bool = False  # a team kernel (kernels/edgellm_kernels.h): every thread of the decode step's region calls it


@dataclass
class Deferred:
    """A MatMul input whose producer runs inside the matmul (em_matmul_fused's prologue)."""
    prologue: str  # EM_RMSNORM, EM_SILU_GATE, EM_GELU_GATE, EM_ATTENTION
    operands: str  # the em_fusion fields after it: norm, eps, up
    source: str  # the producer's input, the matmul's x
    inputs: list[str]  # the producer's other activation inputs (up)
    nodes: list[onnx.NodeProto]
    merge: str = "{0, 0, 0, 0, 0}"  # em_fusion's merge field (EM_ATTENTION: the attention's shape)


@dataclass
class Rotary:
    """A RotaryEmbedding whose output only a decode attention reads: that kernel applies it."""
    source: str
    heads: int
    head_dim: int
    rotary_dim: int
    cos: int  # offsets of the tables in the weights file
    sin: int
    node: onnx.NodeProto


@dataclass
class Lowered:
    calls: list[Call] = field(default_factory=list)
    activations: dict[str, Activation] = field(default_factory=dict)
    matmul_weights: set[str] = field(default_factory=set)  # read whole by every call (unlike a lookup table)
    # LoRA branch site -> K, N, columns, quads (1: an int8 adapter comes as em_lora.a_quads and b_pairs)
    lora_sites: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


class Lowering:
    """One variant's program -> calls; weights go to the shared WeightsFile (deduplicated by name)."""

    def __init__(self, model: onnx.ModelProto, weights: WeightsFile, where: str, int8_activations: bool = False,
                 tokens: int = 0, lora_sites: list[str] = (), files: StageFiles | None = None):
        self.int8_activations = int8_activations  # integer matmuls quantize their activations to int8
        self.lora_sites = list(lora_sites)  # LoRA branch sites, in the order of the session's branch table
        self.one_token = tokens == 1  # the decode variant: a token's columns are contiguous, so a Split is a view
        self.graph = model.graph
        self.weights = weights
        self.where = where
        self.inits = {t.name: t for t in self.graph.initializer}
        self.files = files  # the quant/ files this program's weights are read from, removed once read (--keep-intermediates: None)
        self.graph_inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in self.graph.input}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.out = Lowered()
        self.alias: dict[str, str] = {}  # Reshape outputs and cache writes -> the buffer they view
        self.view_offset: dict[str, int] = {}  # a view's first float in that buffer (decode Split outputs)
        self.deferred: dict[str, Deferred] = {}  # MatMul inputs their MatMul computes (em_matmul_fused)
        self.done: set[str] = set()  # nodes folded into an earlier call
        self.windows = {"mask.full": 0}
        self.caches: dict[str, str] = {}  # cache.i.k / present.i.k -> C expression of the buffer
        self.rotary: dict[str, Rotary] = {}  # decode: rotations the attention applies
        self.new_rows: dict[str, onnx.NodeProto] = {}  # decode: cache writes the attention makes (by output)
        self.constant_nodes: dict[str, bool] = {}
        self.shapes: dict[str, Activation] = {"input_ids": Activation("input_ids", 1, 1)}

    # ---- entry ---------------------------------------------------------------------------

    def run(self) -> Lowered:
        self._skip_mask()
        for node in self.graph.node:  # EMBED's test for embedding rows: part of the Where's call
            if node.op_type == "Where" and "embeddings" in node.input:
                unsqueeze = self.producer.get(node.input[0])
                if unsqueeze is not None:
                    self.done.update([unsqueeze.name] + [self.producer[i].name for i in unsqueeze.input[:1]
                                                         if i in self.producer])
        for node in self.graph.node:
            if node.name in self.done or self._from_constants(node):
                continue
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                raise EdgeLLMError(f"{self.where}: the native target has no kernel for {node.op_type} (node {node.name})")
            try:
                handler(node)
            except (KeyError, ValueError, IndexError, TypeError) as e:  # an IR shape this lowering does not expect
                raise EdgeLLMError(f"{self.where}: cannot lower {node.op_type} node {node.name} ({type(e).__name__}: {e})") from e
            if self.files is not None:  # (between nodes: no read is under way)
                self.files.release()
        return self.out

    def _skip_mask(self) -> None:
        """The MASK segment: every node feeding only the masks and the write index."""
        todo = [self.producer[n] for n in MASK_OUTPUTS if n in self.producer]
        while todo:
            node = todo.pop()
            if node.name in self.done:
                continue
            self.done.add(node.name)
            todo += [self.producer[i] for i in node.input if i in self.producer]
            for name in node.input:
                if name.endswith(".window") and name in self.inits:
                    self.windows["mask.sliding"] = int(self._const(name).reshape(-1)[0])

    def _from_constants(self, node: onnx.NodeProto) -> bool:
        """Nodes computing from weights alone (dequantize, widen) are read by their consumer."""
        if node.name not in self.constant_nodes:
            self.constant_nodes[node.name] = all(self._is_weight(i) for i in node.input if i)
        return self.constant_nodes[node.name]

    # ---- tensors ---------------------------------------------------------------------------

    def _buffer(self, name: str) -> str:
        return self.alias.get(name, name)

    def _act(self, name: str) -> Activation:
        """The shape a tensor is read with (a Reshape's output views its input's bytes anew)."""
        if name not in self.shapes:
            raise EdgeLLMError(f"{self.where}: {name} is read before anything writes it")
        return self.shapes[name]

    def _new(self, name: str, like: Activation, cols: int | None = None, rows: int | None = None,
             per_token: bool | None = None) -> Activation:
        """A tensor written by a call: a new arena slot."""
        act = Activation(name, like.rows if rows is None else rows, like.cols if cols is None else cols,
                         like.per_token if per_token is None else per_token, like.tokens)
        self.shapes[name] = self.out.activations[name] = act
        return act

    def _ref(self, name: str) -> str:
        """A tensor's C expression: a parameter, a cache buffer, or {buffer} for an arena slot."""
        offset = self.view_offset.get(name, 0)
        name = self._buffer(name)
        ref = PARAMETERS.get(name) or self.caches.get(name) or "{" + name + "}"
        return f"({ref} + {offset})" if offset else ref

    def _emit(self, code: str, reads: list[str], writes: list[str], *nodes: onnx.NodeProto, team: bool = False) -> None:
        for name in reads + writes:
            code = code.replace("{" + name + "}", self._ref(name))
        in_arena = [[self._buffer(n) for n in names if "{" in self._ref(n)] for names in (reads, writes)]
        self.out.calls.append(Call(code, *in_arena, [n.name for n in nodes], team))

    def _const(self, name: str) -> np.ndarray:
        return to_array(self._read(name))

    def _integers(self, name: str) -> np.ndarray:
        return integer_values(self._read(name))

    def _read(self, name: str) -> onnx.TensorProto:
        """An initializer whose bytes are about to be read. Every read of a large one is inside a
        WeightsFile.once, so it happens once per build (both variants), and its file can go after."""
        if self.files is not None:
            self.files.read(self.inits[name])
        return self.inits[name]

    def _scalar(self, name: str) -> float | None:
        if name in self.inits and int(np.prod(self.inits[name].dims)) == 1:
            return float(self._const(name).reshape(-1)[0])
        return None

    # ---- weights ---------------------------------------------------------------------------

    def _matmul_weight(self, name: str, minimum: str | None = None) -> str:
        """A MatMul's [K, N] weight operand (initializer, Cast of bf16, or DequantizeLinear)."""
        once = self.weights.once
        if name in self.inits:
            return once(("f32", name, True), lambda: self.weights.float_matrix(name, self._const(name).T))
        node = self.producer[name]
        if node.op_type == "Cast":
            bits = node.input[0]
            return once(("bf16", bits, True), lambda: self.weights.bf16_matrix(bits, self._read(bits), transpose=True))
        if node.op_type == "DequantizeLinear":
            a = _attrs(node)
            if a.get("axis") != 0:
                raise EdgeLLMError(f"{self.where}: {node.name}: a MatMul weight must be dequantized along axis 0")
            q, zero = (i if i else None for i in (list(node.input) + [""])[0:3:2])
            return once(("integer", q, self.int8_activations), lambda: self.weights.integer_matrix(
                q, self._integers(q).T, INTEGER_TYPES[self.inits[q].data_type], self._per_block(node.input[1]),
                None if zero is None else self._integers(zero).T, None if minimum is None else self._per_block(minimum),
                a.get("block_size", 0), self.int8_activations))
        if node.op_type == "Transpose":
            return once(("codebook", name), lambda: self._codebook_weight(node))
        raise EdgeLLMError(f"{self.where}: {node.name}: unsupported weight expression {node.op_type}")

    def _per_block(self, name: str):
        """A MatMul weight's per-block scale or minimum, [N, blocks]: an initializer, or a K-quant's
        Mul(Cast(integer factors), units) (quant/precision.py) as Factored."""
        if name in self.inits:
            return self._const(name).T
        mul = self.producer.get(name)
        cast = self.producer.get(mul.input[0]) if mul is not None and mul.op_type == "Mul" else None
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in self.inits or mul.input[1] not in self.inits:
            raise EdgeLLMError(f"{self.where}: {name}: unsupported block scale expression")
        return Factored(self._integers(cast.input[0]).T, self._const(mul.input[1]).T)

    def _codebook_weight(self, transpose: onnx.NodeProto) -> str:
        """Transpose(GatherElements(codebooks, Add(Cast(index), block offsets))): quant/precision.py."""
        lookup = self.producer.get(transpose.input[0])
        entry = self.producer.get(lookup.input[1]) if lookup is not None and lookup.op_type == "GatherElements" else None
        cast = self.producer.get(entry.input[0]) if entry is not None and entry.op_type == "Add" else None
        if cast is None or cast.op_type != "Cast" or lookup.input[0] not in self.inits:
            raise EdgeLLMError(f"{self.where}: {transpose.name}: unsupported weight expression")
        index = self._integers(cast.input[0])
        offsets = self._const(entry.input[1]).reshape(-1)
        codebook = self._const(lookup.input[0])
        n, k = index.shape
        block = int(np.argmax(offsets != 0)) if offsets.any() else k  # offsets step up at each block
        blocks = -(-k // block)
        entries = codebook.shape[1] // blocks
        return self.weights.codebook_matrix(cast.input[0], index, codebook.reshape(n, blocks, entries),
                                            entries.bit_length() - 1, block)

    # ---- ops -------------------------------------------------------------------------------

    def _op_Gather(self, node):
        data, index = node.input
        if index == "rope_positions":
            return self._rope_rows(node)
        if self._is_weight(data):
            users = self.consumers.get(node.output[0], [])
            if users and users[0].op_type == "DequantizeLinear":
                return  # one operand of an integer embedding lookup, lowered with the DequantizeLinear
            return self._embed(node)
        x = self._act(data)
        if index in self.inits:  # act-order: the input columns in the order the weight's blocks hold them
            offset = self._constant(index, np.int64)
            columns = int(np.prod(self.inits[index].dims))
            out = self._new(node.output[0], x, columns)
            self._emit(f"em_gather_columns({{{data}}}, {x.rows_expr()}, {x.cols}, (const int64_t *)(em_base + {offset}), "
                       f"{columns}, {{{out.name}}});", [data], [out.name], node)
            return
        if _attrs(node).get("axis", 0) != 1 or index != "logits_index":
            raise EdgeLLMError(f"{self.where}: {node.name}: unsupported Gather")
        # the head's row select: rows logits_from..S-1 (R of them) reach the LM head
        out = self._new(node.output[0], x)
        out.tokens = "R"
        self._emit(f"em_copy({{{data}}} + (size_t)logits_from * {x.cols}, R * {x.cols}, {{{out.name}}});", [data],
                   [out.name], node)

    def _rope_rows(self, gather):
        """M-RoPE's per-row tables (graph/segments.py _pre): ReduceSum(Gather(table, rope_positions)
        * sections, axis 0) -> em_rope_rows."""
        (mul,) = self.consumers[gather.output[0]]
        (reduce,) = self.consumers[mul.output[0]]
        select = next(i for i in mul.input if i != gather.output[0])
        if mul.op_type != "Mul" or reduce.op_type != "ReduceSum" or select not in self.inits:
            raise EdgeLLMError(f"{self.where}: {gather.name}: unsupported use of rope_positions")
        owner = self._const(select).reshape(3, -1).argmax(axis=0)
        counts = np.bincount(owner, minlength=3)
        if (owner != np.repeat(np.arange(3), counts)).any():
            raise EdgeLLMError(f"{self.where}: {mul.name}: M-RoPE sections out of order")
        table = self._constant(gather.input[0])
        out = self._new(reduce.output[0], self.shapes["input_ids"], cols=len(owner))
        self._emit(f"em_rope_rows(rope, S, F({table}), {len(owner)}, {counts[0]}, {counts[1]}, {{{out.name}}});", [],
                   [out.name], gather, mul, reduce)
        self.done.update([mul.name, reduce.name])

    def _op_Where(self, node):
        """EMBED's row choice: a row whose id is negative takes the caller's embedding vector."""
        condition, given, table_rows = node.input
        unsqueeze = self.producer.get(condition)
        less = self.producer.get(unsqueeze.input[0]) if unsqueeze is not None else None
        if given != "embeddings" or less is None or less.op_type != "Less" or less.input[0] != "input_ids":
            raise EdgeLLMError(f"{self.where}: {node.name}: unsupported Where")
        x = self._act(table_rows)
        self.alias[node.output[0]] = self._buffer(table_rows)  # in place: only the given rows change
        self.shapes[node.output[0]] = x
        self._emit(f"em_embedding_rows(ids, embeddings, S, {x.cols}, {{{table_rows}}});", [table_rows], [table_rows],
                   less, unsqueeze, node)

    def _is_weight(self, name: str) -> bool:
        return name in self.inits or (name in self.producer and self._from_constants(self.producer[name]))

    def _embed(self, node):
        weight = self._table(node.input[0])
        out = self._new(node.output[0], self.shapes["input_ids"], cols=self.weights.cols(weight))
        self._emit(f"em_embed(ids, S, &{weight}, {{{out.name}}});", [], [out.name], node)

    def _table(self, data: str) -> str:
        if data in self.inits:
            return self.weights.once(("f32", data, False), lambda: self.weights.float_matrix(data, self._const(data)))
        bits = self.producer[data].input[0]
        return self.weights.once(("bf16", bits, False), lambda: self.weights.bf16_matrix(bits, self._read(bits), transpose=False))

    def _constant(self, name: str, dtype=np.float32) -> int:
        """A small tensor a kernel reads as it is (norm weights, rope tables, biases): its offset."""
        return self.weights.once(("constant", name), lambda: self.weights.constant(
            name, self._const(name).astype(dtype).reshape(-1)))

    def _op_DequantizeLinear(self, node):
        """An integer embedding lookup: Gather each of q / scale / zero point, then this."""
        gathers = [self.producer.get(i) for i in node.input if i]
        if not all(g is not None and g.op_type == "Gather" and g.input[0] in self.inits for g in gathers):
            raise EdgeLLMError(f"{self.where}: {node.name}: unsupported DequantizeLinear")
        q, scale, zero = ([g.input[0] for g in gathers] + [None])[:3]
        weight = self.weights.once(("integer", q, False), lambda: self.weights.integer_matrix(
            q, self._integers(q), INTEGER_TYPES[self.inits[q].data_type], self._const(scale),
            None if zero is None else self._integers(zero), None, _attrs(node).get("block_size", 0)))
        ids_node = gathers[0]
        self._new(node.output[0], self.shapes["input_ids"], cols=self.weights.cols(weight))
        self._emit(f"em_embed(ids, S, &{weight}, {{{node.output[0]}}});", [], [node.output[0]], ids_node, node)

    def _op_MatMul(self, node):
        x_name, w_name = node.input
        nodes = [node]
        minimum, y = None, node.output[0]
        shift = self._q41_shift(node)
        if shift is not None:
            add, minimum, folded = shift
            y = add.output[0]
            nodes += folded
            self.done.update(n.name for n in folded)
        branch = self._lora_branch(node, y)
        lora = "NULL"
        if branch is not None:  # the matmul's LoRA branch runs inside its call (em_fusion.lora)
            add, site, folded, shape = branch
            y = add.output[0]
            nodes += folded
            self.done.update(n.name for n in folded)
            lora = f"EM_LORA({self.lora_sites.index(site)})"
        weight = self._matmul_weight(w_name, minimum)
        if branch is not None:
            self.out.lora_sites[site] = (*shape, int(self.weights.quantizes_in_fours(weight)))
        self.out.matmul_weights.add(weight)
        x = self._act(x_name)
        residual = self._residual_add(y, x, self.weights.rows(weight))
        if residual is not None:
            add, residual = residual
            nodes.append(add)
            self.done.add(add.name)
            y = add.output[0]
        out = self._new(y, x, self.weights.rows(weight))
        deferred = self.deferred.get(x_name)
        if self.one_token and x.rows == 1:  # a decode row: the team shares it, each thread preparing the input itself
            deferred = deferred or Deferred("EM_INPUT", "NULL, 0.0f, NULL", x_name, [], [])
            up = deferred.operands.rsplit(", ", 1)[-1]  # the gated product's up operand, or NULL
            residual_ref = f"{{{residual}}}" if residual else "NULL"
            # EM_ROWS(x, up, residual, y): the rows and their strides, filled in by codegen (one row
            # in the decode function, S in the verify function)
            self._emit(f"em_team_matmul({{{deferred.source}}}, &{weight}, {{{out.name}}}, &(const em_fusion){{"
                       f"{deferred.prologue}, {deferred.operands}, {residual_ref}, NULL, {deferred.merge}, "
                       f"EM_ROWS({{{deferred.source}}}; {up}; {residual_ref}; {{{out.name}}}), {lora}}});",
                       [deferred.source, *deferred.inputs] + ([residual] if residual else []), [out.name],
                       *deferred.nodes, *nodes, team=True)
            return
        if deferred is None and residual is None and branch is None:
            self._emit(f"em_matmul({{{x_name}}}, {x.rows_expr()}, &{weight}, {{{out.name}}});", [x_name], [out.name], *nodes)
            return
        # the input's producer and the residual Add run inside the matmul (kernels: em_fusion);
        # a deferred input keeps its arena slot as the scratch the threads share for several rows
        if deferred is None:
            deferred = Deferred("EM_INPUT", "NULL, 0.0f, NULL", x_name, [], [])
        reads = [deferred.source, *deferred.inputs] + ([residual] if residual else [])
        writes = [out.name] + ([x_name] if deferred.nodes else [])
        scratch = f"{{{x_name}}}" if deferred.nodes else "NULL"
        self._emit(f"em_matmul_fused({{{deferred.source}}}, {x.rows_expr()}, &{weight}, {{{out.name}}}, &(const em_fusion){{"
                   f"{deferred.prologue}, {deferred.operands}, {f'{{{residual}}}' if residual else 'NULL'}, {scratch}, "
                   f".lora = {lora}}});",
                   reads, writes, *deferred.nodes, *nodes)

    def _lora_branch(self, matmul: onnx.NodeProto, y: str):
        """y's only consumer, if it adds the LoRA branch of this matmul's input (graph/segments.py):
        Add(y, MatMul(Mul(MatMul(x, lora.<site>.a), lora.scale), lora.<site>.b)). Returns (the Add,
        the site, the branch's nodes, (K, N, columns)) or None."""
        add = self._only_consumer(y, "Add")
        up = self.producer.get(next((i for i in add.input if i != y), "")) if add is not None else None
        if up is None or not self._is_branch(up, "b"):
            return None
        scaled = self.producer.get(up.input[0])
        down = self.producer.get(next((i for i in scaled.input if i != "lora.scale"), "")) if scaled is not None else None
        if scaled is None or scaled.op_type != "Mul" or "lora.scale" not in scaled.input or down is None or \
                not self._is_branch(down, "a") or down.input[0] != matmul.input[0]:
            return None
        site = up.input[1][len("lora.") : -len(".b")]
        if site not in self.lora_sites:
            raise EdgeLLMError(f"{self.where}: {up.name}: LoRA branch {site} is not among the program's branch sites")
        a, b = (self.graph_inputs[n.input[1]] for n in (down, up))
        return add, site, [down, scaled, up, add], (a[0], b[1], a[1])

    def _is_branch(self, node: onnx.NodeProto, factor: str) -> bool:
        """A MatMul of a LoRA branch by its A (factor "a") or B ("b") input."""
        return node.op_type == "MatMul" and node.input[1].startswith("lora.") and node.input[1].endswith("." + factor)

    def _residual_add(self, y: str, x: Activation, cols: int):
        """y's only consumer, if it adds an activation of y's shape computed already: (the Add, that
        activation), folded into the matmul as y's residual (per-token rows only: a broadcast
        of one row stays an Add)."""
        add = self._only_consumer(y, "Add")
        if add is None or not x.per_token:
            return None
        other = next((i for i in add.input if i != y), None)
        shape = self.shapes.get(other)
        if other is None or other in self.inits or shape is None or (shape.rows, shape.cols, shape.per_token) != (x.rows, cols, True):
            return None
        return add, other

    def _q41_shift(self, node):
        """GGUF Q4_1: y = MatMul(x, DQ(q)) + MatMul(blocksum(x), minimum) (quant/precision.py).
        Returns (the Add, the minimum initializer, the folded nodes) or None."""
        users = self.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            return None
        add = users[0]
        other = self.producer.get(next(i for i in add.input if i != node.output[0]))
        if other is None or other.op_type != "MatMul" or not self._is_weight(other.input[1]):
            return None
        total = self.producer.get(other.input[0])
        if total is None or total.op_type != "ReduceSum":
            return None
        blocks = self.producer[total.input[0]]
        return add, other.input[1], [blocks, total, other, add]

    def _op_RMSNormalization(self, node):
        a = _attrs(node)
        if a.get("axis", -1) != -1:
            raise EdgeLLMError(f"{self.where}: {node.name}: RMSNormalization over axis {a['axis']}")
        x = self._act(node.input[0])
        w = self._constant(node.input[1])
        out = self._new(node.output[0], x)
        if self._feeds_one_matmul(out.name):
            self.deferred[out.name] = Deferred("EM_RMSNORM", f"F({w}), {a.get('epsilon', 1e-5)!r}f, NULL", node.input[0],
                                               [], [node])
            return
        self._emit(f"em_rmsnorm({{{node.input[0]}}}, {x.rows_expr()}, {x.cols}, F({w}), {a.get('epsilon', 1e-5)!r}f, {{{out.name}}});",
                   [node.input[0]], [out.name], node)

    def _view(self, name: str, of: str, offset: int = 0) -> None:
        """name reads the bytes of `of` (from `offset` floats on): no copy, no arena slot."""
        self.alias[name] = self._buffer(of)
        if self.view_offset.get(of, 0) + offset:
            self.view_offset[name] = self.view_offset.get(of, 0) + offset

    def _feeds_one_matmul(self, name: str) -> bool:
        """name is read by one MatMul alone (as its input; a Q4_1 shift's block sums read it too)."""
        users = self.consumers.get(name, [])
        branches = {u.name for u in users if self._is_branch(u, "a")}  # a LoRA branch reads the prepared input too
        matmuls = [u for u in users if u.op_type == "MatMul" and u.input[0] == name and u.name not in branches]
        if len(matmuls) != 1:
            return False
        allowed = {matmuls[0].name} | branches
        shift = self._q41_shift(matmuls[0])
        if shift is not None:
            allowed.add(shift[2][0].name)
        return all(u.name in allowed for u in users)

    def _op_Reshape(self, node):
        x = self._act(node.input[0])
        shape = [int(v) for v in self._const(node.input[1])]
        cols = shape[-1] if shape[-1] > 0 else x.cols
        per_row = x.rows * x.cols
        if cols <= 0 or per_row % cols:
            raise EdgeLLMError(f"{self.where}: {node.name}: unsupported Reshape to {shape}")
        self._view(node.output[0], node.input[0])
        self.shapes[node.output[0]] = Activation(node.output[0], per_row // cols, cols, x.per_token)

    def _op_Identity(self, node):
        x = self._act(node.input[0])
        if node.output[0] in PARAMETERS:  # a graph output the caller's buffer receives
            if self._write_into(node.input[0], PARAMETERS[node.output[0]]):
                return
            out = self._new(node.output[0], x)
            self._emit(f"em_copy({{{node.input[0]}}}, {x.count_expr()}, {{{out.name}}});", [node.input[0]], [out.name], node)
            return
        self._view(node.output[0], node.input[0])
        self.shapes[node.output[0]] = x

    def _write_into(self, name: str, parameter: str) -> bool:
        """Let the call that just wrote `name` write the caller's buffer instead, if nothing else
        reads `name`: the logits then need no copy."""
        last = self.out.calls[-1] if self.out.calls else None
        buffer = self._buffer(name)
        if (last is None or buffer not in last.writes or buffer in last.reads or name in self.view_offset
                or len(self.consumers.get(name, [])) != 1):
            return False
        last.code = last.code.replace("{" + buffer + "}", parameter)
        last.writes.remove(buffer)
        return True

    def _op_Split(self, node):
        if _attrs(node).get("axis", 0) not in (-1, 2):
            raise EdgeLLMError(f"{self.where}: {node.name}: Split must run along the last axis")
        x = self._act(node.input[0])
        first = 0
        for name, width in zip(node.output, (int(v) for v in self._const(node.input[1]))):
            if self.one_token and x.rows == 1 and x.per_token:  # one row: the columns are a contiguous view
                self._view(name, node.input[0], first)
                self.shapes[name] = Activation(name, 1, width)
                first += width
                continue
            out = self._new(name, x, width)
            self._emit(f"em_columns({{{node.input[0]}}}, {x.rows_expr()}, {x.cols}, {first}, {width}, {{{name}}});",
                       [node.input[0]], [out.name], node)
            first += width

    def _op_RotaryEmbedding(self, node):
        a = _attrs(node)
        if a.get("interleaved", 0):
            raise EdgeLLMError(f"{self.where}: {node.name}: interleaved rotary embedding")
        x = self._act(node.input[0])
        heads = a["num_heads"]
        head_dim = x.cols // heads
        rotary_dim = a.get("rotary_embedding_dim", 0) or head_dim
        if node.input[1] in self.shapes:  # each row's own table (M-RoPE: _rope_rows), from its row 0
            source, cos, sin = node.input[:3]
            out = self._new(node.output[0], x)
            self._emit(f"em_rope({{{source}}}, S, 0, {heads}, {head_dim}, {rotary_dim}, {{{cos}}}, {{{sin}}}, {{{out.name}}});",
                       [source, cos, sin], [out.name], node)
            return
        rotary = Rotary(node.input[0], heads, head_dim, a.get("rotary_embedding_dim", 0) or head_dim,
                        self._constant(node.input[1]), self._constant(node.input[2]), node)
        if self.one_token and self._only_into_attention(node.output[0]):
            self.rotary[node.output[0]] = rotary  # the decode attention rotates the row itself
            self.shapes[node.output[0]] = x
            return
        self._rope(node.output[0], rotary)

    def _rope(self, name: str, r: Rotary) -> None:
        out = self._new(name, self._act(r.source))
        self._emit(f"em_rope({{{r.source}}}, S, start, {r.heads}, {r.head_dim}, {r.rotary_dim}, F({r.cos}), F({r.sin}), "
                   f"{{{out.name}}});", [r.source], [out.name], r.node)

    def _through_identity(self, name: str) -> str:
        """The tensor an Identity chain (a segment boundary) passes on as `name`."""
        while name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        return name

    def _only_into_attention(self, name: str) -> bool:
        """name is read only as an Attention's query or as the rows a cache write adds for one
        (through Identity views: the segments' boundaries)."""
        for user in self.consumers.get(name, []):
            if user.op_type == "Identity" and user.output[0] not in PARAMETERS and self._only_into_attention(user.output[0]):
                continue
            if user.op_type == "Attention" and user.input[0] == name:
                continue
            if user.op_type == "TensorScatter" and user.input[1] == name and all(
                    n.op_type == "Attention" for n in self.consumers.get(user.output[0], [])):
                continue
            return False
        return True

    def _op_TensorScatter(self, node):
        cache, rows, _ = node.input
        layer, which = cache.split(".")[1:3]
        buffer = f"EM_CACHE({layer}, {'0' if which == 'k' else '1'})"
        self.caches[cache] = self.caches[node.output[0]] = buffer
        # both caches are stored per KV head (kernels/edgellm_kernels.h), which only the Attention knows
        attention = next((n for n in self.consumers.get(node.output[0], []) if n.op_type == "Attention"), None)
        if attention is None:
            raise EdgeLLMError(f"{self.where}: {node.name}: a cache that no Attention reads")
        if self.one_token:  # the decode attention writes the row itself, once it is done reading the cache
            self.new_rows[node.output[0]] = node
            return
        x = self._act(rows)
        kv_heads = _attrs(attention)["kv_num_heads"]
        kernel = "em_cache_write_keys" if which == "k" else "em_cache_write_values"
        self._emit(f"{kernel}({buffer}, {{{rows}}}, S, start, {kv_heads}, {x.cols // kv_heads}, EM_CACHE_TOKENS);",
                   [rows], [], node)

    def _op_Attention(self, node):
        a = _attrs(node)
        q, k, v, mask = node.input[:4]
        if mask not in self.windows:
            raise EdgeLLMError(f"{self.where}: {node.name}: attention mask {mask} is not one the MASK segment makes")
        x = self._act(q)
        heads, kv_heads = a["q_num_heads"], a["kv_num_heads"]
        head_dim = x.cols // heads
        scale = a.get("scale", 1.0 / np.sqrt(head_dim))
        if self.one_token:
            self._decode_attention(node, x, heads, kv_heads, head_dim, scale)
            return
        out = self._new(node.output[0], x)
        self._emit(f"em_attention({{{q}}}, S, start, {self.caches[k]}, {self.caches[v]}, {heads}, {kv_heads}, {head_dim}, EM_CACHE_TOKENS, "
                   f"{float(scale)!r}f, {float(a.get('softcap', 0.0))!r}f, {self.windows[mask]}, until, {{{out.name}}});",
                   [q], [out.name], node)

    def _decode_attention(self, node, x: Activation, heads: int, kv_heads: int, head_dim: int, scale: float) -> None:
        """The team's kernel: the token's rotary embedding and cache writes included, its chunks'
        partial results in an arena slot."""
        q, k, v, mask = node.input[:4]
        writes = [self.new_rows.get(k), self.new_rows.get(v)]
        if None in writes:
            raise EdgeLLMError(f"{self.where}: {node.name}: a decode attention must read caches this step writes")
        rows = [q, writes[0].input[1], writes[1].input[1]]
        rotated = [self._through_identity(name) for name in rows]
        rq, rk = self.rotary.get(rotated[0]), self.rotary.get(rotated[1])
        fused = (rq is not None and rk is not None and (rq.cos, rq.sin, rq.rotary_dim) == (rk.cos, rk.sin, rk.rotary_dim)
                 and (rq.heads, rk.heads, rq.head_dim, rk.head_dim) == (heads, kv_heads, head_dim, head_dim)
                 and rotated[2] not in self.rotary)
        if fused:
            tables = f"F({rq.cos}), F({rq.sin}), {rq.rotary_dim}"
            sources = [rq.source, rk.source, rows[2]]
            nodes = [rq.node, rk.node]
        else:  # rotated apart (one omp single), then handed over as they are
            for name in rotated:
                if name in self.rotary:
                    self._rope(name, self.rotary.pop(name))
            tables, sources, nodes = "NULL, NULL, 0", rows, []
        # per token: the verify function runs one attention per row, each merged by the next matmul
        scratch = self._new(node.output[0] + ".chunks", x, rows=heads * DECODE_CHUNKS, cols=head_dim + 2, per_token=True)
        merged_by = self._identity_end(node.output[0])
        if self._feeds_one_matmul(merged_by):  # that matmul merges the chunks itself: no barrier between them
            self.shapes[node.output[0]] = x
            # k and v count as its inputs too: threads may still copy them to the cache when it starts
            self.deferred[merged_by] = Deferred("EM_ATTENTION", "NULL, 0.0f, NULL", scratch.name, sources[1:], [],
                                                f"{{start, {self.windows[mask]}, {heads}, {kv_heads}, {head_dim}}}")
            out, written = "NULL", [scratch.name]
        else:
            out = f"{{{self._new(node.output[0], x).name}}}"
            written = [node.output[0], scratch.name]
        a = _attrs(node)
        self._emit(f"em_team_attention({{{sources[0]}}}, {{{sources[1]}}}, {{{sources[2]}}}, {tables}, start, "
                   f"{self.caches[k]}, {self.caches[v]}, {heads}, {kv_heads}, {head_dim}, EM_CACHE_TOKENS, "
                   f"{float(scale)!r}f, {float(a.get('softcap', 0.0))!r}f, {self.windows[mask]}, {{{scratch.name}}}, "
                   f"{out});", sources, written, *nodes, *writes, node, team=True)

    def _identity_end(self, name: str) -> str:
        """What a chain of Identity views (segment boundaries) passes `name` on as."""
        users = self.consumers.get(name, [])
        while len(users) == 1 and users[0].op_type == "Identity" and users[0].output[0] not in PARAMETERS:
            name = users[0].output[0]
            users = self.consumers.get(name, [])
        return name

    def _binary(self, node, elementwise: str | None, by_scalar: str | None) -> None:
        a, b = node.input
        c = self._scalar(b)
        if c is not None and by_scalar:
            x = self._act(a)
            out = self._new(node.output[0], x)
            value = 1.0 / c if node.op_type == "Div" else c
            self._emit(f"{by_scalar}({{{a}}}, {x.count_expr()}, {float(value)!r}f, {{{out.name}}});", [a], [out.name], node)
            return
        if b in self.inits and node.op_type == "Add":  # a bias row
            x = self._act(a)
            row = self._constant(b)
            out = self._new(node.output[0], x)
            self._emit(f"em_add_row({{{a}}}, {x.rows_expr()}, {x.cols}, F({row}), {{{out.name}}});", [a], [out.name], node)
            return
        if elementwise is None or b in self.inits:
            raise EdgeLLMError(f"{self.where}: {node.name}: no kernel for {node.op_type} with these operands")
        x, y = self._act(a), self._act(b)
        if (x.rows, x.cols, x.per_token) != (y.rows, y.cols, y.per_token):
            raise EdgeLLMError(f"{self.where}: {node.name}: {node.op_type} of differently shaped operands")
        out = self._new(node.output[0], x)
        self._emit(f"{elementwise}({{{a}}}, {{{b}}}, {x.count_expr()}, {{{out.name}}});", [a, b], [out.name], node)

    def _op_Add(self, node):
        self._binary(node, "em_add", None)

    def _op_Mul(self, node):
        self._binary(node, "em_mul", "em_scale")

    def _op_Div(self, node):
        self._binary(node, None, "em_scale")

    def _unary(self, node, kernel: str) -> None:
        x = self._act(node.input[0])
        out = self._new(node.output[0], x)
        self._emit(f"{kernel}({{{node.input[0]}}}, {x.count_expr()}, {{{out.name}}});", [node.input[0]], [out.name], node)

    def _op_Sigmoid(self, node):
        # the gated MLP's SiLU: Mul(up, Mul(gate, Sigmoid(gate))) -> one pass
        silu = self._only_consumer(node.output[0], "Mul")
        if silu is not None and node.input[0] in silu.input and self._gated(node, silu, "em_silu_mul"):
            return
        self._unary(node, "em_sigmoid")

    def _only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def _gated(self, first, activation, kernel: str) -> bool:
        """activation(gate) * up as one kernel call, if `activation`'s output only feeds that product."""
        product = self._only_consumer(activation.output[0], "Mul")
        if product is None:
            return False
        gate = first.input[0]
        up = next(i for i in product.input if i != activation.output[0])
        x, y = self._act(gate), self._act(up)
        if (x.rows, x.cols, x.per_token) != (y.rows, y.cols, y.per_token):
            return False
        out = self._new(product.output[0], x)
        nodes = [first] if first is activation else [first, activation]
        self.done.update(n.name for n in (activation, product))
        if self._feeds_one_matmul(out.name):
            prologue = "EM_SILU_GATE" if kernel == "em_silu_mul" else "EM_GELU_GATE"
            self.deferred[out.name] = Deferred(prologue, f"NULL, 0.0f, {{{up}}}", gate, [up], [*nodes, product])
            return True
        self._emit(f"{kernel}({{{gate}}}, {{{up}}}, {x.count_expr()}, {{{out.name}}});", [gate, up], [out.name],
                   *nodes, product)
        return True

    def _op_Tanh(self, node):
        self._unary(node, "em_tanh")

    def _op_Gelu(self, node):
        if _attrs(node).get("approximate", "none") != "tanh":
            raise EdgeLLMError(f"{self.where}: {node.name}: only the tanh approximation of Gelu has a kernel")
        if not self._gated(node, node, "em_gelu_tanh_mul"):  # Gemma's gated MLP: Mul(Gelu(gate), up)
            self._unary(node, "em_gelu_tanh")

