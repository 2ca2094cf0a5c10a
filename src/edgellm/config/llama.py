"""Llama family: SmolLM2, Llama 2 (MHA), Llama 3.x (GQA, llama3 rope scaling, tied embeddings).

`llama_like` also builds the families that differ from llama only in a few switches (qwen2, qwen3,
mistral): q/k/v biases, q/k RMSNorm per head, sliding-window layers.
"""

from __future__ import annotations

from ..errors import EdgeLLMError
from .fields import COUNTS, flag, integer, number, require, rope_parameters, text
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
    return llama_like(raw, where, "llama", bias=flag(raw, "attention_bias", where, False))


def llama_like(raw: dict, where: str, family: str, bias: bool = False, qk_norm: bool = False,
               layer_types: list[str] | None = None, window_everywhere: bool = False,
               tensors: dict[str, str] | None = None, activations: dict[str, str] = ACTIVATIONS) -> ModelConfig:
    """layer_types: HF names ("full_attention" / "sliding_attention") per layer; default all full.
    window_everywhere: every layer slides when the config sets a sliding_window (Mistral, Phi-3).
    tensors: the per-layer tensor names when they are not llama's (e.g. Phi-3's fused ones).
    activations: hidden_act values the family accepts -> the emitter's names."""
    hidden = require(raw, "hidden_size", where)
    heads = require(raw, "num_attention_heads", where, high=COUNTS)
    kv_heads = integer(raw, "num_key_value_heads", where, heads, high=COUNTS)
    if raw.get("head_dim") is None and hidden % heads:
        raise EdgeLLMError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                           "(and no head_dim is given)")
    head_dim = integer(raw, "head_dim", where, hidden // heads)
    layers = require(raw, "num_hidden_layers", where, high=COUNTS)
    act = text(raw, "hidden_act", where, "silu")
    if act not in activations:
        raise EdgeLLMError(f"{where}: hidden_act '{act}' is not supported for {family} (supported: {', '.join(activations)})")
    tied = flag(raw, "tie_word_embeddings", where, False)
    max_positions = integer(raw, "max_position_embeddings", where, 2048)
    rope = rope_parameters(raw, where)
    theta = rope.pop("rope_theta")
    # in rope_parameters (transformers 5) or at the top level (older files)
    partial = (number(rope, "partial_rotary_factor", where, None, high=1.0)
               or number(raw, "partial_rotary_factor", where, 1.0, high=1.0))
    rope.pop("partial_rotary_factor", None)
    if rope.get("rope_type") in ("longrope", "su"):
        rope["rope_type"] = "longrope"
        rope.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
        rope.setdefault("max_position_embeddings", max_positions)
    window = integer(raw, "sliding_window", where, None)
    if window_everywhere:
        layer_types = ["sliding_attention" if window else "full_attention"] * layers
    kinds = [LAYER_KINDS[t] for t in layer_types] if layer_types else ["full"] * layers
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
        rms_norm_eps=number(raw, "rms_norm_eps", where, 1e-6),
        activation=activations[act],
        tie_word_embeddings=tied,
        max_position_embeddings=max_positions,
        layer_types=kinds,
        # one rope for every layer, named per kind because the emitter looks it up by kind
        ropes={kind: RopeConfig(theta=theta, rotary_dim=int(head_dim * partial), scaling=dict(rope)) for kind in set(kinds)},
        attention_scale=head_dim ** -0.5,
        sliding_window=window if "sliding" in kinds else None,
        qk_norm=qk_norm,
        attention_bias=bias,
        layer_tensors=tensors,
        global_tensors={
            "embed": "model.embed_tokens.weight",
            "final_norm": "model.norm.weight",
            "lm_head": "model.embed_tokens.weight" if tied else "lm_head.weight",
        },
    )
