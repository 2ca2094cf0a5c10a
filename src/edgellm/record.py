"""What was built: one typed record (build.json in the output directory), written once by the
build when it completes and read by the runtime and the measurements, so that no reader digs
settings out of manifest.json's options, the runtime's tokenizer settings or a target's program
facts. The precisions are the plan as the build resolved it, unit by unit.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .errors import EdgeLLMError

RECORD = "build.json"
FORMAT = 1


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

    @classmethod
    def from_build(cls, version: str, options, plan, lora) -> "BuildRecord":
        merged = str(Path(options.lora[0][1]).resolve()) if lora.mode == "LORA_MERGED" else None
        return cls(version, options.target, options.max_num_tokens, options.language_group_size,
                   tuple(options.buckets), options.int8_activations, options.kv_cache_dtype,
                   options.quantize_embeddings, options.block_size, options.asymmetric, options.configuration_file,
                   {name: choice.precision for name, choice in plan.choices.items()}, FORMAT, lora.mode, lora.rank,
                   tuple(f"layer{layer:03d}.{site}" for layer, site in sorted(lora.sites)), merged)

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
            values = {f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EdgeLLMError(f"{path}: not a build record this edgellm reads ({type(e).__name__}: {e}); run "
                               "`edgellm compile ... --resume`") from None
        values["buckets"] = tuple(values["buckets"])
        values["lora_sites"] = tuple(values.get("lora_sites", ()))
        return cls(**values)

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
