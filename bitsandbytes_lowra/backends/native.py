"""Kernels of the native library (csrc/) registered for "cpu" and, when the library has CUDA, "cuda".

Host-side metadata (bits, offsets) is read by the CPU entry points to validate; the CUDA entry points take device
pointers and bound-check inside the kernels (rows that do not fit are skipped and counted, never followed: see
skipped_rows). The CUDA paths never synchronize the host, so they can be captured in CUDA graphs. Both are fed
contiguous tensors of the documented dtypes.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch

from .. import _native, _ops
from .._ops import (
    check_dequantize_args,
    check_matmul_args,
    check_out,
    check_quantize_args,
    check_quantize_layout,
    check_quantize_out,
    matmul_plan,
    operand_layout,
)
from ..format import (
    CODEBOOK_SLOTS,
    FLOAT_DTYPES,
    MAX_COLS,
    blocks_per_row,
    blocksize_ok,
    nested_blocksize_ok,
    padded_cols,
)

# The fused matmul streams the packed weight once per call; above this many activation rows, dequantizing once and
# using the dense GEMM is faster (training, prefill).
MAX_FUSED_ROWS = 16
# The CPU matmul (csrc/cpu_kernels.cpp matmul_cpu; one-pass decode + dot up to 8 rows) against dequantize + GEMM, 2
# threads, 1.75 bits, 8 rows (ms): 1536x576 0.20 / 0.32, 4096x4096 2.3 / 23 (the GEMM path pays the new weight's
# page faults). With the buffered path at 16 rows the GEMM won on 576x1536 (0.83 / 0.55). docs/benchmarks.md "CPU
# decode".
CPU_MAX_FUSED_ROWS = 8


# The current stream's raw handle without building a torch.cuda.Stream object per launch (CUDA builds of torch).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(index: int) -> int:
    """The raw handle of device `index`'s current stream."""
    return _raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream


def _stream_args(device: torch.device) -> list:
    if device.type != "cuda":
        return []
    return [_stream(device.index if device.index is not None else torch.cuda.current_device())]


def _entry(name: str, device: torch.device):
    return getattr(_native.load(), f"lowra_{name}_{device.type}")


def _fn(name: str, argtypes: list, restype):
    """An entry point added after the loader's declarations (declared here on first use)."""
    fn = getattr(_native.load(), name)
    if fn.argtypes is None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


def skipped_rows() -> int:
    """Rows the CUDA kernels skipped because their metadata did not fit, since the last call (synchronizes)."""
    if not _native.has_cuda():
        return 0
    n = _fn("lowra_cuda_take_skipped_rows", [], _native.ctypes.c_int64)()
    if n < 0:
        _native.check(4, "reading the skipped-row count")
    return int(n)


CPU_ISAS = ("scalar", "avx2", "avx512")  # levels of the CPU dequantize, lowest first (csrc/cpu_simd.h)


def set_cpu_isa(isa: str | None = None) -> str:
    """Caps the instruction set of the CPU dequantize ("scalar", "avx2" or "avx512"; None: the CPU's best, the
    default) and returns the level now in use, which is never above what the CPU has. Results are identical at every
    level; this is for tests and benchmarks. Process-wide."""
    if isa is not None and isa not in CPU_ISAS:
        raise ValueError(f"isa must be one of {CPU_ISAS} or None, got {isa!r}")
    i32 = _native.ctypes.c_int
    level = _fn("lowra_cpu_set_isa", [i32], i32)(-1 if isa is None else CPU_ISAS.index(isa))
    return CPU_ISAS[level]


def cpu_isa() -> str:
    """The instruction set the CPU dequantize uses now."""
    return CPU_ISAS[_fn("lowra_cpu_isa", [], _native.ctypes.c_int)()]


