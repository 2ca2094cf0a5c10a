"""Vision-language models: the image encoder compiled with the language model, images spliced into
the prompt, checked against transformers (tiny random-weight LLaVA, tests/tiny_models.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import build, edited_copy
from edgellm.errors import EdgeLLMError
from edgellm.runtime.images import load_image, preprocess
from edgellm.runtime.model import Model
from tiny_models import IMAGE_TOKEN, LLAVA_IMAGE, rounded_inputs, save_tiny_llava

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

OPTIONS = dict(max_num_tokens=128, language_group_size=32, future_token_mask_size=64)
PROMPT = "w5 w6 w7 w8"
ENCODER_MODULES = ("vision_tower", "multi_modal_projector")  # a LLaVA's image encoder
# (width, height): square, landscape, portrait, a wide strip, a tall one
ASPECTS = [(32, 32), (56, 40), (40, 56), (120, 33), (25, 97)]


def _picture(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)  # smooth gradients plus noise: resampling filters matter
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    noisy = base + rng.normal(0, 40, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _skip_without_compiler(target: str) -> None:
    if target == "native":
        from edgellm.targets.native.toolchain import TOOLCHAINS

        try:
            TOOLCHAINS["native"].find()
        except EdgeLLMError as e:
            pytest.skip(f"no C compiler for the native target: {e}")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def reference(llava):
    return transformers.LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(llava):
    return transformers.CLIPImageProcessorPil.from_pretrained(llava)


@pytest.fixture(scope="module", params=["cpu", "native"])
def fp32_build(request, llava, fp32_plan, tmp_path_factory):
    _skip_without_compiler(request.param)
    return build(llava, tmp_path_factory.mktemp(f"llava-{request.param}") / "out", fp32_plan, target=request.param,
                 **OPTIONS)


@pytest.mark.parametrize("size", [LLAVA_IMAGE, 336])
@pytest.mark.parametrize("width,height", ASPECTS)
def test_preprocessing_matches_the_hugging_face_processor(size, width, height):
    from edgellm.config.vision import image_processing

    hf = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = _picture(width * size // 32, height * size // 32)
    expected = hf(image, return_tensors="np")["pixel_values"][0]
    ours = preprocess(image, image_processing(hf.to_dict(), size, "preprocessor_config.json")).tiles[0]
    assert ours.shape == expected.shape == (3, size, size)
    np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_image_features_match_transformers(fp32_build, reference, processor):
    model = Model.load(fp32_build)
    for width, height in ASPECTS:
        pixels = processor(_picture(width, height), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = reference.get_image_features(pixels).pooler_output[0].numpy()
        ours = model.image_encoder.encode_pixels(pixels[0].numpy())
        assert ours.shape == expected.shape == (16, 64)
        np.testing.assert_allclose(ours, expected, atol=1e-4)
    # a C target's encoder is a function of its library; target cpu's an ONNX Runtime program
    native = (fp32_build / "compiled" / "native").is_dir()
    assert (getattr(model.engine, "encoder", None) is not None) == native
    assert (fp32_build / "compiled" / "vision" / "encoder.onnx").is_file() != native
    model.close()


def _reference_ids(model: Model, prompt: str) -> list[int]:
    """What the Hugging Face processor feeds the model: the image token repeated image_seq_length times."""
    return [IMAGE_TOKEN] * model.config.vision.image_tokens + model.codec.encode(prompt)


def test_logits_and_greedy_tokens_match_transformers(fp32_build, reference, processor):
    model = Model.load(fp32_build)
    image = _picture(56, 40)
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    ours = model.generate(PROMPT, images=[image], max_new_tokens=32, ignore_eos=True, return_logits=True)
    ids = torch.tensor([_reference_ids(model, "\n" + PROMPT)])
    with torch.no_grad():
        logits = reference(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        expected = reference.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    np.testing.assert_allclose(ours.logits[0], logits, atol=1e-4)
    assert ours.token_ids == expected
    assert ours.image_tokens == 16 and ours.prompt_tokens == 16 + 1 + 4  # the image, its line break, the words
    # the image changes the answer: another picture gives other logits
    other = Model.load(fp32_build).generate(PROMPT, images=[_picture(56, 40, seed=5)], max_new_tokens=1,
                                            return_logits=True)
    assert np.abs(other.logits[0] - ours.logits[0]).max() > 1e-2
    model.close()


def test_a_second_question_reuses_the_image(fp32_build):
    model = Model.load(fp32_build)
    encoded = []
    encode = model.image_encoder.encode_pixels
    model.image_encoder.encode_pixels = lambda pixels: encoded.append(1) or encode(pixels)
    image = _picture(40, 56)
    first = model.chat("w9 w10", images=[image], max_new_tokens=4, ignore_eos=True)
    second = model.chat("w11 w12", max_new_tokens=4, ignore_eos=True)
    assert len(encoded) == 1 and second.cached_tokens >= 16 and second.image_tokens == 16
    # the same conversation in a fresh session gives the same answer
    fresh = model.session()
    fresh.chat("w9 w10", images=[image], max_new_tokens=4, ignore_eos=True)
    assert fresh.chat("w11 w12", max_new_tokens=4, ignore_eos=True).token_ids == second.token_ids
    assert first.image_tokens == 16
    model.close()


def test_image_markers_in_the_prompt_place_the_images(fp32_build):
    model = Model.load(fp32_build)
    a, b = _picture(32, 32, seed=1), _picture(32, 32, seed=2)
    placed = model.session().generate(f"w3 <image> w4 <image> {PROMPT}", images=[a, b], max_new_tokens=3,
                                      ignore_eos=True, return_logits=True)
    swapped = model.session().generate(f"w3 <image> w4 <image> {PROMPT}", images=[b, a], max_new_tokens=3,
                                       ignore_eos=True, return_logits=True)
    assert placed.prompt_tokens == 2 * 16 + 2 + 4
    assert np.abs(placed.logits[0] - swapped.logits[0]).max() > 1e-3
    with pytest.raises(EdgeLLMError, match="2 image markers .* for 1 images"):
        model.session().generate("<image> <image> w1", images=[a])
    model.close()


def test_bad_images_and_too_many_images_fail_clearly(fp32_build, tmp_path):
    model = Model.load(fp32_build)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(EdgeLLMError, match=r"notes\.png: not an image"):
        model.generate(PROMPT, images=[not_image])
    truncated = tmp_path / "cut.png"
    _picture(64, 64).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    with pytest.raises(EdgeLLMError, match=r"cut\.png: the image cannot be decoded"):
        model.generate(PROMPT, images=[truncated])
    with pytest.raises(EdgeLLMError, match="context holds 128"):  # 8 images of 16 rows
        model.generate(PROMPT, images=[_picture(32, 32, seed=s) for s in range(8)])
    with pytest.raises(EdgeLLMError, match="speculative decoding of a prompt with images"):
        model.generate(PROMPT, images=[_picture(32, 32)], lookup=2)
    model.close()


def test_a_text_build_refuses_images(tmp_path, fp32_plan):
    from tiny_models import save_tiny

    out = build(save_tiny("llama", tmp_path / "llama"), tmp_path / "out", fp32_plan, **OPTIONS)
    with pytest.raises(EdgeLLMError, match="text model; it takes no images"):
        Model.load(out).generate(PROMPT, images=[_picture(32, 32)])


def test_pixel_limit(tmp_path, monkeypatch):
    from edgellm.runtime import images

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    _picture(40, 40).save(tmp_path / "big.png")
    with pytest.raises(EdgeLLMError, match=r"big\.png: 40x40 pixels is more than"):
        load_image(tmp_path / "big.png")


def test_config_errors_name_the_problem(llava, tmp_path):

    from edgellm.build import read_model_config
    from edgellm.sources import open_source

    def broken(edit, name):
        return edited_copy(llava, tmp_path / name, edit)

    missing = broken(lambda raw: raw.pop("vision_config"), "no-vision")
    with pytest.raises(EdgeLLMError, match="needs text_config and vision_config"):
        read_model_config(open_source(missing))
    siglip = broken(lambda raw: raw["vision_config"].update(model_type="siglip_vision_model"), "siglip")
    with pytest.raises(EdgeLLMError, match="vision encoder 'siglip_vision_model' is not supported"):
        read_model_config(open_source(siglip))
    # a positive vision_feature_layer indexes hidden_states as transformers does: [1] is the first layer's output
    positive = broken(lambda raw: raw.update(vision_feature_layer=1), "positive")
    assert read_model_config(open_source(positive)).vision.num_layers == 1
    wider = broken(lambda raw: raw["vision_config"].update(intermediate_size=64), "wider")
    with pytest.raises(EdgeLLMError, match=r"config\.json: the vision config implies shape \(64, 32\) for .*fc1"):
        build(wider, tmp_path / "out")


def test_cli_generate_with_an_image(fp32_build, tmp_path):
    _picture(50, 30).save(tmp_path / "a.png")
    run = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", str(fp32_build), "--image", str(tmp_path / "a.png"),
                          "-p", PROMPT, "-n", "4", "--ignore-eos", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["image_tokens"] == 16 and result["prompt_tokens"] == 21 and 0 < result["encode_s"] < result["ttft_s"]
    bad = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", str(fp32_build), "--image", str(tmp_path),
                          "-p", PROMPT], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and str(tmp_path) in bad.stderr


def _bf16(p) -> None:
    from edgellm.quant.precision import to_bfloat16_bits

    bits = to_bfloat16_bits(p.detach().numpy()).astype(np.uint32) << 16
    p.copy_(torch.from_numpy(bits.view(np.float32).copy()))


@pytest.mark.parametrize("target", ["cpu", "native"])
def test_int4_language_model_matches_transformers_on_the_stored_weights(llava, reference, processor, tmp_path, target):
    """The int4 preset: language-model matmuls in int4 blocks, the encoder BF16 (the compile
    manual's advice, kept by the presets); transformers runs the same dequantized weights."""
    import copy

    from edgellm.quant.blocks import quantize

    _skip_without_compiler(target)
    out = build(llava, tmp_path / "out", "int4", target=target, **OPTIONS)
    stored = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            if "language_model" in name and name.endswith("proj.weight"):
                p.copy_(torch.from_numpy(quantize(p.numpy(), 4, 32, "symmetric").dequantize()))
            elif "embed_tokens" in name or "lm_head" in name:
                _bf16(p)
            elif ("vision_tower" in name or "projector" in name) and name.endswith("weight") and p.dim() >= 2 \
                    and "position_embedding" not in name:
                _bf16(p)  # the encoder's matmul weights (the patch convolution's too)
    model = Model.load(out)
    image = _picture(40, 56, seed=3)
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    ours = model.generate(PROMPT, images=[image], max_new_tokens=32, ignore_eos=True, return_logits=True)
    ids = torch.tensor([_reference_ids(model, "\n" + PROMPT)])
    # the BF16 encoder on AMX tiles multiplies activations rounded to bfloat16
    with torch.no_grad(), rounded_inputs(stored, ENCODER_MODULES, model.engine.bf16_tiles):
        logits = stored(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        expected = stored.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    np.testing.assert_allclose(ours.logits[0], logits, atol=1e-3 * np.abs(logits).max())
    assert ours.token_ids == expected
    units = json.loads((out / "manifest.json").read_text())["units"]
    assert set(units["quantize:vision/layer000"]["weights"].values()) == {"bfloat16"}
    assert "int4" in json.dumps(units["quantize:group/layer000_pre"]["weights"])
    model.close()


@pytest.mark.parametrize("target", ["cpu", "native"])
def test_an_int8_encoder_runs_integer_gemms_on_per_channel_weights(llava, reference, processor, tmp_path, target):
    """An int8 image encoder: every matmul weight one symmetric int8 block per output channel, run
    as integer products on both targets: ONNX Runtime's integer GEMM (DynamicQuantizeMatMul:
    activations quantized per call) and the native integer panels with int8 activations (per
    row), without --int8_activations (which is the language model's choice). Its features are
    transformers' on the same dequantized weights, to within what quantizing the activations
    costs, and far from another image's."""
    import copy
    from collections import Counter

    import onnx

    from edgellm.quant.blocks import quantize

    _skip_without_compiler(target)
    plan = tmp_path / "vision_int8.json"
    plan.write_text(json.dumps({"default": {"precision": "FP32"},
                                "rules": [{"match": {"part": "VISION"}, "set": {"precision": "A_BF16_W_INT8"}}]}))
    out = build(llava, tmp_path / "out", plan, target=target, **OPTIONS)
    if target == "cpu":
        ops = Counter(n.op_type for n in onnx.load(out / "compiled" / "vision" / "encoder.onnx",
                                                   load_external_data=False).graph.node)
        layers = Model.load(out).config.vision.num_layers
        assert ops["DynamicQuantizeMatMul"] == 4 * layers + 3  # qkv, out, fc1, fc2; patches; the projector's two
        assert not {"MatMul", "MatMulNBits", "DequantizeLinear"} & set(ops)
    else:
        from edgellm.targets.native.weights import KINDS

        code = (out / "compiled" / "native" / "model.c").read_text()
        assert "em_matmul(pixels" in code  # the patch embedding reads the caller's pixels
        kinds = "|".join(str(KINDS[k]) for k in ("q8", "q6", "q5"))
        integer = [line for line in code.splitlines() if re.match(rf"    \{{({kinds}), \d+, \d+, \d+, 1, ", line)]
        assert len(integer) == 4 * Model.load(out).config.vision.num_layers + 3  # int8 activations; the text model FP32
    stored = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            if ("vision_tower" in name or "projector" in name) and name.endswith("weight") and p.dim() >= 2 \
                    and "position_embedding" not in name:
                w = p.numpy().reshape(p.shape[0], -1)  # [out, in]: one block spans an output channel's inputs
                p.copy_(torch.from_numpy(quantize(w, 8, w.shape[1], "symmetric").dequantize().reshape(p.shape)))
    model = Model.load(out)
    for seed in (1, 2):
        pixels = processor(_picture(40, 56, seed=seed), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected = stored.get_image_features(pixels).pooler_output[0].numpy()
        ours = model.image_encoder.encode_pixels(pixels[0].numpy())
        error = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
        assert error < 0.03, f"relative error {error}"  # measured 0.013-0.016 (cpu), 0.011-0.016 (native)
        if seed == 1:
            first = expected
    assert np.linalg.norm(first - expected) / np.linalg.norm(expected) > 0.2
    model.close()


# Idefics3 / SmolVLM: tiles, pixel shuffle, marker tokens around each tile (the processor's prompt)

def _idefics3_processor(model_dir):
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    return transformers.Idefics3Processor(image_processor=transformers.Idefics3ImageProcessorPil.from_pretrained(model_dir),
                                          tokenizer=tok, image_seq_len=4)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("width,height", ASPECTS)
def test_tiles_match_the_hugging_face_processor(width, height, split):
    """SmolVLM-256M's processor settings (512 px tiles, longest edge 2048, LANCZOS), with and
    without splitting: the same tile grid and pixel values."""
    from edgellm.config.vision import tiled_processing

    hf = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512},
                                               do_image_splitting=split)
    image = _picture(width * 9, height * 9)
    expected = hf(image, return_tensors="np", return_row_col_info=True)
    ours = preprocess(image, tiled_processing(hf.to_dict(), 512, "preprocessor_config.json"))
    assert (ours.rows, ours.cols) == (expected["rows"][0][0], expected["cols"][0][0])
    pixels = expected["pixel_values"][0]
    assert len(ours.tiles) == len(pixels) == ours.rows * ours.cols + 1
    np.testing.assert_allclose(np.stack(ours.tiles), pixels, atol=1e-3)


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def tiled_model(request, tmp_path_factory):
    from tiny_models import save_tiny_idefics3

    return request.param, save_tiny_idefics3(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.mark.parametrize("target", ["cpu", "native"])
def test_tiled_models_match_transformers(tiled_model, fp32_plan, tmp_path, target):
    model_type, model_dir = tiled_model
    _skip_without_compiler(target)
    out = build(model_dir, tmp_path / "out", fp32_plan, target=target, **OPTIONS)
    reference_class = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
    reference = getattr(transformers, reference_class[model_type]).from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = _idefics3_processor(model_dir)
    model = Model.load(out)
    # a single tile, a 1 x 2 grid, a 2 x 1 grid, 2 x 2: every tile and the global view
    for width, height in [(30, 30), (64, 20), (20, 64), (64, 64)]:
        image = _picture(width, height, seed=width + height)
        inputs = processor(text=f"<image>{PROMPT}", images=[image], return_tensors="pt")
        session = model.session()
        ours = session.generate(f"<image>{PROMPT}", images=[image], max_new_tokens=32, ignore_eos=True,
                                return_logits=True)
        with torch.no_grad():
            logits = reference(**inputs).logits[0, -1].numpy()
            expected = reference.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                          pad_token_id=0)[0, inputs["input_ids"].shape[1]:].tolist()
        assert ours.prompt_tokens == inputs["input_ids"].shape[1]
        tiles = inputs["pixel_values"].shape[1]
        assert ours.image_tokens == 4 * tiles
        # the markers around the tiles are the processor's, at the same positions
        ids = inputs["input_ids"][0].tolist()
        ours_ids = [t if t >= 0 else model.config.vision.image_token_id for t in session.tokens[: len(ids)]]
        assert ours_ids == ids
        np.testing.assert_allclose(ours.logits[0], logits, atol=1e-4)
        assert ours.token_ids == expected
        session.close()
    model.close()


def test_serve_answers_image_url_content_parts(llava, fp32_plan, tmp_path):
    """OpenAI chat content parts with data: URLs; the answer is what generate() gives for the same
    image; bad images are JSON errors and the server keeps serving."""
    import base64
    import io

    import httpx
    from test_serve import _serve

    out = build(llava, tmp_path / "out", fp32_plan, target="cpu", **OPTIONS)
    image = _picture(48, 40, seed=11)
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    local = Model.load(out).generate(PROMPT, chat=True, images=[image], max_new_tokens=8, ignore_eos=True)
    proc, base = _serve(out, "--parallel", "2")
    try:
        def ask(content):
            return httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "smol", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": content}]})

        good = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
        answer = ask(good)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == local.text
        assert answer.json()["usage"]["prompt_tokens"] == local.prompt_tokens
        for content, needle in [
            ([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}], "only data: URLs"),
            ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "not valid base64"),
            ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"text").decode()}}],
             "not an image"),
        ]:
            bad = ask(content)
            assert bad.status_code == 400 and needle in bad.json()["error"]["message"], bad.text
        again = ask(good)  # still serving, and the image is cached: the same answer
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == local.text
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr


