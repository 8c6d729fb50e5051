"""CUDA kernels (quantize, dequantize: bit-identical to the reference; fused matmul: within float tolerance) and the
lowra::matmul / lowra::quantize.out ops. Tests marked `cuda` need a GPU (`make gpu-check`); the rest run in CI."""

import itertools

import pytest
import torch

import bitsandbytes_lowra  # noqa: F401  (registers the ops)
from bitsandbytes_lowra import _native
from bitsandbytes_lowra._ops import matmul_plan
from bitsandbytes_lowra.backends import native, reference

from .conftest import DEQUANTIZE_TUNINGS, QUANTIZE_TUNINGS, dequantize_tuning, matmul_tuning, quantize_tuning
from .test_ops import DTYPES, make_case

cuda = pytest.mark.cuda
MIXES = [(1,), (2,), (4,), (1, 2), (2, 4), (1, 4), (1, 2, 4)]


def state(W, bits, thr, off, bs):
    packed, absmax = reference.quantize(W, bits, thr, off, bs)
    return packed, absmax


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}


# ---------------------------------------------------------------------------------------------------------------
# CPU: the new ops against the reference (these run in CI)

def test_matmul_plan_groups_rows_by_precision():
    bits = torch.tensor([4, 1, 2, 1, 4, 2, 2], dtype=torch.uint8)
    order, groups = matmul_plan(bits)
    assert order.dtype == torch.int32 and groups == [2, 3, 2]
    assert order.tolist() == [1, 3, 2, 5, 6, 0, 4]  # stable inside a group


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_cpu_matches_reference(dtype, with_bias):
    W, bits, code, thr, off = make_case(24, 200, 64, dtype, seed=7)
    packed, absmax = state(W, bits, thr, off, 64)
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(2, 3, 200, generator=gen).to(dtype)
    bias = torch.randn(24, generator=gen).to(dtype) if with_bias else None
    out = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [24, 200], bias)
    ref = reference.matmul(A, packed, absmax, bits, code, off, 64, [24, 200], bias)
    assert out.shape == (2, 3, 24) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    # the reference is what dequantize + linear gives in float32
    Wd = torch.ops.lowra.dequantize(packed, absmax, bits, code, off, 64, [24, 200], torch.float32)
    dense = torch.nn.functional.linear(A.float(), Wd, None if bias is None else bias.float()).to(dtype)
    assert torch.equal(ref, dense)


def test_matmul_out_and_plan_arguments_cpu():
    W, bits, code, thr, off = make_case(8, 64, 32, torch.float32, seed=2)
    packed, absmax = state(W, bits, thr, off, 32)
    A = torch.randn(3, 64)
    order, groups = matmul_plan(bits)
    out = torch.full((3, 8), float("nan"))
    torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, 32, [8, 64], None, order, groups, out=out)
    assert torch.allclose(out, reference.matmul(A, packed, absmax, bits, code, off, 32, [8, 64]), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="together"):
        torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 32, [8, 64], None, order, None)
    with pytest.raises(RuntimeError, match="summing to 8"):
        torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 32, [8, 64], None, order, [1, 2, 3])
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.lowra.matmul(A[:, :32], packed, absmax, bits, code, off, 32, [8, 64])
    with pytest.raises(RuntimeError, match="bias must have"):
        torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 32, [8, 64], torch.zeros(8, dtype=torch.float16))


def test_quantize_out_matches_quantize_cpu():
    W, bits, code, thr, off = make_case(5, 130, 64, torch.bfloat16, seed=4)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, 64)
    p2 = torch.empty_like(packed)
    a2 = torch.empty_like(absmax)
    torch.ops.lowra.quantize.out(W, bits, thr, off, 64, packed=p2, absmax=a2)
    assert torch.equal(p2, packed) and torch.equal(a2, absmax)
    with pytest.raises(RuntimeError, match="absmax must be"):
        torch.ops.lowra.quantize.out(W, bits, thr, off, 64, packed=p2, absmax=a2[:, :1])


def test_opcheck_new_ops():
    W, bits, code, thr, off = make_case(6, 96, 32, torch.float16, seed=9)
    packed, absmax = state(W, bits, thr, off, 32)
    A = torch.randn(2, 96).half()
    order, groups = matmul_plan(bits)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.lowra.matmul.default, (A, packed, absmax, bits, code, off, 32, [6, 96]),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.lowra.matmul.default,
                          (A, packed, absmax, bits, code, off, 32, [6, 96], None, order, groups), test_utils=utils)
    torch.library.opcheck(torch.ops.lowra.matmul.out, (A, packed, absmax, bits, code, off, 32, [6, 96]),
                          {"out": torch.empty(2, 6, dtype=torch.float16)}, test_utils=utils)
    torch.library.opcheck(torch.ops.lowra.quantize.out, (W, bits, thr, off, 32),
                          {"packed": torch.empty_like(packed), "absmax": torch.empty_like(absmax)}, test_utils=utils)


