"""`edgellm bench`: TTFT, decode tokens/s, achieved weight bandwidth, artifact size, peak RSS of
one compiled model on this machine. Comparisons with other engines live in bench/ (they need
the peers installed); this is the number a user checks on their own device."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx


@dataclass
class Speed:
    model: str
    prompt_tokens: int
    gen_tokens: int
    ttft_ms: float
    decode_tps: float
    weight_mb_per_token: float  # weight bytes one decode step reads
    bandwidth_gbs: float  # weight_mb_per_token x decode_tps
    artifact_mb: float
    peak_rss_mb: float

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


def artifact_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in (Path(model_dir) / "compiled").rglob("*") if p.is_file()) + sum(
        p.stat().st_size for p in (Path(model_dir) / "runtime").rglob("*") if p.is_file())


def measure(model, model_dir: Path, prompt_ids: list[int], gen_tokens: int, repeats: int = 3) -> Speed:
    model.generate_ids(prompt_ids[:8], max_new_tokens=4, ignore_eos=True)  # warm-up: first-call allocations
    runs = []
    for _ in range(repeats):
        model.reset()
        runs.append(model.generate_ids(prompt_ids, max_new_tokens=gen_tokens, ignore_eos=True))
    tps = statistics.median(r.decode_tps for r in runs)
    programs = Path(model_dir) / "compiled" / "cpu"
    per_token = decode_weight_bytes(programs / "single.onnx" if (programs / "single.onnx").is_file() else programs / "shared.onnx")
    return Speed(
        model=str(model_dir), prompt_tokens=len(prompt_ids), gen_tokens=gen_tokens,
        ttft_ms=1000 * statistics.median(r.ttft_s for r in runs), decode_tps=tps,
        weight_mb_per_token=per_token / 1e6, bandwidth_gbs=per_token * tps / 1e9,
        artifact_mb=artifact_bytes(model_dir) / 1e6, peak_rss_mb=max(r.peak_rss_mb for r in runs),
    )
