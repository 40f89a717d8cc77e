"""Training input pipeline throughput in images/s per core (decode + augment + collate via ImageNetShards).

Generates ImageNet-sized JPEGs (500x375, ~100 kB, from scikit-image's photos plus sensor-like noise) and a
pre-resized copy (short side 256), then times, on one core (one thread, no DataLoader workers):
  ours      ImageNetShards train pipeline (simplejpeg + DCT-scaled decode + torch uint8 antialiased resize)
  ours/fast the same with libjpeg-turbo's fast DCT and upsampling (``fast_decode=True``)
  pillow    the same stream with plain Pillow: decode, RandomResizedCrop by ``resize(box=...)``, flip
  decode    simplejpeg full-size decode alone (the floor for ImageNet-sized JPEGs)

    python benchmarks/input_pipeline.py [--images 400] [--repeats 3] [--size 224]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    import skimage.data

    photos = [
        getattr(skimage.data, name)()
        for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch = int(min(h, w * 0.75) * rng.uniform(0.6, 1.0))
        cw = ch * 4 // 3
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(photo[top : top + ch, left : left + cw])
        img = img.resize((500, 375), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.normal(0, 14, (375, 500, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def resized(jpegs: list[bytes], short: int = 256) -> list[bytes]:
    out = []
    for data in jpegs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        scale = short / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(jpegs: list[bytes], folder: str, prefix: str, per_shard: int = 200) -> str:
    import webdataset as wds

    n_shards = (len(jpegs) + per_shard - 1) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(folder, f"{prefix}-{s:06d}.tar")) as sink:
            for i, data in enumerate(jpegs[s * per_shard : (s + 1) * per_shard]):
                sink.write({"__key__": f"{prefix}{s}_{i:05d}", "jpg": data, "cls": str(i % 1000).encode()})
    return os.path.join(folder, f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


class PillowTrainTransform:
    """Plain Pillow baseline: decode, RandomResizedCrop through ``resize(box=...)``, flip, to uint8 tensor."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        from lightning_firecaffe.data.transforms import random_resized_crop_box

        img = Image.open(io.BytesIO(data)).convert("RGB")
        top, left, h, w = random_resized_crop_box(img.height, img.width, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def time_pipeline(pattern: str, n_images: int, size: int, batch: int, transform=None, fast: bool = False) -> float:
    from lightning_firecaffe.data import ImageNetShards

    dm = ImageNetShards(
        train_shards=pattern,
        batch_size=batch,
        num_workers=0,
        image_size=size,
        train_samples=n_images,
        num_classes=1000,
        fast_decode=fast,
        shuffle_buffer=100,
    )
    loader = dm.train_dataloader()
    if transform is not None:
        loader.stream.transform = transform
    it = iter(loader)
    next(it)  # warm-up: file cache, first allocations
    start, seen = time.perf_counter(), 0
    for images, _ in it:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def time_decode(jpegs: list[bytes]) -> float:
    import simplejpeg

    start = time.perf_counter()
    for data in jpegs:
        simplejpeg.decode_jpeg(data, colorspace="RGB")
    return len(jpegs) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per core
    jpegs = make_jpegs(args.images)
    small = resized(jpegs)
    print(
        f"{len(jpegs)} JPEGs: ImageNet-sized 500x375 mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB, "
        f"pre-resized 341x256 mean {np.mean([len(j) for j in small]) / 1e3:.0f} kB; one thread, no workers"
    )
    with tempfile.TemporaryDirectory() as folder:
        sets = {
            "ImageNet-sized": write_shards(jpegs, folder, "full"),
            "pre-resized 256": write_shards(small, folder, "small"),
        }
        print(f"{'images/s per core':<22}{'ours':>8}{'ours/fast':>11}{'pillow':>9}{'ratio':>7}{'decode':>8}")
        for name, pattern in sets.items():
            best = {}
            for _ in range(args.repeats):  # interleaved repeats, best of: shared machines are noisy
                runs = {
                    "ours": lambda pattern=pattern: time_pipeline(pattern, args.images, args.size, args.batch),
                    "fast": lambda pattern=pattern: time_pipeline(
                        pattern, args.images, args.size, args.batch, fast=True
                    ),
                    "pillow": lambda pattern=pattern: time_pipeline(
                        pattern, args.images, args.size, args.batch, transform=PillowTrainTransform(args.size)
                    ),
                    "decode": lambda name=name: time_decode(jpegs if name == "ImageNet-sized" else small),
                }
                for key, run in runs.items():
                    best[key] = max(best.get(key, 0.0), run())
            print(
                f"{name:<22}{best['ours']:>8.0f}{best['fast']:>11.0f}{best['pillow']:>9.0f}"
                f"{best['ours'] / best['pillow']:>6.2f}x{best['decode']:>8.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
