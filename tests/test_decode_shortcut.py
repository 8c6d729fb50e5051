"""LinearLowRA's decode shortcut (nn.modules._DecodeCall): after a call that took the fused direct path, forward
launches the state's prepared matmul behind a guard instead of going through matmul_lowra again. It must give
exactly what the full path gives, and every change the full path would react to must send the call back through it.
CPU tests run in CI; `cuda` ones on the GPU check."""

import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn

from bitsandbytes_lowra import functional as F
from bitsandbytes_lowra.nn import LinearLowRA
from bitsandbytes_lowra.nn import modules as M

from .conftest import devices, mixed_bits


def layer(rows=48, cols=128, seed=0, device="cpu", bias=True, nested=True, bias_dtype=torch.float32, plan=None):
    """A LinearLowRA of random weights (seed) on the mixed precisions of mixed_bits(rows, plan, default seed)."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(rows, cols, generator=g) * 0.05)
        if bias:
            base.bias.copy_(torch.randn(rows, generator=g))
    bits = mixed_bits(rows, seed if plan is None else plan)
    lin = LinearLowRA.from_linear(base, bits, compress_statistics=nested, device=device)
    if bias:
        lin.bias.data = lin.bias.data.to(bias_dtype)
    return lin.requires_grad_(False)


def dtype_for(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def full(lin, x):
    """The full path's answer: the same layer with the shortcut switched off (neither taken nor remembered)."""
    lin._decode_shortcut = False
    try:
        return lin(x)
    finally:
        del lin._decode_shortcut


class Counting:
    """Counts calls of matmul_lowra from LinearLowRA.forward (the full path)."""

    def __init__(self, monkeypatch):
        self.n = 0
        inner = M.matmul_lowra

        def counted(*args, **kwargs):
            self.n += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(M, "matmul_lowra", counted)


def took_shortcut(lin, x, counting) -> torch.Tensor:
    before = counting.n
    y = lin(x)
    assert counting.n == before, "expected the shortcut"
    return y


def took_full_path(lin, x, counting) -> torch.Tensor:
    before = counting.n
    y = lin(x)
    assert counting.n == before + 1, "expected the full path"
    return y


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias,bias_dtype", [(False, None), (True, "same"), (True, torch.float32)])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("tokens", [1, 3])
def test_shortcut_equals_the_full_path(monkeypatch, device, bias, bias_dtype, nested, tokens):
    dtype = dtype_for(device)
    lin = layer(device=device, bias=bias, nested=nested, bias_dtype=dtype if bias_dtype == "same" else bias_dtype)
    counting = Counting(monkeypatch)
    with torch.inference_mode():
        for seed in range(3):  # fresh activations each call: the shortcut reads them, not the first call's
            x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
            y = lin(x) if seed == 0 else took_shortcut(lin, x, counting)
            assert y.dtype == dtype and y.shape == (tokens, 48)
            assert torch.equal(y, full(lin, x))
            assert "_decode_call" in lin.__dict__


def test_shortcut_under_no_grad_and_with_grad_enabled_inputs_that_need_none(monkeypatch):
    lin = layer()
    counting = Counting(monkeypatch)
    x = torch.randn(2, 128)
    lin(x)  # grad mode on, nothing requires grad: the fused path, as the full path decides
    assert torch.equal(took_shortcut(lin, x, counting), full(lin, x))
    with torch.no_grad():
        assert torch.equal(took_shortcut(lin, x, counting), full(lin, x))


def test_gradients_take_the_full_path(monkeypatch):
    lin = layer()
    counting = Counting(monkeypatch)
    x = torch.randn(2, 128)
    lin(x)
    xg = x.clone().requires_grad_()
    y = took_full_path(lin, xg, counting)
    y.sum().backward()
    ref = xg.detach().clone().requires_grad_()
    F.matmul_lowra(ref, *lin._packed_and_state(), lin.bias).sum().backward()
    assert xg.grad is not None and torch.equal(xg.grad, ref.grad)
    lin(x)  # the shortcut again ...
    lin.bias.requires_grad_(True)  # ... until the bias is trained
    y = took_full_path(lin, x, counting)
    y.sum().backward()
    assert lin.bias.grad is not None


@pytest.mark.parametrize("change", ["dtype", "rows", "features", "autocast", "compute_dtype", "absmax_cache",
                                    "noncontiguous"])
