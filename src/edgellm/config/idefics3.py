"""Idefics3 and SmolVLM (model types idefics3, smolvlm): a SigLIP-style vision tower over tiles of
the image, a pixel-shuffle connector (scale_factor^2 neighbouring patches per row) with one linear
projection, and a llama text model (SmolLM2 for SmolVLM). The processor cuts an image into tiles
plus a global view and marks each in the prompt (runtime/images.py image_prompt)."""

from __future__ import annotations

from ..errors import EdgeLLMError
from .fields import require
from .llava import build_text, find_prefix
from .model_config import ModelConfig
from .vision import VisionConfig, siglip_encoder, tiled_processing

TEXT_PREFIXES = ("model.text_model.", "text_model.model.", "model.")
HEAD_NAMES = ("lm_head.weight", "text_model.lm_head.weight")
VISION_PREFIXES = ("model.vision_model.", "vision_model.")
CONNECTOR_PREFIXES = ("model.connector.", "connector.")


def build(raw: dict, where: str, names: set[str], processor: dict | None) -> ModelConfig:
    cfg, vision_raw = build_text(raw, where, names, TEXT_PREFIXES, HEAD_NAMES, default_text="llama")
    vision_type = vision_raw.get("model_type", "idefics3_vision")
    if vision_type not in ("idefics3_vision", "smolvlm_vision"):
        raise EdgeLLMError(f"{where}: vision encoder '{vision_type}' is not supported for {raw['model_type']}")
    scale = require(raw, "scale_factor", where)
    fields = siglip_encoder(vision_raw, where, find_prefix(VISION_PREFIXES, "embeddings.patch_embedding.weight", names,
                                                           where, "the vision tower"))
    side = fields["image_size"] // fields["patch_size"]
    if side % scale:
        raise EdgeLLMError(f"{where}: scale_factor {scale} does not divide the {side} patches per side")
    connector = find_prefix(CONNECTOR_PREFIXES, "modality_projection.proj.weight", names, where, "the connector")
    fields["tensors"].update(proj1=connector + "modality_projection.proj.weight")
    cfg.vision = VisionConfig(
        **fields, drop_class_token=False, projector="shuffle", projector_activation="none", shuffle=scale,
        image_token_id=require(raw, "image_token_id", where, low=0), image_tokens=side * side // (scale * scale),
        processing=tiled_processing(processor, fields["image_size"], where), prompt="tiles")
    cfg.family = raw["model_type"]
    return cfg
