"""ONNX segments of a vision-language model's image encoder and projector.

    pixel_patches [1, P, C*p*p]   -> VISION_EMBED -> vision.0 [1, S, D]   (S = P patches [+ class token])
    vision.i                      -> VISION i     -> vision.{i+1}         (one ViT encoder layer)
    vision.L                      -> PROJECTOR    -> image_features [1, T, H]  (T rows spliced into the prompt)

The patches come cut and flattened (channel, row, column), the order of the patch convolution's
weights, so the convolution is a MatMul (runtime/images.py cuts them): no Conv or Transpose for
a target to lower, and every weight is a [K, N] MatMul constant the precision plan can rewrite.
Attention is over the whole image (no mask, no cache); shapes are static, from the image size.
"""

from __future__ import annotations

import numpy as np

from ..config.model_config import ModelConfig
from ..errors import EdgeLLMError
from .builder import FLOAT, GraphBuilder
from .rope import axial_tables


def emitters() -> dict:
    return {"VISION_EMBED": _embed, "VISION": _layer, "PROJECTOR": _projector}


def _embed(g: GraphBuilder, unit, cfg: ModelConfig, weights, shapes) -> None:
    v = cfg.vision
    patches = g.input("pixel_patches", FLOAT, [1, v.num_patches, v.patch_values])
    conv = weights("patch_embed", None)  # [D, C, p, p], or [D, C, frames, p, p] (Qwen2-VL)
    if v.temporal_patch > 1:
        # the processor repeats a picture in every frame: each frame's weights apply to the same
        # patches, one MatMul each (their sum would round to BF16 once where transformers rounds
        # each frame's weights)
        frames = [g.op("MatMul", [patches, g.weight(f"patch_embed_frame{t}", conv[:, :, t].reshape(v.hidden_size, -1).T)])
                  for t in range(v.temporal_patch)]
        x = frames[0]
        for frame in frames[1:]:
            x = g.op("Add", [x, frame])
    else:
        x = g.op("MatMul", [patches, g.weight("patch_embed", conv.reshape(v.hidden_size, -1).T)])
    if "patch_bias" in v.tensors:
        x = g.op("Add", [x, g.weight("patch_bias", weights("patch_bias", None))])
    if v.class_token:
        token = weights("class_embed", None).reshape(1, 1, v.hidden_size)
        x = g.op("Concat", [g.weight("class_embed", token), x], axis=1)
    if v.rotary_theta:  # rows from here on in merge blocks, as the merger takes them (positions: _layer)
        x = g.op("Gather", [x, g.const(f"{g.prefix}.blocks", _row_order(v))], axis=1)
    else:
        x = g.op("Add", [x, g.weight("position_embed", weights("position_embed", None))])
    if v.pre_norm:
        x = _layer_norm(g, x, v, "pre_norm", None, weights)
    g.output(x, "vision.0", FLOAT, [1, v.sequence, v.hidden_size])


