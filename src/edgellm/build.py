"""The compile pipeline: stages, work units, the manifest, --resume and -j.

    devkit    runtime files: tokenizer, chat template, generation settings, model_config.json
    onnx      one float segment per unit            -> onnx/<variant>/<unit>.onnx (kept only when asked)
    quantize  the precision plan applied per unit   -> quant/<variant>/<unit>.onnx
    compile   segments linked per variant, target   -> compiled/cpu/{group,single}.onnx + weights.bin
                                                       compiled/native/ model.c, libmodel.so, model_main

Every unit's output is written atomically and recorded in manifest.json with the hash of
everything it was made from; --resume skips units whose recorded hash and files still match, so an
interrupted build resumed gives the same files as an uninterrupted one. The manifest says
"complete": true only after the last stage.

The onnx/ and quant/ files are intermediates: a full build makes each unit's float segment inside
its quantize job (a scratch file, gone when the job ends) and removes quant/ once the build is
complete, unless --keep-intermediates keeps both (for --resume after a plan change, `compile:
False`, inspecting segments). A stage run alone (--onnx) writes its files: they are its output.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import __version__
from .config import ModelConfig, build_model_config
from .config.vision import with_input_size
from .errors import EdgeLLMError
from .footprint import check_fits
from .graph.segments import BRANCH_SITES, SEGMENT_FORMAT, branch_parts
from .graph.units import VISION_PARTS, Unit, plan_units
from .quant.adapters import LoraLayout, check_name, lora_layout, write_adapter
from .quant.blocks import concat_rows
from .quant.plan import PrecisionPlan, ResolvedPlan
from .record import BuildRecord, file_sha256
from .sources.lora import adapter_fingerprint

STAGES = ("devkit", "onnx", "quantize", "compile")
DEFAULT_GROUP_SIZE = 128
TARGETS = ("cpu", "native", "aarch64-linux")  # cpu: ONNX Runtime; the others: generated C (targets/native)
log = logging.getLogger("edgellm.build")


@dataclass
class BuildOptions:
    max_num_tokens: int = 1024
    language_group_size: int | None = None  # None: DEFAULT_GROUP_SIZE, or an image's rows where they must be one call
    future_token_mask_size: int = 128
    jobs: int = 1
    resume: bool = False
    stages: tuple[str, ...] = STAGES
    configuration_file: str | None = None
    target: str = "cpu"
    block_size: int = 32  # weights per quantization block (integer precisions)
    asymmetric: bool = False  # re-quantized blocks with a float minimum instead of symmetric ones

    @property
    def block_scheme(self) -> str:
        return "minimum" if self.asymmetric else "symmetric"  # quant/blocks.py SCHEMES
    quantize_embeddings: str | None = None  # "int8": int8 table and LM head; "int4": int4 LM head
    # Let ONNX Runtime quantize activations to int8 inside its integer matmuls (accuracy level 4)
    # instead of computing in float (level 1).
    int8_activations: bool = False
    enable_filter_sharing: bool = False  # one in-memory copy of weights for prefill and decode (targets/cpu)
    kv_cache_dtype: str = "float32"  # float16: the native targets keep the KV cache in float16
    lora: tuple[tuple[str, str], ...] = ()  # (--lora_name, --lora_path) pairs compiled with the build
    lora_dtype: str = "int8"  # how compiled adapters store their factors (quant/adapters.py)
    mmproj: str | None = None  # llama.cpp's vision projector GGUF beside a GGUF text model
    keep_intermediates: bool = False  # keep onnx/ and quant/ after a complete build (see the module's docstring)
    input_height: int | None = None  # an image encoder that takes any size runs at this size (None: the family's default)
    input_width: int | None = None

    def validate(self) -> None:
        for name in ("max_num_tokens", "language_group_size", "future_token_mask_size", "jobs", "input_height", "input_width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EdgeLLMError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_num_tokens % self.future_token_mask_size:
            raise EdgeLLMError(
                f"--max_num_tokens {self.max_num_tokens} is not a multiple of --future_token_mask_size {self.future_token_mask_size}"
            )
        if (self.language_group_size or 0) > self.max_num_tokens:
            raise EdgeLLMError(f"--language_group_size {self.language_group_size} exceeds --max_num_tokens {self.max_num_tokens}")
        if self.quantize_embeddings not in (None, "int8", "int4"):
            raise EdgeLLMError(f"--quantize_embeddings {self.quantize_embeddings}: use int8 or int4")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EdgeLLMError(f"--block_size must be a power of two of at least 16, got {self.block_size}")
        if self.target not in TARGETS:
            raise EdgeLLMError(f"unknown target '{self.target}' (supported: {', '.join(TARGETS)})")
        if self.kv_cache_dtype not in ("float32", "float16"):
            raise EdgeLLMError(f"--kv_cache_dtype {self.kv_cache_dtype}: use float32 or float16")
        names = [name for name, _ in self.lora]
        if len(set(names)) != len(names):
            raise EdgeLLMError(f"--lora_name: each adapter needs its own name, got {', '.join(names)}")
        if self.lora_dtype not in ("int8", "float32"):
            raise EdgeLLMError(f"--lora_dtype {self.lora_dtype}: use int8 or float32")
        if self.kv_cache_dtype == "float16" and self.target == "cpu":
            raise EdgeLLMError("--kv_cache_dtype float16 needs a native target (--target native or aarch64-linux): "
                               "the cpu target keeps ONNX Runtime's float32 KV cache")

    @property
    def buckets(self) -> list[int]:
        m = self.future_token_mask_size
        return list(range(m, self.max_num_tokens + 1, m))


@dataclass
class Manifest:
    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, fresh: bool) -> "Manifest":
        if path.is_file() and not fresh:
            try:
                return cls(path, json.loads(path.read_text()))
            except json.JSONDecodeError:
                log.warning("%s: unreadable manifest, starting over", path)
        return cls(path, {})

    def save(self) -> None:
        _atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def unit_done(self, key: str, in_hash: str, out_dir: Path) -> bool:
        """The unit was made from these inputs and its files are as it left them (read whole)."""
        return self.unit_recorded(key, in_hash, out_dir) and all(
            file_sha256(out_dir / f) == sha for f, sha in self.data["units"][key]["files"].items())

    def unit_recorded(self, key: str, in_hash: str, out_dir: Path) -> bool:
        """The unit was made from these inputs and its files are there (for files this run wrote)."""
        entry = self.data.get("units", {}).get(key)
        if not entry or entry["hash"] != in_hash or entry.get("dropped"):
            return False
        return all((out_dir / f).is_file() for f in entry["files"])

    def record(self, key: str, in_hash: str, result: dict) -> None:
        """result: {"files": {name: sha256}, and for the quantize stage "weights": {weight: how stored}}"""
        self.data.setdefault("units", {})[key] = {"hash": in_hash, **result}
        self.save()

    def weight_report(self) -> dict[str, int]:
        """How the weights were stored, counted over distinct weights: e.g. {"GGUF Q4_1 mapped exactly": 210}."""
        seen: dict[str, str] = {}
        for key, entry in self.data.get("units", {}).items():
            if key.startswith("quantize:"):
                seen.update(entry.get("weights", {}))
        counts: dict[str, int] = {}
        for how in seen.values():
            counts[how] = counts.get(how, 0) + 1
        return counts


def compile_model(model_path: str | Path, out: str | Path, options: BuildOptions, progress=None) -> Path:
    """Run the requested stages; returns the output directory. progress(stage, done, total)."""
    from .sources import open_source

    options.validate()
    out = Path(out)
    _check_writable(out)
    _remove_stale_temporaries(out)
    source = _SOURCES[(str(model_path), options.mmproj)] = open_source(model_path, options.mmproj)
    cfg = read_model_config(source)
    where = str(getattr(source, "config_path", model_path))
    if options.input_height or options.input_width:
        if cfg.vision is None:
            raise EdgeLLMError(f"{where}: --input_height/--input_width are for vision-language models; this is a text model")
        cfg.vision = with_input_size(cfg.vision, options.input_height or cfg.vision.processing.height,
                                     options.input_width or cfg.vision.processing.width, where)
    check_tensors(source, cfg, where)
    # rows that see each other are prefilled in one call (runtime/engine.py prefill_chunks): an
    # image's (Gemma 3), or a whole prompt (PaliGemma), which by default gets room for a question
    whole = cfg.vision.whole_calls if cfg.vision else 0
    if options.language_group_size is None:  # (a copy: the caller's options stay as given)
        default = max(DEFAULT_GROUP_SIZE, whole + (DEFAULT_GROUP_SIZE if cfg.vision and cfg.vision.attention == "prefix" else 0))
        options = replace(options, language_group_size=max(whole, min(default, options.max_num_tokens)))
        options.validate()
    if options.language_group_size < whole:
        what = (f"prompts (an image's {cfg.vision.image_tokens} rows, <bos> and the text) are prefilled in one call"
                if cfg.vision.attention == "prefix" else f"images are {whole} rows that must be prefilled in one call")
        raise EdgeLLMError(f"{model_path}: {cfg.family}'s {what}; compile with --language_group_size {whole} or more")
    units = plan_units(cfg.num_layers, options.buckets, cfg.vision.num_layers if cfg.vision else None)
    # the plan, asked once for every unit (a .py plan runs once per build), and the adapters,
    # checked against it before anything in the output directory changes
    plan = PrecisionPlan(options.configuration_file, cfg.num_layers, options.quantize_embeddings,
                         source.default_precision, cfg.vision.num_layers if cfg.vision else 0).resolve(units)
    check_fits(str(model_path), source, cfg, plan, options)
    adapters = _read_adapters(options, cfg)
    layout = lora_layout({u.name: plan.choice(u).lora for u in units}, cfg, adapters, options.configuration_file)
    merged = next(iter(adapters.values())).path if layout.mode == "LORA_MERGED" else None
    # A full build without --resume starts over (with --resume, unit hashes decide what is kept).
    # Single stages (--onnx, --quantize, ...) build on what earlier runs recorded, unless those
    # were made from another model or with other options: the stages not run now would be stale.
    recorded = {k: v for k, v in asdict(options).items() if k not in ("jobs", "resume", "stages", "keep_intermediates")}
    recorded = json.loads(json.dumps(recorded))  # as manifest.json gives it back (tuples are lists)
    manifest = Manifest.open(out / "manifest.json", fresh=not options.resume and set(options.stages) == set(STAGES))
    identity = dict(edgellm=__version__, model=str(Path(model_path).resolve()), source_fingerprint=source.fingerprint(),
                    options=recorded)
    if set(options.stages) != set(STAGES) and any(manifest.data.get(k) != v for k, v in identity.items()):
        manifest = Manifest(manifest.path, {})
    context = _Context(str(model_path), out, options, cfg, source.fingerprint(), plan, layout,
                       None if merged is None else str(merged))
    # --resume over a complete build of the same inputs: its units need no making again (the
    # devkit files, compiled adapters and the record are still written: their inputs are not all hashed)
    up_to_date = (options.resume and set(options.stages) == set(STAGES) and manifest.data.get("complete")
                  and all(manifest.data.get(k) == v for k, v in identity.items())
                  and manifest.data.get("code") == _code_digest() and _up_to_date(manifest, units, context))
    manifest.data.update(identity, complete=False, code=_code_digest())
    manifest.save()
    _atomic_write(out / "model_config.json", cfg.to_json())
    for stage in STAGES:
        if stage not in options.stages:
            continue
        log.info("stage %s%s", stage, ": up to date" if up_to_date and stage != "devkit" else "")
        if up_to_date and stage != "devkit":
            pass  # (recorded as done below: its outputs stand)
        elif stage == "devkit":
            _devkit(source, cfg, options, out)
        elif stage == "compile" and options.target == "cpu":
            from .targets.cpu import compile_cpu

            compile_cpu(out, cfg, options, units, plan, manifest, progress)
        elif stage == "compile":
            from .targets.native import compile_native

            compile_native(out, cfg, options, units, plan, manifest, progress)
        else:
            _run_units(stage, units, context, manifest, progress)
        if stage == "compile" and cfg.vision is not None and not up_to_date and options.target == "cpu":
            from .targets.vision import compile_vision  # (the C targets compile the encoder into their library)

            compile_vision(out, units, plan, options, manifest)
        # a stage run again makes the later stages' outputs stale until they run again too
        earlier = [s for s in manifest.data.get("stages_done", []) if STAGES.index(s) < STAGES.index(stage)]
        manifest.data["stages_done"] = earlier + [stage]
        manifest.save()
    complete = all(s in manifest.data["stages_done"] for s in STAGES)
    if complete and layout.mode == "LORA_BRANCH":
        for name, adapter in adapters.items():
            write_adapter(adapter, out, name, options.lora_dtype, layout.key)
    if complete:  # the record first: a complete build always has one
        BuildRecord.from_build(__version__, options, plan, layout, out).save(out)
    manifest.data["complete"] = complete
    manifest.save()
    if complete and not options.keep_intermediates:
        _drop_intermediates(out, manifest)
    return out


def _drop_intermediates(out: Path, manifest: Manifest) -> None:
    """A complete build needs none of onnx/ and quant/: the manifest keeps their entries (what was
    built, how each weight is stored) marked dropped, so --resume makes them again if asked to."""
    for key, entry in manifest.data.get("units", {}).items():
        if key.startswith(("onnx:", "quantize:")):
            entry["dropped"] = True
    manifest.save()  # first: a crash in between leaves files that no entry vouches for, never the reverse
    for stage in ("onnx", "quantize"):
        # the segments (of this build or an older one), not dotfiles: a running build's temporaries
        # are its own, and anything else there is not the build's to remove
        stage_dir = out / stage_dir_name(stage)
        for path in sorted(stage_dir.rglob("*"), reverse=True):  # (a folder's files before the folder)
            if path.name.startswith("."):
                continue
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):  # (not empty)
                    path.rmdir()
            elif path.suffix in (".onnx", ".data"):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            stage_dir.rmdir()


def _read_adapters(options: BuildOptions, cfg: ModelConfig) -> dict:
    from .sources.lora import read_adapter

    return {check_name(name): read_adapter(path, cfg) for name, path in options.lora}


@dataclass(frozen=True)
class _Context:
    model_path: str
    out: Path
    options: BuildOptions
    cfg: ModelConfig
    fingerprint: str
    plan: "ResolvedPlan"
    lora: LoraLayout
    merged_adapter: str | None = None  # LORA_MERGED: the adapter added to the weights of lora.sites

    def branch_rank(self, unit: Unit) -> int:
        branched = self.lora.mode == "LORA_BRANCH" and self.plan.choice(unit).lora == "LORA_BRANCH"
        return self.lora.rank if branched and unit.part in BRANCH_SITES else 0

    def merged(self, unit: Unit) -> bool:
        return self.merged_adapter is not None and self.plan.choice(unit).lora == "LORA_MERGED"


def unit_hash(stage: str, unit: Unit, ctx: _Context, extra: str = "") -> str:
    o = ctx.options
    basis = json.dumps(
        [stage, unit.name, __version__, ctx.fingerprint, ctx.cfg.to_json(), o.language_group_size, o.max_num_tokens,
         SEGMENT_FORMAT, extra]
    )
    return hashlib.sha256(basis.encode()).hexdigest()[:24]


def _stage_job(stage: str, unit: Unit, ctx: _Context, precision: str | None, float_file: bool = False) -> dict:
    """One unit of the onnx or quantize stage (runs in a worker process with -j). float_file: the
    quantize stage reads the unit's float segment from onnx/ instead of making it here."""
    from .graph.io import Spill, load_lazy, save_segment

    report = {}
    o = ctx.options
    stage_dir = ctx.out / stage_dir_name(stage)
    path = stage_dir / f"{unit.name}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    # weights go to a scratch file as they are made and are copied from there by save_segment
    with Spill(path.parent / f".{path.stem}.spill{os.getpid()}") as spill:
        if stage == "onnx":
            model = _float_segment(unit, ctx, spill)
        else:
            from .quant.precision import QuantOptions, apply_precision

            floats = load_lazy(ctx.out / "onnx" / f"{unit.name}.onnx") if float_file else _float_segment(unit, ctx, spill)
            options = QuantOptions(o.block_size, o.block_scheme, int8_per_channel=unit.part in VISION_PARTS)
            model, report = apply_precision(floats, precision, options, _source_blocks(ctx), spill)
            for weight, how in sorted(report.items()):
                log.info("%s: %s", weight, how)
        save_segment(model, path)
    files = {str(p.relative_to(stage_dir)): file_sha256(p) for p in (path, path.with_suffix(".data")) if p.is_file()}
    return {"files": files, "weights": report} if stage == "quantize" else {"files": files}


