"""What LinearLowRA keeps of a quantized weight for its calls, and how it learns that it went stale.

The kernels' operands of a QuantStateLowRA (KernelOperands: its tensors and plain values in the ops' argument order),
and for a compiled fused matmul the state's operand buffer with one interned key for its plain values
(BufferedOperands, BufferedMeta). LinearLowRA.kept_operands keeps them on the module; a compiled call takes them
without reading the weight or the state, so the weight and the state drop them on every change (watch_operands,
drop_kept_operands), and stamp themselves for the eager calls' own checks (_STAMPS). docs/architecture.md says why.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING, NamedTuple

import torch

from .format import NESTED_BLOCKSIZE

if TYPE_CHECKING:
    from .functional import QuantStateLowRA


# Unique stamps: QuantStateLowRA.operands_stamp changes whenever a field the kernels read is set, and no two states
# (copies included) ever share one, so an equal stamp means the same operands; ParamsLowRA.lowra_stamp likewise
# names a weight's codes and state (LinearLowRA.kept_operands keeps both for torch.compile's calls).
_STAMPS = itertools.count(1)


# Modules holding kept operands taken from an object (a ParamsLowRA or a QuantStateLowRA), so that a change to the
# object drops them at once: a compiled LinearLowRA call takes its kept operands without reading the weight or the
# state (LinearLowRA.kept_operands), so nothing in the graph's guards would notice the change. Weak: a module's
# lifetime is not the object's business; not copied or pickled with the object.
_KEEPERS = "_lowra_keepers"


def watch_operands(source, module) -> None:
    """Make `module` one whose kept operands `drop_kept_operands(source)` drops."""
    keepers = source.__dict__.get(_KEEPERS)
    if keepers is None:
        keepers = source.__dict__[_KEEPERS] = weakref.WeakSet()
    keepers.add(module)


def drop_kept_operands(source) -> None:
    """Drop the kept operands of every module that took them from `source` (it changed)."""
    for module in list(source.__dict__.get(_KEEPERS, ())):
        module.__dict__.pop("_kept_operands", None)


class KernelOperands(NamedTuple):
    """What matmul_lowra takes from a QuantStateLowRA: the checks' facts, then the lowra ops' arguments in order."""

    packed_nbytes: int
    device: torch.device
    cols: int
    absmax: torch.Tensor
    bits: torch.Tensor
    code: torch.Tensor
    row_offsets: torch.Tensor
    blocksize: int
    shape: list
    row_order: torch.Tensor | None  # the CUDA kernels' per-precision row grouping (QuantStateLowRA.matmul_plan)
    group_rows: list | None
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    nested_offset: torch.Tensor | None
    nested_blocksize: int

    @classmethod
    def of(cls, state: QuantStateLowRA, cache_absmax: bool = False, plan: bool = True) -> KernelOperands:
        """Read from `state`'s fields; plan=False leaves the CUDA row plan out (None, as on the CPU)."""
        cuda = plan and state.device.type == "cuda"
        row_order, group_rows = state.matmul_plan() if cuda else (None, None)
        absmax, *nested = state.scale_args(cache_absmax)
        return cls(state.packed_nbytes, state.device, state.cols, absmax, state.bits, state.code, state.row_offsets,
                   state.blocksize, list(state.shape), row_order, group_rows, *nested)


class BufferedMeta(NamedTuple):
    """The plain values a compiled fused matmul takes with a state's operand buffer: the checks' facts, then
    lowra::matmul_buffered's arguments after the buffer. Hashable (tuples), so it can be interned (buffered_meta)."""

    packed_nbytes: int
    cols: int
    shape: tuple
    blocksize: int
    nested: bool
    nested_blocksize: int
    group_rows: tuple | None  # with the row order in the buffer (CUDA), as KernelOperands' row_order / group_rows


# Every BufferedMeta met so far, each under one number for the life of the process (a key never changes meaning).
_BUFFERED_META: dict[int, BufferedMeta] = {}
_BUFFERED_KEYS: dict[BufferedMeta, int] = {}
_BUFFERED_LOCK = threading.Lock()


def _intern_buffered_meta(meta: BufferedMeta) -> int:
    with _BUFFERED_LOCK:
        key = _BUFFERED_KEYS.get(meta)
        if key is None:
            key = _BUFFERED_KEYS[meta] = len(_BUFFERED_META)
            _BUFFERED_META[key] = meta
        return key


@torch.compiler.assume_constant_result
def buffered_meta(key: int) -> BufferedMeta:
    """The BufferedMeta interned under `key`. A compiled call guards on the key alone (one integer guard where the
    seven values would take about fourteen) and takes the values as constants, which is sound because a key never
    changes meaning."""
    return _BUFFERED_META[key]


class BufferedOperands(NamedTuple):
    """What a compiled fused matmul takes from a QuantStateLowRA whose kernel operands are views of one buffer
    (QuantStateLowRA.operand_buffer): the buffer and the key of its BufferedMeta. One tensor and one integer where
    KernelOperands has eight tensors and seven values, so a compiled call fetches and guards far less per layer."""

    buffer: torch.Tensor
    key: int  # of the BufferedMeta: buffered_meta(key) (a function, not a property: a trace guards a property's code)
    # Where the state's fields were (QuantStateLowRA.operand_addresses) when these were made: an eager call compares
    # (a field's storage swapped leaves the buffer behind); a compiled call never reads it, so it guards nothing.
    addresses: tuple
    fields: KernelOperands  # the same operands one by one, for the paths that do not read the buffer (dense, grad)

    @classmethod
    def of(cls, state: QuantStateLowRA, ops: KernelOperands) -> BufferedOperands | None:
        """From `state`'s operand buffer and `ops` (KernelOperands.of(state)); None where the fields are not the
        buffer's views, or `ops`' row order is not the one in the buffer."""
        buffer = state.operand_buffer()
        if buffer is None or ops.absmax is not state.absmax:
            return None
        slot = state._operand_views(buffer)["row_order"]  # the buffer's (checked just above, not again)
        if ops.row_order is not None and ops.row_order.data_ptr() != slot.data_ptr():
            return None
        meta = BufferedMeta(ops.packed_nbytes, ops.cols, tuple(state.shape), state.blocksize, bool(state.nested),
                            state.state2.blocksize if state.nested else NESTED_BLOCKSIZE,
                            None if ops.group_rows is None else tuple(ops.group_rows))
        return cls(buffer, _intern_buffered_meta(meta), state.operand_addresses(), ops)
