"""The native target's weights file: every weight repacked for the kernels, in one aligned file.

Layout: a 64-byte header (magic, format version, file size, the first 16 hex digits of the
SHA-256 of everything after the header), then each tensor at a 64-byte aligned offset. The
generated code carries the size and digest and refuses a file that does not match them, so a
program never runs on another build's weights. Layouts per kind are in
kernels/edgellm_kernels.h; integer weights become unsigned nibbles (q4) or int8 (q8) with a
float16 scale and minimum per block, whatever the IR's form (signed, zero point, Q4_1 minimum),
repacked in panels of 16 rows. Symmetric blocks store no minimum (the kernels derive it from the
scale); minimums float16 cannot hold exactly (from zero points) are stored as float32.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import EdgeLLMError
from ...graph.io import tensor_bytes
from ...quant.blocks import Factored

MAGIC = b"EDGELLMW"
VERSION = 2  # 2: q5/q6 kinds and factored scales
HEADER = 64
ALIGN = 64
KINDS = {"f32": 0, "bf16": 1, "q4": 2, "q8": 3, "cb2": 4, "cb3": 5, "cb4": 6, "q5": 7, "q6": 8}
UNIT_RUNS = (16, 8, 4, 2, 1)  # blocks sharing a factored scale's unit, longest first (a K-quant: 256 weights)


@dataclass(frozen=True)
class WeightRecord:
    symbol: str  # C expression of its em_weight
    kind: str
    n: int  # rows (outputs)
    k: int  # columns (inputs)
    block: int
    int8_activations: int  # integer kinds: the kernel quantizes activations to int8 per block
    shift: int  # integer kinds without a minimum array: minimum = -shift * scale
    minimum_f32: int  # minimums stored as float32: float16 could not hold them exactly
    nbytes: int  # what a matmul with it reads: data, scales and minimums
    data: int  # byte offsets into the file
    scale: int = 0
    minimum: int = 0
    scale_unit: int = 0  # factored scales (GGUF K-quants): int8 factors in scale / minimum, float16 units here
    minimum_unit: int = 0
    unit_blocks: int = 1


class WeightsFile:
    """Written as tensors arrive (one in memory at a time); renamed into place by finish()."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish / abort)
        self.file.write(b"\0" * HEADER)
        self.size = HEADER
        self.digest = hashlib.sha256()
        self.records: list[WeightRecord] = []
        self.by_key: dict[tuple, WeightRecord] = {}
        self.constants: dict[str, int] = {}
        self.blobs: dict[bytes, int] = {}  # sha256 of bytes -> offset
        self.packed: dict[tuple, object] = {}  # WeightsFile.once

    def once(self, key: tuple, pack):
        """What pack() stores (a weight's symbol, a constant's offset), packed the first time key is
        asked for: the lowering reads a weight from its file once per build, however many
        programs use it (the group and single variants name a weight alike)."""
        if key not in self.packed:
            self.packed[key] = pack()
        return self.packed[key]

    # ---- raw tensors -----------------------------------------------------------------------

    def _write(self, array: np.ndarray) -> int:
        """The array's offset in the file; identical bytes are stored once (a tied embedding table
        and LM head at the same precision are one copy)."""
        data = np.ascontiguousarray(array).tobytes()
        key = hashlib.sha256(data).digest()
        if key in self.blobs:
            return self.blobs[key]
        pad = -self.size % ALIGN
        chunk = b"\0" * pad + data
        self.file.write(chunk)
        self.digest.update(chunk)
        offset = self.size + pad
        self.size += len(chunk)
        self.blobs[key] = offset
        return offset

    def constant(self, name: str, value: np.ndarray) -> int:
        """A small tensor read by a kernel as is (norm weights, rope tables, biases): its offset."""
        if name not in self.constants:
            self.constants[name] = self._write(value)
        return self.constants[name]

    # ---- matrices --------------------------------------------------------------------------

    def _record(self, key: tuple, kind: str, n: int, k: int, block: int, arrays: list[np.ndarray | None],
                int8_activations: int = 0, shift: int = 0, unit_blocks: int = 1) -> str:
        """arrays: data, then scale, minimum, scale unit, minimum unit as the kind has them (None: absent)."""
        offsets = [0 if a is None else self._write(a) for a in arrays]
        nbytes = sum(a.nbytes for a in arrays if a is not None)
        minimum_f32 = int(len(arrays) >= 3 and arrays[2] is not None and arrays[2].dtype == np.float32)
        record = WeightRecord(f"EMW[{len(self.records)}]", kind, n, k, block, int8_activations, shift, minimum_f32,
                              nbytes, *offsets, unit_blocks=unit_blocks)
        self.records.append(record)
        self.by_key[key] = record
        return record.symbol

    def nbytes(self, symbol: str) -> int:
        return self._by_symbol(symbol).nbytes

    def rows(self, symbol: str) -> int:
        return self._by_symbol(symbol).n

    def cols(self, symbol: str) -> int:
        return self._by_symbol(symbol).k

    def quantizes_in_fours(self, symbol: str) -> bool:
        """Whether the kernel quantizes this weight's activations per block, in runs of 4 inputs
        (a LoRA branch there takes int8 dot products: em_lora_down_quads)."""
        record = self._by_symbol(symbol)
        return bool(record.int8_activations) and record.k % 4 == 0 and record.block % 4 == 0

    def _by_symbol(self, symbol: str) -> WeightRecord:
        return self.records[int(symbol[4:-1])]

    def float_matrix(self, name: str, w: np.ndarray) -> str:
        """w: [N, K] float32 (one output row per row)."""
        key = (name, "f32", w.shape)
        if key not in self.by_key:
            self._record(key, "f32", w.shape[0], w.shape[1], 0, [w.astype(np.float32)])
        return self.by_key[key].symbol

    def bf16_matrix(self, name: str, init, transpose: bool) -> str:
        """init: a BFLOAT16 initializer, [K, N] if transpose (a MatMul weight) else [N, K]."""
        key = (name, "bf16", transpose)
        if key not in self.by_key:
            bits = np.frombuffer(tensor_bytes(init), np.uint16).reshape(tuple(init.dims))
            bits = bits.T if transpose else bits
            self._record(key, "bf16", bits.shape[0], bits.shape[1], 0, [bits])
        return self.by_key[key].symbol

    def integer_matrix(self, name: str, q: np.ndarray, bits_signed: tuple[int, bool], scale, zero_point: np.ndarray | None,
                       minimum, block: int, int8_activations: bool = False) -> str:
        """Blocks along K of an [N, K] weight: value = scale * (q - zero_point) + minimum, the IR's
        DequantizeLinear (and Q4_1 shift) semantics; scale, zero_point, minimum [N, blocks], scale
        and minimum as arrays or (K-quants) Factored. Bytes holding values of 5 or 6 bits (GGUF
        Q5_*, Q6_K) are stored in as few bits as hold them."""
        bits, signed = bits_signed
        if bits == 8:
            bits = _narrowest(q, signed)
        key = (name, f"q{bits}", int8_activations)
        if key in self.by_key:
            return self.by_key[key].symbol
        n, k = q.shape
        run = 8 if bits < 8 else 4  # columns per group of a 16-row panel (edgellm_kernels.h)
        if block <= 0 or block % run or k % run:
            raise EdgeLLMError(f"{name}: the native target packs int{bits} weights in runs of {run} columns; "
                               f"block {block} and K {k} must be multiples of {run}")
        # Kernels read unsigned values: a signed one is stored shifted up by 2^(bits-1).
        shift = (1 << (bits - 1)) if signed else 0
        stored = (q.astype(np.int16) + shift).astype(np.uint8)
        arrays = [_panels(stored, bits)]
        if isinstance(scale, Factored) or isinstance(minimum, Factored):
            if zero_point is not None:
                raise EdgeLLMError(f"{name}: factored scales with a zero point are not a GGUF form")
            return self._factored(key, n, k, block, arrays, scale, minimum, shift, int8_activations)
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        offset = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
        arrays.append(_panel_blocks(_half(scale, name, "scale")))
        if zero_point is not None or minimum is not None:
            # scale * (stored - shift - zero_point) + minimum = scale * stored + new minimum
            new_minimum = -scale * (offset + shift)
            if minimum is not None:
                new_minimum = new_minimum + minimum.astype(np.float32)
            arrays.append(_panel_blocks(_exact_minimums(new_minimum, name)))
        # symmetric blocks store no minimum: the kernels derive it, -shift * scale
        return self._record(key, f"q{bits}", n, k, block, arrays, int(int8_activations), shift)

    def _factored(self, key, n, k, block, arrays, scale, minimum, shift, int8_activations) -> str:
        """Factored scale and minimum: int8 factors per block, float16 units per run of blocks."""
        name = key[0]
        factors = [f if isinstance(f, Factored) or f is None else Factored(np.ones(f.shape, np.int8), f)
                   for f in (scale, minimum)]
        if shift and factors[1] is not None:
            raise EdgeLLMError(f"{name}: signed blocks with a stored minimum are not a GGUF form")
        blocks = factors[0].integer.shape[1]
        runs = next(r for r in UNIT_RUNS if blocks % r == 0 and all(
            f is None or (f.unit.reshape(n, -1, r) == f.unit.reshape(n, -1, r)[..., :1]).all() for f in factors))
        arrays.append(_panel_blocks(factors[0].integer.astype(np.int8)))
        arrays.append(None if factors[1] is None else _panel_blocks(factors[1].integer.astype(np.int8)))
        for f, what in zip(factors, ("scale", "minimum")):
            if f is None:
                arrays.append(None)
                continue
            unit = f.unit[:, ::runs]
            half = _half(unit, name, f"{what} unit")
            if not np.array_equal(half.astype(np.float32), unit):
                raise EdgeLLMError(f"{name}: a factored {what}'s unit is not a float16 value")
            arrays.append(_panel_blocks(half))
        return self._record(key, key[1], n, k, block, arrays, int(int8_activations), shift, runs)

    def codebook_matrix(self, name: str, index: np.ndarray, codebook: np.ndarray, bits: int, block: int) -> str:
        """index [N, K] (values < 2^bits), codebook [N, blocks, 2^bits]: bit-packed indices in
        groups of 16 per row (edgellm_kernels.h) and float16 codebooks."""
        key = (name, f"cb{bits}")
        if key in self.by_key:
            return self.by_key[key].symbol
        n, k = index.shape
        if k % 16 or block % 16:
            raise EdgeLLMError(f"{name}: the native target packs codebook indices in groups of 16; block {block} "
                               f"and K {k} must be multiples of 16")
        groups = index.reshape(n, k // 16, 16).astype(np.uint32)
        two_bit = 2 * np.arange(16, dtype=np.uint32)
        planes = [((groups & 3) << two_bit).sum(axis=2, dtype=np.uint32)]  # bits 2i, 2i+1: index i's low 2 bits
        if bits == 4:
            planes.append((((groups >> 2) & 3) << two_bit).sum(axis=2, dtype=np.uint32))
        packed = np.stack(planes, axis=2).view(np.uint8).reshape(n, k // 16, -1)
        if bits == 3:  # bit i: index i's third bit
            high = (((groups >> 2) & 1) << np.arange(16, dtype=np.uint32)).sum(axis=2, dtype=np.uint32).astype(np.uint16)
            packed = np.concatenate([packed, high[..., None].view(np.uint8)], axis=2)
        return self._record(key, f"cb{bits}", n, k, block, [packed, _half(codebook, name, "codebook entry")])

    # ---- finish ----------------------------------------------------------------------------

    def finish(self) -> str:
        """Write the header and move the file into place; returns the digest the code checks."""
        digest = self.digest.hexdigest()[:16]
        self.file.seek(0)
        self.file.write(struct.pack("<8sIIQ16s", MAGIC, VERSION, 0, self.size, digest.encode()).ljust(HEADER, b"\0"))
        self.file.close()
        os.replace(self.tmp, self.path)
        return digest

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _exact_minimums(minimum: np.ndarray, name: str) -> np.ndarray:
    """float16 when that holds every minimum exactly (GGUF Q4_1's are float16 values), else
    float32: a minimum made from a zero point (-scale * zero_point) needs more mantissa bits, and
    rounding it would move the weights off what the IR says."""
    half = _half(minimum, name, "minimum")
    return half if np.array_equal(half.astype(np.float32), minimum.astype(np.float32)) else minimum.astype(np.float32)


def _half(values: np.ndarray, name: str, what: str) -> np.ndarray:
    """Block scales (and most minimums) are float16 in the file: a quarter of an int4 weight's
    bytes instead of half. Scales the quantizer made are float16 values already
    (quant/blocks.py), as are GGUF's and GPTQ's."""
    half = values.astype(np.float16)
    if not np.isfinite(half).all():
        raise EdgeLLMError(f"{name}: a block {what} beyond float16's range")
    return half


PANEL = 16


def _padded_rows(a: np.ndarray) -> np.ndarray:
    rows = -(-a.shape[0] // PANEL) * PANEL
    if rows == a.shape[0]:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0], *a.shape[1:]), a.dtype)])


