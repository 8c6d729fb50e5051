"""Functional API of LowRA quantization, mirroring bitsandbytes.functional (quantize_4bit / dequantize_4bit /
QuantState / matmul_4bit).

- `quantize_lowra(W, bits, codebooks, thresholds, blocksize=64, compress_statistics=False) -> (packed, state)`
- `dequantize_lowra(packed, state, dtype=None) -> W`
- `matmul_lowra(A, packed, state, bias=None)`: A @ W.T (+ bias), gradient w.r.t. A only (the base is frozen)
- `QuantStateLowRA`: a bitsandbytes `QuantState` carrying the per-channel metadata (docs/format.md), serialized as
  safetensors-safe tensors plus one small JSON blob and validated field by field on load.

Codebooks and thresholds are accepted in two forms (see `make_plan`): at storage width (float tensors
[rows, 16] / [rows, 15], slot c of row r used when c < 2^bits[r]) or compact per precision (a dict
{bits: tensor [2^bits] shared by every row of that precision, or [rows, 2^bits] per row}). Thresholds default to the
midpoints of the codebook (nearest-level encoding); codebooks default to the NormalFloat / Appendix F tables.
"""

from __future__ import annotations

import copy
import json
from typing import Any, NamedTuple

import torch
from bitsandbytes import functional as bnbF
from bitsandbytes.functional import QuantState
from bitsandbytes.utils import pack_dict_to_tensor

from . import codebooks as _codebooks
from .backends.native import CPU_MAX_FUSED_ROWS
from .backends.reference import decode_absmax
from .format import (
    ALLOWED_BITS,
    CODEBOOK_SLOTS,
    DEFAULT_BLOCKSIZE,
    FLOAT_DTYPES,
    META_DTYPE,
    NESTED_BLOCKSIZE,
    THRESHOLD_SLOTS,
    LowRAFormatError,
    blocks_per_row,
    check_bits,
    check_blocksize,
    check_codebook,
    check_row_offsets,
    check_thresholds,
    check_weight,
    row_offsets,
    validate_layout,
)
from .operands import (
    _KEEPERS,
    _STAMPS,
    BufferedOperands,
    KernelOperands,
    buffered_meta,
    drop_kept_operands,
)

QUANT_TYPE = "lowra"
FORMAT_VERSION = 1
BLOB_NAME = "bitsandbytes_lowra__mp"  # deliberately not bitsandbytes__nf4/fp4: bnb must never mistake it for its own
BLOB_KEY = "quant_state." + BLOB_NAME
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# name -> dtype of every tensor a state stores (as_dict / from_dict); "absmax" is uint8 when double-quantized.
_TENSOR_FIELDS = {
    "absmax": None,
    "lowra_bits": torch.uint8,
    "lowra_code": META_DTYPE,
    "lowra_thresholds": META_DTYPE,
    "lowra_row_offsets": torch.int64,
    "nested_absmax": torch.float32,
    "nested_quant_map": torch.float32,
}
# The tensor keys of QuantStateLowRA.as_dict(): what a checkpoint stores as "weight.<key>" next to the codes.
STATE_TENSOR_KEYS = tuple(_TENSOR_FIELDS)
_JSON_FIELDS = ("quant_type", "format_version", "blocksize", "dtype", "shape")
_NESTED_JSON_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")
_NESTED_TENSORS = ("nested_absmax", "nested_quant_map")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _own(t: torch.Tensor) -> torch.Tensor:
    """t itself when it owns exactly its storage, else a compact copy (safetensors rejects shared storage)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0:
        return t
    return t.contiguous().clone()


# ---------------------------------------------------------------------------------------------------------------
# Plans: bits + tables at storage width
# ---------------------------------------------------------------------------------------------------------------


class LowRAPlan(NamedTuple):
    """What quantization needs besides the weight.

    bits uint8 [rows], codebook float16 [rows, 16], thresholds float16 [rows, 15] (storage width, on the CPU).
    """

    bits: torch.Tensor
    codebook: torch.Tensor
    thresholds: torch.Tensor

    def to(self, device) -> "LowRAPlan":
        return LowRAPlan(*(t.to(device) for t in self))


def _as_bits(bits, rows: int) -> torch.Tensor:
    if isinstance(bits, bool):
        raise LowRAFormatError(f"bits must be an int or an integer tensor, got {bits!r}")
    if isinstance(bits, int):
        if bits not in ALLOWED_BITS:
            raise LowRAFormatError(f"bits = {bits} is not one of {ALLOWED_BITS}")
        return torch.full((rows,), bits, dtype=torch.uint8)
    if isinstance(bits, float):  # an average budget, as LowRAConfig takes: here precisions are per row
        raise LowRAFormatError(
            f"bits = {bits!r}: per-row precisions are an int in {ALLOWED_BITS} or an integer tensor [rows]; for an "
            "average bit budget use quantize_lowra_at_bits(W, bits=...) (one layer) or LowRAConfig(bits=...) (a model)"
        )
    check_bits(bits, rows)
    return bits.detach().cpu().to(torch.uint8)


def _expand(tables, bits: torch.Tensor, slots: int, width, what: str) -> torch.Tensor:
    """Tables in one of the accepted forms -> float32 [rows, slots] with unused slots zeroed."""
    rows = bits.numel()
    if isinstance(tables, dict):
        out = torch.zeros(rows, slots)
        present = set(int(b) for b in bits.unique().tolist())
        unknown = set(tables) - set(ALLOWED_BITS)
        if unknown:
            raise LowRAFormatError(f"{what} dict has keys {sorted(unknown)}; keys must be precisions in {ALLOWED_BITS}")
        for p in sorted(present):
            if p not in tables:
                n = int((bits == p).sum())
                raise LowRAFormatError(f"{what} dict has no entry for precision {p}, which {n} rows use")
            t = tables[p]
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise LowRAFormatError(f"{what}[{p}] must be a float tensor, got {type(t).__name__}")
            k = width(p)
            t = t.detach().cpu().float()
            sel = bits == p
            if tuple(t.shape) == (k,):
                out[sel, :k] = t
            elif tuple(t.shape) == (rows, k):
                out[sel, :k] = t[sel]
            else:
                raise LowRAFormatError(f"{what}[{p}] must have shape ({k},) or ({rows}, {k}), got {tuple(t.shape)}")
        return out
    if not isinstance(tables, torch.Tensor) or not tables.dtype.is_floating_point:
        raise LowRAFormatError(f"{what} must be a float tensor [rows, {slots}] or a dict per precision")
    if tuple(tables.shape) != (rows, slots):
        raise LowRAFormatError(f"{what} must have shape ({rows}, {slots}) (storage width), got {tuple(tables.shape)}")
    used = torch.arange(slots)[None, :] < torch.tensor([width(int(b)) for b in bits.tolist()])[:, None]
    return torch.where(used, tables.detach().cpu().float(), torch.zeros(()))


def make_plan(bits, codebooks=None, thresholds=None, rows: int | None = None) -> LowRAPlan:
    """Validate and normalize bits and tables to storage width (float16, unused slots zero), on the CPU.

    bits: int (every row) or integer tensor [rows] of values in {1, 2, 4}.
    codebooks: None (NormalFloat / Appendix F tables), float [rows, 16], or {bits: [2^b] or [rows, 2^b]}.
    thresholds: None (midpoints of the codebook), float [rows, 15], or {bits: [2^b - 1] or [rows, 2^b - 1]}.
    """
    if rows is None:
        if not isinstance(bits, torch.Tensor):
            raise LowRAFormatError("rows must be given when bits is a scalar")
        rows = bits.numel()
    b = _as_bits(bits, rows)
    if codebooks is None and thresholds is None:
        code16, thr16 = _codebooks.nf_tables(b)  # exactly the baseline tables of codebooks.py
        return LowRAPlan(b, code16, thr16)
    if codebooks is None:
        code = _codebooks.nf_tables(b, dtype=torch.float32)[0]
    else:
        code = _expand(codebooks, b, CODEBOOK_SLOTS, lambda p: 2**p, "codebooks")
    _check_fits_float16(code, "codebooks")
    code16 = code.to(META_DTYPE)
    check_codebook(code16, b)  # NaN named as such, before the ascending check below would call it unsorted
    n = 2 ** b.to(torch.int64)
    used = torch.arange(CODEBOOK_SLOTS)[None, :] < n[:, None]
    _check_levels_stay_distinct(code, code16, used)
    if thresholds is None:
        # Midpoints of the float16 levels, so encoding is nearest-level for the stored codebook.
        c = code16.float()
        if not ((c[:, 1:] >= c[:, :-1]) | ~used[:, 1:]).all():  # else the derived thresholds are what is unsorted
            raise LowRAFormatError("codebooks must be ascending when the thresholds are derived from them (their "
                                   "midpoints); sort them, or pass thresholds")
        mids = _codebooks.midpoints(code16.float())  # [rows, 15]
        used = torch.arange(THRESHOLD_SLOTS)[None, :] < (n - 1)[:, None]
        thr = torch.where(used, mids, torch.zeros(()))
    else:
        thr = _expand(thresholds, b, THRESHOLD_SLOTS, lambda p: 2**p - 1, "thresholds")
        _check_fits_float16(thr, "thresholds")
    thr16 = thr.to(META_DTYPE)
    check_thresholds(thr16, b)
    return LowRAPlan(b, code16, thr16)


def _check_fits_float16(t: torch.Tensor, name: str) -> None:
    """Finite values beyond float16's range would be stored as Inf and then refused as 'NaN/Inf'."""
    big = torch.isfinite(t) & (t.abs() > torch.finfo(META_DTYPE).max)
    if big.any():
        raise LowRAFormatError(f"{name} must fit float16, the format's storage width (|value| <= 65504); got "
                               f"{float(t[big].abs().max()):.4g}")


