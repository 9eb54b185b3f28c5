"""Filling the templates of ``launchers/``: ``{{name}}`` placeholders, nothing else.

A deliberately small syntax: the templates are bash and YAML, where ``$`` and ``{}`` mean something,
and ``{{`` does not. Loops and conditions are rendered in Python and passed in as text.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from farm._hydra import launchers_dir
from farm.errors import ConfigError
from farm.queue.options import LauncherOptions

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def read_template(relative: str) -> str:
    path = launchers_dir() / relative
    try:
        return path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the launcher template ({err}); reinstall farm") from err


def fill(text: str, values: Mapping[str, object], *, source: str = "template") -> str:
    """Replace every ``{{name}}``; a name without a value is an error, not an empty string."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise ConfigError(f"{source}: no value for placeholder(s) {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def quote(value: object) -> str:
    """One shell word; None becomes the empty string."""
    return shlex.quote("" if value is None else str(value))


def exports(env: Mapping[str, str]) -> str:
    bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    if bad:
        raise ConfigError(f"launcher.env: {bad[0]!r} is not a valid environment variable name")
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def environment(options: LauncherOptions) -> str:
    """launcher.env as exports, then launcher.setup lines, for the top of a job script."""
    lines = [exports(options.env), *options.setup]
    return "\n".join(line for line in lines if line) or "# launcher.env and launcher.setup are empty"


def write(path: Path, text: str, *, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(0o755)
