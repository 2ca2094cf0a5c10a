"""The tokenizer rebuilt from GGUF metadata must encode exactly like transformers' GGUF loading."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from edgellm.errors import EdgeLLMError
from edgellm.sources.gguf_tokenizer import gguf_fields, tokenizer_from_gguf

gguf = pytest.importorskip("gguf")

MODEL_CACHE = Path(os.path.expanduser("~/.cache/edgellm-test-models"))

MIXED_TEXT = (
    "Hello, world! The year 2024 had 366 days; pi ≈ 3.14159 and 1,000,000 > 999.\n\n"
    "  Multiple   spaces,\ttabs\t\tand\r\nCRLF lines.   \n"
    "Café naïve façade — Ünïcödé “quotes” «guillemets» Ελληνικά русский.\n"
    "日本語のテキストと中文，한국어 텍스트。 Emoji: 😀🎉👍🏽 👨‍👩‍👧\n"
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\n"
    "if (a && b) { console.log(`${a}`); } // JS\n"
    "<|im_start|>user\nHi there<|im_end|>\n<start_of_turn>model\nSure.<end_of_turn>\n"
)
TEXTS = [
    MIXED_TEXT,
    "Hello world",
    " leading space and trailing space ",
    "    ",
    "\n\n\n",
    "a",
    "",
    "x1y22z333 4444 55555 12.5% $3,000",
    "  1\n\n  22\t\t333   4",  # whitespace runs before digits: where SmolLM2's "smollm" split is delicate
    "don't won't it's I'M we'll they've",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
]


# --- real GGUF files ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_fields(smollm2_gguf: Path) -> dict:
    return gguf_fields(gguf.GGUFReader(smollm2_gguf))


@pytest.fixture(scope="session")
def gemma3_fields(gemma3_gguf: Path) -> dict:
    return gguf_fields(gguf.GGUFReader(gemma3_gguf))


class Loaded:
    """One GGUF's tokenizer, built by edgellm and by transformers."""

    def __init__(self, path: Path, fields: dict):
        self.fields = fields
        start = time.perf_counter()
        self.files = tokenizer_from_gguf(self.fields)
        self.build_seconds = time.perf_counter() - start
        self.tok = Tokenizer.from_str(self.files.tokenizer_json)
        transformers = pytest.importorskip("transformers")
        self.hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session", params=["smollm2", "gemma3"])
def loaded(request) -> Loaded:
    path = request.getfixturevalue(f"{request.param}_gguf")
    return Loaded(path, request.getfixturevalue(f"{request.param}_fields"))


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_ids_match_transformers(loaded: Loaded, text: str):
    ours = loaded.tok.encode(text).ids
    theirs = loaded.hf(text)["input_ids"]
    assert ours == theirs
    # Without the post-processor too.
    bare = loaded.hf(text, add_special_tokens=False)["input_ids"]
    assert loaded.tok.encode(text, add_special_tokens=False).ids == bare


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_round_trips(loaded: Loaded, text: str):
    ids = loaded.tok.encode(text).ids
    prefix = loaded.files.bos_token if loaded.files.add_bos else ""
    decoded = loaded.tok.decode(ids, skip_special_tokens=False)
    assert decoded == prefix + text
    assert decoded == loaded.hf.decode(ids, skip_special_tokens=False)
    body = loaded.tok.encode(text, add_special_tokens=False).ids
    assert loaded.tok.decode(body, skip_special_tokens=False) == text


@pytest.mark.slow
def test_metadata_matches_transformers(loaded: Loaded):
    files, hf = loaded.files, loaded.hf
    assert files.chat_template == hf.chat_template
    assert files.bos_token == hf.bos_token
    assert files.bos_token_id == hf.bos_token_id
    assert files.eos_token == hf.eos_token
    assert files.eos_token_ids[0] == hf.eos_token_id
    assert files.add_bos == hf.add_bos_token
    assert len(set(files.eos_token_ids)) == len(files.eos_token_ids)
    # The BOS flag and the post-processor agree.
    first = loaded.tok.encode("hi").ids
    assert (first[0] == files.bos_token_id) == files.add_bos
    assert loaded.tok.get_vocab_size() == len(loaded.fields["tokenizer.ggml.tokens"])


