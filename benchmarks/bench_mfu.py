"""Model FLOPs utilisation of a ~1.3B-parameter GPT on one CUDA GPU in bf16.

Trains `gpt-1.3b` (GPT-3 XL shape, seq 2048) with plain torch on one GPU: bf16 autocast, fused
AdamW, activation checkpointing off unless --checkpointing; MFU = 6 * N * tokens/s (+ attention
FLOPs 12 * layers * d_model * seq per token) over the GPU's peak dense bf16 FLOP/s (--peak-tflops;
989 for H100 SXM, 990 for H200). Needs a GPU; prints the figures and exits.

    python benchmarks/bench_mfu.py [--micro-batch 4] [--steps 20] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    import torch

    from farm._hydra import compose_from_argv
    from farm.runtime.model import GPT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt-1.3b")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_mfu.py needs a CUDA GPU")
    cfg, _ = compose_from_argv(["+topology=local", f"model={args.model}",
                                f"model.activation_checkpointing={str(args.checkpointing).lower()}"])
    m = cfg.model
    model = GPT(m, vocab_size=m.vocab_size or 50304, init_seed=0).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    n = model.num_params()
    tokens = torch.randint(0, model.vocab_size, (args.micro_batch, m.seq_len + 1), device="cuda")
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[3:])
    tok_s = args.micro_batch * m.seq_len / step
    flops_per_token = 6 * n + 12 * m.n_layers * m.d_model * m.seq_len
    mfu = tok_s * flops_per_token / (args.peak_tflops * 1e12)
    print(f"{args.model}: {n / 1e9:.2f}B params, micro-batch {args.micro_batch} x {m.seq_len}")
    print(f"median step {step * 1e3:.1f} ms, {tok_s:,.0f} tokens/s, MFU {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
