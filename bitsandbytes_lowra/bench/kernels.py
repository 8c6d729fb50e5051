"""Kernel benchmarks: LowRA quantize / dequantize / fused decode matmul against bitsandbytes NF4 and dense bf16.

Method (docs/benchmarks.md): every operation is timed as device time, by replaying a CUDA graph of many calls
between two CUDA events (median over replays; so Python and launch overheads are out, for every contender alike).
An operation that cannot be captured (bitsandbytes' quantize launches on the legacy default stream) is timed the
same way without a graph, back to back on the default stream; the JSON says which. Calls rotate over enough copies
of the weights that they do not sit in the 60 MB L2 cache. Bandwidth figures count bytes read plus bytes written
and are compared with a measured device-to-device copy.

Weights are synthetic (normal, std 0.02, bf16) at real layer shapes; LowRA codebooks are the NormalFloat initial
tables (codebooks.nf_tables), mixed precision at 1.75 average bits = 50% 1-bit, 37.5% 2-bit, 12.5% 4-bit rows
placed at random, blocksize 64 everywhere (as bitsandbytes' default).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import sys

import torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]
BATCHES = [1, 2, 4, 8, 16]
BLOCKSIZE = 64
MIX_175 = (0.5, 0.375, 0.125)  # fractions of 1-, 2-, 4-bit rows: 0.5 + 0.75 + 0.5 = 1.75 bits
L2_BYTES = 60 * 2**20


class BenchUnavailable(RuntimeError):
    """No GPU, no CUDA build of the native library, or no bitsandbytes."""


# ---------------------------------------------------------------------------------------------------------------
# timing

def _median_ms(run, calls: int, replays: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def time_calls(fns, replays: int, graph: bool = True) -> tuple[float, str]:
    """Median device time (ms) of one call of the list `fns` (run in order), captured in a CUDA graph unless
    graph=False or the capture fails."""
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    try:
        if not graph:
            raise RuntimeError("eager timing requested")
        with torch.cuda.stream(side):
            for f in fns:  # warm-up outside the graph
                f()
        cur.wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        graph.replay()
        torch.cuda.synchronize()
        ms = _median_ms(graph.replay, len(fns), replays)
        del graph
        return ms, "cuda-graph"
    except Exception:  # noqa: BLE001  (not capturable: fall back to back-to-back eager calls)
        torch.cuda.synchronize()

    def loop():
        for f in fns:
            f()

    loop()
    torch.cuda.synchronize()
    return _median_ms(loop, len(fns), replays), "eager"


# A copy with dequantize's traffic and no decode: each program reads BLOCK words and writes them four times, so it
# reads the bytes of 4-bit codes and writes those of their bf16 output (1:4). Writes dominate dequantize's traffic,
# and a 1:1 copy of the same total does not show what such a mix reaches. Triton ships with torch's CUDA wheels.
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _expand4(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, eviction_policy="evict_first")
        out = pid * BLOCK * 4 + tl.arange(0, BLOCK)
        for k in tl.static_range(4):
            tl.store(y_ptr + out + k * BLOCK, v, mask=offs < n, cache_modifier=".cs")
except ImportError:  # pragma: no cover  (CPU-only torch)
    triton = None


def copy_dequant_mix(out_bytes: int, min_calls: int, replays: int) -> dict | None:
    """Device time of _expand4 writing `out_bytes` (reading a quarter of that), timed like every contender; None
    without Triton."""
    if triton is None:
        return None
    n = out_bytes // 16  # int32 words read
    k = copies_for(5 * 4 * n)
    xs = [torch.zeros(n, dtype=torch.int32, device="cuda") for _ in range(k)]
    ys = [torch.empty(4 * n, dtype=torch.int32, device="cuda") for _ in range(k)]
    block = 1024  # of 1024 / 2048 / 4096 words and 4 / 8 warps, the fastest on the H200
    fns = [(lambda i=i: _expand4[(triton.cdiv(n, block),)](xs[i], ys[i], n, BLOCK=block, num_warps=4))
           for i in range(k)] * max(1, math.ceil(min_calls / k))
    ms, how = time_calls(fns, replays)
    return dict(ms=ms, tb_s=20 * n / (ms * 1e-3) / 1e12, bytes_read=4 * n, bytes_written=16 * n, timing=how)


def copies_for(nbytes: int) -> int:
    """Rotating copies so that one pass over them is several times the L2."""
    return max(1, min(32, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


def rotate(make, nbytes: int, min_calls: int):
    """[make(i) for i in copies] repeated to at least min_calls calls; make(i) returns a zero-argument callable."""
    n = copies_for(nbytes)
    fns = [make(i) for i in range(n)]
    reps = max(1, math.ceil(min_calls / n))
    return fns * reps


def copy_bandwidth(replays: int) -> dict:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written) of 2 GiB buffers, after ~0.5 s of warm-up
    that brings the clocks up (an idle H200 starts at 345 MHz). Two copies: torch's copy_ timed eagerly
    (cudaMemcpyAsync) and an elementwise kernel (x * 1) in a CUDA graph; the higher one is the ceiling."""
    n = 2**31
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    t0, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    while True:
        for _ in range(20):
            dst.copy_(src)
        end.record()
        end.synchronize()
        if t0.elapsed_time(end) > 500:
            break
    memcpy_ms, _ = time_calls([lambda: dst.copy_(src)] * 5, replays, graph=False)
    kernel_ms, _ = time_calls([lambda: torch.mul(src, 1.0, out=dst)] * 5, replays)
    # write-only (fill_), for the record: dequantize's traffic is ~80% writes (4 bit to bf16)
    fill_ms, _ = time_calls([lambda: dst.fill_(1.0)] * 5, replays)
    res = dict(memcpy=2 * n / (memcpy_ms * 1e-3), kernel=2 * n / (kernel_ms * 1e-3))
    res["ceiling"] = max(res.values())
    res["write_only"] = n / (fill_ms * 1e-3)
    return res


