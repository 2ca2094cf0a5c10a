"""Tiny random-weight Hugging Face models built from transformers config classes (no download)."""

from __future__ import annotations

import contextlib
from pathlib import Path

VOCAB = 96


def _tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


# family -> (transformers config class, model class, settings beyond COMMON). Windows of 24 are
# shorter than the 40-token test prompts, so sliding-window masking is exercised.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16, "sliding_window": 24}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False, "use_sliding_window": True,
                                                 "sliding_window": 24, "max_window_layers": 1,
                                                 "layer_types": None}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}),
    # partial rotary and LongRoPE with per-frequency factors (the short ones: tests stay within 128)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {
        "num_key_value_heads": 2, "original_max_position_embeddings": 128, "max_position_embeddings": 512, "pad_token_id": 0,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 6.0]}}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
        # small caps, so that the soft-capping actually bends these tiny models' logits
        "attn_logit_softcapping": 0.5, "final_logit_softcapping": 1.0}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 24,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def save_tiny(model_type: str, path: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config_class, model_class, settings = FAMILIES[model_type]
    config = getattr(transformers, config_class)(**{**COMMON, **settings, **overrides})
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # norms and biases start as constants; give them some spread
        for name, p in model.named_parameters():
            if "gemma" in model_type and "norm" in name:  # (1 + w) norms start at w = 0
                p.normal_(0, 0.3)
            elif "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.float().eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer_json(path)
    return path


def round_embeddings_to_bf16(model) -> None:
    """What edgellm does to the embedding table and LM head of a build whose layers are not all
    FP32 (quant/plan.py): store them as bfloat16. References round them the same way."""
    import numpy as np
    import torch

    from edgellm.quant.precision import to_bfloat16_bits

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                bits = to_bfloat16_bits(p.numpy()).astype(np.uint32) << 16
                p.copy_(torch.from_numpy(bits.view(np.float32).copy()))


def round_to_bf16(t):
    """A float32 tensor rounded to bfloat16 (to nearest even) and back, as edgellm stores bfloat16."""
    import numpy as np
    import torch

    from edgellm.quant.precision import to_bfloat16_bits

    bits = to_bfloat16_bits(t.detach().numpy()).astype(np.uint32) << 16
    return torch.from_numpy(bits.view(np.float32).copy())


def bf16_build_reference(model_dir: Path):
    """transformers running a default (BF16) build's weights: every linear layer, the embedding
    table and the LM head rounded to bfloat16; norms stay float32."""
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2:
                p.copy_(round_to_bf16(p))
    return ref


@contextlib.contextmanager
def rounded_inputs(model, within: tuple[str, ...] = ("",), rounded: bool = True):
    """While open: the linear layers (and patch convolutions) of model whose names contain one of within
    take their input rounded to bfloat16, as bfloat16 weights multiply many rows on AMX tiles
    (the native targets' prefill and image encoder, Engine.bf16_tiles). rounded=False: nothing."""
    import torch

    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)
    hooks = [module.register_forward_pre_hook(lambda _, args: (round_to_bf16(args[0]),) + tuple(args[1:]))
             for name, module in model.named_modules()
             if rounded and isinstance(module, layers) and any(part in name for part in within)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def decode_logits(model, prompt: list[int], tokens: list[int], rounded_rows: int = 0):
    """The logits a build gives for the prompt's last row and after each of tokens but the last
    (one decode step each, the KV cache carried). The prompt's first rounded_rows rows go through
    the linear layers with their input rounded to bfloat16, as bfloat16 weights multiply the rows
    of a prefill call on AMX tiles (the native targets' group program, Engine.bf16_tiles); the
    rest of the prompt, as rows of the decode program, and the decode steps keep float32."""
    import numpy as np
    import torch

    def run(ids, past, rounded):
        with rounded_inputs(model, rounded=rounded):
            return model(torch.tensor([ids]), past_key_values=past, use_cache=True)

    with torch.no_grad():
        out = run(prompt[:rounded_rows], None, True) if rounded_rows else None
        out = run(prompt[rounded_rows:], out.past_key_values if out else None, False)
        rows, past = [out.logits[0, -1].numpy()], out.past_key_values
        for token in tokens[:-1]:
            out = run([token], past, False)
            rows.append(out.logits[0, -1].numpy())
            past = out.past_key_values
    return np.stack(rows)


def reference_with_stored_weights(model_dir: Path, bits: int, scheme: str = "symmetric"):
    """transformers running the weights as an integer edgellm build stores them: linear layers
    quantized in blocks of 32 and dequantized, the embedding table and LM head in bfloat16."""
    import torch
    import transformers

    from edgellm.quant.blocks import quantize

    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(torch.from_numpy(quantize(p.numpy(), bits, 32, scheme).dequantize()))
    round_embeddings_to_bf16(ref)
    return ref


def _spread(model, zero_centred_norms: str | None = None):
    """A tiny vision-language model's random weights, made so that the image changes the answer:
    norms, biases and embeddings spread, matmul weights x3; norms stored as w in (1 + w) (Gemma's,
    in modules whose names contain zero_centred_norms) drawn around 0."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if zero_centred_norms and "norm" in name and zero_centred_norms in name:
                p.normal_(0, 0.3)
            elif "norm" in name or name.endswith("bias") or "embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("weight"):
                p.mul_(3.0)
    return model.float().eval()


NEWLINES = ["\n\n", "\n"]  # tokens of the tiny vision-language tokenizers (the word-level ones drop line breaks)


def _vlm_tokenizer(path: Path, specials: list[str]) -> None:
    """A tiny vision-language model's tokenizer: words w0.., the line breaks, then `specials`,
    VOCAB tokens in all."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB - len(NEWLINES) - len(specials))}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_tokens(NEWLINES)  # so that a prompt's line breaks are tokens a test can see
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))


