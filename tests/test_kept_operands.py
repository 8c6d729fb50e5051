"""LinearLowRA's kept operands (LinearLowRA.kept_operands): a compiled call reads the packed codes and the state's
tensors from one tuple on the module, not through the weight and its state, and guards neither. It must give what
the full path gives, and no replacement of codes, weight, state or state field may reach a compiled call as stale
operands, whether or not an eager call came between: each drops the tuple. CPU tests run in CI; `cuda` ones on the
GPU check."""

import copy
import pickle

import pytest
import torch

from bitsandbytes_lowra import functional as F
from bitsandbytes_lowra import operands
from bitsandbytes_lowra.nn import LinearLowRA, ParamsLowRA

from .conftest import devices
from .test_decode_shortcut import dtype_for, full, layer


def compiled(lin, seen=None):
    """lin compiled in one graph; `seen` collects each traced graph's input names."""

    def backend(gm, example_inputs):
        if seen is not None:
            seen.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
        return gm.forward

    return torch.compile(lin, backend=backend, fullgraph=True)


def reads_state(names) -> bool:
    return any("quant_state" in n or "parameters_weight" in n for n in names)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("nested", [False, True])
def test_compiled_call_reads_the_kept_operands_not_the_weight_and_state(device, nested):
    torch._dynamo.reset()
    lin = layer(nested=nested, bias=False, device=device)
    x = torch.randn(1, 128, device=device, dtype=dtype_for(device))
    seen = []
    with torch.no_grad():
        cold = compiled(lin, seen)(x)  # no eager call yet: nothing kept, the trace reads the fields
        ref = full(lin, x)  # an eager call keeps them
        assert "_kept_operands" in lin.__dict__
        torch._dynamo.reset()
        warm = compiled(lin, seen)(x)
    assert torch.equal(cold, ref) and torch.equal(warm, ref)
    assert reads_state(seen[0])
    # the codes and the state's operand buffer (absmax, bits, code, row offsets, the row plan on CUDA, the nested
    # scales, code and offset): two tensors where the fields are eight
    assert not reads_state(seen[1]) and sum("kept_operands" in n for n in seen[1]) == 2
    # static addresses to CUDA graph trees, which would otherwise copy them (the codes too) at every replay; the
    # fields too (the dense paths of a compiled call read them)
    # more rows than the fused kernels take (the dense path) or a gradient: the kept fields, not the state's
    many = torch.randn(20, 128, device=device, dtype=dtype_for(device))
    with torch.no_grad():
        torch._dynamo.reset()
        assert torch.equal(compiled(lin, seen)(many), full(lin, many))
    assert not reads_state(seen[2]) and sum("kept_operands" in n for n in seen[2]) == (8 if nested else 5)
    kept = lin.__dict__["_kept_operands"]
    assert kept[5].buffer is lin.quant_state.operand_buffer()
    tensors = [t for t in (*kept, kept[5].buffer) if isinstance(t, torch.Tensor)]
    assert len(tensors) == (8 if nested else 5) + (1 if device == "cuda" else 0) + 1
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in tensors)


def _twins(nested=True):
    """Two layers of different weights on one plan (so one's codes and fields fit the other), and an input."""
    return layer(seed=0, plan=7, nested=nested), layer(seed=3, plan=7, nested=nested), torch.randn(2, 128)


REPLACEMENTS = {
    "codes set": lambda lin, other: setattr(lin.weight, "data", other.weight.data.clone()),
    "codes copied in place": lambda lin, other: lin.weight.data.copy_(other.weight.data),
    "state set": lambda lin, other: setattr(lin.weight, "quant_state", other.quant_state),
    "weight set": lambda lin, other: setattr(lin, "weight", other.weight),
    "absmax set": lambda lin, other: setattr(lin.quant_state, "absmax", other.quant_state.absmax.clone()),
    "absmax copied in place": lambda lin, other: lin.quant_state.absmax.copy_(other.quant_state.absmax),
    "codebook set": lambda lin, other: setattr(lin.quant_state, "code", lin.quant_state.code * 0.5),  # one plan
    "nested scales set": lambda lin, other: (setattr(lin.quant_state, "state2", copy.deepcopy(other.quant_state.state2)),
                                             setattr(lin.quant_state, "offset", other.quant_state.offset.clone())),
    "moved": lambda lin, other: (lin.quant_state.absmax.copy_(other.quant_state.absmax), lin.quant_state.to("cpu")),
    "weight registered": lambda lin, other: lin.register_parameter("weight", other.weight),
    "weight loaded": lambda lin, other: lin.load_state_dict(other.state_dict()),
    # no setattr: torch.func.functional_call and accelerate's set_module_tensor_to_device write the dict itself
    "weight written into _parameters": lambda lin, other: lin._parameters.__setitem__("weight", other.weight),
}


