"""Scheduler selection details that need no cluster."""

from __future__ import annotations

from geoseg.engine.cluster import active_scheduling, scheduler, visible_gpus


def test_visible_gpus_keeps_the_parent_mapping(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == ("2", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc,-1,4")
    assert visible_gpus() == ("GPU-abc",)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == ()


def test_active_scheduling_is_scoped() -> None:
    assert active_scheduling() is None
    with scheduler("threads") as s:
        assert active_scheduling() is s
    assert active_scheduling() is None


def test_too_many_workers_is_refused_before_anything_starts() -> None:
    import os

    import pytest

    from geoseg.errors import InputError

    limit = 4 * (os.cpu_count() or 1)
    with pytest.raises(InputError) as err, scheduler("local", workers=limit + 1, device="cpu"):
        raise AssertionError("a cluster started")
    assert f"workers={limit + 1}: give 1 to {limit}" in str(err.value) and "\n" not in str(err.value)


def test_stop_signals_are_held_while_a_cluster_starts() -> None:
    """SIGTERM during start-up is acted on once the cluster is entered; Ctrl-C is ignored meanwhile (the workers
    started then inherit that); the handlers are restored afterwards."""
    import os
    import signal

    import pytest

    from geoseg.engine.cluster import _held_signals

    got: list[int] = []

    def term(signum, _frame):
        got.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, term)
    try:
        with _held_signals() as held:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # ignored: not a KeyboardInterrupt here
            assert held.held == [signal.SIGTERM] and got == []
            with pytest.raises(KeyboardInterrupt):
                held.release()
        assert got == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is term and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with _held_signals():  # nothing held: the block ends quietly
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
