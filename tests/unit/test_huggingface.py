"""Export to Hugging Face and back: a checkpoint written in a tensor-parallel layout is exported, loaded
by ``transformers`` alone (AutoModelForCausalLM, AutoTokenizer), and its logits are compared with
farm's own model; the exported directory then starts a model again (model.init_from)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from farm.checkpoint import CheckpointStore, SliceEntry
from farm.checkpoint.__main__ import main as checkpoint_cli
from farm.checkpoint.hf import HFWeights, check_init_from, export_hf
from farm.checkpoint.parts import sha256_file
from farm.config import ModelConfig
from farm.data.tokenizer import train_tokenizer
from farm.errors import CheckpointError, ConfigError
from farm.runtime.model import GPT
from farm.runtime.tensor_parallel import ShardSpec, load_full_state_, shard_specs

pytestmark = pytest.mark.unit
transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB = 320
LLAMA = ModelConfig(
    name="llama-test",
    arch="llama",
    n_layers=2,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    d_ff=176,
    mlp="swiglu",
    seq_len=32,
    tie_embeddings=False,
    rope_theta=500000.0,
    vocab_size=VOCAB,
)
LLAMA_SCALED = dataclasses.replace(
    LLAMA, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_max_len=256,
)
"""Llama 3.1's RoPE scaling, its original context chosen so that the 8 frequencies of a 16-wide head
fall in all three of its bands: wavelengths 6 and 33 are kept, 172 is interpolated, 903 and longer
are divided by the factor."""
GPT_VARIANT = ModelConfig(
    name="gpt-test", n_layers=2, d_model=64, n_heads=4, d_ff=256, seq_len=32, vocab_size=VOCAB
)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = [
        Path(torch.__file__).read_text(),
        Path(json.__file__).read_text(),
        Path(dataclasses.__file__).read_text(),
    ]
    tok = train_tokenizer(iter(text), vocab_size=300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.tokenizer.save(str(path))
    return path


def _model(cfg: ModelConfig) -> GPT:
    """A model whose norms are not the identity, so a wrong norm or bias mapping shows."""
    model = GPT(cfg, vocab_size=VOCAB, init_seed=7).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def write_checkpoint(run_dir: Path, model: GPT, tokenizer: Path, *, tp: int = 2, step: int = 3) -> Path:
    """The model's weights as a checkpoint of a tp-way layout: each split tensor as per-rank slices."""
    store = CheckpointStore(run_dir / "checkpoints")
    store.begin(step)
    dense = shard_specs(model)
    parts: dict[str, dict[str, SliceEntry]] = {}
    for name, p in model.named_parameters():
        full, spec = p.detach().float().contiguous(), dense.get(name)
        if spec is None:
            parts.setdefault("rank-00000-b0", {})[f"model/{name}"] = SliceEntry.full(full)
            continue
        for rank in range(tp):
            mine = ShardSpec(dim=spec.dim, sections=spec.sections, rank=rank, size=tp)
            for k, (block, offsets) in enumerate(mine.slices(mine.shard(full))):
                entry = SliceEntry(tensor=block.contiguous(), global_shape=full.shape, offsets=offsets)
                parts.setdefault(f"rank-{rank:05d}-b{k}", {})[f"model/{name}"] = entry
    for part, entries in parts.items():
        store.write_part(step, part, entries)
    meta = {
        "model_config": {**dataclasses.asdict(model.cfg), "vocab_size": VOCAB},
        "tokenizer_file": str(tokenizer),
        "tokenizer_hash": sha256_file(tokenizer),
    }
    return store.commit(step, meta, parts=list(parts)).path


def _tokens(tokenizer: Path, seq_len: int) -> torch.Tensor:
    from farm.data.tokenizer import load_tokenizer

    ids = (
        load_tokenizer(tokenizer).tokenizer.encode("def export(self, path):\n    return json.dumps(x)\n").ids
    )
    return torch.tensor([(ids * seq_len)[:seq_len], (ids[::-1] * seq_len)[:seq_len]])


def _max_diff(model: GPT, hf_dir: Path, tokens: torch.Tensor) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return float((model(tokens) - hf(tokens).logits).abs().max())


@pytest.mark.parametrize(
    ("cfg", "hf_class"),
    [
        (LLAMA, "LlamaForCausalLM"),
        (LLAMA_SCALED, "LlamaForCausalLM"),
        (GPT_VARIANT, "GPTNeoXForCausalLM"),
        (dataclasses.replace(GPT_VARIANT, n_kv_heads=2, tie_embeddings=False), "GPTNeoXForCausalLM"),
    ],
)
def test_export_gives_farms_logits_in_transformers(
    cfg: ModelConfig, hf_class: str, tokenizer_file: Path, tmp_path: Path
) -> None:
    model = _model(cfg)
    write_checkpoint(tmp_path / "run", model, tokenizer_file)
    done = export_hf(tmp_path / "run", tmp_path / "hf")
    assert done.step == 3 and done.hf_class == hf_class
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == hf_class
    tokens = _tokens(tokenizer_file, cfg.seq_len)
    assert _max_diff(model, tmp_path / "hf", tokens) < TOL
    text = "def export(self, path):\n    return json.dumps(x)\n"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    from farm.data.tokenizer import load_tokenizer

    assert hf_tok(text)["input_ids"] == load_tokenizer(tokenizer_file).tokenizer.encode(text).ids
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    assert hf_tok.eos_token == "<|endoftext|>"


