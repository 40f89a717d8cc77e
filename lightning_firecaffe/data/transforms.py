"""Image transforms in plain torch (no torchvision): crop boxes are chosen on the JPEG header, the image is
decoded at the smallest power-of-two DCT scale that still covers the output, then cropped and resized with
torch's uint8 antialiased bilinear kernel. Outputs are uint8 CHW tensors; normalisation happens later,
ideally on the device (see :func:`normalize`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .decoding import decode_rgb, image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # top, left, height, width in original pixels


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def random_resized_crop_box(height: int, width: int, scale, ratio, rng: random.Random) -> Box:
    """The RandomResizedCrop box (torchvision's algorithm: 10 tries, then a centre crop of clamped ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, crop_fraction: float) -> Box:
    """Resize-short-side-then-centre-crop expressed as one box in original pixels."""
    side = max(1, int(round(min(height, width) * crop_fraction)))
    return (height - side) // 2, (width - side) // 2, side, side


def _dct_scale(height: int, width: int, box: Box, out: tuple[int, int]) -> tuple[int, int]:
    """Minimum decoded (height, width) at the smallest power-of-two scale whose crop still covers ``out``."""
    _, _, bh, bw = box
    factor = 1
    while factor < 8 and bh // (factor * 2) >= out[0] and bw // (factor * 2) >= out[1]:
        factor *= 2
    if factor == 1:
        return 0, 0
    return math.ceil(height / factor), math.ceil(width / factor)


def decode_crop_resize(data: bytes, box_fn, out: tuple[int, int], fast: bool = False) -> torch.Tensor:
    """Decode ``data``, crop the box that ``box_fn(height, width)`` picks, resize to ``out``; uint8 CHW."""
    height, width = image_size(data)
    box = box_fn(height, width)
    min_h, min_w = _dct_scale(height, width, box, out)
    img = decode_rgb(data, min_h, min_w, fast=fast)
    sy, sx = img.shape[0] / height, img.shape[1] / width
    top, left, bh, bw = box
    t, l = int(top * sy), int(left * sx)
    h, w = max(1, min(img.shape[0] - t, round(bh * sy))), max(1, min(img.shape[1] - l, round(bw * sx)))
    crop = torch.from_numpy(np.asarray(img[t : t + h, l : l + w])).permute(2, 0, 1).unsqueeze(0)
    if (h, w) != out:  # channels-last uint8 input takes torch's fast AVX2 path
        crop = F.interpolate(crop, size=out, mode="bilinear", antialias=True, align_corners=False)
    return crop[0]  # channels-last strides; the batch stack makes it contiguous


@dataclass
class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip, from encoded bytes to uint8 CHW."""

    size: int | tuple[int, int] = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    fast_decode: bool = False

    def __post_init__(self):
        if not (0 < self.scale[0] <= self.scale[1] <= 1) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"bad RandomResizedCrop scale {self.scale} or ratio {self.ratio}")

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        out = _pair(self.size)
        img = decode_crop_resize(
            data, lambda h, w: random_resized_crop_box(h, w, self.scale, self.ratio, rng), out, self.fast_decode
        )
        if rng.random() < self.hflip:
            img = img.flip(-1)
        return img


@dataclass
class EvalTransform:
    """Resize the short side to ``resize`` and take the centre ``size`` crop (ImageNet's 256 -> 224)."""

    size: int = 224
    resize: int = 256
    fast_decode: bool = False

    def __post_init__(self):
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be >= crop size ({self.size})")

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        fraction = self.size / self.resize
        return decode_crop_resize(
            data, lambda h, w: center_crop_box(h, w, fraction), _pair(self.size), self.fast_decode
        )


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (or [0, 1] float) NCHW batch -> float normalised by mean/std; cheap enough to run on the device."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s
