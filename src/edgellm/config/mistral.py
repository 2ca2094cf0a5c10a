"""Mistral: llama with every layer attending over a sliding window (when sliding_window is set)."""

from __future__ import annotations

from .fields import flag
from .llama import llama_like
from .model_config import ModelConfig


def build(raw: dict, where: str) -> ModelConfig:
    return llama_like(raw, where, "mistral", bias=flag(raw, "attention_bias", where, False), window_everywhere=True)
