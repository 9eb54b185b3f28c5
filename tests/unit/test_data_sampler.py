"""The global order, the batch layout over DP ranks and the cursor (docs/design.md invariant 1)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from farm.data import BatchLayout, BatchSkips, DataCursor, GlobalOrder
from farm.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

FP = "f" * 64


def _step_ids(order: GlobalOrder, *, step: int, global_batch: int, micro_batch: int, dp: int) -> list[int]:
    """Every sample id step ``step`` reads, over all ranks and micro-batches of a DP degree."""
    ids: list[int] = []
    for rank in range(dp):
        layout = BatchLayout(global_batch=global_batch, micro_batch=micro_batch, dp_size=dp, dp_rank=rank)
        for micro in range(layout.grad_accum):
            ids += order.at(layout.positions(step, micro)).tolist()
    return ids


def test_order_is_a_pure_function() -> None:
    a, b = GlobalOrder(1000, 7, FP), GlobalOrder(1000, 7, FP)
    np.testing.assert_array_equal(a.permutation(3), b.permutation(3))
    np.testing.assert_array_equal(a.sample_ids(2500, 700), b.sample_ids(2500, 700))
    assert not np.array_equal(a.permutation(0), GlobalOrder(1000, 8, FP).permutation(0))
    assert not np.array_equal(a.permutation(0), GlobalOrder(1000, 7, "e" * 64).permutation(0))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    # Asking for epochs in another order does not change them (no hidden RNG state).
    late = GlobalOrder(1000, 7, FP)
    np.testing.assert_array_equal(late.permutation(5), a.permutation(5))
    np.testing.assert_array_equal(late.permutation(0), b.permutation(0))


def test_each_epoch_is_a_permutation() -> None:
    order = GlobalOrder(257, 1, FP)
    for epoch in range(4):
        assert sorted(order.permutation(epoch).tolist()) == list(range(257))
    ids = order.sample_ids(0, 257 * 3)
    assert all(sorted(ids[e * 257 : (e + 1) * 257].tolist()) == list(range(257)) for e in range(3))
    assert not order.permutation(0).flags.writeable


@pytest.mark.parametrize(("global_batch", "micro_batch"), [(32, 4), (48, 2), (64, 8)])
def test_dp_degrees_read_the_same_samples_per_step(global_batch: int, micro_batch: int) -> None:
    order = GlobalOrder(1000, 3, FP)
    straddling = 1000 // global_batch  # the step that holds the end of epoch 0 and the start of epoch 1
    for step in (0, 1, 7, straddling):
        want = sorted(order.sample_ids(step * global_batch, global_batch).tolist())
        for dp in (1, 2, 4):
            if global_batch % (micro_batch * dp):
                continue
            got = _step_ids(order, step=step, global_batch=global_batch, micro_batch=micro_batch, dp=dp)
            assert Counter(got) == Counter(want), (step, dp)


def test_positions_are_index_arithmetic() -> None:
    layout = BatchLayout(global_batch=24, micro_batch=3, dp_size=2, dp_rank=1)
    assert layout.grad_accum == 4
    # micro-batch a of rank r is global micro-batch a*dp + r: rank 1 takes 1, 3, 5, 7.
    assert [layout.start(5, a) for a in range(4)] == [5 * 24 + m * 3 for m in (1, 3, 5, 7)]
    np.testing.assert_array_equal(layout.positions(5, 2), np.arange(5 * 24 + 15, 5 * 24 + 18))
    covered = sorted(
        p
        for r in range(2)
        for a in range(4)
        for p in BatchLayout(global_batch=24, micro_batch=3, dp_size=2, dp_rank=r).positions(5, a).tolist()
    )
    assert covered == list(range(*layout.step_range(5)))
    with pytest.raises(ValueError, match="micro=4"):
        layout.positions(0, 4)


def test_step_straddling_an_epoch_boundary() -> None:
    order = GlobalOrder(100, 11, FP)
    layout = BatchLayout(global_batch=16, micro_batch=4, dp_size=2, dp_rank=0)
    # Step 6 covers positions 96..111: four from the end of epoch 0, twelve from the start of epoch 1.
    ids = np.concatenate([order.at(layout.positions(6, a)) for a in range(layout.grad_accum)])
    np.testing.assert_array_equal(ids[:4], order.permutation(0)[96:100])
    np.testing.assert_array_equal(ids[4:], order.permutation(1)[[4, 5, 6, 7]])
    everything = order.sample_ids(96, 16)
    np.testing.assert_array_equal(everything[:4], order.permutation(0)[96:])
    np.testing.assert_array_equal(everything[4:], order.permutation(1)[:12])
    assert order.epoch_of(99) == 0 and order.epoch_of(100) == 1


def test_layout_validation_names_the_fields() -> None:
    with pytest.raises(ConfigError, match=r"train\.global_batch=30 .* train\.micro_batch=4 x parallel\.dp=2"):
        BatchLayout(global_batch=30, micro_batch=4, dp_size=2, dp_rank=0)
    with pytest.raises(ConfigError, match="dp_rank=2"):
        BatchLayout(global_batch=32, micro_batch=4, dp_size=2, dp_rank=2)
    with pytest.raises(ConfigError, match="micro_batch=0"):
        BatchLayout(global_batch=32, micro_batch=0, dp_size=2, dp_rank=0)
    with pytest.raises(DataError, match="0 samples"):
        GlobalOrder(0, 1, FP)


def test_cursor_state_dict_round_trip_and_checks() -> None:
    order = GlobalOrder(1000, 5, FP)
    state = order.cursor(96).state_dict()
    assert state == {"version": 2, "consumed": 96, "fingerprint": FP, "seed": 5, "skipped": []}
    cursor = order.cursor()
    cursor.load_state_dict(state)
    assert cursor.consumed == 96 and cursor.start_step(global_batch=32) == 3
    with pytest.raises(DataError, match="whole number of steps"):
        cursor.start_step(global_batch=64)
    with pytest.raises(DataError, match="the data changed since the checkpoint"):
        DataCursor(fingerprint="0" * 64, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match=r"train\.seed=5, the config says 6"):
        DataCursor(fingerprint=FP, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="version"):
        cursor.load_state_dict({**state, "version": 3})
    with pytest.raises(DataError, match="non-negative integer"):
        cursor.load_state_dict({**state, "consumed": -1})


def test_a_step_trains_the_next_batch_that_is_not_skipped() -> None:
    skips = BatchSkips.of([9, 3, 4])
    assert skips.batches == (3, 4, 9)
    assert [skips.batch_of(s) for s in range(10)] == [0, 1, 2, 5, 6, 7, 8, 10, 11, 12]
    np.testing.assert_array_equal(skips.batches_of(np.arange(10)), [skips.batch_of(s) for s in range(10)])
    assert BatchSkips().batch_of(7) == 7
    assert skips.with_skip(0).batch_of(0) == 1 and skips.with_skip(4) == skips
    with pytest.raises(DataError, match="ascending"):
        BatchSkips((4, 3))


def test_a_skip_moves_later_steps_one_batch_on_in_every_layout() -> None:
    order, g = GlobalOrder(1000, 3, FP), 24
    skips = BatchSkips.of([6])
    for dp, b in ((1, 4), (2, 4), (6, 2), (3, 8)):
        positions: dict[int, list[int]] = {}
        for rank in range(dp):
            layout = BatchLayout(global_batch=g, micro_batch=b, dp_size=dp, dp_rank=rank, skips=skips)
            for step in range(10):
                for micro in range(layout.grad_accum):
                    positions.setdefault(step, []).extend(layout.positions(step, micro).tolist())
                assert layout.step_range(step) == (skips.batch_of(step) * g, (skips.batch_of(step) + 1) * g)
        for step in range(6):
            assert sorted(positions[step]) == list(range(step * g, (step + 1) * g)), "earlier steps unchanged"
        for step in range(6, 10):
            assert sorted(positions[step]) == list(range((step + 1) * g, (step + 2) * g)), "later ones one batch on"
    assert order.sample_ids(6 * g, g).size == g


def test_the_cursor_carries_the_skips_and_reads_a_version_1_cursor() -> None:
    order = GlobalOrder(1000, 5, FP)
    state = order.cursor(96, BatchSkips.of([2])).state_dict()
    assert state["skipped"] == [2]
    cursor = order.cursor()
    cursor.load_state_dict(state)
    assert cursor.skips == BatchSkips((2,)) and cursor.start_step(global_batch=32) == 3, "the step is not moved"
    old = {"version": 1, "consumed": 64, "fingerprint": FP, "seed": 5}
    cursor.load_state_dict(old)
    assert cursor.skips == BatchSkips() and cursor.consumed == 64
    with pytest.raises(DataError, match="global batch indices"):
        cursor.load_state_dict({**state, "skipped": ["2"]})
