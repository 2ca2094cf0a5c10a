"""GGUF block types read as integer blocks, exactly: what each stored byte means (ggml-common.h).

Every type here becomes a BlockQuantized whose dequantize() equals the gguf package's
dequantize bit for bit (tests/test_gguf_blocks.py checks each against it):
    Q4_0  32 weights: d (f16), 16 bytes of nibbles           d * (q - 8)
    Q4_1  32 weights: d, m (f16), nibbles                     d * q + m
    Q5_0  32 weights: d, qh (32 fifth bits), nibbles          d * (q - 16)
    Q5_1  32 weights: d, m, qh, nibbles                       d * q + m
    Q8_0  32 weights: d, 32 int8                              d * q
    Q4_K  256 weights in 8 blocks of 32: d, dmin (f16), 6-bit sc and m per block, nibbles
                                                              d * sc * q - dmin * m
    Q5_K  as Q4_K with a fifth bit per weight                 d * sc * q - dmin * m
    Q6_K  256 weights in 16 blocks of 16: 4 low bits, 2 high bits, int8 sc per block, d (f16)
                                                              d * sc * (q - 32)
Within a block of 32, the low nibbles hold weights 0-15 and the high nibbles 16-31 (Q4_0 ...
Q5_1); the K-quants interleave whole blocks instead (see each reader). Signed forms (Q4_0, Q5_0,
Q8_0, Q6_K) become signed values (q - 8, q - 16, q, q - 32); the K-quants' scale and minimum
keep their factors (quant/blocks.py Factored).
"""

from __future__ import annotations

import numpy as np
from gguf.quants import Q4_K

from ..quant.blocks import BlockQuantized, Factored, in_slabs

SUPER = 256  # weights per K-quant super-block


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: the low nibbles are weights 0-15, the high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes (a little-endian uint32: bit i is weight i's fifth bit) -> [n, 32] of 0 or 16."""
    word = np.ascontiguousarray(qh).view(np.uint32)
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q4_0(b):
    return (_split_nibbles(b[:, 2:]).astype(np.int8) - 8), _f16(b[:, 0:2]), None


def _q4_1(b):
    return _split_nibbles(b[:, 4:]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b):
    return ((_split_nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])).astype(np.int8) - 16), _f16(b[:, 0:2]), None


def _q5_1(b):
    return _split_nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b):
    return np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b[:, 0:2]), None


def _k_factors(b: np.ndarray):
    """Q4_K / Q5_K's d, dmin and the 6-bit sc, m of the 8 blocks: (scale, minimum) Factored,
    per super-block [n, 8]."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    scale = Factored(sc.astype(np.int8), np.repeat(d[:, None], 8, axis=1))
    minimum = Factored(m.astype(np.int8), np.repeat(-dmin[:, None], 8, axis=1))
    return scale, minimum


def _q4_k(b):
    n = b.shape[0]
    # 32-byte runs c = 0..3: low nibbles are block 2c, high nibbles block 2c + 1
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(n, SUPER), *_k_factors(b)


def _q5_k(b):
    n = b.shape[0]
    qs = b[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    # qh[l] bit i: the fifth bit of weight l of block i
    qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    q = (qs & 0x0F).reshape(n, 8, 32) | ((qh & 1) << 4)
    return q.reshape(n, SUPER), *_k_factors(b)


def _q6_k(b):
    n = b.shape[0]
    # two halves of 128 weights; in each, 32-weight run j takes the low (j < 2) or high nibbles of
    # ql bytes 32 (j % 2).. and bits 2j, 2j + 1 of the half's 32 qh bytes
    ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (ql & 0x0F).reshape(n, 8, 32) | ((qh & 3).reshape(n, 8, 32) << 4)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8)
    d = _f16(b[:, 208:210])
    scale = Factored(sc.copy(), np.repeat(d[:, None], 16, axis=1))
    return (q.astype(np.int8) - 32).reshape(n, SUPER), scale, None


SLAB = 1 << 14  # stored blocks per reader call: bounds its temporaries (whole, a Q6_K LM head's took 1.2 GB)


def _read_slabs(stored: np.ndarray, reader):
    """reader(stored) (q, scale, minimum: arrays, Factored or None) run a slab of blocks at a time."""
    kinds = [None if x is None else isinstance(x, Factored) for x in reader(stored[:1])]

    def flat(start, end):
        return [a for x in reader(stored[start:end]) for a in ([None] if x is None else (x.integer, x.unit)
                                                                if isinstance(x, Factored) else [x])]

    arrays = iter(in_slabs(len(stored), SLAB, flat))
    return [next(arrays) if kind is None or not kind else Factored(next(arrays), next(arrays)) for kind in kinds]


# type -> (bits, weights per block, weights per stored block, stored block bytes, reader)
LAYOUTS = {
    "Q4_0": (4, 32, 32, 18, _q4_0),
    "Q4_1": (4, 32, 32, 20, _q4_1),
    "Q5_0": (5, 32, 32, 22, _q5_0),
    "Q5_1": (5, 32, 32, 24, _q5_1),
    "Q8_0": (8, 32, 32, 34, _q8_0),
    "Q4_K": (4, 32, SUPER, 144, _q4_k),
    "Q5_K": (5, 32, SUPER, 176, _q5_k),
    "Q6_K": (6, 16, SUPER, 210, _q6_k),
}


def read_blocks(raw: np.ndarray, type_name: str) -> BlockQuantized | None:
    """A GGUF tensor's bytes, [rows, bytes per row], as integer blocks; None for a type not in
    LAYOUTS (float types, IQ types), which the caller then dequantizes."""
    layout = LAYOUTS.get(type_name)
    if layout is None:
        return None
    bits, block, stored_block, nbytes, reader = layout
    rows = raw.shape[0]
    q, scale, minimum = _read_slabs(raw.reshape(-1, nbytes), reader)
    per_row = raw.shape[1] // nbytes * (stored_block // block)  # blocks per row

    def shaped(a):
        return None if a is None else np.ascontiguousarray(a.reshape(rows, -1))

    scale_factors = minimum_factors = None
    if isinstance(scale, Factored):
        scale_factors = Factored(shaped(scale.integer), shaped(scale.unit))
        scale = scale_factors.product()
    if isinstance(minimum, Factored):
        minimum_factors = Factored(shaped(minimum.integer), shaped(minimum.unit))
        minimum = minimum_factors.product()
    scale = shaped(scale).reshape(rows, per_row)
    return BlockQuantized(
        shaped(q), scale, bits, block, minimum=shaped(minimum), origin=f"GGUF {type_name}",
        scale_factors=scale_factors, minimum_factors=minimum_factors,
    )