def test_export_loads_in_a_process_without_farm(tokenizer_file: Path, tmp_path: Path) -> None:
    model = _model(LLAMA)
    write_checkpoint(tmp_path / "run", model, tokenizer_file)
    export_hf(tmp_path / "run", tmp_path / "hf")
    tokens = _tokens(tokenizer_file, LLAMA.seq_len)
    script = (
        "import sys, json, torch\n"
        "sys.modules['farm'] = None  # importing farm fails here\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    print(json.dumps(m(torch.tensor(json.loads(sys.argv[2]))).logits.tolist()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "hf"), json.dumps(tokens.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        want = model(tokens)
    assert float((torch.tensor(json.loads(out.stdout)) - want).abs().max()) < TOL


def test_init_from_reads_an_export_back_into_the_same_model(tokenizer_file: Path, tmp_path: Path) -> None:
    model = _model(LLAMA)
    write_checkpoint(tmp_path / "run", model, tokenizer_file)
    export_hf(tmp_path / "run", tmp_path / "hf")
    cfg = dataclasses.replace(LLAMA, init_from=f"hf:{tmp_path / 'hf'}")
    assert check_init_from(cfg, vocab=VOCAB, tokenizer_sha256=sha256_file(tokenizer_file)) == tmp_path / "hf"
    fresh = GPT(cfg, vocab_size=VOCAB, init_seed=99).eval()
    with HFWeights(cfg) as weights:
        load_full_state_(fresh, {name: weights.read(f"model/{name}") for name, _ in fresh.named_parameters()})
        rows = weights.read("model/blocks.0.attn.qkv.weight", (slice(8, 24),))
    assert torch.equal(rows, model.blocks["0"].attn.qkv.weight.detach()[8:24])
    tokens = _tokens(tokenizer_file, LLAMA.seq_len)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


@pytest.mark.parametrize("cfg", [LLAMA, GPT_VARIANT])
def test_a_sharded_export_loads_in_transformers_and_back_through_init_from(
    cfg: ModelConfig, tokenizer_file: Path, tmp_path: Path
) -> None:
    """Shards of at most 100 kB (the model is about 0.4 MB): files and index as save_pretrained
    writes them, the same logits in transformers, and init_from reads the shards back."""
    model = _model(cfg)
    write_checkpoint(tmp_path / "run", model, tokenizer_file)
    done = export_hf(tmp_path / "run", tmp_path / "hf", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    n = len(files)
    assert n >= 4 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], files
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files) and len(index["weight_map"]) == done.tensors
    sizes = {f: (tmp_path / "hf" / f).stat().st_size for f in files}
    assert index["metadata"]["total_size"] == 4 * done.params <= sum(sizes.values())
    assert not list((tmp_path / "hf").glob(".shard-*")), "no temporary file is left"
    tokens = _tokens(tokenizer_file, cfg.seq_len)
    assert _max_diff(model, tmp_path / "hf", tokens) < TOL
    if cfg.arch == "llama":
        back = dataclasses.replace(cfg, init_from=f"hf:{tmp_path / 'hf'}")
        check_init_from(back, vocab=VOCAB)
        fresh = GPT(back, vocab_size=VOCAB, init_seed=99).eval()
        with HFWeights(back) as weights:
            load_full_state_(fresh, {name: weights.read(f"model/{name}") for name, _ in fresh.named_parameters()})
        with torch.no_grad():
            assert torch.equal(fresh(tokens), model(tokens))


