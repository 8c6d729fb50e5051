"""The quantization plan: per-channel bits, codebooks and thresholds of every layer, under one global bit budget.

The budget (`bits=1.75`: average code bits over all quantized parameters) is global, so every channel's error at
every precision must be known before any weight is quantized. Planning has two stages, cached separately:

1. `learn_fits`: one streaming pass over the checkpoint, one tensor in memory at a time. For every layer and every
   precision in (1, 2, 4) the learner fits each row's codebook and thresholds and reports its squared error. Only the
   errors and the tables are kept (about 100 bytes per output channel), so memory does not grow with the weights.
   This is the expensive stage; its result (`ModelFits`) does not depend on the budget.
2. `ModelFits.assign`: one global `assign_precisions` over all channels for a budget, then each row's tables for
   its precision. Cheap (about a second for a 7B model with the greedy method), so a new budget reuses the fits.

`make_plan` runs both with an on-disk cache keyed by the checkpoint files (names, sizes, modification times,
safetensors headers, sampled content), the target layers, the options that affect each stage, the package
version and the source of learner.py (fits) / assigner.py (plans). Plans and fits are stored as safetensors plus JSON metadata (never pickle) and validated on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch

from .format import (
    ALLOWED_BITS,
    CODEBOOK_SLOTS,
    META_DTYPE,
    THRESHOLD_SLOTS,
    LowRAFormatError,
    blocks_per_row,
    check_bits,
    check_blocksize,
    check_codebook,
    check_thresholds,
    padded_cols,
    plain_number,
)

logger = logging.getLogger(__name__)

PLAN_FORMAT = "bitsandbytes_lowra.plan"
FITS_FORMAT = "bitsandbytes_lowra.fits"
FORMAT_VERSION = "1"
LEARNER_MODES = ("per_channel", "shared", "fixed_mapping")
ASSIGNER_METHODS = ("greedy", "ilp")
ASSIGNER_SOLVERS = ("highs", "cbc")
# Fits are always learned for every storable precision, so any budget (and any `precisions` subset) reuses them.
LEARNED_PRECISIONS = tuple(ALLOWED_BITS)
# The settings learned fits depend on (PlanSettings.fit_fields, bar the always-equal learned_precisions).
FIT_SETTINGS = ("blocksize", "learner_mode", "learner_iterations", "weight_power")


# ------------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class PlanSettings:
    """The options that decide a plan; read from a LowRAConfig (or any object with the same attribute names)."""

    bits: float
    precisions: tuple[int, ...] | None = None  # None: assigner.default_precisions(bits)
    blocksize: int = 64
    learner_mode: str = "per_channel"
    learner_iterations: int = 2
    weight_power: float = 1.0
    assigner_method: str = "greedy"
    clusters: int = 128
    solver: str = "highs"
    time_limit: float | None = None
    seed: int = 0

    # Numeric options: numpy scalars count as the Python numbers they hold, and are stored as those (plans are JSON).
    _NUMBERS = ("bits", "blocksize", "learner_iterations", "weight_power", "clusters", "time_limit", "seed")

    def __post_init__(self):
        for name in self._NUMBERS:
            object.__setattr__(self, name, plain_number(getattr(self, name)))
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits):
            raise ValueError(f"bits (the average bit budget) must be a finite number, got {self.bits!r}")
        if not (min(ALLOWED_BITS) <= self.bits <= max(ALLOWED_BITS)):
            raise ValueError(f"bits must be in [{min(ALLOWED_BITS)}, {max(ALLOWED_BITS)}], got {self.bits}")
        if self.precisions is not None:
            # exact values only: int(2.7) would quietly make it 2
            iterable = isinstance(self.precisions, Iterable) and not isinstance(self.precisions, (str, bytes))
            items = [plain_number(p) for p in self.precisions] if iterable else []
            bad = any(isinstance(p, bool) or not isinstance(p, (int, float)) or p not in ALLOWED_BITS for p in items)
            precs = () if bad else tuple(sorted({int(p) for p in items}))
            if not precs:
                raise ValueError(f"precisions must be a non-empty subset of {ALLOWED_BITS}, got {self.precisions!r}")
            if not precs[0] <= self.bits <= precs[-1]:  # the assigner would say so only after every fit is learned
                raise ValueError(f"bits={self.bits} is outside what precisions {precs} can meet: "
                                 f"[{precs[0]}, {precs[-1]}]")
            object.__setattr__(self, "precisions", precs)
        object.__setattr__(self, "blocksize", check_blocksize(self.blocksize))
        if self.learner_mode not in LEARNER_MODES:
            raise ValueError(f"learner_mode must be one of {LEARNER_MODES}, got {self.learner_mode!r}")
        it = self.learner_iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"learner_iterations must be a non-negative integer, got {self.learner_iterations!r}")
        wp = self.weight_power
        if isinstance(wp, bool) or not isinstance(wp, (int, float)) or not math.isfinite(wp) or wp < 0:
            raise ValueError(f"weight_power must be a finite number >= 0, got {self.weight_power!r}")
        if self.assigner_method not in ASSIGNER_METHODS:
            raise ValueError(f"assigner_method must be one of {ASSIGNER_METHODS}, got {self.assigner_method!r}")
        if self.solver not in ASSIGNER_SOLVERS:
            raise ValueError(f"solver must be one of {ASSIGNER_SOLVERS}, got {self.solver!r}")
        from .assigner import check_ilp_options

        check_ilp_options(self.clusters, self.time_limit)  # here, not in the assigner after every fit is learned
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32) (K-Means' random_state), got {self.seed!r}")

    @classmethod
    def from_config(cls, config) -> "PlanSettings":
        if isinstance(config, PlanSettings):
            return config
        names = [f for f in cls.__dataclass_fields__]
        if isinstance(config, Mapping):
            values = {k: config[k] for k in names if k in config}
        else:
            values = {k: getattr(config, k) for k in names if hasattr(config, k)}
        if "bits" not in values:
            raise ValueError("the plan needs a bit budget: the config has no `bits`")
        precs = values.get("precisions")
        if isinstance(precs, Iterable) and not isinstance(precs, (str, bytes)):  # else __post_init__ names it
            values["precisions"] = tuple(precs)
        return cls(**values)

    @classmethod
    def of_call(cls, bits, precisions, blocksize, iterations, mode, method, assign_kwargs) -> "PlanSettings":
        """The options of a learn-then-assign call (convert_to_lowra, quantize_lowra_at_bits), validated as planning
        does them, before anything is learned. assign_kwargs: the call's extra assign_precisions options."""
        unknown = sorted(set(assign_kwargs) - {"clusters", "solver", "time_limit", "seed", "progress"})
        if unknown:
            raise TypeError(f"unknown assigner options {unknown}: assign_precisions takes clusters, solver, "
                            "time_limit, seed and progress")  # fmt: skip
        options = {k: plain_number(v) for k, v in assign_kwargs.items() if k != "progress"}
        # numpy scalars (which the assigner took) as Python numbers, which the settings check for
        return cls(bits=plain_number(bits), precisions=None if precisions is None else tuple(map(plain_number, precisions)),
                   blocksize=plain_number(blocksize), learner_mode=mode, learner_iterations=plain_number(iterations),
                   assigner_method=method, **options)  # fmt: skip

    def allowed_precisions(self) -> tuple[int, ...]:
        from .assigner import default_precisions

        return self.precisions if self.precisions is not None else tuple(default_precisions(self.bits))

    def fit_fields(self) -> dict:
        """The options the learned fits depend on (their cache key)."""
        # fixed_mapping never iterates: normalize so equal fits share one cache entry.
        iterations = 0 if self.learner_mode == "fixed_mapping" else self.learner_iterations
        return {
            "blocksize": self.blocksize,
            "learner_mode": self.learner_mode,
            "learner_iterations": iterations,
            "weight_power": float(self.weight_power),
            "learned_precisions": list(LEARNED_PRECISIONS),
        }

    def check_made_with(self, recorded: Mapping, keys: Iterable[str], what: str) -> None:
        """Raise unless `recorded` (the settings a plan or fits file was made with) agrees with these settings on
        `keys`; keys it does not record (a baseline's plan) are not compared. `what`: "the plan P was made". A plan
        made for other settings would quietly break them (1-bit rows under precisions (2, 4)) while the saved config
        describes the model wrongly."""
        wanted = self.recorded_fields()
        differ = [k for k in keys if k in recorded and recorded[k] != wanted[k]]
        if differ:
            default = f" (its default for bits={self.bits})" if self.precisions is None else ""
            raise ValueError(f"{what} for " + "; ".join(
                f"{k}={recorded[k]!r}, the config asks for {k}={wanted[k]!r}{default if k == 'precisions' else ''}"
                for k in differ
            ))  # fmt: skip

    def recorded_fields(self) -> dict:
        """These settings as a plan records them (Plan.settings)."""
        return {**self.fit_fields(), **self.assign_fields()}

    def assign_fields(self) -> dict:
        """The options the assignment depends on (with the fits key, the plan's cache key)."""
        fields = {
            "bits": float(self.bits),
            "precisions": list(self.allowed_precisions()),
            "assigner_method": self.assigner_method,
        }
        if self.assigner_method == "ilp":
            fields.update(clusters=self.clusters, solver=self.solver, time_limit=self.time_limit, seed=self.seed)
        return fields


