"""Emit one ONNX segment per work unit from a ModelConfig.

Segments talk through tensors with fixed names, so linking is a union of graphs:
    input_ids, position_ids [1, S],
    embeddings [1, S, H]                  -> EMBED -> hidden.0 [1, S, H]  (a row whose id is < 0 takes its
                                                      embedding vector: image features, later)
    position_ids, attend_until, cache.0.k -> MASK  -> mask.full / mask.sliding [S, KV], write_index [1]
    hidden.i, position_ids                -> PRE   -> q.i, k.i, v.i (rotated)
      (M-RoPE: rope_positions [3, S], each row's time, height and width positions, instead)
    q.i, k.i, v.i, cache.i.k/v, masks     -> CACHE -> attn.i, present.i.k/v (cache updated in place)
    hidden.i, attn.i                      -> POST  -> hidden.{i+1}
    hidden.L [, logits_index [R]]         -> HEAD  -> logits [1, R, V]  (R rows of the group, any of them;
                                                                     the single unit's one row)
    lora.layerNNN.<site>.a / .b, lora.scale  (LORA_BRANCH units: the adapter's factors, fed at run time)
S is language_group_size for group units and 1 for single units; KV is the unit's cache bucket.
The KV cache is position-major [1, KV, kv_heads * head_dim] so that the first KV positions of a
longer buffer are one contiguous block the runtime can bind as a bucket-sized view. No node bakes
S into a shape, so a target may run a group graph at any S (see targets/cpu, filter sharing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ..config.model_config import ModelConfig
from .builder import BOOL, FLOAT, INT64, GraphBuilder
from .rope import rope_tables, section_selector
from .units import Unit
from .vision import emitters as vision_emitters

# Changes when the segments' interface changes, so --resume does not reuse segments of the old one
# (2: every group HEAD returns the rows logits_index names; EMBED takes embedding rows;
# 3: LoRA branch inputs; 4: MASK takes attend_until).
SEGMENT_FORMAT = 4

# (role, layer or None) -> float32 tensor in the source's (Hugging Face) layout
WeightFn = Callable[[str, "int | None"], np.ndarray]


@dataclass(frozen=True)
class Shapes:
    group_size: int
    max_positions: int
    lora_rank: int = 0  # > 0: the unit's matmuls get LoRA branches of this rank per part (LORA_BRANCH)

    def seq(self, unit: Unit) -> int:
        return self.group_size if unit.is_group else 1


def emit(unit: Unit, cfg: ModelConfig, weights: WeightFn, shapes: Shapes, spill=None) -> onnx.ModelProto:
    """spill: a graph.io.Spill for the weights, so a unit's weights are not held in memory twice."""
    emitter = {"EMBED": _embed, "MASK": _mask, "PRE": _pre, "CACHE": _cache, "POST": _post, "HEAD": _head,
               **vision_emitters()}[unit.part]
    g = GraphBuilder(unit.name.replace("/", "_"), prefix=unit.name.replace("/", "."), weight_scope=unit.weight_scope,
                     spill=spill)
    emitter(g, unit, cfg, weights, shapes)
    return g.model()


def _rms_norm(g: GraphBuilder, x: str, cfg: ModelConfig, role: str, layer, weights: WeightFn) -> str:
    w = weights(role, layer).astype(np.float32) + np.float32(cfg.norm_weight_offset)
    return g.op("RMSNormalization", [x, g.weight(role, w)], axis=-1, epsilon=cfg.rms_norm_eps)


def _linear(g: GraphBuilder, x: str, role: str, layer, weights: WeightFn, shapes: Shapes | None = None,
            cfg: ModelConfig | None = None) -> str:
    # MatMul with a [K, N] constant: the layout quantization rewrites into DequantizeLinear(axis=0).
    # The transposed view is written out in row blocks, not copied whole (graph/io.py Spill).
    w = weights(role, layer)
    y = g.op("MatMul", [x, g.weight(role, w.T)])
    return _branch(g, x, y, cfg, role, layer, w.shape[1], w.shape[0], shapes)


