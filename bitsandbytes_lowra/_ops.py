"""torch.library op schemas of the `lowra` namespace, with fake (meta) kernels.

Kernels are registered per device in backends/: "default" (the pure-PyTorch reference) for every device, then
"cpu" and "cuda" from the native library when it loads. Argument checks here are the cheap structural ones
(dtype, shape); metadata consistency is checked once, when a state is built or loaded (format.validate_layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .format import CODEBOOK_SLOTS, FLOAT_DTYPES, THRESHOLD_SLOTS, blocks_per_row

torch.library.define(
    "lowra::quantize",
    "(Tensor A, Tensor bits, Tensor thresholds, Tensor row_offsets, int blocksize) -> (Tensor, Tensor)",
)
torch.library.define(
    "lowra::dequantize",
    "(Tensor packed, Tensor absmax, Tensor bits, Tensor codebook, Tensor row_offsets, int blocksize, "
    "SymInt[] shape, ScalarType dtype) -> Tensor",
)
torch.library.define(
    "lowra::dequantize.out",
    "(Tensor packed, Tensor absmax, Tensor bits, Tensor codebook, Tensor row_offsets, int blocksize, "
    "SymInt[] shape, ScalarType dtype, *, Tensor(a!) out) -> ()",  # out-variants return nothing (functionalization)
)


def check_quantize_args(A, bits, thresholds, row_offsets, blocksize) -> None:
    torch._check(A.dim() == 2, lambda: f"A must be 2-D, got {A.dim()}-D")
    torch._check(A.dtype in FLOAT_DTYPES, lambda: f"A must be float32/float16/bfloat16, got {A.dtype}")
    torch._check(bits.dtype == torch.uint8, lambda: f"bits must be uint8, got {bits.dtype}")
    torch._check(bits.shape == (A.shape[0],), lambda: f"bits must have shape ({A.shape[0]},)")
    torch._check(thresholds.dtype == torch.float16, lambda: f"thresholds must be float16, got {thresholds.dtype}")
    torch._check(thresholds.shape == (A.shape[0], THRESHOLD_SLOTS), lambda: "thresholds must be [rows, 15]")
    torch._check(row_offsets.dtype == torch.int64, lambda: "row_offsets must be int64")
    torch._check(row_offsets.shape == (A.shape[0] + 1,), lambda: "row_offsets must be [rows + 1]")
    torch._check(blocksize % 8 == 0 and blocksize >= 8, lambda: f"blocksize must be a multiple of 8, got {blocksize}")


def check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype) -> None:
    torch._check(len(shape) == 2, lambda: f"shape must be [rows, cols], got {shape}")
    rows, cols = shape
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    torch._check(absmax.numel() == rows * blocks_per_row(cols, blocksize), lambda: "absmax size does not match shape")
    torch._check(bits.dtype == torch.uint8 and bits.shape == (rows,), lambda: "bits must be uint8 [rows]")
    torch._check(codebook.dtype == torch.float16, lambda: f"codebook must be float16, got {codebook.dtype}")
    torch._check(codebook.shape == (rows, CODEBOOK_SLOTS), lambda: "codebook must be [rows, 16]")
    torch._check(row_offsets.dtype == torch.int64 and row_offsets.shape == (rows + 1,), lambda: "bad row_offsets")
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float32/float16/bfloat16, got {dtype}")
    torch._check(blocksize % 8 == 0 and blocksize >= 8, lambda: f"blocksize must be a multiple of 8, got {blocksize}")


@torch.library.register_fake("lowra::quantize")
def _(A, bits, thresholds, row_offsets, blocksize):
    check_quantize_args(A, bits, thresholds, row_offsets, blocksize)
    nbytes = torch.library.get_ctx().new_dynamic_size()
    packed = A.new_empty(nbytes, dtype=torch.uint8)
    absmax = A.new_empty((A.shape[0], blocks_per_row(A.shape[1], blocksize)), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("lowra::dequantize")
def _(packed, absmax, bits, codebook, row_offsets, blocksize, shape: Sequence[int], dtype):
    check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype)
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("lowra::dequantize.out")
def _(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, *, out):
    check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype)
    check_out(out, shape, dtype, packed.device)


def check_out(out: torch.Tensor, shape, dtype, device) -> None:
    torch._check(tuple(out.shape) == tuple(shape), lambda: f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    torch._check(out.dtype == dtype, lambda: f"out has dtype {out.dtype}, expected {dtype}")
    torch._check(out.device == device, lambda: f"out is on {out.device}, expected {device}")
    torch._check(out.is_contiguous(), lambda: "out must be contiguous")
