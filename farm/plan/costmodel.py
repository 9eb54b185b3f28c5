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
    """Assumptions of the model that are not properties of one accelerator (those live in
    farm.topology.PERFORMANCE). docs/calibration.md says which are fitted and which are assumed."""

    layer_overhead_s: float = 1.80e-4
    """Fixed seconds per block and micro-batch (forward and backward): kernel launches, synchronisation
    and the runtime's per-micro-batch bookkeeping. Fitted (docs/calibration.md)."""
    microbatch_overhead_s: float = 0.0
    """Fixed seconds per micro-batch and pipeline stage that a runtime adds (its pipeline engine's
    scheduling and point-to-point set-up); set from the runtime (farm/plan/runtimes.py)."""
    block_overhead_s: float = 0.0
    """Fixed seconds per block and micro-batch that a runtime adds to ``layer_overhead_s`` (its
    per-kernel costs, which grow with the blocks a stage runs); set from the runtime."""
    token_knee: float = 0.0
    """Extra half-saturation point of the token (micro-batch) dimension of block GEMMs. Fitted."""
    hbm_efficiency: float = 0.7
    """Fraction of HBM bandwidth that element-wise kernels (norms, activations, residuals, the optimizer
    step) reach."""
    optimizer_bytes: float = 32.0
    """HBM bytes an Adam step moves per locally held parameter (read gradient, fp32 master and both
    moments, write them back and the bf16 copy)."""
    link_efficiency: float = 0.7
    """Fraction of the intra-node link a ring collective achieves (NCCL/HCCL bus bandwidth)."""
    network_efficiency: float = 0.8
    """Fraction of NIC bandwidth a collective or a point-to-point send achieves."""
    dp_overlap: float = 0.8
    """Fraction of the backward pass that hides data-parallel gradient traffic (bucketed reduction as
    backward proceeds): the last micro-batch's for ZeRO 0/1, every micro-batch's for ZeRO-2; ZeRO-3
    hides its gathers behind the same fraction of each micro-batch's forward and backward."""
    reduce_after_backward: bool = False
    """The runtime reduces ZeRO 0-2 gradients only after the backward pass (DeepSpeed without
    ``overlap_comm``, its pipeline engine after the last micro-batch): nothing of it is hidden. Set
    from the runtime (``Runtime.overlaps_dp``)."""
    overlap_slowdown: float = 0.61
    """Fraction of the communication hidden behind compute that still delays it (collective kernels
    take SMs and memory bandwidth from the GEMMs). Fitted (docs/calibration.md)."""
    fragmentation: float = 0.10
    """Memory margin for allocator fragmentation and temporaries, as a fraction of what is allocated."""
    flash_attention: bool = True
    """Fused attention kernels: scores never stored, causal half skipped. False models the 2021
    Megatron-LM kernels (scores materialised, softmax in HBM)."""
    fp32_speed: float = 0.5
    """fp32 (TF32) GEMM rate relative to bf16 on accelerators; CPUs compute fp32 at their quoted peak."""

    def reserved_bytes(self, kind: str) -> float:
        """Runtime memory outside the allocator: CUDA/CANN/Synapse context, communicator buffers."""
        return {"gpu": 1.5, "npu": 2.0, "hpu": 1.5}.get(kind, 0.25) * GiB


RECOMPUTE = ("none", "full", "selective")
"""Activation recomputation codes used in layouts (c = 0, 1, 2): 'selective' recomputes only the
attention core (Korthikanti et al. 2022), which fused attention kernels do anyway."""


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
    hbm_bw: float = 2e12
    """HBM bytes/s times CostParams.hbm_efficiency."""
    gemm_eff: float = 0.8
    gemm_knee: float = 128.0
    attn_eff: float = 0.5

    @classmethod
    def of(cls, pool: NodePool, farm: Farm, cost: CostParams) -> Hardware:
        kind = "cpu" if farm.emulate == "cpu" else pool.accelerator.kind
        dpn = pool.devices_per_node
        racks_per_pod = pool.racks_per_pod or -(-(pool.nodes + pool.spares) // pool.nodes_per_rack)
        perf = pool.accelerator.performance
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
            hbm_bw=perf.memory_bandwidth * cost.hbm_efficiency,
            gemm_eff=perf.gemm_efficiency,
            gemm_knee=perf.gemm_knee,
            attn_eff=perf.attention_efficiency,
        )


