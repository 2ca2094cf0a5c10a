"""Normalize a raw (Hugging Face style) model configuration into a ModelConfig."""

from __future__ import annotations

from ..errors import EdgeLLMError
from . import gemma, gemma2, gemma3, idefics3, llama, llava, mistral, paligemma, phi3, qwen, qwen2_vl
from .fields import shown
from .model_config import ModelConfig, RopeConfig

# model_type in config.json -> build(raw, where) -> ModelConfig. Adding a family: see
# docs/ADDING_AN_ARCHITECTURE.md.
ADAPTERS = {
    "llama": llama.build,
    "mistral": mistral.build,
    "phi3": phi3.build,
    "qwen2": qwen.build_qwen2,
    "qwen3": qwen.build_qwen3,
    "gemma": gemma.build,
    "gemma2": gemma2.build,
    "gemma3_text": gemma3.build,
}
# Vision-language families also read the tensor names (checkpoints place the parts under
# different prefixes) and the image processor's settings (preprocessor_config.json).
VISION_ADAPTERS = {
    "llava": llava.build,
    "idefics3": idefics3.build,
    "smolvlm": idefics3.build,
    "gemma3": gemma3.build_vision,
    "paligemma": paligemma.build,
    "qwen2_vl": qwen2_vl.build,
    "qwen2_5_vl": qwen2_vl.build,
}


def build_model_config(raw: dict, where: str, names: set[str] | None = None, processor: dict | None = None) -> ModelConfig:
    """where: the file the raw config came from, named in every error."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise EdgeLLMError(f"{where}: no 'model_type' field; cannot tell the architecture")
    if not isinstance(model_type, str) or model_type not in {**ADAPTERS, **VISION_ADAPTERS}:
        supported = ", ".join(sorted([*ADAPTERS, *VISION_ADAPTERS]))
        raise EdgeLLMError(f"{where}: unsupported architecture {shown(model_type)} (supported: {supported})")
    if model_type in VISION_ADAPTERS:
        cfg = VISION_ADAPTERS[model_type](raw, where, names or set(), processor)
    else:
        cfg = ADAPTERS[model_type](raw, where)
    cfg.validate(where)
    return cfg


__all__ = ["ModelConfig", "RopeConfig", "build_model_config", "ADAPTERS"]
