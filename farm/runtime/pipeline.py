"""Pipeline parallelism: one optimizer step's micro-batches through p stages with the 1F1B schedule.

The schedule is PipeDream-Flush (Megatron's non-interleaved 1F1B): stage s runs min(p - s - 1, m)
warm-up forwards, then alternates one forward and one backward, then drains the remaining backwards.
At most p - s micro-batches are in flight on stage s, whatever m is: that bound is why 1F1B and not
GPipe (all forwards, then all backwards, m in flight).

Each stage runs a *program*: the schedule's computations with the point-to-point transfers between
them. All transfers between two consecutive computations are posted together
(``batch_isend_irecv``) and waited together, so a stage that sends its forward output and needs the
next gradient from the same neighbour never blocks on one before posting the other; that is what
keeps blocking transports (gloo, and NCCL for large messages) free of deadlock. docs/pipeline.md
draws the schedule and the ordering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Action:
    """One computation of a stage: the forward or the backward of micro-batch ``micro``."""

    kind: Literal["fwd", "bwd"]
    micro: int


@dataclass(frozen=True)
class Transfer:
    """One point-to-point message: an activation to the next stage or its gradient to the previous one."""

    op: Literal["send", "recv"]
    what: Literal["act", "grad"]
    micro: int

    @property
    def peer_offset(self) -> int:
        """+1 when the other end is the next stage, -1 when it is the previous one."""
        return 1 if (self.what == "act") == (self.op == "send") else -1


Instruction = Action | tuple[Transfer, ...]
"""A program step: a computation, or transfers posted together and all waited for before going on."""


def _check_position(stage: int, stages: int, micro_batches: int) -> None:
    if stages < 1 or not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is not one of the {stages} pipeline stages")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")


def one_f_one_b(*, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """The computations of ``stage`` in execution order under 1F1B."""
    _check_position(stage, stages, micro_batches)
    warmup = min(stages - stage - 1, micro_batches)
    actions = [Action("fwd", i) for i in range(warmup)]
    for i in range(micro_batches - warmup):
        actions += [Action("fwd", warmup + i), Action("bwd", i)]
    actions += [Action("bwd", i) for i in range(micro_batches - warmup, micro_batches)]
    return actions


def stage_program(*, stage: int, stages: int, micro_batches: int) -> list[Instruction]:
    """The 1F1B computations of ``stage`` with the transfers each one needs, merged between computations.

    A forward needs its input activation first (except on the first stage) and sends its output after
    (except on the last); a backward needs its output gradient first (except on the last stage) and
    sends its input gradient after (except on the first). The sends after one computation and the
    receives before the next form one group.
    """
    actions = one_f_one_b(stage=stage, stages=stages, micro_batches=micro_batches)
    first, last = stage == 0, stage == stages - 1
    program: list[Instruction] = []
    pending: list[Transfer] = []
    for action in actions:
        fwd = action.kind == "fwd"
        if (fwd and not first) or (not fwd and not last):
            pending.append(Transfer("recv", "act" if fwd else "grad", action.micro))
        if pending:
            program.append(tuple(pending))
            pending = []
        program.append(action)
        if (fwd and not last) or (not fwd and not first):
            pending.append(Transfer("send", "act" if fwd else "grad", action.micro))
    if pending:
        program.append(tuple(pending))
    return program


@dataclass(frozen=True)
class PipelineStage:
    """Where this process sits in its pipeline and what flows between stages."""

    stage: int
    stages: int
    prev_rank: int | None
    """Global rank of the previous stage; None on the first stage."""
    next_rank: int | None
    """Global rank of the next stage; None on the last stage."""
    act_shape: tuple[int, ...]
    """Shape of the activation sent between stages: (micro_batch, seq_len, d_model)."""
    act_dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where received activations and gradients are allocated: the stage's accelerator."""
    group: Any = None
    """Process group holding this pipeline's ranks; None means the default group."""

    def __post_init__(self) -> None:
        _check_position(self.stage, self.stages, 1)
        if (self.prev_rank is None) != self.first or (self.next_rank is None) != self.last:
            raise ValueError(
                f"stage {self.stage} of {self.stages} has prev_rank={self.prev_rank}, next_rank={self.next_rank}; "
                "exactly the first stage has no previous rank and exactly the last has no next rank"
            )

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


class StageFn(Protocol):
    def __call__(self, x: torch.Tensor, *, micro: int, targets: torch.Tensor | None) -> torch.Tensor:
        """This stage's forward of micro-batch ``micro``.

        ``x`` is the token ids on the first stage and the received activation elsewhere; ``targets``
        is given on the last stage only, which returns the micro-batch's scalar loss; the other
        stages return the activation to send.
        """
        ...