# ---------------------------------------------------------------------------------------------------------------
# states

def mixed_bits(rows: int, gen: torch.Generator) -> torch.Tensor:
    n1, n4 = round(MIX_175[0] * rows), round(MIX_175[2] * rows)
    bits = torch.tensor([1] * n1 + [2] * (rows - n1 - n4) + [4] * n4, dtype=torch.uint8)
    return bits[torch.randperm(rows, generator=gen)]


def lowra_state(W: torch.Tensor, bits: torch.Tensor, double_quant: bool = False) -> dict:
    """A LowRA state of W; double_quant: the block scales stored as bitsandbytes' 8-bit nested code (the default of
    quantize_lowra(compress_statistics=True) and LowRAConfig), passed to the op as stored ("nested")."""
    from .. import _ops
    from ..codebooks import nf_tables
    from ..format import row_offsets
    from ..functional import double_quantize_absmax

    rows, cols = W.shape
    code, thr = nf_tables(bits)
    bits, code, thr = bits.cuda(), code.cuda(), thr.cuda()
    off = row_offsets(bits, cols, BLOCKSIZE)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, BLOCKSIZE)
    nested = ()
    if double_quant:
        absmax, s2, offset = double_quantize_absmax(absmax)
        nested = (s2.absmax, s2.code, offset, s2.blocksize)
    order, groups = _ops.matmul_plan(bits)
    return dict(packed=packed, absmax=absmax, nested=nested, bits=bits, code=code, thr=thr, off=off, order=order,
                groups=groups, shape=[rows, cols], avg_bits=float(bits.float().mean()))


def state_bytes(s: dict) -> dict:
    """Bytes of the stored state the kernels read: codes, absmax (+ its nested scales), codebooks (+ bits,
    offsets)."""
    codes = s["packed"].numel()
    scales = s["absmax"].numel() * s["absmax"].element_size()
    scales += sum(t.numel() * t.element_size() for t in s["nested"] if isinstance(t, torch.Tensor))
    meta = scales + s["code"].numel() * 2 + s["bits"].numel() + s["off"].numel() * 8
    return dict(codes=codes, meta=meta, total=codes + meta)


