"""The low-overhead forward path gives bit-identical results to the original one, and its caches never go stale.

The "original path" is spelled out here as it was before the hot path was trimmed: absmax decoded through
bitsandbytes.functional.dequantize_blockwise, the autograd.Function, casts through .to() and the autocast context.
"""

from __future__ import annotations

import pytest
import torch
from bitsandbytes import functional as bnbF
from torch import nn

from bitsandbytes_lowra import _native
from bitsandbytes_lowra.functional import CPU_FUSED_DECODE_MAX_TOKENS, MatMulLowRA, quantize_lowra
from bitsandbytes_lowra.loftq import loftq_linear
from bitsandbytes_lowra.nn import LinearLowRA

from .conftest import assert_sums_close, mixed_bits


def quantized(nested=True, seed=0, in_f=200, out_f=48):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    return LinearLowRA.from_linear(lin, mixed_bits(out_f, seed), compress_statistics=nested, device="cpu")


def original_absmax(state):
    if not state.nested:
        return state.absmax
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return absmax.float().clamp_min(0).reshape(state.rows, -1)


def original_forward(q: LinearLowRA, x: torch.Tensor) -> torch.Tensor:
    state = q.weight.quant_state
    packed = q.weight.data.view(torch.uint8)
    if torch.is_autocast_enabled(x.device.type):
        compute = out_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute, out_dtype = q.compute_dtype or x.dtype, x.dtype
    bias = None if q.bias is None else q.bias.to(compute)
    with torch.autocast(x.device.type, enabled=False):
        A = x.to(compute)
        bias = None if bias is None else bias.to(A.dtype)
        args = (packed, original_absmax(state), state.bits, state.code, state.row_offsets, state.blocksize,
                list(state.shape))  # float32 scales: no nested arguments
        needs_grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
        if A.device.type == "cpu" and not needs_grad and A.numel() // A.shape[-1] <= CPU_FUSED_DECODE_MAX_TOKENS:
            out = torch.ops.lowra.matmul(A, *args, bias)  # decoding on the CPU: the fused CPU matmul
        else:
            out = MatMulLowRA.apply(A, *args, bias, None, None, None, 256, None)
    return out.to(out_dtype)


def test_absmax_fp32_equals_bitsandbytes_decode():
    state = quantized(nested=True).quant_state
    assert torch.equal(state.absmax_fp32(), original_absmax(state))
    assert torch.equal(state.absmax_fp32(cache=True), original_absmax(state))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference", "autocast", "compute_dtype"])
def test_forward_bit_identical_to_original_path(nested, dtype, mode):
    q = quantized(nested=nested)
    x = torch.randn(2, 3, 200, dtype=dtype, requires_grad=mode == "grad")
    if mode == "compute_dtype":
        q.compute_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
    ctx = {
        "grad": torch.enable_grad(), "no_grad": torch.no_grad(), "inference": torch.inference_mode(),
        "autocast": torch.autocast("cpu", dtype=torch.bfloat16), "compute_dtype": torch.no_grad(),
    }[mode]  # fmt: skip
    with ctx:
        y, y_ref = q(x), original_forward(q, x)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    if mode == "grad":
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        (gx_ref,) = torch.autograd.grad(y_ref, x, g)
        assert torch.equal(gx, gx_ref)


def test_absmax_cache_is_off_by_default():
    q = quantized(nested=True)
    with torch.inference_mode():
        q(torch.randn(1, 200))
    assert "_absmax_cache" not in q.quant_state.__dict__  # no 0.5 bit/param unless asked for


def _forward(q, x):
    with torch.inference_mode():
        return q(x)


def _original_inference(q, x):
    with torch.inference_mode():
        return original_forward(q, x)


def test_absmax_cache_hits_and_matches_uncached():
    q = quantized(nested=True)
    x = torch.randn(1, 200)
    y0 = _forward(q, x)
    q.set_absmax_cache(True)
    y1 = _forward(q, x)
    cached = q.quant_state.__dict__["_absmax_cache"][2]
    y2 = _forward(q, x)
    assert q.quant_state.__dict__["_absmax_cache"][2] is cached  # reused, not decoded again
    assert torch.equal(y0, y1) and torch.equal(y0, y2)
    q.set_absmax_cache(False)
    assert "_absmax_cache" not in q.quant_state.__dict__
    assert torch.equal(_forward(q, x), y0)