# ---------------------------------------------------------------------------------------------------------------
# CUDA: quantize / dequantize bit-identical to the reference

# (rows, cols, blocksize): fast paths (power-of-two blocksize <= 256, cols % 8 == 0), the generic quantize
# (blocksize 24, 512, 4096, odd cols), tiny rows (1 column, 1 byte per 1-bit row) and a huge row. Dequantize's
# full-segment path (2048-column segments of 16-bit outputs) runs on the rows of >= 2048 columns: with blocks of 8
# and rows that start unaligned (9 x 2056: a 1-bit row is 257 bytes), blocks of 32, a non-power-of-two blocksize
# that must stay off it (2400 x 24), and blocks longer than a segment (4096). The streamed kernel (16-bit outputs,
# columns a multiple of 256, blocks of 32 to 2048) runs on 1536, 4096, 6144 and 65536 columns, and on a last
# segment of 256 (2304) or 768 columns (11008, a Llama MLP width), rows shorter than a segment (768) and one
# block per segment (2048).
QD_SHAPES = [
    (1, 1, 8), (3, 7, 8), (5, 8, 8), (33, 100, 64), (16, 576, 64), (9, 130, 32), (7, 1536, 64), (4, 4100, 128),
    (6, 200, 24), (3, 1000, 512), (2, 4096, 4096), (64, 4096, 64), (2, 65536, 256), (130, 264, 8),
    (9, 2056, 8), (5, 6144, 32), (3, 2400, 24), (3, 2304, 64), (5, 11008, 64), (4, 768, 128), (2, 4096, 2048),
]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QD_SHAPES)
def test_cuda_quantize_dequantize_bit_identical(shape, dtype):
    rows, cols, bs = shape
    for mix in MIXES:
        W, bits, code, thr, off = make_case(rows, cols, bs, dtype, seed=rows * 7919 + cols + len(mix), mix=mix)
        ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, bs)
        ref_out = reference.dequantize(ref_packed, ref_absmax, bits, code, off, bs, [rows, cols], dtype)
        d = [t.cuda() for t in (W, bits, code, thr, off)]
        for tuning in QUANTIZE_TUNINGS:
            with quantize_tuning(*tuning):
                packed, absmax = torch.ops.lowra.quantize(d[0], d[1], d[3], d[4], bs)
            assert torch.equal(packed.cpu(), ref_packed), f"packed differs, mix {mix}, tuning {tuning}"
            assert torch.equal(absmax.cpu(), ref_absmax), f"absmax differs, mix {mix}, tuning {tuning}"
        out = torch.ops.lowra.dequantize(packed, absmax, d[1], d[2], d[4], bs, [rows, cols], dtype)
        assert torch.equal(out.cpu(), ref_out), f"dequantized differs, mix {mix}"
        for tuning in DEQUANTIZE_TUNINGS:
            with dequantize_tuning(*tuning):
                out = torch.ops.lowra.dequantize(packed, absmax, d[1], d[2], d[4], bs, [rows, cols], dtype)
            assert torch.equal(out.cpu(), ref_out), f"dequantized differs, mix {mix}, tuning {tuning}"


def test_set_dequantize_tuning_takes_only_valid_runs_and_pdl_modes():
    with pytest.raises(ValueError, match=r"run must be 0 \(automatic\), -1 \(resident grid\) or a positive task count"):
        native.set_dequantize_tuning(-3)
    with pytest.raises(ValueError, match="pdl must be 0 .automatic., 1 .always. or -1 .never., got 2"):
        native.set_dequantize_tuning(1, 2)
    native.set_dequantize_tuning(4, 1)  # accepted with or without CUDA
    native.set_dequantize_tuning()


def test_set_quantize_tuning_takes_only_the_two_task_widths_and_valid_runs():
    with pytest.raises(ValueError, match="task_bytes must be 0 .automatic., 64 or 128, got 96"):
        native.set_quantize_tuning(96)
    with pytest.raises(ValueError, match="run must be 0 .automatic., -1 .even split. or a positive task count, got -2"):
        native.set_quantize_tuning(64, -2)
    native.set_quantize_tuning(128, 5)  # accepted with or without CUDA
    native.set_quantize_tuning()


