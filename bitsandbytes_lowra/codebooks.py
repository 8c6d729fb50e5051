"""Initial codebooks (mappings) and thresholds: the paper's Appendix F values.

NormalFloat for 2 and 4 bits, {-1, +1} with threshold 0 for 1 bit. Thresholds of 4 bits are the midpoints of the
NF4 values (Appendix F lists only its mapping). These are also the "QLoRA / NF" baseline codebooks.
"""

from __future__ import annotations

import torch

from .format import CODEBOOK_SLOTS, THRESHOLD_SLOTS

NF4 = (
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.28444138, -0.18477343, -0.09105, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.33791524, 0.44070983, 0.562617, 0.72295684, 1.0,
)
NF2 = (-1.0, 0.0, 0.3379, 1.0)
NF2_THRESHOLDS = (-0.5, 0.16895762, 0.66895762)  # Appendix F, Listing 1
BINARY = (-1.0, 1.0)
BINARY_THRESHOLDS = (0.0,)

_MAPPINGS = {1: BINARY, 2: NF2, 4: NF4}


def midpoints(values: torch.Tensor) -> torch.Tensor:
    return (values[..., 1:] + values[..., :-1]) / 2


def initial_mapping(bits: int) -> torch.Tensor:
    """float32 [2^bits] initial codebook for one precision."""
    return torch.tensor(_MAPPINGS[bits], dtype=torch.float32)


def initial_thresholds(bits: int) -> torch.Tensor:
    """float32 [2^bits - 1] initial decision thresholds for one precision."""
    if bits == 1:
        return torch.tensor(BINARY_THRESHOLDS, dtype=torch.float32)
    if bits == 2:
        return torch.tensor(NF2_THRESHOLDS, dtype=torch.float32)
    return midpoints(initial_mapping(4))


def to_slots(values: torch.Tensor, slots: int, fill: float = 0.0) -> torch.Tensor:
    """Pad the last dim of a [..., k] tensor to `slots` entries (the storage width of codebooks/thresholds)."""
    k = values.shape[-1]
    if k > slots:
        raise ValueError(f"{k} values do not fit in {slots} slots")
    pad = values.new_full((*values.shape[:-1], slots - k), fill)
    return torch.cat([values, pad], dim=-1)


def nf_tables(bits: torch.Tensor, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NormalFloat codebook [rows, 16] and thresholds [rows, 15] for a per-row precision vector."""
    rows = bits.numel()
    code = torch.zeros(rows, CODEBOOK_SLOTS, dtype=torch.float32)
    thr = torch.zeros(rows, THRESHOLD_SLOTS, dtype=torch.float32)
    b = bits.cpu()
    for p in (1, 2, 4):
        sel = b == p
        if sel.any():
            code[sel] = to_slots(initial_mapping(p), CODEBOOK_SLOTS)
            thr[sel] = to_slots(initial_thresholds(p), THRESHOLD_SLOTS)
    return code.to(dtype=dtype, device=bits.device), thr.to(dtype=dtype, device=bits.device)
