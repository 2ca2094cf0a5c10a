"""Llama family: SmolLM2, Llama 2 (MHA), Llama 3.x (GQA, llama3 rope scaling, tied embeddings)."""

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
ACTIVATIONS = {"silu": "silu", "swish": "silu"}


def build(raw: dict, where: str) -> ModelConfig:
    hidden = require(raw, "hidden_size", where)
    heads = require(raw, "num_attention_heads", where)
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    layers = require(raw, "num_hidden_layers", where)
    act = raw.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise EdgeLLMError(f"{where}: hidden_act '{act}' is not supported for llama (supported: silu)")
    if heads % kv_heads:
        raise EdgeLLMError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    tied = bool(raw.get("tie_word_embeddings", False))
    bias = bool(raw.get("attention_bias", False))
    rope = rope_parameters(raw)
    return ModelConfig(
        family="llama",
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
        layer_types=["full"] * layers,
        ropes={"full": RopeConfig(theta=float(rope.pop("rope_theta")), rotary_dim=head_dim, scaling=rope)},
        attention_scale=head_dim ** -0.5,
        attention_bias=bias,
        layer_tensors={**TENSORS, **(BIASES if bias else {})},
        global_tensors={
            "embed": "model.embed_tokens.weight",
            "final_norm": "model.norm.weight",
            "lm_head": "model.embed_tokens.weight" if tied else "lm_head.weight",
        },
    )
