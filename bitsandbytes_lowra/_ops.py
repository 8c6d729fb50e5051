"""torch.library op schemas of the `lowra` namespace, with fake (meta) kernels.

Kernels are registered per device in backends/: "default" (the pure-PyTorch reference) for every device, then
"cpu" and "cuda" from the native library when it loads. Argument checks here are the cheap structural ones
(dtype, shape); metadata consistency is checked once, when a state is built or loaded (format.validate_layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, wraps

import torch
from torch._subclasses.fake_tensor import is_fake

from .format import (
    BLOCKSIZE_RULE,
    CODEBOOK_SLOTS,
    FLOAT_DTYPES,
    THRESHOLD_SLOTS,
    blocks_per_row,
    blocksize_ok,
    check_bits,
    check_row_offsets,
    cols_error,
    nested_blocksize_ok,
)

torch.library.define(
    "lowra::quantize",
    "(Tensor A, Tensor bits, Tensor thresholds, Tensor row_offsets, int blocksize) -> (Tensor, Tensor)",
)
# Block scales come as float32 `absmax`, or double-quantized: uint8 `absmax` codes plus these (bitsandbytes' nested
# quantization; decoded where the kernels read them, see csrc/lowra.h LowraNestedAbsmax and reference.decode_absmax).
NESTED_ARGS = (
    "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, int nested_blocksize=256"
)
torch.library.define(
    "lowra::dequantize",
    "(Tensor packed, Tensor absmax, Tensor bits, Tensor codebook, Tensor row_offsets, int blocksize, "
    f"SymInt[] shape, ScalarType dtype, {NESTED_ARGS}) -> Tensor",
)
torch.library.define(
    "lowra::dequantize.out",
    "(Tensor packed, Tensor absmax, Tensor bits, Tensor codebook, Tensor row_offsets, int blocksize, "
    f"SymInt[] shape, ScalarType dtype, {NESTED_ARGS}, *, Tensor(a!) out) -> ()",  # out-variants return nothing
)


def check_blocksize_arg(blocksize) -> None:
    """First: the shape checks after it divide by the blocksize. A ValueError, as for any bad argument value."""
    torch._check_value(blocksize_ok(blocksize), lambda: f"blocksize must be {BLOCKSIZE_RULE}, got {blocksize}")


def check_nested_blocksize_arg(nested_blocksize) -> None:
    """Before anything divides by it (the nested scales' count, an operand buffer's layout)."""
    torch._check_value(nested_blocksize_ok(nested_blocksize),
                       lambda: f"nested_blocksize must be a power of two, got {nested_blocksize}")


def check_cols_arg(cols, name: str) -> None:
    """Columns within the native library's 32-bit column index (format.MAX_COLS), named rather than left to the C
    API's generic refusal. A ValueError, as for the blocksize."""
    torch._check_value(cols_error(cols, name) is None, lambda: cols_error(cols, name))


