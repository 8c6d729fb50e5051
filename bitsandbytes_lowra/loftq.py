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

from .format import DEFAULT_BLOCKSIZE, check_blocksize, check_weight, plain_number
from .functional import LowRAPlan, QuantStateLowRA, dequantize_lowra, make_plan, quantize_lowra

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

    packed: torch.Tensor  # uint8 codes
    state: QuantStateLowRA
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    init: str
    errors: list[float] = field(default_factory=list)
    best_step: int = 0
    baseline_error: float = float("nan")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_lowra(self.packed, self.state, dtype)

    def low_rank(self) -> torch.Tensor:
        """scaling * B @ A, float32 [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A)


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
    scaling = plain_number(scaling)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"scaling (lora_alpha / r) must be a finite positive number, got {scaling!r}")
    # The factors hold sqrt(S / scaling) in float32: outside float32's normal range that overflows or flushes to 0,
    # and the weight was then refused as containing NaN/Inf.
    f32 = torch.finfo(torch.float32)
    if not f32.tiny <= scaling <= f32.max:
        raise ValueError(f"scaling (lora_alpha / r) = {scaling!r} is outside float32's normal range "
                         f"[{f32.tiny:.4g}, {f32.max:.4g}], where the adapter factors are computed")
    if svd_niter is not None and (not isinstance(svd_niter, int) or svd_niter < 0):
        raise ValueError(f"svd_niter must be None (exact SVD) or a non-negative integer, got {svd_niter!r}")


@torch.no_grad()
def lowra_loftq(
    W: torch.Tensor,
    bits,
    codebooks=None,
    thresholds=None,
    *,
    rank: int,
    iterations: int = DEFAULT_ITERATIONS,
    scaling: float = 1.0,
    blocksize: int = DEFAULT_BLOCKSIZE,
    compress_statistics: bool = False,
    init: str = "loftq",
    svd_niter: int | None = None,
) -> LoftQResult:
    """LoftQ (or PiSSA) for one weight W [out, in] with a fixed plan.

    bits / codebooks / thresholds: a functional.LowRAPlan, or any form functional.make_plan accepts. Every step
    quantizes with functional.quantize_lowra (compress_statistics as the layer will store it, so the error seen here
    is the stored model's) and dequantizes with dequantize_lowra. Runs on W's device (CPU or CUDA: the lowra:: ops
    dispatch there); the arithmetic is float32 whatever W's dtype; the state records W's dtype.
    The alternation is not guaranteed to descend: the SVD step is optimal for a fixed Q, but quantizing with fixed
    tables and fresh block scales is not a projection (with codebooks that overshoot, e.g. the unlearned 1-bit
    {-1, +1}, the error can grow from step to step). So the lowest-error step is returned, never a worse one.
    """
    check_weight(W)
    blocksize = check_blocksize(blocksize)
    check_loftq_args(W, rank, iterations, scaling, init, svd_niter)
    if isinstance(bits, LowRAPlan) and codebooks is None and thresholds is None:
        plan = make_plan(bits.bits, bits.codebook, bits.thresholds, rows=W.shape[0])
    else:
        plan = make_plan(bits, codebooks, thresholds, rows=W.shape[0])
    Wf = W.float()

    def quantize(target):
        packed, state = quantize_lowra(target, plan, blocksize=blocksize, compress_statistics=compress_statistics)
        state.dtype = W.dtype  # the weight's dtype, not the float32 residual's (what dequantize returns by default)
        return packed, state, dequantize_lowra(packed, state, torch.float32)

    def err(deq, low):
        # float64: float32 squares overflow to inf past |W| ~ 1e19 and vanish below ~1e-19, which made every step
        # tie (best_step 0 whatever the steps did).
        return float(torch.linalg.norm((Wf.double() - deq).sub_(low)))

    packed, state, deq = quantize(Wf)
    baseline = err(deq, 0.0)
    errors, best = [], None

    def record(packed, state, deq, B, A):
        nonlocal best
        errors.append(err(deq, scaling * (B @ A)))
        if best is None or errors[-1] < errors[best[0]]:
            best = (len(errors) - 1, packed, state, B, A)

    if init == "loftq":
        # step t: Q_t = quantize(W - low_{t-1}) (low_0 = 0), then low_t = SVD_r(W - Q_t)
        for t in range(iterations):
            if t:
                packed, state, deq = quantize(Wf - scaling * (B @ A))
            B, A = low_rank_factors(Wf - deq, rank, scaling, svd_niter)
            record(packed, state, deq, B, A)
    else:
        # step t: low_t = SVD_r(W - Q_{t-1}) (Q_0 = 0, so low_1 = SVD_r(W)), then Q_t = quantize(W - low_t)
        deq = torch.zeros_like(Wf)
        for _ in range(iterations):
            B, A = low_rank_factors(Wf - deq, rank, scaling, svd_niter)
            packed, state, deq = quantize(Wf - scaling * (B @ A))
            record(packed, state, deq, B, A)
    step, packed, state, B, A = best
    return LoftQResult(
        packed=packed, state=state, lora_A=A, lora_B=B, scaling=float(scaling), init=init, errors=errors,
        best_step=step, baseline_error=baseline,
    )


# ---------------------------------------------------------------------------------------------------------------
# Layer level: LoftQ on a LinearLowRA, and the adapter initialization it stores for peft
# ---------------------------------------------------------------------------------------------------------------

# Buffer names of the stored initialization. Deliberately free of "lora_": nothing may mistake them for adapter weights.
INIT_A, INIT_B = "lowra_init_A", "lowra_init_B"


def layer_plan(layer) -> tuple[LowRAPlan, int, bool]:
    """(plan, blocksize, compress_statistics) of a LinearLowRA: from its state when quantized, else its pending plan."""
    from .nn import LinearLowRA

    if not isinstance(layer, LinearLowRA):
        raise TypeError(f"expected a LinearLowRA, got {type(layer).__name__}")
    state = layer.quant_state or getattr(layer.weight, "quant_state", None)
    if state is not None:
        return LowRAPlan(state.bits.cpu(), state.code.cpu(), state.thresholds.cpu()), state.blocksize, state.nested
    plan = getattr(layer.weight, "lowra_plan", None)
    if plan is None:
        raise ValueError("the LinearLowRA has neither a quantized weight nor a plan: nothing says how to quantize it")
    return plan, layer.blocksize, layer.compress_statistics


def set_quantized_weight(layer, packed: torch.Tensor, state: QuantStateLowRA) -> None:
    """Install packed codes + state as the layer's weight (as a pre-quantized load would)."""
    from .nn import ParamsLowRA

    if tuple(state.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"state has shape {tuple(state.shape)}, the layer is ({layer.out_features}, {layer.in_features})"
        )
    layer.weight = ParamsLowRA(
        packed, requires_grad=False, quant_state=state, blocksize=state.blocksize, compress_statistics=state.nested,
        module=layer, lowra_quantized=True,
    )
    layer.quant_state = state
    layer.blocksize, layer.compress_statistics = state.blocksize, state.nested


def store_init(layer, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float = 1.0, dtype=None) -> None:
    """Record the adapter initialization on the base layer, free of peft's scaling: A0, B0 with B0 @ A0 = the
    low-rank part (= scaling * B @ A). Persistent buffers, so save_pretrained of the quantized model keeps them."""
    root = math.sqrt(scaling)
    dtype = dtype or (layer.quant_state.dtype if layer.quant_state is not None else torch.float32)
    layer.register_buffer(INIT_A, (lora_A.float() * root).to(dtype).contiguous())
    layer.register_buffer(INIT_B, (lora_B.float() * root).to(dtype).contiguous())


def register_init_buffers(layer, rank: int, dtype: torch.dtype = torch.float32, device=None) -> None:
    """Empty init buffers of the right shapes, for loading a LoftQ-quantized checkpoint into a fresh LinearLowRA."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    device = device if device is not None else layer.weight.device
    layer.register_buffer(INIT_A, torch.empty(rank, layer.in_features, dtype=dtype, device=device))
    layer.register_buffer(INIT_B, torch.empty(layer.out_features, rank, dtype=dtype, device=device))


def stored_init(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A0 [r, in], B0 [out, r]) stored by `store_init`, or None."""
    a, b = getattr(layer, INIT_A, None), getattr(layer, INIT_B, None)
    if a is None or b is None:
        return None
    return a, b


def drop_init(layer) -> None:
    """Forget the stored initialization (the base no longer is the residual it was computed for, e.g. after a merge)."""
    for name in (INIT_A, INIT_B):
        layer._buffers.pop(name, None)


@torch.no_grad()
def loftq_linear(
    layer,
    W: torch.Tensor,
    rank: int,
    iterations: int = DEFAULT_ITERATIONS,
    init: str = "loftq",
    svd_niter: int | None = None,
    plan: LowRAPlan | None = None,
) -> LoftQResult:
    """Quantize the dense weight W into `layer` (a LinearLowRA) with LoftQ / PiSSA under the layer's plan.

    The layer gets the quantized residual as its weight (on W's device) and stores the scale-free adapter
    initialization (`store_init`), which the peft integration applies to every adapter created on this layer.
    `plan` overrides the layer's own (a layer still on meta, as in from_pretrained, has none); blocksize and
    compress_statistics then come from the layer's attributes. This is the hook for the transformers quantizer when
    LowRAConfig asks for LoftQ: it returns `layer.weight` as the loaded parameter.
    """
    if plan is None:
        plan, blocksize, compress = layer_plan(layer)
    else:
        blocksize, compress = layer.blocksize, layer.compress_statistics
    if tuple(W.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"W has shape {tuple(W.shape)}, the layer is ({layer.out_features}, {layer.in_features})")
    res = lowra_loftq(
        W, plan, rank=rank, iterations=iterations, scaling=1.0, blocksize=blocksize, compress_statistics=compress,
        init=init, svd_niter=svd_niter,
    )
    set_quantized_weight(layer, res.packed, res.state)
    store_init(layer, res.lora_A, res.lora_B, scaling=1.0, dtype=W.dtype)
    return res