# llama.cpp's two files: the text GGUF and the mmproj

MMPROJ_TYPES = {  # what llama.cpp's converter does with --outtype q8_0: matmuls Q8_0, embeddings F16/F32
    "v.blk.0.attn_q.weight": "Q8_0", "v.blk.0.attn_k.weight": "Q8_0", "v.blk.0.attn_v.weight": "Q8_0",
    "v.blk.0.ffn_up.weight": "Q8_0", "v.blk.1.attn_out.weight": "Q8_0", "mm.model.fc.weight": "Q8_0",
    "v.patch_embd.weight": "F16"}


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    from gguf_writer import text_part, write_gguf, write_mmproj
    from tiny_models import NEWLINES, TILED_MARKERS, save_tiny_idefics3

    root = tmp_path_factory.mktemp("pair")
    model = save_tiny_idefics3(root / "model", "idefics3")
    text = write_gguf(text_part(model, root / "text"), root / "text.gguf", "llama", special=NEWLINES + TILED_MARKERS)
    return model, text, write_mmproj(model, root / "mmproj.gguf"), write_mmproj(model, root / "mmproj-q8.gguf", MMPROJ_TYPES)


def _first_tokens(out, image, n=16):
    model = Model.load(out)
    result = model.generate("<image>", images=[image], max_new_tokens=n, ignore_eos=True, return_logits=True)
    model.close()
    return result