def clone_state(s: dict) -> dict:
    def clone(v):
        if isinstance(v, tuple):
            return tuple(clone(x) for x in v)
        return v.clone() if isinstance(v, torch.Tensor) else v

    return {k: clone(v) for k, v in s.items()}


# ---------------------------------------------------------------------------------------------------------------
# measurements

def dequantize_calls(s: dict, min_calls: int) -> list:
    """At least min_calls zero-argument calls, each a bf16 lowra::dequantize of a copy of state s (the copies rotate
    out of L2) into a buffer of its own, which the call returns."""
    rows, cols = s["shape"]
    reps = [clone_state(s) for _ in range(copies_for(state_bytes(s)["total"] + rows * cols * 2))]
    outs = [torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda") for _ in reps]

    def call(r, out):
        torch.ops.lowra.dequantize.out(r["packed"], r["absmax"], r["bits"], r["code"], r["off"], BLOCKSIZE, r["shape"],
                                       torch.bfloat16, *r["nested"], out=out)
        return out

    fns = [(lambda r=r, out=out: call(r, out)) for r, out in zip(reps, outs)]
    return fns * max(1, math.ceil(min_calls / len(fns)))


def time_bnb_dequantize(packed: torch.Tensor, absmax: torch.Tensor, rows: int, cols: int, replays: int,
                        min_calls: int) -> tuple[float, str]:
    """Device ms of bitsandbytes' NF4 dequantize (float32 absmax) of a rows x cols weight to bf16, timed like every
    contender, and how it was timed."""
    pk = [(packed.clone(), absmax.clone()) for _ in range(copies_for(packed.numel() + absmax.numel() * 4
                                                                     + rows * cols * 2))]
    outs = [torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda") for _ in pk]
    deq = torch.ops.bitsandbytes.dequantize_4bit.out
    fns = [(lambda i=i: deq(pk[i][0], pk[i][1], BLOCKSIZE, "nf4", [rows, cols], torch.bfloat16, out=outs[i]))
           for i in range(len(pk))] * max(1, math.ceil(min_calls / len(pk)))
    return time_calls(fns, replays)


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """A bench module's --shapes: "R1xC1,R2xC2" -> [(R1, C1), (R2, C2)]."""
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]


def bench_shape(rows: int, cols: int, batches, copy_bw: float, replays: int, min_calls: int, bnb,
                only: str | None = None) -> dict:
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    W = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16).cuda()
    res: dict = {"shape": [rows, cols]}
    bits175 = mixed_bits(rows, gen)
    states = {
        "lowra_4bit": lowra_state(W, torch.full((rows,), 4, dtype=torch.uint8)),
        "lowra_1.75bit": lowra_state(W, bits175),
    }
    # the fused matmul also on double-quantized scales, as LowRAConfig / QLoRA store them by default
    dq_states = {"lowra_1.75bit_dq": lowra_state(W, bits175, double_quant=True)}
    bnb_packed, bnb_qs = bnb.functional.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4")
    bnb_bytes = bnb_packed.numel() + bnb_qs.absmax.numel() * 4
    bnb_dq = bnb.functional.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    w_bytes = W.numel() * 2

    # quantize (bf16 weight in, packed codes + absmax out)
    q = {}
    for name, s in (states.items() if only in (None, "quantize") else ()):
        sb = state_bytes(s)
        ins = [W.clone() for _ in range(copies_for(w_bytes + sb["total"]))]
        outs = [(torch.empty_like(s["packed"]), torch.empty_like(s["absmax"])) for _ in ins]

        def make(i, s=s, ins=ins, outs=outs):
            return lambda: torch.ops.lowra.quantize.out(ins[i], s["bits"], s["thr"], s["off"], BLOCKSIZE,
                                                        packed=outs[i][0], absmax=outs[i][1])

        fns = [make(i) for i in range(len(ins))] * max(1, math.ceil(min_calls / len(ins)))
        ms, how = time_calls(fns, replays)
        nbytes = w_bytes + sb["codes"] + s["absmax"].numel() * 4 + s["thr"].numel() * 2
        q[name] = dict(ms=ms, tb_s=nbytes / (ms * 1e-3) / 1e12, timing=how)
        del ins, outs
    if only in (None, "quantize"):
        ins = [W.clone() for _ in range(copies_for(w_bytes + bnb_bytes))]
        fns = [(lambda i=i: torch.ops.bitsandbytes.quantize_4bit.default(ins[i], BLOCKSIZE, "nf4", torch.uint8))
               for i in range(len(ins))] * max(1, math.ceil(min_calls / len(ins)))
        # bitsandbytes launches its quantize kernel on the legacy default stream, which a graph capture forbids
        ms, how = time_calls(fns, replays, graph=False)
        q["bnb_nf4"] = dict(ms=ms, tb_s=(w_bytes + bnb_bytes) / (ms * 1e-3) / 1e12, timing=how)
        del ins
        q["speedup_4bit_vs_bnb"] = q["bnb_nf4"]["ms"] / q["lowra_4bit"]["ms"]
        res["quantize"] = q
    if only == "quantize":
        return res

    # dequantize to bf16
    d = {}
    out_bytes = rows * cols * 2
    # (and on double-quantized scales, which dequantize decodes in the kernel)
    for name, s in ({**states, **dq_states}.items() if only in (None, "dequantize") else ()):
        sb = state_bytes(s)
        ms, how = time_calls(dequantize_calls(s, min_calls), replays)
        bw = (sb["total"] + out_bytes) / (ms * 1e-3)
        d[name] = dict(ms=ms, tb_s=bw / 1e12, frac_of_copy=bw / copy_bw, timing=how)
    if only in (None, "dequantize"):
        ms, how = time_bnb_dequantize(bnb_packed, bnb_qs.absmax, rows, cols, replays, min_calls)
        bw = (bnb_bytes + out_bytes) / (ms * 1e-3)
        d["bnb_nf4"] = dict(ms=ms, tb_s=bw / 1e12, frac_of_copy=bw / copy_bw, timing=how)
        d["speedup_4bit_vs_bnb"] = d["bnb_nf4"]["ms"] / d["lowra_4bit"]["ms"]
        # A copy moving as many bytes as the 4-bit dequantize (read + written), timed the same way: at small sizes
        # launch ramp-up and the tail take a share that the 2 GiB ceiling does not see. An elementwise kernel (the
        # ceiling's "kernel" copy), not copy_: a same-dtype copy_ captured in a graph becomes a memcpy node, which
        # measured ~2.7 TB/s here.
        half = (state_bytes(states["lowra_4bit"])["total"] + out_bytes) // 2 // 16 * 4  # float32 elements
        bufs = [(torch.empty(half, device="cuda"), torch.empty(half, device="cuda")) for _ in range(copies_for(8 * half))]
        fns = [(lambda i=i: torch.mul(bufs[i][0], 1.0, out=bufs[i][1])) for i in range(len(bufs))] * max(
            1, math.ceil(min_calls / len(bufs)))
        ms, how = time_calls(fns, replays)
        d["copy_same_bytes"] = dict(ms=ms, tb_s=8 * half / (ms * 1e-3) / 1e12, timing=how)
        d["lowra_4bit"]["frac_of_same_size_copy"] = ms / d["lowra_4bit"]["ms"]
        del bufs
        mix = copy_dequant_mix(out_bytes, min_calls, replays)
        if mix is not None:
            d["copy_dequant_mix"] = mix
            lw = d["lowra_4bit"]
            lw["frac_of_mix_copy"] = lw["tb_s"] / mix["tb_s"]
        res["dequantize"] = d
    if only == "dequantize":
        return res

    # fused decode matmul
    from ..backends import native

    mm = {}
    # The same states timed under a knob, to compare: "_prepass", double-quantized scales decoded in a pass of their
    # own before the GEMV instead of inside it; at m = 1 only, "_multirow" the multi-row GEMV instead of the batch-1
    # kernel, "_b1r2" / "_b1r4" the batch-1 kernel at 2 / 4 rows per task, "_narrow" / "_wide" the batch-1 kernel
    # never / always in wide steps.
    variants = {"lowra_1.75bit_dq_prepass": ("lowra_1.75bit_dq", dict(nested_prepass=1)),
                "lowra_1.75bit_narrow": ("lowra_1.75bit", dict(gemv_batch1=0, gemv_wide=-1)),
                "lowra_1.75bit_wide": ("lowra_1.75bit", dict(gemv_batch1=0, gemv_wide=1)),
                "lowra_1.75bit_dq_narrow": ("lowra_1.75bit_dq", dict(gemv_batch1=0, gemv_wide=-1)),
                "lowra_1.75bit_multirow": ("lowra_1.75bit", dict(gemv_batch1=-1)),
                "lowra_1.75bit_dq_multirow": ("lowra_1.75bit_dq", dict(gemv_batch1=-1)),
                "lowra_1.75bit_b1r2": ("lowra_1.75bit", dict(gemv_batch1=2)),
                "lowra_1.75bit_b1r4": ("lowra_1.75bit", dict(gemv_batch1=4))}
    mm_states = {**states, **dq_states}
    mm_states.update({name: mm_states[src] for name, (src, _) in variants.items()})
    reps = {name: [clone_state(s) for _ in range(copies_for(state_bytes(s)["total"]))]
            for name, s in mm_states.items()}
    bnb_reps = [(bnb_packed.clone(), bnb_qs) for _ in range(copies_for(bnb_bytes))]
    bnb_dq_reps = [(bnb_dq[0].clone(), bnb_dq[1]) for _ in range(copies_for(bnb_bytes))]
    dense = [W.clone() for _ in range(copies_for(w_bytes))]
    for m in batches:
        A = (torch.randn(m, cols, generator=gen)).to(torch.bfloat16).cuda()
        row = {}
        for name, rs in reps.items():
            tuning = variants.get(name, (None, {}))[1]
            if m > 1 and "gemv_batch1" in tuning:  # the batch-1 knob changes nothing above one row
                continue

            def make(r):
                return lambda: torch.ops.lowra.matmul(A, r["packed"], r["absmax"], r["bits"], r["code"], r["off"],
                                                      BLOCKSIZE, r["shape"], None, r["order"], r["groups"],
                                                      *r["nested"])

            fns = [make(r) for r in rs] * max(1, math.ceil(min_calls / len(rs)))
            native.set_matmul_tuning(**tuning)
            try:
                ms, how = time_calls(fns, replays)
            finally:
                native.set_matmul_tuning()
            sb = state_bytes(mm_states[name])
            row[name] = dict(ms=ms, timing=how,
                             frac_of_bound_codes=sb["codes"] / copy_bw / (ms * 1e-3),
                             frac_of_bound_all=sb["total"] / copy_bw / (ms * 1e-3))
        with torch.no_grad():
            fns = [(lambda p=p, qs=qs: bnb.matmul_4bit(A, p.t(), quant_state=qs)) for p, qs in bnb_reps]
            ms, how = time_calls(fns * max(1, math.ceil(min_calls / len(fns))), replays)
            row["bnb_nf4"] = dict(ms=ms, timing=how)
            fns = [(lambda p=p, qs=qs: bnb.matmul_4bit(A, p.t(), quant_state=qs)) for p, qs in bnb_dq_reps]
            ms, how = time_calls(fns * max(1, math.ceil(min_calls / len(fns))), replays)
            row["bnb_nf4_dq"] = dict(ms=ms, timing=how)
            fns = [(lambda w=w: torch.nn.functional.linear(A, w)) for w in dense]
            ms, how = time_calls(fns * max(1, math.ceil(min_calls / len(fns))), replays)
            row["bf16"] = dict(ms=ms, timing=how)
        ours = row["lowra_1.75bit"]["ms"]
        row["speedup_1.75bit_vs_bnb"] = row["bnb_nf4"]["ms"] / ours
        row["speedup_1.75bit_vs_bf16"] = row["bf16"]["ms"] / ours
        row["speedup_4bit_vs_bnb"] = row["bnb_nf4"]["ms"] / row["lowra_4bit"]["ms"]
        row["speedup_1.75bit_dq_vs_bnb_dq"] = row["bnb_nf4_dq"]["ms"] / row["lowra_1.75bit_dq"]["ms"]
        mm[str(m)] = row
    res["matmul"] = mm

    # the numbers above are of a correct product
    s = states["lowra_1.75bit"]
    from ..backends import reference

    A = torch.randn(4, cols, generator=gen).to(torch.bfloat16).cuda()
    y = torch.ops.lowra.matmul(A, s["packed"], s["absmax"], s["bits"], s["code"], s["off"], BLOCKSIZE, s["shape"],
                               None, s["order"], s["groups"])
    ref = reference.matmul(A, s["packed"], s["absmax"], s["bits"], s["code"], s["off"], BLOCKSIZE, s["shape"])
    res["check"] = dict(matmul_rel_err=float((y.double() - ref.double()).norm() / ref.double().norm()),
                        avg_bits={k: v["avg_bits"] for k, v in states.items()},
                        bytes={k: state_bytes(v) for k, v in states.items()}, bnb_bytes=bnb_bytes)
    s = dq_states["lowra_1.75bit_dq"]
    y_dq = torch.ops.lowra.matmul(A, s["packed"], s["absmax"], s["bits"], s["code"], s["off"], BLOCKSIZE, s["shape"],
                                  None, s["order"], s["groups"], *s["nested"])
    ref = reference.matmul(A, s["packed"], reference.decode_absmax(s["absmax"], *s["nested"]), s["bits"], s["code"],
                           s["off"], BLOCKSIZE, s["shape"])
    res["check"]["dq_matmul_rel_err"] = float((y_dq.double() - ref.double()).norm() / ref.double().norm())
    res["check"]["bytes"]["lowra_1.75bit_dq"] = state_bytes(s)
    del reps, bnb_reps, bnb_dq_reps, dense, states, dq_states, mm_states, W
    torch.cuda.empty_cache()
    return res


