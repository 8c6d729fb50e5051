"""`python -m bitsandbytes_lowra.bench.dequant_launch [--shapes R1xC1,...] [--json out.json]`

How the streamed dequantize is best launched: on every layer shape, its automatic launch (one warp task per warp on
as many CTAs as that takes, as a programmatic dependent where the grid is more than one resident wave), an even
split over a resident grid, and one task per warp without PDL, timed side by side in two rounds (A B C, C B A) with
bitsandbytes' NF4 dequantize and a copy with dequantize's 1:4 read:write mix. 4-bit rows and the 1.75-bit mix
with float32 scales, and the mix with double-quantized scales (LowRAConfig's default; "1.75dq"), bf16 out. The
automatic choice (csrc/cuda_kernels.cu, `stream_launch`) is tuned from this table; a row where it is not the
fastest launch is marked. Device time as in bench.kernels (CUDA graphs of many calls, weights rotated out
of L2); every launch's output is checked equal to the automatic one's first.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from . import describe, dispatch, kernels

SHAPES = dispatch.SHAPES + [(2048, 2048)]
# set_dequantize_tuning(run, pdl) per launch
LAUNCHES = {"auto": (0, 0), "resident": (-1, -1), "one_task": (1, -1)}


def time_launches(s: dict, replays: int, min_calls: int) -> dict:
    """Device ms of one bf16 dequantize of state s under each LAUNCHES entry, the best of two rounds (A B C, C B A),
    after checking that each launch writes what the automatic one does."""
    from ..backends import native

    rows, cols = s["shape"]
    fns = kernels.dequantize_calls(s, min_calls)
    ms = {name: math.inf for name in LAUNCHES}
    try:
        native.set_dequantize_tuning()
        ref = fns[0]().clone()
        for order in (list(LAUNCHES), list(LAUNCHES)[::-1]):
            for name in order:
                native.set_dequantize_tuning(*LAUNCHES[name])
                if not torch.equal(fns[0](), ref):
                    raise AssertionError(f"launch {name!r} wrote another output on {rows}x{cols}")
                ms[name] = min(ms[name], kernels.time_calls(fns, replays)[0])
    finally:
        native.set_dequantize_tuning()
    return ms


def run(shapes, replays: int = 20, min_calls: int = 64) -> list:
    bnb = kernels.require_gpu_bench()
    rows_out = []
    for rows, cols in shapes:
        gen = torch.Generator().manual_seed(rows * 31 + cols)
        W = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16).cuda()
        mix_bits = kernels.mixed_bits(rows, gen)
        states = {"4": kernels.lowra_state(W, torch.full((rows,), 4, dtype=torch.uint8)),
                  "1.75": kernels.lowra_state(W, mix_bits),
                  "1.75dq": kernels.lowra_state(W, mix_bits, double_quant=True)}
        packed, qs = bnb.functional.quantize_4bit(W, blocksize=kernels.BLOCKSIZE, quant_type="nf4")
        bnb_ms = kernels.time_bnb_dequantize(packed, qs.absmax, rows, cols, replays, min_calls)[0]
        mix = kernels.copy_dequant_mix(rows * cols * 2, min_calls, replays)
        for name, s in states.items():
            rows_out.append(dict(shape=[rows, cols], state=name, ms=time_launches(s, replays, min_calls),
                                 bnb_nf4_ms=bnb_ms, copy_1to4_ms=mix["ms"] if mix else None))
        del states, W
        torch.cuda.empty_cache()
        print(f"dequant_launch: {rows}x{cols} done", file=sys.stderr, flush=True)
    return rows_out


def table(rows_out: list) -> str:
    lines = ["      shape    state |  auto us  resident us  one task us |  bnb us  1:4 copy us | auto / best  "
             "bnb / auto"]
    for r in rows_out:
        ms = r["ms"]
        best = min(ms.values())
        mark = "  <- not the fastest launch" if ms["auto"] > 1.02 * best else ""
        copy = f"{1e3 * r['copy_1to4_ms']:12.2f}" if r["copy_1to4_ms"] else f"{'-':>12}"
        lines.append(f"{r['shape'][0]:>6}x{r['shape'][1]:<6} {r['state']:>6} | {1e3 * ms['auto']:8.2f} "
                     f"{1e3 * ms['resident']:12.2f} {1e3 * ms['one_task']:12.2f} | {1e3 * r['bnb_nf4_ms']:7.2f} "
                     f"{copy} | "
                     f"{ms['auto'] / best:11.3f} {r['bnb_nf4_ms'] / ms['auto']:10.2f}{mark}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench.dequant_launch",
                                 description=describe(__doc__))
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES),
                    help="weight shapes out_features x in_features, comma separated")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    shapes = kernels.parse_shapes(args.shapes)
    if any(r < 1 or c < 1 for r, c in shapes):
        ap.error("shapes must be positive")
    reps = (3, 8) if args.quick else (20, 64)
    return kernels.report("dequant_launch", lambda: run(shapes, *reps), table, args.json)


if __name__ == "__main__":
    sys.exit(main())