# ------------------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """A layer to quantize: its module name, the checkpoint tensor holding its weight, and whether that tensor is
    stored [in, out] (transformers' Conv1D, e.g. GPT-2) and must be transposed to [out, in]."""

    layer: str
    key: str
    transpose: bool = False


def _as_targets(modules) -> list[Target] | None:
    if modules is None:
        return None
    if isinstance(modules, Mapping):
        targets = [Target(layer=v, key=k) for k, v in modules.items()]
    else:
        targets = []
        for m in modules:
            if isinstance(m, Target):
                targets.append(m)
            elif isinstance(m, str):
                targets.append(Target(layer=m.removesuffix(".weight"), key=m))
            else:
                raise TypeError(f"modules must hold checkpoint tensor names or Target, got {type(m).__name__}")
    layers = [t.layer for t in targets]
    if len(set(layers)) != len(layers):
        raise ValueError("modules name the same layer twice")
    if not targets:
        raise ValueError("modules is empty: nothing to quantize")
    return sorted(targets, key=lambda t: t.layer)


# ------------------------------------------------------------------------------------------------------ checkpoint


def checkpoint_files(source) -> list[Path]:
    """The safetensors files of a checkpoint directory (index-aware), a file, or a list of files."""
    if isinstance(source, (list, tuple)):
        files = [Path(f) for f in source]
    else:
        path = Path(source)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = [path / f for f in sorted(set(weight_map.values()))]
            else:
                files = sorted(path.glob("*.safetensors"))
        else:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not files:
        raise ValueError(f"no .safetensors files in {source}: LowRA planning streams safetensors checkpoints")
    for f in files:
        if f.suffix != ".safetensors":
            raise ValueError(f"{f} is not a .safetensors file: LowRA planning streams safetensors checkpoints")
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file {f} is missing")
    return files


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        size = fh.read(8)
        if len(size) < 8:
            raise LowRAFormatError(f"{path}: {len(size)} bytes; not a safetensors file")
        (n,) = struct.unpack("<Q", size)
        if n > 100_000_000:
            raise LowRAFormatError(f"{path}: safetensors header of {n} bytes; not a safetensors file")
        header = fh.read(n)
        if len(header) < n:
            raise LowRAFormatError(f"{path}: its safetensors header is cut short ({len(header)} of {n} bytes)")
        return header


def fingerprint(files: Iterable[Path], samples: int = 64, sample_bytes: int = 4096, stat: bool = True) -> str:
    """sha256 over each file's name, size, mtime, safetensors header and `samples` evenly spaced content chunks.

    Cheap (reads about samples * sample_bytes per file) and changes when any file is rewritten; copying the
    checkpoint elsewhere keeps the names and content but changes mtimes, which only costs a re-plan.
    stat=False: sizes and content only, the same for a copy (what a plan records of the checkpoint it was made for).
    """
    h = hashlib.sha256()
    for path in files if stat else sorted(files, key=lambda f: Path(f).name):  # by name: any listing order agrees
        path = Path(path)
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode() if stat else f"{st.st_size}\0".encode())
        h.update(hashlib.sha256(_read_header(path)).digest())
        with open(path, "rb") as fh:
            for i in range(samples):
                fh.seek(st.st_size * i // samples)
                h.update(fh.read(sample_bytes))
    return h.hexdigest()


def checkpoint_headers(files: Iterable[Path]) -> dict[str, tuple[Path, dict]]:
    """{tensor name: (file, its header entry: "dtype", "shape", "data_offsets")}; no tensor is read."""
    out = {}
    for path in files:
        try:
            header = json.loads(_read_header(Path(path)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LowRAFormatError(f"{path}: its safetensors header is not valid JSON ({e}); the file is damaged") \
                from None
        if not isinstance(header, dict):
            raise LowRAFormatError(f"{path}: its safetensors header is a JSON {type(header).__name__}, not an object")
        for k, info in header.items():
            if k != "__metadata__":
                out[k] = (Path(path), info)
    return out


def checkpoint_keys(files: Iterable[Path]) -> dict[str, Path]:
    """{tensor name: file} from the safetensors headers (no tensor is read)."""
    return {k: path for k, (path, _) in checkpoint_headers(files).items()}


# Without a model to ask: every "*.weight" that is not an embedding, a norm or the output head.
_NOT_LINEAR = re.compile(r"(embed|wte|wpe|lm_head|norm|ln_)", re.IGNORECASE)


def _is_default_target(key: str, shape) -> bool:
    """A linear layer's weight by its name and its [out, in] shape (convolutions and biases are not 2-D)."""
    return len(shape) == 2 and key.endswith(".weight") and not _NOT_LINEAR.search(key)


def _default_targets(headers: dict[str, tuple[Path, dict]]) -> list[Target]:
    """The default targets of a checkpoint, selected from its safetensors headers' names and shapes."""
    return [
        Target(k.removesuffix(".weight"), k)
        for k in sorted(headers)
        if _is_default_target(k, headers[k][1].get("shape", ()))
    ]


# ------------------------------------------------------------------------------------------------------ fits


@dataclass
class LayerFits:
    """Learned tables and errors of every row of one layer at every learned precision."""

    cols: int
    errors: torch.Tensor  # float64 [rows, len(precisions)]: squared error of each row at each precision
    codebooks: dict[int, torch.Tensor]  # p -> float16 [rows, 2**p]
    thresholds: dict[int, torch.Tensor]  # p -> float16 [rows, 2**p - 1]

    @property
    def rows(self) -> int:
        return self.errors.shape[0]


@dataclass
class ModelFits:
    """The budget-independent result of the streaming pass: `assign` turns it into a Plan for any budget."""

    layers: dict[str, LayerFits]
    fit_settings: dict
    precisions: tuple[int, ...] = LEARNED_PRECISIONS
    key: str | None = None
    origin: str = "computed"

    def assign(self, settings, progress: bool = False) -> "Plan":
        from .assigner import assign_precisions
        from .learner import PrecisionFit, tables_for_bits

        settings = PlanSettings.from_config(settings)
        settings.check_made_with(self.fit_settings, FIT_SETTINGS, "the fits were learned")
        allowed = settings.allowed_precisions()
        missing = [p for p in allowed if p not in self.precisions]
        if missing:
            raise ValueError(f"precisions {missing} were not learned (have {self.precisions})")
        cols_idx = [self.precisions.index(p) for p in allowed]
        names = list(self.layers)
        errors = np.concatenate([self.layers[n].errors[:, cols_idx].numpy() for n in names])
        sizes = np.concatenate([np.full(self.layers[n].rows, self.layers[n].cols, dtype=np.int64) for n in names])
        a = assign_precisions(
            errors,
            sizes,
            settings.bits,
            precisions=allowed,
            method=settings.assigner_method,
            clusters=settings.clusters,
            solver=settings.solver,
            time_limit=settings.time_limit,
            seed=settings.seed,
            progress=progress,
        )
        layers, start = {}, 0
        for n in names:
            lf = self.layers[n]
            bits = torch.from_numpy(np.ascontiguousarray(a.bits[start : start + lf.rows]))
            start += lf.rows
            fits = {
                p: PrecisionFit(p, lf.codebooks[p], lf.thresholds[p], lf.errors[:, self.precisions.index(p)], 0)
                for p in allowed
            }
            codebook, thresholds = tables_for_bits(fits, bits)
            layers[n] = LayerPlan(bits=bits, codebook=codebook, thresholds=thresholds, cols=lf.cols)
        plan = Plan(
            layers=layers,
            settings={**self.fit_settings, **settings.assign_fields()},
            assignment={
                "method": a.method,
                "total_error": a.total_error,
                "lower_bound": a.lower_bound,
                "gap": a.gap,
                "average_bits": a.average_bits,
                "seconds": a.seconds,
            },
        )
        if float(plan.nominal_bits_exact()) != a.average_bits:  # the plan's own accounting must agree
            raise RuntimeError(f"plan has {plan.nominal_bits()} nominal bits, assigner reported {a.average_bits}")
        return plan

    # ---- storage

    def save(self, path) -> None:
        tensors = {}
        layers_meta = []
        for n, lf in self.layers.items():
            layers_meta.append({"name": n, "rows": lf.rows, "cols": lf.cols})
            tensors[f"{n}:errors"] = lf.errors.contiguous()
            for p in self.precisions:
                tensors[f"{n}:codebook{p}"] = lf.codebooks[p].contiguous()
                tensors[f"{n}:thresholds{p}"] = lf.thresholds[p].contiguous()
        meta = {
            "precisions": list(self.precisions),
            "fit_settings": self.fit_settings,
            "key": self.key,
            "layers": layers_meta,
        }
        _save(path, tensors, FITS_FORMAT, meta)

    @classmethod
    def load(cls, path) -> "ModelFits":
        tensors, meta = _load(path, FITS_FORMAT)
        try:
            precisions = tuple(int(p) for p in meta["precisions"])
            layers_meta = meta["layers"]
            fit_settings = dict(meta["fit_settings"])
        except (KeyError, TypeError, ValueError) as e:
            raise LowRAFormatError(f"{path}: fits metadata is incomplete ({e})") from None
        if not precisions or any(p not in ALLOWED_BITS for p in precisions):
            raise LowRAFormatError(f"{path}: learned precisions {precisions} are not a subset of {ALLOWED_BITS}")
        expected = set()
        layers = {}
        for lm in layers_meta:
            n, rows, cols = _layer_meta(path, lm)
            keys = [f"{n}:errors"] + [f"{n}:{k}{p}" for p in precisions for k in ("codebook", "thresholds")]
            expected.update(keys)
            if any(k not in tensors for k in keys):
                raise LowRAFormatError(f"{path}: layer {n} lacks some of {keys}")
            errors = tensors[f"{n}:errors"]
            _check_tensor(path, f"{n}:errors", errors, torch.float64, (rows, len(precisions)))
            if not torch.isfinite(errors).all() or (errors < 0).any():
                raise LowRAFormatError(f"{path}: errors of layer {n} contain negative or non-finite values")
            cbs, ths = {}, {}
            for p in precisions:
                cb, th = tensors[f"{n}:codebook{p}"], tensors[f"{n}:thresholds{p}"]
                _check_tensor(path, f"{n}:codebook{p}", cb, META_DTYPE, (rows, 2**p))
                _check_tensor(path, f"{n}:thresholds{p}", th, META_DTYPE, (rows, 2**p - 1))
                _check_tables(path, n, p, cb, th)
                cbs[p], ths[p] = cb, th
            layers[n] = LayerFits(cols=cols, errors=errors, codebooks=cbs, thresholds=ths)
        extra = set(tensors) - expected
        if extra:
            raise LowRAFormatError(f"{path}: unexpected tensors {sorted(extra)[:5]}")
        return cls(layers=layers, fit_settings=fit_settings, precisions=precisions, key=meta.get("key"), origin="file")


def _check_tables(path, name, p, cb, th) -> None:
    bits = torch.full((cb.shape[0],), p, dtype=torch.uint8)
    try:
        check_codebook(_pad(cb, CODEBOOK_SLOTS), bits)
        check_thresholds(_pad(th, THRESHOLD_SLOTS), bits)
    except LowRAFormatError as e:
        raise LowRAFormatError(f"{path}: layer {name}, {p}-bit tables: {e}") from None


def _pad(t: torch.Tensor, slots: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], slots - t.shape[1])], dim=1)


