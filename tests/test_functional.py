"""functional.py: quantize/dequantize/matmul_lowra against the reference kernels, plans, QuantStateLowRA
serialization and validation, bits accounting."""

import json

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitsandbytes_lowra.backends import reference
from bitsandbytes_lowra.codebooks import nf_tables
from bitsandbytes_lowra.format import LowRAFormatError, row_offsets
from bitsandbytes_lowra.functional import (
    BLOB_KEY,
    QuantStateLowRA,
    bits_report,
    dequantize_lowra,
    make_plan,
    matmul_lowra,
    quantize_lowra,
    quantize_lowra_at_bits,
)

from .conftest import devices, mixed_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]




def random_tables(bits: torch.Tensor, seed: int = 0):
    """Random sorted codebooks [rows, 16] and midpoint thresholds [rows, 15] (float32, not the NF ones)."""
    g = torch.Generator().manual_seed(seed)
    code, thr = torch.zeros(bits.numel(), 16), torch.zeros(bits.numel(), 15)
    for r, b in enumerate(bits.tolist()):
        c = torch.sort(torch.rand(2**b, generator=g) * 2 - 1).values
        code[r, : 2**b], thr[r, : 2**b - 1] = c, (c[1:] + c[:-1]) / 2
    return code, thr


def weight(rows=24, cols=200, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 32])
def test_quantize_matches_reference(device, dtype, blocksize):
    W, bits = weight(dtype=dtype).to(device), mixed_bits(24)
    code, thr = random_tables(bits)
    packed, state = quantize_lowra(W, bits, code, thr, blocksize=blocksize)
    plan = make_plan(bits, code, thr)
    off = row_offsets(plan.bits, W.shape[1], blocksize)
    ref_packed, ref_absmax = reference.quantize(W.cpu(), plan.bits, plan.thresholds, off, blocksize)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(state.absmax.cpu(), ref_absmax)
    ref_W = reference.dequantize(ref_packed, ref_absmax, plan.bits, plan.codebook, off, blocksize, list(W.shape), dtype)
    out = dequantize_lowra(packed, state)
    assert out.dtype == dtype and torch.equal(out.cpu(), ref_W)
    # another output dtype is rounded once from float32, not via the original dtype
    out16 = dequantize_lowra(packed, state, dtype=torch.bfloat16)
    ref16 = reference.dequantize(ref_packed, ref_absmax, plan.bits, plan.codebook, off, blocksize, list(W.shape),
                                 torch.bfloat16)
    assert torch.equal(out16.cpu(), ref16)


def test_default_tables_are_the_nf_baseline():
    W, bits = weight(), mixed_bits(24)
    _, state = quantize_lowra(W, bits)
    code, thr = nf_tables(bits)
    assert torch.equal(state.codebook, code) and torch.equal(state.thresholds, thr)
    # uniform precision from an int
    _, s4 = quantize_lowra(W, 4)
    assert s4.bits.dtype == torch.uint8 and torch.equal(s4.bits, torch.full((24,), 4, dtype=torch.uint8))


def test_compact_tables_equal_storage_width():
    """{bits: [2^b]} (shared), {bits: [rows, 2^b]} (per row) and [rows, 16] describe the same plan."""
    W, bits = weight(), mixed_bits(24)
    code, thr = random_tables(bits)
    wide = quantize_lowra(W, bits, code, thr)
    per_row = quantize_lowra(
        W, bits, {p: code[:, : 2**p] for p in (1, 2, 4)}, {p: thr[:, : 2**p - 1] for p in (1, 2, 4)}
    )
    assert torch.equal(wide[0], per_row[0]) and wide[1] == per_row[1]
    shared_code = {p: torch.sort(torch.rand(2**p) * 2 - 1).values for p in (1, 2, 4)}
    shared = quantize_lowra(W, bits, shared_code)
    for r, b in enumerate(bits.tolist()):
        assert torch.equal(shared[1].codebook[r, : 2**b], shared_code[b].half())
        assert (shared[1].codebook[r, 2**b :] == 0).all()
    # thresholds default to midpoints of the float16 levels: nearest-level encoding
    c16 = shared[1].codebook.float()
    for r, b in enumerate(bits.tolist()):
        mids = ((c16[r, 1 : 2**b] + c16[r, : 2**b - 1]) / 2).half()
        assert torch.equal(shared[1].thresholds[r, : 2**b - 1], mids)


