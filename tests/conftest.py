"""Shared test fixtures."""

import pytest
import torch

# skips for a missing cluster environment (root, namespaces, tc, SLURM, munge) fail when FIRECAFFE_REQUIRE_CLUSTER=1
pytest_plugins = ["lightning_firecaffe.testing.required"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: OpenMP spinning on an oversubscribed 2-core runner makes steps ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def built_demo_set():
    """The default demo shards in the cache, built once here (~15 s) rather than by every rank of the first
    job that needs them at the same time (each rank of a 4-rank SLURM job would build its own copy)."""
    from lightning_firecaffe.data import build_demo_set

    return build_demo_set()