def test_a_gguf_text_model_and_its_mmproj_run_as_the_safetensors_model(gguf_pair, fp32_plan, tmp_path):
    model_dir, text, mmproj, _ = gguf_pair
    image = _picture(64, 20, seed=4)
    expected = _first_tokens(build(model_dir, tmp_path / "st", fp32_plan, **OPTIONS), image)
    ours = _first_tokens(build(text, tmp_path / "pair", mmproj=str(mmproj), **OPTIONS), image)  # no plan: SOURCE
    assert ours.prompt_tokens == expected.prompt_tokens and ours.image_tokens == expected.image_tokens == 12
    np.testing.assert_allclose(ours.logits[0], expected.logits[0], atol=1e-4)
    assert ours.token_ids == expected.token_ids


def test_an_mmproj_in_q8_0_keeps_its_blocks(gguf_pair, tmp_path):
    """Q8_0 vision matmuls run as the file's int8 blocks (SOURCE), F16 ones as bfloat16; the same
    build with every value dequantized into float32 (FP32 plan) agrees within what the int8
    activations of ONNX Runtime's int8 matmuls cost (targets/ort_lowering.py)."""
    _, text, _, mmproj = gguf_pair
    out = build(text, tmp_path / "q8", mmproj=str(mmproj), **OPTIONS)
    units = json.loads((out / "manifest.json").read_text())["units"]
    stored = units["quantize:vision/layer000"]["weights"]
    assert any("GGUF Q8_0" in how and "exactly" in how for how in stored.values()), stored
    assert any("float16" in how or "bfloat16" in how for how in units["quantize:vision/embed"]["weights"].values())
    image = _picture(30, 30, seed=6)
    float_build = tmp_path / "q8-fp32"
    (tmp_path / "fp32.json").write_text('{"default": {"precision": "FP32"}}')
    exact = _first_tokens(out, image, 4)
    dequantized = _first_tokens(build(text, float_build, tmp_path / "fp32.json", mmproj=str(mmproj), **OPTIONS), image, 4)
    np.testing.assert_allclose(exact.logits[0], dequantized.logits[0], atol=1e-2 * np.abs(dequantized.logits[0]).max())
    assert exact.token_ids[0] == dequantized.token_ids[0]


