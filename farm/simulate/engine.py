"""One simulated run: faults in time order, the controller's policy decides, the decision is priced.

Training time is bookkept analytically between events (steps, checkpoint stalls and commits follow
from the segment's start, step time and intervals), so a run costs a few operations per event.
Every second of the span lands in exactly one account: training (kept steps), checkpoint stalls,
redo (steps trained and then rolled back), or a part of a recovery (detection, waiting for nodes,
restart, restore, re-plan).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from farm.controller.decisions import (
    Abort,
    FailureContext,
    Grow,
    Noop,
    ReplaceWithSpare,
    Restart,
    Rollback,
    Shrink,
    SkipBatch,
    WaitForNode,
    WorkerFault,
)  # fmt: skip
from farm.controller.policy import FailurePolicy
from farm.errors import PlanError
from farm.plan.layout import Plan
from farm.simulate.costs import PlanCosts
from farm.simulate.failures import Draws, FailureSet
from farm.simulate.policies import SimPolicy
from farm.simulate.replans import Replanner
from farm.simulate.view import FarmState

ACCOUNTS = ("training", "checkpoint", "redo", "detection", "wait", "restart", "restore", "replan")


@dataclass
class Setup:
    """What every run of one policy shares."""

    policy: SimPolicy
    controller: FailurePolicy
    failures: FailureSet
    state: FarmState
    """The farm at the start (copied per run)."""
    plan: Plan
    replanner: Replanner
    costs: dict[int, PlanCosts]
    """By id of the plan (filled lazily through ``cost_of``)."""
    cost_of: Any
    ckpt_every: int
    snap_every: int
    detect_s: dict[str, float]
    restart_s: float
    cold_spare_s: float
    operator_s: float
    span_s: float


@dataclass
class Segment:
    """Training on one plan since ``t0`` from step ``s0``."""

    t0: float
    s0: float
    plan: Plan
    prior_ckpt: float
    prior_snap: float


@dataclass
class Outcome:
    accounts: dict[str, float]
    interruptions: Counter[str]
    kept_steps: float
    full_step_s: float
    tokens_per_step: int
    degraded_s: float
    timeline: list[tuple[float, int, float]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    layouts: list[Plan] = field(default_factory=list)
    shapes: list[tuple[tuple[str, int], ...]] = field(default_factory=list)
    """Nodes in service per pool when each layout was planned."""


class Run:
    def __init__(self, setup: Setup, draws: Draws, *, record: bool = False) -> None:
        self.s, self.draws, self.record = setup, draws, record
        self.farm = setup.state.copy()
        self.acc = dict.fromkeys(ACCOUNTS, 0.0)
        self.interruptions: Counter[str] = Counter()
        self.kept: list[tuple[float, float, float]] = []  # (first step, last step, step time)
        self.floor = 0.0  # steps at or below this are never rolled back
        self.heap: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.gen = 0  # bumps when a pending resume or grow is no longer valid
        self.failures = 0
        self.repeats: Counter[str] = Counter()
        self.seg: Segment | None = Segment(0.0, 0.0, setup.plan, 0.0, 0.0)
        self.down: tuple[float, list[tuple[str, float]], Segment] | None = None
        self.waiting: set[str] = set()
        self.grow_pending = False
        self.timeline: list[tuple[float, int, float]] = []
        self.marks: list[tuple[float, str]] = []
        self.layouts: list[Plan] = [setup.plan]
        self.shapes = [self.farm.full_shape]
        self.wait_for: tuple[WorkerFault, Segment] | None = None
        self._mark_timeline(0.0)

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> Outcome:
        d, i, end = self.draws, 0, self.s.span_s
        while True:
            t_fail = float(d.t[i]) if i < len(d) else math.inf
            t_evt = self.heap[0][0] if self.heap else math.inf
            if min(t_fail, t_evt) >= end:
                break
            if t_fail <= t_evt:
                self.on_fault(t_fail, i)
                i += 1
            else:
                t, _, kind, payload = heapq.heappop(self.heap)
                getattr(self, f"on_{kind}")(t, payload)
        self.close(end)
        return self.outcome()

    def push(self, t: float, kind: str, payload: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, payload))

    # --- training bookkeeping ---------------------------------------------------------------------

    def progress(self, seg: Segment, t: float) -> tuple[float, float, float, float]:
        """(steps done, seconds stalled for saves, newest committed checkpoint, newest snapshot) at t."""
        st, c = seg.plan.step_time_s, self.cost(seg.plan)
        K, Ks = self.s.ckpt_every, self.s.snap_every
        cycle, m, cs = self.cycle(st, c)
        sub = Ks * st
        e = t - seg.t0
        eps = 1e-9  # events scheduled on a boundary must see the save that ends there
        n = math.floor(e / cycle + eps)
        r = e - n * cycle
        j = min(math.floor(r / (sub + cs) + eps) if sub + cs > 0 else 0, m - 1)
        r2 = r - j * (sub + cs)
        steps = n * K + j * Ks + min(Ks, r2 / st)
        stall_here = c.save_stall_s if j == m - 1 else cs
        stalls = n * ((m - 1) * cs + c.save_stall_s) + j * cs + min(max(0.0, r2 - sub), stall_here)
        committed = math.floor((e - c.write_s) / cycle + eps) if e >= c.write_s else 0
        ckpt = seg.s0 + committed * K if committed > 0 else seg.prior_ckpt
        snaps = n * m + j + (1 if r2 >= sub + stall_here - eps else 0)
        snap = seg.s0 + snaps * Ks if snaps > 0 else seg.prior_snap
        return seg.s0 + steps, stalls, ckpt, max(snap, ckpt)

    def cycle(self, st: float, c: PlanCosts) -> tuple[float, int, float]:
        """(seconds from one disk save to the next, snapshots per save, seconds per snapshot stall)."""
        m = self.s.ckpt_every // self.s.snap_every
        cs = c.snapshot_stall_s if m > 1 else 0.0
        return self.s.ckpt_every * st + (m - 1) * cs + c.save_stall_s, m, cs

    def cost(self, plan: Plan) -> PlanCosts:
        got = self.s.costs.get(id(plan))
        if got is None:
            got = self.s.costs[id(plan)] = self.s.cost_of(plan)
        return got

    def end_segment(self, t: float) -> tuple[float, float, float]:
        """Close the training segment at t: (step reached, newest checkpoint, newest snapshot)."""
        seg = self.seg
        assert seg is not None
        steps, stalls, ckpt, snap = self.progress(seg, t)
        self.acc["checkpoint"] += stalls
        if steps > seg.s0:
            self.kept.append((seg.s0, steps, seg.plan.step_time_s))
        if steps - seg.s0 >= 1:
            self.repeats.clear()
        self.seg = None
        return steps, ckpt, snap

    def rollback(self, to: float) -> None:
        """Steps above ``to`` are lost: their time moves from training to redo."""
        while self.kept and self.kept[-1][1] > to:
            a, b, st = self.kept.pop()
            cut = max(a, to)
            self.acc["redo"] += (b - cut) * st
            if cut > a:
                self.kept.append((a, cut, st))
                break
        self.floor = max(self.floor, to)

    def start(self, t: float, plan: Plan, step: float, ckpt: float, snap: float) -> None:
        assert plan.world_size <= len(self.farm.svc) * self.farm.dpn, "a layout larger than the nodes in service"
        self.seg = Segment(t, step, plan, ckpt, snap)
        self._mark_timeline(t)
        if self.grow_pending:
            self.schedule_grow(t)

    # --- recoveries -------------------------------------------------------------------------------

    def go_down(self, t: float, parts: list[tuple[str, float]], seg: Segment) -> None:
        """Stop training at t; resume after ``parts`` (account, seconds) on ``seg``'s plan and state.
        A part of infinite length waits for ``self.waiting`` to return."""
        self.gen += 1
        self.down = (t, parts, seg)
        total = sum(d for _, d in parts)
        if math.isfinite(total):
            self.push(t + total, "resume", self.gen)
        self._mark_timeline(t, training=False)

    def charge_down(self, t: float) -> None:
        """Account the recovery that was under way, up to t."""
        if self.down is None:
            return
        t0, parts, _ = self.down
        left = t - t0
        for name, dur in parts:
            used = min(dur, left)
            self.acc[name] += used
            left -= used
            if left <= 0:
                break
        self.down = None

    def on_resume(self, t: float, gen: int) -> None:
        if gen != self.gen or self.down is None:
            return
        seg = self.down[2]
        self.charge_down(t)
        self.start(t, seg.plan, seg.s0, seg.prior_ckpt, seg.prior_snap)

    def resume_after_wait(self, t: float) -> None:
        """The nodes a WaitForNode waited for are back: restart and restore from t."""
        assert self.down is not None
        t0, parts, seg = self.down
        waited = t - t0 - sum(d for _, d in parts if math.isfinite(d))
        parts = [(n, waited if not math.isfinite(d) else d) for n, d in parts]
        parts += [("restart", self.s.restart_s), ("restore", self.restore_s(seg.plan))]
        self.down = None
        self.go_down(t0, parts, seg)

    def restore_s(self, plan: Plan) -> float:
        c = self.cost(plan)
        return c.memory_restore_s if self.s.policy.restore == "memory" else c.storage_restore_s

    def restore_point(self, ckpt: float, snap: float) -> float:
        return snap if self.s.policy.restore == "memory" else ckpt

    # --- events -----------------------------------------------------------------------------------

    def on_fault(self, t: float, i: int) -> None:
        d, farm = self.draws, self.farm
        node = farm.pick(float(d.pick[i]))
        if node is None:
            return  # the fault fell on a node that is not in service: thinned away
        cause = self.s.failures.causes[int(d.cause[i])]
        replace = bool(d.replace[i])
        busy = self.seg.plan if self.seg is not None else self.down[2].plan if self.down else self.s.plan
        if not farm.used_by(node, busy):
            if replace:  # an idle node: it leaves service without interrupting training
                farm.take_out((node,))
                self.push(t + float(d.repair_s[i]), "repair", node)
            return
        self.interruptions[cause.name] += 1
        self.failures += 1
        self.repeats[node] += 1
        if self.record:
            self.marks.append((t, cause.label))
        if self.seg is not None:
            plan = self.seg.plan
            steps, ckpt, snap = self.end_segment(t)
            state = Segment(t, self.restore_point(ckpt, snap), plan, ckpt, snap)
            self.rollback(state.s0)
        else:
            assert self.down is not None
            state = self.down[2]
            steps = state.s0
            self.charge_down(t)
        fault = WorkerFault(rank=0, node=node, kind=cause.kind, detail=cause.label)
        ctx = self.context(state, int(steps), lost=(node,) if replace else (), node=node)
        self.execute(t, self.s.controller.decide(fault, ctx), fault, state, float(d.repair_s[i]), ctx.lost)

    def context(self, state: Segment, step: int, *, lost: tuple[str, ...], node: str | None = None,
                waited: bool = False) -> FailureContext:  # fmt: skip
        return FailureContext(
            step=step, failures=self.failures, plan=state.plan,
            farm=self.farm.view(nodes=(*((node,) if node else ()), *lost)), lost=lost, last_checkpoint=int(state.prior_ckpt),
            last_snapshot=int(state.prior_snap) if self.s.policy.restore == "memory" else None,
            repeats=self.repeats[lost[0]] if lost else 1, waited=waited,
        )  # fmt: skip

    def execute(self, t: float, decision: Any, fault: WorkerFault, state: Segment, repair_s: float,
                lost: tuple[str, ...] = (), *, detected: bool = False) -> None:  # fmt: skip
        """Price ``decision`` from t. ``detected``: a decision taken again during a recovery (the
        fault was seen already). Nodes still awaited by an earlier WaitForNode keep the run waiting
        unless the decision replaces them or re-plans without them."""
        s = self.s
        detect = 0.0 if detected else s.detect_s.get(fault.kind, 0.0)
        if self.waiting and isinstance(decision, (Noop, Restart, Rollback, SkipBatch)):
            self.wait_for = (fault, state)
            self.go_down(t, [("detection", detect), ("wait", math.inf)], state)
            return
        if isinstance(decision, Noop):
            self.start(t, state.plan, state.s0, state.prior_ckpt, state.prior_snap)
            return
        if isinstance(decision, (Restart, Rollback, SkipBatch)):
            restart = 0.0 if not isinstance(decision, Restart) else s.restart_s
            self.go_down(t, [("detection", detect), ("restart", restart), ("restore", self.restore_s(state.plan))],
                         state)  # fmt: skip
        elif isinstance(decision, ReplaceWithSpare):
            self.lose(t, decision.lost, repair_s)
            self.waiting -= set(decision.lost)
            if self.waiting:  # others are still awaited: this spare covers only its own
                self.farm.activate(decision.spares)
                self.wait_for = (fault, state)
                self.go_down(t, [("detection", detect), ("wait", math.inf)], state)
                return
            cold = self.farm.activate(decision.spares)
            if cold < len(decision.spares) and s.cold_spare_s:
                self.push(t + s.cold_spare_s, "restock", None)
            wait = s.cold_spare_s if cold else 0.0
            self.go_down(t, [("detection", detect), ("wait", wait), ("restart", s.restart_s),
                             ("restore", self.restore_s(state.plan))], state)  # fmt: skip
        elif isinstance(decision, WaitForNode):
            self.lose(t, decision.nodes, repair_s)
            self.waiting |= self.farm.out_of_service(decision.nodes)
            self.wait_for = (fault, state)
            self.go_down(t, [("detection", detect), ("wait", math.inf)], state)
            if not self.waiting:
                self.resume_after_wait(t + detect)
            elif math.isfinite(decision.timeout_s):
                self.push(t + detect + decision.timeout_s, "wait_over", (self.gen, fault, state))
        elif isinstance(decision, Shrink):
            self.lose(t, decision.lost, repair_s)
            self.waiting = set()
            try:
                plan, took = self.replan(state.plan)
            except PlanError:  # the model does not fit the survivors: wait for the nodes instead
                self.farm.rejoin(decision.lost)
                why = "the survivors cannot hold the model"
                self.execute(t, WaitForNode(nodes=decision.lost, timeout_s=math.inf, reason=why), fault, state,
                             repair_s, detected=detected)  # fmt: skip
                return
            new = Segment(t, state.s0, plan, state.prior_ckpt, state.prior_snap)
            self.go_down(t, [("detection", detect), ("replan", took), ("restart", s.restart_s),
                             ("restore", self.restore_s(plan))], new)  # fmt: skip
            if s.policy.refill and self.farm.reserve_left():
                self.push(t + s.cold_spare_s, "handover", None)
        elif isinstance(decision, Abort):
            self.failures = 0
            self.waiting = set()
            self.lose(t, tuple(dict.fromkeys((*lost, *((fault.node,) if fault.loses_node else ())))), repair_s)
            plan, took = self.replan(state.plan) if self.farm.shape() != self.farm.full_shape else (state.plan, 0.0)
            start = Segment(t, state.prior_ckpt, plan, state.prior_ckpt, state.prior_ckpt)
            self.rollback(state.prior_ckpt)
            self.go_down(t, [("detection", detect), ("wait", s.operator_s), ("replan", took),
                             ("restart", s.restart_s), ("restore", self.cost(plan).storage_restore_s)], start)
        else:
            raise TypeError(f"the simulator cannot execute decision {decision!r}")

    def lose(self, t: float, nodes: tuple[str, ...], repair_s: float) -> None:
        for node in self.farm.take_out(nodes):
            self.push(t + repair_s, "repair", node)

    def replan(self, plan: Plan) -> tuple[Plan, float]:
        shape = self.farm.shape()
        new, took = self.s.replanner.plan_for(plan, shape, self.farm.healthy)
        if new is not self.layouts[-1]:
            self.layouts.append(new)
            self.shapes.append(shape)
        return new, took

    def on_wait_over(self, t: float, payload: tuple[int, WorkerFault, Segment]) -> None:
        gen, fault, state = payload
        if gen != self.gen or self.down is None:
            return
        self.charge_down(t)
        ctx = self.context(state, int(state.s0), lost=tuple(sorted(self.waiting)), node=fault.node, waited=True)
        self.execute(t, self.s.controller.decide(fault, ctx), fault, state, 0.0, ctx.lost, detected=True)

    def on_repair(self, t: float, node: str) -> None:
        if node in self.waiting:
            self.farm.rejoin((node,))
            self.waiting.discard(node)
            if not self.waiting and self.down is not None:
                self.resume_after_wait(t)
            return
        self.offer(t, node)

    def on_handover(self, t: float, _: Any) -> None:
        node = self.farm.reserve_pop()
        if node is not None:
            self.offer(t, node)

    def on_restock(self, t: float, _: Any) -> None:
        self.farm.restock()

    def offer(self, t: float, node: str) -> None:
        """A node is free again: a shrunken run asks its policy (on_rejoin); otherwise it is a spare,
        and a run waiting for other nodes decides again (the spare may take their place)."""
        if self.waiting and self.down is not None and self.wait_for is not None:
            self.farm.to_spares(node)
            fault, state = self.wait_for
            lost = tuple(sorted(self.waiting))
            self.charge_down(t)
            ctx = self.context(state, int(state.s0), lost=lost, node=fault.node)
            self.execute(t, self.s.controller.decide(fault, ctx), fault, state, 0.0, lost, detected=True)
            return
        if self.farm.shape() == self.farm.full_shape:
            self.farm.to_spares(node)
            return
        now = self.seg or (self.down[2] if self.down else None)
        assert now is not None
        decision = self.s.controller.on_rejoin((node,), self.context(now, int(now.s0), lost=()))
        if isinstance(decision, Grow):
            self.farm.rejoin(decision.nodes)
            if self.seg is not None:
                self.schedule_grow(t)
            else:
                self.grow_pending = True
        else:
            self.farm.to_spares(node)

    def schedule_grow(self, t: float) -> None:
        """Grow at the next checkpoint boundary of the segment under way."""
        seg = self.seg
        assert seg is not None
        self.grow_pending = True
        c = self.cost(seg.plan)
        cycle = self.cycle(seg.plan.step_time_s, c)[0]
        boundary = seg.t0 + (math.floor((t - seg.t0) / cycle) + 1) * cycle + c.write_s
        self.push(boundary, "grow", (self.gen, id(seg)))

    def on_grow(self, t: float, payload: tuple[int, int]) -> None:
        gen, seg_id = payload
        if self.seg is None or id(self.seg) != seg_id or gen != self.gen or not self.grow_pending:
            return
        self.grow_pending = False
        before = self.seg.plan
        _, ckpt, snap = self.end_segment(t)
        step = self.restore_point(ckpt, snap)
        self.rollback(step)
        plan, took = self.replan(before)
        new = Segment(t, step, plan, step, max(step, snap))
        self.go_down(t, [("replan", took), ("restart", self.s.restart_s), ("restore", self.restore_s(plan))], new)

    # --- the end ----------------------------------------------------------------------------------

    def close(self, end: float) -> None:
        if self.seg is not None:
            self.end_segment(end)
        else:
            self.charge_down(end)

    def outcome(self) -> Outcome:
        full = self.s.plan.step_time_s
        kept = sum(b - a for a, b, _ in self.kept)
        training = sum((b - a) * st for a, b, st in self.kept)
        self.acc["training"] = training
        return Outcome(
            accounts=dict(self.acc), interruptions=self.interruptions, kept_steps=kept, full_step_s=full,
            tokens_per_step=self.s.plan.global_batch * _seq_len(self.s.plan), degraded_s=training - kept * full,
            timeline=self.timeline, marks=self.marks, layouts=self.layouts, shapes=self.shapes,
        )  # fmt: skip

    def _mark_timeline(self, t: float, *, training: bool = True) -> None:
        """(time, devices of the layout in use or being restored, tokens/s now: 0 while down)."""
        if self.record:
            plan = self.seg.plan if self.seg is not None else self.down[2].plan if self.down else self.s.plan
            self.timeline.append((t, plan.world_size, plan.tokens_per_s if training else 0.0))


def _seq_len(plan: Plan) -> int:
    return round(plan.tokens_per_s * plan.step_time_s / plan.global_batch)