def _narrowest(q: np.ndarray, signed: bool) -> int:
    """8, or 5 / 6 when every value fits that many bits (signed: -2^(b-1) .. 2^(b-1) - 1)."""
    low, high = (int(q.min()), int(q.max())) if q.size else (0, 0)
    for bits in (5, 6):
        if (signed and -(1 << (bits - 1)) <= low and high < (1 << (bits - 1))) or (not signed and high < (1 << bits)):
            return bits
    return 8


def _panels(stored: np.ndarray, bits: int) -> np.ndarray:
    """[N, K] unsigned values -> the panel layout of edgellm_kernels.h, one group per (panel, 8
    columns) for q4/q5/q6 or (panel, 4 columns) for q8. Blocks are whole groups, so groups in
    column order are groups block by block."""
    v = _padded_rows(stored)
    panels, k = v.shape[0] // PANEL, v.shape[1]
    if bits == 8:  # byte 4j + i = row j, column 4g + i
        return v.reshape(panels, PANEL, k // 4, 4).transpose(0, 2, 1, 3)
    # byte 4j + i = row j: column 8g + i (low nibble), column 8g + 4 + i (high nibble)
    v = v.reshape(panels, PANEL, k // 8, 2, 4).transpose(0, 2, 1, 4, 3)  # [panel, group, row j, i, half]
    nibbles = (v[..., 0] & 15) | ((v[..., 1] & 15) << 4)
    if bits == 4:
        return nibbles
    # then per high bit e (4, 5) and half: a 64-bit mask, bit 4j + i
    masks = [np.packbits(((v[..., half] >> (4 + e)) & 1).reshape(panels, k // 8, 64), axis=2, bitorder="little")
             for e in range(bits - 4) for half in (0, 1)]
    return np.concatenate([nibbles.reshape(panels, k // 8, 64), *masks], axis=2)


def _panel_blocks(per_block: np.ndarray) -> np.ndarray:
    """[N, blocks] -> [panels, blocks, 16]: one 16-row vector per panel and block."""
    v = _padded_rows(per_block)
    return v.reshape(v.shape[0] // PANEL, PANEL, v.shape[1]).transpose(0, 2, 1)
