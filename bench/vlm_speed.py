"""Vision-language TTFT: SmolVLM-256M-Instruct's architecture with random weights, edgellm against
transformers, interleaved in one run.

No real VLM weights can be had on these machines, and timing does not depend on weight values,
so the model is transformers' own random initialization of SmolVLM-256M-Instruct's configuration
(SigLIP-B/16 at 512 px, pixel shuffle 4, a SmolLM2-135M-shaped text model with SmolVLM's 49280
tokens), with SmolLM2's tokenizer plus SmolVLM's image marker tokens. The prompt is one 512x512
image and a 20-token question; TTFT runs from the image file's bytes to the first token
(preprocessing, encoding, prefill), as a user waits for it. Two processor settings: SmolVLM's
default (the image resized to 2048 px and cut into 4 x 4 tiles plus the global view: 17 encoder
passes, 1088 image rows) and do_image_splitting off (the global view alone: 1 pass, 64 rows).

    python bench/vlm_speed.py [--repeats 3] [--plan PLAN] [--targets cpu,native] [--threads 2] [--settings whole,split]

--targets: edgellm builds to run, interleaved with transformers and each other (cpu: ONNX Runtime,
the encoder included; native: the C target, whose library holds the encoder too).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "edgellm-models" / "smolvlm-256m-random"
QUESTION = "Describe this picture in detail. What objects can you see in it, and which colors do they have?"
MARKERS = ["<fake_token_around_image>", "<image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7)
                                                                      for c in range(1, 7)]


def model_dir(split: bool) -> Path:
    """The random-weight SmolVLM-256M directory (cached), its processor splitting or not."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from edgellm.reference import smollm2_gguf
    from edgellm.sources import open_source

    path = CACHE / ("split" if split else "whole")
    if (path / "config.json").is_file():
        return path
    weights = CACHE / "weights"
    if not (weights / "config.json").is_file():
        torch.manual_seed(0)
        vision = transformers.Idefics3VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12, image_size=512, patch_size=16)
        text = transformers.LlamaConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                                        max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=False)
        tokenizer = Tokenizer.from_str(open_source(smollm2_gguf()).tokenizer().tokenizer_json)
        tokenizer.add_special_tokens(MARKERS)
        config = transformers.Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=4,
                                             image_token_id=tokenizer.token_to_id("<image>"))
        model = transformers.Idefics3ForConditionalGeneration(config).eval()
        weights.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(weights, safe_serialization=True)
        tokenizer.save(str(weights / "tokenizer.json"))
    path.mkdir(parents=True, exist_ok=True)
    for f in weights.iterdir():
        (path / f.name).unlink(missing_ok=True)
        (path / f.name).symlink_to(f)
    transformers.Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                                           do_image_splitting=split).save_pretrained(path)
    return path


