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
