"""A GGUF file read through the `gguf` package.

The metadata becomes a Hugging Face style config dict and tensor names become Hugging Face names,
so the per-family adapters serve GGUF and safetensors alike. Tensors are dequantized one at a time.
"""

from __future__ import annotations

import math
import mmap
import re
from pathlib import Path

import numpy as np

from ..config.fields import COUNTS, SIZES, shown
from ..errors import EdgeLLMError
from ..quant.blocks import BlockQuantized
from .base import TokenizerFiles
from .gguf_blocks import LAYOUTS, read_blocks
from .gguf_check import check_gguf
from .gguf_tokenizer import gguf_fields
from .safetensors_dir import _fingerprint

# GGUF architecture (llama.cpp's name) -> HF model_type. Mistral's GGUFs say "llama".
# (qwen2vl: Qwen2-VL's text model, a Qwen2 whose M-RoPE sections matter only beside its mmproj:
# text rows have three equal positions)
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen2vl": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma": "gemma",
               "gemma2": "gemma2", "gemma3": "gemma3_text"}

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
_LLAMA = {**_COMMON, "ffn_norm": "post_attention_layernorm"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA = {
    **_COMMON,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
LAYER_NAMES = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,  # biases come along as attn_q.bias etc.
    "qwen2vl": _LLAMA,
    "qwen3": {**_LLAMA, **_QK_NORMS},
    # Phi-3 keeps its fused tensors; llama.cpp names the fused gate/up "ffn_up"
    "phi3": {**_LLAMA, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3": {**_GEMMA, **_QK_NORMS},
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_INDEX = re.compile(r"0|[1-9][0-9]*")  # as llama.cpp writes it: blk.0, blk.12


def llama_row_permutation(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's interleaving of each head's rotary halves (q/k rows)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def open_gguf(path: Path):
    """The gguf package's reader of the file, and its metadata as plain values."""
    import gguf

    check_gguf(path)  # GGUFReader trusts the file's counts: bound them by its size first
    try:
        reader = gguf.GGUFReader(path)
        fields = gguf_fields(reader)
        # The reader keeps a numpy view per part of every metadata value: for a 262k-token
        # vocabulary that is 0.6 GB, held by every compile worker. The values are in fields.
        reader.fields.clear()
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise EdgeLLMError(f"{path}: not a readable GGUF file ({e})") from None
    return reader, fields


class GGUFSource:
    default_precision = "SOURCE"  # a GGUF runs as it is stored
    metadata = "GGUF metadata"  # what errors call the file's key/values

    def __init__(self, path: Path):
        self.path = path
        self.reader, self.fields = open_gguf(path)
        arch = self.fields.get("general.architecture")
        if not isinstance(arch, str) or arch not in MODEL_TYPES:
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

    def _lookup(self, key: str):
        """The metadata key's full name, and its value (None where the file has none)."""
        name = f"{self.arch}.{key}"
        return name, self.fields.get(name)

    def _number(self, key: str, kind: type = int, default=None, *, required: bool = False, high: int = SIZES):
        """A number of the metadata, or default where the file has none: kind int, a whole number
        from 1 to high; kind float, a finite number above 0. Text, an array, a bool, NaN, an
        infinity, 0 or less: the file's error, one line naming the key and the value."""
        name, value = self._lookup(key)
        if value is None:
            if required:
                raise EdgeLLMError(f"{self.path}: {self.metadata} '{name}' is missing")
            return default
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise EdgeLLMError(f"{self.path}: {self.metadata} '{name}' must be a whole number from 1 to {high}, "
                                   f"got {shown(value)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise EdgeLLMError(f"{self.path}: {self.metadata} '{name}' must be a finite number above 0, got {shown(value)}")
        return kind(value)

    def _hf_config(self) -> dict:
        where = str(self.path)
        layers = self._number("block_count", required=True, high=COUNTS)
        if layers > len(self.reader.tensors):  # a layer has a tensor at least: a bound before anything loops over layers
            raise EdgeLLMError(f"{where}: GGUF metadata '{self.arch}.block_count' = {layers} is more layers than the "
                               f"file has tensors ({len(self.reader.tensors)})")
        hidden = self._number("embedding_length", required=True)
        intermediate = self._number("feed_forward_length", required=True)
        heads = self._number("attention.head_count", required=True, high=COUNTS)
        tokens = self.fields.get("tokenizer.ggml.tokens") or []
        cfg = {
            "model_type": MODEL_TYPES[self.arch],
            "num_hidden_layers": layers,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_attention_heads": heads,
            "num_key_value_heads": self._number("attention.head_count_kv", default=heads, high=COUNTS),
            "rms_norm_eps": self._number("attention.layer_norm_rms_epsilon", float, 1e-6),
            "max_position_embeddings": self._number("context_length", default=2048),
            "vocab_size": self._number("vocab_size", default=len(tokens)),
            "rope_theta": self._number("rope.freq_base", float, 10000.0),
            "tie_word_embeddings": not any(t.name == "output.weight" for t in self.reader.tensors),
        }
        head_dim = self._number("attention.key_length")
        if head_dim is not None:
            cfg["head_dim"] = head_dim
        name, scaling = self._lookup("rope.scaling.type")
        if scaling is not None and not isinstance(scaling, str):
            raise EdgeLLMError(f"{where}: GGUF metadata '{name}' must be text, got {shown(scaling)}")
        if scaling and scaling != "none" and self.arch != "llama":
            # e.g. Gemma 3 4B+ scales only its global layers; not mapped yet: refuse rather than guess
            raise EdgeLLMError(f"{where}: rope scaling '{scaling}' in a {self.arch} GGUF is not supported yet")
        if self.arch == "llama":
            cfg["head_dim"] = self._number("rope.dimension_count", default=hidden // heads)
            if scaling and scaling != "none":
                cfg["rope_scaling"] = {"rope_type": scaling, "factor": self._number("rope.scaling.factor", float, 1.0)}
            freqs = next((t for t in self.reader.tensors if t.name == "rope_freqs.weight"), None)
            if freqs is not None:  # Llama 3.1+: llama.cpp stores the llama3 scaling as per-frequency divisors
                cfg["rope_parameters"] = {"rope_type": "freq_factors", "rope_theta": cfg["rope_theta"],
                                          "factors": self._factors(freqs)}
        window = self._number("attention.sliding_window")
        if window is not None:
            cfg["sliding_window"] = window
        if self.arch in ("gemma2", "gemma3"):
            # GGUF has no query_pre_attn_scalar: llama.cpp scales queries by 1/sqrt(head_dim),
            # except for the 27B sizes (46 / 62 layers), where it uses hidden / heads as HF does.
            is_27b = cfg["num_hidden_layers"] == {"gemma2": 46, "gemma3": 62}[self.arch]
            cfg["query_pre_attn_scalar"] = hidden // heads if is_27b else cfg.get("head_dim", 256)
        if self.arch == "gemma3":
            cfg["rope_local_base_freq"] = 10000.0
        if self.arch == "gemma2":
            for key in ("attn_logit_softcapping", "final_logit_softcapping"):
                cap = self._number(key, float)
                if cap is not None:
                    cfg[key] = cap
        if self.arch == "phi3":
            self._phi3_rope(cfg, hidden // heads)
        return cfg

    def _phi3_rope(self, cfg: dict, head_dim: int) -> None:
        """Partial rotary from rope.dimension_count; LongRoPE factors are tensors in GGUF."""
        rotary = self._number("rope.dimension_count", default=head_dim)
        params = {"rope_type": "default", "rope_theta": cfg["rope_theta"], "partial_rotary_factor": rotary / head_dim}
        factors = {t.name: t for t in self.reader.tensors if t.name.startswith("rope_factors_")}
        if factors:
            for name in ("rope_factors_short.weight", "rope_factors_long.weight"):
                if name not in factors:
                    raise EdgeLLMError(f"{self.path}: LongRoPE factor tensors without '{name}'")
            original = self._number("rope.scaling.original_context_length", default=cfg["max_position_embeddings"])
            params.update(
                rope_type="longrope", original_max_position_embeddings=original,
                short_factor=self._factors(factors["rope_factors_short.weight"]),
                long_factor=self._factors(factors["rope_factors_long.weight"]),
            )
            attention_factor = self._number("rope.scaling.attn_factor", float)
            if attention_factor is not None:
                params["attention_factor"] = attention_factor
        cfg["rope_parameters"] = params

    def _factors(self, t) -> list[float]:
        """A rope factor tensor's values: llama.cpp writes one row of F32 (another type's bytes
        would read as garbage factors)."""
        if t.tensor_type.name != "F32" or len(t.shape) != 1:
            raise EdgeLLMError(f"{self.path}: tensor '{t.name}' should be one row of F32 values, "
                               f"not {t.tensor_type.name} of shape {[int(d) for d in t.shape]}")
        return [float(x) for x in t.data]

    def _hf_name(self, name: str) -> str | None:
        base, _, kind = name.rpartition(".")
        if name.startswith("blk."):
            parts = base.split(".", 2)
            if len(parts) != 3 or not LAYER_INDEX.fullmatch(parts[1]):
                raise EdgeLLMError(f"{self.path}: tensor '{name}' is not named blk.<layer>.<part>.<kind>")
            hf = LAYER_NAMES[self.arch].get(parts[2])
            return None if hf is None else f"model.layers.{parts[1]}.{hf}.{kind}"
        hf = GLOBAL_NAMES.get(base)
        return None if hf is None else f"{hf}.{kind}"

    def tensor_names(self) -> list[str]:
        return sorted(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def tensor(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors.get(name)
        if t is None:
            raise EdgeLLMError(f"{self.path}: tensor for '{name}' not found in the GGUF file")
        shape = [int(d) for d in reversed(t.shape)]
        try:
            if t.data.dtype == np.uint8 and t.data.ndim == 2:  # quantized rows: dequantize a slab at a time
                w = np.empty((t.data.shape[0], int(np.prod(shape)) // t.data.shape[0]), np.float32)
                step = max(1, (1 << 22) // w.shape[1])
                for r in range(0, w.shape[0], step):
                    w[r : r + step] = gguf.quants.dequantize(t.data[r : r + step], t.tensor_type).reshape(-1, w.shape[1])
            else:
                w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except (NotImplementedError, ValueError) as e:
            raise EdgeLLMError(f"{self.path}: tensor {t.name} of type {t.tensor_type.name} cannot be read ({e})") from None
        w = w.reshape(shape)
        self._release(t)
        permutation = self._row_permutation(name, w.shape[0])
        if permutation is not None:
            w = w[permutation]
        if self.arch in ("gemma", "gemma2", "gemma3") and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp's converter stores Gemma's (1 + w) norm weights; undo it
        return w

    def packed(self, name: str) -> BlockQuantized | None:
        """The tensor's own integer blocks when its GGUF type is one edgellm runs as it is
        (sources/gguf_blocks.py LAYOUTS: Q4_0 ... Q8_0 and the K-quants); None for every other
        type, which is then read as float."""
        t = self._tensors.get(name)
        if t is None or t.tensor_type.name not in LAYOUTS:
            return None
        rows = int(t.shape[1]) if len(t.shape) == 2 else 1
        blocks = read_blocks(np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1), t.tensor_type.name)
        self._release(t)
        permutation = self._row_permutation(name, rows)
        return blocks if permutation is None else blocks.rows(permutation)

    def _release(self, t) -> None:
        """Take a tensor's pages of the memory-mapped file out of this process once it is read (a
        view of them still reads correctly: they come back from the page cache). A compile reads
        each tensor once or twice; without this every page it ever read stays in its RSS."""
        mapping = getattr(self.reader.data, "_mmap", None)
        advice = getattr(mmap, "MADV_DONTNEED", None)  # (not on every platform)
        if mapping is None or advice is None or t.n_bytes <= 0:
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        try:
            mapping.madvise(advice, start, min(len(mapping), t.data_offset + t.n_bytes) - start)
        except (OSError, ValueError):  # advice only: a platform without it keeps the pages
            pass

    def stored_bytes(self, name: str) -> int | None:
        """The tensor's bytes in the file when edgellm keeps its type as it is (SOURCE), else None;
        read from the tensor's header, nothing decoded."""
        t = self._tensors[name]
        return int(t.n_bytes) if t.tensor_type.name in LAYOUTS or t.tensor_type.name == "F32" else None

    def storage(self, name: str) -> str:
        t = self._tensors[name].tensor_type.name
        return "float" if t == "F32" else f"GGUF {t}"

    def _row_permutation(self, name: str, rows: int) -> np.ndarray | None:
        """llama.cpp interleaves the rotary halves of q/k rows for its rope kernel; this undoes it."""
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        heads = self.raw_config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
        if rows % (2 * heads):  # ModelConfig checks the shapes first; this guards a caller that did not
            raise EdgeLLMError(f"{self.path}: tensor for '{name}' has {rows} rows: not pairs of rotary rows for {heads} heads")
        return llama_row_permutation(rows, heads)

    def tokenizer(self) -> TokenizerFiles:
        from .gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(self.fields, self.path)

    def fingerprint(self) -> str:
        return _fingerprint([self.path])

