"""Input pipeline: ImageNet webdataset shards, torch transforms, shard writer and the offline demo set."""

from .datamodule import EpochLoader, ImageNetShards, count_samples
from .decoding import CorruptSampleError
from .demo_set import DemoSet, build_demo_set, cache_dir, demo_datamodule
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, normalize

__all__ = [
    "CorruptSampleError",
    "DemoSet",
    "EpochLoader",
    "EvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetShards",
    "TrainTransform",
    "build_demo_set",
    "cache_dir",
    "count_samples",
    "demo_datamodule",
    "normalize",
    "write_shards",
]


def __getattr__(name):  # lazy, so that ``python -m lightning_firecaffe.data.shard_writer`` runs cleanly
    if name == "write_shards":
        from .shard_writer import write_shards

        return write_shards
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
