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