@cuda
@pytest.mark.parametrize("shape", [(64, 4096, 64), (5, 11008, 64), (130, 264, 8), (33, 100, 64), (7, 1536, 32)])
def test_cuda_quantize_every_tuning_on_a_mix(shape):
    """Rows of mixed precision, in a buffer of their own size and in one of all rows' 4-bit size (or larger, which
    the launcher reads as one precision), at every setting of QUANTIZE_TUNINGS (both lane widths, runs of 3 tasks,
    the even split): always bit-identical to the reference, and bytes past the rows stay untouched."""
    rows, cols, bs = shape
    pc = -(-cols // bs) * bs
    uniform_sizes = {rows * pc // 8, rows * pc // 4, rows * pc // 2}  # what the launcher reads as one precision
    seed = rows + cols
    while True:  # the first seed whose rows are a mix by the launcher's test too
        W, bits, code, thr, off = make_case(rows, cols, bs, torch.bfloat16, seed=seed, mix=(1, 2, 4))
        if int(off[-1]) not in uniform_sizes:
            break
        seed += 1
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, bs)
    d = [t.cuda() for t in (W, bits, thr, off)]
    for nbytes, tuning in itertools.product((ref_packed.numel(), rows * pc // 2 + 64), QUANTIZE_TUNINGS):
        packed = torch.full((nbytes,), 0xAB, dtype=torch.uint8, device="cuda")
        absmax = torch.empty_like(ref_absmax, device="cuda")
        with quantize_tuning(*tuning):
            torch.ops.lowra.quantize.out(*d, bs, packed=packed, absmax=absmax)
        n, how = ref_packed.numel(), f"{nbytes}-byte buffer, tuning {tuning}"
        assert torch.equal(packed[:n].cpu(), ref_packed), f"packed differs ({how})"
        assert torch.equal(absmax.cpu(), ref_absmax), f"absmax differs ({how})"
        assert bool((packed[n:] == 0xAB).all()), f"bytes past the rows written ({how})"


@cuda
@pytest.mark.parametrize("mix", [False, True])
def test_cuda_quantize_corrupt_metadata_is_skipped_not_followed(mix):
    """A row whose bits is not 1, 2 or 4 and one whose offset runs past the buffer are skipped and counted (the
    kernel cannot raise); every other row is bit-identical to the reference, the skipped rows' bytes and scales are
    untouched, and warps carry on with their later tasks (about two per warp at this size). mix: rows of 1, 2 and 4
    bits (64 bytes per lane); else all rows 4-bit (128)."""
    rows, cols, bs = 2048, 4096, 64
    W, bits, code, thr, off = make_case(rows, cols, bs, torch.bfloat16, seed=9, mix=(1, 2, 4) if mix else (4,))
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, bs)
    bad_bits, bad_off = bits.clone(), off.clone()
    bad_bits[100] = 3
    bad_off[1000] = ref_packed.numel() - 1  # row 1000 would run past the end
    packed = torch.full((ref_packed.numel(),), 0xAB, dtype=torch.uint8, device="cuda")
    absmax = torch.full(ref_absmax.shape, float("nan"), device="cuda")
    native.skipped_rows()  # drain earlier counts
    torch.ops.lowra.quantize.out(W.cuda(), bad_bits.cuda(), thr.cuda(), bad_off.cuda(), bs, packed=packed,
                                 absmax=absmax)
    assert native.skipped_rows() == 2
    packed, absmax = packed.cpu(), absmax.cpu()
    keep = torch.ones(rows, dtype=torch.bool)
    keep[[100, 1000]] = False
    assert torch.equal(absmax[keep], ref_absmax[keep]) and bool(absmax[~keep].isnan().all())
    untouched = torch.zeros(ref_packed.numel(), dtype=torch.bool)
    for r in (100, 1000):
        untouched[int(off[r]):int(off[r + 1])] = True
    assert torch.equal(packed[~untouched], ref_packed[~untouched])
    assert bool((packed[untouched] == 0xAB).all())


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unaligned_views_take_the_safe_paths(dtype):
    """A weight view starting one element in, and an output view likewise: byte-wise and scalar paths."""
    rows, cols, bs = 12, 256, 64
    W, bits, code, thr, off = make_case(rows, cols, bs, dtype, seed=3)
    base = torch.cat([torch.zeros(1, dtype=dtype), W.flatten()]).cuda()
    Wv = base[1:].view(rows, cols)
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, bs)
    packed, absmax = torch.ops.lowra.quantize(Wv, bits.cuda(), thr.cuda(), off.cuda(), bs)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
    buf = torch.full((rows * cols + 1,), float("nan"), dtype=dtype, device="cuda")
    out = buf[1:].view(rows, cols)
    torch.ops.lowra.dequantize.out(packed, absmax, bits.cuda(), code.cuda(), off.cuda(), bs, [rows, cols], dtype, out=out)
    assert torch.equal(out.cpu(), reference.dequantize(ref_packed, ref_absmax, bits, code, off, bs, [rows, cols], dtype))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_dequantize_rows_off_the_16_byte_grid(dtype):
    """Row offsets that row_offsets() would not lay out (row r moved 3 r + 1 bytes into a larger buffer) reach the
    streamed kernel's byte-copy path and still decode bit-identically; a row with bits 3 is skipped and counted."""
    rows, cols, bs = 10, 2304, 64
    W, bits, code, thr, off = make_case(rows, cols, bs, dtype, seed=11)
    packed, absmax = reference.quantize(W, bits, thr, off, bs)
    moved = off + torch.arange(rows + 1, dtype=torch.int64) * 3 + 1
    buf = torch.randint(0, 256, (int(moved[-1]) + 5,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for r in range(rows):
        buf[moved[r]:moved[r] + off[r + 1] - off[r]] = packed[off[r]:off[r + 1]]
    ref = reference.dequantize(packed, absmax, bits, code, off, bs, [rows, cols], dtype)
    bad_bits = bits.clone()
    bad_bits[4] = 3
    native.skipped_rows()  # drain earlier counts
    out = torch.ops.lowra.dequantize(buf.cuda(), absmax.cuda(), bad_bits.cuda(), code.cuda(), moved.cuda(), bs,
                                     [rows, cols], dtype)
    assert native.skipped_rows() == 1
    keep = [r for r in range(rows) if r != 4]
    assert torch.equal(out.cpu()[keep], ref[keep])


@cuda
@pytest.mark.parametrize("hazard", ["reads what the kernel before wrote", "overwrites what the kernel before reads"])
@pytest.mark.parametrize("tuning", [(0, 1), (-1, 1), (0, 0)])
@pytest.mark.parametrize("nested", [False, True], ids=["float32-scales", "double-quantized-scales"])
def test_cuda_dequantize_as_a_programmatic_dependent_in_a_graph(hazard, tuning, nested):
    """Launched as a programmatic dependent (PDL) inside a captured CUDA graph, the streamed dequantize starts only
    after the kernel right before it: it decodes the codes a quantize just wrote, and the kernel before it still reads
    the old contents of the output it overwrites. Large enough (6144 x 2048: 6144 warp tasks, more than the H200's
    5280 resident warps) that the automatic choice takes PDL too. Double-quantized scales: those of W2's own
    quantize, double-quantized before the capture (the codes are still the ones the quantize in the graph writes)."""
    from bitsandbytes_lowra.functional import double_quantize_absmax

    rows, cols, bs = 6144, 2048, 64
    W, bits, code, thr, off = (t.cuda() for t in make_case(rows, cols, bs, torch.bfloat16, seed=5))
    W2 = torch.randn(rows, cols, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).cuda()
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, bs)
    p2, a2 = torch.empty_like(packed), torch.empty_like(absmax)
    scales = (a2,)  # what the dequantize in the graph reads: the quantize's float32 scales, or W2's nested ones
    if nested:
        q, s2, offset = double_quantize_absmax(torch.ops.lowra.quantize(W2, bits, thr, off, bs)[1])
        scales = (q, s2.absmax, s2.code, offset, s2.blocksize)
    out = torch.ops.lowra.dequantize(packed, absmax, bits, code, off, bs, [rows, cols], torch.bfloat16)
    old = out.clone()
    y = torch.empty_like(out)
    steps = [lambda: torch.ops.lowra.quantize.out(W2, bits, thr, off, bs, packed=p2, absmax=a2),
             lambda: torch.mul(out, 2.0, out=y)]
    if hazard.startswith("reads"):
        steps.reverse()  # the quantize right before the dequantize
    with dequantize_tuning(*tuning):
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for step in steps:
                step()
            torch.ops.lowra.dequantize.out(p2, scales[0], bits, code, off, bs, [rows, cols], torch.bfloat16,
                                           *scales[1:], out=out)
        graph.replay()
        torch.cuda.synchronize()
    p_ref, a_ref = reference.quantize(W2.cpu(), bits.cpu(), thr.cpu(), off.cpu(), bs)
    if nested:
        a_ref = reference.decode_absmax(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in scales))
    want = reference.dequantize(p_ref, a_ref, bits.cpu(), code.cpu(), off.cpu(), bs, [rows, cols], torch.bfloat16)
    assert torch.equal(out.cpu(), want), f"the dependent dequantize decoded stale codes ({hazard})"
    assert torch.equal(y, old * 2.0), f"the kernel before read the dequantize's output ({hazard})"


# ---------------------------------------------------------------------------------------------------------------
# CUDA: fused matmul against the reference

def matmul_case(rows, cols, bs, dtype, seed, mix=(1, 2, 4), m=1, lead=()):
    """A quantized weight (by the CUDA quantize op, itself checked bit-identical above), activations and a bias."""
    W, bits, code, thr, off = (t.cuda() for t in make_case(rows, cols, bs, torch.float32, seed=seed, mix=mix))
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, bs)
    gen = torch.Generator().manual_seed(seed + 1)
    A = (torch.randn(*lead, m, cols, generator=gen) * 2).to(dtype).cuda()
    bias = torch.randn(rows, generator=gen).to(dtype).cuda()
    return A, packed, absmax, bits, code, off, bias


