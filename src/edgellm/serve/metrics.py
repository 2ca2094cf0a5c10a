"""The server's /metrics (Prometheus text format, through prometheus_client; one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..runtime.session import Generation


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("edgellm_prompt_cached_tokens", "prompt tokens whose KV cache was reused",
                                     registry=r)
        self.generated_tokens = Counter("edgellm_generated_tokens", "answer tokens generated", registry=r)
        self.prompt_seconds = Counter("edgellm_prompt_seconds", "seconds spent in prefill", registry=r)
        self.decode_seconds = Counter("edgellm_decode_seconds", "seconds spent in batched decode steps", registry=r)
        self.requests = Counter("edgellm_requests", "requests that ended, by outcome", ["outcome"], registry=r)
        self.abandoned = Counter("edgellm_requests_abandoned", "requests whose client left, by where they were",
                                 ["stage"], registry=r)
        self.running = Gauge("edgellm_requests_running", "requests holding a session", registry=r)
        self.queued = Gauge("edgellm_requests_queued", "requests waiting for a session", registry=r)
        self.drafted = Counter("edgellm_speculative_drafted_tokens", "tokens drafted for verification", registry=r)
        self.accepted = Counter("edgellm_speculative_accepted_tokens", "drafted tokens the model accepted", registry=r)
        self.prefix_bytes = Gauge("edgellm_prefix_store_bytes", "bytes of finished conversations' KV caches kept",
                                  registry=r)
        self.prefix_entries = Gauge("edgellm_prefix_store_conversations", "finished conversations kept", registry=r)
        self.prefix_loads = Counter("edgellm_prefix_store_loads", "prompts that began from a kept conversation",
                                    registry=r)
        self.prefix_evictions = Counter("edgellm_prefix_store_evictions", "kept conversations dropped, by why",
                                        ["reason"], registry=r)
        self.batch_rows = Histogram("edgellm_decode_batch_rows", "rows per batched decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def count(self, result: Generation) -> None:
        self.prompt_tokens.inc(result.prompt_tokens)
        self.cached_tokens.inc(result.cached_tokens)
        self.generated_tokens.inc(result.gen_tokens)
        if result.speculation:
            self.drafted.inc(result.speculation["drafted"])
            self.accepted.inc(result.speculation["accepted"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
