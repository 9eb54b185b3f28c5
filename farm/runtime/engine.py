"""The optimizer step inside one worker: DeepSpeed ZeRO over the DP group, around a GPT that is
tensor-parallel over the TP group and split into pipeline stages run with 1F1B.

The math is layout-free (docs/design.md invariants 2 and 3): the loss of a step is the mean over the G
samples of the global batch whatever (dp, tp, pp) is; each micro-batch's randomness is seeded from
its global index; the LR is a pure function of the step; every logical tensor starts from the same
values. State goes out and comes in as slices of logical tensors, so a checkpoint written by one
layout loads into any other.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from farm.checkpoint import SliceEntry
from farm.config import ModelConfig, TrainConfig
from farm.data import MicroBatch
from farm.runtime.groups import DeepSpeedMPU, ParallelContext
from farm.runtime.model import GPT
from farm.runtime.optim import AdamW, defer_deepspeed_compile
from farm.runtime.pipeline import PipelineStage, run_pipeline_step
from farm.runtime.tensor_parallel import ShardSpec, shard_specs

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
MAX_BLOCKS = 3
"""Most blocks one rank's shard of a logical tensor has (q, k and v of the fused qkv weight)."""


@dataclass(frozen=True)
class StepResult:
    step: int
    loss: float
    """Mean loss over the global batch; NaN on ranks outside the last pipeline stage."""
    grad_norm: float
    lr: float
    samples: int
    """Cumulative samples consumed after this step (step * global_batch)."""
    compute_s: float = 0.0
    """This rank's time in forward passes this step: its own speed, before it waits on DP peers in the
    gradient reduction (TP collectives inside the forward still count). Stragglers show here."""


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


def part_names(rank: int) -> list[str]:
    """The tensor files one rank writes per checkpoint (one per shard block; some may be empty)."""
    return [f"rank-{rank:05d}-b{k}" for k in range(MAX_BLOCKS)]


