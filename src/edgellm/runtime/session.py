"""A session: one conversation with a loaded model (its KV cache, the tokens in it, the chat
messages), apart from the model, so that one model serves several conversations.

Metrics as the seed documents define them: TTFT is the time from the request until the first
answer token is known; tokens/s counts answer tokens after the first over the time after it.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import EdgeLLMError
from .engine import VERIFY_ROWS
from .sampling import Sampler, SamplingParams
from .strategies import Drafter, DraftLength, SpeculationStats, _common_prefix, verify
from .text import StreamDecoder


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    gen_tokens: int
    ttft_s: float
    decode_tps: float
    peak_rss_mb: float
    finish_reason: str = "length"
    logits: list = field(default_factory=list, repr=False)
    speculation: dict | None = None  # SpeculationStats.as_dict() when a drafter was used

    def metrics(self) -> dict:
        d = asdict(self)
        for k in ("token_ids", "finish_reason", "logits"):
            d.pop(k)
        if d["speculation"] is None:
            d.pop("speculation")
        return d


class Session:
    def __init__(self, model):
        self.model = model
        self.codec = model.codec
        self.engine_session = model.engine.open_session()
        self.max_num_tokens = model.engine.spec.max_num_tokens
        self.tokens: list[int] = []  # tokens whose K/V are in the cache, in order
        self.messages: list[dict] = []

    def close(self) -> None:
        self.engine_session.close()

    def reset(self) -> None:
        self.tokens = []
        self.messages = []

    def generate(self, prompt: str, chat: bool = False, **kw) -> Generation:
        """Complete prompt (raw text), or answer it as one user turn in the chat template."""
        ids = self.codec.encode_chat([{"role": "user", "content": prompt}]) if chat else self.codec.encode(prompt)
        return self.generate_ids(ids, **kw)

    def chat(self, message: str, **kw) -> Generation:
        """One turn of a multi-turn conversation; the KV cache of earlier turns is reused."""
        self.messages.append({"role": "user", "content": message})
        result = self.generate_ids(self.codec.encode_chat(self.messages), **kw)
        self.messages.append({"role": "assistant", "content": result.text})
        return result

    def generate_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        ignore_eos: bool = False,
        stop: tuple[str, ...] = (),
        on_text: Callable[[str], None] | None = None,
        return_logits: bool = False,
        drafter: Drafter | None = None,
        draft_max: int = 4,
    ) -> Generation:
        """Prefill (reusing the cached prefix), then decode: one row per call, or, with a
        drafter, up to draft_max drafted tokens checked per call (strategies.py)."""
        t0 = time.perf_counter()
        n = len(prompt_ids)
        if n == 0:
            raise EdgeLLMError("the prompt is empty")
        if n >= self.max_num_tokens:
            raise EdgeLLMError(f"the prompt has {n} tokens; the context holds {self.max_num_tokens} (compile with a larger --max_num_tokens)")
        sampler = Sampler(sampling or SamplingParams())
        length = DraftLength(draft_max) if drafter else None
        stats = SpeculationStats()
        reuse = min(_common_prefix(self.tokens, prompt_ids), n - 1)  # at least one token must run to give logits
        self.tokens = list(prompt_ids[:reuse])  # before the cache changes: a failed prefill leaves no stale prefix
        self.engine_session.truncate(reuse)
        logits = self.engine_session.prefill(prompt_ids, reuse)
        self.tokens = list(prompt_ids)
        out: list[int] = []
        all_logits = []
        stream = StreamDecoder(self.codec)
        finish = None
        t_first = None
        chosen = [(sampler(logits), logits)]  # tokens decided, with the logits each was chosen from
        while True:
            for token, row in chosen:  # emit in order until something stops the answer
                if return_logits:
                    all_logits.append(row)
                if t_first is None:
                    t_first = time.perf_counter()
                if token in self.codec.eos_ids and not ignore_eos:
                    finish = "eos"
                    break
                out.append(token)
                piece = stream.push(token)
                if stop and any(s in stream.text for s in stop):
                    finish = "stop"
                    break
                if on_text and piece:
                    on_text(piece)
                if len(out) >= max_new_tokens:
                    finish = "length"
                    break
            if finish:
                break
            pending = chosen[-1][0]  # decided, not yet in the cache
            position = len(self.tokens)
            if position >= self.max_num_tokens:
                finish = "context"
                break
            # at most VERIFY_ROWS - 1 drafts: a call of more rows would run the prefill program, whose
            # logits are not a decode step's (greedy speculation would then change the tokens)
            k = min(length.next() if length else 0, self.max_num_tokens - position - 1,
                    min(self.engine_session.spec.group_size, VERIFY_ROWS) - 1, max_new_tokens - len(out))
            t_draft = time.perf_counter()
            drafts, distributions = drafter.propose(self.tokens + [pending], k, sampler) if k > 0 else ([], None)
            t_call = time.perf_counter()
            rows = self.engine_session.forward([pending, *drafts], position, logits_from=0)
            t_done = time.perf_counter()
            kept, following = verify(drafts, distributions, rows, sampler)
            if length:  # what drafting and checking cost, for the next K
                length.update(len(drafts), kept, t_call - t_draft, t_done - t_call)
            if drafts:
                stats.drafted += len(drafts)
                stats.accepted += kept
                stats.verify_calls += 1
            self.tokens += [pending, *drafts[:kept]]
            if kept < len(drafts):
                self.engine_session.truncate(len(self.tokens))  # the rejected drafts' rows
            chosen = [(d, rows[i]) for i, d in enumerate(drafts[:kept])] + [(following, rows[kept])]
        t_end = time.perf_counter()
        text = stream.text
        for s in stop:
            if s in text:
                text = text[: text.index(s)]
        decode_time = t_end - t_first
        return Generation(
            text=text,
            token_ids=out,
            prompt_tokens=n,
            gen_tokens=len(out),
            ttft_s=t_first - t0,
            decode_tps=(len(out) - 1) / decode_time if len(out) > 1 and decode_time > 0 else 0.0,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            finish_reason=finish,
            logits=all_logits,
            speculation=stats.as_dict() if drafter else None,
        )
