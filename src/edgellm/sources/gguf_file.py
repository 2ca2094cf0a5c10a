"""A GGUF file read through the `gguf` package.

The metadata becomes a Hugging Face style config dict and tensor names become Hugging Face names,
so the per-family adapters serve GGUF and safetensors alike. Tensors are dequantized one at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgeLLMError
from .base import TokenizerFiles
from .gguf_tokenizer import gguf_fields
from .safetensors_dir import _fingerprint

# GGUF architecture -> HF model_type
MODEL_TYPES = {"llama": "llama", "gemma3": "gemma3_text"}

# GGUF per-layer tensor suffix -> HF per-layer tensor suffix, per family.
_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_NAMES = {
    "llama": {**_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_COMMON,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFSource:
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
            self.fields = gguf_fields(self.reader)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise EdgeLLMError(f"{path}: not a readable GGUF file ({e})") from None
        arch = self.fields.get("general.architecture")
        if arch not in MODEL_TYPES:
            raise EdgeLLMError(
                f"{path}: unsupported architecture '{arch}' (supported: {', '.join(sorted(MODEL_TYPES))})"
            )
        self.arch = arch
        self.raw_config = self._hf_config()
        self._tensors = {}
        for t in self.reader.tensors:
            hf = self._hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t

    def _meta(self, key, default=None):
        return self.fields.get(f"{self.arch}.{key}", default)

    def _hf_config(self) -> dict:
        where = str(self.path)
        need = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"]
        for key in need:
            if self._meta(key) is None:
                raise EdgeLLMError(f"{where}: GGUF metadata '{self.arch}.{key}' is missing")
        heads = int(self._meta("attention.head_count"))
        hidden = int(self._meta("embedding_length"))
        tokens = self.fields.get("tokenizer.ggml.tokens") or []
        cfg = {
            "model_type": MODEL_TYPES[self.arch],
            "num_hidden_layers": int(self._meta("block_count")),
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._meta("attention.head_count_kv", heads)),
            "rms_norm_eps": float(self._meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "max_position_embeddings": int(self._meta("context_length", 2048)),
            "vocab_size": int(self._meta("vocab_size", len(tokens))),
            "rope_theta": float(self._meta("rope.freq_base", 10000.0)),
            "tie_word_embeddings": not any(t.name == "output.weight" for t in self.reader.tensors),
        }
        head_dim = self._meta("attention.key_length")
        if head_dim is not None:
            cfg["head_dim"] = int(head_dim)
        if self.arch == "llama":
            cfg["head_dim"] = int(self._meta("rope.dimension_count", hidden // heads))
            scaling = self._meta("rope.scaling.type")
            if scaling and scaling != "none":
                cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(self._meta("rope.scaling.factor", 1.0))}
        if self.arch == "gemma3":
            # llama.cpp scales queries by 1/sqrt(head_dim) for every size GGUF can describe here.
            cfg["query_pre_attn_scalar"] = cfg.get("head_dim", 256)
            cfg["rope_local_base_freq"] = 10000.0
            if self._meta("attention.sliding_window") is not None:
                cfg["sliding_window"] = int(self._meta("attention.sliding_window"))
        return cfg

    def _hf_name(self, name: str) -> str | None:
        base, _, kind = name.rpartition(".")
        if base.startswith("blk."):
            _, index, suffix = base.split(".", 2)
            hf = LAYER_NAMES[self.arch].get(suffix)
            return None if hf is None else f"model.layers.{index}.{hf}.{kind}"
        hf = GLOBAL_NAMES.get(base)
        return None if hf is None else f"{hf}.{kind}"

    def tensor_names(self) -> list[str]:
        return sorted(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors.get(name)
        if t is None:
            raise EdgeLLMError(f"{self.path}: tensor for '{name}' not found in the GGUF file")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except (NotImplementedError, ValueError) as e:
            raise EdgeLLMError(f"{self.path}: tensor {t.name} of type {t.tensor_type.name} cannot be read ({e})") from None
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.raw_config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            w = _unpermute_rows(w, heads)
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp's converter stores Gemma's (1 + w) norm weights; undo it
        return w

    def tokenizer(self) -> TokenizerFiles:
        from .gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.fields)

    def fingerprint(self) -> str:
        return _fingerprint([self.path])


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it interleaves rotary halves for its rope kernel)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
