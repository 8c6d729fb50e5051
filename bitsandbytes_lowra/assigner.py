"""Channelwise precision assignment (paper section 6, Algorithm 1).

Given every output channel's quantization error at each allowed precision and a budget (average code bits per
quantized parameter over the whole model), choose each channel's precision so that the total error is minimal and
the budget is never exceeded. This is a multiple-choice knapsack:

    minimize  sum_i errors[i, j(i)]   subject to   sum_i precisions[j(i)] * sizes[i] <= budget * sum_i sizes[i].

Two methods:

- ``"greedy"`` (default): solve the LP relaxation of the flat problem exactly with the convex-hull greedy
  (Sinha & Zoltners), keep the integral prefix, then spend the leftover bits with a repair pass. It plans a
  Llama-2-7B-sized model (1.35M channels) in about a second and its integer result is certified against the LP
  bound: ``total_error - lower_bound`` is at most one hull step's error gain.
- ``"ilp"``: the paper's two-level pipeline: split channels by parameter count and the budget proportionally,
  K-Means on the per-precision errors, a cluster-level ILP (how many channels of each cluster get each precision),
  then an intra-cluster assignment; the ILPs go through PuLP with HiGHS (highspy) or CBC.

Both report the optimality gap against the LP relaxation of the flat problem (all channels, no clustering).
``errors`` are per-channel totals (e.g. the summed squared error of the row), so no size scaling is applied to them;
``sizes`` only enter the bit budget.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["Assignment", "assign_precisions", "default_precisions", "METHODS", "SOLVERS"]

METHODS = ("greedy", "ilp")
SOLVERS = ("highs", "cbc")
MAX_PRECISION = 8  # bits are returned as uint8; the storage format itself takes 1, 2 and 4
# Relative MIP gap asked of the cluster-level ILP (HiGHS' default is 1e-4, CBC's is 0): tight enough that the
# cluster-level solve is never the limit on the pipeline's quality, loose enough to stay well under a second.
_ILP_GAP_REL = 1e-7


@dataclass(frozen=True)
class Assignment:
    """The chosen precision of every channel and how good the choice is.

    bits: uint8 [N], each one of the allowed precisions.
    total_error: sum of errors[i, bits[i]].
    average_bits: exactly sum(bits * sizes) / sum(sizes) (rounded once to float), never above the budget.
    lower_bound: optimum of the LP relaxation of the flat problem: no assignment has less error.
    gap: (total_error - lower_bound) / lower_bound; 0 when both are 0, inf when only the bound is 0.
    method: "greedy", "ilp-highs" or "ilp-cbc".
    seconds: wall time of the whole call.
    """

    bits: np.ndarray
    total_error: float
    average_bits: float
    lower_bound: float
    gap: float
    method: str
    seconds: float


def default_precisions(budget: float) -> tuple[int, ...]:
    """(1, 2, 4) below 2 bits, (2, 4) at or above (the paper's footnote 4: 1-bit channels hurt LLaMA above 2 bits).

    The weight error is therefore not monotone across 2.0: losing the 1-bit choice costs more than the extra budget
    buys (SmolLM2-135M: 527,779 at 1.999 bits, 560,142 at 2.0; docs/assigner.md). For a budget sweep that is
    monotone, pass precisions=(1, 2, 4) explicitly.
    """
    budget = _check_budget(budget)
    return (1, 2, 4) if budget < 2 else (2, 4)


def check_ilp_options(clusters, time_limit) -> None:
    """The "ilp" method's options: clusters per size group, seconds per solver call (None: no limit)."""
    if isinstance(clusters, bool) or not isinstance(clusters, (int, np.integer)) or clusters < 1:
        raise ValueError(f"clusters must be a positive integer, got {clusters!r}")
    if time_limit is not None and (
        isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0
    ):
        raise ValueError(f"time_limit must be None or a positive number of seconds, got {time_limit!r}")


def assign_precisions(
    errors,
    sizes,
    budget: float,
    precisions=None,
    method: str = "greedy",
    clusters: int = 128,
    solver: str = "highs",
    time_limit: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Assignment:
    """Choose a precision per channel minimizing the total error within ``budget`` average bits per parameter.

    errors: [N, P] error of channel i at precisions[j]. sizes: [N] parameter count of each channel (positive
    integers). precisions: the allowed bit widths (default: ``default_precisions(budget)``), any order.
    method: "greedy" (exact LP + repair, fast) or "ilp" (the paper's K-Means + two-level ILP).
    clusters: K-Means clusters per size group ("ilp" only). solver: "highs" or "cbc" ("ilp" only).
    time_limit: seconds per solver call ("ilp" only; None = no limit). seed: K-Means seed.
    The result is deterministic for given inputs and never exceeds the budget.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    check_ilp_options(clusters, time_limit)
    E, sizes, prec, cap = _validate(errors, sizes, budget, precisions)

    lp = _lp_relaxation(E, sizes, prec, cap)
    if method == "greedy":
        choice = _repair(lp)
        name = "greedy"
    else:
        choice = _two_level(E, sizes, prec, budget, int(clusters), solver, time_limit, seed, progress)
        choice = _spend_leftover(E, sizes, prec, choice, cap)
        name = f"ilp-{solver}"

    used = int(np.dot(prec[choice], sizes))
    if used > cap:  # every path keeps to the budget; this guards the promise itself
        raise RuntimeError(f"internal error: {name} used {used} bits, budget allows {cap}")
    total = float(E[np.arange(len(choice)), choice].sum())
    lb = min(lp.lower_bound, total)  # the bound is exact; this only absorbs rounding in the last ulp
    if lb > 0:
        gap = (total - lb) / lb
    else:
        gap = 0.0 if total == 0 else math.inf
    return Assignment(
        bits=prec[choice].astype(np.uint8),
        total_error=total,
        average_bits=float(Fraction(used, int(sizes.sum()))),
        lower_bound=float(lb),
        gap=float(gap),
        method=name,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------- validation


def _check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a number of average bits per parameter, got {budget!r}")
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive finite number of bits per parameter, got {budget!r}")
    return budget


def _check_precisions(precisions) -> np.ndarray:
    try:
        values = list(precisions)
    except TypeError:
        raise ValueError(f"precisions must be a sequence of bit widths, got {precisions!r}") from None
    if not values:
        raise ValueError("precisions is empty: give at least one bit width")
    for p in values:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 1 <= p <= MAX_PRECISION:
            raise ValueError(f"precisions must be integers in [1, {MAX_PRECISION}], got {precisions!r}")
    if len(set(int(p) for p in values)) != len(values):
        raise ValueError(f"precisions must be distinct, got {precisions!r}")
    return np.asarray([int(p) for p in values], dtype=np.int64)


def _validate(errors, sizes, budget, precisions):
    """(errors [N, P] float64, columns sorted by precision; sizes int64 [N]; sorted precisions; capacity in bits)."""
    budget = _check_budget(budget)
    prec = _check_precisions(default_precisions(budget) if precisions is None else precisions)
    E = np.asarray(errors, dtype=np.float64)
    if E.ndim != 2:
        raise ValueError(f"errors must be 2-D [channels, precisions], got shape {E.shape}")
    if E.shape[0] == 0:
        raise ValueError("errors is empty: there are no channels to assign")
    if E.shape[1] != len(prec):
        raise ValueError(
            f"errors has {E.shape[1]} columns but there are {len(prec)} precisions {tuple(int(p) for p in prec)}"
        )
    if not np.isfinite(E).all():
        i = int(np.argwhere(~np.isfinite(E))[0, 0])
        raise ValueError(f"errors must be finite: row {i} has {E[i].tolist()}")
    if (E < 0).any():
        i = int(np.argwhere(E < 0)[0, 0])
        raise ValueError(f"errors must be non-negative (they are squared errors): row {i} has {E[i].tolist()}")
    S = np.asarray(sizes)
    if S.ndim != 1 or S.shape[0] != E.shape[0]:
        raise ValueError(f"sizes must be 1-D with one entry per channel ({E.shape[0]}), got shape {S.shape}")
    if S.dtype.kind not in "iuf" or S.dtype == np.bool_:
        raise ValueError(f"sizes must be parameter counts (integers), got dtype {S.dtype}")
    if S.dtype.kind == "f":
        if not np.isfinite(S).all() or (S != np.round(S)).any():
            raise ValueError("sizes must be whole parameter counts")
    if (S <= 0).any():
        i = int(np.argwhere(S <= 0)[0, 0])
        raise ValueError(f"sizes must be positive parameter counts: sizes[{i}] = {S[i]}")
    lo, hi = int(prec.min()), int(prec.max())
    if float(S.astype(np.float64).sum()) * hi >= 2.0**62:  # before the cast: larger counts wrap in int64
        raise ValueError(f"sizes total {float(S.astype(np.float64).sum()):.4g} parameters: too many to count their "
                         f"bits at {hi} per parameter in 64 bits")
    S = S.astype(np.int64)
    if not lo <= budget <= hi:
        raise ValueError(
            f"budget {budget} bits per parameter is infeasible with precisions {tuple(sorted(int(p) for p in prec))}: "
            f"it must lie in [{lo}, {hi}]"
        )
    order = np.argsort(prec, kind="stable")
    total = int(S.sum())
    # Exact capacity: floor of the budget's exact binary value times the parameter count, so no rounding can let
    # sum(bits * sizes) / sum(sizes) exceed the float the caller gave.
    cap = math.floor(Fraction(budget) * total)
    return np.ascontiguousarray(E[:, order]), S, prec[order], cap


# ------------------------------------------------------------------------------- LP relaxation (convex hull)


def _lower_hull(E: np.ndarray, prec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the lower convex frontier of its (bits, error) points: the only choices an LP optimum uses.

    Returns pts [N, P] (indices into the sorted precisions, left to right; the first is always the cheapest
    precision) and n [N] (how many are valid). Dominated points (more bits, no less error) and points above the
    hull are dropped, so errors that are not monotone in bits are handled. Collinear points are kept: they cost
    the LP nothing and give the integer solution finer steps.
    """
    N, P = E.shape
    pts = np.zeros((N, P), dtype=np.int64)
    n = np.ones(N, dtype=np.int64)
    # Monotone chain over the points in bits order, with the errors of the last two stack entries kept at hand.
    last_e, last_j = E[:, 0].copy(), np.zeros(N, dtype=np.int64)
    for j in range(1, P):
        ej = E[:, j]
        # Dominated points never enter (more bits, no less error than the current end of the frontier).
        active = np.flatnonzero(ej < last_e)
        while len(active):  # pop the end while it lies strictly above the segment from the point before it to j
            rows = active[n[active] >= 2]
            if not len(rows):
                break
            a = pts[rows, n[rows] - 2]
            b = last_j[rows]
            ea, eb = E[rows, a], last_e[rows]
            pop = (eb - ea) * (prec[j] - prec[b]) > (ej[rows] - eb) * (prec[b] - prec[a])
            rows = rows[pop]
            n[rows] -= 1
            last_j[rows] = pts[rows, n[rows] - 1]
            last_e[rows] = E[rows, last_j[rows]]
            active = rows
        active = np.flatnonzero(ej < last_e)
        pts[active, n[active]] = j
        n[active] += 1
        last_j[active] = j
        last_e[active] = ej[active]
    return pts, n


@dataclass
class _LP:
    pts: np.ndarray  # [N, P] hull points per channel
    pos: np.ndarray  # [N] hull position of the integral prefix solution
    lower_bound: float
    leftover: int  # bits of capacity the integral prefix leaves unused
    rest: tuple  # (channel, k, dbits) of the hull steps after the prefix, in greedy order


def _lp_relaxation(E: np.ndarray, sizes: np.ndarray, prec: np.ndarray, cap: int) -> _LP:
    """Exact LP relaxation of the flat multiple-choice knapsack (Sinha & Zoltners), and its integral prefix.

    Every channel starts at the cheapest precision; hull steps are taken in decreasing error saved per bit while
    they fit; the LP takes the first one that does not fit fractionally. The prefix (all full steps) is an
    optimal integer solution for the bits it uses, and is within that one step's gain of the LP optimum.
    """
    N, P = E.shape
    rows = np.arange(N)
    pts, n = _lower_hull(E, prec)
    room = cap - int(prec[0]) * int(sizes.sum())
    if P == 1:
        return _LP(pts, np.zeros(N, dtype=np.int64), float(E[:, 0].sum()), room, (np.zeros(0, np.int64),) * 3)
    Eh = np.take_along_axis(E, pts, axis=1)
    Bh = prec[pts]
    # Step k (1..P-1) of a channel goes from its hull point k-1 to k; [N, P-1], valid where k < n.
    valid = np.arange(1, P)[None, :] < n[:, None]
    dbits = (Bh[:, 1:] - Bh[:, :-1]) * sizes[:, None]
    gains = Eh[:, :-1] - Eh[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        key = np.where(valid, gains / np.where(valid, dbits, 1), -np.inf)
    # Hull slopes fall along a channel; the running minimum keeps float rounding from reordering its own steps.
    key = np.minimum.accumulate(key, axis=1)
    flat = np.flatnonzero(valid.ravel())  # channel-major: ties in the stable sort go by channel, then step
    order = flat[np.argsort(-key.ravel()[flat], kind="stable")]
    ch, ks = np.divmod(order, P - 1)
    ks += 1
    dbits, gains = dbits.ravel()[order], gains.ravel()[order]
    cum = np.cumsum(dbits)
    t = int(np.searchsorted(cum, room, side="right"))  # steps that fit entirely
    pos = np.bincount(ch[:t], minlength=N)
    leftover = room - (int(cum[t - 1]) if t else 0)
    prefix_error = float(Eh[rows, pos].sum())
    lb = prefix_error - (gains[t] * leftover / dbits[t] if t < len(ch) else 0.0)
    return _LP(pts=pts, pos=pos, lower_bound=lb, leftover=leftover, rest=(ch[t:], ks[t:], dbits[t:]))


def _repair(lp: _LP) -> np.ndarray:
    """Spend the bits the integral prefix leaves unused; returns the precision index per channel.

    Continue down the greedy order taking every hull step that still fits (and whose channel is ready for it).
    Every step after the prefix saves at most the break step's ratio of error per bit, so the repair gains less
    than the break step would: more budget therefore never gives more error (the prefix grows by at least that
    step), and for a fixed prefix this greedy-with-skipping is monotone in the leftover as well.
    """
    pos = lp.pos.copy()
    left = lp.leftover
    ch, ks, dbits = lp.rest
    fits = np.flatnonzero(dbits <= left)
    if len(fits):
        smallest = int(dbits[fits].min())
        for c, k, d in zip(ch[fits].tolist(), ks[fits].tolist(), dbits[fits].tolist()):
            if left < smallest:
                break
            if d <= left and pos[c] == k - 1:
                pos[c] = k
                left -= d
    return lp.pts[np.arange(len(pos)), pos]


# ------------------------------------------------------------------------------------- two-level ILP (paper)


def _two_level(E, sizes, prec, budget, clusters, solver, time_limit, seed, progress) -> np.ndarray:
    """Algorithm 1: per size group, budget share, K-Means, cluster-level ILP, intra-cluster assignment."""
    choice = np.empty(E.shape[0], dtype=np.int64)
    groups = np.unique(sizes)  # Step 1: split channels by parameter count
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=3 * len(groups), desc="two-level ILP")
    for w in groups:
        idx = np.flatnonzero(sizes == w)
        # Step 2: B_k = B * W_k / W_sum, in units of w bits: sum_p p * y_p <= floor(budget * n_k). Summed over the
        # groups this never exceeds the global capacity.
        units = math.floor(Fraction(budget) * len(idx))
        # The solver's tolerances are absolute: errors far below 1 (tiny weights) read as zero cost, errors near
        # 1e19 stalled HiGHS past its time limit. Scaling a group's errors by one factor changes no optimum.
        Eg = E[idx]
        top = float(Eg.max())
        if top > 0:
            Eg = Eg / top
        labels = _cluster(Eg, clusters, seed)  # Step 3
        _tick(bar, f"{int(w)}-parameter channels: K-Means done")
        counts = _cluster_ilp(Eg, labels, prec, units, solver, time_limit)  # Step 4
        _tick(bar, f"{int(w)}-parameter channels: cluster-level ILP done")
        choice[idx] = _intra_cluster(Eg, labels, counts, solver, time_limit)  # Step 5
        _tick(bar, f"{int(w)}-parameter channels: intra-cluster done")
    if bar is not None:
        bar.close()
    return choice  # Step 6


def _spend_leftover(E, sizes, prec, choice, cap) -> np.ndarray:
    """Hand back the bits Step 2's per-group floors leave unused, best error saved per bit first, while they fit.

    Each size group gets floor(budget * n_k) units of its size: a group of one channel at 1.75 bits gets 1 unit, so
    with many small groups the two-level result used 74 % of the budget at 2.5x the optimal error. A round takes each
    channel's best upgrade (any higher precision that saves error) in decreasing gain per bit while it fits; rounds
    repeat until no upgrade fits. Only upgrades that lower the error are taken and the capacity is counted exactly,
    so the result is never worse than the ILP's and never over budget.
    """
    choice = choice.copy()
    rows = np.arange(len(choice))
    left = cap - int(np.dot(prec[choice], sizes))
    while left >= int(sizes.min()):
        dbits = (prec[None, :] - prec[choice][:, None]) * sizes[:, None]  # [N, P] bits of each move
        gain = E[rows, choice][:, None] - E
        ok = (dbits > 0) & (dbits <= left) & (gain > 0)
        if not ok.any():
            break
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(ok, gain / np.where(ok, dbits, 1), -np.inf)
        to = ratio.argmax(axis=1)
        cand = np.flatnonzero(ok.any(axis=1))
        cand = cand[np.argsort(-ratio[cand, to[cand]], kind="stable")]
        cost = dbits[cand, to[cand]]
        smallest, moved = int(cost.min()), False
        for i, d in zip(cand.tolist(), cost.tolist()):
            if left < smallest:
                break
            if d <= left:
                choice[i] = to[i]
                left -= d
                moved = True
        if not moved:
            break
    return choice


def _tick(bar, text: str) -> None:
    if bar is not None:
        bar.set_postfix_str(text)
        bar.update()


def _cluster(Eg: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """K-Means labels [n] on the per-precision errors (each channel its own cluster when there are few)."""
    n = Eg.shape[0]
    if n <= clusters:
        return np.arange(n)
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    from threadpoolctl import threadpool_limits

    # One thread: scikit-learn's multi-threaded Lloyd adds per-thread partial sums in scheduling order, so only a
    # single thread gives bit-identical clusters on every run (and on a shared machine it is not slower).
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Duplicate rows can leave clusters empty; empty clusters are simply skipped below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=clusters, n_init=1, random_state=seed).fit(Eg)
    _, labels = np.unique(km.labels_, return_inverse=True)  # renumber without the empty clusters
    return labels


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS writes its copyright banner to the process's stdout (file descriptor 1, below Python) the first time
    a solver object is made, whatever `msg` says; a CLI's stdout may be a JSON pipe. Make that first object here with
    descriptor 1 pointed at /dev/null: later ones print nothing."""
    try:
        import highspy
    except ImportError:  # reported by _pulp_solver's availability check
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 to redirect (an embedded interpreter): leave the banner be
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _pulp_solver(solver: str, time_limit, mip_gap: float | None):
    import pulp

    if solver == "highs":
        _silence_highs_banner()
        s = pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=mip_gap)  # highspy in-process
    else:
        with warnings.catch_warnings():
            # PuLP 3.3 flags the bundled CBC as going away in PuLP 4; we pin pulp<4 on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            s = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=mip_gap)
    if not s.available():
        raise RuntimeError(f"solver {solver!r} is not available to PuLP (install highspy, or use solver='cbc')")
    return s


def _solve(prob, solver: str, time_limit, mip_gap, what: str) -> None:
    import pulp

    prob.solve(_pulp_solver(solver, time_limit, mip_gap))
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise RuntimeError(
            f"{what} ({solver}) found no feasible solution (status {pulp.LpStatus[prob.status]}"
            + (f", time_limit={time_limit}s: try a larger one)" if time_limit is not None else ")")
        )


def _cluster_ilp(Eg, labels, prec, units, solver, time_limit) -> np.ndarray:
    """Step 4: y[c, p] = how many channels of cluster c get precision p; returns int64 [C, P]."""
    import pulp

    C, P = int(labels.max()) + 1, len(prec)
    S = np.bincount(labels, minlength=C)
    cost = np.zeros((C, P))
    np.add.at(cost, labels, Eg)
    cost /= S[:, None]  # mean error per channel of the cluster at each precision
    prob = pulp.LpProblem("lowra_cluster_level", pulp.LpMinimize)
    y = [[prob.add_variable(f"y_{c}_{j}", 0, int(S[c]), cat="Integer") for j in range(P)] for c in range(C)]
    prob += pulp.lpSum(float(cost[c, j]) * y[c][j] for c in range(C) for j in range(P))
    for c in range(C):
        prob += pulp.lpSum(y[c]) == int(S[c])
    prob += pulp.lpSum(int(prec[j]) * y[c][j] for c in range(C) for j in range(P)) <= units
    _solve(prob, solver, time_limit, _ILP_GAP_REL, "cluster-level ILP")
    counts = np.array([[round(v.varValue or 0.0) for v in row] for row in y], dtype=np.int64)
    if (counts < 0).any() or (counts.sum(1) != S).any() or int((counts @ prec).sum()) > units:
        raise RuntimeError(f"cluster-level ILP ({solver}) returned a solution that breaks its constraints")
    return counts


def _intra_cluster(Eg, labels, counts, solver, time_limit) -> np.ndarray:
    """Step 5: within each cluster, which channels get which precision (exactly the paper's intra-cluster ILP).

    With one precision used the answer is forced; with two it is exact by sorting on the error difference; only
    clusters split over three or more precisions go to the solver.
    """
    choice = np.empty(Eg.shape[0], dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(counts.shape[0] + 1))
    for c in range(counts.shape[0]):
        members = order[bounds[c] : bounds[c + 1]]
        used = np.flatnonzero(counts[c])
        if len(used) == 1:
            choice[members] = used[0]
        elif len(used) == 2:
            lo, hi = used
            delta = Eg[members, hi] - Eg[members, lo]
            up = np.argsort(delta, kind="stable")[: counts[c, hi]]
            choice[members] = lo
            choice[members[up]] = hi
        else:
            choice[members] = used[_intra_ilp(Eg[members][:, used], counts[c, used], solver, time_limit)]
    return choice


def _intra_ilp(Ec: np.ndarray, want: np.ndarray, solver: str, time_limit) -> np.ndarray:
    """The intra-cluster ILP: x[i, p] binary, one precision per channel, want[p] channels at p. Returns [S] column."""
    import pulp

    S, Q = Ec.shape
    prob = pulp.LpProblem("lowra_intra_cluster", pulp.LpMinimize)
    x = [[prob.add_variable(f"x_{i}_{j}", cat="Binary") for j in range(Q)] for i in range(S)]
    prob += pulp.lpSum(float(Ec[i, j]) * x[i][j] for i in range(S) for j in range(Q))
    for i in range(S):
        prob += pulp.lpSum(x[i]) == 1
    for j in range(Q):
        prob += pulp.lpSum(x[i][j] for i in range(S)) == int(want[j])
    # The constraint matrix is totally unimodular (a transportation problem): the root LP is already integral.
    _solve(prob, solver, time_limit, None, "intra-cluster ILP")
    X = np.array([[v.varValue or 0.0 for v in row] for row in x])
    col = np.argmax(X, axis=1)
    if (np.abs(X.sum(1) - 1) > 1e-6).any() or (np.bincount(col, minlength=Q) != want).any():
        raise RuntimeError(f"intra-cluster ILP ({solver}) returned a solution that breaks its constraints")
    return col