def _float_segment(unit: Unit, ctx: _Context, spill):
    """The unit's float ONNX segment, its weights in the spill file."""
    from .graph.segments import Shapes, emit

    o, cfg = ctx.options, ctx.cfg
    adapter = _open_adapter_cached(ctx.merged_adapter, cfg) if ctx.merged(unit) else None
    names = cfg.vision if unit.part in VISION_PARTS else cfg  # whose role -> tensor name map

    def weights(role, layer):
        name = names.tensor_name(role, layer)
        w = _open_source_cached(ctx.model_path, o.mmproj).tensor(name)
        # (a float64 sum is NaN or infinite exactly when some weight is: float32 cannot overflow it)
        if not np.isfinite(np.sum(w, dtype=np.float64)):
            raise EdgeLLMError(f"{ctx.model_path}: tensor {name} holds NaN or infinite values")
        factors = adapter.factors.get((role, layer)) if adapter is not None else None
        return w if factors is None else w + factors.delta()  # LORA_MERGED: before quantization

    return emit(unit, cfg, weights, Shapes(o.language_group_size, o.max_num_tokens, ctx.branch_rank(unit)), spill)


def _source_blocks(ctx: _Context):
    """initializer name (scope.role, see graph/units.py) -> the source's own integer blocks, if any."""
    from .graph.segments import FUSED

    source = _open_source_cached(ctx.model_path, ctx.options.mmproj)

    def packed(initializer: str):
        scope, role = initializer.split(".", 1)
        if scope.startswith(("vision", "projector")):  # the image encoder's (graph/vision.py roles)
            return _vision_blocks(source, ctx.cfg.vision, scope, role)
        layer = int(scope.removeprefix("layer")) if scope.startswith("layer") else None
        if ctx.merged_adapter is not None and (layer, role) in ctx.lora.sites:
            adapter = _open_adapter_cached(ctx.merged_adapter, ctx.cfg)
            if any((part, layer) in adapter.factors for part in branch_parts(ctx.cfg, role)):
                return None, "merged adapter"  # new values: quantized, not the source's blocks
        if role in FUSED and not ctx.cfg.has(role):  # a projection the emitter fused (graph/segments.py)
            names = [ctx.cfg.tensor_name(part, layer) for part in FUSED[role][0]]
            storage = {source.storage(n) for n in names}
            return concat_rows([source.packed(n) for n in names]), "+".join(sorted(storage))
        name = ctx.cfg.tensor_name(role, layer)
        return (source.packed(name), source.storage(name)) if name else (None, "float")

    return packed


