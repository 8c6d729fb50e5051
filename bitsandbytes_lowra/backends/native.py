"""Kernels of the native library (csrc/) registered for "cpu" and, when the library has CUDA, "cuda".

Host-side metadata (bits, offsets) is read by the CPU entry points to validate; the CUDA entry points take device
pointers and bound-check inside the kernels. Both are fed contiguous tensors of the documented dtypes.
"""

from __future__ import annotations

import torch

from .. import _native
from .._ops import check_dequantize_args, check_out, check_quantize_args
from ..format import padded_cols


def _stream_args(device: torch.device) -> list:
    if device.type == "cuda":
        return [_native.ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)]
    return []


def _entry(name: str, device: torch.device):
    return getattr(_native.load(), f"lowra_{name}_{device.type}")


def quantize(A, bits, thresholds, row_offsets, blocksize):
    check_quantize_args(A, bits, thresholds, row_offsets, blocksize)
    A, bits, thresholds, row_offsets = (t.contiguous() for t in (A, bits, thresholds, row_offsets))
    rows, cols = A.shape
    # The buffer size comes from the offsets' last entry: the only host sync of this op.
    nbytes = int(row_offsets[-1])
    packed = torch.empty(nbytes, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(rows, padded_cols(cols, blocksize) // blocksize, dtype=torch.float32, device=A.device)
    with torch.cuda.device(A.device) if A.device.type == "cuda" else _nullctx():
        status = _entry("quantize", A.device)(
            _native.ptr(A), _native.DTYPE_CODE[A.dtype], rows, cols, blocksize, _native.ptr(bits),
            _native.ptr(thresholds), _native.ptr(row_offsets), _native.ptr(packed), nbytes, _native.ptr(absmax),
            *_stream_args(A.device),
        )
    _native.check(status, "lowra quantize")
    return packed, absmax


def dequantize_into(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, out):
    check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype)
    check_out(out, shape, dtype, packed.device)
    packed, absmax, bits, codebook, row_offsets = (t.contiguous() for t in (packed, absmax, bits, codebook, row_offsets))
    with torch.cuda.device(packed.device) if packed.device.type == "cuda" else _nullctx():
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


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def register() -> list[str]:
    """Register the native kernels for every device type the loaded library supports; returns those types."""
    if not _native.available():
        return []
    devices = ["cpu"] + (["cuda"] if _native.has_cuda() else [])
    for device in devices:
        torch.library.register_kernel("lowra::quantize", device, quantize)
        torch.library.register_kernel("lowra::dequantize", device, dequantize)
        torch.library.register_kernel("lowra::dequantize.out", device, dequantize_out)
    return devices
