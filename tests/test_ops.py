"""The lowra:: ops: native kernels (cpu, cuda) are bit-identical to the pure-PyTorch reference."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitsandbytes_lowra as L
from bitsandbytes_lowra import _native
from bitsandbytes_lowra.backends import native, reference
from bitsandbytes_lowra.codebooks import nf_tables
from bitsandbytes_lowra.format import (
    MAX_COLS,
    LowRAFormatError,
    blocks_per_row,
    check_bits,
    check_thresholds,
    check_weight,
    row_offsets,
    validate_layout,
)

from .conftest import devices

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_tables(bits: torch.Tensor, gen: torch.Generator):
    """Random sorted per-row codebooks with midpoint thresholds (float16), not just the NF ones."""
    rows = bits.numel()
    code = torch.zeros(rows, 16)
    thr = torch.zeros(rows, 15)
    for r, b in enumerate(bits.tolist()):
        c = torch.sort(torch.rand(2**b, generator=gen) * 2 - 1).values
        code[r, : 2**b] = c
        thr[r, : 2**b - 1] = (c[1:] + c[:-1]) / 2
    return code.half(), thr.half()


def make_case(rows, cols, blocksize, dtype, seed, mix=(1, 2, 4)):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 3).to(dtype)
    bits = torch.tensor(mix, dtype=torch.uint8)[torch.randint(0, len(mix), (rows,), generator=gen)]
    code, thr = random_tables(bits, gen)
    return W, bits, code, thr, row_offsets(bits, cols, blocksize)


def run_ops(W, bits, code, thr, off, blocksize, device):
    W, bits, code, thr, off = (t.to(device) for t in (W, bits, code, thr, off))
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, blocksize)
    out = torch.ops.lowra.dequantize(packed, absmax, bits, code, off, blocksize, list(W.shape), W.dtype)
    return packed.cpu(), absmax.cpu(), out.cpu()


def test_native_library_loads_on_cpu():
    assert _native.available(), "the native library must be built (make build / pip install .)"
    assert "cpu" in L.NATIVE_DEVICES



# Run in a fresh process with LOWRA_LIBRARY set: prints the fallback warnings seen and whether the ops on `device`
# match the reference (quantize / dequantize bit for bit; matmul to rounding).
_FALLBACK_SCRIPT = """
import sys, warnings, torch
warnings.simplefilter("always")
device = sys.argv[1]
with warnings.catch_warnings(record=True) as seen:
    import bitsandbytes_lowra as L
    from bitsandbytes_lowra.backends import reference
    from tests.test_ops import make_case
    W, bits, code, thr, off = make_case(6, 200, 64, torch.bfloat16, seed=4)
    args = [t.to(device) for t in (W, bits, thr, off)]
    for _ in range(2):
        packed, absmax = torch.ops.lowra.quantize(*args, 64)
        out = torch.ops.lowra.dequantize(packed, absmax, bits.to(device), code.to(device), off.to(device), 64,
                                         [6, 200], torch.bfloat16)
        A = torch.randn(3, 200, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        y = torch.ops.lowra.matmul(A.to(device), packed, absmax, bits.to(device), code.to(device), off.to(device),
                                   64, [6, 200])
    p, a = reference.quantize(W, bits, thr, off, 64)
    assert torch.equal(packed.cpu(), p) and torch.equal(absmax.cpu(), a)
    assert torch.equal(out.cpu(), reference.dequantize(p, a, bits, code, off, 64, [6, 200], torch.bfloat16))
    y_ref = reference.matmul(A, p, a, bits, code, off, 64, [6, 200])  # float32 sums, in another order on CUDA
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-2, atol=1e-2)
print(L.NATIVE_DEVICES, [str(w.message) for w in seen if "pure-PyTorch reference" in str(w.message)])
"""


def run_without_native(library: Path, device: str) -> tuple[list[str], list[str]]:
    """(native devices, fallback warnings) of the ops run on `device` with LOWRA_LIBRARY=library."""
    run = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT, device], capture_output=True, text=True,
                         env={**os.environ, "LOWRA_LIBRARY": str(library)}, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    native, messages = run.stdout.strip().splitlines()[-1].split(" ", 1)
    return ast.literal_eval(native), ast.literal_eval(messages)


def test_ops_without_a_native_library_run_the_reference_and_say_so(tmp_path):
    native, messages = run_without_native(tmp_path / "missing.so", "cpu")
    assert native == []
    assert len(messages) == 1, messages  # once, though every op ran twice
    assert "native library could not be loaded" in messages[0] and "cpu tensors" in messages[0]


@pytest.mark.cuda
def test_cuda_ops_with_a_cpu_only_library_run_the_reference_and_say_so():
    """A library built without nvcc on a GPU machine: the CPU ops stay native, CUDA tensors get the reference."""
    cpu_only = Path(_native.__file__).parent / "libbitsandbytes_lowra_cpu.so"
    if not cpu_only.is_file() and os.environ.get("LOWRA_LIBRARY"):  # a variant measured without an in-place build
        pytest.skip("no CPU-only library built in place to test with (LOWRA_LIBRARY names a prebuilt library)")
    native, messages = run_without_native(cpu_only, "cuda")
    assert native == ["cpu"]
    assert len(messages) == 1, messages
    assert "built without CUDA" in messages[0] and "cuda tensors" in messages[0]


def test_a_library_of_another_abi_is_passed_over_by_name(monkeypatch):
    """A stale build (from before an entry point's arguments changed) is refused with the reason, never called."""
    other = Path(torch.__file__).parent / "lib" / "libc10.so"  # a real shared library without lowra_abi_version
    monkeypatch.setenv("LOWRA_LIBRARY", str(other))
    _native.load.cache_clear()
    try:
        with pytest.raises(_native.NativeLibraryError, match="stale build") as error:
            _native.load()
        assert error.value.tried == [f"{other} (native ABI 1, this package needs {_native.ABI_VERSION}: a stale "
                                     "build; rebuild it)"]
        assert "native ABI 1" in reference._fallback_message("cpu")
    finally:
        monkeypatch.delenv("LOWRA_LIBRARY")
        _native.load.cache_clear()
    assert _native.load().lowra_abi_version() == _native.ABI_VERSION


def test_reference_fallback_message_names_a_library_without_cuda(monkeypatch):
    monkeypatch.setattr(_native, "has_cuda", lambda: False)
    message = reference._fallback_message("cuda")
    assert "built without CUDA" in message and "cuda tensors" in message and "make build" in message

SHAPES = [(1, 64, 64), (1, 1, 64), (3, 100, 64), (16, 576, 64), (7, 1536, 64), (5, 8, 8), (9, 130, 32), (2, 4100, 128)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference(shape, dtype, device):
    rows, cols, bs = shape
    W, bits, code, thr, off = make_case(rows, cols, bs, dtype, seed=rows * 1000 + cols)
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, bs)
    ref_out = reference.dequantize(ref_packed, ref_absmax, bits, code, off, bs, [rows, cols], dtype)
    packed, absmax, out = run_ops(W, bits, code, thr, off, bs, device)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(out, ref_out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("p", [1, 2, 4])
def test_single_precision_rows_and_zero_rows(p, device):
    W, bits, code, thr, off = make_case(6, 200, 64, torch.float32, seed=p, mix=(p,))
    W[2] = 0  # absmax 0: codes of 0.0, dequantized to exact zeros
    packed, absmax, out = run_ops(W, bits, code, thr, off, 64, device)
    assert packed.numel() == 6 * 256 * p // 8
    assert torch.all(absmax[2] == 0) and torch.all(out[2] == 0)
    ref = reference.quantize(W, bits, thr, off, 64)
    assert torch.equal(packed, ref[0])


@pytest.fixture(params=native.CPU_ISAS)
def cpu_isa(request):
    """Runs the test with the CPU dequantize capped at each instruction-set level (the vector decode and its scalar
    remainder at every level the CPU has)."""
    got = native.set_cpu_isa(request.param)
    try:
        if got != request.param:
            pytest.skip(f"this CPU has no {request.param} (best: {got})")
        yield got
    finally:
        native.set_cpu_isa()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize, cols", [(24, 101), (40, 83), (8, 3), (24, 24), (136, 300)])
def test_cpu_blocksizes_not_powers_of_two(blocksize, cols, dtype, cpu_isa):
    # any multiple of 8 is a valid blocksize; partial last blocks and a partial last code byte at every precision
    W, bits, code, thr, off = make_case(12, cols, blocksize, dtype, seed=blocksize * 1000 + cols)
    packed, absmax, out = run_ops(W, bits, code, thr, off, blocksize, "cpu")
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, blocksize)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    assert torch.equal(out, reference.dequantize(packed, absmax, bits, code, off, blocksize, [12, cols], dtype))


# Random layers: shape, blocksize 2^bs_log, dtype DTYPES[dtype_i], precision mix.
LAYERS = dict(
    rows=st.integers(1, 40),
    cols=st.integers(1, 700),
    bs_log=st.integers(3, 8),
    dtype_i=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
    mix=st.sampled_from([(1,), (2,), (4,), (1, 2), (2, 4), (1, 4), (1, 2, 4)]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**LAYERS)
def test_property_cpu_matches_reference(rows, cols, bs_log, dtype_i, seed, mix, cpu_isa):
    bs = 2**bs_log
    dtype = DTYPES[dtype_i]
    W, bits, code, thr, off = make_case(rows, cols, bs, dtype, seed, mix)
    packed, absmax, out = run_ops(W, bits, code, thr, off, bs, "cpu")
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, bs)
    assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax)
    assert torch.equal(out, reference.dequantize(packed, absmax, bits, code, off, bs, [rows, cols], dtype))
    # reconstruction never leaves the block's range
    assert torch.all(out.float().abs() <= W.float().abs().amax(1, keepdim=True) * 1.001 + 1e-6)


