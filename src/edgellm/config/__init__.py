"""Normalize a raw (Hugging Face style) model configuration into a ModelConfig."""

from __future__ import annotations

from ..errors import EdgeLLMError
from .model_config import ModelConfig, RopeConfig
from . import gemma3, llama

# model_type in config.json -> adapter module with build(raw, where) -> ModelConfig
ADAPTERS = {"llama": llama, "gemma3_text": gemma3, "gemma3": gemma3}


def build_model_config(raw: dict, where: str) -> ModelConfig:
    """where: the file the raw config came from, named in every error."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise EdgeLLMError(f"{where}: no 'model_type' field; cannot tell the architecture")
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        supported = ", ".join(sorted(ADAPTERS))
        raise EdgeLLMError(f"{where}: unsupported architecture '{model_type}' (supported: {supported})")
    return adapter.build(raw, where)


__all__ = ["ModelConfig", "RopeConfig", "build_model_config", "ADAPTERS"]
