"""The controller: an explicit state machine in the driver, the only writer of run state.

``Controller.run`` loops ``state = self._step(state)`` until a terminal state (farm/controller/
states.py draws the diagram). Side concerns (checkpoint, stop, logging, rejoin) are one call each
with their own gate. A fault becomes ``Recovering``; the failure policy's decision is executed by
``_recover``: a new attempt (same nodes, spares, the survivors, or with rejoined nodes back) is
planned by farm/controller/recovery.py and started from the newest valid checkpoint. A global batch
whose loss is non-finite twice is skipped: recorded in the run directory, then no step trains it.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from collections import Counter
from typing import Any

from farm.checkpoint import CheckpointStore
from farm.controller.cluster import route_ray_messages
from farm.controller.decisions import (
    Abort,
    Decision,
    FailureContext,
    Grow,
    Noop,
    Restart,
    SkipBatch,
    WaitForNode,
    WorkerFault,
)
from farm.controller.policy import AbortPolicy, FailurePolicy
from farm.controller.recovery import Attempt, Replanner, first_attempt, next_attempt
from farm.controller.replicas import MemorySource, Replicas
from farm.controller.roster import back_in_cluster, named_farm_nodes, ray_nodes, wait_back
from farm.controller.saves import SaveHistory, ranks_text
from farm.controller.states import (
    Failed,
    Finished,
    Finishing,
    Recovering,
    RecoveryClock,
    Resizing,
    RunParts,
    Starting,
    State,
    Training,
)
from farm.controller.stragglers import StragglerWatch
from farm.controller.timeouts import StepTimeout
from farm.controller.worker_group import StartupFailed, StartupTimedOut, WorkerFailed, WorkerGroup
from farm.data.skips import SkippedBatch, read_skipped, skips_of, write_skipped
from farm.errors import (
    CheckpointError,
    FarmError,
    Interrupted,
    PlanError,
    Preempted,
    RunDirError,
    StartupFailure,
    StartupTimeout,
    WorkerFailure,
)
from farm.tracking import Tracker
from farm.tracking.metrics import step_metrics

__all__ = ["Controller", "Finished", "RunParts", "preempted_message"]


class Controller:
    worker_group_cls: Any = WorkerGroup
    """The group factory; controller tests step the machine with a fake group in its place."""
    replicas_cls: Any = Replicas
    """The in-memory replica holders' driver side; controller tests use a fake one."""
    cluster_nodes: Any = staticmethod(ray_nodes)
    """``() -> ray.nodes()`` (None without a Ray connection): who is alive, for losses and rejoins."""

    def __init__(self, parts: RunParts, *, tracker: Tracker, policy: FailurePolicy | None = None) -> None:
        self.p = parts
        self.tracker = tracker
        self.policy = policy or AbortPolicy()
        self.replanner = Replanner(farm=parts.farm, model=parts.model, train=parts.train,
                                   parallel=parts.parallel, vocab_size=parts.vocab_size)
        self.attempt: Attempt = first_attempt(parts.farm, parts.plan)
        self.group: Any = None
        self.last_checkpoint: int | None = None
        self.stop_signal: str | None = None
        self.interrupted = False
        """A second SIGINT came: stop at once."""
        self.step = 0
        """The last step every rank completed."""
        self.failures = 0
        self.skipped = read_skipped(parts.run_dir, global_batch=parts.train.global_batch)
        """The global batches this run skipped, as the run directory records them; every start of the
        workers gets them, so a restore from a checkpoint older than a skip still skips."""
        self.skips = skips_of(self.skipped)
        self.nonfinite: Counter[int] = Counter()
        """Non-finite losses per global batch: a second one on the same batch is a repeat with the same
        samples (after a skip, the same step trains another batch)."""
        self.node_faults: Counter[str] = Counter()
        """Faults per node since its last good step: two in a row exclude it (the policy decides)."""
        self.seen_gone: set[str] = set()
        """Nodes out of service that have been seen gone from the cluster: their return is a rejoin."""
        self.clock: RecoveryClock | None = None
        """The recovery under way, until training is past the step it had reached."""
        self.step_done_at = time.monotonic()
        self.stragglers = StragglerWatch(nodes=(), stages=())
        self.step_timeout = StepTimeout(parts.run.step_timeout_s, factor=parts.run.step_timeout_factor,
                                        floor_s=parts.run.step_timeout_floor_s)
        self.saves = SaveHistory(parts.checkpoint, last_valid=None, now=time.monotonic())
        self.saving = False
        """A save is in flight: poll the workers for its outcome after each step."""
        self.replicas = (self.replicas_cls(farm=parts.farm, domain=parts.checkpoint.memory_domain, tensors=parts.tensors)
                         if parts.checkpoint.memory_every > 0 else None)
        """The in-memory replica holders (None with checkpoint.memory_every=0 or no memory to spare)."""
        self.replicating_since_loss = False
        """A holder was lost: the next complete snapshot is announced again (two copies once more)."""

    # -- gates ---------------------------------------------------------------------------------------

    def should_checkpoint(self, step: int) -> bool:
        every = self.p.checkpoint.every
        return every > 0 and step % every == 0 and step < self.p.train.steps

    def should_snapshot(self, step: int) -> bool:
        every = self.p.checkpoint.memory_every
        return self.replicas is not None and step % every == 0 and step < self.p.train.steps

    def should_stop(self, step: int) -> str | None:
        if step >= self.p.train.steps:
            return "done"
        if self.p.run.stop_after_step is not None and step >= self.p.run.stop_after_step:
            return "stop_after_step"
        return self.stop_signal

    def should_grow(self, step: int) -> tuple[str, ...]:
        """Nodes back in the cluster, checked at checkpoint boundaries while some are out."""
        if not self.attempt.out or not self.should_checkpoint(step):
            return ()
        nodes = self.cluster_nodes() or []
        alive = set(back_in_cluster(self.attempt.out, nodes))
        self.seen_gone |= set(self.attempt.out) - alive
        # A node excluded while still up (repeated faults, a straggler) comes back only after a repair
        # took it out of the cluster: its mere presence is not a return.
        return tuple(sorted(alive & self.seen_gone))

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, *, resume_path: str | None, resume_step: int) -> Finished:
        self.last_checkpoint = resume_step if resume_path else None
        self.step = resume_step
        self.saves = SaveHistory(self.p.checkpoint, last_valid=self.last_checkpoint, now=time.monotonic())
        state: State = Starting(self.attempt, resume_path, resume_step)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        route_ray_messages(self.p.run_dir / "logs" / "ray.log")
        try:
            while not isinstance(state, Finished | Failed):
                state = self._step(state)
        except KeyboardInterrupt:
            if not self.interrupted:
                raise
            self.tracker.event("interrupted", step=self.step, last_checkpoint=self.last_checkpoint)
            raise Interrupted(
                f"interrupted again at step {self.step}: stopped at once, without a final checkpoint; "
                f"{_resume_hint(self.last_checkpoint)}"
            ) from None
        finally:
            # Shut the workers down before giving the signals back: a second SIGTERM during the
            # shutdown must not reach Ray's handler, which exits the driver mid-way.
            self._drop_group()
            if self.replicas is not None:
                self.replicas.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if isinstance(state, Failed):
            raise state.error
        return state

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.stop_signal is not None:
            # Raised in the main thread wherever it waits (Ray's waits turn a KeyboardInterrupt from a
            # handler into their own); run() shuts the workers down and says what was kept.
            self.interrupted = True
            raise KeyboardInterrupt
        if self.stop_signal is None:
            self.stop_signal = name
            if signum == signal.SIGINT:
                print(f"\nCtrl-C: finishing step {self.step + 1}, then checkpointing and stopping "
                      "(press Ctrl-C again to stop at once, without a checkpoint)", file=sys.stderr, flush=True)

    def _step(self, state: State) -> State:
        try:
            if isinstance(state, Starting):
                return self._start(state)
            if isinstance(state, Training):
                return self._train(state)
            if isinstance(state, Recovering):
                return self._recover(state)
            if isinstance(state, Resizing):
                return self._resize(state)
            if isinstance(state, Finishing):
                return self._finish(state)
        except WorkerFailed as err:
            return self._on_fault(err.fault, str(err))
        except (StartupFailed, StartupTimedOut) as err:
            if err.fault is not None and self.attempt.number > 0:
                return self._on_fault(err.fault, str(err))  # a node lost while a recovery starts up
            return self._on_error(state, err)
        except FarmError as err:  # start-up failures, and errors a worker raised with their own message
            return self._on_error(state, err)
        raise AssertionError(f"no transition from {state}")

    def _start(self, state: Starting) -> State:
        p = self.p
        self.attempt = attempt = state.attempt
        self.group = self.worker_group_cls(farm=attempt.farm, plan=attempt.plan, run_dir=str(p.run_dir),
                                           startup_timeout_s=p.run.startup_timeout_s)
        port = self.group.call("pick_port", timeout=60, what="starting workers", ranks=[0], startup=True)[0]
        master = self.group.infos[0]["ip"]
        try:
            setups = self.group.call(
                "setup", timeout=p.run.startup_timeout_s, what="setting up workers", startup=True,
                master_addr=master, master_port=port, plan=attempt.plan.to_json(), model=p.model, train=p.train,
                data=p.data, vocab_size=p.vocab_size, decay_steps=p.decay_steps, precision=p.precision,
                resume=state.resume_path, resume_step=state.step, attempt=attempt.nonce,
                collective_timeout_s=p.run.step_timeout_s, skipped=self.skips.batches,
                memory=state.memory.to_setup() if state.memory is not None else None,
            )
        except CheckpointError as err:
            if state.memory is None:
                raise
            return self._memory_failed(state, err)
        self.tracker.event("workers", ranks=len(setups), params=setups[0]["params"], attempt=attempt.number,
                           pids=[i["pid"] for i in self.group.infos],
                           nodes=[attempt.plan.ranks[i].node for i in range(len(setups))])
        if state.resume_path:
            self.tracker.event("resume", step=state.step, checkpoint=state.resume_path)
        self._replicate()
        self.step = state.step
        self.step_done_at = time.monotonic()
        self.step_timeout.new_attempt()
        ranks = sorted(attempt.plan.ranks, key=lambda r: r.rank)
        self.stragglers = StragglerWatch(nodes=[r.node for r in ranks], stages=[r.pp_rank for r in ranks],
                                         factor=p.run.straggler_factor, steps=p.run.straggler_steps)
        if self.clock is not None:
            self._restored(state, setups)
        self.saves.saved_at = time.monotonic()  # unsaved time counts from the start of training
        return Training(step=state.step)

    def _train(self, state: Training) -> State:
        reason = self.should_stop(state.step)
        if reason is not None:
            return Finishing(step=state.step, reason=reason)
        started = time.perf_counter()
        reports = self.group.call("run_steps", 1, self.should_snapshot(state.step + 1),
                                  timeout=self.step_timeout.seconds, what=f"step {state.step + 1}")
        elapsed = time.perf_counter() - started
        self.step_timeout.observe(elapsed)
        report = reports[self.attempt.reporter][-1]
        if not math.isfinite(float(report["loss"])):
            return self._nonfinite_loss(float(report["loss"]))
        if self.nonfinite[self.skips.batch_of(state.step)]:
            self.tracker.event("transient_fault", step=state.step + 1, fault="nonfinite",
                               detail=f"step {state.step + 1} re-run from the newest state: its loss is finite")
        self._log_step([r[-1] for r in reports], elapsed)
        step = self.step = int(report["step"])
        self.step_done_at = time.monotonic()
        self.node_faults.clear()  # a good step: earlier faults are no longer "in a row"
        if self.clock is not None and step > self.clock.reached:
            self._recovered(step)
        self._note_snapshots([o for r in reports for o in r[-1].get("snapshots", ())], step)
        straggler = self._stragglers(reports, step)
        if straggler is not None:
            return straggler
        if self.saving:
            self._note_commits(self.group.call("committed", timeout=60, what="checkpoint status"))
        stop = self.saves.over_limit(now=time.monotonic())  # None at once while saves succeed
        if stop is not None:
            return self._stop_unsaved(step, stop)
        back = self.should_grow(step)
        if back:
            return Resizing(step=step, nodes=back)
        if self.should_checkpoint(step):
            self._save(step)
        return Training(step=step)

    def _nonfinite_loss(self, loss: float) -> State:
        step = self.step + 1
        self.nonfinite[self.skips.batch_of(self.step)] += 1
        reporter = self.attempt.reporter
        node = next(r.node for r in self.attempt.plan.ranks if r.rank == reporter)
        fault = WorkerFault(rank=reporter, node=node, kind="nonfinite",
                            detail=f"loss {loss} at step {step} (global positions {self._positions(step)})")
        return self._on_fault(fault, f"the loss is {loss}")

    def _positions(self, step: int) -> str:
        """The global sample-order positions step ``step`` (from 1) trains (docs/design.md, invariant 1)."""
        g = self.p.train.global_batch
        batch = self.skips.batch_of(step - 1)
        return f"{batch * g}..{(batch + 1) * g - 1}"

    def _stragglers(self, reports: list[list[dict[str, Any]]], step: int) -> State | None:
        """Report ranks whose own compute stays slow; with run.exclude_stragglers, fault their node."""
        for slow in self.stragglers.observe([float(r[-1].get("compute_s", 0.0)) for r in reports]):
            self.tracker.event("straggler", step=step, rank=slow.rank, node=slow.node, slowdown=slow.slowdown,
                               steps=slow.steps)
            fault = WorkerFault(rank=slow.rank, node=slow.node, kind="straggler",
                                detail=f"rank {slow.rank} computes {slow.slowdown}x slower than its peers' median "
                                       f"for {slow.steps} steps")
            if self.p.run.exclude_stragglers and step < self.p.train.steps:
                # The slow node is still up: checkpoint this step first, so the re-plan without it
                # redoes no step; then the policy decides what replaces the node, as for any fault.
                self._save_now(step)
                return self._on_fault(fault, f"node {slow.node} is a straggler")
        return None

    # -- memory snapshots ----------------------------------------------------------------------------

    def _replicate(self) -> None:
        """Tell the workers which holders keep their snapshots, starting holders where needed."""
        if self.replicas is None:
            return
        targets = self.replicas.place(self.attempt.plan, self.group.infos)
        self.group.call("replicate_to", timeout=60, what="choosing the replica holders", targets=targets)

    def _note_snapshots(self, outcomes: list[dict[str, Any]], step: int) -> None:
        if self.replicas is None or not outcomes:
            return
        first = self.replicating_since_loss or self.replicas.newest is None or self.replicas.newest[0] != self.attempt.nonce
        lost, complete = self.replicas.note(outcomes, world=self.attempt.plan.world_size)
        for node in lost:
            # Its owner is alive (this step trained): the next snapshot goes to a new holder there.
            self.tracker.event("replica_lost", step=step, node=node,
                               detail="a replica holder is gone; a new one keeps the next snapshot")
        if lost:
            self._replicate()
            self.replicating_since_loss = True
        if complete is not None and first:
            self.replicating_since_loss = False
            self.tracker.event("memory_snapshot", step=complete[1], bytes_per_rank=self.replicas.snapshot_bytes,
                               export_s=round(max(float(o.get("export_s", 0.0)) for o in outcomes), 4),
                               send_s=round(max(float(o.get("send_s", 0.0)) for o in outcomes), 4),
                               domain=self.p.checkpoint.memory_domain,
                               message=f"memory snapshots every {self.p.checkpoint.memory_every} step(s), two copies "
                                       f"per part in two {self.p.checkpoint.memory_domain}s")

    def _memory_source(self, *, disk_step: int) -> MemorySource | None:
        """The newest sound snapshot in memory no older than the disk checkpoint and no newer than the
        last step every rank completed; None (with an event saying why) when there is none."""
        if self.replicas is None:
            return None
        source, why = self.replicas.restore_source(not_before=disk_step, not_after=self.step)
        if source is None:
            self.tracker.event("memory_fallback", step=self.step, disk_step=disk_step, reason=why,
                               message=f"restoring from disk: {why}")
        return source

    def _memory_failed(self, state: Starting, err: CheckpointError) -> State:
        """A memory restore the workers could not read (a holder lost since it was chosen): the same
        attempt starts again from the newest valid disk checkpoint."""
        self._drop_group()
        path, step = self._restore_point()
        self.tracker.event("memory_fallback", step=self.step, disk_step=step if path else 0, reason=str(err),
                           message=f"restoring from disk: the memory snapshot of step {state.step} could not be "
                                   f"read ({err})")
        if self.clock is not None:
            self.clock.source, self.clock.restored_step = "disk", step
        return Starting(state.attempt, path, step)

    def _log_step(self, reports: list[dict[str, Any]], elapsed: float) -> None:
        tokens = self.p.train.global_batch * self.p.model.seq_len
        self.tracker.step(step_metrics(reports=reports, reporter=self.attempt.reporter, elapsed=elapsed,
                                       plan=self.attempt.plan, tokens=tokens))

    # -- checkpoints ---------------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        meta = dict(self.p.checkpoint_meta)
        meta.update(
            step=step,
            data_cursor={"consumed": step * self.p.train.global_batch, "seed": self.p.train.seed,
                         "skipped": list(self.skips.batches)},
            rng={"scheme": "per-micro-batch seed from (train.seed, step, global micro-batch)",
                 "seed": self.p.train.seed},
            scheduler={"last_step": step, "decay_steps": self.p.decay_steps},
            plan=self.attempt.plan.to_json(),
        )
        root = str(self.p.run_dir / "checkpoints")
        self.saving = True
        self.group.call("save", timeout=self.p.run.step_timeout_s, what=f"checkpoint at step {step}",
                        root=root, step=step, meta=meta, cfg=self.p.checkpoint)

    def _save_now(self, step: int) -> None:
        """Checkpoint ``step`` and wait until it is committed (or has failed, which leaves the
        previous checkpoint the newest valid one)."""
        if self.saving:
            self._wait_saves()  # at most one save in flight
        if self.last_checkpoint != step:
            self._save(step)
            self._wait_saves()

    def _wait_saves(self) -> None:
        self._note_commits(self.group.call(
            "wait_save", timeout=self.p.run.step_timeout_s + self.p.checkpoint.commit_timeout_s,
            what="finishing the last checkpoint"))

    def _note_commits(self, outcomes: list[dict[str, list[Any]]]) -> None:
        """Log what the ranks' background saves committed (rank 0 commits) or failed to write: one
        event per failed save, naming the ranks that saw it."""
        committed, failures = self.saves.take(outcomes)
        if committed or failures:
            self.saving = False  # rank 0 has ended the one save in flight
        for step in committed:
            self.last_checkpoint = step
            self.saves.committed(step, now=time.monotonic())
            self.tracker.event("checkpoint", step=step,
                               path=str(self.p.run_dir / "checkpoints" / f"step-{step:08d}"))
        for failure in failures:
            # A failed save (a full disk, say) leaves the previous checkpoint valid; training goes on
            # until checkpoint.max_failed_saves or checkpoint.max_unsaved_s says otherwise.
            self.saves.failed(failure)
            self.tracker.event("checkpoint_failed", step=failure.step, last_valid=self.last_checkpoint,
                               ranks=ranks_text(failure.ranks), failed_in_a_row=len(self.saves.failed_in_a_row),
                               detail=failure.detail)

    def _stop_unsaved(self, step: int, why: str) -> State:
        """Training past the save limits would be work nobody can resume: stop, naming the last valid step."""
        error = CheckpointError(
            f"{why}: training stopped at step {step}; the newest valid checkpoint is "
            f"{_step_text(self.last_checkpoint)}. First error: {self.saves.first_error}. Fix the storage under "
            f"{self.p.run_dir / 'checkpoints'} and {_resume_hint(self.last_checkpoint)}"
        )
        self.tracker.event("failure", step=step, rank=None, node=None, fault="checkpoints_failing", detail=why)
        return Failed(step=step, error=error)

    def _finish(self, state: Finishing) -> State:
        if self.last_checkpoint != state.step:
            self._save(state.step)
        self._wait_saves()
        self.group.shutdown(graceful=True)
        self.group = None
        if self.last_checkpoint != state.step:
            return Failed(step=state.step, error=CheckpointError(
                f"training reached step {state.step} but its checkpoint could not be written "
                f"({self.saves.last_error}); the newest valid checkpoint is {_step_text(self.last_checkpoint)}. "
                f"Free space under {self.p.run_dir / 'checkpoints'} and re-run the same command to resume"
            ))
        if state.reason not in ("done", "stop_after_step"):
            self.tracker.event("preempt", step=state.step, signal=state.reason)
        return Finished(step=state.step, reason=state.reason)

    # -- faults and recovery -------------------------------------------------------------------------

    def _on_fault(self, fault: WorkerFault, message: str) -> State:
        return Recovering(step=self.step, fault=fault, message=message, detected_at=time.monotonic())

    def _context(self, fault: WorkerFault, **changes: Any) -> FailureContext:
        attempt = self.attempt
        lost = {fault.node} if fault.loses_node else set()
        alive = named_farm_nodes(self.cluster_nodes())
        farm = attempt.farm
        if alive is not None:  # the cluster names its farm nodes: every one of ours that is gone is lost
            lost |= {n.id for n in farm.nodes if n.id not in alive}
            self.seen_gone |= lost
            farm = dataclasses.replace(farm, spares=tuple(n for n in farm.spares if n.id in alive))
        context = FailureContext(step=self.step, failures=self.failures, plan=attempt.plan, farm=farm,
                                 lost=tuple(sorted(lost)), last_checkpoint=self.last_checkpoint,
                                 repeats=self.node_faults[fault.node], nonfinite_events=sum(self.nonfinite.values()),
                                 nonfinite_repeat=(fault.kind == "nonfinite"
                                                   and self.nonfinite[self.skips.batch_of(self.step)] > 1))
        return dataclasses.replace(context, **changes)

    def _recover(self, state: Recovering) -> State:
        fault = state.fault
        self.failures += 1
        if fault.kind != "nonfinite":  # the math, not the node: it never excludes a node
            self.node_faults[fault.node] += 1
        self.tracker.event("failure", step=state.step, rank=fault.rank, node=fault.node, fault=fault.kind,
                           detail=fault.detail, attempt=self.attempt.number)
        self._drop_group()  # phase 1: every actor goes; the next attempt starts its own
        restore = self._restore_point()  # read once: no save can commit now that the group is gone
        if restore[0] is not None:
            # A save committed in the background since the last poll counts: the restore will use it.
            self.last_checkpoint = restore[1]
        decision = self._decide(fault, step=state.step)
        if isinstance(decision, Abort):
            return Failed(step=state.step, error=WorkerFailure(f"{state.message} at step {state.step + 1}. "
                                                               f"{decision.reason}"))
        if isinstance(decision, SkipBatch):
            self._skip(decision.step)
        if isinstance(decision, Noop):
            decision = Restart(reason=decision.reason)
        return self._next(decision, step=state.step, fault=fault, detected_at=state.detected_at, restore=restore)

    def _skip(self, step: int) -> None:
        """Record that no step trains the global batch step ``step`` (from 1) trained, before any worker
        restarts: the step and the LR schedule stay, step ``step`` trains the next batch instead."""
        g = self.p.train.global_batch
        batch = self.skips.batch_of(step - 1)
        start, stop = batch * g, (batch + 1) * g
        order = self.p.order
        samples = tuple(int(i) for i in order.sample_ids(start, g)) if order is not None else ()
        self.skipped.append(SkippedBatch(batch=batch, step=step, positions=(start, stop), samples=samples))
        try:
            write_skipped(self.p.run_dir, self.skipped, global_batch=g)
        except OSError as err:
            raise RunDirError(f"cannot record the skip of global batch {batch} in {self.p.run_dir} ({err}); "
                              f"free the run directory, then {_resume_hint(self.last_checkpoint)}") from err
        self.skips = skips_of(self.skipped)
        self.tracker.event(
            "skip_batch", step=step, batch=batch, positions=f"{start}..{stop - 1}", samples=list(samples),
            executed=True,
            message=f"global batch {batch} (positions {start}..{stop - 1}) skipped after its loss was not finite "
                    f"twice; step {step} now trains positions {self._positions(step)}, the LR schedule unchanged",
        )

    def _decide(self, fault: WorkerFault, *, step: int) -> Decision:
        decision = self.policy.decide(fault, self._context(fault))
        while isinstance(decision, WaitForNode):
            self.tracker.event("decision", step=step, decision=decision.kind, reason=decision.reason,
                               nodes=list(decision.nodes))
            back = wait_back(decision.nodes, view=self.cluster_nodes, timeout_s=decision.timeout_s,
                             should_stop=lambda: self.stop_signal is not None)
            if len(back) == len(decision.nodes):
                decision = Restart(reason=f"node(s) {', '.join(back)} back: restart on the same nodes")
            else:
                decision = self.policy.decide(fault, self._context(fault, waited=True))
        self.tracker.event("decision", step=step, decision=decision.kind, reason=decision.reason)
        return decision

    def _next(self, decision: Decision, *, step: int, fault: WorkerFault | None, detected_at: float,
              restore: tuple[str | None, int] | None = None) -> State:
        """Plan the next attempt for ``decision`` and start it from the newest valid checkpoint."""
        began = time.monotonic()
        old = self.attempt
        try:
            attempt = next_attempt(old, decision, planner=self.replanner)
        except PlanError as err:
            return Failed(step=step, error=WorkerFailure(
                f"no layout fits the {self.attempt.farm.num_devices} device(s) left ({err}); the newest valid "
                f"checkpoint is {_step_text(self.last_checkpoint)}: {_resume_hint(self.last_checkpoint)} once "
                "the nodes are back"))
        replan_s = time.monotonic() - began
        self.tracker.event("replan", old=old.layout, new=attempt.layout, plan_s=round(replan_s, 4),
                           attempt=attempt.number, nodes=sorted({r.node for r in attempt.plan.ranks}),
                           notes=list(attempt.plan.notes[:1]))
        path, from_step = restore if restore is not None else self._restore_point()
        memory = self._memory_source(disk_step=from_step if path is not None else 0)
        if memory is not None:
            path, from_step = None, memory.step
        self.clock = RecoveryClock(
            fault="rejoin" if fault is None else f"{fault.node} {fault.kind}", reached=step,
            detected_at=detected_at, detect_s=max(0.0, detected_at - self.step_done_at) if fault else 0.0,
            replan_s=replan_s, restored_step=from_step, decision=decision.kind, layout=attempt.layout,
            change=_change_text(old, attempt, self.p.train.global_batch),
            source="memory" if memory is not None else "disk",
        )
        return Starting(attempt, path, from_step, memory=memory)

    def _restore_point(self) -> tuple[str | None, int]:
        """The newest valid checkpoint (its path and step), or a fresh start when there is none yet."""
        cfg = self.p.checkpoint
        store = CheckpointStore(self.p.run_dir / "checkpoints", keep_last=cfg.keep_last, keep_every=cfg.keep_every)
        info = store.latest_valid()
        if info is None:
            return None, 0
        return str(info.path), info.step

    def _restored(self, state: Starting, setups: list[dict[str, Any]]) -> None:
        clock = self.clock
        assert clock is not None
        now = time.monotonic()
        clock.restore_s = max(float(s.get("load_s", 0.0)) for s in setups)
        clock.restart_s = max(0.0, now - clock.detected_at - clock.detect_s - clock.replan_s - clock.restore_s)
        clock.started_at = now
        restored_any = state.resume_path is not None or state.memory is not None
        source = clock.source if restored_any else "none"
        restored = (f"restored step {state.step} from {source} in {clock.restore_s:.1f} s" if restored_any
                    else "no checkpoint yet: started again from step 0")
        self.tracker.event("restore", step=state.step, source=source, checkpoint=state.resume_path,
                           restore_s=round(clock.restore_s, 3), lost_steps=clock.reached - state.step,
                           message=f"{clock.fault} at step {clock.reached}: {clock.decision} {clock.change}, "
                                   f"{restored}, continuing")

    def _recovered(self, step: int) -> None:
        clock = self.clock
        assert clock is not None
        self.clock = None
        redo_s = time.monotonic() - clock.started_at
        mttr = clock.detect_s + clock.replan_s + clock.restart_s + clock.restore_s + redo_s
        lost = clock.reached - clock.restored_step
        self.tracker.event(
            "recovery", mttr_s=round(mttr, 3), detect_s=round(clock.detect_s, 3), replan_s=round(clock.replan_s, 4),
            restart_s=round(clock.restart_s, 3), restore_s=round(clock.restore_s, 3), redo_s=round(redo_s, 3),
            lost_steps=lost, layout=clock.layout, decision=clock.decision, source=clock.source,
            message=(f"{clock.fault} at step {clock.reached}: {clock.decision} -> dp{clock.layout['dp']} "
                     f"tp{clock.layout['tp']} pp{clock.layout['pp']}, restored step {clock.restored_step} from "
                     f"{clock.source} ({lost} step(s) redone), back past step {clock.reached} in {mttr:.1f} s"),
        )

    def _resize(self, state: Resizing) -> State:
        """Nodes are back: checkpoint here, then re-plan upward and continue from that checkpoint."""
        self.tracker.event("rejoin", step=state.step, nodes=list(state.nodes))
        decision = self.policy.on_rejoin(state.nodes, self._context(
            WorkerFault(rank=-1, node=state.nodes[0], kind="rejoin", detail="back in the cluster")))
        self.tracker.event("decision", step=state.step, decision=decision.kind, reason=decision.reason)
        if not isinstance(decision, Grow):
            self._save(state.step)
            return Training(step=state.step)
        self._save(state.step)
        self._wait_saves()
        if self.last_checkpoint != state.step:
            return Training(step=state.step)  # the boundary's save failed: grow at the next one
        self._drop_group()
        return self._next(decision, step=state.step, fault=None, detected_at=time.monotonic())

    def _on_error(self, state: State, err: FarmError) -> State:
        """Record a failure no policy can help with (for a post-mortem) and stop with its message."""
        self.failures += 1
        step = state.step if not isinstance(state, Finished | Failed) else self.step
        fault = err.fault if isinstance(err, StartupFailed | StartupTimedOut) else None
        if isinstance(err, StartupTimeout):
            kind = "startup_timeout"
        elif isinstance(state, Starting) or isinstance(err, StartupFailure):
            kind = "startup_failure"
        else:
            kind = "error"
        self.tracker.event("failure", step=step, rank=None if fault is None else fault.rank,
                           node=None if fault is None else fault.node, fault=kind, error=type(err).__name__,
                           detail=str(err) if fault is None else fault.detail)
        self._drop_group()
        return Failed(step=step, error=err)

    def _drop_group(self) -> None:
        if self.group is not None:
            self.group.shutdown(graceful=False)
            self.group = None