def test_mmproj_errors_name_the_file(gguf_pair, tmp_path):
    from gguf_writer import write_gguf
    from tiny_models import save_tiny

    model_dir, text, mmproj, _ = gguf_pair
    with pytest.raises(EdgeLLMError, match="--mmproj goes with a GGUF text model"):
        build(model_dir, tmp_path / "a", mmproj=str(mmproj), **OPTIONS)
    with pytest.raises(EdgeLLMError, match=r"text\.gguf: --mmproj takes llama\.cpp's vision projector file "
                                           r"\(architecture 'clip'\), not 'llama'"):
        build(text, tmp_path / "b", mmproj=str(text), **OPTIONS)
    wider = write_gguf(save_tiny("llama", tmp_path / "wide", hidden_size=32, num_attention_heads=2,
                                 num_key_value_heads=1), tmp_path / "wide.gguf", "llama")
    with pytest.raises(EdgeLLMError, match=r"mmproj\.gguf: the projector writes 64 values per row; the text model .* takes 32"):
        build(wider, tmp_path / "c", mmproj=str(mmproj), **OPTIONS)
    run = subprocess.run([sys.executable, "-m", "edgellm.cli", "compile", str(text), "--mmproj", str(tmp_path / "none.gguf"),
                          "-o", str(tmp_path / "d")], capture_output=True, text=True)
    assert run.returncode == 2 and "none.gguf: no such file (--mmproj)" in run.stderr


def test_vision_units_build_in_parallel_and_resume_to_the_same_files(llava, tmp_path):
    """-j and --resume hold for the encoder's units as for the language model's: a parallel build,
    a resumed one (nothing left to do) and a serial one write the same encoder program."""
    import hashlib

    def digest(out):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "compiled" / "vision").iterdir())}

    parallel = build(llava, tmp_path / "parallel", "int8", jobs=2, keep_intermediates=True, **OPTIONS)
    first = digest(parallel)
    units = json.loads((parallel / "manifest.json").read_text())["units"]
    assert {"onnx:vision/embed", "onnx:vision/layer001", "quantize:vision/projector"} <= set(units)
    assert "onnx:vision/layer002" not in units  # LLaVA reads the second to last layer: the last is not compiled
    before = {p: p.stat().st_mtime_ns for p in (parallel / "quant" / "vision").iterdir()}
    build(llava, tmp_path / "parallel", "int8", jobs=2, resume=True, keep_intermediates=True, **OPTIONS)
    assert {p: p.stat().st_mtime_ns for p in (parallel / "quant" / "vision").iterdir()} == before
    assert digest(parallel) == first
    assert digest(build(llava, tmp_path / "serial", "int8", **OPTIONS)) == first


