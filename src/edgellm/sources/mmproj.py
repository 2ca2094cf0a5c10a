"""llama.cpp's two-file vision-language layout: a text model GGUF and an mmproj GGUF (the vision
encoder and projector, architecture "clip"), read as one source.

The mmproj's metadata becomes the vision_config of a Hugging Face style config and its tensors get
Hugging Face names, so the same family adapter (config/idefics3.py, config/gemma3.py) serves the
GGUF pair and the safetensors directory. The image processor's settings come from the mmproj's keys as llama.cpp's
converter writes them (clip.vision.image_mean/std, preproc_image_size).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config.fields import COUNTS
from ..errors import EdgeLLMError
from ..quant.blocks import BlockQuantized
from .gguf_file import LAYER_INDEX, GGUFSource, open_gguf
from .safetensors_dir import _fingerprint

# clip.projector_type -> where the Hugging Face layout its family adapter reads (idefics3,
# gemma3, llava) keeps the vision tower's tensors
PROJECTORS = {"idefics3": "model.vision_model.", "gemma3": "vision_tower.vision_model.", "mlp": "vision_tower.vision_model.",
              "qwen2vl_merger": "visual.", "qwen2.5vl_merger": "visual."}
QWEN = {"qwen2vl_merger": "qwen2_vl", "qwen2.5vl_merger": "qwen2_5_vl"}  # projector type -> model type
# Qwen2-VL / Qwen2.5-VL towers (config/qwen2_vl.py's names). The converter splits the fused qkv in
# three, and the patch convolution's two frames into v.patch_embd.weight and v.patch_embd.weight.1.
_QWEN_LAYER = {"ln1": "norm1", "ln2": "norm2", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
               "attn_out": "attn.proj", "ffn_gate": "mlp.gate_proj"}
_QWEN_FFN = {"qwen2vl_merger": {"ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
             "qwen2.5vl_merger": {"ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}}
_QWEN_GLOBAL = {"v.patch_embd.weight": "visual.patch_embed.proj.weight",
                "v.patch_embd.weight.1": "visual.patch_embed.proj.weight.1",
                "v.post_ln.weight": "visual.merger.ln_q.weight", "v.post_ln.bias": "visual.merger.ln_q.bias",
                "mm.0.weight": "visual.merger.mlp.0.weight", "mm.0.bias": "visual.merger.mlp.0.bias",
                "mm.2.weight": "visual.merger.mlp.2.weight", "mm.2.bias": "visual.merger.mlp.2.bias"}
QWEN_PATCH = "visual.patch_embed.proj.weight"
_LAYER = {"ln1": "layer_norm1", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_out": "self_attn.out_proj", "ln2": "layer_norm2", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
# Legacy LLaVA files (llama.cpp's convert_image_encoder_to_gguf.py) name fc1 ffn_down and fc2
# ffn_up, the reverse of convert_hf_to_gguf.py: told apart by the first layer's shapes.
_LEGACY_FFN = {"ffn_up": "mlp.fc2", "ffn_down": "mlp.fc1"}
_TOWER = {"v.patch_embd": "embeddings.patch_embedding", "v.position_embd": "embeddings.position_embedding",
          "v.post_ln": "post_layernorm", "v.pre_ln": "pre_layrnorm"}
_PROJECTOR = {"mm.model.fc.weight": "model.connector.modality_projection.proj.weight",  # idefics3
              "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",  # gemma3
              "mm.soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight",
              "mm.0.weight": "multi_modal_projector.linear_1.weight", "mm.0.bias": "multi_modal_projector.linear_1.bias",
              "mm.2.weight": "multi_modal_projector.linear_2.weight", "mm.2.bias": "multi_modal_projector.linear_2.bias"}
# llama.cpp's converter stores Gemma 3's soft-embedding norm as (1 + w), as for the text model's norms
_ONE_PLUS = {"multi_modal_projector.mm_soft_emb_norm.weight"}
GEMMA3_POOLING = 4  # clip.vision.projector.scale_factor when absent (llama.cpp writes it only otherwise)
# llama.cpp keeps the text model's tensors under these Hugging Face names (gguf_file.py)
TEXT_PREFIX = "model."


class MmprojFile(GGUFSource):
    """The mmproj GGUF: its tensors under Hugging Face names, read like a GGUF model's."""

    metadata = "mmproj metadata"

    def __init__(self, path: Path):
        self.path = path
        self.reader, self.fields = open_gguf(path)
        self.arch = self.fields.get("general.architecture")
        if self.arch != "clip":
            raise EdgeLLMError(f"{path}: --mmproj takes llama.cpp's vision projector file (architecture 'clip'), "
                               f"not '{self.arch}'")
        self.raw_config = {}
        self.projector = self._lookup("projector_type")[1]  # checked by VisionPairSource
        first_down = next((t for t in self.reader.tensors if t.name == "v.blk.0.ffn_down.weight"), None)
        # (GGUF lists dimensions innermost first: a [out, in] matrix's shape reads [in, out])
        self._layer = {**_LAYER, **_LEGACY_FFN} if first_down is not None and len(first_down.shape) == 2 \
            and int(first_down.shape[1]) == self._number("feed_forward_length", default=-1) else _LAYER
        self._tensors = {name: t for t in self.reader.tensors if (name := self._hf_name(t.name)) is not None}

    def _hf_name(self, name: str) -> str | None:
        base, _, kind = name.rpartition(".")
        if isinstance(self.projector, str) and self.projector in QWEN:
            return self._qwen_name(name, base, kind)
        known = isinstance(self.projector, str) and self.projector in PROJECTORS  # (a list is no key)
        tower = PROJECTORS[self.projector if known else "idefics3"]
        if name.startswith("v.blk."):
            parts = base.split(".", 3)
            if len(parts) != 4 or not LAYER_INDEX.fullmatch(parts[2]):
                raise EdgeLLMError(f"{self.path}: tensor '{name}' is not named v.blk.<layer>.<part>.<kind>")
            hf = self._layer.get(parts[3])
            return None if hf is None else f"{tower}encoder.layers.{parts[2]}.{hf}.{kind}"
        if base in _TOWER:
            return f"{tower}{_TOWER[base]}.{kind}"
        if name == "v.class_embd":  # a vector without a .weight
            return f"{tower}embeddings.class_embedding"
        return _PROJECTOR.get(name)

    def _qwen_name(self, name: str, base: str, kind: str) -> str | None:
        if name.startswith("v.blk."):
            parts = base.split(".", 3)
            if len(parts) != 4 or not LAYER_INDEX.fullmatch(parts[2]):
                raise EdgeLLMError(f"{self.path}: tensor '{name}' is not named v.blk.<layer>.<part>.<kind>")
            hf = {**_QWEN_LAYER, **_QWEN_FFN[self.projector]}.get(parts[3])
            return None if hf is None else f"visual.blocks.{parts[2]}.{hf}.{kind}"
        return _QWEN_GLOBAL.get(name)

    def tensor_names(self) -> list[str]:
        return [n for n in super().tensor_names() if n != QWEN_PATCH + ".1"]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        shape = super().tensor_shape(name)
        if name == QWEN_PATCH:  # the two frames' convolutions as one, [D, C, 2, p, p]
            return shape[:2] + (2,) + shape[2:]
        return shape

    def tensor(self, name: str) -> np.ndarray:
        if name == QWEN_PATCH:
            if QWEN_PATCH + ".1" not in self._tensors:
                raise EdgeLLMError(f"{self.path}: tensor v.patch_embd.weight.1 (the patch convolution's second frame) "
                                   "is missing")
            return np.stack([super().tensor(name), super().tensor(name + ".1")], axis=2)
        w = super().tensor(name)
        return w - 1.0 if name in _ONE_PLUS else w

    def packed(self, name: str) -> BlockQuantized | None:
        return None if name == QWEN_PATCH else super().packed(name)

    def stored_bytes(self, name: str) -> int | None:
        return None if name == QWEN_PATCH else super().stored_bytes(name)

    def _lookup(self, key: str):
        """llama.cpp's converter writes most keys under clip.vision., a few under clip."""
        for name in (f"clip.vision.{key}", f"clip.{key}"):
            if name in self.fields:
                return name, self.fields[name]
        return f"clip.vision.{key}", None

    def key(self, name: str):
        """A value the caller checks itself (text, lists); numbers are _number's."""
        full, value = self._lookup(name)
        if value is None:
            raise EdgeLLMError(f"{self.path}: {self.metadata} '{full}' is missing")
        return value


