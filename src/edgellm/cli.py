"""The `edgellm` command: thin over edgellm.build and edgellm.runtime."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import EdgeLLMError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compile small language models for the edge, and run them.")
err = Console(stderr=True)


DRAFT_HELP = "speculative decoding: a smaller edgellm build with the same vocabulary drafts tokens"
DRAFT_MAX_HELP = "with --draft or --lookup: at most this many drafted tokens per verify call (adapts down)"
LOOKUP_HELP = "speculative decoding without a model: drafts from n-gram matches (up to N tokens) in the context"
IMAGE_HELP = "an image for a vision-language build (repeatable); placed at the prompt's image markers, or before it"
ADAPTER_HELP = "answer with this compiled LoRA adapter, NAME or NAME:SCALE (see `edgellm inspect MODEL_DIR`)"


@app.command()
def compile(
    model: Path = typer.Argument(..., help="Hugging Face model directory or GGUF file"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output directory (default: the model's name)"),
    configuration_file: Optional[Path] = typer.Option(None, "-c", "--configuration_file", help="per-layer precision plan (.py or .json)"),
    max_num_tokens: int = typer.Option(1024, "--max_num_tokens", help="context length"),
    language_group_size: Optional[int] = typer.Option(None, "--language_group_size", help="prefill group size (default 128; for Gemma 3 images, the 256 rows of an image)"),
    future_token_mask_size: int = typer.Option(128, "--future_token_mask_size", help="KV cache bucket size"),
    jobs: int = typer.Option(1, "-j", "--jobs", help="parallel worker processes"),
    resume: bool = typer.Option(False, "--resume", help="skip units already built with the same inputs"),
    onnx: bool = typer.Option(False, "--onnx", help="run only the onnx stage (with other stage flags: those stages)"),
    quantize: bool = typer.Option(False, "--quantize", help="run only the quantize stage"),
    compile_: bool = typer.Option(False, "--compile", help="run only the compile stage"),
    devkit: bool = typer.Option(False, "--devkit", help="run only the devkit (runtime files) stage"),
    target: Optional[str] = typer.Option(None, "--target", help="native (C for this CPU; the default where a C compiler is installed), cpu (ONNX Runtime; the default without one) or aarch64-linux (cross-compiled C)"),
    block_size: int = typer.Option(32, "--block_size", help="weights per block of the integer precisions"),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="integer blocks spanning each block's own range, with a float16 minimum (as GGUF Q4_1) instead of symmetric ones"),
    quantize_embeddings: bool = typer.Option(False, "--quantize_embeddings", help="int8 embedding table and LM head"),
    lm_head_bits: int = typer.Option(8, "--lm_head_bits", help="with --quantize_embeddings: 4 for an int4 LM head"),
    int8_activations: bool = typer.Option(False, "--int8_activations",
                                          help="quantize activations to int8 inside integer matmuls (faster, less exact)"),
    kv_cache_dtype: str = typer.Option("float32", "--kv_cache_dtype",
                                       help="float32, or float16 (native targets): half the KV cache's memory and reads"),
    enable_filter_sharing: bool = typer.Option(False, "--enable_filter_sharing",
                                               help="prefill and decode share one copy of the weights in memory"),
    lora_name: Optional[List[str]] = typer.Option(None, "--lora_name", help="name of a LoRA adapter compiled with the model (repeatable, one per --lora_path)"),
    lora_path: Optional[List[Path]] = typer.Option(None, "--lora_path", help="PEFT adapter directory or GGUF LoRA file (repeatable)"),
    lora_dtype: str = typer.Option("int8", "--lora_dtype", help="how compiled adapters store their factors: int8 or float32"),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="llama.cpp's vision projector GGUF for a GGUF text model (a vision-language model in two files)"),
    input_height: Optional[int] = typer.Option(None, "--input_height", help="image height in pixels for an encoder that takes any size (Qwen2-VL; default 448): every image is resized to it"),
    input_width: Optional[int] = typer.Option(None, "--input_width", help="image width in pixels, as --input_height"),
    keep_intermediates: bool = typer.Option(False, "--keep-intermediates", help="keep the float (onnx/) and quantized (quant/) segments after the build: --resume then rebuilds only what a changed plan changes"),
    log_level: str = typer.Option("WARNING", "--log_level", help="DEBUG, INFO, WARNING or ERROR"),
):
    """Compile MODEL into an output directory that `edgellm chat` runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .build import STAGES, BuildOptions, compile_model

    _logging(log_level)
    target = target or _default_target()
    chosen = tuple(s for s, flag in zip(STAGES, (devkit, onnx, quantize, compile_)) if flag) or STAGES
    out = output or Path(model.stem if model.is_file() else model.name)
    if model.is_dir() and (out.resolve() == model.resolve() or model.resolve() in out.resolve().parents):
        raise EdgeLLMError(f"{out}: the output would be inside the model directory {model}; name another with -o")
    options = BuildOptions(
        max_num_tokens=max_num_tokens, language_group_size=language_group_size,
        future_token_mask_size=future_token_mask_size, jobs=jobs, resume=resume, stages=chosen,
        configuration_file=str(configuration_file) if configuration_file else None, target=target,
        block_size=block_size, asymmetric=asymmetric, quantize_embeddings=_embedding_width(quantize_embeddings, lm_head_bits),
        int8_activations=int8_activations, enable_filter_sharing=enable_filter_sharing,
        kv_cache_dtype=kv_cache_dtype, lora=_lora_pairs(lora_name or [], lora_path or []), lora_dtype=lora_dtype,
        mmproj=str(mmproj) if mmproj else None, keep_intermediates=keep_intermediates, input_height=input_height,
        input_width=input_width,
    )
    with Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as bar:
        tasks = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        compile_model(model, out, options, progress)
    from .build import Manifest

    stored = Manifest.open(out / "manifest.json", fresh=False).weight_report()
    if stored:
        err.print("weights: " + ", ".join(f"{n} {how}" for how, n in sorted(stored.items())))
    err.print(f"[green]compiled[/green] {escape(str(model))} -> {escape(str(out))}")


