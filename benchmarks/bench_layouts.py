"""Step time per (dp, tp, pp) layout on this machine, and the runtime's overhead at (1,1,1) against a
plain single-process loop over the same model and batch (target: farm / plain <= 1.05).

    python benchmarks/bench_layouts.py [--quick] [--steps 15] [--rounds 2] [--data-dir DIR]

Every layout trains the same model (gpt-tiny at seq_len 64), global batch 16 in micro-batches of 4,
through `python -m farm.launch`: (1,1,1), (2,1,1), (1,2,1), (1,1,2) on `local` (1 node x 2 emulated
devices) and, without --quick, (2,2,1), (1,2,2), (2,1,2) on `local-farm` (3 nodes x 2). The step time is
the one farm's driver records in metrics.jsonl (Ray round trip included); the first 3 steps of each run
are left out and the median is taken over the rest of every round. The loss at the last step must be the
same in every layout up to floating-point reduction order: its largest relative difference to (1,1,1) is
printed as a sanity check.

The plain loop runs in this process: farm's GPT with the same ModelConfig, vocabulary and initial
weights, torch.optim.AdamW with the same hyper-parameters and LR schedule, the same samples in the same
order read from the Arrow shards with pyarrow, gradient accumulation over micro-batches of 4 and gradient
clipping, with as many torch threads as farm gives one emulated device. Each round runs the plain loop,
then farm at (1,1,1), then the other layouts, so the machine's noise hits both sides alike. A farm run
that fails (Ray's start-up can time out on a loaded machine) is tried once more, then shown as failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from farm._hydra import compose_from_argv
from farm.config import DataConfig, FarmConfig
from farm.data import GlobalOrder, Manifest, load_manifest, prepare
from farm.runtime.engine import lr_at
from farm.runtime.model import GPT, padded_vocab

SKIP = 3
"""Steps left out of each run's median: Ray/DeepSpeed warm-up and the allocator's first passes."""
COMMON = ["model=gpt-tiny", "model.seq_len=64", "train.global_batch=16", "parallel.micro_batch=4",
          "checkpoint.every=0", "tracking.wandb=false", "tracking.console=false"]


@dataclass(frozen=True)
class Layout:
    topology: str
    dp: int
    tp: int
    pp: int

    @property
    def label(self) -> str:
        return f"({self.dp},{self.tp},{self.pp})"

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp

    def overrides(self) -> list[str]:
        return [f"+topology={self.topology}", f"parallel.dp={self.dp}", f"parallel.tp={self.tp}",
                f"parallel.pp={self.pp}"]


LOCAL = [Layout("local", 1, 1, 1), Layout("local", 2, 1, 1), Layout("local", 1, 2, 1), Layout("local", 1, 1, 2)]
FARM = [Layout("local-farm", 2, 2, 1), Layout("local-farm", 1, 2, 2), Layout("local-farm", 2, 1, 2)]


@dataclass(frozen=True)
class RunResult:
    times: list[float]
    """Step times after the first SKIP steps, in seconds."""
    loss: float
    """Loss at the last step."""


def worker_threads(*, world: int) -> int:
    """Torch threads of one emulated device: the rule of farm/controller/worker_group.py."""
    return max(1, (os.cpu_count() or 1) // world)


def farm_run(layout: Layout, *, data: Path, work: Path, steps: int, tag: str) -> RunResult | str:
    """One `farm.launch` run; its result, or the tail of its error output when it failed."""
    run_dir = work / f"farm-{layout.topology}-{layout.dp}{layout.tp}{layout.pp}-{tag}"
    argv = [sys.executable, "-m", "farm.launch", *layout.overrides(), *COMMON, f"data.dir={data}",
            f"train.steps={steps}", f"run.dir={run_dir}"]
    # A private Ray temp dir per run: Ray joins the cluster named in <temp dir>/ray_current_cluster when
    # asked to start one, so another Ray cluster on this machine must not be found there.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=work, check=False,
                              env=dict(os.environ, RAY_TMPDIR=ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"exit {proc.returncode}: {' | '.join(tail)}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return RunResult(times=[r["step_time_s"] for r in rows[SKIP:]], loss=float(rows[-1]["loss"]))


def load_rows(data: Path, manifest: Manifest) -> np.ndarray:
    """Every packed row of every shard, in global row order, as int64 (rows, seq_len + 1)."""
    parts = []
    for shard in manifest.shards:
        with pa.memory_map(str(data / shard.file), "r") as source:
            column = pa.ipc.open_file(source).read_all().column(0).combine_chunks()
            values = column.flatten().to_numpy(zero_copy_only=False)
            parts.append(values.reshape(len(column), manifest.row_len).astype(np.int64))
    return np.concatenate(parts)


def plain_run(cfg: FarmConfig, *, rows: np.ndarray, order: GlobalOrder, vocab: int, steps: int,
              threads: int) -> RunResult:
    """The same training as farm at (1,1,1), written as the shortest loop that does it."""
    train, micro = cfg.train, 4
    accum = train.global_batch // micro
    torch.set_num_threads(threads)
    model = GPT(cfg.model, vocab_size=vocab, init_seed=train.seed)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    decay_steps = train.lr_decay_steps or train.steps  # as farm/rundir.py fixes it for a new run
    times, loss = [], math.nan
    for step in range(steps):
        ids = order.sample_ids(step * train.global_batch, train.global_batch)
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train=train, decay_steps=decay_steps)
        total = 0.0
        for a in range(accum):
            batch = torch.from_numpy(rows[ids[a * micro:(a + 1) * micro]])
            micro_loss = model(batch[:, :-1], batch[:, 1:])
            (micro_loss / accum).backward()
            total += float(micro_loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        loss = total / accum
    return RunResult(times=times[SKIP:], loss=loss)


def run_rounds(layouts: list[Layout], *, cfg: FarmConfig, data: Path, work: Path, steps: int,
               rounds: int) -> tuple[dict[Layout, list[RunResult | str]], list[RunResult]]:
    manifest = load_manifest(data, verify=False)
    rows = load_rows(data, manifest)
    order = GlobalOrder(manifest.total_rows, cfg.train.seed, manifest.fingerprint)
    vocab = padded_vocab(cfg.model, manifest.vocab_size)
    threads = worker_threads(world=1)
    farm: dict[Layout, list[RunResult | str]] = {layout: [] for layout in layouts}
    plain: list[RunResult] = []
    for n in range(rounds):
        plain.append(plain_run(cfg, rows=rows, order=order, vocab=vocab, steps=steps, threads=threads))
        print(f"round {n}: plain loop {statistics.median(plain[-1].times) * 1e3:.1f} ms/step", flush=True)
        for layout in layouts:
            result = farm_run(layout, data=data, work=work, steps=steps, tag=str(n))
            if isinstance(result, str):  # e.g. Ray's start-up timing out on a loaded machine: one retry
                print(f"round {n}: {layout.topology:10s} {layout.label} {result}; retrying", flush=True)
                result = farm_run(layout, data=data, work=work, steps=steps, tag=f"{n}-retry")
            farm[layout].append(result)
            shown = f"{statistics.median(result.times) * 1e3:.1f} ms/step" if isinstance(result, RunResult) else result
            print(f"round {n}: {layout.topology:10s} {layout.label} {shown}", flush=True)
    return farm, plain


def report(farm: dict[Layout, list[RunResult | str]], plain: list[RunResult], *, steps: int, threads: int) -> None:
    ok = {layout: [r for r in results if isinstance(r, RunResult)] for layout, results in farm.items()}
    base_layout = next(iter(farm))
    base = statistics.median(t for r in ok[base_layout] for t in r.times) if ok[base_layout] else math.nan
    base_loss = ok[base_layout][0].loss if ok[base_layout] else math.nan
    print(f"\n{'layout':9s} {'topology':11s} {'devices':>7s} {'median step ms':>15s} {'vs (1,1,1)':>10s} "
          f"{f'loss @ {steps}':>12s}")
    worst = 0.0
    for layout, results in ok.items():
        if not results:
            failed = next(r for r in farm[layout] if isinstance(r, str))
            print(f"{layout.label:9s} {layout.topology:11s} {layout.devices:7d}  failed: {failed}")
            continue
        med = statistics.median(t for r in results for t in r.times)
        worst = max([worst, *(abs(r.loss - base_loss) / abs(base_loss) for r in results)])
        print(f"{layout.label:9s} {layout.topology:11s} {layout.devices:7d} {med * 1e3:15.1f} {med / base:10.2f} "
              f"{results[0].loss:12.6f}")
    print(f"max relative difference of the last loss to (1,1,1): {worst:.2e} (sanity check, not asserted)")
    plain_med = statistics.median(t for r in plain for t in r.times)
    ratio = base / plain_med
    print(f"\noverhead at (1,1,1), {len(plain)} rounds interleaved, {len(plain[0].times)} timed steps each:")
    print(f"  farm.launch (1,1,1) median step {base * 1e3:8.1f} ms  (driver-measured: Ray round trip and "
          "DeepSpeed ZeRO-1 step included)")
    print(f"  plain loop          median step {plain_med * 1e3:8.1f} ms  (torch threads: {threads})")
    print(f"  ratio farm / plain = {ratio:.3f}  (target <= 1.05)")
    print(f"  plain loop loss @ {steps}: {plain[0].loss:.6f} (farm (1,1,1): {base_loss:.6f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the layouts of the `local` topology")
    parser.add_argument("--steps", type=int, default=15, help="optimizer steps per run (the first 3 are not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (plain loop, every layout)")
    parser.add_argument("--data-dir", type=Path, default=None, help="a prepared data set at seq_len 64")
    args = parser.parse_args()
    if args.steps <= SKIP + 1 or args.rounds < 1:
        parser.error(f"--steps must be > {SKIP + 1} and --rounds >= 1")
    layouts = LOCAL if args.quick else LOCAL + FARM
    with tempfile.TemporaryDirectory(prefix="bench-layouts-") as tmp:
        work = Path(tmp)
        data = (args.data_dir or work / "data").resolve()
        if not (data / "manifest.json").exists():
            prepare(DataConfig(dir=str(data), vocab_size=1024, seq_len=64, max_bytes=3_000_000), progress=False)
        cfg, _ = compose_from_argv(["+topology=local", *COMMON, f"data.dir={data}", f"train.steps={args.steps}"])
        farm, plain = run_rounds(layouts, cfg=cfg, data=data, work=work, steps=args.steps, rounds=args.rounds)
        report(farm, plain, steps=args.steps, threads=worker_threads(world=1))


if __name__ == "__main__":
    main()
