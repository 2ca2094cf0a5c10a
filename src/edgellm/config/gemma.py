"""Gemma (the first generation: Gemma 2B / 7B, CodeGemma, and PaliGemma's text model): llama's
layout (a norm before attention and one before the MLP, no norms after them) with Gemma's
(1 + w) RMSNorm, a GELU-tanh gated MLP, embeddings scaled by sqrt(hidden_size) and tied."""

from __future__ import annotations

from .fields import flag, text
from .llama import llama_like
from .model_config import ModelConfig

# "gelu" is what the first Gemma configs say; transformers reads it as the tanh approximation,
# which is what the models were trained with.
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu_tanh"}


def build(raw: dict, where: str) -> ModelConfig:
    # hidden_activation, where given, is the one transformers uses (Gemma 1.1's configs have both)
    act = text(raw, "hidden_activation", where, None) or text(raw, "hidden_act", where, "gelu_pytorch_tanh")
    # GemmaConfig's defaults where llama's differ
    raw = {"tie_word_embeddings": True, "max_position_embeddings": 8192, "head_dim": 256, **raw, "hidden_act": act}
    cfg = llama_like(raw, where, "gemma", bias=flag(raw, "attention_bias", where, False), activations=ACTIVATIONS)
    cfg.norm_weight_offset = 1.0
    cfg.embedding_scale = cfg.hidden_size ** 0.5
    return cfg
