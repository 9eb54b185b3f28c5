"""The memory model against numbers worked out by hand for a small model."""

from __future__ import annotations

import pytest

from farm.config import ModelConfig
from farm.plan.costmodel import CostParams, Hardware, layer_activation_bytes, stage_memory
from farm.plan.shape import ModelShape, Precision
from farm.topology import GiB

pytestmark = pytest.mark.unit

# 2 blocks, h=64, 4 heads of 16, MLP 256, 128-token vocabulary, 16-token sequences, tied embeddings.
MODEL = ModelConfig(name="hand", n_layers=2, d_model=64, n_heads=4, d_ff=256, vocab_size=128, seq_len=16)
SHAPE = ModelShape.from_config(MODEL)
BF16 = Precision.of("bf16")
FP32 = Precision.of("fp32")
COST = CostParams()
HW = Hardware(
    kind="gpu", peak_flops=1e14, memory_bytes=16 * GiB, reserved_bytes=COST.reserved_bytes("gpu"),
    devices_per_node=8, domain_size=8, intra_bw=1e11, intra_lat=1e-6, nic_bw=1e10, inter_lat=1e-5,
    rack_slots=32, pod_slots=256, rack_over=1.0, pod_over=1.0,
)  # fmt: skip

# By hand: QKV 64x(3x64) = 12,288; proj 64x64 = 4,096; MLP 2 x 64x256 = 32,768 -> 49,152 per block,
# plus two LayerNorms (weight and bias) = 256. Embedding 128x64 = 8,192, final LayerNorm 128.
LAYER, VECTORS, EMBED, FINAL_NORM = 49_152, 256, 8_192, 128
PARAMS = 2 * (LAYER + VECTORS) + EMBED + FINAL_NORM  # 107,136


def mem(prec: Precision = BF16, **kw: int) -> dict[str, float]:
    args = {"n": 2, "first": 1, "last": 1, "inflight": 1, "t": 1, "d": 1, "z": 0, "b": 2, "c": 0, **kw}
    out = stage_memory(SHAPE, prec, COST, HW, **args)
    return {k: float(v) for k, v in out.items()}


def test_parameter_counts() -> None:
    assert SHAPE.layer_matrix_params == LAYER
    assert SHAPE.layer_vector_params == VECTORS
    assert SHAPE.num_params == PARAMS == 107_136
    untied = ModelShape.from_config(ModelConfig(**{**MODEL.__dict__, "tie_embeddings": False}))
    assert untied.num_params == PARAMS + EMBED
    swiglu = ModelShape.from_config(ModelConfig(**{**MODEL.__dict__, "mlp": "swiglu"}))
    assert swiglu.layer_matrix_params == LAYER + 64 * 256
    gqa = ModelShape.from_config(ModelConfig(**{**MODEL.__dict__, "n_kv_heads": 2}))
    assert gqa.layer_matrix_params == 64 * (4 + 2 * 2) * 16 + 4_096 + 32_768


def test_parameter_count_matches_the_runtime_model() -> None:
    torch = pytest.importorskip("torch")
    from farm.runtime.model import GPT

    with torch.device("meta"):
        for cfg in (
            MODEL,
            ModelConfig(**{**MODEL.__dict__, "tie_embeddings": False, "mlp": "swiglu", "n_kv_heads": 2}),
        ):
            assert ModelShape.from_config(cfg).num_params == GPT(cfg, vocab_size=128).num_params()


def test_model_states_bf16_without_zero() -> None:
    m = mem()
    assert m["params"] == 2 * PARAMS
    assert m["grads"] == 2 * PARAMS
    assert m["optimizer"] == 12 * PARAMS  # fp32 master weights + Adam's two moments


def test_zero_stages_shard_over_data_parallel_ranks() -> None:
    d = 4
    one, two, three = mem(z=1, d=d), mem(z=2, d=d), mem(z=3, d=d)
    assert one["optimizer"] == 12 * PARAMS / d and one["grads"] == 2 * PARAMS
    assert two["optimizer"] == 12 * PARAMS / d and two["grads"] == 2 * PARAMS / d
    # ZeRO-3 also shards weights but keeps two gathered blocks in flight.
    assert three["params"] == 2 * PARAMS / d + 2 * LAYER * 2
    assert three["grads"] == 2 * PARAMS / d


