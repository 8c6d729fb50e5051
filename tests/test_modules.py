"""ParamsLowRA and LinearLowRA, modelled on what bitsandbytes tests for Params4bit / Linear4bit."""

import contextlib
import copy
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitsandbytes_lowra.convert import convert_to_lowra, linear_targets, model_bits_report
from bitsandbytes_lowra.format import LowRAFormatError
from bitsandbytes_lowra.functional import dequantize_lowra, quantize_lowra, quantize_lowra_at_bits
from bitsandbytes_lowra.nn import LinearLowRA, ParamsLowRA

from .conftest import assert_sums_close, devices, mixed_bits

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}




def dense(in_f=200, out_f=48, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def quantized(nested=True, bias=True, device="cpu", **kw):
    lin = dense(bias=bias)
    return LinearLowRA.from_linear(lin, mixed_bits(48), compress_statistics=nested, device=device, **kw)


def reference_linear(q: LinearLowRA, dtype) -> nn.Linear:
    """The dense layer built from the dequantized weight, in `dtype`."""
    ref = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.bias.device, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize(dtype))
        if q.bias is not None:
            ref.bias.copy_(q.bias)
    return ref


# --------------------------------------------------------------------------------------------------------------
# quantize on first move, idempotent afterwards
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
def test_quantizes_on_first_move_then_moves_only(device):
    layer = LinearLowRA(200, 48, compress_statistics=False)
    w = layer.weight.data.clone()
    layer.weight.set_plan(mixed_bits(48))
    assert not layer.is_quantized and layer.weight.dtype == torch.float32
    layer.to(device)
    assert layer.weight.dtype == torch.uint8 and layer.weight.lowra_quantized and layer.weight.device.type == device
    assert layer.quant_state is layer.weight.quant_state and layer.weight.lowra_plan is None
    packed, state = quantize_lowra(w.to(device), mixed_bits(48))
    assert torch.equal(layer.weight.data, packed) and layer.quant_state == state
    before = layer.weight.data.clone()
    layer.to(device)  # idempotent: no re-quantization of packed codes
    layer.to(torch.float16)  # float casts leave packed codes alone
    assert torch.equal(layer.weight.data, before) and layer.weight.dtype == torch.uint8
    assert layer.bias.dtype == torch.float16 and layer.quant_state == state


def test_move_without_plan_is_a_clear_error():
    layer = LinearLowRA(64, 16)
    with pytest.raises(LowRAFormatError, match="no quantization plan"):
        layer.to("cpu")
    with pytest.raises(RuntimeError, match="not quantized yet"):
        LinearLowRA(64, 16, device="meta").to("meta")(torch.randn(2, 64, device="meta"))
    with pytest.raises(LowRAFormatError, match="already quantized"):
        quantized().weight.set_plan(2)


@contextlib.contextmanager
def conversion_mode(mode: str):
    """torch.__future__'s "overwrite" or "swap" module conversion mode while inside (torch's default after)."""
    set_mode = {"overwrite": torch.__future__.set_overwrite_module_params_on_conversion,
                "swap": torch.__future__.set_swap_module_params_on_conversion}[mode]
    set_mode(True)
    try:
        yield
    finally:
        set_mode(False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["overwrite", "swap"])
def test_moves_under_torch_future_conversion_modes(mode, device):
    """torch.__future__'s other conversion modes (a new parameter per move, or swap_tensors in place) used to fail
    on LinearLowRA: torch rewraps the converted weight in nn.Parameter(...), which refuses ParamsLowRA (bnb's
    Params4bit too). The layer converts its weight itself there."""
    q = quantized()
    x = torch.randn(4, 200)
    y = q(x)  # an eager call first: the layer keeps its operands (and a decode shortcut, on a GPU)
    weight, packed, state = q.weight, q.weight.data.clone(), q.quant_state
    with conversion_mode(mode):
        q.to(device)
        moved = (type(q.weight), q.weight.device.type, q.quant_state.device.type)
        q.half()  # the bias only: float casts leave packed codes alone
        assert q.bias.dtype == torch.float16 and q.weight.dtype == torch.uint8
        q.float().cpu()
    assert moved == (ParamsLowRA, device, device)
    assert isinstance(q.weight, ParamsLowRA) and (q.weight is weight) == (mode == "swap")  # swap keeps the object
    assert q.weight.module is q and q.weight.quant_state is state and q.quant_state is state
    assert torch.equal(q.weight.data, packed) and state.device.type == "cpu"
    torch.testing.assert_close(q(x), y, atol=1e-3, rtol=1e-3)  # the bias went through float16


