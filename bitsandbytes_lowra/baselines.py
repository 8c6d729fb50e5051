"""The methods compared by the harness, all as LowRA Plans: same storage, same lowra:: kernels, same bit accounting.

| method     | precisions                                   | codebooks / thresholds         | LoRA init        |
|------------|----------------------------------------------|--------------------------------|------------------|
| `qlora`    | per decoder layer: 4 bits, or LoftQ's 2/4 mix | NormalFloat (Appendix F), fixed | zero B (peft)    |
| `loftq`    | same as qlora                                | same as qlora                  | LoftQ, 5 steps   |
| `lowra-pa` | per output channel, global assigner          | NormalFloat, fixed             | LoftQ, 5 steps   |
| `lowra`    | per output channel, global assigner          | learned per channel (Lloyd-Max) | LoftQ, 5 steps   |

`lowra-pa` and `lowra` are the paper's ablations "PA only" and "PA + MTSearch" (Tables 7 and 8).

The layer-wise mix (QLoRA below 4 bits, as the LowRA paper does following LoftQ): decoder layers are ordered by
their index and the first k get 4 bits, the rest 2 bits, with k the largest number that keeps the nominal average
(over every quantized parameter) within the budget. Layers without an index in their name (none in Llama-style
models) come last. So the nominal bits of a mixed baseline are at most the budget, and usually a little below it
(SmolLM2-135M has 30 equal decoder layers: 2.5 bits -> 7 layers at 4 bits = 2.467 nominal bits). Below 2 bits the
layer-wise mix has no precision to go to: those methods refuse (the paper's "-").
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from . import plan as _plan
from .codebooks import nf_tables
from .format import DEFAULT_BLOCKSIZE


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # for tables and plots
    quantization: str  # "layerwise-nf" | "assigner-nf" | "assigner-learned"
    init: str  # "zero" | "loftq"
    min_bits: float


METHODS = {
    m.name: m
    for m in (
        Method("qlora", "QLoRA", "layerwise-nf", "zero", 2.0),
        Method("loftq", "LoftQ", "layerwise-nf", "loftq", 2.0),
        Method("lowra-pa", "LowRA (PA only)", "assigner-nf", "loftq", 1.0),
        Method("lowra", "LowRA (PA + MTSearch)", "assigner-learned", "loftq", 1.0),
    )
}
LOFTQ_ITERATIONS = 5  # the LoftQ recommendation the paper follows


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def check_bits(method: Method, bits: float) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits):
        raise ValueError(f"bits must be a number, got {bits!r}")
    if not (method.min_bits <= bits <= 4.0):
        why = " (the layer-wise 2/4-bit mix cannot go below 2 bits)" if method.quantization == "layerwise-nf" else ""
        raise ValueError(f"{method.name} supports {method.min_bits:g} to 4 bits, got {bits:g}{why}")


def supports(method: str | Method, bits: float) -> bool:
    m = get_method(method) if isinstance(method, str) else method
    return m.min_bits <= bits <= 4.0


# ------------------------------------------------------------------------------------------------------ targets


def _safetensors_shapes(files) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in files:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                shapes[k] = tuple(v["shape"])
    return shapes


def model_targets(checkpoint) -> list[_plan.Target]:
    """The layers LowRAConfig quantizes when loading `checkpoint` with transformers (the same selection), as Targets.

    Built on the meta device from the checkpoint's config: no weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .integrations.transformers import LowRAConfig, checkpoint_targets, select_targets

    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    keys = _plan.checkpoint_keys(_plan.checkpoint_files(checkpoint))
    prefix = getattr(model, "base_model_prefix", "") or ""
    return checkpoint_targets(select_targets(model, LowRAConfig(bits=4)), keys, prefix)


_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer index in a module name ("model.layers.12.mlp.up_proj" -> 12), None when there is none."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------------ plans


def layerwise_bits(shapes: dict[str, tuple[int, int]], bits: float) -> dict[str, int]:
    """{layer: 2 or 4}: LoftQ's layer-wise mix, first decoder layers (by index) at 4 bits, within the budget."""
    if not 2.0 <= bits <= 4.0:
        raise ValueError(f"the layer-wise NormalFloat mix needs 2 <= bits <= 4, got {bits:g}")
    groups: dict[int | None, list[str]] = {}
    for name in shapes:
        groups.setdefault(layer_index(name), []).append(name)
    order = sorted((k for k in groups if k is not None)) + ([None] if None in groups else [])
    total = sum(r * c for r, c in shapes.values())
    budget = Fraction(bits).limit_denominator(10**6) * total
    used = 2 * total  # everything at 2 bits, then promote whole layers in index order
    out = {name: 2 for name in shapes}
    for k in order:
        extra = 2 * sum(shapes[n][0] * shapes[n][1] for n in groups[k])
        if used + extra > budget:
            break
        used += extra
        for n in groups[k]:
            out[n] = 4
    return out


def layerwise_nf_plan(shapes: dict[str, tuple[int, int]], bits: float, blocksize: int = DEFAULT_BLOCKSIZE) -> _plan.Plan:
    """The QLoRA / LoftQ baseline plan: NormalFloat tables, one precision per layer (layerwise_bits)."""
    per_layer = layerwise_bits(shapes, bits)
    layers = {}
    for name in sorted(shapes):
        rows, cols = shapes[name]
        b = torch.full((rows,), per_layer[name], dtype=torch.uint8)
        codebook, thresholds = nf_tables(b)
        layers[name] = _plan.LayerPlan(bits=b, codebook=codebook, thresholds=thresholds, cols=cols)
    four = sorted({layer_index(n) for n, p in per_layer.items() if p == 4}, key=lambda i: (i is None, i or 0))
    plan = _plan.Plan(
        layers=layers,
        settings={"bits": float(bits), "blocksize": blocksize, "baseline": "layerwise-nf"},
        assignment={"method": "layerwise-nf", "four_bit_layers": four},
    )
    plan.assignment["average_bits"] = plan.nominal_bits()
    return plan


def method_plan(method: str, checkpoint, bits: float, progress: bool = True, cache: bool = True) -> _plan.Plan:
    """The Plan of `method` at `bits` for a safetensors checkpoint directory (LowRA plans use make_plan's cache)."""
    from .integrations.transformers import LowRAConfig, _plan_cache_dir

    m = get_method(method)
    check_bits(m, bits)
    targets = model_targets(checkpoint)
    files = _plan.checkpoint_files(checkpoint)
    if m.quantization == "layerwise-nf":
        all_shapes = _safetensors_shapes(files)
        shapes = {}
        for t in targets:
            s = all_shapes[t.key]
            shapes[t.layer] = (s[1], s[0]) if t.transpose else (s[0], s[1])
        return layerwise_nf_plan(shapes, bits)
    mode = "fixed_mapping" if m.quantization == "assigner-nf" else "per_channel"
    config = LowRAConfig(bits=bits, learner_mode=mode)
    return _plan.make_plan(files, config, modules=targets, progress=progress, cache=cache, cache_dir=_plan_cache_dir())


__all__ = [
    "LOFTQ_ITERATIONS",
    "METHODS",
    "Method",
    "get_method",
    "layer_index",
    "layerwise_bits",
    "layerwise_nf_plan",
    "method_plan",
    "model_targets",
    "supports",
]
