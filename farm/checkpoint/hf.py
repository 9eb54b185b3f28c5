"""Hugging Face model directories in and out of farm: export a checkpoint, start a run from one.

``export_hf`` reads the logical tensors of one checkpoint (any layout wrote it: the reader gathers
the slices) and writes ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
``tokenizer_config.json``, which ``transformers`` loads with AutoModelForCausalLM and AutoTokenizer.
``HFWeights`` reads such a directory back as farm's logical tensors, for ``model.init_from=hf:PATH``.
The tensor maps are farm/model/hf.py; docs/huggingface.md is the user's guide.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from farm.checkpoint.manifest import STEP_DIR_RE, step_dir_name
from farm.checkpoint.parts import sha256_file
from farm.checkpoint.store import CheckpointInfo, CheckpointStore, open_checkpoint
from farm.config import ModelConfig
from farm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch, which the launch's checks before training do not need
    import torch

    from farm.checkpoint.reader import CheckpointReader, Index
    from farm.model.hf import TokenIds

HF_PREFIX = "hf:"
MODEL_CONFIG_KEY = "model_config"
"""Key of the model config (vocab_size as padded) in a checkpoint's meta."""
TOKENIZER_KEY = "tokenizer_file"
"""Key of the tokenizer.json path the run trained with, in a checkpoint's meta."""


@dataclass(frozen=True)
class Exported:
    step: int
    out_dir: Path
    hf_class: str
    tensors: int
    params: int


def model_config_from(raw: dict[str, Any], *, where: str) -> ModelConfig:
    """A ModelConfig from a checkpoint's (or a .hydra config's) mapping; unknown keys are ignored so
    a newer farm reads an older checkpoint."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in known})
    except TypeError as err:
        raise CheckpointError(f"{where}: the model config cannot be read ({err})") from err


def _step_dir(path: Path, step: int | None) -> CheckpointInfo:
    """The checkpoint to read: PATH itself when it is a step dir, else step N or the newest sound one."""
    if STEP_DIR_RE.match(path.name) and (path / "manifest.json").exists():
        return CheckpointInfo(-1, path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise CheckpointError(
            f"{path} does not exist; give a run directory, a checkpoints root or a step dir"
        )
    store = CheckpointStore(root)
    if step is not None:
        found = root / step_dir_name(step)
        if not found.is_dir():
            steps = ", ".join(str(i.step) for i in store.list()) or "none"
            raise CheckpointError(
                f"{root} has no checkpoint at step {step} (committed steps: {steps}); "
                "pick one of them with --step"
            )
        return CheckpointInfo(step, found)
    info = store.latest_valid()
    if info is None:
        raise CheckpointError(f"no sound committed checkpoint (step-NNNNNNNN/) in {root}")
    return info


def _run_dir_of(step_dir: Path) -> Path:
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def _hydra_section(step_dir: Path, section: str) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    path = _run_dir_of(step_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    value = raw.get(section) if isinstance(raw, dict) else None
    return value if isinstance(value, dict) else None


def checkpoint_model(reader: CheckpointReader) -> tuple[ModelConfig, int]:
    """The model config and padded vocabulary of a checkpoint: from its meta, else from the run's
    .hydra/config.yaml (checkpoints written before the meta carried it)."""
    raw = reader.meta.get(MODEL_CONFIG_KEY) or _hydra_section(reader.path, "model")
    if raw is None:
        raise CheckpointError(
            f"checkpoint {reader.path} does not say which model it holds (no {MODEL_CONFIG_KEY!r} in its "
            "manifest, no .hydra/config.yaml in its run directory)"
        )
    cfg = model_config_from(raw, where=str(reader.path))
    vocab = int(reader.global_shape("model/embed.weight")[0])
    return cfg, vocab


def _tokenizer_file(reader: CheckpointReader, given: Path | None) -> Path:
    """The run's tokenizer.json, checked against the hash the checkpoint recorded."""
    candidates: list[Path] = [given] if given is not None else []
    if given is None:
        if reader.meta.get(TOKENIZER_KEY):
            candidates.append(Path(reader.meta[TOKENIZER_KEY]))
        data = _hydra_section(reader.path, "data") or {}
        if data.get("dir"):
            candidates += [
                Path(data["dir"]) / "tokenizer.json",
                _run_dir_of(reader.path).parent / data["dir"] / "tokenizer.json",
            ]
    want = reader.meta.get("tokenizer_hash")
    for path in candidates:
        if path.is_file():
            if want and sha256_file(path) != want:
                raise CheckpointError(
                    f"{path} is not the tokenizer this checkpoint was trained with (its sha256 differs from "
                    f"the recorded {want[:12]}...); give the right one with --tokenizer PATH"
                )
            return path
    tried = ", ".join(str(p) for p in candidates) or "nothing recorded"
    raise CheckpointError(
        f"the run's tokenizer.json was not found (tried {tried}); give it with --tokenizer PATH"
    )


