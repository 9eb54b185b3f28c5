"""``python -m farm.checkpoint inspect PATH``: what a checkpoint holds and whether it is sound.

PATH is a run directory (its ``checkpoints/`` is inspected), a checkpoints root, or one step
directory. Exit status 0 when every inspected checkpoint is valid, 1 when one is not, 2 when there
is nothing to inspect.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="summarise and verify checkpoints")
    inspect.add_argument("path", type=Path, help="a run directory, a checkpoints root, or one step directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--quick", action="store_true", help="check file sizes only, not sha256")
    args = parser.parse_args(argv)
    try:
        summaries = [summarize(p, full=not args.quick) for p in _targets(args.path)]
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    valid = not any(s["status"] == "CORRUPT" for s in summaries)
    if args.json:
        print(json.dumps({"path": str(args.path), "valid": valid, "checkpoints": summaries}, indent=2))
    else:
        _print(Console(), summaries)
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
