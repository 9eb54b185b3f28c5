"""Text -> tokenizer -> packed Arrow shards + manifest.json, written atomically.

    python -m farm.data.prepare --source demo --out data/demo
    python -m farm.data.prepare --source 'corpus/*.jsonl' --text-field text --out data/corpus

Everything is written into a temporary sibling directory that is renamed to the target only when
complete, so a data directory either holds a whole dataset with its manifest or nothing usable.
A prepared directory is never overwritten.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from farm.config import DataConfig
from farm.data.corpus import Corpus, find_corpus, iter_documents
from farm.data.manifest import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    compute_fingerprint,
    dtype_for_vocab,
    sha256_file,
    write_manifest,
)
from farm.data.shards import ShardWriter
from farm.data.tokenizer import TRAIN_BYTES, LoadedTokenizer, load_tokenizer, train_tokenizer
from farm.errors import DataError, FarmError

# Text handed to one encode_batch call: large enough for the Rust side to parallelise, small
# enough to bound memory whatever the corpus size.
ENCODE_BATCH_BYTES = 1 << 20


def _check_config(cfg: DataConfig) -> None:
    for name in ("seq_len", "rows_per_shard", "vocab_size"):
        if getattr(cfg, name) <= 0:
            raise DataError(f"data.{name}={getattr(cfg, name)}: must be positive")
    if cfg.max_bytes < 0:
        raise DataError(f"data.max_bytes={cfg.max_bytes}: must be >= 0 (0 means no limit)")


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"data.dir {out} exists and is not a directory; choose another --out")
    if (out / MANIFEST_NAME).exists():
        raise DataError(
            f"data.dir {out} already holds a prepared dataset ({out / MANIFEST_NAME}); prepare never "
            "overwrites one: choose a new --out (data.dir), or delete that directory yourself"
        )


def _new_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[docs]} docs"),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def _get_tokenizer(cfg: DataConfig, corpus: Corpus, bar: Progress) -> LoadedTokenizer:
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer)
    budget = min(TRAIN_BYTES, cfg.max_bytes) if cfg.max_bytes else TRAIN_BYTES
    task = bar.add_task("train tokenizer", total=min(budget, corpus.file_bytes), docs=0)
    seen = {"docs": 0, "bytes": 0}

    def count(size: int) -> None:
        seen["docs"] += 1
        seen["bytes"] += size
        bar.update(task, advance=size, docs=seen["docs"])

    docs = iter_documents(corpus, text_field=cfg.text_field, max_bytes=budget, on_bytes=count)
    tok = train_tokenizer(docs, vocab_size=cfg.vocab_size)
    bar.update(task, total=seen["bytes"], completed=seen["bytes"])
    if seen["docs"] == 0:
        raise DataError(
            f"data.source {cfg.source!r}: no text in {len(corpus.files)} file(s) (all empty, binary "
            "or not UTF-8); point it at text, .jsonl or .parquet files"
        )
    return tok


def _encode_all(
    cfg: DataConfig, corpus: Corpus, tok: LoadedTokenizer, writer: ShardWriter, bar: Progress
) -> tuple[int, int]:
    """Tokenize every document, each followed by EOS, into ``writer``; returns (documents, bytes)."""
    total = min(cfg.max_bytes, corpus.file_bytes) if cfg.max_bytes else corpus.file_bytes
    task = bar.add_task("tokenize", total=total, docs=0)
    batch: list[str] = []
    batch_bytes = text_bytes = docs = 0
    for doc in iter_documents(corpus, text_field=cfg.text_field, max_bytes=cfg.max_bytes):
        batch.append(doc)
        batch_bytes += len(doc.encode("utf-8"))
        if batch_bytes >= ENCODE_BATCH_BYTES:
            docs += len(batch)
            _encode_batch(batch, tok, writer)
            bar.update(task, advance=batch_bytes, docs=docs)
            text_bytes, batch, batch_bytes = text_bytes + batch_bytes, [], 0
    if batch:
        _encode_batch(batch, tok, writer)
        docs += len(batch)
        text_bytes += batch_bytes
    bar.update(task, completed=text_bytes, total=text_bytes, docs=docs)
    return docs, text_bytes


def _encode_batch(batch: list[str], tok: LoadedTokenizer, writer: ShardWriter) -> None:
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which packing never uses.
    encode = getattr(tok.tokenizer, "encode_batch_fast", tok.tokenizer.encode_batch)
    ids: list[int] = []
    for enc in encode(batch, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tok.eos_id)
    writer.add(np.asarray(ids, dtype=np.uint32))


def _write_dataset(cfg: DataConfig, corpus: Corpus, tmp: Path, *, progress: bool) -> Manifest:
    with _new_progress(progress) as bar:
        tok = _get_tokenizer(cfg, corpus, bar)
        dtype = dtype_for_vocab(tok.vocab_size)
        writer = ShardWriter(tmp, row_len=cfg.seq_len + 1, dtype=dtype, rows_per_shard=cfg.rows_per_shard)
        docs, text_bytes = _encode_all(cfg, corpus, tok, writer, bar)
        shards = writer.finish()
    if not shards:
        raise DataError(
            f"data.source {cfg.source!r}: {writer.tokens_in} tokens from {text_bytes} bytes of text, fewer "
            f"than one row of seq_len + 1 = {cfg.seq_len + 1} tokens; add text or lower data.seq_len"
        )
    if cfg.tokenizer is not None:
        shutil.copyfile(cfg.tokenizer, tmp / TOKENIZER_NAME)
    else:
        tok.tokenizer.save(str(tmp / TOKENIZER_NAME))
    rows = sum(s.rows for s in shards)
    return Manifest(
        seq_len=cfg.seq_len,
        row_len=cfg.seq_len + 1,
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        dtype=dtype,
        tokenizer=TOKENIZER_NAME,
        tokenizer_sha256=sha256_file(tmp / TOKENIZER_NAME),
        source=f"{corpus.description}; {docs} documents, {text_bytes} bytes of text, "
        f"{writer.tokens_in} tokens ({writer.tokens_in - rows * (cfg.seq_len + 1)} dropped at the end)",
        total_rows=rows,
        fingerprint=compute_fingerprint((s.sha256 for s in shards), seq_len=cfg.seq_len),
        shards=tuple(shards),
    )


def _commit(tmp: Path, out: Path) -> None:
    """Publish ``tmp`` as ``out``: one rename, or file by file with the manifest last."""
    try:
        os.rename(tmp, out)  # also replaces an empty directory
        return
    except OSError:
        if not out.is_dir() or (out / MANIFEST_NAME).exists():
            raise DataError(
                f"data.dir {out} was created by another process while this prepare ran; "
                "use that dataset or prepare into a new directory"
            ) from None
    # ``out`` holds files but no manifest (an interrupted copy, or a user's folder): it is not a
    # dataset, so ours goes in beside them and becomes one only when the manifest lands.
    for item in sorted(tmp.iterdir()):
        if item.name != MANIFEST_NAME:
            os.replace(item, out / item.name)
    os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)
    tmp.rmdir()


def prepare(cfg: DataConfig, *, progress: bool = True) -> Manifest:
    """Tokenize ``cfg.source`` into shards of packed rows in ``cfg.dir``; returns the manifest."""
    _check_config(cfg)
    out = Path(cfg.dir)
    _check_target(out)
    corpus = find_corpus(cfg.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _write_dataset(cfg, corpus, tmp, progress=progress)
        write_manifest(tmp, manifest)
        _commit(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields: the config's help text lives there."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    for node, nxt in zip(body.body, body.body[1:]):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


_OPTIONS = {  # CLI flag -> DataConfig field
    "--source": "source",
    "--out": "dir",
    "--text-field": "text_field",
    "--tokenizer": "tokenizer",
    "--vocab-size": "vocab_size",
    "--seq-len": "seq_len",
    "--rows-per-shard": "rows_per_shard",
    "--max-bytes": "max_bytes",
}


# Fields that carry no docstring in farm.config yet.
_FALLBACK_HELP = {"rows_per_shard": "Rows per Arrow shard file."}


def prepare_command(cfg: DataConfig) -> str:
    """The command that prepares ``cfg.dir`` from ``cfg.source``: its source, and every other
    option that differs from the default, so the advice in a message makes the data this config needs."""
    defaults = DataConfig()
    words = ["python -m farm.data.prepare"]
    for flag, name in _OPTIONS.items():
        value = getattr(cfg, name)
        if name in ("source", "dir") or (value != getattr(defaults, name) and value is not None):
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m farm.data.prepare",
        description="Tokenize a text corpus into packed Arrow shards and a manifest.json.",
    )
    docs = _field_docs(DataConfig)
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    for flag, name in _OPTIONS.items():
        default = fields[name].default
        kind = int if isinstance(default, int) else str
        help_text = (docs.get(name) or _FALLBACK_HELP.get(name, name)).replace("%", "%%")
        parser.add_argument(
            flag, dest=name, type=kind, default=default, help=f"{help_text} (default: {default})"
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = DataConfig(**{name: getattr(args, name) for name in _OPTIONS.values()})
    start = time.perf_counter()
    try:
        manifest = prepare(cfg, progress=not args.no_progress)
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(
        f"prepared {cfg.dir}: {manifest.total_rows} rows x {manifest.row_len} tokens in "
        f"{len(manifest.shards)} shard(s), vocab {manifest.vocab_size}, fingerprint "
        f"{manifest.fingerprint[:16]}, {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
