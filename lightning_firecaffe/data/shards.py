"""Shard streams: which shards a (rank, worker) reads in an epoch, reading tars safely, skipping bad samples.

Train: every epoch the shard list is permuted from ``seed`` and the epoch (same on all ranks), dealt out
by rank, then by DataLoader worker; each worker cycles its own shards endlessly and the loader cuts the
epoch at a fixed number of batches, so every rank yields the same count while no two ranks ever read the
same shard in an epoch (a rank whose shards are short repeats some of its samples, one whose shards are
long leaves the rest for later epochs; the permutation changes every epoch).
Validation: every sample is read exactly once across all ranks and workers (by shard when there are enough
shards, by sample index modulo otherwise); ranks may then get different batch counts, which is harmless as
long as nothing does a collective per validation step (Lightning's epoch-level logging does not).
"""

from __future__ import annotations

import random
import re
import struct
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from .decoding import IMAGE_EXTENSIONS, LABEL_EXTENSION, CorruptSampleError, find_image, parse_label

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split
MAX_CONSECUTIVE_FAILURES = 10_000
WANTED = frozenset(IMAGE_EXTENSIONS + (LABEL_EXTENSION,))


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``), ``::``-separated lists or lists of paths/URLs -> list."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in expand_urls(str(s))]
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("unexpected end of data (truncated tar)")
    return data


def _skip(stream, n: int) -> None:
    if n and getattr(stream, "seekable", lambda: False)():
        stream.seek(n, 1)
    elif n:
        _read_exact(stream, n)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _signed_sum(header: bytes) -> int:  # some old tars sum signed bytes
    return 256 + sum(struct.unpack_from("148b8x356b", header))