def test_learner_style_tables_accepted():
    """A precision unused by any row needs no entry; unused slots of wide tables are ignored (zeroed)."""
    W = weight()
    bits = torch.full((24,), 2, dtype=torch.uint8)
    code = torch.full((24, 16), float("nan"))
    code[:, :4] = torch.tensor([-1.0, -0.2, 0.3, 1.0])
    _, state = quantize_lowra(W, bits, code)
    assert torch.isfinite(state.codebook).all() and (state.codebook[:, 4:] == 0).all()
    _, state = quantize_lowra(W, bits, {2: torch.tensor([-1.0, 0.0, 0.4, 1.0])})
    assert state.nominal_bits == 2.0


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda W, b: (W[None], b), "2-D"),
        (lambda W, b: (W.masked_fill(W > 1.5, float("nan")), b), "NaN"),
        (lambda W, b: (W.to(torch.float64), b), "float32, float16 or bfloat16"),
        (lambda W, b: (W, b[:-1]), "output channels"),
        (lambda W, b: (W, b.masked_fill(b == 2, 3)), r"is not one of \(1, 2, 4\)"),
        (lambda W, b: (W, 8), "bits = 8"),
        (lambda W, b: (W, 1.75), r"for an average bit budget use quantize_lowra_at_bits"),
        (lambda W, b: (W, b.float()), "integer tensor"),
        (lambda W, b: (W, b, torch.zeros(24, 8)), r"codebooks must have shape \(24, 16\)"),
        (lambda W, b: (W, b, None, torch.zeros(24, 16)), r"thresholds must have shape \(24, 15\)"),
        (lambda W, b: (W, b, {1: torch.tensor([-1.0, 1.0])}), "no entry for precision 2"),
        (lambda W, b: (W, b, {1: torch.ones(2), 2: torch.ones(4), 4: torch.ones(8)}), r"codebooks\[4\] must have"),
        (lambda W, b: (W, b, {3: torch.ones(8)}), "keys must be precisions"),
        (lambda W, b: (W, b, None, torch.full((24, 15), float("inf"))), "NaN/Inf"),
    ],
)
def test_quantize_rejects_bad_input(make_args, match):
    W, bits = weight(), mixed_bits(24)
    with pytest.raises(LowRAFormatError, match=match):
        quantize_lowra(*make_args(W, bits))


def test_quantize_rejects_unsorted_thresholds_and_bad_blocksize():
    W, bits = weight(), torch.full((24,), 2, dtype=torch.uint8)
    thr = torch.zeros(24, 15)
    thr[:, :3] = torch.tensor([0.5, -0.5, 0.7])
    with pytest.raises(LowRAFormatError, match="not sorted"):
        quantize_lowra(W, bits, None, thr)
    with pytest.raises(LowRAFormatError, match="blocksize"):
        quantize_lowra(W, bits, blocksize=60)


# --------------------------------------------------------------------------------------------------------------
# double quantization
# --------------------------------------------------------------------------------------------------------------


