"""LoftQ and PiSSA initialization on the real LowRA format (paper section 4.1, Appendix D).

LoftQ (Li et al., 2023) alternates, starting from zero adapters,

    Q_t       = quantize(W - s * B_{t-1} A_{t-1})          (our quantizer, real packed codes + absmax)
    B_t, A_t  = rank-r SVD of (W - dequantize(Q_t))         split so that s * B_t @ A_t is that SVD part

where s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA) is peft's scaling: peft computes
base(x) + s * B(A(x)), so the factors are divided by sqrt(s) each. peft's own loftq_utils sets A=R, B=L and ignores s,
and fake-quantizes with NF4; here every step runs the lowra:: quantize / dequantize ops, so the error we minimize is the
error of the weights the model will actually use. PiSSA (Meng et al., 2024) runs the same alternation but starts with
the SVD of W (no quantization first), so one iteration gives the classic PiSSA pair (top-r SVD of W, quantized
residual).

The plan's precisions, codebooks and thresholds stay fixed across steps. They were chosen for W: the precisions by a
model-wide assignment under a global bit budget (re-planning one layer would break the budget, re-planning all of them
costs a full learner + ILP pass per step), the codebooks by a Lloyd-Max fit of W's normalized rows. W - s*B*A differs
from W by a rank-r term whose size is that of the quantization error, so its per-row distribution is close to W's and
the tables still fit; the block scales (absmax) are recomputed at every step since they are part of quantizing the
residual, not of the plan. Keeping the plan fixed also keeps what is stored (config, checkpoint) consistent with the
weights LoftQ produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .format import (
    DEFAULT_BLOCKSIZE,
    LowRAFormatError,
    check_bits,
    check_blocksize,
    check_codebook,
    check_thresholds,
    check_weight,
    row_offsets,
)

INITS = ("loftq", "pissa")
DEFAULT_ITERATIONS = 5  # the paper follows LoftQ's recommendation of five alternating steps


@dataclass
class LoftQResult:
    """Quantized residual base (real packed format) and adapter initialization of one layer.

    `lora_A` [r, in] and `lora_B` [out, r] are float32 and satisfy scaling * lora_B @ lora_A = the low-rank part.
    `errors[t]` is ||W - (dequantize(Q) + scaling * B @ A)||_F after step t + 1; the returned pair is the one of step
    `best_step` (the lowest error; the last step unless the alternation went up). `baseline_error` is the same norm
    for plain quantization with zero-initialized LoRA (B = 0).
    """

    packed: torch.Tensor  # uint8 [row_offsets[-1]]
    absmax: torch.Tensor  # float32 [rows, blocks]
    bits: torch.Tensor
    codebook: torch.Tensor
    thresholds: torch.Tensor
    row_offsets: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    init: str
    errors: list[float] = field(default_factory=list)
    best_step: int = 0
    baseline_error: float = float("nan")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self.packed, self.absmax, self.bits, self.codebook, self.row_offsets, self.blocksize,
                           self.shape, dtype)

    def low_rank(self) -> torch.Tensor:
        """scaling * B @ A, float32 [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A)


def _dequantize(packed, absmax, bits, codebook, offsets, blocksize, shape, dtype=torch.float32) -> torch.Tensor:
    return torch.ops.lowra.dequantize(packed, absmax, bits, codebook, offsets, blocksize, list(shape), dtype)


def low_rank_factors(R: torch.Tensor, rank: int, scaling: float, svd_niter: int | None = None):
    """(B [out, r], A [r, in]) with scaling * B @ A = the best rank-r approximation of R (float32).

    sqrt(S / scaling) goes to each factor, as LoftQ / PiSSA split the singular values, so B and A have the same
    scale and the adapter's learning dynamics do not depend on which factor carries S. `svd_niter` switches from the
    exact SVD to torch.svd_lowrank with that many subspace iterations (for very large layers).
    """
    R = R.float()
    if svd_niter is None:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        U, S, V = torch.svd_lowrank(R, q=min(rank + 10, *R.shape), niter=svd_niter)
        U, S, Vh = U[:, :rank], S[:rank], V[:, :rank].T
    root = torch.sqrt(S / scaling)
    return (U * root[None, :]).contiguous(), (root[:, None] * Vh).contiguous()