# fast path: cols % 256 == 0, blocksize % 64 == 0; rows not a multiple of 16 leave partial tiles
FAST_SHAPES = [(16, 1024, 64), (40, 1024, 64), (100, 2304, 128), (257, 4096, 64), (48, 8192, 256)]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", FAST_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
def test_cuda_matmul_fast_path(shape, m, dtype):
    rows, cols, bs = shape
    for i, mix in enumerate(MIXES):
        A, packed, absmax, bits, code, off, bias = matmul_case(rows, cols, bs, dtype, seed=rows + m + i, mix=mix, m=m)
        b = bias if i % 2 else None
        ref = reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], b)
        order, groups = matmul_plan(bits)
        out = torch.full_like(ref, float("nan"))
        with matmul_tuning(gemv_max_rows=-1):  # the tensor cores at every m: these small layers take the GEMV to m = 4
            torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, bs, [rows, cols], b, order, groups, out=out)
            assert rel_err(out, ref) < TOL[dtype], f"mix {mix}: {rel_err(out, ref)}"
            # without a plan the op derives it (same kernels)
            out2 = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], b)
        assert torch.equal(out2, out)


@cuda
@pytest.mark.parametrize("ks", [1, 3])
@pytest.mark.parametrize("depth", [2, 3])
def test_cuda_matmul_launch_shapes(ks, depth):
    """Forced K splits (one split writes the output directly, several go through the workspace) and both
    prefetch depths compute the same product."""
    A, packed, absmax, bits, code, off, bias = matmul_case(200, 2048, 64, torch.bfloat16, seed=5, m=4)
    ref = reference.matmul(A, packed, absmax, bits, code, off, 64, [200, 2048], bias)
    order, groups = matmul_plan(bits)
    with matmul_tuning(ksplit=ks, depth=depth, gemv_max_rows=-1):  # m = 4 would take the GEMV
        out = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [200, 2048], bias, order, groups)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