def _token_ids(tokenizer: Path) -> tuple[TokenIds, str]:
    from farm.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(tokenizer)
    eos = loaded.tokenizer.id_to_token(loaded.eos_id) or ""  # load_tokenizer found it by name
    from farm.model.hf import TokenIds

    return TokenIds(bos=loaded.eos_id, eos=loaded.eos_id), eos


def _tokenizer_config(eos: str, seq_len: int) -> dict[str, Any]:
    # farm's documents are separated by the end-of-document token only; it doubles as bos.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": None,
        "pad_token": None,
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }


DEFAULT_SHARD_BYTES = 5 * 2**30
"""Hugging Face's own default shard size (5 GB, as ``save_pretrained`` writes)."""


def export_hf(
    path: Path, out_dir: Path, *, step: int | None = None, tokenizer: Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Exported:
    """Write the checkpoint at ``path`` (run dir, checkpoints root or step dir) as an HF model directory.

    Tensors are converted and written one shard at a time (``model-0000i-of-0000N.safetensors`` and
    ``model.safetensors.index.json``, as ``save_pretrained`` names them; one ``model.safetensors``
    when the model fits in one shard), so the export holds about a shard in memory, not the model.
    """
    if max_shard_bytes <= 0:
        raise ConfigError(f"max shard size {max_shard_bytes}: must be positive")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} is not empty; export into a new or empty directory")
    with open_checkpoint(_step_dir(path, step), verify=True) as reader:
        cfg, vocab = checkpoint_model(reader)
        tok_file = _tokenizer_file(reader, tokenizer)
        ids, eos = _token_ids(tok_file)
        from farm.model.hf import mapping

        hf = mapping(cfg.arch)

        def get(name: str) -> torch.Tensor:
            return reader.read(f"model/{name}")

        config = hf.config(cfg, vocab=vocab, ids=ids)
        tensors = hf.to_hf(cfg, get)
        first = next(tensors)  # a model the mapping cannot export is refused before anything is written
        made = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            count, params = _write_shards(out_dir, itertools.chain([first], tensors), max_shard_bytes)
        except BaseException:
            for written in out_dir.iterdir():  # the directory was empty: only this export's files
                written.unlink()
            if made:
                out_dir.rmdir()
            raise
        done_step = reader.step
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(tok_file, out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(eos, cfg.seq_len), indent=2) + "\n"
    )
    return Exported(done_step, out_dir, hf.hf_class, count, params)