def _pax(data: bytes) -> dict[bytes, bytes]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def tar_members(stream) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file in a tar stream (ustar, pax and GNU long names).

    A minimal reader: about 5x less per-member overhead than :mod:`tarfile`, which matters at 1,000+
    images/s per core. After each item the caller must consume exactly ``size`` bytes (read or
    :func:`_skip`); padding is handled here. A short read raises ``EOFError``.
    """
    long_name, pax_size = None, None
    while True:
        header = stream.read(512)
        if not header or header == b"\0" * 512:
            return  # end of archive (a missing end marker is tolerated, as tarfile does)
        if len(header) != 512:
            raise EOFError("unexpected end of data (truncated tar header)")
        checksum = _octal(header[148:156])
        if sum(header[:148]) + 256 + sum(header[156:]) != checksum and _signed_sum(header) != checksum:
            raise ValueError("bad tar header checksum")
        size = _octal(header[124:136]) if pax_size is None else pax_size
        kind = header[156:157]
        padding = -size % 512
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: applies to the next member
            data = _read_exact(stream, size)[:size]
            _skip(stream, padding)
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            else:
                pax = _pax(data)
                if b"path" in pax:
                    long_name = pax[b"path"].decode("utf-8", "replace")
                if b"size" in pax:
                    pax_size = int(pax[b"size"])
            continue
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:263] == b"ustar\0":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
        name, long_name, pax_size = long_name or name, None, None
        if kind in (b"0", b"\0", b"7"):
            yield name, size
        else:
            _skip(stream, size)
        _skip(stream, padding)


def iter_tar(url: str) -> Iterator[dict]:
    """Samples of one tar (local path or any URL webdataset's ``gopen`` opens, ``pipe:`` included).

    Only image and ``cls`` members are read; everything else (``.pyd``, ``.pickle``, ...) is skipped
    unread. A read error becomes :class:`CorruptSampleError` naming the shard and the key being read.
    """
    key = None
    stream = None
    try:
        stream = gopen(url, "rb")
        current: dict | None = None
        for name, size in tar_members(stream):
            match = _KEY_EXT.match(name)
            if match is None or name.rsplit("/", 1)[-1].startswith("__"):
                _skip(stream, size)
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if ext in WANTED:
                current[ext] = _read_exact(stream, size)
            else:
                _skip(stream, size)
        if current is not None:
            yield current
    except (OSError, EOFError, ValueError) as exn:
        where = f"after key {key!r}" if key is not None else "at its start"
        raise CorruptSampleError(f"shard {url}: unreadable tar {where} (key {key!r}): {exn}") from exn
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a failing pipe: reports its status on close; the read error already counts
                pass


class SkipPolicy:
    """Skip a corrupt sample with a warning and count it, or (``strict``) fail on the first one.

    The count lives in shared memory so that DataLoader worker processes add to the rank's total.
    """

    def __init__(self, strict: bool = False, counter=None):
        self.strict = strict
        self.counter = counter

    def __call__(self, error: CorruptSampleError) -> None:
        if self.strict:
            raise error
        warnings.warn(f"skipping corrupt sample: {error}", RuntimeWarning, stacklevel=2)
        if self.counter is not None:
            with self.counter.get_lock():
                self.counter.value += 1


def _collate(items: list[tuple]) -> tuple:
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items], dtype=torch.long)
    if len(items[0]) > 2:
        return images, labels, [it[2] for it in items]
    return images, labels


class ShardStream(IterableDataset):
    """Batches of ``(images, labels[, keys])`` for one rank; see the module docstring for the split rules.

    ``set_epoch`` is called in the rank process before each epoch; persistent workers keep the copy they
    were started with and count epochs themselves, so both kinds of workers agree on the epoch.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform,
        batch_size: int,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_classes: int | None = None,
        skip: SkipPolicy | None = None,
        normalize_fn=None,
        with_keys: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = list(urls)
        self.transform = transform
        self.batch_size = batch_size
        self.train = train
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_classes = num_classes
        self.skip = skip or SkipPolicy()
        self.normalize_fn = normalize_fn
        self.with_keys = with_keys
        self.epoch = 0
        self._local_epochs = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._local_epochs = epoch, 0

    # -- which shards ------------------------------------------------------------------------------
    def train_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        order = list(self.urls)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        mine = order[self.rank :: self.world_size][worker::num_workers]
        if not mine:
            raise ValueError(f"{len(self.urls)} shards cannot feed {self.world_size} ranks x {num_workers} workers")
        return mine

    def val_plan(self, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """(shards to read, modulo, index): keep the j-th sample read if j % modulo == index."""
        urls, modulo, index = self.urls, 1, 0
        if len(urls) >= self.world_size:
            urls = urls[self.rank :: self.world_size]
        else:
            modulo, index = self.world_size, self.rank
        if len(urls) >= num_workers:
            urls = urls[worker::num_workers]
        else:
            modulo, index = modulo * num_workers, index * num_workers + worker
        return urls, modulo, index

    # -- the stream ----------------------------------------------------------------------------------
    def _read(self, urls: list[str]) -> Iterator[dict]:
        for url in urls:
            try:
                yield from iter_tar(url)
            except CorruptSampleError as error:
                self.skip(error)

    def _cycle(self, urls: list[str], rng: random.Random) -> Iterator[dict]:
        while True:
            got = False
            for sample in self._read(urls):
                got = True
                yield sample
            if not got:
                raise RuntimeError(f"no readable samples in shards {urls}")
            rng.shuffle(urls)

    def _shuffle(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """Bounded shuffle buffer over compressed samples (before decode, so it costs bytes, not pixels)."""
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buf: list[dict] = []
        for sample in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf

    def _decode(self, samples: Iterator[dict], rng: random.Random) -> Iterator[tuple]:
        failures = 0  # consecutive: an endless stream of bad samples must fail, not spin forever
        for sample in samples:
            key, url = sample["__key__"], sample["__url__"]
            try:
                data = find_image(sample)
                if data is None:
                    raise ValueError("no image member (jpg/jpeg/png/webp)")
                label = parse_label(sample.get(LABEL_EXTENSION), self.num_classes)
                image = self.transform(data, rng)
            except (ValueError, OSError, RuntimeError) as exn:
                self.skip(CorruptSampleError(f"shard {url}: key {key!r}: {exn}"))
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(f"{failures} corrupt samples in a row (last in {url}); giving up") from exn
                continue
            failures = 0
            yield (image, label, key) if self.with_keys else (image, label)

    def _batches(self, items: Iterator[tuple]) -> Iterator[tuple]:
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._finish(_collate(batch))
                batch = []
        if batch and not self.train:
            yield self._finish(_collate(batch))

    def _finish(self, batch: tuple) -> tuple:
        if self.normalize_fn is None:
            return batch
        return (self.normalize_fn(batch[0]),) + tuple(batch[1:])

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch + self._local_epochs
        self._local_epochs += 1
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}")
        if self.train:
            samples = self._shuffle(self._cycle(self.train_shards(epoch, worker, num_workers), rng), rng)
        else:
            urls, modulo, index = self.val_plan(worker, num_workers)
            samples = (s for j, s in enumerate(self._read(urls)) if j % modulo == index)
        return self._batches(self._decode(samples, rng))