def check_loftq_args(W, rank, iterations, scaling, init, svd_niter=None) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > min(W.shape):
        raise ValueError(f"rank {rank} exceeds min(out_features, in_features) = {min(W.shape)} of the weight")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"scaling (lora_alpha / r) must be a finite positive number, got {scaling!r}")
    if svd_niter is not None and (not isinstance(svd_niter, int) or svd_niter < 0):
        raise ValueError(f"svd_niter must be None (exact SVD) or a non-negative integer, got {svd_niter!r}")


@torch.no_grad()
def lowra_loftq(
    W: torch.Tensor,
    bits: torch.Tensor,
    codebook: torch.Tensor,
    thresholds: torch.Tensor,
    rank: int,
    iterations: int = DEFAULT_ITERATIONS,
    scaling: float = 1.0,
    blocksize: int = DEFAULT_BLOCKSIZE,
    init: str = "loftq",
    svd_niter: int | None = None,
) -> LoftQResult:
    """LoftQ (or PiSSA) for one weight W [out, in] with a fixed plan (bits, codebook, thresholds per row).

    Runs on W's device (CPU or CUDA: the lowra:: ops dispatch there); the arithmetic is float32 whatever W's dtype.
    The alternation is not guaranteed to descend: the SVD step is optimal for a fixed Q, but quantizing with fixed
    tables and fresh block scales is not a projection (with codebooks that overshoot, e.g. the unlearned 1-bit
    {-1, +1}, the error can grow from step to step). So the lowest-error step is returned, never a worse one.
    """
    check_weight(W)
    check_blocksize(blocksize)
    rows = W.shape[0]
    check_bits(bits, rows)
    check_codebook(codebook, bits)
    check_thresholds(thresholds, bits)
    if codebook.dtype != torch.float16 or thresholds.dtype != torch.float16:
        raise LowRAFormatError(f"codebook and thresholds must be float16, got {codebook.dtype} / {thresholds.dtype}")
    check_loftq_args(W, rank, iterations, scaling, init, svd_niter)

    dev = W.device
    Wf = W.float()
    bits = bits.to(device=dev, dtype=torch.uint8)
    codebook, thresholds = codebook.to(dev), thresholds.to(dev)
    offsets = row_offsets(bits, W.shape[1], blocksize).to(dev)
    shape = tuple(W.shape)

    def quantize(target):
        packed, absmax = torch.ops.lowra.quantize(target.contiguous(), bits, thresholds, offsets, blocksize)
        return packed, absmax, _dequantize(packed, absmax, bits, codebook, offsets, blocksize, shape)

    def err(deq, low):
        return float(torch.linalg.norm(Wf - deq - low))

    packed, absmax, deq = quantize(Wf)
    baseline = err(deq, 0.0)
    errors, best = [], None

    def record(packed, absmax, deq, B, A):
        nonlocal best
        errors.append(err(deq, scaling * (B @ A)))
        if best is None or errors[-1] < errors[best[0]]:
            best = (len(errors) - 1, packed, absmax, B, A)

    if init == "loftq":
        # step t: Q_t = quantize(W - low_{t-1}) (low_0 = 0), then low_t = SVD_r(W - Q_t)
        for t in range(iterations):
            if t:
                packed, absmax, deq = quantize(Wf - scaling * (B @ A))
            B, A = low_rank_factors(Wf - deq, rank, scaling, svd_niter)
            record(packed, absmax, deq, B, A)
    else:
        # step t: low_t = SVD_r(W - Q_{t-1}) (Q_0 = 0, so low_1 = SVD_r(W)), then Q_t = quantize(W - low_t)
        deq = torch.zeros_like(Wf)
        for _ in range(iterations):
            B, A = low_rank_factors(Wf - deq, rank, scaling, svd_niter)
            packed, absmax, deq = quantize(Wf - scaling * (B @ A))
            record(packed, absmax, deq, B, A)
    step, packed, absmax, B, A = best
    return LoftQResult(
        packed=packed, absmax=absmax, bits=bits, codebook=codebook, thresholds=thresholds, row_offsets=offsets,
        blocksize=blocksize, shape=shape, lora_A=A, lora_B=B, scaling=float(scaling), init=init, errors=errors,
        best_step=step, baseline_error=baseline,
    )
