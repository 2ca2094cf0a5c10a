"""Mistral: llama with every layer attending over a sliding window (when sliding_window is set)."""

from __future__ import annotations

from .llama import llama_like
from .model_config import ModelConfig


def build(raw: dict, where: str) -> ModelConfig:
    layers = int(raw.get("num_hidden_layers") or 0)
    kind = "sliding_attention" if raw.get("sliding_window") else "full_attention"
    return llama_like(raw, where, "mistral", bias=bool(raw.get("attention_bias", False)), layer_types=[kind] * layers)
