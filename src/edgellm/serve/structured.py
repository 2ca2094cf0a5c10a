"""Structured output: an answer constrained to JSON (any object, or one valid under a JSON schema).

The grammar and the token masks come from llguidance (a maintained constrained-decoding library
that works from the tokenizer's own tokenizer.json, without torch). A schema it cannot enforce is
refused when the request arrives, never decoded unconstrained.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache

import numpy as np

from ..errors import EdgeLLMError


class JsonConstraint:
    """runtime.session.Constraint over one llguidance matcher: one answer's state in the grammar."""

    def __init__(self, matcher, width: int):
        self.matcher = matcher
        self.width = width
        self.mask = np.zeros((width + 31) // 32, np.int32)

    def allowed(self, logits: np.ndarray) -> np.ndarray:
        self.matcher.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        bits = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[: logits.size].astype(bool)
        return np.where(bits, logits, -np.inf)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise EdgeLLMError(f"the structured-output grammar rejected token {token}: {self.matcher.get_error()}")

    def finished(self) -> bool:
        return self.matcher.is_stopped()


class Grammars:
    """Compiles response_format values into constraint factories for one model's tokenizer."""

    def __init__(self, tokenizer_json: str, width: int, eos_ids: list[int]):
        self._args = tokenizer_json, width, eos_ids
        self._tokenizer = None
        self._lock = threading.Lock()
        self.width = width

    @property
    def tokenizer(self):
        with self._lock:  # built once (about a second), on the first structured request
            if self._tokenizer is None:
                import llguidance

                text, width, eos_ids = self._args
                self._tokenizer = llguidance.LLTokenizer(text, n_vocab=width, eos_token=eos_ids or None)
            return self._tokenizer

    def for_schema(self, schema: dict | None):
        """A function that makes a fresh JsonConstraint per answer; schema None: any JSON object.
        Raises EdgeLLMError (naming the problem) for a schema that cannot be enforced."""
        text = json.dumps({"type": "object"} if schema is None else schema, sort_keys=True)
        grammar = self._grammar(text)
        import llguidance

        tokenizer, width = self.tokenizer, self.width
        return lambda: JsonConstraint(llguidance.LLMatcher(tokenizer, grammar, log_level=0), width)

    @lru_cache(maxsize=64)  # noqa: B019 (one Grammars per server; the cache lives as long)
    def _grammar(self, schema_text: str) -> str:
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text)
        except ValueError as e:
            raise EdgeLLMError(f"the JSON schema cannot be used: {e}") from None
        # a warning means some part of the schema would not be enforced: refused as an error is
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error or messages:
            raise EdgeLLMError("the JSON schema cannot be enforced: " + " ".join(" ".join(messages).split()))
        return grammar
