"""The vision part of a vision-language model's configuration: the encoder (a ViT: CLIP or
SigLIP), the projector into the language model's embedding space, and the image preprocessing.

Like the text part, family differences are data: a class token or not, a LayerNorm before the
encoder or after it, which layer's output feeds the projector, which activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import EdgeLLMError
from .fields import COUNTS, integer, number, require, text

# vision encoder hidden_act -> the name the emitter knows (graph/vision.py)
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "silu": "silu"}
PIXELS = 16384  # the longest image edge, in pixels, a config may give
# PIL resampling filter numbers as Hugging Face image processors store them
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

ENCODER_TENSORS = {  # per encoder layer, after the encoder's prefix (CLIP and SigLIP name them alike)
    "ln1_w": "encoder.layers.{i}.layer_norm1.weight", "ln1_b": "encoder.layers.{i}.layer_norm1.bias",
    "q_proj": "encoder.layers.{i}.self_attn.q_proj.weight", "q_bias": "encoder.layers.{i}.self_attn.q_proj.bias",
    "k_proj": "encoder.layers.{i}.self_attn.k_proj.weight", "k_bias": "encoder.layers.{i}.self_attn.k_proj.bias",
    "v_proj": "encoder.layers.{i}.self_attn.v_proj.weight", "v_bias": "encoder.layers.{i}.self_attn.v_proj.bias",
    "o_proj": "encoder.layers.{i}.self_attn.out_proj.weight", "o_bias": "encoder.layers.{i}.self_attn.out_proj.bias",
    "ln2_w": "encoder.layers.{i}.layer_norm2.weight", "ln2_b": "encoder.layers.{i}.layer_norm2.bias",
    "fc1": "encoder.layers.{i}.mlp.fc1.weight", "fc1_bias": "encoder.layers.{i}.mlp.fc1.bias",
    "fc2": "encoder.layers.{i}.mlp.fc2.weight", "fc2_bias": "encoder.layers.{i}.mlp.fc2.bias",
}


@dataclass
class ImageProcessing:
    """What the model's Hugging Face image processor does to a picture (runtime/images.py).

    kind "crop" (CLIP): the shorter side resized to resize_edge, then a center crop to the
    encoder's size. kind "resize" (Gemma 3): resized to the encoder's size. kind "tiles" (Idefics3 / SmolVLM): the longer side resized to resize_edge,
    then to whole tiles of the encoder's size, cut into those tiles plus the whole image at one
    tile's size (a "global" view); split False: the global view alone."""
    kind: str
    height: int  # the encoder's input (one tile)
    width: int
    resize_edge: int
    resample: str
    rescale_factor: float
    mean: list[float]
    std: list[float]
    split: bool = False


