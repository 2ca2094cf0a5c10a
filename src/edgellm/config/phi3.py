"""Phi-3 / Phi-3.5-mini: llama with fused qkv_proj and gate_up_proj tensors (used fused, as the
emitter fuses them anyway), partial or full rotary, LongRoPE ("longrope"/"su") scaling, and a
sliding window over every layer when the config sets one."""

from __future__ import annotations

from .llama import LAYER, TENSORS, llama_like
from .model_config import ModelConfig

FUSED_TENSORS = {
    **{role: name for role, name in TENSORS.items() if role not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
    "qkv_proj": LAYER + "self_attn.qkv_proj.weight",
    "gate_up_proj": LAYER + "mlp.gate_up_proj.weight",
}


def build(raw: dict, where: str) -> ModelConfig:
    return llama_like(raw, where, "phi3", window_everywhere=True, tensors=FUSED_TENSORS)
