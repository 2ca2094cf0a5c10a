"""What every model source (HF directory, GGUF file) hands to the later stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..quant.blocks import BlockQuantized


@dataclass
class TokenizerFiles:
    """Everything the runtime needs to turn text into ids and back.

    tokenizer_json is a serialized `tokenizers.Tokenizer`. bos/eos ids come from the model's own
    metadata; add_bos says whether encoding a prompt starts with BOS (the tokenizer's
    post-processor already does it when True, so the runtime must not add it again).
    """

    tokenizer_json: str
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos: bool = False
    bos_token: str | None = None
    eos_token: str | None = None


class ModelSource(Protocol):
    path: Path
    # The model's configuration as a Hugging Face config.json dict. GGUF sources synthesize it from
    # their metadata so that one adapter per architecture family serves both formats.
    raw_config: dict
    # Each layer's precision when no plan is given (quant/plan.py): BF16, or SOURCE for a file that
    # is quantized already (GGUF).
    default_precision: str

    def tensor_names(self) -> list[str]:
        """Hugging Face tensor names (e.g. model.layers.0.self_attn.q_proj.weight)."""

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in the Hugging Face layout, without reading it."""

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 in the Hugging Face layout, read on demand."""

    def packed(self, name: str) -> "BlockQuantized | None":
        """The tensor's own integer blocks when the source stores it in a block format edgellm
        runs without re-quantizing (GGUF types, sources/gguf_blocks.py; GPTQ/AWQ); None otherwise."""

    def storage(self, name: str) -> str:
        """How the source stores the tensor, for the compile log: "float", "GGUF Q6_K", "GPTQ", ..."""

    def tokenizer(self) -> TokenizerFiles: ...

    def fingerprint(self) -> str:
        """A cheap identity of the input files (names, sizes, mtimes) for the build manifest."""

