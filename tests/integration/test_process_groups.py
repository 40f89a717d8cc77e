"""The exit policy of :mod:`lightning_firecaffe.process_groups` on real gloo groups (2 forked ranks): the
groups are ended after a run that succeeded, and left alone after a failure or an uncaught exception.
The strategies' use of it, through a whole script's exit: tests/integration/test_leaves_no_trace.py."""

import sys

import pytest

from lightning_firecaffe.testing.ranks import first_result, run_ranks


def _groups_alive_after_exit_handler(rank: int, world_size: int, how_it_ended: str) -> bool:
    import torch.distributed as dist

    from lightning_firecaffe import process_groups

    dist.barrier()
    if how_it_ended == "training failed":
        process_groups.training_failed()
    elif how_it_ended == "uncaught exception":
        sys.last_value = RuntimeError("what the interpreter printed")
    process_groups._end_at_exit()
    return dist.is_initialized()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("how_it_ended", "alive"), [("succeeded", False), ("training failed", True), ("uncaught exception", True)]
)
def test_groups_are_ended_at_exit_only_after_success(how_it_ended, alive):
    results = run_ranks(_groups_alive_after_exit_handler, 2, how_it_ended)
    first_result(results)  # raises, showing every failed rank, unless both ran
    assert [value for _, value in results.values()] == [alive, alive]