# An encoder weight role (graph/vision.py) -> the vision config's tensor roles it is made of, in row
# order (a role not listed is its own tensor)
FUSED_VISION_ROLES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _vision_blocks(source, vision, scope: str, role: str):
    layer = int(scope.removeprefix("vision")) if scope.removeprefix("vision").isdigit() else None
    if role.startswith("patch_embed"):  # the convolution's weight (or a frame's), reshaped: as float
        return None, source.storage(vision.tensor_name("patch_embed", layer))  # (llama.cpp keeps it F16/F32)
    parts = (role,) if role in vision.tensors else FUSED_VISION_ROLES.get(role, (role,))  # (stored fused: as it is)
    names = [vision.tensor_name(part, layer) for part in parts]
    if None in names:
        raise EdgeLLMError(f"encoder weight {role} of {scope} has no tensor in the vision config (an edgellm bug)")
    storage = "+".join(sorted({source.storage(n) for n in names}))
    return concat_rows([source.packed(n) for n in names]), storage


_SOURCES: dict = {}
_ADAPTERS: dict = {}


def _open_adapter_cached(path: str, cfg: ModelConfig):
    from .sources.lora import read_adapter

    if path not in _ADAPTERS:
        _ADAPTERS[path] = read_adapter(path, cfg)
    return _ADAPTERS[path]