def test_an_export_that_cannot_be_written_leaves_the_directory_as_it_was(tokenizer_file: Path,
                                                                        tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "run", _model(dataclasses.replace(GPT_VARIANT, mlp="swiglu")), tokenizer_file)
    with pytest.raises(ConfigError, match="no Hugging Face class"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_init_from_refuses_a_model_of_another_shape_naming_each_field(
    tokenizer_file: Path, tmp_path: Path
) -> None:
    write_checkpoint(tmp_path / "run", _model(LLAMA), tokenizer_file)
    export_hf(tmp_path / "run", tmp_path / "hf")
    other = dataclasses.replace(LLAMA, d_ff=192, rope_theta=10000.0, init_from=f"hf:{tmp_path / 'hf'}")
    with pytest.raises(ConfigError) as err:
        check_init_from(other, vocab=VOCAB)
    assert "model.d_ff=176" in str(err.value) and "model.rope_theta=500000.0" in str(err.value)
    with pytest.raises(ConfigError, match="not the tokenizer the data was prepared with"):
        check_init_from(
            dataclasses.replace(LLAMA, init_from=f"hf:{tmp_path / 'hf'}"),
            vocab=VOCAB,
            tokenizer_sha256="0" * 64,
        )
    with pytest.raises(ConfigError) as err:  # Llama 3.1's RoPE scaling is read, not refused: it must match
        check_init_from(dataclasses.replace(LLAMA, init_from=f"hf:{tmp_path / 'hf'}", rope_scaling="llama3"),
                        vocab=VOCAB)
    assert "rope type 'default' but model.rope_scaling='llama3'; set model.rope_scaling=none" in str(err.value)
    export_hf(_scaled_run(tmp_path, tokenizer_file), tmp_path / "hf-scaled")
    other = dataclasses.replace(LLAMA_SCALED, rope_factor=32.0, init_from=f"hf:{tmp_path / 'hf-scaled'}")
    with pytest.raises(ConfigError) as err:
        check_init_from(other, vocab=VOCAB)
    assert "rope_scaling.factor=8.0 but model.rope_factor=32.0; set model.rope_factor=8.0" in str(err.value)
    check_init_from(dataclasses.replace(other, rope_factor=8.0), vocab=VOCAB)  # the same: accepted
    with pytest.raises(ConfigError, match=r"only model\.arch=llama"):
        check_init_from(dataclasses.replace(GPT_VARIANT, init_from=f"hf:{tmp_path / 'hf'}"), vocab=VOCAB)
    with pytest.raises(ConfigError, match=r"config\.json"):
        check_init_from(dataclasses.replace(LLAMA, init_from=f"hf:{tmp_path / 'nowhere'}"), vocab=VOCAB)


def _scaled_run(tmp_path: Path, tokenizer_file: Path) -> Path:
    write_checkpoint(tmp_path / "scaled", _model(LLAMA_SCALED), tokenizer_file)
    return tmp_path / "scaled"


def test_llama3_rope_scaling_changes_the_model_as_transformers_does(tokenizer_file: Path) -> None:
    """Against transformers' own llama3 frequencies, and the logits differ from the unscaled model's."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from farm.model.arch import RopeScaling

    head = LLAMA.d_model // LLAMA.n_heads
    inv = 1.0 / (LLAMA.rope_theta ** (torch.arange(0, head, 2, dtype=torch.int64).float() / head))
    ours = RopeScaling.of(LLAMA_SCALED).apply(inv)  # type: ignore[union-attr]
    config = LlamaConfig(hidden_size=LLAMA.d_model, num_attention_heads=LLAMA.n_heads, head_dim=head,
                         rope_parameters={"rope_type": "llama3", "rope_theta": LLAMA.rope_theta, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 256})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.equal(ours, theirs)
    assert (ours == inv).sum() == 2 and (ours == inv / 8).sum() == 5  # one frequency in between
    # Slow frequencies turn little over 32 positions, so the logits move little, but far more than
    # the export test's tolerance: a model that ignored the scaling would fail it.
    tokens = _tokens(tokenizer_file, LLAMA.seq_len)
    with torch.no_grad():
        assert float((_model(LLAMA)(tokens) - _model(LLAMA_SCALED)(tokens)).abs().max()) > 10 * TOL


def test_export_refuses_what_it_cannot_write(tokenizer_file: Path, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "run", _model(LLAMA), tokenizer_file)
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 9.*committed steps: 3"):
        export_hf(tmp_path / "run", tmp_path / "hf", step=9)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(tmp_path / "run", tmp_path / "full")
    other = tmp_path / "other.json"
    other.write_text(tokenizer_file.read_text() + " ")
    with pytest.raises(CheckpointError, match="--tokenizer"):
        export_hf(tmp_path / "run", tmp_path / "hf", tokenizer=other)
    swiglu_gpt = dataclasses.replace(GPT_VARIANT, mlp="swiglu")
    write_checkpoint(tmp_path / "run2", GPT(swiglu_gpt, vocab_size=VOCAB), tokenizer_file)
    with pytest.raises(ConfigError, match=r"model\.arch=llama"):
        export_hf(tmp_path / "run2", tmp_path / "hf2")


def test_cli_export_and_inspect_tensors(
    tokenizer_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(LLAMA)
    write_checkpoint(tmp_path / "run", model, tokenizer_file)
    assert checkpoint_cli(["export-hf", str(tmp_path / "run"), "--step", "3", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert checkpoint_cli(["inspect", str(tmp_path / "run"), "--tensors", "--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert set(listed) == {f"model/{name}" for name, _ in model.named_parameters()}
    qkv = listed["model/blocks.1.attn.qkv.weight"]
    assert qkv["shape"] == [64 + 2 * 32, 64] and qkv["dtype"] == "F32" and qkv["slices"] == 6
    assert checkpoint_cli(["inspect", str(tmp_path / "run"), "--tensors"]) == 0
    table = capsys.readouterr().out
    assert "model/blocks.1.mlp.up.weight" in table and "352x64" in table
    assert checkpoint_cli(["export-hf", str(tmp_path / "missing"), str(tmp_path / "hf3")]) == 2
    assert "does not exist" in capsys.readouterr().err
