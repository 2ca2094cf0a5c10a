"""`edgellm eval`: perplexity on a text and agreement with a reference build.

The default text is Python's own documentation topics (pydoc_data, shipped with every Python),
so the number can be reproduced offline; it depends on the Python version, which is reported.
The text is cut into windows of the model's context; each window starts from an empty cache and
predicts its own tokens 2..n, so every build sees the same windows.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..record import BuildRecord

DEFAULT_TOKENS = 2048


def default_text() -> tuple[str, str]:
    """(text, description): the pydoc topics in name order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)), f"pydoc_data topics (Python {platform.python_version()})"


@dataclass
class Score:
    model: str
    precision: str
    tokens: int
    perplexity: float
    agreement: float | None = None  # top-1 agreement with the reference, 0..1
    kl: float | None = None  # mean KL(reference || model) per token, nats

    def as_dict(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size) if len(ids[i : i + size]) > 1]


def evaluate(model, ids: list[int], reference=None, name: str = "", precision: str = "", window: int | None = None,
             adapter: tuple[str, float] | None = None) -> Score:
    """model, reference: runtime.Model instances. ids: the tokenized text. window: tokens per
    window (default and at most: the context of the builds). adapter: the model's LoRA adapter
    (name, scale) to score."""
    size = model.max_num_tokens if reference is None else min(model.max_num_tokens, reference.max_num_tokens)
    size = min(size, window) if window else size
    nll, agree, kl, count = 0.0, 0, 0.0, 0
    own = model.session()  # its own cache: the model's conversations are untouched
    if adapter is not None:
        own.set_adapter(*adapter)
    session = own.engine_session
    ref_session = reference.engine.open_session() if reference is not None else None
    for window in windows(ids, size):
        logp = log_softmax(session.prompt_logits(window)[:-1])
        targets = np.array(window[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        if reference is not None:
            ref = log_softmax(ref_session.prompt_logits(window)[:-1])
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            kl += float((np.exp(ref) * (ref - logp)).sum())
        count += len(targets)
    session.close()
    if ref_session is not None:
        ref_session.close()
    return Score(
        model=name, precision=precision, tokens=count, perplexity=float(np.exp(nll / count)),
        agreement=agree / count if reference is not None else None, kl=kl / count if reference is not None else None,
    )


def precision_summary(model_dir: Path) -> str:
    """What the build stored (its build record): e.g. "int4.json + int8 embeddings"."""
    return BuildRecord.load(model_dir).summary()
