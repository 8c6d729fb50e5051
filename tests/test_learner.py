"""Tests of the mapping/threshold learner (bitsandbytes_lowra/learner.py).

Oracles: the lowra quantize/dequantize ops (the reported error must be the round trip's error), a slow per-row
weighted Lloyd-Max written here from the paper's description, and the classical Lloyd-Max optimum of known
distributions (computed here from closed-form partial moments).
"""

from __future__ import annotations

import math

import pytest
import torch

import bitsandbytes_lowra  # noqa: F401  (registers torch.ops.lowra)
from bitsandbytes_lowra import codebooks, learner
from bitsandbytes_lowra.format import LowRAFormatError, check_codebook, check_thresholds, row_offsets
from bitsandbytes_lowra.learner import PrecisionFit, learn_layer, nf_fit, tables_for_bits

PRECS = (1, 2, 4)


def _weights(rows=37, cols=200, seed=0, dtype=torch.float32):
    """Heavy-tailed rows of varied scale, with an all-zero block and an all-zero row (edge cases of the format)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, rows, cols, generator=g)
    t4 = z[0] / (z[1:] ** 2).mean(0).sqrt()  # Student-t, 4 degrees of freedom
    W = t4 * (0.2 + torch.rand(rows, 1, generator=g))
    W[1, 64:128] = 0
    W[2] = 0
    return W.to(dtype)


def _round_trip_error(W, fits, bits, blocksize):
    """Per-row squared error of the real quantize -> dequantize with the learned tables."""
    codebook, thresholds = tables_for_bits(fits, bits)
    offsets = row_offsets(bits, W.shape[1], blocksize)
    packed, absmax = torch.ops.lowra.quantize(W, bits, thresholds, offsets, blocksize)
    deq = torch.ops.lowra.dequantize(packed, absmax, bits, codebook, offsets, blocksize, list(W.shape), torch.float32)
    return ((W.double() - deq.double()) ** 2).sum(dim=1)


def _reported_error(fits, bits):
    return torch.stack([fits[int(b)].error[i] for i, b in enumerate(bits.tolist())])


def _random_bits(rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(PRECS, dtype=torch.uint8)[torch.randint(0, 3, (rows,), generator=g)]


# --- the reported error is the kernel's round-trip error ------------------------------------------------------


@pytest.mark.parametrize("mode", learner.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_error_equals_kernel_round_trip(mode, dtype):
    W = _weights(dtype=dtype)  # 200 columns: the last 64-block is padded
    fits = learn_layer(W, mode=mode)
    bits = _random_bits(W.shape[0])
    expected = _round_trip_error(W, fits, bits, 64)
    torch.testing.assert_close(_reported_error(fits, bits), expected, rtol=1e-6, atol=1e-12)
    assert _reported_error(fits, bits)[2] == 0  # the all-zero row


@pytest.mark.parametrize("blocksize", [8, 32, 128])
def test_error_equals_kernel_round_trip_every_precision(blocksize):
    W = _weights(rows=20, cols=300, seed=3)
    fits = learn_layer(W, blocksize=blocksize, weight_power=2.0)
    nf = nf_fit(W, blocksize=blocksize)
    for p in PRECS:
        bits = torch.full((W.shape[0],), p, dtype=torch.uint8)
        torch.testing.assert_close(fits[p].error, _round_trip_error(W, fits, bits, blocksize), rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(nf[p].error, _round_trip_error(W, nf, bits, blocksize), rtol=1e-6, atol=1e-12)


# --- shapes, dtypes, Appendix F initial values, modes ---------------------------------------------------------


def test_output_contract():
    W = _weights()
    fits = learn_layer(W)
    assert sorted(fits) == list(PRECS)
    for p, fit in fits.items():
        assert isinstance(fit, PrecisionFit) and fit.bits == p
        assert fit.codebook.dtype == torch.float16 and fit.codebook.shape == (W.shape[0], 2**p)
        assert fit.thresholds.dtype == torch.float16 and fit.thresholds.shape == (W.shape[0], 2**p - 1)
        assert fit.error.dtype == torch.float64 and fit.error.shape == (W.shape[0],)
        assert 1 <= fit.iterations <= 2
        c = fit.codebook.float()
        assert (c[:, 1:] >= c[:, :-1]).all(), "codebooks are sorted ascending"
        assert c.abs().max() <= 1
        # thresholds are the float16 midpoints of the float16 levels, except rows kept at the Appendix F tables
        mids = codebooks.midpoints(c).half()
        init = (fit.codebook == codebooks.initial_mapping(p).half()).all(dim=1)
        assert torch.equal(fit.thresholds[~init], mids[~init])
    codebook, thresholds = tables_for_bits(fits, _random_bits(W.shape[0]))
    check_codebook(codebook, _random_bits(W.shape[0]))
    check_thresholds(thresholds, _random_bits(W.shape[0]))


def test_nf_fit_is_appendix_f():
    W = _weights()
    nf = nf_fit(W)
    for p in PRECS:
        assert nf[p].iterations == 0
        assert torch.equal(nf[p].codebook, codebooks.initial_mapping(p).half().expand(W.shape[0], -1))
        assert torch.equal(nf[p].thresholds, codebooks.initial_thresholds(p).half().expand(W.shape[0], -1))
    # the tables agree with codebooks.nf_tables, the storage-side NF tables
    bits = _random_bits(W.shape[0])
    code, thr = tables_for_bits(nf, bits)
    ref_code, ref_thr = codebooks.nf_tables(bits)
    assert torch.equal(code, ref_code) and torch.equal(thr, ref_thr)


def test_shared_mode_uses_one_codebook_per_precision():
    W = _weights()
    shared = learn_layer(W, mode="shared")
    for p in PRECS:
        assert (shared[p].codebook == shared[p].codebook[0]).all()
        assert (shared[p].thresholds == shared[p].thresholds[0]).all()
        assert not torch.equal(shared[p].codebook[0], codebooks.initial_mapping(p).half()), "it learned something"


def test_fixed_mapping_keeps_levels_and_uses_midpoints():
    W = _weights()
    fixed = learn_layer(W, mode="fixed_mapping", iterations=5)
    nf = nf_fit(W)
    for p in PRECS:
        c16 = codebooks.initial_mapping(p).half()
        assert torch.equal(fixed[p].codebook, c16.expand(W.shape[0], -1))
        assert torch.equal(fixed[p].thresholds[0], codebooks.midpoints(c16.float()).half())
        assert fixed[p].iterations == 0
        # Appendix F's 1- and 2-bit thresholds are these midpoints; 4-bit ones differ by float16 rounding only
        if p < 4:
            assert torch.equal(fixed[p].error, nf[p].error)
        else:
            torch.testing.assert_close(fixed[p].error, nf[p].error, rtol=1e-3, atol=0)


def test_fixed_mapping_thresholds_are_optimal_for_the_levels():
    # Moving any one threshold of the fixed mapping by +-2**-10 never lowers the layer's error.
    W = _weights(rows=16, cols=256, seed=5)
    fixed = learn_layer(W, precisions=(2,), mode="fixed_mapping")[2]
    base = fixed.error.sum()
    for j in range(3):
        for step in (-2, 2):
            t = fixed.thresholds.clone()
            t[:, j] = (t[:, j].float() + step * 2.0**-11).half()
            moved = {2: PrecisionFit(2, fixed.codebook, t, fixed.error, 0)}
            bits = torch.full((W.shape[0],), 2, dtype=torch.uint8)
            assert _round_trip_error(W, moved, bits, 64).sum() >= base * (1 - 1e-12)


# --- the algorithm: reference implementation, monotonicity, never worse than Appendix F --------------------------


def _reference_row(x, bits, blocksize, iterations, weight_power):
    """The weighted Lloyd-Max of one row written plainly: per-element loops over codes, float64 sums."""
    cols = x.numel()
    pc = -(-cols // blocksize) * blocksize
    xp = torch.zeros(pc)
    xp[:cols] = x.float()
    blocks = xp.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    v = torch.where(absmax > 0, blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)), 0.0).view(-1)[:cols]
    a = absmax.expand(-1, blocksize).reshape(-1)[:cols]
    w = torch.where(a > 0, a.double() ** weight_power, 0.0)

    def codes(t16):
        return torch.searchsorted(t16.float(), v, side="left")

    def objective(c16, t16):
        return (w * (v.double() - c16.double()[codes(t16)]) ** 2).sum()

    def error(c16, t16):
        return ((x.float().double() - (c16.float()[codes(t16)] * a).double()) ** 2).sum()

    init = (codebooks.initial_mapping(bits).half(), codebooks.initial_thresholds(bits).half())
    best, best_obj, cur = init, objective(*init), init
    for _ in range(iterations):
        code = codes(cur[1])
        levels = cur[0].double().clone()
        for j in range(2**bits):
            sel = code == j
            if w[sel].sum() > 0:
                levels[j] = (w[sel] * v[sel].double()).sum() / w[sel].sum()
        c16 = levels.float().sort().values.half()
        cur = (c16, codebooks.midpoints(c16.float()).half())
        obj = objective(*cur)
        if not obj < best_obj:
            break
        best, best_obj = cur, obj
    if error(*best) > error(*init):
        best = init
    return best[0], best[1], error(*best)


@pytest.mark.parametrize("weight_power", [1.0, 2.0, 0.5])
def test_matches_reference_lloyd(weight_power):
    W = _weights(rows=9, cols=150, seed=7)  # ragged: 150 = 2 * 64 + 22 real columns in the last block
    fits = learn_layer(W, iterations=3, weight_power=weight_power, chunk_rows=4)
    for r in range(W.shape[0]):
        for p in PRECS:
            c, t, err = _reference_row(W[r], p, 64, 3, weight_power)
            # float16 tables may differ by one rounding step where fixed-point and float64 centroids straddle a tie
            assert (fits[p].codebook[r].float() - c.float()).abs().max() <= 2.0**-11, (r, p)
            torch.testing.assert_close(fits[p].error[r], err, rtol=1e-4, atol=1e-10)


def test_padding_takes_no_part_in_the_fit():
    # Appending real zeros changes the fit (they are data); padding zeros must not.
    W = _weights(rows=8, cols=100, seed=9)
    fits = learn_layer(W)
    for r in range(W.shape[0]):
        for p in PRECS:
            c, _, err = _reference_row(W[r], p, 64, 2, 1.0)
            assert (fits[p].codebook[r].float() - c.float()).abs().max() <= 2.0**-11
    # An all-positive row leaves the lower 1-bit bin empty, so its level stays -1; the 28 padding zeros of the
    # second block would fall in that bin and pull the level to 0 if they counted.
    x = torch.rand(1, 100, generator=torch.Generator().manual_seed(0)) + 1.0
    fit = learn_layer(x, precisions=(1,), iterations=1)[1]
    assert fit.codebook[0, 0].item() == -1.0 and 0.5 < fit.codebook[0, 1].item() < 1.0


def test_error_never_above_appendix_f_and_falls_with_iterations():
    W = _weights(rows=64, cols=256, seed=11)
    nf = nf_fit(W)
    previous = None
    for iterations in range(0, 6):
        fits = learn_layer(W, iterations=iterations, weight_power=2.0)
        for p in PRECS:
            assert (fits[p].error <= nf[p].error).all()
            if previous is not None:
                # weight_power=2 makes the Lloyd objective the weight-space error (up to float32 rounding)
                assert (fits[p].error <= previous[p].error * (1 + 1e-9)).all(), (iterations, p)
        previous = fits
    for p in PRECS:
        assert (previous[p].error < nf[p].error).float().mean() > 0.9, "learning helps almost every row"


def _objective(W, fit, blocksize, weight_power):
    """Per-row weighted Lloyd objective sum absmax**power * (v - y[code])^2 of the returned tables."""
    rows, cols = W.shape
    pc = -(-cols // blocksize) * blocksize
    xp = torch.zeros(rows, pc)
    xp[:, :cols] = W
    blocks = xp.view(rows, -1, blocksize)
    absmax = blocks.abs().amax(-1, keepdim=True)
    v = (blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))).view(rows, pc)[:, :cols]
    w = absmax.double().pow(weight_power).expand(-1, -1, blocksize).reshape(rows, pc)[:, :cols]
    codes = torch.searchsorted(fit.thresholds.float(), v.contiguous(), side="left")
    y = torch.gather(fit.codebook.double(), 1, codes)
    return (w * (v.double() - y) ** 2).sum(1)


def test_paper_objective_falls_with_iterations():
    # weight_power=1 (paper): iterations lower the weighted objective, not necessarily the weight-space error.
    W = _weights(rows=64, cols=256, seed=12)
    prev = None
    for iterations in range(0, 5):
        fits = learn_layer(W, iterations=iterations)
        objs = {p: _objective(W, fits[p], 64, 1.0) for p in PRECS}
        reverted = {p: (fits[p].codebook == codebooks.initial_mapping(p).half()).all(1) for p in PRECS}
        if prev is not None:
            for p in PRECS:
                keep = ~reverted[p]  # rows sent back to Appendix F by the weight-space guard are exempt
                assert (objs[p][keep] <= prev[p][keep] * (1 + 1e-9)).all(), (iterations, p)
        prev = objs


def test_early_stop_reports_iterations_run():
    # A constant-magnitude row converges at once at 1 bit: the second update changes nothing and stops the loop.
    W = torch.tensor([[1.0, -1.0] * 32, [0.5, -0.5] * 32])
    fit = learn_layer(W, precisions=(1,), iterations=10)[1]
    assert fit.iterations == 1
    assert torch.equal(fit.codebook, codebooks.initial_mapping(1).half().expand(2, -1))
    assert (fit.error == 0).all()


def test_empty_bins_keep_their_level():
    # Values 1 and 0.5 only: 0.5 falls in the bin of NF4's 0.4407 (upper edge 0.5017), which moves to 0.5; the
    # bin of 1.0 keeps 1.0; the 14 empty bins keep their Appendix F levels.
    W = torch.tensor([[1.0, 0.5] * 32])
    fit = learn_layer(W, precisions=(4,), iterations=1)[4]
    expected = codebooks.initial_mapping(4).clone()
    expected[12] = 0.5
    assert torch.equal(fit.codebook[0], expected.half())
    assert fit.error[0] == 0


@pytest.mark.parametrize("chunk_rows", [1, 7])
def test_chunking_does_not_change_results(chunk_rows):
    # Bit for bit, errors included: the default chunk differs between CPU and CUDA, and a layer's last chunk can be
    # one row (whose error torch once reduced along another path). 2048 columns: where that path differed.
    W = _weights(rows=20, cols=2048, seed=4)
    for mode in learner.MODES:
        whole = learn_layer(W, mode=mode)
        chunked = learn_layer(W, mode=mode, chunk_rows=chunk_rows)
        for p in PRECS:
            assert torch.equal(whole[p].codebook, chunked[p].codebook), (mode, p)
            assert torch.equal(whole[p].thresholds, chunked[p].thresholds), (mode, p)
            assert torch.equal(whole[p].error, chunked[p].error), (mode, p)
            assert whole[p].iterations == chunked[p].iterations, (mode, p)


def test_row_square_sums_do_not_depend_on_the_row_count():
    # Past 32768 elements torch splits a lone row's sum over threads: another order than the row among others.
    d = torch.randn(4, 40000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = learner._row_square_sums(d.clone())
        alone = torch.cat([learner._row_square_sums(d[i : i + 1].clone()) for i in range(4)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)
    torch.testing.assert_close(together, (d * d).sum(1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("iterations", [0, 2, 5])
def test_shared_mode_prepares_each_chunk_once_per_pass(monkeypatch, iterations):
    # Preparing (sorting) a chunk is the costly step: once per Lloyd pass over the layer (all precisions together,
    # errors included), not once per precision, step and error pass (9x slower once a layer needed two chunks).
    calls = []
    prepare = learner._prepare
    monkeypatch.setattr(learner, "_prepare", lambda W, *a: calls.append(W.shape[0]) or prepare(W, *a))
    W = _weights(rows=50, cols=192, seed=4)
    fits = learn_layer(W, mode="shared", iterations=iterations, chunk_rows=7)
    chunks = math.ceil(50 / 7)
    assert len(calls) <= chunks * (1 + max(f.iterations for f in fits.values()))


def test_deterministic():
    W = _weights(rows=40, cols=256, seed=6)
    a, b = learn_layer(W), learn_layer(W.clone())
    for p in PRECS:
        assert torch.equal(a[p].codebook, b[p].codebook) and torch.equal(a[p].error, b[p].error)


def test_scale_invariance():
    # Scaling a weight by a power of two scales errors by its square and leaves the tables unchanged.
    W = _weights(rows=20, cols=128, seed=8)
    a, b = learn_layer(W), learn_layer(W * 8)
    for p in PRECS:
        assert torch.equal(a[p].codebook, b[p].codebook)
        torch.testing.assert_close(b[p].error, a[p].error * 64, rtol=1e-12, atol=0)


# --- classical Lloyd-Max optima of known distributions --------------------------------------------------------


def _partial_moments(kind, a, b):
    """Probability mass and first moment on [a, b] of a unit-variance density (bimodal: +-2 with std 0.5)."""
    if kind in ("gauss", "bimodal"):
        comps = [(0.0, 1.0, 1.0)] if kind == "gauss" else [(-2.0, 0.5, 0.5), (2.0, 0.5, 0.5)]
        mass = mom = 0.0
        for mu, s, pi in comps:
            za, zb = (a - mu) / s, (b - mu) / s
            m = 0.5 * (math.erf(zb / math.sqrt(2)) - math.erf(za / math.sqrt(2)))
            d = (math.exp(-za * za / 2) - math.exp(-zb * zb / 2)) / math.sqrt(2 * math.pi)
            mass += pi * m
            mom += pi * (mu * m + s * d)
        return mass, mom
    if kind == "laplace":
        s = 1 / math.sqrt(2)

        def cdf(x):  # mass and first moment of (-inf, x]
            if x <= 0:
                return 0.5 * math.exp(x / s), 0.5 * (x - s) * math.exp(x / s)
            return 1 - 0.5 * math.exp(-x / s), -0.5 * (x + s) * math.exp(-x / s)

        (ma, xa), (mb, xb) = cdf(a), cdf(b)
        return mb - ma, xb - xa
    return (b - a) / 2, (b * b - a * a) / 4  # uniform on [-1, 1]


def _lloyd_max(kind, levels, M, point_mass, iterations):
    """Classical Lloyd-Max levels of the density truncated to [-M, M], plus point_mass split between -M and +M."""
    y = [-M + 2 * M * (i + 0.5) / levels for i in range(levels)]
    for _ in range(iterations):
        edges = [-M] + [(y[i] + y[i + 1]) / 2 for i in range(levels - 1)] + [M]
        new = []
        for i in range(levels):
            mass, mom = _partial_moments(kind, edges[i], edges[i + 1])
            mass, mom = mass * (1 - point_mass), mom * (1 - point_mass)
            if i == 0:
                mass, mom = mass + point_mass / 2, mom - M * point_mass / 2
            if i == levels - 1:
                mass, mom = mass + point_mass / 2, mom + M * point_mass / 2
            new.append(mom / mass)
        y = new
    return torch.tensor(y)


def _sample(kind, rows, cols, M, seed):
    """Samples truncated to |x| < M; element 0 of every row is +-M so that every row shares absmax M."""
    g = torch.Generator().manual_seed(seed)

    def draw(k):
        if kind == "gauss":
            return torch.randn(k, generator=g, dtype=torch.float64)
        if kind == "bimodal":
            return 0.5 * torch.randn(k, generator=g, dtype=torch.float64) + 2 * torch.sign(
                torch.rand(k, generator=g, dtype=torch.float64) - 0.5
            )
        if kind == "laplace":
            u = torch.rand(k, generator=g, dtype=torch.float64) - 0.5
            return -torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2)
        return torch.rand(k, generator=g, dtype=torch.float64) * 2 - 1

    x = draw(rows * cols)
    bad = x.abs() >= M
    while bad.any():
        x[bad] = draw(int(bad.sum()))
        bad = x.abs() >= M
    x = x.view(rows, cols)
    x[:, 0] = torch.where(torch.arange(rows) % 2 == 0, M, -M)
    return x.float()


def _sample_lloyd(x, levels, iterations):
    """High-iteration unweighted Lloyd on samples, float64, from uniformly spread levels."""
    y = torch.linspace(-1, 1, levels + 2, dtype=torch.float64)[1:-1] * x.abs().max()
    x = x.double().flatten()
    for _ in range(iterations):
        code = torch.bucketize(x, (y[1:] + y[:-1]) / 2, right=False)
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, code, x)
        counts = torch.bincount(code, minlength=levels).double()
        y = torch.where(counts > 0, sums / counts.clamp(min=1), y)
    return y


def _error_with_levels(W, levels, blocksize):
    c16 = levels.half()
    rows = W.shape[0]
    fit = PrecisionFit(
        {2: 1, 4: 2, 16: 4}[levels.numel()],
        c16.expand(rows, -1).contiguous(),
        codebooks.midpoints(c16.float()).half().expand(rows, -1).contiguous(),
        torch.zeros(rows, dtype=torch.float64),
        0,
    )
    bits = torch.full((rows,), fit.bits, dtype=torch.uint8)
    return _round_trip_error(W, {fit.bits: fit}, bits, blocksize).sum()


@pytest.mark.parametrize(
    "kind,M,level_tol",
    [("gauss", 5.0, 0.01), ("uniform", 1.0, 0.005), ("bimodal", 5.0, 0.01), ("laplace", 8.0, None)],
)
def test_approaches_classical_lloyd_max(kind, M, level_tol):
    # One block per row and the same absmax M in every row: the shared, unweighted fit is the classical problem.
    rows, cols = 16, 4096
    W = _sample(kind, rows, cols, M, seed=13)
    for p in (1, 2):
        fit = learn_layer(W, precisions=(p,), blocksize=cols, iterations=300, mode="shared", weight_power=0.0)[p]
        optimum = _lloyd_max(kind, 2**p, M, 1 / cols, iterations=1000)
        learned = fit.codebook[0].double() * M
        # At the optimum's levels the sample's error can only be higher than at the learned ones (up to 1e-4).
        assert fit.error.sum() <= _error_with_levels(W, optimum / M, cols) * (1 + 1e-4), (kind, p)
        if level_tol is not None:
            # Laplace's optimum is flat (memoryless tails): its sample optimum wanders, so only the error is checked.
            assert (learned - optimum).abs().max() <= level_tol * M, (kind, p, learned, optimum)
    # 4 bits: Lloyd converges slowly and float16 steps stall it, so compare with a float64 sample Lloyd instead.
    fit = learn_layer(W, precisions=(4,), blocksize=cols, iterations=300, mode="shared", weight_power=0.0)[4]
    reference = _sample_lloyd(W, 16, iterations=300) / M
    assert fit.error.sum() <= _error_with_levels(W, reference, cols) * 1.005, kind


def test_gaussian_one_bit_levels_are_conditional_means():
    # Single-block rows at 1 bit: one update from threshold 0 gives the row's conditional means (+-E|x| / absmax).
    torch.manual_seed(14)
    W = torch.randn(8, 4096)
    fit = learn_layer(W, precisions=(1,), blocksize=4096, iterations=1)[1]
    v = W / W.abs().amax(1, keepdim=True)
    neg = torch.stack([r[r <= 0].double().mean() for r in v])
    pos = torch.stack([r[r > 0].double().mean() for r in v])
    torch.testing.assert_close(fit.codebook[:, 0].double(), neg, rtol=1e-3, atol=0)
    torch.testing.assert_close(fit.codebook[:, 1].double(), pos, rtol=1e-3, atol=0)
    # and those approach +-sqrt(2/pi) sigma
    scaled = fit.codebook[:, 1].double() * W.abs().amax(1).double()
    assert (scaled - math.sqrt(2 / math.pi)).abs().max() < 0.05


# --- tables_for_bits and argument checks ----------------------------------------------------------------------


def test_tables_for_bits_picks_each_rows_precision():
    W = _weights()
    fits = learn_layer(W)
    bits = _random_bits(W.shape[0], seed=3)
    code, thr = tables_for_bits(fits, bits.to(torch.int64))
    assert code.shape == (W.shape[0], 16) and thr.shape == (W.shape[0], 15)
    assert code.dtype == thr.dtype == torch.float16
    for r, b in enumerate(bits.tolist()):
        assert torch.equal(code[r, : 2**b], fits[b].codebook[r]) and (code[r, 2**b :] == 0).all()
        assert torch.equal(thr[r, : 2**b - 1], fits[b].thresholds[r]) and (thr[r, 2**b - 1 :] == 0).all()


def test_tables_for_bits_errors():
    W = _weights()
    fits = learn_layer(W, precisions=(2, 4))
    with pytest.raises(LowRAFormatError, match="1-bit"):
        tables_for_bits(fits, torch.ones(W.shape[0], dtype=torch.uint8))
    with pytest.raises(LowRAFormatError, match="entries"):
        tables_for_bits(fits, torch.full((3,), 2, dtype=torch.uint8))
    with pytest.raises(LowRAFormatError, match="not one of"):
        tables_for_bits(fits, torch.full((W.shape[0],), 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        tables_for_bits({}, torch.full((W.shape[0],), 2, dtype=torch.uint8))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(precisions=(3,)), "precisions"),
        (dict(precisions=()), "precisions"),
        (dict(precisions=(2, 2)), "precisions"),
        (dict(precisions=(2.5,)), "precisions"),
        (dict(precisions=(True,)), "precisions"),
        (dict(precisions=2), "iterable"),
        (dict(blocksize=10), "blocksize"),
        (dict(iterations=-1), "iterations"),
        (dict(iterations=1.5), "iterations"),
        (dict(mode="average"), "mode"),
        (dict(weight_power=-1.0), "weight_power"),
        (dict(weight_power=float("nan")), "weight_power"),
        (dict(chunk_rows=0), "chunk_rows"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        learn_layer(_weights(rows=4, cols=64), **kwargs)


def test_accepts_parameters_numpy_precisions_and_non_contiguous_weights():
    import numpy as np

    W = _weights(rows=12, cols=128)
    ref = learn_layer(W, (1, 4))
    param = learn_layer(torch.nn.Parameter(W.clone()), np.array([1, 4]))
    transposed = learn_layer(W.t().contiguous().t(), (p for p in (1, 4)))
    for p in (1, 4):
        assert not param[p].error.requires_grad
        assert torch.equal(param[p].codebook, ref[p].codebook) and torch.equal(transposed[p].error, ref[p].error)


def test_accepts_integral_float_precisions_and_numpy_scalars():
    # As LowRAConfig / PlanSettings take them: precisions=(2.0,) was refused as "not an iterable of bit widths".
    import numpy as np

    W = _weights(rows=12, cols=128)
    ref = learn_layer(W, (2, 4), blocksize=32, iterations=1, weight_power=2.0, chunk_rows=5)
    got = learn_layer(W, (2.0, np.float64(4)), blocksize=np.int64(32), iterations=np.int64(1),
                      weight_power=np.float32(2), chunk_rows=np.int32(5))
    assert sorted(got) == [2, 4] and all(type(p) is int for p in got)
    for p in (2, 4):
        assert torch.equal(got[p].codebook, ref[p].codebook) and torch.equal(got[p].error, ref[p].error)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_cuda_device_without_cuda_is_named():
    with pytest.raises(ValueError, match="asks for CUDA"):  # was torch's bare "Torch not compiled with CUDA enabled"
        learn_layer(_weights(rows=4, cols=64), device="cuda")


def test_meta_weight_and_meta_device_are_named():
    with pytest.raises(LowRAFormatError, match="meta device"):  # was "Tensor.item() cannot be called on meta tensors"
        learn_layer(torch.empty(4, 64, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        learn_layer(_weights(rows=4, cols=64), device="meta")
    with pytest.raises(ValueError, match="device must be a torch device"):
        learn_layer(_weights(rows=4, cols=64), device="tpu")


def test_bad_weights():
    with pytest.raises(LowRAFormatError, match="2-D"):
        learn_layer(torch.zeros(64))
    with pytest.raises(LowRAFormatError, match="float32"):
        learn_layer(torch.zeros(4, 64, dtype=torch.int32))
    W = torch.randn(4, 64)
    W[1, 3] = float("nan")
    with pytest.raises(LowRAFormatError, match="NaN"):
        learn_layer(W)


# --- real model -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_layer0():
    from bitsandbytes_lowra import data

    try:
        weights = data.smollm2_linear_weights()
    except data.MissingDataError as e:  # the optional data extra is not installed
        pytest.skip(str(e))
    return {k: v for k, v in weights.items() if ".layers.0." in k}


def test_smollm2_learned_beats_nf_and_shared(smollm2_layer0):
    assert len(smollm2_layer0) == 7  # q, k, v, o, gate, up, down
    for name, W in smollm2_layer0.items():
        learned, nf, shared = learn_layer(W), nf_fit(W), learn_layer(W, mode="shared")
        for p in PRECS:
            assert (learned[p].error <= nf[p].error).all(), (name, p)
            assert learned[p].error.sum() < nf[p].error.sum(), (name, p)
            assert learned[p].error.sum() < shared[p].error.sum(), (name, p)


# --- CUDA (skipped without a GPU; run on the GPU machine) -----------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_kernel():
    W = _weights(rows=300, cols=1000, seed=15)
    cpu = learn_layer(W)
    gpu = learn_layer(W.cuda())
    moved = learn_layer(W, device="cuda")  # CPU weight, GPU compute, CPU results
    bits = _random_bits(W.shape[0])
    for p in PRECS:
        assert gpu[p].codebook.is_cuda and not moved[p].codebook.is_cuda
        # fixed-point bin sums make the tables identical on both devices
        assert torch.equal(gpu[p].codebook.cpu(), cpu[p].codebook)
        assert torch.equal(moved[p].thresholds, cpu[p].thresholds)
        torch.testing.assert_close(gpu[p].error.cpu(), cpu[p].error, rtol=1e-12, atol=1e-15)
    expected = _round_trip_error(W.cuda(), gpu, bits.cuda(), 64)
    torch.testing.assert_close(_reported_error(gpu, bits.cuda()), expected, rtol=1e-6, atol=1e-12)
    for mode in ("shared", "fixed_mapping"):
        a, b = learn_layer(W, mode=mode), learn_layer(W.cuda(), mode=mode, chunk_rows=64)
        for p in PRECS:
            assert torch.equal(a[p].codebook, b[p].codebook.cpu())
