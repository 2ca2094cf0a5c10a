"""Gemma 3 text models (e.g. Gemma 3 270M), and through `gemma` also Gemma 2.

Differences from llama, all expressed as ModelConfig data: (1 + w) RMSNorm, q/k RMSNorm per head
(Gemma 3), GELU-tanh gated MLP, embeddings scaled by sqrt(hidden_size), sliding-window layers (with
their own rope base in Gemma 3), norms after attention and around the MLP, query scaling by
query_pre_attn_scalar, attention-logit and final-logit soft-capping (Gemma 2).
"""

from __future__ import annotations

from ..errors import EdgeLLMError
from .fields import COUNTS, flag, integer, layer_types, number, require, rope_parameters, section, text
from .model_config import ModelConfig, RopeConfig

LAYER = "model.layers.{i}."
TENSORS = {
    "attn_norm": LAYER + "input_layernorm.weight",
    "q_proj": LAYER + "self_attn.q_proj.weight",
    "k_proj": LAYER + "self_attn.k_proj.weight",
    "v_proj": LAYER + "self_attn.v_proj.weight",
    "o_proj": LAYER + "self_attn.o_proj.weight",
    "attn_out_norm": LAYER + "post_attention_layernorm.weight",
    "mlp_norm": LAYER + "pre_feedforward_layernorm.weight",
    "gate_proj": LAYER + "mlp.gate_proj.weight",
    "up_proj": LAYER + "mlp.up_proj.weight",
    "down_proj": LAYER + "mlp.down_proj.weight",
    "mlp_out_norm": LAYER + "post_feedforward_layernorm.weight",
}
QK_NORMS = {"q_norm": LAYER + "self_attn.q_norm.weight", "k_norm": LAYER + "self_attn.k_norm.weight"}
LAYER_KINDS = {"sliding_attention": "sliding", "full_attention": "full"}


def build(raw: dict, where: str) -> ModelConfig:
    return gemma(raw, where, "gemma3", qk_norm=True, sliding_every=6, local_rope=True)


def gemma(raw: dict, where: str, family: str, qk_norm: bool, sliding_every: int, local_rope: bool = False) -> ModelConfig:
    """sliding_every: without layer_types, every sliding_every-th layer is global, the rest sliding.
    local_rope: sliding layers have their own rope base (Gemma 3)."""
    hidden = require(raw, "hidden_size", where)
    heads = require(raw, "num_attention_heads", where, high=COUNTS)
    kv_heads = integer(raw, "num_key_value_heads", where, heads, high=COUNTS)
    head_dim = integer(raw, "head_dim", where, 256)
    layers = require(raw, "num_hidden_layers", where, high=COUNTS)
    act = text(raw, "hidden_activation", where, None) or text(raw, "hidden_act", where, "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise EdgeLLMError(f"{where}: hidden_activation '{act}' is not supported for {family}")
    kinds = layer_types(raw, where, layers, LAYER_KINDS)
    if kinds is None:
        pattern = (integer(raw, "sliding_window_pattern", where, None, high=COUNTS)
                   or integer(raw, "_sliding_window_pattern", where, sliding_every, high=COUNTS))
        kinds = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    ropes = {}
    for hf_kind, kind in LAYER_KINDS.items():
        rope = rope_parameters(raw, where, hf_kind)
        if local_rope and hf_kind == "sliding_attention" and raw.get("rope_parameters") is None:
            # Older Gemma 3 configs: the sliding layers' base is rope_local_base_freq, unscaled.
            rope = {"rope_type": "default", "rope_theta": number(raw, "rope_local_base_freq", where, 10000.0)}
        ropes[kind] = RopeConfig(theta=rope.pop("rope_theta"), rotary_dim=head_dim, scaling=rope)
    tied = flag(raw, "tie_word_embeddings", where, True)
    qpas = number(raw, "query_pre_attn_scalar", where, head_dim)
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
        activation="gelu_tanh",
        tie_word_embeddings=tied,
        max_position_embeddings=integer(raw, "max_position_embeddings", where, 32768),
        layer_types=[LAYER_KINDS[t] for t in kinds],
        ropes=ropes,
        attention_scale=qpas ** -0.5,
        sliding_window=integer(raw, "sliding_window", where, None),
        norm_weight_offset=1.0,
        embedding_scale=hidden ** 0.5,
        qk_norm=qk_norm,
        attn_logit_softcap=number(raw, "attn_logit_softcapping", where, None),
        final_logit_softcap=number(raw, "final_logit_softcapping", where, None),
        layer_tensors={**TENSORS, **(QK_NORMS if qk_norm else {})},
        global_tensors={
            "embed": "model.embed_tokens.weight",
            "final_norm": "model.norm.weight",
            "lm_head": "model.embed_tokens.weight" if tied else "lm_head.weight",
        },
    )


# Gemma 3 with its vision tower (Gemma3ForConditionalGeneration, 4B and up): SigLIP at 896 px,
# its 64 x 64 patches average-pooled to 16 x 16 = 256 rows, an RMSNorm (1 + w) and one projection
# (a [vision, text] matrix, not a linear layer's [out, in]); each image's rows see each other.
# Its checkpoints use the llava-hf layout's prefixes (config/llava.py).


def build_vision(raw: dict, where: str, names: set[str], processor: dict | None) -> ModelConfig:
    from .llava import HEAD_NAMES, PROJECTOR_PREFIXES, TEXT_PREFIXES, VISION_PREFIXES, build_text, find_prefix
    from .vision import VisionConfig, resized_processing, siglip_encoder

    raw = {**raw, "text_config": {"model_type": "gemma3_text", **section(raw, "text_config", where)}}
    cfg, vision_raw = build_text(raw, where, names, TEXT_PREFIXES, HEAD_NAMES, default_text="gemma3_text")
    vision_type = vision_raw.get("model_type", "siglip_vision_model")
    if vision_type != "siglip_vision_model":
        raise EdgeLLMError(f"{where}: vision encoder '{vision_type}' is not supported for gemma3")
    fields = siglip_encoder(vision_raw, where, find_prefix(VISION_PREFIXES, "embeddings.patch_embedding.weight", names,
                                                           where, "the vision tower"))
    tokens = integer(raw, "mm_tokens_per_image", where, 256)
    side, per_side = fields["image_size"] // fields["patch_size"], int(round(tokens ** 0.5))
    if per_side * per_side != tokens or side % per_side:
        raise EdgeLLMError(f"{where}: mm_tokens_per_image {tokens} does not pool the encoder's {side} x {side} patches")
    projector = find_prefix(PROJECTOR_PREFIXES, "mm_input_projection_weight", names, where, "the projector")
    fields["tensors"].update(proj1=projector + "mm_input_projection_weight",
                             soft_norm=projector + "mm_soft_emb_norm.weight")
    cfg.vision = VisionConfig(
        **fields, drop_class_token=False, projector="gemma3", projector_activation="none", shuffle=side // per_side,
        image_token_id=require(raw, "image_token_index" if "image_token_index" in raw else "image_token_id", where, low=0),
        marker_token_id=require(raw, "boi_token_index" if "boi_token_index" in raw else "boi_token_id", where, low=0),
        image_tokens=tokens, processing=resized_processing(processor, fields["image_size"], where), prompt="gemma3",
        attention="image")
    cfg.family = "gemma3"
    return cfg
