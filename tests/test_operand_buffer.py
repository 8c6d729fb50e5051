"""QuantStateLowRA's operand buffer: every tensor the kernels read is a view of one uint8 buffer
(_ops.operand_layout), and lowra::matmul_buffered reads a state from it, so a compiled call hands its graph one tensor
per layer where the fields are eight (LinearLowRA.kept_operands). The op must equal lowra::matmul on the fields bit
for bit; the fields must stay the buffer's views through construction, moves, copies and in-place edits, and the
buffer must be let go of (operand_buffer() None) wherever a field stops being its view. CPU tests run in CI; `cuda`
ones on the GPU check."""

import copy
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitsandbytes_lowra import _ops
from bitsandbytes_lowra import functional as F
from bitsandbytes_lowra.bench.kernels import mixed_bits

from .conftest import devices

FIELDS = ("absmax", "bits", "code", "row_offsets", "nested_absmax", "nested_code", "nested_offset")


def state_of(rows, cols, bs=64, nested=True, seed=0, device="cpu", mix=(1, 2, 4)):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    bits = torch.tensor(mix, dtype=torch.uint8)[torch.randint(len(mix), (rows,), generator=g)]
    return F.quantize_lowra(W.to(device), bits.to(device), blocksize=bs, compress_statistics=nested)


def fields(state):
    f = {"absmax": state.absmax, "bits": state.bits, "code": state.code, "row_offsets": state.row_offsets}
    if state.nested:
        f.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code, nested_offset=state.offset)
    return f


def matmul_on_fields(A, packed, state, bias=None):
    plan = state.matmul_plan() if A.is_cuda else (None, None)
    nested = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) if state.nested else ()
    return torch.ops.lowra.matmul(A, packed, state.absmax, state.bits, state.code, state.row_offsets,
                                  state.blocksize, list(state.shape), bias, *plan, *nested)


def matmul_buffered(A, packed, state, bias=None):
    groups = state.matmul_plan()[1] if A.is_cuda else None
    return torch.ops.lowra.matmul_buffered(A, packed, state.operand_buffer(), list(state.shape), state.blocksize,
                                           state.nested, state.state2.blocksize if state.nested else 256, groups,
                                           bias)


