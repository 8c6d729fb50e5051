"""Pure-PyTorch implementation of the LowRA kernels: the oracle every fast path is tested against.

Written for clarity, not speed; it follows docs/format.md literally (float32 division for normalization,
code = number of used thresholds strictly below the value, little-endian packing, float32 dequantize products
rounded once to the output dtype). It is also registered as the fallback kernel for devices without a native one.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .._ops import check_quantize_layout, refusing_overlap
from ..format import padded_cols


def _rows_by_precision(bits: torch.Tensor):
    for p in (1, 2, 4):
        idx = (bits == p).nonzero().flatten()
        if idx.numel():
            yield p, idx


def _byte_index(offsets: torch.Tensor, idx: torch.Tensor, row_bytes: int) -> torch.Tensor:
    return offsets[idx][:, None] + torch.arange(row_bytes, device=offsets.device)[None, :]


def quantize(
    A: torch.Tensor, bits: torch.Tensor, thresholds: torch.Tensor, offsets: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = A.shape
    pc = padded_cols(cols, blocksize)
    nb = pc // blocksize
    W = torch.zeros(rows, pc, dtype=torch.float32, device=A.device)
    W[:, :cols] = A.float()
    blocks = W.view(rows, nb, blocksize)
    # NaN elements do not count towards a block's absmax (the kernels' fmaxf) and get code 0 (NaN > t is false)
    absmax = blocks.abs().nan_to_num(nan=0.0, posinf=float("inf")).amax(dim=-1)  # [rows, nb]
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = torch.where(absmax[..., None] > 0, blocks / safe[..., None], torch.zeros_like(blocks)).view(rows, pc)
    packed = torch.zeros(int(offsets[-1]), dtype=torch.uint8, device=A.device)
    for p, idx in _rows_by_precision(bits):
        t = thresholds[idx, : 2**p - 1].float().contiguous()
        v = normed[idx].contiguous()
        codes = torch.searchsorted(t, v, side="left").masked_fill_(v.isnan(), 0)  # = #{t < v}
        per_byte = 8 // p
        shifts = torch.arange(per_byte, device=A.device) * p
        byte_vals = (codes.view(idx.numel(), pc // per_byte, per_byte) << shifts).sum(-1).to(torch.uint8)
        packed[_byte_index(offsets, idx, pc * p // 8)] = byte_vals
    return packed, absmax.contiguous()


def unpack_codes(packed: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, rows: int, pc: int) -> torch.Tensor:
    """int64 [rows, padded_cols] code indices."""
    codes = torch.zeros(rows, pc, dtype=torch.int64, device=packed.device)
    for p, idx in _rows_by_precision(bits):
        per_byte = 8 // p
        raw = packed[_byte_index(offsets, idx, pc * p // 8)].to(torch.int64)
        shifts = torch.arange(per_byte, device=packed.device) * p
        codes[idx] = ((raw[..., None] >> shifts) & (2**p - 1)).view(idx.numel(), pc)
    return codes


def decode_absmax(absmax, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256):
    """float32 block scales: `absmax` itself, or decoded from its double-quantized form (csrc/lowra.h
    LowraNestedAbsmax): max(code[q] * nested[i // nested_blocksize] + offset, 0), product and sum rounded apart. The
    max is C's fmaxf, as in the kernels: a NaN (a corrupt nested scale or offset) decodes to 0, not NaN."""
    if nested_absmax is None:
        return absmax
    q = absmax.reshape(-1).long()
    group = torch.arange(q.numel(), device=q.device) // nested_blocksize
    scales = nested_code[q] * nested_absmax[group] + nested_offset.reshape(())
    return torch.where(scales > 0, scales, 0.0).view(absmax.shape)


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    bits: torch.Tensor,
    codebook: torch.Tensor,
    offsets: torch.Tensor,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    rows, cols = shape
    pc = padded_cols(cols, blocksize)
    codes = unpack_codes(packed, bits, offsets, rows, pc)
    values = torch.gather(codebook.float(), 1, codes)  # [rows, pc]
    scale = absmax.reshape(rows, pc // blocksize).repeat_interleave(blocksize, dim=1)  # (not -1: rows may be 0)
    return (values * scale)[:, :cols].to(dtype)


# Op kernels (registered below for every device type; native backends override cpu and cuda).
def _quantize_kernel(A, bits, thresholds, row_offsets, blocksize):
    check_quantize_layout(A, bits, row_offsets, blocksize)  # before quantize sizes its buffer from the offsets
    return quantize(A, bits, thresholds, row_offsets, blocksize)


def _dequantize_kernel(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax=None,
                       nested_code=None, nested_offset=None, nested_blocksize=256):
    absmax = decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return dequantize(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype)


def _dequantize_out_kernel(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax=None,
                           nested_code=None, nested_offset=None, nested_blocksize=256, *, out):
    from .._ops import check_out

    check_out(out, shape, dtype, packed.device)
    absmax = decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    out.copy_(dequantize(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype))


def matmul(A, packed, absmax, bits, codebook, offsets, blocksize, shape, bias=None) -> torch.Tensor:
    """y = A @ W^T (+ bias): W dequantized to float32, float32 products and accumulation, rounded once to A's dtype."""
    W = dequantize(packed, absmax, bits, codebook, offsets, blocksize, list(shape), torch.float32)
    y = torch.nn.functional.linear(A.float(), W, None if bias is None else bias.float())
    return y.to(A.dtype)


def _matmul_kernel(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None,
                   group_rows=None, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256):
    absmax = decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return matmul(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias)


def _matmul_out_kernel(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None,
                       group_rows=None, nested_absmax=None, nested_code=None, nested_offset=None,
                       nested_blocksize=256, *, out):
    from .._ops import check_out

    absmax = decode_absmax(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    check_out(out, (*A.shape[:-1], shape[0]), A.dtype, A.device)
    out.copy_(matmul(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias))


def _quantize_out_kernel(A, bits, thresholds, row_offsets, blocksize, *, packed, absmax):
    from .._ops import check_quantize_out

    check_quantize_out(A, blocksize, packed, absmax)
    check_quantize_layout(A, bits, row_offsets, blocksize)
    p, a = quantize(A, bits, thresholds, row_offsets, blocksize)
    torch._check(packed.numel() == p.numel(), lambda: f"packed has {packed.numel()} bytes, the layout needs {p.numel()}")
    packed.copy_(p)
    absmax.copy_(a)


_warned_devices: set[str] = set()


def _as_fallback(kernel):
    """`kernel` as the op's "default" kernel: it serves only devices the native library does not (those register
    their own), so its first call on a device says so once: silently several times slower is worse than a warning."""

    @functools.wraps(kernel)
    def fallback(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type not in _warned_devices:
            _warned_devices.add(device.type)
            warnings.warn(_fallback_message(device.type), RuntimeWarning, stacklevel=2)
        return kernel(*args, **kwargs)

    return fallback


def _fallback_message(device_type: str) -> str:
    from .. import _native

    try:
        _native.load()
    except _native.NativeLibraryError as e:
        why = f"the native library could not be loaded (tried: {'; '.join(e.tried)})"
    else:
        if device_type == "cuda" and not _native.has_cuda():
            why = "the native library was built without CUDA (no nvcc at build time)"
        else:
            why = f"the native library has no {device_type} kernels"
        if _native.passed_over:
            why += f" (passed over: {'; '.join(_native.passed_over)})"
    return (f"bitsandbytes-lowra: {why}, so lowra ops on {device_type} tensors run the pure-PyTorch reference: "
            "correct, but several times slower, with a dense float32 weight per call, and not capturable in CUDA "
            "graphs. Build the native library with `pip install .` or `make build` (nvcc on PATH for CUDA); "
            "LOWRA_LIBRARY=/path/to/lib.so picks a build.")


for _op, _kernel in (("quantize", _quantize_kernel), ("quantize.out", _quantize_out_kernel),
                     ("dequantize", _dequantize_kernel), ("dequantize.out", _dequantize_out_kernel),
                     ("matmul", _matmul_kernel), ("matmul.out", _matmul_out_kernel)):
    if _op.endswith(".out"):
        _kernel = refusing_overlap(_op, _kernel)
    torch.library.register_kernel(f"lowra::{_op}", "default", _as_fallback(_kernel))
