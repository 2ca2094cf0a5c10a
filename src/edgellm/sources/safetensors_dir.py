"""A Hugging Face model directory: config.json, safetensors (single or sharded), tokenizer files.

Tensors are memory-mapped and converted one at a time, so the whole model never sits in memory
as float32.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

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


class SafetensorsFile:
    """Header + memory map of one .safetensors file.

    The safetensors package's numpy backend cannot return bfloat16, the commonest dtype of
    published checkpoints, so the (documented, tiny) header is read here and tensors are mapped.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError("header length beyond end of file")
                header = json.loads(f.read(header_len))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise EdgeLLMError(f"{path}: not a readable safetensors file ({e})") from None
        self.data_start = 8 + header_len
        header.pop("__metadata__", None)
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise EdgeLLMError(f"{path}: truncated safetensors file ({size} bytes, header needs {self.data_start + end})")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None

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
        try:
            self.raw_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgeLLMError(f"{config_path}: malformed JSON ({e})") from None
        if not isinstance(self.raw_config, dict):
            raise EdgeLLMError(f"{config_path}: expected a JSON object")
        self.config_path = config_path
        self._where: dict[str, SafetensorsFile] = {}
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
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
        if "quantization_config" in self.raw_config:
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
        template = cfg.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        processor_template = _read_json(self.path / "chat_template.json").get("chat_template")  # a processor's (VLMs)
        if processor_template is not None and not isinstance(processor_template, str):
            raise EdgeLLMError(f"{self.path / 'chat_template.json'}: chat_template must be a string")
        if jinja.is_file():
            template = jinja.read_text()
        elif processor_template and not template:
            template = processor_template
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))

        def token_id(token):
            if isinstance(token, dict):
                token = token.get("content")
            return (tok.token_to_id(token) if token else None), token

        bos_id, bos = token_id(cfg.get("bos_token"))
        eos_id, eos = token_id(cfg.get("eos_token"))
        eos_ids = gen.get("eos_token_id", self.raw_config.get("eos_token_id"))
        eos_ids = list(eos_ids) if isinstance(eos_ids, list) else ([eos_ids] if eos_ids is not None else [])
        if eos_id is not None and eos_id not in eos_ids:
            eos_ids.append(eos_id)
        if bos_id is None:
            bos_id = gen.get("bos_token_id", self.raw_config.get("bos_token_id"))
        return TokenizerFiles(
            tokenizer_json=tok_path.read_text(),
            chat_template=template,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos=bool(cfg.get("add_bos_token", False)),
            bos_token=bos,
            eos_token=eos,
        )

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


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgeLLMError(f"{path}: expected a JSON object")
    return data


def _fingerprint(files) -> str:
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