# A tiny LLaVA-1.5: CLIP vision tower (32 px images in 8 px patches: 16 image tokens), the
# two-layer projector, the llama text model above; "<image>" is token IMAGE_TOKEN.
IMAGE_TOKEN = VOCAB - 1
LLAVA_IMAGE = 32


def save_tiny_llava(path: Path, seed: int = 0, **vision_overrides) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=LLAVA_IMAGE, patch_size=8,
                                           **vision_overrides)
    text = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 2, "tie_word_embeddings": False})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                      image_seq_length=(LLAVA_IMAGE // 8) ** 2)
    model = _spread(transformers.LlavaForConditionalGeneration(config))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _vlm_tokenizer(path, ["<image>"])
    transformers.CLIPImageProcessorPil(size={"shortest_edge": LLAVA_IMAGE},
                                       crop_size={"height": LLAVA_IMAGE, "width": LLAVA_IMAGE}).save_pretrained(path)
    return path


# A tiny Idefics3 / SmolVLM: a SigLIP-style tower over 32 px tiles of 8 px patches, pixel shuffle by 2
# (4 rows per tile), images resized to at most 64 px: up to 2 x 2 tiles and the global view.
TILE = 32
TILED_MARKERS = ["<image>", "<fake_token_around_image>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]


def save_tiny_idefics3(path: Path, model_type: str = "idefics3", seed: int = 0) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    names = {"idefics3": ("Idefics3Config", "Idefics3VisionConfig", "Idefics3ForConditionalGeneration"),
             "smolvlm": ("SmolVLMConfig", "SmolVLMVisionConfig", "SmolVLMForConditionalGeneration")}[model_type]
    words = VOCAB - len(TILED_MARKERS) - len(NEWLINES)
    vision = getattr(transformers, names[1])(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=TILE, patch_size=8)
    text = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": 2, "tie_word_embeddings": False})
    config = getattr(transformers, names[0])(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                             image_token_id=words + len(NEWLINES), scale_factor=2)
    model = _spread(getattr(transformers, names[2])(config))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _vlm_tokenizer(path, TILED_MARKERS)
    transformers.Idefics3ImageProcessorPil(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE}
                                           ).save_pretrained(path)
    return path


# A tiny Gemma 3 with its vision tower: SigLIP over 32 px images in 4 px patches (8 x 8), pooled
# 4 x 4 to 2 x 2 = 4 rows per image; the text model a Gemma 3 with a sliding layer and a global one.
GEMMA3_MARKERS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def save_tiny_gemma3_vlm(path: Path, seed: int = 0, layer_types=("sliding_attention", "full_attention")) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    words = VOCAB - len(NEWLINES) - len(GEMMA3_MARKERS)
    boi, eoi, image = (words + len(NEWLINES) + i for i in range(3))
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=4)
    text = transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 2}, head_dim=16, query_pre_attn_scalar=16,
                                         sliding_window=24, layer_types=list(layer_types))
    config = transformers.Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), mm_tokens_per_image=4,
                                       boi_token_index=boi, eoi_token_index=eoi, image_token_index=image)
    model = _spread(transformers.Gemma3ForConditionalGeneration(config), zero_centred_norms="language_model")
    with torch.no_grad():  # transformers starts the projection at zeros: every image would be the same rows
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _vlm_tokenizer(path, GEMMA3_MARKERS)
    transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# A tiny PaliGemma: SigLIP over 16 px images in 4 px patches (16 image rows), one linear
