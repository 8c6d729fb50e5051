"""The LowRA storage format: constants, row addressing and validation of stored metadata.

One place for every fact about the byte layout (docs/format.md is the prose version). Kernels trust what passes
`validate_layout`: nothing reaches native code before it has been checked here.
"""

from __future__ import annotations

import numbers

import torch

ALLOWED_BITS = (1, 2, 4)
CODEBOOK_SLOTS = 16  # codebook [rows, 16]: room for 2^4 codes whatever the row's precision
THRESHOLD_SLOTS = 15  # thresholds [rows, 15]: 2^bits - 1 of them used
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # groups of absmax values in double quantization (as bitsandbytes' quantize_4bit)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Codebooks and thresholds are stored as float16: values live in [-1, 1] where float16 keeps 11 bits of mantissa.
META_DTYPE = torch.float16


class LowRAFormatError(ValueError):
    """Raised when a weight, a precision vector or stored LowRA metadata does not fit the format."""


# A multiple of 8 keeps every 1-bit block byte-aligned, so rows never share a byte.
BLOCKSIZE_RULE = "a multiple of 8 in [8, 4096]"


def blocksize_ok(blocksize: int) -> bool:
    """The format's blocksize rule as a plain test (the ops' checks and fast paths share it)."""
    return 8 <= blocksize <= 4096 and blocksize % 8 == 0


# The native library indexes a row's columns in 32 bits (csrc/common.h kMaxCols); wider weights are refused by name
# here, before the C API's generic "invalid argument".
MAX_COLS = 2**31 - 1


def cols_error(cols: int, name: str = "the weight") -> str | None:
    """Why `cols` columns do not fit the format, or None."""
    if cols > MAX_COLS:
        return f"{name} has {cols} columns; the format allows at most {MAX_COLS} (2^31 - 1)"
    return None


def nested_blocksize_ok(nested_blocksize: int) -> bool:
    """The ops' rule for the double-quantized scales' group size, a power of two (the kernels shift by its log)."""
    return nested_blocksize >= 1 and nested_blocksize & (nested_blocksize - 1) == 0