def test_linked_programs_output_only_logits_caches_and_features(llava, fp32_plan, tmp_path):
    """A linked program's outputs are its results, not the tensors between its segments (ONNX
    Runtime neither reuses nor fuses across a graph output)."""
    import onnx

    out = build(llava, tmp_path / "out", fp32_plan, target="cpu", **OPTIONS)

    def outputs(path):
        return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]

    caches = [f"present.{i}.{kv}" for i in range(2) for kv in "kv"]
    for program in ("group.onnx", "single.onnx"):
        assert sorted(outputs(out / "compiled" / "cpu" / program)) == sorted(["logits", *caches])
    assert outputs(out / "compiled" / "vision" / "encoder.onnx") == ["image_features"]


def test_mmproj_with_missing_keys_or_tensors_names_the_mmproj(gguf_pair, tmp_path):
    import gguf

    from gguf_writer import finish, write_mmproj

    model_dir, text, _, _ = gguf_pair
    partial = tmp_path / "partial.gguf"
    writer = gguf.GGUFWriter(str(partial), "clip")
    writer.add_clip_projector_type("idefics3")
    writer.add_vision_projection_dim(64)
    writer.add_tensor("v.patch_embd.weight", np.zeros((32, 3, 8, 8), np.float32))
    finish(writer, partial)
    with pytest.raises(EdgeLLMError, match=r"partial\.gguf: mmproj metadata 'clip\.vision\.image_size' is missing"):
        build(text, tmp_path / "a", mmproj=str(partial), **OPTIONS)
    full = write_mmproj(model_dir, tmp_path / "full.gguf")
    reader_bytes = full.read_bytes()
    assert b"v.blk.1.ffn_down.weight" in reader_bytes
    trimmed = tmp_path / "trimmed.gguf"  # the same file without one encoder tensor
    source = gguf.GGUFReader(full)
    writer = gguf.GGUFWriter(str(trimmed), "clip")
    for field in source.fields.values():
        if field.name.startswith("clip."):
            value = field.contents()
            writer.add_key_value(field.name, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in source.tensors:
        if t.name != "v.blk.1.ffn_down.weight":
            writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    finish(writer, trimmed)
    with pytest.raises(EdgeLLMError, match=r"trimmed\.gguf: the vision config needs tensor .*layers\.1\.mlp\.fc2\.weight"):
        build(text, tmp_path / "b", mmproj=str(trimmed), **OPTIONS)


@pytest.mark.parametrize("settings,needle", [
    ({"crop_size": {"height": None}}, "crop_size.height must be a whole number"),
    ({"size": {"height": 32, "width": 32}, "crop_size": 32}, None),  # no shortest_edge: the encoder's size
    ({"image_mean": [0.5, 0.5]}, "image_mean must be 3 numbers"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std [0.5, 0, 0.5] has a zero"),
    ({"size": {"shortest_edge": 16}}, "size.shortest_edge 16 is smaller than the 32 px crop"),
    ({"resample": "bicubic"}, "unknown resample filter 'bicubic'"),
    ({"rescale_factor": -1}, "rescale_factor must be a positive number"),
    ({"image_mean": 0.5}, None),  # one number for every channel, as Hugging Face allows
])
def test_odd_processor_settings_are_errors_naming_the_field(settings, needle):
    from edgellm.config.vision import image_processing

    if needle is None:
        assert image_processing(settings, 32, "config.json").height == 32
        return
    with pytest.raises(EdgeLLMError) as info:
        image_processing(settings, 32, "model/config.json")
    assert "model/config.json (preprocessor_config.json)" in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize("settings,needle", [
    ({"max_image_size": 32, "size": 64}, None),
    ({"max_image_size": {"longest_edge": 64}}, "max_image_size 64 differs from the encoder's image_size 32"),
    ({"size": {"longest_edge": 0}}, "size.longest_edge must be a whole number"),
])
def test_odd_tiled_processor_settings(settings, needle):
    from edgellm.config.vision import tiled_processing

    if needle is None:
        assert tiled_processing(settings, 32, "c").resize_edge == 64
        return
    with pytest.raises(EdgeLLMError, match=needle):
        tiled_processing(settings, 32, "c")


def test_image_store_encodes_an_image_once_however_many_ask(tmp_path):
    import threading
    import time

    from edgellm.runtime.images import ImageStore, Prepared

    calls = []

    class SlowEncoder:
        def encode_pixels(self, tile):
            calls.append(1)
            time.sleep(0.2)  # both requests are inside the encoder at once
            return np.ones((4, 8), np.float32) * tile.sum()

    store, image = ImageStore(), Prepared([np.full((3, 4, 4), 0.5, np.float32)])
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.rows(image, SlowEncoder()))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1] and len(store.vectors) == 4 and len(store.by_pixels) == 1
    # past the limit the least recently used image goes; its ids are not given out again
    small = ImageStore(limit_bytes=2 * 4 * 8 * 4)
    first = small.rows(Prepared([np.zeros((3, 4, 4), np.float32)]), SlowEncoder())
    second = small.rows(Prepared([np.ones((3, 4, 4), np.float32)]), SlowEncoder())
    small.rows(Prepared([np.full((3, 4, 4), 2, np.float32)]), SlowEncoder())
    assert small.embeddings(second[0]) is not None
    with pytest.raises(EdgeLLMError, match="left the image store before its prompt ran"):
        small.embeddings(first[0])
    third = small.rows(Prepared([np.zeros((3, 4, 4), np.float32)]), SlowEncoder())
    assert set(third[0]).isdisjoint(first[0])


def test_a_known_image_file_is_not_decoded_again(fp32_build, tmp_path, monkeypatch):
    """The same file's bytes (as a path or as bytes) find the image's rows without decoding and
    preprocessing it again; other bytes under the same name are another image."""
    import edgellm.runtime.model as model_module

    model = Model.load(fp32_build)
    path = tmp_path / "a.png"
    _picture(50, 30).save(path)
    first, _ = model.encode_images([path])
    calls = []
    monkeypatch.setattr(model_module, "preprocess", lambda *a: calls.append(1) or preprocess(*a))
    again, _ = model.encode_images([str(path)])
    as_bytes, _ = model.encode_images([path.read_bytes()])
    assert again[0].tiles == first[0].tiles == as_bytes[0].tiles and again[0].text == first[0].text and not calls
    _picture(50, 30, seed=1).save(path)
    other, _ = model.encode_images([path])
    assert calls == [1] and other[0].tiles != first[0].tiles
    model.images.clear()  # the rows are gone: the file is prepared and encoded again
    model.encode_images([path])
    assert calls == [1, 1]
    model.close()