@pytest.mark.parametrize("mode", ["overwrite", "swap"])
def test_to_empty_under_torch_future_conversion_modes_keeps_the_weight_class_and_state(mode):
    """to_empty's conversion builds plain tensors: the layer wraps the new storage as its ParamsLowRA again, with the
    quantization state, as torch's default mode (`param.data = ...`) leaves it."""
    q = quantized()
    state, nbytes = q.quant_state, q.weight.numel()
    with conversion_mode(mode):
        q.to_empty(device="cpu")
    assert type(q.weight) is ParamsLowRA and q.weight.lowra_quantized and q.weight.module is q
    assert q.weight.quant_state is state and q.weight.dtype == torch.uint8 and q.weight.numel() == nbytes


@pytest.mark.parametrize("mode", ["overwrite", "swap"])
def test_dense_weight_keeps_its_gradient_under_torch_future_conversion_modes(mode):
    """A weight not yet quantized may require and hold a gradient (set here by hand: an unquantized layer does not
    run); a dtype conversion in those modes converts it too."""
    layer = LinearLowRA(64, 16)
    layer.weight.requires_grad_(True)
    layer.weight.grad = grad = torch.randn(16, 64)
    with conversion_mode(mode):
        layer.double()
    assert isinstance(layer.weight, ParamsLowRA) and layer.weight.dtype == torch.float64
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float64
    assert torch.equal(layer.weight.grad, grad.double())


@pytest.mark.cuda
@pytest.mark.parametrize("nested", [False, True])
def test_device_moves_cpu_cuda(nested):
    q = quantized(nested=nested)
    x = torch.randn(4, 200)
    y_cpu = q(x)
    packed, state = q.weight.data.clone(), copy.deepcopy(q.quant_state)
    q.cuda()
    assert q.weight.is_cuda and q.quant_state.device.type == "cuda" and q.weight.quant_state is q.quant_state
    assert isinstance(q.weight, ParamsLowRA) and torch.equal(q.weight.data.cpu(), packed)
    torch.testing.assert_close(q(x.cuda()).cpu(), y_cpu, atol=1e-5, rtol=1e-5)
    q.cpu()
    assert torch.equal(q.weight.data, packed) and q.quant_state == state and torch.equal(q(x), y_cpu)


@pytest.mark.cuda
def test_quantize_on_cuda_equals_cpu():
    lin = dense()
    a = LinearLowRA.from_linear(lin, mixed_bits(48), device="cuda", compress_statistics=False)
    b = LinearLowRA.from_linear(lin, mixed_bits(48), device="cpu", compress_statistics=False)
    assert torch.equal(a.weight.data.cpu(), b.weight.data) and a.quant_state == b.quant_state


# --------------------------------------------------------------------------------------------------------------
# forward / backward equal the dense layer of the dequantized weight
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_forward_backward_equal_dense(device, dtype, nested):
    q = quantized(nested=nested, device=device)
    q.bias.data = q.bias.data.to(dtype)
    ref = reference_linear(q, dtype)
    x = torch.randn(3, 5, 200, device=device, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), ref(x_ref)
    assert y.dtype == dtype and y.shape == (3, 5, 48)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(q.bias.grad, ref.bias.grad, atol=tol, rtol=tol)
    assert q.weight.grad is None and not q.weight.requires_grad


