"""The normalized model configuration every later stage reads.

One ModelConfig describes any supported decoder-only family; the differences between families
are data here (flags, offsets, names), not branches scattered through the graph emitter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .vision import VisionConfig

# Roles of per-layer tensors. Adapters map each role to the source's tensor name.
LAYER_ROLES = (
    "attn_norm", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
    "o_proj", "attn_out_norm", "mlp_norm", "gate_proj", "up_proj", "down_proj", "mlp_out_norm",
)
GLOBAL_ROLES = ("embed", "final_norm", "lm_head")


@dataclass
class RopeConfig:
    theta: float
    rotary_dim: int
    # "default", "linear", "llama3", ... with the scaling parameters as in HF rope_parameters.
    scaling: dict = field(default_factory=lambda: {"rope_type": "default"})


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: str  # "silu" | "gelu_tanh"
    tie_word_embeddings: bool
    max_position_embeddings: int
    # Per layer: "full" or "sliding"; the rope table each layer uses is named by its kind.
    layer_types: list[str]
    ropes: dict[str, RopeConfig]
    attention_scale: float
    sliding_window: int | None = None
    # Gemma stores RMSNorm weights as w with the norm applying (1 + w).
    norm_weight_offset: float = 0.0
    embedding_scale: float | None = None
    qk_norm: bool = False
    attention_bias: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # role -> tensor name template ("{i}" is the layer index); absent roles are unused.
    layer_tensors: dict[str, str] = field(default_factory=dict)
    global_tensors: dict[str, str] = field(default_factory=dict)
    vision: VisionConfig | None = None  # a vision-language model's encoder and projector (config/vision.py)

    def tensor_name(self, role: str, layer: int | None = None) -> str | None:
        if layer is None:
            return self.global_tensors.get(role)
        template = self.layer_tensors.get(role)
        return None if template is None else template.format(i=layer)

    def has(self, role: str) -> bool:
        return role in self.layer_tensors

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["ropes"] = {k: RopeConfig(**v) for k, v in data["ropes"].items()}
        if data.get("vision"):
            data["vision"] = VisionConfig.from_dict(data["vision"])
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
