"""``ImageNetShards``: a LightningDataModule over ImageNet-style webdataset shards (``jpg`` + ``cls``)."""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import tarfile
import warnings
from collections.abc import Sequence
from functools import partial

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from .decoding import IMAGE_EXTENSIONS
from .shards import _KEY_EXT, ShardStream, SkipPolicy, expand_shards
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, normalize


def _local_path(url: str) -> str | None:
    if url.startswith("file:"):
        return url[5:]
    return None if ":" in url.split("/", 1)[0] else url


def count_samples(urls: Sequence[str]) -> int:
    """Samples in local shards: from the shard writer's ``*-info.json`` beside them, else a tar header scan."""
    known: dict[str, int] = {}
    total = 0
    for url in urls:
        path = _local_path(url)
        if path is None:
            raise ValueError(f"cannot count the samples of remote shard {url!r}: pass train_samples")
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in known:
            known[folder] = 1
            for info in glob.glob(os.path.join(folder, "*-info.json")):
                with open(info) as f:
                    for name, n in json.load(f).get("shards", {}).items():
                        known[os.path.join(folder, name)] = int(n)
        full = os.path.join(folder, os.path.basename(path))
        if full in known:
            total += known[full]
            continue
        keys = set()
        try:
            with tarfile.open(path, "r:*") as tar:  # headers only: seeks past member data
                for info in tar:
                    m = _KEY_EXT.match(info.name)
                    if m and m.group(2).lower() in IMAGE_EXTENSIONS:
                        keys.add(m.group(1))
        except tarfile.TarError as exn:  # a damaged shard still counts what it holds; reading will skip
            warnings.warn(f"shard {path}: counted {len(keys)} samples before a read error: {exn}", stacklevel=2)
        total += len(keys)
    return total


class EpochLoader:
    """Exactly ``num_batches`` batches per epoch from an endless loader (same count on every rank).

    Sets the stream's epoch first, so the shard order is reshuffled identically on all ranks.
    """

    def __init__(self, loader: DataLoader, stream: ShardStream, num_batches: int, epoch_fn):
        self.loader, self.stream, self.num_batches, self.epoch_fn = loader, stream, num_batches, epoch_fn

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        self.stream.set_epoch(self.epoch_fn())
        batches = iter(self.loader)
        for _ in range(self.num_batches):
            try:
                yield next(batches)
            except StopIteration:
                raise RuntimeError("the training stream ended early; it should be endless") from None