# ---- the CPU matmul (lowra_matmul_cpu: a few activation rows, W never materialized) ----

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative, at most one ulp


def assert_matmul_close(y, A, W32, bias):
    """y against A @ W32^T + bias in float64: float32 products and sums (n terms) plus one rounding to y's dtype."""
    A64, W64 = A.double(), W32.double()
    exact = A64 @ W64.T + (0 if bias is None else bias.double())
    scale = A64.abs() @ W64.abs().T + (0 if bias is None else bias.double().abs())
    tol = (A.shape[-1] + 2) * 2.0**-23 * scale + ULP[y.dtype] * exact.abs() + 1e-30
    err = (y.double() - exact).abs()
    assert torch.all(err <= tol), f"max error {(err - tol).max().item():.3g} over the bound"


def scale_args(absmax, nested):
    """lowra::matmul's scale arguments: float32 absmax, or its double-quantized form (nested blocks of 64)."""
    from bitsandbytes_lowra.functional import double_quantize_absmax

    if not nested:
        return (absmax,)
    q, s2, offset = double_quantize_absmax(absmax, 64)
    return (q, s2.absmax, s2.code, offset, 64)


def cpu_matmul_checked(A, packed, scales, bits, code, off, bs, shape, bias):
    """lowra::matmul on the CPU, checked against the float64 product with the reference-dequantized weight."""
    y = torch.ops.lowra.matmul(A, packed, scales[0], bits, code, off, bs, shape, bias, None, None, *scales[1:])
    W32 = reference.dequantize(packed, reference.decode_absmax(*scales), bits, code, off, bs, shape, torch.float32)
    assert_matmul_close(y, A, W32, bias)
    return y


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**LAYERS, m=st.integers(1, native.CPU_MAX_FUSED_ROWS), nested=st.booleans(), with_bias=st.booleans())
def test_property_cpu_matmul_matches_float64(rows, cols, bs_log, dtype_i, m, seed, mix, nested, with_bias, cpu_isa):
    bs, dtype = 2**bs_log, DTYPES[dtype_i]
    W, bits, code, thr, off = make_case(rows, cols, bs, dtype, seed, mix)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, bs)
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, cols, generator=gen).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype) if with_bias else None
    y = cpu_matmul_checked(A, packed, scale_args(absmax, nested), bits, code, off, bs, [rows, cols], bias)
    assert y.dtype == dtype and y.shape == (m, rows)


