"""Quantize on adversarial inputs, bit for bit against the reference: elements at threshold * absmax and a few ulps
either side for every precision and input dtype, duplicate thresholds, all-zero blocks, tiny and subnormal elements,
block maxima at the edges of the CUDA kernel's fast range [2^-120, 2^100], thresholds on the edges of its 4-bit bins,
closer than a bin or outside [-1, 1], and shapes that take the fast and the generic CUDA paths. The cpu cases run in
CI; the cuda ones on the GPU machine."""

import pytest
import torch

from bitsandbytes_lowra.backends import reference
from bitsandbytes_lowra.format import padded_cols, row_offsets

from .conftest import QUANTIZE_TUNINGS, devices, quantize_tuning

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# block-maximum exponents: fp16 stays inside its range (subnormal maxima included), the others reach past the
# CUDA kernel's fast range [2^-120, 2^100] on both sides (and below the smallest normal)
_WIDE = [-130, -126, -121, -120, -119, -40, -2, 0, 31, 99, 100, 101, 120, 126]
EXPONENTS = {torch.float16: [-20, -14, -3, 0, 4, 14], torch.bfloat16: _WIDE, torch.float32: _WIDE}


def thresholds_with_duplicates(rows: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted float16 thresholds [rows, 15] drawn from few distinct values, so rows repeat thresholds."""
    pool = torch.cat([torch.rand(6, generator=gen) * 2 - 1, torch.tensor([0.0, 0.5, -0.25, 1.0])])
    idx = torch.randint(0, pool.numel(), (rows, 15), generator=gen)
    return torch.sort(pool[idx].half(), dim=1).values


def adversarial_weight(rows, cols, blocksize, dtype, thr, bits, gen):
    """Every block: its maximum a (a random significand at one of EXPONENTS) at a random place, with that sign or
    the other, and elements x = dtype(t a) stepped -4..4 ulps for thresholds t the row uses, clamped to |x| <= a.
    Some blocks are all zero; some hold zeros and elements far below a (down to subnormals)."""
    pc = padded_cols(cols, blocksize)
    nb = pc // blocksize
    exps = torch.tensor(EXPONENTS[dtype], dtype=torch.float32)
    a = (1 + torch.rand(rows, nb, 1, generator=gen)) * torch.exp2(exps[torch.randint(0, len(exps), (rows, nb, 1), generator=gen)])
    a = a.to(dtype).float()
    used = (2 ** bits.long() - 1)[:, None, None]
    pick = (torch.rand(rows, nb, blocksize, generator=gen) * used).long()  # a threshold the row uses
    t = torch.gather(thr.float()[:, None, :].expand(rows, nb, 15), 2, pick)
    sign = torch.where(torch.rand(rows, nb, blocksize, generator=gen) < 0.5, -1.0, 1.0)
    x = (t * a * sign.abs()).to(dtype)
    step = torch.randint(-4, 5, (rows, nb, blocksize), generator=gen)
    x = (x.view(INT_VIEW[dtype]) + step.to(INT_VIEW[dtype])).view(dtype).float()
    x = torch.where(x.isfinite() & (x.abs() <= a), x, a * sign)
    # far below the maximum: zeros, a 2^-40, the smallest normal and subnormal of the dtype
    tiny = torch.tensor([0.0, -0.0, 2.0**-40, -(2.0**-40), torch.finfo(dtype).tiny, torch.finfo(dtype).tiny / 8])
    far = torch.rand(rows, nb, blocksize, generator=gen) < 0.05
    x = torch.where(far, tiny[torch.randint(0, tiny.numel(), (rows, nb, blocksize), generator=gen)].to(dtype).float(), x)
    where = torch.randint(0, blocksize, (rows, nb, 1), generator=gen)
    x.scatter_(2, where, a * torch.where(torch.rand(rows, nb, 1, generator=gen) < 0.5, -1.0, 1.0))
    x[torch.rand(rows, nb, generator=gen) < 0.05] = 0.0  # all-zero blocks
    return x.reshape(rows, pc)[:, :cols].to(dtype).contiguous()


def assert_quantize_matches_reference(W, bits, thr, blocksize, device):
    """Quantize W with the op on `device` and require packed codes and absmax equal, bit for bit, to the
    reference's; returns the reference absmax."""
    off = row_offsets(bits, W.shape[1], blocksize)
    ref_packed, ref_absmax = reference.quantize(W, bits, thr, off, blocksize)
    d = [t.to(device) for t in (W, bits, thr, off)]
    for tuning in QUANTIZE_TUNINGS if torch.device(device).type == "cuda" else ((0, 0),):
        with quantize_tuning(*tuning):
            packed, absmax = (t.cpu() for t in torch.ops.lowra.quantize(d[0], d[1], d[2], d[3], blocksize))
        assert torch.equal(absmax, ref_absmax), f"absmax differs (tuning {tuning})"
        assert torch.equal(packed, ref_packed), \
            f"{int((packed != ref_packed).sum())} packed bytes differ (tuning {tuning})"
    return ref_absmax


# (rows, cols, blocksize): the CUDA fast path (power-of-two blocksize <= 256, cols % 8 == 0) with padding, one or
# many segments per row and many rows per warp; the generic path (odd cols, blocksize 24 or 512)
SHAPES = [(6, 200, 64), (5, 4104, 64), (3, 9000, 8), (4, 2048, 16), (7, 640, 32), (3, 1000, 128), (2, 4096, 256),
          (300, 64, 64), (4, 203, 64), (3, 600, 24), (2, 1024, 512)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_adversarial_bit_identical(shape, dtype, device):
    rows, cols, bs = shape
    gen = torch.Generator().manual_seed(rows * 131 + cols + bs)
    bits = torch.tensor([1, 2, 4], dtype=torch.uint8)[torch.arange(rows) % 3]  # every precision
    thr = thresholds_with_duplicates(rows, gen)
    W = adversarial_weight(rows, cols, bs, dtype, thr, bits, gen)
    assert_quantize_matches_reference(W, bits, thr, bs, device)


def thresholds_on_bin_edges(rows: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted float16 thresholds [rows, 15] from the edges of the CUDA kernel's 4-bit bins ((k - 130.5) / 128, k
    integer: exact in float16), their neighbours one float16 ulp away, pairs closer than a bin, +-1 and values
    outside [-1, 1] (never or always below an element)."""
    k = torch.randint(2, 259, (64,), generator=gen).float()
    edges = ((k - 130.5) / 128).half()
    up = (edges.view(torch.int16) + 1).view(torch.float16)
    extra = torch.tensor([-65504.0, -1.5, -1.0, 1.0, 1.5, 65504.0, 0.0, 0.001, 0.0015]).half()
    pool = torch.cat([edges, up, extra])
    idx = torch.randint(0, pool.numel(), (rows, 15), generator=gen)
    return torch.sort(pool[idx], dim=1).values


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 4104, 64), (9, 2048, 32)])
def test_quantize_thresholds_on_bin_edges(shape, dtype, device):
    rows, cols, bs = shape
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    bits = torch.tensor([4, 4, 2, 1], dtype=torch.uint8)[torch.arange(rows) % 4]
    thr = thresholds_on_bin_edges(rows, gen)
    W = adversarial_weight(rows, cols, bs, dtype, thr, bits, gen)
    W[rows // 2] = torch.randn(cols, generator=gen).to(dtype)  # an ordinary row between them
    assert_quantize_matches_reference(W, bits, thr, bs, device)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_quantize_more_tasks_than_warps(device):
    """1601 rows of 3 segments: more (row, segment) tasks than the H200 has resident warps, so warps take unequal
    contiguous runs that start and end inside rows of every precision."""
    rows, cols = 1601, 4104
    gen = torch.Generator().manual_seed(5)
    bits = torch.tensor([1, 2, 4], dtype=torch.uint8)[torch.randint(0, 3, (rows,), generator=gen)]
    thr = torch.sort(torch.rand(rows, 15, generator=gen) * 2 - 1, dim=1).values.half()
    W = (torch.randn(rows, cols, generator=gen) * 0.02).bfloat16()
    assert_quantize_matches_reference(W, bits, thr, 64, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("b", [1, 2, 4])
def test_quantize_every_ulp_around_every_threshold(b, device):
    """One 4-bit/2-bit/1-bit row per absmax; the row holds dtype(t a) -16..16 ulps for each of its thresholds t
    (fp32 weights, so the ulps are the division's own), with a power-of-two absmax (t a exact) and an arbitrary one."""
    ts = torch.tensor([-0.7, -0.3, -0.1, -0.05, -0.01, 0.0, 0.02, 0.1, 0.2, 0.33, 0.4, 0.6, 0.8, 0.9, 0.99])
    thr = torch.sort(ts.half()).values[: 2**b - 1].float()
    thr = torch.cat([thr, torch.zeros(15 - thr.numel())]).half()
    rows = []
    for a in (1.0, 0.25, 0.0123457, 3.1415927, 7.3e-6):
        x = (thr[: 2**b - 1].float()[:, None] * a).flatten()
        steps = torch.arange(-16, 17, dtype=torch.int32)
        near = (x.view(torch.int32)[:, None] + steps[None, :]).view(torch.float32).flatten()
        near = torch.cat([torch.tensor([a]), near[near.abs() <= a]])
        rows.append(torch.cat([near, torch.zeros(-near.numel() % 64)]))
    cols = max(r.numel() for r in rows)
    W = torch.stack([torch.cat([r, torch.zeros(cols - r.numel())]) for r in rows])
    bits = torch.full((W.shape[0],), b, dtype=torch.uint8)
    assert_quantize_matches_reference(W, bits, thr.expand(W.shape[0], 15).contiguous(), 64, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 4104, 64), (5, 203, 64), (6, 600, 24)])
def test_quantize_non_finite_weights_agree_everywhere(shape, dtype, device):
    """The raw op takes what it is given (LinearLowRA and quantize_lowra refuse non-finite weights before it):
    NaN elements do not count towards their block's absmax and get code 0, +-inf make the absmax inf. Reference,
    CPU and CUDA kernels (fast and generic paths) agree bit for bit, including all-NaN blocks."""
    rows, cols, bs = shape
    gen = torch.Generator().manual_seed(rows + cols)
    W = torch.randn(rows, cols, generator=gen).to(dtype)
    W[0, 3] = float("nan")
    W[1, :bs] = float("nan")  # an all-NaN block: absmax 0
    W[2, 5] = float("inf")
    W[3, bs + 1] = float("-inf")
    W[4, 0], W[4, 1] = float("nan"), float("inf")
    W[rows - 1, torch.rand(cols, generator=gen) < 0.1] = float("nan")
    bits = torch.tensor([1, 2, 4], dtype=torch.uint8)[torch.arange(rows) % 3]
    thr = thresholds_with_duplicates(rows, gen)
    ref_absmax = assert_quantize_matches_reference(W, bits, thr, bs, device)
    assert ref_absmax[1, 0] == 0 and torch.isinf(ref_absmax[2, 0]) and not ref_absmax.isnan().any()