def test_compute_dtype_and_no_grad():
    q = quantized(compute_dtype=torch.bfloat16)
    ref = reference_linear(q, torch.bfloat16)
    for tokens in (12, 4):  # dequantize + GEMM, then the CPU decode matmul (float32 sums in another order)
        x = torch.randn(tokens, 200)
        with torch.no_grad():
            y = q(x)
        assert y.dtype == torch.float32 and not y.requires_grad
        exact = tokens > 8
        torch.testing.assert_close(y, ref(x.bfloat16()).float(), atol=0 if exact else 1e-2, rtol=0 if exact else 1e-2)
    # no bias
    q = quantized(bias=False)
    torch.testing.assert_close(q(x), x @ q.dequantize().T)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("tokens", [2, 12])  # the fused decode path and dequantize + GEMM
@pytest.mark.parametrize("grad", [False, True])
def test_float64_input_is_a_clear_error_and_compute_dtype_serves_it(device, tokens, grad):
    q = quantized(device=device)
    x = torch.randn(tokens, 200, dtype=torch.float64, device=device, requires_grad=grad)
    with pytest.raises(ValueError, match="input is torch.float64; LowRA computes in float32, float16 or bfloat16"):
        q(x)
    q.compute_dtype = torch.float32
    y = q(x)
    assert y.dtype == torch.float64
    ref = reference_linear(q, torch.float32)
    assert_sums_close(y, ref(x.float()), x, ref.weight, ref.bias)
    if grad:
        y.sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float64


def test_autocast_behaves_like_nn_linear():
    q = quantized()
    ref = reference_linear(q, torch.float32)
    x = torch.randn(4, 200, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = q(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("nested", [False, True])
def test_torch_compile_fullgraph(nested):
    """No graph break: the lowra ops have fake kernels and the autograd Function is traceable."""
    torch._dynamo.reset()
    q = quantized(nested=nested)
    x = torch.randn(2, 7, 200, requires_grad=True)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y2 = q(x2)
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)


# --------------------------------------------------------------------------------------------------------------
# state dict, safetensors, pickle, deepcopy
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_safetensors_round_trip(tmp_path, nested):
    q = quantized(nested=nested)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.uint8 and type(sd["weight"]) is torch.Tensor
    assert "weight.quant_state.bitsandbytes_lowra__mp" in sd and "weight.lowra_bits" in sd
    assert ("weight.nested_absmax" in sd) == nested
    save_file(sd, tmp_path / "layer.safetensors")
    fresh = LinearLowRA(200, 48, compress_statistics=not nested)  # settings come from the file
    result = fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert not result.missing_keys and not result.unexpected_keys
    assert isinstance(fresh.weight, ParamsLowRA) and fresh.weight.module is fresh
    assert fresh.quant_state is fresh.weight.quant_state and fresh.quant_state == q.quant_state
    assert fresh.compress_statistics == nested
    x = torch.randn(6, 200)
    assert torch.equal(fresh(x), q(x))
    # and the fresh module saves the same dict again
    again = fresh.state_dict()
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


def test_load_into_meta_module_and_dense_round_trip():
    q = quantized()
    meta = LinearLowRA(200, 48, device="meta")
    meta.load_state_dict(q.state_dict(), assign=True)
    x = torch.randn(3, 200)
    assert meta.weight.device.type == "cpu" and torch.equal(meta(x), q(x))
    # an unquantized LinearLowRA loads a dense nn.Linear state dict like nn.Linear
    lin = dense()
    layer = LinearLowRA(200, 48)
    layer.load_state_dict(lin.state_dict())
    assert torch.equal(layer.weight.data, lin.weight.data)


def corrupt_bits(sd):
    sd["weight.lowra_bits"] = sd["weight.lowra_bits"].clone()
    sd["weight.lowra_bits"][0] = 7


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (corrupt_bits, r"weight: .*bits\[0\] = 7 is not one of"),
        (lambda sd: sd.update(weight=sd["weight"][:-3]), "weight: packed buffer has"),
        (lambda sd: sd.pop("weight.quant_state.bitsandbytes_lowra__mp"), "weight: missing the JSON blob"),
        (lambda sd: sd.update({"weight.lowra_extra": torch.ones(1)}), r"unknown LowRA state fields \['lowra_extra'\]"),
        (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"].float()}), "absmax must be torch.uint8"),
    ],
    ids=["bits", "truncated", "no blob", "extra key", "absmax dtype"],
)
def test_corrupt_state_dict_rejected(corrupt, match):
    sd = dict(quantized().state_dict())
    corrupt(sd)
    with pytest.raises(LowRAFormatError, match=match):
        LinearLowRA(200, 48).load_state_dict(sd)