def guard_lines(module) -> list[str]:
    """The guards of `module`'s compiled forward (its one cache entry)."""
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(type(module).forward.__code__)
    assert len(entries) == 1
    return list(entries[0].guard_manager.code_parts)


@pytest.mark.parametrize("nested", [False, True])
def test_a_compiled_call_guards_neither_the_weight_nor_its_state(nested):
    """Every input of a graph is guarded before each call: reaching the weight (a tensor subclass) and its state for
    their stamps cost a 7B decode step most of its guards (thirtieth round)."""
    torch._dynamo.reset()
    lin, x = layer(nested=nested, bias=False), torch.randn(1, 128)
    with torch.no_grad():
        ref = full(lin, x)
        assert torch.equal(torch.compile(lin, backend="eager", fullgraph=True)(x), ref)
    lines = guard_lines(lin)
    assert not [g for g in lines if "_parameters['weight']" in g or "quant_state" in g]
    assert sum("check_tensor(" in g and "_kept_operands" in g for g in lines) == 2  # the codes and the buffer


@pytest.mark.parametrize("how", list(REPLACEMENTS))
def test_a_compiled_call_after_a_replacement_computes_with_the_new_operands(how):
    torch._dynamo.reset()
    lin, other, x = _twins()
    call = compiled(lin)
    with torch.no_grad():
        before = full(lin, x)
        assert torch.equal(call(x), before)  # traced with the kept operands
        REPLACEMENTS[how](lin, other)
        after = call(x)  # no eager call in between
        ref = full(lin, x)  # the full path, fields read afresh (and the operands kept again)
        assert torch.equal(after, ref) and not torch.equal(ref, before)
        assert torch.equal(call(x), ref)  # traced again with the operands kept anew


def test_a_field_storage_swapped_is_seen_from_the_next_eager_call_on():
    """`.data = ...` on a state field moves it off the operand buffer without setting it (no stamp): a compiled call
    cannot tell (it reads the buffer; eager calls check the fields' addresses), so the next eager call keeps the
    operands anew, without the buffer, and compiled calls after it read the new values."""
    torch._dynamo.reset()
    lin, other, x = _twins()
    call = compiled(lin)
    with torch.no_grad():
        before = full(lin, x)
        assert torch.equal(call(x), before)
        lin.quant_state.absmax.data = other.quant_state.absmax.clone()
        assert lin.quant_state.operand_buffer() is None
        ref = full(lin, x)
        assert not torch.equal(ref, before) and lin.__dict__["_kept_operands"][5] is None
        assert torch.equal(call(x), ref)


def test_replaced_codes_weight_or_state_are_not_kept_alive():
    """Nor are the codes of a move, whether or not the weight knows its module (a deep copy of a lone weight does
    not)."""
    lin, other, x = _twins()
    with torch.no_grad():
        for replace in (lambda: setattr(lin.weight, "data", other.weight.data.clone()),
                        lambda: setattr(lin.weight, "quant_state", other.quant_state),
                        lambda: setattr(lin, "weight", copy.deepcopy(other.weight)),
                        lambda: lin.to("cpu")):
            ref = full(lin, x)
            assert "_kept_operands" in lin.__dict__
            replace()
            assert "_kept_operands" not in lin.__dict__
        assert torch.equal(lin(x), ref)  # the moved layer computes as before


def test_stamps_name_what_the_operands_were_taken_from():
    lin, other, x = _twins()
    state, w = lin.quant_state, lin.weight
    stamp = state.operands_stamp
    state.thresholds = state.thresholds.clone()  # not read by the kernels
    assert state.operands_stamp == stamp
    state.bits = state.bits.clone()
    assert state.operands_stamp != stamp
    copies = (copy.deepcopy(state), pickle.loads(pickle.dumps(state)), copy.copy(state))
    assert len({state.operands_stamp, *(c.operands_stamp for c in copies)}) == 4
    p = w.lowra_stamp
    assert p != other.weight.lowra_stamp
    w.data = w.data.clone()
    assert w.lowra_stamp != p and copy.deepcopy(w).lowra_stamp != w.lowra_stamp
    p = w.lowra_stamp
    w.quant_state = other.quant_state
    assert w.lowra_stamp != p


