"""Write ImageNet-style webdataset shards (``key.jpg`` + ``key.cls``) from image folders.

Layouts: an ImageFolder / the ImageNet train tree (``root/<class or synset>/<image>``), or a flat folder
(ImageNet val) with a labels file of ``<file name> <synset>`` lines or Kaggle's ``LOC_val_solution.csv``.
Original JPEG bytes are stored unless ``--resize`` asks for pre-resized shards (short side, re-encoded).
Class indices follow sorted class names (synset ids) and are saved as ``classes.json`` beside the shards;
``<prefix>-info.json`` records per-shard sample counts (read by :class:`ImageNetShards`) and skipped files.

    python -m lightning_firecaffe.data.shard_writer SRC OUT --prefix imagenet-train --shard-size 1000
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as is; others become JPEG
SOURCE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm"}


@dataclass
class Summary:
    images: int = 0
    shards: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def __str__(self) -> str:
        lines = [f"{self.images} images in {self.shards} shards, {self.bytes / 1e6:.1f} MB"]
        lines += [f"skipped {len(self.skipped)} files"] + [f"  {f}: {r}" for f, r in self.skipped]
        return "\n".join(lines)


def scan_image_folder(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(sorted class names, [(path, class name)]) from ``root/<class>/**/<image>``."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root}: no class sub-directories (ImageFolder layout expected)")
    items = []
    for name in classes:
        for folder, _, files in sorted(os.walk(os.path.join(root, name))):
            items += [(os.path.join(folder, f), name) for f in sorted(files) if _is_image_name(f)]
    return classes, items


def scan_labelled_folder(root: str, labels_file: str) -> list[tuple[str, str]]:
    """[(path, synset)] for a flat folder and a labels file (``name synset`` lines or LOC_val_solution.csv)."""
    labels: dict[str, str] = {}
    with open(labels_file, newline="") as f:
        if labels_file.endswith(".csv"):
            for row in csv.DictReader(f):
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
        else:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{labels_file}:{n}: expected '<file> <class>', got {line.strip()!r}")
                labels[os.path.splitext(parts[0])[0]] = parts[1]
    items = []
    for name in sorted(os.listdir(root)):
        if _is_image_name(name):
            stem = os.path.splitext(name)[0]
            items.append((os.path.join(root, name), labels.get(stem)))
    return items


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in SOURCE_EXTENSIONS


def _key(path: str, taken: set) -> str:
    """webdataset keys end at the first dot; keep file stems, prefixed by their folder if one repeats."""
    stem = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
    if stem in taken:
        stem = f"{os.path.basename(os.path.dirname(path))}_{stem}".replace(".", "_")
    if stem in taken:
        raise ValueError(f"duplicate key {stem!r} from {path}")
    taken.add(stem)
    return stem


def encode_image(path: str, resize: int | None, quality: int) -> tuple[bytes, str]:
    """(bytes, extension): the original JPEG bytes, or an RGB JPEG re-encode when resizing/converting."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        img.verify()  # cheap structural check; full decode happens at training time
    with Image.open(io.BytesIO(data)) as img:
        if (resize is None or min(img.size) <= resize) and img.format in KEPT_FORMATS:
            return data, KEPT_FORMATS[img.format]
        return _reencode(img, resize, quality)


def _reencode(img: Image.Image, resize: int | None, quality: int) -> tuple[bytes, str]:
    if resize is not None and min(img.size) > resize:
        scale = resize / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.draft("RGB", size)
        img = img.convert("RGB").resize(size, Image.LANCZOS)
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue(), "jpg"


def write_shard(job) -> tuple[str, int, int, list]:
    """Write one shard; returns (file name, samples, bytes, skipped)."""
    import webdataset as wds

    path, items, resize, quality, mtime = job
    written, skipped = 0, []
    with wds.TarWriter(path, mtime=mtime) as sink:
        for src, key, label in items:
            try:
                data, ext = encode_image(src, resize, quality)
            except Exception as exn:  # any unreadable file is reported, not fatal
                skipped.append((src, f"{type(exn).__name__}: {exn}"))
                continue
            sink.write({"__key__": key, ext: data, "cls": str(label).encode()})
            written += 1
    return os.path.basename(path), written, os.path.getsize(path), skipped


def write_shards(
    source: str,
    out_dir: str,
    *,
    prefix: str = "imagenet-train",
    shard_size: int = 1000,
    labels_file: str | None = None,
    class_map: str | None = None,
    resize: int | None = None,
    quality: int = 90,
    shuffle: bool = True,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    mtime: float | None = None,
) -> Summary:
    """Write ``out_dir/<prefix>-NNNNNN.tar`` shards, ``classes.json`` and ``<prefix>-info.json``.

    ``mtime``: the time stamp of every tar member (None: now); fixed, the same inputs give the same bytes."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    summary = Summary()
    if labels_file is None:
        classes, items = scan_image_folder(source)
    else:
        items = scan_labelled_folder(source, labels_file)
        summary.skipped += [(p, "no label in labels file") for p, c in items if c is None]
        items = [(p, c) for p, c in items if c is not None]
        classes = sorted({c for _, c in items})
    if class_map is not None:  # e.g. val shards must use the train shards' indices
        with open(class_map) as f:
            classes = json.load(f)["classes"]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for _, c in items if c not in index})
    if unknown:
        raise ValueError(f"classes missing from the class map: {unknown[:5]}")
    if not items:
        raise ValueError(f"{source}: no images found")
    if shuffle:  # class-sorted folders would otherwise make class-pure shards
        random.Random(seed).shuffle(items)
    taken: set = set()
    keyed = [(p, _key(p, taken), index[c]) for p, c in items]
    jobs = [
        (
            os.path.join(out_dir, f"{prefix}-{i // shard_size:06d}.tar"),
            keyed[i : i + shard_size],
            resize,
            quality,
            mtime,
        )
        for i in range(0, len(keyed), shard_size)
    ]
    counts = {}
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for name, n, size, skipped in tqdm(
            pool.map(write_shard, jobs), total=len(jobs), disable=not progress, desc=f"writing {prefix}", unit="shard"
        ):
            counts[name] = n
            summary.images += n
            summary.shards += 1
            summary.bytes += size
            summary.skipped += skipped
    with open(os.path.join(out_dir, "classes.json"), "w") as f:
        json.dump({"classes": classes}, f, indent=1)
    with open(os.path.join(out_dir, f"{prefix}-info.json"), "w") as f:
        json.dump(
            {"samples": summary.images, "num_classes": len(classes), "shards": counts, "skipped": summary.skipped},
            f,
            indent=1,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="firecaffe-make-shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="ImageFolder/ImageNet train root, or a flat folder with --labels")
    parser.add_argument("out_dir")
    parser.add_argument("--prefix", default="imagenet-train")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--labels", help="labels file for a flat folder ('<file> <synset>' lines or .csv)")
    parser.add_argument("--class-map", help="classes.json to reuse (e.g. the train shards' for val)")
    parser.add_argument("--resize", type=int, help="pre-resize: short side in pixels (e.g. 256 or 320)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--no-shuffle", action="store_true", help="keep sorted file order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        summary = write_shards(
            args.source,
            args.out_dir,
            prefix=args.prefix,
            shard_size=args.shard_size,
            labels_file=args.labels,
            class_map=args.class_map,
            resize=args.resize,
            quality=args.quality,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            workers=args.workers,
        )
    except (ValueError, OSError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
