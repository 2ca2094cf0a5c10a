"""Rotary embedding tables (cos/sin caches) for ONNX RotaryEmbedding, with HF's rope scalings.

Computed in float32 the way transformers does, so positions far into the context round the same.
"""

from __future__ import annotations

import math

import numpy as np

from ..config.model_config import RopeConfig
from ..errors import EdgeLLMError


def inverse_frequencies(rope: RopeConfig) -> tuple[np.ndarray, float]:
    """inv_freq [rotary_dim/2] and the attention scaling factor applied to cos/sin."""
    dim = rope.rotary_dim
    inv_freq = (1.0 / (np.float32(rope.theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    kind = rope.scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(rope.scaling["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        s = rope.scaling
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    raise EdgeLLMError(f"rope scaling type '{kind}' is not supported yet (supported: default, linear, llama3)")


def rope_tables(rope: RopeConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq, scale = inverse_frequencies(rope)
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos = (np.cos(freqs) * np.float32(scale)).astype(np.float32)
    sin = (np.sin(freqs) * np.float32(scale)).astype(np.float32)
    return cos, sin
