"""Pre-quantized Hugging Face checkpoints, read as integer blocks without re-quantizing.

Three layouts, named by config.json's quantization_config:
  compressed-tensors "pack-quantized" (llm-compressor's GPTQ/AWQ output): weight_packed int32
      [N, K*bits/32], values + 2^(bits-1) packed densely from the low bits; weight_scale [N, K/g];
      weight_zero_point (asymmetric) packed the same way along dim 0; weight_g_idx in older files.
  AutoGPTQ ("gptq"): qweight int32 [K*bits/32, N] packed along K; qzeros int32 [K/g, N*bits/32]
      packed along N, storing zero - 1 (checkpoint_format "gptq"; "gptq_v2" stores the zero);
      scales [K/g, N]; g_idx [K] (act-order: input column k belongs to group g_idx[k]).
  AutoAWQ ("awq", GEMM): qweight int32 [K, N*bits/32] packed along N in the interleaved order
      0 2 4 6 1 3 5 7; qzeros [K/g, N*bits/32] the same way; scales [K/g, N].
All become quant.blocks.BlockQuantized in the HF layout [N, K]. Act-order groups are not
contiguous in K; their columns are reordered so each group is one block and the input is
gathered in the same order at run time (BlockQuantized.order), which is exact.
"""

from __future__ import annotations

import numpy as np

from ..config.fields import REQUIRED, integer, section, shown
from ..errors import EdgeLLMError
from ..quant.blocks import BlockQuantized

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble p of a packed word holds column AWQ_ORDER[p]


