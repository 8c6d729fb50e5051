"""Learner benchmarks and the SmolLM2 quality report (docs/learner.md).

    python -m bitsandbytes_lowra.bench.learner --time                 # all precisions, all SmolLM2 linear layers
    python -m bitsandbytes_lowra.bench.learner --report               # error ratios per layer type (markdown)
    python -m bitsandbytes_lowra.bench.learner --llama7b --device cuda  # Llama-2-7B shapes, synthetic weights

Times cover learning only (weights are loaded or generated beforehand, outside the clock).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections import defaultdict

import torch

from ..learner import learn_layer, nf_fit

PRECS = (1, 2, 4)
_DEFAULTS = dict(mode="per_channel", weight_power=1.0, iterations=2, chunk_rows=None)
LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _layer_type(name: str) -> str:
    m = re.search(r"(q|k|v|o|gate|up|down)_proj$", name)
    if m is None:
        raise ValueError(f"not a decoder linear layer name: {name}")
    return m.group(0)


def _smollm2(layers: int | None):
    from .. import data

    weights = data.smollm2_linear_weights()
    if layers is not None:
        weights = {k: v for k, v in weights.items() if int(re.search(r"\.layers\.(\d+)\.", k).group(1)) < layers}
    return weights


def time_smollm2(layers=None, device="cpu", **kwargs) -> float:
    weights = {k: v.to(device) for k, v in _smollm2(layers).items()}
    n = sum(w.numel() for w in weights.values())
    learn_layer(next(iter(weights.values()))[:8], **kwargs)  # warm-up (lazy init, first-call overheads)
    load_before = os.getloadavg()[0]  # the machine may be shared: wall time depends on it
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for W in weights.values():
        learn_layer(W, precisions=PRECS, **kwargs)
    _sync(device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(f"SmolLM2-135M: {len(weights)} layers, {n / 1e6:.1f}M weights, precisions {PRECS}, {kwargs or 'defaults'}, "
          f"device {device}, {torch.get_num_threads()} CPU threads: {elapsed:.1f} s wall, {cpu:.1f} s CPU "
          f"(load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f})")
    return elapsed


CONFIGS = {
    "per-channel p=1 (paper)": dict(),
    "per-channel p=2": dict(weight_power=2.0),
    "per-channel p=2, 10 it.": dict(weight_power=2.0, iterations=10),
    "shared p=1": dict(mode="shared"),
}


def report_smollm2(layers=None) -> str:
    """Markdown tables: summed squared error of each configuration relative to NF, per layer type and precision."""
    nf_label = "NF (Appendix F)"
    totals = defaultdict(float)  # (config, type, bits) -> error sum
    kept = defaultdict(int)  # (config, bits) -> rows whose tables stayed at Appendix F
    rows = 0
    for name, W in _smollm2(layers).items():
        t = _layer_type(name)
        rows += W.shape[0]
        fits = {nf_label: nf_fit(W, PRECS)}
        fits.update({label: learn_layer(W, PRECS, **cfg) for label, cfg in CONFIGS.items()})
        for label, f in fits.items():
            for p in PRECS:
                err = float(f[p].error.sum())
                totals[(label, t, p)] += err
                totals[(label, "all", p)] += err
                kept[(label, p)] += int((f[p].codebook == fits[nf_label][p].codebook).all(dim=1).sum())
    a, b, _, d = CONFIGS  # p=1, p=2, p=2 10 it., shared
    lines = []
    for p in PRECS:
        lines.append(f"\n{p}-bit: summed squared error relative to NF (lower is better)\n")
        lines.append("| layer type | " + " | ".join(CONFIGS) + " | per-channel / shared | p=2 / p=1 |")
        lines.append("|---" * (len(CONFIGS) + 3) + "|")
        for t in (*LAYER_TYPES, "all"):
            nf = totals[(nf_label, t, p)]
            cells = " | ".join(f"{totals[(label, t, p)] / nf:.4f}" for label in CONFIGS)
            pc_sh = totals[(a, t, p)] / totals[(d, t, p)]
            p2_p1 = totals[(b, t, p)] / totals[(a, t, p)]
            lines.append(f"| {t} | {cells} | {pc_sh:.4f} | {p2_p1:.4f} |")
    lines.append(f"\nRows ({rows} in all) whose tables stayed at Appendix F (the guard kept them, or nothing improved)\n")
    lines.append("| bits | " + " | ".join(CONFIGS) + " |")
    lines.append("|---" * (len(CONFIGS) + 1) + "|")
    for p in PRECS:
        lines.append(f"| {p} | " + " | ".join(str(kept[(label, p)]) for label in CONFIGS) + " |")
    text = "\n".join(lines)
    print(text)
    return text


LLAMA7B_SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q k v o, gate up, down


def synthetic_weight(rows, cols, generator, device) -> torch.Tensor:
    """Heavy-tailed weights: Student-t (5 dof) with log-normal row scales and a few outlier input columns."""
    z = torch.randn(6, rows, cols, generator=generator, device=device)
    t5 = z[0] / (z[1:] ** 2).mean(0).sqrt()
    row_scale = 0.02 * torch.exp(0.3 * torch.randn(rows, 1, generator=generator, device=device))
    W = t5 * row_scale
    outliers = torch.randint(0, cols, (max(1, cols // 512),), generator=generator, device=device)
    W[:, outliers] *= 8
    return W


def time_llama7b(layers=32, device="cuda", **kwargs) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    W = synthetic_weight(64, 4096, g, device)
    learn_layer(W, precisions=PRECS, **kwargs)  # warm-up
    elapsed = 0.0
    n = 0
    for layer in range(layers):
        for rows, cols in LLAMA7B_SHAPES:
            W = synthetic_weight(rows, cols, g, device)
            _sync(device)
            start = time.perf_counter()
            learn_layer(W, precisions=PRECS, **kwargs)
            _sync(device)
            elapsed += time.perf_counter() - start
            n += W.numel()
            del W
        if layer == 0:
            print(f"first layer: {elapsed:.2f} s")
    print(f"Llama-2-7B shapes: {layers} layers, {n / 1e9:.2f}B synthetic weights, precisions {PRECS}, "
          f"{kwargs or 'defaults'}, device {device}: {elapsed:.1f} s")
    if torch.device(device).type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    return elapsed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--time", action="store_true", help="time all precisions on every SmolLM2 linear layer")
    what.add_argument("--report", action="store_true", help="error ratios per layer type on SmolLM2 (markdown)")
    what.add_argument("--llama7b", action="store_true", help="time Llama-2-7B-shaped synthetic layers")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cpu for SmolLM2, cuda for --llama7b)")
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--mode", default="per_channel")
    ap.add_argument("--weight-power", type=float, default=1.0)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--chunk-rows", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = dict(mode=args.mode, weight_power=args.weight_power, iterations=args.iterations,
                  chunk_rows=args.chunk_rows)
    kwargs = {k: v for k, v in kwargs.items() if v != _DEFAULTS[k]}  # print only what differs from the defaults
    if args.llama7b:
        time_llama7b(layers=32 if args.layers is None else args.layers, device=args.device or "cuda", **kwargs)
    elif args.time:
        time_smollm2(args.layers, device=args.device or "cpu", **kwargs)
    else:
        report_smollm2(args.layers)


if __name__ == "__main__":
    main()