@pytest.mark.parametrize("m", range(1, native.CPU_MAX_FUSED_ROWS + 1))
@pytest.mark.parametrize("blocksize, cols", [(16, 48), (48, 480), (64, 1536), (256, 512)])
def test_cpu_matmul_whole_blocks_every_row_count(m, blocksize, cols, cpu_isa):
    """Rows of whole blocks of a multiple of 16 elements take the one-pass decode + dot (one instantiation per row
    count and precision at each level); random shapes above mostly take the buffered path."""
    W, bits, code, thr, off = make_case(19, cols, blocksize, torch.float32, seed=m * 1000 + blocksize)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, blocksize)
    W32 = reference.dequantize(packed, absmax, bits, code, off, blocksize, [19, cols], torch.float32)
    A = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(19, generator=torch.Generator().manual_seed(1))
    y = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, blocksize, [19, cols], bias)
    assert_matmul_close(y, A, W32, bias)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), blocks=st.integers(1, 160), bs=st.sampled_from([16, 32, 48, 64, 128, 256]),
       m=st.integers(2, native.CPU_MAX_FUSED_ROWS), dtype_i=st.integers(0, 2), seed=st.integers(0, 2**31 - 1),
       mix=st.sampled_from([(1,), (2,), (4,), (1, 2, 4)]), nested=st.booleans(), with_bias=st.booleans())
def test_property_cpu_matmul_in_passes_matches_float64(rows, blocks, bs, m, dtype_i, seed, mix, nested, with_bias,
                                                       cpu_isa):
    """Whole-block rows with several activation rows, wide enough (up to 40960 columns) that the fused path dots each
    tile of weight rows in several passes (32 KB of activations each): random shapes, blocksizes, precision mixes,
    dtypes and scales, within float32 rounding of the float64 product."""
    cols, dtype = blocks * bs, DTYPES[dtype_i]
    W, bits, code, thr, off = make_case(rows, cols, bs, dtype, seed, mix)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, bs)
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(m, cols, generator=gen) / cols**0.5).to(dtype)  # products of float16's range at 40960 columns
    bias = torch.randn(rows, generator=gen).to(dtype) if with_bias else None
    cpu_matmul_checked(A, packed, scale_args(absmax, nested), bits, code, off, bs, [rows, cols], bias)


