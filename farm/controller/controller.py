"""The controller: an explicit state machine in the driver, the only writer of run state.

``Controller.run`` loops ``state = self._step(state)`` until a terminal state. Each state is a small
frozen dataclass; side concerns (checkpoint, stop, logging) are one call each with their own gate.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.config import CheckpointConfig, DataConfig, ModelConfig, RunConfig, TrainConfig
from farm.controller.cluster import route_ray_messages
from farm.controller.policy import AbortPolicy, FailureContext, FailurePolicy
from farm.controller.saves import SaveHistory, ranks_text
from farm.controller.worker_group import StartupFailed, StartupTimedOut, WorkerFailed, WorkerGroup
from farm.errors import (
    CheckpointError,
    FarmError,
    Interrupted,
    Preempted,
    StartupFailure,
    StartupTimeout,
    WorkerFailure,
)
from farm.plan import Plan
from farm.topology import Farm
from farm.tracking import StepMetrics, Tracker


@dataclass(frozen=True)
class Starting:
    resume_path: str | None
    resume_step: int


@dataclass(frozen=True)
class Training:
    step: int


@dataclass(frozen=True)
class Finishing:
    step: int
    reason: str
    """'done', 'stop_after_step' or the name of the signal that asked the run to stop."""


@dataclass(frozen=True)
class Finished:
    step: int
    reason: str


@dataclass(frozen=True)
class Failed:
    step: int
    error: FarmError


State = Starting | Training | Finishing | Finished | Failed


@dataclass(frozen=True)
class RunParts:
    """Everything the controller needs, built by the launcher; each part is its own component's."""

    farm: Farm
    plan: Plan
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    run: RunConfig
    run_dir: Path
    vocab_size: int
    decay_steps: int
    precision: str
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)
    """Static fields of every checkpoint manifest (config hash, tokenizer hash, data fingerprint)."""


