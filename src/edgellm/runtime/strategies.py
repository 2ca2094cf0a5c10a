"""Generation strategies: how a session's next tokens are chosen from the target's logits.

Plain decoding runs one row per call. Speculative decoding has a drafter guess up to K tokens
after the pending one, and the target checks them all in one call of K+1 rows (its weights are
read once for all rows): `verify` keeps the drafts the target agrees with and gives the token that
follows them, so each call yields 1 to K+1 tokens. Drafters: another (smaller) edgellm build with
the same vocabulary (DraftModel), or n-gram matches in the context itself (PromptLookup, no
model). Greedy output is the same tokens with and without speculation; with sampling the
standard rejection rule (Leviathan et al., 2023) keeps the target's output distribution.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError
from .sampling import Sampler


@dataclass
class SpeculationStats:
    drafted: int = 0
    accepted: int = 0
    verify_calls: int = 0  # target calls that checked at least one draft token

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "verify_calls": self.verify_calls,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "mean_accepted_per_verify": self.accepted / self.verify_calls if self.verify_calls else 0.0}


class Drafter(ABC):
    @abstractmethod
    def propose(self, context: list[int], k: int, sampler: Sampler) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to k tokens likely to follow context, and the distributions they were drawn from
        (None: chosen deterministically, as n-gram lookup does)."""

    def close(self) -> None:
        pass


class PromptLookup(Drafter):
    """Drafts the tokens that followed the latest earlier occurrence of the context's last n tokens
    (n from max_ngram down to 1): text that copies from the prompt (rewrites, edits, quotes) is
    drafted from the prompt itself."""

    def __init__(self, max_ngram: int):
        if max_ngram < 1:
            raise EdgeLLMError(f"--lookup {max_ngram}: the n-gram size must be at least 1")
        self.max_ngram = max_ngram

    def propose(self, context, k, sampler):
        tokens = np.asarray(context, np.int64)
        end = len(tokens)
        for n in range(min(self.max_ngram, end - 1), 0, -1):
            tail = tokens[end - n :]
            # starts of earlier occurrences of the tail that are followed by at least one token
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: end - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                follow = int(hits[-1]) + n
                return [int(t) for t in tokens[follow : follow + k]], None
        return [], None


class DraftModel(Drafter):
    """A smaller edgellm build drafting for the target: its own session, kept in step with the
    target's context by truncating to their common prefix (O(1)) and prefilling the rest."""

    def __init__(self, model, target_vocab: dict[str, int], target_width: int, where: str):
        if model.codec.tokenizer.get_vocab() != target_vocab:
            raise EdgeLLMError(f"{where}: the draft model's vocabulary differs from the target's; a draft must share "
                               "its tokenizer")
        self.model = model
        self.width = target_width  # the target's logits; the draft's may be padded differently
        self.session = model.engine.open_session()
        self.tokens: list[int] = []  # what the draft session's cache holds

    def propose(self, context, k, sampler):
        limit = self.session.spec.max_num_tokens
        k = min(k, limit - len(context))  # the draft's own context may be shorter than the target's
        if k < 1:
            return [], None
        reuse = min(_common_prefix(self.tokens, context), len(context) - 1)
        self.tokens = list(context[:reuse])  # before the cache changes: an interrupted prefill leaves no stale prefix
        self.session.truncate(reuse)
        logits = self.session.prefill(context, reuse)
        self.tokens = list(context)
        drafts, distributions = [], []
        for i in range(k):
            if sampler.greedy:
                token = int(np.argmax(logits[: self.width]))
            else:
                q = sampler.distribution(_width(logits, self.width))
                token = sampler.draw(q)
                distributions.append(q)
            drafts.append(token)
            if i + 1 < k:
                logits = self.session.decode(token, len(self.tokens))
                self.tokens.append(token)
        return drafts, (None if sampler.greedy else distributions)

    def close(self) -> None:
        self.session.close()
        self.model.close()