# LoRA (LORA_BRANCH units): every matmul of the unit gets y += scale * (x A) B with A [K, C] and
# B [C, N] graph inputs (the adapter's factors, scale alpha / r folded into B), so the base
# weights stay constants shared by every adapter and an adapter switch only rebinds inputs. A
# fused matmul's branch is its parts' branches side by side: A's columns part after part, B
# block-diagonal. C = rank x parts; a smaller adapter is zero-padded (quant/adapters.py).
BRANCH_SITES = {"PRE": ("qkv_proj",), "POST": ("o_proj", "gate_up_proj", "down_proj")}
LORA_SCALE = "lora.scale"  # [1]: the user's scale (0: the base model's logits, bit for bit)


def branch_input(layer: int, site: str, factor: str) -> str:
    return f"lora.layer{layer:03d}.{site}.{factor}"


def branch_parts(cfg: ModelConfig, site: str) -> list[str]:
    """The modules an adapter changes in one branch site, in the order of the matmul's columns."""
    return list(FUSED[site][0]) if site in FUSED and not cfg.has(site) else [site]


def part_widths(cfg: ModelConfig, site: str) -> list[int]:
    """The output columns of each of branch_parts(cfg, site)."""
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    widths = {"q_proj": q, "k_proj": kv, "v_proj": kv, "qkv_proj": q + 2 * kv, "o_proj": cfg.hidden_size,
              "gate_proj": f, "up_proj": f, "gate_up_proj": 2 * f, "down_proj": cfg.hidden_size}
    return [widths[part] for part in branch_parts(cfg, site)]


def _branch(g: GraphBuilder, x: str, y: str, cfg: ModelConfig, site: str, layer, k: int, n: int,
            shapes: Shapes | None) -> str:
    if shapes is None or not shapes.lora_rank:
        return y
    columns = shapes.lora_rank * len(branch_parts(cfg, site))
    a = g.input(branch_input(layer, site, "a"), FLOAT, [k, columns])
    b = g.input(branch_input(layer, site, "b"), FLOAT, [columns, n])
    t = g.op("Mul", [g.op("MatMul", [x, a]), g.input(LORA_SCALE, FLOAT, [1])])
    return g.op("Add", [y, g.op("MatMul", [t, b])])


# Projections reading the same input run as one matmul over their concatenated outputs, then a
# Split: half the matmul calls per decode step (each has a fixed cost), and one pass over the input.
# Names: fused role -> (parts in output order, bias roles or None). A family whose checkpoint
# stores the fused tensor itself (Phi-3) maps the fused role directly.
FUSED = {
    "qkv_proj": (("q_proj", "k_proj", "v_proj"), ("q_bias", "k_bias", "v_bias")),
    "gate_up_proj": (("gate_proj", "up_proj"), None),
}


def _fused_linear(g: GraphBuilder, x: str, cfg: ModelConfig, fused: str, layer, weights: WeightFn, sizes: list[int],
                  shapes: Shapes | None = None) -> list[str]:
    parts, bias_roles = FUSED[fused]
    if cfg.has(fused):
        w = weights(fused, layer)
    else:
        w = np.concatenate([weights(p, layer) for p in parts], axis=0)
    y = g.op("MatMul", [x, g.weight(fused, w.T)])
    y = _branch(g, x, y, cfg, fused, layer, w.shape[1], w.shape[0], shapes)
    if bias_roles and cfg.attention_bias:
        bias = np.concatenate([weights(b, layer) for b in bias_roles])
        y = g.op("Add", [y, g.weight(fused.replace("_proj", "_bias"), bias)])
    return g.op("Split", [y, g.shape_const(sizes)], axis=-1, n_out=len(sizes))


def _embed(g, unit, cfg, weights, shapes):
    s = shapes.seq(unit)
    ids = g.input("input_ids", INT64, [1, s])
    h = g.op("Gather", [g.weight("embed", weights("embed", None)), ids], axis=0)
    if cfg.embedding_scale is not None:
        h = g.op("Mul", [h, g.const(f"{g.prefix}.scale", np.array(cfg.embedding_scale, np.float32))])
    # A row is a token id or, where the id is negative, the caller's embedding vector: the hidden
    # state entering layer 0, as transformers' inputs_embeds (Gather reads a negative id from the
    # table's end; Where then drops that row).
    given = g.input("embeddings", FLOAT, [1, s, cfg.hidden_size])
    negative = g.op("Less", [ids, g.const("const.zero", np.array(0, np.int64))])
    h = g.op("Where", [g.op("Unsqueeze", [negative, g.shape_const([-1])]), given, h])
    g.output(h, "hidden.0", FLOAT, [1, s, cfg.hidden_size])