# GEMV path (1-2 activation rows by default, 1-4 on layers of at most 2^24 weights; up to 4 forced here): cols % 128 == 0, power-of-two blocksize >= 32; partial 1024-column steps
# (2304, 11008, 128), K splits through the workspace (28672 columns with 2-4 rows), row counts that leave partial
# row groups
GEMV_SHAPES = [(1, 128, 32), (7, 1024, 64), (45, 2304, 128), (130, 4096, 64), (64, 11008, 64), (33, 28672, 64)]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GEMV_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_cuda_matmul_gemv_path(shape, m, dtype):
    rows, cols, bs = shape
    for i, mix in enumerate(MIXES):
        A, packed, absmax, bits, code, off, bias = matmul_case(rows, cols, bs, dtype, seed=rows + cols + m + i, mix=mix,
                                                               m=m)
        b = bias if i % 2 else None
        ref = reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], b)
        order, groups = matmul_plan(bits)
        out = torch.full_like(ref, float("nan"))
        with matmul_tuning(gemv_max_rows=4):
            torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, bs, [rows, cols], b, order, groups, out=out)
        assert rel_err(out, ref) < TOL[dtype], f"mix {mix}: {rel_err(out, ref)}"


GEMV, TENSOR = dict(gemv_max_rows=4), dict(gemv_max_rows=-1)