@pytest.mark.parametrize("nested", [False, True])
def test_cpu_matmul_wide_rows_in_passes(nested, cpu_isa):
    """8 activation rows of a 4480-wide layer do not fit the fused path's ~32 KB pass: each tile of weight rows (37
    rows: tiles of 16, 16, 5) is dotted in passes of 16 blocks (16, 16, 16, 16, 6), the passes' sums added. Each
    activation row's result stays within float32 rounding of its one-pass result (one row: a single pass) and of
    the float64 product."""
    rows, cols, bs = 37, 64 * 70, 64
    W, bits, code, thr, off = make_case(rows, cols, bs, torch.float32, seed=11, mix=(1, 2, 4))
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, bs)
    scales = scale_args(absmax, nested)
    A = torch.randn(8, cols, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(4))

    y = cpu_matmul_checked(A, packed, scales, bits, code, off, bs, [rows, cols], bias)
    one_pass = torch.cat([cpu_matmul_checked(A[i:i + 1], packed, scales, bits, code, off, bs, [rows, cols], bias)
                          for i in range(8)])
    if cpu_isa != "scalar":  # the vector levels' fused path: the passes' sums really are added in another order
        assert not torch.equal(y, one_pass)
    assert (y - one_pass).abs().max() <= 1e-5 * one_pass.abs().max()


def test_cpu_matmul_takes_the_fused_path_up_to_its_row_limit(monkeypatch):
    """lowra::matmul on the CPU: up to CPU_MAX_FUSED_ROWS activation rows through lowra_matmul_cpu, more through
    dequantize + GEMM; both agree; a 3-D input, a non-contiguous one and out= work."""
    W, bits, code, thr, off = make_case(33, 320, 64, torch.bfloat16, seed=9)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, 64)
    W32 = reference.dequantize(packed, absmax, bits, code, off, 64, [33, 320], torch.float32)
    calls = []
    real = native._matmul_cpu
    monkeypatch.setattr(native, "_matmul_cpu", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    limit = native.CPU_MAX_FUSED_ROWS
    for m in (1, limit, limit + 1):
        A = torch.randn(m, 320, dtype=torch.bfloat16)
        y = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [33, 320])
        assert_matmul_close(y, A, W32, None)
    assert calls == [1, limit]
    A = torch.randn(2, 3, 640, dtype=torch.bfloat16)[..., ::2]  # [2, 3, 320], strided
    y = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [33, 320])
    assert y.shape == (2, 3, 33) and calls[-1] == 6
    out = torch.empty(2, 3, 33, dtype=torch.bfloat16)
    torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, 64, [33, 320], out=out)
    assert torch.equal(out, y)
    assert_matmul_close(y.reshape(6, 33), A.reshape(6, 320), W32, None)


def test_cpu_matmul_on_real_smollm2_layer(smollm2_weights):
    """A decode step's product on a real SmolLM2 projection at 1.75 bits, every CPU level: within float32 rounding
    of the float64 product with the dequantized weight."""
    from bitsandbytes_lowra.bench.kernels import mixed_bits
    from bitsandbytes_lowra.codebooks import nf_tables

    name, W = next((k, v) for k, v in smollm2_weights.items() if "mlp.down_proj" in k)
    rows, cols = W.shape
    bits = mixed_bits(rows, torch.Generator().manual_seed(0))
    code, thr = nf_tables(bits)
    off = row_offsets(bits, cols, 64)
    packed, absmax = torch.ops.lowra.quantize(W.to(torch.bfloat16), bits, thr, off, 64)
    W32 = reference.dequantize(packed, absmax, bits, code, off, 64, [rows, cols], torch.float32)
    A = torch.randn(1, cols, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for isa in native.CPU_ISAS:
        if native.set_cpu_isa(isa) != isa:
            continue
        try:
            y = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [rows, cols])
        finally:
            native.set_cpu_isa()
        assert_matmul_close(y, A, W32, None)


