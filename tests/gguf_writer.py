"""Write a tiny Hugging Face model as a GGUF the way llama.cpp's converter lays it out (its key
names, tensor names, llama's q/k row permutation, Gemma's stored (1 + w) norms, Phi-3's LongRoPE
factor tensors), written here independently of edgellm's reader so the two can be checked
against each other. Float32 tensors; the vocabulary is the tiny models' w0..wN words."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# HF per-layer suffix -> GGUF per-layer name, as llama.cpp's convert_hf_to_gguf.py maps them
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_POST_ATTENTION = {"gemma2": "post_attention_norm", "gemma3": "post_attention_norm"}
_GEMMA_NORMS = {"pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def _gguf_name(hf: str, arch: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, index, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":
        name = _POST_ATTENTION.get(arch, "ffn_norm")
    else:
        name = _GEMMA_NORMS.get(module) or _LAYER[module]
    return f"blk.{index}.{name}.{kind}"


def finish(writer, path: Path) -> Path:
    """Write a gguf.GGUFWriter's file out: header, metadata, tensors."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: interleave the rotary halves of each head's rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(rope: dict, head_dim: int) -> np.ndarray:
    import math

    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


# Stored-block sizes (bytes, weights) of the GGUF types random_blocks makes, and where each keeps its
# float16 scales (byte offsets in a block; ggml-common.h).
BLOCK_BYTES = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q5_1": (24, 32), "Q8_0": (34, 32),
               "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256), "IQ4_NL": (18, 32)}
_HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,)}


