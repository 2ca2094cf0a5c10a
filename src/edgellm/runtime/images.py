"""Images in, encoder input out: the model's Hugging Face image processor, redone with Pillow and
numpy (no torch, no transformers at run time), and the image encoder that turns the pixels into
the rows spliced into the prompt.

    prepared = preprocess(load_image(path), processing)   tiles [C, H, W] float32, as the HF processor
    rows = ImageEncoder(...).encode_pixels(tile)          [image_tokens, hidden] float32 per tile
"""

from __future__ import annotations

import hashlib
import io
import math
import platform
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.vision import RESAMPLE, ImageProcessing, VisionConfig
from ..errors import EdgeLLMError

# Above this many pixels an image is refused before it is decoded (Pillow's own guard against
# decompression bombs warns at 89 M and fails at twice that; 64 M is an 8K x 8K photo).
MAX_PIXELS = 64_000_000
MAX_SIDE = 4096  # the Idefics3 processor's bound on a resized image's longer side
_FILTERS = {name: number for number, name in RESAMPLE.items()}  # PIL's numbers, by the names configs keep


def load_image(source, where: str | None = None):
    """A path, bytes or a PIL image -> an RGB PIL image. Not an image, a truncated file or one above
    MAX_PIXELS: EdgeLLMError naming it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    where = where or (str(source) if isinstance(source, (str, Path)) else "the image")
    try:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    except OSError as e:
        raise EdgeLLMError(f"{where}: cannot read the image ({e.strerror})") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise EdgeLLMError(f"{where}: {image.width}x{image.height} pixels is more than the "
                                   f"{MAX_PIXELS // 1_000_000} million edgellm accepts")
            return image.convert("RGB")  # decodes the whole image: a truncated file fails here
    except UnidentifiedImageError:
        raise EdgeLLMError(f"{where}: not an image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise EdgeLLMError(f"{where}: the image cannot be decoded ({e})") from None


def image_bytes(source) -> tuple[bytes | None, str | None]:
    """A path's or bytes' content and its sha256 (the image store's key for a file); (None, None)
    for a PIL image, which has no file."""
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise EdgeLLMError(f"{source}: cannot read the image ({e.strerror})") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        return None, None
    return data, hashlib.sha256(data).hexdigest()


@dataclass
class ImagePrompt:
    """One image in a prompt: its text (image_text) and each tile's row ids (ImageStore)."""
    text: str
    tiles: list[list[int]]


@dataclass
class Prepared:
    """An image as the encoder takes it: one or more tiles ([C, H, W] float32 each, in the order
    the prompt lists them) and the grid the tiles were cut in (0 x 0: not cut)."""
    tiles: list[np.ndarray]
    rows: int = 0
    cols: int = 0

    def key(self) -> str:
        h = hashlib.sha256()
        for tile in self.tiles:
            h.update(tile.tobytes())
        return h.hexdigest()


def preprocess(image, p: ImageProcessing) -> Prepared:
    """The pixel values the model's image processor computes (see ImageProcessing), resizing the
    8-bit image with the processor's filter and size arithmetic, then rescaling and normalizing
    each tile."""
    if p.kind == "crop":
        frames, rows, cols = [_resize_and_crop(image, p)], 0, 0
    elif p.kind == "resize":
        frames, rows, cols = [_resized(image, p.width, p.height, p)], 0, 0
    else:
        frames, rows, cols = _tiles(image, p)
    mean, std = np.array(p.mean).reshape(-1, 1, 1), np.array(p.std).reshape(-1, 1, 1)
    tiles = [((np.asarray(f, dtype=np.float64).transpose(2, 0, 1) * p.rescale_factor - mean) / std).astype(np.float32)
             for f in frames]
    return Prepared(tiles, rows, cols)


def _resized(image, width: int, height: int, p: ImageProcessing):
    from PIL import Image

    return image.resize((width, height), resample=Image.Resampling(_FILTERS[p.resample]))


def _resize_and_crop(image, p: ImageProcessing):
    """CLIP: the shorter side to resize_edge (the longer one scaled, truncated), a center crop."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(p.resize_edge * long / short)
    image = _resized(image, *((p.resize_edge, new_long) if w <= h else (new_long, p.resize_edge)), p)
    w, h = image.size
    if w < p.width or h < p.height:  # (only for a crop larger than the resize; not in any known model)
        raise EdgeLLMError(f"image resized to {w}x{h} is smaller than the {p.width}x{p.height} crop")
    top, left = (h - p.height) // 2, (w - p.width) // 2
    return image.crop((left, top, left + p.width, top + p.height))


def _tiles(image, p: ImageProcessing):
    """Idefics3 / SmolVLM: the longer side to resize_edge (the shorter one scaled, made even), then
    both up to whole tiles; the tiles row by row, then the whole image at one tile's size."""
    w, h = image.size
    aspect = w / h
    if w >= h:
        w, h = p.resize_edge, int(p.resize_edge / aspect)
        h += h % 2
    else:
        w, h = int(p.resize_edge * aspect), p.resize_edge
        w += w % 2
    w, h = max(w, 1), max(h, 1)
    if max(w, h) > MAX_SIDE:  # (the processor's 4k bound; resize_edge above it is not in any known model)
        w, h = (MAX_SIDE, max(int(MAX_SIDE / (w / h)), 1)) if w >= h else (max(int(MAX_SIDE * (w / h)), 1), MAX_SIDE)
    image = _resized(image, w, h, p)
    tile = p.width
    if not p.split:
        return [_resized(image, tile, tile, p)], 0, 0
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    image = _resized(image, w, h, p)
    if w <= tile and h <= tile:
        return [image], 0, 0
    rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
    frames = [image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return frames + [_resized(image, tile, tile, p)], rows, cols


def image_text(vision: VisionConfig, image: Prepared, tokenizer) -> str:
    """The text one image becomes in the prompt before tokenization, as the model's processor
    writes it, with the image token once per tile (each later replaced by that tile's rows):
    the token alone (LLaVA); Idefics3 / SmolVLM's markers: per tile
    <fake_token_around_image><row_R_col_C>, a newline after each row of tiles, then the global view
    between <fake_token_around_image><global-img> and <fake_token_around_image>; Gemma 3's
    "\n\n<start_of_image>" ... "<end_of_image>\n\n"."""
    token = tokenizer.id_to_token(vision.image_token_id)
    if vision.prompt in ("repeat", "paligemma", "qwen2_vl"):
        return token * len(image.tiles)
    if vision.prompt == "gemma3":
        return f"\n\n{tokenizer.id_to_token(vision.marker)}{token}<end_of_image>\n\n"
    around = "<fake_token_around_image>"
    if image.rows == 0:
        return f"{around}<global-img>{token}{around}"
    grid = "\n".join("".join(f"{around}<row_{r + 1}_col_{c + 1}>{token}" for c in range(image.cols))
                     for r in range(image.rows))
    return f"{grid}\n\n{around}<global-img>{token}{around}"


def place_images(vision: VisionConfig | None, prompt: str, count: int, marker: str | None,
                 bos: str | None, where: str) -> tuple[str, bool]:
    """A raw prompt (not a chat) laid out for `count` images as the model's processor lays it
    out, and whether the tokenizer is to add its special tokens: images where the prompt has
    markers, else one marker per image on a line of its own before it; PaliGemma's: the markers
    (before the prompt where it has none), <bos> after the last, a newline at the end, and no
    special tokens added (the <bos> is in the text). Qwen2-VL's markers go between
    <|vision_start|> and <|vision_end|>. where: the file that names the tokenizer's bos_token."""
    if vision is None or vision.prompt != "paligemma":
        if count and marker not in prompt:
            # (Qwen2-VL's processor leaves the marker's frame to the prompt, as its chat template writes it)
            framed = f"<|vision_start|>{marker}<|vision_end|>" if vision and vision.prompt == "qwen2_vl" else marker
            prompt = f"{framed}\n" * count + prompt
        return prompt, True
    if bos is None:
        raise EdgeLLMError(f"{where}: a PaliGemma prompt starts with <bos> after its images, and this build's "
                           "tokenizer names no bos_token (the model's tokenizer_config.json had none)")
    if count and marker not in prompt:
        prompt = marker * count + prompt
    last = prompt.rfind(marker)
    after = last + len(marker) if last >= 0 else 0
    return prompt[:after] + bos + prompt[after:] + "\n", False


def patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[C, H, W] -> [H/p * W/p, C*p*p]: patches in row order, each flattened (channel, row,
    column) like the patch convolution's weights (graph/vision.py)."""
    c, h, w = pixels.shape
    grid = pixels.reshape(c, h // patch, patch, w // patch, patch).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(grid.reshape((h // patch) * (w // patch), c * patch * patch))


def integer_products_saturate() -> bool:
    """Whether this CPU's uint8 x int8 dot products can saturate: x86-64 without VNNI, where
    MLAS pairs products in 16 bits. An image encoder's int8 weights run that way
    (targets/ort_lowering.py lower_per_channel_matmuls), so there its session asks ONNX Runtime
    to widen them (session.x64quantprecision). Not everywhere: on this project's VNNI machine the
    option made an encoder pass 1.6x slower for no change in its result."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell: be exact rather than fast
    return re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) is None


class ImageEncoder:
    """Pixels -> the image's prompt rows, by the build's encoder program: compiled/vision/encoder.onnx
    in ONNX Runtime (target cpu), or the C targets' library (em_encode; runtime/native.py)."""

    def __init__(self, vision: VisionConfig, run):
        self.vision = vision
        self.run = run  # [patches, values per patch] float32 -> [image tokens, hidden]

    @classmethod
    def onnx(cls, program_dir: Path, vision: VisionConfig, threads: int | None = None) -> "ImageEncoder":
        import onnxruntime as ort

        from .engine import physical_cores
        from .ort import open_program

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        if integer_products_saturate():
            opts.add_session_config_entry("session.x64quantprecision", "1")
        path = Path(program_dir) / "encoder.onnx"
        if not path.is_file():
            raise EdgeLLMError(f"{path}: missing; the build has no image encoder (compile it again)")
        program = open_program(path, opts)
        return cls(vision, lambda rows: program.run(["image_features"], {"pixel_patches": rows[None]})[0][0])

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        v = self.vision
        expected = (v.num_channels, v.processing.height, v.processing.width)
        if pixels.shape != expected:
            raise EdgeLLMError(f"image pixels of shape {pixels.shape}, the encoder takes {expected}")
        return self.run(patches(np.asarray(pixels, np.float32), v.patch_size))


class ImageStore:
    """The images a loaded model has seen, as prompt rows: each distinct image (by its pixels)
    gets image_tokens negative ids per tile, unique in the model, and their embedding vectors (the
    encoder's output). Negative ids make the engine take the vector instead of a table row, and
    let the prompt cache treat an image like tokens: the same image again is the same ids, in any
    session. The least recently used images go beyond `limit_bytes` of vectors; their ids are
    never given out again. An image file seen before (the same bytes) is found by a hash of its
    bytes, without being decoded and preprocessed again (`known`)."""

    SOURCES = 4096  # file hashes remembered (each names an image that may since have left)

    def __init__(self, limit_bytes: int = 256 << 20):
        self.limit_bytes = limit_bytes
        self.by_pixels: OrderedDict[str, list[list[int]]] = OrderedDict()
        # sha256 of an image file's bytes -> (its pixels' key, its prompt text)
        self.by_source: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.vectors: dict[int, np.ndarray] = {}
        self._next = 1
        self._lock = threading.Lock()  # the server encodes in its request handlers

    def clear(self) -> None:
        """Forget every image (their ids are not given out again)."""
        with self._lock:
            self.by_pixels.clear()
            self.by_source.clear()
            self.vectors.clear()

    def known(self, source: str) -> ImagePrompt | None:
        """The prompt of the image file whose bytes hash to `source`, if its rows are still here."""
        with self._lock:
            found = self.by_source.get(source)
            if found is None or found[0] not in self.by_pixels:
                return None
            self.by_source.move_to_end(source)
            self.by_pixels.move_to_end(found[0])
            return ImagePrompt(found[1], self.by_pixels[found[0]])

    def remember(self, source: str, image: "Prepared", text: str) -> None:
        """The file whose bytes hash to `source` is `image`, whose prompt text is `text`."""
        with self._lock:
            self.by_source[source] = (image.key(), text)
            while len(self.by_source) > self.SOURCES:
                self.by_source.popitem(last=False)

    def rows(self, image: Prepared, encoder) -> list[list[int]]:
        """A prepared image's ids, per tile; encoded the first time it is seen."""
        key = image.key()
        with self._lock:
            if key in self.by_pixels:
                self.by_pixels.move_to_end(key)
                return self.by_pixels[key]
        tiles = [encoder.encode_pixels(tile) for tile in image.tiles]  # (unlocked: seconds of work)
        with self._lock:
            if key in self.by_pixels:  # another request encoded the same image meanwhile: one set of ids
                self.by_pixels.move_to_end(key)
                return self.by_pixels[key]
            ids = []
            for features in tiles:
                ids.append(list(range(-self._next, -self._next - len(features), -1)))
                self._next += len(features)
                self.vectors.update(zip(ids[-1], features))
            self.by_pixels[key] = ids
            row_bytes = tiles[0].nbytes // len(tiles[0])
            while len(self.by_pixels) > 1 and len(self.vectors) * row_bytes > self.limit_bytes:
                _, dropped = self.by_pixels.popitem(last=False)
                for tile in dropped:
                    for row in tile:
                        self.vectors.pop(row, None)
        return ids

    def embeddings(self, ids: list[int]) -> np.ndarray | None:
        """[len(ids), hidden] for a call whose rows include image rows (zeros for the tokens); None without."""
        if min(ids) >= 0:
            return None
        with self._lock:
            rows = {token: self.vectors.get(token) for token in ids if token < 0}
        if any(v is None for v in rows.values()):
            raise EdgeLLMError(f"an image's rows left the image store before its prompt ran (more than "
                               f"{self.limit_bytes >> 20} MB of other images came in between); try again")
        width = len(next(iter(rows.values())))
        out = np.zeros((len(ids), width), np.float32)
        for i, token in enumerate(ids):
            if token < 0:
                out[i] = rows[token]
        return out
