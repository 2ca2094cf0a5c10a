"""The normalized model configuration every later stage reads.

One ModelConfig describes any supported decoder-only family; the differences between families
are data here (flags, offsets, names), not branches scattered through the graph emitter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import EdgeLLMError
from .fields import COUNTS, REQUIRED, SIZES, number, numbers, require, shown
from .vision import VisionConfig

# Roles of per-layer tensors. Adapters map each role to the source's tensor name.
LAYER_ROLES = (
    "attn_norm", "q_proj", "k_proj", "v_proj", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm",
    "o_proj", "attn_out_norm", "mlp_norm", "gate_proj", "up_proj", "down_proj", "mlp_out_norm",
)
GLOBAL_ROLES = ("embed", "final_norm", "lm_head")
# the rope scalings graph/rope.py computes
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "freq_factors")


@dataclass
class RopeConfig:
    theta: float
    rotary_dim: int
    # "default", "linear", "llama3", ... with the scaling parameters as in HF rope_parameters.
    scaling: dict = field(default_factory=lambda: {"rope_type": "default"})

    def validate(self, where: str, head_dim: int) -> None:
        """The base, the rotary width and the scaling's parameters, so that the tables graph/rope.py
        computes are finite and as wide as the heads allow."""
        number(vars(self), "theta", where, REQUIRED)
        if self.rotary_dim % 2 or not 2 <= self.rotary_dim <= head_dim:
            raise EdgeLLMError(f"{where}: the rotary dimension {self.rotary_dim} (head_dim x partial_rotary_factor) must "
                               f"be even and from 2 to head_dim {head_dim}")
        s = self.scaling
        kind = s.get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise EdgeLLMError(f"{where}: rope scaling type {shown(kind)} is not supported (supported: default, linear, "
                               "llama3, longrope, and GGUF rope_freqs)")
        if kind == "linear":
            number(s, "factor", where, REQUIRED)
        elif kind == "llama3":
            low, high = (number(s, key, where, REQUIRED) for key in ("low_freq_factor", "high_freq_factor"))
            number(s, "factor", where, REQUIRED)
            require(s, "original_max_position_embeddings", where)
            if high <= low:  # the smoothing divides by their difference
                raise EdgeLLMError(f"{where}: llama3 scaling's high_freq_factor {high} must exceed low_freq_factor {low}")
        elif kind == "longrope":
            numbers(s, "short_factor", where, self.rotary_dim // 2)
            numbers(s, "long_factor", where, self.rotary_dim // 2)
            require(s, "original_max_position_embeddings", where)
            if number(s, "factor", where, None) is None:  # then it is max / original
                require(s, "max_position_embeddings", where)
            number(s, "attention_factor", where, None)
        elif kind == "freq_factors":
            numbers(s, "factors", where, self.rotary_dim // 2)
        sections = self.sections
        if sections is not None and sum(sections) != self.rotary_dim // 2:
            raise EdgeLLMError(f"{where}: mrope_section {sections} must add up to the {self.rotary_dim // 2} rotary "
                               "frequencies")

    @property
    def sections(self) -> list[int] | None:
        """M-RoPE (Qwen2-VL): how many of the rotary frequencies, in order, turn with each of a
        row's three positions (time, height, width); None: one position per row."""
        return self.scaling.get("mrope_section")


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

    def validate(self, where: str) -> None:
        """Checks across fields, and of the values an adapter derived, for every source (a GGUF's
        metadata becomes a config too): a config failing one is refused here, naming where,
        rather than emitted as a graph that computes garbage."""
        fields = vars(self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "head_dim", "max_position_embeddings"):
            require(fields, name, where, high=SIZES)
        for name in ("num_layers", "num_heads", "num_kv_heads"):
            require(fields, name, where, high=COUNTS)
        if self.num_heads % self.num_kv_heads:
            raise EdgeLLMError(f"{where}: num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                               f"{self.num_kv_heads}")
        number(fields, "rms_norm_eps", where, REQUIRED)
        number(fields, "attention_scale", where, REQUIRED)
        for name in ("embedding_scale", "attn_logit_softcap", "final_logit_softcap"):
            number(fields, name, where, None)
        if "sliding" in self.layer_types and self.sliding_window is None:
            raise EdgeLLMError(f"{where}: sliding-window layers need a 'sliding_window' size")
        for kind, rope in self.ropes.items():
            rope.validate(f"{where} (rope of the {kind} layers)", self.head_dim)

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
