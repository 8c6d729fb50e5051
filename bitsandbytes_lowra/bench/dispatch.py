"""`python -m bitsandbytes_lowra.bench.dispatch [--shapes R1xC1,...] [--batches 2,3,4] [--json out.json]`

Where each fused-matmul path wins: on every layer shape and token count, the CUDA-core GEMV (`gemv_max_rows=4`,
forced) and the tensor-core kernels (`gemv_max_rows=-1`) timed side by side with the automatic choice, on the
1.75-bit mix, all rows 4-bit, and the mix on double-quantized scales. The automatic choice (csrc/cuda_gemv.cu,
`gemv_takes`) is tuned from this table; a row where "auto" is not the faster path is marked. Device time as in
bench.kernels (CUDA graphs of many calls, weights rotated out of L2). m = 1 takes the batch-1 kernel either way.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import describe, kernels

# Llama-2-7B / 13B, Llama-3-8B and Llama-70B projections (out_features x in_features)
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (5120, 5120), (13824, 5120), (5120, 13824), (14336, 4096),
          (4096, 14336), (1024, 8192), (8192, 8192), (28672, 8192), (8192, 28672)]
CONFIGS = {"auto": {}, "gemv": dict(gemv_max_rows=4), "tensor": dict(gemv_max_rows=-1)}


def states_for(rows: int, cols: int, gen: torch.Generator) -> dict:
    W = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16).cuda()
    mix = kernels.mixed_bits(rows, gen)
    return {"1.75": kernels.lowra_state(W, mix), "4": kernels.lowra_state(W, torch.full((rows,), 4, dtype=torch.uint8)),
            "1.75-dq": kernels.lowra_state(W, mix, double_quant=True)}


def time_paths(s: dict, A: torch.Tensor, replays: int, min_calls: int) -> dict:
    """Device ms of one matmul of A by state s under each CONFIGS entry."""
    return dict(zip(CONFIGS, kernels.time_tunings(s, A, CONFIGS.values(), replays, min_calls)))


def run(shapes, batches, replays: int = 10, min_calls: int = 24) -> list:
    kernels.require_gpu_bench()
    rows_out = []
    for rows, cols in shapes:
        gen = torch.Generator().manual_seed(rows * 31 + cols)
        states = states_for(rows, cols, gen)
        for m in batches:
            A = torch.randn(m, cols, generator=gen).to(torch.bfloat16).cuda()
            for name, s in states.items():
                ms = time_paths(s, A, replays, min_calls)
                rows_out.append(dict(shape=[rows, cols], m=m, state=name, ms=ms))
        del states
        torch.cuda.empty_cache()
        print(f"dispatch: {rows}x{cols} done", file=sys.stderr, flush=True)
    return rows_out


def table(rows_out: list) -> str:
    lines = ["       shape   m  state   |  auto us  gemv us  tensor us | auto / best"]
    for r in rows_out:
        ms = r["ms"]
        best = min(ms["gemv"], ms["tensor"])
        mark = "  <- not the faster path" if ms["auto"] > 1.03 * best else ""
        lines.append(f"{r['shape'][0]:>6}x{r['shape'][1]:<6} {r['m']:>2}  {r['state']:<7} | {1e3 * ms['auto']:8.1f} "
                     f"{1e3 * ms['gemv']:8.1f} {1e3 * ms['tensor']:10.1f} | {ms['auto'] / best:6.3f}{mark}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench.dispatch",
                                 description=describe(__doc__))
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES),
                    help="weight shapes out_features x in_features, comma separated")
    ap.add_argument("--batches", default="2,3,4", help="activation rows (tokens), comma separated")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    shapes = kernels.parse_shapes(args.shapes)
    batches = [int(b) for b in args.batches.split(",") if b]
    if any(b < 1 for b in batches) or any(r < 1 or c < 1 for r, c in shapes):
        ap.error("shapes and batches must be positive")
    reps = (3, 8) if args.quick else (10, 24)
    return kernels.report("dispatch", lambda: run(shapes, batches, *reps), table, args.json)


if __name__ == "__main__":
    sys.exit(main())
