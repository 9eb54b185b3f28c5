"""``python -m farm.checkpoint inspect PATH``: what a checkpoint holds and whether it is sound;
``python -m farm.checkpoint export-hf RUN_DIR [--step N] OUT_DIR``: a Hugging Face model directory.

PATH is a run directory (its ``checkpoints/`` is inspected), a checkpoints root, or one step
directory. ``inspect --tensors`` also lists the newest checkpoint's tensors (name, shape, dtype).
Exit status 0 when every inspected checkpoint is valid (or the export is written), 1 when one is
not, 2 when there is nothing to inspect or the input is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from farm.checkpoint.manifest import MANIFEST, STEP_DIR_RE, Manifest, parse_manifest
from farm.checkpoint.parts import sha256_file
from farm.checkpoint.store import CheckpointStore
from farm.errors import CheckpointError, FarmError


def _file_status(path: Path, manifest: Manifest, *, full: bool) -> dict[str, str]:
    status = {}
    for name, rec in sorted(manifest.files.items()):
        file = path / name
        if not file.is_file():
            status[name] = "missing"
        elif (size := file.stat().st_size) != rec.size:
            status[name] = f"size {size}, expected {rec.size}"
        elif not full:
            status[name] = "size ok"
        else:
            status[name] = "ok" if sha256_file(file) == rec.sha256 else "checksum mismatch"
    return status


def _layout(meta: dict[str, Any]) -> dict[str, Any] | None:
    plan = meta.get("plan")
    source = plan.get("layout", plan) if isinstance(plan, dict) else meta.get("layout")
    if not isinstance(source, dict):
        return None
    layout = {k: source[k] for k in ("dp", "tp", "pp") if k in source}
    return layout or None


def summarize(path: Path, *, full: bool = True) -> dict[str, Any]:
    """A JSON-able summary of one step directory, with per-file checksum status."""
    out: dict[str, Any] = {"path": str(path), "step": None, "status": "CORRUPT", "problem": None, "files": {}}
    try:
        manifest = parse_manifest((path / MANIFEST).read_bytes())
    except (OSError, CheckpointError) as err:
        out["problem"] = f"{MANIFEST}: {err.strerror}" if isinstance(err, OSError) else str(err)
        return out
    files = _file_status(path, manifest, full=full)
    bad = {name: s for name, s in files.items() if s not in ("ok", "size ok")}
    meta = manifest.meta
    out.update(
        step=manifest.step,
        format_version=manifest.format_version,
        created=manifest.created,
        data_cursor=meta.get("data_cursor"),
        layout=_layout(meta),
        config_hash=meta.get("config_hash"),
        tokenizer_hash=meta.get("tokenizer_hash"),
        tensors=len(manifest.tensors),
        total_bytes=manifest.total_bytes,
        files=files,
        status="CORRUPT" if bad else "VALID" if full else "SIZES OK",
        problem="; ".join(f"{n}: {s}" for n, s in bad.items()) or None,
    )
    return out


def _targets(path: Path) -> list[Path]:
    if (path / MANIFEST).exists() or STEP_DIR_RE.match(path.name):
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not root.is_dir():
        raise CheckpointError(
            f"{path} does not exist; give a run directory, a checkpoints root or a step-N dir"
        )
    found = [info.path for info in CheckpointStore(root).list()]
    if not found:
        raise CheckpointError(f"no committed checkpoint (step-NNNNNNNN/) in {root}")
    return found


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _print(console: Console, summaries: list[dict[str, Any]]) -> None:
    overview = Table(title="checkpoints", show_lines=False)
    for col in ("step", "status", "data cursor", "layout", "tensors", "size", "files ok", "problem"):
        overview.add_column(col)
    for s in summaries:
        ok = sum(v in ("ok", "size ok") for v in s["files"].values())
        layout = " ".join(f"{k}={v}" for k, v in (s.get("layout") or {}).items()) or "-"
        style = "green" if s["status"] != "CORRUPT" else "red"
        overview.add_row(
            str(s["step"]),
            f"[{style}]{s['status']}[/]",
            json.dumps(s.get("data_cursor")),
            layout,
            str(s.get("tensors", "-")),
            _size(s.get("total_bytes")),
            f"{ok}/{len(s['files'])}",
            s["problem"] or "",
        )
    console.print(overview)
    last = summaries[-1]
    detail = Table(title=f"{last['path']}", show_header=False)
    for key in ("step", "format_version", "created", "config_hash", "tokenizer_hash"):
        detail.add_row(key, str(last.get(key, "-")))
    for name, status in list(last["files"].items())[:64]:
        detail.add_row(name, status)
    if len(last["files"]) > 64:
        detail.add_row("...", f"{len(last['files']) - 64} more files")
    console.print(detail)


def tensor_table(path: Path) -> list[dict[str, Any]]:
    """Every tensor of one step directory: logical name, global shape, dtype and stored slices."""
    manifest = parse_manifest((path / MANIFEST).read_bytes())
    return [
        {"name": name, "shape": list(rec.global_shape), "dtype": rec.dtype, "slices": len(rec.slices)}
        for name, rec in sorted(manifest.tensors.items())
    ]


def _print_tensors(console: Console, path: Path, rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"tensors of {path}")
    for col in ("name", "shape", "dtype", "slices"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), row["dtype"], str(row["slices"]))
    console.print(table)


def _inspect(args: argparse.Namespace) -> int:
    summaries = [summarize(p, full=not args.quick) for p in _targets(args.path)]
    valid = not any(s["status"] == "CORRUPT" for s in summaries)
    newest = Path(summaries[-1]["path"])
    tensors = tensor_table(newest) if args.tensors and summaries[-1]["step"] is not None else None
    if args.json:
        out: dict[str, Any] = {"path": str(args.path), "valid": valid, "checkpoints": summaries}
        if tensors is not None:
            out["tensors"] = tensors
        print(json.dumps(out, indent=2))
    else:
        console = Console()
        _print(console, summaries)
        if tensors is not None:
            _print_tensors(console, newest, tensors)
    return 0 if valid else 1


def _export_hf(args: argparse.Namespace) -> int:
    from farm.checkpoint.hf import export_hf

    done = export_hf(args.run_dir, args.out_dir, step=args.step, tokenizer=args.tokenizer,
                     max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(
        f"step {done.step} written to {done.out_dir} as {done.hf_class}: {done.tensors} tensors, "
        f"{done.params:,} parameters; load it with transformers' AutoModelForCausalLM.from_pretrained"
        f"({str(done.out_dir)!r}) and AutoTokenizer"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="summarise and verify checkpoints")
    inspect.add_argument("path", type=Path, help="a run directory, a checkpoints root, or one step directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--quick", action="store_true", help="check file sizes only, not sha256")
    inspect.add_argument(
        "--tensors", action="store_true", help="list the newest checkpoint's tensors: name, shape, dtype"
    )
    export = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face model directory")
    export.add_argument(
        "run_dir", type=Path, help="a run directory, a checkpoints root, or one step directory"
    )
    export.add_argument("out_dir", type=Path, help="a new or empty directory")
    export.add_argument(
        "--step", type=int, default=None, help="the step to export (default: the newest sound one)"
    )
    export.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="the run's tokenizer.json, when it is not where the run recorded it",
    )
    export.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="the largest safetensors file (GB, 2**30 bytes; default 5, as save_pretrained); a model "
        "larger than that is written in shards with model.safetensors.index.json",
    )
    args = parser.parse_args(argv)
    try:
        return _inspect(args) if args.command == "inspect" else _export_hf(args)
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
