"""The watchdog's verdict (pure): who holds the job up, dead or alive, and when it is only slow."""

import pytest

from lightning_firecaffe.watchdog.verdict import Beat, Observer, Policy, bad_allowances, judge, merge_allowances

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


@pytest.mark.parametrize("bad", [{"lunch": 3}, {"checkpoint": -1}, {"checkpoint": float("inf")}, {"setup": True}, [1]])
def test_bad_allowances_are_explained(bad):
    assert bad_allowances(bad)


def test_allowance_is_never_below_stall_timeout():
    assert Policy(100.0, merge_allowances({"checkpoint": 5})).allowance("checkpoint") == 100.0
    assert Policy(1.0).allowance("checkpoint") == 600.0