@dataclass
class VisionConfig:
    encoder: str  # "clip" | "siglip" | "qwen2_vl"
    image_size: int  # 0: the encoder takes any size (Qwen2-VL); the build's is processing.height x width
    patch_size: int
    num_channels: int
    hidden_size: int
    intermediate_size: int
    num_layers: int  # the encoder layers that run: those up to the one whose output is used
    num_heads: int
    layer_norm_eps: float
    activation: str  # "quick_gelu" | "gelu" | "gelu_tanh"
    class_token: bool  # CLIP prepends a learned class embedding to the patches
    pre_norm: bool  # CLIP's pre_layrnorm on the embeddings
    post_norm: bool  # the encoder's final LayerNorm applies to the features used
    drop_class_token: bool  # the projector sees the patches only
    # "mlp": linear, activation, linear (LLaVA); "linear" (PaliGemma); "shuffle": pixel shuffle,
    # linear (Idefics3); "gemma3": average pooling of shuffle x shuffle patches, RMSNorm (1 + w),
    # projection; "merger": shuffle x shuffle patches side by side, then the "mlp" (Qwen2-VL)
    projector: str
    projector_activation: str
    image_token_id: int  # the token each tile's rows replace (the processor's "image token")
    image_tokens: int  # rows one tile (one encoder pass) becomes in the prompt
    processing: ImageProcessing
    shuffle: int = 1  # pixel shuffle (or pooling) factor: scale x scale neighbouring patches become one row
    # how an image appears in the prompt (runtime/images.py image_text): "repeat" (the image token,
    # image_tokens times: LLaVA), "tiles" (Idefics3: each tile's rows between
    # <fake_token_around_image> and a row/column tag) or "gemma3" (between <start_of_image> and
    # <end_of_image>, blank lines around); "paligemma" (the image tokens, then <bos>, before the
    # prompt, which ends in a newline); "qwen2_vl" (the image token between <|vision_start|> and
    # <|vision_end|>, which chat templates write themselves)
    prompt: str = "repeat"
    # the token a chat template or a prompt places where an image goes (None: the image token)
    marker_token_id: int | None = None
    # which prompt rows see later rows in prefill: none ("causal"), an image's rows see their whole
    # image ("image": Gemma 3), or the whole prompt sees itself ("prefix": PaliGemma's prefix-LM,
    # the answer causal)
    attention: str = "causal"
    # Qwen2-VL: the patch convolution takes this many frames (a picture is repeated), and the
    # encoder has no position table but a 2D rotary embedding of this base
    temporal_patch: int = 1
    rotary_theta: float = 0.0
    # Qwen2.5-VL: RMSNorms ("rms") instead of LayerNorms, a gated MLP (gate_proj / up_proj roles),
    # and attention within windows of window x window prompt rows except in full_layers
    norm: str = "layer"
    window: int = 0
    full_layers: list[int] = field(default_factory=list)

    # role -> tensor name ("{i}": the encoder layer)
    tensors: dict[str, str] = field(default_factory=dict)

    @property
    def marker(self) -> int:
        return self.image_token_id if self.marker_token_id is None else self.marker_token_id

    @property
    def whole_calls(self) -> int:
        """The fewest rows a prefill call must hold: an image whose rows see each other is one
        call (with "prefix", the whole prompt is: at least an image, <bos> and the newline)."""
        return {"causal": 0, "image": self.image_tokens, "prefix": self.image_tokens + 2}[self.attention]

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row of one encoder input."""
        return self.processing.height // self.patch_size, self.processing.width // self.patch_size

    @property
    def token_grid(self) -> tuple[int, int]:
        """An encoder input's prompt rows per column and per row (patches merged shuffle x shuffle)."""
        rows, cols = self.grid
        return rows // self.shuffle, cols // self.shuffle

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def sequence(self) -> int:
        """Rows through the encoder: the patches and the class token."""
        return self.num_patches + int(self.class_token)

    @property
    def patch_values(self) -> int:
        return self.num_channels * self.patch_size ** 2

    def tensor_name(self, role: str, layer: int | None = None) -> str | None:
        template = self.tensors.get(role)
        return None if template is None else template.format(i=layer)

    @classmethod
    def from_dict(cls, data: dict) -> "VisionConfig":
        data = dict(data)
        if "bidirectional" in data:  # a build made before `attention` (Gemma 3's was bidirectional: True)
            data["attention"] = "image" if data.pop("bidirectional") else "causal"
        return cls(**{**data, "processing": ImageProcessing(**data["processing"])})