def test_a_template_that_cannot_take_image_parts_is_one_clear_error(fp32_build, tmp_path):
    import shutil

    out = tmp_path / "build"
    shutil.copytree(fp32_build, out)
    settings = json.loads((out / "runtime" / "runtime_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}{{ 'USER: ' + m['content'] }}{% endfor %}"
    (out / "runtime" / "runtime_config.json").write_text(json.dumps(settings))
    model = Model.load(out)
    with pytest.raises(EdgeLLMError, match=r"chat template failed on these messages \(with image parts\): TypeError"):
        model.generate(PROMPT, chat=True, images=[_picture(32, 32)])
    assert model.generate(PROMPT, chat=True, max_new_tokens=2).gen_tokens >= 1  # text only still works


# Gemma 3: SigLIP, average pooling, and image rows that attend to each other

@pytest.fixture(scope="module")
def gemma3_vlm(tmp_path_factory):
    from tiny_models import save_tiny_gemma3_vlm

    return save_tiny_gemma3_vlm(tmp_path_factory.mktemp("gemma3") / "model")


def _gemma3_reference(model_dir, image, ids):
    """transformers on the ids the processor makes (the image token where our rows are), with the
    token types that give image rows their bidirectional attention."""
    config = json.loads((model_dir / "config.json").read_text())
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = transformers.Gemma3ImageProcessorPil.from_pretrained(model_dir)(image, return_tensors="pt")["pixel_values"]
    inputs = torch.tensor([[t if t >= 0 else config["image_token_index"] for t in ids]])
    return reference, dict(input_ids=inputs, pixel_values=pixels, token_type_ids=(inputs == config["image_token_index"]).long())


@pytest.mark.parametrize("target", ["cpu", "native"])
@pytest.mark.parametrize("group", [32, 8])  # 8: the first call would end inside the image; it ends before it
def test_gemma3_images_match_transformers(gemma3_vlm, fp32_plan, tmp_path, group, target):
    from edgellm.runtime.session import attend_until, image_blocks

    _skip_without_compiler(target)
    out = build(gemma3_vlm, tmp_path / "out", fp32_plan, target=target, max_num_tokens=64, language_group_size=group,
                future_token_mask_size=64)
    model = Model.load(out)
    image = _picture(40, 56, seed=8)
    session = model.session()
    prompt = "w1 w2 w3 w4 w5 <start_of_image> w6 w7"
    ours = session.generate(prompt, images=[image], max_new_tokens=32, ignore_eos=True, return_logits=True)
    ids = session.tokens[: ours.prompt_tokens]
    assert ours.image_tokens == 4 and image_blocks(ids) == [(7, 11)]  # "\n\n" and <start_of_image> before it
    reference, inputs = _gemma3_reference(gemma3_vlm, image, ids)
    with torch.no_grad():
        every_row = reference(**inputs).logits[0].numpy()
        expected = reference.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(ids):].tolist()
    np.testing.assert_allclose(ours.logits[0], every_row[-1], atol=1e-4)
    assert ours.token_ids == expected
    other = model.session().generate(prompt, images=[_picture(40, 56, seed=9)], max_new_tokens=1, return_logits=True)
    assert np.abs(other.logits[0] - ours.logits[0]).max() > 1e-2  # the image matters to the answer
    if group == 32:  # every row's logits, and what the image rows' attention changes
        rows = model.images.embeddings(ids)
        bidirectional = model.session().engine_session.forward(ids, 0, 0, rows, attend_until(image_blocks(ids), 0, len(ids)))
        causal = model.session().engine_session.forward(ids, 0, 0, rows)
        np.testing.assert_allclose(bidirectional, every_row, atol=1e-4)
        assert np.abs(causal[7:11] - every_row[7:11]).max() > 1e-2
    model.close()


def test_gemma3_images_need_a_group_that_holds_them(gemma3_vlm, fp32_plan, tmp_path):
    with pytest.raises(EdgeLLMError, match="images are 4 rows that must be prefilled in one call; compile with "
                                           "--language_group_size 4 or more"):
        build(gemma3_vlm, tmp_path / "small", fp32_plan, target="cpu", max_num_tokens=64, language_group_size=2,
              future_token_mask_size=64)
    assert not (tmp_path / "small" / "manifest.json").exists()
    from edgellm.runtime.engine import prefill_chunks  # and the runtime's own guard, for a call that could not hold one

    with pytest.raises(EdgeLLMError, match="an image's 4 rows, which see each other, do not fit one prefill call of 2 rows"):
        list(prefill_chunks([1, -1, -2, -3, -4, 2], 0, 2, blocks=[(1, 5)]))
    assert [(start, len(chunk)) for start, chunk, _ in prefill_chunks([1, 2, -1, -2, -3, -4, 3], 0, 4, blocks=[(2, 6)])] \
        == [(0, 2), (2, 4), (3, 4)]


def test_gemma3_preprocessing_matches_the_hugging_face_processor():
    from edgellm.config.vision import resized_processing

    hf = transformers.Gemma3ImageProcessorPil(size={"height": 896, "width": 896})
    for width, height in ASPECTS:
        image = _picture(width * 9, height * 9)
        expected = hf(image, return_tensors="np")["pixel_values"][0]
        ours = preprocess(image, resized_processing(hf.to_dict(), 896, "preprocessor_config.json")).tiles[0]
        np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_the_default_group_holds_a_gemma3_image(gemma3_vlm, fp32_plan, tmp_path, monkeypatch):
    """Without --language_group_size a build takes the default, or an image's rows where a model's
    image must be prefilled in one call (Gemma 3 4B: 256 > 128)."""
    from edgellm import build as build_module
    from edgellm.record import BuildRecord

    monkeypatch.setattr(build_module, "DEFAULT_GROUP_SIZE", 2)  # the tiny model's images are 4 rows
    out = build(gemma3_vlm, tmp_path / "out", fp32_plan, target="cpu", max_num_tokens=64, future_token_mask_size=64)
    assert BuildRecord.load(out).group_size == 4
    result = Model.load(out).generate("<start_of_image> w1", images=[_picture(32, 32)], max_new_tokens=2)
    assert result.image_tokens == 4


# PaliGemma: SigLIP, one linear projection, and a prompt (image, <bos>, text, newline) whose rows
# all see each other; PaliGemma 2's text model is a Gemma 2

@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def paligemma(request, tmp_path_factory):
    from tiny_models import save_tiny_paligemma

    return save_tiny_paligemma(tmp_path_factory.mktemp(f"paligemma-{request.param}") / "model", text=request.param)


def _paligemma_processor(model_dir):
    """transformers' own PaliGemma processor over the tiny tokenizer: the reference for the layout."""
    from tiny_models import PALIGEMMA_IMAGE

    pixels = transformers.SiglipImageProcessorPil.from_pretrained(model_dir)
    pixels.image_seq_length = (PALIGEMMA_IMAGE // 4) ** 2
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), bos_token="<bos>")
    return transformers.PaliGemmaProcessor(image_processor=pixels, tokenizer=tokenizer)


