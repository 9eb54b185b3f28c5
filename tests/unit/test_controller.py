"""The controller's state machine, stepped with a fake worker group: no Ray, milliseconds a test.

The fake group trains a made-up loss, commits the checkpoints it is asked for, and raises the
worker faults a script names at the (attempt, step) it names. The cluster view is a list the
test edits, as ``ray.nodes()`` would change when a node dies or comes back.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from farm.config import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)
from farm.controller.controller import Controller
from farm.controller.decisions import WorkerFault
from farm.controller.policy import AbortPolicy, ElasticPolicy
from farm.controller.states import RunParts
from farm.controller.worker_group import WorkerFailed
from farm.data import BatchSkips, GlobalOrder
from farm.data.skips import read_skipped
from farm.errors import WorkerFailure
from farm.plan import make_plan
from farm.topology import Farm, load_farm
from farm.tracking import Tracker, read_events, read_metrics

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(**{**yaml.safe_load((ROOT / "conf" / "model" / "gpt-tiny.yaml").read_text()),
                      "vocab_size": 4096})
TRAIN = TrainConfig(global_batch=24, micro_batch=4, steps=20)
DP_ONLY = ParallelConfig(dp="auto", tp=1, pp=1)
ORDER = GlobalOrder(1000, 0, "fake-data")


class Cluster:
    """What ``ray.nodes()`` would say: one live Ray node per farm node that is up."""

    def __init__(self, nodes: list[str]) -> None:
        self.up = set(nodes)

    def __call__(self) -> list[dict[str, Any]]:
        return [{"Alive": True, "Resources": {f"farm_node:{n}": 1.0}} for n in sorted(self.up)]


def fake_group(script: dict[tuple[int, int], tuple[str, str]], cluster: Cluster, log: list[Any],
               slow: dict[str, float] | None = None, nan: set[tuple[int, int]] | None = None,
               nan_batches: set[int] | None = None) -> type:
    """A WorkerGroup stand-in; ``script[(attempt, step)] = (node, kind)`` fails that step there;
    ranks on a node of ``slow`` report that many times the others' compute time. The loss is not
    finite at ``nan``'s (attempt, step) and on every step that trains a global batch of
    ``nan_batches``, as the skipped batches the controller hands to setup map steps to batches."""

    class FakeGroup:
        made = 0

        def __init__(self, *, farm: Farm, plan: Any, run_dir: str, startup_timeout_s: float) -> None:
            self.attempt, FakeGroup.made = FakeGroup.made, FakeGroup.made + 1
            self.plan, self.step, self.committed, self.skips = plan, 0, [], BatchSkips()
            self.infos = [{"ip": "127.0.0.1", "pid": 1000 + r.rank, "node_id": r.node} for r in plan.ranks]
            log.append(("group", self.attempt, plan.dp, plan.grad_accum, sorted({r.node for r in plan.ranks})))

        def _fail_if_scripted(self, step: int) -> None:
            where = script.get((self.attempt, step))
            if where is None:
                return
            node, kind = where
            if kind == "node_lost":
                cluster.up.discard(node)
            rank = next(r.rank for r in self.plan.ranks if r.node == node)
            fault = WorkerFault(rank=rank, node=node, kind=kind, detail="scripted")
            raise WorkerFailed(f"step {step}: worker rank {rank} on node {node} {kind}", fault)

        def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
            ranks = range(self.plan.world_size)
            if method == "pick_port":
                return [12345]
            if method == "setup":
                self.step = kwargs["resume_step"]
                self.skips = BatchSkips.of(kwargs["skipped"])
                log.append(("setup", self.attempt, self.step, self.skips.batches))
                if kwargs.get("memory") is not None:
                    log.append(("memory", self.attempt, kwargs["memory"]["step"]))
                self._fail_if_scripted(-1)  # -1: fail while starting up
                return [{"rank": r, "step": self.step, "params": 1, "load_s": 0.0} for r in ranks]
            if method == "run_steps":
                self._fail_if_scripted(self.step + 1)
                self.step += 1
                batch = self.skips.batch_of(self.step - 1)
                bad = (self.attempt, self.step) in (nan or set()) or batch in (nan_batches or set())
                loss = float("nan") if bad else 10.0 / self.step
                report = {"step": self.step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0,
                          "samples": self.step * TRAIN.global_batch}
                return [[{**report, "compute_s": 0.01 * (slow or {}).get(r.node, 1.0)}]
                        for r in sorted(self.plan.ranks, key=lambda r: r.rank)]
            if method == "save":
                self.committed.append(kwargs["step"])
                log.append(("save", self.attempt, kwargs["step"]))
                return [None for _ in ranks]
            if method == "replicate_to":
                log.append(("replicate_to", self.attempt))
                return [None for _ in ranks]
            if method in ("committed", "wait_save"):
                done, self.committed = self.committed, []
                return [{"committed": done if r == 0 else [], "failed": []} for r in ranks]
            raise AssertionError(method)

        def shutdown(self, *, graceful: bool) -> None:
            log.append(("shutdown", self.attempt))

    return FakeGroup


def local_farm(spares: int = 0) -> Farm:
    raw = yaml.safe_load((ROOT / "topologies" / "local-farm.yaml").read_text())
    raw["pools"][0]["spares"] = spares
    return load_farm(raw)


def make(tmp_path: Path, *, script: dict[tuple[int, int], tuple[str, str]], spares: int = 0,
         policy: Any = None, slow: dict[str, float] | None = None, nan: set[tuple[int, int]] | None = None,
         nan_batches: set[int] | None = None, run: RunConfig | None = None,
         replicas: Any = None) -> tuple[Controller, Cluster, list[Any]]:
    farm = local_farm(spares)
    plan = make_plan(model=TINY, train=TRAIN, parallel=DP_ONLY, farm=farm)
    parts = RunParts(farm=farm, plan=plan, model=TINY, train=TRAIN, parallel=DP_ONLY, data=DataConfig(),
                     checkpoint=CheckpointConfig(every=5, memory_every=1 if replicas else 0), run=run or RunConfig(dir=str(tmp_path)), run_dir=tmp_path,
                     vocab_size=4096, decay_steps=20, precision="fp32", order=ORDER)
    tracker = Tracker(TrackingConfig(wandb=False, console=False), run_dir=tmp_path, run_name="t", config={},
                      total_steps=TRAIN.steps, start_step=0)
    cluster = Cluster([n.id for n in (*farm.nodes, *farm.spares)])
    log: list[Any] = []
    cls = type("WithReplicas", (Controller,), {"replicas_cls": replicas}) if replicas else Controller
    controller = cls(parts, tracker=tracker, policy=policy or ElasticPolicy())
    controller.worker_group_cls = fake_group(script, cluster, log, slow, nan, nan_batches)
    controller.cluster_nodes = cluster
    # The checkpoints the fake group committed are the restore points.
    controller._restore_point = lambda: (  # type: ignore[method-assign]
        (str(tmp_path / f"step-{controller.last_checkpoint}"), controller.last_checkpoint)
        if controller.last_checkpoint is not None else (None, 0))
    return controller, cluster, log


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run_dir) if e["event"] == kind]


def test_a_lost_node_is_replanned_away_and_the_run_ends_with_every_step_once(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={(0, 7): ("node-1", "node_lost")})
    finished = controller.run(resume_path=None, resume_step=0)
    assert (finished.step, finished.reason) == (20, "done")
    groups = [entry for entry in log if entry[0] == "group"]
    assert groups[0][1:4] == (0, 6, 1) and groups[1][1:4] == (1, 4, 3)  # dp6 -> dp4, grad_accum 1 -> 3
    assert "node-1" not in groups[1][4]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 21))  # steps 6, 7 redone and logged once
    assert rows[5]["layout"] == {"dp": 4, "tp": 1, "pp": 1} and rows[4]["layout"]["dp"] == 6
    (decision,) = [e for e in events(tmp_path, "decision")]
    assert decision["decision"] == "shrink"
    (restore,) = events(tmp_path, "restore")
    assert restore["step"] == 5 and restore["source"] == "disk"
    assert restore["message"].startswith("node-1 node_lost at step 6: shrink dp6 -> dp4 (grad_accum 1 -> 3, "
                                         "global batch 24), restored step 5 from disk in "), restore
    (recovery,) = events(tmp_path, "recovery")
    assert recovery["lost_steps"] == 1 and recovery["layout"] == {"dp": 4, "tp": 1, "pp": 1}
    assert {"mttr_s", "detect_s", "replan_s", "restart_s", "restore_s", "redo_s"} <= set(recovery)
    assert "node-1 node_lost at step 6" in recovery["message"]


def test_a_spare_takes_the_lost_nodes_place_and_the_layout_stays(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={(0, 4): ("node-2", "node_lost")}, spares=1)
    controller.run(resume_path=None, resume_step=0)
    groups = [entry for entry in log if entry[0] == "group"]
    assert groups[1][1:5] == (1, 6, 1, ["node-0", "node-1", "node-3"])
    assert events(tmp_path, "decision")[0]["decision"] == "replace_with_spare"
    assert events(tmp_path, "restore")[0]["source"] == "none"  # no checkpoint before step 4: from step 0


def test_a_node_that_comes_back_is_taken_in_at_the_next_checkpoint_boundary(tmp_path: Path) -> None:
    controller, cluster, log = make(tmp_path, script={(0, 3): ("node-1", "node_lost")})
    original = controller.worker_group_cls

    class Returning(original):  # type: ignore[misc, valid-type]
        def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
            if method == "run_steps" and self.attempt == 1 and self.step == 7:
                cluster.up.add("node-1")  # repaired while step 8 trains
            return super().call(method, *args, **kwargs)

    controller.worker_group_cls = Returning
    assert controller.run(resume_path=None, resume_step=0).step == 20
    groups = [entry for entry in log if entry[0] == "group"]
    assert [g[2] for g in groups] == [6, 4, 6]
    (rejoin,) = events(tmp_path, "rejoin")
    assert rejoin["step"] == 10 and rejoin["nodes"] == ["node-1"]
    assert [e["decision"] for e in events(tmp_path, "decision")] == ["shrink", "grow"]
    assert ("save", 1, 10) in log  # the boundary's checkpoint is written before the group goes
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 21))
    assert read_metrics(tmp_path)[10]["layout"]["dp"] == 6


def test_a_worker_that_dies_twice_on_one_node_gets_the_node_excluded(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={(0, 2): ("node-0", "died"), (1, 1): ("node-0", "died")})
    controller.run(resume_path=None, resume_step=0)
    assert [e["decision"] for e in events(tmp_path, "decision")] == ["restart", "shrink"]
    groups = [entry for entry in log if entry[0] == "group"]
    assert [g[2] for g in groups] == [6, 6, 4] and "node-0" not in groups[2][4]


def test_a_second_node_lost_while_the_recovery_starts_leads_to_a_new_decision(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={(0, 6): ("node-1", "node_lost"), (1, -1): ("node-2", "node_lost")})
    controller.run(resume_path=None, resume_step=0)
    groups = [entry for entry in log if entry[0] == "group"]
    assert [g[2] for g in groups] == [6, 4, 2]
    assert [e["decision"] for e in events(tmp_path, "decision")] == ["shrink", "shrink"]


def test_losing_every_node_stops_with_the_newest_checkpoint_named(tmp_path: Path) -> None:
    script = {(0, 7): ("node-1", "node_lost"), (1, 7): ("node-2", "node_lost"), (2, 7): ("node-0", "node_lost")}
    controller, _, _ = make(tmp_path, script=script)
    with pytest.raises(WorkerFailure, match=r"0 device\(s\) left.*resume from checkpoint step 5"):
        controller.run(resume_path=None, resume_step=0)
    assert events(tmp_path, "decision")[-1]["decision"] == "abort"


def test_the_abort_policy_ends_the_run_at_the_first_fault(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={(0, 3): ("node-1", "node_lost")}, policy=AbortPolicy())
    with pytest.raises(WorkerFailure, match="re-run the same command"):
        controller.run(resume_path=None, resume_step=0)
    assert [entry for entry in log if entry[0] == "group"] == [("group", 0, 6, 1, ["node-0", "node-1", "node-2"])]
    assert dataclasses.asdict(controller.attempt.plan)["dp"] == 6


def test_a_straggler_is_reported_once_and_kept_by_default(tmp_path: Path) -> None:
    run = RunConfig(dir=str(tmp_path), straggler_steps=6)
    controller, _, log = make(tmp_path, script={}, slow={"node-2": 2.0}, run=run)
    finished = controller.run(resume_path=None, resume_step=0)
    assert finished.step == 20
    found = events(tmp_path, "straggler")
    assert len(found) == 2, "one event per slow rank (node-2 has two), once each"
    assert {e["node"] for e in found} == {"node-2"} and all(e["step"] == 6 and e["slowdown"] == 2.0 for e in found)
    assert not events(tmp_path, "failure") and [entry[0] for entry in log].count("group") == 1


def test_an_excluded_straggler_is_replanned_away(tmp_path: Path) -> None:
    run = RunConfig(dir=str(tmp_path), straggler_steps=6, exclude_stragglers=True)
    controller, _, log = make(tmp_path, script={}, slow={"node-2": 2.0}, run=run,
                              policy=ElasticPolicy(exclude_stragglers=True))
    finished = controller.run(resume_path=None, resume_step=0)
    assert finished.step == 20
    failure = events(tmp_path, "failure")[0]
    assert failure["fault"] == "straggler" and failure["node"] == "node-2" and failure["step"] == 6
    assert events(tmp_path, "decision")[0]["decision"] == "shrink"
    # The node was still up: step 6 was saved before it left, so the re-plan redoes nothing.
    assert 6 in [e["step"] for e in events(tmp_path, "checkpoint")]
    assert events(tmp_path, "restore")[0]["step"] == 6 and events(tmp_path, "recovery")[0]["lost_steps"] == 0
    groups = [entry for entry in log if entry[0] == "group"]
    assert groups[-1][4] == ["node-0", "node-1"], "node-2 is out of the layout"
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 21))


def test_a_non_finite_loss_once_is_rolled_back_and_re_run(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={}, nan={(0, 7)})
    finished = controller.run(resume_path=None, resume_step=0)
    assert finished.step == 20
    failure = events(tmp_path, "failure")[0]
    assert failure["fault"] == "nonfinite" and failure["step"] == 6 and "positions 144..167" in failure["detail"]
    assert events(tmp_path, "decision")[0]["decision"] == "rollback"
    assert events(tmp_path, "restore")[0]["step"] == 5
    assert events(tmp_path, "transient_fault")[0]["step"] == 7
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 21))
    groups = [entry for entry in log if entry[0] == "group"]
    assert groups[1][1:4] == (1, 6, 1), "same layout: the math, not a node, failed"


def test_a_batch_non_finite_twice_is_skipped_and_the_run_trains_to_the_end(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={}, nan_batches={6})  # step 7 trains batch 6 until it is skipped
    finished = controller.run(resume_path=None, resume_step=0)
    assert (finished.step, finished.reason) == (20, "done")
    assert [e["decision"] for e in events(tmp_path, "decision")] == ["rollback", "skip_batch"]
    (skip,) = events(tmp_path, "skip_batch")
    assert skip["step"] == 7 and skip["batch"] == 6 and skip["positions"] == "144..167" and skip["executed"]
    assert skip["samples"] == ORDER.sample_ids(144, 24).tolist()
    assert "step 7 now trains positions 168..191" in skip["message"]
    (record,) = read_skipped(tmp_path)
    assert (record.batch, record.step, record.positions) == (6, 7, (144, 168))
    setups = [entry for entry in log if entry[0] == "setup"]
    assert setups == [("setup", 0, 0, ()), ("setup", 1, 5, ()), ("setup", 2, 5, (6,))], "restored from step 5"
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 21)), "train.steps steps, each once"
    assert not events(tmp_path, "transient_fault"), "a skipped batch is no transient fault"
    assert controller.skips.batch_of(19) == 20, "the last step trains one batch further on"


def test_a_skip_is_kept_by_a_later_recovery_and_by_a_new_process(tmp_path: Path) -> None:
    controller, _, log = make(tmp_path, script={(2, 12): ("node-1", "node_lost")}, nan_batches={6})
    assert controller.run(resume_path=None, resume_step=0).step == 20
    setups = [entry for entry in log if entry[0] == "setup"]
    assert setups[-1] == ("setup", 3, 10, (6,)), "the re-plan after the node loss still skips batch 6"
    # A new launch resuming from a checkpoint older than the skip (step 5) reads the run directory's record.
    again, _, log = make(tmp_path, script={}, nan_batches={6})
    assert again.run(resume_path=str(tmp_path / "step-5"), resume_step=5).step == 20
    assert [entry for entry in log if entry[0] == "setup"] == [("setup", 0, 5, (6,))]
    assert len(events(tmp_path, "skip_batch")) == 1, "no second skip: batch 6 is never trained again"


def test_a_third_non_finite_event_stops_the_run_naming_the_newest_checkpoint(tmp_path: Path) -> None:
    controller, _, _ = make(tmp_path, script={}, nan_batches={6, 7})  # the batch after the skipped one too
    with pytest.raises(WorkerFailure, match=r"3 non-finite-loss events \(limit 3\); the newest valid checkpoint is "
                                            r"step 5.*resume from checkpoint step 5") as err:
        controller.run(resume_path=None, resume_step=0)
    assert err.value.exit_code == 4
    assert [e["decision"] for e in events(tmp_path, "decision")] == ["rollback", "skip_batch", "abort"]
    assert [f["detail"].split("global positions ")[1] for f in events(tmp_path, "failure")] == [
        "144..167)", "144..167)", "168..191)"]
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 7)), "no non-finite step is logged"


def fake_replicas(answers: list[Any], asked: list[tuple[int, int]]) -> type:
    """The replica holders' driver side, answering ``restore_source`` from ``answers`` in turn: a step
    (a sound snapshot of it) or the reason there is none."""
    from farm.controller.replicas import MemorySource

    class FakeReplicas:
        newest = None
        snapshot_bytes = 0

        def __init__(self, **_: Any) -> None:
            pass

        def place(self, plan: Any, infos: Any) -> dict[int, list[Any]]:
            return {r.rank: [] for r in plan.ranks}

        def note(self, outcomes: Any, world: int) -> tuple[list[str], None]:
            return [], None

        def restore_source(self, *, not_before: int, not_after: int) -> tuple[Any, str]:
            asked.append((not_before, not_after))
            answer = answers.pop(0)
            if isinstance(answer, str):
                return None, answer
            return MemorySource("a0", answer, "", {}), ""

        def close(self) -> None:
            pass

    return FakeReplicas


def test_a_recovery_restores_from_memory_when_a_snapshot_is_newer_than_disk(tmp_path: Path) -> None:
    asked: list[tuple[int, int]] = []
    controller, _, log = make(tmp_path, script={(0, 7): ("node-1", "node_lost")},
                              replicas=fake_replicas([6], asked))
    assert controller.run(resume_path=None, resume_step=0).step == 20
    assert asked == [(5, 6)], "no older than the checkpoint of step 5, no newer than the last step done"
    assert ("memory", 1, 6) in log and ("replicate_to", 1) in log
    (restore,) = events(tmp_path, "restore")
    assert restore["source"] == "memory" and restore["step"] == 6 and restore["lost_steps"] == 0
    (recovery,) = events(tmp_path, "recovery")
    assert recovery["source"] == "memory" and recovery["lost_steps"] == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 21))


def test_a_recovery_falls_back_to_disk_with_an_event_when_memory_has_no_sound_snapshot(tmp_path: Path) -> None:
    why = "the snapshot of step 6 is corrupt: part rank-00000-p0 (checksum mismatch)"
    controller, _, log = make(tmp_path, script={(0, 7): ("node-1", "node_lost")},
                              replicas=fake_replicas([why], []))
    assert controller.run(resume_path=None, resume_step=0).step == 20
    (fallback,) = events(tmp_path, "memory_fallback")
    assert fallback["reason"] == why and fallback["disk_step"] == 5
    (restore,) = events(tmp_path, "restore")
    assert restore["source"] == "disk" and restore["step"] == 5 and restore["lost_steps"] == 1
    assert not [entry for entry in log if entry[0] == "memory"]


def test_a_memory_restore_the_workers_cannot_read_starts_again_from_disk(tmp_path: Path) -> None:
    from farm.errors import CheckpointError

    controller, _, _ = make(tmp_path, script={(0, 7): ("node-1", "node_lost")},
                              replicas=fake_replicas([6], []))
    original = controller.worker_group_cls

    class HolderGone(original):  # type: ignore[misc, valid-type]
        def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
            if method == "setup" and kwargs.get("memory") is not None:
                raise CheckpointError("no holder could give part rank-00000-p0 of the memory snapshot of step 6")
            return super().call(method, *args, **kwargs)

    controller.worker_group_cls = HolderGone
    assert controller.run(resume_path=None, resume_step=0).step == 20
    (fallback,) = events(tmp_path, "memory_fallback")
    assert "no holder could give part" in fallback["reason"] and fallback["disk_step"] == 5
    (restore,) = events(tmp_path, "restore")
    assert restore["source"] == "disk" and restore["step"] == 5
    (recovery,) = events(tmp_path, "recovery")
    assert recovery["source"] == "disk" and recovery["lost_steps"] == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 21))