@pytest.mark.slow
def test_control_tokens_are_single_ids(loaded: Loaded):
    tokens = loaded.fields["tokenizer.ggml.tokens"]
    types = loaded.fields["tokenizer.ggml.token_type"]
    control = [i for i, kind in enumerate(types) if kind == 3]
    assert control
    for i in control[:300]:
        assert loaded.tok.encode(tokens[i], add_special_tokens=False).ids == [i], tokens[i]
    # Embedded in text, a control token stays whole as well.
    i = control[-1]
    ids = loaded.tok.encode(f"ab {tokens[i]} cd", add_special_tokens=False).ids
    assert i in ids


@pytest.mark.slow
def test_smollm2_specifics(smollm2_fields: dict):
    fields = smollm2_fields
    files = tokenizer_from_gguf(fields)
    tok = Tokenizer.from_str(files.tokenizer_json)
    assert tok.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert tok.encode("<|im_end|>", add_special_tokens=False).ids == [2]
    assert files.add_bos is False
    assert files.bos_token == "<|im_start|>" and files.eos_token == "<|im_end|>"
    assert files.eos_token_ids[0] == 2 and 0 in files.eos_token_ids  # <|endoftext|> also ends generation
    assert "<|im_start|>" in (files.chat_template or "")


@pytest.mark.slow
def test_gemma3_specifics(gemma3_fields: dict):
    fields = gemma3_fields
    start = time.perf_counter()
    files = tokenizer_from_gguf(fields)
    seconds = time.perf_counter() - start
    # 262k tokens and ~515k derived merges; this takes a few seconds, not minutes.
    assert seconds < 60, seconds
    tok = Tokenizer.from_str(files.tokenizer_json)
    tokens = fields["tokenizer.ggml.tokens"]
    end_of_turn = tokens.index("<end_of_turn>")
    start_of_turn = tokens.index("<start_of_turn>")
    assert tok.encode("<start_of_turn>", add_special_tokens=False).ids == [start_of_turn]
    assert tok.encode("<end_of_turn>", add_special_tokens=False).ids == [end_of_turn]
    assert files.add_bos is True and files.bos_token == "<bos>" and files.bos_token_id == 2
    assert files.eos_token == "<eos>" and files.eos_token_ids[0] == 1
    # Gemma files do not name an end-of-turn token; llama.cpp recognises it by its text.
    assert end_of_turn in files.eos_token_ids
    ids = tok.encode("Hello").ids
    assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == "Hello"
    # Byte fallback: a character outside the vocabulary still round-trips.
    rare = "\U0001d11e\U000e0041"
    assert tok.decode(tok.encode(rare, add_special_tokens=False).ids) == rare


# --- synthetic metadata (fast) ------------------------------------------------------------------