def _write_shards(
    out_dir: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_bytes: int
) -> tuple[int, int]:
    """Write ``tensors`` in shards of at most ``max_bytes`` (a bigger tensor gets one of its own);
    returns the tensor and parameter counts."""
    from safetensors.torch import save_file

    shards: list[dict[str, str]] = []  # per shard: tensor name -> its temporary file
    current: dict[str, torch.Tensor] = {}
    size = count = params = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f".shard-{len(shards):05d}.tmp"
            save_file(current, str(out_dir / name), metadata={"format": "pt"})
            shards.append(dict.fromkeys(current, name))
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        current[name] = tensor
        size += nbytes
        total += nbytes
        count += 1
        params += tensor.numel()
    flush()
    if len(shards) == 1:
        (out_dir / next(iter(shards[0].values()))).rename(out_dir / "model.safetensors")
        return count, params
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / next(iter(shard.values()))).rename(out_dir / final)
        weight_map |= dict.fromkeys(shard, final)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return count, params


# -- model.init_from=hf:PATH ---------------------------------------------------------------------


def hf_path(init_from: str) -> Path:
    if not init_from.startswith(HF_PREFIX):
        raise ConfigError(f"model.init_from={init_from!r}: use hf:PATH, a Hugging Face model directory")
    return Path(init_from[len(HF_PREFIX) :])


def _read_hf_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text())
    except OSError as err:
        raise ConfigError(
            f"model.init_from: {file}: {err.strerror}; give a Hugging Face model directory"
        ) from err
    except ValueError as err:
        raise ConfigError(f"model.init_from: {file} is not JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"model.init_from: {file} holds no JSON object")
    return raw


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConfigError(
        f"model.init_from: {path} has no model.safetensors (or .index.json); "
        "only safetensors weights are read (no pickles)"
    )


def check_init_from(cfg: ModelConfig, *, vocab: int, tokenizer_sha256: str | None = None) -> Path:
    """Refuse, naming each field, an HF directory that does not fit this model or this data."""
    assert cfg.init_from is not None
    path = hf_path(cfg.init_from)
    from farm.model.hf import mapping

    hf = mapping(cfg.arch)
    if hf.from_hf is None or hf.problems is None:
        raise ConfigError(
            f"model.init_from: model.arch={cfg.arch} cannot start from a Hugging Face model "
            "(only model.arch=llama maps onto one exactly)"
        )
    problems = hf.problems(cfg, vocab=vocab, hf=_read_hf_config(path))
    if problems:
        raise ConfigError(
            f"model.init_from: {path}/config.json does not fit this model: " + "; ".join(problems)
        )
    _weight_files(path)
    tok = path / "tokenizer.json"
    if tokenizer_sha256 and tok.is_file() and sha256_file(tok) != tokenizer_sha256:
        raise ConfigError(
            f"model.init_from: {tok} is not the tokenizer the data was prepared with; prepare the data "
            f"with data.tokenizer={tok} (and a new data.dir) so the token ids mean the same"
        )
    return path


class HFWeights:
    """farm's logical ``model/...`` tensors read from an HF directory; ``read(name, index)`` as the
    checkpoint reader's, so the engine loads them into any layout the same way."""

    def __init__(self, cfg: ModelConfig) -> None:
        from safetensors import safe_open

        assert cfg.init_from is not None
        path = hf_path(cfg.init_from)
        from farm.model.hf import mapping

        hf = mapping(cfg.arch)
        assert hf.from_hf is not None
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in _weight_files(path)]
        where = {name: h for h in self._handles for name in h.keys()}  # noqa: SIM118 - no __iter__

        def get(name: str) -> torch.Tensor:
            if name not in where:
                raise ConfigError(f"model.init_from: {path} has no tensor {name!r}")
            return where[name].get_tensor(name)

        # Whole tensors, once: each rank then cuts its own shards out of them.
        self._full = hf.from_hf(cfg, get)

    def read(self, name: str, index: Index = None) -> torch.Tensor:
        key = name.removeprefix("model/")
        if key not in self._full:
            raise CheckpointError(f"model.init_from: no tensor for {name!r} in the Hugging Face model")
        full = self._full[key].float()
        return full if index is None else full[index]

    def close(self) -> None:
        self._full.clear()
        self._handles.clear()

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
