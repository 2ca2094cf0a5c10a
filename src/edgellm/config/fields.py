"""Reading required fields from a raw config with errors that name the field and the file."""

from __future__ import annotations

from ..errors import EdgeLLMError

_MISSING = object()


def require(raw: dict, key: str, where: str, kind=int):
    value = raw.get(key, _MISSING)
    if value is _MISSING or value is None:
        raise EdgeLLMError(f"{where}: required field '{key}' is missing")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise EdgeLLMError(f"{where}: field '{key}' must be {kind.__name__}, got {value!r}") from None


def rope_parameters(raw: dict, key: str | None = None) -> dict:
    """HF rope settings, whichever generation of config.json wrote them.

    transformers 5 writes `rope_parameters` (nested per layer type for Gemma 3); older files write
    `rope_theta` + `rope_scaling`.
    """
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and key is not None and key in params:
        params = params[key]
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    scaling = dict(raw.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.setdefault("rope_type", "default")
    scaling["rope_theta"] = float(raw.get("rope_theta", 10000.0))
    return scaling
