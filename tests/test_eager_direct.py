"""The eager direct paths: matmul_lowra calls the fused matmul directly (QuantStateLowRA.prepared_matmul,
backends.native.PreparedMatmul on CUDA, PreparedMatmulCPU on the CPU) instead of through torch.ops.lowra.matmul, and
its dense path (training; inference beyond the fused kernels' rows) dequantizes through
QuantStateLowRA.prepared_dequantize instead of torch.ops.lowra.dequantize, where nothing can tell the difference.
Each must give exactly what the op gives, rebuild its launcher whenever the state changes, and step aside for every
mode that watches ops (torch.compile tracing, function/dispatch modes, functorch, the profiler).
CPU tests run in CI; `cuda` ones on the GPU check."""

import copy
import ctypes
import pickle

import pytest
import torch

import bitsandbytes_lowra  # noqa: F401  (registers the ops)
from bitsandbytes_lowra import functional as F
from bitsandbytes_lowra.functional import matmul_lowra, quantize_lowra

from .conftest import mixed_bits

cuda = pytest.mark.cuda


def state(rows=64, cols=256, seed=0, device="cpu", nested=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    return quantize_lowra(W.to(device), mixed_bits(rows, seed).to(device), compress_statistics=nested)


def take_tensors(qs, other) -> None:
    """qs now points at other's tensors, as a reload of the layer leaves it."""
    qs.absmax, qs.state2, qs.offset, qs.code = other.absmax, other.state2, other.offset, other.code
    qs.bits, qs.row_offsets, qs.thresholds = other.bits, other.row_offsets, other.thresholds
    qs.packed_nbytes = other.packed_nbytes


# ---------------------------------------------------------------------------------------------------------------
# CPU (CI)

@pytest.fixture
def native_cuda(monkeypatch):
    """_eager_direct as on a machine whose native library has CUDA and CPU kernels (this one may lack CUDA)."""
    monkeypatch.setattr(F, "_NATIVE_CUDA", True)
    monkeypatch.setattr(F, "_NATIVE_CPU", True)


def test_eager_direct_only_where_nothing_watches_ops(native_cuda):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, b = torch.randn(1, 8), torch.randn(4)
    assert F._eager_direct(x, None) and F._eager_direct(x, b)
    with Passthrough():
        assert not F._eager_direct(x, None)
    with torch.device("meta"):  # a TorchFunctionMode
        assert not F._eager_direct(x, None)
    with torch.profiler.profile():
        assert not F._eager_direct(x, None)
    with FakeTensorMode():
        assert not F._eager_direct(torch.empty(1, 8), None)
    assert not F._eager_direct(torch.empty(1, 8, device="meta"), None)  # no kernel of ours runs on meta tensors
    seen = torch.func.vmap(lambda a: torch.tensor(F._eager_direct(a, None)))(torch.randn(2, 8))
    assert not seen.any()
    traced = torch.compile(lambda a: a + int(F._eager_direct(a, None)), backend="eager", fullgraph=True)(x)
    assert torch.equal(traced, x)  # 0 added: tracing takes the op path
    assert F._eager_direct(x, torch.nn.Parameter(b))  # a module's bias: Parameter disables torch function

    class Sub(torch.Tensor):  # subclasses (DTensor, FakeTensor, ...) may watch ops: they keep the op
        pass

    assert not F._eager_direct(x.as_subclass(Sub), None)
    assert not F._eager_direct(x, b.as_subclass(Sub))


def test_eager_direct_needs_native_kernels_for_the_activations_device(monkeypatch):
    x = torch.randn(1, 8)
    monkeypatch.setattr(F, "_NATIVE_CPU", False)
    monkeypatch.setattr(F, "_NATIVE_CUDA", True)
    assert not F._eager_direct(x, None)  # CPU activations: the CPU library decides
    monkeypatch.setattr(F, "_NATIVE_CPU", True)
    monkeypatch.setattr(F, "_NATIVE_CUDA", False)
    assert F._eager_direct(x, None)


# The CPU decode path (PreparedMatmulCPU): the same contract as the CUDA one below, run in CI.

@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("rows,cols", [(64, 256), (33, 1000), (7, 72)])
def test_cpu_direct_equals_op(rows, cols, m, dtype, nested):
    from bitsandbytes_lowra.backends.native import PreparedMatmulCPU

    packed, qs = state(rows, cols, seed=rows + m, nested=nested)
    assert F._eager_direct(torch.empty(1), None)
    g = torch.Generator().manual_seed(m)
    A = torch.randn(1, m, cols, generator=g).to(dtype)
    bias = torch.randn(rows, generator=g).to(dtype)
    for b in (None, bias):
        with torch.inference_mode():
            y = matmul_lowra(A, packed, qs, b)
        assert isinstance(qs.__dict__["_prepared_matmul"][1], PreparedMatmulCPU)  # the direct path ran
        assert y.shape == (1, m, rows) and y.dtype == dtype
        assert torch.equal(y, via_op(A, packed, qs, b))
    At = torch.randn(cols, m, generator=g).to(dtype).t()  # strided activations, a bias of another dtype
    with torch.inference_mode():
        y = matmul_lowra(At, packed, qs, bias.double())
    assert torch.equal(y, via_op(At.contiguous(), packed, qs, bias))


def test_cpu_direct_rebuilds_when_the_state_changes():
    packed, qs = state(128, 512)
    A = torch.randn(1, 512)
    with torch.no_grad():
        y0 = matmul_lowra(A, packed, qs)
        first = qs.__dict__["_prepared_matmul"][1]
        assert torch.equal(matmul_lowra(A, packed, qs), y0) and qs.__dict__["_prepared_matmul"][1] is first
        packed2, qs2 = state(128, 512, seed=5)  # a reload: new tensors
        take_tensors(qs, qs2)
        y2 = matmul_lowra(A, packed2, qs)
        assert qs.__dict__["_prepared_matmul"][1] is not first
        assert torch.equal(y2, via_op(A, packed2, qs2))


def test_cpu_direct_steps_aside_under_the_profiler():
    packed, qs = state(64, 256)
    A = torch.randn(1, 256)
    with torch.no_grad():
        ref = via_op(A, packed, qs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = matmul_lowra(A, packed, qs)
    assert torch.equal(y, ref)
    assert any("lowra::matmul" in e.name for e in prof.events())


def test_cpu_prepared_matmul_checks_its_inputs():
    from bitsandbytes_lowra.backends.native import CPU_MAX_FUSED_ROWS

    packed, qs = state(64, 256)
    launch = qs.prepared_matmul(packed)
    A = torch.randn(1, 256)
    for bad, what in ((A.double(), "float activations"), (A[:, :128], "256"), (A.to("meta"), "on the CPU"),
                      (A.expand(CPU_MAX_FUSED_ROWS + 1, 256), f"at most {CPU_MAX_FUSED_ROWS} rows")):
        with pytest.raises(ValueError, match=what):
            launch(bad)
    for bad_bias in (torch.zeros(63), torch.zeros(64, dtype=torch.float64), torch.zeros(64, device="meta")):
        with pytest.raises(ValueError, match="bias"):
            launch(A, bad_bias)
    assert torch.equal(launch(A), via_op(A, packed, qs))
    assert launch(A[:0]).shape == (0, 64)  # no rows: nothing launched


def test_state_copies_and_pickles_drop_the_prepared_launcher():
    packed, qs = state()
    # what prepared_matmul stores: a key and an object holding ctypes pointers, which cannot be copied or pickled
    qs.__dict__["_prepared_matmul"] = ((1,), ctypes.pointer(ctypes.c_int(3)))
    for other in (copy.deepcopy(qs), pickle.loads(pickle.dumps(qs))):
        assert "_prepared_matmul" not in other.__dict__
        assert other == qs
    assert "_prepared_matmul" in qs.__dict__  # the original keeps its own
    qs.to("cpu")
    assert "_prepared_matmul" not in qs.__dict__  # a move drops it (it holds the moved-away tensors)


def test_prepared_matmul_refuses_a_cpu_weight():
    from bitsandbytes_lowra.backends.native import PreparedMatmul

    packed, qs = state()
    order, groups = qs.matmul_plan()
    with pytest.raises(ValueError, match="CUDA kernel"):
        PreparedMatmul(packed, qs.absmax, qs.bits, qs.code, qs.row_offsets, qs.blocksize, list(qs.shape), order,
                       groups, (qs.state2.absmax, qs.state2.code, qs.offset, qs.state2.blocksize))


def test_prepared_call_hands_activations_bias_and_output_to_the_launch(monkeypatch):
    """PreparedMatmul.__call__'s glue, without a GPU: what reaches the kernel launch (launch recorded, not run)."""
    from bitsandbytes_lowra.backends.native import PreparedMatmul

    prepared = object.__new__(PreparedMatmul)  # the fields __call__ reads; a CPU tensor's device index is -1
    prepared.rows, prepared.cols, prepared.index, prepared.device = 8, 16, -1, torch.device("cpu")
    seen = []
    monkeypatch.setattr(PreparedMatmul, "launch", lambda self, A, bias, out: seen.append((A, bias, out)))
    A, b = torch.randn(1, 2, 16, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    out = prepared(A, b)
    assert out.shape == (1, 2, 8) and out.dtype == torch.bfloat16
    assert seen[-1][0] is A and seen[-1][1] is b and seen[-1][2] is out
    assert prepared(A).shape == (1, 2, 8) and seen[-1][1] is None
    At, bt = torch.randn(16, 3, dtype=torch.float16).t(), torch.randn(16, dtype=torch.float16)[::2]
    prepared(At, bt)  # strided activations and bias reach the kernel contiguous, values unchanged
    assert seen[-1][0].is_contiguous() and torch.equal(seen[-1][0], At)
    assert seen[-1][1].is_contiguous() and torch.equal(seen[-1][1], bt)
    calls = len(seen)
    assert prepared(A[:, :0]).shape == (1, 0, 8) and len(seen) == calls  # no rows: nothing launched
    for bad in (A.float(), A[..., :8], torch.randn(17, 16, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="PreparedMatmul takes"):
            prepared(bad)
    with pytest.raises(ValueError, match="bias"):
        prepared(A, b.half())


# The dense path (training; inference beyond the fused kernels' rows): PreparedDequantize in place of the op, in the
# forward and in MatMulLowRA's backward alike.

def dense_step(A, packed, qs, bias=None, grad=True):
    """matmul_lowra's output and, with grad, the gradients of A and bias for a fixed upstream gradient."""
    A = A.detach().requires_grad_(grad)
    bias = None if bias is None else bias.detach().requires_grad_(grad)
    if not grad:
        with torch.no_grad():
            return matmul_lowra(A, packed, qs, bias), ()
    y = matmul_lowra(A, packed, qs, bias)
    g = torch.linspace(-1, 1, y.numel(), dtype=torch.float32, device=y.device).reshape(y.shape).to(y.dtype)
    return y, torch.autograd.grad(y, [A] + ([] if bias is None else [bias]), g)


def dense_direct_equals_op(monkeypatch, A, packed, qs, bias, grad):
    """The direct run (which must build the weight's PreparedDequantize) against the op path, bitwise."""
    from bitsandbytes_lowra.backends.native import PreparedDequantize

    qs.__dict__.pop("_prepared_dequantize", None)
    y, grads = dense_step(A, packed, qs, bias, grad)
    assert isinstance(qs.__dict__["_prepared_dequantize"][1], PreparedDequantize)  # the direct path ran
    with monkeypatch.context() as m:
        m.setattr(F, "_eager_direct", lambda A, bias: False)  # as under the profiler or a dispatch mode
        qs.__dict__.pop("_prepared_dequantize")
        y_ref, grads_ref = dense_step(A, packed, qs, bias, grad)
        assert "_prepared_dequantize" not in qs.__dict__  # the op path ran
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert len(grads) == len(grads_ref) and all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(64, 256), (33, 1000), (7, 72)])
def test_cpu_dense_direct_equals_op(monkeypatch, rows, cols, dtype, nested, grad):
    packed, qs = state(rows, cols, seed=rows, nested=nested)
    g = torch.Generator().manual_seed(cols)
    A = torch.randn(3, F.CPU_FUSED_DECODE_MAX_TOKENS, cols, generator=g).to(dtype)  # past the fused CPU decode
    bias = torch.randn(rows, generator=g).to(dtype)
    for b in (None, bias):
        dense_direct_equals_op(monkeypatch, A, packed, qs, b, grad)


def test_cpu_dense_direct_rebuilds_when_the_state_changes(monkeypatch):
    packed, qs = state(128, 512)
    A = torch.randn(40, 512)
    y0, (g0,) = dense_step(A, packed, qs)
    first = qs.__dict__["_prepared_dequantize"][1]
    y, (g,) = dense_step(A, packed, qs)
    assert torch.equal(y, y0) and torch.equal(g, g0) and qs.__dict__["_prepared_dequantize"][1] is first  # reused
    packed2, qs2 = state(128, 512, seed=5)  # a reload: new tensors
    take_tensors(qs, qs2)
    y2, _ = dense_step(A, packed2, qs)
    assert qs.__dict__["_prepared_dequantize"][1] is not first and not torch.equal(y2, y0)
    dense_direct_equals_op(monkeypatch, A, packed2, qs, None, True)


def test_cpu_dense_backward_steps_aside_under_a_dispatch_mode():
    """A forward run directly and a backward run where ops are watched: the backward dequantizes through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    packed, qs = state(64, 256)
    A = torch.randn(40, 256, requires_grad=True)
    y = matmul_lowra(A, packed, qs)
    assert "_prepared_dequantize" in qs.__dict__  # the forward ran directly
    seen = []
    with Record():
        y.sum().backward()
    assert torch.ops.lowra.dequantize.default in seen
    B = A.detach().requires_grad_()
    matmul_lowra(B, packed, qs).sum().backward()  # forward and backward direct
    assert torch.equal(A.grad, B.grad)


@pytest.mark.parametrize("nested", [True, False])
def test_cpu_dense_backward_follows_storage_moved_after_the_forward(nested):
    """FSDP2 frees a parameter's gathered storage after the forward and gathers it again for the backward, possibly
    at another address: the backward must read the weight where it is now, not where the forward's launcher points."""
    packed, qs = state(64, 256, nested=nested)
    A = torch.randn(40, 256)
    _, (want,) = dense_step(A, packed, qs)
    A1 = A.clone().requires_grad_()
    y = matmul_lowra(A1, packed, qs)
    old = packed.data
    packed.data = old.clone()  # re-gathered elsewhere; the old storage then holds something else
    old.zero_()
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    assert torch.equal(A1.grad, want)


@pytest.mark.parametrize("grad", [True, False])
def test_dense_path_on_meta_tensors_keeps_the_op(grad):
    """Shape inference on a model built on the meta device: the op's meta kernel answers, no native launch."""
    packed, qs = state(64, 256)
    qs.to("meta")
    A = torch.randn(40, 256, device="meta", requires_grad=grad)
    y = matmul_lowra(A, packed.to("meta"), qs)
    assert y.device.type == "meta" and y.shape == (40, 64) and "_prepared_dequantize" not in qs.__dict__
    if grad:
        y.sum().backward()
        assert A.grad.shape == A.shape and A.grad.device.type == "meta"


@pytest.mark.parametrize("tokens,grad", [(1, False), (1, True), (12, False), (12, True)])  # all four paths
def test_activations_on_another_device_than_the_weight_are_refused(tokens, grad):
    """As nn.Linear: F.linear itself would return a CPU tensor of garbage for CPU activations and a meta weight."""
    packed, qs = state(64, 256)
    qs.to("meta")
    A = torch.randn(tokens, 256, requires_grad=grad)
    with pytest.raises(ValueError, match="input is on cpu but the quantized weight is on meta"):
        matmul_lowra(A, packed.to("meta"), qs)
    packed, qs = state(64, 256)
    with pytest.raises(ValueError, match="input is on meta but the quantized weight is on cpu"):
        matmul_lowra(torch.empty(tokens, 256, device="meta", requires_grad=grad), packed, qs)


def test_prepared_dequantize_checks_its_inputs():
    from bitsandbytes_lowra.backends.native import PreparedDequantize

    packed, qs = state(64, 256, nested=False)
    args = (packed, qs.absmax, qs.bits, qs.code, qs.row_offsets, qs.blocksize)
    with pytest.raises(RuntimeError, match="absmax size does not match shape"):  # the op's own checks
        PreparedDequantize(*args, [64, 128])
    with pytest.raises(RuntimeError, match="bits"):
        PreparedDequantize(packed, qs.absmax, qs.bits[:-1], qs.code, qs.row_offsets, qs.blocksize, [64, 256])
    launch = PreparedDequantize(*args, [64, 256])
    with pytest.raises(ValueError, match="not torch.int32"):
        launch(torch.int32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        W = launch(dtype)
        assert W.dtype == dtype and W.shape == (64, 256)
        assert torch.equal(W, torch.ops.lowra.dequantize(*args, [64, 256], dtype))


# ---------------------------------------------------------------------------------------------------------------
# CUDA (GPU check)

def via_op(A, packed, qs, bias=None):
    """The op path, as matmul_lowra takes it when the direct one is not allowed."""
    absmax, *nested = qs.scale_args()
    order, groups = qs.matmul_plan()
    return torch.ops.lowra.matmul.default(A, packed, absmax, qs.bits, qs.code, qs.row_offsets, qs.blocksize,
                                          list(qs.shape), bias, order, groups, *nested)


@cuda
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("rows,cols", [(64, 256), (300, 4096), (33, 1000)])
def test_cuda_direct_equals_op(rows, cols, m, dtype, nested):
    packed, qs = state(rows, cols, seed=rows + m, device="cuda", nested=nested)
    assert F._eager_direct(torch.empty(1, device="cuda"), None)
    g = torch.Generator(device="cuda").manual_seed(m)
    A = torch.randn(1, m, cols, device="cuda", dtype=dtype, generator=g)
    bias = torch.randn(rows, device="cuda", dtype=dtype, generator=g)
    for b in (None, bias):
        with torch.inference_mode():
            y = matmul_lowra(A, packed, qs, b)
        assert "_prepared_matmul" in qs.__dict__  # the direct path ran
        assert y.shape == (1, m, rows) and y.dtype == dtype
        assert torch.equal(y, via_op(A, packed, qs, b))
    # non-contiguous activations and a bias of another dtype (converted by matmul_lowra) on the same launcher
    At = torch.randn(cols, m, device="cuda", dtype=dtype, generator=g).t()
    with torch.inference_mode():
        y = matmul_lowra(At, packed, qs, bias.float())
    assert torch.equal(y, via_op(At.contiguous(), packed, qs, bias))


@cuda
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(64, 256), (300, 4096), (33, 1000)])
def test_cuda_dense_direct_equals_op(monkeypatch, rows, cols, dtype, nested):
    """Training (forward and backward) and dense inference (more tokens than the fused kernels take) through
    PreparedDequantize, against the op path."""
    packed, qs = state(rows, cols, seed=rows, device="cuda", nested=nested)
    g = torch.Generator(device="cuda").manual_seed(cols)
    A = torch.randn(2, F.FUSED_DECODE_MAX_TOKENS + 1, cols, device="cuda", dtype=dtype, generator=g)
    bias = torch.randn(rows, device="cuda", dtype=dtype, generator=g)
    for b in (None, bias):
        for grad in (True, False):
            dense_direct_equals_op(monkeypatch, A, packed, qs, b, grad)


@cuda
def test_cuda_dense_direct_steps_aside_under_the_profiler_and_is_capturable():
    packed, qs = state(256, 1024, device="cuda")
    A = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        matmul_lowra(A, packed, qs).sum().backward()
    assert sum("lowra::dequantize" in e.name for e in prof.events()) >= 2  # forward and backward, by name
    # a training step on the direct path, captured and replayed on new activations, equals the eager step
    from bitsandbytes_lowra.bench.decode import graphed

    static = A.detach().clone().requires_grad_()

    def grad_of():  # a loss whose gradient depends on the activations
        return torch.autograd.grad(matmul_lowra(static, packed, qs).float().pow(2).sum(), static)[0]

    out = torch.empty_like(static)
    replay = graphed(lambda: out.copy_(grad_of()), warmup=1)
    with torch.no_grad():
        static.copy_(torch.randn_like(static))
    replay()
    torch.cuda.synchronize()
    assert torch.equal(out, grad_of())


@cuda
@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("rows,cols", [(4096, 4096), (4096, 11008)])
def test_cuda_compiled_equals_eager_on_large_layers(rows, cols, m):
    """Inductor-compiled decode (the op path, inside a generated graph) against eager (the direct launcher) on layers
    of 2^24 weights or more, where the batch-1 GEMV takes its wide steps and K splits: the same kernels on the same
    inputs, so bitwise equal. The tiny decode models of test_decode never reach these paths."""
    packed, qs = state(rows, cols, seed=m, device="cuda", nested=True)
    g = torch.Generator(device="cuda").manual_seed(rows + m)
    A = torch.randn(1, m, cols, device="cuda", dtype=torch.bfloat16, generator=g)
    bias = torch.randn(rows, device="cuda", dtype=torch.bfloat16, generator=g)
    with torch.inference_mode():
        want = matmul_lowra(A, packed, qs, bias)
        try:
            got = torch.compile(lambda a: matmul_lowra(a, packed, qs, bias), fullgraph=True)(A)
        finally:
            torch._dynamo.reset()
    assert torch.equal(got, want)


@cuda
def test_cuda_direct_rebuilds_when_the_state_changes():
    packed, qs = state(128, 512, device="cuda")
    A = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    y0 = matmul_lowra(A, packed, qs)
    first = qs.__dict__["_prepared_matmul"][1]
    assert torch.equal(matmul_lowra(A, packed, qs), y0) and qs.__dict__["_prepared_matmul"][1] is first  # reused
    # new codes in a new buffer (a reload): served from the new buffer
    packed2, qs2 = state(128, 512, seed=5, device="cuda")
    take_tensors(qs, qs2)
    y2 = matmul_lowra(A, packed2, qs)
    assert qs.__dict__["_prepared_matmul"][1] is not first
    assert torch.equal(y2, via_op(A, packed2, qs2))
    # bits edited in place (same buffer): the row plan and the launcher follow
    packed3, qs3 = state(128, 512, seed=6, device="cuda")
    before = qs.__dict__["_prepared_matmul"][1]
    qs.bits.copy_(qs3.bits), qs.row_offsets.copy_(qs3.row_offsets), qs.code.copy_(qs3.code)
    qs.absmax.copy_(qs3.absmax), qs.state2.absmax.copy_(qs3.state2.absmax), qs.offset.copy_(qs3.offset)
    qs.packed_nbytes = qs3.packed_nbytes
    y3 = matmul_lowra(A, packed3, qs)
    assert qs.__dict__["_prepared_matmul"][1] is not before
    assert torch.equal(y3, via_op(A, packed3, qs3))
    # a round trip through the CPU drops the launcher and rebuilds it on return
    qs3.to("cpu")
    qs3.to("cuda")
    assert torch.equal(matmul_lowra(A, packed3, qs3), y3)


@cuda
def test_cuda_direct_step_aside_under_profiler_and_graph_capture():
    packed, qs = state(256, 1024, device="cuda")
    A = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    ref = via_op(A, packed, qs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = matmul_lowra(A, packed, qs)
    assert torch.equal(y, ref)
    assert any("lowra::matmul" in e.name for e in prof.events())  # the profiler sees the op by name
    # the direct launch is capturable (no host sync): replay equals the eager result
    out = matmul_lowra(A, packed, qs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = matmul_lowra(A, packed, qs)
    A.copy_(torch.randn_like(A))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, via_op(A, packed, qs))


@cuda
def test_cuda_prepared_matmul_checks_its_inputs():
    packed, qs = state(64, 256, device="cuda")
    launch = qs.prepared_matmul(packed)
    A = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    for bad, what in ((A.float(), "float16/bfloat16"), (A[:, :128], "256"), (A.cpu(), "on cuda"),
                      (A.expand(17, 256), "at most 16 rows")):
        with pytest.raises(ValueError, match=what):
            launch(bad)
    with pytest.raises(ValueError, match="bias"):
        launch(A, torch.zeros(63, device="cuda", dtype=torch.bfloat16))
    assert torch.equal(launch(A), via_op(A, packed, qs))
    assert launch(A[:0]).shape == (0, 64)  # no rows: nothing launched


@cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("rows,cols", [(300, 4096), (9, 28672)])  # the second splits K through a workspace
def test_cuda_direct_launch_on_a_device_that_is_not_current(rows, cols):
    """A layer on cuda:1 called while cuda:0 is current: the launcher switches device for the launch only (its
    workspace and stream are cuda:1's), gives the op's result bit for bit, and leaves cuda:0 current."""
    torch.cuda.set_device(0)
    packed, qs = state(rows, cols, seed=3, device="cuda:1")
    A = torch.randn(1, cols, device="cuda:1", dtype=torch.bfloat16)
    bias = torch.randn(rows, device="cuda:1", dtype=torch.bfloat16)
    with torch.inference_mode():
        y = matmul_lowra(A, packed, qs, bias)
    assert "_prepared_matmul" in qs.__dict__ and torch.cuda.current_device() == 0
    assert y.device == torch.device("cuda:1")
    with torch.cuda.device(1):
        ref = via_op(A, packed, qs, bias)
    assert torch.equal(y, ref)
    # and against the CPU: the same state's dense product
    cpu = matmul_lowra(A.cpu().float(), packed.cpu(), qs.to("cpu"), bias.cpu().float())
    assert torch.allclose(y.cpu().float(), cpu, rtol=2e-2, atol=2e-2)