def test_bits_edited_in_place_are_kept_anew_at_the_next_eager_call():
    lin, other, x = _twins()
    with torch.no_grad():
        lin(x)
        kept = lin.__dict__["_kept_operands"]
        lin(x)
        assert lin.__dict__["_kept_operands"] is kept
        lin.quant_state.bits.copy_(other.quant_state.bits)  # same plan: the same values, a new version
        full(lin, x)
        assert lin.__dict__["_kept_operands"] is not kept


def test_copies_keep_no_operands_and_compile_on_their_own():
    torch._dynamo.reset()
    lin, other, x = _twins()
    with torch.no_grad():
        ref = lin(x)
        for twin in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
            assert "_kept_operands" not in twin.__dict__
            assert torch.equal(compiled(twin)(x), ref)
            twin(x)
            kept = twin.__dict__["_kept_operands"]
            assert kept[4].data_ptr() == twin.weight.data_ptr() != lin.weight.data_ptr()
            assert torch.equal(compiled(twin)(x), ref)


def test_float_storage_is_kept_as_a_view_and_the_absmax_cache_reads_the_state():
    torch._dynamo.reset()
    x = torch.randn(1, 128)
    base = layer(bias=False)
    with torch.no_grad():
        ref = base(x)
        stored = LinearLowRA.from_linear(torch.nn.Linear(128, 48, bias=False), base.quant_state.bits,
                                         quant_storage=torch.bfloat16)
        stored.weight = ParamsLowRA(base.weight.data.view(torch.bfloat16), quant_state=base.quant_state,
                                    quant_storage=torch.bfloat16, module=stored)
        stored.quant_state = base.quant_state
        assert torch.equal(stored(x), ref)
        assert stored.__dict__["_kept_operands"][4].data_ptr() == stored.weight.data_ptr()
        seen = []
        assert torch.equal(compiled(stored, seen)(x), ref) and not reads_state(seen[0])
        base.set_absmax_cache(True)
        torch._dynamo.reset()
        seen = []
        assert torch.equal(compiled(base, seen)(x), ref) and reads_state(seen[0])


def test_an_eager_call_sees_nested_scales_and_codes_moved_behind_the_stamps():
    """What no stamp records (a tensor of state2 replaced, codes moved by set_()) still reaches eager calls."""
    lin, other, x = _twins()
    with torch.no_grad():
        before = full(lin, x)
        lin.quant_state.state2.absmax = other.quant_state.state2.absmax.clone()
        after = full(lin, x)
        assert torch.equal(after, F.matmul_lowra(x, lin.weight.packed, lin.quant_state, lin.bias))
        assert not torch.equal(after, before)
        with torch._C.DisableTorchFunctionSubclass():
            torch.Tensor.set_(lin.weight, other.weight.data.clone())
        moved = full(lin, x)
        assert torch.equal(moved, F.matmul_lowra(x, lin.weight.packed, lin.quant_state, lin.bias))
        assert not torch.equal(moved, after)


def test_a_change_drops_the_operands_of_every_layer_that_kept_them():
    """A weight that does not know its module (a deep copy of a lone weight), and a state two layers share."""
    torch._dynamo.reset()
    lin, other, x = _twins()
    twin = copy.deepcopy(lin)
    with torch.no_grad():
        lin.weight = copy.deepcopy(lin.weight)
        assert lin.weight.module is None
        twin.weight.quant_state = lin.weight.quant_state
        before = full(lin, x)
        assert torch.equal(full(twin, x), before)
        calls = (compiled(lin), compiled(twin))
        assert all(torch.equal(call(x), before) for call in calls)
        lin.weight.data = other.weight.data.clone()
        assert "_kept_operands" not in lin.__dict__ and "_kept_operands" in twin.__dict__
        assert torch.equal(calls[0](x), full(lin, x)) and not torch.equal(full(lin, x), before)
        lin.weight.quant_state.absmax = other.quant_state.absmax.clone()  # the shared state
        assert "_kept_operands" not in lin.__dict__ and "_kept_operands" not in twin.__dict__
        assert torch.equal(calls[1](x), full(twin, x)) and not torch.equal(full(twin, x), before)


def _traced_twins():
    """_twins, and the first one's forward compiled and traced with its kept operands."""
    torch._dynamo.reset()
    lin, other, x = _twins()
    call = compiled(lin)
    with torch.no_grad():
        full(lin, x)
        call(x)
    return lin, other, x, call