def learn_fits(
    tensors: Iterable[tuple[Target, torch.Tensor]],
    settings,
    total: int | None = None,
    progress: bool = True,
    device=None,
) -> ModelFits:
    """Learn every layer's tables at every precision, consuming (target, weight) pairs one at a time."""
    from tqdm.auto import tqdm

    from .learner import learn_layer

    settings = PlanSettings.from_config(settings)
    fs = settings.fit_fields()
    layers = {}
    # The bar is updated by hand: wrapping the iterator would keep the previous weight alive while the next loads.
    bar = tqdm(total=total, desc="LowRA planning", unit="layer", disable=not progress)
    for target, W in tensors:
        if target.transpose:
            W = W.t()
        if W.dtype == torch.float64:
            # The learner takes the kernels' dtypes only, and LowRA loads models in float32 at most: a float64
            # checkpoint is planned as the float32 weights it will be quantized from.
            W = W.float()
        fits = learn_layer(
            W,
            precisions=LEARNED_PRECISIONS,
            blocksize=settings.blocksize,
            iterations=fs["learner_iterations"],
            mode=settings.learner_mode,
            weight_power=settings.weight_power,
            device=device,
            name=target.key,
        )
        layers[target.layer] = LayerFits(
            cols=W.shape[1],
            errors=torch.stack([fits[p].error.cpu() for p in LEARNED_PRECISIONS], dim=1).to(torch.float64),
            codebooks={p: fits[p].codebook.cpu().contiguous() for p in LEARNED_PRECISIONS},
            thresholds={p: fits[p].thresholds.cpu().contiguous() for p in LEARNED_PRECISIONS},
        )
        del W, fits
        bar.update(1)
    bar.close()
    if not layers:
        raise ValueError("no layer to plan: the checkpoint holds none of the target weights")
    return ModelFits(layers=dict(sorted(layers.items())), fit_settings=fs)


