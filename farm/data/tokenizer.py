"""Training or loading the tokenizer, offline and deterministically (HF ``tokenizers``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from farm.errors import DataError

EOS = "<|endoftext|>"
# Tokenizers made elsewhere name their end-of-document token differently; the first one found is
# used as the separator between documents.
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# BPE merges are learned on a prefix of the corpus: the merges of a code or prose corpus settle
# after a few MB, and training time grows with the text while tokenizing the rest is cheap.
TRAIN_BYTES = 8_000_000


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    eos_id: int
    vocab_size: int
    """Real size, added tokens included; every id is below it."""


def _describe(tokenizer: Tokenizer, where: str) -> LoadedTokenizer:
    eos_id = next((i for name in _EOS_CANDIDATES if (i := tokenizer.token_to_id(name)) is not None), None)
    if eos_id is None:
        raise DataError(
            f"{where}: the tokenizer has no end-of-document token (looked for {', '.join(_EOS_CANDIDATES)}); "
            f"add {EOS} as a special token or let prepare train one (data.tokenizer=null)"
        )
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    return LoadedTokenizer(tokenizer=tokenizer, eos_id=eos_id, vocab_size=vocab_size)


def load_tokenizer(path: str | Path) -> LoadedTokenizer:
    """Load a tokenizer.json; DataError if it is missing, unreadable or has no EOS token."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data.tokenizer {file}: no such file; give a tokenizer.json or null to train one")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on parse errors
        raise DataError(f"data.tokenizer {file}: not a tokenizers JSON file ({err})") from err
    return _describe(tokenizer, f"data.tokenizer {file}")


def train_tokenizer(texts: Iterator[str], *, vocab_size: int) -> LoadedTokenizer:
    """Train a byte-level BPE with ``EOS`` as its only special token (id 0)."""
    if vocab_size < 257:
        raise DataError(
            f"data.vocab_size={vocab_size}: a byte-level BPE needs at least 257 (256 bytes + EOS)"
        )
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    # Save and reload as a plain Tokenizer so trained and given tokenizers behave the same.
    return _describe(Tokenizer.from_str(bpe.to_str()), "trained tokenizer")
