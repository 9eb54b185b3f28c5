"""How farm's dense tensors map onto Hugging Face ``transformers`` models, one mapping per ``model.arch``.

- ``llama`` is LlamaForCausalLM exactly: the fused qkv weight splits into q_proj/k_proj/v_proj, the
  SwiGLU up weight into gate_proj/up_proj, names aside nothing changes.
- ``gpt`` has no exact HF class: LayerNorm with a bias, RoPE on interleaved pairs, no linear biases.
  The nearest is GPTNeoXForCausalLM with ``use_parallel_residual=false`` (sequential pre-norm blocks,
  LayerNorm with bias, full rotary, no attention biases): each head's q and k rows are permuted
  (evens, then odds), which turns interleaved-pair RoPE into its split-halves RoPE exactly; grouped
  key/value heads are repeated to one per query head; its MLP biases, which farm does not have,
  are written as zeros. SwiGLU has no place in it, so a ``gpt`` model with ``mlp=swiglu`` is refused.

Pure functions of tensors and configs: farm/checkpoint/hf.py does the files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from farm.config import ModelConfig
from farm.errors import ConfigError
from farm.model.arch import interleaved_to_halves

Tensors = dict[str, torch.Tensor]
Get = Callable[[str], torch.Tensor]
"""A farm tensor by its dense parameter name (``blocks.0.attn.qkv.weight``), whole."""


@dataclass(frozen=True)
class TokenIds:
    """Special tokens written into config.json."""

    bos: int
    eos: int


# -- llama: LlamaForCausalLM ---------------------------------------------------------------------


def _shared_config(
    cfg: ModelConfig, *, vocab: int, ids: TokenIds, hf_class: str, model_type: str
) -> dict[str, Any]:
    """The config.json keys both classes name alike."""
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.seq_len,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def llama_config(cfg: ModelConfig, *, vocab: int, ids: TokenIds) -> dict[str, Any]:
    theta, scaling = float(cfg.rope_theta), _rope_scaling(cfg)
    return {
        **_shared_config(cfg, vocab=vocab, ids=ids, hf_class="LlamaForCausalLM", model_type="llama"),
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})},
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "pretraining_tp": 1,
    }


_LLAMA_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_LLAMA_LAYER = {
    "norm1.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
"""farm name -> LlamaForCausalLM name, per block, for the tensors that map one to one."""
_LLAMA_FUSED = {
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
"""farm's fused rows -> the HF tensors they are stacked from, in order."""


def _llama_names(cfg: ModelConfig) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(one-to-one, fused) name maps of the whole model."""
    top = {k: v for k, v in _LLAMA_TOP.items() if k != "head.weight" or not cfg.tie_embeddings}
    fused: dict[str, tuple[str, ...]] = {}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        top |= {src + k: dst + v for k, v in _LLAMA_LAYER.items()}
        fused |= {src + k: tuple(dst + n for n in names) for k, names in _LLAMA_FUSED.items()}
    return top, fused


def _fused_sizes(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    if name.endswith("qkv.weight"):
        q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        return q_rows, kv_rows, kv_rows
    return cfg.d_ff, cfg.d_ff


def llama_tensors(cfg: ModelConfig, get: Get) -> Iterator[tuple[str, torch.Tensor]]:
    """LlamaForCausalLM's tensors, one farm tensor read at a time (an export holds about a shard)."""
    one, fused = _llama_names(cfg)
    for farm, hf in one.items():
        yield hf, get(farm).contiguous()
    for farm, names in fused.items():
        for name, part in zip(names, get(farm).split(_fused_sizes(cfg, farm), dim=0)):
            yield name, part.contiguous()


def llama_from_hf(cfg: ModelConfig, get: Get) -> Tensors:
    """farm's dense tensors from LlamaForCausalLM's, ``get`` reading an HF tensor by its name."""
    one, fused = _llama_names(cfg)
    out = {farm: get(hf) for farm, hf in one.items()}
    out |= {farm: torch.cat([get(n) for n in names]) for farm, names in fused.items()}
    return out


_SCALING_FIELDS = {
    "factor": "rope_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_len",
}
"""Hugging Face's names of Llama 3.1's RoPE scaling fields -> ModelConfig's."""


def _rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_scaling != "llama3":
        return None
    return {"rope_type": "llama3", **{key: getattr(cfg, field) for key, field in _SCALING_FIELDS.items()}}


