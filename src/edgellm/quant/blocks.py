"""Block-quantized weights: the one integer weight format every source and precision maps to.

A weight is kept in the source (Hugging Face) layout [rows, cols] with blocks of `block` along
cols, the input dimension of a linear layer and the hidden dimension of an embedding row:
    value[r, c] = scale[r, c // block] * (q[r, c] - zero_point[r, c // block]) + minimum[r, c // block]
zero_point is absent for symmetric blocks (signed q); minimum is present for GGUF Q4_1 blocks and
for re-quantized blocks of the "minimum" scheme: a per-block float minimum, which no integer zero
point can express exactly. order is only present for
act-order checkpoints (GPTQ desc_act): column c of q holds the weight's input column order[c].

bits is 4, 5, 6 or 8: GGUF's Q5_0/Q5_1/Q5_K and Q6_K keep 5- and 6-bit values, held here in a byte.
GGUF's K-quants keep a block's scale (and minimum) as a float16 unit per super-block of 256
weights times a small integer per block: float32 holds the product exactly, float16 does not. Such
a weight carries its factors as well (scale_factors, minimum_factors), so that a target can store
them at the file's size; scale and minimum then hold the exact products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Factored:
    """A per-block float kept as unit * integer (GGUF K-quants' d * sc and dmin * m)."""
    integer: np.ndarray  # int8 [rows, nblocks]
    unit: np.ndarray  # float32 [rows, nblocks] of float16 values, constant over a super-block

    def product(self) -> np.ndarray:
        return (self.unit * self.integer.astype(np.float32)).astype(np.float32)


@dataclass
class BlockQuantized:
    q: np.ndarray  # int8 (signed) or uint8 (unsigned) values, [rows, cols]
    scale: np.ndarray  # float32 [rows, ceil(cols / block)]
    bits: int
    block: int
    zero_point: np.ndarray | None = None  # uint8 [rows, nblocks], unsigned q only
    minimum: np.ndarray | None = None  # float32 [rows, nblocks]
    origin: str = "quantized"  # where the blocks came from, for the compile log (e.g. "GGUF Q4_1")
    order: np.ndarray | None = None  # input column held by each column of q (act-order), int64 [cols]
    scale_factors: Factored | None = None  # K-quants: scale == scale_factors.product()
    minimum_factors: Factored | None = None  # K-quants: minimum == minimum_factors.product()

    @property
    def signed(self) -> bool:
        return self.q.dtype == np.int8

    def expand(self, per_block: np.ndarray) -> np.ndarray:
        """[rows, nblocks] -> [rows, cols], each block value repeated over its columns."""
        return np.repeat(per_block, self.block, axis=1)[:, : self.q.shape[1]]

    def dequantize(self) -> np.ndarray:
        q = self.q.astype(np.float32)
        if self.zero_point is not None:
            q = q - self.expand(self.zero_point).astype(np.float32)
        w = q * self.expand(self.scale)
        if self.minimum is not None:
            w = w + self.expand(self.minimum)
        if self.order is not None:  # back to the weight's own column order
            w[:, self.order] = w.copy()
        return w.astype(np.float32)

    def general(self, block: int) -> "BlockQuantized":
        """The same values as unsigned blocks of `block` (a divisor of self.block) with factored
        scale and minimum: value = scale * q + minimum, every factor an int8 times a float16
        unit. Signed values move up by 2^(bits-1), their minimum becoming -2^(bits-1) * scale;
        a plain float16 scale or minimum is the unit itself, times 1. Every product stays exact
        in float32, so the dequantized values do not change."""
        assert self.zero_point is None and self.order is None and self.block % block == 0
        shift = (1 << (self.bits - 1)) if self.signed else 0
        ones = np.ones(self.scale.shape, np.int8)
        scale = self.scale_factors or Factored(ones, self.scale)
        if self.minimum_factors is not None:
            minimum = self.minimum_factors
        elif self.minimum is not None:
            minimum = Factored(ones, self.minimum)
        else:  # symmetric: -shift * scale (0 for unsigned values without a minimum)
            minimum = Factored(scale.integer, (scale.unit * -shift).astype(np.float32))
        repeat = self.block // block
        spread = lambda f: Factored(np.repeat(f.integer, repeat, axis=1), np.repeat(f.unit, repeat, axis=1))  # noqa: E731
        scale, minimum = spread(scale), spread(minimum)
        q = (self.q.astype(np.int16) + shift).astype(np.uint8)
        return BlockQuantized(q, scale.product(), self.bits, block, minimum=minimum.product(), origin=self.origin,
                              scale_factors=scale, minimum_factors=minimum)

    def rows(self, index: np.ndarray) -> "BlockQuantized":
        """The same weight with its rows reordered (GGUF's q/k row permutation)."""
        pick = lambda a: None if a is None else np.ascontiguousarray(a[index])  # noqa: E731
        pick_factors = lambda f: None if f is None else Factored(pick(f.integer), pick(f.unit))  # noqa: E731
        return BlockQuantized(pick(self.q), pick(self.scale), self.bits, self.block, pick(self.zero_point),
                              pick(self.minimum), self.origin, self.order, pick_factors(self.scale_factors),
                              pick_factors(self.minimum_factors))


def concat_rows(parts: list[BlockQuantized | None]) -> BlockQuantized | None:
    """Blocks of several weights stacked along rows (a fused projection), exactly, or None.

    Parts stored alike stack as they are; parts of one form but different widths (GGUF Q5_0 and
    Q8_0) take the widest; parts of different forms (Q4_K and Q6_K, whose blocks differ in length,
    sign and scales) are first brought to the form every kind shares (BlockQuantized.general).
    Act-order weights stack when their column orders agree (GPTQ orders the columns by the shared
    input's statistics, so q/k/v and gate/up do agree); zero-point weights only when alike."""
    if any(p is None for p in parts):
        return None
    first = parts[0]
    same_order = all((p.order is None and first.order is None) or
                     (p.order is not None and first.order is not None and np.array_equal(p.order, first.order)) for p in parts)
    if not same_order:
        return None
    form = lambda p: (p.block, p.signed, p.zero_point is None, p.minimum is None, p.scale_factors is None,  # noqa: E731
                      p.minimum_factors is None)
    if len({form(p) for p in parts}) > 1:
        block = min(p.block for p in parts)
        if any(p.zero_point is not None or p.order is not None or p.block % block for p in parts):
            return None
        parts = [p.general(block) for p in parts]
        first = parts[0]
    if first.zero_point is not None and len({p.bits for p in parts}) > 1:
        return None
    bits = max(p.bits for p in parts)
    stack = lambda field: None if getattr(first, field) is None else np.concatenate([getattr(p, field) for p in parts])  # noqa: E731

    def stack_factors(field):
        if getattr(first, field) is None:
            return None
        return Factored(*(np.concatenate([getattr(getattr(p, field), f) for p in parts]) for f in ("integer", "unit")))

    origin = "+".join(dict.fromkeys(p.origin for p in parts))
    return BlockQuantized(stack("q"), stack("scale"), bits, first.block, stack("zero_point"), stack("minimum"),
                          origin, first.order, stack_factors("scale_factors"), stack_factors("minimum_factors"))


ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # quantize this many weights at a time: bounded temporaries


SCHEMES = ("symmetric", "zero_point", "minimum")


def in_slabs(total: int, slab: int, compute) -> list:
    """compute(start, end) -> arrays (or None) for rows start..end-1, run a slab of rows at a time into
    arrays of the whole's size: its temporaries are a slab's, and no list of parts is concatenated
    (that held the values twice: 0.5 GB more for a 152k-token table)."""
    first = compute(0, min(slab, total))
    whole = [None if a is None else np.empty((total, *a.shape[1:]), a.dtype) for a in first]
    for start in range(0, total, slab):
        part = first if start == 0 else compute(start, min(start + slab, total))
        for a, target in zip(part, whole):
            if target is not None:
                target[start : start + len(a)] = a
    return whole


def quantize(w: np.ndarray, bits: int, block: int, scheme: str = "symmetric") -> BlockQuantized:
    """Round-to-nearest block quantization of a float [rows, cols] weight, one of SCHEMES:

    symmetric   signed values, scale only. int4 uses all 16 levels the way GGUF Q4_0 does: the
                value of largest magnitude maps to -8, so one sign gets the extra level.
    zero_point  unsigned values and an integer zero point (GPTQ/AWQ, compressed-tensors); the
                block spans [min(w, 0), max(w, 0)] so that 0 is a level.
    minimum     unsigned values over [min(w), max(w)] with a float16 minimum per block, as
                llama.cpp builds Q4_1 and the K-quants: the whole range goes to the block's own
                values, and a grid the weights already sit on is found again exactly.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown block scheme {scheme!r} (one of {', '.join(SCHEMES)})")
    rows, cols = w.shape
    step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(cols, 1))
    if rows <= step:
        return _quantize_rows(w, bits, block, scheme)
    fields = ("q", "scale", "zero_point", "minimum")
    whole = dict(zip(fields, in_slabs(rows, step, lambda r, end: [
        getattr(part, f) for part in [_quantize_rows(w[r:end], bits, block, scheme)] for f in fields])))
    return BlockQuantized(whole["q"], whole["scale"], bits, block, whole["zero_point"], whole["minimum"])


def _quantize_rows(w: np.ndarray, bits: int, block: int, scheme: str) -> BlockQuantized:
    rows, cols = w.shape
    nblocks = -(-cols // block)
    padded = np.zeros((rows, nblocks * block), np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, nblocks, block)
    levels = (1 << bits) - 1
    zero_point = minimum = None
    if scheme == "symmetric":
        if bits == 4:
            extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], axis=2)[..., 0]
            scale = _half_precision(extreme / -8.0)
        else:
            scale = _half_precision(np.abs(blocks).max(axis=2) / (levels // 2))
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = np.clip(np.rint(blocks * inv[..., None]), lo, hi).astype(np.int8)
    elif scheme == "zero_point":
        lo_v = np.minimum(blocks.min(axis=2), 0.0)
        hi_v = np.maximum(blocks.max(axis=2), 0.0)
        scale = _half_precision((hi_v - lo_v) / levels)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        zero_point = np.clip(np.rint(-lo_v * inv), 0, levels).astype(np.uint8)
        q = np.clip(np.rint(blocks * inv[..., None]) + zero_point[..., None], 0, levels).astype(np.uint8)
    else:
        # the padding of a short last block must not widen its range
        valid = (np.arange(nblocks * block) < cols).reshape(nblocks, block)
        minimum = _half_precision(np.where(valid, blocks, np.inf).min(axis=2))
        top = np.where(valid, blocks, -np.inf).max(axis=2)
        scale = _half_precision((top - minimum) / levels)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
        q = np.clip(np.rint((blocks - minimum[..., None]) * inv[..., None]), 0, levels).astype(np.uint8)
    q = q.reshape(rows, nblocks * block)[:, :cols]
    return BlockQuantized(np.ascontiguousarray(q), scale.astype(np.float32), bits, block, zero_point,
                          None if minimum is None else minimum.astype(np.float32))


def _half_precision(scale: np.ndarray) -> np.ndarray:
    """Scales rounded to float16 values (as GGUF and GPTQ store them), before the weights are
    rounded with them: a target may then keep scales in 16 bits (the native target does) and
    compute exactly what the IR says."""
    return scale.astype(np.float16).astype(np.float32)


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX INT4/UINT4 raw data: two values per byte, the first in the low nibble."""
    flat = values.astype(np.uint8).reshape(-1) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int, signed: bool) -> np.ndarray:
    """Inverse of pack_int4: int8 values in [-8, 7] when signed, uint8 in [0, 15] otherwise."""
    packed = np.frombuffer(raw, np.uint8)
    values = np.empty(packed.size * 2, np.uint8)
    values[0::2], values[1::2] = packed & 0x0F, packed >> 4
    values = values[:count]
    return ((values.astype(np.int8) ^ 8) - 8).astype(np.int8) if signed else values
