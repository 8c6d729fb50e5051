"""Double-quantized block scales (bitsandbytes' nested quantization) passed to the lowra ops as they are stored:
uint8 codes + nested scales + code table + offset, decoded where the kernels read them. Every path must give
exactly what the same op gives on the decoded float32 scales. CPU tests run in CI; `cuda` ones on the GPU check."""

import pytest
import torch
from bitsandbytes import functional as bnbF

import bitsandbytes_lowra  # noqa: F401  (registers the ops)
from bitsandbytes_lowra._ops import matmul_plan
from bitsandbytes_lowra.backends import reference
from bitsandbytes_lowra.backends.reference import decode_absmax
from bitsandbytes_lowra.functional import dequantize_lowra, double_quantize_absmax, quantize_lowra

from .conftest import DEQUANTIZE_TUNINGS, assert_sums_close, dequantize_tuning, matmul_tuning
from .test_ops import DTYPES, make_case

cuda = pytest.mark.cuda
MIXES = [(1,), (2,), (4,), (1, 2, 4)]


def nest(absmax, nested_blocksize=256):
    """(q, nested_absmax, nested_code, offset, nested_blocksize) as functional.quantize_lowra stores them."""
    q, s2, offset = double_quantize_absmax(absmax, nested_blocksize)
    return q, s2.absmax, s2.code, offset, nested_blocksize


def case(rows, cols, bs, dtype, seed, mix=(1, 2, 4), nested_blocksize=256, device="cpu"):
    W, bits, code, thr, off = (t.to(device) for t in make_case(rows, cols, bs, dtype, seed=seed, mix=mix))
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, bs)
    q, *nested = nest(absmax, nested_blocksize)
    return packed, q, tuple(nested), bits, code, off


# ---------------------------------------------------------------------------------------------------------------
# CPU (CI)

