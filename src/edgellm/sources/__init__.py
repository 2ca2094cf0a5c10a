"""Read a model: a Hugging Face safetensors directory or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeLLMError
from .base import ModelSource, TokenizerFiles


def open_source(path: str | Path, mmproj: str | Path | None = None) -> ModelSource:
    """mmproj: llama.cpp's vision projector GGUF beside a GGUF text model (a vision-language pair)."""
    path = Path(path)
    if not path.exists():
        raise EdgeLLMError(f"{path}: no such file or directory")
    if mmproj is not None:
        if not Path(mmproj).is_file():
            raise EdgeLLMError(f"{mmproj}: no such file (--mmproj)")
        if path.is_dir():
            raise EdgeLLMError(f"{mmproj}: --mmproj goes with a GGUF text model; {path} is a directory, whose "
                               f"vision tower comes from its own safetensors")
        from .mmproj import VisionPairSource

        return VisionPairSource(path, Path(mmproj))
    if path.is_dir():
        from .safetensors_dir import SafetensorsDirSource

        return SafetensorsDirSource(path)
    if not path.is_file():  # (opening a named pipe would wait for a writer forever)
        raise EdgeLLMError(f"{path}: not a regular file, a directory or a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_file import GGUFSource

        return GGUFSource(path)
    raise EdgeLLMError(f"{path}: neither a Hugging Face model directory nor a GGUF file")


__all__ = ["open_source", "ModelSource", "TokenizerFiles"]