class VisionPairSource:
    """A GGUF text model and its mmproj as one model source."""

    default_precision = "SOURCE"

    def __init__(self, text_path: Path, mmproj_path: Path):
        self.text = GGUFSource(text_path)
        self.mmproj = MmprojFile(mmproj_path)
        self.path = text_path
        self.vision_path = mmproj_path  # what errors about the vision part name
        self.config_path = f"{mmproj_path} (with {text_path})"
        m = self.mmproj
        if not isinstance(m.projector, str) or m.projector not in PROJECTORS:
            raise EdgeLLMError(f"{mmproj_path}: projector type '{m.projector}' is not supported (supported: "
                               f"{', '.join(PROJECTORS)})")
        hidden = self.text.raw_config["hidden_size"]
        # a LLaVA file's projection_dim is CLIP's own projection (unused), and Qwen's converter writes
        # the vision config's: the MLP's output rows say it
        last = _QWEN_GLOBAL["mm.2.weight"] if m.projector in QWEN else _PROJECTOR["mm.2.weight"]
        projection = (m.tensor_shape(last)[0] if m.projector in ("mlp", *QWEN) and last in m._tensors
                      else m._number("projection_dim", required=True))
        if projection != hidden:
            raise EdgeLLMError(f"{mmproj_path}: the projector writes {projection} values per row; "
                               f"the text model {text_path} takes {hidden}: not this model's mmproj")
        tokens = self.text.fields.get("tokenizer.ggml.tokens")
        tokens = tokens if isinstance(tokens, list) else []
        self.added_image_token: int | None = None  # "<image>", added to the tokenizer (LLaVA: llama.cpp has none)

        def token(text: str) -> int:
            if text in tokens:
                return tokens.index(text)
            if m.projector == "mlp" and text == "<image>":
                # llama.cpp's LLaVA text models have no image token: it splices the rows in itself. Its
                # rows replace the token before any lookup, so an id past the vocabulary is no row.
                self.added_image_token = len(tokens)
                return self.added_image_token
            raise EdgeLLMError(f"{text_path}: the vocabulary has no {text} token; not the text model of {mmproj_path}")

        image, patch = m._number("image_size", required=True), m._number("patch_size", required=True)
        vision = {"image_size": image, "patch_size": patch,
                  "hidden_size": m._number("embedding_length", required=True),
                  "intermediate_size": m._number("feed_forward_length", required=True),
                  "num_hidden_layers": m._number("block_count", required=True, high=COUNTS),
                  "num_attention_heads": m._number("attention.head_count", required=True, high=COUNTS),
                  "layer_norm_eps": m._number("attention.layer_norm_epsilon", float, 1e-6),
                  "hidden_act": "gelu_pytorch_tanh"}
        pixels = {"image_mean": m.key("image_mean"), "image_std": m.key("image_std")}  # checked by config/vision.py
        if m.projector in QWEN:
            self.raw_config, self.image_processor = self._qwen(vision, pixels, projection, token)
        elif m.projector == "mlp":
            self.raw_config = {
                "model_type": "llava", "text_config": self.text.raw_config,
                "vision_config": {"model_type": "clip_vision_model", **vision,
                                  "hidden_act": "gelu" if m.fields.get("clip.use_gelu") else "quick_gelu"},
                "vision_feature_layer": self._feature_layer(), "projector_hidden_act": "gelu",
                "image_token_index": token("<image>")}
            self.image_processor = {"size": {"shortest_edge": image}, "crop_size": {"height": image, "width": image},
                                    "resample": 3, **pixels}
        elif m.projector == "gemma3":
            side = image // patch // m._number("projector.scale_factor", default=GEMMA3_POOLING)
            self.raw_config = {
                "model_type": "gemma3", "text_config": self.text.raw_config,
                "vision_config": {"model_type": "siglip_vision_model", **vision}, "mm_tokens_per_image": side * side,
                "image_token_index": token("<image_soft_token>"), "boi_token_index": token("<start_of_image>")}
            self.image_processor = {"size": {"height": image, "width": image}, **pixels}
        else:
            self.raw_config = {
                "model_type": "idefics3", "text_config": self.text.raw_config,
                "vision_config": {"model_type": "idefics3_vision", **vision},
                "scale_factor": m._number("projector.scale_factor", default=2), "image_token_id": token("<image>")}
            self.image_processor = {"size": {"longest_edge": m._number("preproc_image_size", default=image)},
                                    "max_image_size": {"longest_edge": image}, "resample": 1, **pixels}
        self._parts = {name: self.mmproj for name in self.mmproj._tensors}
        self._parts.update({name: self.text for name in self.text.tensor_names()})

    def _qwen(self, vision: dict, pixels: dict, projection: int, token) -> tuple[dict, dict]:
        """Qwen2-VL / Qwen2.5-VL: the config.json transformers would read (config/qwen2_vl.py), the
        M-RoPE sections from the text GGUF's rope.dimension_sections."""
        m, text = self.mmproj, dict(self.text.raw_config)
        name, sections = self.text._lookup("rope.dimension_sections")
        if not (isinstance(sections, list) and len(sections) >= 3 and not any(sections[3:])):
            raise EdgeLLMError(f"{self.path}: GGUF metadata '{name}' must give M-RoPE's 3 sections (time, height, width) "
                               f"beside a Qwen mmproj, got {sections!r}")
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [int(x) for x in sections[:3]]}
        up = QWEN_PATCH.replace("patch_embed.proj", "blocks.0." + _QWEN_FFN[m.projector]["ffn_up"])
        if up not in m._tensors:
            raise EdgeLLMError(f"{self.vision_path}: tensor v.blk.0.ffn_up.weight is missing")
        width, ffn = vision["hidden_size"], m.tensor_shape(up)[0]
        config = {"depth": vision["num_hidden_layers"], "num_heads": vision["num_attention_heads"],
                  "patch_size": vision["patch_size"], "spatial_merge_size": m._number("spatial_merge_size", default=2),
                  "temporal_patch_size": 2, "in_channels": 3}
        if m.projector == "qwen2vl_merger":
            if ffn % width:
                raise EdgeLLMError(f"{self.vision_path}: an MLP of {ffn} over a width of {width} is not Qwen2-VL's")
            config.update(embed_dim=width, mlp_ratio=ffn // width, hidden_size=projection, hidden_act="quick_gelu")
        else:
            pattern = m._number("n_wa_pattern", required=True, high=COUNTS)  # every n-th layer sees the whole image
            full = [i for i in range(config["depth"]) if (i + 1) % pattern == 0]
            config.update(hidden_size=width, intermediate_size=ffn, out_hidden_size=projection, hidden_act="silu",
                          window_size=m._number("window_size", default=112), fullatt_block_indexes=full)
        raw = {"model_type": QWEN[m.projector], "text_config": text, "vision_config": config,
               "image_token_id": token("<|image_pad|>"), "vision_start_token_id": token("<|vision_start|>"),
               "vision_end_token_id": token("<|vision_end|>")}
        return raw, {"resample": 3, **pixels}

    def _feature_layer(self) -> int:
        """Which hidden state LLaVA's projector reads: clip.vision.feature_layer (hidden-state
        indices, 0 the embeddings: the converter's later versions keep every layer and write it),
        or else the last stored one (its earlier versions, which wrote the published LLaVA-1.5
        files, drop CLIP's last layer and write one block fewer: the second to last is what is
        left)."""
        name, layers = self.mmproj._lookup("feature_layer")
        if layers is None:
            return -1
        if not isinstance(layers, list) or len(layers) != 1 or isinstance(layers[0], bool) or not isinstance(layers[0], int):
            raise EdgeLLMError(f"{self.vision_path}: mmproj metadata '{name}' {layers!r}: one layer's features are "
                               f"supported")
        return layers[0]

    def tokenizer(self):
        files = self.text.tokenizer()
        if self.added_image_token is None:
            return files
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_str(files.tokenizer_json)
        tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
        if tok.token_to_id("<image>") != self.added_image_token:
            raise EdgeLLMError(f"{self.path}: the tokenizer cannot take an <image> token at id {self.added_image_token}")
        return replace(files, tokenizer_json=tok.to_str())

    def _part(self, name: str):
        part = self._parts.get(name)
        if part is None:
            raise EdgeLLMError(f"{self.path}: tensor for '{name}' not found in the text model or the mmproj")
        return part

    def tensor_names(self) -> list[str]:
        return sorted(self._parts)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._part(name).tensor_shape(name)

    def tensor(self, name: str) -> np.ndarray:
        return self._part(name).tensor(name)

    def packed(self, name: str) -> BlockQuantized | None:
        return self._part(name).packed(name)

    def stored_bytes(self, name: str) -> int | None:
        return self._part(name).stored_bytes(name)

    def storage(self, name: str) -> str:
        return self._part(name).storage(name)


    def fingerprint(self) -> str:
        return _fingerprint([self.text.path, self.mmproj.path])