def test_mismatched_state_dict_rejected():
    sd = quantized().state_dict()
    with pytest.raises(LowRAFormatError, match=r"shape \(48, 200\), this layer is \(32, 200\)"):
        LinearLowRA(200, 32).load_state_dict({k: v for k, v in sd.items() if k != "bias"}, strict=False)
    with pytest.raises(LowRAFormatError, match="dense weight without LowRA state"):
        quantized().load_state_dict(dense().state_dict())
    missing = {k: v for k, v in sd.items() if k != "weight"}
    result = LinearLowRA(200, 48).load_state_dict(missing, strict=False)
    assert result.missing_keys == ["weight"]


def test_pickle_and_deepcopy():
    q = quantized()
    x = torch.randn(3, 200)
    y = q(x)
    for clone in (pickle.loads(pickle.dumps(q)), copy.deepcopy(q)):
        assert isinstance(clone.weight, ParamsLowRA) and clone.weight.module is clone
        assert clone.quant_state is clone.weight.quant_state and clone.quant_state is not q.quant_state
        assert clone.quant_state == q.quant_state and torch.equal(clone(x), y)
    w = pickle.loads(pickle.dumps(q.weight))
    assert isinstance(w, ParamsLowRA) and w.lowra_quantized and w.quant_state == q.quant_state and w.module is None
    w = copy.deepcopy(q.weight)
    assert isinstance(w, ParamsLowRA) and w.quant_state == q.quant_state and w.data_ptr() != q.weight.data_ptr()
    assert copy.copy(q.weight).quant_state is q.quant_state
    # a pending plan survives too
    layer = LinearLowRA(200, 48)
    layer.weight.set_plan(2)
    clone = pickle.loads(pickle.dumps(layer)).to("cpu")
    assert clone.quant_state.nominal_bits == 2.0


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_weight_refuses_gradients_when_asked(storage):
    """Codes stored as bfloat16 (FSDP) are floats to torch: the refusal comes when gradients are asked for, not from
    a later move or copy."""
    q = quantized(quant_storage=storage)
    for ask in (lambda: q.weight.requires_grad_(), lambda: q.requires_grad_(True)):
        with pytest.raises(ValueError, match="frozen"):
            ask()
    assert not q.weight.requires_grad
    q.requires_grad_(False)  # freezing stays fine
    assert q.bias.requires_grad is False


@pytest.mark.parametrize("nested", [True, False])
def test_torch_save_and_load_of_the_module(nested):
    """torch.save refuses tensors of several dtypes viewing one storage (the state's operand buffer): a module, its
    weight and its state save anyway, and load with their operands packed again."""
    import io

    q = quantized(nested=nested)
    x = torch.randn(3, 200)
    for obj in (q, q.weight, q.quant_state, torch.nn.Sequential(q)):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        state = back.quant_state if hasattr(back, "quant_state") else getattr(back[0], "quant_state", back)
        assert state == q.quant_state and state.operand_buffer() is not None
        if isinstance(back, torch.nn.Module):
            assert torch.equal(back(x), q(x))
    assert q.quant_state.operand_buffer() is not None  # saving left the original as it was


# --------------------------------------------------------------------------------------------------------------
# ParamsLowRA rebuilt by wrappers
# --------------------------------------------------------------------------------------------------------------