def _layer(g: GraphBuilder, unit, cfg: ModelConfig, weights, shapes) -> None:
    v, i = cfg.vision, unit.index
    h = g.input(f"vision.{i}", FLOAT, [1, v.sequence, v.hidden_size])
    x = _layer_norm(g, h, v, "ln1", i, weights)
    if "qkv_proj" in v.tensors:  # stored fused (Qwen2-VL)
        qkv, bias = weights("qkv_proj", i), weights("qkv_bias", i)
    else:
        qkv = np.concatenate([weights(r, i) for r in ("q_proj", "k_proj", "v_proj")])
        bias = np.concatenate([weights(r, i) for r in ("q_bias", "k_bias", "v_bias")])
    y = g.op("Add", [g.op("MatMul", [x, g.weight("qkv_proj", qkv.T)]), g.weight("qkv_bias", bias)])
    q, k, val = g.op("Split", [y, g.shape_const([v.hidden_size] * 3)], axis=-1, n_out=3)
    head_dim = v.hidden_size // v.num_heads
    if v.rotary_theta:  # each row's (patch row, patch column): a rotary table per row, no position ids
        cos, sin = (g.const(f"vision.rope.{name}", table[None])
                    for name, table in zip(("cos", "sin"), axial_tables(v.rotary_theta, head_dim, _patch_positions(v))))
        q, k = (g.op("RotaryEmbedding", [t, cos, sin], num_heads=v.num_heads) for t in (q, k))
    attrs = dict(q_num_heads=v.num_heads, kv_num_heads=v.num_heads, scale=head_dim ** -0.5)
    windowed = v.window and i not in v.full_layers  # each row sees the rows of its window (Qwen2.5-VL)
    if windowed and _equal_windows(v):  # the rows come window by window (_row_order): a batch of windows
        per_window = v.window * v.window * v.shuffle * v.shuffle
        q, k, val = (g.op("Reshape", [t, g.shape_const([-1, per_window, v.hidden_size])]) for t in (q, k, val))
        attn = g.op("Reshape", [g.op("Attention", [q, k, val], **attrs), g.shape_const([1, -1, v.hidden_size])])
    elif windowed:
        attn = g.op("Attention", [q, k, val, g.const("vision.window_mask", _window_mask(v))], **attrs)
    else:
        attn = g.op("Attention", [q, k, val], **attrs)
    h = g.op("Add", [h, _linear(g, attn, "o_proj", "o_bias", i, weights)])
    x = _layer_norm(g, h, v, "ln2", i, weights)
    if "gate_proj" in v.tensors:  # gated: act(gate) * up, one matmul for both
        w = np.concatenate([weights("gate_proj", i), weights("up_proj", i)])
        bias = np.concatenate([weights("gate_bias", i), weights("up_bias", i)])
        y = g.op("Add", [g.op("MatMul", [x, g.weight("gate_up_proj", w.T)]), g.weight("gate_up_bias", bias)])
        gate, up = g.op("Split", [y, g.shape_const([v.intermediate_size] * 2)], axis=-1, n_out=2)
        x = g.op("Mul", [_activation(g, gate, v.activation), up])
    else:
        x = _activation(g, _linear(g, x, "fc1", "fc1_bias", i, weights), v.activation)
    g.output(g.op("Add", [h, _linear(g, x, "fc2", "fc2_bias", i, weights)]), f"vision.{i + 1}", FLOAT,
             [1, v.sequence, v.hidden_size])


def _projector(g: GraphBuilder, unit, cfg: ModelConfig, weights, shapes) -> None:
    v = cfg.vision
    x = g.input(f"vision.{v.num_layers}", FLOAT, [1, v.sequence, v.hidden_size])
    if v.post_norm:
        x = _layer_norm(g, x, v, "post_norm", None, weights)
    if v.drop_class_token:
        x = g.op("Slice", [x, g.shape_const([1]), g.shape_const([v.sequence]), g.shape_const([1])])
    if v.projector == "gemma3":
        # average pooling: each output row the mean of a shuffle x shuffle block of patches
        x = g.op("Gather", [x, g.const(f"{g.prefix}.pool", _blocks(v))], axis=1)
        x = g.op("Reshape", [x, g.shape_const([1, v.image_tokens, v.shuffle * v.shuffle, v.hidden_size])])
        x = g.op("ReduceMean", [x, g.shape_const([2])], keepdims=0)
        norm = weights("soft_norm", None).astype(np.float32) + np.float32(1.0)  # Gemma's (1 + w)
        x = g.op("RMSNormalization", [x, g.weight("soft_norm", norm)], axis=-1, epsilon=v.layer_norm_eps)
        x = g.op("MatMul", [x, g.weight("proj1", weights("proj1", None))])  # stored [vision, text]: no transpose
    elif v.projector == "shuffle":
        # pixel shuffle: each output row is the shuffle x shuffle block of neighbouring patches
        # (row by row, column by column), side by side: a fixed gather of rows, then a reshape
        x = g.op("Gather", [x, g.const(f"{g.prefix}.shuffle", _blocks(v))], axis=1)
        x = g.op("Reshape", [x, g.shape_const([1, v.image_tokens, v.hidden_size * v.shuffle * v.shuffle])])
        x = g.op("MatMul", [x, g.weight("proj1", weights("proj1", None).T)])
    else:
        if v.projector == "merger":  # a merge block's rows side by side (they come in blocks: _embed)
            x = g.op("Reshape", [x, g.shape_const([1, v.image_tokens, v.hidden_size * v.shuffle * v.shuffle])])
        x = _linear(g, x, "proj1", "proj1_bias", None, weights)
    if v.projector in ("mlp", "merger"):
        x = _linear(g, _activation(g, x, v.projector_activation), "proj2", "proj2_bias", None, weights)
    if v.window and _equal_windows(v):  # the prompt rows back from window by window to row by row
        x = g.op("Gather", [x, g.const(f"{g.prefix}.raster", np.argsort(_window_blocks(v)))], axis=1)
    g.output(x, "image_features", FLOAT, [1, v.image_tokens, cfg.hidden_size])


