"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm per head, no biases): llama otherwise."""

from __future__ import annotations

from .llama import llama_like
from .model_config import ModelConfig


def _layer_types(raw: dict) -> list[str] | None:
    if raw.get("layer_types"):
        return list(raw["layer_types"])
    if raw.get("use_sliding_window") and raw.get("sliding_window"):
        # transformers' rule: layers from max_window_layers on use the window
        first = int(raw.get("max_window_layers", 0))
        return ["sliding_attention" if i >= first else "full_attention" for i in range(int(raw["num_hidden_layers"]))]
    return None


def build_qwen2(raw: dict, where: str) -> ModelConfig:
    return llama_like(raw, where, "qwen2", bias=True, layer_types=_layer_types(raw))


def build_qwen3(raw: dict, where: str) -> ModelConfig:
    return llama_like(raw, where, "qwen3", bias=bool(raw.get("attention_bias", False)), qk_norm=True,
                      layer_types=_layer_types(raw))