# Launch shapes swept (native.set_matmul_tuning keywords; {} = automatic): at m = 1 the batch-1 kernel's rows per
# task and the multi-row GEMV (gemv_batch1=-1); the GEMV path's rows per warp and warps along K, and the
# tensor-core path (gemv_max_rows=-1) at the same m; for 16 rows the tensor-core path's knobs.
SWEEP = {
    1: [{}, dict(gemv_batch1=2), dict(gemv_batch1=-1), dict(gemv_max_rows=-1),
        dict(gemv_batch1=-1, gemv_rows_per_warp=4), dict(gemv_batch1=-1, gemv_wk=2), dict(gemv_batch1=-1, gemv_wk=8)],
    2: [{}, dict(gemv_max_rows=-1), dict(gemv_rows_per_warp=4), dict(gemv_wk=2), dict(gemv_wk=8)],
    4: [{}, dict(gemv_max_rows=4), dict(gemv_max_rows=4, gemv_wk=2)],
    16: [{}, dict(depth=2)],
}


def matmul_sweep(rows: int, cols: int, replays: int, min_calls: int, bits=None) -> list:
    """Launch shapes of the fused matmul (SWEEP) on one layer (1.75-bit mix unless `bits` is given)."""
    gen = torch.Generator().manual_seed(5)
    W = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16).cuda()
    s = lowra_state(W, mixed_bits(rows, gen) if bits is None else torch.full((rows,), bits, dtype=torch.uint8))
    out = []
    for m, configs in SWEEP.items():
        A = torch.randn(m, cols, generator=gen).to(torch.bfloat16).cuda()
        for cfg, ms in zip(configs, time_tunings(s, A, configs, replays, min_calls)):
            out.append(dict(shape=[rows, cols], avg_bits=s["avg_bits"], m=m, tuning=cfg, ms=ms))
    return out


