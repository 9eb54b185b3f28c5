"""A llama run trained by `python -m farm.launch`, exported, loaded by transformers, and started from
again with model.init_from: the second run's weights are the first run's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
transformers = pytest.importorskip("transformers")

BASE = [
    "+topology=local",
    "model=llama-tiny",
    "model.seq_len=64",
    "train.global_batch=8",
    "train.micro_batch=4",
    "tracking.mode=offline",
]


def farm(cwd: Path, module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_train_export_and_start_again_from_the_export(tiny_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from farm.checkpoint import CheckpointStore
    from farm.checkpoint.hf import checkpoint_model
    from farm.runtime.model import GPT
    from farm.runtime.tensor_parallel import load_full_state_

    farm(tmp_path, "farm.launch", *BASE, f"data.dir={tiny_data}", "train.steps=2", "run.dir=run1")
    assert "LlamaForCausalLM" in farm(tmp_path, "farm.checkpoint", "export-hf", "run1", "hf1")
    store = CheckpointStore(tmp_path / "run1" / "checkpoints")
    info = store.latest_valid()
    assert info is not None
    with store.open(info) as reader:
        cfg, vocab = checkpoint_model(reader)
        model = GPT(cfg, vocab_size=vocab).eval()
        load_full_state_(model, {n: reader.read(f"model/{n}") for n, _ in model.named_parameters()})
    tokens = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf1").eval()
    with torch.no_grad():
        assert float((hf(tokens).logits - model(tokens)).abs().max()) < 1e-5
    # An update of lr 1e-30 leaves every fp32 weight as it was: the second run holds what it loaded.
    farm(
        tmp_path,
        "farm.launch",
        *BASE,
        f"data.dir={tiny_data}",
        "train.steps=1",
        "run.dir=run2",
        f"model.init_from=hf:{tmp_path / 'hf1'}",
        "train.lr=1e-30",
        "train.min_lr=1e-30",
        "train.warmup_steps=0",
    )
    farm(tmp_path, "farm.checkpoint", "export-hf", "run2", "hf2")
    first, second = (
        load_file(tmp_path / "hf1" / "model.safetensors"),
        load_file(tmp_path / "hf2" / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
