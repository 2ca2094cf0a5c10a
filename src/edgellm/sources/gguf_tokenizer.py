"""Rebuild a Hugging Face `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, scores, token types and
special token ids as metadata under `tokenizer.ggml.*`. This module turns that metadata back into a
`tokenizers.Tokenizer` built from the library's own components, reproducing what transformers does
for `AutoTokenizer.from_pretrained(dir, gguf_file=name)` (transformers/integrations/gguf/
gguf_tokenizer_mapping.py), without importing transformers or torch.

Supported `tokenizer.ggml.model` values:

* "gpt2": byte-level BPE with merges (SmolLM2, Llama 3, Qwen, ...). The split regex is chosen by
  `tokenizer.ggml.pre`.
* "llama": SentencePiece BPE with byte fallback (Llama 2, Mistral, Gemma 1-3, Phi-3). The file has
  no merges; they are recovered from the vocabulary and the scores (for Gemma: the token order).
* "gemma4": SentencePiece BPE in Gemma's shape (no prefix space).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..config.fields import shown
from ..errors import EdgeLLMError
from .base import TokenizerFiles

log = logging.getLogger(__name__)

# llama.cpp's token types (tokenizer.ggml.token_type).
# (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4

_SPIECE_SPACE = "\u2581"  # "▁"

# --- pre-tokenizer split regexes for byte-level vocabularies, by tokenizer.ggml.pre ---------------
# Same strings as transformers' GGUF_PRE_TOKENIZER_SPLITS / llama.cpp's llama-vocab.cpp.

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PRE_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
# Pre types split with GPT-2's own regex, which ByteLevel(use_regex=True) applies by itself.
# "smollm" (like "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva") is here because
# transformers treats it so. llama.cpp, and SmolLM2's own tokenizer.json, first split every digit off
# (pre_tokenizers.Digits(individual_digits=True) before ByteLevel). The vocabulary has no token with a
# digit in it, so the two differ only where two or more whitespace characters precede a digit:
# "  1" is "ĠĠ" "1" in llama.cpp and "Ġ" "Ġ" "1" in transformers. We follow transformers.
_GPT2_DEFAULT_PRES = {
    None, "", "default", "gpt2", "gpt-2", "smollm", "starcoder", "refact", "command-r", "codeshell",
    "exaone", "minerva", "mpt", "olmo", "jais", "trillion", "granite-docling",
}

# Texts llama.cpp treats as end-of-generation when the file does not name them (llama-vocab.cpp).
_EOG_TEXTS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<end_of_utterance>",
}

_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3", "gemma3n"}
_SUPPORTED_MODELS = ("gpt2", "llama", "gemma4")


# --- reading a GGUFReader -------------------------------------------------------------------------


def gguf_fields(reader: Any) -> dict:
    """A `gguf.GGUFReader`'s key/value metadata as plain Python values.

    Strings are decoded, arrays become lists; the reader's own pseudo-fields (GGUF.version,
    GGUF.tensor_count, GGUF.kv_count) are left out.
    """
    out: dict = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = field.contents()
        except UnicodeDecodeError:
            out[name] = _field_contents_lenient(field)
    return out


def _field_contents_lenient(field: Any) -> Any:
    """Like ReaderField.contents(), but invalid UTF-8 becomes U+FFFD instead of raising."""
    import gguf

    def to_str(part: Any) -> str:
        return bytes(part.tobytes()).decode("utf-8", errors="replace")

    main = field.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == gguf.GGUFValueType.STRING:
            return [to_str(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if main == gguf.GGUFValueType.STRING:
        return to_str(field.parts[-1])
    return field.parts[-1].tolist()[0]


# --- building the tokenizer -----------------------------------------------------------------------


def tokenizer_from_gguf(fields: dict, path: Path | str | None = None) -> TokenizerFiles:
    """Build the tokenizer a GGUF file describes from its metadata (see `gguf_fields`); errors
    name the file at `path`."""
    try:
        return _tokenizer(fields)
    except EdgeLLMError as e:
        if path is None:
            raise
        raise EdgeLLMError(f"{path}: {e}") from None


def _tokenizer(fields: dict) -> TokenizerFiles:
    model_type = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if model_type is None:
        raise EdgeLLMError("GGUF file has no tokenizer (metadata key tokenizer.ggml.model is missing)")
    if not isinstance(model_type, str) or model_type not in _SUPPORTED_MODELS:
        raise EdgeLLMError(
            f"GGUF tokenizer model {model_type!r} (tokenizer.ggml.model) is not supported; "
            f"supported: {', '.join(_SUPPORTED_MODELS)}"
        )
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise EdgeLLMError("GGUF tokenizer.ggml.tokens is missing or is not a list of strings")
    n = len(tokens)
    token_types = _optional_list(fields, "tokenizer.ggml.token_type", n, _is_integer, "whole numbers")
    scores = _optional_list(fields, "tokenizer.ggml.scores", n, _is_score, "numbers")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
        raise EdgeLLMError("GGUF tokenizer.ggml.merges is not a list of strings")
    for key in ("general.architecture", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if not isinstance(fields.get(key, ""), str):
            raise EdgeLLMError(f"GGUF {key} is not text: {shown(fields[key])}")
    arch = fields.get("general.architecture")

    bos_id = _token_id(fields, "tokenizer.ggml.bos_token_id", n)
    eos_id = _token_id(fields, "tokenizer.ggml.eos_token_id", n)
    unk_id = _token_id(fields, "tokenizer.ggml.unknown_token_id", n)
    pad_id = _token_id(fields, "tokenizer.ggml.padding_token_id", n)

    if model_type == "llama":
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos = _flag(fields, "tokenizer.ggml.add_bos_token", True)
    elif model_type == "gemma4":
        # transformers follows the reference tokenizer here: the chat template writes <bos> itself.
        add_bos = False
    else:
        add_bos = _flag(fields, "tokenizer.ggml.add_bos_token", False)
    add_eos = _flag(fields, "tokenizer.ggml.add_eos_token", False)

    if model_type == "gpt2":
        tok, vocab = _byte_level(tokens, merges, fields.get("tokenizer.ggml.pre"))
        extra_special: list[str] = []
    else:
        gemma_shape = model_type == "gemma4" or arch in _GEMMA_ARCHS
        if merges is None and scores is None and not (model_type == "llama" and arch in _GEMMA_ARCHS):
            raise EdgeLLMError(
                "GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges nor tokenizer.ggml.scores"
            )
        unk = tokens[unk_id] if unk_id is not None else "<unk>"
        if model_type == "llama" and arch in _GEMMA_ARCHS:
            tok, vocab = _gemma_sentencepiece(tokens, merges, unk)
        elif gemma_shape:
            tok, vocab = _sentencepiece(tokens, merges, scores, unk, gemma_shape=True)
        else:
            add_prefix = _flag(fields, "tokenizer.ggml.add_space_prefix", True)
            tok, vocab = _sentencepiece(tokens, merges, scores, unk, add_prefix_space=add_prefix)
            if arch == "phi3":
                # Phi-3 prepends the space with a normalizer rather than Metaspace.
                tok.normalizer = normalizers.Sequence(
                    [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
                )
                tok.pre_tokenizer = None
        # GemmaTokenizer also registers a "<mask>" special token.
        extra_special = ["<mask>"] if gemma_shape else []

    _add_special_tokens(tok, vocab, tokens, token_types, byte_level=model_type == "gpt2")

    # bos/eos/unk/pad (and Gemma's mask) are special tokens in transformers' tokenizer too.
    named = [tokens[i] for i in (bos_id, eos_id, unk_id, pad_id) if i is not None] + extra_special
    named = [t for t in dict.fromkeys(named) if tok.token_to_id(t) is not None]
    if named:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])

    bos = tokens[bos_id] if bos_id is not None else None
    eos = tokens[eos_id] if eos_id is not None else None
    add_bos = add_bos and bos is not None
    add_eos = add_eos and eos is not None
    tok.post_processor = _template(bos, bos_id, add_bos, eos, eos_id, add_eos)

    eos_ids = _eog_ids(fields, tokens, token_types, eos_id)
    return TokenizerFiles(
        tokenizer_json=tok.to_str(),
        chat_template=fields.get("tokenizer.chat_template") or None,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos=add_bos,
        bos_token=bos,
        eos_token=eos,
    )


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_score(value) -> bool:
    # NaN would leave the merge order, which sorts by score, undefined
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _optional_list(fields: dict, key: str, n: int, valid, kind: str) -> list | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        got = f"a list of {len(value)}" if isinstance(value, list) else shown(value)
        raise EdgeLLMError(f"GGUF {key} should be a list of {n} entries, one per token, got {got}")
    for v in value:
        if not valid(v):
            raise EdgeLLMError(f"GGUF {key} should hold {kind}, got {shown(v)}")
    return value


def _token_id(fields: dict, key: str, n: int) -> int | None:
    value = fields.get(key)
    if value is None or (_is_integer(value) and value in (-1, 0xFFFFFFFF)):  # llama.cpp's "no such token"
        return None
    if not _is_integer(value) or not 0 <= value < n:
        raise EdgeLLMError(f"GGUF {key} = {shown(value)} is not a token id (the vocabulary has {n} tokens)")
    return value


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(
    tokens: list[str], merges: list[str] | None, pre: str | None
) -> tuple[Tokenizer, dict[str, int]]:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet already; respell any that are not (as transformers does).
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    if merges is not None:
        merge_pairs = [_split_merge(m) for m in merges]
    else:
        merge_pairs = _derive_merges(vocab, None)
    tok = _bpe(
        vocab=vocab,
        merges=merge_pairs,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    if pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_DEFAULT_PRES:
            log.warning("GGUF tokenizer.ggml.pre %r is not known; splitting text with GPT-2's regex", pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, vocab


def _bpe(**options) -> Tokenizer:
    try:
        return Tokenizer(models.BPE(**options))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of a token not in the vocabulary
        raise EdgeLLMError(f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})") from None


def _split_merge(merge: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise EdgeLLMError(
            f"GGUF tokenizer.ggml.merges entry {merge!r} is not two tokens separated by a space"
        )
    return parts[0], parts[1]


def _gemma_sentencepiece(
    tokens: list[str], merges: list[str] | None, unk: str
) -> tuple[Tokenizer, dict[str, int]]:
    """Gemma 1-3 files: tokens of only spaces are stored with real spaces, and the merge order
    follows the token order rather than the scores (transformers' `gemma_tokenizer`)."""
    respelled = [_SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    positions = {t: -i for i, t in enumerate(respelled)}
    return _sentencepiece(respelled, merges, None, unk, gemma_shape=True, merge_scores=positions)


def _sentencepiece(
    tokens: list[str],
    merges: list[str] | None,
    scores: list[float] | None,
    unk: str,
    *,
    gemma_shape: bool = False,
    add_prefix_space: bool = True,
    merge_scores: dict[str, float] | None = None,
) -> tuple[Tokenizer, dict[str, int]]:
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        merge_pairs = [_split_merge(m) for m in merges]
    else:
        if merge_scores is None:
            merge_scores = dict(zip(tokens, scores))
        merge_pairs = _derive_merges(vocab, merge_scores)
    tok = _bpe(
        vocab=vocab,
        merges=merge_pairs,
        dropout=None,
        fuse_unk=True,
        byte_fallback=True,
        unk_token=unk if unk in vocab else None,
    )
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma_shape:
        # GemmaTokenizer: spaces become "▁" and no space is prepended.
        tok.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        # LlamaTokenizer (legacy=False): Metaspace prepends "▁" to the first piece only.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPIECE_SPACE, prepend_scheme="first" if add_prefix_space else "never", split=False
        )
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, vocab


def _flag(fields: dict, key: str, default: bool) -> bool:
    """A true/false setting: GGUF's bool (or an integer 0 or 1); text such as "false" is refused,
    not read as true."""
    value = fields.get(key, default)
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise EdgeLLMError(f"GGUF {key} is not true or false: {shown(value)}")


def _derive_merges(vocab: dict[str, int], scores: dict[str, float] | None) -> list[tuple[str, str]]:
    """The merges a vocabulary implies: every split of a token into two tokens, best first.

    The same order as transformers' `generate_merges`: by score (descending) when scores are given,
    otherwise by token id (ascending); ties by the length of the left, then right, piece in the
    same direction, then by the token's position (stable sort).

    A split is tried only where both pieces have the length of some token: without that, each
    token cost the square of its length (a 100,000-character token took minutes); with it, a
    token costs one step per distinct token length below its own, and a slice only where both
    lengths occur.
    """
    reverse = scores is not None
    ranked = scores if scores is not None else vocab
    present = {len(t) for t in vocab}
    lengths = sorted(present - {0})  # an empty token is no piece of a split
    entries = []
    append = entries.append
    for token, rank in ranked.items():
        size = len(token)
        for i in lengths:
            if i >= size:
                break
            if size - i in present:
                left = token[:i]
                if left in vocab:
                    right = token[i:]
                    if right in vocab:
                        append((rank, i, size - i, left, right))
    entries.sort(key=lambda e: (e[0], e[1], e[2]), reverse=reverse)
    return [(e[3], e[4]) for e in entries]


def _add_special_tokens(
    tok: Tokenizer,
    vocab: dict[str, int],
    tokens: list[str],
    token_types: list[int] | None,
    *,
    byte_level: bool,
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so that
    both are matched whole in the input text (transformers' `add_gguf_special_tokens`)."""
    if not token_types:
        return
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, token_types)
        # In a byte-level vocabulary a control token outside the byte alphabet is a llama.cpp mislabel.
        if kind == _TOKEN_CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        tok.add_special_tokens(control)
    user_defined = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, token_types)
        if kind == _TOKEN_USER_DEFINED and (t in vocab or tok.token_to_id(t) is not None)
    ]
    if user_defined:
        tok.add_tokens(user_defined)


