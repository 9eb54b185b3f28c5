"""The baseline for bench_launch.py: a plain torchrun + DeepSpeed data-parallel loop.

Same model (farm's GPT), same DeepSpeed config, same shards read with pyarrow, no Ray, no
orchestration. Run by bench_launch.py as
``torchrun --nproc_per_node=2 benchmarks/plain_deepspeed.py --data DIR --steps N --out FILE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def load_rows(data_dir: str) -> np.ndarray:
    manifest = json.loads(Path(data_dir, "manifest.json").read_text())
    parts = []
    for shard in manifest["shards"]:
        with pa.memory_map(os.path.join(data_dir, shard["file"])) as source:
            table = pa.ipc.open_file(source).read_all()
        col = table.column("tokens").combine_chunks()
        parts.append(col.values.to_numpy().reshape(len(col), -1).astype(np.int64))
    return np.concatenate(parts)


def main() -> None:
    import deepspeed

    from farm.config import ModelConfig
    from farm.runtime.model import GPT

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    deepspeed.utils.logger.setLevel(logging.WARNING)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rows = load_rows(args.data)
    torch.manual_seed(1234)
    model = GPT(ModelConfig(seq_len=rows.shape[1] - 1), vocab_size=args.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    accum = args.global_batch // (args.micro_batch * world)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, dist_init_required=False, config={
        "train_batch_size": args.global_batch, "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": accum, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1})
    order = np.random.default_rng(1234).permutation(len(rows))
    times = []
    for step in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        for a in range(accum):
            first = step * args.global_batch + (a * world + rank) * args.micro_batch
            batch = torch.from_numpy(rows[order[first:first + args.micro_batch] % len(rows)])
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            engine.step()
        total = loss.detach().double()
        dist.all_reduce(total)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_times": times, "median": statistics.median(times[3:])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