def set_matmul_tuning(ksplit: int = 0, ctas_per_sm: int = 0, depth: int = 0, gemv_max_rows: int = 0,
                      gemv_rows_per_warp: int = 0, gemv_wk: int = 0, nested_prepass: int = 0,
                      gemv_batch1: int = 0, gemv_wide: int = 0) -> None:
    """Benchmark knobs of the fused CUDA matmul (0 = automatic). Tensor-core path (3+ activation rows): K splits,
    resident CTAs per SM, prefetch depth 2/3. GEMV path: the most activation rows it takes (automatic: 4 on layers
    of at most 2^24 weights, else 2 where their activations fit two K splits, else 1; at most 4; -1 sends every m to
    the tensor-core path), rows per warp (4 or 8),
    warps along K (1, 2, 4, 8); nested_prepass=1: double-quantized scales decoded in a pass of their own before the
    GEMV instead of inside it;
    gemv_batch1: the batch-1 kernel (one activation row, subset-sum tables): 0 automatic, -1 off (the multi-row
    GEMV serves m = 1), 2 or 4 rows per warp task; gemv_wide: its wide steps (float16 pair sums for 2-bit rows),
    0 automatic (large layers with 1- or 2-bit rows), 1 wherever it runs, -1 never.
    Process-wide; called without arguments it restores the automatic choice."""
    if _native.has_cuda():
        i32 = _native.ctypes.c_int
        _fn("lowra_matmul_cuda_set_tuning", [i32, i32, i32, i32], None)(ksplit, ctas_per_sm, depth, nested_prepass)
        _fn("lowra_matmul_cuda_set_gemv_tuning", [i32] * 5, None)(gemv_max_rows, gemv_rows_per_warp, gemv_wk,
                                                                   gemv_batch1, gemv_wide)
        _workspace_bytes.cache_clear()  # the knobs change the plans


def set_quantize_tuning(task_bytes: int = 0, run: int = 0) -> None:
    """Knobs of the fast CUDA quantize: bytes of weights per lane and warp task, 64 or 128 (0 = automatic: 128 for
    large layers of one precision, else 64); tasks per warp run (0 = automatic, -1 = an even split over a resident
    grid, n > 0 = runs of n tasks on as many CTAs as that takes). Every setting encodes any mix of precisions,
    bit-identically; the knobs are for benchmarks and tests. Process-wide; called without arguments it restores the
    automatic choices."""
    if task_bytes not in (0, 64, 128):
        raise ValueError(f"task_bytes must be 0 (automatic), 64 or 128, got {task_bytes!r}")
    if not isinstance(run, int) or run < -1:
        raise ValueError(f"run must be 0 (automatic), -1 (even split) or a positive task count, got {run!r}")
    if _native.has_cuda():
        i32 = _native.ctypes.c_int
        _fn("lowra_quantize_cuda_set_tuning", [i32, i32], None)(task_bytes, min(run, 2**31 - 1))


def set_dequantize_tuning(run: int = 0, pdl: int = 0) -> None:
    """Knobs of the streamed CUDA dequantize (16-bit outputs, float32 or double-quantized scales). run: tasks per warp,
    0 = automatic (one, on as many CTAs as that takes, which the block scheduler hands to SMs as they free up), -1 = an
    even split over a resident grid, n > 0 = n tasks per warp. pdl: 0 = automatic (a programmatic dependent of the
    stream's previous kernel where the grid is more than one resident wave: only its launch overlaps that kernel's
    tail), 1 = always, -1 = never. Every setting writes the same output; the knobs are for benchmarks and tests.
    Process-wide; called without arguments it restores the automatic choices."""
    if not isinstance(run, int) or run < -1:
        raise ValueError(f"run must be 0 (automatic), -1 (resident grid) or a positive task count, got {run!r}")
    if pdl not in (-1, 0, 1):
        raise ValueError(f"pdl must be 0 (automatic), 1 (always) or -1 (never), got {pdl!r}")
    if _native.has_cuda():
        i32 = _native.ctypes.c_int
        _fn("lowra_dequantize_cuda_set_tuning", [i32, i32], None)(min(run, 2**31 - 1), pdl)


def _quantize_into(A, bits, thresholds, row_offsets, blocksize, packed, absmax):
    rows, cols = A.shape
    if rows == 0 or cols == 0:  # an empty weight: no codes, no scales (the C entry points take 1 row and column up)
        return
    with _on(A.device):
        status = _entry("quantize", A.device)(
            _native.ptr(A), _native.DTYPE_CODE[A.dtype], rows, cols, blocksize, _native.ptr(bits),
            _native.ptr(thresholds), _native.ptr(row_offsets), _native.ptr(packed), packed.numel(),
            _native.ptr(absmax), *_stream_args(A.device),
        )
    _native.check(status, "lowra quantize")