def test_decode_matches_bitsandbytes_dequantize_blockwise():
    """The reference decode is what bitsandbytes' own dequantize gives (+ offset, clamped): stored states keep
    their meaning."""
    for nbs in (64, 256):
        packed, q, nested, *_ = case(37, 1000, 64, torch.float32, seed=nbs, nested_blocksize=nbs)
        n_absmax, n_code, offset, _ = nested
        s2 = bnbF.QuantState(absmax=n_absmax, code=n_code, blocksize=nbs, dtype=torch.float32)
        expect = (bnbF.dequantize_blockwise(q.flatten(), s2) + offset).clamp_min(0).view(q.shape)
        got = decode_absmax(q, *nested)
        assert got.dtype == torch.float32 and torch.equal(got, expect)
        assert (got >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nbs", [64, 256])
def test_nested_ops_equal_decoded_cpu(dtype, nbs):
    rows, cols, bs = 29, 700, 64
    for i, mix in enumerate(MIXES):
        packed, q, nested, bits, code, off = case(rows, cols, bs, dtype, seed=i + nbs, mix=mix, nested_blocksize=nbs)
        dec = decode_absmax(q, *nested)
        shape = [rows, cols]
        W = torch.ops.lowra.dequantize(packed, q, bits, code, off, bs, shape, dtype, *nested)
        assert torch.equal(W, torch.ops.lowra.dequantize(packed, dec, bits, code, off, bs, shape, dtype))
        # the pure-PyTorch reference kernels take the same arguments
        assert torch.equal(W, reference._dequantize_kernel(packed, q, bits, code, off, bs, shape, dtype, *nested))
        out = torch.empty_like(W)
        torch.ops.lowra.dequantize.out(packed, q, bits, code, off, bs, shape, dtype, *nested, out=out)
        assert torch.equal(out, W)
        A = torch.randn(3, cols, generator=torch.Generator().manual_seed(i)).to(dtype)
        y = torch.ops.lowra.matmul(A, packed, q, bits, code, off, bs, shape, None, None, None, *nested)
        assert torch.equal(y, torch.ops.lowra.matmul(A, packed, dec, bits, code, off, bs, shape))
        kw = dict(zip(("nested_absmax", "nested_code", "nested_offset", "nested_blocksize"), nested))
        assert torch.equal(y, torch.ops.lowra.matmul(A, packed, q, bits, code, off, bs, shape, **kw))


def test_nan_nested_scales_decode_to_zero_everywhere():
    """A NaN nested scale or offset (a corrupt state; the ops do not scan for it) decodes to a 0 block scale in the
    reference as in the native kernels (fmaxf(NaN, 0) = 0), so the backends agree on what such a state gives."""
    packed, q, nested, bits, code, off = case(9, 512, 64, torch.bfloat16, seed=3, nested_blocksize=64)
    n_absmax, n_code, offset, nbs = nested
    bad = n_absmax.clone()
    bad[0] = float("nan")  # the first 64 blocks: rows 0..7
    for args in ((bad, n_code, offset, nbs), (n_absmax, n_code, torch.full_like(offset, float("nan")), nbs)):
        dec = decode_absmax(q, *args)
        assert not dec.isnan().any()
        zero = dec == 0
        assert zero.reshape(-1)[:64].all() if args[0] is bad else zero.all()
        shape = [9, 512]
        W = torch.ops.lowra.dequantize(packed, q, bits, code, off, 64, shape, torch.bfloat16, *args)
        assert torch.equal(W, reference._dequantize_kernel(packed, q, bits, code, off, 64, shape, torch.bfloat16,
                                                           *args))
        assert torch.equal(W, torch.ops.lowra.dequantize(packed, dec, bits, code, off, 64, shape, torch.bfloat16))


def test_nested_argument_errors_name_the_problem():
    packed, q, nested, bits, code, off = case(8, 128, 64, torch.float32, seed=3)
    n_absmax, n_code, offset, nbs = nested
    dec = decode_absmax(q, *nested)
    args = (bits, code, off, 64, [8, 128], torch.float32)

    def deq(absmax, *n, **kw):
        return torch.ops.lowra.dequantize(packed, absmax, *args, *n, **kw)

    with pytest.raises(RuntimeError, match="absmax must be float32"):
        deq(q)  # uint8 codes without their nested scales
    with pytest.raises(RuntimeError, match="double-quantized absmax must be uint8"):
        deq(dec, *nested)
    with pytest.raises(RuntimeError, match="needs nested_code and nested_offset"):
        deq(q, n_absmax)
    with pytest.raises(RuntimeError, match="without nested_absmax"):
        deq(dec, None, n_code, offset)
    with pytest.raises(RuntimeError, match="nested_absmax must have 1 elements"):
        deq(q, torch.cat([n_absmax, n_absmax]), n_code, offset, 256)
    with pytest.raises(ValueError, match="power of two"):
        deq(q, n_absmax, n_code, offset, 100)
    with pytest.raises(RuntimeError, match="nested_code must be float32"):
        deq(q, n_absmax, n_code.half(), offset, nbs)
    with pytest.raises(RuntimeError, match="nested_code must have 256 elements"):
        deq(q, n_absmax, n_code[:128], offset, nbs)
    A = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="nested_offset must have 1 elements"):
        torch.ops.lowra.matmul(A, packed, q, bits, code, off, 64, [8, 128], None, None, None, n_absmax, n_code,
                               torch.zeros(2), nbs)


def test_opcheck_nested_ops():
    packed, q, nested, bits, code, off = case(6, 96, 32, torch.float16, seed=9, nested_blocksize=64)
    A = torch.randn(2, 96).half()
    order, groups = matmul_plan(bits)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.lowra.dequantize.default,
                          (packed, q, bits, code, off, 32, [6, 96], torch.float16, *nested), test_utils=utils)
    torch.library.opcheck(torch.ops.lowra.matmul.default,
                          (A, packed, q, bits, code, off, 32, [6, 96], None, order, groups, *nested),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.lowra.matmul.out, (A, packed, q, bits, code, off, 32, [6, 96], None, None, None,
                                                       *nested),
                          {"out": torch.empty(2, 6, dtype=torch.float16)}, test_utils=utils)


