"""Tests reuse the package's local launcher (fork + gloo, with a deadline)."""

from lightning_firecaffe.bench.launch import free_port, run_ranks  # noqa: F401
