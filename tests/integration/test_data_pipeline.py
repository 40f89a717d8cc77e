"""ImageNetShards: rank/worker splitting, equal batch counts, per-epoch reshuffle, safe decoding,
corrupt-sample handling, transforms."""

import io
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_firecaffe.data import CorruptSampleError, EvalTransform, ImageNetShards, TrainTransform, count_samples
from lightning_firecaffe.data.decoding import decode_rgb, parse_label

SIZES = [7, 13, 4, 10, 6]  # five shards of unequal size, 40 samples


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def jpeg(seed: int, size=(40, 32), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(out, fmt, quality=90)
    return out.getvalue()


def write_tar(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(folder, sizes=SIZES):
    paths, n = [], 0
    for s, size in enumerate(sizes):
        samples = []
        for i in range(size):
            samples.append((f"s{s}_{i:03d}", {"jpg": jpeg(n), "cls": str(n % 10).encode()}))
            n += 1
        paths.append(str(folder / f"shard-{s:06d}.tar"))
        write_tar(paths[-1], samples)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def datamodule(urls, **kw):
    args = dict(
        train_shards=urls,
        val_shards=urls,
        batch_size=4,
        num_workers=0,
        image_size=16,
        val_resize=18,
        num_classes=10,
        shuffle_buffer=8,
        with_keys=True,
    )
    args.update(kw)
    return ImageNetShards(**args)


def epochs_of_keys(dm, epochs=2):
    loader = dm.train_dataloader()
    out = []
    for _ in range(epochs):
        batches = list(loader)
        assert all(b[0].shape == (4, 3, 16, 16) and b[0].dtype == torch.uint8 for b in batches)
        out.append([k for b in batches for k in b[2]])
    return out, len(loader)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "workers,start,persistent",
    [(1, "fork", False), (2, "fork", True), (1, "spawn", True), (2, "spawn", True)],
)
def test_two_ranks_disjoint_equal_and_reshuffled(shards, workers, start, persistent):
    per_rank = {}
    for rank in (0, 1):
        dm = datamodule(shards, num_workers=workers, worker_start=start, persistent_workers=persistent)
        dm.bind(rank, 2)
        per_rank[rank], length = epochs_of_keys(dm)
        assert length == 40 // (4 * 2)
    for epoch in (0, 1):
        k0, k1 = per_rank[0][epoch], per_rank[1][epoch]
        assert len(k0) == len(k1) == 5 * 4  # same number of batches on both ranks
        assert not set(k0) & set(k1), "two ranks read the same sample in one epoch"
        shards0, shards1 = {k.split("_")[0] for k in k0}, {k.split("_")[0] for k in k1}
        assert not shards0 & shards1, "two ranks read the same shard in one epoch"
    assert per_rank[0][0] != per_rank[0][1], "epoch 2 repeats epoch 1's order"
    if start == "spawn":
        return  # spawning workers is slow; the replay below does not depend on the start method
    # the same configuration replays the same order (the seed is shared, not per process)
    dm = datamodule(shards, num_workers=workers, worker_start=start, persistent_workers=persistent)
    dm.bind(0, 2)
    assert epochs_of_keys(dm, 1)[0][0] == per_rank[0][0]


def test_every_rank_gets_the_same_batches_with_one_shard_per_rank(shards):
    dm = datamodule(shards[:2], num_workers=0)
    lengths = []
    for rank in (0, 1):
        dm.bind(rank, 2)
        lengths.append(len(list(dm.train_dataloader())))
    assert lengths == [(7 + 13) // 8] * 2  # the 7-sample shard's rank repeats samples to keep up


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_shards,workers", [(5, 2), (1, 2)], ids=["by-shard", "by-sample"])
def test_validation_sees_every_sample_once_across_ranks(shards, n_shards, workers):
    seen = []
    for rank in (0, 1):
        dm = datamodule(shards[:n_shards], num_workers=workers, worker_start="fork")
        dm.bind(rank, 2)
        seen += [k for b in dm.val_dataloader() for k in b[2]]
    assert len(seen) == len(set(seen)) == sum(SIZES[:n_shards])


def test_float_output_and_sizes(shards):
    dm = datamodule(shards, uint8=False, image_size=24, val_resize=28)
    images, labels, keys = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.float32 and images.shape == (4, 3, 24, 24)
    assert -2.2 < images.min() < 0 < images.max() < 2.7  # ImageNet mean/std normalised
    assert labels.dtype == torch.long and all(int(k.split("_")[1]) >= 0 for k in keys)
    val = next(iter(dm.val_dataloader()))[0]
    assert val.shape[1:] == (3, 24, 24)


def test_pipe_urls_and_brace_patterns(shards):
    folder = os.path.dirname(shards[0])
    dm = datamodule([f"pipe:cat {shards[0]}", os.path.join(folder, "shard-{000001..000002}.tar")])
    assert dm.val_urls[1:] == shards[1:3]
    assert sorted(k for b in dm.val_dataloader() for k in b[2]) == sorted(
        [f"s0_{i:03d}" for i in range(7)] + [f"s1_{i:03d}" for i in range(13)] + [f"s2_{i:03d}" for i in range(4)]
    )
    assert count_samples(shards) == 40


def test_bad_configuration_errors(shards):
    with pytest.raises(ValueError, match="no shards"):
        ImageNetShards(train_shards=[])
    with pytest.raises(ValueError, match="need at least one each"):
        dm = datamodule(shards[:1])
        dm.bind(1, 2)
        dm.train_dataloader()
    with pytest.raises(ValueError, match="no full global batch"):
        datamodule(shards, batch_size=64).train_dataloader()
    with pytest.raises(ValueError, match="rank 2 outside"):
        datamodule(shards).bind(2, 2)
    with pytest.raises(ValueError, match="resize"):
        EvalTransform(224, 200)


# -- safety: never unpickle ------------------------------------------------------------------------------


class _CreateFile:
    """Unpickling this creates a file: stands in for arbitrary code in an untrusted shard."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.timeout(120)
def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreateFile(str(marker)))
    pickle.loads(payload).close()  # the payload is live: unpickling does create the file
    assert marker.exists()
    marker.unlink()
    samples = [(f"k{i}", {"jpg": jpeg(i), "cls": b"1", "pyd": payload, "pickle": payload}) for i in range(8)]
    write_tar(tmp_path / "evil-000000.tar", samples)
    write_tar(tmp_path / "evil-000001.tar", samples[:4])
    urls = [str(tmp_path / "evil-000000.tar"), str(tmp_path / "evil-000001.tar")]

    import lightning.pytorch as pl

    from lightning_firecaffe.models import ImageClassifier, NiN

    dm = datamodule(urls, num_workers=1, worker_start="fork", with_keys=False, image_size=32, val_resize=36)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(ImageClassifier(NiN(10)), dm)
    assert trainer.global_step == 2 * (12 // 4)  # training went on over both epochs
    assert not marker.exists()
    assert dm.skipped_samples == 0


# -- corrupt data -------------------------------------------------------------------------------------------


@pytest.fixture
def damaged(tmp_path):
    good = [(f"g{i}", {"jpg": jpeg(i), "cls": b"3"}) for i in range(6)]
    write_tar(tmp_path / "d-000000.tar", good[:3] + [("badjpeg", {"jpg": b"\xff\xd8\xff\xe0garbage", "cls": b"1"})])
    write_tar(tmp_path / "d-000001.tar", good[3:] + [("nolabel", {"jpg": jpeg(99)})])
    write_tar(
        tmp_path / "full.tar", [(f"t{i}", {"jpg": jpeg(100 + i, size=(200, 150)), "cls": b"2"}) for i in range(3)]
    )
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "d-000002.tar").write_bytes(data[: len(data) * 2 // 3])  # cut inside the last member
    os.remove(tmp_path / "full.tar")
    return [str(tmp_path / f"d-{i:06d}.tar") for i in range(3)]


@pytest.mark.timeout(120)
def test_corrupt_samples_are_skipped_warned_and_counted(damaged):
    dm = datamodule(damaged, num_workers=1, worker_start="fork")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        keys = [k for b in dm.val_dataloader() for k in b[2]]
    assert sorted(keys) == sorted([f"g{i}" for i in range(6)] + ["t0", "t1"])
    assert dm.skipped_samples == 3  # bad JPEG, missing cls, truncated shard (counted in the worker process)
    with pytest.warns(RuntimeWarning, match="skipping corrupt sample"):
        dm = datamodule(damaged, num_workers=0)
        list(dm.val_dataloader())
    dm = datamodule(damaged, num_workers=0, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(dm.train_dataloader())  # the training stream skips them too and still fills its epoch
    with pytest.warns(UserWarning, match="counted 3 samples before a read error"):
        total = count_samples(damaged)  # the truncated shard's header scan stops at the damage
    assert total == 4 + 4 + 3
    assert len(batches) == total // 2 and all(len(b[2]) == 2 for b in batches)
    assert not {"badjpeg", "nolabel"} & {k for b in batches for k in b[2]}


@pytest.mark.parametrize(
    "shard,key,reason",
    [(0, "badjpeg", "undecodable"), (1, "nolabel", "missing 'cls'"), (2, "t2", "unreadable tar")],
)
def test_strict_mode_names_shard_and_key(damaged, shard, key, reason):
    dm = datamodule([damaged[shard]], strict=True)
    with pytest.raises(CorruptSampleError) as info:
        list(dm.val_dataloader())
    message = str(info.value)
    assert damaged[shard] in message and key in message and reason in message, message


@pytest.mark.timeout(120)
def test_strict_mode_error_crosses_worker_processes(damaged):
    dm = datamodule([damaged[0]], strict=True, num_workers=1, worker_start="fork")
    with pytest.raises(CorruptSampleError, match="badjpeg"):
        list(dm.val_dataloader())


# -- decoding and transforms ------------------------------------------------------------------------------


def test_decoding_converts_everything_to_rgb():
    assert decode_rgb(jpeg(1, mode="L")).shape == (32, 40, 3)  # grayscale
    assert decode_rgb(jpeg(1, mode="CMYK")).shape == (32, 40, 3)  # CMYK JPEG (simplejpeg refuses it)
    png = jpeg(1, fmt="PNG")  # a PNG stored under .jpg, as in ImageNet
    assert decode_rgb(png).shape == (32, 40, 3)
    with pytest.raises(ValueError, match="undecodable"):
        decode_rgb(b"\x89PNG not really")


def test_labels_are_plain_integers():
    assert parse_label(b" 17\n") == 17
    for bad in (b"-1", b"1.5", b"\x80\x04K\x01.", b""):
        with pytest.raises(ValueError):
            parse_label(bad)
    with pytest.raises(ValueError, match="out of range"):
        parse_label(b"10", num_classes=10)


def _smooth_photo(width=640, height=480) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1)
    out = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_eval_transform_matches_pillow_resize_and_centre_crop():
    data = _smooth_photo()
    ours = EvalTransform(224, 256)(data).permute(1, 2, 0).numpy().astype(int)
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((341, 256), Image.BILINEAR)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    ref = np.asarray(img.crop((left, top, left + 224, top + 224))).astype(int)
    assert np.abs(ours - ref).mean() < 3


def test_train_transform_dct_scaled_decode_matches_full_decode():
    """Decoding at 1/2 or 1/4 scale (when the crop allows) must look like decode-then-resize."""
    import random

    data = _smooth_photo(1024, 768)
    transform = TrainTransform(64, scale=(0.5, 1.0), hflip=0.0)
    scaled = transform(data, random.Random(3)).permute(1, 2, 0).numpy().astype(int)
    from lightning_firecaffe.data import transforms

    box = transforms.random_resized_crop_box(768, 1024, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(3))
    top, left, h, w = box
    ref = (
        Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h))
    )
    assert transforms._dct_scale(768, 1024, box, (64, 64)) != (0, 0)  # the scaled path was taken
    assert np.abs(scaled - np.asarray(ref).astype(int)).mean() < 4
    flipped = TrainTransform(64, scale=(0.5, 1.0), hflip=1.0)(data, random.Random(3))
    assert torch.equal(flipped.flip(-1), torch.from_numpy(scaled.astype(np.uint8)).permute(2, 0, 1))


@pytest.mark.parametrize(
    "fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"]
)
def test_tar_reader_handles_long_names_in_every_format(tmp_path, fmt):
    from lightning_firecaffe.data.shards import iter_tar

    keys = ["short", "d" * 90 + "/" + "k" * 60, "x/" * 70 + "deep"]  # > 100 chars: prefix / long-name records
    path = tmp_path / "f.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, key in enumerate(keys):
            for ext, data in (("cls", str(i).encode()), ("jpg", jpeg(i)), ("pyd", b"never read")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = list(iter_tar(str(path)))
    assert [s["__key__"] for s in samples] == keys
    assert [int(s["cls"]) for s in samples] == [0, 1, 2] and all("pyd" not in s for s in samples)
    assert samples[1]["jpg"] == jpeg(1)