def test_linear_forward_backward_with_nested_scales_equals_decoded():
    """matmul_lowra passes the stored codes (no decode in Python) in inference and training; the opt-in float32
    cache is the decoded path: both give identical outputs and input gradients."""
    from bitsandbytes_lowra.functional import matmul_lowra

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 320, generator=gen)
    bits = torch.tensor([1, 2, 4], dtype=torch.uint8).repeat(16)
    packed, qs = quantize_lowra(W, bits, compress_statistics=True)
    assert qs.nested and qs.scale_args()[1] is not None and qs.scale_args(cache=True)[1] is None
    x = torch.randn(5, 320, generator=gen, requires_grad=True)
    y = matmul_lowra(x, packed, qs)
    y.square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    y2 = matmul_lowra(x, packed, qs, cache_absmax=True)
    y2.square().sum().backward()
    assert torch.equal(y, y2) and torch.equal(g, x.grad)
    with torch.no_grad():  # 5 rows: the fused CPU matmul, float32 sums in another order than the GEMM's
        assert_sums_close(matmul_lowra(x, packed, qs), y, x, dequantize_lowra(packed, qs))


# ---------------------------------------------------------------------------------------------------------------
# CUDA

@cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 7, 8), (33, 100, 64), (9, 130, 32), (4, 4100, 128),
                                   (6, 200, 24), (64, 4096, 64), (2, 65536, 256), (9, 2056, 8), (5, 6144, 32),
                                   (3, 2304, 128), (7, 768, 256), (5, 11008, 64), (2, 4096, 2048),
                                   (300, 1536, 32)])
def test_cuda_nested_dequantize_bit_identical(shape, dtype):
    """16-bit outputs of the shapes with columns a multiple of 256 take the streamed kernel, which decodes the scales
    as it stages a task: last segments of 256 and 768 columns (2304; 11008, a Llama MLP width), rows shorter than a
    segment (768), one block per segment (4096 x 2048), 64 blocks per segment and more tasks than one CTA's warps
    (300 x 1536); every launch knob alike. The others (float32 outputs too) take dequantize_fast."""
    rows, cols, bs = shape
    for nbs in (64, 256):
        for i, mix in enumerate(MIXES):
            packed, q, nested, bits, code, off = case(rows, cols, bs, dtype, seed=rows + cols + i, mix=mix,
                                                      nested_blocksize=nbs, device="cuda")
            cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in (packed, q, bits, code, off, *nested)]
            ref = reference._dequantize_kernel(*cpu[:5], bs, [rows, cols], dtype, *cpu[5:])
            for tuning in ((0, 0), *DEQUANTIZE_TUNINGS):
                with dequantize_tuning(*tuning):
                    got = torch.ops.lowra.dequantize(packed, q, bits, code, off, bs, [rows, cols], dtype, *nested)
                assert torch.equal(got.cpu(), ref), f"mix {mix}, nested blocksize {nbs}, tuning {tuning}"


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("shape", [(7, 1024, 64), (130, 4096, 64), (45, 2304, 128), (33, 28672, 64), (9, 200, 8)])
def test_cuda_nested_matmul_equals_decoded(shape, m, dtype):
    """GEMV (decodes in the kernel), tensor-core and generic paths (decode into the workspace first): the same
    outputs as the same kernels on the decoded float32 scales, bit for bit."""
    rows, cols, bs = shape
    for i, mix in enumerate(MIXES):
        packed, q, nested, bits, code, off = case(rows, cols, bs, torch.float32, seed=rows + m + i, mix=mix,
                                                  device="cuda")
        dec = decode_absmax(q, *nested)
        A = (torch.randn(m, cols, generator=torch.Generator().manual_seed(i)) * 2).to(dtype).cuda()
        bias = torch.randn(rows, generator=torch.Generator().manual_seed(i + 1)).to(dtype).cuda()
        order, groups = matmul_plan(bits)
        shp = [rows, cols]
        y = torch.ops.lowra.matmul(A, packed, q, bits, code, off, bs, shp, bias, order, groups, *nested)
        ref = torch.ops.lowra.matmul(A, packed, dec, bits, code, off, bs, shp, bias, order, groups)
        assert torch.equal(y, ref), f"mix {mix}"
        out = torch.full_like(y, float("nan"))
        torch.ops.lowra.matmul.out(A, packed, q, bits, code, off, bs, shp, bias, order, groups, *nested, out=out)
        assert torch.equal(out, ref)


