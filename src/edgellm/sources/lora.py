"""LoRA adapters as users have them, read into one form.

    PEFT directory   adapter_config.json + adapter_model.safetensors (keys
                     base_model.model.<module>.lora_A.weight [r, in] / .lora_B.weight [out, r])
    llama.cpp GGUF   general.type "adapter", adapter.type "lora", adapter.lora.alpha, tensors
                     <base tensor>.lora_a [r, in] / .lora_b [out, r] (llama's q/k rows permuted
                     as in the base GGUF)

Both become LoraAdapter: per linear module of the base model, addressed (role, layer) as
ModelConfig names it, the factors A, B and the scale (PEFT: alpha / r, alpha / sqrt(r) with
rsLoRA, per module with rank_pattern / alpha_pattern; llama.cpp: alpha / r, or 1 without alpha).
What edgellm cannot apply exactly is refused naming the field or tensor: DoRA, modules_to_save,
embedding or LM-head factors, LoRA biases, modules or shapes the base does not have.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.model_config import ModelConfig
from ..errors import EdgeLLMError

# the linear layers an adapter may change (roles of ModelConfig.layer_tensors)
LINEAR_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraFactors:
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        """scale * B @ A in the base weight's layout [out, in]."""
        return (np.float32(self.scale) * self.b.astype(np.float32)) @ self.a.astype(np.float32)


@dataclass
class LoraAdapter:
    path: Path
    format: str  # "peft" or "gguf"
    factors: dict[tuple[str, int], LoraFactors]  # (role, layer) -> factors

    @property
    def rank(self) -> int:
        return max((f.rank for f in self.factors.values()), default=0)


def adapter_fingerprint(path: str | Path) -> str:
    """Changes when the adapter's files do (size, modification time), as a source's fingerprint."""
    from .safetensors_dir import _fingerprint

    path = Path(path)
    return _fingerprint([path] if path.is_file() else [path / PEFT_CONFIG, path / PEFT_WEIGHTS])


def read_adapter(path: str | Path, cfg: ModelConfig) -> LoraAdapter:
    """The adapter at path (a PEFT directory or a GGUF LoRA file), checked against the base model
    cfg describes."""
    path = Path(path)
    if path.is_dir():
        adapter = _read_peft(path, cfg)
    elif path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EdgeLLMError(f"{path}: not a LoRA adapter (a PEFT directory or a GGUF LoRA file)")
        adapter = _read_gguf(path, cfg)
    else:
        raise EdgeLLMError(f"{path}: no such adapter directory or file")
    if not adapter.factors:
        raise EdgeLLMError(f"{path}: the adapter holds no LoRA factors")
    _check_shapes(adapter, cfg)
    return adapter


