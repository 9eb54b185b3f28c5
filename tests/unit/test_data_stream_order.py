"""The stream's reads are a speed-up only: the rows, their order and the cursor stay bit-identical.

The reference below is the stream as it was before rows were gathered in sorted order: positions
from BatchLayout one micro-batch at a time, sample ids from GlobalOrder, rows gathered in sample
order (the former ArrowShardSource.take, kept here), and the tokens checked once more against a
plain pyarrow read of the files.
"""

from __future__ import annotations

import hashlib
import random
import weakref
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

from farm.config import DataConfig
from farm.data import ArrowShardSource, BatchLayout, GlobalOrder, MicroBatchStream, load_manifest, prepare

pytestmark = pytest.mark.unit

WORDS = ["data", "order", "is", "a", "pure", "function", "of", "seed", "and", "epoch", "never", "rank"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ArrowShardSource, np.ndarray]]:
    root = tmp_path_factory.mktemp("order")
    rng = random.Random(1)
    (root / "t.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(90)) for _ in range(160)))
    # 1100-row shards of 512-row record batches: gathers cross batches and shards.
    cfg = DataConfig(
        dir=str(root / "d"), source=str(root / "t.txt"), vocab_size=270, seq_len=8, rows_per_shard=1100
    )
    prepare(cfg, progress=False)
    manifest = load_manifest(root / "d")
    tables = [pa.ipc.open_file(pa.memory_map(str(root / "d" / s.file))).read_all() for s in manifest.shards]
    every = np.concatenate(
        [t.column(0).combine_chunks().flatten().to_numpy().reshape(-1, manifest.row_len) for t in tables]
    )
    with ArrowShardSource(root / "d", manifest) as source:
        assert len(manifest.shards) >= 3 and len(source.shard_blocks(0)) >= 3
        yield source, every


def _old_take(source: ArrowShardSource, global_rows: np.ndarray) -> np.ndarray:
    """ArrowShardSource.take before the sorted gather: rows gathered in the asked order."""
    rows = source._checked(global_rows)
    block = np.searchsorted(source._block_start, rows, side="right") - 1
    offset = source._block_offset[block] + (rows - source._block_start[block]) * source.row_len
    shard = source._block_shard[block]
    out = np.empty((len(rows), source.row_len), dtype=np.int64)
    by_shard = np.argsort(shard, kind="stable")
    for group in np.split(by_shard, np.flatnonzero(np.diff(shard[by_shard])) + 1):
        if len(group):
            out[group] = source._windows[shard[group[0]]][offset[group]]
    return out


CASES = [  # seed, dp, rank, micro_batch, start_step, steps
    (1234, 1, 0, 4, 0, 30),
    (1234, 2, 1, 2, 17, 25),
    (0, 4, 3, 1, 90, 30),  # runs across the end of the first epoch
    (7, 2, 0, 4, 10**6, 6),  # a resume thousands of epochs in
]


@pytest.mark.parametrize(("seed", "dp", "rank", "b", "start", "steps"), CASES)
@pytest.mark.parametrize(("prefetch", "parcel"), [(0, 40), (3, 5), (3, 40)])
def test_stream_matches_the_former_reads(
    data: tuple[ArrowShardSource, np.ndarray],
    seed: int,
    dp: int,
    rank: int,
    b: int,
    start: int,
    steps: int,
    prefetch: int,
    parcel: int,
) -> None:
    """Parcels of 5 micro-batches take the per-row path; of 40, the sorted gather (over 32 rows)."""
    source, every = data
    order = GlobalOrder(source.total_rows, seed, source.manifest.fingerprint)
    layout = BatchLayout(global_batch=16, micro_batch=b, dp_size=dp, dp_rank=rank)
    with MicroBatchStream(
        source,
        order,
        layout,
        start_step=start,
        end_step=start + steps,
        prefetch=prefetch,
        parcel_tokens=parcel * b * source.row_len,
    ) as stream:
        got = list(stream)
        assert stream.consumed == (start + steps) * 16
    expected = [(s, m) for s in range(start, start + steps) for m in range(layout.grad_accum)]
    assert [(mb.step, mb.micro) for mb in got] == expected
    for mb, (step, micro) in zip(got, expected):
        ids = order.at(layout.positions(step, micro))
        np.testing.assert_array_equal(mb.sample_ids, ids)
        old = _old_take(source, ids)
        assert mb.tokens.dtype == old.dtype == np.int64
        np.testing.assert_array_equal(mb.tokens, old)
        np.testing.assert_array_equal(mb.tokens, every[ids])


def test_cursor_is_the_same_at_every_point(data: tuple[ArrowShardSource, np.ndarray]) -> None:
    source, _ = data
    order = GlobalOrder(source.total_rows, 5, source.manifest.fingerprint)
    layout = BatchLayout(global_batch=16, micro_batch=2, dp_size=2, dp_rank=0)  # 4 micro-batches a step
    with MicroBatchStream(source, order, layout, start_step=3, prefetch=2, parcel_tokens=3 * 2 * 9) as stream:
        assert stream.consumed == 3 * 16
        for handed in range(1, 14):
            mb = next(stream)
            assert stream.consumed == (3 + handed // 4) * 16, (handed, mb.step, mb.micro)
        assert stream.state_dict()["consumed"] == 6 * 16


def test_take_in_any_order_with_repeats_and_runs(data: tuple[ArrowShardSource, np.ndarray]) -> None:
    source, every = data
    n = source.total_rows
    rng = np.random.default_rng(0)
    cases = [
        np.arange(n),  # every record batch whole
        np.arange(300, 1900),  # consecutive, across batches and a shard boundary
        np.arange(1900, 300, -1),  # the same rows backwards
        np.array([0, 0, 2] * 12),  # repeats that span as many ids as a run would
        rng.integers(0, n, 500),  # random, with repeats
        np.concatenate([np.arange(40, 80), rng.permutation(n)[:60]]),
    ]
    for ids in cases:
        np.testing.assert_array_equal(source.take(ids), every[ids])
        np.testing.assert_array_equal(source.take(ids), _old_take(source, ids))


def _reference_ids(
    fingerprint: str, seed: int, n: int, layout: BatchLayout, step: int, micro: int
) -> list[int]:
    """docs/data.md written out: SeedSequence(sha256(fingerprint) words, seed, epoch) -> PCG64
    permutation per epoch; micro-batch ``micro`` of rank r in step k is global micro-batch
    micro * D + r, positions k * G + (micro * D + r) * b + j; position p is perm_{p // N}[p % N]."""
    words = hashlib.sha256(fingerprint.encode()).digest()
    entropy = [int.from_bytes(words[i : i + 8], "little") for i in range(0, 32, 8)] + [seed]
    ids = []
    for j in range(layout.micro_batch):
        p = step * layout.global_batch + (micro * layout.dp_size + layout.dp_rank) * layout.micro_batch + j
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*entropy, p // n])))
        ids.append(int(rng.permutation(n)[p % n]))
    return ids


@pytest.mark.parametrize(("seed", "dp", "rank", "b", "start", "steps"), CASES)
def test_stream_follows_the_documented_order(
    data: tuple[ArrowShardSource, np.ndarray], seed: int, dp: int, rank: int, b: int, start: int, steps: int
) -> None:
    """Each (step, rank) reads the samples the documented order names, one position at a time."""
    source, every = data
    fingerprint, n = source.manifest.fingerprint, source.total_rows
    layout = BatchLayout(global_batch=16, micro_batch=b, dp_size=dp, dp_rank=rank)
    order = GlobalOrder(n, seed, fingerprint)
    with MicroBatchStream(
        source, order, layout, start_step=start, end_step=start + steps, prefetch=0
    ) as stream:
        got = list(stream)
    assert len(got) == steps * layout.grad_accum
    for mb in got[:: max(1, len(got) // 12)]:  # a dozen micro-batches: a permutation per position
        ids = _reference_ids(fingerprint, seed, n, layout, mb.step, mb.micro)
        assert mb.sample_ids.tolist() == ids
        np.testing.assert_array_equal(mb.tokens, every[ids])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_buffers_are_reused_only_when_nothing_refers_to_them(
    data: tuple[ArrowShardSource, np.ndarray], prefetch: int
) -> None:
    """Rows the consumer keeps (an array, a tensor, one row of it) are never written over, while the
    parcels it let go of are written into again."""
    torch = pytest.importorskip("torch")
    source, every = data
    order = GlobalOrder(source.total_rows, 3, source.manifest.fingerprint)
    layout = BatchLayout(global_batch=16, micro_batch=4, dp_size=1, dp_rank=0)
    kept: list[tuple[np.ndarray, object]] = []
    pinned: set[int] = set()  # parcels whose rows are kept to the end
    seen: dict[int, weakref.ref[np.ndarray]] = {}  # the buffers, not held: holding one stops its reuse
    parcels = reused = 0
    with MicroBatchStream(
        source, order, layout, end_step=400, prefetch=prefetch, parcel_tokens=40 * 4 * 9
    ) as stream:
        keep = stream._buffers.keep
        for i, mb in enumerate(stream):
            if mb.micro == 0 and mb.step % 10 == 0:  # the first micro-batch of a parcel of 40
                parcels += 1
                known = seen.get(id(mb.tokens.base))
                reused += known is not None and known() is mb.tokens.base
                seen[id(mb.tokens.base)] = weakref.ref(mb.tokens.base)
            if i % 331 < 3:
                pinned.add(i // 40)
            if i % 331 == 0:
                kept.append((mb.sample_ids, mb.tokens))
            elif i % 331 == 1:
                kept.append((mb.sample_ids, torch.from_numpy(mb.tokens)))
            elif i % 331 == 2:
                kept.append((mb.sample_ids[1:2], mb.tokens[1:2, :-1]))
    assert parcels == 40 and len(pinned) == 5
    # A count of buffers, not a timing: every parcel not written into a used buffer was a new one.
    # Read in this thread, only the parcel being read and the one whose last micro-batch the loop
    # still holds are in flight, so a new buffer is needed for them and for each pinned parcel.
    # Read ahead, up to ``keep`` parcels are in flight at once, and a pinned parcel may also push
    # one in flight out of the pool before it has become the least recently used (so 2 per pin).
    new_at_most = len(pinned) + 2 if prefetch == 0 else keep + 2 * len(pinned)
    assert parcels - reused <= new_at_most, (parcels, reused, keep)
    for ids, tokens in kept:
        held = tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens
        np.testing.assert_array_equal(held, every[ids][:, : held.shape[1]])