@pytest.mark.parametrize("target", ["cpu", "native"])
def test_paligemma_matches_transformers(paligemma, fp32_plan, tmp_path, target):
    from edgellm.runtime.session import attend_until, attention_blocks

    _skip_without_compiler(target)
    out = build(paligemma, tmp_path / "out", fp32_plan, target=target, max_num_tokens=64, language_group_size=32,
                future_token_mask_size=64)
    model = Model.load(out)
    image = _picture(40, 56, seed=3)
    session = model.session()
    ours = session.generate("w1 w2 w3 w4", images=[image], max_new_tokens=32, ignore_eos=True, return_logits=True)
    ids = session.tokens[: ours.prompt_tokens]
    expected_inputs = _paligemma_processor(paligemma)(text="<image>w1 w2 w3 w4", images=image, return_tensors="pt")
    image_token = json.loads((paligemma / "config.json").read_text())["image_token_index"]
    assert [t if t >= 0 else image_token for t in ids] == expected_inputs["input_ids"][0].tolist()
    assert ours.image_tokens == 16 and attention_blocks(model.config.vision, ids) == [(0, len(ids))]

    reference = transformers.PaliGemmaForConditionalGeneration.from_pretrained(paligemma, dtype=torch.float32).eval()
    inputs = {k: expected_inputs[k] for k in ("input_ids", "pixel_values", "token_type_ids")}
    with torch.no_grad():
        features = reference.get_image_features(inputs["pixel_values"]).pooler_output[0].numpy()
        every_row = reference(**inputs).logits[0].numpy()
        generated = reference.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                                       output_logits=True, return_dict_in_generate=True)
    np.testing.assert_allclose(model.images.embeddings(ids)[:16], features, atol=1e-4)
    assert ours.token_ids == generated.sequences[0, len(ids):].tolist()
    np.testing.assert_allclose(np.stack(ours.logits), torch.cat(generated.logits).numpy(), atol=1e-4)
    # every prompt row, and what the prefix's two-way attention changes
    rows = model.images.embeddings(ids)
    prefix = model.session().engine_session.forward(ids, 0, 0, rows, attend_until([(0, len(ids))], 0, len(ids)))
    causal = model.session().engine_session.forward(ids, 0, 0, rows)
    np.testing.assert_allclose(prefix, every_row, atol=1e-4)
    assert np.abs(causal[:-1] - every_row[:-1]).max() > 1e-2
    model.close()


def test_paligemma_reuses_the_cache_only_for_the_same_prefix(paligemma, fp32_plan, tmp_path):
    """A second question about the same image shares the image's ids, but the image's rows saw
    the first question: nothing is reused, and the answer is a fresh session's. The same prompt
    again reuses all but its last row."""
    out = build(paligemma, tmp_path / "out", fp32_plan, target="cpu", max_num_tokens=64, language_group_size=32,
                future_token_mask_size=64)
    model = Model.load(out)
    image = _picture(30, 30, seed=4)
    session = model.session()
    session.generate("w1 w2", images=[image], max_new_tokens=4, ignore_eos=True)
    second = session.generate("w1 w3", images=[image], max_new_tokens=4, ignore_eos=True, return_logits=True)
    fresh = model.session().generate("w1 w3", images=[image], max_new_tokens=4, ignore_eos=True, return_logits=True)
    assert second.cached_tokens == 0 and second.token_ids == fresh.token_ids
    np.testing.assert_allclose(np.stack(second.logits), np.stack(fresh.logits), atol=1e-5)
    again = session.generate("w1 w3", images=[image], max_new_tokens=4, ignore_eos=True, return_logits=True)
    assert again.cached_tokens == fresh.prompt_tokens - 1 and again.token_ids == fresh.token_ids
    np.testing.assert_allclose(np.stack(again.logits), np.stack(fresh.logits), atol=1e-5)
    # a prompt without an image is laid out the same way (the server's /v1/completions too); no chat
    assert model.prompt_ids("w1 w2") == [94, 1, 2, 93]  # <bos>, the words, the newline
    with pytest.raises(EdgeLLMError, match="paligemma takes a prompt, not a conversation"):
        model.chat("w1", images=[image])
    model.close()
    chat = subprocess.run([sys.executable, "-m", "edgellm.cli", "chat", str(out)], input="/quit\n", capture_output=True,
                          text=True, timeout=120)  # refused before the first message
    assert chat.returncode == 2 and "takes a prompt, not a conversation" in chat.stderr and ">" not in chat.stdout