def test_params_rebuilt_without_metadata_recover_from_module():
    """Wrappers (accelerate, FSDP) rebuild parameters as cls(data, requires_grad=...) or plain nn.Parameter."""
    q = quantized()
    x = torch.randn(3, 200)
    y = q(x)
    q.weight = ParamsLowRA(q.weight.data, requires_grad=False)
    assert q.weight.lowra_quantized and q.weight.quant_state is None
    assert torch.equal(q(x), y) and q.weight.quant_state is q.quant_state
    q.weight = nn.Parameter(q.weight.data, requires_grad=False)
    assert torch.equal(q(x), y) and isinstance(q.weight, ParamsLowRA)
    q.weight = nn.Parameter(q.weight.data, requires_grad=False)
    assert "weight.lowra_bits" in q.state_dict()
    with pytest.raises(ValueError, match="frozen"):
        ParamsLowRA(q.weight.data, requires_grad=True)


def test_params_transformers_style_rebuild():
    """transformers builds ParamsLowRA(value, requires_grad=False, **old.__dict__).to(value.device)."""
    layer = LinearLowRA(200, 48, device="meta")
    layer.weight.set_plan(mixed_bits(48))
    old = layer.weight
    value = dense().weight.detach()
    new = ParamsLowRA(value, requires_grad=False, **old.__dict__, _is_hf_initialized=True).to(value.device)
    layer.weight = new
    assert layer.quant_state is new.quant_state and new.lowra_quantized
    packed, state = quantize_lowra(value, mixed_bits(48), compress_statistics=True)
    assert torch.equal(new.data, packed) and new.quant_state == state


def test_from_prequantized_and_chunk():
    q = quantized()
    stats = q.quant_state.as_dict(packed=True)
    layer = LinearLowRA(200, 48, device="meta")
    w = ParamsLowRA.from_prequantized(q.weight.data, stats, device="cpu", module=layer)
    assert layer.quant_state is w.quant_state and w.quant_state == q.quant_state and w.compress_statistics
    layer.weight = w
    layer.bias = q.bias
    x = torch.randn(2, 200)
    assert torch.equal(layer(x), q(x))
    with pytest.raises(LowRAFormatError, match="packed buffer has"):
        ParamsLowRA.from_prequantized(q.weight.data[:-1], stats)
    parts = torch.chunk(q.weight, 2)
    assert all(isinstance(p, ParamsLowRA) and p.quant_state is q.quant_state for p in parts)
    assert sum(p.numel() for p in parts) == q.weight.numel()
    parts = torch.split(q.weight, 100)
    assert isinstance(parts[0], ParamsLowRA) and parts[0].lowra_quantized
    # FSDP-style attribute access
    assert q.weight.lowra_bits is q.quant_state.bits and q.weight.absmax is q.quant_state.absmax
    assert torch.equal(q.quant_state.bitsandbytes_lowra__mp, stats["quant_state.bitsandbytes_lowra__mp"])


