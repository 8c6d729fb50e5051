"""Convert the nn.Linear layers of any nn.Module to LinearLowRA under one global bit budget (for models outside
transformers; transformers models go through integrations/transformers.py).

Plan first, then quantize, as the paper does: learn every layer's per-row tables and errors at each precision
(learner), assign precisions to all rows of all layers at once (assigner), then quantize each layer with its rows'
precisions and tables. So `bits=1.75` is the average over all converted parameters, not per layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .assigner import assign_precisions
from .format import DEFAULT_BLOCKSIZE, check_weight
from .functional import bits_report
from .learner import learn_layer, tables_for_bits
from .nn import LinearLowRA
from .plan import PlanSettings

DEFAULT_SKIP = ("lm_head",)  # as transformers' quantizers: the output head stays dense


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or fnmatch.fnmatchcase(name, s) for s in skip)


def linear_targets(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Qualified names of the modules convert_to_lowra would convert: exactly nn.Linear (subclasses such as
    MultiheadAttention's out_proj are used through their weight, not forward, and are left alone), not skipped.

    A module is skipped when its name equals an entry of `skip`, ends with "." + entry, or matches it as an
    fnmatch pattern (e.g. "*.mlp.down_proj")."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and not _skipped(name, skip)]


def convert_to_lowra(
    model: nn.Module,
    bits: float = 1.75,
    skip: Iterable[str] = DEFAULT_SKIP,
    precisions=None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    iterations: int = 2,
    mode: str = "per_channel",
    method: str = "greedy",
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    device=None,
    progress: bool = True,
    **assign_kwargs,
) -> nn.Module:
    """Replace every nn.Linear of `model` (see linear_targets for `skip`) by a LinearLowRA, `bits` average code bits
    per converted parameter over all of them.

    precisions: allowed per-row bit widths (default assigner.default_precisions(bits)); iterations / mode: the
    learner's; method and assign_kwargs: the assigner's ("greedy" or "ilp"); device: where the quantized layers
    live (default: each weight's device); progress: tqdm bars over the layers, learning then quantizing.
    Converts in place and returns the model (a bare nn.Linear is returned converted). model_bits_report(model)
    gives the nominal and effective bits afterwards.
    """
    from tqdm.auto import tqdm

    names = [""] if type(model) is nn.Linear else linear_targets(model, skip)
    if not names:
        raise ValueError("convert_to_lowra found no nn.Linear to convert (all skipped, or none in the model)")
    # Every option the assigner would otherwise check only after the last layer is learned.
    settings = PlanSettings.of_call(bits, precisions, blocksize, iterations, mode, method, assign_kwargs)
    precisions = settings.allowed_precisions()

    # 1. learn every layer (tables + per-row error at each precision)
    fits, errors, sizes = [], [], []
    for name in tqdm(names, desc="LowRA learning", unit="layer", disable=not progress):
        W = model.get_submodule(name).weight.detach()
        check_weight(W, name=f"{name or 'model'}.weight")
        f = learn_layer(W, precisions, blocksize=blocksize, iterations=iterations, mode=mode)
        fits.append(f)
        errors.append(torch.stack([f[p].error for p in precisions], dim=1).cpu())
        sizes.append(np.full(W.shape[0], W.shape[1], dtype=np.int64))

    # 2. one assignment over all rows of all layers
    assignment = assign_precisions(
        torch.cat(errors).numpy(), np.concatenate(sizes), bits, precisions, method=method, progress=progress,
        **assign_kwargs,
    )
    row_bits = torch.from_numpy(assignment.bits.astype(np.uint8))

    # 3. quantize layer by layer with the assigned rows' tables
    start = 0
    for name, f, s in zip(tqdm(names, desc="LowRA quantizing", unit="layer", disable=not progress), fits, sizes):
        b = row_bits[start : start + len(s)]
        start += len(s)
        old = model.get_submodule(name)
        code, thr = tables_for_bits(f, b.to(old.weight.device))
        new = LinearLowRA.from_linear(
            old, b, code, thr, compute_dtype=compute_dtype, compress_statistics=compress_statistics,
            blocksize=blocksize, device=device,
        )
        if not name:
            return new
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def model_bits_report(model: nn.Module) -> dict[str, float]:
    """Nominal and effective bits over every quantized LinearLowRA of `model` (docs/format.md "Bits accounting")."""
    states = [m.quant_state for m in model.modules() if isinstance(m, LinearLowRA) and m.quant_state is not None]
    return bits_report(states)
