"""A decoder-only transformer: pre-norm blocks, causal attention with RoPE and optional grouped-query
heads, GELU or SwiGLU MLP, tied or untied embeddings. ``model.arch`` picks the norm and the RoPE
layout (farm/model/arch.py: 'gpt' LayerNorm and interleaved pairs, 'llama' RMSNorm and halves).

One class serves every layout: with a tensor-parallel group the linear layers, the embedding and the
loss are Megatron-style parallel (farm/runtime/tensor_parallel.py); with a pipeline stage it holds
only that stage's blocks (the first stage the embedding, the last the norm, head and loss).
Parameter names are the dense model's (``blocks.3.attn.qkv.weight``) whatever the layout, and each
logical tensor is initialised from a seed and its name, so every layout starts from the same weights.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from farm.config import ModelConfig
from farm.model.arch import RopeScaling, get_arch
from farm.runtime.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    local_heads,
    parallel_lm_logits,
    qkv_sections,
    shard_specs,
    up_sections,
    vocab_parallel_cross_entropy,
)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: Any) -> None:
        super().__init__()
        hd = cfg.head_dim
        self.head_dim = hd
        self.n_heads, self.kv_heads = local_heads(n_heads=cfg.n_heads, kv_heads=cfg.kv_heads, tp=_size(tp_group))
        self.qkv = ColumnParallelLinear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * hd, group=tp_group,
                                        sections=qkv_sections(cfg))
        self.proj = RowParallelLinear(cfg.n_heads * hd, cfg.d_model, group=tp_group)
        self.dropout = cfg.dropout
        self.rope = get_arch(cfg.arch).apply_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        if self.kv_heads != self.n_heads:
            rep = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: Any) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        sections = up_sections(cfg)
        self.up = ColumnParallelLinear(cfg.d_model, sum(sections), group=tp_group, sections=sections)
        self.down = RowParallelLinear(cfg.d_ff, cfg.d_model, group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: Any) -> None:
        super().__init__()
        norm = get_arch(cfg.arch).norm
        self.norm1 = norm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, tp_group)
        self.norm2 = norm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg, tp_group)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin))
        return x + self.drop(self.mlp(self.norm2(x)))


def _size(group: Any) -> int:
    import torch.distributed as dist

    return 1 if group is None else dist.get_world_size(group)


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class GPT(nn.Module):
    """The model, or one pipeline stage of it, optionally tensor-parallel over ``tp_group``.

    ``forward(inputs, targets)``: the first stage takes token ids, the others the previous stage's
    hidden states; the last stage returns the mean next-token cross-entropy (or the logits of its
    vocabulary slice when ``targets`` is None), the others their hidden states.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, tp_group: Any = None, layers: range | None = None,
                 first: bool = True, last: bool = True, init_seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.vocab_size, self.tp_group = cfg, vocab_size, tp_group
        self.first, self.last = first, last
        layers = range(cfg.n_layers) if layers is None else layers
        tied_head = last and cfg.tie_embeddings
        # With pipeline stages and tied embeddings the last stage keeps its own copy of the
        # embedding as the head; the runtime sums the two copies' gradients each step.
        self.embed = VocabParallelEmbedding(vocab_size, cfg.d_model, group=tp_group) if first or tied_head else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, tp_group) for i in layers})
        arch = get_arch(cfg.arch)
        self.norm = arch.norm(cfg.d_model, cfg.norm_eps) if last else None
        self.head = (ColumnParallelLinear(cfg.d_model, vocab_size, group=tp_group)
                     if last and not cfg.tie_embeddings else None)
        cos, sin = arch.rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta, RopeScaling.of(cfg))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(init_seed)

    def init_std(self, name: str) -> float | None:
        """GPT-2 style: N(0, std), residual projections scaled by 1/sqrt(2 * layers); None for norms."""
        if ".norm" in name or name.startswith("norm"):
            return None
        if name.endswith(("proj.weight", "down.weight")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Each logical tensor from its own generator, then this rank's shard of it. A model on the
        meta device (the launch's checkpoint identity) has shapes only, and nothing to draw."""
        if any(p.is_meta for p in self.parameters()):
            return
        specs = shard_specs(self)
        for name, p in self.named_parameters():
            std = self.init_std(name)
            if std is None:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
                continue
            spec = specs.get(name)
            shape = spec.global_shape(p.shape) if spec is not None else tuple(p.shape)
            generator = torch.Generator().manual_seed(_name_seed(seed, name))
            full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            p.copy_(spec.shard(full) if spec is not None else full)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.first:
            assert self.embed is not None
            x = self.drop(self.embed(inputs))
        else:
            x = inputs
        for block in self.blocks.values():
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
        if not self.last:
            return x
        assert self.norm is not None
        x = self.norm(x)
        if self.head is not None:
            logits = self.head(x)
        else:
            assert self.embed is not None
            logits = parallel_lm_logits(x, self.embed.weight, group=self.tp_group)
        if targets is None:
            return logits
        return vocab_parallel_cross_entropy(logits, targets, group=self.tp_group)