def _mask(g, unit, cfg, weights, shapes):
    """Which cache positions each query may see: causal, and windowed for sliding layers."""
    s, kv = shapes.seq(unit), unit.bucket
    pos = g.input("position_ids", INT64, [1, s])
    cache = g.input("cache.0.k", FLOAT, [1, kv, cfg.num_kv_heads * cfg.head_dim])
    # kv length read from the cache input, not baked in: targets that run one shape-generic
    # program (see targets/cpu) reuse this graph for every bucket.
    kv_len = g.op("Gather", [g.op("Shape", [cache]), g.const("const.one", np.array(1, np.int64))], axis=0)
    keys = g.op("Range", [g.const("const.zero", np.array(0, np.int64)), kv_len, g.const("const.one", np.array(1, np.int64))])
    # Each row sees the keys before its attend_until: position + 1 (causal), or, for the rows of one
    # image in a model whose image rows see each other (Gemma 3), the end of that image's rows.
    until = g.op("Reshape", [g.input("attend_until", INT64, [1, s]), g.shape_const([-1, 1])])
    causal = g.op("Less", [keys, until])  # [S, KV]
    g.output(causal, "mask.full", BOOL, [s, kv])
    if "sliding" in cfg.layer_types:
        queries = g.op("Reshape", [pos, g.shape_const([-1, 1])])
        window = g.const(f"{g.prefix}.window", np.array(cfg.sliding_window, np.int64))
        recent = g.op("Greater", [keys, g.op("Sub", [queries, window])])
        g.output(g.op("And", [causal, recent]), "mask.sliding", BOOL, [s, kv])
    g.output(g.op("Slice", [g.op("Reshape", [pos, g.shape_const([-1])]), g.shape_const([0]), g.shape_const([1])]),
             "write_index", INT64, [1])


def _pre(g, unit, cfg, weights, shapes):
    i, s = unit.index, shapes.seq(unit)
    hidden = g.input(f"hidden.{i}", FLOAT, [1, s, cfg.hidden_size])
    x = _rms_norm(g, hidden, cfg, "attn_norm", i, weights)
    qw, kvw = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = _fused_linear(g, x, cfg, "qkv_proj", i, weights, [qw, kvw, kvw], shapes)
    if cfg.qk_norm:
        q = _per_head_norm(g, q, cfg, "q_norm", i, cfg.num_heads, s, weights)
        k = _per_head_norm(g, k, cfg, "k_norm", i, cfg.num_kv_heads, s, weights)
    kind = cfg.layer_types[i]
    rope = cfg.ropes[kind]
    cos, sin = rope_tables(rope, shapes.max_positions)
    cos_name, sin_name = g.const(f"rope.{kind}.cos", cos), g.const(f"rope.{kind}.sin", sin)
    partial = rope.rotary_dim if rope.rotary_dim != cfg.head_dim else 0
    if rope.sections:  # M-RoPE: each row's table row from its three positions, one per section of frequencies
        positions = g.input("rope_positions", INT64, [3, s])
        select = g.const(f"rope.{kind}.sections", section_selector(rope.sections))
        cos_name, sin_name = (g.op("ReduceSum", [g.op("Mul", [g.op("Gather", [table, positions], axis=0), select]),
                                                 g.shape_const([0])], keepdims=1) for table in (cos_name, sin_name))
        tables = [cos_name, sin_name]  # [1, S, rotary_dim / 2]: per row, no position ids
    else:
        tables = [cos_name, sin_name, g.input("position_ids", INT64, [1, s])]
    q = g.op("RotaryEmbedding", [q, *tables], num_heads=cfg.num_heads, rotary_embedding_dim=partial)
    k = g.op("RotaryEmbedding", [k, *tables], num_heads=cfg.num_kv_heads, rotary_embedding_dim=partial)
    g.output(q, f"q.{i}", FLOAT, [1, s, cfg.num_heads * cfg.head_dim])
    g.output(k, f"k.{i}", FLOAT, [1, s, cfg.num_kv_heads * cfg.head_dim])
    g.output(v, f"v.{i}", FLOAT, [1, s, cfg.num_kv_heads * cfg.head_dim])


