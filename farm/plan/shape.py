"""What the planner needs to know about the model: parameter, FLOP and activation counts per layer."""

from __future__ import annotations

from dataclasses import dataclass

from farm.config import DataConfig, ModelConfig
from farm.errors import PlanError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state for one training precision (AdamW optimizer)."""

    name: str
    weight: int
    """Parameters and gradients as the model holds them."""
    optimizer: int
    """Per parameter: fp32 master copy (mixed precision only) plus Adam's two moments."""
    activation: int

    @classmethod
    def of(cls, name: str) -> Precision:
        if name == "fp32":
            return cls("fp32", 4, 8, 4)
        if name in ("bf16", "fp16"):
            return cls(name, 2, 12, 2)
        raise PlanError(f"train.precision={name!r}: use one of {', '.join(PRECISIONS)} or auto")


@dataclass(frozen=True)
class ModelShape:
    """Counts derived from the model config (the layout of farm.runtime.model: no biases, RoPE)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    kv_heads: int
    d_ff: int
    vocab: int
    seq_len: int
    tied: bool
    swiglu: bool
    dropout: bool
    layer_matrix_params: int
    """Weights of one block split by tensor parallelism (attention and MLP matrices)."""
    layer_vector_params: int
    """Weights of one block every tensor-parallel rank keeps whole (the two norms)."""
    final_norm_params: int
    """The norm after the last block: a LayerNorm's weight and bias (gpt), an RMSNorm's weight (llama)."""

    @classmethod
    def from_config(cls, model: ModelConfig, *, vocab_size: int | None = None) -> ModelShape:
        """``vocab_size`` stands in when model.vocab_size is None (it comes from the tokenizer)."""
        vocab = model.vocab_size or vocab_size or _default_vocab(model)
        h, hd, kv = model.d_model, model.head_dim, model.kv_heads
        swiglu = model.mlp == "swiglu"
        norm = h if getattr(model, "arch", "gpt") == "llama" else 2 * h  # RMSNorm has no bias
        attention = h * (model.n_heads + 2 * kv) * hd + model.n_heads * hd * h
        mlp = (3 if swiglu else 2) * h * model.d_ff
        return cls(
            name=model.name,
            n_layers=model.n_layers,
            d_model=h,
            n_heads=model.n_heads,
            kv_heads=kv,
            d_ff=model.d_ff,
            vocab=vocab,
            seq_len=model.seq_len,
            tied=model.tie_embeddings,
            swiglu=swiglu,
            dropout=model.dropout > 0,
            layer_matrix_params=attention + mlp,
            layer_vector_params=2 * norm,
            final_norm_params=norm,
        )

    @property
    def embed_params(self) -> int:
        return self.vocab * self.d_model

    @property
    def num_params(self) -> int:
        head = 0 if self.tied else self.embed_params
        per_layer = self.layer_matrix_params + self.layer_vector_params
        return self.n_layers * per_layer + self.embed_params + head + self.final_norm_params

    @property
    def layer_flops_per_token(self) -> float:
        """Model FLOPs of one block per token, forward and backward: 6 per matrix weight plus the
        attention score and value products (12·s·h, counted without the causal half, as the
        Megatron-LM and PaLM MFU formulas do)."""
        return 6.0 * self.layer_matrix_params + 12.0 * self.seq_len * self.d_model

    @property
    def head_flops_per_token(self) -> float:
        return 6.0 * self.vocab * self.d_model

    @property
    def flops_per_token(self) -> float:
        """Model FLOPs per trained token, the numerator of MFU (no recomputation counted)."""
        return self.n_layers * self.layer_flops_per_token + self.head_flops_per_token

    def tp_divides(self, tp: int) -> str | None:
        """Why tensor parallel degree ``tp`` cannot split this model, or None."""
        for field, value in (("n_heads", self.n_heads), ("n_kv_heads", self.kv_heads), ("d_ff", self.d_ff)):
            if value % tp:
                return f"model.{field}={value}"
        return None


def _default_vocab(model: ModelConfig) -> int:
    """The tokenizer `prepare` trains by default, padded as farm.runtime.model pads it."""
    size, m = DataConfig().vocab_size, model.vocab_multiple
    return (size + m - 1) // m * m
