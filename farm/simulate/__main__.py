"""``python -m farm.simulate +topology=NAME model=NAME [sim.days=54] [sim.failures=llama3]
[sim.policies=[restart,replan,spares,replan+memory]] [sim.checkpoint_every=auto] [sim.seed=0]
[sim.runs=20] [sim.output=table|json] [sim.plot=PATH.png]``

Simulates a run of sim.days on the farm under the failure rates of conf/failures/NAME.yaml, once per
seed and policy, and prints each policy's ETTR, goodput, interruptions by cause, device-hours lost by
cause and days to sim.target_tokens (mean and spread over the seeds). docs/simulator.md explains the
model, its sources and its assumptions.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from farm.errors import ConfigError


def run(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from farm.simulate.config import sim_config
    from farm.simulate.report import print_table, to_json
    from farm.simulate.study import Inputs, simulate

    cfg, raw = _compose(argv)
    sim = sim_config(raw.get("sim"))
    inputs = Inputs(topology=cfg.topology, model=cfg.model, train=cfg.train, parallel=cfg.parallel,
                    checkpoint=cfg.checkpoint, run=cfg.run, sim=sim, topology_file=raw.get("topology_file"))
    study = simulate(inputs, record=sim.plot is not None)
    if sim.plot is not None:
        from farm.simulate.plot import plot_timeline

        plot_timeline(study, sim.plot)
    if sim.output == "json":
        json.dump(to_json(study, model=cfg.model.name), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        print_table(study, model=cfg.model.name, console=Console(width=170))
        if sim.plot is not None:
            print(f"timeline of run 0 written to {sim.plot}")
    return 0


def _compose(argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """conf/simulate.yaml with the overrides; Hydra's own errors become one-line ConfigErrors."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from farm._hydra import conf_dir, to_farm_config

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            composed = compose(config_name="simulate", overrides=list(argv))
        return to_farm_config(composed)
    except (HydraException, OmegaConfBaseException) as err:
        text = str(err).split("Config search path")[0]
        raise ConfigError(" ".join(text.split())) from None


def main() -> None:
    from farm._hydra import run_cli

    run_cli(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    main()
