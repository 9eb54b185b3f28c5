"""A launch refused on bad input answers before torch is imported: the checks (config, run directory,
checkpoints) need none of it, and importing torch is most of a refusal's time (docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

_REFUSE = textwrap.dedent(
    """
    import runpy, sys
    sys.argv = ["farm.launch", *sys.argv[1:]]
    try:
        runpy.run_module("farm.launch", run_name="__main__")
    except SystemExit as done:
        print("EXIT", done.code)
    print("TORCH", "torch" in sys.modules)
    """
)


def test_the_launch_and_checkpoint_modules_import_without_torch() -> None:
    code = ("import sys, farm.launch, farm.checkpoint, farm.checkpoint.resume, farm.checkpoint.hf, "
            "farm.checkpoint.store; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_a_refused_launch_never_imports_torch(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _REFUSE, "+topology=local", f"run.dir={tmp_path / 'run'}", "train.lr=-1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert "train.lr" in done.stderr, done.stderr[-2000:]
    assert "EXIT 2" in done.stdout and "TORCH False" in done.stdout, done.stdout[-2000:]
    assert not (tmp_path / "run").exists()


def test_the_lazy_names_of_the_checkpoint_package_are_its_classes() -> None:
    import farm.checkpoint as ckpt
    from farm.checkpoint.reader import CheckpointReader
    from farm.checkpoint.writer import AsyncCheckpointWriter

    assert ckpt.CheckpointReader is CheckpointReader and ckpt.AsyncCheckpointWriter is AsyncCheckpointWriter
    with pytest.raises(AttributeError, match="no attribute 'Reader'"):
        ckpt.Reader  # noqa: B018


def test_the_checkpoint_identity_is_built_without_torch_dynamo() -> None:
    """The identity is the model built on the meta device; ops there run torch's Python references,
    which import torch._dynamo (2 s), unless nothing is drawn or computed there."""
    code = textwrap.dedent(
        """
        import sys
        from farm._hydra import compose_from_argv
        from farm.launch import checkpoint_identity
        cfg, _ = compose_from_argv(["+topology=local", "model=llama-1b"])
        ident = checkpoint_identity(cfg, vocab=1024, tokenizer_hash="t", data_fingerprint="d")
        print(len(ident.tensors), "torch._dynamo" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    count, dynamo = done.stdout.split()
    assert int(count) > 10 and dynamo == "False"