def test_roundtrip_on_real_smollm2_layer(smollm2_weights):
    W = smollm2_weights["model.layers.3.self_attn.q_proj"]
    gen = torch.Generator().manual_seed(0)
    bits = torch.tensor([1, 2, 4], dtype=torch.uint8)[torch.randint(0, 3, (W.shape[0],), generator=gen)]
    code, thr = nf_tables(bits)
    off = row_offsets(bits, W.shape[1], 64)
    packed, absmax, out = run_ops(W, bits, code, thr, off, 64, "cpu")
    ref = reference.dequantize(*reference.quantize(W, bits, thr, off, 64), bits, code, off, 64, list(W.shape), W.dtype)
    assert torch.equal(out, ref)
    rel = ((W - out) ** 2).sum(1) / (W**2).sum(1)
    # NF4 rows reconstruct far better than 1-bit rows: precision really is per channel
    assert rel[bits == 4].mean() < 0.02 < rel[bits == 1].mean()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_dequantize_special_values(dtype, cpu_isa):
    """Codebook entries and scales that overflow, underflow, or are not finite round as the reference does, in the
    vector decode as in the scalar one (float16 overflow to inf, bfloat16 rounding ties, NaN stays NaN)."""
    rows, cols, bs = 6, 160, 32
    W, bits, code, thr, off = make_case(rows, cols, bs, torch.float32, seed=7, mix=(1, 2, 4))
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, bs)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 65504.0, -6e-8, 1.0 + 2**-8, 3.0 + 2**-7,
                             -0.0, 1e-3, 2.5, -2.5, 1.0 + 3 * 2**-8, 7.0, -65504.0, 2**-14, 0.0]).half()
    code = torch.stack([specials.roll(r) for r in range(rows)])  # every entry in every precision's reach
    absmax = absmax.clone()
    absmax[0, 0], absmax[1, 1], absmax[2, 2] = float("inf"), 1e30, 3e-39  # overflowing and subnormal products
    absmax[3:] = 1.0  # products equal to the entries: bfloat16 ties (1 + 2^-8, 1 + 3 * 2^-8, 3 + 2^-7)
    out = torch.ops.lowra.dequantize(packed, absmax, bits, code, off, bs, [rows, cols], dtype)
    ref = reference.dequantize(packed, absmax, bits, code, off, bs, [rows, cols], dtype)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    assert torch.equal(out[~nan].view(ints), ref[~nan].view(ints))


def test_dequantize_out_variant():
    W, bits, code, thr, off = make_case(4, 96, 32, torch.bfloat16, seed=3)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, 32)
    out = torch.empty(4, 96, dtype=torch.bfloat16)
    torch.ops.lowra.dequantize.out(packed, absmax, bits, code, off, 32, [4, 96], torch.bfloat16, out=out)
    assert torch.equal(out, torch.ops.lowra.dequantize(packed, absmax, bits, code, off, 32, [4, 96], torch.bfloat16))
    with pytest.raises(RuntimeError, match="out has shape"):
        torch.ops.lowra.dequantize.out(packed, absmax, bits, code, off, 32, [4, 96], torch.bfloat16, out=out[:2])


def run_on_reference(case: str) -> None:
    """tests.test_ops.`case`() in a fresh process without the native library: the reference kernels serve the CPU."""
    script = f"import warnings; warnings.simplefilter('ignore'); from tests.test_ops import {case}; {case}()"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LOWRA_LIBRARY": "/nonexistent/lowra.so"},
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]


