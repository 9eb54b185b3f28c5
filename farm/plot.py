"""``python -m farm.plot RUN_DIR [-o PNG]``: loss, lr, tokens/s and devices in use against step.

Resumes, failures, re-plans, recoveries, rejoins and checkpoints are marked; the picture is drawn
from RUN_DIR's metrics.jsonl and events.jsonl alone, so it works on a live run too. The default
output is RUN_DIR/run.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from farm.errors import FarmError
from farm.tracking.plot import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run.dir of a launch")
    parser.add_argument("-o", "--output", help="PNG to write (default RUN_DIR/run.png)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        if not run_dir.is_dir():
            raise FarmError(f"{run_dir} is not a directory; give the run.dir of a launch")
        out = plot_run(run_dir, args.output or run_dir / "run.png")
    except FarmError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(out)
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