def random_blocks(rows: int, cols: int, type_name: str, rng) -> np.ndarray:
    """A [rows, cols] weight stored as `type_name` with random values: random bytes, with the
    float16 scale (and minimum) fields set so that weights come out within about +-0.04. gguf-py cannot
    quantize to the K-quants, and any bytes are a valid block."""
    nbytes, weights = BLOCK_BYTES[type_name]
    raw = rng.integers(0, 256, (rows * cols // weights, nbytes), dtype=np.uint8)
    # a weight is at most about scale x 15 (Q4), x 63 x 15 (K-quants' 6-bit sc), x 127 x 32 (Q6_K)
    top = {"Q4_K": 63 * 15, "Q5_K": 63 * 31, "Q6_K": 127 * 32, "Q8_0": 127, "Q5_0": 16, "Q5_1": 31,
           "IQ4_NL": 127}.get(type_name, 15)
    for at in _HALF_FIELDS[type_name]:
        half = (rng.uniform(0.5, 1.0, raw.shape[0]) * 0.04 / top).astype(np.float16)
        raw[:, at : at + 2] = half.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def write_gguf(hf_dir: Path, path: Path, arch: str, types: dict[str, str] | None = None, seed: int = 0,
               special: list[str] = ()) -> Path:
    """types: GGUF tensor name (e.g. "blk.0.attn_q.weight") -> a GGUF block type; those tensors are
    written as random blocks of that type (random_blocks) instead of the model's float weights.
    special: control tokens that end the vocabulary (a vision-language model's image markers)."""
    import json

    import gguf
    from safetensors.numpy import load_file

    rng = np.random.default_rng(seed)
    config = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
        "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
        "attention.head_count": heads, "attention.head_count_kv": kv_heads,
        "attention.key_length": head_dim, "attention.value_length": head_dim,
        "rope.dimension_count": int(head_dim * rope.get("partial_rotary_factor", 1.0)),
    }
    for key, value in meta.items():
        writer.add_uint32(f"{arch}.{key}", int(value))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    writer.add_float32(f"{arch}.rope.freq_base", rope.get("rope_theta", 10000.0))
    if config.get("sliding_window") and arch in ("gemma2", "gemma3", "phi3"):
        writer.add_uint32(f"{arch}.attention.sliding_window", config["sliding_window"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            writer.add_float32(f"{arch}.{key}", config[key])
    if rope.get("mrope_section"):  # Qwen2VLModel: M-RoPE's sections, padded to 4
        writer.add_array(f"{arch}.rope.dimension_sections", list(rope["mrope_section"]) + [0])
    if rope.get("rope_type") == "llama3":  # llama.cpp's LlamaModel: the scaling as per-frequency divisors
        writer.add_tensor("rope_freqs.weight", _llama3_factors(rope, head_dim))
    if rope.get("rope_type") == "longrope":
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"])
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    vocab = config["vocab_size"]
    writer.add_tokenizer_model("gpt2")
    words = vocab - len(special)
    writer.add_token_list([f"w{i}" for i in range(words)] + list(special))
    writer.add_token_types([1] * words + [3] * len(special))  # 3: control tokens
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf, w in tensors.items():
        w = w.astype(np.float32)
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            w = _permute(w, heads if "q_proj" in hf else kv_heads)
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            w = w + 1.0
        name = _gguf_name(hf, arch)
        if types and types.get(name) in ("F16", "BF16"):
            dtype = np.float16 if types[name] == "F16" else None
            if dtype is None:  # bfloat16 bits, as uint16
                raw = (w.view(np.uint32) >> 16).astype(np.uint16)
                writer.add_tensor(name, raw.view(np.uint8), raw_shape=raw.view(np.uint8).shape,
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(name, w.astype(dtype))
            continue
        if types and name in types:
            raw = random_blocks(w.shape[0], w.shape[1], types[name], rng)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[types[name]])
            continue
        writer.add_tensor(name, np.ascontiguousarray(w))
    return finish(writer, path)


# K-quants need rows of 256: a tiny llama with hidden 256 and intermediate 512, every matmul a
# block type, fused projections of unlike types included (q/k/v of Q4_K, Q4_K and Q6_K: blocks
# of 32 and 16, unsigned and signed, both factored; gate/up of Q5_0 and Q5_1; q/k/v of Q5_0 and
# Q8_0: one form, two widths)
KQUANT_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
KQUANT_TYPES = {
    "blk.0.attn_q.weight": "Q4_K", "blk.0.attn_k.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K",
    "blk.0.attn_output.weight": "Q5_K", "blk.0.ffn_gate.weight": "Q5_0", "blk.0.ffn_up.weight": "Q5_1",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.1.attn_q.weight": "Q5_0", "blk.1.attn_k.weight": "Q5_0", "blk.1.attn_v.weight": "Q8_0",
    "blk.1.attn_output.weight": "Q4_0", "blk.1.ffn_gate.weight": "Q4_K", "blk.1.ffn_up.weight": "Q4_K",
    "blk.1.ffn_down.weight": "Q4_1",
    "output.weight": "Q6_K",
}


def write_kquant_model(root: Path) -> Path:
    """A tiny llama GGUF with every matmul in a block type (KQUANT_TYPES): root/tiny-kquants.gguf."""
    from tiny_models import save_tiny

    return write_gguf(save_tiny("llama", root / "hf", **KQUANT_SHAPE), root / "tiny-kquants.gguf", "llama", KQUANT_TYPES)


def text_part(vlm_dir: Path, out: Path, prefix: str = "model.text_model.") -> Path:
    """The text model of a tiny vision-language directory (its tensors under prefix: Idefics3's
    model.text_model., Gemma 3's language_model.model.) as a Hugging Face text model directory
    (what llama.cpp's converter writes to the text GGUF of the pair)."""
    import json

    from safetensors.numpy import load_file, save_file

    config = json.loads((vlm_dir / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config["text_config"]))
    tensors = load_file(str(vlm_dir / "model.safetensors"))
    head = {"lm_head.weight": w for name, w in tensors.items() if name.endswith("lm_head.weight")}  # (LLaVA: language_model.)
    save_file({**{name.replace(prefix, "model."): w for name, w in tensors.items() if name.startswith(prefix)}, **head},
              str(out / "model.safetensors"))
    return out


def write_mmproj(vlm_dir: Path, path: Path, types: dict[str, str] | None = None) -> Path:
    """The vision tower and connector of a tiny Idefics3 / SmolVLM or Gemma 3 directory as
    llama.cpp's mmproj GGUF: the tensor names from gguf-py's own name map (the converter's), its
    clip.* keys, and what the converter changes (Gemma 3: the projection's name, its
    soft-embedding norm stored as 1 + w, the pooling factor written only when it is not 4).
    types: GGUF tensor name -> "F16" or "Q8_0" (gguf-py quantizes those itself)."""
    import json

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((vlm_dir / "config.json").read_text())
    vision = config["vision_config"]
    gemma3 = config["model_type"] == "gemma3"
    processor = json.loads((vlm_dir / "preprocessor_config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, vision["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("gemma3" if gemma3 else "idefics3")
    writer.add_vision_projection_dim(config["text_config"]["hidden_size"])
    writer.add_vision_image_size(vision["image_size"])
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(vision["hidden_size"])
    writer.add_vision_feed_forward_length(vision["intermediate_size"])
    writer.add_vision_block_count(vision["num_hidden_layers"])
    writer.add_vision_head_count(vision["num_attention_heads"])
    writer.add_vision_image_mean(processor["image_mean"])
    writer.add_vision_image_std(processor["image_std"])
    writer.add_vision_attention_layernorm_eps(vision.get("layer_norm_eps", 1e-6))
    writer.add_vision_use_gelu(True)
    if gemma3:
        pooling = vision["image_size"] // vision["patch_size"] // round(config["mm_tokens_per_image"] ** 0.5)
        if pooling != 4:
            writer.add_vision_projector_scale_factor(pooling)
    else:
        writer.add_vision_projector_scale_factor(config["scale_factor"])
        writer.add_vision_preproc_image_size(processor["size"]["longest_edge"])
    for hf, w in load_file(str(vlm_dir / "model.safetensors")).items():
        if "text_model" in hf or "language_model" in hf or hf == "lm_head.weight" or ".head." in hf:
            continue
        if gemma3:  # transformers 5 writes the tower without its vision_model. level; the hub's files have it
            hf = hf.replace("_weight", ".weight")
            if hf.startswith("vision_tower.") and not hf.startswith("vision_tower.vision_model."):
                hf = hf.replace("vision_tower.", "vision_tower.vision_model.", 1)
            if "soft_emb_norm" in hf:
                w = w + 1.0
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        kind = (types or {}).get(name)
        w = w.astype(np.float32)
        if kind == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        elif kind == "Q8_0":
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w))
    return finish(writer, path)


# How llama.cpp's legacy LLaVA converter (examples/llava/convert_image_encoder_to_gguf.py) names a
# CLIP tower's tensors, part by part: note fc1 -> ffn_down and fc2 -> ffn_up
_LEGACY_LLAVA = {"embeddings.class_embedding": "class_embd", "embeddings.patch_embedding": "patch_embd",
                 "embeddings.position_embedding": "position_embd", "pre_layrnorm": "pre_ln",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
                 "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"}


def write_llava_mmproj(vlm_dir: Path, path: Path, feature_layer: bool) -> Path:
    """The CLIP tower and MLP projector of a tiny LLaVA directory as the legacy converter writes its
    mmproj: projector type mlp, no post-layernorm, CLIP's own projection_dim, the two projector
    layers as mm.0 and mm.2, quick-GELU (use_gelu false). With feature_layer, as the script's
    later versions do: every encoder layer and clip.vision.feature_layer (hidden-state indices:
    the second to last is num_hidden_layers - 1); without, as its earlier versions (the
    published LLaVA-1.5 files) do: CLIP's last layer dropped and one block fewer written."""
    import json

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((vlm_dir / "config.json").read_text())
    vision = config["vision_config"]
    processor = json.loads((vlm_dir / "preprocessor_config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    for key, value in (("image_size", vision["image_size"]), ("patch_size", vision["patch_size"]),
                       ("embedding_length", vision["hidden_size"]), ("feed_forward_length", vision["intermediate_size"]),
                       ("projection_dim", vision.get("projection_dim", 512)),
                       ("attention.head_count", vision["num_attention_heads"]),
                       ("block_count", vision["num_hidden_layers"] - (not feature_layer))):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", vision.get("layer_norm_eps", 1e-5))
    if feature_layer:
        layer = config.get("vision_feature_layer", -2)
        writer.add_array("clip.vision.feature_layer", [layer if layer >= 0 else vision["num_hidden_layers"] + 1 + layer])
    writer.add_array("clip.vision.image_mean", processor["image_mean"])
    writer.add_array("clip.vision.image_std", processor["image_std"])
    writer.add_bool("clip.use_gelu", vision.get("hidden_act") == "gelu")
    for hf, w in load_file(str(vlm_dir / "model.safetensors")).items():
        if hf.startswith("multi_modal_projector."):
            layer, kind = hf.removeprefix("multi_modal_projector.").split(".")
            name = f"mm.{ {'linear_1': 0, 'linear_2': 2}[layer] }.{kind}"
        elif hf.startswith("vision_tower.") and "post_layernorm" not in hf:
            rest = hf.removeprefix("vision_tower.").removeprefix("vision_model.")
            if rest.startswith("encoder.layers."):
                _, _, index, part = rest.split(".", 3)
                if not feature_layer and int(index) == vision["num_hidden_layers"] - 1:
                    continue  # the earlier converter drops the last layer (LLaVA reads the one before)
                module, kind = part.rsplit(".", 1)
                name = f"v.blk.{index}.{_LEGACY_LLAVA[module]}.{kind}"
            else:
                module, _, kind = rest.rpartition(".") if rest != "embeddings.class_embedding" else (rest, "", "")
                name = f"v.{_LEGACY_LLAVA[module]}" + (f".{kind}" if kind else "")
        else:
            continue
        w = w.astype(np.float32)
        writer.add_tensor(name, w.astype(np.float16) if w.ndim == 4 else np.ascontiguousarray(w))  # the patch conv: F16
    return finish(writer, path)


def write_qwen2_vl_mmproj(vlm_dir: Path, path: Path) -> Path:
    """The vision tower and merger of a tiny Qwen2-VL / Qwen2.5-VL directory as llama.cpp's
    converter (Qwen2VLVisionModel) writes its mmproj: projector type qwen2vl_merger or
    qwen2.5vl_merger, the fused qkv split in three, the patch convolution's two frames as
    v.patch_embd.weight and v.patch_embd.weight.1, the tensor names from gguf-py's name map; for
    Qwen2.5-VL the window pattern as n_wa_pattern. clip.vision.window_size is written only where
    it is not the published models' 112 px (the tiny model's 16): the reader defaults to 112, and
    the converter source read does not write the key."""
    import json

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((vlm_dir / "config.json").read_text())
    vision = config["vision_config"]
    qwen2 = config["model_type"] == "qwen2_vl"
    processor = json.loads((vlm_dir / "preprocessor_config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vision["depth"], 3))  # (the merger's mlp.2: mm.2)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("qwen2vl_merger" if qwen2 else "qwen2.5vl_merger")
    width = vision["embed_dim"] if qwen2 else vision["hidden_size"]
    writer.add_vision_projection_dim(vision["hidden_size"] if qwen2 else vision["out_hidden_size"])
    writer.add_vision_image_size(560)
    writer.add_vision_patch_size(vision["patch_size"])
    writer.add_vision_embedding_length(width)
    # (the converter writes Qwen2-VL's hidden_size, the merger's output, as the feed-forward length)
    writer.add_vision_feed_forward_length(vision["hidden_size"] if qwen2 else vision["intermediate_size"])
    writer.add_vision_block_count(vision["depth"])
    writer.add_vision_head_count(vision["num_heads"])
    writer.add_vision_image_mean(processor["image_mean"])
    writer.add_vision_image_std(processor["image_std"])
    writer.add_vision_attention_layernorm_eps(1e-6)
    if not qwen2:
        writer.add_vision_use_silu(True)
        writer.add_vision_n_wa_pattern(vision["fullatt_block_indexes"][0] + 1)
        if vision["window_size"] != 112:
            writer.add_vision_window_size(vision["window_size"])
    for hf, w in load_file(str(vlm_dir / "model.safetensors")).items():
        if not hf.startswith("visual."):
            continue
        w = w.astype(np.float32)
        if ".qkv." in hf:
            for part, rows in zip("qkv", np.split(w, 3)):
                writer.add_tensor(names.get_name(hf.replace("qkv", part), try_suffixes=(".weight", ".bias")),
                                  np.ascontiguousarray(rows))
        elif hf == "visual.patch_embed.proj.weight":
            writer.add_tensor("v.patch_embd.weight", np.ascontiguousarray(w[:, :, 0]))
            writer.add_tensor("v.patch_embd.weight.1", np.ascontiguousarray(w[:, :, 1]))
        else:
            writer.add_tensor(names.get_name(hf, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(w))
    return finish(writer, path)