def _stream(files: list[Path], targets: list[Target]) -> Iterator[tuple[Target, torch.Tensor]]:
    """(target, weight) pairs, reading one tensor at a time, each file opened once."""
    from safetensors import safe_open

    where = checkpoint_keys(files)
    missing = [t.key for t in targets if t.key not in where]
    if missing:
        raise ValueError(f"the checkpoint has no tensor named {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    for path in files:
        mine = [t for t in targets if where[t.key] == path]
        if not mine:
            continue
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for t in mine:
                yield t, f.get_tensor(t.key)


# ------------------------------------------------------------------------------------------------------ plan


@dataclass
class LayerPlan:
    bits: torch.Tensor  # uint8 [rows]
    codebook: torch.Tensor  # float16 [rows, 16]
    thresholds: torch.Tensor  # float16 [rows, 15]
    cols: int

    @property
    def rows(self) -> int:
        return self.bits.numel()

    def code_bits(self) -> int:
        return int(self.bits.to(torch.int64).sum()) * self.cols


@dataclass
class Plan:
    """{layer: bits [rows], codebook [rows, 16], thresholds [rows, 15]} plus the settings that produced it."""

    layers: dict[str, LayerPlan]
    settings: dict = field(default_factory=dict)
    assignment: dict = field(default_factory=dict)
    key: str | None = None
    origin: str = "computed"  # computed | fits-cache | plan-cache | file
    checkpoint: str | None = None  # fingerprint(files, stat=False) of the checkpoint planned; None: not from files

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def blocksize(self) -> int:
        return int(self.settings.get("blocksize", 64))

    def num_params(self) -> int:
        return sum(lp.rows * lp.cols for lp in self.layers.values())

    def nominal_bits_exact(self) -> Fraction:
        """Average code bits per quantized parameter (docs/format.md, "Nominal bits"), exactly."""
        return Fraction(sum(lp.code_bits() for lp in self.layers.values()), self.num_params())

    def nominal_bits(self) -> float:
        return float(self.nominal_bits_exact())

    def effective_bits(self, compress_statistics: bool = True) -> float:
        """Every stored bit per quantized parameter: padded codes, absmax, tables, offsets, bits (docs/format.md)."""
        total = 0
        for lp in self.layers.values():
            nb = blocks_per_row(lp.cols, self.blocksize)
            total += int(lp.bits.to(torch.int64).sum()) * padded_cols(lp.cols, self.blocksize)
            blocks = lp.rows * nb
            total += 8 * blocks + 32 * math.ceil(blocks / 256) + 32 * 256 + 32 if compress_statistics else 32 * blocks
            total += lp.rows * (CODEBOOK_SLOTS * 16 + THRESHOLD_SLOTS * 16 + 8) + 64 * (lp.rows + 1)
        return total / self.num_params()

    def precision_mix(self) -> dict[str, dict[int, float]]:
        """{layer type (last name component, e.g. q_proj): {bits: fraction of that type's parameters}}."""
        counts: dict[str, dict[int, int]] = {}
        for name, lp in self.layers.items():
            kind = name.rsplit(".", 1)[-1]
            c = counts.setdefault(kind, {})
            values, n = torch.unique(lp.bits, return_counts=True)
            for b, k in zip(values.tolist(), n.tolist()):
                c[int(b)] = c.get(int(b), 0) + int(k) * lp.cols
        mix = {}
        for kind, c in sorted(counts.items()):
            tot = sum(c.values())
            mix[kind] = {b: c[b] / tot for b in sorted(c)}
        return mix

    def summary(self) -> dict:
        exact = self.nominal_bits_exact()
        return {
            "layers": len(self.layers),
            "parameters": self.num_params(),
            "budget": self.settings.get("bits"),
            "nominal_bits": float(exact),
            "nominal_bits_exact": f"{exact.numerator}/{exact.denominator}",
            "effective_bits": self.effective_bits(True),
            "effective_bits_no_double_quant": self.effective_bits(False),
            "precision_mix": self.precision_mix(),
            "assignment": self.assignment,
            "origin": self.origin,
        }

    def check_targets(self, shapes: Mapping[str, tuple[int, int]], kept_dense: Iterable[str] = ()) -> None:
        """Raise unless the plan covers exactly these layers with these [out, in] shapes. kept_dense: layers the
        model has but the config keeps in full precision, named as such rather than as layers the model lacks."""
        missing = sorted(set(shapes) - set(self.layers))
        extra = sorted(set(self.layers) - set(shapes))
        dense = sorted(set(extra) & set(kept_dense))
        lacks = sorted(set(extra) - set(dense))

        def some(names):
            return f"{names[:5]}{' ...' if len(names) > 5 else ''}"

        if missing or extra:
            raise ValueError(
                "the LowRA plan does not match the model: "
                + (f"no plan for {some(missing)} " if missing else "")
                + (f"plan has layers the config keeps in full precision (modules_to_not_convert or transformers' "
                   f"default skips): {some(dense)} " if dense else "")
                + (f"plan has layers the model lacks: {some(lacks)}" if lacks else "")
            )
        for name, (rows, cols) in shapes.items():
            lp = self.layers[name]
            if (lp.rows, lp.cols) != (int(rows), int(cols)):
                raise ValueError(f"the LowRA plan has shape {(lp.rows, lp.cols)} for {name}, the model {(rows, cols)}")

    # ---- storage

    def save(self, path) -> None:
        tensors, layers_meta = {}, []
        for n, lp in self.layers.items():
            layers_meta.append({"name": n, "rows": lp.rows, "cols": lp.cols})
            tensors[f"{n}:bits"] = lp.bits.contiguous()
            tensors[f"{n}:codebook"] = lp.codebook.contiguous()
            tensors[f"{n}:thresholds"] = lp.thresholds.contiguous()
        exact = self.nominal_bits_exact()
        meta = {
            "settings": self.settings,
            "assignment": self.assignment,
            "key": self.key,
            "checkpoint": self.checkpoint,
            "nominal_bits_exact": [exact.numerator, exact.denominator],
            "layers": layers_meta,
        }
        _save(path, tensors, PLAN_FORMAT, meta)

    @classmethod
    def load(cls, path) -> "Plan":
        tensors, meta = _load(path, PLAN_FORMAT)
        try:
            layers_meta = meta["layers"]
            settings = dict(meta["settings"])
            num, den = meta["nominal_bits_exact"]
        except (KeyError, TypeError, ValueError) as e:
            raise LowRAFormatError(f"{path}: plan metadata is incomplete ({e})") from None
        check_blocksize(int(settings.get("blocksize", 64)))
        expected, layers = set(), {}
        for lm in layers_meta:
            n, rows, cols = _layer_meta(path, lm)
            keys = (f"{n}:bits", f"{n}:codebook", f"{n}:thresholds")
            expected.update(keys)
            if any(k not in tensors for k in keys):
                raise LowRAFormatError(f"{path}: layer {n} lacks some of {list(keys)}")
            bits, cb, th = (tensors[k] for k in keys)
            _check_tensor(path, keys[0], bits, torch.uint8, (rows,))
            _check_tensor(path, keys[1], cb, META_DTYPE, (rows, CODEBOOK_SLOTS))
            _check_tensor(path, keys[2], th, META_DTYPE, (rows, THRESHOLD_SLOTS))
            try:
                check_bits(bits, rows)
                check_codebook(cb, bits)
                check_thresholds(th, bits)
            except LowRAFormatError as e:
                raise LowRAFormatError(f"{path}: layer {n}: {e}") from None
            layers[n] = LayerPlan(bits=bits, codebook=cb, thresholds=th, cols=cols)
        extra = set(tensors) - expected
        if extra:
            raise LowRAFormatError(f"{path}: unexpected tensors {sorted(extra)[:5]}")
        if not layers:
            raise LowRAFormatError(f"{path}: the plan has no layers")
        assignment = dict(meta.get("assignment") or {})
        plan = cls(layers=layers, settings=settings, assignment=assignment, key=meta.get("key"), origin="file",
                   checkpoint=meta.get("checkpoint"))  # fmt: skip
        if plan.nominal_bits_exact() != Fraction(int(num), int(den)):
            raise LowRAFormatError(
                f"{path}: bits do not add up to the recorded {num}/{den} nominal bits (corrupt plan)"
            )
        return plan


def _layer_meta(path, lm) -> tuple[str, int, int]:
    try:
        n, rows, cols = str(lm["name"]), int(lm["rows"]), int(lm["cols"])
    except (KeyError, TypeError, ValueError):
        raise LowRAFormatError(f"{path}: malformed layer entry {lm!r}") from None
    if rows <= 0 or cols <= 0 or ":" in n:
        raise LowRAFormatError(f"{path}: malformed layer entry {lm!r}")
    return n, rows, cols


def _check_tensor(path, key, t: torch.Tensor, dtype, shape) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise LowRAFormatError(f"{path}: {key} must be {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")


def _save(path, tensors: dict, fmt: str, meta: dict) -> None:
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "meta": json.dumps(meta),
    }
    # Write then rename: a reader (or a crash) never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; plans are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path, fmt: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():  # exists, so "does not exist" would mislead
        inside = sorted(p.name for p in path.glob("*.safetensors") if p.name.startswith("lowra-plan"))
        hint = f" (it holds {inside[:3]})" if inside else ""
        raise IsADirectoryError(f"LowRA plan file {path} is a directory, not a plan file: give the .safetensors file "
                                f"write_plan / Plan.save wrote{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"LowRA plan file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except LowRAFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise LowRAFormatError(f"{path} is not a readable safetensors file ({e})") from None
    if metadata.get("format") != fmt:
        raise LowRAFormatError(f"{path} is not a {fmt} file (format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise LowRAFormatError(f"{path}: unsupported {fmt} version {metadata.get('format_version')!r}")
    try:
        meta = json.loads(metadata["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise LowRAFormatError(f"{path}: unreadable metadata ({e})") from None
    return tensors, meta


# ------------------------------------------------------------------------------------------------------ cache


def default_cache_dir() -> Path:
    from .data import cache_dir

    return cache_dir() / "plans"


def _source_digest(module_name: str) -> str:
    """Hash of a module's source: fits and plans made by other learner / assigner code are not reused."""
    import importlib

    return hashlib.sha256(Path(importlib.import_module(module_name).__file__).read_bytes()).hexdigest()


def _digest(obj) -> str:
    from . import __version__

    text = json.dumps({"v": __version__, "fmt": FORMAT_VERSION, **obj}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_file_source(source) -> bool:
    """Whether make_plan's source names safetensors files (a path, or a list / tuple of paths) rather than holding
    tensors (a mapping, or an iterable of (name, tensor) pairs; a list of pairs is as valid as a generator)."""
    if isinstance(source, (str, os.PathLike)):
        return True
    if isinstance(source, Mapping) or not isinstance(source, (list, tuple)):
        return False
    if all(isinstance(x, (str, os.PathLike)) for x in source):
        return True  # an empty list too: checkpoint_files says there are no files
    bad = next((x for x in source if not (isinstance(x, (list, tuple)) and len(x) == 2
                                          and isinstance(x[1], torch.Tensor))), None)  # fmt: skip
    if bad is not None:
        raise TypeError(
            "a list source must hold either checkpoint file paths or (name, tensor) pairs, not a mix or anything "
            f"else; got an element of type {type(bad).__name__}"
        )
    return False


def make_plan(
    source,
    config,
    modules=None,
    progress: bool = True,
    cache: bool = True,
    cache_dir=None,
    device=None,
) -> Plan:
    """Plan a checkpoint for the global budget in `config` (a LowRAConfig, a PlanSettings or a dict).

    source: a checkpoint directory, a .safetensors file or a list of them (streamed and cached), or an iterable of
    (name, tensor) pairs / a {name: tensor} dict (not cached).
    modules: which tensors to quantize: Targets, checkpoint tensor names (layer = name minus ".weight"), or a
    {tensor name: layer name} mapping. None: every 2-D "*.weight" except embeddings, norms and the output head.
    device: where the learner runs (default: cuda when available, else cpu). Only one weight is resident at a time.
    The returned Plan's `origin` tells whether it was computed, assigned from cached fits, or read from the cache.
    """
    settings = PlanSettings.from_config(config)
    targets = _as_targets(modules)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    if not _is_file_source(source):
        items = source.items() if isinstance(source, Mapping) else source
        by_key = {t.key: t for t in targets} if targets is not None else None

        def pairs():
            for name, tensor in items:
                if by_key is None:
                    if _is_default_target(name, tensor.shape):
                        yield Target(name.removesuffix(".weight"), name), tensor
                elif name in by_key:
                    yield by_key[name], tensor

        fits = learn_fits(pairs(), settings, total=len(targets) if targets else None, progress=progress, device=device)
        if targets is not None and set(fits.layers) != {t.layer for t in targets}:
            missing = sorted({t.layer for t in targets} - set(fits.layers))
            raise ValueError(f"the tensors did not include {missing[:5]}")
        return fits.assign(settings, progress=progress)

    files = checkpoint_files(source)
    if targets is None:
        targets = _default_targets(checkpoint_headers(files))
        if not targets:
            raise ValueError(f"no quantizable 2-D weights found in {source}")
    fits_key = _digest(
        {
            "checkpoint": fingerprint(files),
            "targets": [[t.layer, t.key, t.transpose] for t in targets],
            "fit": settings.fit_fields(),
            "learner": _source_digest(f"{__package__}.learner"),
        }
    )
    plan_key = _digest(
        {"fits": fits_key, "assign": settings.assign_fields(), "assigner": _source_digest(f"{__package__}.assigner")}
    )
    planned_from = fingerprint(files, stat=False)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    plan_path, fits_path = root / f"plan-{plan_key[:32]}.safetensors", root / f"fits-{fits_key[:32]}.safetensors"

    if cache and plan_path.is_file():
        try:
            plan = Plan.load(plan_path)
            if plan.key == plan_key:
                plan.origin, plan.checkpoint = "plan-cache", planned_from  # a plan cached before plans recorded it
                logger.info("LowRA plan read from cache %s", plan_path)
                return plan
        except LowRAFormatError as e:
            logger.warning("ignoring unreadable cached plan %s: %s", plan_path, e)
    fits = None
    if cache and fits_path.is_file():
        try:
            fits = ModelFits.load(fits_path)
            if fits.key != fits_key:
                fits = None
            else:
                fits.origin = "fits-cache"
        except LowRAFormatError as e:
            logger.warning("ignoring unreadable cached fits %s: %s", fits_path, e)
            fits = None
    if fits is None:
        fits = learn_fits(_stream(files, targets), settings, total=len(targets), progress=progress, device=device)
        fits.key = fits_key
        if cache:
            fits.save(fits_path)
    plan = fits.assign(settings, progress=progress)
    plan.key = plan_key
    plan.checkpoint = planned_from
    plan.origin = "computed" if fits.origin == "computed" else "fits-cache"
    if cache:
        plan.save(plan_path)
    return plan


__all__ = [
    "LayerFits",
    "LayerPlan",
    "ModelFits",
    "Plan",
    "PlanSettings",
    "Target",
    "checkpoint_files",
    "checkpoint_keys",
    "fingerprint",
    "learn_fits",
    "make_plan",
]