@cuda
@pytest.mark.parametrize("batch1", [2, 4])
@pytest.mark.parametrize("wide", [-1, 1])
@pytest.mark.parametrize("shape", [(130, 4096, 64), (45, 2304, 128), (33, 28672, 64)])
def test_cuda_nested_batch1_equals_decoded(shape, batch1, wide):
    """The batch-1 kernel (forced: automatic from 2^24 weights) decodes the scales where it reads them: the same
    output as on the decoded float32 scales, bit for bit (K splits at 28672 columns)."""
    rows, cols, bs = shape
    for i, mix in enumerate(MIXES):
        packed, q, nested, bits, code, off = case(rows, cols, bs, torch.float32, seed=rows + i, mix=mix, device="cuda")
        dec = decode_absmax(q, *nested)
        A = (torch.randn(1, cols, generator=torch.Generator().manual_seed(i)) * 2).to(torch.bfloat16).cuda()
        order, groups = matmul_plan(bits)
        with matmul_tuning(gemv_batch1=batch1, gemv_wide=wide):
            y = torch.ops.lowra.matmul(A, packed, q, bits, code, off, bs, [rows, cols], None, order, groups, *nested)
            ref = torch.ops.lowra.matmul(A, packed, dec, bits, code, off, bs, [rows, cols], None, order, groups)
        assert torch.equal(y, ref), f"mix {mix}"


@cuda
@pytest.mark.parametrize("m", [1, 8])
def test_cuda_nested_matmul_captures_in_cuda_graph(m):
    rows, cols, bs = 96, 4096, 64
    packed, q, nested, bits, code, off = case(rows, cols, bs, torch.float32, seed=m, device="cuda")
    order, groups = matmul_plan(bits)
    A = torch.randn(m, cols, device="cuda", dtype=torch.float16)
    y = torch.empty(m, rows, device="cuda", dtype=torch.float16)

    def step():
        torch.ops.lowra.matmul.out(A, packed, q, bits, code, off, bs, [rows, cols], None, order, groups, *nested,
                                   out=y)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up: plans and workspace sizes resolved outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    A.copy_(torch.randn_like(A))
    graph.replay()
    torch.cuda.synchronize()
    dec = decode_absmax(q, *nested)
    assert torch.equal(y, torch.ops.lowra.matmul(A, packed, dec, bits, code, off, bs, [rows, cols], None, order,
                                                 groups))


@cuda
def test_cuda_nested_tensors_on_another_device_are_refused():
    packed, q, nested, bits, code, off = case(8, 256, 64, torch.float32, seed=1, device="cuda")
    n_absmax, n_code, offset, nbs = nested
    with pytest.raises(RuntimeError, match="nested_offset is on cpu"):
        torch.ops.lowra.dequantize(packed, q, bits, code, off, 64, [8, 256], torch.float16, n_absmax, n_code,
                                   offset.cpu(), nbs)


@cuda
@pytest.mark.parametrize("m", [1, 2])
def test_cuda_nested_gemv_prepass_knob_equals_in_kernel_decode(m):
    """The benchmark knob that decodes the scales in a pass of their own before the GEMV: the same product."""
    rows, cols, bs = 77, 28672, 64  # K splits through the workspace behind the decoded scales
    packed, q, nested, bits, code, off = case(rows, cols, bs, torch.float32, seed=m, device="cuda")
    order, groups = matmul_plan(bits)
    A = torch.randn(m, cols, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.lowra.matmul(A, packed, q, bits, code, off, bs, [rows, cols], None, order, groups, *nested)
    with matmul_tuning(nested_prepass=1):
        y2 = torch.ops.lowra.matmul(A, packed, q, bits, code, off, bs, [rows, cols], None, order, groups, *nested)
    assert torch.equal(y, y2)
