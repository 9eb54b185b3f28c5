"""Straggler detection from the ranks' own compute times: slow for N steps in a row, against the
median of the ranks doing the same work."""

from __future__ import annotations

import pytest

from farm.controller.stragglers import StragglerWatch

pytestmark = pytest.mark.unit

NODES = ["a", "a", "b", "b", "c", "c"]


def feed(watch: StragglerWatch, times: list[float], steps: int) -> list[list[object]]:
    return [list(watch.observe(times)) for _ in range(steps)]


def test_a_rank_slow_for_the_whole_window_is_reported_once_with_its_slowdown() -> None:
    watch = StragglerWatch(nodes=NODES, stages=[0] * 6, factor=1.5, steps=20)
    times = [1.0, 1.0, 1.0, 1.9, 1.0, 1.0]
    found = feed(watch, times, 25)
    assert all(not f for f in found[:19]) and all(not f for f in found[20:])
    (slow,) = found[19]
    assert slow.rank == 3 and slow.node == "b" and slow.slowdown == 1.9 and slow.steps == 20  # type: ignore[attr-defined]


def test_single_noisy_steps_neither_make_nor_hide_a_straggler() -> None:
    watch = StragglerWatch(nodes=NODES, stages=[0] * 6, factor=1.5, steps=20)
    slow, normal = [1.0, 1.0, 1.0, 1.0, 1.0, 2.0], [1.0] * 6
    # A throttled rank that now and then has a quick step is still found after 20 steps...
    found = [watch.observe(normal if i % 7 == 3 else slow) for i in range(20)]
    assert not any(found[:19]) and found[19] and found[19][0].rank == 5
    # ...and a healthy rank with a slow step now and then never is.
    calm = StragglerWatch(nodes=NODES, stages=[0] * 6, factor=1.5, steps=20)
    assert not any(calm.observe([1.0, 3.0 if i % 4 == 0 else 1.0, 1.0, 1.0, 1.0, 1.0]) for i in range(60))


def test_a_straggler_that_recovers_is_reported_again_when_it_slows_again() -> None:
    watch = StragglerWatch(nodes=NODES, stages=[0] * 6, factor=1.5, steps=5)
    slow, normal = [1.0, 1.0, 1.0, 1.0, 1.0, 2.0], [1.0] * 6
    assert sum(len(watch.observe(slow)) for _ in range(10)) == 1
    assert not any(watch.observe(normal) for _ in range(5))
    assert sum(len(watch.observe(slow)) for _ in range(10)) == 1


def test_below_the_factor_is_not_slow_and_stages_are_judged_apart() -> None:
    # Stage 1 does more work (its ranks take 1.4x stage 0's): compared with its own stage, nobody is slow.
    watch = StragglerWatch(nodes=NODES, stages=[0, 0, 0, 1, 1, 1], factor=1.5, steps=3)
    assert not any(feed(watch, [1.0, 1.0, 1.4, 2.0, 2.0, 2.0], 10))
    # A stage of two ranks cannot be judged: the median of two is halfway between them.
    pair = StragglerWatch(nodes=["a", "b"], stages=[0, 0], factor=1.5, steps=1)
    assert not any(feed(pair, [1.0, 5.0], 3))