def time_tunings(s: dict, A: torch.Tensor, tunings, replays: int, min_calls: int) -> list:
    """Device ms of one lowra::matmul of A by state s under each native.set_matmul_tuning keywords in `tunings`
    (the state rotated out of L2; the automatic choice restored after each)."""
    from ..backends import native

    rs = [clone_state(s) for _ in range(copies_for(state_bytes(s)["total"]))]
    fns = [(lambda r=r: torch.ops.lowra.matmul(A, r["packed"], r["absmax"], r["bits"], r["code"], r["off"], BLOCKSIZE,
                                               r["shape"], None, r["order"], r["groups"], *r["nested"])) for r in rs]
    fns = fns * max(1, math.ceil(min_calls / len(fns)))
    times = []
    for cfg in tunings:
        native.set_matmul_tuning(**cfg)
        try:
            times.append(time_calls(fns, replays)[0])
        finally:
            native.set_matmul_tuning()
    return times


def environment() -> dict:
    import bitsandbytes

    from .. import __version__

    p = torch.cuda.get_device_properties(0)
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                torch=torch.__version__, cuda=torch.version.cuda, bitsandbytes=bitsandbytes.__version__,
                bitsandbytes_lowra=__version__, python=platform.python_version())


def require_gpu_bench():
    """bitsandbytes, once this machine can run the comparisons (BenchUnavailable says why not)."""
    if not torch.cuda.is_available():
        raise BenchUnavailable("needs a CUDA GPU")
    from .. import _native

    if not _native.has_cuda():
        raise BenchUnavailable("the native library was built without CUDA")
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise BenchUnavailable(f"bitsandbytes is not importable: {e}") from e
    return bnb


