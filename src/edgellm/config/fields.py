"""Reading config.json fields with errors that name the file, the field and the value.

Each reader checks the JSON type and the range of one field, so a string, a boolean, NaN or a
size of 0 where a count belongs is one clear error instead of int()'s ValueError or a model that
computes garbage. JSON null reads as an absent field (Hugging Face writes null for unset
options). Checks across fields are ModelConfig.validate's.
"""

from __future__ import annotations

import math

from ..errors import EdgeLLMError

SIZES = 1 << 24  # the largest vocabulary, width, context or window a config may give
COUNTS = 1 << 14  # the most layers or heads

REQUIRED = object()  # a reader's default for a field that must be given


def shown(value) -> str:
    """A value as an error shows it: cut short, as a config may hold long lists or strings."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _value(raw: dict, key: str, where: str, default):
    value = raw.get(key)
    if value is None and default is REQUIRED:
        raise EdgeLLMError(f"{where}: required field '{key}' is missing")
    return value


def require(raw: dict, key: str, where: str, low: int = 1, high: int = SIZES) -> int:
    """A required whole number from low to high."""
    return integer(raw, key, where, REQUIRED, low, high)


def integer(raw: dict, key: str, where: str, default, low: int = 1, high: int = SIZES):
    """A whole number from low to high (a JSON integer: not a bool, a string or 2.0), or default."""
    value = _value(raw, key, where, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise EdgeLLMError(f"{where}: field '{key}' must be a whole number from {low} to {high}, got {shown(value)}")
    return value


def number(raw: dict, key: str, where: str, default, high: float = math.inf):
    """A finite number above 0 and at most high, or default."""
    value = _value(raw, key, where, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 < value <= high):
        bound = "" if high == math.inf else f" and at most {high}"
        raise EdgeLLMError(f"{where}: field '{key}' must be a finite number above 0{bound}, got {shown(value)}")
    return float(value)


def flag(raw: dict, key: str, where: str, default: bool) -> bool:
    return _of_type(raw, key, where, default, bool, "true or false")


def text(raw: dict, key: str, where: str, default):
    return _of_type(raw, key, where, default, str, "a string")


def _of_type(raw: dict, key: str, where: str, default, kind: type, described: str):
    """The field if it is a JSON value of kind, default if it is absent or null."""
    value = _value(raw, key, where, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise EdgeLLMError(f"{where}: field '{key}' must be {described}, got {shown(value)}")
    return value


def section(raw: dict, key: str, where: str) -> dict:
    """A JSON object field; absent or null reads as an empty one."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EdgeLLMError(f"{where}: field '{key}' must be a JSON object, got {shown(value)}")
    return value


def numbers(raw: dict, key: str, where: str, count: int) -> list[float]:
    """A required list of count finite numbers above 0 (per-frequency rope factors)."""
    value = _value(raw, key, where, REQUIRED)
    if not (isinstance(value, list) and len(value) == count
            and all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in value)):
        raise EdgeLLMError(f"{where}: field '{key}' must list {count} finite numbers above 0, got {shown(value)}")
    return value


def layer_types(raw: dict, where: str, layers: int, known) -> list[str] | None:
    """layer_types: one of the known names per layer, or None where the config does not list them."""
    value = raw.get("layer_types")
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == layers and all(isinstance(t, str) and t in known for t in value)):
        raise EdgeLLMError(f"{where}: field 'layer_types' must list {layers} of {sorted(known)}, got {shown(value)}")
    return value


def rope_parameters(raw: dict, where: str, key: str | None = None) -> dict:
    """HF rope settings, whichever generation of config.json wrote them (ModelConfig.validate
    checks the scaling's own parameters).

    transformers 5 writes `rope_parameters` (nested per layer type for Gemma 3); older files write
    `rope_theta` + `rope_scaling`.
    """
    params = section(raw, "rope_parameters", where)
    if key is not None and key in params:
        params = section(params, key, f"{where} (rope_parameters)")
    if "rope_theta" in params:
        params = dict(params)
        params["rope_theta"] = number(params, "rope_theta", f"{where} (rope_parameters)", REQUIRED)
        return params
    scaling = dict(section(raw, "rope_scaling", where))
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.setdefault("rope_type", "default")
    scaling["rope_theta"] = number(raw, "rope_theta", where, 10000.0)
    return scaling