def test_fp32_states() -> None:
    m = mem(prec=FP32)
    assert (m["params"], m["grads"], m["optimizer"]) == (4 * PARAMS, 4 * PARAMS, 8 * PARAMS)


def test_activations_per_block() -> None:
    # b=2, s=16 -> 32 tokens. Whole on every TP rank: 4 tensors of h (LN1 in, QKV in, LN2 in, MLP in)
    # at 2 bytes = 32 x 64 x 8 = 16,384. Split by t: Q, K, V, attention out (4 x 64) and the MLP
    # hidden before and after GELU (2 x 256) at 2 bytes = 32 x 2 x 768 = 49,152.
    assert layer_activation_bytes(SHAPE, BF16, COST, t=1, b=2) == 16_384 + 49_152
    assert layer_activation_bytes(SHAPE, BF16, COST, t=4, b=2) == 16_384 + 49_152 / 4
    # Sequence parallelism splits the LayerNorm inputs too.
    assert layer_activation_bytes(SHAPE, BF16, COST, t=4, b=2, sp=1) == (16_384 + 49_152) / 4
    # Without fused attention the softmax output (a x s per token, 2 bytes) is stored as well, unless
    # selective recomputation (c=2) rebuilds it in the backward pass.
    eager = CostParams(flash_attention=False)
    assert layer_activation_bytes(SHAPE, BF16, eager, t=1, b=2) == 65_536 + 32 * 4 * 16 * 2
    assert layer_activation_bytes(SHAPE, BF16, eager, t=1, b=2, c=2) == 65_536


def test_activations_of_a_stage() -> None:
    logits = 32 * 128 * (2 + 4)  # bf16 logits and their fp32 copy for the loss
    assert mem()["activations"] == 2 * 65_536 + logits
    # Checkpointing keeps each block's input (32 x 64 x 2) and rebuilds one block at a time.
    assert mem(c=1)["activations"] == 2 * 4_096 + 65_536 + logits
    # A first pipeline stage with 3 micro-batches in flight and no output head.
    assert mem(last=0, inflight=3)["activations"] == 3 * 2 * 65_536


def test_pipeline_stages_hold_their_share_of_parameters() -> None:
    first = mem(n=1, first=1, last=0)
    last = mem(n=1, first=0, last=1)
    # A tied head on a multi-stage pipeline is a second copy of the embedding on the last stage.
    assert first["params"] == 2 * (LAYER + VECTORS + EMBED)
    assert last["params"] == 2 * (LAYER + VECTORS + EMBED + FINAL_NORM)
    # Tensor parallelism splits the matrices and the vocabulary, not the LayerNorms.
    tp = mem(n=1, first=1, last=0, t=4)
    assert tp["params"] == 2 * (LAYER / 4 + VECTORS + EMBED / 4)


def test_margin_and_total() -> None:
    m = mem()
    allocated = m["params"] + m["grads"] + m["optimizer"] + m["activations"]
    assert m["margin"] == pytest.approx(0.10 * allocated + 1.5 * GiB)
    assert m["total"] == pytest.approx(allocated + m["margin"])
    assert m["capacity"] == 16 * GiB


def test_the_llama_shaped_1b_config_has_llama_3_2_1bs_published_parameter_count() -> None:
    torch = pytest.importorskip("torch")
    from farm._hydra import compose_from_argv
    from farm.runtime.model import GPT

    cfg = compose_from_argv(["+topology=local", "model=llama-1b"])[0].model
    # Llama-3.2-1B's config.json holds 1,235,814,400 parameters (embedding tied to the head).
    assert ModelShape.from_config(cfg).num_params == 1_235_814_400
    with torch.device("meta"):
        assert GPT(cfg, vocab_size=cfg.vocab_size).num_params() == 1_235_814_400