def _skip_inference_ops(deepspeed: Any) -> None:
    """Keep DeepSpeed from building the shared-memory all-reduce of its CPU accelerator.

    DeepSpeed compiles that C++ op when its communication backend starts, and calls it only from
    ``inference_all_reduce``; training reduces through the process group (gloo here) either way.
    The compile takes about a minute on 2 cores in every new environment (a fresh venv, another
    checkout), while the run's workers wait in start-up. Marking the op incompatible makes
    DeepSpeed skip it, as it does on machines where it cannot build.

    That table of compatible ops is filled on first use by probing every op builder, which runs a
    compiler per op in every worker; the shared-memory op is its only reader, so on CPU the table
    holds just that entry and the probe never runs.
    """
    if deepspeed.accelerator.get_accelerator().device_name() != "cpu":
        return
    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class TrainEngine:
    """One worker's model shard, optimizer and step function."""

    def __init__(self, *, model: ModelConfig, train: TrainConfig, vocab_size: int, ctx: ParallelContext,
                 micro_batch: int, grad_accum: int, zero_stage: int, precision: str, decay_steps: int,
                 device: torch.device) -> None:
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        _skip_inference_ops(deepspeed)
        defer_deepspeed_compile(deepspeed)
        self.model_cfg, self.train, self.ctx = model, train, ctx
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        # With one DP rank ZeRO has nothing to partition, and its bookkeeping costs a third of a
        # small model's step (benchmarks/bench_layouts.py): train without it. The math is the same.
        zero_stage = zero_stage if ctx.dp > 1 else 0
        self.zero_stage, self.decay_steps, self.device = zero_stage, decay_steps, device
        self._norm = float("nan")
        self._compute_s = 0.0
        module = GPT(model, vocab_size=vocab_size, tp_group=ctx.tp_group if ctx.tp > 1 else None,
                     layers=ctx.layers, first=ctx.first_stage, last=ctx.last_stage, init_seed=train.seed).to(device)
        self.specs: dict[str, ShardSpec] = shard_specs(module)
        self._mark_for_deepspeed(module)
        decay = [p for p in module.parameters() if p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.dim() < 2]
        optimizer = AdamW(
            [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps,
        )
        config = deepspeed_config(train=train, micro_batch=micro_batch, grad_accum=grad_accum, dp=ctx.dp,
                                  zero_stage=zero_stage, precision=precision)
        if zero_stage == 0:
            # DeepSpeed's clipping without ZeRO counts TP-replicated tensors by the wrong rank and the
            # tied copy twice; the engine clips itself, by the rule ZeRO uses (see _clip).
            config["gradient_clipping"] = 0.0
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, mpu=DeepSpeedMPU(ctx), dist_init_required=False
        )
        if ctx.pp > 1:
            # The pipeline runs the backward passes itself; gradients are reduced once per step.
            self.engine.enable_backward_allreduce = False
        self.step = 0

    def _mark_for_deepspeed(self, module: GPT) -> None:
        """Tell DeepSpeed's gradient norm which tensors are split over TP and which are copies."""
        for name, p in module.named_parameters():
            spec = self.specs.get(name)
            if spec is not None and spec.size > 1:
                p.tensor_model_parallel = True  # type: ignore[attr-defined]
        if self.tied_copy is not None:
            self.tied_copy_param(module).ds_pipe_replicated = True  # type: ignore[attr-defined]

    @property
    def tied_copy(self) -> str | None:
        """The last stage's copy of the tied embedding, when the model is split into stages."""
        ctx = self.ctx
        if self.model_cfg.tie_embeddings and ctx.pp > 1 and ctx.last_stage:
            return "embed.weight"
        return None

    @staticmethod
    def tied_copy_param(module: GPT) -> torch.nn.Parameter:
        assert module.embed is not None
        return module.embed.weight

    @property
    def module(self) -> GPT:
        return self.engine.module  # type: ignore[no-any-return]

    def _set_lr(self, step: int) -> float:
        lr = lr_at(step, train=self.train, decay_steps=self.decay_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _seed(self, step: int, micro: int) -> None:
        torch.manual_seed(micro_seed(self.train.seed, step, micro * self.ctx.dp + self.ctx.dp_rank))

    def train_step(self, batches: Iterator[MicroBatch]) -> StepResult:
        """Run the grad_accum micro-batches of the next step and the optimizer update."""
        step = self.step
        lr = self._set_lr(step)
        micro = [next(batches) for _ in range(self.grad_accum)]
        self._compute_s = 0.0
        if any(mb.step != step for mb in micro):
            raise RuntimeError(f"data stream is at step {micro[0].step}, engine at step {step}")
        if self.ctx.pp == 1:
            total = self._accumulate(micro, step)
        else:
            total = self._pipeline(micro, step)
        mean = float("nan")
        if self.ctx.last_stage:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.ctx.dp_group)
            mean = float(total) / (self.grad_accum * self.ctx.dp)
            # A non-finite loss is reported, not raised: the controller rolls the step back (its update
            # is already applied) and decides whether to re-run it, skip it or stop.
        norm = self.engine.get_global_grad_norm() if self.zero_stage else self._norm
        self.step = step + 1
        return StepResult(step=self.step, loss=mean, grad_norm=float(norm) if norm is not None else float("nan"),
                          lr=lr, samples=self.step * self.train.global_batch, compute_s=self._compute_s)

    def _accumulate(self, micro: list[MicroBatch], step: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for mb in micro:
            self._seed(step, mb.micro)
            tokens = torch.from_numpy(mb.tokens).to(self.device)
            began = time.perf_counter()
            loss = self.engine(tokens[:, :-1], tokens[:, 1:])
            self._compute_s += time.perf_counter() - began
            self.engine.backward(loss)
            if mb is micro[-1] and self.zero_stage == 0:
                self._clip()  # gradients are reduced over DP by now; the update comes next
            self.engine.step()
            total += loss.detach().double().cpu()
        return total

    def _clip(self) -> None:
        """Clip to train.grad_clip by the global norm over the model group: TP-split tensors from
        every TP rank, replicated ones once, the last stage's tied copy not at all (as ZeRO does)."""
        specs, ctx = self.specs, self.ctx
        squares = torch.zeros((), dtype=torch.float64)
        grads = []
        for name, p in self.module.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            split = name in specs and specs[name].size > 1
            if name != self.tied_copy and (split or ctx.tp_rank == 0):
                squares += p.grad.detach().double().pow(2).sum().cpu()
        dist.all_reduce(squares, group=ctx.model_group)
        self._norm = float(squares.sqrt())
        if self.train.grad_clip > 0:
            coef = self.train.grad_clip / (self._norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)

    def _pipeline(self, micro: list[MicroBatch], step: int) -> torch.Tensor:
        ctx, cfg = self.ctx, self.model_cfg
        stage = PipelineStage(stage=ctx.pp_rank, stages=ctx.pp, prev_rank=ctx.prev_rank, next_rank=ctx.next_rank,
                              act_shape=(self.micro_batch, cfg.seq_len, cfg.d_model), device=self.device)
        module = self.module

        def get_micro(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = torch.from_numpy(micro[i].tokens).to(self.device)
            return tokens[:, :-1], tokens[:, 1:]

        def stage_fn(x: torch.Tensor, *, micro: int, targets: torch.Tensor | None) -> torch.Tensor:
            self._seed(step, micro)
            began = time.perf_counter()
            out = module(x, targets)
            self._compute_s += time.perf_counter() - began
            return out  # type: ignore[no-any-return]

        losses = run_pipeline_step(stage=stage, stage_fn=stage_fn, get_micro=get_micro,
                                   micro_batches=self.grad_accum, loss_scale=1.0 / self.grad_accum)
        if cfg.tie_embeddings and (ctx.first_stage or ctx.last_stage):
            grad = module.embed.weight.grad if module.embed is not None else None
            assert grad is not None
            dist.all_reduce(grad, group=ctx.embed_group)
        engine = self.engine
        engine._force_grad_boundary = True  # the pipeline's micro-batches are one accumulation
        try:
            if self.zero_stage:
                # Gradients came from the pipeline's own backward passes, not from ZeRO's hooks;
                # DeepSpeed's pipeline engine reduces them the same way.
                self.optimizer.set_gradient_accumulation_boundary(True)
                self.optimizer.reduce_gradients(pipeline_parallel=True)
            else:
                engine.allreduce_gradients()
                self._clip()
            engine._take_model_step(None)
        finally:
            engine._force_grad_boundary = False
        if losses is None:
            return torch.zeros((), dtype=torch.float64)
        return losses.detach().double().sum().cpu()

    # -- layout-free state --------------------------------------------------------------------------

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return inner  # type: ignore[no-any-return]

    def _adam_step(self) -> int:
        for state in self._torch_optimizer().state.values():
            if "step" in state:
                return int(state["step"])
        return 0

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

    def _full_local(self, p: torch.nn.Parameter, key: str | None) -> torch.Tensor:
        """This rank's TP shard of a weight (key None) or Adam moment, whole over the DP group.

        Collective over the DP group under ZeRO: every DP rank must ask for the same tensors.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.zero_stage == 0:
            # Copies: the save is written in the background while training changes these tensors.
            if key is None:
                return p.detach().float().clone()
            state = self._torch_optimizer().state.get(p, {})
            return state[key].float().clone() if key in state else torch.zeros_like(p, dtype=torch.float32)
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return value.float()

    def export_state(self) -> dict[str, dict[str, SliceEntry]]:
        """This rank's share of the checkpoint, by part name: slices of logical tensors.

        Collective. Every tensor is written exactly once: TP shards by their TP rank, replicated
        tensors by TP rank 0, the tied embedding by the first stage, and the tensors of one TP/PP
        coordinate spread over its DP ranks (tensor j by DP rank j mod dp), so no rank gathers the
        whole model and every rank writes in parallel.
        """
        if self.zero_stage:
            self._link_zero_state()
        ctx = self.ctx
        parts: dict[str, dict[str, SliceEntry]] = {name: {} for name in part_names(ctx.rank)}
        names = part_names(ctx.rank)
        for j, (name, p) in enumerate(self.module.named_parameters()):
            values = {f"model/{name}": self._full_local(p, None)}
            for key in OPTIM_KEYS:
                values[f"optim/{key}/{name}"] = self._full_local(p, key)
            spec = self.specs.get(name)
            mine = j % ctx.dp == ctx.dp_rank and name != self.tied_copy
            if not mine or ((spec is None or spec.size == 1) and ctx.tp_rank != 0):
                continue
            for logical, value in values.items():
                for k, entry in enumerate(_slices(value.cpu(), spec)):
                    parts[names[k]][logical] = entry
        if ctx.rank == 0:
            parts[names[0]]["optim/step"] = SliceEntry.full(torch.tensor([self._adam_step()], dtype=torch.int64))
        return parts

    def export_local(self) -> dict[str, dict[str, SliceEntry]]:
        """The same state as :meth:`export_state`, without any collective: under ZeRO each DP rank
        gives the pieces of each tensor its own partition holds (flat ranges, cut into boxes), which
        together cover every tensor once. Part names are this rank's, one per piece of a tensor.

        This is what a memory snapshot takes every step: a copy of this rank's partition, where
        :meth:`export_state` gathers every tensor whole over the DP group first.
        """
        if not self.zero_stage:
            return self.export_state()
        self._link_zero_state()
        ctx = self.ctx
        parts: dict[str, dict[str, SliceEntry]] = {}

        def add(logical: str, entries: list[SliceEntry]) -> None:
            for k, entry in enumerate(entries):
                parts.setdefault(f"rank-{ctx.rank:05d}-p{k}", {})[logical] = entry

        for name, p in self.module.named_parameters():
            spec = self.specs.get(name)
            fragment = getattr(p, "_hp_mapping", None)
            if fragment is None or name == self.tied_copy or ((spec is None or spec.size == 1) and ctx.tp_rank != 0):
                continue
            start = fragment.lp_fragment_address.start
            stop = start + fragment.lp_fragment_address.numel
            for key in (None, *OPTIM_KEYS):
                flat = fragment.get_hp_fragment(key).detach().float().cpu().clone()
                logical = f"model/{name}" if key is None else f"optim/{key}/{name}"
                add(logical, _flat_slices(flat, start, stop, tuple(p.shape), spec))
        if ctx.rank == 0:
            add("optim/step", [SliceEntry.full(torch.tensor([self._adam_step()], dtype=torch.int64))])
        return parts

    def import_state(self, read: Callable[..., torch.Tensor], *, step: int) -> None:
        """Load this rank's shards through ``read(name, index)``, whatever layout wrote them."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        plain = self.zero_stage == 0
        adam_step = int(read("optim/step").reshape(-1)[0])
        if not plain:
            self._link_zero_state()
        state = self._torch_optimizer().state
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                spec = self.specs.get(name)
                weight = _read_local(read, f"model/{name}", spec)
                p.copy_(weight.to(p.dtype))  # the working copy, used by the next forward
                if plain:
                    state[p] = {"step": torch.tensor(float(adam_step))}
                else:
                    safe_set_full_fp32_param(p, weight.float())  # ZeRO's fp32 master partition
                for key in OPTIM_KEYS:
                    value = _read_local(read, f"optim/{key}/{name}", spec)
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


    def import_weights(self, read: Callable[..., torch.Tensor]) -> None:
        """Only the weights, through ``read(name, index)``, into any layout; the optimizer starts
        afresh at step 0 (model.init_from)."""
        from deepspeed.utils import safe_set_full_fp32_param

        if self.zero_stage:
            self._link_zero_state()
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                weight = _read_local(read, f"model/{name}", self.specs.get(name))
                p.copy_(weight.to(p.dtype))
                if self.zero_stage:
                    safe_set_full_fp32_param(p, weight.float())  # ZeRO's fp32 master partition


def _slices(value: torch.Tensor, spec: ShardSpec | None) -> list[SliceEntry]:
    """A local tensor as slices of its logical tensor, one per shard block."""
    if spec is None or spec.size == 1:
        return [SliceEntry.full(value.contiguous())]
    global_shape = spec.global_shape(value.shape)
    out = []
    for local_start, global_start, length in spec.blocks():
        piece = value.narrow(spec.dim, local_start, length).contiguous()
        offsets = [0] * value.dim()
        offsets[spec.dim] = global_start
        out.append(SliceEntry(tensor=piece, global_shape=global_shape, offsets=tuple(offsets)))
    return out


def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The elements [start, stop) of a row-major tensor of ``shape``, as (offsets, sizes) boxes in
    order; each box is itself one contiguous range of the flat tensor."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])

    def in_row(row: int, lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [((row, *o), (1, *n)) for o, n in flat_boxes(shape[1:], lo, hi)]

    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return in_row(first, start - first * inner, stop - first * inner)
    out = []
    if start % inner:
        out += in_row(first, start % inner, inner)
        first += 1
    full = stop // inner
    if full > first:
        out.append(((first, *[0] * (len(shape) - 1)), (full - first, *shape[1:])))
    if stop % inner:
        out += in_row(full, 0, stop % inner)
    return out


def _flat_slices(flat: torch.Tensor, start: int, stop: int, shape: tuple[int, ...],
                 spec: ShardSpec | None) -> list[SliceEntry]:
    """Elements [start, stop) of a local tensor of ``shape`` (held as ``flat``) as slices of its
    logical tensor: boxes of the local tensor, cut again where TP blocks meet and shifted to their
    place in the logical tensor."""
    out = []
    split = spec is not None and spec.size > 1
    global_shape = spec.global_shape(shape) if spec is not None and split else shape
    for offsets, sizes in flat_boxes(shape, start, stop):
        at = sum(o * math.prod(shape[d + 1:]) for d, o in enumerate(offsets)) - start
        box = flat[at:at + math.prod(sizes)].reshape(sizes)
        if not split:
            out.append(SliceEntry(tensor=box, global_shape=global_shape, offsets=offsets))
            continue
        assert spec is not None
        lo, hi = offsets[spec.dim], offsets[spec.dim] + sizes[spec.dim]
        for local_start, global_start, length in spec.blocks():
            a, b = max(lo, local_start), min(hi, local_start + length)
            if a >= b:
                continue
            piece = box.narrow(spec.dim, a - lo, b - a).contiguous()
            moved = list(offsets)
            moved[spec.dim] = global_start + (a - local_start)
            out.append(SliceEntry(tensor=piece, global_shape=global_shape, offsets=tuple(moved)))
    return out


def _read_local(read: Callable[..., torch.Tensor], name: str, spec: ShardSpec | None) -> torch.Tensor:
    """This rank's shard of logical tensor ``name``: only the blocks it holds are read."""
    if spec is None or spec.size == 1:
        return read(name)
    pieces = []
    for _, global_start, length in spec.blocks():
        index = [slice(None)] * (spec.dim + 1)
        index[spec.dim] = slice(global_start, global_start + length)
        pieces.append(read(name, tuple(index)))
    return torch.cat(pieces, dim=spec.dim)
