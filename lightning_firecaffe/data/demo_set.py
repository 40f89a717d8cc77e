"""Offline demo set: crops of scikit-image's bundled photographs (CC0/public domain), one photo per class,
written as ImageNet-format shards into a cache directory on first use. No download.

``demo-v2`` (10 classes, 10,240 train / 1,000 val crops) is big enough for large batches: 16x the demo's
reference batch of 32 (512) still takes 20 optimizer steps per epoch. The bytes depend only on the version
and the arguments (seeded crops, fixed tar time stamps), so every machine builds the same shards.

Training crops are centred in the left 70% of each photo, validation crops in the held-out right 30%
(they may overlap the training area at the border), so validation measures recognising a photo from parts
not seen in training. Three photos are grayscale, which exercises the RGB conversion path.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "gravel",
)
VERSION = "demo-v2"
TAR_MTIME = 1_700_000_000  # fixed member time stamps: the shards' bytes do not depend on when they were built
TRAIN_FRACTION = 0.7


def cache_dir() -> str:
    """``$FIRECAFFE_CACHE`` or ``~/.cache/lightning_firecaffe``."""
    return os.environ.get("FIRECAFFE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_firecaffe")


@dataclass(frozen=True)
class DemoSet:
    root: str
    train_shards: str  # brace pattern
    val_shards: str
    classes: tuple[str, ...]
    train_samples: int
    val_samples: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _photo(name: str) -> Image.Image:
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype != np.uint8:
        arr = (arr * 255).astype(np.uint8) if arr.max() <= 1 else arr.astype(np.uint8)
    return Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr)  # grayscale stays grayscale


def _crops(img: Image.Image, n: int, held_out: bool, size: int, rng: random.Random):
    width, height = img.size
    lo, hi = (TRAIN_FRACTION * width, width) if held_out else (0, TRAIN_FRACTION * width)
    for _ in range(n):
        side = int(rng.uniform(0.25, 0.5) * min(width, height))
        cx = rng.uniform(lo, hi)
        left = int(min(max(cx - side / 2, 0), width - side))
        top = rng.randint(0, height - side)
        crop = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
        out = io.BytesIO()
        crop.save(out, "JPEG", quality=90)
        yield out.getvalue()


def _write_folder(root: str, per_class: int, held_out: bool, size: int, seed: int) -> None:
    for name in PHOTOS:
        os.makedirs(os.path.join(root, name))
        rng = random.Random(f"{seed}:{name}:{held_out}")
        for i, data in enumerate(_crops(_photo(name), per_class, held_out, size, rng)):
            with open(os.path.join(root, name, f"{name}_{'val' if held_out else 'train'}_{i:04d}.jpg"), "wb") as f:
                f.write(data)


def build_demo_set(
    root: str | None = None,
    train_per_class: int = 1024,
    val_per_class: int = 100,
    crop_px: int = 96,
    shard_size: int = 100,
    seed: int = 0,
) -> DemoSet:
    """The demo shards under ``root`` (default ``cache_dir()/demo-v2``), built there on first use."""
    from .shard_writer import write_shards

    root = root or os.path.join(cache_dir(), VERSION)
    if not os.path.exists(os.path.join(root, "demo.json")):
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        work = tempfile.mkdtemp(prefix=".building-", dir=parent)  # built aside, renamed when complete
        try:
            out = os.path.join(work, "shards")
            for split, n, held_out in (("train", train_per_class, False), ("val", val_per_class, True)):
                folder = os.path.join(work, split)
                _write_folder(folder, n, held_out, crop_px, seed)
                class_map = os.path.join(out, "classes.json") if held_out else None
                write_shards(
                    folder,
                    out,
                    prefix=f"demo-{split}",
                    shard_size=shard_size,
                    class_map=class_map,
                    seed=seed,
                    workers=1,
                    progress=False,
                    mtime=TAR_MTIME,
                )
            with open(os.path.join(out, "demo.json"), "w") as f:
                json.dump(
                    {
                        "version": VERSION,
                        "classes": PHOTOS,
                        "train": train_per_class * len(PHOTOS),
                        "val": val_per_class * len(PHOTOS),
                    },
                    f,
                )
            try:
                os.rename(out, root)
            except OSError:  # another process finished first
                if not os.path.exists(os.path.join(root, "demo.json")):
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(root, "demo.json")) as f:
        meta = json.load(f)

    def pattern(split: str, n: int) -> str:
        last = (n - 1) // shard_size
        return os.path.join(root, f"demo-{split}-{{000000..{last:06d}}}.tar")

    return DemoSet(
        root,
        pattern("train", meta["train"]),
        pattern("val", meta["val"]),
        tuple(meta["classes"]),
        meta["train"],
        meta["val"],
    )


def demo_datamodule(root: str | None = None, **overrides):
    """An :class:`ImageNetShards` on the demo set, sized for CPU runs: 32 px crops of the 96 px photo crops
    (``image_size=64, val_resize=73`` works too)."""
    from .datamodule import ImageNetShards

    demo = build_demo_set(root)
    kwargs = dict(
        train_shards=demo.train_shards,
        val_shards=demo.val_shards,
        num_classes=demo.num_classes,
        train_samples=demo.train_samples,
        batch_size=32,
        num_workers=1,
        image_size=32,
        val_resize=36,
        train_scale=(0.25, 1.0),
        shuffle_buffer=500,
    )
    kwargs.update(overrides)
    return ImageNetShards(**kwargs)
