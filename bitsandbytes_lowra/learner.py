"""Mapping/threshold learner (paper section 5, Appendices F and G): weighted Lloyd-Max per output channel.

For every row (output channel) of a weight and every precision in {1, 2, 4} bits it learns the codebook (mapping)
and the decision thresholds of the row. Rows are cut into `blocksize` blocks, each normalized by its absmax; in the
Lloyd-Max objective sum w * (v - y[code])^2 an element weighs w = absmax**weight_power of its block (the paper:
weight_power=1; the weight-space squared error sum (x - absmax * y)^2 is weight_power=2).

Reported errors have the semantics of the lowra quantize -> dequantize round trip (docs/format.md): tables rounded
to float16 (their storage dtype), v = x.float() / absmax (0 in all-zero blocks), code = number of used thresholds t
with v > t, reconstruction = codebook_fp32[code] * absmax in float32. `PrecisionFit.error` is the float64 sum over
the row's real (unpadded) elements of (x - reconstruction)^2: the assigner's input, and exactly what the kernels give.

Algorithm, per precision:
- start from the Appendix F tables (codebooks.initial_mapping / initial_thresholds);
- iteration: assign with the current float16 thresholds (the kernel's rule), move each level to the weighted
  centroid of its bin (an empty bin keeps its level), sort, round to float16, thresholds = float16 midpoints;
- a row ("per_channel") or the layer ("shared") stops at the first iteration whose objective does not fall
  strictly and keeps the last one that did;
- finally the weight-space error of the result is compared with that of the Appendix F tables and the better one is
  kept (they can disagree when weight_power != 2): the result is never worse than the initial tables.

Implementation: each row's real elements are sorted once by normalized value, so the bins of any threshold set are
contiguous ranges. Bin sums are then differences of prefix sums, which are kept in int64 fixed point: exact,
independent of summation order, hence deterministic and identical on CPU and CUDA (torch's float cumsum on CUDA is
not deterministic, nor are scatter_add/bincount there). An iteration costs O(2**bits * log(cols)) per row; the
exact error costs one pass over the elements (codes are runs in sorted order: no per-element search). All rows of a
chunk are processed at once; chunks of rows bound the memory.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from . import codebooks
from .format import (
    ALLOWED_BITS,
    CODEBOOK_SLOTS,
    META_DTYPE,
    THRESHOLD_SLOTS,
    LowRAFormatError,
    check_bits,
    check_blocksize,
    check_weight,
    padded_cols,
    plain_number,
)

MODES = ("per_channel", "shared", "fixed_mapping")
# Elements per chunk when chunk_rows is None; a chunk peaks near 80 bytes per element (sorted values, float64
# originals, int64 prefix sums of three statistics), so about 0.3 GB on CPU and 2.7 GB on a GPU.
_CHUNK_ELEMENTS = {"cpu": 1 << 22}
_CHUNK_ELEMENTS_DEFAULT = 1 << 25


@dataclass
class PrecisionFit:
    """Learned tables of every row of one layer at one precision."""

    bits: int
    codebook: torch.Tensor  # float16 [rows, 2**bits], sorted ascending
    thresholds: torch.Tensor  # float16 [rows, 2**bits - 1]
    error: torch.Tensor  # float64 [rows]: squared error in weight space with the float16 tables
    iterations: int  # Lloyd updates actually run (the most any row of the layer ran)


@dataclass
class _Rows:
    """One chunk of rows, normalized once and reused for every precision and iteration.

    The real (unpadded) elements of each row are sorted by normalized value, so that the bins of any threshold set
    are contiguous ranges: bin sums are differences of prefix sums (an iteration costs O(2**bits * log(cols)) per
    row) and the kernel's codes are runs of equal values (the exact error needs no per-element search).
    """

    v: torch.Tensor  # float32 [r, n] normalized values (the kernel's float32 division), ascending per row
    x: torch.Tensor  # float64 [r, n] original values, same order
    a: torch.Tensor  # float32 [r, n] absmax of each element's block, same order
    prefix: torch.Tensor  # int64 [3, r, n + 1] prefix sums of (w, w*v, w*v^2), fixed point
    unit: torch.Tensor  # float64 [r]: prefix differences * unit = sums with w = absmax**weight_power


# Fixed-point prefix sums: integer additions are exact, so bin sums do not depend on the order of summation
# (torch's float cumsum is nondeterministic on CUDA) and come out identical on every device.
def _fixed_point_bits(cols: int) -> int:
    return 62 - max(1, math.ceil(math.log2(cols + 1)))


def _prepare(W: torch.Tensor, blocksize: int, weight_power: float, device: torch.device) -> _Rows:
    rows, cols = W.shape
    pc = padded_cols(cols, blocksize)
    nb = pc // blocksize
    if pc == cols:
        x = W.to(device=device, dtype=torch.float32).contiguous()
    else:
        x = torch.zeros(rows, pc, dtype=torch.float32, device=device)
        x[:, :cols] = W.to(device=device, dtype=torch.float32)
    blocks = x.view(rows, nb, blocksize)
    absmax = blocks.abs().amax(dim=-1)  # [r, nb]
    # The kernel's normalization: IEEE float32 division; an all-zero block divides 0 by 1 and gives 0.
    v = (blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[..., None]).view(rows, pc)
    # Padded elements are left out here, so they take no part in the fit or the error.
    v, order = torch.sort(v[:, :cols], dim=1, stable=True)
    block = order // blocksize
    x = torch.gather(x, 1, order).double()
    del order
    a = torch.gather(absmax, 1, block)
    # Block weights relative to the row's largest absmax lie in [0, 1], so one power-of-two scale 2**k fits every
    # row into int64; folded into the weight, it makes w*v and w*v^2 exact multiples as well.
    k = _fixed_point_bits(cols)
    row_max = absmax.amax(dim=1, keepdim=True)  # [r, 1]
    rel = absmax / torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    # Exact powers for the usual cases, so that CPU and CUDA agree bit for bit (their pow() may differ by an ulp).
    w = rel if weight_power == 1 else rel * rel if weight_power == 2 else rel.pow(weight_power)
    wb = torch.where(rel > 0, w, torch.zeros_like(rel)) * 2.0**k  # [r, nb]
    st = torch.empty(3, rows, cols, dtype=torch.float32, device=device)
    torch.gather(wb, 1, block, out=st[0])
    del block
    torch.mul(st[0], v, out=st[1])
    torch.mul(st[1], v, out=st[2])
    prefix = torch.empty(3, rows, cols + 1, dtype=torch.int64, device=device)
    prefix[..., 0] = 0
    # The cast drops less than 2**-k of the row's largest weight per element; the integer sums are exact (< 2**62).
    torch.cumsum(st.to(torch.int64), dim=2, out=prefix[..., 1:])
    unit = row_max.squeeze(1).double().pow(weight_power) * 2.0**-k
    return _Rows(v=v, x=x, a=a, prefix=prefix, unit=unit)


def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.expand(rows, -1).contiguous() if t.dim() == 1 else t


def _bin_edges(rows: _Rows, thresholds: torch.Tensor) -> torch.Tensor:
    """int64 [r, k + 1]: bin j of each row is the sorted range [edges[j], edges[j + 1])."""
    r, n = rows.v.shape
    # The kernel's code is the number of thresholds strictly below v, so bin j holds t[j-1] < v <= t[j] and ends
    # at the number of values <= t[j].
    ends = torch.searchsorted(rows.v, _expand_rows(thresholds.float(), r), side="right")
    return torch.cat([ends.new_zeros(r, 1), ends, ends.new_full((r, 1), n)], dim=1)


def _bin_sums(rows: _Rows, thresholds: torch.Tensor) -> torch.Tensor:
    """float64 [r, k, 3]: per bin, sums of (w, w*v, w*v^2) in absolute units."""
    edges = _bin_edges(rows, thresholds)
    at = torch.gather(rows.prefix, 2, edges.expand(3, -1, -1))  # [3, r, k + 1]
    return (at[..., 1:] - at[..., :-1]).permute(1, 2, 0).double() * rows.unit[:, None, None]


def _objective(sums: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """float64 [r]: the weighted Lloyd-Max objective sum w * (v - y[code])^2 per row, from the bin sums."""
    y = codebook.double()
    return (sums[..., 2] - 2 * y * sums[..., 1] + y * y * sums[..., 0]).sum(dim=-1)


def _row_error(rows: _Rows, codebook: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """float64 [r]: sum over real elements of (w - codebook[code] * absmax)^2, exactly as the kernels compute it:
    the kernel's codes, float32 reconstruction, then float64 difference and sum."""
    r, n = rows.v.shape
    counts = _bin_edges(rows, thresholds).diff(dim=1)
    levels = _expand_rows(codebook.float(), r)
    recon = torch.repeat_interleave(levels.reshape(-1), counts.reshape(-1), output_size=r * n).view(r, n)
    diff = torch.sub(rows.x, recon.mul_(rows.a))  # the float32 product, promoted exactly
    return _row_square_sums(diff)


