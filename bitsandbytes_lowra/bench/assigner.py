"""Benchmark of the precision assigner on a Llama-2-7B-sized instance (synthetic errors, real shapes).

    python -m bitsandbytes_lowra.bench.assigner [--json results.json]

Llama-2-7B has 32 decoder layers; per layer q/k/v/o (4 x 4096 rows) and gate/up (2 x 11008 rows) have 4096
parameters per output channel and down (4096 rows) has 11008: 1,359,872 channels in all. The paper reports 319 s
for its two-level ILP on this model (8 threads). Errors are synthetic but shaped like real ones (see
`llama2_7b_instance`). This is a benchmark, not a test: it prints a table and never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from ..assigner import assign_precisions, default_precisions
from . import describe

LLAMA2_7B_LAYERS = 32
# (rows, parameters per row) of the linear layers of one Llama-2-7B decoder layer
LLAMA2_7B_LAYER = (
    (4096, 4096), (4096, 4096), (4096, 4096), (4096, 4096),  # q, k, v, o
    (11008, 4096), (11008, 4096),  # gate, up
    (4096, 11008),  # down
)
BENCH_PRECISIONS = (1, 2, 4)


def llama2_7b_instance(seed: int = 0, layers: int = LLAMA2_7B_LAYERS) -> tuple[np.ndarray, np.ndarray]:
    """(errors float64 [N, 3] at 1/2/4 bits, sizes int64 [N]) shaped like Llama-2-7B's output channels.

    Channel i's summed squared error at b bits is size_i * var_i * 0.36 * r_i^-(b-1) * noise:
    - var_i: the row's weight variance, heavy-tailed across channels (log-normal, sigma 1.2) times a per-matrix
      scale (log-normal, sigma 0.5), so a few channels carry much of the error;
    - 0.36: the 1-bit MSE of a unit Gaussian with the optimal two-level quantizer (1 - 2/pi);
    - r_i: error ratio per extra bit, about 4 (log-normal around 4, sigma 0.15), so channels differ in how much
      an extra bit helps, not only in scale;
    - noise: 5% independent log-normal jitter per precision.
    """
    rng = np.random.default_rng(seed)
    rows = np.array([r for r, _ in LLAMA2_7B_LAYER] * layers)
    cols = np.array([c for _, c in LLAMA2_7B_LAYER] * layers)
    sizes = np.repeat(cols, rows).astype(np.int64)
    n = len(sizes)
    var = rng.lognormal(0.0, 1.2, n) * np.repeat(rng.lognormal(0.0, 0.5, len(rows)), rows)
    ratio = 4.0 * np.exp(0.15 * rng.standard_normal(n))
    errors = np.stack(
        [sizes * var * 0.36 * ratio ** -(b - 1) * np.exp(0.05 * rng.standard_normal(n)) for b in BENCH_PRECISIONS],
        axis=1,
    )
    return errors, sizes


def _columns(errors: np.ndarray, precisions: tuple[int, ...]) -> np.ndarray:
    return errors[:, [BENCH_PRECISIONS.index(p) for p in precisions]]


def run(budgets, ilp_budgets, solver, clusters, seed, layers, progress=False) -> dict:
    t0 = time.perf_counter()
    errors, sizes = llama2_7b_instance(seed, layers)
    build = time.perf_counter() - t0
    rows = []
    plan = [("greedy", b) for b in budgets] + [("ilp", b) for b in ilp_budgets]
    for method, budget in plan:
        precisions = default_precisions(budget)
        cpu0 = time.process_time()
        a = assign_precisions(
            _columns(errors, precisions), sizes, budget, precisions, method=method, clusters=clusters,
            solver=solver, seed=seed, progress=progress,
        )
        rows.append(
            dict(
                method=a.method, budget=budget, precisions=list(precisions), seconds=a.seconds,
                cpu_seconds=time.process_time() - cpu0, average_bits=a.average_bits, total_error=a.total_error,
                lower_bound=a.lower_bound, gap=a.gap, within_budget=a.average_bits <= budget,
                clusters=clusters if method == "ilp" else None,
            )
        )
        _print_row(rows[-1])
    return dict(
        instance=dict(channels=int(len(sizes)), parameters=int(sizes.sum()), layers=layers, seed=seed,
                      build_seconds=build),
        machine=dict(python=platform.python_version(), processor=platform.processor(), cpus=_cpus()),
        command=" ".join(["python -m bitsandbytes_lowra.bench.assigner", *sys.argv[1:]]),
        results=rows,
    )


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


_HEADER = f"{'method':<10} {'budget':>6} {'precisions':<10} {'wall s':>8} {'cpu s':>8} {'avg bits':>11} " \
          f"{'total error':>14} {'LP bound':>14} {'gap':>10}"


def _print_row(r: dict) -> None:
    prec = ",".join(str(p) for p in r["precisions"])
    print(
        f"{r['method']:<10} {r['budget']:>6.3f} {prec:<10} {r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f} "
        f"{r['average_bits']:>11.7f} {r['total_error']:>14.6e} {r['lower_bound']:>14.6e} {r['gap']:>10.3e}",
        flush=True,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=describe(__doc__))
    p.add_argument("--budgets", type=float, nargs="*", default=[1.15, 1.5, 1.75, 2.0, 2.5, 3.0],
                   help="budgets for the greedy fast path")
    p.add_argument("--ilp-budgets", type=float, nargs="*", default=[1.75, 2.5],
                   help="budgets for the two-level ILP (slower: K-Means on 1.2M channels)")
    p.add_argument("--solver", choices=("highs", "cbc"), default="highs")
    p.add_argument("--clusters", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=LLAMA2_7B_LAYERS, help="decoder layers (32 = Llama-2-7B)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    print(_HEADER, flush=True)
    out = run(args.budgets, args.ilp_budgets, args.solver, args.clusters, args.seed, args.layers, args.progress)
    inst = out["instance"]
    print(f"instance: {inst['channels']:,} channels, {inst['parameters']:,} parameters, "
          f"built in {inst['build_seconds']:.2f} s; {out['machine']['cpus']} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
