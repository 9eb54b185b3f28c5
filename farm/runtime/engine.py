"""The optimizer step inside one worker: DeepSpeed ZeRO data parallelism around the GPT model.

The math is layout-free (DESIGN.md invariant 2): the loss of a step is the mean over the G samples
of the global batch, whatever the DP degree; each micro-batch's randomness is seeded from its global
index, and the LR is a pure function of the step. State is exported as full tensors under logical
names, so a checkpoint loads into any DP degree or ZeRO stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from farm.config import ModelConfig, TrainConfig
from farm.data import MicroBatch
from farm.errors import TrainingDiverged
from farm.runtime.model import GPT


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    grad_norm: float
    lr: float
    samples: int
    """Cumulative samples consumed after this step (step * global_batch)."""


def lr_at(step: int, *, train: TrainConfig, decay_steps: int) -> float:
    """Linear warmup, then cosine from lr to min_lr over decay_steps, then constant at min_lr."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, decay_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


def micro_seed(seed: int, step: int, micro: int) -> int:
    """Seed of global micro-batch ``micro`` of ``step``: the same in every layout and on resume."""
    return (seed * 1_000_003 + step * 65_537 + micro) % (2**63 - 1)


def deepspeed_config(*, train: TrainConfig, micro_batch: int, grad_accum: int, dp: int, zero_stage: int,
                     precision: str) -> dict[str, Any]:
    return {
        "train_batch_size": micro_batch * grad_accum * dp,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class TrainEngine:
    """One worker's model, optimizer and step function over its DP group."""

    def __init__(self, *, model: ModelConfig, train: TrainConfig, vocab_size: int, dp: int, dp_rank: int,
                 micro_batch: int, grad_accum: int, zero_stage: int, precision: str, decay_steps: int,
                 device: torch.device) -> None:
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.train, self.dp, self.dp_rank = train, dp, dp_rank
        self.grad_accum, self.zero_stage, self.decay_steps = grad_accum, zero_stage, decay_steps
        torch.manual_seed(train.seed)  # identical initial weights on every rank and in every layout
        module = GPT(model, vocab_size=vocab_size).to(device)
        self.param_names = [n for n, _ in module.named_parameters()]
        decay = [p for n, p in module.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in module.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps,
        )
        config = deepspeed_config(train=train, micro_batch=micro_batch, grad_accum=grad_accum, dp=dp,
                                  zero_stage=zero_stage, precision=precision)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.device = device
        self.step = 0

    @property
    def module(self) -> GPT:
        return self.engine.module  # type: ignore[no-any-return]

    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, train=self.train, decay_steps=self.decay_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, batches: Iterator[MicroBatch]) -> StepResult:
        """Run grad_accum micro-batches of the next step and the optimizer update."""
        step = self.step
        lr = self._set_lr(step)
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(self.grad_accum):
            mb = next(batches)
            if mb.step != step:
                raise RuntimeError(f"data stream is at step {mb.step}, engine at step {step}")
            torch.manual_seed(micro_seed(self.train.seed, step, mb.micro * self.dp + self.dp_rank))
            tokens = torch.from_numpy(mb.tokens).to(self.device)
            loss = self.engine(tokens[:, :-1], tokens[:, 1:])
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().double().cpu()
        # Mean over the global batch: every micro-batch holds the same number of tokens.
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_group)
        mean = float(total) / (self.grad_accum * self.dp)
        if not math.isfinite(mean):
            raise TrainingDiverged(
                f"loss is {mean} at step {step + 1}; the run stopped. Lower train.lr or train.grad_clip, "
                "then resume from the last checkpoint"
            )
        norm = self.engine.get_global_grad_norm()
        self.step = step + 1
        return StepResult(step=self.step, loss=mean, grad_norm=float(norm) if norm is not None else float("nan"),
                          lr=lr, samples=self.step * self.train.global_batch)

    @property
    def dp_group(self) -> Any:
        return None  # DP is the whole world until tensor/pipeline parallelism adds groups

    # -- layout-free state --------------------------------------------------------------------------

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.module.named_parameters())

    def _adam_step(self) -> int:
        for state in self._torch_optimizer().state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return inner  # type: ignore[no-any-return]

    def _link_zero_state(self) -> None:
        """Make ZeRO's per-parameter views of the Adam moments valid for every param group.

        DeepSpeed links those views once, after the first param group's first step, when torch has
        not yet created the other groups' state; so they stay empty. Creating any missing state on
        the flat fp32 partitions and linking again fixes that, and lets a fresh engine take a
        checkpoint's moments before its first step.
        """
        zero = self.optimizer
        inner = self._torch_optimizer()
        for flat in zero.single_partition_of_fp32_groups:
            if "exp_avg" not in inner.state[flat]:
                inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def export_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights and Adam moments by logical name. Collective: every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out: dict[str, torch.Tensor] = {}
        plain = self.zero_stage == 0
        if not plain:
            self._link_zero_state()
        state = self._torch_optimizer().state
        for name, p in self._named():
            out[f"model/{name}"] = (p.detach() if plain else safe_get_full_fp32_param(p)).float().cpu()
            for key in ("exp_avg", "exp_avg_sq"):
                if plain:
                    value = state[p][key] if key in state.get(p, {}) else torch.zeros_like(p)
                else:
                    value = safe_get_full_optimizer_state(p, key)
                out[f"optim/{key}/{name}"] = value.float().cpu()
        out["optim/step"] = torch.tensor([self._adam_step()], dtype=torch.int64)
        return out

    def import_state(self, read: Any, *, step: int) -> None:
        """Load full tensors through ``read(name) -> Tensor``; works for any saved DP degree or stage."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        plain = self.zero_stage == 0
        adam_step = int(read("optim/step").reshape(-1)[0])
        if not plain:
            self._link_zero_state()
        state = self._torch_optimizer().state
        with torch.no_grad():
            for name, p in self._named():
                weight = read(f"model/{name}")
                p.copy_(weight.to(p.dtype))  # the working copy, used by the next forward
                if plain:
                    state[p] = {"step": torch.tensor(float(adam_step))}
                else:
                    safe_set_full_fp32_param(p, weight.float())  # ZeRO's fp32 master partition
                for key in ("exp_avg", "exp_avg_sq"):
                    value = read(f"optim/{key}/{name}")
                    if plain:
                        state[p][key] = value.to(p.dtype).clone()
                    else:
                        safe_set_full_optimizer_state(p, value.float(), key)
        for group_state in state.values():
            if "step" in group_state:
                group_state["step"] = torch.tensor(float(adam_step))
        self.engine.global_steps = step
        self.engine.global_samples = step * self.train.global_batch
        self.step = step