# Columns per first-level partial sum of _row_square_sums.
_SUM_BLOCK = 1024


def _row_square_sums(d: torch.Tensor) -> torch.Tensor:
    """float64 [r]: sum(d * d, dim=1) in an order that does not depend on r, so errors are bit-identical whatever the
    chunking. torch reduces a long row alone (one output) split across threads, but the same row among others in one
    piece; einsum takes another path for one row. Partial sums of fixed blocks, then their sum, keep every reduction
    either short or with many outputs."""
    r, n = d.shape
    sq = d.mul_(d)
    if n % _SUM_BLOCK:  # zero padding adds exact zeros; a copy only where the columns need it
        sq = torch.nn.functional.pad(sq, (0, -n % _SUM_BLOCK))
    return sq.view(r, -1, _SUM_BLOCK).sum(dim=2).sum(dim=1)


def _fp16_tables(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort, round to the storage dtype, thresholds = float16 midpoints of the float16 levels."""
    c16 = levels.sort(dim=-1).values.to(META_DTYPE)
    return c16, codebooks.midpoints(c16.float()).to(META_DTYPE)


def _lloyd_update(codebook16: torch.Tensor, sums: torch.Tensor):
    """Weighted centroids (M-step); a bin without weight keeps its previous level."""
    sw, swv = sums[..., 0], sums[..., 1]
    filled = sw > 0
    centroids = torch.where(filled, swv / torch.where(filled, sw, torch.ones_like(sw)), codebook16.double())
    return _fp16_tables(centroids.float())


def _initial_tables(bits: int, device, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    c16 = codebooks.initial_mapping(bits).to(device=device, dtype=META_DTYPE)
    if mode == "fixed_mapping":
        # Best thresholds for fixed levels under a squared error: the midpoints of the stored (float16) levels.
        return c16, codebooks.midpoints(c16.float()).to(META_DTYPE)
    return c16, codebooks.initial_thresholds(bits).to(device=device, dtype=META_DTYPE)


def _bit_width(p) -> int | None:
    """p as an int bit width: any integer type (numpy, 0-d tensors) or an integral float (2.0, as LowRAConfig takes
    it); None for anything else (bools, 2.5, strings)."""
    p = plain_number(p)
    if isinstance(p, bool):
        return None
    if isinstance(p, float):
        return int(p) if p.is_integer() else None
    try:
        return operator.index(p)
    except TypeError:
        return None


def _check_args(W, name, precisions, blocksize, iterations, mode, weight_power, chunk_rows, device):
    """The arguments of learn_layer, checked, as plain Python values: (precisions, blocksize, iterations,
    weight_power, chunk_rows, device)."""
    check_weight(W, name)
    dev = _check_device(device, W)
    blocksize = check_blocksize(blocksize)
    try:
        items = tuple(precisions)
    except TypeError:
        raise ValueError(f"precisions must be an iterable of bit widths, got {precisions!r}") from None
    precs = tuple(_bit_width(p) for p in items)
    if not precs or len(set(precs)) != len(precs) or any(p not in ALLOWED_BITS for p in precs):
        raise ValueError(f"precisions must be distinct values from {ALLOWED_BITS}, got {precisions!r}")
    iterations, weight_power, chunk_rows = (plain_number(v) for v in (iterations, weight_power, chunk_rows))
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(weight_power, bool) or not isinstance(weight_power, (int, float)) or not math.isfinite(weight_power) \
            or weight_power < 0:
        raise ValueError(f"weight_power must be a finite number >= 0, got {weight_power!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return precs, blocksize, iterations, float(weight_power), chunk_rows, dev


def _check_device(device, W: torch.Tensor) -> torch.device:
    """Where to compute, named when it cannot be used (torch's own messages are a bare AssertionError or a list of
    every device type)."""
    try:
        dev = torch.device(device) if device is not None else W.device
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device (e.g. 'cpu', 'cuda'), got {device!r}") from e
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data: the learner needs a real device such as 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA, which this torch build or machine does not have; "
                         "use device='cpu'")
    return dev


def _chunk_bounds(rows: int, cols: int, blocksize: int, chunk_rows: int | None, device: torch.device):
    if chunk_rows is None:
        budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_DEFAULT)
        chunk_rows = max(1, budget // padded_cols(cols, blocksize))
    return [(r0, min(rows, r0 + chunk_rows)) for r0 in range(0, rows, chunk_rows)]


@torch.no_grad()  # weights may be nn.Parameters: no graph, whatever the caller's grad mode
def learn_layer(
    W: torch.Tensor,
    precisions=(1, 2, 4),
    blocksize: int = 64,
    iterations: int = 2,
    mode: str = "per_channel",
    weight_power: float = 1.0,
    chunk_rows: int | None = None,
    device=None,
    name: str = "W",
) -> dict[int, PrecisionFit]:
    """Learn codebooks and thresholds of every row of W [out, in] at each precision.

    mode: "per_channel" (one codebook per row, the paper), "shared" (one codebook per layer and precision, fitted on
    all rows together; rows of the result are copies), "fixed_mapping" (the Appendix F levels are kept; the
    thresholds minimizing the squared error for fixed levels are their midpoints, so nothing iterates).
    iterations: Lloyd updates at most (paper: 2); 0 returns the Appendix F tables (see `nf_fit`).
    weight_power: a block's elements weigh absmax**weight_power in the fit (1 = paper, 2 = exact weight-space error).
    chunk_rows: rows processed at once (None: sized from the layer width to bound memory).
    device: where to compute (default W.device); results are returned on W.device.
    name: what to call W in errors (a checkpoint key).
    """
    precs, blocksize, iterations, weight_power, chunk_rows, dev = _check_args(
        W, name, precisions, blocksize, iterations, mode, weight_power, chunk_rows, device
    )
    bounds = _chunk_bounds(W.shape[0], W.shape[1], blocksize, chunk_rows, dev)
    if mode == "shared":
        fits = _learn_shared(W, precs, blocksize, iterations, weight_power, bounds, dev)
    else:
        iters = 0 if mode == "fixed_mapping" else iterations
        fits = _learn_per_row(W, precs, blocksize, iters, weight_power, bounds, dev, mode)
    out = W.device
    return {
        p: PrecisionFit(f.bits, f.codebook.to(out), f.thresholds.to(out), f.error.to(out), f.iterations)
        for p, f in fits.items()
    }


def _learn_per_row(W, precs, blocksize, iterations, weight_power, bounds, dev, mode) -> dict[int, PrecisionFit]:
    rows = W.shape[0]
    res = {}
    for p in precs:
        k = 2**p
        res[p] = PrecisionFit(
            bits=p,
            codebook=torch.empty(rows, k, dtype=META_DTYPE, device=dev),
            thresholds=torch.empty(rows, k - 1, dtype=META_DTYPE, device=dev),
            error=torch.empty(rows, dtype=torch.float64, device=dev),
            iterations=0,
        )
    for r0, r1 in bounds:
        chunk = _prepare(W[r0:r1], blocksize, weight_power, dev)
        n = r1 - r0
        for p in precs:
            c0, t0 = _initial_tables(p, dev, mode)
            init_c, init_t = c0.expand(n, -1).contiguous(), t0.expand(n, -1).contiguous()
            init_err = _row_error(chunk, init_c, init_t)
            best_c, best_t, err, ran = init_c, init_t, init_err, 0
            if iterations > 0:
                sums = _bin_sums(chunk, init_t)
                best_obj = _objective(sums, init_c)
                cur_c = init_c
                active = torch.ones(n, dtype=torch.bool, device=dev)
                for it in range(iterations):
                    cur_c, cur_t = _lloyd_update(cur_c, sums)
                    sums = _bin_sums(chunk, cur_t)
                    obj = _objective(sums, cur_c)
                    ran = it + 1
                    # A row keeps iterating only while its objective falls strictly.
                    active = active & (obj < best_obj)
                    best_c = torch.where(active[:, None], cur_c, best_c)
                    best_t = torch.where(active[:, None], cur_t, best_t)
                    best_obj = torch.where(active, obj, best_obj)
                    if not bool(active.any()):
                        break
                # The reported error decides against the initial tables (they differ when weight_power != 2).
                err = _row_error(chunk, best_c, best_t)
                worse = err > init_err
                best_c = torch.where(worse[:, None], init_c, best_c)
                best_t = torch.where(worse[:, None], init_t, best_t)
                err = torch.where(worse, init_err, err)
            fit = res[p]
            fit.codebook[r0:r1] = best_c
            fit.thresholds[r0:r1] = best_t
            fit.error[r0:r1] = err
            fit.iterations = max(fit.iterations, ran)
        del chunk
    return res


def _learn_shared(W, precs, blocksize, iterations, weight_power, bounds, dev) -> dict[int, PrecisionFit]:
    """All precisions advance in lockstep, one pass over the chunks per Lloyd step: a chunk is prepared (sorted, the
    costly part) 1 + iterations times in all, not once per precision, step and error pass. Keeping every chunk's
    prepared rows instead would give up the memory bound that chunking exists for (about 40 bytes per element)."""
    rows = W.shape[0]
    cached = _prepare(W, blocksize, weight_power, dev) if len(bounds) == 1 else None

    def chunks():
        for r0, r1 in bounds:
            yield r0, r1, cached if cached is not None else _prepare(W[r0:r1], blocksize, weight_power, dev)

    def layer_pass(tables: dict) -> tuple[dict, dict]:
        """Layer bin sums (at the thresholds) and row errors of each precision's (codebook, thresholds)."""
        sums, errs = {}, {p: torch.empty(rows, dtype=torch.float64, device=dev) for p in tables}
        for r0, r1, chunk in chunks():
            for p, (c16, t16) in tables.items():
                # The same order of additions as a sum over the chunks (0 + s0 + s1 + ...): bit-identical totals.
                sums[p] = sums.get(p, 0) + _bin_sums(chunk, t16).sum(dim=0)
                errs[p][r0:r1] = _row_error(chunk, c16, t16)
        return sums, errs

    init = {p: _initial_tables(p, dev, "shared") for p in precs}
    # Each step's errors are computed in its pass (cheap next to preparing the chunk), so no pass is left for them.
    sums, init_err = layer_pass(init)
    best, err, ran = dict(init), dict(init_err), dict.fromkeys(precs, 0)
    if iterations > 0:
        best_obj = {p: _objective(sums[p], init[p][0]) for p in precs}
        cur = dict(init)
        for it in range(iterations):
            if not cur:
                break
            cur = {p: _lloyd_update(c16, sums[p]) for p, (c16, _) in cur.items()}
            sums, cur_err = layer_pass(cur)
            for p in list(cur):
                obj = _objective(sums[p], cur[p][0])
                ran[p] = it + 1
                if not bool(obj < best_obj[p]):  # the layer stops at the first step whose objective does not fall
                    del cur[p]
                    continue
                best[p], best_obj[p], err[p] = cur[p], obj, cur_err[p]
    res = {}
    for p in precs:
        if best[p] is not init[p] and bool(err[p].sum() > init_err[p].sum()):
            best[p], err[p] = init[p], init_err[p]
        c16, t16 = best[p]
        res[p] = PrecisionFit(p, c16.expand(rows, -1).contiguous(), t16.expand(rows, -1).contiguous(), err[p], ran[p])
    return res


def nf_fit(W: torch.Tensor, precisions=(1, 2, 4), blocksize: int = 64, chunk_rows=None, device=None):
    """The Appendix F / NormalFloat tables, unlearned, with the same error semantics (the QLoRA baseline)."""
    return learn_layer(W, precisions, blocksize, iterations=0, chunk_rows=chunk_rows, device=device)


def tables_for_bits(fits: dict[int, PrecisionFit], bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tables for its assigned precision, padded to the storage slots.

    Returns (codebook float16 [rows, 16], thresholds float16 [rows, 15]) on the fits' device; unused slots are 0.
    """
    if not fits:
        raise ValueError("fits is empty")
    rows = next(iter(fits.values())).codebook.shape[0]
    check_bits(bits, rows)
    b = bits.to(torch.int64)
    dev = next(iter(fits.values())).codebook.device
    code = torch.zeros(rows, CODEBOOK_SLOTS, dtype=META_DTYPE, device=dev)
    thr = torch.zeros(rows, THRESHOLD_SLOTS, dtype=META_DTYPE, device=dev)
    for p in torch.unique(b).tolist():
        if p not in fits:
            raise LowRAFormatError(f"bits asks for {p}-bit rows but no {p}-bit fit was learned (have {sorted(fits)})")
        fit = fits[p]
        if fit.codebook.shape[0] != rows:
            raise ValueError(f"{p}-bit fit has {fit.codebook.shape[0]} rows, expected {rows}")
        sel = (b == p).to(dev)
        code[sel] = codebooks.to_slots(fit.codebook[sel], CODEBOOK_SLOTS)
        thr[sel] = codebooks.to_slots(fit.thresholds[sel], THRESHOLD_SLOTS)
    return code, thr