def report(name: str, measure, table, json_path: str | None) -> int:
    """A bench module's end: run measure(), print table(rows) and write {environment, rows} to json_path; exit status
    2 with the reason where this machine cannot run it."""
    try:
        rows = measure()
    except BenchUnavailable as e:
        print(f"bench.{name}: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(environment=environment(), rows=rows), f, indent=1)
    return 0


def run(shapes, batches, quick: bool = False, sweep: bool = True, only: str | None = None) -> dict:
    """only="quantize" / "dequantize" / "matmul" measures that comparison alone (the sweep goes with the matmul)."""
    bnb = require_gpu_bench()
    torch.manual_seed(0)
    replays, min_calls = (3, 8) if quick else (10, 24)
    res = dict(environment=environment(), method=__doc__.split("\n\n")[1].replace("\n", " "), blocksize=BLOCKSIZE)
    bw = copy_bandwidth(replays)
    res["copy_bandwidth_tb_s"] = bw["ceiling"] / 1e12
    res["copy_bandwidth_detail_tb_s"] = {k: v / 1e12 for k, v in bw.items()}
    copy_bw = bw["ceiling"]
    res["shapes"] = []
    for rows, cols in shapes:
        res["shapes"].append(bench_shape(rows, cols, batches, copy_bw, replays, min_calls, bnb, only))
        print(f"bench: {rows}x{cols} done", flush=True)
    if sweep and only in (None, "matmul"):
        big = max(shapes, key=lambda s: s[0] * s[1])
        res["matmul_sweep"] = matmul_sweep(big[0], big[1], replays, min_calls)
        res["matmul_sweep"] += matmul_sweep(big[0], big[1], replays, min_calls, bits=4)
    return res


def table(res: dict) -> str:
    env = res["environment"]
    lines = [f"{env['gpu']}  torch {env['torch']}  CUDA {env['cuda']}  bitsandbytes {env['bitsandbytes']}  "
             f"{env['date']}   copy {res['copy_bandwidth_tb_s']:.2f} TB/s"]
    lines.append(f"{'shape':>12} | {'quantize TB/s (lowra4 / bnb)':>28} | {'dequant %copy (lowra4 / 1.75 / bnb)':>36}")
    for s in res["shapes"]:
        if "quantize" not in s and "dequantize" not in s:
            continue
        line = f"{s['shape'][0]:>5}x{s['shape'][1]:<6} | "
        if "quantize" in s:
            q = s["quantize"]
            line += (f"{q['lowra_4bit']['tb_s']:>9.2f} / {q['bnb_nf4']['tb_s']:<5.2f} ({q['speedup_4bit_vs_bnb']:>4.1f}x)"
                     f"    | ")
        else:
            line += f"{'-':>28} | "
        if "dequantize" in s:
            d = s["dequantize"]
            lw = d["lowra_4bit"]
            mix = f", {lw['frac_of_mix_copy']:.0%} of a 1:4 copy" if "frac_of_mix_copy" in lw else ""
            line += (f"{lw['frac_of_copy']:>9.0%} / {d['lowra_1.75bit']['frac_of_copy']:>4.0%} / "
                     f"{d['bnb_nf4']['frac_of_copy']:>4.0%} ({d['speedup_4bit_vs_bnb']:.2f}x; lowra4 "
                     f"{lw['frac_of_same_size_copy']:.0%} of a same-size copy{mix})")
            if "lowra_1.75bit_dq" in d:
                line += f" 1.75 dq {d['lowra_1.75bit_dq']['ms'] * 1e3:.1f} us"
        else:
            line += f"(lowra 1.75-bit quantize {q['lowra_1.75bit']['tb_s']:.2f} TB/s)"
        lines.append(line)
    lines.append(f"{'shape':>12} {'m':>3} | {'lowra1.75 us':>12} {'%bound codes':>12} {'lowra4 us':>10} "
                 f"{'bnb us':>8} {'bf16 us':>8} | {'x bnb':>6} {'x bf16':>6} | double quant: "
                 f"{'lowra1.75 us':>12} {'prepass us':>10} {'bnb us':>8} {'x bnb':>6}")
    for s in res["shapes"]:
        for m, r in s.get("matmul", {}).items():
            lines.append(f"{s['shape'][0]:>5}x{s['shape'][1]:<6} {m:>3} | {r['lowra_1.75bit']['ms'] * 1e3:>12.1f} "
                         f"{r['lowra_1.75bit']['frac_of_bound_codes']:>12.0%} {r['lowra_4bit']['ms'] * 1e3:>10.1f} "
                         f"{r['bnb_nf4']['ms'] * 1e3:>8.1f} {r['bf16']['ms'] * 1e3:>8.1f} | "
                         f"{r['speedup_1.75bit_vs_bnb']:>6.2f} {r['speedup_1.75bit_vs_bf16']:>6.2f} | "
                         f"{'':>14}{r['lowra_1.75bit_dq']['ms'] * 1e3:>12.1f} "
                         f"{r['lowra_1.75bit_dq_prepass']['ms'] * 1e3:>10.1f} {r['bnb_nf4_dq']['ms'] * 1e3:>8.1f} "
                         f"{r['speedup_1.75bit_dq_vs_bnb_dq']:>6.2f}")
    for sw in res.get("matmul_sweep", []):
        cfg = " ".join(f"{k}={v}" for k, v in sw["tuning"].items()) or "automatic"
        lines.append(f"sweep {sw['shape'][0]}x{sw['shape'][1]} {sw['avg_bits']:.2f} bits m={sw['m']:<2} {cfg}: "
                     f"{sw['ms'] * 1e3:.1f} us")
    return "\n".join(lines)