def _open_source_cached(path: str, mmproj: str | None = None):
    """One open source per process: parsing a GGUF header costs seconds (its token list)."""
    from .sources import open_source

    if (path, mmproj) not in _SOURCES:
        _SOURCES[(path, mmproj)] = open_source(path, mmproj)
    return _SOURCES[(path, mmproj)]


def stage_dir_name(stage: str) -> str:
    return {"onnx": "onnx", "quantize": "quant"}[stage]


def _run_units(stage: str, units: list[Unit], ctx: _Context, manifest: Manifest, progress) -> None:
    o = ctx.options
    plan = ctx.plan
    if stage == "onnx" and "quantize" in o.stages and not o.keep_intermediates:
        log.info("float segments are made inside each quantize job and not kept (--keep-intermediates keeps them)")
        return
    stage_dir = ctx.out / stage_dir_name(stage)
    todo = []
    for unit in units:
        choice = plan.choice(unit)
        if not choice.compile:  # the plan keeps this unit as an earlier build left it (targets check it exists)
            continue
        float_hash, quant_hash = _unit_hashes(unit, ctx)
        h = quant_hash if stage == "quantize" else float_hash
        key = f"{stage}:{unit.name}"
        if o.resume and manifest.unit_done(key, h, stage_dir):
            continue
        float_file = False
        if stage == "quantize":
            # a float segment from the onnx stage is read when it is still the same (a full build
            # makes it inside the quantize job instead; one the onnx stage wrote in this run is)
            floats = f"onnx:{unit.name}"
            float_file = (manifest.unit_recorded(floats, float_hash, ctx.out / "onnx") if "onnx" in o.stages
                          else manifest.unit_done(floats, float_hash, ctx.out / "onnx"))
            if not float_file and "onnx" not in o.stages:
                raise EdgeLLMError(f"{ctx.out}: the onnx stage has not produced {unit.name}; run it first (without "
                                   f"--quantize), or run both stages together")
        todo.append((unit, choice.precision if stage == "quantize" else None, h, key, float_file))
    # The vocabulary-sized units first, one at a time even with -j: each makes a float scratch file
    # as large as the whole table (float32), which is best made while quant/ is still nearly empty
    # and never two at once (the stage's disk and memory peaks).
    todo.sort(key=lambda job: job[0].part not in ("EMBED", "HEAD"))
    tables = sum(job[0].part in ("EMBED", "HEAD") for job in todo)
    done = len(units) - len(todo)
    if progress:
        progress(stage, done, len(units))

    def finished(unit: Unit, h: str, key: str, result: dict) -> None:
        nonlocal done
        manifest.record(key, h, result)
        # (onnx's checker refuses hard-linked data: kept files, and the onnx stage's output, stay copies)
        if stage == "quantize" and not o.keep_intermediates:
            _share_with_twin(stage_dir, unit, manifest)
        done += 1
        if progress:
            progress(stage, done, len(units))

    if o.jobs > 1 and len(todo) > 1:
        failure = None
        with ProcessPoolExecutor(max_workers=o.jobs) as pool:
            for jobs in [[job] for job in todo[:tables]] + [todo[tables:]]:  # (the tables one at a time)
                futures = [(pool.submit(_stage_job, stage, u, ctx, p, f), u, h, k) for u, p, h, k, f in jobs]
                for future, unit, h, key in futures:
                    try:  # record every unit that finished, so --resume keeps them after one fails
                        finished(unit, h, key, future.result())
                    except Exception as e:  # noqa: BLE001 (re-raised below)
                        failure = failure or e
        if failure is not None:
            raise failure
    else:
        for unit, precision, h, key, float_file in todo:
            finished(unit, h, key, _stage_job(stage, unit, ctx, precision, float_file))