@app.command("compile-lora")
def compile_lora(
    model_dir: Path = typer.Argument(..., help="an edgellm build compiled with LORA_BRANCH layers"),
    lora_path: Path = typer.Argument(..., help="PEFT adapter directory or GGUF LoRA file"),
    name: Optional[str] = typer.Option(None, "--name", help="the adapter's name (default: the path's name)"),
    lora_dtype: str = typer.Option("int8", "--lora_dtype", help="int8 or float32"),
):
    """Compile one more LoRA adapter for an existing build, without compiling the base again."""
    from .quant.adapters import add_adapter

    chosen = name or lora_path.stem
    written = add_adapter(model_dir, lora_path, chosen, lora_dtype)
    err.print(f"[green]compiled[/green] adapter {chosen} -> {written}")


def _lora_pairs(names: list[str], paths: list[Path]) -> tuple[tuple[str, str], ...]:
    if len(names) != len(paths):
        raise EdgeLLMError(f"--lora_name and --lora_path come in pairs: {len(names)} names, {len(paths)} paths")
    return tuple((n, str(p)) for n, p in zip(names, paths))


def _adapter_choice(text: str) -> tuple[str, float]:
    """--adapter NAME[:SCALE]"""
    name, _, scale = text.partition(":")
    try:
        value = float(scale) if scale else 1.0
    except ValueError:
        raise EdgeLLMError(f"--adapter {text}: the scale after ':' must be a number") from None
    return name, value


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="Hugging Face model directory, GGUF file, or an edgellm build"),
    configuration_file: Optional[Path] = typer.Option(None, "-c", "--configuration_file", help="precision plan or preset"),
    max_num_tokens: int = typer.Option(1024, "--max_num_tokens"),
    future_token_mask_size: int = typer.Option(128, "--future_token_mask_size"),
    quantize_embeddings: bool = typer.Option(False, "--quantize_embeddings"),
    lm_head_bits: int = typer.Option(8, "--lm_head_bits"),
):
    """Print the ModelConfig edgellm derives, the tensors it reads and the unit plan; compile nothing.
    Given a build: what it stores and its LoRA adapters."""
    from rich.table import Table

    if (model / "build.json").is_file():
        _inspect_build(model)
        return

    from .build import BuildOptions, check_tensors, read_model_config
    from .graph.units import plan_units
    from .quant.plan import PrecisionPlan
    from .sources import open_source

    options = BuildOptions(max_num_tokens=max_num_tokens, future_token_mask_size=future_token_mask_size)
    options.validate()
    source = open_source(model)
    where = str(getattr(source, "config_path", model))
    cfg = read_model_config(source)
    check_tensors(source, cfg, where)
    console = Console()
    console.print_json(cfg.to_json())
    tensors = Table(title="tensors (layer 0 and global)")
    for col in ("role", "tensor", "shape", "stored as"):
        tensors.add_column(col)
    roles = [(r, 0) for r in cfg.layer_tensors] + [(r, None) for r in cfg.global_tensors]
    for role, layer in roles:
        name = cfg.tensor_name(role, layer)
        tensors.add_row(role, name, str(tuple(source.tensor_shape(name))), source.storage(name))
    console.print(tensors)
    vision_layers = cfg.vision.num_layers if cfg.vision else None
    plan = PrecisionPlan(configuration_file, cfg.num_layers, _embedding_width(quantize_embeddings, lm_head_bits),
                         source.default_precision, vision_layers or 0)
    units = Table(title=f"units (buckets {options.buckets[0]}..{options.buckets[-1]} step {future_token_mask_size})")
    for col in ("variant", "part", "units", "precision"):
        units.add_column(col)
    groups: dict[tuple[str, str], list[str]] = {}
    for unit in plan_units(cfg.num_layers, options.buckets, vision_layers):
        groups.setdefault((unit.variant, unit.part), []).append(plan.choice(unit).precision)
    for (variant, part), precisions in groups.items():
        shown = "-" if part in ("MASK", "CACHE") else ", ".join(sorted(set(precisions)))  # no weights
        units.add_row(variant, part, str(len(precisions)), shown)
    console.print(units)


