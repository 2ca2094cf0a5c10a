"""A compiled model: prefill, decode, sampling, chat history and metrics.

Metrics as the seed documents define them: TTFT is the time from the request until the first
answer token is known; tokens/s counts answer tokens after the first over the time after it.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..config.model_config import ModelConfig
from ..errors import EdgeLLMError
from .engine import Engine, EngineSpec
from .sampling import Sampler, SamplingParams
from .text import StreamDecoder, TextCodec


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

    def metrics(self) -> dict:
        d = asdict(self)
        for k in ("token_ids", "finish_reason", "logits"):
            d.pop(k)
        return d


class Model:
    def __init__(self, path: Path, engine: Engine, codec: TextCodec, cfg: ModelConfig):
        self.path, self.engine, self.codec, self.config = path, engine, codec, cfg
        self.tokenizer = codec.tokenizer
        self.max_num_tokens = engine.spec.max_num_tokens
        self.cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self.messages: list[dict] = []

    @classmethod
    def load(cls, path, threads: int | None = None) -> "Model":
        path = Path(path)
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise EdgeLLMError(f"{path}: not an edgellm output directory (no manifest.json)")
        recorded = json.loads(manifest.read_text())
        if not recorded.get("complete"):
            raise EdgeLLMError(f"{path}: the build is incomplete; run `edgellm compile ... --resume`")
        cfg = ModelConfig.load(path / "model_config.json")
        codec = TextCodec(path / "runtime")
        s = codec.settings
        spec = EngineSpec(
            num_layers=cfg.num_layers,
            kv_width=cfg.num_kv_heads * cfg.head_dim,
            vocab_size=cfg.vocab_size,
            group_size=s["language_group_size"],
            max_num_tokens=s["max_num_tokens"],
            buckets=s["buckets"],
            int8_activations=s.get("int8_activations", False),
            return_logits=s.get("return_logits", False),
        )
        target = recorded.get("options", {}).get("target", "cpu")
        if target == "cpu":
            engine = Engine(path / "compiled" / "cpu", spec, threads)
        elif target == "native":
            from .native import NativeEngine

            engine = NativeEngine(path / "compiled" / "native", spec, threads)
        else:
            raise EdgeLLMError(f"{path}: built for {target}; its programs run on that machine "
                               f"(compiled/{target}/model_main), not in this runtime")
        return cls(path, engine, codec, cfg)

    def reset(self) -> None:
        self.cached = []
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
    ) -> Generation:
        t0 = time.perf_counter()
        n = len(prompt_ids)
        if n == 0:
            raise EdgeLLMError("the prompt is empty")
        if n >= self.max_num_tokens:
            raise EdgeLLMError(f"the prompt has {n} tokens; the context holds {self.max_num_tokens} (compile with a larger --max_num_tokens)")
        sampler = Sampler(sampling or SamplingParams())
        reuse = _common_prefix(self.cached, prompt_ids)
        reuse = min(reuse, n - 1)  # at least one token must run to produce logits
        logits = self.engine.prefill(prompt_ids, reuse)
        self.cached = list(prompt_ids)
        out: list[int] = []
        all_logits = []
        stream = StreamDecoder(self.codec)
        finish = "length"
        t_first = None
        while True:
            if return_logits:
                all_logits.append(logits)
            token = sampler(logits)
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
                break
            position = len(self.cached)
            if position >= self.max_num_tokens:
                finish = "context"
                break
            logits = self.engine.decode(token, position)
            self.cached.append(token)
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
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
