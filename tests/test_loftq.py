"""LoftQ / PiSSA initialization on the real LowRA format (paper section 4.1, Appendix D), on real SmolLM2 layers."""

import pytest
import torch

import bitsandbytes_lowra  # noqa: F401
from bitsandbytes_lowra import learner, loftq
from bitsandbytes_lowra.codebooks import nf_tables
from bitsandbytes_lowra.format import LowRAFormatError
from bitsandbytes_lowra.functional import dequantize_lowra, make_plan, quantize_lowra
from bitsandbytes_lowra.nn import LinearLowRA

from .conftest import devices

pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = ("model.layers.20.self_attn.k_proj", "model.layers.3.self_attn.q_proj")
RANK = 16
SCALING = 2.0  # lora_alpha=32, r=16


@pytest.fixture(scope="module")
def fitted(smollm2_weights):
    """{layer: (W, learned fits at 1/2/4 bits)}."""
    return {name: (smollm2_weights[name], learner.learn_layer(smollm2_weights[name])) for name in LAYERS}


def plan_at(W, fits, avg_bits):
    """Learned tables at an average precision: 4 or 2 everywhere, or 1.75 = the quarter of the rows that lose the
    least by dropping to 1 bit at 1 bit and the rest at 2 (what the assigner does within one layer)."""
    rows = W.shape[0]
    if avg_bits in (2, 4):
        bits = torch.full((rows,), avg_bits, dtype=torch.uint8)
    else:
        assert avg_bits == 1.75
        bits = torch.full((rows,), 2, dtype=torch.uint8)
        bits[torch.argsort(fits[1].error - fits[2].error)[: rows // 4]] = 1
    code, thr = learner.tables_for_bits(fits, bits)
    return make_plan(bits, code, thr)


def low_rank_svd(R, rank):
    U, S, Vh = torch.linalg.svd(R.double(), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).float()


@pytest.mark.parametrize("avg_bits", [1.75, 2, 4])
def test_loftq_beats_zero_init_lora_and_falls_over_iterations(fitted, avg_bits):
    for name, (W, fits) in fitted.items():
        plan = plan_at(W, fits, avg_bits)
        res = loftq.lowra_loftq(W, plan, rank=RANK, iterations=5, scaling=SCALING, compress_statistics=True)
        e = res.errors
        assert len(e) == 5
        assert e[0] < res.baseline_error, (name, avg_bits, e, res.baseline_error)
        assert all(b <= a * 1.001 for a, b in zip(e, e[1:])), (name, avg_bits, e)  # never rises by more than 0.1%
        assert e[-1] < 0.99 * e[0], (name, avg_bits, e)
        assert res.best_step == 4
        # the number is what the stored weights give: ||W - (dequantize(packed) + scaling * B @ A)||
        Q = dequantize_lowra(res.packed, res.state, torch.float32)
        err = torch.linalg.norm(W - Q - SCALING * res.lora_B @ res.lora_A)
        assert float(err) == pytest.approx(e[-1], rel=1e-5)


def test_result_is_the_real_packed_format_with_the_plan_unchanged(fitted):
    W, fits = fitted[LAYERS[0]]
    plan = plan_at(W, fits, 1.75)
    res = loftq.lowra_loftq(W, plan, rank=8, iterations=3, scaling=1.0, compress_statistics=True)
    state = res.state
    assert res.packed.dtype == torch.uint8 and res.packed.numel() == int(state.row_offsets[-1])
    assert state.nested and state.dtype == W.dtype and tuple(state.shape) == tuple(W.shape)
    state.validate(res.packed)
    # precisions and tables stay those of the plan (made for W) through every step
    assert torch.equal(state.bits, plan.bits)
    assert torch.equal(state.code, plan.codebook) and torch.equal(state.thresholds, plan.thresholds)
    assert state.nominal_bits == pytest.approx(1.75, abs=0.01)
    # LoftQ ends on the SVD step: B @ A is the best rank-r approximation of W - Q for the returned Q
    Q = dequantize_lowra(res.packed, state, torch.float32)
    torch.testing.assert_close(res.lora_B @ res.lora_A, low_rank_svd(W - Q, 8), rtol=0, atol=2e-5)
    assert res.lora_A.shape == (8, W.shape[1]) and res.lora_B.shape == (W.shape[0], 8)


def test_scaling_is_divided_out_of_the_factors(fitted):
    W, fits = fitted[LAYERS[0]]
    plan = plan_at(W, fits, 2)
    one = loftq.lowra_loftq(W, plan, rank=4, iterations=2, scaling=1.0)
    eight = loftq.lowra_loftq(W, plan, rank=4, iterations=2, scaling=8.0)
    # peft computes base(x) + scaling * B(A(x)): the product that matters is scaling * B @ A
    torch.testing.assert_close(8.0 * eight.lora_B @ eight.lora_A, one.lora_B @ one.lora_A, rtol=1e-4, atol=1e-6)
    assert (one.packed != eight.packed).float().mean() < 1e-4  # same trajectory, up to float rounding at thresholds
    assert eight.errors == pytest.approx(one.errors, rel=1e-4)
    # sqrt(S / scaling) on each side: the factors are balanced, column norms of B = row norms of A
    torch.testing.assert_close(eight.lora_B.norm(dim=0), eight.lora_A.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_pissa_one_step_is_principal_components_then_quantized_residual(fitted):
    W, fits = fitted[LAYERS[0]]
    plan = plan_at(W, fits, 2)
    res = loftq.lowra_loftq(W, plan, rank=8, iterations=1, scaling=SCALING, init="pissa")
    low = SCALING * res.lora_B @ res.lora_A
    torch.testing.assert_close(low, low_rank_svd(W, 8), rtol=0, atol=2e-5)
    packed, _ = quantize_lowra(W - low, plan)
    assert torch.equal(res.packed, packed)
    assert res.errors[0] < res.baseline_error


def test_the_lowest_error_step_is_returned_when_the_alternation_rises(smollm2_weights):
    """With the unlearned 1-bit codebook {-1, +1} quantization overshoots and LoftQ's error grows after step 1; the
    step with the lowest error is returned, and its pair reproduces that error."""
    W = smollm2_weights[LAYERS[0]]
    bits = torch.full((W.shape[0],), 2, dtype=torch.uint8)
    bits[: W.shape[0] // 4] = 1
    code, thr = nf_tables(bits)
    res = loftq.lowra_loftq(W, bits, code, thr, rank=RANK, iterations=3, scaling=SCALING)
    assert max(res.errors) > min(res.errors)
    assert res.errors[res.best_step] == min(res.errors) and res.best_step < 2
    err = torch.linalg.norm(W - res.dequantize() - res.low_rank())
    assert float(err) == pytest.approx(min(res.errors), rel=1e-5)


def test_loftq_linear_installs_the_residual_and_the_scale_free_init(fitted):
    W, fits = fitted[LAYERS[0]]
    plan = plan_at(W, fits, 2)
    layer = LinearLowRA.from_linear(torch.nn.Linear(W.shape[1], W.shape[0], bias=False), plan.bits, plan.codebook,
                                    plan.thresholds)
    res = loftq.loftq_linear(layer, W, rank=4, iterations=2)
    assert layer.weight.quant_state is res.state and layer.quant_state is res.state
    assert torch.equal(layer.weight.data, res.packed)
    A0, B0 = loftq.stored_init(layer)
    torch.testing.assert_close(B0 @ A0, res.low_rank())
    x = torch.randn(3, W.shape[1])
    torch.testing.assert_close(layer(x) + x @ (B0 @ A0).T, x @ (res.dequantize() + res.low_rank()).T,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        loftq.loftq_linear(layer, W.T.contiguous(), rank=4)


def test_bad_arguments_are_refused(smollm2_weights):
    W = smollm2_weights[LAYERS[0]]
    plan = make_plan(2, rows=W.shape[0])
    for kwargs, match in [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=200), "exceeds min"),
        (dict(rank=4, iterations=0), "iterations"),
        (dict(rank=4, scaling=0.0), "scaling"),
        (dict(rank=4, scaling=float("nan")), "scaling"),
        (dict(rank=4, init="qlora"), "init must be one of"),
        (dict(rank=4, svd_niter=-1), "svd_niter"),
    ]:
        with pytest.raises(ValueError, match=match):
            loftq.lowra_loftq(W, plan, **kwargs)
    with pytest.raises(LowRAFormatError, match="NaN"):
        loftq.lowra_loftq(torch.full((4, 64), float("nan")), make_plan(2, rows=4), rank=1)
    with pytest.raises(LowRAFormatError, match="output channels"):
        loftq.lowra_loftq(W, make_plan(2, rows=3), rank=1)


@pytest.mark.parametrize("scaling", [1e40, 1e-40])
def test_scaling_outside_float32_is_refused_by_name(scaling):
    # Was "weight contains 3072 NaN/Inf values": the overflow was S / scaling in float32, not the user's weight.
    with pytest.raises(ValueError, match="outside float32's normal range"):
        loftq.lowra_loftq(torch.randn(32, 96), 2, rank=4, scaling=scaling)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_errors_are_measured_in_float64(scale):
    # float32 norms gave inf (|W| ~ 1e30) or 0.0 (|W| ~ 1e-30) for every step, so best_step was always 0.
    W = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    ref = loftq.lowra_loftq(W, 2, rank=4)
    got = loftq.lowra_loftq(W * scale, 2, rank=4)
    assert got.best_step == ref.best_step
    assert got.baseline_error == pytest.approx(ref.baseline_error * scale, rel=1e-4)
    assert got.errors == pytest.approx([e * scale for e in ref.errors], rel=1e-4)


def test_randomized_svd_option_tracks_the_exact_one(fitted):
    W, fits = fitted[LAYERS[0]]
    plan = plan_at(W, fits, 2)
    exact = loftq.lowra_loftq(W, plan, rank=8, iterations=2)
    fast = loftq.lowra_loftq(W, plan, rank=8, iterations=2, svd_niter=4)
    assert fast.errors[-1] == pytest.approx(exact.errors[-1], rel=0.02)
    assert fast.errors[-1] < fast.baseline_error


@pytest.mark.parametrize("device", devices())
def test_runs_on_each_device(device):
    # A synthetic heavy-tailed layer (Student-t rows of varied scale), so the test also runs where the SmolLM2
    # package is not installed (the GPU machine).
    torch.manual_seed(0)
    t = torch.distributions.StudentT(torch.tensor(4.0)).sample((192, 576))
    W = (t * torch.rand(192, 1) * 0.05).float()
    fits = learner.learn_layer(W)
    plan = plan_at(W, fits, 1.75)
    res = loftq.lowra_loftq(W.to(device), plan, rank=8, iterations=3, scaling=SCALING)
    assert res.packed.device.type == device and res.lora_A.device.type == device
    ref = loftq.lowra_loftq(W, plan, rank=8, iterations=3, scaling=SCALING)
    assert res.errors == pytest.approx(ref.errors, rel=1e-3)