def peak_rate(hw: Hardware, prec: Precision, cost: CostParams) -> float:
    """Peak FLOP/s at this precision (fp32 runs at ``fp32_speed`` of bf16 on accelerators)."""
    return hw.peak_flops * (cost.fp32_speed if (prec.name == "fp32" and hw.kind != "cpu") else 1.0)


def gemm_efficiency(hw: Hardware, m: Num, n: Num, k: Num, *, token_knee: float = 0.0) -> Num:
    """Fraction of peak one (m x k) @ (k x n) GEMM sustains: the accelerator's ceiling times a
    saturating curve in each dimension (thin matrices leave the device's tiles half empty). The token
    dimension m of a block's GEMMs also carries ``token_knee`` (CostParams): what is fixed per kernel
    (launch, prologue, weight reads) is amortised over the tokens of one micro-batch."""
    q = hw.gemm_knee
    return hw.gemm_eff * m / (m + q + token_knee) * n / (n + q) * k / (k + q)


def block_gemms(shape: ModelShape, *, t: Num) -> list[tuple[Num, Num]]:
    """(K, N) of the four matrix products of one block on one tensor-parallel rank: QKV, attention
    output, MLP in (two matrices for SwiGLU), MLP out."""
    hd = shape.d_model // shape.n_heads
    q, kv, h = shape.n_heads * hd, shape.kv_heads * hd, shape.d_model
    mlp_in = (2 if shape.swiglu else 1) * shape.d_ff
    return [(h, (q + 2 * kv) / t), (q / t, h), (h, mlp_in / t), (shape.d_ff / t, h)]


def speed(hw: Hardware, prec: Precision, cost: CostParams, *, shape: ModelShape, t: Num, b: Num) -> Num:
    """Sustained FLOP/s of one device on this model's block GEMMs (for splitting layers across pools)."""
    tokens = b * shape.seq_len
    flops = sum(k * n for k, n in block_gemms(shape, t=t))
    secs = sum(
        k * n / gemm_efficiency(hw, tokens, n, k, token_knee=cost.token_knee)
        for k, n in block_gemms(shape, t=t)
    )
    return peak_rate(hw, prec, cost) * flops / secs


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