def plain_number(value):
    """A numpy integer or floating scalar as the Python int or float it holds; anything else unchanged. Options take
    numpy scalars like Python numbers and store plain values (JSON-able, compared by type in isinstance checks)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):  # np.int64 etc. (numpy's bool_ is not Integral: still refused)
        return int(value)
    if isinstance(value, numbers.Real):  # np.float64 is a float subclass: stored as a plain float too
        return float(value)
    return value


def check_blocksize(blocksize) -> int:
    """The blocksize as a Python int (numpy integers accepted), or LowRAFormatError."""
    blocksize = plain_number(blocksize)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not blocksize_ok(blocksize):
        raise LowRAFormatError(f"blocksize must be {BLOCKSIZE_RULE}, got {blocksize!r}")
    return blocksize


def padded_cols(cols: int, blocksize: int) -> int:
    return -(-cols // blocksize) * blocksize


def blocks_per_row(cols: int, blocksize: int) -> int:
    return padded_cols(cols, blocksize) // blocksize


def row_offsets(bits: torch.Tensor, cols: int, blocksize: int) -> torch.Tensor:
    """Byte offset of every row in the packed buffer: int64 [rows + 1], last entry = total bytes."""
    row_bytes = bits.to(torch.int64).cpu() * (padded_cols(cols, blocksize) // 8)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(row_bytes, 0)]).to(bits.device)


def check_row_offsets(offsets: torch.Tensor, bits: torch.Tensor, cols: int, blocksize: int,
                      name: str = "row_offsets") -> None:
    """`offsets` must be row_offsets(bits, cols, blocksize) (bits already checked); the first entry that differs is
    named, with what the layout puts there."""
    expected, given = row_offsets(bits.cpu(), cols, blocksize), offsets.cpu()
    if given.shape != expected.shape:
        raise LowRAFormatError(f"{name} must have {expected.numel()} entries (rows + 1), got {tuple(given.shape)}")
    if not torch.equal(given, expected):
        r = int((given != expected).nonzero()[0])
        where = "the end of the buffer" if r == bits.numel() else f"row {r}"
        raise LowRAFormatError(
            f"{name} do not match the per-row bits (corrupt or mismatched state): {name}[{r}] = {int(given[r])}, but "
            f"the bits with {cols} columns in blocks of {blocksize} put {where} at byte {int(expected[r])}")


def check_bits(bits: torch.Tensor, rows: int | None = None, allowed=ALLOWED_BITS) -> None:
    if not isinstance(bits, torch.Tensor):
        raise LowRAFormatError(f"bits must be a tensor, got {type(bits).__name__}")
    if bits.dim() != 1:
        raise LowRAFormatError(f"bits must be 1-D (one precision per output channel), got shape {tuple(bits.shape)}")
    if bits.dtype.is_floating_point or bits.dtype == torch.bool or bits.dtype.is_complex:
        raise LowRAFormatError(f"bits must be an integer tensor, got {bits.dtype}")
    if rows is not None and bits.numel() != rows:
        raise LowRAFormatError(f"bits has {bits.numel()} entries but the weight has {rows} output channels")
    bad = ~torch.isin(bits.cpu().to(torch.int64), torch.tensor(allowed))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise LowRAFormatError(f"bits[{i}] = {int(bits[i])} is not one of {allowed}")


def check_weight(W: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(W, torch.Tensor):
        raise LowRAFormatError(f"{name} must be a tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise LowRAFormatError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    if W.dtype not in FLOAT_DTYPES:
        raise LowRAFormatError(f"{name} must be float32, float16 or bfloat16, got {W.dtype}")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise LowRAFormatError(f"{name} is empty: shape {tuple(W.shape)}")
    if (err := cols_error(W.shape[1], name)) is not None:
        raise LowRAFormatError(err)
    if W.is_meta:  # else the NaN check below fails on .item() of a meta tensor
        raise LowRAFormatError(f"{name} is on the meta device and holds no values: load the weights first")
    if not torch.isfinite(W).all():
        n = int((~torch.isfinite(W)).sum())
        raise LowRAFormatError(f"{name} contains {n} NaN/Inf values; refusing to quantize")


def check_thresholds(thresholds: torch.Tensor, bits: torch.Tensor) -> None:
    rows = bits.numel()
    if thresholds.dim() != 2 or tuple(thresholds.shape) != (rows, THRESHOLD_SLOTS):
        raise LowRAFormatError(f"thresholds must have shape ({rows}, {THRESHOLD_SLOTS}), got {tuple(thresholds.shape)}")
    t = thresholds.float().cpu()
    b = bits.cpu().to(torch.int64)
    used = torch.arange(THRESHOLD_SLOTS)[None, :] < (2**b - 1)[:, None]
    if not torch.isfinite(t[used]).all():
        raise LowRAFormatError("thresholds contain NaN/Inf in slots used by the row's precision")
    # used thresholds must be non-decreasing (sorted bin edges)
    diffs = t[:, 1:] - t[:, :-1]
    both_used = used[:, 1:]
    if (diffs[both_used] < 0).any():
        r = int((both_used & (diffs < 0)).any(1).nonzero()[0])
        raise LowRAFormatError(f"thresholds of row {r} are not sorted ascending")


def check_codebook(codebook: torch.Tensor, bits: torch.Tensor) -> None:
    rows = bits.numel()
    if codebook.dim() != 2 or tuple(codebook.shape) != (rows, CODEBOOK_SLOTS):
        raise LowRAFormatError(f"codebook must have shape ({rows}, {CODEBOOK_SLOTS}), got {tuple(codebook.shape)}")
    c = codebook.float().cpu()
    used = torch.arange(CODEBOOK_SLOTS)[None, :] < (2 ** bits.cpu().to(torch.int64))[:, None]
    if not torch.isfinite(c[used]).all():
        raise LowRAFormatError("codebook contains NaN/Inf in slots used by the row's precision")


def validate_layout(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    bits: torch.Tensor,
    offsets: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
) -> None:
    """Check that packed codes, absmax, bits and offsets describe one consistent [rows, cols] weight."""
    check_blocksize(blocksize)
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        raise LowRAFormatError(f"shape must be (rows, cols) with positive sizes, got {tuple(shape)}")
    rows, cols = shape
    if (err := cols_error(cols)) is not None:
        raise LowRAFormatError(err)
    check_bits(bits, rows)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise LowRAFormatError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (rows + 1,):
        raise LowRAFormatError(f"row offsets must be int64 of shape ({rows + 1},), got {offsets.dtype} {tuple(offsets.shape)}")
    check_row_offsets(offsets, bits, cols, blocksize, "row offsets")
    if packed.numel() != int(offsets[-1]):
        raise LowRAFormatError(f"packed buffer has {packed.numel()} bytes, the layout needs {int(offsets[-1])}")
    nb = blocks_per_row(cols, blocksize)
    if absmax.dtype != torch.float32 or absmax.numel() != rows * nb:
        raise LowRAFormatError(f"absmax must be float32 with {rows}x{nb} entries, got {absmax.dtype} with {absmax.numel()}")
    if not torch.isfinite(absmax).all() or (absmax < 0).any():
        raise LowRAFormatError("absmax contains negative or non-finite values (corrupt state)")
