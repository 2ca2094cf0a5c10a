"""Gemma 2: Gemma 3 without q/k norms, with attention-logit and final-logit soft-capping, and
sliding-window layers alternating with global ones (one rope for all)."""

from __future__ import annotations

from .gemma3 import gemma
from .model_config import ModelConfig


def build(raw: dict, where: str) -> ModelConfig:
    return gemma(raw, where, "gemma2", qk_norm=False, sliding_every=2)
