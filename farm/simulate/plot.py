"""Timeline of a study's first run per policy: devices training and tokens/s over the days."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farm.simulate.study import Study


def hourly_tokens(timeline: list[tuple[float, int, float]], days: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean tokens/s per hour of a step-function timeline."""
    edges = np.arange(0.0, days * 86400 + 3600, 3600.0)
    t = np.array([p[0] for p in timeline] + [days * 86400])
    rate = np.array([p[2] for p in timeline])
    cum = np.concatenate([[0.0], np.cumsum(np.diff(t) * rate)])
    at = np.interp(edges, t, cum)
    return edges[:-1] / 86400, np.diff(at) / 3600.0


def plot_timeline(study: Study, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(study.results)
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 2.4 * len(names) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        out = study.results[name].outcomes[0]
        t = [p[0] / 86400 for p in out.timeline] + [study.sim.days]
        devices = [p[1] for p in out.timeline] + [out.timeline[-1][1]]
        ax.step(t, devices, where="post", color="tab:blue", lw=1.0)
        ax.set_ylabel("devices in layout", color="tab:blue")
        full = study.farm.num_devices
        ax.set_ylim(full * 0.85, full * 1.01)
        hours, tokens = hourly_tokens(out.timeline, study.sim.days)
        twin = ax.twinx()
        twin.plot(hours, tokens / 1e6, color="tab:green", lw=0.6, alpha=0.8)
        twin.set_ylabel("M tokens/s (hourly mean)", color="tab:green")
        twin.set_ylim(0, study.plan.tokens_per_s / 1e6 * 1.1)
        ax.plot([w / 86400 for w, _ in out.marks], [full * 0.855] * len(out.marks), "|", color="tab:red",
                ms=6, alpha=0.6)
        ettr = study.results[name].runs[0]["ettr"]
        ax.set_title(f"{name}: ETTR {ettr:.1%}, {len(out.marks)} failures (red)", loc="left", fontsize=9)
    axes[-1, 0].set_xlabel("days")
    fig.suptitle(f"{study.farm.name}, {study.farm.num_devices} devices, failures {study.failures.name}, run 0")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
