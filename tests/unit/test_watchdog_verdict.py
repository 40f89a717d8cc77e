"""The watchdog's verdict (pure): who holds the job up, dead or alive, and when it is only slow."""

import pytest

from lightning_firecaffe.watchdog.verdict import (
    Beat,
    Observer,
    Policy,
    bad_allowances,
    describe_peer,
    judge,
    merge_allowances,
)

T = 10.0
POLICY = Policy(T, merge_allowances(None))


class Cluster:
    """Beats of every rank as one observer (rank ``me``) sees them, on a hand-driven clock."""

    def __init__(self, world_size=2, me=0):
        self.now = 0.0
        self.observer = Observer(world_size, me, self.now)
        self.beats = {r: Beat(r, 0, 0, "train batch 0 (training_step)") for r in range(world_size)}
        self.observer.update(self.beats, self.now)

    def set(self, rank, **changes):
        self.beats[rank] = Beat(**{**self.beats[rank].to_dict(), **changes})

    def tick(self, seconds, alive=None, moving=()):
        """``seconds`` pass, one round per second; ranks in ``alive`` (default all) heartbeat, ``moving`` progress."""
        for _ in range(int(seconds)):
            self.now += 1.0
            for r, b in self.beats.items():
                if alive is None or r in alive:
                    self.set(r, heartbeat=b.heartbeat + 1, progress=b.progress + (r in moving))
            self.observer.update({r: b for r, b in self.beats.items() if alive is None or r in alive}, self.now)
            self.observer.store_answered(True, self.now)
        return judge(self.observer, self.now, POLICY)


def test_progressing_job_is_never_stalled():
    c = Cluster(3)
    assert c.tick(100, moving=(0, 1, 2)) is None


def test_rank_stuck_in_validation_while_the_other_waits_is_named_after_stall_timeout():
    c = Cluster()
    c.set(0, phase="validation epoch end (metric sync)", blocked_in="torch.distributed.all_reduce")
    c.set(1, phase="validation batch 0 of dataloader 0 (validation_step)", at="job.py:40 in validation_step")
    assert c.tick(T - 1) is None
    stall = c.tick(1)
    assert stall is not None and stall.culprit_ranks == [1]
    text = stall.message(me=0)
    assert "rank 1 is alive but has not progressed for 10 s" in text and "validation_step" in text
    assert "rank 0 is blocked in torch.distributed.all_reduce" in text and "Look at the log of rank 1" in text


def test_silent_rank_is_dead_not_stuck():
    c = Cluster()
    c.set(0, blocked_in="backward (the gradient all-reduce)")
    c.tick(3)
    stall = c.tick(T, alive={0})
    assert stall is not None and stall.culprit_ranks == [1] and stall.culprits[0].status == "dead"
    assert "rank 1 is not responding: no heartbeat for 10 s" in stall.message(0)


def test_no_verdict_while_the_awaited_rank_is_within_its_checkpoint_allowance():
    c = Cluster()
    c.set(0, phase="checkpoint save", kind="checkpoint")
    c.set(1, phase="checkpoint save", kind="checkpoint", blocked_in="torch.distributed.barrier")
    assert c.tick(5 * T) is None  # writing takes longer than stall_timeout: not a stall
    stall = c.tick(POLICY.allowance("checkpoint"))
    assert stall is not None and stall.culprit_ranks == [0]


def test_slow_rank_that_keeps_moving_is_not_a_culprit():
    c = Cluster()
    c.set(0, blocked_in="backward (the gradient all-reduce)")
    for _ in range(10):  # rank 1 moves every 3 s, rank 0 waits for it each time
        assert c.tick(3, moving=(1,)) is None


def test_warmup_gets_its_allowance():
    c = Cluster()
    c.set(0, blocked_in="backward (the gradient all-reduce)")
    c.set(1, phase="train batch 0 (training_step)", kind="warmup")
    assert c.tick(2 * T) is None
    assert c.tick(POLICY.allowance("warmup")) is not None


def test_every_rank_blocked_in_collectives_is_still_reported():
    c = Cluster()
    c.set(0, blocked_in="torch.distributed.barrier")
    c.set(1, blocked_in="torch.distributed.all_reduce")
    stall = c.tick(T)
    assert stall is not None and stall.culprits == () and "mismatched" in stall.reason


def test_undetected_wait_falls_back_to_no_progress_anywhere():
    c = Cluster()
    assert c.tick(T - 1) is None
    stall = c.tick(1)
    assert stall is not None and sorted(stall.culprit_ranks) == [0, 1]


def test_finished_rank_that_others_wait_for_is_named():
    c = Cluster()
    c.set(0, blocked_in="torch.distributed.barrier")
    c.set(1, finished=True, phase="teardown (fit)")
    stall = c.tick(T)
    assert stall.culprit_ranks == [1] and "finished its training" in stall.message(0)


def test_finished_rank_alone_is_no_stall():
    c = Cluster()
    c.set(1, finished=True)
    assert c.tick(3 * T, moving=(0,)) is None


def test_unreachable_store_blames_rank_0s_host_once_this_rank_stands_still():
    c = Cluster(3, me=2)
    c.tick(2)
    for _ in range(int(T) + 1):
        c.now += 1
        c.observer.update({2: c.beats[2]}, c.now)  # only its own beat: the store fails
        c.observer.store_answered(False, c.now)
    stall = judge(c.observer, c.now, POLICY)
    assert stall is not None and stall.culprit_ranks == [0, 2] and "rendezvous store" in stall.reason
    assert "rank 2 is alive but has not progressed" in stall.message(2)  # it stands still too: say so