def base_modules(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """The base model's linear modules: Hugging Face module name -> (role, layer)."""
    return {cfg.tensor_name(role, i).removesuffix(".weight"): (role, i)
            for role in LINEAR_ROLES if cfg.has(role) for i in range(cfg.num_layers)}


def _read_peft(path: Path, cfg: ModelConfig) -> LoraAdapter:
    from .safetensors_dir import SafetensorsFile

    config_path, weights_path = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not config_path.is_file():
        raise EdgeLLMError(f"{path}: no {PEFT_CONFIG} (a PEFT LoRA adapter directory has one)")
    if not weights_path.is_file():
        raise EdgeLLMError(f"{path}: no {PEFT_WEIGHTS} (adapter_model.bin is not read: save with safe_serialization)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeLLMError(f"{config_path}: malformed JSON ({e})") from None
    if not isinstance(config, dict):
        raise EdgeLLMError(f"{config_path}: expected a JSON object")

    def refuse(field: str, why: str):
        raise EdgeLLMError(f"{config_path}: {field} = {config.get(field)!r}: {why}")

    if config.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", "only LoRA adapters are supported")
    if config.get("use_dora"):
        refuse("use_dora", "DoRA adapters are not supported (their magnitude vector is not a low-rank branch)")
    if config.get("modules_to_save"):
        refuse("modules_to_save", "fully trained modules are not supported, only low-rank factors")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", "transposed (Conv1D) factors are not supported")
    if config.get("bias", "none") != "none":
        refuse("bias", "LoRA biases are not supported")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not isinstance(rank, int) or rank < 1:
        refuse("r", "must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        refuse("lora_alpha", "must be a number")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(isinstance(v, int) and v >= 1 for v in rank_pattern.values()):
        refuse("rank_pattern", "must map module patterns to positive integer ranks")
    if not isinstance(alpha_pattern, dict) or not all(isinstance(v, (int, float)) for v in alpha_pattern.values()):
        refuse("alpha_pattern", "must map module patterns to numbers")
    modules = base_modules(cfg)
    _check_targets(config.get("target_modules"), modules, config_path)
    layers = config.get("layers_to_transform")
    layers = {layers} if isinstance(layers, int) else set(layers) if layers else None

    weights = SafetensorsFile(weights_path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key in weights.entries:
        module, kind = _peft_key(key, weights_path)
        if module not in modules:
            raise EdgeLLMError(f"{weights_path}: {key} changes {module}, {_not_linear(module)}")
        pairs.setdefault(module, {})[kind] = weights.tensor(key)
    factors = {}
    for module, pair in pairs.items():
        missing = {"A", "B"} - set(pair)
        if missing:
            raise EdgeLLMError(f"{weights_path}: {module} has no lora_{missing.pop()}")
        role, layer = modules[module]
        if layers is not None and layer not in layers:
            raise EdgeLLMError(f"{weights_path}: {module} has factors, but layers_to_transform {sorted(layers)} "
                               f"in {config_path} excludes layer {layer}")
        r = _pattern_value(rank_pattern, module, rank)
        if pair["A"].shape[0] != r:
            raise EdgeLLMError(f"{weights_path}: {module}.lora_A has rank {pair['A'].shape[0]}, but {config_path} "
                               f"gives it rank {r}")
        a = _pattern_value(alpha_pattern, module, alpha)
        scale = a / math.sqrt(r) if config.get("use_rslora") else a / r
        factors[(role, layer)] = LoraFactors(pair["A"], pair["B"], float(scale))
    return LoraAdapter(path, "peft", factors)


def _peft_key(key: str, where: Path) -> tuple[str, str]:
    """base_model.model.<module>.lora_A.weight -> (module, "A")."""
    name = key.removeprefix("base_model.model.")
    for kind in ("A", "B"):
        for suffix in (f".lora_{kind}.weight", f".lora_{kind}.default.weight"):
            if name.endswith(suffix):
                return name.removesuffix(suffix), kind
    if "lora_embedding" in name:
        raise EdgeLLMError(f"{where}: {key}: embedding LoRA is not supported (only linear layers)")
    if "lora_magnitude_vector" in name:
        raise EdgeLLMError(f"{where}: {key}: DoRA magnitude vectors are not supported")
    raise EdgeLLMError(f"{where}: {key} is not a LoRA factor (lora_A / lora_B of a linear layer)")


def _not_linear(module: str) -> str:
    if module.endswith(("lm_head", "embed_tokens")):
        return "the LM head or embedding table: LoRA there is not supported (only the layers' linear modules)"
    return "which is not a linear module of this base model"


def _check_targets(targets, modules: dict, where: Path) -> None:
    """Every target module the config names exists in the base (PEFT's matching: a name matches a
    module whose name is it or ends in .name; a string is a regular expression or all-linear)."""
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            raise EdgeLLMError(f"{where}: target_modules {targets!r} matches no linear module of this base model")
        return
    for target in targets:
        if target.endswith(("lm_head", "embed_tokens")):
            raise EdgeLLMError(f"{where}: target_modules names {target!r}: LoRA of the LM head or embedding table is "
                               "not supported (only the layers' linear modules)")
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise EdgeLLMError(f"{where}: target_modules names {target!r}, which this base model does not have "
                               f"(its linear modules: {', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules}))})")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key matching the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_gguf(path: Path, cfg: ModelConfig) -> LoraAdapter:
    import gguf

    from .gguf_check import check_gguf
    from .gguf_file import GLOBAL_NAMES, LAYER_NAMES, MODEL_TYPES, llama_row_permutation
    from .gguf_tokenizer import gguf_fields

    check_gguf(path)  # (GGUFReader trusts the header's counts)
    try:
        reader = gguf.GGUFReader(path)
        fields = gguf_fields(reader)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise EdgeLLMError(f"{path}: not a readable GGUF file ({e})") from None
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise EdgeLLMError(f"{path}: not a GGUF LoRA adapter (general.type {fields.get('general.type')!r}, "
                           f"adapter.type {fields.get('adapter.type')!r})")
    arch = fields.get("general.architecture")
    family = MODEL_TYPES.get(arch, str(arch)).removesuffix("_text")
    if arch not in LAYER_NAMES or (family != cfg.family and not (arch == "llama" and cfg.family == "mistral")):
        raise EdgeLLMError(f"{path}: an adapter for architecture {arch!r}; the base model is {cfg.family}")
    alpha = float(fields.get("adapter.lora.alpha") or 0.0)
    modules = base_modules(cfg)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            raise EdgeLLMError(f"{path}: tensor {t.name} is not a LoRA factor (.lora_a / .lora_b)")
        stem = base.removesuffix(".weight")
        if stem in GLOBAL_NAMES:
            raise EdgeLLMError(f"{path}: {t.name}: LoRA of the LM head or embedding table is not supported")
        parts = stem.split(".", 2)
        hf = LAYER_NAMES[arch].get(parts[2]) if len(parts) == 3 and parts[0] == "blk" else None
        module = f"model.layers.{parts[1]}.{hf}" if hf else None
        if module not in modules:
            raise EdgeLLMError(f"{path}: {t.name} changes {stem}, which is not a linear module of this base model")
        shape = [int(d) for d in reversed(t.shape)]
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        pairs.setdefault(module, {})[kind] = values
    factors = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise EdgeLLMError(f"{path}: {module} has only {', '.join(pair)}")
        role, layer = modules[module]
        a, b = pair["lora_a"], pair["lora_b"]
        if arch == "llama" and role in ("q_proj", "k_proj"):  # llama.cpp permuted B's rows as the base's
            heads = cfg.num_heads if role == "q_proj" else cfg.num_kv_heads
            b = b[llama_row_permutation(b.shape[0], heads)]
        rank = a.shape[0]
        factors[(role, layer)] = LoraFactors(a, b, alpha / rank if alpha else 1.0)  # llama.cpp's scale
    return LoraAdapter(path, "gguf", factors)


def _check_shapes(adapter: LoraAdapter, cfg: ModelConfig) -> None:
    from ..build import expected_shapes

    shapes = expected_shapes(cfg)
    for (role, layer), f in adapter.factors.items():
        (out, inp), fields = shapes[role]
        name = cfg.tensor_name(role, layer).removesuffix(".weight")
        r = f.rank
        if f.a.ndim != 2 or f.b.ndim != 2 or f.a.shape != (r, inp) or f.b.shape != (out, r):
            raise EdgeLLMError(f"{adapter.path}: {name} has factors A {tuple(f.a.shape)}, B {tuple(f.b.shape)}; the base "
                               f"model's {role} is [{out}, {inp}] ({fields}): an adapter for another base model?")