class ImageNetShards(pl.LightningDataModule):
    """Train/val loaders over webdataset shards; rank and world size come from the Trainer.

    Args:
        train_shards, val_shards: brace pattern, ``::``-separated list, list of paths or URLs (``pipe:``).
        batch_size: per rank; the global batch is ``batch_size * world_size``.
        train_samples: dataset size; by default read from the shard writer's info JSON or counted in
            local tars. Each rank gets ``train_samples // (batch_size * world_size)`` batches per epoch.
        uint8: emit uint8 batches (4x less worker->main traffic); :class:`ImageClassifier` normalises
            them on the device. With ``uint8=False`` batches are normalised float32.
        strict: fail on the first corrupt sample instead of skipping and counting it.
        shuffle_buffer: per-worker buffer of compressed samples.
        worker_start: DataLoader worker start method (``fork``, ``spawn``, ``forkserver``; default: Python's).
        with_keys: batches become ``(images, labels, keys)`` (debugging, tests).
    """

    def __init__(
        self,
        train_shards: str | Sequence[str] | None = None,
        val_shards: str | Sequence[str] | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        image_size: int = 224,
        val_resize: int = 256,
        train_scale: Sequence[float] = (0.08, 1.0),
        train_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        num_classes: int | None = 1000,
        train_samples: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        uint8: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        strict: bool = False,
        fast_decode: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        worker_start: str | None = None,
        with_keys: bool = False,
    ):
        super().__init__()
        if train_shards is None and val_shards is None:
            raise ValueError("give train_shards, val_shards or both")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.train_urls = expand_shards(train_shards) if train_shards is not None else None
        self.val_urls = expand_shards(val_shards) if val_shards is not None else None
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_transform = TrainTransform(image_size, tuple(train_scale), tuple(train_ratio), hflip, fast_decode)
        self.val_transform = EvalTransform(image_size, val_resize, fast_decode)
        self.num_classes, self.train_samples, self.seed = num_classes, train_samples, seed
        self.shuffle_buffer, self.uint8, self.mean, self.std = shuffle_buffer, uint8, tuple(mean), tuple(std)
        self.strict = strict
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers, self.prefetch_factor = persistent_workers, prefetch_factor
        self.worker_start, self.with_keys = worker_start, with_keys
        self.rank, self.world_size = 0, 1
        self._epochs_started = 0
        self._counters: list = []

    # -- distributed binding ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.bind(self.trainer.global_rank, self.trainer.world_size)

    def bind(self, rank: int, world_size: int) -> None:
        """Bind the pipeline to a rank (done from the Trainer in ``setup``; call it yourself without one)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size

    @property
    def skipped_samples(self) -> int:
        """Corrupt samples skipped so far by this rank (all its loaders and workers)."""
        return sum(c.value for c in self._counters)

    def batches_per_epoch(self) -> int:
        """Training batches per rank and epoch: the dataset size over the global batch, rounded down."""
        samples = self.train_samples if self.train_samples is not None else count_samples(self.train_urls)
        self.train_samples = samples
        n = samples // (self.batch_size * self.world_size)
        if n < 1:
            raise ValueError(
                f"{samples} training samples make no full global batch of {self.batch_size} x {self.world_size}"
            )
        return n

    # -- loaders -------------------------------------------------------------------------------------------
    def _context(self):
        return multiprocessing.get_context(self.worker_start)

    def _stream(self, urls, transform, train: bool) -> ShardStream:
        counter = self._context().Value("q", 0)
        self._counters.append(counter)
        return ShardStream(
            urls,
            transform,
            self.batch_size,
            train=train,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            num_classes=self.num_classes,
            skip=SkipPolicy(self.strict, counter),
            normalize_fn=None if self.uint8 else partial(normalize, mean=self.mean, std=self.std),
            with_keys=self.with_keys,
        )

    def _loader(self, stream: ShardStream, num_workers: int) -> DataLoader:
        kwargs = {}
        if num_workers > 0:
            kwargs = dict(
                persistent_workers=self.persistent_workers,
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self._context(),
            )
        return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=self.pin_memory, **kwargs)

    def _workers_for(self, urls) -> int:
        shards_per_rank = len(urls) // self.world_size
        if shards_per_rank < 1:
            raise ValueError(f"{len(urls)} training shards for {self.world_size} ranks: need at least one each")
        if self.num_workers > shards_per_rank:
            warnings.warn(
                f"{shards_per_rank} training shards per rank: using {shards_per_rank} DataLoader workers "
                f"instead of {self.num_workers} (each worker needs its own shards)",
                stacklevel=2,
            )
            return shards_per_rank
        return self.num_workers

    def _current_epoch(self) -> int:
        if self.trainer is not None:
            return self.trainer.current_epoch
        epoch, self._epochs_started = self._epochs_started, self._epochs_started + 1
        return epoch

    def train_dataloader(self) -> EpochLoader:
        if self.train_urls is None:
            raise ValueError("no train_shards given")
        stream = self._stream(self.train_urls, self.train_transform, train=True)
        loader = self._loader(stream, self._workers_for(self.train_urls))
        return EpochLoader(loader, stream, self.batches_per_epoch(), self._current_epoch)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []  # Lightning: no validation
        return self._loader(self._stream(self.val_urls, self.val_transform, train=False), self.num_workers)