def test_unreachable_store_is_no_stall_while_this_rank_moves():
    c = Cluster(2, me=1)
    for _ in range(int(2 * T)):
        c.now += 1
        c.set(1, progress=c.beats[1].progress + 1)
        c.observer.update({1: c.beats[1]}, c.now)
        c.observer.store_answered(False, c.now)
    assert judge(c.observer, c.now, POLICY) is None


def test_never_heard_rank_counts_as_dead_after_stall_timeout():
    obs = Observer(2, 0, 0.0)
    for t in range(0, int(T) + 1):
        obs.update({0: Beat(0, t, 0, "setup", blocked_in="torch.distributed.barrier")}, float(t))
        obs.store_answered(True, float(t))
    stall = judge(obs, T, POLICY)
    assert stall is not None and stall.culprit_ranks == [1] and stall.culprits[0].status == "dead"


# -- a peer the gradient path names: dead is never "alive" (issue 17: a rank killed at step 3 under "tree")
def killed_early():
    """Rank 1 published its very first beat ('starting') and was SIGKILLed before its second: rank 0 first
    reads that beat just before the gradient path fails (its data is seconds old, and it is all there is)."""
    obs = Observer(2, 0, 0.0)
    obs.update({0: Beat(0, 1, 1, "train batch 3 (backward)", blocked_in="backward")}, 0.0)
    obs.update({0: Beat(0, 2, 1, "train batch 3 (backward)", blocked_in="backward"), 1: Beat(1, 1, 0, "starting")}, 1.0)
    return obs


def state_of(obs, rank, now=1.5):
    return next(s for s in obs.states(now, POLICY) if s.rank == rank)


def test_a_rank_heard_once_is_not_called_alive():
    text = describe_peer(state_of(killed_early(), 1), closed=False, silent_after_s=3.0)
    assert "alive" not in text and "has sent no heartbeat since the first one" in text
    assert "the only beat seen from it (of unknown age) was in 'starting' at global step 0" in text


def test_a_peer_that_closed_its_connection_is_said_to_be_gone():
    text = describe_peer(state_of(killed_early(), 1), closed=True, silent_after_s=3.0)
    assert text.startswith("rank 1 closed its connection: its process exited or its host went away;"), text


def test_a_peer_whose_process_exited_is_named_exited_and_dead_at_once():
    obs = killed_early()
    obs.processes_seen({1: True})
    state = state_of(obs, 1)
    assert state.status == "dead" and state.exited
    for closed in (False, True):
        text = describe_peer(state, closed=closed, silent_after_s=3.0)
        assert text.startswith("rank 1 has exited (its process is gone) without leaving the training"), text


def test_a_closed_peer_whose_process_still_runs_is_not_called_exited():
    c = Cluster()
    c.tick(3)
    c.observer.processes_seen({1: False})
    text = describe_peer(state_of(c.observer, 1, c.now), closed=True, silent_after_s=3.0)
    assert text.startswith("rank 1 closed its connection but its process still runs"), text


def test_a_rank_that_left_with_an_error_is_described_by_its_goodbye_even_when_closed():
    c = Cluster()
    c.tick(3)
    c.set(1, finished=True, error="ValueError: boom")
    c.tick(1)
    text = describe_peer(state_of(c.observer, 1, c.now), closed=True, silent_after_s=3.0)
    assert text.startswith("rank 1 has left the training with an error (ValueError: boom)"), text


def test_a_waiting_rank_sees_an_exited_peer_as_the_culprit_once_it_waited_stall_timeout():
    c = Cluster()
    c.set(0, blocked_in="backward (the gradient all-reduce)")
    c.tick(2)
    c.observer.processes_seen({1: True})
    assert c.tick(T - 3, alive={0}) is None  # not before rank 0 has waited stall_timeout
    stall = c.tick(1, alive={0})
    assert stall is not None and stall.culprit_ranks == [1] and stall.reason == "rank 1 exited"
    assert "rank 1 has exited" in stall.message(0) and "alive" not in stall.message(0)


def test_a_silent_rank_that_was_heard_is_not_responding_before_stall_timeout():
    c = Cluster()
    c.tick(2)
    c.tick(4, alive={0})
    text = describe_peer(state_of(c.observer, 1, c.now), closed=False, silent_after_s=3.0)
    assert text.startswith("rank 1 is not responding: no heartbeat for 4 s"), text


def test_a_rank_never_heard_from_is_not_called_alive():
    obs = Observer(2, 0, 0.0)
    obs.update({0: Beat(0, 1, 1, "setup")}, 0.0)
    text = state_of(obs, 1, 5.0).describe()
    assert text == "rank 1 has not been heard from in the 5 s this rank has watched"


@pytest.mark.parametrize("bad", [{"lunch": 3}, {"checkpoint": -1}, {"checkpoint": float("inf")}, {"setup": True}, [1]])
def test_bad_allowances_are_explained(bad):
    assert bad_allowances(bad)


def test_allowance_is_never_below_stall_timeout():
    assert Policy(100.0, merge_allowances({"checkpoint": 5})).allowance("checkpoint") == 100.0
    assert Policy(1.0).allowance("checkpoint") == 600.0
