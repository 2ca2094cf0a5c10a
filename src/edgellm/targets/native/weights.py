"""The native target's weights file: every weight repacked for the kernels, in one aligned file.

Layout: a 64-byte header (magic, format version, file size, the first 16 hex digits of the
SHA-256 of everything after the header), then each tensor at a 64-byte aligned offset. The
generated code carries the size and digest and refuses a file that does not match them, so a
program never runs on another build's weights. Layouts per kind are in
kernels/edgellm_kernels.h; integer weights become unsigned nibbles (q4) or int8 (q8) with a
float scale and minimum per block, whatever the IR's form (signed, zero point, Q4_1 minimum).
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

MAGIC = b"EDGELLMW"
VERSION = 1
HEADER = 64
ALIGN = 64
KINDS = {"f32": 0, "bf16": 1, "q4": 2, "q8": 3}


@dataclass(frozen=True)
class WeightRecord:
    symbol: str  # C expression of its em_weight
    kind: str
    n: int  # rows (outputs)
    k: int  # columns (inputs)
    block: int
    data: int  # byte offsets into the file
    scale: int = 0
    minimum: int = 0


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

    # ---- raw tensors -----------------------------------------------------------------------

    def _write(self, array: np.ndarray) -> int:
        pad = -self.size % ALIGN
        data = np.ascontiguousarray(array).tobytes()
        chunk = b"\0" * pad + data
        self.file.write(chunk)
        self.digest.update(chunk)
        offset = self.size + pad
        self.size += len(chunk)
        return offset

    def constant(self, name: str, value: np.ndarray) -> int:
        """A small tensor read by a kernel as is (norm weights, rope tables, biases): its offset."""
        if name not in self.constants:
            self.constants[name] = self._write(value)
        return self.constants[name]

    # ---- matrices --------------------------------------------------------------------------

    def _record(self, key: tuple, kind: str, n: int, k: int, block: int, *offsets: int) -> str:
        record = WeightRecord(f"EMW[{len(self.records)}]", kind, n, k, block, *offsets)
        self.records.append(record)
        self.by_key[key] = record
        return record.symbol

    def rows(self, symbol: str) -> int:
        return self._by_symbol(symbol).n

    def cols(self, symbol: str) -> int:
        return self._by_symbol(symbol).k

    def _by_symbol(self, symbol: str) -> WeightRecord:
        return self.records[int(symbol[4:-1])]

    def float_matrix(self, name: str, w: np.ndarray) -> str:
        """w: [N, K] float32 (one output row per row)."""
        key = (name, "f32", w.shape)
        if key not in self.by_key:
            self._record(key, "f32", w.shape[0], w.shape[1], 0, self._write(w.astype(np.float32)))
        return self.by_key[key].symbol

    def bf16_matrix(self, name: str, init, transpose: bool) -> str:
        """init: a BFLOAT16 initializer, [K, N] if transpose (a MatMul weight) else [N, K]."""
        key = (name, "bf16", transpose)
        if key not in self.by_key:
            bits = np.frombuffer(tensor_bytes(init), np.uint16).reshape(tuple(init.dims))
            bits = bits.T if transpose else bits
            self._record(key, "bf16", bits.shape[0], bits.shape[1], 0, self._write(bits))
        return self.by_key[key].symbol

    def integer_matrix(self, name: str, q: np.ndarray, bits_signed: tuple[int, bool], scale: np.ndarray,
                       zero_point: np.ndarray | None, minimum: np.ndarray | None, block: int) -> str:
        """Blocks along K of an [N, K] weight: value = scale * (q - zero_point) + minimum, the IR's
        DequantizeLinear (and Q4_1 shift) semantics; scale, zero_point, minimum [N, blocks]."""
        bits, signed = bits_signed
        key = (name, f"q{bits}")
        if key in self.by_key:
            return self.by_key[key].symbol
        n, k = q.shape
        if block <= 0:
            raise EdgeLLMError(f"{name}: the native target needs blocked integer weights (block_size > 0)")
        scale = np.ascontiguousarray(scale, dtype=np.float32)
        offset = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
        if bits == 4:
            if block % 32 or k % 32:
                raise EdgeLLMError(f"{name}: the native target packs int4 in runs of 32; block {block} and K {k} "
                                   "must be multiples of 32")
            # kernels read unsigned 0..15: a signed value v is stored as v + 8
            stored = (q.astype(np.int16) + 8).astype(np.uint8) if signed else q.astype(np.uint8)
            shift = 8.0 if signed else 0.0
            halves = stored.reshape(n, k // 32, 2, 16)
            data = (halves[:, :, 0, :] | (halves[:, :, 1, :] << 4)).astype(np.uint8)
        else:
            # kernels read signed -128..127: an unsigned value v is stored as v - 128
            data = q.astype(np.int8) if signed else (q.astype(np.int16) - 128).astype(np.int8)
            shift = 0.0 if signed else -128.0
        # scale * (stored - shift - offset) + minimum = scale * stored + new minimum
        new_minimum = -scale * (offset + shift)
        if minimum is not None:
            new_minimum = new_minimum + minimum.astype(np.float32)
        offsets = (self._write(data), self._write(scale), self._write(new_minimum.astype(np.float32)))
        return self._record(key, f"q{bits}", n, k, block, *offsets)

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
