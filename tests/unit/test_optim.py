"""farm's AdamW is torch's, bit for bit, and a DeepSpeed step (with and without ZeRO) never imports
torch._dynamo: that import was two thirds of a worker's set-up (farm/runtime/optim.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from farm.runtime.optim import AdamW, _compile_on_first_call  # noqa: E402

pytestmark = pytest.mark.unit


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _groups(model: torch.nn.Module) -> list[dict[str, object]]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _train(cls: type[torch.optim.Optimizer], steps: int, *, reload_at: int | None = None) -> list[torch.Tensor]:
    model = _model(0)
    opt = cls(_groups(model), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6, generator=data)).square().mean().backward()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (1 - step / steps)  # as the engine sets it
        opt.step()
        if step == reload_at:  # a state_dict round trip into a fresh optimizer changes nothing
            saved = opt.state_dict()
            opt = cls(_groups(model), lr=1.0)
            opt.load_state_dict(saved)
    return [p.detach().clone() for p in model.parameters()] + [
        t.clone() for s in opt.state.values() for t in s.values()
    ]


def test_the_same_steps_and_state_as_torch_adamw_bit_for_bit() -> None:
    theirs = _train(torch.optim.AdamW, 12)
    ours = _train(AdamW, 12)
    assert len(ours) == len(theirs) == 6 + 6 * 3  # params; step, exp_avg, exp_avg_sq per param
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_train(AdamW, 12, reload_at=5), theirs, strict=True):
        assert torch.equal(a, b)


def test_a_step_runs_without_grad_and_calls_its_closure_with_grad() -> None:
    model = _model(2)
    opt = AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(3, 6)

    def closure() -> torch.Tensor:
        with torch.enable_grad():
            opt.zero_grad()
            loss = model(x).sum()
            loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and torch.is_grad_enabled()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_a_deferred_compile_compiles_once_on_the_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[object] = []

    def fake_compile(fn):  # type: ignore[no-untyped-def]
        compiled.append(fn)
        return lambda *a: ("compiled", fn(*a))

    monkeypatch.setattr(torch, "compile", fake_compile)
    square = _compile_on_first_call(lambda v: v * v)
    assert compiled == []
    assert square(3) == ("compiled", 9) and square(4) == ("compiled", 16) and len(compiled) == 1


_DEEPSPEED_STEPS = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%(port)d", rank=0, world_size=1)
    import deepspeed
    from farm.config import TrainConfig
    from farm.runtime.engine import _skip_inference_ops, deepspeed_config
    from farm.runtime.optim import AdamW, defer_deepspeed_compile
    _skip_inference_ops(deepspeed)
    defer_deepspeed_compile(deepspeed)
    for stage in (0, 1, 2):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        config = deepspeed_config(train=TrainConfig(), micro_batch=2, grad_accum=1, dp=1, zero_stage=stage,
                                  precision="fp32")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=AdamW(model.parameters(), lr=1e-2),
                                               config=config, dist_init_required=False)
        for _ in range(3):
            engine.backward(engine(torch.ones(2, 8)).square().mean())
            engine.step()
        print("WEIGHT", stage, float(model.weight.sum()))
    print("DYNAMO", "torch._dynamo" in sys.modules, "INDUCTOR", "torch._inductor" in sys.modules)
    """
)


def test_deepspeed_steps_with_and_without_zero_never_import_torch_dynamo(tmp_path: Path) -> None:
    from farm.runtime.worker import free_port

    script = tmp_path / "steps.py"
    script.write_text(_DEEPSPEED_STEPS % {"port": free_port()})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "RANK": "0",
           "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    weights = {line.split()[1]: float(line.split()[2]) for line in lines if line.startswith("WEIGHT")}
    assert len(weights) == 3 and len(set(weights.values())) == 1, weights  # ZeRO changes no number
    assert "DYNAMO False INDUCTOR False" in lines, done.stdout[-2000:]
