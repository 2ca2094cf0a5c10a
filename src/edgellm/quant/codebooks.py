"""Codebook quantization (Ditto, seed 002): per-block K-means codebooks and low-bit indices.

A weight [rows, cols] (Hugging Face layout: blocks along cols, the input dimension) is cut into
blocks of `block` columns per row (a short last block where cols is not a multiple). Each block
gets 2^bits centroids from one-dimensional K-means (Lloyd's algorithm from quantile
initialization, centroids rounded to float16 values, as stored), and every weight becomes the
index of its nearest centroid:
    value[r, c] = codebook[r, c // block][index[r, c]]
Bits per weight: bits + 16 * 2^bits / block. With the default blocks of 256: CB4 5.0 (the native
target's int4 blocks of 32 with float16 scale and minimum are also 5.0), CB3 3.5, CB2 2.25.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 256
ITERATIONS = 12
CHUNK_ELEMENTS = 1 << 20  # weights clustered at a time: bounded temporaries


@dataclass
class Codebooked:
    index: np.ndarray  # uint8 [rows, cols], values < 2^bits
    codebook: np.ndarray  # float32 [rows, blocks, 2^bits], float16 values
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        rows, cols = self.index.shape
        block_of = np.arange(cols) // self.block
        return np.take_along_axis(self.codebook[:, block_of, :], self.index[..., None].astype(np.int64), axis=2)[..., 0]


def quantize_codebooks(w: np.ndarray, bits: int, block: int = BLOCK) -> Codebooked:
    rows, cols = w.shape
    block = min(block, cols)
    nblocks = -(-cols // block)
    index = np.empty((rows, cols), np.uint8)
    codebook = np.empty((rows, nblocks, 1 << bits), np.float32)
    for b in range(nblocks):
        c0, c1 = b * block, min(cols, (b + 1) * block)
        step = max(1, CHUNK_ELEMENTS // (c1 - c0))
        for r in range(0, rows, step):
            part = np.ascontiguousarray(w[r : r + step, c0:c1], dtype=np.float32)
            index[r : r + step, c0:c1], codebook[r : r + step, b] = _kmeans(part, 1 << bits)
    return Codebooked(index, codebook, bits, block)


def _kmeans(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm on each row of x [n, m] independently: (index [n, m], centroids [n, k])."""
    ordered = np.sort(x, axis=1)
    m = x.shape[1]
    # quantile initialization: centroid j at the middle of the j-th of k equal-count slices
    centroids = ordered[:, ((np.arange(k) + 0.5) * m / k).astype(int)]
    for _ in range(ITERATIONS):
        flat = (_nearest(x, centroids) + k * np.arange(x.shape[0])[:, None]).reshape(-1)
        sums = np.bincount(flat, weights=x.reshape(-1), minlength=centroids.size).reshape(centroids.shape)
        counts = np.bincount(flat, minlength=centroids.size).reshape(centroids.shape)
        # an empty cluster keeps its centroid
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    centroids = np.sort(centroids.astype(np.float16).astype(np.float32), axis=1)  # stored as float16
    return _nearest(x, centroids).astype(np.uint8), centroids


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (centroids sorted per row): the count of midpoints below x."""
    ordered = np.sort(centroids, axis=1)
    order = np.argsort(centroids, axis=1)
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) / 2
    rank = (x[:, :, None] > midpoints[:, None, :]).sum(axis=2)
    return np.take_along_axis(order, rank, axis=1)