def test_from_linear_keeps_bias_and_training_mode():
    lin = dense().eval()
    q = LinearLowRA.from_linear(lin, 4, compress_statistics=False)
    assert not q.training and torch.equal(q.bias, lin.bias) and q.bias.data_ptr() != lin.bias.data_ptr()
    assert q.quant_state.nominal_bits == 4.0 and "bits=4.000" in repr(q)
    with pytest.raises(TypeError, match="already a LinearLowRA"):
        LinearLowRA.from_linear(q, 4)
    rel = (q.dequantize() - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.12, rel


# --------------------------------------------------------------------------------------------------------------
# convert_to_lowra: every nn.Linear of a model under one budget
# --------------------------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128), nn.LayerNorm(128))
        self.attn = nn.MultiheadAttention(128, 4, batch_first=True)  # out_proj is an nn.Linear subclass
        self.lm_head = nn.Linear(128, 10)

    def forward(self, x):
        h = self.body(x)
        return self.lm_head(self.attn(h, h, h)[0])


def test_convert_toy_model():
    model = Toy()
    assert linear_targets(model) == ["body.0", "body.2"]
    assert linear_targets(model, skip=("body.*",)) == ["lm_head"]
    convert_to_lowra(model, bits=2.5, skip=("lm_head",), compress_statistics=False)
    assert isinstance(model.body[0], LinearLowRA) and isinstance(model.body[2], LinearLowRA)
    assert type(model.lm_head) is nn.Linear and type(model.attn.out_proj) is not LinearLowRA
    rep = model_bits_report(model)
    assert rep["parameters"] == 2 * 128 * 64 and 2.4 < rep["nominal_bits"] <= 2.5
    x = torch.randn(2, 5, 128)
    y = model(x)  # the whole model still runs, gradients reach the input
    x.requires_grad_()
    model(x).sum().backward()
    assert y.shape == (2, 5, 10) and x.grad is not None
    # a bare nn.Linear is returned converted
    single = convert_to_lowra(dense(), bits=4)
    assert isinstance(single, LinearLowRA) and single.quant_state.nominal_bits == 4.0
    with pytest.raises(ValueError, match="no nn.Linear to convert"):
        convert_to_lowra(model, bits=2)  # nothing left to convert


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(bits=0.5), ValueError, r"bits must be in \[1, 4\], got 0.5"),
        (dict(bits=3.0, precisions=(1, 2)), ValueError, r"bits=3.0 is outside what precisions \(1, 2\) can meet"),
        (dict(bits=1.75, method="anneal"), ValueError, "assigner_method must be one of"),
        (dict(bits=1.75, method="ilp", clusters=0), ValueError, "clusters must be a positive integer, got 0"),
        (dict(bits=1.75, method="ilp", solver="gurobi"), ValueError, "solver must be one of"),
        (dict(bits=1.75, method="ilp", time_limit=-1), ValueError, "time_limit must be None or a positive number"),
        (dict(bits=1.75, cluster=8), TypeError, r"unknown assigner options \['cluster'\]"),
    ],
)
def test_budget_and_assigner_options_refused_before_learning(monkeypatch, kwargs, error, message):
    """The assigner checked these only after every layer was learned (minutes for a 7B model)."""
    from bitsandbytes_lowra import convert, learner

    def refuse(*args, **kw):
        raise AssertionError("learned a layer before the options were checked")

    monkeypatch.setattr(convert, "learn_layer", refuse)
    monkeypatch.setattr(learner, "learn_layer", refuse)  # quantize_lowra_at_bits imports it at call time
    with pytest.raises(error, match=message):
        convert_to_lowra(Toy(), progress=False, **kwargs)
    with pytest.raises(error, match=message):
        quantize_lowra_at_bits(dense().weight.detach(), **kwargs)


def test_numpy_budget_and_precisions_still_accepted():
    """The up-front check takes what the assigner took: numpy scalars and arrays."""
    import numpy as np

    _, state = quantize_lowra_at_bits(dense().weight.detach(), np.float32(3.0), precisions=np.array([4, 2]))
    assert set(state.bits.unique().tolist()) == {2, 4} and state.nominal_bits <= 3.0


def test_convert_progress_bars(capsys):
    convert_to_lowra(Toy(), bits=2.0, progress=False)
    assert capsys.readouterr().err == ""
    convert_to_lowra(Toy(), bits=2.0)
    err = capsys.readouterr().err
    assert "LowRA learning" in err and "LowRA quantizing" in err and "2/2" in err


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def smollm2_attention(smollm2_weights):
    """The four attention projections of SmolLM2-135M's first decoder layer, as plain nn.Linear, plus a head."""

    def build():
        model = nn.ModuleDict()
        for n in ATTENTION:
            W = smollm2_weights[f"model.layers.0.self_attn.{n}"]
            model[n] = nn.Linear(W.shape[1], W.shape[0], bias=False)
            model[n].weight.data.copy_(W)
        model["lm_head"] = nn.Linear(576, 16, bias=False)
        return model

    return build


def weight_error(model, original) -> float:
    return sum(float((model[n].dequantize() - original[n].weight.detach()).pow(2).sum()) for n in ATTENTION)