def test_double_quantized_absmax():
    W, bits = weight(rows=64, cols=576), mixed_bits(64)
    packed, plain = quantize_lowra(W, bits)
    packed2, nested = quantize_lowra(W, bits, compress_statistics=True)
    assert torch.equal(packed, packed2)  # codes use the exact absmax, as bnb does
    assert nested.nested and nested.absmax.dtype == torch.uint8 and nested.absmax.shape == plain.absmax.shape
    assert nested.state2.blocksize == 256 and nested.state2.code.shape == (256,)
    # decoded scales = bnb's own 8-bit blockwise decode of (absmax - mean), plus the mean
    want = bnbF.dequantize_blockwise(nested.absmax.flatten(), nested.state2).reshape(64, -1) + nested.offset
    assert torch.equal(nested.absmax_fp32(), want.clamp_min(0))
    # 8-bit dynamic code: the error is a small fraction of the largest deviation from the mean in the group
    err = (nested.absmax_fp32() - plain.absmax).abs().max()
    assert err < 0.01 * (plain.absmax - plain.absmax.mean()).abs().max(), err
    out = dequantize_lowra(packed2, nested)
    ref = reference.dequantize(packed, nested.absmax_fp32(), plain.bits, plain.codebook, plain.row_offsets, 64,
                               [64, 576], torch.float32)
    assert torch.equal(out, ref)
    assert nested.nbytes < plain.nbytes


def test_double_quantized_zero_blocks_stay_zero():
    W = weight(rows=16, cols=128)
    W[3] = 0
    packed, state = quantize_lowra(W, 2, compress_statistics=True)
    assert (state.absmax_fp32() >= 0).all()
    assert (dequantize_lowra(packed, state)[3] == 0).all()


