"""``python -m farm.plan +topology=NAME|PATH.yaml model=NAME [plan.output=table|json] [plan.top=N]
[plan.explain=true | --explain] [plan.check_memory=false]``

Prints the chosen layout and the next best few, with the memory breakdown per device and the
estimated step time and MFU, without starting anything. ``--explain`` puts the best layout beside the
runner-up, part by part of the step time; ``plan.check_memory=false`` estimates layouts the memory
model rejects (what-if planning of a published layout). Impossible requests exit with status 2 and a
message that names the smallest change that would fit.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from farm.errors import ConfigError
from farm.plan.render import explain, print_table, to_json
from farm.plan.search import search
from farm.plan.shape import ModelShape

CLI_DEFAULTS: dict[str, Any] = {"output": "table", "top": 5, "explain": False, "check_memory": True}


def run(argv: list[str]) -> int:
    from rich.console import Console

    from farm.topology import load_farm

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    argv = ["plan.explain=true" if a == "--explain" else a for a in argv]
    cfg, raw = _compose(argv)
    options = raw.get("plan") or {}
    output, top, why = options.get("output", "table"), options.get("top", 5), options.get("explain", False)
    if output not in ("table", "json"):
        raise ConfigError(f"plan.output={output!r}: use table or json")
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"plan.top={top!r}: use a positive integer")
    check = options.get("check_memory", True)
    for name, value in (("explain", why), ("check_memory", check)):
        if not isinstance(value, bool):
            raise ConfigError(f"plan.{name}={value!r}: use true or false")
    if why:
        top = max(top, 2)
    farm = load_farm(cfg.topology, source=raw.get("topology_file") or "topology")
    plans = search(
        model=cfg.model, train=cfg.train, parallel=cfg.parallel, farm=farm, top_k=top, check_memory=check
    )
    if output == "json":
        sys.stdout.write(json.dumps(to_json(plans)) + "\n")  # dumps: the C encoder (131k ranks)
        return 0
    params = ModelShape.from_config(cfg.model).num_params
    console = Console(width=160)
    print_table(plans, farm=farm, model_name=cfg.model.name, params=params, console=console)
    if why:
        explain(plans, console=console)
    return 0


def _compose(argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """Hydra's own errors (unknown group option, bad override) become one-line ConfigErrors."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from farm._hydra import compose_from_argv

    try:
        return compose_from_argv(argv, extra_groups={"plan": CLI_DEFAULTS})
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).split("Config search path")[0]
        raise ConfigError(" ".join(text.split())) from None


def main() -> None:
    from farm._hydra import run_cli

    run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    main()