def _inspect_build(out: Path) -> None:
    from rich.table import Table

    from .quant.adapters import ADAPTERS_DIR, layout_key, list_adapters
    from .record import BuildRecord

    record = BuildRecord.load(out)
    console = Console()
    console.print(f"{out}: {record.summary()}, context {record.max_num_tokens} tokens", highlight=False)
    if record.lora_mode != "LORA_BRANCH":
        return
    table = Table(title=f"LoRA adapters (branches of rank {record.lora_rank} on {len(record.lora_sites)} matmuls)")
    for col in ("name", "rank", "stored", "modules", "MB", "source"):
        table.add_column(col)
    key = layout_key(record.lora_rank, record.lora_sites)
    for name, info in list_adapters(out).items():
        size = sum(f.stat().st_size for f in (out / ADAPTERS_DIR / name).iterdir()) / 2**20
        stale = "" if info.get("layout") == key else " (stale: compiled for other branches; compile-lora it again)"
        table.add_row(name + stale, str(info.get("rank")), str(info.get("dtype")), str(info.get("modules")),
                      f"{size:.2f}", str(info.get("source")))
    console.print(table)


@app.command()
def verify(model_dir: Path = typer.Argument(..., help="output directory of `edgellm compile`")):
    """Check every file of a build against the sizes and sha256 digests the build recorded."""
    from .record import BuildRecord

    if not (model_dir / "manifest.json").is_file():
        raise EdgeLLMError(f"{model_dir}: not an edgellm output directory (no manifest.json)")
    record = BuildRecord.load(model_dir)
    if not record.files:
        raise EdgeLLMError(f"{model_dir / 'build.json'}: lists no file digests (built by an older edgellm); "
                           "compile it again to verify it")
    start = time.perf_counter()
    read = record.check_files(model_dir, full=True)
    err.print(f"[green]verified[/green] {len(record.files)} files, {read / 2**20:.1f} MB in "
              f"{time.perf_counter() - start:.2f} s: as the build wrote them", highlight=False)


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="compiled output directory"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="prompt text"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="generate exactly --max-new-tokens tokens"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON line with text and metrics, nothing else"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores)"),
    draft: Optional[Path] = typer.Option(None, "--draft", help=DRAFT_HELP),
    draft_max: int = typer.Option(4, "--draft-max", help=DRAFT_MAX_HELP),
    lookup: Optional[int] = typer.Option(None, "--lookup", help=LOOKUP_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    image: Optional[List[Path]] = typer.Option(None, "--image", help=IMAGE_HELP),
):
    """Complete PROMPT (or answer it with --chat), streaming, then print TTFT and tokens/s."""
    import edgellm

    from .runtime.sampling import SamplingParams

    sampling = SamplingParams(temperature, top_k, top_p, seed)  # bad values: one line, before loading
    if max_new_tokens < 1:
        raise EdgeLLMError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")
    choice = _adapter_choice(adapter) if adapter else None
    model = edgellm.load(model_dir, threads=threads)
    if choice:
        model.set_adapter(*choice)
    drafter = _drafter(model, draft, draft_max, lookup, threads)
    on_text = None if as_json else _stream
    result = model.generate(prompt, chat=chat, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                            sampling=sampling, stop=tuple(stop or ()),
                            on_text=on_text, drafter=drafter, draft_max=draft_max, images=image or ())
    if as_json:
        keys = ("text", "prompt_tokens", "gen_tokens", "ttft_s", "decode_tps", "peak_rss_mb", "speculation",
                "image_tokens", "encode_s")
        print(json.dumps({k: v for k, v in result.metrics().items() if k in keys}))
    else:
        sys.stdout.write("\n")
        _report(result)