def unpack_int32(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """uint8 values packed densely from the low bits of int32 words along `axis` (1 or 0)."""
    if axis == 0:
        return unpack_int32(words.T, bits, count, axis=1).T
    per_word = 32 // bits
    w = np.ascontiguousarray(words).view(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    values = (w[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return values.reshape(w.shape[0], -1)[:, :count].astype(np.uint8)


class PrequantizedReader:
    """Integer blocks of the linear weights a pre-quantized checkpoint stores."""

    def __init__(self, config: dict, arrays, names: set[str], where: str):
        if not isinstance(config, dict):
            raise EdgeLLMError(f"{where}: field 'quantization_config' must be a JSON object, got {shown(config)}")
        self.cfg = config
        self.method = config.get("quant_method")
        self.arrays = arrays  # name -> numpy array as stored
        self.where = where
        fields = f"{where} (quantization_config)"
        # self.group: the config's group size; None for one group of all K (a channel strategy, GPTQ's -1)
        if self.method == "compressed-tensors":
            fmt = config.get("format")
            groups = list(section(config, "config_groups", fields).values())
            if not all(isinstance(g, dict) for g in groups):
                raise EdgeLLMError(f"{fields}: each of config_groups must be a JSON object")
            if fmt != "pack-quantized" and not all(g.get("format") == "pack-quantized" for g in groups):
                raise EdgeLLMError(f"{where}: compressed-tensors format {fmt!r} is not supported (supported: pack-quantized)")
            if len(groups) != 1:
                raise EdgeLLMError(f"{where}: compressed-tensors with {len(groups)} config groups is not supported (one)")
            self.weights = section(groups[0], "weights", fields)
            if self.weights.get("type", "int") != "int" or integer(self.weights, "num_bits", fields, None) not in (4, 8):
                raise EdgeLLMError(f"{where}: compressed-tensors weights {self.weights} are not int4/int8")
            suffix = ".weight_packed"
            strategy = self.weights.get("strategy", "group")
            if strategy not in ("group", "channel"):
                raise EdgeLLMError(f"{where}: compressed-tensors strategy {strategy!r} is not supported (group, channel)")
            self.group = integer(self.weights, "group_size", fields, REQUIRED) if strategy == "group" else None
        elif self.method in ("gptq", "awq"):
            if self.method == "gptq" and config.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
                raise EdgeLLMError(f"{where}: GPTQ checkpoint_format {config.get('checkpoint_format')!r} is not supported "
                                   "(gptq, gptq_v2)")
            bits = integer(config, "bits", fields, None)
            if bits not in (4, 8) or (self.method == "awq" and bits != 4):
                raise EdgeLLMError(f"{where}: {self.method} with {bits} bits is not supported (gptq: 4, 8; awq: 4)")
            if self.method == "awq" and str(config.get("version", "gemm")).lower() != "gemm":
                raise EdgeLLMError(f"{where}: AWQ version {config.get('version')!r} is not supported (gemm)")
            suffix = ".qweight"
            if self.method == "awq":
                self.group = integer(config, "group_size", fields, None) or integer(config, "q_group_size", fields, 128)
            else:
                self.group = None if config.get("group_size") == -1 else integer(config, "group_size", fields, None)
        else:
            raise EdgeLLMError(f"{where}: quantization method {self.method!r} is not supported "
                               "(supported: compressed-tensors pack-quantized, gptq, awq)")
        self.prefixes = {n[: -len(suffix)] for n in names if n.endswith(suffix)}

    def weight_names(self) -> set[str]:
        return {p + ".weight" for p in self.prefixes}

    def origin(self, name: str) -> str | None:
        if not name.endswith(".weight") or name[: -len(".weight")] not in self.prefixes:
            return None
        return {"compressed-tensors": "compressed-tensors", "gptq": "GPTQ", "awq": "AWQ"}[self.method]

    def shape(self, name: str) -> tuple[int, int]:
        """[N, K] of a quantized weight, from its stored tensors' shapes (nothing unpacked)."""
        prefix = name[: -len(".weight")]
        try:
            return self._shape(prefix)
        except KeyError as e:
            raise EdgeLLMError(f"{self.where}: {prefix} lacks tensor {e} of its {self.method} layout") from None

    def _shape(self, prefix: str) -> tuple[int, int]:
        if self.method == "compressed-tensors":
            return tuple(int(d) for d in self.arrays[f"{prefix}.weight_shape"])
        words, scales = self.arrays[f"{prefix}.qweight"].shape, self.arrays[f"{prefix}.scales"].shape
        k = words[0] * 32 // self.cfg["bits"] if self.method == "gptq" else words[0]
        return scales[1], k

    def blocks(self, name: str) -> BlockQuantized | None:
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix not in self.prefixes:
            return None
        read = {"compressed-tensors": self._compressed_tensors, "gptq": self._gptq, "awq": self._awq}[self.method]
        try:
            return read(prefix)
        except KeyError as e:
            raise EdgeLLMError(f"{self.where}: {prefix} lacks tensor {e} of its {self.method} layout") from None

    def _compressed_tensors(self, prefix: str) -> BlockQuantized:
        bits = self.weights["num_bits"]
        n, k = (int(d) for d in self.arrays[f"{prefix}.weight_shape"])
        scale = self.arrays[f"{prefix}.weight_scale"].astype(np.float32).reshape(n, -1)
        groups = scale.shape[1]
        q = unpack_int32(self.arrays[f"{prefix}.weight_packed"], bits, k, axis=1)  # value + 2^(bits-1)
        if self.weights.get("symmetric", True):
            zero = None
            q = (q.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)
        else:  # (q - zp) is the same with both stored offset by 2^(bits-1): keep them unsigned
            zero = unpack_int32(self.arrays[f"{prefix}.weight_zero_point"], bits, n, axis=0)[:, :groups]
        g_idx = self.arrays.get(f"{prefix}.weight_g_idx")
        # the group size is the config's: the last group of a K that it does not divide is short
        group = self.group or k
        if groups != -(-k // group):
            raise EdgeLLMError(f"{self.where}: {prefix}.weight_scale has {groups} groups; K {k} in groups of {group} needs "
                               f"{-(-k // group)}")
        return _grouped(q, scale, zero, bits, group, g_idx, "compressed-tensors", self.where, prefix)

    def _gptq(self, prefix: str) -> BlockQuantized:
        bits = self.cfg["bits"]
        scales = self.arrays[f"{prefix}.scales"].astype(np.float32)  # [G, N]
        n = scales.shape[1]
        q = unpack_int32(self.arrays[f"{prefix}.qweight"], bits, self.arrays[f"{prefix}.qweight"].shape[0] * 32 // bits, axis=0)
        k = q.shape[0]
        zeros = unpack_int32(self.arrays[f"{prefix}.qzeros"], bits, n, axis=1).astype(np.int16)  # [G, N]
        if self.cfg.get("checkpoint_format", "gptq") == "gptq":
            zeros = (zeros + 1) & ((1 << bits) - 1)  # AutoGPTQ v1 stores zero - 1
        group = self.group or k
        g_idx = self.arrays.get(f"{prefix}.g_idx")
        return _grouped(q.T, scales.T, zeros.T.astype(np.uint8), bits, group, g_idx, "GPTQ", self.where, prefix)

    def _awq(self, prefix: str) -> BlockQuantized:
        bits = 4
        scales = self.arrays[f"{prefix}.scales"].astype(np.float32)  # [G, N]
        n = scales.shape[1]

        def unshuffle(words):
            raw = unpack_int32(words, bits, words.shape[1] * 8, axis=1)
            out = np.empty_like(raw)
            for p, col in enumerate(AWQ_ORDER):
                out[:, col::8] = raw[:, p::8]
            return out[:, :n]

        q = unshuffle(self.arrays[f"{prefix}.qweight"])  # [K, N]
        zeros = unshuffle(self.arrays[f"{prefix}.qzeros"])  # [G, N]
        return _grouped(q.T, scales.T, zeros.T, bits, self.group, None, "AWQ", self.where, prefix)


def _grouped(q, scale, zero, bits, group, g_idx, origin, where, prefix) -> BlockQuantized:
    """q [N, K], scale/zero [N, G] -> blocks; with act-order g_idx the columns are reordered."""
    k = q.shape[1]
    order = None
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        if not np.array_equal(g_idx, np.arange(k) // group):
            counts = np.bincount(g_idx, minlength=scale.shape[1])
            if len(g_idx) != k or np.any(counts[:-1] != group) or counts[-1] > group:
                raise EdgeLLMError(f"{where}: {prefix} has act-order groups of uneven size, which blocks cannot express")
            order = np.argsort(g_idx, kind="stable")
            q = q[:, order]
    return BlockQuantized(np.ascontiguousarray(q), np.ascontiguousarray(scale), bits, group,
                          None if zero is None else np.ascontiguousarray(zero), origin=origin,
                          order=order)
