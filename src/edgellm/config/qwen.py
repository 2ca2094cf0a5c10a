"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm per head, no biases): llama otherwise."""

from __future__ import annotations

from .fields import COUNTS, flag, integer, layer_types, require
from .llama import LAYER_KINDS, llama_like
from .model_config import ModelConfig


def _layer_types(raw: dict, where: str) -> list[str] | None:
    layers = require(raw, "num_hidden_layers", where, high=COUNTS)
    listed = layer_types(raw, where, layers, LAYER_KINDS)
    if listed:
        return listed
    if flag(raw, "use_sliding_window", where, False) and raw.get("sliding_window"):
        # transformers' rule: layers from max_window_layers on use the window
        first = integer(raw, "max_window_layers", where, 0, low=0, high=COUNTS)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    return None


def build_qwen2(raw: dict, where: str) -> ModelConfig:
    return llama_like(raw, where, "qwen2", bias=True, layer_types=_layer_types(raw, where))


def build_qwen3(raw: dict, where: str) -> ModelConfig:
    return llama_like(raw, where, "qwen3", bias=flag(raw, "attention_bias", where, False), qk_norm=True,
                      layer_types=_layer_types(raw, where))