GetMicro = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""``get_micro(i) -> (inputs, targets)`` of micro-batch i; called on the first and last stages only."""
BackwardFn = Callable[[torch.Tensor, torch.Tensor | None], None]
"""``backward_fn(tensor, grad)``: the scaled loss with grad None on the last stage, else output and grad."""


def _autograd_backward(tensor: torch.Tensor, grad: torch.Tensor | None) -> None:
    torch.autograd.backward(tensor, grad)


class _Run:
    """One step's state on one stage: what is in flight, keyed by micro-batch."""

    def __init__(self, st: PipelineStage, stage_fn: StageFn, get_micro: GetMicro, loss_scale: float,
                 backward_fn: BackwardFn) -> None:
        self.st, self.stage_fn, self.get_micro = st, stage_fn, get_micro
        self.loss_scale, self.backward_fn = loss_scale, backward_fn
        self.inputs: dict[int, torch.Tensor] = {}  # tokens, or received activations (leaves)
        self.outputs: dict[int, torch.Tensor] = {}  # activations awaiting their gradient, or losses
        self.grads: dict[int, torch.Tensor] = {}  # received gradients of this stage's outputs
        self.losses: dict[int, torch.Tensor] = {}

    def forward(self, micro: int) -> None:
        targets = None
        if self.st.first or self.st.last:
            tokens, targets = self.get_micro(micro)
            if self.st.first:
                self.inputs[micro] = tokens
        out = self.stage_fn(self.inputs[micro], micro=micro, targets=targets if self.st.last else None)
        if self.st.last:
            if out.dim() != 0:
                raise ValueError(f"the last stage's stage_fn must return a scalar loss, got shape {tuple(out.shape)}")
            self.losses[micro] = out.detach()
        elif tuple(out.shape) != self.st.act_shape or out.dtype != self.st.act_dtype:
            raise ValueError(
                f"stage {self.st.stage} returned an activation of {tuple(out.shape)} {out.dtype}; the pipeline "
                f"sends {self.st.act_shape} {self.st.act_dtype} (set PipelineStage.act_shape/act_dtype)"
            )
        self.outputs[micro] = out

    def backward(self, micro: int) -> None:
        out = self.outputs.pop(micro)
        if self.st.last:
            self.backward_fn(out * self.loss_scale, None)
        else:
            self.backward_fn(out, self.grads.pop(micro))
        if self.st.first:
            del self.inputs[micro]  # tokens need no gradient; activations wait until theirs is sent

    def exchange(self, transfers: tuple[Transfer, ...]) -> None:
        ops, received = [], []
        for t in transfers:
            peer = self.st.next_rank if t.peer_offset > 0 else self.st.prev_rank
            if t.op == "send":
                tensor = self._outgoing(t)
                ops.append(dist.P2POp(dist.isend, tensor, peer, self.st.group))
            else:
                tensor = torch.empty(self.st.act_shape, dtype=self.st.act_dtype, device=self.st.device)
                ops.append(dist.P2POp(dist.irecv, tensor, peer, self.st.group))
                received.append((t, tensor))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for t, tensor in received:
            if t.what == "act":
                self.inputs[t.micro] = tensor.requires_grad_()
            else:
                self.grads[t.micro] = tensor

    def _outgoing(self, t: Transfer) -> torch.Tensor:
        if t.what == "act":
            return self.outputs[t.micro].detach().contiguous()
        x = self.inputs.pop(t.micro)
        # A stage whose output ignores its input still owes its neighbour a gradient.
        return torch.zeros_like(x) if x.grad is None else x.grad.contiguous()


def run_pipeline_step(*, stage: PipelineStage, stage_fn: StageFn, get_micro: GetMicro, micro_batches: int,
                      loss_scale: float = 1.0, backward_fn: BackwardFn | None = None) -> torch.Tensor | None:
    """Run forwards and backwards of ``micro_batches`` micro-batches through the pipeline with 1F1B.

    Gradients accumulate into the stage's parameters; the caller steps the optimizer. The last stage
    back-propagates ``loss * loss_scale`` (1/m gives the mean over micro-batches; pass 1.0 where the
    backward hook scales itself, as DeepSpeed's ``engine.backward`` does). Returns the unscaled
    per-micro-batch losses as a 1-D tensor on the last stage, None on the others.
    """
    run = _Run(stage, stage_fn, get_micro, loss_scale, backward_fn or _autograd_backward)
    for step in stage_program(stage=stage.stage, stages=stage.stages, micro_batches=micro_batches):
        if isinstance(step, Action):
            (run.forward if step.kind == "fwd" else run.backward)(step.micro)
        else:
            run.exchange(step)
    assert not (run.inputs or run.outputs or run.grads), "pipeline program left tensors in flight"
    return torch.stack([run.losses[i] for i in range(micro_batches)]) if stage.last else None
