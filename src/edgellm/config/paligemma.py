"""PaliGemma (model type paligemma; PaliGemma 2 too): a SigLIP vision tower whose last layer's
normalized patches pass one linear projection, and a Gemma (PaliGemma 2: Gemma 2) text model.
The processor puts the image tokens first, then <bos>, the prompt and a newline; that whole
prefix attends to itself both ways (a prefix-LM), the answer causally."""

from __future__ import annotations

from ..errors import EdgeLLMError
from .fields import integer, section
from .llava import HEAD_NAMES, PROJECTOR_PREFIXES, TEXT_PREFIXES, VISION_PREFIXES, build_text, find_prefix
from .model_config import ModelConfig
from .vision import VisionConfig, resized_processing, siglip_encoder

# PaliGemma's checkpoints use the llava-hf layout's prefixes (config/llava.py)
BICUBIC = 3  # SigLIP's image processor resamples bicubic unless preprocessor_config.json says otherwise


def build(raw: dict, where: str, names: set[str], processor: dict | None) -> ModelConfig:
    # The hub's configs leave out what PaliGemmaConfig fills in: a 224 px image in 14 px patches.
    raw = {**raw, "text_config": {"model_type": "gemma", **section(raw, "text_config", where)},
           "vision_config": {"image_size": 224, "patch_size": 14, **section(raw, "vision_config", where)}}
    cfg, vision_raw = build_text(raw, where, names, TEXT_PREFIXES, HEAD_NAMES, default_text="gemma")
    if cfg.family not in ("gemma", "gemma2"):
        raise EdgeLLMError(f"{where}: a paligemma text model of family '{cfg.family}' is not supported (gemma, gemma2)")
    vision_type = vision_raw.get("model_type", "siglip_vision_model")
    if vision_type != "siglip_vision_model":
        raise EdgeLLMError(f"{where}: vision encoder '{vision_type}' is not supported for paligemma")
    fields = siglip_encoder(vision_raw, where, find_prefix(VISION_PREFIXES, "embeddings.patch_embedding.weight", names,
                                                           where, "the vision tower"))
    projector = find_prefix(PROJECTOR_PREFIXES, "linear.weight", names, where, "the projector")
    fields["tensors"].update(proj1=projector + "linear.weight", proj1_bias=projector + "linear.bias")
    tokens = (fields["image_size"] // fields["patch_size"]) ** 2
    for name, given in (("image_seq_length", (processor or {}).get("image_seq_length", tokens)),
                        ("num_image_tokens", vision_raw.get("num_image_tokens", tokens))):
        if given != tokens:
            raise EdgeLLMError(f"{where}: {name} {given!r} contradicts the encoder's {tokens} patches")
    cfg.vision = VisionConfig(
        **fields, drop_class_token=False, projector="linear", projector_activation="none",
        image_token_id=integer(raw, "image_token_index" if "image_token_index" in raw else "image_token_id", where,
                               256000, low=0),
        image_tokens=tokens, processing=resized_processing(processor, fields["image_size"], where, BICUBIC),
        prompt="paligemma", attention="prefix")
    cfg.family = "paligemma"
    return cfg
