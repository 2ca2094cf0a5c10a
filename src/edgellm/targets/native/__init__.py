"""Targets `native` and `aarch64-linux`: C generated from the linked program, compiled to machine code.

    compiled/<target>/model.c       generated: one function per variant, the ONNX node names in comments
                     weights.bin    every weight repacked for the kernels, memory-mapped at load
                     libmodel.so    the Python runtime's engine (runtime/native.py, through ctypes)
                     model_main     a standalone program: prefill + greedy decode from token ids
                     program.json   weight bytes a decode step reads, the memory plan
The kernels (kernels/*.c, *.h) are real source files of the package, compiled with the model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ...config.model_config import ModelConfig
from ...errors import EdgeLLMError
from ...runtime.engine import VERIFY_ROWS
from ..link import link_quantized, link_vision
from ..stage_files import StageFiles
from .codegen import ModelShape, generate, plan_arena
from .encoder import EncoderLowering
from .lower import Lowering
from .toolchain import TOOLCHAINS, build_programs
from .weights import WeightsFile

TARGETS = tuple(TOOLCHAINS)
# Rows of the verify function (runtime/engine.py): a speculative draft of up to 7 tokens and the
# pending one. Its kernels keep each thread's copy of these rows on the stack (rows x the widest input).
log = logging.getLogger("edgellm.targets.native")


def compile_native(out: Path, cfg: ModelConfig, options, units, plan, manifest, progress=None) -> Path:
    toolchain = TOOLCHAINS[options.target]
    toolchain.find()  # before any work: a missing compiler is the likeliest failure
    target_dir = out / "compiled" / options.target
    target_dir.mkdir(parents=True, exist_ok=True)
    weights = WeightsFile(target_dir / "weights.bin")
    variants = {}
    try:
        programs = {variant: (link_quantized(out, units, is_group, plan, options, manifest, f"edgellm_{variant}"), tokens)
                    for variant, is_group, tokens in (("group", True, options.language_group_size), ("single", False, 1))}
        # one order for every variant: the session's branch table (em_set_lora)
        lora_sites = sorted({i.name[len("lora."):-len(".a")] for i in programs["group"][0].graph.input
                             if i.name.startswith("lora.") and i.name.endswith(".a")})
        vision = link_vision(out, units, plan, options, manifest) if cfg.vision is not None else None
        files = None if options.keep_intermediates else StageFiles(
            out / "quant", manifest, [p for p, _ in programs.values()] + ([vision] if vision is not None else []))
        for variant, (program, tokens) in programs.items():
            lowered = Lowering(program, weights, f"{out}/quant/{variant}", options.int8_activations, tokens,
                               lora_sites, files).run()
            variants[variant] = (lowered, plan_arena(lowered, tokens))
            log.info("%s: %d kernel calls; %s", variant, len(lowered.calls), variants[variant][1].report())
            if progress:
                progress("compile", len(variants), 3)
        # the decode program over a few rows (codegen.Rows): speculative verify calls, short prefills
        verify_rows = min(VERIFY_ROWS, options.language_group_size)
        if verify_rows > 1:
            variants["verify"] = (variants["single"][0], plan_arena(variants["single"][0], verify_rows))
        encoder = None
        if vision is not None:  # the image encoder: one more function of the same library and weights file
            lowering = EncoderLowering(vision, weights, f"{out}/quant/vision", options.int8_activations, files)
            lowered = lowering.run()
            encoder = (lowered, plan_arena(lowered, 1), lowering.shape)
            log.info("encoder: %d kernel calls; %s", len(lowered.calls), encoder[1].report())
        digest = weights.finish()
    except BaseException:
        weights.abort()
        raise
    shape = ModelShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, options.max_num_tokens,
                       options.language_group_size, cfg.vocab_size, cfg.hidden_size, verify_rows)
    sites = variants["single"][0].lora_sites
    if set(sites) != set(lora_sites):
        raise EdgeLLMError(f"{out}: LoRA branches {sorted(set(lora_sites) - set(sites))} were not lowered")
    code = generate(variants, weights.records, shape, weights.size, digest, manifest.data.get("model", str(out)),
                    [(site, sites[site]) for site in lora_sites], encoder)
    tmp = target_dir / f".model.c.tmp{os.getpid()}"
    tmp.write_text(code)
    os.replace(tmp, target_dir / "model.c")
    single = variants["single"][0]
    facts = {
        "target": options.target,
        "decode_weight_bytes": sum(weights.nbytes(w) for w in single.matmul_weights),
        "weights_bytes": weights.size,
        "kv_cache_dtype": options.kv_cache_dtype,
        "memory_plan": {v: {"arena": plan.arena, "no_reuse": plan.total, "lower_bound": plan.lower_bound}
                        for v, (_, plan) in variants.items()},
        "encoder_arena": encoder[1].arena if encoder else None,
    }
    tmp = target_dir / f".program.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(facts, indent=1))
    os.replace(tmp, target_dir / "program.json")
    build_programs(toolchain, target_dir)
    if progress:
        progress("compile", 3, 3)
    return target_dir