@pytest.mark.parametrize("budget", [1.75, 2.0, 4.0])
def test_convert_smollm2_layers(smollm2_attention, budget, tmp_path):
    original = smollm2_attention()
    model = convert_to_lowra(smollm2_attention(), bits=budget)
    assert type(model["lm_head"]) is nn.Linear
    rep = model_bits_report(model)
    assert rep["parameters"] == 576 * 576 * 2 + 192 * 576 * 2
    assert budget - 0.01 < rep["nominal_bits"] <= budget
    assert rep["effective_bits"] > rep["nominal_bits"] + 0.5  # absmax and per-row tables at cols = 576
    per_layer = [model[n].quant_state.nominal_bits for n in ATTENTION]
    if budget < 2:  # one global budget over (1, 2, 4)-bit rows: layers get different shares
        assert max(per_layer) - min(per_layer) > 0.1
    else:  # default precisions (2, 4): at 2 and 4 bits every row has the budget's precision
        assert per_layer == [budget] * 4
    if budget < 2:  # the global assignment beats giving every layer the same budget (same learner, same stats)
        per_layer_error = 0.0
        for n in ATTENTION:
            W = original[n].weight.detach()
            packed, state = quantize_lowra_at_bits(W, budget, compress_statistics=True)
            per_layer_error += float((dequantize_lowra(packed, state) - W).pow(2).sum())
        assert weight_error(model, original) < per_layer_error
    # forward = the dense layers of the dequantized weights; state survives safetensors into a fresh model
    x = torch.randn(3, 576)
    for n in ("q_proj", "o_proj"):
        W = model[n].dequantize()
        assert_sums_close(model[n](x), x @ W.T, x, W)
    if budget == 1.75:
        save_file(model.state_dict(), tmp_path / "model.safetensors")
        fresh = nn.ModuleDict({n: LinearLowRA(576, model[n].out_features, bias=False) for n in ATTENTION})
        fresh["lm_head"] = nn.Linear(576, 16, bias=False)
        fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
        assert all(torch.equal(fresh[n](x), model[n](x)) for n in model)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 16, 17])
def test_inference_fused_decode_path_equals_dense(dtype, tokens):
    """Under no_grad on CUDA with <= 16 tokens the forward takes the fused lowra::matmul kernel; same result."""
    from bitsandbytes_lowra import functional as LF

    q = LinearLowRA.from_linear(nn.Linear(512, 96), mixed_bits(96), device="cuda", compress_statistics=True)
    q.bias.data = q.bias.data.to(dtype)
    ref = reference_linear(q, dtype)
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert LF._use_fused_decode(x, q.bias) == (tokens <= LF.FUSED_DECODE_MAX_TOKENS)
        y, y_ref = q(x), ref(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("bad", [torch.int32, torch.float64, "float16", 16])
def test_a_compute_dtype_the_kernels_cannot_run_is_refused_at_construction(bad):
    """It was stored as given; forward then failed with unrelated messages ("input is torch.int32" for a float32
    input, "Invalid device string: 'float16'")."""
    with pytest.raises(ValueError, match="compute_dtype must be None"):
        LinearLowRA(64, 4, compute_dtype=bad)
    with pytest.raises(ValueError, match="compute_dtype must be None"):
        LinearLowRA.from_linear(torch.nn.Linear(64, 4), 2, compute_dtype=bad)
    assert LinearLowRA(64, 4, compute_dtype=torch.bfloat16).compute_dtype is torch.bfloat16


def test_a_forward_on_meta_says_what_is_where():
    """The autocast query raised "unknown device type for autocast" for a meta input before any check could speak."""
    moved = LinearLowRA.from_linear(torch.nn.Linear(64, 4), 2).to("meta")
    with pytest.raises(LowRAFormatError, match="packed codes are on meta but the quant_state is on cpu"):
        moved(torch.randn(2, 64, device="meta"))
    with pytest.raises(ValueError, match="input is on meta but the quantized weight is on cpu"):
        LinearLowRA.from_linear(torch.nn.Linear(64, 4), 2)(torch.randn(2, 64, device="meta"))