def clip_encoder(raw: dict, where: str, prefix: str, feature_layer: int, activation: str = "quick_gelu") -> dict:
    """The VisionConfig fields of a CLIP vision tower (config.json's vision_config), tensors under prefix.
    feature_layer: which hidden state the projector reads (LLaVA: -2, the second to last layer's output).
    activation: hidden_act where the config gives none."""
    where = f"{where} (vision_config)"
    layers = require(raw, "num_hidden_layers", where, high=COUNTS)
    used = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer  # hidden_states[0] is the embeddings
    if not 0 <= used <= layers:
        raise EdgeLLMError(f"{where}: vision_feature_layer {feature_layer} is not one of the encoder's {layers} layers")
    act = text(raw, "hidden_act", where, activation)
    if act not in ACTIVATIONS:
        raise EdgeLLMError(f"{where}: hidden_act '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    hidden, heads = require(raw, "hidden_size", where), require(raw, "num_attention_heads", where, high=COUNTS)
    if hidden % heads:
        raise EdgeLLMError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    image, patch = require(raw, "image_size", where, high=PIXELS), require(raw, "patch_size", where, high=PIXELS)
    if image % patch:
        raise EdgeLLMError(f"{where}: image_size {image} is not a multiple of patch_size {patch}")
    tensors = {role: prefix + name for role, name in ENCODER_TENSORS.items()}
    tensors.update(patch_embed=prefix + "embeddings.patch_embedding.weight",
                   class_embed=prefix + "embeddings.class_embedding",
                   position_embed=prefix + "embeddings.position_embedding.weight",
                   pre_norm_w=prefix + "pre_layrnorm.weight", pre_norm_b=prefix + "pre_layrnorm.bias",
                   post_norm_w=prefix + "post_layernorm.weight", post_norm_b=prefix + "post_layernorm.bias")
    return dict(encoder="clip", image_size=image, patch_size=patch, num_channels=integer(raw, "num_channels", where, 3),
                hidden_size=hidden, intermediate_size=require(raw, "intermediate_size", where), num_layers=used,
                num_heads=heads, layer_norm_eps=number(raw, "layer_norm_eps", where, 1e-5), activation=ACTIVATIONS[act],
                class_token=True, pre_norm=True, post_norm=False, tensors=tensors)


def siglip_encoder(raw: dict, where: str, prefix: str) -> dict:
    """The VisionConfig fields of a SigLIP-style vision tower (Idefics3 / SmolVLM, PaliGemma): no
    class token, a bias on the patch embedding, the final LayerNorm applied, every layer used."""
    fields = clip_encoder(raw, where, prefix, -1, activation="gelu_pytorch_tanh")
    fields["tensors"].update(patch_bias=prefix + "embeddings.patch_embedding.bias")
    for role in ("class_embed", "pre_norm_w", "pre_norm_b"):
        fields["tensors"].pop(role)
    fields.update(encoder="siglip", class_token=False, pre_norm=False, post_norm=True,
                  layer_norm_eps=number(raw, "layer_norm_eps", f"{where} (vision_config)", 1e-6))
    return fields


def image_processing(processor: dict | None, image_size: int, where: str) -> ImageProcessing:
    """A CLIP processor from preprocessor_config.json (None: CLIP's defaults at the encoder's size)."""
    p, where = _processor(processor, where)
    if not p.get("do_center_crop", True):
        raise EdgeLLMError(f"{where}: a CLIP processor without its center crop is not supported")
    height = _edge(p, where, "crop_size", "height", image_size)
    width = _edge(p, where, "crop_size", "width", image_size)
    shortest = _edge(p, where, "size", "shortest_edge", image_size)
    if (height, width) != (image_size, image_size):
        raise EdgeLLMError(f"{where}: crop size {height}x{width} differs from the encoder's image_size {image_size}")
    if shortest < image_size:
        raise EdgeLLMError(f"{where}: size.shortest_edge {shortest} is smaller than the {image_size} px crop")
    return ImageProcessing("crop", height, width, shortest, **_pixels(p, where, 3, [0.48145466, 0.4578275, 0.40821073],
                                                                     [0.26862954, 0.26130258, 0.27577711]))


def tiled_processing(processor: dict | None, image_size: int, where: str) -> ImageProcessing:
    """An Idefics3 / SmolVLM processor from preprocessor_config.json."""
    p, where = _processor(processor, where)
    tile = _edge(p, where, "max_image_size", "longest_edge", image_size)
    if tile != image_size:
        raise EdgeLLMError(f"{where}: max_image_size {tile} differs from the encoder's image_size {image_size}")
    if not p.get("do_resize", True):
        raise EdgeLLMError(f"{where}: do_resize false is not supported")
    edge = _edge(p, where, "size", "longest_edge", 4 * image_size)
    return ImageProcessing("tiles", image_size, image_size, edge, split=bool(p.get("do_image_splitting", True)),
                           **_pixels(p, where, 1, [0.5] * 3, [0.5] * 3))


def resized_processing(processor: dict | None, image_size: int, where: str, resample: int = 2) -> ImageProcessing:
    """A processor that resizes to the encoder's size (Gemma 3: 896 x 896, bilinear; SigLIP's for
    PaliGemma: bicubic), without pan-and-scan crops. resample: the processor class's default."""
    p, where = _processor(processor, where)
    if p.get("do_pan_and_scan"):
        raise EdgeLLMError(f"{where}: do_pan_and_scan is not supported")
    height = _edge(p, where, "size", "height", image_size)
    width = _edge(p, where, "size", "width", image_size)
    if (height, width) != (image_size, image_size):
        raise EdgeLLMError(f"{where}: size {height}x{width} differs from the encoder's image_size {image_size}")
    return ImageProcessing("resize", height, width, image_size, **_pixels(p, where, resample, [0.5] * 3, [0.5] * 3))


def any_size_processing(processor: dict | None, where: str) -> ImageProcessing:
    """A processor that resizes to whatever size the build gives the encoder (Qwen2-VL's; it
    would keep the aspect ratio, which one static size cannot): CLIP's normalization, bicubic."""
    p, where = _processor(processor, where)
    if not p.get("do_resize", True):
        raise EdgeLLMError(f"{where}: do_resize false is not supported")
    return ImageProcessing("resize", 0, 0, 0, **_pixels(p, where, 3, [0.48145466, 0.4578275, 0.40821073],
                                                                [0.26862954, 0.26130258, 0.27577711]))


def with_input_size(vision: VisionConfig, height: int, width: int, where: str) -> VisionConfig:
    """The vision config of an encoder that takes any size, fixed at height x width pixels
    (compile's --input_height / --input_width); one that takes one size refuses another."""
    if vision.image_size:
        if (height, width) == (vision.processing.height, vision.processing.width):
            return vision
        raise EdgeLLMError(f"{where}: the {vision.encoder} encoder takes {vision.processing.height}x"
                           f"{vision.processing.width} images only; --input_height/--input_width are for encoders "
                           "that take any size (Qwen2-VL)")
    step = vision.patch_size * vision.shuffle
    for name, value in (("--input_height", height), ("--input_width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or not step <= value <= PIXELS or value % step:
            raise EdgeLLMError(f"{where}: {name} {value!r} must be a multiple of {step} pixels (patch {vision.patch_size} "
                               f"x merge {vision.shuffle}) from {step} to {PIXELS}")
    return replace(vision, image_tokens=(height // step) * (width // step),
                   processing=replace(vision.processing, height=height, width=width))


def _processor(processor, where: str) -> tuple[dict, str]:
    where = f"{where} (preprocessor_config.json)"
    if processor is not None and not isinstance(processor, dict):
        raise EdgeLLMError(f"{where}: expected a JSON object")
    return processor or {}, where


def _edge(p: dict, where: str, field_: str, key: str, default: int) -> int:
    """A size field: a number, or {key: number} (Hugging Face writes both)."""
    value = p.get(field_, default)
    if isinstance(value, dict):
        value = value.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PIXELS:
        raise EdgeLLMError(f"{where}: {field_}.{key} must be a whole number of pixels (1 to {PIXELS}), got {value!r}")
    return value


def _pixels(p: dict, where: str, resample: int, mean: list[float], std: list[float]) -> dict:
    """Resampling filter, rescale and normalization settings."""
    filter_ = RESAMPLE.get(p.get("resample", resample)) if isinstance(p.get("resample", resample), int) else None
    if filter_ is None:
        raise EdgeLLMError(f"{where}: unknown resample filter {p.get('resample')!r}")
    normalize = p.get("do_normalize", True)
    values = {}
    for name, given, identity in (("image_mean", mean, 0.0), ("image_std", std, 1.0)):
        v = p.get(name, given) if normalize else [identity] * 3
        v = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                              and math.isfinite(x) for x in v)):
            raise EdgeLLMError(f"{where}: {name} must be 3 numbers (one per colour channel), got {v!r}")
        if name == "image_std" and any(x == 0 for x in v):
            raise EdgeLLMError(f"{where}: image_std {v} has a zero")
        values[name] = [float(x) for x in v]
    factor = p.get("rescale_factor", 1 / 255) if p.get("do_rescale", True) else 1.0
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise EdgeLLMError(f"{where}: rescale_factor must be a positive number, got {factor!r}")
    return dict(resample=filter_, rescale_factor=float(factor), mean=values["image_mean"], std=values["image_std"])
