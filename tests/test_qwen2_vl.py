"""Qwen2-VL: an image encoder that takes any size (fixed per build by --input_height/--input_width),
2D rotary positions in the encoder, M-RoPE in the text model; checked against transformers on a
tiny random-weight model (tests/tiny_models.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_vision import _picture, _skip_without_compiler

from conftest import build, edited_copy
from edgellm.errors import EdgeLLMError
from edgellm.runtime.images import patches, preprocess
from edgellm.runtime.model import Model
from tiny_models import QWEN2_VL_FACTOR, save_tiny_llava, save_tiny_qwen2_5_vl, save_tiny_qwen2_vl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HEIGHT, WIDTH = 16, 24  # the builds' image size: 4 x 6 patches, 2 x 3 = 6 prompt rows
OPTIONS = dict(max_num_tokens=128, future_token_mask_size=64, input_height=HEIGHT, input_width=WIDTH)
PROMPT = "w1 w2 <|vision_start|><|image_pad|><|vision_end|> w5 w6 w7"


FAMILIES = {"qwen2_vl": (save_tiny_qwen2_vl, "Qwen2VLForConditionalGeneration"),
            "qwen2_5_vl": (save_tiny_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def qwen2_vl(request, tmp_path_factory):
    return FAMILIES[request.param][0](tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def reference(qwen2_vl):
    model_type = json.loads((qwen2_vl / "config.json").read_text())["model_type"]
    return getattr(transformers, FAMILIES[model_type][1]).from_pretrained(qwen2_vl, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(qwen2_vl):
    return transformers.Qwen2VLImageProcessorPil.from_pretrained(qwen2_vl)


def _reference_logits(reference, qwen2_vl, processor, ids, images):
    """transformers' logits after every row of ids (image rows as the image token), the images at
    their own sizes (each must come out of the processor at the build's size)."""
    image_token = json.loads((qwen2_vl / "config.json").read_text())["image_token_id"]
    inputs = torch.tensor([[t if t >= 0 else image_token for t in ids]])
    pixels = processor(images, return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, HEIGHT // 4, WIDTH // 4]] * len(images)
    with torch.no_grad():
        return reference(input_ids=inputs, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                         mm_token_type_ids=(inputs == image_token).int()).logits[0].numpy()


@pytest.mark.parametrize("target", ["cpu", "native"])
@pytest.mark.parametrize("group", [32, 4])  # 4: an image's rows are split between prefill calls
def test_qwen2_vl_matches_transformers(qwen2_vl, reference, processor, fp32_plan, tmp_path, target, group):
    _skip_without_compiler(target)
    out = build(qwen2_vl, tmp_path / "out", fp32_plan, target=target, language_group_size=group, **OPTIONS)
    model = Model.load(out)
    image = _picture(WIDTH, HEIGHT, seed=3)
    session = model.session()
    ours = session.generate(PROMPT, images=[image], max_new_tokens=32, ignore_eos=True, return_logits=True)
    ids = session.tokens[: ours.prompt_tokens]
    assert ours.image_tokens == 6 and ids[2] == 93 and ids[9] == 94  # the image's 6 rows between its markers
    # every row after the prompt, the answer fed back (teacher forcing): prefill and 32 decode steps
    expected = _reference_logits(reference, qwen2_vl, processor, ids + ours.token_ids, [image])
    np.testing.assert_allclose(np.array(ours.logits), expected[len(ids) - 1 : -1], atol=1e-4)
    assert ours.token_ids == expected[len(ids) - 1 : -1].argmax(-1).tolist()
    # three positions per row matter: the image's rows counted along the sequence give other logits
    image_token = json.loads((qwen2_vl / "config.json").read_text())["image_token_id"]
    inputs = torch.tensor([[t if t >= 0 else image_token for t in ids]])
    pixels = processor([image], return_tensors="pt")
    with torch.no_grad():
        sequential = reference(input_ids=inputs, pixel_values=pixels["pixel_values"],
                               image_grid_thw=pixels["image_grid_thw"],
                               position_ids=torch.arange(len(ids))[None]).logits[0, -1].numpy()
    assert np.abs(sequential - ours.logits[0]).max() > 1e-3
    other = model.session().generate(PROMPT, images=[_picture(WIDTH, HEIGHT, seed=4)], max_new_tokens=1,
                                     return_logits=True)
    assert np.abs(other.logits[0] - ours.logits[0]).max() > 1e-2  # the image changes the answer
    model.close()
    if target == "native" and "window_size" in (qwen2_vl / "config.json").read_text():
        # Qwen2.5-VL at 16 x 24 px: 2 x 3 prompt rows, windows of 2 x 2 that do not tile them; the
        # C code attends each window's rows gathered (layers 0 and 2: 2 windows each)
        code = (out / "compiled" / "native" / "model.c").read_text()
        assert code.count("em_scatter_rows(") == 2 * 2


def test_two_images_a_second_question_and_image_features(qwen2_vl, reference, processor, fp32_plan, tmp_path):
    out = build(qwen2_vl, tmp_path / "out", fp32_plan, target="cpu", language_group_size=8, **OPTIONS)
    model = Model.load(out)
    first, second = _picture(WIDTH, HEIGHT, seed=5), _picture(WIDTH + 1, HEIGHT + 1, seed=6)  # (25 x 17 -> 24 x 16)
    for image in (first, second):
        with torch.no_grad():
            pixels = processor([image], return_tensors="pt")
            expected = reference.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output
        ours = model.image_encoder.encode_pixels(preprocess(image, model.config.vision.processing).tiles[0])
        np.testing.assert_allclose(ours, torch.cat(list(expected)).numpy(), atol=1e-4)
    session = model.session()
    prompt = "w3 <|vision_start|><|image_pad|><|vision_end|> w4 <|vision_start|><|image_pad|><|vision_end|> w8"
    ours = session.generate(prompt, images=[first, second], max_new_tokens=8, ignore_eos=True, return_logits=True)
    ids = session.tokens[: ours.prompt_tokens]
    expected = _reference_logits(reference, qwen2_vl, processor, ids + ours.token_ids, [first, second])
    np.testing.assert_allclose(np.array(ours.logits), expected[len(ids) - 1 : -1], atol=1e-4)
    # a longer question after the same prompt reuses the cached rows, positions included
    again = session.generate(prompt + " w9 w10", images=[first, second], max_new_tokens=4, ignore_eos=True,
                             return_logits=True)
    assert again.cached_tokens >= len(ids) - 8
    ids = session.tokens[: again.prompt_tokens]
    expected = _reference_logits(reference, qwen2_vl, processor, ids + again.token_ids, [first, second])
    np.testing.assert_allclose(np.array(again.logits), expected[len(ids) - 1 : -1], atol=1e-4)
    model.close()


def test_a_raw_prompt_without_markers_frames_the_image(qwen2_vl, fp32_plan, tmp_path):
    out = build(qwen2_vl, tmp_path / "out", fp32_plan, target="cpu", language_group_size=32, **OPTIONS)
    model = Model.load(out)
    session = model.session()
    session.generate("w5 w6", images=[_picture(30, 20)], max_new_tokens=1)
    assert session.tokens[:8] == [93, -1, -2, -3, -4, -5, -6, 94]  # <|vision_start|>, the rows, <|vision_end|>
    model.close()


@pytest.mark.parametrize("width, height", [(WIDTH, HEIGHT), (WIDTH + 2, HEIGHT + 3), (WIDTH - 3, HEIGHT - 2)])
def test_preprocessing_matches_the_hugging_face_processor(qwen2_vl, processor, width, height):
    """Pictures the processor resizes to the build's size (it rounds each side to whole merged
    patches): the same pixels, in its patch order, each patch repeated over its 2 frames."""
    from edgellm.build import read_model_config
    from edgellm.config.vision import with_input_size
    from edgellm.graph.vision import _blocks
    from edgellm.sources import open_source

    vision = with_input_size(read_model_config(open_source(qwen2_vl)).vision, HEIGHT, WIDTH, "test")
    image = _picture(width, height, seed=width)
    expected = processor(image, return_tensors="np")["pixel_values"]  # [patches, C * 2 frames * 4 * 4]
    ours = patches(preprocess(image, vision.processing).tiles[0], 4)[_blocks(vision)]  # [patches, C * 4 * 4]
    frames = expected.reshape(len(expected), 3, 2, 16)
    np.testing.assert_allclose(frames[:, :, 0], ours.reshape(-1, 3, 16), atol=1e-5)
    np.testing.assert_array_equal(frames[:, :, 0], frames[:, :, 1])


def test_input_size_errors_name_the_problem(qwen2_vl, fp32_plan, tmp_path):
    with pytest.raises(EdgeLLMError, match=f"--input_height 20 must be a multiple of {QWEN2_VL_FACTOR} pixels"):
        build(qwen2_vl, tmp_path / "a", fp32_plan, target="cpu", input_height=20)
    with pytest.raises(EdgeLLMError, match="--input_height must be at least 1"):
        build(qwen2_vl, tmp_path / "b", fp32_plan, target="cpu", input_height=-8)
    llava = save_tiny_llava(tmp_path / "llava")
    with pytest.raises(EdgeLLMError, match="the clip encoder takes 32x32 images only"):
        build(llava, tmp_path / "c", fp32_plan, target="cpu", input_height=64, input_width=64)
    from tiny_models import save_tiny

    text = save_tiny("qwen2", tmp_path / "text")
    with pytest.raises(EdgeLLMError, match="this is a text model"):
        build(text, tmp_path / "d", fp32_plan, target="cpu", input_width=64)


def test_the_default_size_and_config_errors(qwen2_vl, fp32_plan, tmp_path):
    from edgellm.build import read_model_config
    from edgellm.sources import open_source

    vision = read_model_config(open_source(qwen2_vl)).vision
    assert (vision.processing.height, vision.processing.width, vision.image_tokens) == (448, 448, 56 * 56)

    def broken(edit, name):
        return edited_copy(qwen2_vl, tmp_path / name, edit)

    sections = broken(lambda raw: raw["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 2]), "sections")
    with pytest.raises(EdgeLLMError, match=r"mrope_section \[2, 3, 2\] must add up to the 8 rotary frequencies"):
        read_model_config(open_source(sections))
    plain = broken(lambda raw: raw["text_config"]["rope_parameters"].pop("mrope_section"), "plain")
    with pytest.raises(EdgeLLMError, match="mrope_section must be 3 whole numbers"):
        read_model_config(open_source(plain))
    wider = broken(lambda raw: raw["vision_config"].update(mlp_ratio=2, intermediate_size=64), "wider")
    with pytest.raises(EdgeLLMError, match=r"the vision config implies shape \((64, 32|32, 64)\) for visual\.blocks\.0\.mlp\."):
        build(wider, tmp_path / "out", fp32_plan, target="cpu", **OPTIONS)
    # the hub's flat layout (transformers 4): the text model's fields at the top level, rope_scaling "mrope"
    def flat(raw):
        text = raw.pop("text_config")
        text.pop("model_type")
        rope = text.pop("rope_parameters")
        raw.update(text, rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}, rope_theta=rope["rope_theta"])
    cfg = read_model_config(open_source(broken(flat, "flat")))
    assert cfg.ropes["full"].sections == [2, 3, 3] and cfg.num_layers == 2


def test_batched_decode_rows_keep_each_sessions_positions(qwen2_vl, reference, processor, fp32_plan, tmp_path):
    """The server's batched step (native: one em_forward_rows call for several sessions' rows)
    gives each session the positions its own images left it."""
    _skip_without_compiler("native")
    out = build(qwen2_vl, tmp_path / "out", fp32_plan, target="native", language_group_size=16, **OPTIONS)
    model = Model.load(out)
    sessions, images = [model.session(), model.session()], [_picture(WIDTH, HEIGHT, seed=7), None]
    sessions[0].generate(PROMPT, images=[images[0]], max_new_tokens=1)
    sessions[1].generate("w9 w10 w11", max_new_tokens=1)  # text alone: positions are the rows' own
    calls = [(s.engine_session, [11, 12], len(s.tokens)) for s in sessions]
    batched = model.engine.forward_batch(calls)
    for session, rows, image in zip(sessions, batched, images):
        ids = session.tokens + [11, 12]
        if image is None:
            with torch.no_grad():
                expected = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
        else:
            expected = _reference_logits(reference, qwen2_vl, processor, ids, [image])
        np.testing.assert_allclose(rows, expected[-2:], atol=1e-4)
    model.close()


def test_a_chat_about_an_image_keeps_its_positions_across_turns(qwen2_vl, reference, processor, fp32_plan, tmp_path):
    out = build(qwen2_vl, tmp_path / "out", fp32_plan, target="cpu", language_group_size=8, **OPTIONS)
    model = Model.load(out)
    encoded = []
    encode = model.image_encoder.encode_pixels
    model.image_encoder.encode_pixels = lambda pixels: encoded.append(1) or encode(pixels)
    image = _picture(WIDTH, HEIGHT, seed=11)
    session = model.session()
    first = session.chat("w9 w10", images=[image], max_new_tokens=4, ignore_eos=True)
    assert session.tokens[1:9] == [93, -1, -2, -3, -4, -5, -6, 94]  # the template's frame around the rows
    second = session.chat("w11 w12", max_new_tokens=4, ignore_eos=True, return_logits=True)
    assert len(encoded) == 1 and second.cached_tokens >= 8 and first.image_tokens == second.image_tokens == 6
    ids = session.tokens[: second.prompt_tokens]
    expected = _reference_logits(reference, qwen2_vl, processor, ids + second.token_ids, [image])
    np.testing.assert_allclose(np.array(second.logits), expected[len(ids) - 1 : -1], atol=1e-4)
    model.close()


def test_a_gguf_text_model_and_its_mmproj_run_as_the_safetensors_model(qwen2_vl, fp32_plan, tmp_path):
    """llama.cpp's two files (text arch qwen2vl with rope.dimension_sections; an mmproj whose qkv and
    patch convolution the converter split, Qwen2.5-VL's full-attention layers as n_wa_pattern),
    compiled with the default plan (SOURCE: these float32 tensors stay float32), give the
    safetensors directory's logits and tokens."""
    from gguf_writer import text_part, write_gguf, write_qwen2_vl_mmproj
    from tiny_models import NEWLINES, QWEN2_VL_MARKERS

    text = write_gguf(text_part(qwen2_vl, tmp_path / "text", "model."), tmp_path / "text.gguf", "qwen2vl",
                      special=NEWLINES + QWEN2_VL_MARKERS)
    mmproj = write_qwen2_vl_mmproj(qwen2_vl, tmp_path / "mmproj.gguf")
    image = _picture(WIDTH, HEIGHT, seed=12)
    results = []
    for out in (build(qwen2_vl, tmp_path / "st", fp32_plan, target="cpu", language_group_size=16, **OPTIONS),
                build(text, tmp_path / "pair", mmproj=str(mmproj), target="cpu", language_group_size=16, **OPTIONS)):
        model = Model.load(out)
        # (markers only: the GGUF pair's tokenizer splits the tiny words otherwise)
        results.append(model.generate("<|vision_start|><|image_pad|><|vision_end|>", images=[image], max_new_tokens=16,
                                      ignore_eos=True, return_logits=True))
        model.close()
    expected, ours = results
    assert ours.image_tokens == expected.image_tokens == 6 and ours.prompt_tokens == expected.prompt_tokens == 8
    np.testing.assert_allclose(np.stack(ours.logits), np.stack(expected.logits), atol=1e-4)
    assert ours.token_ids == expected.token_ids
    # a text GGUF without M-RoPE's sections (a plain qwen2) is not this mmproj's text model
    plain_dir = text_part(qwen2_vl, tmp_path / "plain", "model.")
    config = json.loads((plain_dir / "config.json").read_text())
    config["rope_parameters"].pop("mrope_section")
    (plain_dir / "config.json").write_text(json.dumps(config))
    plain = write_gguf(plain_dir, tmp_path / "plain.gguf", "qwen2", special=NEWLINES + QWEN2_VL_MARKERS)
    with pytest.raises(EdgeLLMError, match=r"plain\.gguf: GGUF metadata 'qwen2\.rope\.dimension_sections' must give "
                                           r"M-RoPE's 3 sections"):
        build(plain, tmp_path / "bad", fp32_plan, mmproj=str(mmproj), target="cpu", **OPTIONS)


@pytest.mark.parametrize("target", ["cpu", "native"])
def test_int4_language_model_matches_transformers_on_the_stored_weights(qwen2_vl, reference, processor, tmp_path,
                                                                        target):
    """The int4 preset: language-model matmuls in int4 blocks, the encoder BF16; transformers runs
    the same dequantized weights. The rotary tables M-RoPE gathers from stay float32 (they are
    no embedding table, though a Gather reads them)."""
    import copy

    import onnx
    from test_vision import _bf16

    from edgellm.quant.blocks import quantize

    _skip_without_compiler(target)
    out = build(qwen2_vl, tmp_path / "out", "int4", target=target, language_group_size=32, **OPTIONS)
    stored = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            if "language_model" in name and name.endswith("proj.weight"):
                p.copy_(torch.from_numpy(quantize(p.numpy(), 4, 32, "symmetric").dequantize()))
            elif "embed_tokens" in name or "lm_head" in name or ("visual" in name and name.endswith("weight")
                                                                 and p.dim() >= 2):
                _bf16(p)
    model = Model.load(out)
    image = _picture(WIDTH, HEIGHT, seed=13)
    session = model.session()
    ours = session.generate(PROMPT, images=[image], max_new_tokens=16, ignore_eos=True, return_logits=True)
    ids = session.tokens[: ours.prompt_tokens]
    expected = _reference_logits(stored, qwen2_vl, processor, ids + ours.token_ids, [image])[len(ids) - 1 : -1]
    np.testing.assert_allclose(np.array(ours.logits), expected, atol=1e-3 * np.abs(expected).max())
    assert ours.token_ids == expected.argmax(-1).tolist()
    model.close()
    if target == "cpu":
        program = onnx.load(str(out / "compiled" / "cpu" / "group.onnx"), load_external_data=False)
        tables = [t for t in program.graph.initializer if t.name.startswith("rope.")]
        assert tables and all(t.data_type == onnx.TensorProto.FLOAT for t in tables)


@pytest.mark.parametrize("target", ["cpu", "native"])
def test_equal_windows_run_as_a_batch_of_windows(fp32_plan, tmp_path, target):
    """Qwen2.5-VL at a size whose windows tile the grid (32 x 32 px: 2 x 2 windows of 2 x 2 prompt
    rows): the rows go window by window and windowed layers attend within a batch of windows,
    no mask (the native target: one attention call per window); the image's rows come back row by
    row."""
    _skip_without_compiler(target)
    model_dir = save_tiny_qwen2_5_vl(tmp_path / "model")
    reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    out = build(model_dir, tmp_path / "out", fp32_plan, target=target, max_num_tokens=128, future_token_mask_size=64,
                input_height=32, input_width=32)
    if target == "cpu":
        program = (out / "compiled" / "vision" / "encoder.onnx").read_bytes()
        assert b"vision.window_mask" not in program
    else:  # layers 0 and 2: 4 windows each; layer 1: the whole image
        code = (out / "compiled" / "native" / "model.c").read_text()
        assert code.count("em_attention_rows(") == 2 * 4 + 1 and "em_scatter_rows" not in code
    model = Model.load(out)
    image = _picture(32, 32, seed=14)
    with torch.no_grad():
        pixels = processor([image], return_tensors="pt")
        expected = reference.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output
    ours = model.image_encoder.encode_pixels(preprocess(image, model.config.vision.processing).tiles[0])
    assert ours.shape == (16, 64)
    np.testing.assert_allclose(ours, torch.cat(list(expected)).numpy(), atol=1e-4)
    model.close()


def test_filter_sharing_binds_each_calls_positions(qwen2_vl, reference, processor, fp32_plan, tmp_path):
    """One ONNX Runtime program for every call size (--enable_filter_sharing): two prompts of the
    same length with the image elsewhere, in one session, each get their own positions."""
    out = build(qwen2_vl, tmp_path / "out", fp32_plan, target="cpu", language_group_size=32, enable_filter_sharing=True,
                **OPTIONS)
    model = Model.load(out)
    session = model.session()
    image = _picture(WIDTH, HEIGHT, seed=15)
    for prompt in ("w1 w2 <|vision_start|><|image_pad|><|vision_end|> w5 w6 w7",
                   "w1 w2 w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7"):
        ours = session.generate(prompt, images=[image], max_new_tokens=2, ignore_eos=True, return_logits=True)
        ids = session.tokens[: ours.prompt_tokens]
        expected = _reference_logits(reference, qwen2_vl, processor, ids + ours.token_ids, [image])
        np.testing.assert_allclose(np.array(ours.logits), expected[len(ids) - 1 : -1], atol=1e-4)
    model.close()


def test_tied_embeddings_written_only_at_the_top_level(fp32_plan, tmp_path):
    """transformers 5 writes tie_word_embeddings at the config's top level only (Qwen2-VL-2B and
    Qwen2.5-VL-3B are tied): the text model reads it there, and needs no lm_head tensor."""
    model_dir = save_tiny_qwen2_vl(tmp_path / "model", tie_word_embeddings=True)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] and "tie_word_embeddings" not in config["text_config"]
    reference = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    model = Model.load(build(model_dir, tmp_path / "out", fp32_plan, target="cpu", language_group_size=32, **OPTIONS))
    image = _picture(WIDTH, HEIGHT, seed=16)
    session = model.session()
    ours = session.generate(PROMPT, images=[image], max_new_tokens=4, ignore_eos=True, return_logits=True)
    ids = session.tokens[: ours.prompt_tokens]
    expected = _reference_logits(reference, model_dir, processor, ids + ours.token_ids, [image])
    np.testing.assert_allclose(np.array(ours.logits), expected[len(ids) - 1 : -1], atol=1e-4)
    model.close()
