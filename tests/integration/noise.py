"""Loss curves that must agree up to float noise, judged against a noise floor measured in the same run.

Two layouts of one model train the same samples with the same global batch, so their losses differ
only by the order of float reductions (partial sums over micro-batches and ranks, matmul blocking).
That difference starts at a few fp32 ulps and grows about tenfold a step once Adam's normalised
update turns sign noise in small gradients into weight changes (measured: 5e-8 at step 5, 5e-5 at
step 10 on the test model). A fixed tolerance is therefore either blind early or flaky late.

The floor is measured instead: the reference layout trained again with another micro-batch size
(``parallel.micro_batch``), which changes nothing but the reduction order. A layout passes when,
at every step, its distance from the reference is within K times the larger of that spread and
one fp32 epsilon.
"""

from __future__ import annotations

import numpy as np

K = 10.0
"""Allowed multiple of the floor. Measured on this machine's kind (floor 1.2e-7 for steps 1-7, then
1.1e-6, 4.2e-6, 4.9e-5): the widest layout, (1,2,1), reached 1.7x the floor, DP and PP layouts
under 0.4x. A learning rate off by 0.1 % is 8.3e-6 away at step 2 and 1.5e-5 at step 3, so 7x
and 12x past this bar: K=10 leaves layouts room and still catches small math errors early."""

EPS32 = float(np.finfo(np.float32).eps)
"""The losses are means of fp32 values: below about one fp32 epsilon two equal curves can differ."""


def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))


def floor(reference: np.ndarray, *perturbed: np.ndarray) -> np.ndarray:
    """Per step: the widest spread of the perturbed runs around the reference, at least EPS32."""
    spread = np.max([relative(p, reference) for p in perturbed], axis=0)
    return np.maximum(spread, EPS32)


def assert_within_noise(actual: np.ndarray, reference: np.ndarray, noise: np.ndarray, *, what: str) -> None:
    rel = relative(actual, reference)
    bad = np.flatnonzero(rel > K * noise)
    assert bad.size == 0, (
        f"{what}: loss differs beyond {K:g}x the float-noise floor at step(s) "
        + ", ".join(f"{i + 1} ({rel[i]:.1e} > {K:g} x {noise[i]:.1e})" for i in bad)
    )