def layer_activation_bytes(
    shape: ModelShape, prec: Precision, cost: CostParams, *, t: Num, b: Num, sp: Num = 0, c: Num = 0
) -> Num:
    """Activations one block keeps for backward, per micro-batch (Korthikanti et al. 2022, generalised
    to GQA and SwiGLU): inputs of the two LayerNorms, of QKV and of the MLP stay whole on every
    tensor-parallel rank unless sequence parallelism (sp) splits them too; Q, K, V, the attention
    output and the MLP hidden are split by t. Without fused attention the scores are kept too, unless
    selective recomputation (c = 2) rebuilds them."""
    a, h, tokens = prec.activation, shape.d_model, b * shape.seq_len
    kv = shape.kv_heads * (h // shape.n_heads)
    mlp_hidden = (4 if shape.swiglu else 2) * shape.d_ff
    whole = tokens * h * (4 * a + (2 if shape.dropout else 0))
    split = tokens * a * (2 * h + 2 * kv + mlp_hidden)
    if not cost.flash_attention:
        scores = tokens * shape.n_heads * shape.seq_len * (a + (1 + a if shape.dropout else 0))
        split = split + np.where(c == 2, 0, scores)
    return np.where(sp, (whole + split) / t, whole + split / t)


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
    sp: Num = 0,
) -> dict[str, Num]:
    """Bytes on one device of a stage: ZeRO shards optimizer state (z>=1), gradients (z>=2) and
    parameters (z>=3, plus two gathered layers in flight) over the d data-parallel ranks; the schedule
    keeps ``inflight`` micro-batches of the stage's activations (see :func:`inflight`); full
    recomputation (c = 1) keeps only each block's input and rebuilds one block at a time."""
    params = stage_params(shape, n=n, first=first, last=last, t=t)
    w = prec.weight
    weights = params * w / np.where(z >= 3, d, 1) + np.where(z >= 3, 2 * shape.layer_matrix_params / t * w, 0)
    grads = params * w / np.where(z >= 2, d, 1)
    optimizer = params * prec.optimizer / np.where(z >= 1, d, 1)
    full = layer_activation_bytes(shape, prec, cost, t=t, b=b, sp=sp, c=c)
    kept = b * shape.seq_len * shape.d_model * prec.activation / np.where(sp, t, 1)
    logits = last * b * shape.seq_len * shape.vocab / t * (prec.activation + 4)  # + fp32 copy for the loss
    ckpt = c == 1
    acts = inflight * n * np.where(ckpt, kept, full) + np.where(ckpt, full, 0) + logits
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


def inflight(*, i: Num, p: Num, m: Num, v: Num) -> Num:
    """Micro-batches of a whole stage's activations that stage i holds at the peak of the schedule.
    Plain 1F1B: p - i. Interleaved (v chunks of n/v blocks): Megatron's warm-up of
    2(p - i - 1) + (v - 1)p chunks plus the one in flight, i.e. that many /v stage-equivalents."""
    plain = p - i
    chunks = 2 * (p - i - 1) + (v - 1) * p + 1
    return np.minimum(np.where(v > 1, chunks / np.maximum(v, 1), plain), m)


# --- time -------------------------------------------------------------------------------------------

