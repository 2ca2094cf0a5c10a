"""What was built: one typed record (build.json in the output directory), written once by the
build when it completes and read by the runtime and the measurements, so that no reader digs
settings out of manifest.json's options, the runtime's tokenizer settings or a target's program
facts. The precisions are the plan as the build resolved it, unit by unit.

The record also lists every file the runtime reads, with its size and sha256 (`files`), so a
damaged build is found: at load, cheaply (sizes of the compiled programs and weights, and the
digest of the shared library about to be mapped and run), and by `edgellm verify`, fully.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import EdgeLLMError

RECORD = "build.json"
FORMAT = 1
# what the runtime reads (the onnx/ and quant/ stage outputs are the build's own; adapters/ is
# left out: `edgellm compile-lora` adds and replaces adapters after the build)
RUNTIME_FILES = ("model_config.json", "runtime", "compiled")


@dataclass(frozen=True)
class BuildRecord:
    edgellm: str  # the version that built it
    target: str  # cpu, native, aarch64-linux
    max_num_tokens: int
    group_size: int  # rows per prefill call
    buckets: tuple[int, ...]  # the KV cache lengths attention runs over
    int8_activations: bool
    kv_cache_dtype: str  # float32, float16
    quantize_embeddings: str | None  # None, "int8" (table and head), "int4" (int4 head)
    block_size: int
    asymmetric: bool
    plan: str | None  # the -c the build was given
    precisions: dict[str, str]  # unit name -> precision, as resolved once for the build
    format: int = FORMAT
    # LoRA (quant/adapters.py): LORA_BRANCH builds take adapters compiled for their branch sites
    # ("layer007.qkv_proj") of this rank; LORA_MERGED builds carry merged_adapter in their weights.
    lora_mode: str = "LORA_DISABLED"
    lora_rank: int = 0
    lora_sites: tuple[str, ...] = ()
    merged_adapter: str | None = None
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # path in the build -> (bytes, sha256)

    @classmethod
    def from_build(cls, version: str, options, plan, lora, out: Path) -> "BuildRecord":
        merged = str(Path(options.lora[0][1]).resolve()) if lora.mode == "LORA_MERGED" else None
        return cls(version, options.target, options.max_num_tokens, options.language_group_size,
                   tuple(options.buckets), options.int8_activations, options.kv_cache_dtype,
                   options.quantize_embeddings, options.block_size, options.asymmetric, options.configuration_file,
                   {name: choice.precision for name, choice in plan.choices.items()}, FORMAT, lora.mode, lora.rank,
                   tuple(f"layer{layer:03d}.{site}" for layer, site in sorted(lora.sites)), merged,
                   {name: (path.stat().st_size, file_sha256(path)) for name, path in _runtime_files(Path(out))})

    def save(self, out: Path) -> None:
        tmp = Path(out) / f".{RECORD}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, Path(out) / RECORD)

    @classmethod
    def load(cls, out) -> "BuildRecord":
        path = Path(out) / RECORD
        if not path.is_file():
            raise EdgeLLMError(f"{out}: no {RECORD} (built by an older edgellm, or not a build); run `edgellm "
                               "compile ... --resume` to write it")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            # fields added later have defaults: records of older builds still read
            values = {f.name: data[f.name] for f in fields(cls)
                      if f.name in data or (f.default is MISSING and f.default_factory is MISSING)}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EdgeLLMError(f"{path}: not a build record this edgellm reads ({type(e).__name__}: {e}); run "
                               "`edgellm compile ... --resume`") from None
        values["buckets"] = tuple(values["buckets"])
        values["lora_sites"] = tuple(values.get("lora_sites", ()))
        try:
            values["files"] = {str(name): (int(size), str(sha)) for name, (size, sha) in values.get("files", {}).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise EdgeLLMError(f"{path}: its list of files is damaged ({e})") from None
        return cls(**values)

    def check_files(self, out, full: bool) -> int:
        """Raise for the first file that is missing, or differs from what the build wrote: by size
        for the compiled programs and weights, by digest for a shared library (it is about to run)
        and, with full, for every file. Returns the bytes read."""
        read = 0
        for name, (size, sha) in sorted(self.files.items()):
            if not (full or name.startswith("compiled/")):
                continue  # (the JSON and tokenizer files are parsed with checks of their own)
            path = Path(out) / name
            if not path.is_file():
                raise EdgeLLMError(f"{path}: missing from the build; compile it again")
            if path.stat().st_size != size:
                raise EdgeLLMError(f"{path}: {path.stat().st_size} bytes, but the build wrote {size}; the build is "
                                   "damaged, compile it again")
            if full or path.suffix in (".so", ".dylib"):
                read += size
                if file_sha256(path) != sha:
                    raise EdgeLLMError(f"{path}: its contents differ from what the build wrote (sha256); the build is "
                                       "damaged, compile it again")
        return read

    def summary(self) -> str:
        """What the build stored, e.g. "int4.json + int8 embeddings, int8 LM head + native target"."""
        layers = {v for k, v in self.precisions.items() if "/layer" in k}
        label = Path(self.plan).name if self.plan else f"default ({', '.join(sorted(layers)) or 'BF16'})"
        extras = []
        if self.asymmetric:
            extras.append("asymmetric")
        if self.quantize_embeddings:
            extras.append(f"int8 embeddings, {self.quantize_embeddings} LM head")
        if self.int8_activations:
            extras.append("int8 activations")
        if self.kv_cache_dtype != "float32":
            extras.append(f"{self.kv_cache_dtype} KV cache")
        if self.lora_mode == "LORA_BRANCH":
            extras.append(f"LoRA branches of rank {self.lora_rank}")
        if self.merged_adapter:
            extras.append(f"LoRA {Path(self.merged_adapter).name} merged")
        if self.target != "cpu":
            extras.append(f"{self.target} target")
        return " + ".join([label] + extras)


def _runtime_files(out: Path):
    """(path in the build, path) of every file the runtime reads; temporary files left out."""
    for root in RUNTIME_FILES:
        top = out / root
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(out).as_posix(), path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