def _check_levels_stay_distinct(code: torch.Tensor, code16: torch.Tensor, used: torch.Tensor) -> None:
    """Levels that differ but round to one float16 value (e.g. 1e-8 and 2e-8 both become 0) would leave codes that
    decode alike: the table silently loses its resolution, or every level of the row."""
    both = used[:, :, None] & used[:, None, :]
    c16 = code16.float()
    merged = both & (code[:, :, None] != code[:, None, :]) & (c16[:, :, None] == c16[:, None, :])
    if merged.any():
        r, i, j = (int(x) for x in merged.nonzero()[0])
        raise LowRAFormatError(
            f"codebooks row {r}: levels {float(code[r, i]):.6g} and {float(code[r, j]):.6g} differ but both become "
            f"{float(c16[r, i]):.6g} in float16, the format's storage width; scale the levels into [-1, 1] (float16 "
            "keeps 11 significant bits there, and nothing below 6e-8)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Quantization state
# ---------------------------------------------------------------------------------------------------------------


class QuantStateLowRA(QuantState):
    """bitsandbytes QuantState of a LowRA weight: per-row bits, codebooks, thresholds and row offsets.

    Inherited fields keep their bitsandbytes meaning: `absmax` (float32 [rows, nblocks], or uint8 of that shape when
    double-quantized with `offset` and `state2`), `shape`, `dtype` (of the original weight), `blocksize`, and `code`
    (here the per-row codebook float16 [rows, 16], also reachable as `codebook`). Construction validates everything
    (docs/format.md "Validation"); `validate(packed)` also checks a packed buffer against it.
    """

    valid_quant_types = (QUANT_TYPE,)
    valid_qs_type_keys = [BLOB_NAME]
    valid_qs_keys = [*_TENSOR_FIELDS, "quant_state", *_JSON_FIELDS, *_NESTED_JSON_FIELDS]

    def __init__(
        self,
        absmax: torch.Tensor,
        shape,
        bits: torch.Tensor,
        codebook: torch.Tensor,
        thresholds: torch.Tensor,
        row_offsets: torch.Tensor,
        blocksize: int = DEFAULT_BLOCKSIZE,
        dtype: torch.dtype = torch.float32,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ):
        if (offset is None) != (state2 is None):  # one without the other was silently a plain float32 state
            raise LowRAFormatError("double-quantized absmax needs both offset and state2, got only "
                                   f"{'offset' if state2 is None else 'state2'}")
        super().__init__(
            absmax=absmax,
            shape=torch.Size(shape),
            code=codebook,
            blocksize=blocksize,
            quant_type=QUANT_TYPE,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )
        self.bits = bits
        self.thresholds = thresholds
        self.row_offsets = row_offsets
        self._validate_metadata()
        # Packed size as a Python int: forward passes compare against it without a device sync.
        self.packed_nbytes = int(row_offsets[-1])
        self._pack_operands()

    # -- accessors ------------------------------------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        return self.code

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def nominal_bits(self) -> float:
        """Average code bits per parameter (the user's `bits=1.75`; padding not counted)."""
        return float(self.bits.double().mean())

    @property
    def nbytes(self) -> int:
        """Every stored byte: packed codes plus every tensor of as_dict(packed=True), JSON blob included."""
        return self.packed_nbytes + sum(t.numel() * t.element_size() for t in self.as_dict(packed=True).values())

    @property
    def held_nbytes(self) -> int:
        """Memory the state's tensors occupy beside the packed codes: scales, tables, offsets (each storage counted
        once and whole: the kernel operands are views of one buffer). What get_memory_footprint adds per weight."""
        tensors = [t for t in self.as_dict().values() if isinstance(t, torch.Tensor)]
        tensors += [self.offset] if self.nested else []
        storages = {}
        for t in tensors:
            st = t.untyped_storage()
            storages[id(t) if t.device.type == "meta" else (t.device, st.data_ptr())] = st.nbytes()
        return sum(storages.values())

    @property
    def effective_bits(self) -> float:
        """Every stored bit divided by the number of quantized parameters (docs/format.md "Bits accounting")."""
        return 8.0 * self.nbytes / (self.rows * self.cols)

    def matmul_plan(self) -> tuple[torch.Tensor | None, list[int] | None]:
        """Per-precision row grouping for the fused matmul, derived from `bits` once and cached (one host sync).

        The cache is keyed on the `bits` tensor object and its in-place version counter, so a move (.to), a
        reassigned or an edited `bits` is never served a stale plan. While tracing, (None, None) where nothing is
        cached: the plan's counts are data a trace cannot read (lowra::matmul then plans at each call)."""
        bits = self.bits
        cached = self.__dict__.get("_matmul_plan")
        if torch.compiler.is_compiling():
            # torch.compile cannot guard on a version counter (a graph break); an eager call before the trace fills
            # this entry, and identity still catches a replaced `bits`
            return cached[2] if cached is not None and cached[0] is bits else (None, None)
        if cached is None or cached[0] is not bits or cached[1] != bits._version:
            from ._ops import matmul_plan

            order, groups = matmul_plan(bits)
            slot = self._operand_slot("row_order")
            if slot is not None:  # where lowra::matmul_buffered reads it
                slot.copy_(order)
                order = slot
            cached = (bits, bits._version, (order, groups))
            self.__dict__["_matmul_plan"] = cached
        return cached[2]

    def absmax_fp32(self, cache: bool = False) -> torch.Tensor:
        """float32 [rows, nblocks] block scales, decoded first when double-quantized (kernels take these).

        cache=True keeps the decoded scales for the next call (LinearLowRA.set_absmax_cache): faster decode, but it
        holds 4 bytes per block (0.5 bit/param at blocksize 64), the memory double quantization exists to save.
        The cache is keyed on the identity and in-place version of every tensor the decode reads, so a move, a
        reload or an edit of the state is never served stale scales."""
        if not self.nested:
            return self.absmax
        if not cache:
            return self._decode_absmax()
        s2 = self.state2
        srcs = (self.absmax, s2.absmax, s2.code, self.offset)
        key = tuple(t._version for t in srcs)
        hit = self.__dict__.get("_absmax_cache")  # (source tensors, their versions, decoded scales)
        if hit is not None and hit[1] == key and all(a is b for a, b in zip(hit[0], srcs)):
            return hit[2]
        absmax = self._decode_absmax()
        self.__dict__["_absmax_cache"] = (srcs, key, absmax)
        return absmax

    def drop_absmax_cache(self) -> None:
        self.__dict__.pop("_absmax_cache", None)

    # Fields the kernels read (KernelOperands): setting one gives the state a new operands_stamp.
    _OPERAND_FIELDS = frozenset(("absmax", "shape", "code", "blocksize", "bits", "row_offsets", "offset", "state2",
                                 "packed_nbytes"))

    def __setattr__(self, name: str, value) -> None:
        if name == "blocksize":
            value = check_blocksize(value)  # named now, not later as an absmax that no longer fits the shape
        if name in self._OPERAND_FIELDS:
            self.__dict__["operands_stamp"] = next(_STAMPS)
            drop_kept_operands(self)
        super().__setattr__(name, value)

    def prepared_matmul(self, packed: torch.Tensor, cache_absmax: bool = False, *, build: bool = True):
        """backends.native.PreparedMatmul (CUDA) or PreparedMatmulCPU of this state and `packed`: the eager decode
        path's launcher, its arguments converted once (cached as _prepared says). build=False: the cached launcher
        if it is still current, else None (LinearLowRA's decode shortcut asks so; a miss takes the full path)."""
        cuda = packed.is_cuda
        row_order, group_rows = self.matmul_plan() if cuda else (None, None)

        def make(absmax, nested):
            from .backends.native import PreparedMatmul, PreparedMatmulCPU

            if cuda:
                return PreparedMatmul(packed, absmax, self.bits, self.code, self.row_offsets, self.blocksize,
                                      list(self.shape), row_order, group_rows, tuple(nested))
            return PreparedMatmulCPU(packed, absmax, self.bits, self.code, self.row_offsets, self.blocksize,
                                     list(self.shape), tuple(nested))

        return self._prepared("_prepared_matmul", packed, cache_absmax, make if build else None,
                              None if row_order is None else row_order.data_ptr())

    def prepared_dequantize(self, packed: torch.Tensor, cache_absmax: bool = False):
        """backends.native.PreparedDequantize of this state and `packed` (CUDA or CPU): called with a dtype, the
        dense weight; the eager training path's launcher (MatMulLowRA), cached as _prepared says."""

        def build(absmax, nested):
            from .backends.native import PreparedDequantize

            return PreparedDequantize(packed, absmax, self.bits, self.code, self.row_offsets, self.blocksize,
                                      list(self.shape), tuple(nested))

        return self._prepared("_prepared_dequantize", packed, cache_absmax, build)

    # Launchers that hold ctypes pointers into the state's tensors: not copyable, meaningless elsewhere, stale after
    # a move. A copy, an unpickled state or a moved one builds its own on first use.
    _LAUNCHERS = ("_prepared_matmul", "_prepared_dequantize")

    def _prepared(self, name: str, packed: torch.Tensor, cache_absmax: bool, build, extra=None):
        """The launcher `build(absmax, nested)` made for this state and `packed`, cached under `name` and keyed on
        the address of every tensor it points into (and `extra`) and on the version of `bits` (the CUDA row plan
        derives from it), so a move, a reload or a replaced tensor rebuilds it. build=None: None instead."""
        absmax, *nested = self.scale_args(cache_absmax)
        s2 = self.state2 if nested[0] is not None else None
        key = (packed.data_ptr(), packed.numel(), packed.get_device(), absmax.data_ptr(), self.bits.data_ptr(),
               self.bits._version, self.code.data_ptr(), self.row_offsets.data_ptr(), extra,
               None if s2 is None else (s2.absmax.data_ptr(), s2.code.data_ptr(), self.offset.data_ptr()))
        hit = self.__dict__.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        if build is None:
            return None
        prepared = build(absmax, nested)
        self.__dict__[name] = (key, prepared)
        return prepared

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._LAUNCHERS:
            state.pop(name, None)
        state["operands_stamp"] = next(_STAMPS)  # a copy has tensors of its own
        state.pop(_KEEPERS, None)  # and no module's kept operands
        if state.get("_operands") is not None:
            # Fields of several dtypes viewing one storage: torch.save refuses them ("Cannot save multiple tensors
            # or storages that view the same data as different types"). Each goes as a copy of its own; __setstate__
            # packs them into a buffer again.
            state["_operands"] = None
            for name in self._OPERANDS:
                state[name] = state[name].clone()
            if self.nested:
                state["offset"] = self.offset.clone()
                state["state2"] = s2 = copy.copy(self.state2)
                s2.absmax, s2.code = s2.absmax.clone(), s2.code.clone()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.operand_buffer() is None:  # pickle restores each view with a storage of its own (or an older
            self._pack_operands()  # version pickled a state without a buffer)

    def scale_args(self, cache: bool = False) -> tuple:
        """(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize) as the lowra ops take them: the
        stored scales, double-quantized ones decoded inside the kernels where they are read; with cache=True (and
        double quantization) the float32 scales kept by absmax_fp32(cache=True) instead."""
        if self.nested and not cache:
            s2 = self.state2
            return self.absmax, s2.absmax, s2.code, self.offset, s2.blocksize
        return self.absmax_fp32(cache), None, None, None, NESTED_BLOCKSIZE

    def _decode_absmax(self) -> torch.Tensor:
        # The reference decode (the kernels decode the same way, bit for bit). A block of zeros can decode to a tiny
        # negative scale; it clamps to 0, scales being non-negative by definition.
        s2 = self.state2
        return decode_absmax(self.absmax, s2.absmax, s2.code, self.offset, s2.blocksize)

    # -- validation -----------------------------------------------------------------------------------------------
    def _validate_metadata(self) -> None:
        check_blocksize(self.blocksize)
        if len(self.shape) != 2 or self.shape[0] <= 0 or self.shape[1] <= 0:
            raise LowRAFormatError(f"shape must be (rows, cols) with positive sizes, got {tuple(self.shape)}")
        if self.dtype not in FLOAT_DTYPES:
            raise LowRAFormatError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        rows, cols = self.shape
        nb = blocks_per_row(cols, self.blocksize)
        for name, t, dtype, shape in (
            ("lowra_bits", self.bits, torch.uint8, (rows,)),
            ("lowra_code", self.code, META_DTYPE, (rows, CODEBOOK_SLOTS)),
            ("lowra_thresholds", self.thresholds, META_DTYPE, (rows, THRESHOLD_SLOTS)),
            ("lowra_row_offsets", self.row_offsets, torch.int64, (rows + 1,)),
            ("absmax", self.absmax, torch.uint8 if self.nested else torch.float32, (rows, nb)),
        ):
            _check_tensor(name, t, dtype, shape)
        check_bits(self.bits, rows)
        check_codebook(self.code, self.bits)
        check_thresholds(self.thresholds, self.bits)
        check_row_offsets(self.row_offsets, self.bits, cols, self.blocksize, "lowra_row_offsets")
        if self.nested:
            s2 = self.state2
            if s2.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096) or isinstance(s2.blocksize, bool):
                raise LowRAFormatError(f"nested_blocksize must be a power of two in [64, 4096], got {s2.blocksize!r}")
            _check_tensor("nested_absmax", s2.absmax, torch.float32, (-(-rows * nb // s2.blocksize),))
            _check_tensor("nested_quant_map", s2.code, torch.float32, (256,))
            if s2.dtype != torch.float32:
                raise LowRAFormatError(f"nested_dtype must be float32, got {s2.dtype}")
            if not torch.isfinite(s2.absmax).all() or (s2.absmax < 0).any():
                raise LowRAFormatError("nested_absmax contains negative or non-finite values (corrupt state)")
            if not torch.isfinite(s2.code).all():
                raise LowRAFormatError("nested_quant_map contains non-finite values (corrupt state)")
            if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1 or not torch.isfinite(self.offset):
                raise LowRAFormatError(f"nested_offset must be one finite float, got {self.offset!r}")
        elif not torch.isfinite(self.absmax).all() or (self.absmax < 0).any():
            raise LowRAFormatError("absmax contains negative or non-finite values (corrupt state)")

    def validate(self, packed: torch.Tensor) -> None:
        """Check a packed buffer (and everything else, once more) against this state: format.validate_layout."""
        if not isinstance(packed, torch.Tensor):
            raise LowRAFormatError(f"packed codes must be a tensor, got {type(packed).__name__}")
        validate_layout(packed, self.absmax_fp32(), self.bits, self.row_offsets, tuple(self.shape), self.blocksize)

    # -- serialization --------------------------------------------------------------------------------------------
    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """Tensors and plain values of the state; packed=True: tensors only (own storage) plus the JSON blob,
        ready for a state dict and safetensors."""
        d: dict[str, Any] = {
            "quant_type": QUANT_TYPE,
            "format_version": FORMAT_VERSION,
            "absmax": self.absmax,
            "lowra_bits": self.bits,
            "lowra_code": self.code,
            "lowra_thresholds": self.thresholds,
            "lowra_row_offsets": self.row_offsets,
            "blocksize": self.blocksize,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.nested:
            d.update(
                nested_absmax=self.state2.absmax,
                nested_quant_map=self.state2.code,
                nested_blocksize=self.state2.blocksize,
                nested_dtype=_dtype_name(self.state2.dtype),
                nested_offset=float(self.offset),
            )
        if not packed:
            return d
        out = {k: _own(v) for k, v in d.items() if isinstance(v, torch.Tensor)}
        out[BLOB_KEY] = pack_dict_to_tensor({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)})
        return out

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device=None) -> "QuantStateLowRA":
        """Rebuild a state from as_dict() output (packed or not; keys may carry a prefix such as "weight.").

        Every field is validated; problems raise LowRAFormatError naming the field.
        """
        if not isinstance(qs_dict, dict):
            raise LowRAFormatError(f"expected a dict of LowRA state entries, got {type(qs_dict).__name__}")
        items = dict(qs_dict)
        blobs = [k for k in items if "quant_state" in k.split(".")[:-1] or k == "quant_state"]
        foreign = [k for k in blobs if k.split(".")[-1] != BLOB_NAME]
        if foreign:
            hint = " (a bitsandbytes nf4/fp4 state, not LowRA)" if any("bitsandbytes__" in k for k in foreign) else ""
            raise LowRAFormatError(f"unexpected quant_state entries {sorted(foreign)}{hint}; expected {BLOB_KEY!r}")
        if len(blobs) > 1:
            raise LowRAFormatError(f"more than one quant_state blob: {sorted(blobs)}")
        if blobs:
            items.update(_unpack_blob(items.pop(blobs[0])))
        elif "quant_type" not in items:
            raise LowRAFormatError(f"missing the JSON blob {BLOB_KEY!r} (and no unpacked 'quant_type' field)")

        fields: dict[str, Any] = {}
        for k, v in items.items():
            name = k.split(".")[-1]
            if name in fields:
                raise LowRAFormatError(f"field {name!r} given twice (key {k!r})")
            fields[name] = v
        unknown = sorted(n for n in fields if n not in cls.valid_qs_keys or n == "quant_state")
        if unknown:
            raise LowRAFormatError(f"unknown LowRA state fields {unknown}")
        nested = "nested_absmax" in fields or "nested_offset" in fields
        required = ["absmax", "lowra_bits", "lowra_code", "lowra_thresholds", "lowra_row_offsets", *_JSON_FIELDS]
        if nested:
            required += [*_NESTED_TENSORS, *_NESTED_JSON_FIELDS]
        else:
            stray = [n for n in (*_NESTED_TENSORS, *_NESTED_JSON_FIELDS) if n in fields]
            if stray:
                raise LowRAFormatError(f"nested fields {stray} given without nested_absmax/nested_offset")
        missing = [n for n in required if n not in fields]
        if missing:
            raise LowRAFormatError(f"missing LowRA state fields {missing}")

        if fields["quant_type"] != QUANT_TYPE:
            raise LowRAFormatError(f"quant_type must be {QUANT_TYPE!r}, got {fields['quant_type']!r}")
        if type(fields["format_version"]) is not int or fields["format_version"] != FORMAT_VERSION:  # true == 1
            raise LowRAFormatError(
                f"format_version {fields['format_version']!r} is not supported (this version reads {FORMAT_VERSION})"
            )
        blocksize = fields["blocksize"]
        if not isinstance(blocksize, int) or isinstance(blocksize, bool):
            raise LowRAFormatError(f"blocksize must be an integer, got {blocksize!r}")
        dtype = _DTYPE_NAMES.get(fields["dtype"]) if isinstance(fields["dtype"], str) else None
        if dtype is None:
            raise LowRAFormatError(f"dtype must be one of {sorted(_DTYPE_NAMES)}, got {fields['dtype']!r}")
        shape = fields["shape"]
        if (
            not isinstance(shape, (list, tuple))
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise LowRAFormatError(f"shape must be [rows, cols] of positive integers, got {shape!r}")
        for name in _TENSOR_FIELDS:
            if name in fields and not isinstance(fields[name], torch.Tensor):
                raise LowRAFormatError(f"{name} must be a tensor, got {type(fields[name]).__name__}")

        offset = state2 = None
        if nested:
            nb_size, ndt, noff = fields["nested_blocksize"], fields["nested_dtype"], fields["nested_offset"]
            if not isinstance(nb_size, int) or isinstance(nb_size, bool):
                raise LowRAFormatError(f"nested_blocksize must be an integer, got {nb_size!r}")
            if ndt != "float32":
                raise LowRAFormatError(f"nested_dtype must be 'float32', got {ndt!r}")
            if not isinstance(noff, (int, float)) or isinstance(noff, bool):
                raise LowRAFormatError(f"nested_offset must be a number, got {noff!r}")
            # on the scales' device: as_dict() stores the offset as a number, and the state's tensors share one device
            offset = torch.tensor(float(noff), dtype=torch.float32, device=fields["absmax"].device)
            state2 = QuantState(
                absmax=fields["nested_absmax"], code=fields["nested_quant_map"], blocksize=nb_size, dtype=torch.float32
            )
        state = cls(
            absmax=fields["absmax"],
            shape=tuple(shape),
            bits=fields["lowra_bits"],
            codebook=fields["lowra_code"],
            thresholds=fields["lowra_thresholds"],
            row_offsets=fields["lowra_row_offsets"],
            blocksize=blocksize,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )
        if device is not None:
            state.to(device)
        return state

    # -- device, equality -----------------------------------------------------------------------------------------
    def to(self, device) -> "QuantStateLowRA":
        """Move every tensor to `device` in place (as bitsandbytes does: modules and params share one state)."""
        self.thresholds = self.thresholds.to(device)
        for name in self._LAUNCHERS:  # they hold the tensors moved away from
            self.__dict__.pop(name, None)
        buffer = self.operand_buffer()
        if buffer is not None:  # one copy for every kernel operand, which stay its views
            moved = buffer.to(device)
            if moved is not buffer:
                self._point_operands_at(moved)
            return self
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        self.bits = self.bits.to(device)
        self.row_offsets = self.row_offsets.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        self._pack_operands()
        return self

    # -- the operand buffer (_ops.operand_layout) -----------------------------------------------------------------
    # Every tensor the kernels read is a view of one uint8 buffer, so that a compiled call hands its graph one tensor
    # per layer instead of eight (LinearLowRA.kept_operands, lowra::matmul_buffered). The views are the fields
    # themselves: an in-place edit of a field is an edit of the buffer. A field set to a tensor of its own leaves
    # the buffer behind (operand_buffer() is None until the next move packs the fields again); the kernels then
    # read the fields one by one, as before.
    def _operand_layout(self):
        from ._ops import operand_layout

        return operand_layout(*self._layout_args())

    def _operand_views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        from ._ops import operand_views

        return operand_views(buffer, *self._layout_args())

    def _layout_args(self) -> tuple:
        rows, cols = self.shape
        return rows, cols, self.blocksize, self.nested, self.state2.blocksize if self.nested else NESTED_BLOCKSIZE

    _OPERANDS = ("absmax", "bits", "code", "row_offsets")  # operand_layout's names of _operand_tensors()
    _NESTED_OPERANDS = ("nested_absmax", "nested_code", "nested_offset")

    def _operand_tensors(self) -> tuple:
        fields = (self.absmax, self.bits, self.code, self.row_offsets)
        return fields + (self.state2.absmax, self.state2.code, self.offset) if self.nested else fields

    def _operand_fields(self) -> dict[str, torch.Tensor]:
        names = self._OPERANDS + self._NESTED_OPERANDS if self.nested else self._OPERANDS
        return dict(zip(names, self._operand_tensors()))

    def _pack_operands(self) -> None:
        """Copy the kernel operands into a new buffer and make the fields its views (values unchanged)."""
        self.__dict__["_operands"] = None
        fields = self._operand_fields()
        device = self.absmax.device
        layout, size = self._operand_layout()
        if any(t.device != device or t.dtype != layout[name][2] or t.numel() != layout[name][1]
               for name, t in fields.items()):
            return  # not one device, or an offset of another dtype: the fields stay as they are
        buffer = torch.zeros(size, dtype=torch.uint8, device=device)
        views = self._operand_views(buffer)
        for name, t in fields.items():
            views[name].view(-1).copy_(t.reshape(-1))
        self._point_operands_at(buffer, views)

    def _point_operands_at(self, buffer: torch.Tensor, views: dict | None = None) -> None:
        views = self._operand_views(buffer) if views is None else views
        self.absmax, self.bits, self.code = views["absmax"], views["bits"], views["code"]
        self.row_offsets = views["row_offsets"]
        if self.nested:
            self.offset = views["nested_offset"].view(self.offset.shape)
            self.state2.absmax, self.state2.code = views["nested_absmax"], views["nested_code"]
        self.__dict__["_operands"] = buffer
        self.__dict__.pop("_matmul_plan", None)  # its row order lives in the buffer it moved away from

    def _operand_slot(self, name: str) -> torch.Tensor | None:
        """The view of `name` in the operand buffer, while the fields are its views."""
        buffer = self.operand_buffer()
        return None if buffer is None else self._operand_views(buffer)[name]

    def operand_addresses(self) -> tuple:
        """The fields' data addresses: while they equal those of a valid operand_buffer(), it still is (only a
        swapped storage moves a field without setting it, and setting one changes operands_stamp)."""
        return tuple(t.data_ptr() for t in self._operand_tensors())

    def operand_buffer(self) -> torch.Tensor | None:
        """The uint8 buffer whose views every kernel operand is (_ops.operand_layout), or None where a field has
        since been set to a tensor of its own, or its storage swapped (`.data = ...`, `set_`)."""
        buffer = self.__dict__.get("_operands")
        if buffer is None:
            return None
        layout, size = self._operand_layout()
        if buffer.numel() != size:
            return None
        rows, cols = self.shape
        shapes = {"absmax": (rows, blocks_per_row(cols, self.blocksize)), "code": (rows, CODEBOOK_SLOTS)}
        base = buffer.data_ptr()
        for name, t in self._operand_fields().items():
            off, n, dtype = layout[name]
            if (not isinstance(t, torch.Tensor) or t.data_ptr() != base + off or t.dtype != dtype
                    or t.numel() != n or not t.is_contiguous() or t.device != buffer.device
                    or (name in shapes and tuple(t.shape) != shapes[name])):
                return None
        return buffer

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def __eq__(self, other) -> bool:
        """Exact equality of every field (devices may differ)."""
        if not isinstance(other, QuantStateLowRA):
            return False
        a, b = self.as_dict(), other.as_dict()
        if a.keys() != b.keys():
            return False
        for k, v in a.items():
            w = b[k]
            if isinstance(v, torch.Tensor):
                if not (isinstance(w, torch.Tensor) and v.dtype == w.dtype and torch.equal(v.cpu(), w.cpu())):
                    return False
            elif v != w:
                return False
        return True

    __hash__ = None  # mutable container with value equality

    def __getattr__(self, name):
        # FSDP resolves the state-dict key "weight.quant_state.bitsandbytes_lowra__mp" attribute by attribute.
        if name == BLOB_NAME:
            return self.as_dict(packed=True)[BLOB_KEY]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __repr__(self) -> str:
        if self.bits.device.type == "meta":  # no values to count
            mix = "rows per bits=?"
        else:
            counts = {p: int((self.bits == p).sum()) for p in ALLOWED_BITS}
            mix = f"rows per bits={counts}, nominal_bits={self.nominal_bits:.3f}"
        return (
            f"QuantStateLowRA(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {mix}, "
            f"nested={self.nested}, device={self.device})"
        )


def _check_tensor(name: str, t, dtype: torch.dtype, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise LowRAFormatError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise LowRAFormatError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise LowRAFormatError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _unpack_blob(blob) -> dict:
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise LowRAFormatError(f"{BLOB_KEY} must be a 1-D uint8 tensor (packed JSON)")
    try:
        d = json.loads(bytes(blob.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowRAFormatError(f"{BLOB_KEY} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(d, dict):
        raise LowRAFormatError(f"{BLOB_KEY} must hold a JSON object, got {type(d).__name__}")
    tensors = sorted(k for k in d if k in _TENSOR_FIELDS)
    if tensors:
        raise LowRAFormatError(f"{BLOB_KEY} holds tensor fields {tensors}; they must be stored as tensors")
    return d


# ---------------------------------------------------------------------------------------------------------------
# quantize / dequantize / matmul
# ---------------------------------------------------------------------------------------------------------------


def double_quantize_absmax(absmax: torch.Tensor, nested_blocksize: int = NESTED_BLOCKSIZE):
    """bitsandbytes' nested quantization of block scales, as quantize_4bit(compress_statistics=True) does it: the
    mean (`offset`) is taken off and the rest coded blockwise to 8 bits. Returns (uint8 codes shaped like absmax,
    the nested QuantState, offset); backends.reference.decode_absmax inverts it."""
    offset = absmax.mean()
    q, state2 = bnbF.quantize_blockwise((absmax - offset).flatten(), blocksize=nested_blocksize)
    return q.reshape(absmax.shape), state2, offset


def quantize_lowra(
    W: torch.Tensor,
    bits,
    codebooks=None,
    thresholds=None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    compress_statistics: bool = False,
) -> tuple[torch.Tensor, QuantStateLowRA]:
    """Quantize a [out_features, in_features] weight row by row at per-row precision.

    Returns (packed uint8 [nbytes], QuantStateLowRA). The kernel runs on W's device. compress_statistics
    double-quantizes absmax with bitsandbytes' 8-bit blockwise code (groups of 256), as bnb's quantize_4bit does.
    See the module docstring and `make_plan` for the accepted forms of bits, codebooks and thresholds.
    """
    check_weight(W)
    blocksize = check_blocksize(blocksize)
    rows, cols = W.shape
    if isinstance(bits, LowRAPlan):  # e.g. a parameter's pending plan; normalized again (cheap, per-row tables)
        if codebooks is not None or thresholds is not None:
            raise LowRAFormatError("pass either a LowRAPlan or bits with codebooks/thresholds, not both")
        bits, codebooks, thresholds = bits
    plan = make_plan(bits, codebooks, thresholds, rows=rows)
    b, code, thr = (t.to(W.device).contiguous().clone() for t in plan)  # own copies: states never share storage
    offsets = row_offsets(b, cols, blocksize)
    packed, absmax = torch.ops.lowra.quantize(W.contiguous(), b, thr, offsets, blocksize)
    offset = state2 = None
    if compress_statistics:
        absmax, state2, offset = double_quantize_absmax(absmax)
    state = QuantStateLowRA(
        absmax=absmax,
        shape=(rows, cols),
        bits=b,
        codebook=code,
        thresholds=thr,
        row_offsets=offsets,
        blocksize=blocksize,
        dtype=W.dtype,
        offset=offset,
        state2=state2,
    )
    return packed, state


def dequantize_lowra(
    packed: torch.Tensor, quant_state: QuantStateLowRA, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The dense [rows, cols] weight, in `dtype` (default: the original dtype), each value rounded once from float32."""
    if dtype is not None and dtype not in FLOAT_DTYPES:  # named here, not as the op's schema mismatch or RuntimeError
        raise LowRAFormatError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    _check_pair(packed, quant_state)
    qs = quant_state
    absmax, *nested = qs.scale_args()
    return torch.ops.lowra.dequantize(
        packed, absmax, qs.bits, qs.code, qs.row_offsets, qs.blocksize, list(qs.shape),
        qs.dtype if dtype is None else dtype, *nested,
    )


def _check_pair(packed, quant_state) -> None:
    _check_state(quant_state)
    _check_packed(packed, quant_state.packed_nbytes, quant_state.device)


def _check_state(quant_state) -> None:
    if not isinstance(quant_state, QuantStateLowRA):
        raise LowRAFormatError(f"quant_state must be a QuantStateLowRA, got {type(quant_state).__name__}")


def _check_packed(packed, nbytes: int, device: torch.device) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise LowRAFormatError("packed codes must be a 1-D uint8 tensor")
    if packed.numel() != nbytes:
        raise LowRAFormatError(
            f"packed buffer has {packed.numel()} bytes but the state describes {nbytes} "
            "(mismatched weight and quant_state)"
        )
    if packed.device != device:
        raise LowRAFormatError(f"packed codes are on {packed.device} but the quant_state is on {device}")


# The fused decode kernels (lowra::matmul) never materialize W; they pay off for a few tokens at a time
# (docs/benchmarks.md). Training (input gradients) and long prompts take dequantize + matmul.
FUSED_DECODE_MAX_TOKENS = 16  # CUDA, float16 / bfloat16 activations
CPU_FUSED_DECODE_MAX_TOKENS = CPU_MAX_FUSED_ROWS  # CPU, any float dtype: the CPU matmul's own limit


def _needs_grad(A: torch.Tensor, bias) -> bool:
    return torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))


def _use_fused_decode(A: torch.Tensor, bias) -> bool:
    return not _needs_grad(A, bias) and _fused_decode_shape(A)


def _fused_decode_max_tokens(cuda: bool) -> int:
    """The most activation rows the fused matmul takes on a CUDA device or on the CPU."""
    return FUSED_DECODE_MAX_TOKENS if cuda else CPU_FUSED_DECODE_MAX_TOKENS


def _fused_decode_shape(A: torch.Tensor) -> bool:
    tokens = A.numel() // max(A.shape[-1], 1)
    if A.is_cuda:
        return A.dtype in (torch.float16, torch.bfloat16) and tokens <= _fused_decode_max_tokens(True)
    return A.device.type == "cpu" and tokens <= _fused_decode_max_tokens(False)


_profiler_enabled = getattr(torch.autograd, "_profiler_enabled", lambda: True)
# Tensor types whose every op is a plain op (Parameter disables torch function); subclasses may watch ops.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _eager_direct(A: torch.Tensor, bias) -> bool:
    """Whether the fused matmul (CUDA or CPU) may be called directly (QuantStateLowRA.prepared_matmul) instead of
    through torch.ops.lowra.matmul. The direct call saves the dispatcher and per-call argument conversion (a decode step
    pays them once per layer), so it is taken only where nothing can observe the difference: eager plain tensors,
    no torch.compile tracing, no torch function or dispatch mode (FakeTensor, FlopCounter, meta device contexts),
    no functorch transform and no profiler (which then records the op by name)."""
    return (
        type(A) in PLAIN_TENSOR_TYPES
        and (bias is None or type(bias) in PLAIN_TENSOR_TYPES)
        and _unwatched()
        and not _functorch(A)
        and (_native_cuda() if A.is_cuda else A.is_cpu and _native_cpu())  # not meta, nor devices we do not build for
    )


def _unwatched() -> bool:
    """_eager_direct's conditions that are not about the tensors: no torch.compile tracing, no torch function or
    dispatch mode, no profiler."""
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() or _profiler_enabled())


def _functorch(A: torch.Tensor) -> bool:
    """A is wrapped by a functorch transform (vmap, grad): a plain-typed tensor that the transform watches."""
    return _functorch_wrapped is not None and _functorch_wrapped(A)


def _native_cuda() -> bool:
    """The native CUDA kernels serve lowra::matmul (registered at import; cached after the first answer)."""
    global _NATIVE_CUDA
    if _NATIVE_CUDA is None:
        from . import NATIVE_DEVICES

        _NATIVE_CUDA = "cuda" in NATIVE_DEVICES
    return _NATIVE_CUDA


def _native_cpu() -> bool:
    """The native CPU kernels serve lowra::matmul on the CPU (cached after the first answer)."""
    global _NATIVE_CPU
    if _NATIVE_CPU is None:
        from . import NATIVE_DEVICES

        _NATIVE_CPU = "cpu" in NATIVE_DEVICES
    return _NATIVE_CPU


_NATIVE_CUDA = _NATIVE_CPU = None


def _linear_dequantized(A, packed, absmax, bits, code, offsets, blocksize, shape, bias, nested, prepared=None):
    # The single place the forward kernel is chosen: a fused dequantize-matmul op replaces these lines. `prepared`
    # (QuantStateLowRA.prepared_dequantize, where _eager_direct allows it) launches the op's kernel directly.
    if prepared is not None:
        W = prepared(A.dtype)
    else:
        W = torch.ops.lowra.dequantize.default(packed, absmax, bits, code, offsets, blocksize, shape, A.dtype, *nested)
    return torch.nn.functional.linear(A, W, bias)


class MatMulLowRA(torch.autograd.Function):
    """A @ W.T + bias with W = dequantize(packed); gradients for A and bias only (the quantized base is frozen).

    W is recomputed in backward rather than saved, so training holds only the packed weight (as bnb's MatMul4Bit).
    `prepared` (eager only, else None): the weight's PreparedDequantize, which both passes call instead of the op
    (the backward only while it still points where the saved tensors are stored).
    """

    @staticmethod
    def forward(ctx, A, packed, absmax, bits, code, offsets, blocksize: int, shape: list[int], bias, nested_absmax,
                nested_code, nested_offset, nested_blocksize: int, prepared):
        ctx.save_for_backward(packed, absmax, bits, code, offsets, nested_absmax, nested_code, nested_offset)
        ctx.blocksize, ctx.shape, ctx.nested_blocksize, ctx.prepared = blocksize, shape, nested_blocksize, prepared
        ctx.bias_dtype = None if bias is None else bias.dtype
        nested = (nested_absmax, nested_code, nested_offset, nested_blocksize)
        out = _linear_dequantized(A, packed, absmax, bits, code, offsets, blocksize, shape, bias, nested, prepared)
        # With a bias and other than 2-D input, F.linear returns a view of its 2-D result; a Function's view output
        # cannot be modified in place (out[0] += 1, peft's mixed-adapter batches), so it goes out as a tensor of its
        # own. (Decided by shapes, not out._is_view(), which Dynamo cannot trace.)
        return out.clone() if bias is not None and A.dim() != 2 else out

    @staticmethod
    def backward(ctx, grad):
        grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:
            packed, absmax, bits, code, offsets, *nested = ctx.saved_tensors
            prepared = ctx.prepared
            if prepared is not None and _eager_direct(grad, None) and prepared.reads(packed, absmax, bits, code,
                                                                                     offsets, *nested):
                W = prepared(grad.dtype)
            else:
                W = torch.ops.lowra.dequantize(packed, absmax, bits, code, offsets, ctx.blocksize, ctx.shape,
                                               grad.dtype, *nested, ctx.nested_blocksize)
            grad_A = torch.matmul(grad, W)
        if ctx.needs_input_grad[8]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_A, None, None, None, None, None, None, None, grad_bias, None, None, None, None, None


def matmul_lowra(
    A: torch.Tensor, packed: torch.Tensor, quant_state: QuantStateLowRA, bias: torch.Tensor | None = None, *,
    cache_absmax: bool = False, operands: KernelOperands | BufferedOperands | None = None,
) -> torch.Tensor:
    """A @ W.T (+ bias) computed in A's dtype, W the dequantized LowRA weight (cf. bitsandbytes.matmul_4bit).

    cache_absmax: keep the decoded double-quantized block scales for the next call (QuantStateLowRA.absmax_fp32).
    operands: KernelOperands.of(quant_state, cache_absmax) where the caller keeps them (LinearLowRA.kept_operands;
    a compiled call then reads none of the state's fields), or BufferedOperands for a compiled call's fused matmul
    (the dense paths then take its `fields`). quant_state may be None where operands are given: a compiled
    LinearLowRA call does not reach for its state at all."""
    ops = operands
    if quant_state is not None or ops is None:
        _check_state(quant_state)
    if isinstance(ops, BufferedOperands):
        meta = buffered_meta(ops.key)
        nbytes, device, cols, rows = meta.packed_nbytes, ops.buffer.device, meta.cols, meta.shape[0]
    else:
        nbytes, device, cols, rows = ((quant_state.packed_nbytes, quant_state.device, quant_state.cols,
                                       quant_state.rows) if ops is None
                                      else (ops.packed_nbytes, ops.device, ops.cols, ops.shape[0]))
    _check_packed(packed, nbytes, device)
    if A.dim() == 0:
        raise ValueError(f"input is a 0-d tensor; the quantized weight expects [..., {cols}]")
    if A.shape[-1] != cols:
        raise ValueError(f"input has {A.shape[-1]} features, the quantized weight expects {cols}")
    if A.dtype not in FLOAT_DTYPES:  # named here: the kernels' own checks would name their launchers
        raise ValueError(f"input is {A.dtype}; LowRA computes in float32, float16 or bfloat16 (cast the input, or give "
                         "LinearLowRA a compute_dtype: it casts the input and returns the output in the input's dtype)")
    if A.device != packed.device:  # as nn.Linear; F.linear itself returns a CPU result for a meta weight
        raise ValueError(f"input is on {A.device} but the quantized weight is on {packed.device}: move them to one "
                         "device")
    if bias is not None:
        if bias.shape != (rows,):  # here, not as a kernel launcher's message or a broadcast error
            raise ValueError(f"bias has shape {tuple(bias.shape)}; the quantized weight has {rows} output features")
        if bias.dtype != A.dtype:
            bias = bias.to(A.dtype)
    grad = _needs_grad(A, bias)
    fused = not grad and _fused_decode_shape(A)
    direct = quant_state is not None and _eager_direct(A, bias)
    if fused and direct:
        return quant_state.prepared_matmul(packed, cache_absmax)(A, bias)
    if isinstance(ops, BufferedOperands):  # a compiled call (LinearLowRA.kept_operands)
        if fused:
            return torch.ops.lowra.matmul_buffered.default(
                A, packed, ops.buffer, list(meta.shape), meta.blocksize, meta.nested, meta.nested_blocksize,
                None if meta.group_rows is None else list(meta.group_rows), bias)
        ops = ops.fields  # the dense paths take the kept fields
    if ops is None:
        ops = KernelOperands.of(quant_state, cache_absmax, plan=fused and A.is_cuda)
    args = (ops.absmax, ops.bits, ops.code, ops.row_offsets, ops.blocksize, ops.shape)
    nested = (ops.nested_absmax, ops.nested_code, ops.nested_offset, ops.nested_blocksize)
    # the dense path's dequantize launched directly where nothing watches ops, as the fused one above
    direct = direct and not fused
    prepared = quant_state.prepared_dequantize(packed, cache_absmax) if direct else None
    if grad:
        return MatMulLowRA.apply(A, packed, *args, bias, *nested, prepared)
    if fused:
        return torch.ops.lowra.matmul.default(A, packed, *args, bias, ops.row_order, ops.group_rows, *nested)
    # Inference: the same two ops as MatMulLowRA.forward, without the autograd.Function machinery (which builds a
    # context object per call for a backward that cannot happen).
    return _linear_dequantized(A, packed, *args, bias, nested, prepared)


def bits_report(states) -> dict[str, float]:
    """Nominal and effective bits over several quantized matrices (docs/format.md "Bits accounting")."""
    states = list(states)
    if not states:
        raise ValueError("bits_report needs at least one QuantStateLowRA")
    params = sum(s.rows * s.cols for s in states)
    nominal = sum(float(s.bits.double().sum()) * s.cols for s in states) / params
    effective = 8.0 * sum(s.nbytes for s in states) / params
    return {"parameters": params, "nominal_bits": nominal, "effective_bits": effective}


def quantize_lowra_at_bits(
    W: torch.Tensor,
    bits: float = 1.75,
    precisions=None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    iterations: int = 2,
    mode: str = "per_channel",
    method: str = "greedy",
    compress_statistics: bool = False,
    **assign_kwargs,
) -> tuple[torch.Tensor, QuantStateLowRA]:
    """Learn tables (learner.learn_layer), assign per-row precisions for an average of `bits` code bits over this
    one matrix (assigner.assign_precisions), then quantize. For a budget shared by many layers use
    convert.convert_to_lowra. precisions defaults to assigner.default_precisions(bits): (1, 2, 4) below 2 bits,
    (2, 4) from 2 bits on. The nominal bits of the result never exceed `bits`."""
    import numpy as np

    from .assigner import assign_precisions
    from .learner import learn_layer, tables_for_bits
    from .plan import PlanSettings

    check_weight(W)
    settings = PlanSettings.of_call(bits, precisions, blocksize, iterations, mode, method, assign_kwargs)
    precisions = settings.allowed_precisions()
    fits = learn_layer(W, precisions, blocksize=blocksize, iterations=iterations, mode=mode)
    errors = torch.stack([fits[p].error for p in precisions], dim=1).cpu().numpy()
    sizes = np.full(W.shape[0], W.shape[1], dtype=np.int64)
    assignment = assign_precisions(errors, sizes, bits, precisions, method=method, **assign_kwargs)
    row_bits = torch.from_numpy(assignment.bits.astype(np.uint8)).to(W.device)
    code, thr = tables_for_bits(fits, row_bits)
    return quantize_lowra(W, row_bits, code, thr, blocksize=blocksize, compress_statistics=compress_statistics)