TERMS = ("compute", "recompute", "tp_comm", "pp_comm", "bubble", "dp_comm", "optimizer")
"""The parts of a step's time, in seconds; they add up to the step time (farm.plan --explain)."""


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
    sp: Num = 0,
) -> dict[str, Num]:
    """Seconds of one micro-batch's forward and backward on one device of a stage, by part.

    compute: the blocks' GEMMs (each at its shape's efficiency), attention, element-wise work bound
    by HBM bandwidth, a fixed overhead per block, and the output head with its loss on the last
    stage. recompute: one more forward of the blocks (c = 1) or of the attention core (c = 2).
    tp: Megatron's two all-reduces (or all-gather/reduce-scatter pairs with sequence parallelism,
    the same volume) per block forward and two backward, plus two when the forward is recomputed,
    over the intra-node link, not overlapped.
    """
    rate = peak_rate(hw, prec, cost)
    s, h, a = shape.seq_len, shape.d_model, prec.activation
    tokens = b * s
    knee = cost.token_knee
    gemm = sum(
        6 * tokens * k * nn / (rate * gemm_efficiency(hw, tokens, nn, k, token_knee=knee))
        for k, nn in block_gemms(shape, t=t)
    )
    attn, attn_fwd = _attention(shape, prec, cost, hw, t=t, b=b)
    hbm = hw.hbm_bw
    whole = (20 + (4 if shape.dropout else 0)) * h
    kv = shape.kv_heads * (h // shape.n_heads)
    split = (8 if shape.swiglu else 5) * shape.d_ff + 4 * (h + kv)
    elem = tokens * a * (whole / np.where(sp, t, 1) + split / t) / hbm
    block = gemm + attn + elem + cost.layer_overhead_s + cost.block_overhead_s
    head_gemm = (
        6
        * tokens
        * h
        * shape.vocab
        / t
        / (rate * gemm_efficiency(hw, tokens, shape.vocab / t, h, token_knee=knee))
    )
    head = head_gemm + tokens * shape.vocab / t * 16 / hbm
    recompute = np.where(c == 1, (gemm + elem) / 3 + attn_fwd, np.where(c == 2, attn_fwd, 0.0))
    act = tokens * h * a
    tp = n * (4 + 2 * (c == 1)) * ring_allreduce(act, t, hw.intra_bw, hw.intra_lat)
    return {
        "compute": n * block + last * head + cost.microbatch_overhead_s,
        "recompute": n * recompute,
        "tp": np.where(t > 1, tp, 0.0),
    }


def _attention(
    shape: ModelShape, prec: Precision, cost: CostParams, hw: Hardware, *, t: Num, b: Num
) -> tuple[Num, Num]:
    """(forward + backward, forward) seconds of one block's attention core per micro-batch.

    Fused kernels execute the causal half only: 2·s·h FLOPs per token forward, 5·s·h backward (with the
    scores rebuilt). Unfused (2021) kernels run the full s x s products as batched GEMMs (4·s·h forward,
    8·s·h backward) and move the scores through HBM for mask, softmax and dropout."""
    rate = peak_rate(hw, prec, cost)
    s, h = shape.seq_len, shape.d_model
    tokens = b * s
    if cost.flash_attention:
        per = tokens * s * h / t / (rate * hw.attn_eff)
        return 7 * per, 2 * per
    hd = h // shape.n_heads
    gemm = tokens * s * h / t / (rate * gemm_efficiency(hw, s, s, hd))
    scores = tokens * s * shape.n_heads / t * prec.activation / hw.hbm_bw
    return 12 * gemm + 10 * scores, 4 * gemm + 4 * scores


def optimizer_time(cost: CostParams, hw: Hardware, *, params: Num, d: Num, z: Num) -> Num:
    """The Adam step over the parameters this device updates (its ZeRO shard), bound by HBM."""
    return params / np.where(z >= 1, d, 1) * cost.optimizer_bytes / hw.hbm_bw


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
    backward = compute_mb * 2.0 / 3.0 * (0.0 if cost.reduce_after_backward else 1.0)

    def exposed_part(comm: Num, window: Num) -> Num:
        hidden = np.minimum(comm, cost.dp_overlap * window)
        return comm - hidden + cost.overlap_slowdown * hidden

    once = exposed_part(allreduce, backward)
    zero2 = m * exposed_part(allreduce / 2, backward) + allreduce / 2
    zero3 = m * exposed_part(1.5 * allreduce, compute_mb)
    exposed = np.where(z >= 3, zero3, np.where(z == 2, zero2, once))
    return np.where(d > 1, exposed, 0.0)


def pipeline(
    *, m: Num, p: Num, v: Num, stage: dict[str, Num], p2p: Num, dp: Num, optimizer: Num
) -> dict[str, Num]:
    """Step time of 1F1B, interleaved over v virtual stages per device: (m + (p - 1)/v) slots of the
    slowest stage's micro-batch (its compute, recomputation, tensor-parallel traffic and 2v
    transfers), then the exposed DP reduction and the optimizer step. Bubble = fill / slots."""
    fill = (p - 1) / v
    p2p = np.where(p > 1, p2p, 0.0)
    slot = stage["compute"] + stage["recompute"] + stage["tp"] + 2 * v * p2p
    slots = m + fill
    step = slots * slot + dp + optimizer
    terms = {
        "compute": m * stage["compute"],
        "recompute": m * stage["recompute"],
        "tp_comm": m * stage["tp"],
        "pp_comm": m * 2 * v * p2p,
        "bubble": fill * slot,
        "dp_comm": dp + 0 * step,
        "optimizer": optimizer + 0 * step,
    }
    return {
        "step_time_s": step,
        "bubble_share": fill / slots,
        "comm_time_s": slots * (stage["tp"] + 2 * v * p2p) + dp,
        "terms": terms,
    }