def _hf_convert(fields: dict, architecture: str = "llama"):
    """transformers' own conversion of the same metadata (no special-token post-processing)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    renames = mapping.GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {name: fields[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in fields}
    backend, _ = mapping.convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend


def _sentencepiece_fields() -> dict:
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "▁h", "▁he", "ll", "llo", "▁hello", "▁w", "or", "▁wor",
              "ld", "▁world", "lo", "he", "el", "▁wo", "rld", "▁l", "▁lo", "ol", "ow", "▁low", "er", "▁lower"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<ctrl>", "<user>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 4]
    # Ties on purpose (every third piece shares a score), so the merge order's tie-breaking is tested too.
    piece_scores = [-float(i // 3) for i in range(len(pieces))]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + piece_scores + [0.0, 0.0]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


SYNTHETIC_TEXTS = ["hello world", " hello  world ", "lower lowered hell", "héllo\tworld 😀", "<ctrl>hello<user>", ""]


@pytest.mark.parametrize("text", SYNTHETIC_TEXTS)
def test_sentencepiece_llama_matches_transformers(text: str):
    fields = _sentencepiece_fields()
    files = tokenizer_from_gguf(fields)
    tok = Tokenizer.from_str(files.tokenizer_json)
    hf = _hf_convert(fields)
    assert tok.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False).ids
    assert files.add_bos is True and files.bos_token == "<s>" and files.eos_token_ids == [2]
    assert tok.encode(text).ids[:1] == [1]
    body = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(body, skip_special_tokens=False) == hf.decode(body, skip_special_tokens=False)
    if not text.startswith(" "):
        # Metaspace only prepends "▁" when the text does not start with one, and the decoder strips one
        # leading space, so a leading space is lost -- in transformers' tokenizer just the same.
        assert tok.decode(body, skip_special_tokens=False) == text


def test_sentencepiece_merge_order_matches_transformers():
    fields = _sentencepiece_fields()
    files = tokenizer_from_gguf(fields)
    ours = json.loads(files.tokenizer_json)["model"]["merges"]
    theirs = json.loads(_hf_convert(fields).to_str())["model"]["merges"]
    assert ours == theirs


def _byte_level_fields() -> dict:
    return {key: (list(value) if isinstance(value, list) else value) for key, value in _trained_byte_level().items()}


@functools.lru_cache(maxsize=None)
def _trained_byte_level() -> dict:
    """A small byte-level BPE trained here, written out the way a GGUF stores it."""
    from tokenizers import models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "1234 5678 numbers"] * 20
    trained.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ messages }}",
    }


@pytest.mark.parametrize("text", SYNTHETIC_TEXTS + ["the   quick\n\nfox 12345678 <|im_end|>"])
def test_byte_level_matches_transformers(text: str):
    fields = _byte_level_fields()
    files = tokenizer_from_gguf(fields)
    tok = Tokenizer.from_str(files.tokenizer_json)
    hf = _hf_convert(fields)
    assert tok.encode(text, add_special_tokens=False).ids == hf.encode(text, add_special_tokens=False).ids
    assert tok.encode(text).ids[:1] == [1] and files.add_bos is True
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert files.chat_template == "{{ messages }}"
    assert files.eos_token_ids == [2, 0]  # eos, then <|endoftext|>, which llama.cpp also treats as an end


def test_gguf_fields_reads_a_written_file(tmp_path: Path):
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "ab", "é"])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 1, 1])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, 0.5])
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    fields = gguf_fields(gguf.GGUFReader(path))
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == ["a", "b", "ab", "é"]
    assert fields["tokenizer.ggml.token_type"] == [1, 1, 1, 1]
    assert fields["tokenizer.ggml.scores"] == [0.0, -1.0, -2.5, 0.5]
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.bos_token_id"] == 0 and isinstance(fields["tokenizer.ggml.bos_token_id"], int)
    assert not any(key.startswith("GGUF.") for key in fields)


@pytest.mark.parametrize("model", ["bert", "rwkv", "no_vocab", ""])
def test_unsupported_tokenizer_model_is_a_user_error(model: str):
    fields = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(EdgeLLMError, match="not supported") as info:
        tokenizer_from_gguf(fields)
    assert repr(model) in str(info.value)


def test_malformed_tokenizer_metadata_is_a_user_error():
    with pytest.raises(EdgeLLMError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf({"general.architecture": "llama"})
    with pytest.raises(EdgeLLMError, match="tokenizer.ggml.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"})
    fields = _sentencepiece_fields()
    fields["tokenizer.ggml.bos_token_id"] = 10**6
    with pytest.raises(EdgeLLMError, match="bos_token_id"):
        tokenizer_from_gguf(fields)
    fields = _sentencepiece_fields()
    fields["tokenizer.ggml.scores"] = fields["tokenizer.ggml.scores"][:5]
    with pytest.raises(EdgeLLMError, match="scores"):
        tokenizer_from_gguf(fields)
    fields = _byte_level_fields()
    fields["tokenizer.ggml.merges"] = ["a b c"]
    with pytest.raises(EdgeLLMError, match="merges"):
        tokenizer_from_gguf(fields)
