"""Hydra plumbing shared by the entry points (launch, plan, submit). Nothing else imports Hydra.

Config roots: a source checkout (or an editable install) reads ``conf/`` and ``topologies/`` from
the repository's top level; an installed wheel carries them in ``farm/_bundled/``. Topologies are
registered as the Hydra group ``topology`` in the ConfigStore at import, so ``+topology=NAME`` works
from any working directory without a cwd-relative search path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from farm.config import FarmConfig, from_container
from farm.errors import ConfigError, FarmError, Preempted, TopologyError
from farm.yamlload import DuplicateKeyError, load_yaml

_PACKAGE = Path(__file__).resolve().parent


def _root(name: str) -> Path:
    source = _PACKAGE.parent / name
    if source.is_dir():
        return source
    return _PACKAGE / "_bundled" / name


def conf_dir() -> Path:
    return _root("conf")


def topologies_dir() -> Path:
    return _root("topologies")


def launchers_dir() -> Path:
    return _root("launchers")


def available_topologies() -> list[str]:
    return sorted(p.stem for p in topologies_dir().glob("*.yaml"))


def _register_topology(path: Path, name: str) -> None:
    try:
        node = load_yaml(path.read_text(), source=str(path))
    except DuplicateKeyError as err:
        node = {"_error": str(err)}
    except yaml.YAMLError as err:
        # Keep the name selectable so the user gets this message, not "not found".
        node = {"_error": f"{path}: not valid YAML: {err}"}
    if not isinstance(node, dict):
        node = {"_error": f"{path}: expected a mapping of topology fields, got {type(node).__name__}"}
    if not node.get("name"):  # a farm file without a name (or with an empty one) is named by its stem
        node["name"] = path.stem
    node["_file"] = str(path)
    ConfigStore.instance().store(group="topology", name=name, node=OmegaConf.create(node))


def _register_topologies() -> None:
    for path in sorted(topologies_dir().glob("*.yaml")):
        _register_topology(path, path.stem)


_register_topologies()


def topology_files(argv: list[str]) -> list[str]:
    """``+topology=path/to/farm.yaml`` selects a farm file outside topologies/: it is registered under
    a name of its own and the override rewritten to that name. Other arguments pass unchanged."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "topology" and value.endswith((".yaml", ".yml")):
            path = Path(value).expanduser()
            if not path.is_file():
                raise TopologyError(f"+topology={value}: no such file (from {Path.cwd()})")
            digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
            name = f"file-{path.stem}-{digest}"  # a group option name holds no '/'
            _register_topology(path.resolve(), name)
            arg = f"{key}={name}"
        out.append(arg)
    return out


def _no_topology_message() -> str:
    return (
        "no farm given: add +topology=NAME with NAME one of "
        f"{', '.join(available_topologies())}, or +topology=path/to/farm.yaml "
        "(docs/topologies.md; hydra.searchpath adds directories of farms)"
    )


def _topology_choice(overrides: list[str] | None) -> str | None:
    """The option name the topology was selected by (a farm file found on hydra.searchpath is named by
    its stem, which is this name)."""
    if overrides is not None:
        names = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "topology"]
        return names[-1] if names else None
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get("topology")
    return None if choice is None else str(choice)


def to_farm_config(cfg: DictConfig, *, overrides: list[str] | None = None) -> tuple[FarmConfig, dict[str, Any]]:
    """Resolve a composed DictConfig into the typed config plus the raw mapping (for CLI-only keys)."""
    topology = cfg.get("topology")
    if topology is None:
        raise ConfigError(_no_topology_message())
    if "_error" in topology:
        raise TopologyError(str(topology["_error"]))
    if not topology.get("name"):
        name = _topology_choice(overrides)
        if name is None:
            raise TopologyError("the topology has no name: add `name: NAME` to its file")
        with open_dict(cfg):
            cfg.topology.name = Path(name).stem
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    raw: dict[str, Any] = {str(k): v for k, v in container.items()}
    if isinstance(raw.get("topology"), dict):
        # The file a topology came from is for messages only; the farm itself does not carry it.
        raw["topology_file"] = raw["topology"].pop("_file", None)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise FarmError(f"required field(s) not set: {', '.join(missing)}; give them on the command line")
    return from_container(raw), raw


def compose_from_argv(
    argv: list[str], *, extra_groups: dict[str, dict[str, Any]] | None = None
) -> tuple[FarmConfig, dict[str, Any]]:
    """Compose conf/config.yaml with command-line overrides, without Hydra's run directory handling.

    ``extra_groups`` adds CLI-only sections (e.g. ``{"plan": {"output": "table"}}``) so that overrides
    such as ``plan.output=json`` are accepted.
    """
    from hydra import compose, initialize_config_dir

    check_conf_files([])
    overrides = topology_files(list(argv))
    for name, defaults in (extra_groups or {}).items():
        given = [o for o in overrides if o.startswith(f"{name}.")]
        overrides = [o for o in overrides if not o.startswith(f"{name}.")]
        overrides += [f"+{name}.{k}={v}" for k, v in defaults.items() if not _overridden(given, name, k)]
        overrides += [f"+{o}" for o in given]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_farm_config(cfg, overrides=overrides)


