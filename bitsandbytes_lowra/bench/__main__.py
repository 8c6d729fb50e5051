"""`python -m bitsandbytes_lowra.bench [--json out.json] [--shapes 4096x4096,...] [--batches 1,4,8,16] [--quick]
[--only quantize|dequantize|matmul]`

Runs every kernel comparison (quantize, dequantize, fused decode matmul; ours against bitsandbytes NF4 and bf16
torch.nn.functional.linear) in one process on the current CUDA device, prints a table and writes all numbers
(with the environment: GPU, versions, date) as JSON. docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in kernels.SHAPES),
                    help="weight shapes out_features x in_features, comma separated")
    ap.add_argument("--batches", default=",".join(map(str, kernels.BATCHES)), help="decode batch sizes (tokens)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep of the fused matmul")
    ap.add_argument("--only", choices=["quantize", "dequantize", "matmul"], help="run only this comparison")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    try:
        results = kernels.run(shapes, batches, quick=args.quick, sweep=not args.no_sweep, only=args.only)
    except kernels.BenchUnavailable as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(kernels.table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
