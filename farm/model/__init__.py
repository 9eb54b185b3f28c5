"""Architecture variants of farm's decoder: the parts that differ between them (norm, RoPE layout).

The model itself (``farm.runtime.model.GPT``) is one class for every layout; ``model.arch`` picks
the variant by name from :data:`farm.model.arch.ARCHS`. docs/huggingface.md says how each variant
maps onto a Hugging Face class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from farm.config import ModelConfig

ARCH_NAMES = ("gpt", "llama")
"""The registered names of ``model.arch``; farm.model.arch.ARCHS holds one entry per name."""


def padded_vocab(model: ModelConfig, tokenizer_vocab: int) -> int:
    """Vocabulary rows: the configured size, or the tokenizer's rounded up to vocab_multiple."""
    if model.vocab_size is not None:
        if model.vocab_size < tokenizer_vocab:
            from farm.errors import ConfigError

            raise ConfigError(
                f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} "
                "tokens; set model.vocab_size=null to take it from the data manifest"
            )
        return model.vocab_size
    m = model.vocab_multiple
    return (tokenizer_vocab + m - 1) // m * m