@pytest.mark.parametrize("nested", [False, True])
def test_layout_fields_are_aligned_and_disjoint(nested):
    layout, size = _ops.operand_layout(37, 200, 16, nested, 64)
    spans = sorted((off, off + n * dt.itemsize) for off, n, dt in layout.values())
    assert all(off % _ops.OPERAND_ALIGN == 0 for off, _ in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= size and size % _ops.OPERAND_ALIGN == 0
    nb = 37 * 13  # 200 columns in blocks of 16
    assert layout["absmax"][1:] == (nb, torch.uint8 if nested else torch.float32)
    if nested:
        assert layout["nested_absmax"][1:] == (-(-nb // 64), torch.float32)
    else:
        assert "nested_absmax" not in layout


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("nested", [False, True])
def test_a_new_state_keeps_its_operands_as_views_of_one_buffer(device, nested):
    W = torch.randn(24, 96, generator=torch.Generator().manual_seed(0)).to(device)
    bits = mixed_bits(24, torch.Generator().manual_seed(0)).to(device)
    packed, state = F.quantize_lowra(W, bits, compress_statistics=nested)
    buffer = state.operand_buffer()
    assert buffer is not None and buffer.device.type == device and buffer.dtype == torch.uint8
    layout, size = state._operand_layout()
    assert buffer.numel() == size
    for name, t in fields(state).items():
        assert t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert t.data_ptr() == buffer.data_ptr() + layout[name][0]
    # the values are those the quantizer produced: the same dequantized weight as a state built field by field
    loose = F.QuantStateLowRA.from_dict({k: v.clone() if isinstance(v, torch.Tensor) else v
                                         for k, v in state.as_dict().items()}, device=device)
    assert torch.equal(F.dequantize_lowra(packed, state), F.dequantize_lowra(packed, loose))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("nested", [False, True])
def test_matmul_buffered_equals_the_matmul_on_the_fields(device, nested):
    packed, state = state_of(40, 256, nested=nested, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for m in (1, 3):
        A = torch.randn(m, 256, dtype=dtype, generator=torch.Generator().manual_seed(m)).to(device)
        assert torch.equal(matmul_buffered(A, packed, state), matmul_on_fields(A, packed, state))
    bias = torch.randn(40, dtype=dtype).to(device)
    assert torch.equal(matmul_buffered(A, packed, state, bias), matmul_on_fields(A, packed, state, bias))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), cols=st.integers(8, 600), bs_log=st.integers(3, 8), nested=st.booleans(),
       m=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       mix=st.sampled_from([(1,), (2,), (4,), (1, 2), (2, 4), (1, 4), (1, 2, 4)]))
def test_property_matmul_buffered_equals_the_fields_path(rows, cols, bs_log, nested, m, seed, mix):
    cols = cols - cols % 8
    bs = 2**bs_log
    packed, state = state_of(rows, cols, bs, nested, seed, mix=mix)
    A = torch.randn(m, cols, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(matmul_buffered(A, packed, state), matmul_on_fields(A, packed, state))


def test_rows_beyond_the_fused_kernels_and_the_views_kernel_give_the_fields_path():
    """Past the fused kernels' rows the op takes its views through lowra::matmul (the dense path); _matmul_buffered,
    the kernel every device gets, does that for any shape."""
    packed, state = state_of(24, 192)
    for m in (1, 12):
        A = torch.randn(m, 192, generator=torch.Generator().manual_seed(m))
        ref = matmul_on_fields(A, packed, state)
        assert torch.equal(matmul_buffered(A, packed, state), ref)
        assert torch.equal(_ops._matmul_buffered(A, packed, state.operand_buffer(), [24, 192], 64, True, 256), ref)


def test_matmul_buffered_on_smollm2_weights(smollm2_weights):
    W = smollm2_weights["model.layers.0.self_attn.q_proj"]
    bits = mixed_bits(W.shape[0], torch.Generator().manual_seed(0))
    packed, state = F.quantize_lowra(W, bits, compress_statistics=True)
    A = torch.randn(2, W.shape[1], generator=torch.Generator().manual_seed(0))
    y = matmul_buffered(A, packed, state)
    assert torch.equal(y, matmul_on_fields(A, packed, state))
    ref = A @ F.dequantize_lowra(packed, state).float().T
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_matmul_buffered_names_a_buffer_that_does_not_fit():
    packed, state = state_of(8, 64)
    A = torch.randn(1, 64)
    buffer = state.operand_buffer()
    for bad, what in ((buffer[:-16], "must hold"), (buffer.view(torch.int16), "uint8"),
                      (buffer.view(2, -1), "1-D")):
        with pytest.raises(RuntimeError, match=what):
            torch.ops.lowra.matmul_buffered(A, packed, bad, [8, 64], 64, True, 256)


def test_matmul_buffered_refuses_a_buffer_off_its_alignment():
    """The fields' offsets keep them aligned only from a 16-byte aligned start: a buffer copied to an odd address
    would hand the kernels misaligned scales and offsets."""
    packed, state = state_of(8, 64)
    buffer = state.operand_buffer()
    shifted = torch.zeros(buffer.numel() + 16, dtype=torch.uint8)[1:buffer.numel() + 1]
    shifted.copy_(buffer)
    for rows in (1, 64):  # the fused path and the dense one
        with pytest.raises(RuntimeError, match="16-byte aligned"):
            torch.ops.lowra.matmul_buffered(torch.randn(rows, 64), packed, shifted, [8, 64], 64, True, 256)


@pytest.mark.parametrize("blocksize, nested_blocksize, what", [
    (0, 256, "blocksize must be"), (12, 256, "blocksize must be"), (8192, 256, "blocksize must be"),
    (64, 0, "nested_blocksize must be a power of two"), (64, 100, "nested_blocksize must be a power of two")])
def test_matmul_buffered_checks_blocksizes_before_dividing_by_them(blocksize, nested_blocksize, what):
    packed, state = state_of(8, 64)
    with pytest.raises(ValueError, match=what):
        torch.ops.lowra.matmul_buffered(torch.randn(1, 64), packed, state.operand_buffer(), [8, 64], blocksize, True,
                                        nested_blocksize)


@pytest.mark.parametrize("device", devices())
def test_a_move_keeps_the_views_and_an_in_place_edit_reaches_the_buffer(device):
    packed, state = state_of(16, 128)
    state.to(device)
    packed = packed.to(device)
    buffer = state.operand_buffer()
    assert buffer is not None and buffer.device.type == device
    before = matmul_buffered(torch.ones(1, 128, device=device), packed, state)
    with torch.no_grad():
        state.code.mul_(0.5)  # an edit of the field is an edit of the buffer
    assert state.operand_buffer() is buffer
    after = matmul_buffered(torch.ones(1, 128, device=device), packed, state)
    assert torch.allclose(after, before * 0.5, rtol=1e-2, atol=1e-3)
    assert torch.equal(after, matmul_on_fields(torch.ones(1, 128, device=device), packed, state))


@pytest.mark.parametrize("how", ["set", "data", "set_"])
def test_a_field_of_its_own_leaves_the_buffer_until_the_next_move(how):
    packed, state = state_of(16, 128)
    own = state.absmax.clone()
    if how == "set":
        state.absmax = own
    elif how == "data":
        state.absmax.data = own
    else:
        state.absmax.set_(own)
    assert state.operand_buffer() is None
    state.to("cpu")  # packs the fields into a new buffer
    buffer = state.operand_buffer()
    assert buffer is not None and torch.equal(state.absmax, own)


def test_the_row_plan_lives_in_the_buffer():
    packed, state = state_of(16, 128)
    order, groups = state.matmul_plan()
    assert order.data_ptr() == state._operand_slot("row_order").data_ptr()
    ref_order, ref_groups = _ops.matmul_plan(state.bits)
    assert torch.equal(order, ref_order) and groups == ref_groups


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_views_of_a_buffer_of_their_own(how):
    packed, state = state_of(16, 128)
    twin = copy.deepcopy(state) if how == "deepcopy" else pickle.loads(pickle.dumps(state))
    buffer = twin.operand_buffer()
    assert buffer is not None and buffer.data_ptr() != state.operand_buffer().data_ptr()
    assert twin == state


def test_saved_entries_own_their_storage():
    from safetensors.torch import load, save

    packed, state = state_of(16, 128)
    entries = state.as_dict(packed=True)
    for t in entries.values():  # safetensors refuses tensors that share storage
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    loaded = F.QuantStateLowRA.from_dict(load(save(entries)))
    assert loaded == state and loaded.operand_buffer() is not None
