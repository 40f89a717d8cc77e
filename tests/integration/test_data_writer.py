"""Shard writer round trip (ImageFolder of 3 classes, flat val folder with labels) and GNU tar shards."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from lightning_firecaffe.data import ImageNetShards, count_samples, write_shards

CLASSES = ["n01440764", "n01443537", "n01484850"]  # sorted synset ids -> 0, 1, 2


def save_image(path, colour, size=(64, 48), fmt="JPEG", mode="RGB"):
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(colour, np.uint8)
    Image.fromarray(arr).convert(mode).save(path, fmt)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "train"
    colours = {c: [(255, 0, 0), (0, 255, 0), (0, 0, 255)][i] for i, c in enumerate(CLASSES)}
    for c in reversed(CLASSES):  # creation order must not matter
        (root / c).mkdir(parents=True)
        for i in range(4 + CLASSES.index(c)):  # 4, 5, 6 images
            save_image(root / c / f"{c}_{i}.JPEG", colours[c], size=(300 + 10 * i, 200))
    save_image(root / CLASSES[0] / "png_as_jpeg.JPEG", (255, 0, 0), fmt="PNG")  # ImageNet has one
    save_image(root / CLASSES[1] / "gray.jpg", (0, 255, 0), mode="L")
    (root / CLASSES[2] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / CLASSES[2] / "notes.txt").write_text("ignored: not an image name")
    return root


def read_all(pattern, **kw):
    dm = ImageNetShards(
        val_shards=pattern,
        batch_size=64,
        num_workers=0,
        image_size=32,
        val_resize=32,
        num_classes=3,
        with_keys=True,
        **kw,
    )
    out = {}
    for images, labels, keys in dm.val_dataloader():
        for img, label, key in zip(images, labels, keys):
            out[key] = (int(label), img)
    return out


@pytest.mark.timeout(180)
def test_image_folder_round_trip(image_folder, tmp_path):
    out = tmp_path / "shards"
    summary = write_shards(str(image_folder), str(out), prefix="train", shard_size=4, workers=2, progress=False)
    assert summary.images == 4 + 5 + 6 + 2 and summary.shards == 5
    assert [os.path.basename(f) for f, _ in summary.skipped] == ["broken.jpg"]
    assert json.loads((out / "classes.json").read_text())["classes"] == CLASSES
    info = json.loads((out / "train-info.json").read_text())
    assert info["samples"] == 17 and sum(info["shards"].values()) == 17 and info["num_classes"] == 3
    assert count_samples([str(p) for p in sorted(out.glob("train-*.tar"))]) == 17

    got = read_all(str(out / "train-{000000..000004}.tar"))
    assert len(got) == 17
    for key, (label, img) in got.items():
        expected = 0 if key == "png_as_jpeg" else 1 if key == "gray" else CLASSES.index(key.split("_")[0])
        assert label == expected, key
        if key != "gray":  # colour identifies the class: pixels really belong to the labelled image
            assert int(img[label].float().mean()) > 200, key
    first = tarfile.open(out / "train-000000.tar")
    shard_classes = {int(first.extractfile(m).read()) for m in first.getmembers() if m.name.endswith(".cls")}
    assert len(shard_classes) > 1, "file order was not shuffled: class-pure shards"
    # original bytes are stored untouched
    name = next(
        m for m in first.getmembers() if m.name.endswith(".jpg") and "gray" not in m.name and "png" not in m.name
    )
    key = name.name[:-4]
    src = image_folder / key.split("_")[0] / f"{key}.JPEG"
    assert first.extractfile(name).read() == src.read_bytes()
    first.close()


@pytest.mark.timeout(180)
def test_cli_resize_and_val_layout(image_folder, tmp_path):
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        "-m",
        "lightning_firecaffe.data.shard_writer",
        str(image_folder),
        str(out),
        "--prefix",
        "train",
        "--shard-size",
        "100",
        "--resize",
        "100",
        "--workers",
        "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "17 images in 1 shards" in res.stdout and "broken.jpg" in res.stdout
    with tarfile.open(out / "train-000000.tar") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".jpg"):
                assert min(Image.open(io.BytesIO(tar.extractfile(m).read())).size) <= 100

    # ImageNet val: a flat folder + ground truth, mapped through the train class map
    val = tmp_path / "val"
    val.mkdir()
    lines = []
    for i, c in enumerate(["n01484850", "n01440764", "n01484850"]):
        save_image(val / f"ILSVRC2012_val_{i:08d}.JPEG", (9, 9, 9))
        lines.append(f"ILSVRC2012_val_{i:08d}.JPEG {c}")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    write_shards(
        str(val),
        str(out),
        prefix="val",
        labels_file=str(tmp_path / "val.txt"),
        class_map=str(out / "classes.json"),
        shuffle=False,
        progress=False,
        workers=1,
    )
    got = read_all(str(out / "val-000000.tar"))
    assert {k: v[0] for k, v in got.items()} == {
        "ILSVRC2012_val_00000000": 2,
        "ILSVRC2012_val_00000001": 0,
        "ILSVRC2012_val_00000002": 2,
    }
    res = subprocess.run(cmd[:3] + [str(tmp_path / "missing"), str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "error:" in res.stderr


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_reads_shards_written_by_gnu_tar(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for i in range(6):
        save_image(files / f"sample{i:03d}.jpg", (0, 0, 255) if i % 2 else (255, 0, 0))
        (files / f"sample{i:03d}.cls").write_text(str(i % 2))
    (files / "sample000.txt").write_text("extra members are ignored")
    shard = tmp_path / "gnu-000000.tar"
    subprocess.run(["tar", "--sort=name", "-cf", str(shard), "-C", str(files), "."], check=True)
    dm = ImageNetShards(
        train_shards=str(shard),
        batch_size=2,
        num_workers=0,
        image_size=16,
        val_resize=16,
        num_classes=2,
        with_keys=True,
    )
    assert dm.batches_per_epoch() == 3  # counted from tar headers: no info file beside GNU tar shards
    got = read_all(str(shard))
    assert sorted(got) == [f"./sample{i:03d}" for i in range(6)]
    assert all(label == int(k[-1]) % 2 for k, (label, _) in got.items())