class Controller:
    def __init__(self, parts: RunParts, *, tracker: Tracker, policy: FailurePolicy | None = None) -> None:
        self.p = parts
        self.tracker = tracker
        self.policy = policy or AbortPolicy()
        self.group: WorkerGroup | None = None
        self.last_checkpoint: int | None = None
        self.stop_signal: str | None = None
        self.interrupted = False
        """A second SIGINT came: stop at once."""
        self.step = 0
        """The last step every rank completed."""
        self.failures = 0
        self.saves = SaveHistory(parts.checkpoint, last_valid=None, now=time.monotonic())
        self.saving = False
        """A save is in flight: poll the workers for its outcome after each step."""
        # Names this attempt's in-progress checkpoint directories apart from a crashed attempt's.
        self.attempt = f"{os.getpid()}-{int(time.time())}"
        last = parts.plan.pp - 1
        # Loss and norms are reported by the last pipeline stage.
        self.reporter = next(r.rank for r in parts.plan.ranks
                             if r.pp_rank == last and r.tp_rank == 0 and r.dp_rank == 0)

    # -- gates ---------------------------------------------------------------------------------------

    def should_checkpoint(self, step: int) -> bool:
        every = self.p.checkpoint.every
        return every > 0 and step % every == 0 and step < self.p.train.steps

    def should_stop(self, step: int) -> str | None:
        if step >= self.p.train.steps:
            return "done"
        if self.p.run.stop_after_step is not None and step >= self.p.run.stop_after_step:
            return "stop_after_step"
        return self.stop_signal

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, *, resume_path: str | None, resume_step: int) -> Finished:
        self.last_checkpoint = resume_step if resume_path else None
        self.step = resume_step
        self.saves = SaveHistory(self.p.checkpoint, last_valid=self.last_checkpoint, now=time.monotonic())
        state: State = Starting(resume_path, resume_step)
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
            if self.group is not None:
                self.group.shutdown(graceful=False)
                self.group = None
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
            if isinstance(state, Finishing):
                return self._finish(state)
        except WorkerFailed as err:
            return self._on_failure(state, err)
        except FarmError as err:  # start-up failures, and errors a worker raised with their own message
            return self._on_error(state, err)
        raise AssertionError(f"no transition from {state}")

    def _start(self, state: Starting) -> State:
        p = self.p
        self.group = WorkerGroup(farm=p.farm, plan=p.plan, run_dir=str(p.run_dir),
                                 startup_timeout_s=p.run.startup_timeout_s)
        port = self.group.call("pick_port", timeout=60, what="starting workers", ranks=[0], startup=True)[0]
        master = self.group.infos[0]["ip"]
        setups = self.group.call(
            "setup", timeout=p.run.startup_timeout_s, what="setting up workers", startup=True,
            master_addr=master, master_port=port, plan=p.plan.to_json(), model=p.model, train=p.train,
            data=p.data, vocab_size=p.vocab_size, decay_steps=p.decay_steps, precision=p.precision,
            resume=state.resume_path, resume_step=state.resume_step, attempt=self.attempt,
        )
        self.tracker.event("workers", ranks=len(setups), params=setups[0]["params"],
                           pids=[i["pid"] for i in self.group.infos],
                           nodes=[p.plan.ranks[i].node for i in range(len(setups))])
        if state.resume_path:
            self.tracker.event("resume", step=state.resume_step, checkpoint=state.resume_path)
        self.saves.saved_at = time.monotonic()  # unsaved time counts from the start of training
        return Training(step=state.resume_step)

    def _train(self, state: Training) -> State:
        reason = self.should_stop(state.step)
        if reason is not None:
            return Finishing(step=state.step, reason=reason)
        assert self.group is not None
        started = time.perf_counter()
        reports = self.group.call("run_steps", 1, timeout=self.p.run.step_timeout_s,
                                  what=f"step {state.step + 1}")
        elapsed = time.perf_counter() - started
        report = reports[self.reporter][-1]
        self._log_step(report, elapsed)
        step = self.step = int(report["step"])
        if self.saving:
            self._note_commits(self.group.call("committed", timeout=60, what="checkpoint status"))
        stop = self.saves.over_limit(now=time.monotonic())  # None at once while saves succeed
        if stop is not None:
            return self._stop_unsaved(step, stop)
        if self.should_checkpoint(step):
            self._save(step)
        return Training(step=step)

    def _log_step(self, report: dict[str, Any], elapsed: float) -> None:
        p = self.p
        tokens = p.train.global_batch * p.model.seq_len
        self.tracker.step(StepMetrics(
            step=int(report["step"]), loss=float(report["loss"]), lr=float(report["lr"]), tokens=tokens,
            samples=int(report["samples"]), step_time_s=elapsed, grad_norm=float(report["grad_norm"]),
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
            layout={"dp": p.plan.dp, "tp": p.plan.tp, "pp": p.plan.pp},
        ))

    def _save(self, step: int) -> None:
        assert self.group is not None
        meta = dict(self.p.checkpoint_meta)
        meta.update(
            step=step,
            data_cursor={"consumed": step * self.p.train.global_batch, "seed": self.p.train.seed},
            rng={"scheme": "per-micro-batch seed from (train.seed, step, global micro-batch)",
                 "seed": self.p.train.seed},
            scheduler={"last_step": step, "decay_steps": self.p.decay_steps},
            plan=self.p.plan.to_json(),
        )
        root = str(self.p.run_dir / "checkpoints")
        self.saving = True
        self.group.call("save", timeout=self.p.run.step_timeout_s, what=f"checkpoint at step {step}",
                        root=root, step=step, meta=meta, cfg=self.p.checkpoint)

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
        assert self.group is not None
        if self.last_checkpoint != state.step:
            self._save(state.step)
        self._note_commits(self.group.call("wait_save", timeout=self.p.run.step_timeout_s + self.p.checkpoint.commit_timeout_s,
                                           what="finishing the last checkpoint"))
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

    def _on_failure(self, state: State, err: WorkerFailed) -> State:
        self.failures += 1
        step = getattr(state, "step", getattr(state, "resume_step", 0))
        fault = err.fault
        self.tracker.event("failure", step=step, rank=fault.rank, node=fault.node, fault=fault.kind,
                           detail=fault.detail)
        context = FailureContext(step=step, failures=self.failures, plan=self.p.plan, farm=self.p.farm,
                                 lost=(fault.node,) if fault.loses_node else (),
                                 last_checkpoint=self.last_checkpoint)
        decision = self.policy.decide(fault, context)
        self.tracker.event("decision", step=step, decision=decision.kind, reason=decision.reason)
        if self.group is not None:
            self.group.shutdown(graceful=False)
            self.group = None
        return Failed(step=step, error=WorkerFailure(f"{err} at step {step + 1}. {decision.reason}"))

    def _on_error(self, state: State, err: FarmError) -> State:
        """Record a failure no policy can help with (for a post-mortem) and stop with its message."""
        self.failures += 1
        step = getattr(state, "step", getattr(state, "resume_step", 0))
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
        if self.group is not None:
            self.group.shutdown(graceful=False)
            self.group = None
        return Failed(step=step, error=err)


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
