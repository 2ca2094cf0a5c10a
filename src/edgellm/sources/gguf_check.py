"""A GGUF file's header walked before the gguf package reads it.

GGUFReader trusts every count in the file: an array that claims a billion values in a 68-byte file
keeps it looping, a numpy view per value, until memory runs out. This walk reads only the header
(magic, version, the counts, each key and its type, array counts, string lengths, the tensor
infos) and refuses any count or length larger than the bytes left could hold, before anything is
allocated or looped over for it; then each tensor's data must lie inside the file, apart from the
others. It is O(header) and allocates nothing per array value (a string array's lengths are read
one by one). What it passes, GGUFReader reads without running off the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import EdgeLLMError

VERSIONS = (2, 3)  # the versions GGUFReader reads
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
# GGUFReader keeps numpy views for every array value, about a kilobyte and 20 us each: the largest
# tokenizers hold about a million values in all (Gemma 3: 262k tokens, scores and types), so this
# keeps a file that claims more from costing it gigabytes.
MAX_ARRAY_VALUES = 1 << 21
MAX_KEYS = MAX_TENSORS = 1 << 16  # real files hold tens of keys and a few thousand tensors at most

# bytes of one value, for the types that have a fixed size
_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_KEY_BYTES = 8 + 4 + 1  # the least a key/value takes: name length, type, a one-byte value
_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # the least a tensor info takes: name length, dims count, one dim, type, offset


def _type_name(kind: int) -> str:
    return GGUFValueType(kind).name.lower() if kind in set(GGUFValueType) else str(kind)


def check_gguf(path: Path) -> None:
    """Raise EdgeLLMError, naming the file and the key or tensor, where the header does not fit it."""
    if Path(path).exists() and not Path(path).is_file():  # opening a FIFO would wait for a writer forever
        raise EdgeLLMError(f"{path}: not a GGUF file (not a regular file)")
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                raise EdgeLLMError(f"{path}: not a GGUF file (the file is empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _Header(path, data).walk()
    except OSError as e:
        raise EdgeLLMError(f"{path}: cannot be read ({e.strerror or e})") from None


class _Header:
    def __init__(self, path: Path, data: mmap.mmap):
        self.path, self.data, self.size = path, data, len(data)
        self.at = 0
        self.order = "<"
        self.array_values = 0

    def fail(self, message: str):
        raise EdgeLLMError(f"{self.path}: {message}")

    def left(self) -> int:
        return self.size - self.at

    def skip(self, count: int, what: str) -> int:
        """Step over `count` bytes of `what`; where they start."""
        if count > self.left():
            self.fail(f"the file ends inside {what} ({count} bytes needed at byte {self.at}, {self.size} in the file)")
        start = self.at
        self.at += count
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.order + "I", self.data, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.order + "Q", self.data, self.skip(8, what))[0]

    def text(self, what: str) -> str:
        length = self.u64(f"the length of {what}")
        start = self.skip(length, f"{what} ({length} bytes long)")
        raw = self.data[start : start + length]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8 text ({raw[:60]!r})")

    def walk(self) -> None:
        if self.data[:4] != b"GGUF":
            self.fail(f"not a GGUF file (it starts with {self.data[:4]!r}, not b'GGUF')")
        self.at = 4
        version = self.u32("the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order, as GGUFReader reads it
            self.order = ">"
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in VERSIONS:
            self.fail(f"GGUF version {version} is not supported (versions {' and '.join(map(str, VERSIONS))})")
        tensors = self.u64("the tensor count")
        keys = self.u64("the key count")
        self.count(keys, "metadata keys", MAX_KEYS, _KEY_BYTES)
        alignment = 32
        seen = set()
        for i in range(keys):
            key = self.text(f"the name of metadata key {i}")
            if key in seen:
                self.fail(f"metadata key '{key}' appears twice")
            seen.add(key)
            kind = self.u32(f"the type of metadata key '{key}'")
            if key == "general.alignment":
                alignment = self.alignment(kind)
            else:
                self.value(key, kind)
        self.count(tensors, "tensors", MAX_TENSORS, _TENSOR_BYTES)
        infos = [self.tensor_info() for _ in range(tensors)]
        self.tensor_data(infos, self.at + -self.at % alignment)

    def count(self, count: int, what: str, most: int, least_bytes: int) -> None:
        if count > most or count * least_bytes > self.left():
            self.fail(f"the header claims {count} {what}; the {self.left()} bytes left in the file hold at most "
                      f"{min(most, self.left() // least_bytes)}")

    def value(self, key: str, kind: int) -> None:
        if kind in _SIZES:
            self.skip(_SIZES[kind], f"metadata key '{key}'")
        elif kind == GGUFValueType.STRING:
            length = self.u64(f"metadata key '{key}'")
            self.skip(length, f"metadata key '{key}' (a string of {length} bytes)")
        elif kind == GGUFValueType.ARRAY:
            self.array(key)
        else:
            self.fail(f"metadata key '{key}' has value type {kind}, not a GGUF type")

    def array(self, key: str) -> None:
        item = self.u32(f"metadata key '{key}'")
        count = self.u64(f"metadata key '{key}'")
        if item == GGUFValueType.ARRAY:
            self.fail(f"metadata key '{key}' is an array of arrays, which GGUF models do not hold")
        if item != GGUFValueType.STRING and item not in _SIZES:
            self.fail(f"metadata key '{key}' is an array of value type {item}, not a GGUF type")
        size = _SIZES.get(item, 8)  # a string takes at least its 8-byte length
        name = _type_name(item)
        if count * size > self.left():
            self.fail(f"metadata key '{key}' claims an array of {count} {name} values; "
                      f"the {self.left()} bytes left in the file hold at most {self.left() // size}")
        self.array_values += count
        if self.array_values > MAX_ARRAY_VALUES:
            self.fail(f"metadata key '{key}' holds {count} values, more than the {MAX_ARRAY_VALUES} "
                      "all of a file's arrays may hold together")
        if item != GGUFValueType.STRING:
            self.skip(count * size, f"metadata key '{key}'")
            return
        data, order = self.data, self.order + "Q"
        for i in range(count):
            length = struct.unpack_from(order, data, self.skip(8, f"value {i} of metadata key '{key}'"))[0]
            self.skip(length, f"value {i} of metadata key '{key}' (a string of {length} bytes)")

    def alignment(self, kind: int) -> int:
        if kind != GGUFValueType.UINT32:
            self.fail(f"metadata key 'general.alignment' has value type {_type_name(kind)}; it must be a uint32")
        value = self.u32("metadata key 'general.alignment'")
        if value == 0 or value & (value - 1):
            self.fail(f"metadata key 'general.alignment' = {value} is not a power of two")
        return value

    def tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self.text("a tensor's name")
        dims = self.u32(f"tensor '{name}'")
        if not 1 <= dims <= MAX_DIMS:
            self.fail(f"tensor '{name}' has {dims} dimensions (1 to {MAX_DIMS})")
        shape = [self.u64(f"tensor '{name}'") for _ in range(dims)]
        kind = self.u32(f"tensor '{name}'")
        if kind not in GGML_QUANT_SIZES:
            self.fail(f"tensor '{name}' has ggml type {kind}, which is not a known type")
        return name, shape, kind, self.u64(f"tensor '{name}'")

    def tensor_data(self, infos: list, start: int) -> None:
        """Each tensor's bytes: whole blocks, inside the file, no two overlapping."""
        spans = []
        names = set()
        for name, shape, kind, offset in infos:
            if name in names:
                self.fail(f"tensor '{name}' appears twice")
            names.add(name)
            type_name = GGMLQuantizationType(kind).name
            block, block_bytes = GGML_QUANT_SIZES[kind]
            if 0 in shape:
                self.fail(f"tensor '{name}' has shape {shape}: a dimension of 0")
            if shape[0] % block:
                self.fail(f"tensor '{name}' of type {type_name} has rows of {shape[0]} values, "
                          f"not whole blocks of {block}")
            values = 1
            for d in shape:
                values *= d
            nbytes = values // block * block_bytes
            begin = start + offset
            if begin + nbytes > self.size:
                self.fail(f"tensor '{name}' ({type_name}, shape {shape}: {nbytes} bytes at data offset {offset}) "
                          f"runs past the end of the file ({self.size} bytes)")
            spans.append((begin, begin + nbytes, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                self.fail(f"tensors '{first}' and '{second}' overlap in the file (bytes {begin} to {end})")
