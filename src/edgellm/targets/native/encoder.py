"""Lower a vision-language model's image encoder (targets/link.py link_vision: pixel_patches ->
image_features) to kernel calls, as lower.py does the language model's programs.

The encoder runs once per image on a fixed number of rows (its patches), so every activation has
a fixed shape (Activation.per_token False) and there is no cache and no position. Beyond the
language model's ops it takes LayerNormalization, exact Gelu, Concat (a class token row before the
patches), Slice of rows (the class token dropped), Gather of rows by a constant order (merge
blocks, pixel shuffle, windows), ReduceMean over row groups (Gemma 3's pooling), Add of a constant
table (position embeddings) and Attention without a mask: each row sees every row
(em_attention_rows), a batch of windows (a Reshape to [windows, rows, width]: one call per window)
or a constant mask whose rows fall into groups that see exactly each other (Qwen2.5-VL's windows
when they do not tile the grid: each group's rows are gathered, attend, and are scattered back).
"""

from __future__ import annotations

import numpy as np
import onnx

from ...errors import EdgeLLMError
from .codegen import EncoderShape
from .lower import Activation, Lowering, _attrs


class EncoderLowering(Lowering):
    """Per-channel int8 weights (a plan's A_BF16_W_INT8 for part VISION: one block of K) always
    take int8 activations here, whatever --int8_activations says: an encoder's matmuls are GEMMs of
    hundreds of rows, bound by arithmetic, so int8 weights with float products would be no faster
    than BF16 ones, and the cpu target runs those weights as integer GEMMs
    (DynamicQuantizeMatMul). Other integer weights (int4 blocks, a GGUF mmproj's) follow
    --int8_activations, as the cpu target's MatMulNBits does."""

    def __init__(self, model: onnx.ModelProto, weights, where: str, int8_activations: bool = False, files=None):
        super().__init__(model, weights, where, int8_activations, tokens=0, files=files)
        _, patches, values = self.graph_inputs["pixel_patches"]
        self.shapes = {"pixel_patches": Activation("pixel_patches", patches, values, per_token=False)}
        _, tokens, hidden = next([d.dim_value for d in o.type.tensor_type.shape.dim] for o in self.graph.output
                                 if o.name == "image_features")
        self.shape = EncoderShape(patches, values, tokens, hidden)  # what em_encode takes and gives

    # ---- constants -------------------------------------------------------------------------

    def _values_expression(self, name: str) -> None:
        """A constant operand must be an initializer or a Cast of one (BF16 weights)."""
        node = self.producer.get(name)
        if name not in self.inits and (node is None or node.op_type != "Cast" or node.input[0] not in self.inits):
            raise EdgeLLMError(f"{self.where}: {name}: unsupported constant expression")

    def _values(self, name: str) -> np.ndarray:
        """A constant operand's float32 values (read once per build: through _constant)."""
        self._values_expression(name)
        return self._const(name if name in self.inits else self.producer[name].input[0]).astype(np.float32)

    def _dims(self, name: str) -> list[int]:
        """A constant operand's shape, from its initializer (an initializer, or the one a Cast widens)."""
        node = self.producer.get(name)
        return list(self.inits[name if name in self.inits else node.input[0]].dims)

    def _constant(self, name: str, dtype=np.float32) -> int:
        """A constant operand's offset in the weights file (norms, biases, position tables; float32)."""
        if name in self.inits:
            return super()._constant(name, dtype)
        return self.weights.once(("constant", name), lambda: self.weights.constant(name, self._values(name).reshape(-1)))

    def _index(self, name: str, values: np.ndarray) -> int:
        return self.weights.once(("constant", name), lambda: self.weights.constant(name, values.astype(np.int64)))

    def _matmul_weight(self, name: str, minimum: str | None = None) -> str:
        node = self.producer.get(name)
        per_channel = (node is not None and node.op_type == "DequantizeLinear" and node.input[0] in self.inits
                       and _attrs(node).get("block_size", 0) >= self.inits[node.input[0]].dims[0])
        chosen = self.int8_activations
        self.int8_activations = chosen or per_channel
        try:
            return super()._matmul_weight(name, minimum)
        finally:
            self.int8_activations = chosen

    # ---- ops -------------------------------------------------------------------------------

    def _op_LayerNormalization(self, node):
        a = _attrs(node)
        if a.get("axis", -1) != -1 or len(node.input) < 3:
            raise EdgeLLMError(f"{self.where}: {node.name}: LayerNormalization must run over the last axis with a bias")
        x = self._act(node.input[0])
        weight, bias = self._constant(node.input[1]), self._constant(node.input[2])
        out = self._new(node.output[0], x)
        self._emit(f"em_layernorm({{{node.input[0]}}}, {x.rows}, {x.cols}, F({weight}), F({bias}), "
                   f"{a.get('epsilon', 1e-5)!r}f, {{{out.name}}});", [node.input[0]], [out.name], node)

    def _op_Gelu(self, node):
        if _attrs(node).get("approximate", "none") == "tanh":
            return super()._op_Gelu(node)
        self._unary(node, "em_gelu")

    def _op_Add(self, node):
        a, b = node.input
        if self._is_weight(a):
            a, b = b, a
        if not self._is_weight(b):
            return super()._op_Add(node)
        x = self._act(a)
        self._values_expression(b)
        size = int(np.prod(self._dims(b)))
        out = self._new(node.output[0], x)
        if size == x.cols:  # a bias row
            self._emit(f"em_add_row({{{a}}}, {x.rows}, {x.cols}, F({self._constant(b)}), {{{out.name}}});", [a], [out.name],
                       node)
        elif size == x.rows * x.cols:  # a table of the activation's shape (position embeddings)
            self._emit(f"em_add({{{a}}}, F({self._constant(b)}), {size}, {{{out.name}}});", [a], [out.name], node)
        else:
            raise EdgeLLMError(f"{self.where}: {node.name}: Add of a constant of {size} values to {x.rows} x {x.cols}")

    def _op_Concat(self, node):
        if _attrs(node).get("axis") != 1:
            raise EdgeLLMError(f"{self.where}: {node.name}: Concat must join rows (axis 1)")
        parts = []
        for name in node.input:
            if self._is_weight(name):
                self._values_expression(name)
                dims = self._dims(name)
                parts.append((name, dims[-1], int(np.prod(dims)) // dims[-1], True))
            else:
                x = self._act(name)
                parts.append((name, x.cols, x.rows, False))
        cols = {p[1] for p in parts}
        if len(cols) != 1:
            raise EdgeLLMError(f"{self.where}: {node.name}: Concat of rows of different widths {sorted(cols)}")
        (width,) = cols
        out = self._new(node.output[0], Activation("", sum(p[2] for p in parts), width, per_token=False))
        code, row = [], 0
        for name, _, rows, constant in parts:
            source = f"F({self._constant(name)})" if constant else f"{{{name}}}"
            code.append(f"em_copy({source}, {rows * width}, {{{out.name}}} + {row * width});")
            row += rows
        self._emit(" ".join(code), [p[0] for p in parts if not p[3]], [out.name], node)

    def _op_Slice(self, node):
        x = self._act(node.input[0])
        starts, ends = (int(self._const(i).reshape(-1)[0]) for i in node.input[1:3])
        axes = [int(v) for v in self._const(node.input[3]).reshape(-1)] if len(node.input) > 3 and node.input[3] else [0]
        steps = [int(v) for v in self._const(node.input[4]).reshape(-1)] if len(node.input) > 4 and node.input[4] else [1]
        if axes != [1] or steps != [1]:
            raise EdgeLLMError(f"{self.where}: {node.name}: Slice must take a run of rows (axis 1, step 1)")
        first, last = (max(0, min(v + x.rows if v < 0 else v, x.rows)) for v in (starts, ends))  # ONNX: negative from the end
        self._view(node.output[0], node.input[0], first * x.cols)  # rows first.. of the same buffer
        self.shapes[node.output[0]] = Activation(node.output[0], last - first, x.cols, per_token=False)

    def _op_Gather(self, node):
        data, index = node.input
        if _attrs(node).get("axis", 0) != 1 or index not in self.inits or self._is_weight(data):
            raise EdgeLLMError(f"{self.where}: {node.name}: unsupported Gather (the encoder gathers rows by a constant order)")
        x = self._act(data)
        order = self._const(index).astype(np.int64).reshape(-1)
        if order.min() < 0 or order.max() >= x.rows:
            raise EdgeLLMError(f"{self.where}: {node.name}: row order outside the {x.rows} rows")
        out = self._new(node.output[0], Activation("", len(order), x.cols, per_token=False))
        self._emit(f"em_gather_rows({{{data}}}, {x.cols}, (const int64_t *)(em_base + {self._index(index, order)}), "
                   f"{len(order)}, {{{out.name}}});", [data], [out.name], node)

    def _op_ReduceMean(self, node):
        """The mean of each group of rows: ReduceMean over axis 2 of a Reshape to [1, groups, per_group, cols]."""
        reshape = self.producer.get(node.input[0])
        axes = [int(v) for v in self._const(node.input[1]).reshape(-1)] if len(node.input) > 1 else []
        shape = [int(v) for v in self._const(reshape.input[1])] if reshape is not None and reshape.op_type == "Reshape" else []
        if axes != [2] or _attrs(node).get("keepdims", 1) != 0 or len(shape) != 4 or shape[2] <= 0:
            raise EdgeLLMError(f"{self.where}: {node.name}: unsupported ReduceMean (the mean of groups of rows)")
        x = self._act(node.input[0])
        groups = x.rows // shape[2]
        out = self._new(node.output[0], Activation("", groups, x.cols, per_token=False))
        self._emit(f"em_mean_rows({{{node.input[0]}}}, {groups}, {shape[2]}, {x.cols}, {{{out.name}}});",
                   [node.input[0]], [out.name], node)

    def _op_RotaryEmbedding(self, node):
        """Constant tables, one row per activation row (the 2D rotary embedding of Qwen2-VL's patches)."""
        a = _attrs(node)
        if a.get("interleaved", 0) or len(node.input) > 3 and node.input[3]:
            raise EdgeLLMError(f"{self.where}: {node.name}: unsupported RotaryEmbedding (constant tables, no position ids)")
        x = self._act(node.input[0])
        heads = a["num_heads"]
        head_dim = x.cols // heads
        rotary_dim = a.get("rotary_embedding_dim", 0) or head_dim
        cos, sin = (self._constant(n) for n in node.input[1:3])
        out = self._new(node.output[0], x)
        self._emit(f"em_rope({{{node.input[0]}}}, {x.rows}, 0, {heads}, {head_dim}, {rotary_dim}, F({cos}), F({sin}), "
                   f"{{{out.name}}});", [node.input[0]], [out.name], node)

    def _op_Attention(self, node):
        a = _attrs(node)
        q, k, v = node.input[:3]
        mask = node.input[3] if len(node.input) > 3 else ""
        x = self._act(q)
        heads = a["q_num_heads"]
        if a.get("kv_num_heads", heads) != heads or a.get("softcap", 0.0) or a.get("is_causal", 0):
            raise EdgeLLMError(f"{self.where}: {node.name}: the encoder's attention has one KV head per head, no softcap "
                               f"and no causal mask")
        head_dim = x.cols // heads
        scale = float(a.get("scale", 1.0 / np.sqrt(head_dim)))
        groups = self._row_groups(node, x.rows, mask)
        rows = max(len(g) if isinstance(g, np.ndarray) else g[1] for g in groups)
        floats = heads * ((rows + 15) // 16 * 16) * head_dim  # em_attention_rows' scratch cache
        cache = Activation("", -(-floats // x.cols), x.cols, per_token=False)
        k_scratch, v_scratch = (self._new(f"{node.output[0]}.{which}", cache).name for which in ("keys", "values"))
        out = self._new(node.output[0], x)
        scratch = f"(em_kv_value *){{{k_scratch}}}, (em_kv_value *){{{v_scratch}}}"
        code, reads, writes = [], [q, k, v], [out.name, k_scratch, v_scratch]
        if all(isinstance(g, tuple) for g in groups):  # runs of rows: in place
            for first, count in groups:
                at = f"{first * x.cols}"
                code.append(f"em_attention_rows({{{q}}} + {at}, {{{k}}} + {at}, {{{v}}} + {at}, {count}, {heads}, "
                            f"{head_dim}, {scale!r}f, {scratch}, {{{out.name}}} + {at});")
        else:  # groups of scattered rows: gathered into one slot each of q, k and v, attended, scattered back
            packed = [self._new(f"{node.output[0]}.{which}", Activation("", rows, x.cols, per_token=False)).name
                      for which in ("q", "k", "v", "out")]
            writes += packed
            for i, group in enumerate(groups):
                index = f"(const int64_t *)(em_base + {self._index(f'{mask}.group{i}', group)})"
                code += [f"em_gather_rows({{{src}}}, {x.cols}, {index}, {len(group)}, {{{dst}}});"
                         for src, dst in zip((q, k, v), packed)]
                code.append(f"em_attention_rows({{{packed[0]}}}, {{{packed[1]}}}, {{{packed[2]}}}, {len(group)}, {heads}, "
                            f"{head_dim}, {scale!r}f, {scratch}, {{{packed[3]}}});")
                code.append(f"em_scatter_rows({{{packed[3]}}}, {x.cols}, {index}, {len(group)}, {{{out.name}}});")
        self._emit(" ".join(code), reads, writes, node)

    def _row_groups(self, node, rows: int, mask: str) -> list:
        """The sets of rows that attend among themselves: (first, count) runs, or arrays of rows."""
        if mask:
            if mask not in self.inits or self.inits[mask].data_type != onnx.TensorProto.BOOL:
                raise EdgeLLMError(f"{self.where}: {node.name}: the encoder's attention mask must be a constant of booleans")
            sees = self._const(mask).reshape(rows, rows).astype(bool)
            groups = []
            _, first, owner = np.unique(sees, axis=0, return_index=True, return_inverse=True)
            for g in np.argsort(first):
                members = np.flatnonzero(owner.reshape(-1) == g)
                if not (sees[members][:, members].all() and sees[members].sum() == len(members) ** 2):
                    raise EdgeLLMError(f"{self.where}: {node.name}: a mask whose rows do not fall into groups that see "
                                       f"exactly each other")
                groups.append(members)
            return groups
        reshape = self.producer.get(node.input[0])  # a batch of windows: a Reshape to [windows, rows, width]
        if reshape is not None and reshape.op_type == "Reshape":
            shape = [int(v) for v in self._const(reshape.input[1])]
            if len(shape) == 3 and shape[1] > 0:
                return [(first, shape[1]) for first in range(0, rows, shape[1])]
        return [(0, rows)]
