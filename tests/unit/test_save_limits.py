"""Failed saves fold into one report per save, and the two limits that stop checkpoint-less training."""

from __future__ import annotations

from farm.config import CheckpointConfig
from farm.controller.saves import SaveHistory, group_failures, ranks_text


def test_one_report_per_failed_save_with_its_ranks_and_cause() -> None:
    reports = [
        {"step": 8, "rank": 2, "error": "saving checkpoint step 8 failed: another rank aborted this save"},
        {"step": 8, "rank": 1, "error": "saving checkpoint step 8 failed: No space left on device (rank-1)"},
        {"step": 8, "rank": 0, "error": "part(s) rank-00001 were not written within 600 s"},
        {"step": 4, "rank": 0, "error": "saving checkpoint step 4 failed: No space left on device (rank-0)"},
    ]
    failures = group_failures(reports)
    assert [(f.step, f.ranks) for f in failures] == [(4, (0,)), (8, (0, 1, 2))]
    assert "No space left on device (rank-1)" in failures[1].detail, "the cause, not the collateral abort"
    assert ranks_text((0, 1, 2, 3, 7, 9, 10)) == "0-3, 7, 9-10"


def test_consecutive_failed_saves_stop_training_and_a_commit_resets_the_count() -> None:
    history = SaveHistory(CheckpointConfig(max_failed_saves=2, max_unsaved_s=0), last_valid=4, now=0.0)
    assert history.over_limit(now=1e9) is None, "no failed save: never stopped for time alone"
    (failure,) = group_failures([{"step": 8, "rank": 0, "error": "disk full"}])
    history.failed(failure)
    assert history.over_limit(now=10.0) is None
    history.committed(12, now=11.0)
    history.failed(failure)
    assert history.over_limit(now=12.0) is None, "a commit in between resets the count"
    history.failed(group_failures([{"step": 16, "rank": 3, "error": "disk full"}])[0])
    why = history.over_limit(now=13.0)
    assert why is not None and "2 checkpoint saves in a row failed" in why and "steps 8, 16" in why


def test_unsaved_time_stops_training_only_after_a_failed_save() -> None:
    history = SaveHistory(CheckpointConfig(max_failed_saves=0, max_unsaved_s=60), last_valid=None, now=100.0)
    history.failed(group_failures([{"step": 5, "rank": 0, "error": "EIO"}])[0])
    assert history.over_limit(now=150.0) is None
    why = history.over_limit(now=161.0)
    assert why is not None and "61 s have passed since training started" in why and "max_unsaved_s=60" in why


def test_a_save_is_reported_once_when_rank_0_ends_it_with_the_ranks_seen_by_then() -> None:
    history = SaveHistory(CheckpointConfig(), last_valid=2, now=0.0)
    full = {"step": 4, "rank": 1, "error": "No space left on device"}
    assert history.take([{"committed": [], "failed": []}, {"committed": [], "failed": [full]}]) == ([], [])
    aborted = {"step": 4, "rank": 0, "error": "another rank aborted this save"}
    committed, failures = history.take([{"committed": [], "failed": [aborted]}, {"committed": [], "failed": []}])
    assert committed == [] and [(f.step, f.ranks, f.detail) for f in failures] == [(4, (0, 1), full["error"])]
    late = {"step": 4, "rank": 2, "error": "another rank aborted this save"}
    assert history.take([{"committed": [6], "failed": []}, {"committed": [], "failed": [late]}]) == ([6], [])