def _unit_hashes(unit: Unit, ctx: _Context) -> tuple[str, str]:
    """The unit's input hashes in the onnx and the quantize stage. The float segment is a function
    of its inputs, so its hash stands for it in the quantize stage's, whether or not its file was kept."""
    o = ctx.options
    lora = [ctx.branch_rank(unit), adapter_fingerprint(ctx.merged_adapter) if ctx.merged(unit) else None]
    float_hash = unit_hash("onnx", unit, ctx, extra=json.dumps([[], {}, lora], sort_keys=True))
    precision = ctx.plan.choice(unit).precision
    quant_hash = unit_hash("quantize", unit, ctx, extra=json.dumps(
        [[precision, o.block_size, o.block_scheme, unit.part in VISION_PARTS], float_hash, lora], sort_keys=True))
    return float_hash, quant_hash


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """edgellm's own code (Python, the C kernels, presets): a build made by other code than this is
    not up to date, even where the version string is the same (a development tree)."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".c", ".h", ".json") and path.is_file():
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def _up_to_date(manifest: Manifest, units: list[Unit], ctx: _Context) -> bool:
    """--resume over a complete build of the same inputs: every unit hashes to what was recorded
    (dropped intermediates included: the compiled files were made from them) and every file of
    the build is intact, so nothing needs making again."""
    recorded = manifest.data.get("units", {})
    for unit in units:
        entry = recorded.get(f"quantize:{unit.name}", {})
        if ctx.plan.choice(unit).compile and entry.get("hash") != _unit_hashes(unit, ctx)[1]:
            return False
        if ctx.options.keep_intermediates and entry.get("dropped"):  # asked to keep what is gone: make it again
            return False
    try:
        BuildRecord.load(ctx.out).check_files(ctx.out, full=True)
    except EdgeLLMError as e:
        log.info("--resume: %s", e)
        return False
    return True


def _share_with_twin(stage_dir: Path, unit: Unit, manifest: Manifest) -> None:
    """A layer's group and single units at the same precision hold the same weights, so their .data
    files are the same bytes: the second is made a hard link of the first (half the stage's disk;
    only edgellm reads these files). Replacing either later (os.replace) leaves the other as it was."""
    if unit.part in VISION_PARTS:
        return
    twin = Unit(not unit.is_group, unit.part, unit.index, unit.bucket)
    units = manifest.data.get("units", {})
    mine, theirs = units.get(f"quantize:{unit.name}", {}), units.get(f"quantize:{twin.name}", {})
    data = f"{unit.name}.data"
    other = f"{twin.name}.data"
    if data not in mine.get("files", {}) or mine["files"][data] != theirs.get("files", {}).get(other) or theirs.get("dropped"):
        return
    path, source = stage_dir / data, stage_dir / other
    try:
        # the twin's file itself, read: its entry may predate it (a run killed between a worker's
        # write and its record) or the file may have changed since
        if path.stat().st_ino == source.stat().st_ino or file_sha256(source) != mine["files"][data]:
            return
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a file system without hard links: both copies stay
        log.info("%s: not linked to %s (%s)", path, source, e)


def _devkit(source, cfg: ModelConfig, options: BuildOptions, out: Path) -> None:
    from .runtime.chat_template import ChatTemplate

    tok = source.tokenizer()
    if tok.chat_template is not None:  # a template that does not parse would fail every chat of the build
        ChatTemplate(tok.chat_template, str(source.path))
    runtime = out / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    _atomic_write(runtime / "tokenizer.json", tok.tokenizer_json)
    settings = asdict(tok)
    settings.pop("tokenizer_json")
    _atomic_write(runtime / "runtime_config.json", json.dumps(settings, indent=1, sort_keys=True))


def read_model_config(source) -> ModelConfig:
    """The source's ModelConfig; a vision-language family also reads the tensor names and the
    image processor's settings."""
    where = str(getattr(source, "config_path", source.path))
    processor = getattr(source, "image_processor", None)
    return build_model_config(source.raw_config, where, set(source.tensor_names()), processor)


