"""Qwen2-VL and Qwen2.5-VL (model types qwen2_vl, qwen2_5_vl): a ViT over patches of any image
size with 2D rotary positions (no position table), whose rows, 2 x 2 patches at a time, pass a
norm and a two-layer MLP (the "merger"); and a Qwen2 text model with M-RoPE: each prompt row has
three positions (time, height, width), and the rotary frequencies are split in sections, one per
position. Text rows have the same three; an image's rows count along its grid
(runtime/engine.py rope_positions). Qwen2.5-VL's encoder has RMSNorms, gated MLPs and, in all
but its fullatt_block_indexes layers, attention within windows of window_size pixels.

The encoder takes any size in multiples of patch x merge pixels. A build fixes it
(--input_height / --input_width, default DEFAULT_SIZE square), so every picture is resized to it;
the Hugging Face processor instead keeps each picture's aspect ratio."""

from __future__ import annotations

from ..errors import EdgeLLMError
from .fields import COUNTS, integer, number, require, section, text
from .llava import build_text, find_prefix
from .model_config import ModelConfig
from .vision import ACTIVATIONS, PIXELS, VisionConfig, any_size_processing, with_input_size

DEFAULT_SIZE = 448  # pixels a side: 1024 patches, 256 prompt rows
TEXT_PREFIXES = ("model.language_model.", "model.")
HEAD_NAMES = ("lm_head.weight", "model.lm_head.weight")
VISION_PREFIXES = ("model.visual.", "visual.")

GATED_TENSORS = {  # Qwen2.5-VL's MLP: down_proj(act(gate_proj(x)) * up_proj(x)), biases included
    "gate_proj": "blocks.{i}.mlp.gate_proj.weight", "gate_bias": "blocks.{i}.mlp.gate_proj.bias",
    "up_proj": "blocks.{i}.mlp.up_proj.weight", "up_bias": "blocks.{i}.mlp.up_proj.bias",
    "fc2": "blocks.{i}.mlp.down_proj.weight", "fc2_bias": "blocks.{i}.mlp.down_proj.bias",
}
BLOCK_TENSORS = {  # per encoder block, after the tower's prefix
    "ln1_w": "blocks.{i}.norm1.weight", "ln1_b": "blocks.{i}.norm1.bias",
    "qkv_proj": "blocks.{i}.attn.qkv.weight", "qkv_bias": "blocks.{i}.attn.qkv.bias",
    "o_proj": "blocks.{i}.attn.proj.weight", "o_bias": "blocks.{i}.attn.proj.bias",
    "ln2_w": "blocks.{i}.norm2.weight", "ln2_b": "blocks.{i}.norm2.bias",
    "fc1": "blocks.{i}.mlp.fc1.weight", "fc1_bias": "blocks.{i}.mlp.fc1.bias",
    "fc2": "blocks.{i}.mlp.fc2.weight", "fc2_bias": "blocks.{i}.mlp.fc2.bias",
    "patch_embed": "patch_embed.proj.weight",
    "post_norm_w": "merger.ln_q.weight", "post_norm_b": "merger.ln_q.bias",
    "proj1": "merger.mlp.0.weight", "proj1_bias": "merger.mlp.0.bias",
    "proj2": "merger.mlp.2.weight", "proj2_bias": "merger.mlp.2.bias",
}


def build(raw: dict, where: str, names: set[str], processor: dict | None) -> ModelConfig:
    # Hub configs (transformers 4) keep the text model's fields at the top level; transformers 5
    # writes text_config. Either way the text model is a Qwen2 whose rope carries mrope_section.
    text_raw = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {
        k: v for k, v in raw.items() if k not in ("vision_config", "model_type", "architectures")}
    text_raw = {**text_raw, "model_type": "qwen2", **_plain_rope(text_raw, where)}
    if "tie_word_embeddings" not in text_raw and "tie_word_embeddings" in raw:  # (transformers 5 writes it here only)
        text_raw["tie_word_embeddings"] = raw["tie_word_embeddings"]
    sections = text_raw.pop("mrope_section")
    cfg, vision_raw = build_text({**raw, "text_config": text_raw}, where, names, TEXT_PREFIXES, HEAD_NAMES,
                                 default_text="qwen2")
    for rope in cfg.ropes.values():
        rope.scaling["mrope_section"] = sections
    family = raw["model_type"]
    vision_type = vision_raw.get("model_type", f"{family}_vision")
    if vision_type not in (f"{family}_vision", family):  # (early hub files wrote the model's type)
        raise EdgeLLMError(f"{where}: vision encoder '{vision_type}' is not supported for {family}")
    encoder = _encoder(vision_raw, where, names, cfg.hidden_size) if family == "qwen2_vl" else \
        _windowed_encoder(vision_raw, where, names, cfg.hidden_size)
    cfg.vision = VisionConfig(**encoder,
                              image_token_id=require(raw, "image_token_id", where, low=0),
                              processing=any_size_processing(processor, where), prompt="qwen2_vl")
    cfg.vision = with_input_size(cfg.vision, DEFAULT_SIZE, DEFAULT_SIZE, where)
    cfg.family = family
    return cfg


