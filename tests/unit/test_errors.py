"""The one wording of a failed wait: closed vs silent, who, where; and errors that survive pickling."""

import pickle

from lightning_firecaffe.errors import PeerStallError, closed_connection, first_line, name_ranks, peer_error
from lightning_firecaffe.transport import name_the_missing

GLOO_CLOSED = RuntimeError("[pair.cc:537] Read error [10.0.0.3]:146: Connection reset by peer. GLHF!\nmore")
GLOO_TIMEOUT = RuntimeError("[pair.cc:598] Timed out waiting 10000ms for recv operation to complete")
OUR_TIMEOUT_CLOSURE = RuntimeError("Application timeout caused pair closure")


def test_a_closed_connection_is_told_apart_from_silence():
    assert closed_connection(GLOO_CLOSED) and closed_connection(RuntimeError("Connection closed by peer"))
    assert not closed_connection(GLOO_TIMEOUT) and not closed_connection(OUR_TIMEOUT_CLOSURE)
    assert not closed_connection(None)


def test_first_line_survives_empty_and_multiline_messages():
    assert first_line(GLOO_CLOSED).endswith("GLHF!") and first_line(None) == "timed out"
    assert first_line(RuntimeError("")) == "RuntimeError('')" and first_line(RuntimeError("\n\n x")) == "x"


def test_names_and_grammar_for_one_and_several_peers():
    assert [name_ranks(r) for r in ([], [2], [2, 3], [1, 2, 3])] == [
        "a peer",
        "rank 2",
        "ranks 2 and 3",
        "ranks 1, 2 and 3",
    ]
    one = peer_error(0, [1, 0, -1], "receiving from rank 1", bucket=4, step=9, timeout_s=60, exc=GLOO_CLOSED)
    assert one.peers == [1] and one.closed and (one.bucket, one.step) == (4, 9)
    assert str(one).startswith("FireCaffe all-reduce on rank 0: rank 1 closed its connection (it probably died)")
    assert "gradient bucket 4 at training step 9" in str(one) and "Connection reset by peer" in str(one)
    silent = peer_error(2, [0, 1], "waiting", bucket=None, step=3, timeout_s=10, exc=GLOO_TIMEOUT)
    assert "ranks 0 and 1 did not answer within 10 s" in str(silent) and not silent.closed
    assert "Check those ranks' logs: they may" in str(silent)


def test_a_census_names_the_dead_before_the_silent_and_nobody_when_all_answered():
    census = {1: "alive", 2: "closed", 3: "silent"}
    error = name_the_missing(census, 0, "reducing gradients", step=5, timeout_s=60, cause=GLOO_CLOSED, bucket=0)
    assert error.peers == [2] and error.closed and "rank 2 closed its connection" in str(error)
    silent = name_the_missing({1: "silent"}, 0, "x", step=5, timeout_s=60, cause=None)
    assert silent.peers == [1] and not silent.closed
    assert name_the_missing({1: "alive"}, 0, "x", step=5, timeout_s=60, cause=None) is None


def test_peer_stall_error_pickles_whole():
    error = PeerStallError("FireCaffe ...", [3], closed=True, bucket=2, step=7)
    back = pickle.loads(pickle.dumps(error))
    assert (str(back), back.peers, back.closed, back.bucket, back.step) == (str(error), [3], True, 2, 7)