@cuda
@pytest.mark.parametrize("m,cases", [
    # 3-4 rows: the GEMV on layers of at most 2^24 weights, the tensor cores above
    (3, ((4096, 4096, GEMV), (4104, 4096, TENSOR))),
    (4, ((4096, 4096, GEMV), (4104, 4096, TENSOR))),
    # 2 rows above 2^24 weights: the GEMV while the activations fit two K splits (12 steps of 1024 columns each)
    (2, ((1280, 13312, GEMV), (768, 25600, TENSOR), (4096, 4096, GEMV))),
])
def test_cuda_matmul_path_by_layer_size(m, cases):
    """The automatic choice of path: its result is bit-identical to the forced path's (the two paths round
    differently)."""
    for rows, cols, path in cases:
        A, packed, absmax, bits, code, off, bias = matmul_case(rows, cols, 64, torch.bfloat16, seed=m, m=m)
        order, groups = matmul_plan(bits)
        auto = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [rows, cols], bias, order, groups)
        with matmul_tuning(**path):
            forced = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [rows, cols], bias, order, groups)
        with matmul_tuning(**(TENSOR if path is GEMV else GEMV)):
            other = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [rows, cols], bias, order, groups)
        assert torch.equal(auto, forced), (rows, cols)
        assert not torch.equal(auto, other), (rows, cols)  # else this test could not tell the paths apart
        ref = reference.matmul(A, packed, absmax, bits, code, off, 64, [rows, cols], bias)
        assert rel_err(auto, ref) < TOL[torch.bfloat16]


@cuda
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("r,wk", [(4, 0), (8, 0), (8, 1), (4, 2), (8, 4), (4, 8)])
def test_cuda_matmul_gemv_launch_shapes(r, wk, m):
    """Rows per warp (4, 8) and warps along K forced: the same product; and the tensor-core path at the same m."""
    A, packed, absmax, bits, code, off, bias = matmul_case(150, 5120, 64, torch.bfloat16, seed=m + r, m=m)
    ref = reference.matmul(A, packed, absmax, bits, code, off, 64, [150, 5120], bias)
    order, groups = matmul_plan(bits)
    outs = []
    for gemv in (4, -1):
        with matmul_tuning(gemv_max_rows=gemv, gemv_rows_per_warp=r, gemv_wk=wk):
            outs.append(torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [150, 5120], bias, order,
                                               groups))
    for out in outs:
        assert rel_err(out, ref) < TOL[torch.bfloat16]


# The batch-1 kernel (m = 1 through subset-sum tables, csrc/cuda_gemv1.cu) at both task sizes and the multi-row
# GEMV at m = 1 (batch-1 kernel off): K splits (9216 and 28672 columns), partial 1024-column steps, blocksizes
# 32-256; every third case without a plan, which the op then derives (natural row order, where warps mix precisions,
# only C callers reach: csrc/tests/test_kernels_cuda.cu)
BATCH1_SHAPES = [(1, 128, 32), (45, 2304, 128), (130, 4096, 64), (64, 11008, 64), (21, 9216, 256), (33, 28672, 64)]


# The batch-1 kernel forced (automatic from 2^24 weights) at 2 and 4 rows per task, in 1024-column and in wide steps
# (automatic on large layers), and off (the multi-row GEMV serves m = 1).
BATCH1_TUNINGS = [dict(gemv_batch1=r, gemv_wide=w) for w in (-1, 1) for r in (2, 4)] + [dict(gemv_batch1=-1)]


def batch1_id(t):
    return "off" if t["gemv_batch1"] < 0 else f"r{t['gemv_batch1']}-{'wide' if t['gemv_wide'] > 0 else 'narrow'}"


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", BATCH1_SHAPES)
@pytest.mark.parametrize("tuning", BATCH1_TUNINGS, ids=batch1_id)
def test_cuda_matmul_batch1(shape, dtype, tuning):
    rows, cols, bs = shape
    for i, mix in enumerate(MIXES):
        A, packed, absmax, bits, code, off, bias = matmul_case(rows, cols, bs, dtype, seed=rows + cols + i, mix=mix)
        b = bias if i % 2 else None
        ref = reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], b)
        order, groups = matmul_plan(bits) if i % 3 else (None, None)
        out = torch.full_like(ref, float("nan"))
        with matmul_tuning(**tuning):
            torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, bs, [rows, cols], b, order, groups, out=out)
        assert rel_err(out, ref) < TOL[dtype], f"mix {mix}: {rel_err(out, ref)}"


