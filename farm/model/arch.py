"""The registered architecture variants and their parts: norms and rotary embeddings.

``gpt``: LayerNorm with a bias, RoPE on interleaved (even, odd) pairs of each head, tables in float64.
``llama``: RMSNorm (weight only), RoPE on the two halves of each head, tables in float32, computed as
Hugging Face's LlamaForCausalLM computes them, so exported weights give its logits to rounding.
Both keep the rest of the block: no linear biases, GELU or SwiGLU, grouped-query heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from farm.model import ARCH_NAMES

if TYPE_CHECKING:
    from farm.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in float32 whatever the input's dtype (as Llama's)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_tables(
    seq_len: int, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each (position, frequency), (seq_len, head_dim/2), computed in float64.

    On the CPU always, also for a model built on the meta device (the launch's checkpoint identity),
    where the same ops would run torch's Python references of them, which import torch._dynamo."""
    if scaling is not None:
        raise ValueError("RoPE scaling is Llama's (model.arch=llama)")
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device="cpu"), inv)
    return angles.cos().float(), angles.sin().float()


def rope_tables_f32(
    seq_len: int, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tables rounded as Llama's reference code rounds them (inverse frequencies in float32),
    with Llama 3.1's frequency scaling when ``scaling`` is given; on the CPU, as rope_tables."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is not None:
        inv = scaling.apply(inv)
    angles = torch.arange(seq_len, dtype=torch.float32, device="cpu")[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE scaling: frequencies whose wavelength is longer than the original context
    over ``low_freq_factor`` are divided by ``factor``, those shorter than it over
    ``high_freq_factor`` are kept, and the ones between are interpolated linearly in
    (original context / wavelength)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_len: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> RopeScaling | None:
        if cfg.rope_scaling != "llama3":
            return None
        return cls(cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len)

    def apply(self, inv: torch.Tensor) -> torch.Tensor:
        wavelength = 2 * math.pi / inv
        ratio = self.original_max_len / wavelength  # how many wavelengths fit in the original context
        long = ratio < self.low_freq_factor  # wavelength > original / low_freq_factor
        short = ratio > self.high_freq_factor  # wavelength < original / high_freq_factor
        blend = (ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        between = (1 - blend) * inv / self.factor + blend * inv
        return torch.where(long, inv / self.factor, torch.where(short, inv, between))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotates pairs (even, odd) of each head."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotates pairs (i, i + head_dim/2) of each head."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def interleaved_to_halves(head_dim: int) -> torch.Tensor:
    """Row order that turns an interleaved-pair head into a split-halves one: evens, then odds.

    Permuting the q and k rows of every head by it (the same for both) gives the same attention
    scores under split-halves RoPE as the original rows under interleaved RoPE.
    """
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


Tables = Callable[[int, int, float, "RopeScaling | None"], tuple[torch.Tensor, torch.Tensor]]
Rotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Arch:
    """What one variant puts in the block; everything else is shared."""

    name: str
    norm: Callable[[int, float], nn.Module]
    """Builds a norm over d_model with model.norm_eps."""
    rope_tables: Tables
    apply_rope: Rotate
    norm_bias: bool
    """Whether the norms carry a bias (a tensor named ``...norm*.bias`` in checkpoints)."""


def _layer_norm(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps)


ARCHS: dict[str, Arch] = {
    "gpt": Arch("gpt", _layer_norm, rope_tables, apply_rope, norm_bias=True),
    "llama": Arch("llama", RMSNorm, rope_tables_f32, apply_rope_halves, norm_bias=False),
}
assert tuple(ARCHS) == ARCH_NAMES


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"model.arch={name!r}: use one of {', '.join(ARCHS)}") from None