def llama_problems(cfg: ModelConfig, *, vocab: int, hf: Mapping[str, Any]) -> list[str]:
    """Each way an HF config.json differs from this model, as 'field: theirs vs ours; what to set'."""
    if hf.get("model_type") != "llama":
        return [f"model_type is {hf.get('model_type')!r}, only 'llama' (LlamaForCausalLM) can be loaded"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    wanted = {
        "num_hidden_layers": ("n_layers", cfg.n_layers),
        "hidden_size": ("d_model", cfg.d_model),
        "num_attention_heads": ("n_heads", cfg.n_heads),
        "num_key_value_heads": ("n_kv_heads", cfg.kv_heads),
        "intermediate_size": ("d_ff", cfg.d_ff),
        "vocab_size": ("vocab_size", vocab),
        "tie_word_embeddings": ("tie_embeddings", cfg.tie_embeddings),
        "rms_norm_eps": ("norm_eps", cfg.norm_eps),
    }
    theirs = {
        **hf,
        "num_key_value_heads": hf.get("num_key_value_heads") or hf.get("num_attention_heads"),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    out = [
        f"{key}={theirs.get(key)!r} but model.{field}={ours!r}; set model.{field}={theirs.get(key)!r}"
        for key, (field, ours) in wanted.items()
        if theirs.get(key) != ours
    ]
    if float(theta) != float(cfg.rope_theta):
        out.append(
            f"rope_theta={theta!r} but model.rope_theta={cfg.rope_theta!r}; set model.rope_theta={theta!r}"
        )
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        out.append(f"rope type {kind!r}: farm runs plain RoPE and Llama 3.1's scaling (llama3) only")
    elif (kind == "llama3") != (cfg.rope_scaling == "llama3"):
        out.append(f"rope type {kind!r} but model.rope_scaling={cfg.rope_scaling!r}; set model.rope_scaling="
                   f"{'llama3' if kind == 'llama3' else 'none'}")
    elif kind == "llama3":
        for key, field in _SCALING_FIELDS.items():
            if float(rope.get(key, float("nan"))) != float(getattr(cfg, field)):
                out.append(f"rope_scaling.{key}={rope.get(key)!r} but model.{field}={getattr(cfg, field)!r}; "
                           f"set model.{field}={rope.get(key)!r}")
    if hf.get("head_dim") not in (None, cfg.head_dim):
        out.append(f"head_dim={hf['head_dim']} is not hidden_size/num_attention_heads={cfg.head_dim}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            out.append(f"{flag}=true: farm's model has no linear biases")
    if hf.get("hidden_act", "silu") != "silu":
        out.append(f"hidden_act={hf['hidden_act']!r}: farm's SwiGLU uses silu")
    return out


# -- gpt: GPTNeoXForCausalLM, the nearest class ----------------------------------------------------


def neox_config(cfg: ModelConfig, *, vocab: int, ids: TokenIds) -> dict[str, Any]:
    theta = float(cfg.rope_theta)
    return {
        **_shared_config(cfg, vocab=vocab, ids=ids, hf_class="GPTNeoXForCausalLM", model_type="gpt_neox"),
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.norm_eps,
        "use_parallel_residual": False,
        # transformers 5 reads rope_parameters; 4.x reads rotary_pct and rotary_emb_base.
        "rotary_pct": 1.0,
        "rotary_emb_base": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 1.0},
        "hidden_dropout": 0.0,
        "tie_word_embeddings": False,
    }


def neox_tensors(cfg: ModelConfig, get: Get) -> Iterator[tuple[str, torch.Tensor]]:
    """GPTNeoXForCausalLM's tensors, a layer at a time."""
    if cfg.mlp != "gelu":
        raise ConfigError(
            f"model.arch=gpt with model.mlp={cfg.mlp!r} has no Hugging Face class to export to "
            "(GPT-NeoX's MLP is GELU); train with model.arch=llama for a SwiGLU model"
        )
    h, hd, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    perm, rep = interleaved_to_halves(hd), cfg.n_heads // cfg.kv_heads
    embed = get("embed.weight")
    yield "gpt_neox.embed_in.weight", embed.contiguous()
    yield "embed_out.weight", (embed.clone() if cfg.tie_embeddings else get("head.weight")).contiguous()
    del embed
    yield "gpt_neox.final_layer_norm.weight", get("norm.weight").contiguous()
    yield "gpt_neox.final_layer_norm.bias", get("norm.bias").contiguous()
    for i in range(cfg.n_layers):
        out: Tensors = {}
        src, dst = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        q, k, v = (
            t.view(-1, hd, d) for t in get(src + "attn.qkv.weight").split(_fused_sizes(cfg, "qkv.weight"))
        )
        k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
        # GPT-NeoX's fused rows are head by head: [q_h; k_h; v_h] for each head h.
        qkv = torch.stack((q[:, perm], k[:, perm], v), dim=1).reshape(3 * h * hd, d)
        for norm, name in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
            out[dst + f"{name}.weight"] = get(src + f"{norm}.weight")
            out[dst + f"{name}.bias"] = get(src + f"{norm}.bias")
        out |= {
            dst + "attention.query_key_value.weight": qkv,
            dst + "attention.dense.weight": get(src + "attn.proj.weight"),
            dst + "mlp.dense_h_to_4h.weight": get(src + "mlp.up.weight"),
            dst + "mlp.dense_h_to_4h.bias": torch.zeros(cfg.d_ff),
            dst + "mlp.dense_4h_to_h.weight": get(src + "mlp.down.weight"),
            dst + "mlp.dense_4h_to_h.bias": torch.zeros(d),
        }
        for name, t in out.items():
            yield name, t.contiguous()


@dataclass(frozen=True)
class HFMapping:
    """One architecture's way into (and, where exact, out of) Hugging Face."""

    hf_class: str
    config: Callable[..., dict[str, Any]]
    to_hf: Callable[[ModelConfig, Get], Iterator[tuple[str, torch.Tensor]]]
    from_hf: Callable[[ModelConfig, Get], Tensors] | None = None
    problems: Callable[..., list[str]] | None = None
    """Differences between an HF config.json and the model; with from_hf, what init_from checks."""


MAPPINGS: dict[str, HFMapping] = {
    "llama": HFMapping("LlamaForCausalLM", llama_config, llama_tensors, llama_from_hf, llama_problems),
    "gpt": HFMapping("GPTNeoXForCausalLM", neox_config, neox_tensors),
}


def mapping(arch: str) -> HFMapping:
    try:
        return MAPPINGS[arch]
    except KeyError:
        raise ConfigError(
            f"model.arch={arch!r} has no Hugging Face mapping; known: {', '.join(MAPPINGS)}"
        ) from None