def batch1_wide(A, packed, absmax, bits, code, off, bs, shape, order, groups):
    """The batch-1 kernel in wide steps, forced."""
    with matmul_tuning(gemv_batch1=4, gemv_wide=1):
        return torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, bs, shape, None, order, groups)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matmul_batch1_wide_activations_over_many_binades(dtype):
    """Wide steps sum 2-bit rows in float16 on activations scaled by one power of two per K split: columns spread over
    2^-12 .. 2^4 (and a K split of zeros) keep the float32 paths' accuracy, with no overflow to inf."""
    rows, cols, bs = 64, 16384, 64
    for mix in [(2,), (1, 2, 4)]:
        A, packed, absmax, bits, code, off, _ = matmul_case(rows, cols, bs, dtype, seed=len(mix), mix=mix)
        gen = torch.Generator().manual_seed(5)
        A = A * torch.exp2(torch.randint(-12, 5, (cols,), generator=gen).float()).to(dtype).cuda()
        A[:, 8192:] = 0  # the second K split: all zero
        order, groups = matmul_plan(bits)
        out = batch1_wide(A, packed, absmax, bits, code, off, bs, [rows, cols], order, groups)
        ref = reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols])
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[dtype], f"mix {mix}: {rel_err(out, ref)}"


@cuda
def test_cuda_matmul_batch1_wide_large_2bit_codebooks_take_float32_sums():
    """A 2-bit codebook beyond +-16 would overflow float16 sums; such rows take the float32 path in wide steps.
    Entries scaled by 2^10 (still exact in float16), activations by 64: finite, and the reference's product."""
    rows, cols, bs = 32, 8192, 64
    A, packed, absmax, bits, code, off, _ = matmul_case(rows, cols, bs, torch.bfloat16, seed=3, mix=(2,))
    A = A * 64
    order, groups = matmul_plan(bits)
    big = (code.float() * 1024).half()  # entries up to 1024 (float16 exact)
    out = batch1_wide(A, packed, absmax, bits, big, off, bs, [rows, cols], order, groups)
    ref = reference.matmul(A, packed, absmax, bits, big, off, bs, [rows, cols])
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@cuda
@pytest.mark.parametrize("mix", [(1, 2, 4), (4,)])
def test_cuda_matmul_batch1_automatic_on_a_large_layer(mix):
    """The automatic choice on a layer of 42M weights, 10240 tasks of 4 rows (wide steps on GPUs of up to 213 SMs when
    it has 1- or 2-bit rows; 1024-column steps for all-4-bit rows), against the reference and the forced choices."""
    rows, cols, bs = 40960, 1024, 64
    A, packed, absmax, bits, code, off, _ = matmul_case(rows, cols, bs, torch.bfloat16, seed=11, mix=mix)
    order, groups = matmul_plan(bits)
    outs = {}
    for wide in (0, -1, 1):
        with matmul_tuning(gemv_wide=wide):
            outs[wide] = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], None, order,
                                                groups)
    ref = reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols])
    for wide, out in outs.items():
        assert rel_err(out, ref) < TOL[torch.bfloat16], f"wide={wide}"
    assert torch.equal(outs[0], outs[1 if 1 in mix or 2 in mix else -1])


@cuda
@pytest.mark.parametrize("rows,m,dtype,tuning", [(40, 4, torch.float16, dict(gemv_max_rows=4)),
                                                 (300, 1, torch.bfloat16, dict(gemv_batch1=4)),
                                                 (200, 8, torch.bfloat16, dict(ksplit=3, gemv_max_rows=-1))])
def test_cuda_matmul_gemv_k_splits_capture_in_cuda_graph(rows, m, dtype, tuning):
    """The kernels with K splits (workspace + finalize kernel) captured in a graph and replayed on new activations:
    the multi-row GEMV at m = 4, the batch-1 kernel (forced: automatic from 2^24 weights), the tiled tensor-core
    kernel at m = 8 (three splits forced; the GEMV kept out)."""
    cols, bs = 28672, 64
    A, packed, absmax, bits, code, off, bias = matmul_case(rows, cols, bs, dtype, seed=8 + m, m=m)
    order, groups = matmul_plan(bits)
    y = torch.empty(m, rows, dtype=dtype, device="cuda")

    def step():
        torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, bs, [rows, cols], bias, order, groups, out=y)

    with matmul_tuning(**tuning):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    A.copy_(torch.randn_like(A))
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], bias)) < TOL[dtype]


@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,m", [((24, 576, 64), 2), ((33, 100, 32), 5), ((16, 1024, 64), 40), ((7, 264, 8), 16)])
def test_cuda_matmul_generic_and_dense_paths(shape, m, dtype):
    """Odd shapes (generic kernel), float32 and many rows (dequantize + dense GEMM); leading batch dims."""
    rows, cols, bs = shape
    A, packed, absmax, bits, code, off, bias = matmul_case(rows, cols, bs, dtype, seed=m, m=m, lead=(2,))
    ref = reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], bias)
    out = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], bias)
    assert out.shape == (2, m, rows)
    assert rel_err(out, ref) < TOL[dtype]


