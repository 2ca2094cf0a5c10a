"""Images in, encoder input out: the model's Hugging Face image processor, redone with Pillow and
numpy (no torch, no transformers at run time), and the image encoder that turns the pixels into
the rows spliced into the prompt.

    pixels = preprocess(load_image(path), processing)     [C, H, W] float32, as the HF processor
    rows = ImageEncoder(...).encode(pixels)               [image_tokens, hidden] float32
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..config.vision import ImageProcessing, VisionConfig
from ..errors import EdgeLLMError

# Above this many pixels an image is refused before it is decoded (Pillow's own guard against
# decompression bombs warns at 89 M and fails at twice that; 64 M is an 8K x 8K photo).
MAX_PIXELS = 64_000_000
_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


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


def preprocess(image, p: ImageProcessing) -> np.ndarray:
    """[C, H, W] float32 pixel values as the model's image processor computes them: the shorter
    side resized to resize_shortest_edge (the longer one scaled and truncated) and a center crop,
    or a resize to the encoder's size; then rescale and normalize."""
    from PIL import Image

    if p.resize_shortest_edge is not None:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(p.resize_shortest_edge * long / short)
        size = (p.resize_shortest_edge, new_long) if w <= h else (new_long, p.resize_shortest_edge)
        image = image.resize(size, resample=Image.Resampling(_FILTERS[p.resample]))
        w, h = image.size
        if w < p.width or h < p.height:  # (only for a crop larger than the resize; not in any known model)
            raise EdgeLLMError(f"image resized to {w}x{h} is smaller than the {p.width}x{p.height} crop")
        top, left = (h - p.height) // 2, (w - p.width) // 2
        image = image.crop((left, top, left + p.width, top + p.height))
    else:
        image = image.resize((p.width, p.height), resample=Image.Resampling(_FILTERS[p.resample]))
    pixels = np.asarray(image, dtype=np.float64).transpose(2, 0, 1) * p.rescale_factor
    mean, std = np.array(p.mean).reshape(-1, 1, 1), np.array(p.std).reshape(-1, 1, 1)
    return ((pixels - mean) / std).astype(np.float32)


def patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[C, H, W] -> [H/p * W/p, C*p*p]: patches in row order, each flattened (channel, row,
    column) like the patch convolution's weights (graph/vision.py)."""
    c, h, w = pixels.shape
    grid = pixels.reshape(c, h // patch, patch, w // patch, patch).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(grid.reshape((h // patch) * (w // patch), c * patch * patch))


class ImageEncoder:
    """compiled/vision/encoder.onnx in ONNX Runtime: pixels -> the image's prompt rows."""

    def __init__(self, program_dir: Path, vision: VisionConfig, threads: int | None = None):
        import onnxruntime as ort

        from .engine import physical_cores

        self.vision = vision
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        path = Path(program_dir) / "encoder.onnx"
        if not path.is_file():
            raise EdgeLLMError(f"{path}: missing; the build has no image encoder (compile it again)")
        self.program = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        v = self.vision
        expected = (v.num_channels, v.image_size, v.image_size)
        if pixels.shape != expected:
            raise EdgeLLMError(f"image pixels of shape {pixels.shape}, the encoder takes {expected}")
        (features,) = self.program.run(["image_features"], {"pixel_patches": patches(pixels, v.patch_size)[None]})
        return features[0]

    def encode(self, image) -> np.ndarray:
        return self.encode_pixels(preprocess(load_image(image), self.vision.processing))

