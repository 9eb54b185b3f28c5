"""On a machine with a CUDA GPU (pytest --run-gpu): the model in bf16 agrees with fp32, and a
one-GPU farm trains through the whole stack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from farm.config import ModelConfig
from farm.runtime.model import GPT

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("--run-gpu was given but torch sees no CUDA device")


def test_bf16_forward_and_backward_track_fp32() -> None:
    cfg = ModelConfig(n_layers=4, d_model=256, n_heads=8, d_ff=1024, seq_len=128)
    torch.manual_seed(0)
    tokens = torch.randint(0, 1024, (4, cfg.seq_len + 1), device="cuda")
    losses = []
    for dtype in (torch.float32, torch.bfloat16):
        model = GPT(cfg, vocab_size=1024, init_seed=1).cuda()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        losses.append(float(loss))
    assert abs(losses[0] - losses[1]) < 0.05 * losses[0]


def test_one_gpu_farm_trains(tiny_data: Path, tmp_path: Path) -> None:
    from farm._hydra import compose_from_argv
    from farm.launch import train
    from farm.tracking import read_metrics

    topology = {"name": "one-gpu", "pools": [{"name": "gpu", "nodes": 1, "accelerator": {
        "kind": "gpu", "model": "any", "devices_per_node": 1, "memory_gib": 16, "peak_tflops": 100},
        "intra_node": {"link": "none", "bandwidth_gbs": 100}, "inter_node": {"nics": 1, "nic_gbps": 100},
        "host_memory_gib": 64}]}
    overrides = [f"data.dir={tiny_data}", "model.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
                 "train.steps=4", "tracking.wandb=false", f"run.dir={tmp_path}"]
    cfg, _ = compose_from_argv(["+topology=local", *overrides])
    from dataclasses import replace

    cfg = replace(cfg, topology=topology)
    assert train(cfg, run_dir=tmp_path) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
