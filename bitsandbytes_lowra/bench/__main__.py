"""`python -m bitsandbytes_lowra.bench [--json out.json] [--shapes 4096x4096,...] [--batches 1,4,8,16] [--quick]
[--only quantize|dequantize|matmul|training] [--train-tokens 512]`

Runs every per-layer comparison in one process on the current CUDA device: the kernels (quantize, dequantize, fused
decode matmul; ours against bitsandbytes NF4 and bf16 torch.nn.functional.linear), then a training step of each
layer shape (LinearLowRA at 4 and 1.75 bits + LoRA r = 64, forward and backward, against bnb.nn.Linear4bit NF4 and
bf16; launched eagerly and replayed from a CUDA graph: bench/e2e.py). Prints tables and writes all numbers (with the
environment: GPU, versions, date) as JSON. docs/benchmarks.md records a run. The whole-model benchmark (a
Llama-2-7B-shaped checkpoint: load, decode, fine-tuning) is `python -m bitsandbytes_lowra.bench.e2e`.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import describe, e2e, kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench", description=describe(__doc__))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in kernels.SHAPES),
                    help="weight shapes out_features x in_features, comma separated")
    ap.add_argument("--batches", default=",".join(map(str, kernels.BATCHES)), help="decode batch sizes (tokens)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep of the fused matmul")
    ap.add_argument("--only", choices=["quantize", "dequantize", "matmul", "training"],
                    help="run only this comparison")
    ap.add_argument("--train-tokens", type=int, nargs="+", default=[512],
                    help="tokens of the training step, one run per value")
    args = ap.parse_args(argv)
    if min(args.train_tokens) < 1:
        ap.error("--train-tokens must be positive")
    shapes = kernels.parse_shapes(args.shapes)
    batches = [int(b) for b in args.batches.split(",") if b]

    def dump(results):  # after each part: a failure later keeps what was measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    try:
        if args.only == "training":
            kernels.require_gpu_bench()
            results = {"environment": kernels.environment()}
        else:
            results = kernels.run(shapes, batches, quick=args.quick, sweep=not args.no_sweep, only=args.only)
            dump(results)
            print(kernels.table(results), flush=True)
    except kernels.BenchUnavailable as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    if args.only in (None, "training"):
        results["training"] = e2e.training_layer_bench(shapes, tokens=args.train_tokens)
        dump(results)
        print(e2e.training_table(results["training"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
