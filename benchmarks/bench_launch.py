"""Step time of `farm.launch` (Ray + DeepSpeed, DP=2) against a plain torchrun + DeepSpeed loop.

Same model (gpt-tiny), batch (32 x 128 tokens), shards and DeepSpeed config; the rounds alternate
(farm, plain, farm, plain, ...) so the machine's noise hits both alike. farm's step time is measured
by the driver around each step (Ray round trip included). Prints the medians and their ratio
(target: farm / plain <= 1.05).

    python benchmarks/bench_launch.py [--steps 30] [--rounds 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def farm_round(data: Path, work: Path, steps: int, n: int) -> float:
    run_dir = work / f"farm-{n}"
    subprocess.run([sys.executable, "-m", "farm.launch", "+topology=local", f"data.dir={data}", "parallel.dp=2",
                    "parallel.micro_batch=4", f"train.steps={steps}", "checkpoint.every=0", "tracking.wandb=false",
                    "tracking.console=false", f"run.dir={run_dir}"], check=True, capture_output=True, cwd=work)
    times = [json.loads(line)["step_time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(times[3:])


def plain_round(data: Path, work: Path, steps: int, n: int, vocab: int) -> float:
    out = work / f"plain-{n}.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    "--master_port=29517", str(HERE / "plain_deepspeed.py"), "--data", str(data), "--steps",
                    str(steps), "--vocab", str(vocab), "--out", str(out)], check=True, capture_output=True, env=env)
    return float(json.loads(out.read_text())["median"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    from farm.config import DataConfig, ModelConfig
    from farm.data import load_manifest, prepare
    from farm.runtime.model import padded_vocab

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data_dir or work / "data"
        if not (data / "manifest.json").exists():
            prepare(DataConfig(dir=str(data), max_bytes=6_000_000), progress=False)
        vocab = padded_vocab(ModelConfig(), load_manifest(data, verify=False).vocab_size)
        farm_t, plain_t = [], []
        for n in range(args.rounds):
            farm_t.append(farm_round(data, work, args.steps, n))
            plain_t.append(plain_round(data, work, args.steps, n, vocab))
            print(f"round {n}: farm {farm_t[-1] * 1e3:.1f} ms/step, plain {plain_t[-1] * 1e3:.1f} ms/step", flush=True)
        f, p = statistics.median(farm_t), statistics.median(plain_t)
        print(f"farm.launch DP=2   median step {f * 1e3:8.1f} ms")
        print(f"torchrun+DeepSpeed median step {p * 1e3:8.1f} ms")
        print(f"ratio farm / plain = {f / p:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