def _change_text(old: Attempt, new: Attempt, global_batch: int) -> str:
    """'dp6 -> dp4 (grad_accum 1 -> 3, global batch 24)': what a recovery did to the layout."""
    def degrees(a: Attempt) -> str:
        return " ".join(f"{k}{v}" for k, v in a.layout.items() if v > 1 or k == "dp")

    before, after = degrees(old), degrees(new)
    if before == after and old.plan.grad_accum == new.plan.grad_accum:
        return f"on {before} (layout unchanged, global batch {global_batch})"
    return (f"{before} -> {after} (grad_accum {old.plan.grad_accum} -> {new.plan.grad_accum}, "
            f"global batch {global_batch})")


def _step_text(step: int | None) -> str:
    return "none (no checkpoint yet)" if step is None else f"step {step}"


def _resume_hint(step: int | None) -> str:
    return (f"re-run the same command to resume from checkpoint step {step}" if step is not None
            else "re-run the same command to start again from step 0 (no checkpoint yet)")


def preempted_message(finished: Finished, last_checkpoint: int | None) -> Preempted:
    what = "interrupted (Ctrl-C)" if finished.reason == "SIGINT" else f"stopped by {finished.reason}"
    return Preempted(
        f"{what} at step {finished.step}; checkpoint step {last_checkpoint} written; re-run the same command "
        "(or resubmit, or requeue) to continue", signal_name=finished.reason,
    )
