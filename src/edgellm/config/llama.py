"""Llama family: SmolLM2, Llama 2 (MHA), Llama 3.x (GQA, llama3 rope scaling, tied embeddings).

`llama_like` also builds the families that differ from llama only in a few switches (qwen2, qwen3,
mistral): q/k/v biases, q/k RMSNorm per head, sliding-window layers.
"""

from __future__ import annotations

from ..errors import EdgeLLMError
from .fields import require, rope_parameters
from .model_config import ModelConfig, RopeConfig

LAYER = "model.layers.{i}."
TENSORS = {
    "attn_norm": LAYER + "input_layernorm.weight",
    "q_proj": LAYER + "self_attn.q_proj.weight",
    "k_proj": LAYER + "self_attn.k_proj.weight",
    "v_proj": LAYER + "self_attn.v_proj.weight",
    "o_proj": LAYER + "self_attn.o_proj.weight",
    "mlp_norm": LAYER + "post_attention_layernorm.weight",
    "gate_proj": LAYER + "mlp.gate_proj.weight",
    "up_proj": LAYER + "mlp.up_proj.weight",
    "down_proj": LAYER + "mlp.down_proj.weight",
}
BIASES = {
    "q_bias": LAYER + "self_attn.q_proj.bias",
    "k_bias": LAYER + "self_attn.k_proj.bias",
    "v_bias": LAYER + "self_attn.v_proj.bias",
}
QK_NORMS = {"q_norm": LAYER + "self_attn.q_norm.weight", "k_norm": LAYER + "self_attn.k_norm.weight"}
LAYER_KINDS = {"full_attention": "full", "sliding_attention": "sliding"}
ACTIVATIONS = {"silu": "silu", "swish": "silu"}


def build(raw: dict, where: str) -> ModelConfig:
    return llama_like(raw, where, "llama", bias=bool(raw.get("attention_bias", False)))


def llama_like(raw: dict, where: str, family: str, bias: bool = False, qk_norm: bool = False,
               layer_types: list[str] | None = None, tensors: dict[str, str] | None = None) -> ModelConfig:
    """layer_types: HF names ("full_attention" / "sliding_attention") per layer; default all full.
    tensors: the per-layer tensor names when they are not llama's (e.g. Phi-3's fused ones)."""
    hidden = require(raw, "hidden_size", where)
    heads = require(raw, "num_attention_heads", where)
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    layers = require(raw, "num_hidden_layers", where)
    act = raw.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise EdgeLLMError(f"{where}: hidden_act '{act}' is not supported for {family} (supported: silu)")
    if heads % kv_heads:
        raise EdgeLLMError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    tied = bool(raw.get("tie_word_embeddings", False))
    rope = rope_parameters(raw)
    theta = float(rope.pop("rope_theta"))
    partial = float(rope.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type") in ("longrope", "su"):
        rope["rope_type"] = "longrope"
        rope.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
        rope.setdefault("max_position_embeddings", raw.get("max_position_embeddings"))
    kinds = [LAYER_KINDS.get(t) for t in (layer_types or ["full_attention"] * layers)]
    if len(kinds) != layers or None in kinds:
        raise EdgeLLMError(f"{where}: layer_types must list {layers} of {sorted(LAYER_KINDS)}, got {layer_types}")
    window = raw.get("sliding_window")
    if "sliding" in kinds and not window:
        raise EdgeLLMError(f"{where}: sliding-window layers need a 'sliding_window' size")
    tensors = {**(tensors or TENSORS), **(BIASES if bias else {}), **(QK_NORMS if qk_norm else {})}
    return ModelConfig(
        family=family,
        vocab_size=require(raw, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=require(raw, "intermediate_size", where),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        activation=ACTIVATIONS[act],
        tie_word_embeddings=tied,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        layer_types=kinds,
        # one rope for every layer, named per kind because the emitter looks it up by kind
        ropes={kind: RopeConfig(theta=theta, rotary_dim=int(head_dim * partial), scaling=dict(rope)) for kind in set(kinds)},
        attention_scale=head_dim ** -0.5,
        sliding_window=int(window) if "sliding" in kinds else None,
        qk_norm=qk_norm,
        attention_bias=bias,
        layer_tensors=tensors,
        global_tensors={
            "embed": "model.embed_tokens.weight",
            "final_norm": "model.norm.weight",
            "lm_head": "model.embed_tokens.weight" if tied else "lm_head.weight",
        },
    )