class DraftLength:
    """How many tokens to draft next, from what drafting has been worth so far: the acceptance
    rate and the measured cost of drafting and of verify calls, down to not drafting at all.

    The i-th draft token is accepted with about rate**i (rate: a decayed share of draft tokens
    accepted), so k drafts yield 1 + rate + ... + rate**k tokens per call, for the time of k draft
    tokens and one verify call of k + 1 rows. k is the one with the most tokens per second, 0
    (a plain decode step) included: on a build whose verify rows cost nearly a step each, or with
    a slow draft, speculation stops instead of slowing decoding down. Costs are measured as the
    calls run (decayed averages; until a row count has been timed, a verify call is assumed to
    cost a step plus 10% per extra row; the first call is a plain step, to time one). While 0 wins, a
    probe token after PROBE calls, then after twice as many, and so on, keeps the rate and the
    costs current, so a text that turns predictable is noticed."""

    PROBE = 16
    DECAY = 0.8

    def __init__(self, k_max: int):
        if k_max < 1:
            raise EdgeLLMError(f"--draft-max {k_max}: draft at least 1 token")
        self.k_max = k_max
        self.accepted, self.tried = 1.0, 2.0  # a prior of one half
        self.call: dict[int, float] = {}  # drafts -> seconds of a target call checking them (0: a decode step)
        self.draft_token = 0.0  # seconds the drafter takes per drafted token
        self.idle = 0
        self.probe_every = self.PROBE

    @property
    def rate(self) -> float:
        return self.accepted / self.tried

    def _seconds(self, k: int) -> float:
        step = self.call[0]
        return self.draft_token * k + self.call.get(k, step * (1 + 0.1 * k))

    def next(self) -> int:
        if 0 not in self.call:  # a plain step first: every cost is weighed against it
            return 0
        gains = [sum(self.rate ** i for i in range(k + 1)) / self._seconds(k) for k in range(self.k_max + 1)]
        best = max(range(self.k_max + 1), key=lambda k: (gains[k], -k))
        if best > 0:
            self.idle, self.probe_every = 0, self.PROBE
            return best
        self.idle += 1
        if self.idle < self.probe_every:
            return 0
        # a probe costs a draft model its catching up with the context: each one that does not
        # bring drafting back doubles the wait for the next
        self.idle, self.probe_every = 0, min(2 * self.probe_every, 64 * self.PROBE)
        return 1

    def update(self, drafted: int, accepted: int, draft_seconds: float = 0.0, call_seconds: float | None = None) -> None:
        if drafted:
            rejected = 1 if accepted < drafted else 0  # tokens after a rejection were never tried
            self.accepted = self.DECAY * self.accepted + accepted
            self.tried = self.DECAY * self.tried + accepted + rejected
            per_token = draft_seconds / drafted
            self.draft_token = per_token if not self.draft_token else self.DECAY * self.draft_token + (1 - self.DECAY) * per_token
        if call_seconds is not None:
            old = self.call.get(drafted)
            self.call[drafted] = call_seconds if old is None else self.DECAY * old + (1 - self.DECAY) * call_seconds


def verify(drafts: list[int], distributions: list[np.ndarray] | None, logits: np.ndarray,
           sampler: Sampler) -> tuple[int, int]:
    """The target's rows logits [len(drafts) + 1, vocab] (row i: after the pending token and
    drafts[:i]) against the drafts: (how many drafts are kept, the token that follows them).

    Greedy: a draft is kept while it is the target's argmax. Sampling: draft i is kept with
    probability min(1, p(d) / q(d)), p the target's distribution, q the draft's (one-hot for a
    deterministic drafter); at the first rejection the next token is drawn from max(0, p - q),
    renormalized; if all are kept, from the last row. Either way each token is distributed as
    the target alone would draw it."""
    for i, draft in enumerate(drafts):
        if sampler.greedy:
            best = int(np.argmax(logits[i]))
            if best != draft:
                return i, best
            continue
        p = sampler.distribution(logits[i])
        if distributions is None:
            q = np.zeros_like(p)
            q[draft] = 1.0
        else:
            q = distributions[i]
        if sampler.rng.random() < min(1.0, p[draft] / q[draft]):
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return i, sampler.draw(residual / total) if total > 0 else sampler.draw(p)
    return len(drafts), sampler(logits[len(drafts)])


def _width(logits: np.ndarray, width: int) -> np.ndarray:
    """Logits cut or padded (with -inf: never drawn) to the target's width."""
    if logits.size >= width:
        return logits[:width]
    return np.concatenate([logits, np.full(width - logits.size, -np.inf, logits.dtype)])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