def _blocks(v) -> np.ndarray:
    """Patch rows in the order of shuffle x shuffle blocks: block by block (row by row of blocks),
    each block's patches row by row."""
    (rows, cols), s = v.grid, v.shuffle
    return np.array([(by * s + a) * cols + bx * s + b for by in range(rows // s) for bx in range(cols // s)
                     for a in range(s) for b in range(s)], np.int64)


def _equal_windows(v) -> bool:
    """Whether Qwen2.5-VL's windows tile the grid of merge blocks exactly (all the same size)."""
    rows, cols = v.token_grid
    return rows % v.window == 0 and cols % v.window == 0


def _window_blocks(v) -> np.ndarray:
    """The merge blocks (numbered row by row) window by window (row by row of windows), each
    window's blocks row by row."""
    per_row, w = v.token_grid[1], v.window
    blocks = np.arange(v.image_tokens)
    window = (blocks // per_row) // w * (per_row // w) + (blocks % per_row) // w
    return np.argsort(window, kind="stable")


def _row_order(v) -> np.ndarray:
    """The encoder's patch rows: in merge blocks (_blocks); with equal windows (Qwen2.5-VL),
    their blocks window by window (_window_blocks), so that a window is a run of rows."""
    order = _blocks(v)
    if not (v.window and _equal_windows(v)):
        return order
    return order.reshape(v.image_tokens, -1)[_window_blocks(v)].reshape(-1)


def _window_mask(v) -> np.ndarray:
    """[patches, patches]: whether two rows (in _blocks' order) share a window of v.window x
    v.window merge blocks, windows counted from the top left (the last ones smaller)."""
    blocks = np.arange(v.num_patches) // (v.shuffle * v.shuffle)
    per_row = v.token_grid[1]
    window = (blocks // per_row) // v.window * per_row + (blocks % per_row) // v.window
    return window[:, None] == window[None, :]


def _patch_positions(v) -> np.ndarray:
    """[patches, 2]: each row's patch row and column, rows in _row_order."""
    cols = v.grid[1]
    order = _row_order(v)
    return np.stack([order // cols, order % cols], axis=1)


def _linear(g, x, role, bias_role, layer, weights):
    y = g.op("MatMul", [x, g.weight(role, weights(role, layer).T)])
    return g.op("Add", [y, g.weight(bias_role, weights(bias_role, layer))])


def _layer_norm(g, x, v, role, layer, weights):
    if v.norm == "rms":
        return g.op("RMSNormalization", [x, g.weight(f"{role}_w", weights(f"{role}_w", layer))], axis=-1,
                    epsilon=v.layer_norm_eps)
    scale, bias = weights(f"{role}_w", layer), weights(f"{role}_b", layer)
    return g.op("LayerNormalization", [x, g.weight(f"{role}_w", scale), g.weight(f"{role}_b", bias)], axis=-1,
                epsilon=v.layer_norm_eps)


def _activation(g, x, kind: str):
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    if kind == "quick_gelu":  # CLIP's x * sigmoid(1.702 x)
        return g.op("Mul", [x, g.op("Sigmoid", [g.op("Mul", [x, g.const("const.quick_gelu", np.array(1.702, np.float32))])])])
    return g.op("Gelu", [x], approximate="tanh" if kind == "gelu_tanh" else "none")


def expected_vision_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """role -> HF shape, from the vision config's fields."""
    v = cfg.vision
    d, f, p, c = v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels
    shapes = {"patch_embed": (d, c, p, p), "class_embed": (d,), "position_embed": (v.sequence, d),
              "pre_norm_w": (d,), "pre_norm_b": (d,), "post_norm_w": (d,), "post_norm_b": (d,),
              "fc1": (f, d), "fc1_bias": (f,), "fc2": (d, f), "fc2_bias": (d,), "ln1_w": (d,), "ln1_b": (d,),
              "ln2_w": (d,), "ln2_b": (d,), "proj1_bias": (cfg.hidden_size,), "proj2": (cfg.hidden_size, cfg.hidden_size),
              "proj2_bias": (cfg.hidden_size,), "proj1": (cfg.hidden_size, d * v.shuffle ** 2),
              "patch_bias": (d,), "soft_norm": (d,)}
    if v.projector == "gemma3":
        shapes["proj1"] = (d, cfg.hidden_size)
    if v.projector == "merger":  # an MLP as wide as a merge block's rows side by side
        wide = d * v.shuffle ** 2
        shapes.update(proj1=(wide, wide), proj1_bias=(wide,), proj2=(cfg.hidden_size, wide))
    if v.temporal_patch > 1:
        shapes["patch_embed"] = (d, c, v.temporal_patch, p, p)
    for r in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[r] = (d, d)
        shapes[r[0] + "_bias"] = (d,)
    shapes.update(qkv_proj=(3 * d, d), qkv_bias=(3 * d,), gate_proj=(f, d), gate_bias=(f,), up_proj=(f, d), up_bias=(f,))
    return shapes


def check_vision_tensors(source, cfg: ModelConfig, where: str) -> None:
    """The encoder's and projector's tensors exist with the shapes the vision config implies."""
    v = cfg.vision
    names = set(source.tensor_names())
    path = getattr(source, "vision_path", source.path)  # an mmproj beside a GGUF text model
    needed = {"patch_embed", *([] if v.rotary_theta else ["position_embed"]), "proj1", *([] if v.projector in ("shuffle", "gemma3") else ["proj1_bias"]),
              *(["soft_norm"] if v.projector == "gemma3" else []),
              *(["proj2", "proj2_bias"] if v.projector in ("mlp", "merger") else []), *(["patch_bias"] if "patch_bias" in v.tensors else []),
              *(["class_embed"] if v.class_token else []), *(["pre_norm_w", "pre_norm_b"] if v.pre_norm else []),
              *(["post_norm_w"] if v.post_norm else []), *(["post_norm_b"] if v.post_norm and v.norm == "layer" else [])}
    attention = (["qkv_proj", "qkv_bias"] if "qkv_proj" in v.tensors
                 else ["q_proj", "q_bias", "k_proj", "k_bias", "v_proj", "v_bias"])
    mlp = ["gate_proj", "gate_bias", "up_proj", "up_bias"] if "gate_proj" in v.tensors else ["fc1", "fc1_bias"]
    norms = ["ln1_w", "ln2_w"] + (["ln1_b", "ln2_b"] if v.norm == "layer" else [])
    layer_roles = {*attention, *mlp, *norms, "o_proj", "o_bias", "fc2", "fc2_bias"}
    wanted = [(r, None) for r in sorted(needed)] + [(r, i) for i in range(v.num_layers) for r in sorted(layer_roles)]
    shapes = expected_vision_shapes(cfg)
    for role, layer in wanted:
        name = v.tensor_name(role, layer)
        if name not in names:
            raise EdgeLLMError(f"{path}: the vision config needs tensor {name}, which is missing")
        actual = tuple(source.tensor_shape(name))
        if actual != shapes[role]:
            raise EdgeLLMError(f"{where}: the vision config implies shape {shapes[role]} for {name}, which has shape "
                               f"{actual} in {path}")