def _per_head_norm(g, x, cfg, role, i, heads, s, weights):
    x = g.op("Reshape", [x, g.shape_const([1, -1, heads, cfg.head_dim])])
    x = _rms_norm(g, x, cfg, role, i, weights)
    return g.op("Reshape", [x, g.shape_const([1, -1, heads * cfg.head_dim])])


def _cache(g, unit, cfg, weights, shapes):
    i, s, kv = unit.index, shapes.seq(unit), unit.bucket
    qw, kvw = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q = g.input(f"q.{i}", FLOAT, [1, s, qw])
    k = g.input(f"k.{i}", FLOAT, [1, s, kvw])
    v = g.input(f"v.{i}", FLOAT, [1, s, kvw])
    k_cache = g.input(f"cache.{i}.k", FLOAT, [1, kv, kvw])
    v_cache = g.input(f"cache.{i}.v", FLOAT, [1, kv, kvw])
    mask = g.input(f"mask.{cfg.layer_types[i]}", BOOL, [s, kv])
    where = g.input("write_index", INT64, [1])
    # TensorScatter writes the new rows at write_index; bound to the same buffer by the runtime,
    # ONNX Runtime updates the cache in place instead of copying it every step.
    k_all = g.op("TensorScatter", [k_cache, k, where], name=f"present.{i}.k", axis=1)
    v_all = g.op("TensorScatter", [v_cache, v, where], name=f"present.{i}.v", axis=1)
    attrs = {"q_num_heads": cfg.num_heads, "kv_num_heads": cfg.num_kv_heads, "scale": cfg.attention_scale}
    if cfg.attn_logit_softcap:
        attrs["softcap"] = float(cfg.attn_logit_softcap)
    out = g.op("Attention", [q, k_all, v_all, mask], **attrs)
    g.output(out, f"attn.{i}", FLOAT, [1, s, qw])
    g.outputs.append(onnx.helper.make_tensor_value_info(f"present.{i}.k", FLOAT, [1, kv, kvw]))
    g.outputs.append(onnx.helper.make_tensor_value_info(f"present.{i}.v", FLOAT, [1, kv, kvw]))


def _post(g, unit, cfg, weights, shapes):
    i, s = unit.index, shapes.seq(unit)
    hidden = g.input(f"hidden.{i}", FLOAT, [1, s, cfg.hidden_size])
    attn = g.input(f"attn.{i}", FLOAT, [1, s, cfg.num_heads * cfg.head_dim])
    o = _linear(g, attn, "o_proj", i, weights, shapes, cfg)
    if cfg.has("attn_out_norm"):
        o = _rms_norm(g, o, cfg, "attn_out_norm", i, weights)
    h = g.op("Add", [hidden, o])
    x = _rms_norm(g, h, cfg, "mlp_norm", i, weights)
    gate, up = _fused_linear(g, x, cfg, "gate_up_proj", i, weights, [cfg.intermediate_size] * 2, shapes)
    if cfg.activation == "silu":
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    else:
        act = g.op("Gelu", [gate], approximate="tanh")
    y = _linear(g, g.op("Mul", [act, up]), "down_proj", i, weights, shapes, cfg)
    if cfg.has("mlp_out_norm"):
        y = _rms_norm(g, y, cfg, "mlp_out_norm", i, weights)
    g.output(g.op("Add", [h, y]), f"hidden.{i + 1}", FLOAT, [1, s, cfg.hidden_size])


def _head(g, unit, cfg, weights, shapes):
    s = shapes.seq(unit)
    h = g.input(f"hidden.{cfg.num_layers}", FLOAT, [1, s, cfg.hidden_size])
    rows = 1
    if s > 1:  # the rows whose logits the caller wants (the last prompt token's, a draft's, all)
        rows = "logit_rows"
        h = g.op("Gather", [h, g.input("logits_index", INT64, [rows])], axis=1)
    x = _rms_norm(g, h, cfg, "final_norm", None, weights)
    logits = _linear(g, x, "lm_head", None, weights)
    if cfg.final_logit_softcap:
        cap = g.const(f"{g.prefix}.softcap", np.array(cfg.final_logit_softcap, np.float32))
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
    g.output(logits, "logits", FLOAT, [1, rows, cfg.vocab_size])
