"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        # checked here, so the CLI, the Python API and the server refuse the same values
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise EdgeLLMError(f"temperature {self.temperature} (--temperature): use a finite number >= 0 (0: greedy)")
        if not (0 < self.top_p <= 1):  # also false for NaN
            raise EdgeLLMError(f"top_p {self.top_p} (--top-p): use a number above 0 and at most 1")
        if self.top_k < 0:
            raise EdgeLLMError(f"top_k {self.top_k} (--top-k): use 0 (no limit) or more")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise EdgeLLMError(f"seed {self.seed} (--seed): use 0 to 2**63 - 1")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities a sampled token is drawn from (temperature, top-k, top-p applied);
        greedy: one-hot at the argmax."""
        p = self.params
        if self.greedy:
            probs = np.zeros(logits.size)
            probs[int(np.argmax(logits))] = 1.0
            return probs
        x = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return probs

    def draw(self, probs: np.ndarray) -> int:
        return int(self.rng.choice(probs.size, p=probs))

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        return self.draw(self.distribution(logits))
