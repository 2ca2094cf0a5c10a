"""A Hugging Face model directory: config.json, safetensors (single or sharded), tokenizer files.

Tensors are memory-mapped and converted one at a time, so the whole model never sits in memory
as float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path, PurePosixPath

import numpy as np

from ..config.fields import flag, shown
from ..errors import EdgeLLMError
from ..quant.blocks import BlockQuantized
from .base import TokenizerFiles

# safetensors dtype -> (numpy dtype of the stored bits, converter to float32)
_DTYPES = {
    "F32": (np.float32, None),
    "F16": (np.float16, None),
    "F64": (np.float64, None),
    "BF16": (np.uint16, lambda a: (a.astype(np.uint32) << 16).view(np.float32)),
}
# integer tensors of pre-quantized checkpoints (packed weights, zero points, group indices)
_INTEGER_DTYPES = {"I32": np.int32, "I64": np.int64, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
# bytes per value of the format's whole-byte dtypes, to check each entry's length; a file may hold
# types edgellm does not read, as long as no tensor the model needs is one
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2,
                "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


class SafetensorsFile:
    """Header + memory map of one .safetensors file.

    The safetensors package's numpy backend cannot return bfloat16, the commonest dtype of
    published checkpoints, so the (documented, tiny) header is read here and tensors are mapped.
    """

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():  # opening a FIFO waits for a writer; a device never ends
            raise EdgeLLMError(f"{path}: {'not a regular file' if path.exists() else 'missing'}")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:  # (so a huge length is never allocated)
                    raise ValueError("header length beyond end of file")
                header = json.loads(f.read(header_len))
        except (struct.error, ValueError, RecursionError) as e:  # (JSON and UTF-8 errors are ValueErrors)
            raise EdgeLLMError(f"{path}: not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise EdgeLLMError(f"{path}: the safetensors header must be a JSON object, got {shown(header)}")
        self.data_start = 8 + header_len
        header.pop("__metadata__", None)
        for name, entry in header.items():
            self._check(name, entry)
        # tensors may not share bytes: one tensor's offsets pointing into another's (or, negative,
        # into the header) would be read as weights
        spans = sorted((*e["data_offsets"], name) for name, e in header.items() if e["data_offsets"][0] < e["data_offsets"][1])
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise EdgeLLMError(f"{path}: tensors {shown(first)} and {shown(second)} overlap in the file")
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise EdgeLLMError(f"{path}: truncated safetensors file ({size} bytes, header needs {self.data_start + end})")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def _check(self, name: str, entry) -> None:
        """One header entry: a known dtype, a shape, and offsets whose span holds exactly that tensor."""
        where = f"{self.path}: tensor {shown(name)}"
        if not isinstance(entry, dict):
            raise EdgeLLMError(f"{where}: the header entry must be a JSON object, got {shown(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
            raise EdgeLLMError(f"{where}: unknown dtype {shown(dtype)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise EdgeLLMError(f"{where}: shape must be a list of whole numbers, got {shown(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise EdgeLLMError(f"{where}: data_offsets must be two whole numbers 0 <= begin <= end, got {shown(offsets)}")
        needed = math.prod(shape) * _DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != needed:
            raise EdgeLLMError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; shape {shown(shape)} "
                               f"of {dtype} takes {needed}")

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored: integers as they are, floats as float32."""
        entry = self.entries[name]
        if entry["dtype"] in _INTEGER_DTYPES:
            begin, end = entry["data_offsets"]
            return self._map[self.data_start + begin : self.data_start + end].view(_INTEGER_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return self.tensor(name)

    def tensor(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise EdgeLLMError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        stored, convert = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        raw = self._map[self.data_start + begin : self.data_start + end].view(stored).reshape(entry["shape"])
        return convert(raw) if convert else raw.astype(np.float32)


class SafetensorsDirSource:
    default_precision = "BF16"  # the compile manual's default

    def __init__(self, path: Path):
        self.path = path
        config_path = path / "config.json"
        if not config_path.is_file():
            raise EdgeLLMError(f"{config_path}: missing (a Hugging Face model directory needs config.json)")
        self.raw_config = _read_json(config_path)
        self.config_path = config_path
        self._where: dict[str, SafetensorsFile] = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self._where = _indexed(path, index)
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise EdgeLLMError(f"{path}: no *.safetensors weights found")
            for shard in shards:
                st = SafetensorsFile(shard)
                self._where.update({name: st for name in st.entries})
        self.files = sorted({st.path for st in self._where.values()}) + [config_path]
        # a vision-language model's image processor settings (config/vision.py), if it has one
        processor = path / "preprocessor_config.json"
        self.image_processor = _read_json(processor) if processor.is_file() else None  # (config/vision.py checks it)
        if self.image_processor is not None:
            self.files.append(processor)
        self.prequantized = None
        if self.raw_config.get("quantization_config") is not None:  # (null: not quantized, as transformers reads it)
            from .prequantized import PrequantizedReader

            self.prequantized = PrequantizedReader(
                self.raw_config["quantization_config"], _LazyArrays(self._where), set(self._where), str(config_path))

    def tensor_names(self) -> list[str]:
        names = set(self._where)
        if self.prequantized:
            names |= self.prequantized.weight_names()
        return sorted(names)

    def tensor(self, name: str) -> np.ndarray:
        blocks = self.packed(name)
        if blocks is not None:
            return blocks.dequantize()
        if name not in self._where:
            raise EdgeLLMError(f"{self.path}: tensor '{name}' not found in the safetensors files")
        return self._where[name].tensor(name)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.prequantized and self.prequantized.origin(name):
            return self.prequantized.shape(name)
        return tuple(self._where[name].entries[name]["shape"])

    def storage(self, name: str) -> str:
        return (self.prequantized.origin(name) if self.prequantized else None) or "float"

    def packed(self, name: str) -> BlockQuantized | None:
        """Integer blocks of a pre-quantized checkpoint's linear weight (GPTQ, AWQ, compressed-tensors)."""
        return self.prequantized.blocks(name) if self.prequantized else None

    def tokenizer(self) -> TokenizerFiles:
        tok_path = self.path / "tokenizer.json"
        if not tok_path.is_file():
            raise EdgeLLMError(f"{tok_path}: missing (edgellm needs the fast tokenizer file)")
        cfg = _read_json(self.path / "tokenizer_config.json")
        gen = _read_json(self.path / "generation_config.json")
        template = _chosen_template(cfg.get("chat_template"), self.path / "tokenizer_config.json")
        jinja = self.path / "chat_template.jinja"
        processor_template = _read_json(self.path / "chat_template.json").get("chat_template")  # a processor's (VLMs)
        if processor_template is not None and not isinstance(processor_template, str):
            raise EdgeLLMError(f"{self.path / 'chat_template.json'}: chat_template must be a string")
        if jinja.is_file():
            template = _read_text(jinja)
        elif processor_template and not template:
            template = processor_template
        from tokenizers import Tokenizer

        tokenizer_json = _read_text(tok_path)
        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # noqa: BLE001 (the tokenizers library raises plain Exceptions)
            raise EdgeLLMError(f"{tok_path}: not a tokenizer the tokenizers library reads ({shown(str(e))})") from None

        def token_id(key):
            token = cfg.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            if token is not None and not isinstance(token, str):
                raise EdgeLLMError(f"{self.path / 'tokenizer_config.json'}: {key} must be a string or "
                                   f"{{\"content\": string}}, got {shown(token)}")
            return (tok.token_to_id(token) if token else None), token

        bos_id, bos = token_id("bos_token")
        eos_id, eos = token_id("eos_token")
        eos_ids = self._token_ids(gen, "eos_token_id")
        if eos_id is not None and eos_id not in eos_ids:
            eos_ids.append(eos_id)
        if bos_id is None:
            bos_id = next(iter(self._token_ids(gen, "bos_token_id")), None)
        return TokenizerFiles(
            tokenizer_json=tokenizer_json,
            chat_template=template,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos=flag(cfg, "add_bos_token", str(self.path / "tokenizer_config.json"), False),
            bos_token=bos,
            eos_token=eos,
        )

    def _token_ids(self, generation: dict, key: str) -> list[int]:
        """key's token id, or list of ids, from generation_config.json, else config.json (as
        transformers reads them); ids the runtime compares with the tokens it samples."""
        where, value = ((self.path / "generation_config.json", generation[key]) if key in generation
                        else (self.config_path, self.raw_config.get(key)))
        ids = list(value) if isinstance(value, list) else [] if value is None else [value]
        if not all(type(i) is int and i >= 0 for i in ids):
            raise EdgeLLMError(f"{where}: {key} must be a token id or a list of them, got {shown(value)}")
        return ids

    def fingerprint(self) -> str:
        return _fingerprint(self.files)


class _LazyArrays:
    """name -> stored array, read from the memory-mapped shards on access."""

    def __init__(self, where: dict[str, SafetensorsFile]):
        self._where = where

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(name)
        return self._where[name].raw(name)

    def get(self, name: str, default=None):
        return self[name] if name in self._where else default


def _indexed(model: Path, index: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> its shard, from model.safetensors.index.json. The index is input like the
    weights: it may name only files in the model directory (not /dev/zero, not ../../elsewhere).
    A shard that is a link is followed (the Hugging Face cache links each file to a blob)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise EdgeLLMError(f"{index}: 'weight_map' must map each tensor name to a shard file name, got {shown(weight_map)}")
    shards = {}
    for name in sorted(set(weight_map.values())):
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise EdgeLLMError(f"{index}: shard {name!r} is not a file in the model directory")
        shards[name] = SafetensorsFile(model / relative)
    for tensor, name in weight_map.items():
        if tensor not in shards[name].entries:
            raise EdgeLLMError(f"{index}: tensor {shown(tensor)} is in {name} by the index, but that file does not hold it")
    return {tensor: shards[name] for tensor, name in weight_map.items()}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # (JSON and UTF-8 errors are ValueErrors)
        raise EdgeLLMError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgeLLMError(f"{path}: expected a JSON object")
    return data


def _fingerprint(files) -> str:
    """What --resume compares: name, size and times of each file. The change time and inode are in
    it because an edit in place can keep the size and set the modification time back (a copy of
    the model elsewhere rebuilds everything: the price of not hashing gigabytes)."""
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}".encode())
    return h.hexdigest()[:16]


def _chosen_template(template, where: Path):
    """tokenizer_config.json's chat_template: text, or a list of named templates (transformers
    takes the one named "default")."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
        named = {t.get("name"): t["template"] for t in template}
        if "default" in named:
            return named["default"]
        raise EdgeLLMError(f"{where}: chat_template lists templates {sorted(map(str, named))} but none named 'default'")
    raise EdgeLLMError(f"{where}: chat_template must be text or a list of {{\"name\", \"template\"}}, got {shown(template)}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgeLLMError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1].hex()} at {e.start})") from None