# projection, a Gemma text model (text "gemma2": PaliGemma 2's, with soft-capping and windows).
PALIGEMMA_MARKERS = ["<bos>", "<image>"]
PALIGEMMA_IMAGE = 16


def save_tiny_paligemma(path: Path, text: str = "gemma", seed: int = 0) -> Path:
    import json

    import torch
    import transformers

    torch.manual_seed(seed)
    words = VOCAB - len(NEWLINES) - len(PALIGEMMA_MARKERS)
    bos, image = (words + len(NEWLINES) + i for i in range(2))
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=PALIGEMMA_IMAGE, patch_size=4)
    config_class, _, settings = FAMILIES[text]
    text_config = getattr(transformers, config_class)(**{**COMMON, **settings, "num_hidden_layers": 2, "bos_token_id": bos})
    config = transformers.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text_config.to_dict(),
                                          image_token_index=image, projection_dim=COMMON["hidden_size"],
                                          hidden_size=COMMON["hidden_size"], vocab_size=VOCAB)
    model = _spread(transformers.PaliGemmaForConditionalGeneration(config), zero_centred_norms="language_model")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _vlm_tokenizer(path, PALIGEMMA_MARKERS)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    transformers.SiglipImageProcessorPil(size={"height": PALIGEMMA_IMAGE, "width": PALIGEMMA_IMAGE}).save_pretrained(path)
    settings = json.loads((path / "preprocessor_config.json").read_text())  # as PaliGemma's hub files have it
    settings["image_seq_length"] = (PALIGEMMA_IMAGE // 4) ** 2
    (path / "preprocessor_config.json").write_text(json.dumps(settings))
    return path


# A tiny Qwen2-VL: its vision tower over 4 px patches (2 frames each, as the processor repeats a
# picture), 2D rotary positions, 2 x 2 patches merged per row; M-RoPE in the text model, whose
# 8 rotary frequencies are split 2 / 3 / 3 between the time, height and width positions.
QWEN2_VL_MARKERS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
QWEN2_VL_FACTOR = 8  # pixels per merged row: patch 4 x merge 2
# Qwen2-VL's chat template's shape (an image part is the marker between <|vision_start|> and
# <|vision_end|>), with words of the tiny vocabulary for its role tags
QWEN2_VL_TEMPLATE = ("{% for message in messages %}w90 {% if message['content'] is string %}{{ message['content'] }}"
                     "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
                     "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
                     "{% endif %} w91 {% endfor %}{% if add_generation_prompt %}w92 {% endif %}")


def _qwen2_vl_files(path: Path) -> None:
    import json

    import transformers

    _vlm_tokenizer(path, QWEN2_VL_MARKERS)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2_VL_TEMPLATE}))
    transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64}).save_pretrained(path)


def save_tiny_qwen2_vl(path: Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    words = VOCAB - len(NEWLINES) - len(QWEN2_VL_MARKERS)
    start, end, image = (words + len(NEWLINES) + i for i in range(3))
    vision = dict(depth=2, embed_dim=32, hidden_size=COMMON["hidden_size"], num_heads=4, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = {**COMMON, "num_hidden_layers": 2, "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=image,
                                        vision_start_token_id=start, vision_end_token_id=end, video_token_id=0,
                                        tie_word_embeddings=tie_word_embeddings)
    model = _spread(transformers.Qwen2VLForConditionalGeneration(config))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _qwen2_vl_files(path)
    return path


def save_tiny_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL, as the tiny Qwen2-VL, with its encoder's RMSNorms and gated MLPs, and windows of
    2 x 2 prompt rows (16 px) in layers 0 and 2 (layer 1 sees the whole image)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    words = VOCAB - len(NEWLINES) - len(QWEN2_VL_MARKERS)
    start, end, image = (words + len(NEWLINES) + i for i in range(3))
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, out_hidden_size=COMMON["hidden_size"], num_heads=4,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                  fullatt_block_indexes=[1])
    text = {**COMMON, "num_hidden_layers": 2, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "mrope", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=image,
                                           vision_start_token_id=start, vision_end_token_id=end, video_token_id=0)
    model = _spread(transformers.Qwen2_5_VLForConditionalGeneration(config))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _qwen2_vl_files(path)
    return path