def test_activation_and_setting_changes_take_the_full_path(monkeypatch, change):
    lin = layer()
    counting = Counting(monkeypatch)
    x = torch.randn(2, 128)
    with torch.no_grad():
        lin(x)
        if change == "dtype":
            x2 = x.bfloat16()
            y = took_full_path(lin, x2, counting)
            assert y.dtype == torch.bfloat16 and torch.equal(y, full(lin, x2))
        elif change == "rows":  # more tokens than the fused CPU kernel takes: dequantize + linear
            x2 = torch.randn(F.CPU_FUSED_DECODE_MAX_TOKENS + 1, 128)
            assert torch.equal(took_full_path(lin, x2, counting), full(lin, x2))
        elif change == "features":
            with pytest.raises(ValueError, match="input has 64 features, the quantized weight expects 128"):
                lin(torch.randn(2, 64))
            with pytest.raises(ValueError, match=r"input is a 0-d tensor; the quantized weight expects \[..., 128\]"):
                lin(torch.tensor(1.0))
        elif change == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = took_full_path(lin, x, counting)
            assert y.dtype == torch.bfloat16
        elif change == "compute_dtype":
            lin.compute_dtype = torch.bfloat16
            y = took_full_path(lin, x, counting)
            assert y.dtype == torch.float32 and torch.equal(y, full(lin, x))
        elif change == "absmax_cache":
            lin.set_absmax_cache(True)
            assert torch.equal(took_full_path(lin, x, counting), full(lin, x))
        else:  # a strided view: the shortcut takes it (the launcher copies it contiguous), same answer
            x2 = torch.randn(128, 2).t()
            assert torch.equal(took_shortcut(lin, x2, counting), full(lin, x2.contiguous()))


def test_modes_that_watch_ops_take_the_full_path(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    lin = layer()
    counting = Counting(monkeypatch)
    x = torch.randn(1, 128)
    with torch.no_grad():
        ref = lin(x)

        class Seen(TorchDispatchMode):
            ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        with Seen():
            assert torch.equal(took_full_path(lin, x, counting), ref)
        assert any("lowra.matmul" in op for op in Seen.ops)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            assert torch.equal(took_full_path(lin, x, counting), ref)
        assert any("lowra::matmul" in e.name for e in prof.events())
        ys = torch.func.vmap(lin)(torch.stack([x, 2 * x]))
        assert torch.allclose(ys[0], ref) and torch.allclose(ys[1], full(lin, 2 * x))
        # each of those calls forgot the shortcut; the next plain call remembers it
        assert torch.equal(took_full_path(lin, x, counting), ref)
        assert torch.equal(took_shortcut(lin, x, counting), ref)


def test_compiled_forward_never_traces_the_shortcut():
    lin = layer(bias=False)
    x = torch.randn(1, 128)
    with torch.no_grad():
        ref = lin(x)  # the shortcut exists before compiling
        assert "_decode_call" in lin.__dict__
        compiled = torch.compile(lin, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), ref)