def _overridden(given: list[str], name: str, key: str) -> bool:
    return any(o.split("=", 1)[0] == f"{name}.{key}" for o in given)


def run_cli(fn: Callable[[], int | None]) -> None:
    """Run an entry point: FarmErrors become one clear message and an exit code, not a traceback."""
    try:
        code = fn()
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def check_conf_files(argv: list[str]) -> None:
    """Refuse a key given twice in conf/ (or a --config-dir) with one line naming both, before Hydra
    composes: OmegaConf refuses it too, but as a traceback."""
    roots = [conf_dir()]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            roots.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            roots.append(Path(arg.split("=", 1)[1]))
    for root in roots:
        for path in sorted(root.rglob("*.yaml")):
            try:
                load_yaml(path.read_text(), source=str(path))
            except DuplicateKeyError as err:
                raise ConfigError(str(err)) from None
            except (OSError, yaml.YAMLError):
                continue  # Hydra reports what it cannot read when it composes


def hydra_entry(task: Callable[[DictConfig], int | None]) -> Callable[[], None]:
    """Wrap ``task(cfg)`` as a Hydra app whose FarmErrors print cleanly (--cfg, --info and -m work)."""
    import hydra

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _app(cfg: DictConfig) -> None:
        try:
            code = task(cfg)
        except FarmError as err:
            # A stop that a signal asked for is no error, though its exit code says "unfinished".
            print(f"{'' if isinstance(err, Preempted) else 'error: '}{err}", file=sys.stderr)
            sys.exit(err.exit_code)
        if code:
            sys.exit(code)

    @functools.wraps(task)
    def main() -> None:
        try:
            sys.argv[1:] = topology_files(sys.argv[1:])
            check_conf_files(sys.argv[1:])
        except FarmError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)
        sweep = SweepRecords.begin(sys.argv[1:]) if {"-m", "--multirun"} & set(sys.argv[1:]) else None
        try:
            _app()
        except KeyboardInterrupt:  # Ctrl-C before or after training (the controller handles it during)
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            if sweep is not None:
                sweep.end()

    return main


SWEEP_RECORD = "multirun.yaml"
_sweep_accepted = False


def note_sweep_accepted() -> None:
    """A job of the running sweep was accepted: the sweep's multirun.yaml is kept."""
    global _sweep_accepted
    _sweep_accepted = True


def _single_run_overrides(argv: list[str]) -> list[str]:
    """The command line's overrides with each sweep (a,b / range / choice) cut to its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    out = []
    for arg, override in zip(args, OverridesParser.create().parse_overrides(args)):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            out.append(f"{arg.split('=', 1)[0]}={first}")
        else:
            out.append(arg)
    return out


class SweepRecords:
    """Keeps the multirun.yaml of earlier sweeps into the same directory.

    Hydra writes ``SWEEP_DIR/multirun.yaml`` when a sweep starts, over any earlier sweep's. The earlier
    one is moved aside for the sweep's duration and put back after it; this sweep's goes to the next
    free ``multirun-N.yaml``, and only if one of its jobs was accepted (a refused sweep leaves none).
    """

    def __init__(self, sweep_dir: Path) -> None:
        self.dir = sweep_dir
        self.record = sweep_dir / SWEEP_RECORD
        self.kept: Path | None = None

    @classmethod
    def begin(cls, argv: list[str]) -> SweepRecords | None:
        from hydra import compose, initialize_config_dir

        global _sweep_accepted
        _sweep_accepted = False
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = compose(config_name="config", overrides=_single_run_overrides(argv), return_hydra_config=True)
            sweep_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")))
        except Exception:  # Hydra reports a bad command line itself when the sweep starts
            return None
        records = cls(sweep_dir)
        if records.record.exists():
            records.kept = sweep_dir / f".{SWEEP_RECORD}.{os.getpid()}"
            os.replace(records.record, records.kept)
        return records

    def end(self) -> None:
        written = self.record if self.record.exists() else None
        if written is not None and self.kept is not None:
            if _sweep_accepted:
                n = 2
                while (self.dir / f"multirun-{n}.yaml").exists():
                    n += 1
                os.replace(written, self.dir / f"multirun-{n}.yaml")
            else:
                written.unlink()
        elif written is not None and not _sweep_accepted:
            written.unlink()
        if self.kept is not None:
            os.replace(self.kept, self.record)
        # Hydra makes each job's directory before the job runs; a refused job leaves it empty.
        for job in (*sorted(self.dir.glob("[0-9]*")), self.dir):
            with contextlib.suppress(OSError):
                job.rmdir()
