"""Safe decoding of shard samples: only image bytes and an integer label are ever interpreted.

Nothing here unpickles: members such as ``.pyd``/``.pickle`` are never read, so an untrusted shard cannot
run code. JPEGs go through simplejpeg (libjpeg-turbo, with DCT-domain downscaling); anything it refuses
(PNG named .jpg, CMYK, ...) falls back to Pillow, and every image comes out as RGB.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:  # optional accelerator; Pillow alone is correct, only slower
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only where simplejpeg is missing
    simplejpeg = None

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"


class CorruptSampleError(ValueError):
    """A sample that cannot be used; the message names the shard and the key."""


def _is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header alone, without decoding pixels."""
    if simplejpeg is not None and _is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return height, width
        except ValueError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except Exception as exn:  # Pillow raises many types for bad data
        raise ValueError(f"undecodable image header ({type(exn).__name__}: {exn})") from exn


def decode_rgb(data: bytes, min_height: int = 0, min_width: int = 0, fast: bool = False) -> np.ndarray:
    """Decode to an HxWx3 uint8 RGB array, at least ``min_height`` x ``min_width`` when downscaling.

    For JPEGs the decoder may return a power-of-two downscaled image (DCT scaling), which is much cheaper
    than decoding full size and resizing; callers map their crop boxes through the returned shape.
    """
    if simplejpeg is not None and _is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg(
                data,
                colorspace="RGB",
                fastdct=fast,
                fastupsample=fast,
                min_height=min_height,
                min_width=min_width,
            )
        except ValueError:
            pass  # CMYK, progressive oddities, PNG-as-JPEG...: let Pillow try
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and (min_height or min_width):
                img.draft("RGB", (max(min_width, 1), max(min_height, 1)))
            return np.array(img.convert("RGB"))  # a writable copy (torch warns on read-only arrays)
    except Exception as exn:  # Pillow raises many types for bad data
        raise ValueError(f"undecodable image ({type(exn).__name__}: {exn})") from exn


def parse_label(data: bytes | None, num_classes: int | None = None) -> int:
    """The ``cls`` member: a non-negative ASCII integer (never pickled data), below ``num_classes``."""
    if data is None:
        raise ValueError("missing 'cls' member")
    text = data.decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise ValueError(f"'cls' is not a non-negative integer: {text[:20]!r}")
    label = int(text)
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"label {label} out of range for {num_classes} classes")
    return label


def find_image(sample: dict) -> bytes | None:
    """The sample's image bytes under the first known image extension."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None
