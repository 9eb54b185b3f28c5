"""The GPT model and the layout-free pieces of the step: LR schedule, seeds, vocabulary padding."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from farm.config import ModelConfig, TrainConfig
from farm.errors import ConfigError
from farm.model import padded_vocab
from farm.runtime.engine import lr_at, micro_seed
from farm.runtime.model import GPT

pytestmark = pytest.mark.unit

TINY = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, seq_len=16)


def batch(vocab: int, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (b, TINY.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_initial_loss_is_near_uniform() -> None:
    torch.manual_seed(0)
    model = GPT(TINY, vocab_size=128)
    with torch.no_grad():
        loss = model(*batch(128))
    assert abs(float(loss) - math.log(128)) < 0.3


def test_tied_embeddings_share_the_head() -> None:
    tied = GPT(TINY, vocab_size=128)
    untied = GPT(dataclasses.replace(TINY, tie_embeddings=False), vocab_size=128)
    assert untied.num_params() - tied.num_params() == 128 * TINY.d_model


@pytest.mark.parametrize("variant", [{"n_kv_heads": 2}, {"mlp": "swiglu"}])
def test_variants_train(variant: dict) -> None:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(TINY, **variant), vocab_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(64)
    first = float(model(x, y))
    for _ in range(20):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    assert float(model(x, y)) < first - 1.0


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    torch.manual_seed(0)
    model = GPT(TINY, vocab_size=64).eval()
    x, _ = batch(64, b=1)
    changed = x.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 64
    assert torch.allclose(model(x)[0, :-1], model(changed)[0, :-1], atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(TINY, activation_checkpointing=ckpt), vocab_size=64)
        model(*batch(64)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lr_schedule_warmup_cosine_then_floor() -> None:
    train = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, train=train, decay_steps=100) == pytest.approx(0.1)
    assert lr_at(9, train=train, decay_steps=100) == pytest.approx(1.0)
    assert lr_at(55, train=train, decay_steps=100) == pytest.approx(0.55)
    assert lr_at(100, train=train, decay_steps=100) == pytest.approx(0.1)
    assert lr_at(500, train=train, decay_steps=100) == pytest.approx(0.1)


def test_micro_seeds_differ_per_step_and_micro_batch() -> None:
    seeds = {micro_seed(1, step, micro) for step in range(50) for micro in range(16)}
    assert len(seeds) == 50 * 16


def test_padded_vocab() -> None:
    assert padded_vocab(ModelConfig(vocab_multiple=64), 1000) == 1024
    assert padded_vocab(ModelConfig(vocab_size=2048), 1000) == 2048
    with pytest.raises(ConfigError, match=r"model\.vocab_size=512"):
        padded_vocab(ModelConfig(vocab_size=512), 1000)