def test_absmax_cache_follows_in_place_edits_and_reassignment():
    q = quantized(nested=True)
    q.set_absmax_cache(True)
    x = torch.randn(1, 200)
    _forward(q, x)
    state = q.quant_state
    state.absmax[0, 0] = 255  # in-place edit of the quantized scales
    assert torch.equal(state.absmax_fp32(cache=True), original_absmax(state))
    assert not torch.equal(_forward(q, x), _forward(quantized(nested=True), x))
    state.state2.absmax = state.state2.absmax * 2  # reassigned nested scales
    assert torch.equal(state.absmax_fp32(cache=True), original_absmax(state))
    state.offset = state.offset + 0.5
    assert torch.equal(state.absmax_fp32(cache=True), original_absmax(state))
    q.set_absmax_cache(False)
    y_uncached = _forward(q, x)
    q.set_absmax_cache(True)
    assert torch.equal(_forward(q, x), y_uncached)


def test_absmax_cache_after_move_reload_requantize_and_storage_change():
    x = torch.randn(1, 200)
    q = quantized(nested=True, seed=0)
    q.set_absmax_cache(True)
    _forward(q, x)
    q.to("cpu")  # a (same-device) move keeps the state valid
    assert torch.equal(_forward(q, x), _original_inference(q, x))
    # load_state_dict of another layer: new state, the old cache must not be used
    other = quantized(nested=True, seed=1)
    q.load_state_dict(other.state_dict())
    assert torch.equal(_forward(q, x), _forward(other, x))
    # storage dtype change (same bytes reinterpreted)
    q.set_quant_storage(torch.bfloat16)
    assert torch.equal(_forward(q, x), _forward(other, x))
    # LoftQ re-quantization of the layer
    torch.manual_seed(2)
    W = torch.randn(48, 200)
    loftq_linear(q, W, rank=4, iterations=1)
    assert torch.equal(_forward(q, x), _original_inference(q, x))


def test_matmul_plan_cache_follows_bits():
    state = quantized(nested=False).quant_state
    order, groups = state.matmul_plan()
    assert state.matmul_plan()[0] is order  # cached
    rows = state.rows
    new_bits = torch.full((rows,), 4, dtype=torch.uint8)
    state.bits = new_bits
    order2, groups2 = state.matmul_plan()
    assert groups2 == [0, 0, rows]
    state.bits[:5] = 1  # in place
    assert state.matmul_plan()[1] == [5, 0, rows - 5]