def test_changed_weights_state_and_bias_take_the_full_path(monkeypatch):
    lin, other = layer(seed=0), layer(seed=7)
    counting = Counting(monkeypatch)
    x = torch.randn(1, 128)
    with torch.no_grad():
        lin(x)
        # a new weight parameter (with its state): the other layer's answer
        lin.weight, lin.quant_state = other.weight, other.quant_state
        lin.bias = other.bias
        assert torch.equal(took_full_path(lin, x, counting), other(x))
        assert torch.equal(took_shortcut(lin, x, counting), other(x))
        # a new bias, then none
        new_bias = nn.Parameter(torch.randn(48), requires_grad=False)
        lin.bias = new_bias
        assert torch.equal(took_full_path(lin, x, counting), full(lin, x))
        lin.bias = None
        assert torch.equal(took_full_path(lin, x, counting), full(lin, x))
        lin.bias = other.bias
        took_full_path(lin, x, counting)
        # codes rewritten in place at the same address: the shortcut reads them as the full path does
        fresh = layer(seed=3, plan=7)  # other weights on the same plan: same sizes
        lin.weight.data.copy_(fresh.weight.data)
        lin.quant_state.absmax.copy_(fresh.quant_state.absmax)
        # ... but bits are the row plan's source: an in-place edit invalidates the launcher
        lin.quant_state.bits.copy_(fresh.quant_state.bits), lin.quant_state.code.copy_(fresh.quant_state.code)
        lin.quant_state.row_offsets.copy_(fresh.quant_state.row_offsets)
        lin.quant_state.state2.absmax.copy_(fresh.quant_state.state2.absmax)
        lin.quant_state.offset.copy_(fresh.quant_state.offset)
        lin.bias.copy_(fresh.bias)  # float32 bias, cast per its version
        assert torch.equal(took_full_path(lin, x, counting), fresh(x))
        assert torch.equal(took_shortcut(lin, x, counting), fresh(x))
        # the state's launchers dropped (as a move does): the shortcut's weak reference is dead
        lin.quant_state.to("cpu")
        assert lin.__dict__["_decode_call"].launch() is None
        assert torch.equal(took_full_path(lin, x, counting), fresh(x))
        # another state for the same codes (the parameter's, which the full path reads)
        lin.weight.quant_state = layer(seed=5, plan=7).quant_state
        y = took_full_path(lin, x, counting)
        assert torch.equal(y, full(lin, x)) and not torch.equal(y, fresh(x))
        lin.weight.quant_state = lin.quant_state
        took_full_path(lin, x, counting)
        # the same state, codes in a new buffer (`weight.data = ...`): read from there
        codes = lin.weight.data.clone()
        lin.weight.data.zero_()
        lin.weight.data = codes
        assert torch.equal(took_full_path(lin, x, counting), fresh(x))
        # a state tensor replaced (a reload into the same state object)
        again = layer(seed=4)
        qs, new = lin.quant_state, again.quant_state
        qs.absmax, qs.state2, qs.offset, qs.code = new.absmax, new.state2, new.offset, new.code
        qs.bits, qs.row_offsets, qs.thresholds = new.bits, new.row_offsets, new.thresholds
        qs.packed_nbytes = new.packed_nbytes
        lin.weight.data = again.weight.data  # new codes at a new address
        lin.bias.data = again.bias.data.clone()
        assert torch.equal(took_full_path(lin, x, counting), again(x))
        # the bias edited in place: read as it is now, and cast again for bfloat16 activations (its version moved)
        lin.bias.add_(1.0)
        assert torch.equal(took_shortcut(lin, x, counting), full(lin, x))
        xb = x.bfloat16()
        took_full_path(lin, xb, counting)  # another dtype: remembered in its place
        before = took_shortcut(lin, xb, counting)
        lin.bias.add_(1.0)
        after = took_shortcut(lin, xb, counting)
        assert torch.equal(after, full(lin, xb)) and not torch.equal(after, before)


def test_the_shortcut_keeps_nothing_alive():
    lin = layer()
    x = torch.randn(1, 128)
    with torch.no_grad():
        lin(x)
    old_weight, old_state = weakref.ref(lin.weight), weakref.ref(lin.quant_state)
    other = layer(seed=2)
    lin.weight, lin.quant_state = other.weight, other.quant_state
    del other
    gc.collect()
    assert old_weight() is None and old_state() is None
    with torch.no_grad():  # the stale shortcut refuses and is replaced
        y = lin(x)
        assert lin.__dict__["_decode_call"].weight() is lin.weight
        assert torch.equal(y, full(lin, x))


def test_copies_and_pickles_drop_the_shortcut():
    lin = layer()
    x = torch.randn(1, 128)
    with torch.no_grad():
        y = lin(x)
        for twin in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin)), copy.copy(lin)):
            assert "_decode_call" not in twin.__dict__
            assert torch.equal(twin(x), y)
            assert "_decode_call" in twin.__dict__
        assert "_decode_call" in lin.__dict__


def test_training_calls_leave_no_shortcut():
    lin = layer()
    with torch.no_grad():
        lin(torch.randn(1, 128))
    assert "_decode_call" in lin.__dict__
    lin(torch.randn(1, 128, requires_grad=True))
    assert "_decode_call" not in lin.__dict__


# ---------------------------------------------------------------------------------------------------------------
# CUDA (GPU check)

@pytest.mark.cuda
def test_cuda_moves_take_the_full_path(monkeypatch):
    lin = layer(device="cuda", bias_dtype=torch.bfloat16)
    counting = Counting(monkeypatch)
    x = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = lin(x)
        assert torch.equal(took_shortcut(lin, x, counting), y)
        lin.cpu()
        xc = x.float().cpu()
        assert torch.equal(took_full_path(lin, xc, counting), full(lin, xc))
        lin.cuda()
        assert torch.equal(took_full_path(lin, x, counting), y)
        assert torch.equal(took_shortcut(lin, x, counting), y)


@pytest.mark.cuda
def test_cuda_shortcut_is_capturable():
    lin = layer(device="cuda", bias_dtype=torch.bfloat16)
    x = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lin(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, full(lin, x))
