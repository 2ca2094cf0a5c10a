"""A compiled model, loaded: its engine (the weights, once), tokenizer and config. Conversations
are sessions (runtime/session.py); `generate` and `chat` here use a default one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from ..config.model_config import ModelConfig
from ..errors import EdgeLLMError
from ..record import BuildRecord
from .adapters import AdapterStore
from .engine import Engine, EngineSpec
from .images import ImagePrompt, ImageStore, image_bytes, image_text, load_image, place_images, preprocess
from .session import Generation, Session
from .strategies import Drafter, DraftModel, PromptLookup
from .text import TextCodec

__all__ = ["Model", "Generation"]


def _where(image) -> str | None:
    """How errors name an image: its path, or None (load_image's "the image")."""
    return str(image) if isinstance(image, (str, Path)) else None


class Model:
    def __init__(self, path: Path, engine: Engine, codec: TextCodec, cfg: ModelConfig, threads: int | None = None):
        self.path, self.engine, self.codec, self.config = path, engine, codec, cfg
        self.adapters = AdapterStore(path, cfg, engine)
        self.tokenizer = codec.tokenizer
        self.max_num_tokens = engine.spec.max_num_tokens
        self.threads = threads
        self._default: Session | None = None
        self._image_encoder = None
        self._encoder_lock = threading.Lock()
        self.images = ImageStore()  # every session's images, as prompt rows
        if cfg.vision is not None:
            codec.image_marker = codec.tokenizer.id_to_token(cfg.vision.marker)
        if cfg.vision is not None and cfg.vision.prompt == "paligemma":
            # no chat template, and a prompt its processor lays out itself: a role-prefixed
            # conversation would be text it was never trained on, and all of it one prefix
            codec.no_chat = (f"{path}: {cfg.family} takes a prompt, not a conversation (it has no chat format): "
                             f"use `edgellm generate` or /v1/completions")

    @property
    def image_encoder(self):
        """The image encoder (runtime/images.py), loaded with the first image."""
        with self._encoder_lock:  # the server's request handlers may ask at once
            if self._image_encoder is None:
                from .images import ImageEncoder

                native = getattr(self.engine, "encoder", None) is not None  # the C targets' library encodes
                self._image_encoder = (ImageEncoder(self.config.vision, self.engine.encode_patches) if native else
                                       ImageEncoder.onnx(self.path / "compiled" / "vision", self.config.vision, self.threads))
        return self._image_encoder

    @classmethod
    def load(cls, path, threads: int | None = None) -> "Model":
        path = Path(path)
        limit = 8 * (os.cpu_count() or 1)
        if threads is not None and not 1 <= threads <= limit:
            raise EdgeLLMError(f"threads {threads} (--threads): use 1 to {limit} (this machine has {os.cpu_count()} CPUs)")
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise EdgeLLMError(f"{path}: not an edgellm output directory (no manifest.json)")
        try:
            complete = json.loads(manifest.read_text()).get("complete")
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise EdgeLLMError(f"{manifest}: unreadable ({type(e).__name__}); run `edgellm compile ... --resume`") from None
        if not complete:
            raise EdgeLLMError(f"{path}: the build is incomplete; run `edgellm compile ... --resume`")
        built = BuildRecord.load(path)
        built.check_files(path, full=False)  # (a truncated program or library would crash the process)
        try:
            cfg = ModelConfig.load(path / "model_config.json")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise EdgeLLMError(f"{path / 'model_config.json'}: not a model configuration this edgellm reads "
                               f"({type(e).__name__}: {e}); run `edgellm compile ... --resume`") from None
        codec = TextCodec(path / "runtime")
        spec = EngineSpec(
            num_layers=cfg.num_layers,
            kv_width=cfg.num_kv_heads * cfg.head_dim,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            group_size=built.group_size,
            max_num_tokens=built.max_num_tokens,
            buckets=list(built.buckets),
            int8_activations=built.int8_activations,
            rope_grid=cfg.vision.token_grid if any(rope.sections for rope in cfg.ropes.values()) else None,
        )
        target = built.target
        if target == "cpu":
            from .ort import OrtEngine

            engine = OrtEngine(path / "compiled" / "cpu", spec, threads)
        elif target == "native":
            from .native import NativeEngine

            engine = NativeEngine(path / "compiled" / "native", spec, threads)
        else:
            raise EdgeLLMError(f"{path}: built for {target}; its programs run on that machine "
                               f"(compiled/{target}/model_main), not in this runtime")
        return cls(path, engine, codec, cfg, threads)

    def encode_images(self, images) -> tuple[list[ImagePrompt], float]:
        """Each image (a path, bytes or a PIL image) as its prompt text and each tile's rows, and
        the seconds it took. An image seen before (the same pixels) is not encoded again."""
        if not images:
            return [], 0.0
        vision = self.config.vision
        if vision is None:
            raise EdgeLLMError(f"{self.path}: this build is a text model; it takes no images")
        t0 = time.perf_counter()
        prompts = []
        for image in images:
            data, source = image_bytes(image)
            known = self.images.known(source) if source else None
            if known is not None:  # the same file's bytes: neither decoded nor preprocessed again
                prompts.append(known)
                continue
            prepared = preprocess(load_image(image if data is None else data, _where(image)), vision.processing)
            prompt = ImagePrompt(image_text(vision, prepared, self.tokenizer), self.images.rows(prepared, self.image_encoder))
            if source:
                self.images.remember(source, prepared, prompt.text)
            prompts.append(prompt)
        return prompts, time.perf_counter() - t0

    def prompt_ids(self, prompt: str, images: list[ImagePrompt] = ()) -> list[int]:
        """Token ids of a raw prompt (not a chat) with its images placed as the model's processor
        places them (images.py place_images)."""
        text, special = place_images(self.config.vision, prompt, len(images), self.codec.image_marker,
                                     self.codec.settings.get("bos_token"), str(self.path / "runtime" / "runtime_config.json"))
        return self.encode(text, images, special)

    def encode(self, text: str, images: list[ImagePrompt] = (), special: bool = True) -> list[int]:
        """Token ids of text whose image markers (one per image, as the chat template or the prompt
        placed them) stand for `images`: each marker becomes its image's text, as the model's
        processor writes it, before tokenization; then each image token in the ids becomes that
        tile's rows."""
        marker = self.codec.image_marker
        if marker is None:
            return self.codec.encode(text, special)
        pieces = text.split(marker)
        if len(pieces) - 1 != len(images):
            raise EdgeLLMError(f"the prompt has {len(pieces) - 1} image markers ({marker}) for {len(images)} images")
        text = pieces[0] + "".join(image.text + rest for image, rest in zip(images, pieces[1:]))
        ids = self.codec.encode(text, special)
        tiles = [tile for image in images for tile in image.tiles]
        token = self.config.vision.image_token_id
        if ids.count(token) != len(tiles):  # each tile's image token must come out as that one token
            raise EdgeLLMError(f"{self.path}: the tokenizer does not read the image markers of {self.config.family} "
                               f"as its special tokens")
        rows = iter(tiles)
        return [row for t in ids for row in (next(rows) if t == token else [t])]

    def session(self) -> Session:
        """A new conversation: its own KV cache; the weights are shared."""
        return Session(self)

    @property
    def default_session(self) -> Session:
        if self._default is None:
            self._default = self.session()
        return self._default

    def close(self) -> None:
        """Free the weights and every session's cache; later use raises EdgeLLMError."""
        self.engine.close()

    def drafter(self, draft=None, lookup: int | None = None, threads: int | None = None) -> Drafter | None:
        """The drafter for speculative decoding: another build (a path or a loaded Model) with this
        model's vocabulary, or n-gram prompt lookup of size `lookup`."""
        if draft is not None and lookup is not None:
            raise EdgeLLMError("--draft and --lookup: choose one drafter")
        if lookup is not None:
            return PromptLookup(lookup)
        if draft is None:
            return None
        loaded = not isinstance(draft, Model)
        if loaded:
            try:
                draft = Model.load(draft, threads=threads)
            except EdgeLLMError as e:
                raise EdgeLLMError(f"--draft: {e}") from None
        try:
            return DraftModel(draft, self.tokenizer.get_vocab(), self.engine.spec.vocab_size, str(draft.path))
        except EdgeLLMError:
            if loaded:  # only what was loaded here; a Model the caller passed stays theirs
                draft.close()
            raise

    # the default session's conversation
    def reset(self) -> None:
        self.default_session.reset()

    def set_adapter(self, name: str | None, scale: float = 1.0) -> None:
        """The default session answers with LoRA adapter `name` ("none": the base) from now on."""
        self.default_session.set_adapter(name, scale)

    def generate(self, prompt: str, chat: bool = False, draft=None, lookup: int | None = None, adapter=None,
                 **kw) -> Generation:
        """adapter: switch the default session to this LoRA adapter first (a name, "none", or
        (name, scale)); it stays chosen for later calls."""
        self._choose(adapter)
        return self._speculating(self.default_session.generate, draft, lookup, prompt, chat=chat, **kw)

    def chat(self, message: str, draft=None, lookup: int | None = None, adapter=None, **kw) -> Generation:
        self._choose(adapter)
        return self._speculating(self.default_session.chat, draft, lookup, message, **kw)

    def generate_ids(self, prompt_ids: list[int], draft=None, lookup: int | None = None, adapter=None,
                     **kw) -> Generation:
        self._choose(adapter)
        return self._speculating(self.default_session.generate_ids, draft, lookup, prompt_ids, **kw)

    def _choose(self, adapter) -> None:
        if adapter is not None:
            self.set_adapter(*((adapter,) if isinstance(adapter, str) else adapter))

    def _speculating(self, method, draft, lookup, *args, **kw) -> Generation:
        """Run method with a drafter made for this call from draft / lookup (one already made
        can be passed as drafter=)."""
        own = self.drafter(draft, lookup) if "drafter" not in kw else None
        if own is not None:
            kw["drafter"] = own
        try:
            return method(*args, **kw)
        finally:
            if own is not None and not isinstance(draft, Model):
                own.close()