@pytest.mark.skipif(not _native.available(), reason="native library not built")
def test_native_fast_checks_still_raise_the_specific_message():
    from bitsandbytes_lowra.backends import native

    torch.manual_seed(0)
    W = torch.randn(16, 64)
    packed, st = quantize_lowra(W, mixed_bits(16))
    args = [packed, st.absmax, st.bits, st.code, st.row_offsets, st.blocksize, [16, 64]]
    out = native.dequantize(*args, torch.float32)
    assert torch.equal(out, torch.ops.lowra.dequantize(*args, torch.float32))
    with pytest.raises(RuntimeError, match="codebook must be float16"):
        native.dequantize(packed, st.absmax, st.bits, st.code.float(), st.row_offsets, st.blocksize, [16, 64],
                          torch.float32)
    with pytest.raises(RuntimeError, match="out has dtype"):
        native.dequantize_out(*args, torch.float32, out=torch.empty(16, 64, dtype=torch.float16))
    A = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="bias must have A's dtype"):
        native.matmul(A, *args, bias=torch.zeros(16, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="row_order and group_rows together"):
        native.matmul(A, *args, row_order=torch.zeros(16, dtype=torch.int32))
    bias = torch.ones(16)
    y = native.matmul(A, *args, bias=bias)  # 2 rows: the CPU matmul, float32 sums in its own order
    assert_sums_close(y, torch.nn.functional.linear(A, out, bias), A, out, bias)


def test_bias_cast_is_kept_for_a_frozen_bias_and_follows_it():
    q = quantized(nested=True)
    q.compute_dtype = torch.bfloat16
    q.bias.requires_grad_(False)
    x = torch.randn(1, 1, 200, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = q(x)
        cast = q.__dict__["_bias_cast"][2]
        assert torch.equal(q(x), y) and q.__dict__["_bias_cast"][2] is cast  # reused
        assert torch.equal(y, original_forward(q, x))
    with torch.no_grad():  # a cast made in inference mode is not handed to code outside it
        assert torch.equal(q(x), y) and q.__dict__["_bias_cast"][2] is not cast
        q.bias.add_(1.0)  # in place: version
        assert torch.equal(q(x), original_forward(q, x))
        q.bias.data = torch.randn(48)  # new storage
        assert torch.equal(q(x), original_forward(q, x))
        assert q.__dict__["_bias_cast"][2].data_ptr() != cast.data_ptr()


def test_trainable_bias_is_cast_in_the_graph():
    q = quantized(nested=True)
    q.compute_dtype = torch.bfloat16
    x = torch.randn(1, 2, 200, dtype=torch.bfloat16)
    q(x).float().sum().backward()
    assert q.bias.grad is not None and torch.equal(q.bias.grad, torch.full((48,), 2.0))
    assert "_bias_cast" not in q.__dict__


def test_overhead_bench_runs_every_row_on_cpu():
    from bitsandbytes_lowra.bench import overhead

    res = overhead.run("cpu", size=64, calls=3, repeats=1, dtypes=("bfloat16",), bnb=False)
    names = [r["layer"] for r in res]
    # a decode step on the CPU ends in the fused lowra::matmul (no dequantize + GEMM)
    assert names.count("LinearLowRA") == 2 and "lowra op only" in names and "nn.Linear (dense)" in names
    assert names.count(overhead.FULL_ROW) == 2  # the same layers with the decode shortcut off
    assert all(r["us_per_call"] > 0 for r in res)
    assert "LinearLowRA" in overhead.table(res)


def test_overhead_bench_kernel_rows_take_the_inference_path(monkeypatch):
    """The "kernel only" rows time what LinearLowRA runs in inference (the fused path where it applies), not the
    training path a grad-requiring bias would select."""
    from bitsandbytes_lowra import functional
    from bitsandbytes_lowra.bench import overhead

    seen = []
    real = functional._use_fused_decode
    monkeypatch.setattr(functional, "_use_fused_decode", lambda A, bias: seen.append(
        functional._needs_grad(A, bias)) or real(A, bias))
    layer = quantized(in_f=64, out_f=64)
    assert layer.bias.requires_grad
    overhead._lowra_kernel_only(layer, torch.randn(1, 1, 64))
    assert seen == [False]


def test_overhead_bench_training_rows_on_cpu(monkeypatch, capsys):
    """--training times a LoRA step per base layer; its op rows really dequantize through the op and the others
    through the prepared launcher, and the patch the op rows need is undone afterwards."""
    from bitsandbytes_lowra import functional
    from bitsandbytes_lowra.bench import overhead

    direct = functional._eager_direct
    launched = []  # per forward: whether the prepared launcher (not the op) made W
    real = functional._linear_dequantized
    monkeypatch.setattr(functional, "_linear_dequantized", lambda *a: launched.append(a[10] is not None) or real(*a))
    res = overhead.run_training("cpu", size=64, tokens=4, rank=4, calls=3, repeats=1, dtypes=("bfloat16",), bnb=False)
    assert [r["layer"] for r in res] == ["nn.Linear (dense)", "LinearLowRA", overhead.OP_ROW, "LinearLowRA",
                                         overhead.OP_ROW]
    assert all(r["us_per_call"] > 0 and r["mode"] == "training" for r in res)
    assert launched.count(True) == launched.count(False) > 0  # as many steps through each path
    assert functional._eager_direct is direct
    assert "us/step" in overhead.table(res)
    assert overhead.main(["--device", "cpu", "--training", "--calls", "2", "--repeats", "1", "--dtypes", "float32",
                          "--no-bnb"]) == 0
    assert overhead.OP_ROW in capsys.readouterr().out
    with pytest.raises(SystemExit):
        overhead.main(["--device", "cpu", "--training", "--tokens", "0"])