def check_same_device(ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Every given tensor on ref's device. A tensor on meta among real ones would otherwise send the call to the fake
    kernel, which hands back an uninitialized real tensor; on CUDA a CPU tensor would reach the kernel as a pointer."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: f"{name} is on {t.device}, {ref_name} on {ref.device}")


def check_quantize_args(A, bits, thresholds, row_offsets, blocksize) -> None:
    check_blocksize_arg(blocksize)
    check_same_device("A", A, bits=bits, thresholds=thresholds, row_offsets=row_offsets)
    torch._check(A.dim() == 2, lambda: f"A must be 2-D, got {A.dim()}-D")
    check_cols_arg(A.shape[1], "A")
    torch._check(A.dtype in FLOAT_DTYPES, lambda: f"A must be float32/float16/bfloat16, got {A.dtype}")
    torch._check(bits.dtype == torch.uint8, lambda: f"bits must be uint8, got {bits.dtype}")
    torch._check(bits.shape == (A.shape[0],), lambda: f"bits must have shape ({A.shape[0]},)")
    torch._check(thresholds.dtype == torch.float16, lambda: f"thresholds must be float16, got {thresholds.dtype}")
    torch._check(thresholds.shape == (A.shape[0], THRESHOLD_SLOTS), lambda: "thresholds must be [rows, 15]")
    torch._check(row_offsets.dtype == torch.int64, lambda: "row_offsets must be int64")
    torch._check(row_offsets.shape == (A.shape[0] + 1,), lambda: "row_offsets must be [rows + 1]")


def check_quantize_layout(A, bits, row_offsets, blocksize) -> None:
    """The values of bits and row_offsets (after check_quantize_args), before quantize allocates its outputs: it
    sizes the packed buffer from the last offset, so a wrong one would allocate garbage (or terabytes) before the
    kernel refused it. Reads both on the host (a sync on CUDA; quantize syncs for the size anyway)."""
    check_bits(bits, A.shape[0])
    check_row_offsets(row_offsets, bits, A.shape[1], blocksize)


def check_absmax_args(packed, absmax, nested_absmax, nested_code, nested_offset, nested_blocksize) -> None:
    if nested_absmax is None:
        torch._check(nested_code is None and nested_offset is None,
                     lambda: "nested_code / nested_offset given without nested_absmax")
        torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
        return
    torch._check(absmax.dtype == torch.uint8, lambda: f"double-quantized absmax must be uint8, got {absmax.dtype}")
    torch._check(nested_code is not None and nested_offset is not None,
                 lambda: "nested_absmax needs nested_code and nested_offset")
    check_nested_blocksize_arg(nested_blocksize)
    for name, t, n in (("nested_absmax", nested_absmax, -(-absmax.numel() // nested_blocksize)),
                       ("nested_code", nested_code, 256), ("nested_offset", nested_offset, 1)):
        torch._check(t.dtype == torch.float32, lambda: f"{name} must be float32, got {t.dtype}")
        torch._check(t.numel() == n, lambda: f"{name} must have {n} elements, got {t.numel()}")
        torch._check(t.device == packed.device, lambda: f"{name} is on {t.device}, the codes on {packed.device}")


def check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax=None,
                          nested_code=None, nested_offset=None, nested_blocksize=256) -> None:
    torch._check(len(shape) == 2, lambda: f"shape must be [rows, cols], got {shape}")
    rows, cols = shape
    check_cols_arg(cols, "the weight")
    check_blocksize_arg(blocksize)
    check_same_device("the codes", packed, absmax=absmax, bits=bits, codebook=codebook, row_offsets=row_offsets)
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    check_absmax_args(packed, absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    torch._check(absmax.numel() == rows * blocks_per_row(cols, blocksize), lambda: "absmax size does not match shape")
    torch._check(bits.dtype == torch.uint8 and bits.shape == (rows,), lambda: "bits must be uint8 [rows]")
    torch._check(codebook.dtype == torch.float16, lambda: f"codebook must be float16, got {codebook.dtype}")
    torch._check(codebook.shape == (rows, CODEBOOK_SLOTS), lambda: "codebook must be [rows, 16]")
    torch._check(row_offsets.dtype == torch.int64 and row_offsets.shape == (rows + 1,), lambda: "bad row_offsets")
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float32/float16/bfloat16, got {dtype}")


@torch.library.register_fake("lowra::quantize")
def _(A, bits, thresholds, row_offsets, blocksize):
    check_quantize_args(A, bits, thresholds, row_offsets, blocksize)
    nbytes = torch.library.get_ctx().new_dynamic_size()
    packed = A.new_empty(nbytes, dtype=torch.uint8)
    absmax = A.new_empty((A.shape[0], blocks_per_row(A.shape[1], blocksize)), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("lowra::dequantize")
def _(packed, absmax, bits, codebook, row_offsets, blocksize, shape: Sequence[int], dtype, nested_absmax=None,
      nested_code=None, nested_offset=None, nested_blocksize=256):
    check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax,
                          nested_code, nested_offset, nested_blocksize)
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("lowra::dequantize.out")
def _(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256, *, out):
    check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, dtype, nested_absmax,
                          nested_code, nested_offset, nested_blocksize)
    check_out(out, shape, dtype, packed.device)


def check_out(out: torch.Tensor, shape, dtype, device) -> None:
    torch._check(tuple(out.shape) == tuple(shape), lambda: f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    torch._check(out.dtype == dtype, lambda: f"out has dtype {out.dtype}, expected {dtype}")
    torch._check(out.device == device, lambda: f"out is on {out.device}, expected {device}")
    torch._check(out.is_contiguous(), lambda: "out must be contiguous")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) addresses of a non-empty tensor's elements (a strided tensor's gaps included)."""
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _has_memory(t) -> bool:
    return isinstance(t, torch.Tensor) and t.numel() > 0 and not t.is_meta and not is_fake(t)


def check_no_overlap(outs: dict[str, torch.Tensor], inputs: dict) -> None:
    """Refuse out= tensors that share memory with an input tensor or with each other, by name: the kernels read their
    inputs while they write (a dequantize into its own codes reads codes it has already overwritten), and a CUDA
    kernel's writes race its reads. Tensors without memory (meta, fake) are skipped: a trace cannot tell."""
    named = [(k, v) for k, v in outs.items() if _has_memory(v)]
    others = named + [(k, v) for k, v in inputs.items() if _has_memory(v)]
    for i, (out_name, out) in enumerate(named):
        lo, hi = _byte_span(out)
        for name, t in others[i + 1:]:
            t_lo, t_hi = _byte_span(t)
            torch._check(hi <= t_lo or t_hi <= lo,
                         lambda: f"out= tensor {out_name} overlaps {name} in memory; pass a tensor of its own")


@lru_cache(maxsize=None)
def _out_arguments(op: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the input arguments' names, the written (out=) arguments' names), in schema order, of lowra::`op`."""
    name, overload = op.split(".")
    arguments = getattr(getattr(torch.ops.lowra, name), overload)._schema.arguments
    outs = tuple(a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write)
    return tuple(a.name for a in arguments if a.name not in outs), outs


def refusing_overlap(op: str, kernel):
    """`kernel` of the out= op lowra::`op` (e.g. "dequantize.out") with check_no_overlap first: every backend
    registers its out= kernels through this."""
    names, out_names = _out_arguments(op)

    @wraps(kernel)
    def checked(*args, **kwargs):
        inputs = dict(zip(names, args))
        inputs.update((k, v) for k, v in kwargs.items() if k not in out_names)
        check_no_overlap({k: kwargs[k] for k in out_names if k in kwargs}, inputs)
        return kernel(*args, **kwargs)

    return checked


# ---- fused matmul (decode regime) and quantize.out ----
# y = A @ W^T (+ bias) with W given by its packed LowRA state, never materialized on the fast CUDA path.
# row_order / group_rows come from matmul_plan(bits): derived from the stored state, computed once and cached by the
# caller; without them the op derives them itself (a host sync, so not inside CUDA graph capture).
torch.library.define(
    "lowra::matmul",
    "(Tensor A, Tensor packed, Tensor absmax, Tensor bits, Tensor codebook, Tensor row_offsets, int blocksize, "
    f"SymInt[] shape, Tensor? bias=None, Tensor? row_order=None, int[]? group_rows=None, {NESTED_ARGS}) -> Tensor",
)
torch.library.define(
    "lowra::matmul.out",
    "(Tensor A, Tensor packed, Tensor absmax, Tensor bits, Tensor codebook, Tensor row_offsets, int blocksize, "
    f"SymInt[] shape, Tensor? bias=None, Tensor? row_order=None, int[]? group_rows=None, {NESTED_ARGS}, "
    "*, Tensor(a!) out) -> ()",
)
torch.library.define(
    "lowra::quantize.out",
    "(Tensor A, Tensor bits, Tensor thresholds, Tensor row_offsets, int blocksize, *, Tensor(a!) packed, "
    "Tensor(b!) absmax) -> ()",
)


def matmul_plan(bits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Per-precision row grouping for lowra::matmul: (row_order, group_rows).

    row_order: int32 [rows] on bits' device, the output channels with 1 bit, then 2, then 4 (original order inside
    a group); group_rows: [#1-bit, #2-bit, #4-bit] rows. Derived from `bits` alone (no format change); reading
    the counts synchronizes once, so build it with the quantized state, not per call.
    """
    b = bits.to(torch.int64)
    order = torch.argsort(b, stable=True).to(torch.int32)
    counts = torch.stack([(b == p).sum() for p in (1, 2, 4)]).tolist()
    return order, [int(c) for c in counts]


def check_matmul_args(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order,
                      group_rows, *nested) -> None:
    torch._check(len(shape) == 2, lambda: f"shape must be [rows, cols], got {shape}")
    rows, cols = shape
    check_cols_arg(cols, "the weight")
    torch._check(A.dim() >= 1, lambda: "A must have at least one dimension")
    torch._check(A.dtype in FLOAT_DTYPES, lambda: f"A must be float32/float16/bfloat16, got {A.dtype}")
    torch._check(A.shape[-1] == cols, lambda: f"A has {A.shape[-1]} features, the weight has {cols} columns")
    check_same_device("A", A, packed=packed, bias=bias, row_order=row_order)
    check_dequantize_args(packed, absmax, bits, codebook, row_offsets, blocksize, shape, A.dtype, *nested)
    if bias is not None:
        torch._check(bias.dtype == A.dtype, lambda: f"bias must have A's dtype {A.dtype}, got {bias.dtype}")
        torch._check(tuple(bias.shape) == (rows,), lambda: f"bias must have shape ({rows},), got {tuple(bias.shape)}")
    torch._check((row_order is None) == (group_rows is None), lambda: "pass row_order and group_rows together")
    if row_order is not None:
        torch._check(row_order.dtype == torch.int32 and tuple(row_order.shape) == (rows,),
                     lambda: "row_order must be int32 [rows] (see matmul_plan)")
        torch._check(len(group_rows) == 3 and all(g >= 0 for g in group_rows) and sum(group_rows) == rows,
                     lambda: f"group_rows must be 3 non-negative counts summing to {rows}, got {group_rows}")


@torch.library.register_fake("lowra::matmul")
def _(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None, group_rows=None,
      nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256):
    check_matmul_args(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows,
                      nested_absmax, nested_code, nested_offset, nested_blocksize)
    return A.new_empty((*A.shape[:-1], shape[0]))


@torch.library.register_fake("lowra::matmul.out")
def _(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias=None, row_order=None, group_rows=None,
      nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256, *, out):
    check_matmul_args(A, packed, absmax, bits, codebook, row_offsets, blocksize, shape, bias, row_order, group_rows,
                      nested_absmax, nested_code, nested_offset, nested_blocksize)
    check_out(out, (*A.shape[:-1], shape[0]), A.dtype, A.device)


def check_quantize_out(A, blocksize, packed, absmax) -> None:
    torch._check(packed.dtype == torch.uint8 and packed.dim() == 1, lambda: "packed must be a 1-D uint8 tensor")
    torch._check(packed.is_contiguous() and absmax.is_contiguous(), lambda: "packed and absmax must be contiguous")
    nb = blocks_per_row(A.shape[1], blocksize)
    torch._check(absmax.dtype == torch.float32 and tuple(absmax.shape) == (A.shape[0], nb),
                 lambda: f"absmax must be float32 [{A.shape[0]}, {nb}]")
    torch._check(packed.device == A.device and absmax.device == A.device, lambda: "outputs must be on A's device")


@torch.library.register_fake("lowra::quantize.out")
def _(A, bits, thresholds, row_offsets, blocksize, *, packed, absmax):
    check_quantize_args(A, bits, thresholds, row_offsets, blocksize)
    check_quantize_out(A, blocksize, packed, absmax)


# ---- the fused matmul reading a state's tensors from one operand buffer ----
# A compiled call fetches and guards every tensor input of its graph, one by one, before each call: for a layer read
# through lowra::matmul that is eight or nine tensors where a dense layer has one, and it made most of a compiled
# LowRA decode step's host time (docs/benchmarks.md, twenty-ninth round). QuantStateLowRA keeps those tensors as
# views of one uint8 buffer laid out by operand_layout (a function of the shape alone, so the graph needs no offsets
# of its own), and LinearLowRA hands a compiled graph that buffer.
OPERAND_ALIGN = 16  # bytes: every field starts aligned for its dtype (and for vector loads)


@lru_cache(maxsize=1024)  # a pure function of its ints, asked for at every eager check of a kept buffer
def operand_layout(rows: int, cols: int, blocksize: int, nested: bool,
                   nested_blocksize: int = 256) -> tuple[dict[str, tuple[int, int, torch.dtype]], int]:
    """Where each kernel operand of a [rows, cols] state lives in its operand buffer: {field: (byte offset, element
    count, dtype)} and the buffer's size in bytes. Fields: absmax (uint8 codes when nested, else float32 [rows,
    nblocks]), bits, code (the codebooks), row_offsets, row_order (the CUDA row plan: matmul_plan, filled in by
    QuantStateLowRA.matmul_plan), then when nested the second-level scales, their code and the offset."""
    nb = rows * blocks_per_row(cols, blocksize)
    fields = [("absmax", nb, torch.uint8 if nested else torch.float32), ("bits", rows, torch.uint8),
              ("code", rows * CODEBOOK_SLOTS, torch.float16), ("row_offsets", rows + 1, torch.int64),
              ("row_order", rows, torch.int32)]
    if nested:
        fields += [("nested_absmax", -(-nb // nested_blocksize), torch.float32), ("nested_code", 256, torch.float32),
                   ("nested_offset", 1, torch.float32)]
    layout, offset = {}, 0
    for name, n, dtype in fields:
        layout[name] = (offset, n, dtype)
        offset += -(-n * dtype.itemsize // OPERAND_ALIGN) * OPERAND_ALIGN
    return layout, offset


def operand_views(buffer: torch.Tensor, rows: int, cols: int, blocksize: int, nested: bool,
                  nested_blocksize: int = 256) -> dict[str, torch.Tensor]:
    """The fields of an operand buffer as typed views (flat; absmax [rows, nblocks], code [rows, 16])."""
    layout, _ = operand_layout(rows, cols, blocksize, nested, nested_blocksize)
    views = {name: buffer[off:off + n * dt.itemsize].view(dt) for name, (off, n, dt) in layout.items()}
    views["absmax"] = views["absmax"].view(rows, -1)
    views["code"] = views["code"].view(rows, CODEBOOK_SLOTS)
    return views


torch.library.define(
    "lowra::matmul_buffered",
    "(Tensor A, Tensor packed, Tensor operands, SymInt[] shape, int blocksize, bool nested, int nested_blocksize, "
    "int[]? group_rows=None, Tensor? bias=None) -> Tensor",
)


def check_operand_buffer(packed, operands, shape, blocksize, nested, nested_blocksize) -> None:
    torch._check(len(shape) == 2, lambda: f"shape must be [rows, cols], got {shape}")
    check_blocksize_arg(blocksize)  # both before operand_layout divides by them
    check_nested_blocksize_arg(nested_blocksize)
    _, size = operand_layout(shape[0], shape[1], blocksize, nested, nested_blocksize)
    torch._check(operands.dtype == torch.uint8 and operands.dim() == 1 and operands.is_contiguous(),
                 lambda: "operands must be a contiguous 1-D uint8 buffer")
    # the fields' offsets keep them aligned for their dtypes (and the kernels' vector loads) from an aligned start
    torch._check(not _has_memory(operands) or operands.data_ptr() % OPERAND_ALIGN == 0,
                 lambda: f"operands must start {OPERAND_ALIGN}-byte aligned, got address {operands.data_ptr():#x}")
    torch._check(operands.numel() == size, lambda: f"operands must hold {size} bytes for this shape, got "
                                                   f"{operands.numel()}")
    torch._check(operands.device == packed.device, lambda: f"operands are on {operands.device}, the codes on "
                                                           f"{packed.device}")


@torch.library.register_fake("lowra::matmul_buffered")
def _(A, packed, operands, shape, blocksize, nested, nested_blocksize, group_rows=None, bias=None):
    check_operand_buffer(packed, operands, shape, blocksize, nested, nested_blocksize)
    check_same_device("A", A, packed=packed, bias=bias)
    torch._check(A.dim() >= 1 and A.shape[-1] == shape[1], lambda: f"A must have {shape[1]} features")
    return A.new_empty((*A.shape[:-1], shape[0]))


def _matmul_buffered(A, packed, operands, shape, blocksize, nested, nested_blocksize, group_rows=None, bias=None):
    """One kernel for every device: lowra::matmul on the buffer's fields (opaque to the graph, so a compiled call
    fetches and guards the buffer alone; its views cost nothing inside a replayed CUDA graph)."""
    check_operand_buffer(packed, operands, shape, blocksize, nested, nested_blocksize)
    v = operand_views(operands, shape[0], shape[1], blocksize, nested, nested_blocksize)
    row_order = v["row_order"] if group_rows is not None else None
    nested_args = ((v["nested_absmax"], v["nested_code"], v["nested_offset"]) if nested else (None, None, None))
    return torch.ops.lowra.matmul.default(A, packed, v["absmax"], v["bits"], v["code"], v["row_offsets"], blocksize,
                                          shape, bias, row_order, group_rows, *nested_args, nested_blocksize)


torch.library.register_kernel("lowra::matmul_buffered", "default", _matmul_buffered)