def test_a_deleted_weight_is_not_computed_with():
    lin, other, x, call = _traced_twins()
    with torch.no_grad():
        del lin.weight
        assert "_kept_operands" not in lin.__dict__
        with pytest.raises(Exception, match="weight"):
            call(x)


def test_a_compiled_call_guards_the_metadata_key():
    """The buffer's metadata reaches a graph as constants behind one guard on its key (operands.buffered_meta): a
    different key traces again, here into the packed-size check."""
    lin, other, x, call = _traced_twins()
    with torch.no_grad():
        kept = lin.__dict__["_kept_operands"]
        meta = operands.buffered_meta(kept[5].key)
        assert other(x) is not None
        assert other.__dict__["_kept_operands"][5].key == kept[5].key  # one plan, one shape: interned once
        wrong = operands._intern_buffered_meta(meta._replace(packed_nbytes=meta.packed_nbytes + 1))
        lin.__dict__["_kept_operands"] = (*kept[:5], kept[5]._replace(key=wrong), *kept[6:])
        with pytest.raises(Exception, match="packed buffer has"):
            call(x)


def test_copies_and_pickles_of_a_state_or_weight_carry_no_keepers():
    lin, other, x = _twins()
    with torch.no_grad():
        lin(x)
    for source in (lin.quant_state, lin.weight):
        assert operands._KEEPERS in source.__dict__
        for twin in (copy.deepcopy(source), pickle.loads(pickle.dumps(source)), copy.copy(source)):
            assert operands._KEEPERS not in twin.__dict__


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("nested", [False, True])
def test_a_compiled_training_call_takes_the_kept_fields(device, nested):
    """With a gradient to track (the dense path through MatMulLowRA, no state at hand): forward and backward as
    eager, from the kept tuple."""
    torch._dynamo.reset()
    lin = layer(nested=nested, bias=True, device=device, bias_dtype=dtype_for(device))
    x = torch.randn(3, 128, dtype=dtype_for(device), device=device, requires_grad=True)
    ref = full(lin, x)  # keeps them
    ref.sum().backward()
    ref_grad, x.grad = x.grad, None
    seen = []

    def backend(gm, example_inputs):
        seen.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    out = torch.compile(lin, backend=backend, fullgraph=True)(x)
    out.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, ref_grad)
    assert not reads_state(seen[0]) and sum("kept_operands" in n for n in seen[0]) == (8 if nested else 5)


def test_functional_call_with_another_weight_reaches_a_compiled_layer():
    """torch.func.functional_call swaps the weight straight in `_parameters` and back: the compiled layer computes
    with the weight it was given, then with its own again."""
    torch._dynamo.reset()
    lin, other, x = _twins()
    with torch.no_grad():
        own = full(lin, x)
        given = F.matmul_lowra(x, other.weight.packed, other.weight.quant_state, lin.bias)  # its weight, lin's bias
        lin.compile(backend="eager", fullgraph=True)
        try:
            assert torch.equal(lin(x), own)  # traced with the kept operands
            assert torch.equal(torch.func.functional_call(lin, {"weight": other.weight}, (x,)), given)
            assert torch.equal(lin(x), own)
        finally:
            lin._compiled_call_impl = None


def test_the_counted_parameters_survive_copies_pickles_and_old_pickles():
    lin, other, x = _twins()
    with torch.no_grad():
        ref = lin(x)
    for twin in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert type(twin._parameters) is type(lin._parameters) and twin._parameters.keys() == lin._parameters.keys()
        assert torch.equal(twin(x), ref)
    old = lin.__getstate__()
    old["_parameters"] = dict(old["_parameters"])  # as pickled before the counted dict existed
    revived = LinearLowRA.__new__(LinearLowRA)
    revived.__setstate__(old)
    assert type(revived._parameters) is type(lin._parameters) and torch.equal(revived(x), ref)
    counted = type(lin._parameters)(a=1)  # every mutator counts, not only item assignment
    for mutate in (lambda d: d.__setitem__("b", 2), lambda d: d.update(c=3), lambda d: d.__ior__({"e": 5}),
                   lambda d: d.setdefault("f", 6), lambda d: d.pop("f"), lambda d: d.__delitem__("e"),
                   lambda d: d.popitem(), lambda d: d.clear()):
        before = counted.writes
        mutate(counted)
        assert counted.writes == before + 1
