"""What each training runtime can execute, so that 'auto' only chooses what will really run.

A fixed value (``parallel.virtual_stages=4``) is always evaluated, on any runtime, so published layouts
can be checked; the plan's notes say when the runtime named in ``parallel.runtime`` does not run it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from farm.plan.costmodel import CostParams


@dataclass(frozen=True)
class Runtime:
    name: str
    interleaving: bool
    """Runs interleaved 1F1B (more than one virtual stage per device)."""
    sequence_parallel: bool
    selective_recompute: bool
    max_zero: int
    """Highest ZeRO stage it runs without pipeline parallelism."""
    max_zero_with_pp: int
    """Highest ZeRO stage it runs with pipeline parallelism."""
    microbatch_overhead_s: float = 0.0
    """Fixed seconds it adds per micro-batch and pipeline stage (CostParams.microbatch_overhead_s)."""
    block_overhead_s: float = 0.0
    """Fixed seconds it adds per block and micro-batch (CostParams.block_overhead_s)."""
    overlaps_dp: bool = True
    """Reduces ZeRO 0-2 gradients while the backward pass runs; False: only after it
    (CostParams.reduce_after_backward)."""

    def zero_stages(self, *, pipelined: bool) -> list[int]:
        return list(range((self.max_zero_with_pp if pipelined else self.max_zero) + 1))

    def cost(self, base: CostParams | None = None) -> CostParams:
        """The cost model's constants with this runtime's own costs and overlap."""
        return dataclasses.replace(
            base or CostParams(),
            microbatch_overhead_s=self.microbatch_overhead_s,
            block_overhead_s=self.block_overhead_s,
            reduce_after_backward=not self.overlaps_dp,
        )


RUNTIMES: dict[str, Runtime] = {
    # farm.runtime: PipeDream-flush 1F1B, DeepSpeed ZeRO 0-2 (stage 3 is refused by farm.launch; 0-1
    # under its pipeline engine), per-block activation checkpointing, no sequence parallelism wired in.
    "farm": Runtime("farm", interleaving=False, sequence_parallel=False, selective_recompute=False,
                    max_zero=2, max_zero_with_pp=1),
    # Megatron-LM / NeMo: interleaved schedule, sequence parallelism, selective recomputation; the
    # distributed optimizer shards like ZeRO-1; fully sharded data parallelism without pipelining.
    "megatron": Runtime("megatron", interleaving=True, sequence_parallel=True, selective_recompute=True,
                        max_zero=3, max_zero_with_pp=1),
    # PyTorch FSDP (llm-foundry's MPT runs): fully sharded data parallelism, no tensor or pipeline stages.
    "fsdp": Runtime("fsdp", interleaving=False, sequence_parallel=False, selective_recompute=False,
                    max_zero=3, max_zero_with_pp=1),
    # Megatron-DeepSpeed (BigScience's BLOOM stack): DeepSpeed's pipeline engine with ZeRO-1, which
    # reduces gradients after the last micro-batch. Its fixed costs per stage and per block (each per
    # micro-batch) are fitted on BLOOM sweeps of 2-12 stages; the fit puts all of it per block
    # (docs/calibration.md).
    "megatron-deepspeed": Runtime("megatron-deepspeed", interleaving=False, sequence_parallel=False,
                                  selective_recompute=False, max_zero=3, max_zero_with_pp=1,
                                  block_overhead_s=0.0156, overlaps_dp=False),
}  # fmt: skip

VIRTUAL_STAGES = (1, 2, 3, 4, 6, 8)
"""Virtual stages per device the search tries (those that divide the blocks of every stage)."""