def quantize(A, bits, thresholds, row_offsets, blocksize):
    check_quantize_args(A, bits, thresholds, row_offsets, blocksize)
    check_quantize_layout(A, bits, row_offsets, blocksize)  # host syncs, as for the size (quantize.out has none)
    A, bits, thresholds, row_offsets = (t.contiguous() for t in (A, bits, thresholds, row_offsets))
    rows, cols = A.shape
    nbytes = int(row_offsets[-1])
    packed = torch.empty(nbytes, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(rows, padded_cols(cols, blocksize) // blocksize, dtype=torch.float32, device=A.device)
    _quantize_into(A, bits, thresholds, row_offsets, blocksize, packed, absmax)
    return packed, absmax


def quantize_out(A, bits, thresholds, row_offsets, blocksize, *, packed, absmax):
    check_quantize_args(A, bits, thresholds, row_offsets, blocksize)
    check_quantize_out(A, blocksize, packed, absmax)
    A, bits, thresholds, row_offsets = (t.contiguous() for t in (A, bits, thresholds, row_offsets))
    _quantize_into(A, bits, thresholds, row_offsets, blocksize, packed, absmax)


# Eager kernels get real tensors, so their argument checks can be one plain Python expression; the torch._check form
# in _ops (needed by the fake kernels for symbolic shapes) costs ~2 us per condition, paid by every layer of every
# decoded token. The plain form only decides; when it fails, the _ops checks run and raise their specific message.
NESTED_DEFAULTS = (None, None, None, 256)  # nested_absmax, nested_code, nested_offset, nested_blocksize


def _absmax_ok(packed, absmax, nested) -> bool:
    nested_absmax, code, offset, nbs = nested
    if nested_absmax is None:
        return absmax.dtype == torch.float32 and code is None and offset is None
    dev = packed.device
    return (
        absmax.dtype == torch.uint8 and code is not None and offset is not None and nested_blocksize_ok(nbs)
        and nested_absmax.dtype == code.dtype == offset.dtype == torch.float32
        and nested_absmax.numel() == -(-absmax.numel() // nbs) and code.numel() == 256 and offset.numel() == 1
        and nested_absmax.device == code.device == offset.device == dev
    )


def _dequantize_args_ok(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested) -> bool:
    if len(shape) != 2:
        return False
    rows, cols = shape
    dev = packed.device
    return (
        blocksize_ok(blocksize)  # first: blocks_per_row divides by it
        and cols <= MAX_COLS
        and packed.dtype == torch.uint8
        and absmax.device == bits.device == codebook.device == row_offsets.device == dev
        and _absmax_ok(packed, absmax, nested)
        and absmax.numel() == rows * blocks_per_row(cols, blocksize)
        and bits.dtype == torch.uint8 and bits.shape == (rows,)
        and codebook.dtype == torch.float16 and codebook.shape == (rows, CODEBOOK_SLOTS)
        and row_offsets.dtype == torch.int64 and row_offsets.shape == (rows + 1,)
        and dtype in FLOAT_DTYPES
    )


def _out_ok(out, shape, dtype, device) -> bool:
    return tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.device == device and out.is_contiguous()


def _matmul_args_ok(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order,
                    group_rows, nested) -> bool:
    if len(shape) != 2 or A.dim() < 1 or A.dtype not in FLOAT_DTYPES or A.shape[-1] != shape[1]:
        return False
    if packed.device != A.device or any(t is not None and t.device != A.device for t in (bias, row_order)):
        return False
    if not _dequantize_args_ok(packed, absmax, bits, codebook, row_offsets, blocksize, shape, A.dtype, nested):
        return False
    rows = shape[0]
    if bias is not None and (bias.dtype != A.dtype or bias.shape != (rows,)):
        return False
    if (row_order is None) != (group_rows is None):
        return False
    return row_order is None or (
        row_order.dtype == torch.int32 and row_order.shape == (rows,)
        and len(group_rows) == 3 and all(g >= 0 for g in group_rows) and sum(group_rows) == rows
    )


def _absmax_for(absmax, nested):
    """(float32 absmax or None, NestedAbsmax or None) as the C entry points take them: the kernels (CPU and CUDA)
    decode double-quantized scales where they read them."""
    if nested[0] is None:
        return absmax.contiguous(), None
    q, n, code, offset = (t.contiguous() for t in (absmax, *nested[:3]))
    keep = (q, n, code, offset)  # the struct holds raw pointers: keep the tensors alive with it
    return None, (_native.NestedAbsmax(q.data_ptr(), n.data_ptr(), code.data_ptr(), offset.data_ptr(), nested[3]),
                  keep)


def _f32_ptr(absmax):
    return None if absmax is None else _native.ptr(absmax)


def _nested_ref(nested_struct):
    return None if nested_struct is None else _native.ctypes.byref(nested_struct[0])


def dequantize_into(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, out, nested=NESTED_DEFAULTS):
    if not (_dequantize_args_ok(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested)
            and _out_ok(out, shape, dtype, packed.device)):
        check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, *nested)
        check_out(out, shape, dtype, packed.device)
    if out.numel() == 0:  # an empty weight (the C entry points take 1 row and column up)
        return out
    PreparedDequantize(packed, absmax, bits, codebook, row_offsets, blocksize, shape, nested, checked=True).launch(out)
    return out


def _run(fn, args: tuple, index: int, what: str) -> None:
    """The prepared launchers' call: fn(*args) with CUDA device `index` current for it (-1: a CPU kernel), then the
    library's status turned into its error."""
    if index < 0 or torch._C._cuda_getDevice() == index:
        status = fn(*args)
    else:
        with torch.cuda.device(index):
            status = fn(*args)
    if status:
        _native.check(status, what)


def _addresses(*tensors) -> tuple:
    return tuple(0 if t is None else t.data_ptr() for t in tensors)


class PreparedDequantize:
    """The dequantize of one quantized weight (CUDA or CPU) with its launch arguments checked and converted once.

    LoRA training dequantizes every frozen weight twice per step (the forward, and the backward for the input's
    gradient), and at 512 tokens the host sets the pace of a training step. Through torch.ops.lowra.dequantize a
    call paid the dispatcher and the argument checks and conversions: 37 us on the development machine's CPU for an
    8x64 weight, against 8 through the state's cached launcher (the kernel itself ~4). It holds the weight's tensors
    (its pointers stay valid); its owner rebuilds it when any of them changes (QuantStateLowRA.prepared_dequantize).
    dequantize_into launches through one as well."""

    def __init__(self, packed, absmax, bits, codebook, row_offsets, blocksize, shape, nested=NESTED_DEFAULTS, *,
                 checked: bool = False):
        rows, cols = shape
        if not checked:
            check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, torch.float32,
                                  *nested)
        self._sources = _addresses(packed, absmax, bits, codebook, row_offsets, *nested[:3])
        packed, bits, codebook, row_offsets = (t.contiguous() for t in (packed, bits, codebook, row_offsets))
        f32, ns = _absmax_for(absmax, nested)
        self.device, self.index, self.shape = packed.device, packed.get_device(), (rows, cols)
        self._keep = (packed, bits, codebook, row_offsets, f32, ns)  # the pointers below point into these
        # the arguments from `packed` through `blocksize`, shared by lowra_dequantize_cpu and lowra_dequantize_cuda
        self._args = (packed.data_ptr(), packed.numel(), _f32_ptr(f32), _nested_ref(ns), bits.data_ptr(),
                      codebook.data_ptr(), row_offsets.data_ptr(), rows, cols, blocksize)
        lib = _native.load()
        self._fn = lib.lowra_dequantize_cuda if packed.device.type == "cuda" else lib.lowra_dequantize_cpu

    def reads(self, packed, absmax, bits, codebook, row_offsets, nested_absmax=None, nested_code=None,
              nested_offset=None) -> bool:
        """Whether it was built on these tensors as they are stored now. FSDP2 frees a parameter's gathered storage
        after the forward and gathers it again for the backward, possibly elsewhere, so MatMulLowRA checks the
        forward's launcher against its saved tensors before its backward calls it."""
        return self._sources == _addresses(packed, absmax, bits, codebook, row_offsets, nested_absmax, nested_code,
                                           nested_offset)

    def __call__(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [rows, cols] in `dtype` (a float dtype), on the weight's device."""
        if dtype not in _native.DTYPE_CODE:
            raise ValueError(f"PreparedDequantize writes float16, bfloat16 or float32, not {dtype}")
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        self.launch(out)
        return out

    def launch(self, out: torch.Tensor) -> None:
        """The kernel into a checked, contiguous `out` [rows, cols] of a float dtype on the weight's device."""
        dev = self.index
        args = (*self._args, _native.DTYPE_CODE[out.dtype], out.data_ptr()) + (() if dev < 0 else (_stream(dev),))
        _run(self._fn, args, dev, "lowra dequantize")


def dequantize(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax=None,
               nested_code=None, nested_offset=None, nested_blocksize=256):
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    return dequantize_into(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, out,
                           (nested_absmax, nested_code, nested_offset, nested_blocksize))


def dequantize_out(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax=None,
                   nested_code=None, nested_offset=None, nested_blocksize=256, *, out):
    dequantize_into(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, out,
                    (nested_absmax, nested_code, nested_offset, nested_blocksize))


@lru_cache(maxsize=1024)
def _workspace_bytes(dtype: int, m: int, rows: int, cols: int, blocksize: int, groups: tuple, nested: bool,
                     device: int) -> int:
    """Scratch bytes lowra_matmul_cuda needs for this call shape (the plan depends on the shape, the device and the
    tuning knobs, which clear this cache): asked of the library once per shape instead of on every call."""
    with torch.cuda.device(device):
        n = _native.load().lowra_matmul_cuda_workspace_size(
            dtype, m, rows, cols, blocksize, (_native.ctypes.c_int64 * 3)(*groups), int(nested))
    return max(int(n), 0)


def _matmul_cuda(A2, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows, out2,
                 nested):
    if row_order is None:
        row_order, group_rows = matmul_plan(bits)
    PreparedMatmul(packed, absmax, bits, codebook, row_offsets, blocksize, shape, row_order, group_rows, nested,
                   checked=True).launch(A2, bias, out2)


_HALF_CODES = {torch.float16: _native.DTYPE_CODE[torch.float16], torch.bfloat16: _native.DTYPE_CODE[torch.bfloat16]}


class _Prepared:
    """What both prepared matmuls share: __call__ checks the activations and bias in one expression (it runs once per
    layer per decoded token), allocates the output and hands contiguous tensors to the subclass's launch(A, bias,
    out). A subclass sets rows, cols, device and index (the device index: -1 on the CPU, as Tensor.get_device gives)."""

    _DTYPES: dict  # activation dtypes the kernel takes
    _MAX_ROWS: int
    _KIND: str  # those dtypes, in the error message

    def __call__(self, A: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A [..., cols] (at most _MAX_ROWS rows, on the weight's device) @ W.T + bias."""
        rows, cols, index = self.rows, self.cols, self.index
        cpu = index < 0  # and a tensor on the CPU: a meta tensor's index is -1 too
        if (A.dtype not in self._DTYPES or A.shape[-1] != cols or A.numel() > self._MAX_ROWS * cols
                or A.get_device() != index or A.is_cpu != cpu
                or (bias is not None and (bias.dtype != A.dtype or bias.shape != (rows,)
                                          or bias.get_device() != index or bias.is_cpu != cpu))):
            raise ValueError(
                f"{type(self).__name__} takes {self._KIND} activations [..., {cols}] of at most {self._MAX_ROWS} "
                f"rows on {'the CPU' if cpu else self.device} and a bias [{rows}] of their dtype; got A "
                f"{A.dtype} {tuple(A.shape)} on {A.device}"
                + ("" if bias is None else f", bias {bias.dtype} {tuple(bias.shape)} on {bias.device}"))
        out = torch.empty(A.shape[:-1] + (rows,), dtype=A.dtype, device=self.device)
        if out.numel():
            self.launch(A if A.is_contiguous() else A.contiguous(),
                        bias if bias is None or bias.is_contiguous() else bias.contiguous(), out)
        return out

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes this launcher reads (as QuantStateLowRA.prepared_matmul got them)."""
        return self._keep[0]


class PreparedMatmul(_Prepared):
    """The fused CUDA matmul of one quantized weight with the weight's launch arguments checked and converted once.

    Eager decoding calls the matmul once per layer per token, and rebuilding the same ~20 ctypes arguments and
    re-checking the same tensors every time cost more host time than the kernel takes (docs/benchmarks.md, "Host
    path"). It holds the weight's tensors (its pointers stay valid); its owner rebuilds it when any of them changes
    (QuantStateLowRA.prepared_matmul). The op kernel (`lowra::matmul` on CUDA) launches through one as well."""

    _DTYPES, _MAX_ROWS, _KIND = _HALF_CODES, MAX_FUSED_ROWS, "float16/bfloat16"

    def __init__(self, packed, absmax, bits, codebook, row_offsets, blocksize, shape, row_order, group_rows,
                 nested=NESTED_DEFAULTS, *, checked: bool = False):
        rows, cols = shape
        if packed.device.type != "cuda":
            raise ValueError(f"PreparedMatmul runs the CUDA kernel; the weight is on {packed.device}")
        if not checked:
            check_matmul_args(packed.new_empty((1, cols), dtype=torch.float16), packed, absmax, bits, codebook,
                              row_offsets, blocksize, shape, None, row_order, group_rows, *nested)
        packed, bits, codebook, row_offsets, row_order = (
            t.contiguous() for t in (packed, bits, codebook, row_offsets, row_order))
        f32, ns = _absmax_for(absmax, nested)
        self.device, self.index = packed.device, packed.get_device()
        self.rows, self.cols, self.blocksize = rows, cols, blocksize
        self.groups, self.nested = tuple(int(g) for g in group_rows), ns is not None
        self._keep = (packed, bits, codebook, row_offsets, row_order, f32, ns)  # the pointers below point into these
        # lowra_matmul_cuda's arguments from `packed` through `group_rows`
        self._args = (packed.data_ptr(), packed.numel(), _f32_ptr(f32), _nested_ref(ns), bits.data_ptr(),
                      codebook.data_ptr(), row_offsets.data_ptr(), rows, cols, blocksize, row_order.data_ptr(),
                      (_native.ctypes.c_int64 * 3)(*self.groups))
        self._fn = _native.load().lowra_matmul_cuda

    def launch(self, A, bias, out) -> None:
        """The kernel on checked, contiguous A [..., cols], bias [rows] or None, out [..., rows]."""
        dt = _HALF_CODES[A.dtype]
        m = A.numel() // self.cols
        ws_bytes = _workspace_bytes(dt, m, self.rows, self.cols, self.blocksize, self.groups, self.nested, self.index)
        ws = torch.empty(-(-ws_bytes // 4), dtype=torch.float32, device=self.device) if ws_bytes else None
        dev = self.index
        args = (A.data_ptr(), dt, m, *self._args, None if bias is None else bias.data_ptr(), out.data_ptr(),
                None if ws is None else ws.data_ptr(), ws_bytes, _stream(dev))
        _run(self._fn, args, dev, "lowra matmul")


def matmul_into(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows, out,
                nested=NESTED_DEFAULTS):
    if not (_matmul_args_ok(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order,
                            group_rows, nested)
            and _out_ok(out, (*A.shape[:-1], shape[0]), A.dtype, A.device)):
        check_matmul_args(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order,
                          group_rows, *nested)
        check_out(out, (*A.shape[:-1], shape[0]), A.dtype, A.device)
    rows, cols = shape
    m = math.prod(A.shape[:-1])
    A2 = A.reshape(m, cols).contiguous()
    packed, bits, codebook, row_offsets = (t.contiguous() for t in (packed, bits, codebook, row_offsets))
    bias = None if bias is None else bias.contiguous()
    out2 = out.view(m, rows)
    if m == 0 or rows == 0:
        return out
    if cols == 0:  # an empty weight: sums over no columns (the C entry points take 1 row and column up)
        if bias is None:
            out2.zero_()
        else:
            out2.copy_(bias.expand(m, rows))
        return out
    if A.device.type == "cpu" and A2.shape[0] <= CPU_MAX_FUSED_ROWS:
        _matmul_cpu(A2, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, out2, nested)
        return out
    fused = A.device.type == "cuda" and A.dtype != torch.float32 and A2.shape[0] <= MAX_FUSED_ROWS
    if not fused:
        # Dense path: dequantize once into the GEMM's dtype (float32 on the CPU, A's dtype on the GPU).
        wdtype = torch.float32 if A.device.type == "cpu" else A.dtype
        W = dequantize(packed, absmax, bits, codebook, row_offsets, blocksize, shape, wdtype, *nested)
        y = torch.nn.functional.linear(A2.to(wdtype), W, None if bias is None else bias.to(wdtype))
        out2.copy_(y)
        return out
    _matmul_cuda(A2, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows, out2,
                 nested)
    return out


def _matmul_cpu(A2, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, out2, nested):
    """The CPU matmul (lowra_matmul_cpu) on checked, contiguous arguments; out2 [m, rows] contiguous."""
    PreparedMatmulCPU(packed, absmax, bits, codebook, row_offsets, blocksize, shape, nested, checked=True).launch(
        A2, bias, out2)


class PreparedMatmulCPU(_Prepared):
    """PreparedMatmul's counterpart on the CPU (lowra_matmul_cpu, at most CPU_MAX_FUSED_ROWS activation rows of any
    float dtype): a decode step's per-layer call without the dispatcher and the per-call argument conversion."""

    _DTYPES, _MAX_ROWS, _KIND = _native.DTYPE_CODE, CPU_MAX_FUSED_ROWS, "float"
    device, index = torch.device("cpu"), -1

    def __init__(self, packed, absmax, bits, codebook, row_offsets, blocksize, shape, nested=NESTED_DEFAULTS, *,
                 checked: bool = False):
        rows, cols = shape
        if packed.device.type != "cpu":
            raise ValueError(f"PreparedMatmulCPU runs the CPU kernel; the weight is on {packed.device}")
        if not checked:
            check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, torch.float32,
                                  *nested)
        packed, bits, codebook, row_offsets = (t.contiguous() for t in (packed, bits, codebook, row_offsets))
        f32, ns = _absmax_for(absmax, nested)
        self.rows, self.cols = rows, cols
        self._keep = (packed, bits, codebook, row_offsets, f32, ns)  # the pointers below point into these
        # lowra_matmul_cpu's arguments from `packed` through `blocksize`
        self._args = (packed.data_ptr(), packed.numel(), _f32_ptr(f32), _nested_ref(ns), bits.data_ptr(),
                      codebook.data_ptr(), row_offsets.data_ptr(), rows, cols, blocksize)
        self._fn = _native.load().lowra_matmul_cpu

    def launch(self, A, bias, out) -> None:
        """The kernel on checked, contiguous A [..., cols], bias [rows] or None, out [..., rows]."""
        _run(self._fn, (A.data_ptr(), _native.DTYPE_CODE[A.dtype], A.numel() // self.cols, *self._args,
                        None if bias is None else bias.data_ptr(), out.data_ptr()), -1, "lowra matmul (cpu)")


def matmul(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None,
           group_rows=None, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256):
    out = torch.empty((*A.shape[:-1], shape[0]), dtype=A.dtype, device=A.device)
    return matmul_into(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows,
                       out, (nested_absmax, nested_code, nested_offset, nested_blocksize))


def matmul_out(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None,
               group_rows=None, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256, *,
               out):
    matmul_into(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows, out,
                (nested_absmax, nested_code, nested_offset, nested_blocksize))


# lowra::matmul_buffered's launch arguments by operand buffer address and layout: raw pointers into the buffer, a
# function of the key alone (a buffer freed and another allocated at the same address with the same layout gets the
# same, correct pointers), so the cache keeps no tensor alive. The nested scales' struct lives here, as the C entry
# points take it by reference.
_BUFFERED_ARGS: dict = {}


def _buffered_args(base: int, rows: int, cols: int, blocksize: int, nested: bool, nested_blocksize: int,
                   groups: tuple | None) -> tuple:
    key = (base, rows, cols, blocksize, nested, nested_blocksize, groups)
    hit = _BUFFERED_ARGS.get(key)
    if hit is None:
        layout, _ = operand_layout(rows, cols, blocksize, nested, nested_blocksize)
        p = {name: base + off for name, (off, _, _) in layout.items()}
        ns = (_native.NestedAbsmax(p["absmax"], p["nested_absmax"], p["nested_code"], p["nested_offset"],
                                   nested_blocksize) if nested else None)
        hit = (None if nested else p["absmax"], ns, p["bits"], p["code"], p["row_offsets"], p["row_order"],
               None if groups is None else (_native.ctypes.c_int64 * 3)(*groups))
        if len(_BUFFERED_ARGS) >= 4096:  # a bound, not a working set: a model has one entry per layer
            _BUFFERED_ARGS.clear()
        _BUFFERED_ARGS[key] = hit
    return hit


def matmul_buffered(A, packed, operands, shape, blocksize, nested, nested_blocksize, group_rows=None, bias=None):
    """lowra::matmul_buffered: the fused kernel launched on pointers into the operand buffer (no views, no
    lowra::matmul call: a compiled call without CUDA graphs runs this per layer and token). Anything off its fast
    path (more rows than the fused kernels take, float32 activations on CUDA, no row plan, arguments to check and
    name) takes the views through lowra::matmul."""
    rows, cols = shape
    cuda = A.is_cuda
    m = A.numel() // cols if cols > 0 else 0
    dtypes = _HALF_CODES if cuda else _native.DTYPE_CODE
    if not (0 < m <= (MAX_FUSED_ROWS if cuda else CPU_MAX_FUSED_ROWS) and A.dim() >= 1 and A.shape[-1] == cols
            and A.dtype in dtypes and A.device == packed.device == operands.device
            and packed.dtype == torch.uint8 and packed.is_contiguous() and operands.dtype == torch.uint8
            and operands.dim() == 1 and operands.is_contiguous() and operands.data_ptr() % _ops.OPERAND_ALIGN == 0
            and blocksize_ok(blocksize) and nested_blocksize_ok(nested_blocksize)  # before the layout divides
            and operands.numel() == operand_layout(rows, cols, blocksize, nested, nested_blocksize)[1]
            and (bias is None or (bias.dtype == A.dtype and bias.shape == (rows,) and bias.device == A.device))
            and (not cuda or (group_rows is not None and len(group_rows) == 3))):
        return _ops._matmul_buffered(A, packed, operands, shape, blocksize, nested, nested_blocksize, group_rows,
                                     bias)
    groups = tuple(group_rows) if cuda else None
    f32, ns, bits, code, offsets, order, groups_c = _buffered_args(operands.data_ptr(), rows, cols, blocksize,
                                                                   nested, nested_blocksize, groups)
    A = A if A.is_contiguous() else A.contiguous()
    bias_ptr = None if bias is None else (bias if bias.is_contiguous() else bias.contiguous()).data_ptr()
    out = torch.empty(A.shape[:-1] + (rows,), dtype=A.dtype, device=A.device)
    nested_ref = None if ns is None else _native.ctypes.byref(ns)
    head = (A.data_ptr(), dtypes[A.dtype], m, packed.data_ptr(), packed.numel(), f32, nested_ref, bits, code, offsets,
            rows, cols, blocksize)
    if not cuda:
        _run(_native.load().lowra_matmul_cpu, (*head, bias_ptr, out.data_ptr()), -1, "lowra matmul (cpu)")
        return out
    dev = A.get_device()
    ws_bytes = _workspace_bytes(dtypes[A.dtype], m, rows, cols, blocksize, groups, nested, dev)
    ws = torch.empty(-(-ws_bytes // 4), dtype=torch.float32, device=A.device) if ws_bytes else None
    _run(_native.load().lowra_matmul_cuda, (*head, order, groups_c, bias_ptr, out.data_ptr(),
                                            None if ws is None else ws.data_ptr(), ws_bytes, _stream(dev)),
         dev, "lowra matmul")
    return out


def _on(device: torch.device):
    """Make `device` current for the launch (CUDA); nothing to do on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def register() -> list[str]:
    """Register the native kernels for every device type the loaded library supports; returns those types."""
    if not _native.available():
        return []
    devices = ["cpu"] + (["cuda"] if _native.has_cuda() else [])
    for device in devices:
        torch.library.register_kernel("lowra::quantize", device, quantize)
        torch.library.register_kernel("lowra::dequantize", device, dequantize)
        torch.library.register_kernel("lowra::matmul", device, matmul)
        for op, kernel in (("dequantize.out", dequantize_out), ("quantize.out", quantize_out),
                           ("matmul.out", matmul_out)):
            torch.library.register_kernel(f"lowra::{op}", device, _ops.refusing_overlap(op, kernel))
        torch.library.register_kernel("lowra::matmul_buffered", device, matmul_buffered)
    return devices
