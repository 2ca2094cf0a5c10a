"""`edgellm bench`: TTFT, decode tokens/s, achieved weight bandwidth, artifact size, peak RSS of
one compiled model on this machine. Comparisons with other engines live in bench/ (they need
the peers installed); this is the number a user checks on their own device."""

from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from ..config.model_config import ModelConfig
from ..record import BuildRecord


@dataclass
class Speed:
    model: str
    prompt_tokens: int
    gen_tokens: int
    ttft_ms: float
    decode_tps: float
    weight_mb_per_token: float  # weight bytes one decode step reads
    kv_cache_mb_per_token: float  # KV cache bytes its attention reads, averaged over the run's steps
    bandwidth_gbs: float  # weight_mb_per_token x decode_tps
    read_gbs: float  # (weight_mb_per_token + kv_cache_mb_per_token) x decode_tps
    artifact_mb: float
    peak_rss_mb: float
    speculation: dict | None = None  # drafted / accepted statistics of the median run, when speculating

    def as_dict(self) -> dict:
        return asdict(self)


def decode_weight_bytes(program: Path) -> int:
    """Bytes of weights a decode step reads: every initializer of the decode program except the
    tables only gathered from (an embedding lookup reads one row)."""
    model = onnx.load(str(program), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    other_uses = {name for n in model.graph.node if n.op_type != "Gather" for name in n.input}
    total = 0
    for t in model.graph.initializer:
        if t.name in gathered and t.name not in other_uses:
            continue
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        length = length if length is not None else len(t.raw_data)
        # bfloat16 weights are widened to float32 when ONNX Runtime loads them (precision.py)
        total += 2 * length if t.data_type == onnx.TensorProto.BFLOAT16 else length
    return total


def _target(model_dir: Path) -> str:
    return BuildRecord.load(model_dir).target


def weight_bytes_per_token(model_dir: Path) -> int:
    programs = model_dir / "compiled" / _target(model_dir)
    if (programs / "program.json").is_file():  # the native targets count what their decode function reads
        return json.loads((programs / "program.json").read_text())["decode_weight_bytes"]
    return decode_weight_bytes(programs / "single.onnx" if (programs / "single.onnx").is_file() else programs / "shared.onnx")


def kv_cache_bytes_per_token(model_dir: Path, positions: range) -> float:
    """Bytes of KV cache a decode step's attention reads, on average over steps at `positions`
    (a step at position p attends to 0..p). The native targets read every layer's keys and
    values at the positions it attends to (a sliding layer's last `window`); the cpu target reads
    the whole bucket of positions its call binds (runtime/engine.py), sliding layers included."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.load(model_dir / "model_config.json")
    built = BuildRecord.load(model_dir)
    per_position = 2 * cfg.num_kv_heads * cfg.head_dim * (2 if built.kv_cache_dtype == "float16" else 4)
    if built.target == "cpu":
        buckets = built.buckets
        read = [len(cfg.layer_types) * buckets[bisect.bisect_left(buckets, p + 1)] for p in positions]
    else:
        window = cfg.sliding_window or built.max_num_tokens
        read = [sum(min(p + 1, window) if kind == "sliding" else p + 1 for kind in cfg.layer_types) for p in positions]
    return per_position * statistics.mean(read)


def artifact_bytes(model_dir: Path) -> int:
    """The target's programs and weights, and the runtime files (tokenizer, settings)."""
    model_dir = Path(model_dir)
    return sum(p.stat().st_size for d in ("compiled/" + _target(model_dir), "runtime")
               for p in (model_dir / d).rglob("*") if p.is_file())


def measure(model, model_dir: Path, prompt_ids: list[int], gen_tokens: int, repeats: int = 3, drafter=None,
            draft_max: int = 4) -> Speed:
    """With a drafter, decode is speculative (bandwidth figures then count target calls' tokens)."""
    model.generate_ids(prompt_ids[:8], max_new_tokens=4, ignore_eos=True)  # warm-up: first-call allocations
    runs = []
    for _ in range(repeats):
        model.reset()
        runs.append(model.generate_ids(prompt_ids, max_new_tokens=gen_tokens, ignore_eos=True, drafter=drafter,
                                       draft_max=draft_max))
    tps = statistics.median(r.decode_tps for r in runs)
    per_token = weight_bytes_per_token(Path(model_dir))
    # decode tokens/s counts the steps after the first token: positions prompt .. prompt + gen - 2
    kv_cache = kv_cache_bytes_per_token(Path(model_dir), range(len(prompt_ids), len(prompt_ids) + gen_tokens - 1))
    return Speed(
        model=str(model_dir), prompt_tokens=len(prompt_ids), gen_tokens=gen_tokens,
        ttft_ms=1000 * statistics.median(r.ttft_s for r in runs), decode_tps=tps,
        weight_mb_per_token=per_token / 1e6, kv_cache_mb_per_token=kv_cache / 1e6,
        bandwidth_gbs=per_token * tps / 1e9, read_gbs=(per_token + kv_cache) * tps / 1e9,
        artifact_mb=artifact_bytes(model_dir) / 1e6, peak_rss_mb=max(r.peak_rss_mb for r in runs),
        speculation=sorted(runs, key=lambda r: r.decode_tps)[len(runs) // 2].speculation,
    )
