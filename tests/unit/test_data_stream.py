"""MicroBatchStream on real shards: DP-independent steps, resume, epochs, prefetch thread."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from farm.config import DataConfig
from farm.data import (
    ArrowShardSource,
    BatchLayout,
    GlobalOrder,
    MicroBatch,
    MicroBatchStream,
    load_manifest,
    prepare,
)
from farm.data.sampler import BatchSkips, DataCursor
from farm.data.stream import PARCEL_TOKENS

pytestmark = pytest.mark.unit

WORDS = ["the", "farm", "trains", "a", "model", "on", "tokens", "from", "packed", "shards", "while"]
G = 16


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArrowShardSource]:
    root = tmp_path_factory.mktemp("stream")
    rng = random.Random(0)
    (root / "a.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(40)))
    cfg = DataConfig(
        dir=str(root / "data"), source=str(root / "a.txt"), vocab_size=280, seq_len=8, rows_per_shard=300
    )
    prepare(cfg, progress=False)
    manifest = load_manifest(root / "data")
    with ArrowShardSource(root / "data", manifest) as src:
        yield src


def _order(source: ArrowShardSource, seed: int = 1234) -> GlobalOrder:
    return GlobalOrder(source.manifest.total_rows, seed, source.manifest.fingerprint)


def _stream(
    source: ArrowShardSource, *, dp: int = 1, rank: int = 0, b: int = 2, **kw: int
) -> MicroBatchStream:
    """A stream with parcels of 3 micro-batches unless told otherwise: tests cross many parcels."""
    layout = BatchLayout(global_batch=G, micro_batch=b, dp_size=dp, dp_rank=rank)
    kw.setdefault("parcel_tokens", 3 * b * source.row_len)
    return MicroBatchStream(source, _order(source), layout, **kw)


def _collect(stream: MicroBatchStream) -> list[MicroBatch]:
    with stream:
        return list(stream)


def test_yields_steps_and_micro_batches_in_order(source: ArrowShardSource) -> None:
    batches = _collect(_stream(source, dp=2, rank=1, b=2, start_step=3, end_step=6))
    assert [(mb.step, mb.micro) for mb in batches] == [(s, a) for s in (3, 4, 5) for a in range(4)]
    order = _order(source)
    layout = BatchLayout(global_batch=G, micro_batch=2, dp_size=2, dp_rank=1)
    for mb in batches:
        assert mb.tokens.dtype == np.int64 and mb.tokens.shape == (2, source.row_len)
        np.testing.assert_array_equal(mb.sample_ids, order.at(layout.positions(mb.step, mb.micro)))
        np.testing.assert_array_equal(mb.tokens, source.take(mb.sample_ids))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_parcel_size_does_not_change_the_stream(source: ArrowShardSource, prefetch: int) -> None:
    small = _collect(_stream(source, dp=2, rank=1, end_step=40, prefetch=prefetch))
    whole = _collect(
        _stream(source, dp=2, rank=1, end_step=40, prefetch=prefetch, parcel_tokens=PARCEL_TOKENS)
    )
    assert len(small) == len(whole) == 40 * 4
    for a, b in zip(small, whole):
        assert (a.step, a.micro) == (b.step, b.micro)
        np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.parametrize("b", [1, 2, 4])
def test_dp_degrees_read_the_same_rows_per_step(source: ArrowShardSource, b: int) -> None:
    steps = source.total_rows // G + 3  # runs past the end of the first epoch
    per_dp = {}
    for dp in (1, 2, 4):
        if G % (b * dp):
            continue
        rows: dict[int, list[tuple[int, ...]]] = {}
        for rank in range(dp):
            for mb in _collect(_stream(source, dp=dp, rank=rank, b=b, end_step=steps, prefetch=8)):
                rows.setdefault(mb.step, []).extend(tuple(r) for r in mb.tokens.tolist())
        per_dp[dp] = {step: sorted(r) for step, r in rows.items()}
    assert len(per_dp) >= 2
    first = next(iter(per_dp.values()))
    assert len(first) == steps and all(len(r) == G for r in first.values())
    assert all(other == first for other in per_dp.values())


def test_resume_from_a_cursor_is_the_identical_continuation(source: ArrowShardSource) -> None:
    full = _collect(_stream(source, dp=2, rank=0, end_step=12))
    stream = _stream(source, dp=2, rank=0, prefetch=3)
    with stream:
        for mb in stream:
            if (mb.step, mb.micro) == (7, 0):
                break  # step 7 was begun, not finished: the cursor stays after step 6
        state = stream.state_dict()
    assert state["consumed"] == 7 * G
    cursor = DataCursor(fingerprint=source.manifest.fingerprint, seed=1234)
    cursor.load_state_dict(state)
    start = cursor.start_step(global_batch=G)
    resumed = _collect(_stream(source, dp=2, rank=0, start_step=start, end_step=12))
    tail = [mb for mb in full if mb.step >= 7]
    assert [(mb.step, mb.micro) for mb in resumed] == [(mb.step, mb.micro) for mb in tail]
    for a, b in zip(resumed, tail):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_resume_far_ahead_reads_nothing_before(source: ArrowShardSource) -> None:
    step = 10**7  # hundreds of thousands of epochs in: O(1), nothing before it is read
    with _stream(source, start_step=step) as stream:
        mb = next(stream)
    order = _order(source)
    assert (mb.step, mb.micro) == (step, 0)
    np.testing.assert_array_equal(mb.sample_ids, order.sample_ids(step * G, 2))
    assert order.epoch_of(step * G) > 10**5


def test_epochs_cover_every_row_once(source: ArrowShardSource) -> None:
    n = source.total_rows
    steps = 2 * n // G + 1
    ids = np.concatenate([mb.sample_ids for mb in _collect(_stream(source, b=4, end_step=steps, prefetch=0))])
    assert sorted(ids[:n].tolist()) == list(range(n)) and sorted(ids[n : 2 * n].tolist()) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n])


def test_prefetch_is_bounded_and_close_stops_the_thread(source: ArrowShardSource) -> None:
    assert _stream(source, b=1, parcel_tokens=PARCEL_TOKENS).parcel_size == PARCEL_TOKENS // source.row_len
    stream = _stream(source, prefetch=5, b=1, parcel_tokens=50 * source.row_len)
    next(stream)
    deadline = time.monotonic() + 5
    while stream._queue.qsize() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # a producer that ignored the bound would have queued more by now
    assert stream._queue.maxsize == 1 and stream._queue.qsize() == 1  # 5 micro-batches: one parcel of 50
    thread = stream._thread
    assert thread is not None and thread.daemon and thread.is_alive()
    stream.close()
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(stream)
    big = _stream(source, prefetch=10, b=1)
    assert big.parcel_size == 3 and big._queue.maxsize == 4
    big.close()


def test_errors_in_the_thread_reach_the_consumer(source: ArrowShardSource) -> None:
    # An order for more samples than the shards hold: the producer's read fails on a real row id.
    order = GlobalOrder(source.total_rows * 10, 1, source.manifest.fingerprint)
    layout = BatchLayout(global_batch=G, micro_batch=4, dp_size=1, dp_rank=0)
    stream = MicroBatchStream(source, order, layout, prefetch=2)
    with pytest.raises(IndexError, match="row ids must be in"):
        for _ in stream:
            pass
    with pytest.raises(IndexError):  # and it stays failed
        next(stream)
    stream.close()
    assert not any(t.name == "farm-data-prefetch" and t.is_alive() for t in threading.enumerate())


def test_a_skipped_batch_is_read_by_no_rank_and_the_cursor_keeps_it(source: ArrowShardSource) -> None:
    skips = BatchSkips.of([4])
    order = _order(source)
    rows: dict[int, list[int]] = {}
    for rank in range(2):
        layout = BatchLayout(global_batch=G, micro_batch=2, dp_size=2, dp_rank=rank, skips=skips)
        stream = MicroBatchStream(source, order, layout, start_step=2, end_step=8, parcel_tokens=3 * 2 * source.row_len)
        with stream:
            for mb in stream:
                rows.setdefault(mb.step, []).extend(mb.sample_ids.tolist())
                np.testing.assert_array_equal(mb.tokens, source.take(mb.sample_ids))
            assert stream.state_dict()["skipped"] == [4] and stream.consumed == 8 * G
    for step in range(2, 8):
        batch = step + (step >= 4)
        assert sorted(rows[step]) == sorted(order.sample_ids(batch * G, G).tolist()), step
