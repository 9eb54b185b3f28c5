"""The time model against published runs (docs/calibration.md records the same tables)."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.plan.calibration import RUNS, predict, report, spearman, summary, sweeps, table

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "calibration.md"


def test_the_data_set_has_cited_runs_in_both_splits_on_a100_and_h100() -> None:
    assert len(RUNS) >= 20 and len({r.name for r in RUNS}) == len(RUNS)
    assert all(r.source and r.split in ("calibration", "validation") for r in RUNS)
    for split in ("calibration", "validation"):
        assert {r.accelerator.split("-")[0] for r in RUNS if r.split == split} >= {"A100", "H100"}
    assert all(r.devices == r.nodes * 8 for r in RUNS), "the layout uses the whole cut farm"


def test_megatron_hardware_flops_drop_the_recomputed_forward() -> None:
    run = next(r for r in RUNS if r.name == "Megatron-LM 1T 3072 A100")
    # 163 TFLOP/s "hardware" (with recomputation) is 52% of 312; model FLOPs are about 3/4 of it.
    assert run.published_mfu == pytest.approx(163 / 312 * 0.75, rel=0.01)


def test_a_step_time_converts_with_the_model_flops() -> None:
    run = next(r for r in RUNS if r.kind == "step_time_s")
    tokens = run.global_batch * run.shape.seq_len
    assert run.published_mfu == pytest.approx(
        run.shape.flops_per_token * tokens / (run.published * run.devices * 312e12)
    )


def test_predicted_parts_add_up_to_the_step() -> None:
    pred = predict(RUNS[0])
    assert sum(pred["terms"].values()) == pytest.approx(pred["step_time_s"], rel=1e-9)


def test_summary_and_rank_correlation() -> None:
    rows = [
        {"split": "validation", "accelerator": "A100-SXM4-80GB", "error": 0.02},
        {"split": "validation", "accelerator": "H100-SXM5-80GB", "error": -0.04},
    ]
    s = summary(rows)
    assert s["validation all"] == {"runs": 2, "mae": pytest.approx(3.0), "bias": pytest.approx(-1.0)}
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_the_documented_tables_are_current() -> None:
    assert report(table()) in DOC.read_text()


def test_the_emulated_farms_share_one_fitted_per_core_rate_and_the_documented_table_is_current() -> None:
    import yaml

    from farm.plan.selfcheck import markdown, per_core_peak, predict

    local, farm6 = (
        yaml.safe_load((DOC.parents[1] / "topologies" / f"{n}.yaml").read_text())
        for n in ("local", "local-farm")
    )
    assert per_core_peak(local) == pytest.approx(per_core_peak(farm6), rel=1e-3)
    rows = predict()
    assert len(rows) == 7 and all(r["predicted_s"] > 0 for r in rows)
    assert markdown(rows) in (DOC.parent / "planner.md").read_text()


def test_the_calibration_split_tells_a_cost_per_stage_from_one_per_block() -> None:
    # A fixed cost per stage and micro-batch and one per block give the same step times when every
    # run has the same blocks per stage; the fitted stack needs calibration runs with different ones.
    stack = [r for r in RUNS if r.runtime == "megatron-deepspeed" and r.split == "calibration"]
    assert len({r.model.n_layers // r.pp for r in stack}) >= 3
    assert len({r.micro_batch for r in stack}) >= 3


def test_validation_errors_and_layout_sweeps_meet_their_targets() -> None:
    rows = table()
    s = summary(rows)
    for acc in ("A100-SXM4-80GB", "H100-SXM5-80GB"):
        assert s[f"validation {acc}"]["mae"] <= 3.0 and abs(s[f"validation {acc}"]["bias"]) <= 1.5
    held_out = {r["sweep"] for r in rows if r["sweep"] and r["split"] == "validation"}
    rho = sweeps(rows)
    # The 12-layout sweep of TP degrees misses the 0.7 target (docs/calibration.md says why).
    assert len(held_out) >= 4 and all(rho[name] >= 0.5 for name in held_out)
    assert sum(rho[name] >= 0.7 for name in held_out) >= 3
