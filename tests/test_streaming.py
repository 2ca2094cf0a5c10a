"""Streaming detokenization: the pieces add up to the whole decoded answer."""

from __future__ import annotations

import pytest

from edgellm.runtime.text import StreamDecoder

TEXT = ("Streaming text: naïve café — 日本語のテキスト, emoji 🙂🚀, code `x = f(1, 2)`\n"
        "  indented line with  double  spaces, and numbers 1234567.\n") * 3


class _Codec:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_pieces_add_up_to_the_decoded_text(which, request):
    from tokenizers import Tokenizer

    from edgellm.sources.gguf_file import GGUFSource

    source = GGUFSource(request.getfixturevalue(f"{which}_gguf"))
    tok = Tokenizer.from_str(source.tokenizer().tokenizer_json)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    stream = StreamDecoder(_Codec(tok))
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == stream.text == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 2  # it streams, not just at the end