def out_overlap_case() -> None:
    """Every out= op refuses an output that shares memory with an input, or with its other output, by name."""
    W, bits, code, thr, off = make_case(4, 64, 64, torch.float32, seed=3)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, 64)
    shape = [4, 64]
    scratch = torch.zeros(4 * 64)
    scales = scratch[-4:].view(4, 1)  # the scales in the last 4 floats of the would-be output
    scales.copy_(absmax)
    with pytest.raises(RuntimeError, match="out= tensor out overlaps absmax"):
        torch.ops.lowra.dequantize.out(packed, scales, bits, code, off, 64, shape, torch.float32,
                                       out=scratch.view(4, 64))
    A = torch.randn(4 * 64 + 16)
    with pytest.raises(RuntimeError, match="out= tensor out overlaps A"):
        torch.ops.lowra.matmul.out(A[:256].view(4, 64), packed, absmax, bits, code, off, 64, shape,
                                   out=A[240:256].view(4, 4))
    out = A[256:].view(4, 4)  # right after A in the same storage: disjoint, so fine
    torch.ops.lowra.matmul.out(A[:256].view(4, 64), packed, absmax, bits, code, off, 64, shape, out=out)
    assert torch.equal(out, torch.ops.lowra.matmul(A[:256].view(4, 64), packed, absmax, bits, code, off, 64, shape))
    with pytest.raises(RuntimeError, match="out= tensor absmax overlaps A"):
        torch.ops.lowra.quantize.out(W, bits, thr, off, 64, packed=torch.empty_like(packed),
                                     absmax=W.view(-1)[:4].view(4, 1))
    both = torch.empty(packed.numel() // 4 + 2)  # absmax (the last 4 floats) takes the last 8 bytes of packed
    with pytest.raises(RuntimeError, match="out= tensor packed overlaps absmax"):
        torch.ops.lowra.quantize.out(W, bits, thr, off, 64, packed=both.view(torch.uint8)[:packed.numel()],
                                     absmax=both[-4:].view(4, 1))


def test_out_variants_refuse_an_output_that_overlaps_an_input():
    out_overlap_case()


def test_reference_out_variants_refuse_an_output_that_overlaps_an_input():
    run_on_reference("out_overlap_case")


def quantize_offsets_case() -> None:
    """lowra::quantize checks bits and row_offsets against the layout before it sizes its buffer from the last offset,
    naming the first entry that differs."""
    W, bits, code, thr, off = make_case(4, 64, 64, torch.float32, seed=5)
    bad = off.clone()
    bad[2] += 8
    expected = int(off[2])
    with pytest.raises(LowRAFormatError, match=rf"row_offsets\[2\] = {expected + 8}, but the bits with 64 columns in "
                                               rf"blocks of 64 put row 2 at byte {expected}"):
        torch.ops.lowra.quantize(W, bits, thr, bad, 64)
    huge = off.clone()
    huge[-1] = 1 << 50  # a petabyte to allocate before the kernel would have refused it
    with pytest.raises(LowRAFormatError, match=r"row_offsets\[4\] = 1125899906842624, .* put the end of the buffer"):
        torch.ops.lowra.quantize(W, bits, thr, huge, 64)
    bad_bits = bits.clone()
    bad_bits[1] = 3
    with pytest.raises(LowRAFormatError, match=r"bits\[1\] = 3"):
        torch.ops.lowra.quantize(W, bad_bits, thr, off, 64)
    # quantize.out allocates nothing natively and stays free of host syncs: the C entry point refuses the offsets
    with pytest.raises((LowRAFormatError, _native.NativeLibraryError), match=r"row(_| )offsets"):
        torch.ops.lowra.quantize.out(W, bits, thr, bad, 64, packed=torch.empty(int(off[-1]), dtype=torch.uint8),
                                     absmax=torch.empty(4, 1))


def test_quantize_checks_row_offsets_before_allocating():
    quantize_offsets_case()


def test_reference_quantize_checks_row_offsets_before_allocating():
    run_on_reference("quantize_offsets_case")


def empty_weights_case() -> None:
    """A weight of 0 rows or 0 columns quantizes to no codes and dequantizes to an empty tensor; its matmul is empty
    (0 rows) or the bias alone (0 columns: sums over nothing), for the fused row counts and the dense ones."""
    for rows, cols in ((0, 64), (5, 0), (0, 0)):
        bits = torch.tensor([1, 2, 4, 2, 1], dtype=torch.uint8)[:rows]
        code, thr = random_tables(bits, torch.Generator().manual_seed(0))
        off = row_offsets(bits, cols, 64)
        packed, absmax = torch.ops.lowra.quantize(torch.randn(rows, cols), bits, thr, off, 64)
        assert packed.shape == (0,) and absmax.shape == (rows, -(-cols // 64))
        torch.ops.lowra.quantize.out(torch.randn(rows, cols), bits, thr, off, 64, packed=packed, absmax=absmax)
        for dtype in DTYPES:
            W = torch.ops.lowra.dequantize(packed, absmax, bits, code, off, 64, [rows, cols], dtype)
            assert W.shape == (rows, cols) and W.dtype == dtype
            torch.ops.lowra.dequantize.out(packed, absmax, bits, code, off, 64, [rows, cols], dtype, out=W)
            bias = torch.randn(rows).to(dtype)
            for lead in ((1,), (3,), (2, 20), (0,)):
                A = torch.randn(*lead, cols).to(dtype)
                y = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [rows, cols])
                assert torch.equal(y, torch.zeros(*lead, rows, dtype=dtype))
                y = torch.ops.lowra.matmul(A, packed, absmax, bits, code, off, 64, [rows, cols], bias)
                assert torch.equal(y, bias.expand(*lead, rows))
                out = torch.full((*lead, rows), float("nan"), dtype=dtype)
                torch.ops.lowra.matmul.out(A, packed, absmax, bits, code, off, 64, [rows, cols], bias, out=out)
                assert torch.equal(out, bias.expand(*lead, rows))


def test_empty_weights_give_empty_results():
    empty_weights_case()


def test_reference_empty_weights_give_empty_results():
    run_on_reference("empty_weights_case")


def test_opcheck():
    W, bits, code, thr, off = make_case(5, 130, 64, torch.float16, seed=5)
    torch.library.opcheck(torch.ops.lowra.quantize.default, (W, bits, thr, off, 64),
                          test_utils=("test_schema", "test_faketensor"))
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, 64)
    torch.library.opcheck(torch.ops.lowra.dequantize.default,
                          (packed, absmax, bits, code, off, 64, [5, 130], torch.bfloat16))
    out = torch.empty(5, 130, dtype=torch.float32)
    torch.library.opcheck(torch.ops.lowra.dequantize.out,
                          (packed, absmax, bits, code, off, 64, [5, 130], torch.float32), {"out": out})


# ---- bad input: clear errors before any kernel runs ----

def test_op_rejects_wrong_dtypes_and_shapes():
    W, bits, code, thr, off = make_case(4, 64, 64, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="bits must be uint8"):
        torch.ops.lowra.quantize(W, bits.long(), thr, off, 64)
    with pytest.raises(RuntimeError, match="float32/float16/bfloat16"):
        torch.ops.lowra.quantize(W.double(), bits, thr, off, 64)
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.lowra.quantize(W[None], bits, thr, off, 64)
    with pytest.raises(RuntimeError, match="thresholds must be float16"):
        torch.ops.lowra.quantize(W, bits, thr.float(), off, 64)
    with pytest.raises(RuntimeError, match="codebook must be"):
        torch.ops.lowra.dequantize(torch.zeros(int(off[-1]), dtype=torch.uint8), torch.ones(4, 1), bits,
                                   code[:, :8], off, 64, [4, 64], torch.float32)


def test_native_rejects_corrupt_offsets():
    """Even when Python checks are bypassed, the C ABI refuses metadata that would read out of bounds."""
    W, bits, code, thr, off = make_case(4, 64, 64, torch.float32, seed=2)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thr, off, 64)
    bad = off.clone()
    bad[2] += 1000
    with pytest.raises(_native.NativeLibraryError, match="row offsets"):
        torch.ops.lowra.dequantize(packed, absmax, bits, code, bad, 64, [4, 64], torch.float32)
    bad_bits = bits.clone()
    bad_bits[0] = 3
    with pytest.raises(_native.NativeLibraryError, match="bits"):
        torch.ops.lowra.dequantize(packed, absmax, bad_bits, code, off, 64, [4, 64], torch.float32)
    A = torch.randn(2, 64)  # the CPU matmul (a few rows) too
    with pytest.raises(_native.NativeLibraryError, match="row offsets"):
        torch.ops.lowra.matmul(A, packed, absmax, bits, code, bad, 64, [4, 64])
    with pytest.raises(_native.NativeLibraryError, match="bits"):
        torch.ops.lowra.matmul(A, packed, absmax, bad_bits, code, off, 64, [4, 64])


