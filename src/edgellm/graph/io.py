"""Saving and loading ONNX files atomically, weights in external data files.

Weights are streamed: a model can be loaded with its large tensors left in their files
(`load_lazy`), linked and rewritten, and saved by copying each tensor's bytes file to file, so a
compile holds about one tensor in memory at a time, not the model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ALIGN = 64  # external tensors start on cache-line boundaries
SMALL = 1024  # tensors below this many bytes stay inside the .onnx file
CHUNK = 1 << 22


def save_segment(model: onnx.ModelProto, path: Path) -> None:
    """Write path (.onnx) and its weights (path.data) so that neither is ever seen half-written."""
    save_models({path.name: model}, path.parent, weights_name=path.stem + ".data")


def save_models(models: dict[str, onnx.ModelProto], directory: Path, weights_name: str) -> None:
    """Save several models whose large initializers share one weights file.

    Initializers with the same name must hold the same bytes (they are the same weight seen from
    two programs, e.g. the group and single variants); they are stored once. Initializers still in
    external files (`load_lazy`) are copied from there without being loaded whole.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp{os.getpid()}-", dir=directory))
    try:
        placed: dict[str, tuple[int, int, str]] = {}  # name -> offset, length, sha256
        with open(tmp / weights_name, "wb") as f:
            for model in models.values():
                for t in model.graph.initializer:
                    if not _is_external(t) and len(t.raw_data) < SMALL:
                        continue
                    if t.name in placed:
                        offset, length, digest = placed[t.name]
                        if _digest(t) != digest:
                            raise ValueError(f"initializer {t.name} differs between linked programs")
                    else:
                        pad = (-f.tell()) % ALIGN
                        f.write(b"\0" * pad)
                        offset = f.tell()
                        digest = _copy_into(t, f)
                        length = f.tell() - offset
                        placed[t.name] = (offset, length, digest)
                    _point_to(t, weights_name, offset, length)
        for name, model in models.items():
            onnx.save_model(model, tmp / name)
        # weights first: an .onnx that exists always finds its weights complete
        os.replace(tmp / weights_name, directory / weights_name)
        for name in models:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)


def load_lazy(path: Path) -> onnx.ModelProto:
    """The model with its external tensors left in their files (locations made absolute)."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = str((Path(path).parent / entry.value).resolve())
    return model


def tensor_bytes(t: onnx.TensorProto) -> bytes:
    if not _is_external(t):
        return t.raw_data
    info = _external_info(t)
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))


def to_array(t: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, read from its file if it is external (read once, no second copy)."""
    if not _is_external(t):
        return numpy_helper.to_array(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        info = _external_info(t)
        count = int(np.prod(t.dims)) if len(t.dims) else 1
        return np.fromfile(info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0))).reshape(tuple(t.dims))
    loaded = onnx.TensorProto()
    loaded.CopyFrom(t)
    del loaded.external_data[:]
    loaded.data_location = onnx.TensorProto.DEFAULT
    loaded.raw_data = tensor_bytes(t)
    return numpy_helper.to_array(loaded)


INTEGER_TYPES = {onnx.TensorProto.INT4: (4, True), onnx.TensorProto.UINT4: (4, False),
                 onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False)}  # type -> (bits, signed)


def integer_values(t: onnx.TensorProto) -> np.ndarray:
    """An integer tensor's values, one per byte (int8 if signed, else uint8), in its shape."""
    from ..quant.blocks import unpack_int4

    bits, signed = INTEGER_TYPES[t.data_type]
    count = int(np.prod(t.dims))
    raw = tensor_bytes(t)
    if bits == 4:
        return unpack_int4(raw, count, signed).reshape(tuple(t.dims))
    return np.frombuffer(raw, np.int8 if signed else np.uint8, count=count).reshape(tuple(t.dims))


class Spill:
    """Large tensors made while building or rewriting a graph, written to a scratch file at once
    (straight from the array's memory) and referenced from there, so they never pile up in memory
    and are never copied into protobuf bytes. `save_models` then copies them file to file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")

    def tensor(self, name: str, value: np.ndarray, data_type: int | None = None, dims=None) -> onnx.TensorProto:
        """value: the array (any memory layout: a transposed view is written row block by row
        block, never copied whole), or with data_type/dims its raw bytes as uint8 (packed int4,
        bf16 bits)."""
        if value.nbytes < SMALL:
            value = np.ascontiguousarray(value)
            if data_type is None:
                return numpy_helper.from_array(value, name)
            return onnx.helper.make_tensor(name, data_type, dims, value.tobytes(), raw=True)
        t = onnx.TensorProto()
        t.name = name
        t.data_type = data_type if data_type is not None else onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        t.dims.extend(dims if dims is not None else value.shape)
        offset = self._file.tell()
        if value.flags.c_contiguous:
            self._file.write(memoryview(value).cast("B"))
        else:
            step = max(1, CHUNK // max(1, value[0].nbytes))
            for start in range(0, value.shape[0], step):
                self._file.write(memoryview(np.ascontiguousarray(value[start : start + step])).cast("B"))
        self._file.flush()
        _point_to(t, str(self.path), offset, value.nbytes)
        return t

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _point_to(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make t an external tensor at location[offset:offset + length] (its raw_data is dropped)."""
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _copy_into(t: onnx.TensorProto, out) -> str:
    """Append the tensor's bytes to `out`; return their sha256."""
    h = hashlib.sha256()
    if not _is_external(t):
        out.write(t.raw_data)
        h.update(t.raw_data)
        return h.hexdigest()
    info = _external_info(t)
    remaining = int(info["length"])
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        while remaining:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{info['location']}: ends before tensor {t.name}")
            out.write(chunk)
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def _digest(t: onnx.TensorProto) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()