@cuda
def test_cuda_matmul_large_layer_single_split():
    """A layer with enough tiles that the automatic plan keeps one K split (output written by the main kernel)."""
    A, packed, absmax, bits, code, off, bias = matmul_case(28672, 1024, 64, torch.bfloat16, seed=11, m=2)
    ref = reference.matmul(A, packed, absmax, bits, code, off, 64, [28672, 1024], bias)
    order, groups = matmul_plan(bits)
    out = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [28672, 1024], bias, order, groups)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------
# CUDA: graph capture, out=, corrupt metadata

@cuda
def test_cuda_ops_capture_in_cuda_graph():
    rows, cols, bs = 64, 1024, 64
    W, bits, code, thr, off = (t.cuda() for t in make_case(rows, cols, bs, torch.bfloat16, seed=1))
    packed = torch.empty(int(off[-1]), dtype=torch.uint8, device="cuda")
    absmax = torch.empty(rows, cols // bs, device="cuda")
    deq = torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda")
    A = torch.randn(4, cols, device="cuda").bfloat16()
    y = torch.empty(4, rows, dtype=torch.bfloat16, device="cuda")
    order, groups = matmul_plan(bits)

    def step():
        torch.ops.lowra.quantize.out(W, bits, thr, off, bs, packed=packed, absmax=absmax)
        torch.ops.lowra.dequantize.out(packed, absmax, bits, code, off, bs, [rows, cols], torch.bfloat16, out=deq)
        torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, bs, [rows, cols], None, order, groups, out=y)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph (plans, occupancy queries, allocations)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    W.copy_(torch.randn_like(W))  # new weights and activations, then replay
    A.copy_(torch.randn_like(A))
    packed.zero_()
    y.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, bs)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    assert torch.equal(deq, reference.dequantize(ref_packed, ref_absmax, bits, code, off, bs, [rows, cols],
                                                 torch.bfloat16))
    assert rel_err(y, reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols])) < TOL[torch.bfloat16]


@cuda
@pytest.mark.parametrize("gemv,m,batch1", [(0, 2, 0), (-1, 2, 0), (0, 1, 4), (0, 1, 2)])
def test_cuda_corrupt_metadata_is_skipped_not_followed(gemv, m, batch1):
    """Offsets pointing outside the buffer, bits that are not 1/2/4 and a row_order naming rows of another precision
    or out of range: those rows are skipped and counted, the others are still right, nothing faults (the
    compute-sanitizer run of the suite checks that nothing is read or written out of bounds). gemv=-1: the
    tensor-core path (which also refuses a row of the wrong precision group; the GEMV computes any precision); m = 1
    with batch1 set: the batch-1 kernel at 4 and 2 rows per task."""
    rows, cols, bs = 48, 1024, 64
    A, packed, absmax, bits, code, off, bias = matmul_case(rows, cols, bs, torch.bfloat16, seed=3, m=m)
    native.skipped_rows()  # drain earlier counts
    bad_off = off.clone()
    bad_off[5] = packed.numel() - 1  # row 5 would run past the end
    bad_bits = bits.clone()
    bad_bits[7] = 3
    deq = torch.ops.lowra.dequantize(packed, absmax, bad_bits, code, bad_off, bs, [rows, cols], torch.float32)
    assert native.skipped_rows() == 2
    ref = reference.dequantize(packed.cpu(), absmax.cpu(), bits.cpu(), code.cpu(), off.cpu(), bs, [rows, cols],
                               torch.float32)
    keep = [r for r in range(rows) if r not in (5, 7)]
    assert torch.equal(deq.cpu()[keep], ref[keep])
    order, groups = matmul_plan(bits)
    bad_order = order.clone()
    bad_order[0] = rows + 100  # out of range
    bad_order[-1] = bad_order[0 + groups[0]]  # a 2-bit row in the 4-bit group
    with matmul_tuning(gemv_max_rows=gemv, gemv_batch1=batch1):
        y = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols], None, bad_order, groups)
    assert native.skipped_rows() >= (2 if gemv else 1)
    yref = reference.matmul(A, packed, absmax, bits, code, off, bs, [rows, cols])
    good = sorted(set(range(rows)) - {int(order[0]), int(order[-1]), int(order[groups[0]])})
    assert rel_err(y[:, good], yref[:, good]) < TOL[torch.bfloat16]


@cuda
def test_cuda_library_is_loaded():
    assert _native.has_cuda(), "the CUDA library must be built for the GPU tests (make gpu-check)"
    assert "cuda" in bitsandbytes_lowra.NATIVE_DEVICES
