"""Kernels of the native library (csrc/) registered for "cpu" and, when the library has CUDA, "cuda".

Host-side metadata (bits, offsets) is read by the CPU entry points to validate; the CUDA entry points take device
pointers and bound-check inside the kernels (rows that do not fit are skipped and counted, never followed: see
skipped_rows). The CUDA paths never synchronize the host, so they can be captured in CUDA graphs. Both are fed
contiguous tensors of the documented dtypes.
"""

from __future__ import annotations

import contextlib

import torch

from .. import _native
from .._ops import (
    check_dequantize_args,
    check_matmul_args,
    check_out,
    check_quantize_args,
    check_quantize_out,
    matmul_plan,
)
from ..format import CODEBOOK_SLOTS, FLOAT_DTYPES, blocks_per_row, padded_cols

# The fused matmul streams the packed weight once per call; above this many activation rows, dequantizing once and
# using the dense GEMM is faster (training, prefill).
MAX_FUSED_ROWS = 16


def _stream_args(device: torch.device) -> list:
    if device.type == "cuda":
        return [_native.ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)]
    return []


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


def set_matmul_tuning(ksplit: int = 0, ctas_per_sm: int = 0, depth: int = 0, gemv_max_rows: int = 0,
                      gemv_rows_per_warp: int = 0, gemv_wk: int = 0) -> None:
    """Benchmark knobs of the fused CUDA matmul (0 = automatic). Tensor-core path (5+ activation rows): K splits,
    resident CTAs per SM, prefetch depth 2/3. GEMV path: the most activation rows it takes (default 2, at most 4; -1 sends
    every m to the tensor-core path), rows per warp (4 or 8), warps along K (1, 2, 4, 8).
    Process-wide; called without arguments it restores the automatic choice."""
    if _native.has_cuda():
        i32 = _native.ctypes.c_int
        _fn("lowra_matmul_cuda_set_tuning", [i32, i32, i32], None)(ksplit, ctas_per_sm, depth)
        _fn("lowra_matmul_cuda_set_gemv_tuning", [i32, i32, i32], None)(gemv_max_rows, gemv_rows_per_warp, gemv_wk)


def _quantize_into(A, bits, thresholds, row_offsets, blocksize, packed, absmax):
    rows, cols = A.shape
    with _on(A.device):
        status = _entry("quantize", A.device)(
            _native.ptr(A), _native.DTYPE_CODE[A.dtype], rows, cols, blocksize, _native.ptr(bits),
            _native.ptr(thresholds), _native.ptr(row_offsets), _native.ptr(packed), packed.numel(),
            _native.ptr(absmax), *_stream_args(A.device),
        )
    _native.check(status, "lowra quantize")


def quantize(A, bits, thresholds, row_offsets, blocksize):
    check_quantize_args(A, bits, thresholds, row_offsets, blocksize)
    A, bits, thresholds, row_offsets = (t.contiguous() for t in (A, bits, thresholds, row_offsets))
    rows, cols = A.shape
    # The buffer size comes from the offsets' last entry: the only host sync of this op (quantize.out has none).
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


def _dequantize_args_ok(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype) -> bool:
    if len(shape) != 2:
        return False
    rows, cols = shape
    return (
        packed.dtype == torch.uint8
        and absmax.dtype == torch.float32
        and absmax.numel() == rows * blocks_per_row(cols, blocksize)
        and bits.dtype == torch.uint8 and bits.shape == (rows,)
        and codebook.dtype == torch.float16 and codebook.shape == (rows, CODEBOOK_SLOTS)
        and row_offsets.dtype == torch.int64 and row_offsets.shape == (rows + 1,)
        and dtype in FLOAT_DTYPES
        and blocksize % 8 == 0 and blocksize >= 8
    )


def _out_ok(out, shape, dtype, device) -> bool:
    return tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.device == device and out.is_contiguous()


def _matmul_args_ok(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order,
                    group_rows) -> bool:
    if len(shape) != 2 or A.dim() < 1 or A.dtype not in FLOAT_DTYPES or A.shape[-1] != shape[1]:
        return False
    if not _dequantize_args_ok(packed, absmax, bits, codebook, row_offsets, blocksize, shape, A.dtype):
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


