"""Tokenizer, chat template and incremental detokenization for the runtime (no transformers)."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import EdgeLLMError
from .chat_template import ChatTemplate


def _give_back_freed_heap() -> None:
    """Parsing a tokenizer.json leaves its parse tree's memory freed but kept by glibc for later
    allocations: Gemma 3's (262k tokens, 515k merges) left the process at 305 MB resident, 112 MB
    once returned, which is most of what a run's peak memory has beyond its weights and cache.
    Elsewhere (no malloc_trim) nothing to do."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class TextCodec:
    def __init__(self, runtime_dir: Path):
        self.path = runtime_dir / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the tokenizers library reports a missing or malformed file as a plain Exception
            raise EdgeLLMError(f"{runtime_dir / 'tokenizer.json'}: not a tokenizer ({str(e)[:200]}); "
                               f"run `edgellm compile ... --devkit`") from None
        _give_back_freed_heap()
        try:
            self.settings = json.loads((runtime_dir / "runtime_config.json").read_text())
            if not isinstance(self.settings, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise EdgeLLMError(f"{runtime_dir / 'runtime_config.json'}: unreadable ({e}); "
                               f"run `edgellm compile ... --devkit`") from None
        self.eos_ids = set(self.settings.get("eos_token_ids") or [])
        self.image_marker: str | None = None  # a vision-language model's image token, as text
        self.no_chat: str | None = None  # why this model takes no conversation (PaliGemma), if it takes none
        template = self.settings.get("chat_template")
        self._template: ChatTemplate | None = None
        self._template_error: str | None = None  # a template that does not parse: chat fails, generate works
        if template:
            try:
                self._template = ChatTemplate(template, str(runtime_dir / "runtime_config.json"))
            except EdgeLLMError as e:
                self._template_error = str(e)

    def encode(self, text: str, special: bool = True) -> list[int]:
        try:
            text.encode("utf-8")  # a command line's invalid bytes arrive as lone surrogates
        except UnicodeEncodeError as e:
            bad = ord(text[e.start])
            # a command line's invalid bytes are U+DC80..U+DCFF; other lone surrogates come from elsewhere (a template)
            what = f"byte {bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"a lone surrogate U+{bad:04X}"
            raise EdgeLLMError(f"the text is not valid UTF-8 ({what} at character {e.start})") from None
        try:
            return self.tokenizer.encode(text, add_special_tokens=special).ids
        except Exception as e:  # noqa: BLE001 (the tokenizers library raises plain Exceptions)
            raise EdgeLLMError(f"{self.path}: the tokenizer cannot encode this text ({str(e)[:200]})") from None

    def decode(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except Exception as e:  # noqa: BLE001 (as encode)
            raise EdgeLLMError(f"{self.path}: the tokenizer cannot decode tokens {ids[:8]} ({str(e)[:200]})") from None

    def render_chat(self, messages: list[dict]) -> str:
        if self.no_chat:
            raise EdgeLLMError(self.no_chat)
        if self._template_error:
            raise EdgeLLMError(self._template_error)
        if self._template is None:
            # No template in the model: plain role-prefixed turns, so chat still works.
            return "".join(f"{m['role']}: {self._plain(m['content'])}\n" for m in messages) + "assistant:"
        images = any(not isinstance(m.get("content"), str) for m in messages)
        return self._template.render(
            "these messages (with image parts)" if images else "these messages",
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.settings.get("bos_token") or "",
            eos_token=self.settings.get("eos_token") or "",
        )

    def _plain(self, content) -> str:
        """A message's content as text: content parts (a message with images) joined, each image
        as the image marker on a line of its own."""
        if isinstance(content, str):
            return content
        return "".join(f"{self.image_marker}\n" if part["type"] == "image" else part["text"] for part in content)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes BOS itself where the model wants it (as transformers does).
        return self.encode(self.render_chat(messages), special=False)


class StreamDecoder:
    """Turns generated ids into text pieces as they come, holding back incomplete characters.

    Each step decodes only a short window (the ids since the last emitted piece, plus the ones
    before it for context: tokenizers decode a token differently at the start of a text), so a
    long answer costs linear time, not quadratic.
    """

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: context ids already emitted
        self._read = 0  # ids before this are emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.codec.decode(self.ids[self._prefix : self._read])
        window = self.codec.decode(self.ids[self._prefix :])
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""  # an incomplete character (or nothing visible yet): wait for more ids
        piece = window[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece
