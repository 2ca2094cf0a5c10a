"""One image-encoder pass per vision-language family, edgellm's BF16 and int8 encoders against
transformers' vision tower (and projector), interleaved in one run.

No real VLM weights can be had on these machines, and timing does not depend on weight values,
so each family's vision tower is transformers' random initialization of a published model's
vision configuration, beside a tiny text model (the encoder's time does not depend on it):

    llava      LLaVA-1.5-7B's CLIP ViT-L/14 at 336 px (577 rows, the 23 layers it uses), MLP projector
    paligemma  PaliGemma-3B-224's SigLIP So400m/14 at 224 px (256 rows, 27 layers), linear projector
    gemma3     Gemma 3 4B's SigLIP So400m/14 at 896 px (4096 rows, 27 layers), 4 x 4 pooling
    qwen2_vl   Qwen2-VL-2B's ViT (1280 wide, 32 layers, 2D rotary) at 448 px (1024 rows), the merger
    qwen2_5_vl Qwen2.5-VL-3B's ViT (1280 wide, 32 layers, 28 of them windowed, gated MLPs) at 448 px
    (the Qwen text models are one layer of the published width, so the merger's output is real)
    (SmolVLM-256M's SigLIP-B/16 at 512 px is bench/vlm_speed.py's, with TTFT.)

    python bench/vision_encoders.py [--families llava,paligemma,gemma3] [--repeats 3] [--threads 2]
                                    [--targets cpu,native]

--targets: where edgellm's encoders run: cpu (ONNX Runtime) and/or native (the C target's library),
each a BF16 and an int8 build.

The models are written once to ~/.cache/edgellm-models/vision-<family>; builds go to a temp dir.
A pass is the encoder program on one image's pixels (edgellm: ImageEncoder.encode_pixels;
transformers: get_image_features, fp32 eager, torch.set_num_threads(threads)); preprocessing is
not included. Also printed: each edgellm encoder's features against transformers' (relative error).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "edgellm-models"
INT8 = {"default": {"precision": "BF16"}, "rules": [{"match": {"part": "VISION"}, "set": {"precision": "A_BF16_W_INT8"}}]}
TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def _tokenizer(path: Path, specials: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(TEXT["vocab_size"] - len(specials))}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))


def model_dir(family: str) -> Path:
    """The family's random-weight model (cached)."""
    import torch
    import transformers

    path = CACHE / f"vision-{family}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    vocab = TEXT["vocab_size"]
    so400m = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
    if family == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                               num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**TEXT),
                                          image_token_index=vocab - 1, image_seq_length=576)
        model, specials = transformers.LlavaForConditionalGeneration(config), ["<image>"]
        processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    elif family == "paligemma":
        vision = transformers.SiglipVisionConfig(**so400m, image_size=224)
        text = transformers.GemmaConfig(**TEXT, head_dim=16)
        config = transformers.PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                              image_token_index=vocab - 1, projection_dim=64, hidden_size=64,
                                              vocab_size=vocab)
        model, specials = transformers.PaliGemmaForConditionalGeneration(config), ["<bos>", "<image>"]
        processor = transformers.SiglipImageProcessorPil(size={"height": 224, "width": 224})
    elif family == "gemma3":
        vision = transformers.SiglipVisionConfig(**so400m, image_size=896)
        text = transformers.Gemma3TextConfig(**TEXT, head_dim=16, sliding_window=24)
        config = transformers.Gemma3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                           mm_tokens_per_image=256, boi_token_index=vocab - 3, eoi_token_index=vocab - 2,
                                           image_token_index=vocab - 1)
        model = transformers.Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # transformers initializes the projection to zeros: every feature would be 0
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
        specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
        processor = transformers.Gemma3ImageProcessorPil(size={"height": 896, "width": 896})
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        width = 1536 if family == "qwen2_vl" else 2048
        text = {**TEXT, "hidden_size": width, "num_attention_heads": width // 128, "intermediate_size": 256,
                "rope_parameters": {"rope_type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1e6}}
        common = dict(depth=32, num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision = dict(common, embed_dim=1280, mlp_ratio=4, hidden_size=width)
            config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1,
                                                vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 2)
            model = transformers.Qwen2VLForConditionalGeneration(config)
        else:
            vision = dict(common, hidden_size=1280, intermediate_size=3420, out_hidden_size=width, window_size=112,
                          fullatt_block_indexes=[7, 15, 23, 31])
            config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1,
                                                   vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 2)
            model = transformers.Qwen2_5_VLForConditionalGeneration(config)
        specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
        processor = transformers.Qwen2VLImageProcessorPil()
    else:
        raise SystemExit(f"unknown family {family}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(tmp, safe_serialization=True)
    _tokenizer(tmp, specials)
    if family == "paligemma":
        (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    processor.save_pretrained(tmp)
    tmp.rename(path)
    return path


def picture(size: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, (x + y) * 127 / size], axis=-1) + rng.normal(0, 30, (size, size, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _timed(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llava,paligemma,gemma3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", default="cpu")
    args = parser.parse_args()
    import torch
    import transformers

    import edgellm
    from edgellm.build import BuildOptions, compile_model
    from edgellm.runtime.images import load_image, preprocess

    torch.set_num_threads(args.threads)
    classes = {"llava": "LlavaForConditionalGeneration", "paligemma": "PaliGemmaForConditionalGeneration",
               "gemma3": "Gemma3ForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    with tempfile.TemporaryDirectory(prefix="vision-bench-") as tmp:
        plan = Path(tmp) / "int8.json"
        plan.write_text(json.dumps(INT8))
        for family in args.families.split(","):
            path = model_dir(family)
            builds = {}
            for target in args.targets.split(","):
                for kind, chosen in (("BF16", None), ("int8", str(plan))):
                    name = kind if target == "cpu" else f"{target} {kind}"
                    t0 = time.perf_counter()
                    out = compile_model(path, Path(tmp) / f"{family}-{target}-{kind}", BuildOptions(
                        configuration_file=chosen, max_num_tokens=1024, target=target))
                    model = edgellm.load(out, threads=args.threads)
                    builds[name] = (model, time.perf_counter() - t0)
            vision = next(iter(builds.values()))[0].config.vision
            image = picture(vision.processing.height)  # (Qwen: 448 px, the builds' default size)
            pixels = preprocess(load_image(image), vision.processing).tiles[0]
            reference = getattr(transformers, classes[family]).from_pretrained(path, dtype=torch.float32).eval()
            if vision.encoder == "qwen2_vl":  # its processor's patches and grid
                inputs = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)(image, return_tensors="pt")
                theirs = (inputs["pixel_values"], inputs["image_grid_thw"])
            else:
                theirs = (torch.from_numpy(pixels[None]),)
            times = {name: [] for name in [*builds, "transformers"]}
            features = {}
            for _ in range(1 + args.repeats):  # the first round warms up and is not counted
                for name, (model, _) in builds.items():
                    seconds, features[name] = _timed(lambda m=model: m.image_encoder.encode_pixels(pixels))
                    times[name].append(seconds)
                with torch.no_grad():
                    seconds, out = _timed(lambda: reference.get_image_features(*theirs).pooler_output)
                times["transformers"].append(seconds)
                out = out[0] if isinstance(out, (list, tuple)) else out  # LLaVA, Qwen: one tensor per image
                features["transformers"] = out.reshape(-1, out.shape[-1]).numpy()
            result = {name: round(statistics.median(t[1:]), 3) for name, t in times.items()}
            expected = features["transformers"]
            errors = {name: round(float(np.linalg.norm(features[name] - expected) / np.linalg.norm(expected)), 4)
                      for name in builds}
            print(json.dumps({family: {"rows": vision.sequence, "layers": vision.num_layers, "pass_s": result,
                                       "feature_error": errors,
                                       "compile_s": {n: round(b[1], 1) for n, b in builds.items()}}}), flush=True)
            for model, _ in builds.values():
                model.close()


if __name__ == "__main__":
    main()