def dequantize_into(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, out):
    if not (_dequantize_args_ok(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype)
            and _out_ok(out, shape, dtype, packed.device)):
        check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype)
        check_out(out, shape, dtype, packed.device)
    packed, absmax, bits, codebook, row_offsets = (t.contiguous() for t in (packed, absmax, bits, codebook, row_offsets))
    with _on(packed.device):
        status = _entry("dequantize", packed.device)(
            _native.ptr(packed), packed.numel(), _native.ptr(absmax), _native.ptr(bits), _native.ptr(codebook),
            _native.ptr(row_offsets), shape[0], shape[1], blocksize, _native.DTYPE_CODE[dtype], _native.ptr(out),
            *_stream_args(packed.device),
        )
    _native.check(status, "lowra dequantize")
    return out


def dequantize(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype):
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    return dequantize_into(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, out)


def dequantize_out(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, *, out):
    dequantize_into(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, out)


def _matmul_cuda(A2, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows, out2):
    rows, cols = shape
    m = A2.shape[0]
    if row_order is None:
        row_order, group_rows = matmul_plan(bits)
    p, i32, i64 = _native.ctypes.c_void_p, _native.ctypes.c_int, _native.ctypes.c_int64
    groups = (i64 * 3)(*group_rows)
    dtype = _native.DTYPE_CODE[A2.dtype]
    ws_bytes = _fn("lowra_matmul_cuda_workspace_size", [i32, i64, i64, i64, i64, p], i64)(
        dtype, m, rows, cols, blocksize, groups)
    ws = torch.empty(max(ws_bytes, 0) // 4, dtype=torch.float32, device=A2.device)
    fn = _fn("lowra_matmul_cuda", [p, i32, i64, p, i64, p, p, p, p, i64, i64, i64, p, p, p, p, p, i64, p], i32)
    status = fn(
        _native.ptr(A2), dtype, m, _native.ptr(packed), packed.numel(), _native.ptr(absmax), _native.ptr(bits),
        _native.ptr(codebook), _native.ptr(row_offsets), rows, cols, blocksize, _native.ptr(row_order.contiguous()),
        groups, None if bias is None else _native.ptr(bias), _native.ptr(out2),
        _native.ptr(ws) if ws.numel() else None, ws.numel() * 4, *_stream_args(A2.device),
    )
    _native.check(status, "lowra matmul")


def matmul_into(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows, out):
    if not (_matmul_args_ok(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order,
                            group_rows)
            and _out_ok(out, (*A.shape[:-1], shape[0]), A.dtype, A.device)):
        check_matmul_args(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order,
                          group_rows)
        check_out(out, (*A.shape[:-1], shape[0]), A.dtype, A.device)
    rows, cols = shape
    A2 = A.reshape(-1, cols).contiguous()
    packed, absmax, bits, codebook, row_offsets = (t.contiguous() for t in (packed, absmax, bits, codebook, row_offsets))
    bias = None if bias is None else bias.contiguous()
    out2 = out.view(-1, rows)
    if A2.shape[0] == 0:
        return out
    fused = A.device.type == "cuda" and A.dtype != torch.float32 and A2.shape[0] <= MAX_FUSED_ROWS
    if not fused:
        # Dense path: dequantize once into the GEMM's dtype (float32 on the CPU, A's dtype on the GPU).
        wdtype = torch.float32 if A.device.type == "cpu" else A.dtype
        W = dequantize(packed, absmax, bits, codebook, row_offsets, blocksize, shape, wdtype)
        y = torch.nn.functional.linear(A2.to(wdtype), W, None if bias is None else bias.to(wdtype))
        out2.copy_(y)
        return out
    with torch.cuda.device(A.device):
        _matmul_cuda(A2, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows,
                     out2)
    return out


def matmul(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None,
           group_rows=None):
    out = torch.empty((*A.shape[:-1], shape[0]), dtype=A.dtype, device=A.device)
    return matmul_into(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows,
                       out)


def matmul_out(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None,
               group_rows=None, *, out):
    matmul_into(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows, out)


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
        torch.library.register_kernel("lowra::dequantize.out", device, dequantize_out)
        torch.library.register_kernel("lowra::quantize.out", device, quantize_out)
        torch.library.register_kernel("lowra::matmul", device, matmul)
        torch.library.register_kernel("lowra::matmul.out", device, matmul_out)
    return devices