@app.command()
def chat(
    model_dir: Path = typer.Argument(..., help="compiled output directory"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    draft: Optional[Path] = typer.Option(None, "--draft", help=DRAFT_HELP),
    draft_max: int = typer.Option(4, "--draft-max", help=DRAFT_MAX_HELP),
    lookup: Optional[int] = typer.Option(None, "--lookup", help=LOOKUP_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    image: Optional[List[Path]] = typer.Option(None, "--image", help=IMAGE_HELP + " (with the first message)"),
):
    """Talk to a compiled model; history is kept (and its KV cache reused) across turns.
    /reset clears the history, /adapter NAME[:SCALE] or /adapter none switches the LoRA adapter,
    /image PATH adds an image to the next message (a vision-language build), /quit or Ctrl-D leaves."""
    import edgellm

    from .runtime.sampling import SamplingParams

    sampling = SamplingParams(temperature, top_k, top_p, seed)
    if max_new_tokens < 1:
        raise EdgeLLMError(f"--max-new-tokens {max_new_tokens}: generate at least 1 token")
    choice = _adapter_choice(adapter) if adapter else None
    model = edgellm.load(model_dir, threads=threads)
    if model.codec.no_chat:  # said before the first message, not after it
        raise EdgeLLMError(model.codec.no_chat)
    if choice:
        model.set_adapter(*choice)
    drafter = _drafter(model, draft, draft_max, lookup, threads)
    adapters = f" Adapters: {', '.join(model.adapters.names)}; /adapter NAME|none." if model.adapters.names else ""
    images = " /image PATH adds an image to the next message." if model.config.vision else ""
    err.print(f"[dim]{escape(str(model_dir))}: {model.config.family}, context {model.max_num_tokens} tokens.{adapters}{images} "
              "/reset, /quit[/dim]")
    pending = list(image or ())  # images for the next message
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        except UnicodeDecodeError as e:  # this line only; the conversation goes on
            _error(f"the line is not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            model.reset()
            pending = []
            continue
        if line.strip() == "/image" or line.strip().startswith("/image "):
            path = Path(line.strip().removeprefix("/image").strip())
            try:  # checked now, so a bad path is reported before the message is typed
                if model.config.vision is None:
                    raise EdgeLLMError(f"{model_dir}: this build is a text model; it takes no images")
                from .runtime.images import load_image

                load_image(path)
                pending.append(path)
                err.print(f"[dim]{escape(str(path))}: with the next message[/dim]", highlight=False)
            except EdgeLLMError as e:
                _error(e)
            continue
        if line.strip() == "/adapter" or line.strip().startswith("/adapter "):
            try:  # the conversation goes on under the new adapter (its cache is computed again)
                model.set_adapter(*_adapter_choice(line.strip().removeprefix("/adapter").strip() or "none"))
                shown = model.default_session.adapter
                err.print(f"[dim]adapter: {'none' if shown is None else f'{shown[0]} (scale {shown[1]:g})'}[/dim]")
            except EdgeLLMError as e:
                _error(e)
            continue
        if not line.strip():
            continue
        try:
            result = model.chat(line, max_new_tokens=max_new_tokens, sampling=sampling, on_text=_stream,
                                drafter=drafter, draft_max=draft_max, images=pending)
        except EdgeLLMError as e:
            _error(e)
            model.reset()
            pending = []
            continue
        pending = []
        sys.stdout.write("\n")
        _report(result)


@app.command("eval")
def eval_(
    model_dirs: List[Path] = typer.Argument(..., help="compiled output directories (one table row each)"),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text file (default: Python's pydoc topics)"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="compiled float build to compare with (e.g. an FP32 plan)"),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="evaluate the first N tokens of the text"),
    window: Optional[int] = typer.Option(None, "--window", help="tokens per window (default: the build's context)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON line per model on stdout"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
):
    """Perplexity on a text; with --reference, top-1 agreement and KL divergence against it."""
    import edgellm

    from .measure.accuracy import default_text, evaluate, precision_summary

    if text is not None:
        try:
            body, source = text.read_text(encoding="utf-8"), str(text)
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeLLMError(f"{text}: cannot read the text ({e})") from None
    else:
        body, source = default_text()
    if window is not None and window < 2:
        raise EdgeLLMError(f"--window {window}: a window needs at least 2 tokens")
    ref = edgellm.load(reference, threads=threads) if reference else None
    scores = []
    choice = _adapter_choice(adapter) if adapter else None
    for model_dir in model_dirs:
        model = edgellm.load(model_dir, threads=threads)
        ids = model.codec.encode(body)[:max_tokens]
        if len(ids) < 2:
            raise EdgeLLMError(f"{source}: the text has fewer than 2 tokens")
        score = evaluate(model, ids, ref, name=str(model_dir), precision=precision_summary(model_dir), window=window,
                         adapter=choice)
        scores.append(score)
        if as_json:
            print(json.dumps(score.as_dict()))
    if not as_json:
        from rich.table import Table

        table = Table(title=f"{source}, {scores[0].tokens} tokens" + (f", reference {reference}" if ref else ""))
        for col in ("model", "precision", "perplexity") + (("top-1 agreement", "KL (nats/token)") if ref else ()):
            table.add_column(col)
        for s in scores:
            row = [s.model, s.precision, f"{s.perplexity:.3f}"]
            if ref:
                row += [f"{100 * s.agreement:.1f}%", f"{s.kl:.4f}"]
            table.add_row(*row)
        Console().print(table)


@app.command()
def bench(
    model_dir: Path = typer.Argument(..., help="compiled output directory"),
    prompt_tokens: int = typer.Option(100, "--prompt-tokens"),
    gen_tokens: int = typer.Option(128, "--gen-tokens"),
    repeats: int = typer.Option(3, "--repeats", help="runs; the median is reported"),
    as_json: bool = typer.Option(False, "--json", help="one JSON line on stdout"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    draft: Optional[Path] = typer.Option(None, "--draft", help=DRAFT_HELP),
    draft_max: int = typer.Option(4, "--draft-max", help=DRAFT_MAX_HELP),
    lookup: Optional[int] = typer.Option(None, "--lookup", help=LOOKUP_HELP),
):
    """TTFT, decode tokens/s, achieved weight bandwidth, artifact size and peak RSS on this machine."""
    import edgellm

    from .measure.accuracy import default_text
    from .measure.speed import measure

    model = edgellm.load(model_dir, threads=threads)
    if prompt_tokens + gen_tokens > model.max_num_tokens:
        raise EdgeLLMError(f"{model_dir}: {prompt_tokens} + {gen_tokens} tokens exceed the context of {model.max_num_tokens}")
    ids = model.codec.encode(default_text()[0])[:prompt_tokens]
    drafter = _drafter(model, draft, draft_max, lookup, threads)
    speed = measure(model, model_dir, ids, gen_tokens, repeats, drafter=drafter, draft_max=draft_max)
    if as_json:
        print(json.dumps(speed.as_dict()))
        return
    speculation = f" | speculation {json.dumps(speed.speculation)}" if speed.speculation else ""
    print(f"{model_dir}: TTFT {speed.ttft_ms:.0f} ms ({speed.prompt_tokens} prompt tokens) | "
          f"decode {speed.decode_tps:.1f} tokens/s ({speed.gen_tokens} tokens) | "
          f"reads {speed.weight_mb_per_token:.1f} MB of weights + {speed.kv_cache_mb_per_token:.1f} MB of KV cache "
          f"per token = {speed.read_gbs:.2f} GB/s | "
          f"artifact {speed.artifact_mb:.0f} MB | peak RSS {speed.peak_rss_mb:.0f} MB{speculation}")


@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="compiled output directory"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8080, "--port"),
    parallel: int = typer.Option(4, "--parallel", help="sessions served at once, their decode steps batched"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require 'Authorization: Bearer KEY' (all but /health)"),
    alias: Optional[str] = typer.Option(None, "--alias", help="the model's name in the API (default: the directory's)"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    draft: Optional[Path] = typer.Option(None, "--draft", help=DRAFT_HELP),
    draft_max: int = typer.Option(4, "--draft-max", help=DRAFT_MAX_HELP),
    lookup: Optional[int] = typer.Option(None, "--lookup", help=LOOKUP_HELP),
    max_body: int = typer.Option(4 * 2**20, "--max-body", help="largest request body, in bytes"),
    cache_ram: int = typer.Option(256, "--cache-ram", help="MiB of finished conversations' KV caches kept for "
                                  "requests that repeat their start (least recently used dropped first, and "
                                  "whenever memory runs short); 0: none"),
    log_level: str = typer.Option("WARNING", "--log_level", help="DEBUG, INFO, WARNING or ERROR"),
):
    """Serve MODEL_DIR over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models)."""
    import uvicorn

    from .serve.app import ServeOptions, Server, create_app

    _logging(log_level)
    if cache_ram < 0:
        raise EdgeLLMError(f"--cache-ram {cache_ram}: give 0 (no store) or more MiB")
    if not (model_dir / "manifest.json").is_file():
        raise EdgeLLMError(f"{model_dir}: not an edgellm output directory (no manifest.json)")
    if draft is not None and lookup is not None:
        raise EdgeLLMError("--draft and --lookup: choose one drafter")
    if not 0 <= port <= 65535:
        raise EdgeLLMError(f"--port {port}: use 0 to 65535")
    if max_body < 1024:
        raise EdgeLLMError(f"--max-body {max_body}: allow at least 1024 bytes")
    options = ServeOptions(model_dir, parallel, api_key, alias, draft, lookup, draft_max, threads, max_body,
                           cache_ram << 20)
    config = uvicorn.Config(None, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5)
    web = uvicorn.Server(config)

    def stop():
        web.should_exit = True

    server = Server(options, on_failure=stop)
    config.app = create_app(server)
    threading.Thread(target=_announce, args=(server, web, host), daemon=True).start()
    web.run()
    if server.failed:
        raise EdgeLLMError(server.failed)


def _announce(server, web, host: str) -> None:
    """One line on stderr once the model is loaded and the socket listens."""
    server.ready.wait()
    while not web.started:
        time.sleep(0.05)
    ports = [s.getsockname()[1] for srv in web.servers for s in srv.sockets]
    err.print(f"serving {server.name} on http://{host}:{ports[0] if ports else '?'}/v1 "
              f"({server.options.parallel} sessions)", highlight=False)


def _drafter(model, draft, draft_max: int, lookup, threads):
    """The drafter the speculation flags ask for (None: plain decoding)."""
    if draft_max < 1:
        raise EdgeLLMError(f"--draft-max {draft_max}: draft at least 1 token")
    return model.drafter(draft, lookup, threads=threads)


def _default_target() -> str:
    """The fastest target this machine can build: native C where its compiler is installed."""
    import shutil

    from .targets.native.toolchain import TOOLCHAINS

    native = TOOLCHAINS["native"]
    if shutil.which(native.compiler):
        return "native"
    err.print(f"note: no C compiler ('{native.compiler}') found, so this build runs on ONNX Runtime (--target cpu); "
              f"install {native.package} for the faster native target")
    return "cpu"


def _embedding_width(quantize_embeddings: bool, lm_head_bits: int) -> str | None:
    if lm_head_bits not in (4, 8):
        raise EdgeLLMError(f"--lm_head_bits {lm_head_bits}: use 4 or 8")
    return f"int{lm_head_bits}" if quantize_embeddings else None


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _report(result) -> None:
    images = (f", of which {result.image_tokens} image rows, encoded in {result.encode_s * 1000:.0f} ms"
              if result.image_tokens else "")
    err.print(f"[dim]TTFT {result.ttft_s * 1000:.0f} ms ({result.prompt_tokens} prompt tokens{images}) | "
              f"{result.decode_tps:.1f} tokens/s ({result.gen_tokens} tokens) | peak RSS {result.peak_rss_mb:.0f} MB[/dim]")


def _logging(level: str) -> None:
    name = level.upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise EdgeLLMError(f"--log_level {level}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=name, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _error(message) -> None:
    """One line on stderr; the message is text, never markup (a tensor named "[/x]" stays as it is),
    and what it quotes from a file cannot break the line (control characters are shown escaped)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
    err.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)  # never wrapped


def main() -> None:
    try:
        # typer turns Ctrl-C (and an explicit Exit) into a returned exit code when not standalone
        code = app(standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except EdgeLLMError as e:
        _error(e)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):  # click turns Ctrl-C into Abort
        hint = "; `edgellm compile ... --resume` continues the build" if sys.argv[1:2] == ["compile"] else ""
        err.print(f"interrupted{hint}", highlight=False)
        sys.exit(130)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except typer.TyperException as e:  # usage errors: typer's own (vendored) click exceptions derive from it
        context = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and context is not None:
            print(context.get_help())
        else:
            command = f"edgellm {context.info_name} " if context is not None and context.parent else "edgellm "
            _error(f"{e.format_message()} (see `{command.strip()} --help`)")
        sys.exit(2)


if __name__ == "__main__":
    main()