def test_paligemma_prompts_must_fit_one_call(paligemma, fp32_plan, tmp_path):
    with pytest.raises(EdgeLLMError, match=r"paligemma's prompts \(an image's 16 rows, <bos> and the text\) are prefilled "
                                           r"in one call; compile with --language_group_size 18 or more"):
        build(paligemma, tmp_path / "small", fp32_plan, target="cpu", max_num_tokens=64, language_group_size=16,
              future_token_mask_size=64)
    out = build(paligemma, tmp_path / "out", fp32_plan, target="cpu", max_num_tokens=64, language_group_size=20,
                future_token_mask_size=64)
    model = Model.load(out)
    with pytest.raises(EdgeLLMError, match="the prompt's 22 rows, which see each other, do not fit one prefill call "
                                           "of 20 rows; compile with a --language_group_size of 22 or more"):
        model.generate("w1 w2 w3 w4", images=[_picture(20, 20)], max_new_tokens=2)
    assert model.generate("w1 w2", images=[_picture(20, 20)], max_new_tokens=2).image_tokens == 16
    model.close()
    # a build whose tokenizer names no <bos> cannot lay out a prompt: one line naming the file
    import shutil

    copy = shutil.copytree(out, tmp_path / "no-bos")
    settings_file = copy / "runtime" / "runtime_config.json"
    settings = json.loads(settings_file.read_text())
    settings["bos_token"] = None
    settings_file.write_text(json.dumps(settings))
    with pytest.raises(EdgeLLMError, match=r"no-bos/runtime/runtime_config\.json: a PaliGemma prompt starts with <bos>"):
        Model.load(copy).generate("w1 w2", images=[_picture(20, 20)], max_new_tokens=2)


def test_paligemma_preprocessing_and_config_checks(paligemma, tmp_path):
    import shutil

    from edgellm.build import read_model_config
    from edgellm.config.vision import resized_processing
    from edgellm.sources import open_source

    hf = transformers.SiglipImageProcessorPil(size={"height": 224, "width": 224})
    for width, height in ASPECTS:
        image = _picture(width * 5, height * 5)
        expected = hf(image, return_tensors="np")["pixel_values"][0]
        ours = preprocess(image, resized_processing(hf.to_dict(), 224, "preprocessor_config.json", 3)).tiles[0]
        np.testing.assert_allclose(ours, expected, atol=1e-3)
    assert read_model_config(open_source(paligemma)).vision.processing.resample == "bicubic"
    copy = tmp_path / "model"
    shutil.copytree(paligemma, copy)
    settings = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(json.dumps({**settings, "image_seq_length": 256}))
    with pytest.raises(EdgeLLMError, match="image_seq_length 256 contradicts the encoder's 16 patches"):
        read_model_config(open_source(copy))


def test_a_gemma3_gguf_and_its_mmproj_run_as_the_safetensors_model(fp32_plan, tmp_path):
    """llama.cpp's two files of a Gemma 3 VLM (projector type gemma3: the projection renamed, the
    soft-embedding norm stored as 1 + w, the pooling factor left out at its default of 4) give
    the safetensors directory's logits and tokens. Both layers slide: GGUF says which layers
    slide only by llama.cpp's fixed pattern."""
    from gguf_writer import text_part, write_gguf, write_mmproj
    from tiny_models import GEMMA3_MARKERS, NEWLINES, save_tiny_gemma3_vlm

    model_dir = save_tiny_gemma3_vlm(tmp_path / "model", layer_types=("sliding_attention",) * 2)
    text = write_gguf(text_part(model_dir, tmp_path / "text", "language_model.model."), tmp_path / "text.gguf", "gemma3",
                      special=NEWLINES + GEMMA3_MARKERS)
    mmproj = write_mmproj(model_dir, tmp_path / "mmproj.gguf")
    options = dict(target="cpu", max_num_tokens=64, language_group_size=32, future_token_mask_size=64)
    image = _picture(40, 56, seed=8)
    results = []
    for out in (build(model_dir, tmp_path / "st", fp32_plan, **options),
                build(text, tmp_path / "pair", mmproj=str(mmproj), **options)):  # no plan: SOURCE
        model = Model.load(out)
        results.append(model.generate("<start_of_image>", images=[image], max_new_tokens=16, ignore_eos=True,
                                      return_logits=True))
        model.close()
    expected, ours = results
    assert ours.prompt_tokens == expected.prompt_tokens and ours.image_tokens == expected.image_tokens == 4
    np.testing.assert_allclose(np.stack(ours.logits), np.stack(expected.logits), atol=1e-4)
    assert ours.token_ids == expected.token_ids


@pytest.mark.parametrize("newer", [False, True])
def test_a_llava_gguf_and_its_legacy_mmproj_run_as_the_safetensors_model(llava, fp32_plan, tmp_path, newer):
    """LLaVA-1.5 as llama.cpp's legacy converter writes its mmproj (fc1 named ffn_down, CLIP's own
    projection_dim): the second to last layer's features, from clip.vision.feature_layer where
    the file has it (newer: every layer kept) or from the last stored layer (older: CLIP's last
    layer dropped). Older text models have no <image> token: edgellm adds one past the
    vocabulary."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from gguf_writer import text_part, write_gguf, write_llava_mmproj
    from tiny_models import NEWLINES

    special = NEWLINES + (["<image>"] if newer else ["[PAD95]"])  # the same ids; without "<image>" in the older one
    text = write_gguf(text_part(llava, tmp_path / "text", "language_model.model."), tmp_path / "text.gguf", "llama",
                      special=special)
    mmproj = write_llava_mmproj(llava, tmp_path / "mmproj.gguf", feature_layer=newer)
    reference = shutil.copytree(llava, tmp_path / "reference")  # with the patch convolution in float16, as the mmproj has it
    tensors = load_file(str(reference / "model.safetensors"))
    patch = "vision_tower.embeddings.patch_embedding.weight"
    tensors[patch] = tensors[patch].astype(np.float16).astype(np.float32)
    save_file(tensors, str(reference / "model.safetensors"), metadata={"format": "pt"})
    image = _picture(56, 40, seed=6)
    results = []
    for out in (build(reference, tmp_path / "st", fp32_plan, target="cpu", **OPTIONS),
                build(text, tmp_path / "pair", fp32_plan, mmproj=str(mmproj), target="cpu", **OPTIONS)):  # FP32: no
        model = Model.load(out)  # BF16 of the F16 patch convolution
        results.append(model.generate("<image>", images=[image], max_new_tokens=16, ignore_eos=True,
                                      return_logits=True))
        model.close()
    expected, ours = results
    assert ours.image_tokens == expected.image_tokens == 16 and ours.prompt_tokens == expected.prompt_tokens
    np.testing.assert_allclose(np.stack(ours.logits), np.stack(expected.logits), atol=1e-4)
    assert ours.token_ids == expected.token_ids