def _template(
    bos: str | None, bos_id: int | None, add_bos: bool, eos: str | None, eos_id: int | None, add_eos: bool
) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence, the way transformers' `update_post_processor` writes it."""
    head = f"{bos}:0 " if add_bos else ""
    tail = f" {eos}:0" if add_eos else ""
    single = f"{head}$A:0{tail}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = []
    if add_bos:
        special.append((bos, bos_id))
    if add_eos and eos != bos:
        special.append((eos, eos_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _eog_ids(fields: dict, tokens: list[str], token_types: list[int] | None, eos_id: int | None) -> list[int]:
    """Ids that end generation: EOS, the file's EOT/EOM, and control tokens llama.cpp recognises
    as end-of-turn by their text (e.g. Gemma's <end_of_turn>, which Gemma files do not name)."""
    n = len(tokens)
    ids = [eos_id]
    ids.append(_token_id(fields, "tokenizer.ggml.eot_token_id", n))
    ids.append(_token_id(fields, "tokenizer.ggml.eom_token_id", n))
    if token_types is not None:
        ids.extend(i for i, t in enumerate(tokens) if t in _EOG_TEXTS and token_types[i] == _TOKEN_CONTROL)
    return [i for i in dict.fromkeys(ids) if i is not None]


__all__ = ["tokenizer_from_gguf", "gguf_fields"]
