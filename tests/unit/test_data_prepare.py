"""prepare(): text, JSONL and Parquet inputs, tokenizers trained or given, packing, atomic output."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from farm.config import DataConfig
from farm.data import ArrowShardSource, load_manifest, prepare
from farm.data.prepare import main
from farm.errors import DataError

pytestmark = pytest.mark.unit

WORDS = ["the", "farm", "trains", "a", "model", "on", "tokens", "from", "packed", "shards", "while"]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) for _ in range(n)]


def _cfg(tmp_path: Path, source: str, **kw) -> DataConfig:
    base = {
        "dir": str(tmp_path / "data"),
        "source": source,
        "vocab_size": 300,
        "seq_len": 16,
        "rows_per_shard": 64,
    }
    return DataConfig(**{**base, **kw})


def _all_tokens(data_dir: Path) -> np.ndarray:
    manifest = load_manifest(data_dir)
    with ArrowShardSource(data_dir, manifest) as source:
        return source.take(np.arange(manifest.total_rows)).reshape(-1)


def _expected_tokens(data_dir: Path, docs: list[str]) -> np.ndarray:
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert eos is not None
    ids: list[int] = []
    for doc in docs:
        ids += [*tok.encode(doc).ids, eos]
    return np.asarray(ids)


def test_txt_rows_are_the_documents_joined_by_eos(tmp_path: Path) -> None:
    docs = _docs(30)
    (tmp_path / "in").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "in" / f"{i:03d}.txt").write_text(doc)
    manifest = prepare(_cfg(tmp_path, str(tmp_path / "in" / "*.txt")), progress=False)
    got = _all_tokens(tmp_path / "data")
    want = _expected_tokens(tmp_path / "data", docs)
    assert manifest.total_rows == len(want) // 17  # the partial last row is dropped
    np.testing.assert_array_equal(got, want[: len(got)])
    assert manifest.eos_id == 0 and (got == 0).sum() >= manifest.total_rows * 17 // 150
    assert [s.rows for s in manifest.shards[:-1]] == [64] * (len(manifest.shards) - 1)
    assert "30 documents" in manifest.source


def test_jsonl_and_parquet_inputs_give_the_same_tokens(tmp_path: Path) -> None:
    docs = _docs(25, seed=1)
    with open(tmp_path / "a.jsonl", "w") as fh:
        for doc in docs:
            fh.write(json.dumps({"id": 1, "body": doc}) + "\n\n")
    pq.write_table(
        pa.table({"body": docs, "n": list(range(len(docs)))}), tmp_path / "a.parquet", row_group_size=7
    )
    a = prepare(
        _cfg(tmp_path, str(tmp_path / "*.jsonl"), text_field="body", dir=str(tmp_path / "j")), progress=False
    )
    b = prepare(
        _cfg(tmp_path, str(tmp_path / "*.parquet"), text_field="body", dir=str(tmp_path / "p")),
        progress=False,
    )
    assert a.fingerprint == b.fingerprint and a.tokenizer_sha256 == b.tokenizer_sha256
    np.testing.assert_array_equal(
        _all_tokens(tmp_path / "j"), _expected_tokens(tmp_path / "j", docs)[: a.total_tokens]
    )


def test_missing_text_field_names_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"txt": "y"}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: no string field 'text'"):
        prepare(_cfg(tmp_path, str(tmp_path / "*.jsonl")), progress=False)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: no column 'text' \(columns: content\)"):
        prepare(_cfg(tmp_path, str(tmp_path / "*.parquet")), progress=False)


def test_prepare_is_deterministic(tmp_path: Path) -> None:
    for i, doc in enumerate(_docs(20, seed=2)):
        (tmp_path / f"{i}.md").write_text(doc)
    a = prepare(_cfg(tmp_path, str(tmp_path / "*.md"), dir=str(tmp_path / "a")), progress=False)
    b = prepare(_cfg(tmp_path, str(tmp_path / "*.md"), dir=str(tmp_path / "b")), progress=False)
    assert a.fingerprint == b.fingerprint and a.tokenizer_sha256 == b.tokenizer_sha256
    c = prepare(_cfg(tmp_path, str(tmp_path / "*.md"), dir=str(tmp_path / "c"), seq_len=15), progress=False)
    assert c.fingerprint != a.fingerprint


def test_given_tokenizer_is_used_and_copied(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(_docs(20, seed=3)))
    first = prepare(_cfg(tmp_path, str(tmp_path / "a.txt"), dir=str(tmp_path / "one")), progress=False)
    given = tmp_path / "one" / "tokenizer.json"
    (tmp_path / "b.txt").write_text("\n".join(_docs(20, seed=4)))
    second = prepare(
        _cfg(
            tmp_path, str(tmp_path / "b.txt"), dir=str(tmp_path / "two"), tokenizer=str(given), vocab_size=999
        ),
        progress=False,
    )
    assert second.tokenizer_sha256 == first.tokenizer_sha256
    assert (tmp_path / "two" / "tokenizer.json").read_bytes() == given.read_bytes()
    assert second.vocab_size == first.vocab_size != 999


def test_given_tokenizer_without_eos_or_missing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(_docs(10)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(_docs(10), trainers.BpeTrainer(vocab_size=280, show_progress=False))
    tok.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(DataError, match=r"no_eos\.json: the tokenizer has no end-of-document token"):
        prepare(
            _cfg(tmp_path, str(tmp_path / "a.txt"), tokenizer=str(tmp_path / "no_eos.json")), progress=False
        )
    with pytest.raises(DataError, match=r"data\.tokenizer .*nope\.json: no such file"):
        prepare(
            _cfg(tmp_path, str(tmp_path / "a.txt"), tokenizer=str(tmp_path / "nope.json")), progress=False
        )


def test_empty_corpus_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.source '.*\*\.txt' matches no files"):
        prepare(_cfg(tmp_path, str(tmp_path / "*.txt")), progress=False)
    (tmp_path / "short.txt").write_text("the farm")
    with pytest.raises(
        DataError, match=r"'.*short\.txt': \d+ tokens .* fewer than one row of seq_len \+ 1 = 17"
    ):
        prepare(_cfg(tmp_path, str(tmp_path / "short.txt")), progress=False)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match=r"no text in 1 file"):
        prepare(_cfg(tmp_path, str(tmp_path / "blob.bin")), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "short.txt"]  # no data dir, no temp dir


def test_never_overwrites_a_prepared_dir(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(_docs(10)))
    cfg = _cfg(tmp_path, str(tmp_path / "a.txt"))
    first = prepare(cfg, progress=False)
    before = (tmp_path / "data" / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prepare(cfg, progress=False)
    assert (tmp_path / "data" / "manifest.json").read_bytes() == before
    assert load_manifest(tmp_path / "data").fingerprint == first.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "data"]


def test_existing_dir_without_manifest_is_filled(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(_docs(10)))
    (tmp_path / "empty").mkdir()
    prepare(_cfg(tmp_path, str(tmp_path / "a.txt"), dir=str(tmp_path / "empty")), progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    manifest = prepare(_cfg(tmp_path, str(tmp_path / "a.txt"), dir=str(tmp_path / "busy")), progress=False)
    assert load_manifest(tmp_path / "empty").fingerprint == load_manifest(tmp_path / "busy").fingerprint
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert manifest.total_rows > 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_max_bytes_cuts_the_corpus(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\n".join(_docs(40)))
    manifest = prepare(_cfg(tmp_path, str(tmp_path / "a.txt"), max_bytes=3000), progress=False)
    assert "3000 bytes of text" in manifest.source
    assert manifest.total_tokens < 3000


def test_demo_source_reads_the_standard_library(tmp_path: Path) -> None:
    manifest = prepare(_cfg(tmp_path, "demo", max_bytes=60_000, vocab_size=400), progress=False)
    assert manifest.source.startswith("demo: Python standard library sources")
    assert "60000 bytes of text" in manifest.source
    tok = Tokenizer.from_file(str(tmp_path / "data" / "tokenizer.json"))
    text = tok.decode(_all_tokens(tmp_path / "data")[:200].tolist())
    first = Path(sysconfig.get_paths()["stdlib"]) / "__future__.py"  # the first file in sorted order
    assert len(text) > 300 and first.read_text().startswith(text[:300])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("\n".join(_docs(10)))
    argv = ["--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--vocab-size", "300"]
    assert main([*argv, "--seq-len", "16", "--no-progress"]) == 0
    assert "prepared" in capsys.readouterr().out
    assert load_manifest(tmp_path / "d").seq_len == 16
    assert main([*argv, "--no-progress"]) == 2
    assert "already holds a prepared dataset" in capsys.readouterr().err


def test_binary_input_named_jsonl_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blob.jsonl").write_bytes(b'{"text": "ok"}\n' + bytes([0x7B, 0xC8, 0x41]) * 1000)
    cfg = DataConfig(dir=str(tmp_path / "out"), source=str(tmp_path / "in" / "*.jsonl"), vocab_size=300)
    with pytest.raises(DataError, match=r"blob.jsonl:2: not UTF-8 text \(byte 0xc8 at column 2\)"):
        prepare(cfg, progress=False)
    assert main(["--source", cfg.source, "--out", cfg.dir, "--vocab-size", "300", "--no-progress"]) == 2


def test_the_prepare_command_in_messages_names_the_configured_source() -> None:
    from farm.data.prepare import prepare_command

    assert prepare_command(DataConfig(dir="data/x")) == "python -m farm.data.prepare --source demo --out data/x"
    custom = DataConfig(dir="data/c", source="corpus/*.jsonl", text_field="body", seq_len=256)
    assert prepare_command(custom) == ("python -m farm.data.prepare --source 'corpus/*.jsonl' --out data/c "
                                       "--text-field body --seq-len 256")
