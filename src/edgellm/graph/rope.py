"""Rotary embedding tables (cos/sin caches) for ONNX RotaryEmbedding, with HF's rope scalings.

Computed in float32 the way transformers does, so positions far into the context round the same.
"""

from __future__ import annotations

import math

import numpy as np

from ..config.model_config import RopeConfig
from ..errors import EdgeLLMError


def inverse_frequencies(rope: RopeConfig, max_positions: int) -> tuple[np.ndarray, float]:
    """inv_freq [rotary_dim/2] and the attention scaling factor applied to cos/sin."""
    dim = rope.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    kind = rope.scaling.get("rope_type", "default")
    if kind == "longrope":
        return _longrope(rope, exponents, max_positions)
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: each frequency divided by its factor
        factors = np.asarray(rope.scaling["factors"], np.float32)
        if factors.shape != inv_freq.shape:
            raise EdgeLLMError(f"rope_freqs has {factors.size} factors for {inv_freq.size} rotary frequencies")
        return (inv_freq / factors).astype(np.float32), 1.0
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
    raise EdgeLLMError(f"rope scaling type '{kind}' is not supported yet (supported: default, linear, llama3, longrope, and GGUF rope_freqs)")


def _longrope(rope: RopeConfig, exponents: np.ndarray, max_positions: int) -> tuple[np.ndarray, float]:
    """Phi-3's LongRoPE: per-frequency factors, "short" within the pretraining context and "long"
    beyond it. transformers switches to the long factors once a sequence passes the original
    context; a static table cannot switch mid-sequence, so a build whose context (max_num_tokens)
    exceeds the original uses the long factors throughout, and otherwise the short ones."""
    s = rope.scaling
    if not s.get("original_max_position_embeddings"):
        raise EdgeLLMError("longrope scaling needs original_max_position_embeddings (in rope_scaling or config.json)")
    original = int(s["original_max_position_embeddings"])
    factors = s["long_factor"] if max_positions > original else s["short_factor"]
    if len(factors) != len(exponents):
        raise EdgeLLMError(f"longrope has {len(factors)} factors for {len(exponents)} rotary frequencies")
    inv_freq = (1.0 / (np.asarray(factors, np.float32) * np.float32(rope.theta) ** exponents)).astype(np.float32)
    factor = s.get("factor") or float(s["max_position_embeddings"]) / original
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, float(attention)


def rope_tables(rope: RopeConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq, scale = inverse_frequencies(rope, max_positions)
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos = (np.cos(freqs) * np.float32(scale)).astype(np.float32)
    sin = (np.sin(freqs) * np.float32(scale)).astype(np.float32)
    return cos, sin


def axial_tables(theta: float, head_dim: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 2D rotary embedding's cos/sin rows (Qwen2-VL's encoder): positions [rows, 2] (patch row,
    column); the first half of each head's rotated frequencies turn with the row, the second
    with the column. [rows, head_dim / 2] each."""
    dim = head_dim // 2
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
    angles = np.concatenate([positions[:, :1].astype(np.float32) * inv_freq, positions[:, 1:].astype(np.float32) * inv_freq],
                            axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def section_selector(sections: list[int]) -> np.ndarray:
    """M-RoPE: [3, 1, rotary_dim / 2], 1 where a frequency turns with that position (time, height,
    width, as many frequencies each as sections says, in order), else 0."""
    owner = np.repeat(np.arange(3), sections)
    return (owner[None, None, :] == np.arange(3)[:, None, None]).astype(np.float32)
