"""LLaVA-1.5 (llava-hf layout): a CLIP vision tower, a two-layer MLP projector, and a text model
of any supported family. The processor expands each `<image>` placeholder to image_seq_length
tokens (576 at 336 px); their embedding rows become the projected patch features."""

from __future__ import annotations

from ..errors import EdgeLLMError
from .fields import integer, require, text
from .model_config import ModelConfig
from .vision import ACTIVATIONS, VisionConfig, clip_encoder, image_processing

# Where the parts' tensors live, in the layouts checkpoints are published in (the hub's
# llava-hf files, and what transformers 5 writes).
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def build(raw: dict, where: str, names: set[str], processor: dict | None) -> ModelConfig:
    cfg, vision_raw = build_text(raw, where, names, TEXT_PREFIXES, HEAD_NAMES, default_text="llama")
    vision_type = vision_raw.get("model_type", "clip_vision_model")
    if vision_type != "clip_vision_model":
        raise EdgeLLMError(f"{where}: vision encoder '{vision_type}' is not supported for llava (supported: clip_vision_model)")
    feature_layer = raw.get("vision_feature_layer", -2)
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise EdgeLLMError(f"{where}: vision_feature_layer {feature_layer!r}: only one layer's features are supported")
    strategy = text(raw, "vision_feature_select_strategy", where, "default")
    if strategy not in ("default", "full"):
        raise EdgeLLMError(f"{where}: vision_feature_select_strategy '{strategy}' is not supported (default, full)")
    act = text(raw, "projector_hidden_act", where, "gelu")
    if act not in ACTIVATIONS:
        raise EdgeLLMError(f"{where}: projector_hidden_act '{act}' is not supported")
    cfg.family = "llava"

    vision_prefix = find_prefix(VISION_PREFIXES, "embeddings.patch_embedding.weight", names, where, "the vision tower")
    projector = find_prefix(PROJECTOR_PREFIXES, "linear_1.weight", names, where, "the projector")
    fields = clip_encoder(vision_raw, where, vision_prefix, feature_layer)
    fields["tensors"].update(proj1=projector + "linear_1.weight", proj1_bias=projector + "linear_1.bias",
                             proj2=projector + "linear_2.weight", proj2_bias=projector + "linear_2.bias")
    tokens = fields["image_size"] // fields["patch_size"]
    tokens = tokens * tokens + (strategy == "full")
    seq_length = integer(raw, "image_seq_length", where, tokens)
    if seq_length != tokens:
        raise EdgeLLMError(f"{where}: image_seq_length {seq_length} contradicts the encoder's {tokens} patches")
    cfg.vision = VisionConfig(
        **fields, drop_class_token=strategy == "default", projector="mlp", projector_activation=ACTIVATIONS[act],
        image_token_id=require(raw, "image_token_index" if "image_token_index" in raw else "image_token_id", where, low=0),
        image_tokens=tokens, processing=image_processing(processor, fields["image_size"], where))
    return cfg


def build_text(raw: dict, where: str, names: set[str], text_prefixes, head_names, default_text: str):
    """The text part of a vision-language config (text_config, built by its family's adapter) with
    its tensors renamed to where the checkpoint keeps them; and the raw vision_config."""
    from . import ADAPTERS

    text_raw, vision_raw = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
        raise EdgeLLMError(f"{where}: a {raw.get('model_type')} config needs text_config and vision_config objects")
    model_type = text(text_raw, "model_type", f"{where} (text_config)", default_text)
    if model_type not in ADAPTERS:
        raise EdgeLLMError(f"{where}: text_config model_type '{model_type}' is not supported")
    cfg = ADAPTERS[model_type](text_raw, f"{where} (text_config)")
    text_prefix = find_prefix(text_prefixes, "embed_tokens.weight", names, where, "the language model's embedding table")
    rename = {name: text_prefix + name.removeprefix("model.") for name in cfg.layer_tensors.values()}
    cfg.layer_tensors = {role: rename[name] for role, name in cfg.layer_tensors.items()}
    head = next((n for n in head_names if n in names), None) if not cfg.tie_word_embeddings else None
    cfg.global_tensors = {role: (head if role == "lm_head" and head else text_prefix + name.removeprefix("model."))
                          for role, name in cfg.global_tensors.items()}
    return cfg, vision_raw


def find_prefix(candidates, suffix: str, names: set[str], where: str, what: str) -> str:
    found = next((p for p in candidates if p + suffix in names), None)
    if found is None:
        raise EdgeLLMError(f"{where}: no tensors of {what} (looked for {candidates[0]}{suffix} and similar)")
    return found
