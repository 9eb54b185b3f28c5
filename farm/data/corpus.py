"""Finding and reading the text corpus that ``prepare`` tokenizes.

A source is 'demo' (this machine's Python standard library sources), a directory, or a glob. Files
are read in sorted order so the same source always gives the same documents. Each file type has a
reader registered in ``READERS`` by suffix; anything else is read as one plain-text document.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from farm.errors import DataError

DEMO = "demo"
# Installed packages are not part of the demo corpus: what is installed differs between machines.
_DEMO_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__"})

Reader = Callable[[Path, str], Iterator[str]]


@dataclass(frozen=True)
class Corpus:
    """The files a source resolves to, in reading order."""

    source: str
    files: tuple[Path, ...]
    description: str

    @functools.cached_property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _read_text(path: Path, text_field: str) -> Iterator[str]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        return  # a binary file matched by a broad glob is not text
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError:
        # A few files in any large tree are in legacy encodings; skipping them keeps the
        # corpus byte-exact and deterministic rather than guessing a codec.
        return


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "a .jsonl file holds one UTF-8 JSON object per line: is this a binary file, or text in "
                    "another encoding? Convert it or leave it out of data.source"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: no string field {text_field!r}; set data.text_field "
                    "(--text-field) to the field that holds the text"
                )
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    pfile = pq.ParquetFile(path)
    names = pfile.schema_arrow.names
    if text_field not in names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set data.text_field "
            "(--text-field) to the column that holds the text"
        )
    for batch in pfile.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield str(text)


READERS: dict[str, Reader] = {
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def _demo_files() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for top, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _DEMO_SKIP]  # prune: site-packages is most of the tree
        files.extend(Path(top) / n for n in names if n.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return Corpus(DEMO, tuple(files), f"demo: Python standard library sources in {root}")


def find_corpus(source: str) -> Corpus:
    """Resolve a source to its files; DataError when it names nothing."""
    if source == DEMO:
        corpus = _demo_files()
    else:
        pattern = str(Path(source) / "**" / "*") if Path(source).is_dir() else source
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        corpus = Corpus(source, tuple(files), f"glob: {source}")
    if not corpus.files:
        raise DataError(
            f"data.source {source!r} matches no files; give 'demo', a directory, or a glob such as "
            "'corpus/*.jsonl' (quote it so the shell does not expand it)"
        )
    return corpus


def iter_documents(
    corpus: Corpus, *, text_field: str, max_bytes: int, on_bytes: Callable[[int], None] | None = None
) -> Iterator[str]:
    """Documents in order, stopping after ``max_bytes`` of UTF-8 text (0: no limit).

    The document that crosses the limit is cut there, so the byte budget is exact.
    ``on_bytes`` is told the size of every document, for progress bars.
    """
    seen = 0
    for path in corpus.files:
        reader = READERS.get(path.suffix.lower(), _read_text)
        for text in reader(path, text_field):
            size = len(text.encode("utf-8"))
            if max_bytes and seen + size > max_bytes:
                text = text.encode("utf-8")[: max_bytes - seen].decode("utf-8", errors="ignore")
                size = max_bytes - seen
            seen += size
            if on_bytes is not None:
                on_bytes(size)
            if text:
                yield text
            if max_bytes and seen >= max_bytes:
                return
