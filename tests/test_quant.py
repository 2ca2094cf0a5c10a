"""Integer precisions: the block quantizer, GGUF blocks taken as they are, and compiled programs
against transformers running the same dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import edgellm
from conftest import build
from edgellm.errors import EdgeLLMError
from edgellm.quant.blocks import pack_int4, quantize, unpack_int4
from tiny_models import VOCAB, reference_with_stored_weights, save_tiny

OPTIONS = dict(max_num_tokens=128, language_group_size=16, future_token_mask_size=32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["symmetric", "zero_point", "minimum"])
def test_quantize_rounds_to_nearest_level(bits, scheme):
    rng = np.random.default_rng(bits)
    w = rng.normal(0, 0.05, size=(24, 100)).astype(np.float32)  # 100 = three blocks of 32 and a partial one
    blocks = quantize(w, bits, 32, scheme)
    assert blocks.scale.shape == (24, 4) and blocks.q.shape == w.shape
    step = np.abs(blocks.expand(blocks.scale))
    err = np.abs(blocks.dequantize() - w)
    # symmetric int4 maps the extreme to -8 (GGUF Q4_0's choice); a value of the other sign and
    # nearly the same size would need +8 and is clipped to 7, up to one step off
    clipped = (blocks.q == 7) if (scheme == "symmetric" and bits == 4) else np.zeros(w.shape, bool)
    # a float16 minimum moves the grid by up to half its last place
    slack = 1e-7 if blocks.minimum is None else np.abs(blocks.expand(blocks.minimum)) * 2.0**-11 + 1e-7
    assert np.all((err <= step / 2 + slack)[~clipped])
    assert np.all((err <= step + slack)[clipped])
    if scheme == "symmetric":
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        assert blocks.q.dtype == np.int8 and blocks.zero_point is None and blocks.minimum is None
    else:
        lo, hi = 0, (1 << bits) - 1
        assert blocks.q.dtype == np.uint8
        assert (blocks.zero_point.shape == (24, 4)) if scheme == "zero_point" else (blocks.zero_point is None)
        assert (blocks.minimum.shape == (24, 4)) if scheme == "minimum" else (blocks.minimum is None)
    assert blocks.q.min() >= lo and blocks.q.max() <= hi
    # the range is used: in every row some value reaches an end of it (symmetric int8 uses +-127)
    ends = (lo, hi) if not (scheme == "symmetric" and bits == 8) else (-127, 127)
    assert np.all(np.isin(blocks.q, ends).any(axis=1))
    if scheme == "minimum":  # every block, the short last one too, spans exactly its own values
        for b in range(4):
            part = blocks.q[:, 32 * b : 32 * (b + 1)]
            assert np.all(part.min(axis=1) == 0) and np.all(part.max(axis=1) == hi)


def test_minimum_blocks_find_a_grid_again():
    """Weights already on a Q4_1-style grid (float16 scale and minimum per block, levels 0..15
    all used) come back exactly: the scheme recovers what a GGUF Q4_1 file held."""
    rng = np.random.default_rng(3)
    scale = rng.uniform(0.001, 0.01, size=(16, 4)).astype(np.float16).astype(np.float32)
    minimum = rng.uniform(-0.1, 0.0, size=(16, 4)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, size=(16, 128))
    q[:, ::32], q[:, 1::32] = 0, 15  # every block reaches both ends
    w = (np.repeat(scale, 32, axis=1) * q + np.repeat(minimum, 32, axis=1)).astype(np.float32)
    blocks = quantize(w, 4, 32, "minimum")
    assert np.array_equal(blocks.q, q) and np.array_equal(blocks.minimum, minimum)
    assert np.allclose(blocks.scale, scale, rtol=2.0**-10)
    assert np.allclose(blocks.dequantize(), w, atol=1e-6)


def test_unknown_block_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown block scheme 'asym'"):
        quantize(np.zeros((2, 32), np.float32), 4, 32, "asym")


def test_int4_packing_round_trips():
    signed = np.random.default_rng(0).integers(-8, 8, size=77).astype(np.int8)
    unsigned = np.random.default_rng(1).integers(0, 16, size=78).astype(np.uint8)
    assert np.array_equal(unpack_int4(pack_int4(signed), 77, signed=True), signed)
    assert np.array_equal(unpack_int4(pack_int4(unsigned), 78, signed=False), unsigned)


def _tiny_gguf(path: Path, kind: str) -> tuple[Path, dict[str, np.ndarray]]:
    """A GGUF with llama metadata and two layer-0 weights stored in `kind` blocks."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(5)
    weights = {"blk.0.attn_q.weight": rng.normal(0, 0.1, (64, 64)), "blk.0.ffn_down.weight": rng.normal(0, 0.1, (64, 96))}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 96),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2)):
        writer.add_uint32(f"llama.{key}", value)
    for name, w in weights.items():
        data = gguf.quants.quantize(w.astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, weights


@pytest.mark.parametrize("kind,bits", [("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8)])
def test_gguf_blocks_are_taken_bit_exactly(tmp_path, kind, bits):
    import gguf

    from edgellm.sources.gguf_file import GGUFSource

    path, _ = _tiny_gguf(tmp_path / "tiny.gguf", kind)
    source = GGUFSource(path)
    reader = gguf.GGUFReader(path)
    for hf_name, gguf_name in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                               ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight")):
        blocks = source.packed(hf_name)
        assert blocks.bits == bits and blocks.block == 32 and blocks.origin == f"GGUF {kind}"
        assert (blocks.minimum is not None) == (kind == "Q4_1")
        # source.tensor() applies the q/k row permutation; packed() must apply the same one
        assert np.array_equal(blocks.dequantize(), source.tensor(hf_name))
        t = next(t for t in reader.tensors if t.name == gguf_name)
        assert np.array_equal(np.sort(blocks.dequantize().ravel()), np.sort(gguf.quants.dequantize(t.data, t.tensor_type).ravel()))


def _plan(tmp_path: Path, default: str, **rules) -> Path:
    path = tmp_path / "plan.json"
    body = {"default": {"precision": default}, "rules": [{"match": {"is_group": g == "group"}, "set": {"precision": p}}
                                                          for g, p in rules.items()]}
    path.write_text(json.dumps(body))
    return path


# Tolerances (max abs logit error against the reference; tiny models' logits are O(1)):
# int4 weights run with float activations, so only summation order differs;
# int8 weights run with activations quantized to int8 per block inside ONNX Runtime's kernel.
CASES = [
    ("A_BF16_W_INT4", 4, "symmetric", 1e-4),
    ("A_BF16_W_INT4", 4, "minimum", 1e-4),
    ("A_BF16_W_INT8", 8, "symmetric", 0.05),
]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("precision,bits,scheme,tolerance", CASES)
def test_integer_weights_match_transformers_on_the_same_weights(tmp_path, family, precision, bits, scheme, tolerance):
    model_dir = save_tiny(family, tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", _plan(tmp_path, precision), asymmetric=scheme == "minimum", **OPTIONS)
    model = edgellm.load(out)
    prompt = [int(t) for t in np.random.default_rng(11).integers(1, VOCAB, 40)]
    result = model.generate_ids(prompt, max_new_tokens=32, ignore_eos=True, return_logits=True)
    ref = reference_with_stored_weights(model_dir, bits, scheme)
    with torch.no_grad():
        expected = ref(torch.tensor([prompt + result.token_ids])).logits[0].numpy()
    theirs = expected[len(prompt) - 1 : len(prompt) - 1 + 32]
    err = np.abs(np.stack(result.logits) - theirs).max()
    assert err < tolerance, f"max abs logit error {err}"
    if tolerance <= 1e-4:
        assert result.token_ids == [int(t) for t in theirs.argmax(-1)]


def test_compiled_program_holds_no_float_copy_of_integer_weights(tmp_path):
    """After ONNX Runtime's own optimizations, every linear layer and the LM head run in
    MatMulNBits, and no float tensor of weight size exists."""
    model_dir = save_tiny("llama", tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", _plan(tmp_path, "A_BF16_W_INT4"), quantize_embeddings="int8", **OPTIONS)
    cfg = json.loads((out / "model_config.json").read_text())
    smallest_weight = cfg["hidden_size"] * cfg["num_kv_heads"] * cfg["head_dim"]
    for variant in ("group", "single"):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{variant}.optimized.onnx")
        ort.InferenceSession(str(out / "compiled" / "cpu" / f"{variant}.onnx"), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / f"{variant}.optimized.onnx"), load_external_data=False)
        ops = [n.op_type for n in optimized.graph.node]
        # per layer: q/k/v fused, o, gate/up fused, down (graph/segments.py); then the LM head
        assert ops.count("MatMulNBits") == 4 * cfg["num_layers"] + 1
        floats = [t for t in optimized.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        assert floats and all(int(np.prod(t.dims)) < smallest_weight for t in floats), [
            (t.name, list(t.dims)) for t in floats if int(np.prod(t.dims)) >= smallest_weight]


def test_group_and_single_precisions_differ_and_same_ones_are_stored_once(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "hf")
    mixed = build(model_dir, tmp_path / "mixed", _plan(tmp_path, "A_BF16_W_INT4", group="A_BF16_W_INT8"), **OPTIONS)
    same = build(model_dir, tmp_path / "same", _plan(tmp_path, "A_BF16_W_INT4"), **OPTIONS)
    size = lambda d: (d / "compiled" / "cpu" / "weights.bin").stat().st_size  # noqa: E731
    cfg = json.loads((same / "model_config.json").read_text())
    h, f, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_kv_heads"] * cfg["head_dim"]
    linear_params = cfg["num_layers"] * (2 * h * h + 2 * h * kv + 3 * h * f)
    # mixed holds an extra int8 copy (1 byte per weight and its scales); had the group and single
    # int4 copies not been shared in `same`, the difference would be under half a byte per weight
    assert size(mixed) - size(same) >= linear_params
    prompt = [int(t) for t in np.random.default_rng(2).integers(1, VOCAB, 20)]
    a = edgellm.load(mixed).generate_ids(prompt, max_new_tokens=8, ignore_eos=True)
    b = edgellm.load(same).generate_ids(prompt, max_new_tokens=8, ignore_eos=True)
    assert a.gen_tokens == b.gen_tokens == 8


def test_bad_block_size_is_a_user_error(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "hf")
    with pytest.raises(EdgeLLMError, match="--block_size must be a power of two"):
        build(model_dir, tmp_path / "out", block_size=24, **OPTIONS)


@pytest.mark.parametrize("precision,expected", [("A_BF16_W_INT8", "GGUF Q8_0 mapped exactly"),
                                                ("A_BF16_W_INT4", "GGUF Q8_0 converted to int4")])
def test_compile_log_says_which_weights_were_mapped_and_which_converted(tmp_path, precision, expected):
    from onnx import TensorProto, helper, numpy_helper

    from edgellm.quant.precision import apply_precision
    from edgellm.sources.gguf_file import GGUFSource

    path, _ = _tiny_gguf(tmp_path / "tiny.gguf", "Q8_0")
    source = GGUFSource(path)
    name = "model.layers.0.mlp.down_proj.weight"
    w = source.tensor(name)  # [N, K] = [64, 96]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "layer000.down_proj"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 64])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "layer000.down_proj")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    _, report = apply_precision(model, precision, packed=lambda init: (source.packed(name), source.storage(name)))
    assert report == {"layer000.down_proj": expected}


def test_large_weights_are_quantized_in_row_chunks_with_the_same_result():
    from edgellm.quant import blocks

    w = np.random.default_rng(4).normal(size=(3000, 1600)).astype(np.float32)  # 4.8M weights: two chunks
    assert w.size > blocks.ROWS_PER_CHUNK_ELEMENTS
    for scheme in blocks.SCHEMES:
        chunked, whole = blocks.quantize(w, 4, 32, scheme), blocks._quantize_rows(w, 4, 32, scheme)
        assert np.array_equal(chunked.q, whole.q) and np.array_equal(chunked.scale, whole.scale)
        for field in ("zero_point", "minimum"):
            a, b = getattr(chunked, field), getattr(whole, field)
            assert (a is None and b is None) or np.array_equal(a, b), (scheme, field)


def test_int4_lm_head(tmp_path):
    import onnx

    model_dir = save_tiny("llama", tmp_path / "hf")
    out = build(model_dir, tmp_path / "out", _plan(tmp_path, "A_BF16_W_INT4"), quantize_embeddings="int4", **OPTIONS)
    program = onnx.load(str(out / "compiled" / "cpu" / "single.onnx"), load_external_data=False)
    head = [n for n in program.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("single.head")]
    assert [onnx.helper.get_attribute_value(a) for n in head for a in n.attribute if a.name == "bits"] == [4]
    assert any(t.name.startswith("embed.embed.w8") for t in program.graph.initializer)  # the table stays int8
    prompt = [int(t) for t in np.random.default_rng(5).integers(1, VOCAB, 20)]
    assert edgellm.load(out).generate_ids(prompt, max_new_tokens=4, ignore_eos=True).gen_tokens == 4