def check_tensors(source, cfg: ModelConfig, config_where: str) -> None:
    """Every tensor the config asks for exists with the shape the config implies, so a config
    that contradicts its weights fails here, naming the fields, not deep inside graph emission."""
    names = set(source.tensor_names())
    wanted = [(r, i) for r in cfg.layer_tensors for i in range(cfg.num_layers)]
    wanted += [(r, None) for r in cfg.global_tensors]
    missing = [cfg.tensor_name(r, i) for r, i in wanted if cfg.tensor_name(r, i) not in names]
    if missing:
        raise EdgeLLMError(f"{source.path}: {len(missing)} tensors missing, e.g. {missing[0]}")
    expected = expected_shapes(cfg)
    for role, layer in wanted:
        if role not in expected:
            continue
        shape, fields = expected[role]
        name = cfg.tensor_name(role, layer)
        actual = tuple(source.tensor_shape(name))
        if actual != shape:
            raise EdgeLLMError(f"{config_where}: {fields} = {shape}, but {name} has shape {actual} in {source.path}")
    if cfg.vision is not None:
        from .graph.vision import check_vision_tensors

        check_vision_tensors(source, cfg, config_where)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """role -> (HF shape, the config fields it follows from)."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q = cfg.num_heads * hd
    kv = cfg.num_kv_heads * hd
    qf = f"num_attention_heads {cfg.num_heads} x head_dim {hd}, hidden_size {h}"
    kvf = f"num_key_value_heads {cfg.num_kv_heads} x head_dim {hd}, hidden_size {h}"
    ff = f"intermediate_size {f}, hidden_size {h}"
    return {
        "q_proj": ((q, h), qf), "k_proj": ((kv, h), kvf), "v_proj": ((kv, h), kvf),
        "qkv_proj": ((q + 2 * kv, h), f"{qf}, {kvf}"), "gate_up_proj": ((2 * f, h), ff),
        "o_proj": ((h, q), qf), "gate_proj": ((f, h), ff), "up_proj": ((f, h), ff), "down_proj": ((h, f), ff),
        "q_bias": ((q,), qf), "k_bias": ((kv,), kvf), "v_bias": ((kv,), kvf),
        "q_norm": ((hd,), f"head_dim {hd}"), "k_norm": ((hd,), f"head_dim {hd}"),
        **{norm: ((h,), f"hidden_size {h}") for norm in ("attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm", "final_norm")},
        "embed": ((cfg.vocab_size, h), f"vocab_size {cfg.vocab_size}, hidden_size {h}"),
        "lm_head": ((cfg.vocab_size, h), f"vocab_size {cfg.vocab_size}, hidden_size {h}"),
    }


# the temporary names of the build's writers: ".<name>.tmp<pid>", ".<name>.spill<pid>", ".tmp<pid>-..."
_TEMPORARY = re.compile(r"^\..*?(?:tmp|spill|old)(\d+)(?:-\w+)?$")


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files and folders that a killed build left (kill -9 runs no cleanup): those of
    processes no longer running, so a build running beside this one keeps its own."""
    # only where a build writes: -o may name a folder that holds other things too
    found = [*out.glob(".*"), *(p for d in ("onnx", "quant", "compiled", "runtime", "adapters") for p in (out / d).rglob(".*"))]
    for path in sorted(found, reverse=True):  # (a folder's files before the folder)
        match = _TEMPORARY.match(path.name)
        if match is None or _running(int(match.group(1))):
            continue
        log.info("removing %s, left by an interrupted build", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # (someone else's process, or not a pid: leave it)
    return True


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        raise EdgeLLMError(f"{out}: output directory is not writable ({e.strerror})") from None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
