"""`python -m bitsandbytes_lowra.bench.overhead [--device cpu|cuda] [--size 256] [--calls 2000] [--json out.json]`

Per-call host overhead of a quantized linear layer in the decode regime (one token, batch 1). The layer is small
(default 64x64) so the kernel time is negligible and what is timed is Python, dispatcher and validation work paid
by every one of a model's ~224 linear layers per generated token. Rows:

- LinearLowRA.forward (mixed 1/2/4-bit rows), double-quantized absmax on and off, bf16 and fp32 activations, and
  with the opt-in decoded-absmax cache (LinearLowRA.set_absmax_cache; not the default: it costs memory);
- "LinearLowRA full path": the same layer with its decode shortcut off (every call through matmul_lowra, as before
  the shortcut: what a call costs when the shortcut's guard refuses);
- bitsandbytes Linear4bit (NF4) with the same settings, for comparison;
- torch.nn.Linear (dense, the floor of a module call);
- "kernel only" / "op only": the lowra op LinearLowRA ends in, called directly with precomputed arguments (what is
  left when all host-side layers are removed), so forward minus kernel-only is the host overhead of our Python
  stack; on CUDA also "direct launch", the prepared launcher eager decoding calls instead of the op.

Times are medians over --repeats runs of --calls forward calls under torch.inference_mode() (on CUDA synchronized
once per run, not per call: the host side is what is measured). Use OMP_NUM_THREADS=1 on a shared CPU.

`--training`: the same for one LoRA training step instead (`--tokens` activations that require grad through the
layer and a rank-`--rank` adapter beside it, a loss, backward into the input and the adapter), the regime where a
fine-tuning step at a few hundred tokens is host-bound: nn.Linear, LinearLowRA, LinearLowRA with its dequantize
through the op dispatcher (as before the direct training path), bitsandbytes Linear4bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn

from . import describe


def _timeit(fn, x, calls: int, repeats: int, device: torch.device) -> float:
    """Median microseconds per call of fn(x)."""
    for _ in range(max(calls // 10, 10)):  # warm-up: caches, lazy inits, allocator
        fn(x)
    per_call = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per_call)


def _mixed_bits(rows: int) -> torch.Tensor:
    # 1.75 nominal bits: a quarter of the rows at 1 bit, half at 2, a quarter at 4 (every precision group non-empty).
    g = torch.Generator().manual_seed(0)
    bits = torch.tensor([1, 2, 2, 4], dtype=torch.uint8).repeat(-(-rows // 4))[:rows]
    return bits[torch.randperm(rows, generator=g)]


def _lowra_kernel_only(layer, x) -> list:
    """[(row name, fn)]: the op LinearLowRA.forward ends in, with every argument prepared once (no Python layers,
    no checks); on CUDA also the direct launch that eager decoding takes instead of the op (PreparedMatmul)."""
    from ..functional import _eager_direct, _use_fused_decode

    packed, qs = layer._packed_and_state()
    absmax, *nested = qs.scale_args()
    # detached: a bias that requires grad would send these rows down the training path (dequantize + linear)
    bias = None if layer.bias is None else layer.bias.detach().to(x.dtype)
    shape = list(qs.shape)
    if _use_fused_decode(x, bias):
        row_order, group_rows = qs.matmul_plan()
        op = torch.ops.lowra.matmul.default
        rows = [("  lowra op only", lambda a: op(a, packed, absmax, qs.bits, qs.code, qs.row_offsets, qs.blocksize,
                                                  shape, bias, row_order, group_rows, *nested))]
        if _eager_direct(x, bias):
            launch = qs.prepared_matmul(packed)
            rows.append(("  lowra direct launch", lambda a: launch(a, bias)))
        return rows
    deq = torch.ops.lowra.dequantize.default
    return [("  lowra kernel only", lambda a: nn.functional.linear(
        a, deq(packed, absmax, qs.bits, qs.code, qs.row_offsets, qs.blocksize, shape, a.dtype, *nested), bias))]


FULL_ROW = "LinearLowRA full path"  # decode: the shortcut off (nn.modules._DecodeCall)


def run(device: str = "cpu", size: int = 64, calls: int = 2000, repeats: int = 5, dtypes=("bfloat16", "float32"),
        bnb: bool = True) -> list[dict]:
    from ..nn import LinearLowRA

    dev = torch.device(device)
    torch.manual_seed(0)
    base = nn.Linear(size, size, bias=True)
    results = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        x = torch.randn(1, 1, size, device=dev, dtype=dtype)
        dense = nn.Linear(size, size, bias=True).to(dev, dtype)
        rows = [("nn.Linear (dense)", None, dense)]
        for nested in (True, False):
            layer = LinearLowRA.from_linear(base, _mixed_bits(size), compress_statistics=nested, device=dev)
            rows.append(("LinearLowRA", nested, layer))
            full = copy.deepcopy(layer)
            full._decode_shortcut = False
            rows.append((FULL_ROW, nested, full))
            if nested:  # opt-in: decoded scales kept between calls (costs the 0.5 bit/param double quant saves)
                cached = LinearLowRA.from_linear(base, _mixed_bits(size), compress_statistics=True, device=dev)
                rows.append(("  + set_absmax_cache", nested, cached.set_absmax_cache(True)))
            rows += [(name, nested, fn) for name, fn in _lowra_kernel_only(layer, x)]
            if bnb:
                q = _bnb_linear4bit(base, nested, dtype, dev)
                if q is not None:
                    rows.append(("bnb Linear4bit nf4", nested, q))
        with torch.inference_mode():
            for name, nested, fn in rows:
                us = _timeit(fn, x, calls, repeats, dev)
                results.append({"layer": name.strip(), "dtype": dname, "double_quant": nested, "us_per_call": us,
                                "device": str(dev), "size": size})
    return results


OP_ROW = "LinearLowRA via the op"  # --training: its dequantize through torch.ops, not the prepared launcher


def run_training(device: str = "cpu", size: int = 64, tokens: int = 8, rank: int = 8, calls: int = 500,
                 repeats: int = 5, dtypes=("bfloat16",), bnb: bool = True) -> list[dict]:
    """Host microseconds per LoRA training step of each base layer (module docstring, `--training`)."""
    from .. import functional
    from ..nn import LinearLowRA
    from .e2e import LoRA

    dev = torch.device(device)
    torch.manual_seed(0)
    base = nn.Linear(size, size, bias=True)
    base.requires_grad_(False)
    results = []
    for dname in dtypes:
        dtype = getattr(torch, dname)
        x = torch.randn(tokens, size, device=dev, dtype=dtype, requires_grad=True)
        rows = [("nn.Linear (dense)", None, nn.Linear(size, size, bias=True).to(dev, dtype).requires_grad_(False))]
        for nested in (True, False):
            layer = LinearLowRA.from_linear(base, _mixed_bits(size), compress_statistics=nested, device=dev)
            layer.requires_grad_(False)
            rows += [("LinearLowRA", nested, layer), (OP_ROW, nested, layer)]
            if bnb:
                q = _bnb_linear4bit(base, nested, dtype, dev)
                if q is not None:
                    rows.append(("bnb Linear4bit nf4", nested, q.requires_grad_(False)))
        for name, nested, layer in rows:
            model = LoRA(layer, size, size, r=rank, device=dev, dtype=dtype)

            def step(a, model=model):
                model(a).float().pow(2).mean().backward()

            direct = functional._eager_direct
            if name == OP_ROW:
                functional._eager_direct = lambda A, bias: False  # matmul_lowra's op path, as before dd25231
            try:
                us = _timeit(step, x, calls, repeats, dev)
            finally:
                functional._eager_direct = direct
            results.append({"layer": name, "dtype": dname, "double_quant": nested, "us_per_call": us,
                            "device": str(dev), "size": size, "mode": "training", "tokens": tokens, "rank": rank})
    return results


def _bnb_linear4bit(base: nn.Linear, nested: bool, dtype, dev):
    try:
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=True, compute_dtype=dtype,
                              compress_statistics=nested, quant_type="nf4")
        q.load_state_dict(base.state_dict())
        q = q.to(dev)
        with torch.inference_mode():
            q(torch.zeros(1, base.in_features, device=dev, dtype=dtype))
        return q
    except Exception as e:  # bnb without a kernel for this device: leave the row out, say why
        print(f"bnb Linear4bit unavailable on {dev}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def table(results: list[dict]) -> str:
    unit = "us/step" if results and results[0].get("mode") == "training" else "us/call"
    lines = [f"{'layer':<24} {'dtype':<9} {'double-quant':<13} {unit:>9}"]
    for r in results:
        dq = "-" if r["double_quant"] is None else ("on" if r["double_quant"] else "off")
        lines.append(f"{r['layer']:<24} {r['dtype']:<9} {dq:<13} {r['us_per_call']:>9.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bitsandbytes_lowra.bench.overhead",
                                 description=describe(__doc__))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=64, help="in = out features of the layer")
    ap.add_argument("--calls", type=int, default=2000, help="forward calls per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes Linear4bit")
    ap.add_argument("--training", action="store_true",
                    help="time a LoRA training step (forward + backward) per call instead of a decode call")
    ap.add_argument("--tokens", type=int, default=8, help="--training: activation rows per step")
    ap.add_argument("--rank", type=int, default=8, help="--training: LoRA rank")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if min(args.size, args.calls, args.repeats, args.tokens, args.rank) < 1:
        ap.error("--size, --calls, --repeats, --tokens and --rank must be positive")
    dtypes = tuple(args.dtypes.split(","))
    if args.training:
        results = run_training(args.device, args.size, args.tokens, args.rank, args.calls, args.repeats, dtypes,
                               not args.no_bnb)
    else:
        results = run(args.device, args.size, args.calls, args.repeats, dtypes, not args.no_bnb)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f,
                      indent=1)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