def _plain_rope(text_raw: dict, where: str) -> dict:
    """The text config's rope as a plain rope (HF calls M-RoPE's type "mrope", transformers 5
    "default") plus its mrope_section, which must split the rotary frequencies in three."""
    for key in ("rope_parameters", "rope_scaling"):
        params = section(text_raw, key, where)
        if params:
            break
    else:
        raise EdgeLLMError(f"{where}: a qwen2_vl text model needs rope_scaling (or rope_parameters) with mrope_section")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("mrope", "default"):
        raise EdgeLLMError(f"{where}: rope type {kind!r} with M-RoPE is not supported (mrope or default)")
    sections = params.get("mrope_section")
    if not (isinstance(sections, list) and len(sections) == 3
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sections)):
        raise EdgeLLMError(f"{where}: mrope_section must be 3 whole numbers (time, height, width), got {sections!r}")
    plain = {k: v for k, v in params.items() if k not in ("type", "rope_type", "mrope_section")}
    return {key: {**plain, "rope_type": "default"}, "mrope_section": sections}


def _encoder(raw: dict, where: str, names: set[str], text_hidden: int, width_key: str = "embed_dim",
             output_key: str = "hidden_size") -> dict:
    """Qwen2-VL's tower (the ViT's width is embed_dim, the merger's output hidden_size)."""
    where = f"{where} (vision_config)"
    prefix = find_prefix(VISION_PREFIXES, "patch_embed.proj.weight", names, where, "the vision tower")
    width, heads = require(raw, width_key, where), require(raw, "num_heads", where, high=COUNTS)
    if width % heads or (width // heads) % 4:
        raise EdgeLLMError(f"{where}: embed_dim {width} over num_heads {heads} must be a multiple of 4 (a 2D rotary "
                           "embedding splits each head's dimensions in four)")
    out = integer(raw, output_key, where, text_hidden)
    if out != text_hidden:
        raise EdgeLLMError(f"{where}: {output_key} {out} (the merger's output) differs from the text model's {text_hidden}")
    act = text(raw, "hidden_act", where, "quick_gelu" if width_key == "embed_dim" else "silu")
    if act not in ACTIVATIONS:
        raise EdgeLLMError(f"{where}: hidden_act '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    patch = require(raw, "patch_size", where, high=PIXELS)
    merge = integer(raw, "spatial_merge_size", where, 2, low=1, high=16)
    theta = number(section(raw, "rope_parameters", where), "rope_theta", where, 10000.0)
    tensors = {role: prefix + name for role, name in BLOCK_TENSORS.items()}
    if prefix + "blocks.0.attn.qkv.weight" not in names and prefix + "blocks.0.attn.q.weight" in names:
        # llama.cpp's mmproj (sources/mmproj.py) splits the fused qkv in three
        for role in ("qkv_proj", "qkv_bias"):
            tensors.pop(role)
        tensors.update({f"{part}_{kind}": f"{prefix}blocks.{{i}}.attn.{part}.{'weight' if kind == 'proj' else 'bias'}"
                        for part in "qkv" for kind in ("proj", "bias")})
    return dict(encoder="qwen2_vl", image_size=0, patch_size=patch, num_channels=integer(raw, "in_channels", where, 3),
                hidden_size=width, intermediate_size=width * integer(raw, "mlp_ratio", where, 4, low=1),
                num_layers=require(raw, "depth", where, high=COUNTS), num_heads=heads, layer_norm_eps=1e-6,
                activation=ACTIVATIONS[act], class_token=False, pre_norm=False, post_norm=True,
                drop_class_token=False, projector="merger", projector_activation="gelu", shuffle=merge,
                temporal_patch=integer(raw, "temporal_patch_size", where, 2, low=1, high=16), rotary_theta=theta,
                image_tokens=0, tensors=tensors)


def _windowed_encoder(raw: dict, where: str, names: set[str], text_hidden: int) -> dict:
    """Qwen2.5-VL's tower: the ViT's width is hidden_size, the merger's output out_hidden_size;
    RMSNorms, a gated MLP of intermediate_size, and windows in the layers not listed in
    fullatt_block_indexes."""
    fields = _encoder(raw, where, names, text_hidden, width_key="hidden_size", output_key="out_hidden_size")
    where = f"{where} (vision_config)"
    step = fields["patch_size"] * fields["shuffle"]
    window = integer(raw, "window_size", where, 112, low=1, high=PIXELS)
    if window % step:
        raise EdgeLLMError(f"{where}: window_size {window} is not a whole number of merged patches ({step} px)")
    full = raw.get("fullatt_block_indexes", [7, 15, 23, 31])
    if not (isinstance(full, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < fields["num_layers"]
                                           for i in full)):
        raise EdgeLLMError(f"{where}: fullatt_block_indexes must list encoder layers (0 to {fields['num_layers'] - 1}), "
                           f"got {full!r}")
    prefix = fields["tensors"]["patch_embed"].removesuffix(BLOCK_TENSORS["patch_embed"])
    for role in ("ln1_b", "ln2_b", "post_norm_b", "fc1", "fc1_bias"):
        fields["tensors"].pop(role)
    fields["tensors"].update({role: prefix + name for role, name in GATED_TENSORS.items()})
    fields.update(intermediate_size=require(raw, "intermediate_size", where), norm="rms", window=window // step,
                  full_layers=sorted(set(full)))
    return fields
