"""Memory and time model of one training step. docs/planner.md derives each formula.

Every function takes plain numbers or numpy arrays (only arithmetic, ``np.where``, ``np.minimum`` and
``np.maximum``), so the search evaluates hundreds of thousands of layouts in one vectorised pass and
a single plan is evaluated by the very same code.

Symbols: t, p, d = tensor, pipeline, data parallel degrees; b = micro-batch (sequences); m =
micro-batches per optimizer step per DP rank; z = ZeRO stage; c = activation checkpointing (0/1);
n = layers of a stage; s = sequence length; h = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from farm.plan.shape import ModelShape, Precision
from farm.topology import Farm, GiB, NodePool

Num = Any  # a float or a numpy array of floats


@dataclass(frozen=True)
class CostParams:
    """Assumptions of the model. Defaults are calibrated in docs/calibration.md."""

    matmul_efficiency: float = 0.8
    """Fraction of peak FLOP/s that large, well-shaped GEMMs reach (the ceiling of the curve below)."""
    tokens_knee: float = 128.0
    """Micro-batch tokens (b·s) at which GEMMs run at half the ceiling."""
    width_knee: float = 512.0
    """Hidden columns per tensor-parallel rank (h/t) at which GEMMs run at half the ceiling."""
    link_efficiency: float = 0.7
    """Fraction of the intra-node link a ring collective achieves (NCCL/HCCL bus bandwidth)."""
    network_efficiency: float = 0.8
    """Fraction of NIC bandwidth a collective or a point-to-point send achieves."""
    dp_overlap: float = 0.8
    """Fraction of the last micro-batch's backward that hides the data-parallel gradient reduction
    (bucketed reduction as backward proceeds); ZeRO-3 gathers overlap each micro-batch instead."""
    fragmentation: float = 0.10
    """Memory margin for allocator fragmentation and temporaries, as a fraction of what is allocated."""
    flash_attention: bool = True
    """Attention scores are never stored (fused attention kernels, torch SDPA)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: LayerNorm/dropout activations also split by t."""
    interleave: int = 1
    """Virtual stages per device (interleaved 1F1B). farm's runtime runs plain 1F1B; calibration against
    published runs that interleaved sets it."""
    fp32_speed: float = 0.5
    """fp32 (TF32) GEMM rate relative to bf16 on accelerators; CPUs compute fp32 at their quoted peak."""

    def reserved_bytes(self, kind: str) -> float:
        """Runtime memory outside the allocator: CUDA/CANN/Synapse context, communicator buffers."""
        return {"gpu": 1.5, "npu": 2.0, "hpu": 1.5}.get(kind, 0.25) * GiB


@dataclass(frozen=True)
class Hardware:
    """One pool's figures as the model uses them (emulated farms count as CPUs for precision)."""

    kind: str
    peak_flops: float
    memory_bytes: float
    reserved_bytes: float
    devices_per_node: int
    domain_size: int
    intra_bw: float
    intra_lat: float
    nic_bw: float
    """Scale-out bytes/s per device when every device of the node sends (NICs shared evenly)."""
    inter_lat: float
    rack_slots: int
    pod_slots: int
    rack_over: float
    pod_over: float

    @classmethod
    def of(cls, pool: NodePool, farm: Farm, cost: CostParams) -> Hardware:
        kind = "cpu" if farm.emulate == "cpu" else pool.accelerator.kind
        dpn = pool.devices_per_node
        racks_per_pod = pool.racks_per_pod or -(-(pool.nodes + pool.spares) // pool.nodes_per_rack)
        return cls(
            kind=kind,
            peak_flops=pool.accelerator.peak_flops,
            memory_bytes=float(pool.accelerator.memory_bytes),
            reserved_bytes=cost.reserved_bytes(kind),
            devices_per_node=dpn,
            domain_size=pool.intra.domain_size,
            intra_bw=pool.intra.bandwidth * cost.link_efficiency,
            intra_lat=pool.intra.latency_s,
            nic_bw=pool.nic_bandwidth_per_device * cost.network_efficiency,
            inter_lat=pool.inter.latency_s,
            rack_slots=pool.nodes_per_rack * dpn,
            pod_slots=pool.nodes_per_rack * racks_per_pod * dpn,
            rack_over=pool.rack_oversubscription,
            pod_over=pool.pod_oversubscription,
        )


def speed(hw: Hardware, prec: Precision, cost: CostParams, *, shape: ModelShape, t: Num, b: Num) -> Num:
    """Sustained FLOP/s of one device on this model's GEMMs: peak x a saturating efficiency curve
    in the micro-batch tokens and in the per-rank width (small GEMMs underuse the device)."""
    tokens, width = b * shape.seq_len, shape.d_model / t
    eff = cost.matmul_efficiency * tokens / (tokens + cost.tokens_knee) * width / (width + cost.width_knee)
    rate = cost.fp32_speed if (prec.name == "fp32" and hw.kind != "cpu") else 1.0
    return hw.peak_flops * rate * eff


def ring_allreduce(nbytes: Num, n: Num, bw: float, lat: float) -> Num:
    n = np.maximum(n, 1)
    return 2.0 * (n - 1) / n * nbytes / bw + 2.0 * (n - 1) * lat


# --- memory -----------------------------------------------------------------------------------------


def stage_params(shape: ModelShape, *, n: Num, first: Num, last: Num, t: Num) -> Num:
    """Parameters on one device of a stage. Embedding and output head are split over the vocabulary
    (Megatron vocab-parallel); a tied head on a one-stage pipeline shares the embedding."""
    head = np.where(first, 0, shape.embed_params) if shape.tied else shape.embed_params
    return (
        n * (shape.layer_matrix_params / t + shape.layer_vector_params)
        + first * shape.embed_params / t
        + last * (head / t + 2 * shape.d_model)
    )


def layer_activation_bytes(shape: ModelShape, prec: Precision, cost: CostParams, *, t: Num, b: Num) -> Num:
    """Activations one block keeps for backward, per micro-batch (Korthikanti et al. 2022, generalised
    to GQA and SwiGLU): inputs of the two LayerNorms, of QKV and of the MLP stay whole on every
    tensor-parallel rank; Q, K, V, the attention output and the MLP hidden are split by t."""
    a, h, tokens = prec.activation, shape.d_model, b * shape.seq_len
    kv = shape.kv_heads * (h // shape.n_heads)
    mlp_hidden = (4 if shape.swiglu else 2) * shape.d_ff
    whole = tokens * h * (4 * a + (2 if shape.dropout else 0))
    split = tokens * a * (2 * h + 2 * kv + mlp_hidden)
    if not cost.flash_attention:
        split = split + tokens * shape.n_heads * shape.seq_len * (a + (1 + a if shape.dropout else 0))
    if cost.sequence_parallel:
        return (whole + split) / t
    return whole + split / t


def stage_memory(
    shape: ModelShape,
    prec: Precision,
    cost: CostParams,
    hw: Hardware,
    *,
    n: Num,
    first: Num,
    last: Num,
    inflight: Num,
    t: Num,
    d: Num,
    z: Num,
    b: Num,
    c: Num,
) -> dict[str, Num]:
    """Bytes on one device of a stage: ZeRO shards optimizer state (z>=1), gradients (z>=2) and
    parameters (z>=3, plus two gathered layers in flight) over the d data-parallel ranks; 1F1B keeps
    ``inflight`` micro-batches of activations; checkpointing keeps only each block's input and
    rebuilds one block's activations at a time."""
    params = stage_params(shape, n=n, first=first, last=last, t=t)
    w = prec.weight
    weights = params * w / np.where(z >= 3, d, 1) + np.where(z >= 3, 2 * shape.layer_matrix_params / t * w, 0)
    grads = params * w / np.where(z >= 2, d, 1)
    optimizer = params * prec.optimizer / np.where(z >= 1, d, 1)
    full = layer_activation_bytes(shape, prec, cost, t=t, b=b)
    kept = b * shape.seq_len * shape.d_model * prec.activation / (t if cost.sequence_parallel else 1)
    logits = last * b * shape.seq_len * shape.vocab / t * (prec.activation + 4)  # + fp32 copy for the loss
    acts = inflight * n * np.where(c, kept, full) + np.where(c, full, 0) + logits
    allocated = weights + grads + optimizer + acts
    margin = cost.fragmentation * allocated + hw.reserved_bytes
    return {
        "params": weights,
        "grads": grads,
        "optimizer": optimizer,
        "activations": acts,
        "margin": margin,
        "total": allocated + margin,
        "capacity": hw.memory_bytes + 0 * allocated,
    }


# --- time -------------------------------------------------------------------------------------------


def stage_times(
    shape: ModelShape,
    prec: Precision,
    cost: CostParams,
    hw: Hardware,
    *,
    n: Num,
    last: Num,
    t: Num,
    b: Num,
    c: Num,
) -> tuple[Num, Num]:
    """(compute, tensor-parallel communication) seconds of one micro-batch's forward and backward.

    Backward costs twice the forward; checkpointing adds one more forward of the blocks. Megatron
    tensor parallelism all-reduces the b·s·h activations twice per block forward and twice backward
    (two more when the forward is recomputed), over the intra-node link, not overlapped.
    """
    per_token = n * shape.layer_flops_per_token + last * shape.head_flops_per_token
    recompute = c * n * shape.layer_flops_per_token / 3
    flops = b * shape.seq_len * (per_token + recompute) / t
    compute = flops / speed(hw, prec, cost, shape=shape, t=t, b=b)
    act = b * shape.seq_len * shape.d_model * prec.activation
    tp = n * (4 + 2 * c) * ring_allreduce(act, t, hw.intra_bw, hw.intra_lat)
    return compute, np.where(t > 1, tp, 0.0)


def p2p_time(shape: ModelShape, prec: Precision, *, t: Num, b: Num, bw: Num, lat: Num) -> Num:
    """One activation (or its gradient) sent to the next stage; each tensor-parallel rank sends its
    1/t slice (Megatron's scatter-gather) over its own link."""
    return b * shape.seq_len * shape.d_model * prec.activation / t / bw + lat


def dp_locality(hw: Hardware, *, replica: Num, d: Num, pool_slots: Num, pool_over: float) -> tuple[Num, Num]:
    """(DP peers per node, slow-down of the inter-node part) for DP groups whose members sit
    ``replica`` = t·p slots apart.

    Peers on one node reduce over the intra-node link first (hierarchical all-reduce). Rings cross a
    rack (pod, pool) boundary once per DP group present there, so an uplink oversubscribed o:1 slows
    them only when more groups cross it than its capacity carries: max(1, o·min(R, slots)/slots).
    """
    dpn = hw.devices_per_node
    local = np.where(dpn % replica == 0, np.minimum(dpn // np.maximum(replica, 1), d), 1)
    span = d * replica

    def level(slots: Num, over: Num) -> Num:
        return np.where(span > slots, np.maximum(1.0, over * np.minimum(replica, slots) / slots), 1.0)

    slow = np.maximum(level(hw.rack_slots, hw.rack_over), level(hw.pod_slots, hw.rack_over * hw.pod_over))
    return local, np.maximum(slow, level(pool_slots, hw.rack_over * hw.pod_over * pool_over))


def dp_exposed(
    hw: Hardware,
    cost: CostParams,
    *,
    grad_bytes: Num,
    d: Num,
    local: Num,
    slow: Num,
    z: Num,
    m: Num,
    compute_mb: Num,
) -> Num:
    """Seconds of gradient reduction left on the critical path of a step.

    Hierarchical ring all-reduce: reduce-scatter among node peers, all-reduce of 1/local of the
    gradients across nodes on each device's NIC share, all-gather among peers. ZeRO-1 reduce-scatters
    and all-gathers the same volume once per step; ZeRO-2 reduce-scatters every micro-batch and
    gathers parameters once; ZeRO-3 gathers parameters forward and backward and reduce-scatters
    gradients for every micro-batch, hidden behind that micro-batch's compute where it can.
    """
    nodes = np.ceil(d / local)
    allreduce = (
        ring_allreduce(grad_bytes, local, hw.intra_bw, hw.intra_lat)
        + 2.0 * (nodes - 1) / np.maximum(nodes, 1) * grad_bytes / local / (hw.nic_bw / slow)
        + 2.0 * hw.inter_lat * np.log2(np.maximum(nodes, 1))
    )
    backward = compute_mb * 2.0 / 3.0
    once = np.maximum(0.0, allreduce - cost.dp_overlap * backward)
    zero2 = m * np.maximum(0.0, allreduce / 2 - cost.dp_overlap * backward) + allreduce / 2
    zero3 = m * np.maximum(0.0, 1.5 * allreduce - cost.dp_overlap * compute_mb)
    exposed = np.where(z >= 3, zero3, np.where(z == 2, zero2, once))
    return np.where(d > 1, exposed, 0.0)


def pipeline(
    cost: CostParams, *, m: Num, p: Num, stage_mb: Num, comm_mb: Num, p2p: Num, dp: Num
) -> dict[str, Num]:
    """Step time of 1F1B: (m + p - 1) slots of the slowest stage's micro-batch (forward, backward
    and two transfers), then the exposed DP reduction. Bubble = (p-1)/(m+p-1); interleaving v
    virtual stages divides the fill by v and multiplies the transfers by v."""
    v = cost.interleave
    fill = (p - 1) / v
    p2p = np.where(p > 1, p2p, 0.0)
    slots = m + fill
    step = slots * (stage_mb + 2 * v * p2p) + dp
    return {
        "step_time_s": step,
        "bubble": fill / slots,
        "comm_time_s": slots * (comm_mb + 2 * v * p2p) + dp,
    }