# --------------------------------------------------------------------------------------------------------------
# serialization
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_state_round_trip_through_safetensors(tmp_path, nested):
    W, bits = weight(), mixed_bits(24)
    code, thr = random_tables(bits)
    # tables that are views of one shared tensor must not leak shared storage into the saved dict
    shared = torch.cat([code, thr], dim=1)
    packed, state = quantize_lowra(W, bits, shared[:, :16], shared[:, 16:], compress_statistics=nested)
    d = state.as_dict(packed=True)
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    blob = json.loads(bytes(d[BLOB_KEY].numpy()).decode())
    assert blob["quant_type"] == "lowra" and blob["shape"] == [24, 200] and blob["dtype"] == "float32"
    assert ("nested_offset" in blob) == nested
    save_file({"weight": packed, **{f"weight.{k}": v for k, v in d.items()}}, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    state2 = QuantStateLowRA.from_dict({k: v for k, v in loaded.items() if k != "weight"})  # "weight." prefixes ok
    assert state2 == state and state2.nested == nested
    assert torch.equal(dequantize_lowra(loaded["weight"], state2), dequantize_lowra(packed, state))
    # the unpacked form (as_dict(packed=False)) loads too
    assert QuantStateLowRA.from_dict(state.as_dict()) == state


@pytest.mark.parametrize("device", devices())
def test_from_dict_keeps_every_tensor_on_the_dicts_device(device):
    """as_dict() keeps the nested offset as a number; it must come back on the scales' device (it came back on the
    CPU beside CUDA tensors before)."""
    packed, state = quantize_lowra(weight().to(device), mixed_bits(24).to(device), compress_statistics=True)
    back = QuantStateLowRA.from_dict(state.as_dict())
    tensors = (back.absmax, back.bits, back.code, back.thresholds, back.row_offsets, back.offset, back.state2.absmax,
               back.state2.code)
    assert {t.device.type for t in tensors} == {device}
    assert back == state and torch.equal(dequantize_lowra(packed, back), dequantize_lowra(packed, state))


def test_state_equality_and_copy():
    W = weight()
    _, a = quantize_lowra(W, mixed_bits(24), compress_statistics=True)
    _, b = quantize_lowra(W, mixed_bits(24), compress_statistics=True)
    _, c = quantize_lowra(W, mixed_bits(24, seed=1), compress_statistics=True)
    _, d = quantize_lowra(W, mixed_bits(24))
    assert a == b and a != c and a != d and a != "x"
    b.thresholds[0, 0] += 0.001
    assert a != b


def good_state(nested=True):
    W = weight()
    packed, state = quantize_lowra(W, mixed_bits(24), compress_statistics=nested)
    return packed, state.as_dict(packed=True)


def blob_with(d, **changes):
    fields = json.loads(bytes(d[BLOB_KEY].numpy()).decode())
    fields.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del fields[k]
    return torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


def tamper_bits(d):
    d["lowra_bits"] = d["lowra_bits"].clone()
    d["lowra_bits"][2] = 3


def shift_offset(d):  # monotone offsets that still end at the buffer size, but not the prefix sum of bits
    d["lowra_row_offsets"][5] += 8


CORRUPTIONS = [
    ("unknown key", lambda d: d.update(extra=torch.zeros(1)), r"unknown LowRA state fields \['extra'\]"),
    ("missing code", lambda d: d.pop("lowra_code"), r"missing LowRA state fields \['lowra_code'\]"),
    ("missing blob", lambda d: d.pop(BLOB_KEY), "missing the JSON blob"),
    ("bits value", tamper_bits, r"bits\[2\] = 3 is not one of"),
    ("bits/offsets mismatch", shift_offset, "row_offsets do not match"),
    ("bits dtype", lambda d: d.update(lowra_bits=d["lowra_bits"].long()), "lowra_bits must be torch.uint8"),
    ("code dtype", lambda d: d.update(lowra_code=d["lowra_code"].float()), "lowra_code must be torch.float16"),
    ("code shape", lambda d: d.update(lowra_code=d["lowra_code"][:, :8]), r"lowra_code must have shape \(24, 16\)"),
    ("offsets shape", lambda d: d.update(lowra_row_offsets=d["lowra_row_offsets"][:-1]), "lowra_row_offsets must have"),
    ("absmax shape", lambda d: d.update(absmax=d["absmax"][:-1]), r"absmax must have shape \(24, 4\)"),
    ("nested absmax count", lambda d: d.update(nested_absmax=torch.ones(3)), r"nested_absmax must have shape \(1,\)"),
    ("nan threshold", lambda d: d.update(lowra_thresholds=d["lowra_thresholds"].fill_(float("nan"))), "NaN/Inf"),
    ("blob not json", lambda d: d.update({BLOB_KEY: torch.tensor([0xFF, 0x00], dtype=torch.uint8)}), "not valid UTF-8"),
    ("blob dtype", lambda d: d.update({BLOB_KEY: d[BLOB_KEY].float()}), "1-D uint8 tensor"),
    ("quant type", lambda d: d.update({BLOB_KEY: blob_with(d, quant_type="nf4")}), "quant_type must be 'lowra'"),
    ("version", lambda d: d.update({BLOB_KEY: blob_with(d, format_version=2)}), "format_version 2 is not supported"),
    ("version as a bool", lambda d: d.update({BLOB_KEY: blob_with(d, format_version=True)}),
     "format_version True is not supported"),
    ("shape", lambda d: d.update({BLOB_KEY: blob_with(d, shape=[24, 0])}), r"shape must be \[rows, cols\]"),
    ("shape vs tensors", lambda d: d.update({BLOB_KEY: blob_with(d, shape=[24, 300])}), "absmax must have shape"),
    ("dtype", lambda d: d.update({BLOB_KEY: blob_with(d, dtype="int8")}), "dtype must be one of"),
    ("blocksize", lambda d: d.update({BLOB_KEY: blob_with(d, blocksize=60)}), "blocksize must be a multiple of 8"),
    ("nested offset", lambda d: d.update({BLOB_KEY: blob_with(d, nested_offset="x")}), "nested_offset must be a"),
    ("nested blocksize", lambda d: d.update({BLOB_KEY: blob_with(d, nested_blocksize=100)}), "nested_blocksize must"),
    ("nested blob only", lambda d: d.update({BLOB_KEY: blob_with(d, nested_offset=None)}), "missing LowRA state"),
    ("tensor in json", lambda d: d.update({BLOB_KEY: blob_with(d, absmax=[1.0])}), "holds tensor fields"),
]


@pytest.mark.parametrize("corrupt, match", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_from_dict_rejects_corrupt_state(corrupt, match):
    _, d = good_state()
    d = {k: v.clone() for k, v in d.items()}
    corrupt(d)
    with pytest.raises(LowRAFormatError, match=match):
        QuantStateLowRA.from_dict(d)


def test_from_dict_rejects_a_bitsandbytes_nf4_state():
    _, qs = bnbF.quantize_4bit(torch.randn(32, 64), quant_type="nf4", compress_statistics=True)
    with pytest.raises(LowRAFormatError, match="bitsandbytes nf4/fp4 state, not LowRA"):
        QuantStateLowRA.from_dict(qs.as_dict(packed=True))


def test_validate_checks_the_packed_buffer():
    packed, d = good_state()
    state = QuantStateLowRA.from_dict(d)
    state.validate(packed)
    with pytest.raises(LowRAFormatError, match="packed buffer has"):
        state.validate(packed[:-1])
    with pytest.raises(LowRAFormatError, match="mismatched weight and quant_state"):
        dequantize_lowra(packed[:-1], state)
    with pytest.raises(LowRAFormatError, match="1-D uint8"):
        dequantize_lowra(packed.float(), state)


# --------------------------------------------------------------------------------------------------------------
# devices, accounting, matmul
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_state_to_cuda_and_back():
    packed, state = quantize_lowra(weight(), mixed_bits(24), compress_statistics=True)
    ref = dequantize_lowra(packed, state)
    state.to("cuda")
    assert state.device.type == "cuda" and state.state2.absmax.is_cuda and state.bits.is_cuda
    assert torch.equal(dequantize_lowra(packed.cuda(), state).cpu(), ref)
    state.to("cpu")
    assert torch.equal(dequantize_lowra(packed, state), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("nested", [False, True])
def test_cuda_quantize_equals_cpu(nested):
    W, bits = weight(rows=64, cols=576), mixed_bits(64)
    code, thr = random_tables(bits)
    p_cpu, s_cpu = quantize_lowra(W, bits, code, thr, compress_statistics=nested)
    p_gpu, s_gpu = quantize_lowra(W.cuda(), bits, code, thr, compress_statistics=nested)
    assert torch.equal(p_gpu.cpu(), p_cpu)
    if nested:  # the mean of absmax (nested offset) is a reduction whose order differs between devices
        torch.testing.assert_close(s_gpu.absmax_fp32().cpu(), s_cpu.absmax_fp32(), rtol=1e-2, atol=1e-3)
    else:
        assert s_gpu == s_cpu


def test_bits_accounting_follows_the_format_doc():
    rows, cols = 8, 576
    bits = torch.tensor([2, 2, 2, 2, 1, 1, 4, 4], dtype=torch.uint8)
    packed, plain = quantize_lowra(weight(rows, cols), bits)
    _, nested = quantize_lowra(weight(rows, cols), bits, compress_statistics=True)
    assert plain.nominal_bits == (4 * 2 + 2 * 1 + 2 * 4) / 8
    blob = plain.as_dict(packed=True)[BLOB_KEY].numel()
    nb = 9  # 576 / 64 blocks per row
    tables = rows * (16 * 2 + 15 * 2 + 1) + (rows + 1) * 8  # codebook, thresholds, bits; row offsets
    assert packed.numel() == sum(576 * b // 8 for b in bits.tolist())
    assert plain.nbytes == packed.numel() + rows * nb * 4 + tables + blob
    blob2 = nested.as_dict(packed=True)[BLOB_KEY].numel()
    assert nested.nbytes == packed.numel() + rows * nb + 4 * 1 + 256 * 4 + tables + blob2
    assert plain.effective_bits == pytest.approx(8 * plain.nbytes / (rows * cols))
    rep = bits_report([plain, plain])
    assert rep["nominal_bits"] == plain.nominal_bits and rep["effective_bits"] == pytest.approx(plain.effective_bits)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_matmul_lowra_output_and_gradients(dtype, tol):
    W, bits = weight(), mixed_bits(24)
    packed, state = quantize_lowra(W, bits, compress_statistics=True)
    x = torch.randn(2, 3, 200, dtype=dtype, requires_grad=True)
    bias = torch.randn(24, dtype=dtype, requires_grad=True)
    y = matmul_lowra(x, packed, state, bias)
    g = torch.randn_like(y)
    y.backward(g)
    Wd = dequantize_lowra(packed, state, dtype=dtype)
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y2 = torch.nn.functional.linear(x2, Wd, b2)
    y2.backward(g)
    torch.testing.assert_close(y, y2, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad, x2.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(bias.grad, b2.grad, atol=tol, rtol=tol)
    assert not packed.requires_grad
    with pytest.raises(ValueError, match="expects 200"):
        matmul_lowra(x[..., :100], packed, state)


def test_matmul_lowra_output_can_be_modified_in_place_under_autograd():
    """F.linear with a bias returns a view for 3-D input; a custom Function's view output refuses in-place ops
    (peft's mixed-adapter batches add into slices of it)."""
    W = weight()
    packed, state = quantize_lowra(W, mixed_bits(24))
    x = torch.randn(2, 5, 200, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    out = matmul_lowra(x, packed, state, bias)
    out[0] += 1
    out.sum().backward()
    Wd = dequantize_lowra(packed, state)
    assert torch.allclose(x.grad, torch.ones(2, 5, 24) @ Wd) and torch.allclose(bias.grad, torch.full((24,), 10.0))


def test_state_refuses_an_impossible_blocksize():
    packed, state = quantize_lowra(weight(), mixed_bits(24))
    with pytest.raises(LowRAFormatError, match="blocksize"):
        state.blocksize = 7
    assert state.blocksize == 64


@pytest.mark.parametrize("tokens", [1, 12])  # the fused path's size and the dense one's
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bias_shape", [(23,), (1,), (24, 1), ()])
def test_matmul_lowra_names_a_wrong_bias(tokens, grad, bias_shape):
    """A bias that is not [rows] is named as such on every path (not as a launcher's or a broadcast's error)."""
    packed, state = quantize_lowra(weight(), mixed_bits(24))
    x = torch.randn(tokens, 200, requires_grad=grad)
    with pytest.raises(ValueError, match=r"bias has shape .*24 output features"):
        matmul_lowra(x, packed, state, torch.zeros(bias_shape))


# --------------------------------------------------------------------------------------------------------------
# learn + assign + quantize one real matrix
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q_proj(smollm2_weights):
    return smollm2_weights["model.layers.0.self_attn.q_proj"]  # [576, 576]


def rel_error(W, packed, state):
    return float((dequantize_lowra(packed, state) - W).norm() / W.norm())


def test_quantize_lowra_at_bits_on_smollm2(q_proj):
    W = q_proj
    errors = {}
    for budget in (1.75, 2, 4):
        packed, state = quantize_lowra_at_bits(W, budget)
        state.validate(packed)
        assert state.nominal_bits <= budget and state.nominal_bits == pytest.approx(budget, abs=4 / W.shape[0])
        errors[budget] = rel_error(W, packed, state)
        # the learned tables beat the NormalFloat tables at the very same per-row precisions
        nf_packed, nf_state = quantize_lowra(W, state.bits)
        assert errors[budget] < rel_error(W, nf_packed, nf_state)
        if budget >= 2:  # default precisions (2, 4) from 2 bits on
            assert int(state.bits.min()) >= 2
    assert errors[1.75] > errors[2] > errors[4]
    # an explicit precision set, double-quantized statistics
    packed, state = quantize_lowra_at_bits(W, 3.0, precisions=(2, 4), compress_statistics=True)
    assert state.nested and set(state.bits.unique().tolist()) == {2, 4} and state.nominal_bits <= 3.0


def test_state_with_offset_but_no_state2_is_refused():
    """The offset was silently ignored: the state read its absmax as plain float32 scales."""
    _, s = quantize_lowra(torch.randn(4, 64), 2)
    with pytest.raises(LowRAFormatError, match="needs both offset and state2, got only offset"):
        QuantStateLowRA(s.absmax, s.shape, s.bits, s.code, s.thresholds, s.row_offsets, offset=torch.tensor(0.1))


def test_repr_of_a_state_on_meta():
    """repr counted the rows per precision with .item(), which meta tensors refuse."""
    _, s = quantize_lowra(torch.randn(4, 64), 2)
    assert "rows per bits={1: 0, 2: 4, 4: 0}" in repr(s)
    assert "rows per bits=?" in repr(s.to("meta")) and "device=meta" in repr(s.to("meta"))


def test_nan_codebook_is_named_as_nan():
    # It was refused as "codebooks must be ascending" (NaN compares false), a problem the caller did not have.
    with pytest.raises(LowRAFormatError, match="NaN"):
        quantize_lowra(torch.randn(4, 64), 2, codebooks={2: torch.tensor([float("nan"), 0.0, 0.5, 1.0])})


def test_levels_that_merge_in_float16_are_refused():
    # 1e-8 and 2e-8 underflow to 0 in float16 storage: every level of the row became (nearly) zero, silently.
    W = torch.randn(4, 64)
    with pytest.raises(LowRAFormatError, match="differ but both become .* in float16"):
        quantize_lowra(W, 2, codebooks={2: torch.tensor([-1e-8, 0.0, 1e-8, 2e-8])})
    with pytest.raises(LowRAFormatError, match="row 2: levels"):  # two levels 1e-4 apart near 1 round together
        quantize_lowra(W, 2, codebooks=torch.tensor([[-1.0, 0.0, 0.5, 1.0] + [0.0] * 12] * 2
                                                    + [[-1.0, 0.0, 1.0, 1.0001] + [0.0] * 12] * 2),
                       thresholds={2: torch.tensor([-0.5, 0.5, 0.9])})
    # Equal levels as given stay allowed, as do levels float16 keeps apart.
    quantize_lowra(W, 2, codebooks={2: torch.tensor([-1.0, 0.0, 0.0, 1.0])})
    quantize_lowra(W, 2, codebooks={2: torch.tensor([-1.0, 0.0, 1e-3, 1.0])})


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, "float16"])
def test_dequantize_to_a_bad_dtype_is_named(dtype):
    # Was the op's RuntimeError, or a schema-mismatch dump for a string.
    packed, state = quantize_lowra(torch.randn(4, 64), 2)
    with pytest.raises(LowRAFormatError, match=f"dtype must be torch.float32.*got {dtype!r}"):
        dequantize_lowra(packed, state, dtype)


def test_user_tables_beyond_float16_or_unsorted_are_named_for_what_they_are():
    """A codebook entry of 1e6 overflowed to Inf in storage and was refused as 'NaN/Inf'; an unsorted codebook was
    refused as unsorted thresholds (its midpoints), tables the caller never passed."""
    W = torch.randn(4, 64)
    with pytest.raises(LowRAFormatError, match=r"codebooks must fit float16.*got 1e\+06"):
        quantize_lowra(W, 2, codebooks={2: torch.tensor([-1e6, -1.0, 1.0, 2.0])})
    with pytest.raises(LowRAFormatError, match="codebooks must be ascending when the thresholds are derived"):
        quantize_lowra(W, 2, codebooks={2: torch.tensor([1.0, -1.0, 0.5, 2.0])})
    with pytest.raises(LowRAFormatError, match=r"thresholds must fit float16.*got 7e\+04"):
        quantize_lowra(W, 2, codebooks={2: torch.tensor([-1.0, -0.3, 0.3, 1.0])},
                       thresholds={2: torch.tensor([-7e4, 0.0, 0.5])})