def picture() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:512, 0:512]
    base = np.stack([x / 2, y / 2, (x + y) / 4], axis=-1) + rng.normal(0, 30, (512, 512, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


class Edgellm:
    def __init__(self, path: Path, plan: str | None, target: str, threads: int, out: Path):
        import edgellm
        from edgellm.build import BuildOptions, compile_model

        t0 = time.perf_counter()
        compile_model(path, out, BuildOptions(configuration_file=plan, target=target, max_num_tokens=2048,
                                              future_token_mask_size=128))
        self.compile_s = time.perf_counter() - t0
        self.model = edgellm.load(out, threads=threads)

    def ttft(self, image: bytes) -> tuple[float, float, int, int]:
        self.model.reset()  # a new conversation: nothing cached, not even the image's encoding
        self.model.images.clear()
        g = self.model.generate("<image>" + QUESTION, images=[image], max_new_tokens=1)
        return g.ttft_s, g.encode_s, g.prompt_tokens, g.token_ids[0] if g.token_ids else -1

    def encode_tile(self, tile: np.ndarray) -> float:
        t0 = time.perf_counter()
        self.model.image_encoder.encode_pixels(tile)
        return time.perf_counter() - t0


class Transformers:
    def __init__(self, path: Path, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        self.processor = transformers.Idefics3Processor(
            image_processor=transformers.Idefics3ImageProcessorPil.from_pretrained(path), tokenizer=tokenizer,
            image_seq_len=64)

    def ttft(self, image: bytes) -> tuple[float, float, int, int]:
        from PIL import Image

        torch = self.torch
        t0 = time.perf_counter()
        inputs = self.processor(text="<image>" + QUESTION, images=[Image.open(io.BytesIO(image)).convert("RGB")],
                                return_tensors="pt")
        with torch.inference_mode():
            t1 = time.perf_counter()
            self.model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"))
            encode = time.perf_counter() - t1
            token = int(self.model(**inputs).logits[0, -1].argmax())
        # the forward pass encodes the image again: TTFT counts the one inside it, not the extra one
        return time.perf_counter() - t0 - encode, encode, int(inputs["input_ids"].shape[1]), token

    def encode_tile(self, tile: np.ndarray) -> float:
        torch = self.torch
        pixels = torch.from_numpy(tile)[None, None]
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.model.get_image_features(pixels, torch.ones(1, 1, 512, 512, dtype=torch.bool))
            return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plan", default=None, help="edgellm precision plan (-c); default: the source's (BF16)")
    parser.add_argument("--targets", default="cpu", help="edgellm targets, comma-separated: cpu, native")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="whole,split", help="processor settings to run: whole, split")
    args = parser.parse_args()
    from edgellm.config.vision import tiled_processing
    from edgellm.runtime.images import load_image, preprocess

    image = picture()
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        for split in [name == "split" for name in args.settings.split(",")]:
            path = model_dir(split)
            engines = {f"edgellm {target}": Edgellm(path, args.plan, target, args.threads, Path(tmp) / f"out-{split}-{target}")
                       for target in args.targets.split(",")}
            engines["transformers"] = Transformers(path, args.threads)
            tile = preprocess(load_image(image), tiled_processing(json.loads((path / "preprocessor_config.json").read_text()),
                                                                  512, "")).tiles[0]
            for engine in engines.values():  # warm-up, untimed
                engine.ttft(image)
                engine.encode_tile(tile)
            runs = {name: [] for name in engines}
            tiles = {name: [] for name in engines}
            for _ in range(args.repeats):  # interleaved
                for name, engine in engines.items():
                    runs[name].append(engine.ttft(image))
                    tiles[name].append(engine.encode_tile(tile))
            tokens = {name: {r[3] for r in rs} for name, rs in runs.items()}
            setting = "split" if split else "whole"
            results[setting] = {
                name: {"ttft_s": statistics.median(r[0] for r in rs), "encode_s": statistics.median(r[1] for r in rs),
                       "prompt_tokens": rs[0][2], "encode_tile_s": statistics.median(tiles[name]),
                       "first_tokens": sorted(tokens[name])}
                for name, rs in runs.items()}
            for name, engine in engines.items():
                if name != "transformers":
                    results[setting][name]["compile_s"] = engine.compile_s
                    engine.model.close()
            print(json.dumps({setting: results[setting]}), flush=True)
    for setting, r in results.items():
        t = r["transformers"]
        for name, e in r.items():
            if name == "transformers":
                continue
            print(f"{setting}, {name}: prompt {e['prompt_tokens']} tokens (transformers {t['prompt_tokens']}); "
                  f"TTFT {e['ttft_s']:.2f} s (encode {e['encode_s']:.2f}) vs transformers {t['ttft_s']:.2f} s "
                  f"(encode {t['encode_s']:.2f}): {t['ttft_s'] / e['ttft_s']:.2f}x; one tile: "
                  f"{e['encode_tile_s']:.3f} vs {t['encode_tile_s']:.3f} s; compile {e['compile_s']:.0f} s")


if __name__ == "__main__":
    main()