def test_native_failed_allocation_is_a_status():
    """No C++ exception crosses the C ABI (ctypes cannot catch one): an allocation that fails is status 6, named.
    2^30 float16 activation rows of 2^20 columns need 4 PiB of float32 scratch, past any address space."""
    cols, m = 1 << 20, 1 << 30
    bits, off = torch.ones(1, dtype=torch.uint8), torch.tensor([0, cols // 8])
    A, code, out = torch.zeros(16, dtype=torch.float16), torch.zeros(1, 16, dtype=torch.float16), torch.zeros(16)
    packed, absmax = torch.zeros(cols // 8, dtype=torch.uint8), torch.zeros(cols // 64)
    p = _native.ptr
    status = _native.load().lowra_matmul_cpu(p(A), _native.DTYPE_CODE[torch.float16], m, p(packed), cols // 8,
                                             p(absmax), None, p(bits), p(code), p(off), 1, cols, 64, None, p(out))
    assert status == 6
    with pytest.raises(_native.NativeLibraryError, match="out of host memory"):
        _native.check(status, "lowra matmul")
    with pytest.raises(_native.NativeLibraryError, match="internal error"):
        _native.check(7, "lowra matmul")


def test_format_validation_messages():
    with pytest.raises(LowRAFormatError, match="NaN/Inf"):
        check_weight(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(LowRAFormatError, match="2-D"):
        check_weight(torch.ones(3))
    with pytest.raises(LowRAFormatError, match="float32, float16 or bfloat16"):
        check_weight(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(LowRAFormatError, match=r"bits\[1\] = 3"):
        check_bits(torch.tensor([1, 3, 4]))
    with pytest.raises(LowRAFormatError, match="5 output channels"):
        check_bits(torch.tensor([1, 2]), rows=5)
    bits = torch.tensor([2, 4], dtype=torch.uint8)
    _, thr = nf_tables(bits)
    thr[1, 3], thr[1, 4] = 0.5, -0.5
    with pytest.raises(LowRAFormatError, match="row 1 are not sorted"):
        check_thresholds(thr, bits)
    off = row_offsets(bits, 64, 64)
    packed = torch.zeros(int(off[-1]), dtype=torch.uint8)
    absmax = torch.ones(2, 1)
    validate_layout(packed, absmax, bits, off, (2, 64), 64)
    with pytest.raises(LowRAFormatError, match="packed buffer has"):
        validate_layout(packed[:-1], absmax, bits, off, (2, 64), 64)
    with pytest.raises(LowRAFormatError, match="row offsets do not match"):
        validate_layout(packed, absmax, torch.tensor([4, 2], dtype=torch.uint8), off, (2, 64), 64)
    with pytest.raises(LowRAFormatError, match="absmax contains"):
        validate_layout(packed, -absmax, bits, off, (2, 64), 64)
    with pytest.raises(LowRAFormatError, match="blocksize"):
        validate_layout(packed, absmax, bits, off, (2, 64), 12)


def _small_state():
    W = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    return L.functional.quantize_lowra(W, 2)


def test_an_operand_on_another_device_is_refused_by_name():
    """One operand on meta among CPU tensors sent the call to the fake kernel, which returned an uninitialized CPU
    tensor as the result; every operand must be on the codes' (and the activations') device."""
    p, s = _small_state()
    A = torch.randn(2, 64)
    args = dict(absmax=s.absmax, bits=s.bits, codebook=s.code, row_offsets=s.row_offsets)
    for name in args:
        moved = [t.to("meta") if k == name else t for k, t in args.items()]
        with pytest.raises(RuntimeError, match=f"{name} is on meta, the codes on cpu"):
            torch.ops.lowra.dequantize(p, *moved, 64, [4, 64], torch.float32)
        with pytest.raises(RuntimeError, match=f"{name} is on meta, the codes on cpu"):
            torch.ops.lowra.matmul(A, p, *moved, 64, [4, 64])
    with pytest.raises(RuntimeError, match="bias is on meta, A on cpu"):
        torch.ops.lowra.matmul(A, p, *args.values(), 64, [4, 64], torch.zeros(4, device="meta"))
    with pytest.raises(RuntimeError, match="packed is on meta, A on cpu"):
        torch.ops.lowra.matmul(A, p.to("meta"), *args.values(), 64, [4, 64])
    with pytest.raises(RuntimeError, match="thresholds is on meta, A on cpu"):
        torch.ops.lowra.quantize(torch.randn(4, 64), s.bits, s.thresholds.to("meta"), s.row_offsets, 64)
    # all on meta: the fake kernels' shapes, as before
    out = torch.ops.lowra.dequantize(p.to("meta"), *(t.to("meta") for t in args.values()), 64, [4, 64], torch.float32)
    assert out.device.type == "meta" and out.shape == (4, 64)


@pytest.mark.parametrize("blocksize", [0, 4, 12, 8192])
def test_a_blocksize_outside_the_format_is_refused_before_any_shape_check(blocksize):
    """blocksize 0 was a ZeroDivisionError (the absmax size check divides by it) and 8192 surfaced as "row offsets
    inconsistent"; the ops now name the format's rule first."""
    p, s = _small_state()
    args = (s.absmax, s.bits, s.code, s.row_offsets, blocksize, [4, 64])
    with pytest.raises(ValueError, match=rf"blocksize must be a multiple of 8 in \[8, 4096\], got {blocksize}"):
        torch.ops.lowra.dequantize(p, *args, torch.float32)
    with pytest.raises(ValueError, match=r"blocksize must be a multiple of 8 in \[8, 4096\]"):
        torch.ops.lowra.matmul(torch.randn(2, 64), p, *args)
    with pytest.raises(ValueError, match=r"blocksize must be a multiple of 8 in \[8, 4096\]"):
        torch.ops.lowra.quantize(torch.randn(4, 64), s.bits, s.thresholds, s.row_offsets, blocksize)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_more_columns_than_the_native_index_allows_are_refused_by_name(device):
    """The C API refuses more than 2^31 - 1 columns with a generic "invalid argument"; the ops, the quantizer's weight
    check and the layout check now say what is wrong first. Stride-0 and meta tensors: nothing of that size exists."""
    cols = MAX_COLS + 1
    rows = torch.zeros(1, dtype=torch.uint8, device=device)
    bits, off = rows + 1, torch.zeros(2, dtype=torch.int64, device=device)
    thresholds = torch.zeros(1, 15, dtype=torch.float16, device=device)
    A = torch.zeros(1, 1, device=device).expand(1, cols)
    with pytest.raises(ValueError, match=rf"A has {cols} columns; the format allows at most {MAX_COLS}"):
        torch.ops.lowra.quantize(A, bits, thresholds, off, 64)
    packed = torch.zeros(1, dtype=torch.uint8, device=device)
    absmax = torch.zeros(1, device=device).expand(blocks_per_row(cols, 64))
    codebook = torch.zeros(1, 16, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=rf"the weight has {cols} columns"):
        torch.ops.lowra.dequantize(packed, absmax, bits, codebook, off, 64, [1, cols], torch.bfloat16)
    with pytest.raises(ValueError, match=rf"the weight has {cols} columns"):
        torch.ops.lowra.matmul(A, packed, absmax, bits, codebook, off, 64, [1, cols])
    # one column fewer passes the column check and meets the next one (here the scales' count)
    with pytest.raises(RuntimeError, match="absmax size does not match shape"):
        torch.ops.lowra.dequantize(packed, absmax[:1], bits, codebook, off, 64, [1, MAX_COLS], torch.bfloat16)
    with pytest.raises(LowRAFormatError, match=rf"weight has {cols} columns"):
        check_weight(torch.zeros(1, cols, device="meta"))
    with pytest.raises(LowRAFormatError, match=rf"the weight has {cols} columns"):
        validate_layout(packed, absmax, bits, off, (1, cols), 64)
