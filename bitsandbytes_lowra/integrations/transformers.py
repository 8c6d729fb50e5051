"""transformers integration: `LowRAConfig` and the "lowra" HfQuantizer.

    import bitsandbytes_lowra  # registers "lowra" with transformers
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowRAConfig(bits=1.75), device_map="auto")

Loading a full-precision checkpoint:
1. `_process_model_before_weight_loading` (model on meta) swaps every nn.Linear / Conv1D that is not skipped for a
   LinearLowRA, then gets the plan: `plan_path` if given, else `plan.make_plan` (a streaming pass over the
   checkpoint's safetensors files, cached on disk). The budget is global, so the plan exists before any weight is
   quantized.
2. transformers streams the weights; `LowRAQuantize` quantizes each LinearLowRA weight on the device it was loaded
   to, with the plan's bits, codebooks and thresholds.
3. `_process_model_after_weight_loading` checks that every LowRA layer was quantized (transformers only logs errors
   raised inside conversion ops) and sets the flags peft and Trainer look at.

Loading a LowRA checkpoint (config.json has a "lowra" quantization_config): the layers holding LowRA state in the
checkpoint become LinearLowRA, and `LowRADeserialize` rebuilds each weight from its saved state (validated); no
planning. Works with transformers 5.17 to 5.2x: the hooks that differ are noted where they are used.
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import plan as _plan
from ..format import LowRAFormatError, plain_number
from ..functional import BLOB_KEY, STATE_TENSOR_KEYS
from ..nn.modules import LinearLowRA, ParamsLowRA, check_quant_storage, logical_numel

logger = logging.getLogger(__name__)

QUANT_METHOD = "lowra"
# Every tensor a LinearLowRA saves for its weight (its state dict: "weight" + "weight.<QuantStateLowRA field>").
# Longest first: 5.17 matches converter patterns in list order without a name boundary, so "weight" must come last.
SERIALIZED_WEIGHT_NAMES = sorted(
    ["weight", *(f"weight.{k}" for k in STATE_TENSOR_KEYS), f"weight.{BLOB_KEY}"], key=lambda n: (-len(n), n)
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------ config

# How far a saved model's average bits may sit from its config's budget before _check_saved_config names it: the
# greedy assigner meets a budget to ~1e-5 bits, the ILP within ~1% (docs/assigner.md).
_BITS_TOLERANCE = 0.05

# BitsAndBytesConfig's options, for a QLoRA script whose config was renamed to LowRAConfig: what to write instead.
_BNB_EQUIVALENTS = {
    "load_in_4bit": "implied: LowRA is a 1-4-bit format; drop it and give the budget as bits=...",
    "load_in_8bit": "none: LowRA quantizes to 1, 2 or 4 bits per channel (bits=... up to 4)",
    "bnb_4bit_compute_dtype": "use compute_dtype=...",
    "bnb_4bit_use_double_quant": "use compress_statistics=... (True by default)",
    "bnb_4bit_quant_storage": "use quant_storage=...",
    "bnb_4bit_quant_type": "none: LowRA learns per-channel codebooks; learner_mode='fixed_mapping' keeps NormalFloat "
                           "levels",
    "llm_int8_skip_modules": "use modules_to_not_convert=...",
    "llm_int8_threshold": "none: LowRA has no int8 outlier path",
    "llm_int8_has_fp16_weight": "none: LowRA has no int8 mode",
    "llm_int8_enable_fp32_cpu_offload": "none: LowRA refuses CPU offload (load entirely on the GPUs or the CPU)",
}


def _unknown_options_message(kwargs) -> str:
    message = f"LowRAConfig got unknown options {sorted(kwargs)}"
    hints = [f"  {k}: {_BNB_EQUIVALENTS[k]}" for k in sorted(kwargs) if k in _BNB_EQUIVALENTS]
    if hints:
        message += "; bitsandbytes' options and their LowRA equivalents (docs/transformers.md):\n" + "\n".join(hints)
    return message


class LowRAConfig(QuantizationConfigMixin):
    """Quantization config of LowRA (arXiv 2502.08141): per-output-channel 1/2/4-bit precision under a global budget.

    Args:
        bits: the global budget, average code bits per quantized parameter over the whole model (e.g. 1.75).
        precisions: allowed per-channel precisions, a subset of (1, 2, 4); None: (1, 2, 4) below 2 bits, else (2, 4)
            (the paper's footnote; the weight error jumps up at 2.0, docs/assigner.md: give [1, 2, 4] to sweep budgets).
        blocksize: elements per absmax block, within a row (default 64).
        compress_statistics: double-quantize absmax to 8 bits (as bitsandbytes' double quantization).
        compute_dtype: dtype of the matmul (default: the input's dtype).
        learner_mode: "per_channel" (the paper), "shared" (one codebook per layer and precision) or "fixed_mapping"
            (NormalFloat levels, no learning). learner_iterations: Lloyd-Max iterations. weight_power: block weight
            absmax**weight_power in the fit.
        assigner_method: "greedy" (exact LP + repair) or "ilp" (the paper's K-Means + two-level ILP); clusters,
            solver ("highs" or "cbc"), time_limit (seconds per ILP) and seed apply to "ilp".
        loftq_rank, loftq_iterations, loftq_init: with loftq_rank > 0 every weight is quantized with LoftQ ("loftq",
            5 alternating steps by default, as the paper) or PiSSA ("pissa") against the plan; the quantized residual
            becomes the base and the rank-r initialization is stored on the layer (saved with the model), where
            get_peft_model picks it up (matching rank required). loftq_svd_niter: None (exact SVD, the default) or
            the subspace iterations of a randomized SVD (torch.svd_lowrank), much faster on large layers.
        modules_to_not_convert: module names or patterns kept in full precision (the output head and tied
            embeddings always are).
        plan_path: a plan saved by `write_plan` / `Plan.save`: used instead of planning.
        plan_cache: cache learned fits and plans on disk ($LOWRA_PLAN_CACHE, default ~/.cache/bitsandbytes_lowra/plans).
        quant_storage: dtype the packed codes are stored as (as bnb_4bit_quant_storage): uint8 (default) or the
            model's float dtype (torch.bfloat16, float16, float32; same bytes, reinterpreted) so that FSDP can flatten
            and shard them with the float parameters (docs/distributed.md).
    """

    _FIELDS = (
        "bits", "precisions", "blocksize", "compress_statistics", "compute_dtype", "learner_mode",
        "learner_iterations", "weight_power", "assigner_method", "clusters", "solver", "time_limit", "seed",
        "loftq_rank", "loftq_iterations", "loftq_init", "modules_to_not_convert", "plan_path", "plan_cache",
        "quant_storage", "loftq_svd_niter",
    )  # fmt: skip

    def __init__(
        self,
        bits: float | None = None,
        precisions=None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype=None,
        learner_mode: str = "per_channel",
        learner_iterations: int = 2,
        weight_power: float = 1.0,
        assigner_method: str = "greedy",
        clusters: int = 128,
        solver: str = "highs",
        time_limit: float | None = None,
        seed: int = 0,
        loftq_rank: int = 0,
        loftq_iterations: int = 5,
        loftq_init: str = "loftq",
        modules_to_not_convert: list[str] | None = None,
        plan_path: str | None = None,
        plan_cache: bool = True,
        quant_storage=torch.uint8,
        loftq_svd_niter: int | None = None,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)  # from_dict passes the stored dict back, quant_method included
        if kwargs:
            raise ValueError(_unknown_options_message(kwargs))
        if bits is None:
            raise ValueError("LowRAConfig needs the bit budget: LowRAConfig(bits=1.75) (average bits per parameter)")
        self.quant_method = QUANT_METHOD
        bits = plain_number(bits)
        self.bits = float(bits) if isinstance(bits, int) and not isinstance(bits, bool) else bits
        if isinstance(precisions, Iterable) and not isinstance(precisions, (str, bytes)):
            precisions = list(precisions)
        self.precisions = precisions  # post_init checks (a named error for a lone number too), then sorts them
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.compute_dtype = compute_dtype
        self.learner_mode = learner_mode
        self.learner_iterations = learner_iterations
        self.weight_power = weight_power
        self.assigner_method = assigner_method
        self.clusters = clusters
        self.solver = solver
        self.time_limit = time_limit
        self.seed = seed
        self.loftq_rank = loftq_rank
        self.loftq_iterations = loftq_iterations
        self.loftq_init = loftq_init
        if isinstance(modules_to_not_convert, str):  # one name; list("lm_head") would skip every name ending in "d"
            modules_to_not_convert = [modules_to_not_convert]
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.plan_path = None if plan_path is None else os.fspath(plan_path)
        self.plan_cache = plan_cache
        self.quant_storage = quant_storage
        self.loftq_svd_niter = loftq_svd_niter
        self.post_init()

    def post_init(self):
        settings = _plan.PlanSettings.from_config(self)  # validates every planning option, one message per problem
        if settings.precisions is not None:
            self.precisions = list(settings.precisions)
        for name in settings._NUMBERS:  # numpy scalars stored as the Python numbers they hold
            setattr(self, name, getattr(settings, name))
        if isinstance(self.compute_dtype, str):
            if self.compute_dtype.removeprefix("torch.") not in _DTYPES:
                raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")
            self.compute_dtype = _DTYPES[self.compute_dtype.removeprefix("torch.")]
        if self.compute_dtype is not None and self.compute_dtype not in _DTYPES.values():
            raise ValueError(f"compute_dtype must be None or one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")
        if not isinstance(self.compress_statistics, bool):
            raise ValueError(f"compress_statistics must be a bool, got {self.compress_statistics!r}")
        if not isinstance(self.plan_cache, bool):
            raise ValueError(f"plan_cache must be a bool, got {self.plan_cache!r}")
        for name, low in (("loftq_rank", 0), ("loftq_iterations", 1)):
            v = plain_number(getattr(self, name))
            setattr(self, name, v)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.loftq_init not in ("loftq", "pissa"):
            raise ValueError(f"loftq_init must be 'loftq' or 'pissa', got {self.loftq_init!r}")
        self._check_loftq_svd_niter()
        try:
            self.quant_storage = check_quant_storage(self.quant_storage)  # also accepts its name (from config.json)
        except LowRAFormatError as e:
            raise ValueError(str(e)) from None
        m = self.modules_to_not_convert
        if m is not None and not all(isinstance(x, str) for x in m):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {m!r}")

    def _check_loftq_svd_niter(self) -> None:
        n = self.loftq_svd_niter
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"loftq_svd_niter must be None (exact SVD) or an integer >= 0 (subspace iterations of the "
                             f"randomized SVD), got {n!r}")

    def plan_settings(self) -> _plan.PlanSettings:
        return _plan.PlanSettings.from_config(self)

    def to_dict(self) -> dict:
        d = {"quant_method": QUANT_METHOD}
        for k in self._FIELDS:
            d[k] = getattr(self, k)
        if d["compute_dtype"] is not None:
            d["compute_dtype"] = str(d["compute_dtype"]).removeprefix("torch.")
        d["quant_storage"] = str(d["quant_storage"]).removeprefix("torch.")
        return d

    def update(self, **kwargs) -> dict:
        """Set the given options and return the ones that are not options, as QuantizationConfigMixin.update, but
        validated and normalized as in __init__ (the inherited update only setattr's: a bad value surfaced after the
        whole planning pass, and compute_dtype="bfloat16" stayed a string). A refused value changes nothing."""
        known = {k: v for k, v in kwargs.items() if k in self._FIELDS}
        if known:
            checked = type(self)(**{**self.to_dict(), **known})  # __init__ + post_init: the same checks
            self.__dict__.update(checked.__dict__)
        return {k: v for k, v in kwargs.items() if k not in known}

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """QuantizationConfigMixin.from_dict, with the keyword overrides validated (through `update`)."""
        config = cls(**config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    def __eq__(self, other) -> bool:
        return isinstance(other, LowRAConfig) and self.to_dict() == other.to_dict()

    __hash__ = None


# ------------------------------------------------------------------------------------------------------ conversion ops


class _SharesQuantizer(ConversionOps):
    """A conversion op bound to the live quantizer. transformers deep-copies a converter for every checkpoint key it
    matches; a plain deep copy would copy the quantizer with it (its plan: every layer's tables, per layer), and the
    errors an op records would land in that copy, where the quantizer's own after-load check never sees them."""

    def __init__(self, hf_quantizer: "LowRAHfQuantizer"):
        self.hf_quantizer = hf_quantizer  # 5.23+: an op with `hf_quantizer` keeps checkpoint dtypes (get_new_dtype)

    def __deepcopy__(self, memo):
        return type(self)(self.hf_quantizer)


class LowRAQuantize(_SharesQuantizer):
    """Quantize one LinearLowRA weight, on the device it was loaded to, with the plan's bits and tables."""

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            layer = param_name.rsplit(".", 1)[0]
            try:
                result[param_name] = self.hf_quantizer._quantize_weight(model, layer, value)
            except Exception as e:  # transformers reports op errors after loading; keep them for our own check too
                self.hf_quantizer._errors[layer] = f"{type(e).__name__}: {e}"
                raise
        return result


# The per-layer errors of the most recent LowRA load. transformers turns errors raised in conversion ops into a
# generic RuntimeError and shows ours only in its load report (hidden at error verbosity): callers such as the CLI
# read them here to name the layer and the problem.
_last_errors: dict[str, str] = {}


def last_load_errors() -> dict[str, str]:
    """{layer: problem} for the layers the most recent LowRA from_pretrained could not load (empty if none)."""
    return dict(_last_errors)


class LowRADeserialize(_SharesQuantizer):
    """Rebuild a LinearLowRA weight from its saved tensors; pass every other tensor matched by "weight" through."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        layer = full_layer_name.rsplit(".", 1)[0]
        if not isinstance(module, LinearLowRA):
            if set(tensors) != {"weight"}:
                raise LowRAFormatError(f"{layer}: the checkpoint holds LowRA state but the model keeps it dense")
            weight = tensors["weight"]
            # 5.23+ leaves tensors of converters with a quantizer op in the checkpoint dtype: cast plain weights
            # (norms, embeddings) to the dtype the model asked for, as any other parameter.
            target = model.get_parameter_or_buffer(full_layer_name)
            if weight.is_floating_point() and target.is_floating_point() and weight.dtype != target.dtype:
                weight = weight.to(target.dtype)
            return {"weight": weight}
        try:
            if "weight" not in tensors or len(tensors) == 1:
                raise LowRAFormatError("the LowRA state of the weight is missing from the checkpoint")
            stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
            weight = tensors["weight"]
            param = ParamsLowRA.from_prequantized(
                weight, stats, requires_grad=False, device=weight.device, module=module,
                quant_storage=self.hf_quantizer.quantization_config.quant_storage,
            )
            state = param.quant_state
            if tuple(state.shape) != (module.out_features, module.in_features):
                raise LowRAFormatError(
                    f"saved weight has shape {tuple(state.shape)}, the model's layer is "
                    f"({module.out_features}, {module.in_features})"
                )
        except LowRAFormatError as e:  # name the layer: the state's own messages only name the field
            self.hf_quantizer._errors[layer] = str(e)
            raise LowRAFormatError(f"{layer}: {e}") from None
        except Exception as e:
            self.hf_quantizer._errors[layer] = f"{type(e).__name__}: {e}"
            raise
        module.blocksize, module.compress_statistics = state.blocksize, state.nested
        module.quant_storage = param.quant_storage
        module._is_hf_initialized = True
        return {"weight": param}


# ------------------------------------------------------------------------------------------------------ helpers


def _plan_cache_dir() -> Path:
    env = os.environ.get("LOWRA_PLAN_CACHE")
    return Path(env) if env else _plan.default_cache_dir()


def _checkpoint_key(name: str, keys, prefix: str) -> str | None:
    """The checkpoint tensor holding model parameter `name` (same name, or with/without the base model prefix)."""
    candidates = [name, f"{prefix}.{name}" if prefix else None, name.removeprefix(f"{prefix}.") if prefix else None]
    return next((c for c in candidates if c and c in keys), None)


def _is_target(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def _shape(module: nn.Module) -> tuple[int, int]:
    """[out_features, in_features] of an nn.Linear / Conv1D (Conv1D stores its weight [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def select_targets(model, config: LowRAConfig) -> dict[str, nn.Module]:
    """{name: module} of the layers LowRA quantizes: every nn.Linear / Conv1D not skipped by the config or by
    transformers' defaults (output head, tied weights, keep-in-fp32 modules)."""
    skip = HfQuantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
    )
    linear = {n: m for n, m in model.named_modules() if _is_target(m)}
    # A typo ("q_prj") or a name that is no prefix, regex or suffix match of a layer's name ("layers.0.mlp" matches
    # the block "model.layers.0.mlp" as a suffix, not its layers) would keep nothing dense while the config still
    # lists it: the model would be quantized more than asked without a word.
    unmatched = [p for p in config.modules_to_not_convert or () if all(should_convert_module(n, [p]) for n in linear)]
    if unmatched:
        warnings.warn(
            f"LowRA: modules_to_not_convert entries {unmatched} match no linear layer of this model, so they keep "
            "nothing dense (an entry matches a layer's name from its start up to a '.', as a regex, or as its suffix)",
            stacklevel=2,
        )
    return {n: m for n, m in linear.items() if should_convert_module(n, skip)}


def _check_loftq_rank(rank: int, targets: dict[str, nn.Module]) -> None:
    """Before planning, not as one failure per layer after the whole learner pass: a rank-r LoftQ initialization
    needs r <= min(out_features, in_features) of every layer it initializes."""
    small = {n: min(_shape(m)) for n, m in targets.items() if rank > min(_shape(m))}
    if small:
        name = min(small, key=small.get)
        raise ValueError(
            f"loftq_rank={rank} exceeds min(out_features, in_features) of {len(small)} of the {len(targets)} layers "
            f"to quantize (smallest: {name}, {small[name]}); use loftq_rank <= {min(small.values())}, or skip those "
            "layers with modules_to_not_convert"
        )


def checkpoint_targets(targets: dict[str, nn.Module], keys, prefix: str) -> list[_plan.Target]:
    """Planner Targets for the modules select_targets chose: each layer's checkpoint tensor (with or without the
    model's base prefix) and whether it is a Conv1D stored [in, out]."""
    out = []
    for n, m in targets.items():
        key = _checkpoint_key(f"{n}.weight", keys, prefix)
        if key is None:
            raise ValueError(f"LowRA planning found no checkpoint tensor for {n}.weight")
        out.append(_plan.Target(layer=n, key=key, transpose=isinstance(m, Conv1D)))
    return out


def _check_orphan_state(model, headers, lowra_layers: set, prefix: str) -> None:
    """A LowRA checkpoint's layers without the state's metadata entry (the blob) would load as dense layers and
    fail on shapes, or not at all: name them instead. Two signs: LowRA state tensors, or packed 1-D codes where a
    linear layer's [out, in] weight belongs."""
    state = tuple(f".{n}" for n in SERIALIZED_WEIGHT_NAMES if n not in ("weight", f"weight.{BLOB_KEY}"))
    for key in headers:
        suffix = next((s for s in state if key.endswith(s)), None)
        if suffix is not None and key[: -len(suffix)] not in lowra_layers:
            raise LowRAFormatError(
                f"{key[: -len(suffix)]}: the checkpoint holds LowRA state tensors for this layer but not its "
                f"metadata (weight.{BLOB_KEY}): the file is incomplete or corrupt"
            )
    for name, module in model.named_modules():
        key = _checkpoint_key(f"{name}.weight", headers, prefix) if _is_target(module) else None
        if key is None or key.removesuffix(".weight") in lowra_layers:
            continue
        info = headers[key][1]
        if len(info.get("shape", ())) == 1:  # a dense linear weight is [out, in]
            raise LowRAFormatError(
                f"{name}: the checkpoint holds packed LowRA codes for this layer but none of its LowRA state: the "
                "file is incomplete or corrupt"
            )


def _replace(model, names, config: LowRAConfig, blocksize=None, compress_statistics=None) -> None:
    for name in names:
        old = model.get_submodule(name)
        out_features, in_features = _shape(old)
        with torch.device("meta"):
            new = LinearLowRA(
                in_features,
                out_features,
                old.bias is not None,
                compute_dtype=config.compute_dtype,
                compress_statistics=config.compress_statistics if compress_statistics is None else compress_statistics,
                blocksize=config.blocksize if blocksize is None else blocksize,
                quant_storage=config.quant_storage,
            )
        new.source_cls = type(old)
        new.requires_grad_(False)
        parent, child = get_module_from_name(model, name)
        parent._modules[child] = new


@contextmanager
def _plain_torch():
    """Planning runs inside from_pretrained's model-init context (default device meta, default dtype = the load
    dtype): restore cpu / float32 defaults so the planner's own tensors are real."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def _progress() -> bool:
    from transformers.utils.logging import is_progress_bar_enabled

    return is_progress_bar_enabled()


def _planning_device(device_map):
    if isinstance(device_map, dict):
        for d in device_map.values():
            d = torch.device(f"cuda:{d}" if isinstance(d, int) else d) if d not in ("cpu", "disk") else None
            if d is not None and d.type == "cuda":
                return d
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------------------------------------------ quantizer


class LowRAHfQuantizer(HfQuantizer):
    """transformers quantizer of LowRA: plans the whole model, then quantizes each weight as it loads."""

    requires_calibration = False
    # 5.23+ reads this (tensor-parallel plans, default converters); the converters themselves are built by
    # get_weight_conversions below, which both 5.17 and 5.23+ call.
    serialized_names = {"weight": SERIALIZED_WEIGHT_NAMES}

    def __init__(self, quantization_config: LowRAConfig, **kwargs):
        global _last_errors
        super().__init__(quantization_config, **kwargs)
        self.plan: _plan.Plan | None = None
        self.lowra_modules: list[str] = []
        self._errors: dict[str, str] = {}
        _last_errors = self._errors
        self._several_devices = False

    # -- environment ----------------------------------------------------------------------------------------------

    def update_dtype(self, dtype):
        # Up front, not as one failure per layer after planning: the kernels take these three dtypes only.
        if dtype not in _DTYPES.values():
            raise ValueError(
                f"LowRA loads models in float32, float16 or bfloat16 (from_pretrained(..., dtype=...)), got {dtype}"
            )
        storage = self.quantization_config.quant_storage
        if storage != torch.uint8 and storage != dtype:
            # A float quant_storage exists for FSDP, which needs every parameter of a unit in one dtype; anything
            # that casts parameters to one dtype (FSDP mixed precision, peft's upcast) would convert the codes.
            warnings.warn(
                f"LowRA quant_storage={storage} differs from the load dtype {dtype}: FSDP would not flatten the packed "
                f"codes with the other parameters, and a cast of the parameters to one dtype converts the codes (the "
                f"first forward then refuses them). Load with dtype={storage}, or keep quant_storage=torch.uint8 "
                "(the default) when not training with FSDP.",
                stacklevel=2,
            )
        return dtype

    def validate_environment(self, *args, **kwargs):
        # Called with the user's device_map and again with the resolved one (device_map="auto").
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            values = {f"cuda:{v}" if isinstance(v, int) else str(v) for v in device_map.values()}  # 0 is cuda:0
            self._several_devices = len(values) > 1  # see is_compileable
            accelerators = sorted(values - {"cpu", "disk"})
            if "disk" in values or ("cpu" in values and accelerators):
                # Worded by what the map holds: a CPU-only machine has no accelerator to mention.
                if accelerators:
                    where = f"some modules on {sorted(values & {'cpu', 'disk'})} and others on {accelerators}"
                else:
                    where = "some modules on disk" + (" and the rest on the CPU" if "cpu" in values else "")
                advice = ("Load the whole model on the accelerator(s) (reduce max_memory elsewhere or use more GPUs), "
                          "or entirely on the CPU with device_map='cpu'." if accelerators else
                          "Load it entirely on the CPU with device_map='cpu' (no max_memory limit that sends modules "
                          "to disk).")
                raise ValueError(
                    f"LowRA does not support {'CPU or disk' if accelerators else 'disk'} offload: the device map puts "
                    f"{where} (accelerate's offload hooks rebuild parameters without their quantization state). "
                    + advice
                )

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory):
        # Room for one full-precision weight being quantized and the learner's buffers.
        return {k: v * 0.90 for k, v in max_memory.items()}

    def param_element_size(self, model, param_name: str, param) -> float:
        # Overridden directly (5.23+ adds `quantized_element_size`, 5.17 lacks it). Codes plus per-row tables and
        # absmax: about one bit per parameter on top of the budget for wide layers.
        if self.param_needs_quantization(model, param_name):
            return (self.quantization_config.bits + 1.0) / 8
        return param.element_size()

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # True for pre-quantized weights too: 5.23+ accepts their packed shape only then.
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, LinearLowRA) and name == "weight"

    # -- before loading -------------------------------------------------------------------------------------------

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        config: LowRAConfig = self.quantization_config
        files = [Path(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        prefix = getattr(model, "base_model_prefix", "") or ""
        if self.pre_quantized:
            self._prepare_prequantized(model, files, prefix)
            return model

        targets = select_targets(model, config)
        if not targets:
            raise ValueError("LowRA found no nn.Linear / Conv1D layer to quantize in this model")
        _check_loftq_rank(config.loftq_rank, targets)
        # For a saved plan's check: layers the model has that the config (or transformers' defaults) keeps dense.
        self._kept_dense = {n for n, m in model.named_modules() if _is_target(m)} - set(targets)
        with _plain_torch():
            self.plan = self._get_plan(targets, files, prefix, device_map)
        logger.info("LowRA plan (%s): %.4f nominal bits over %d layers", self.plan.origin, self.plan.nominal_bits(),
                    len(self.plan))  # fmt: skip
        _replace(model, targets, config)
        self.lowra_modules = sorted(targets)
        return model

    def _get_plan(self, targets, files, prefix, device_map) -> _plan.Plan:
        config: LowRAConfig = self.quantization_config
        shapes = {n: _shape(m) for n, m in targets.items()}
        if config.plan_path is not None:
            plan = _plan.Plan.load(config.plan_path)
            if "bits" not in plan.settings:
                raise LowRAFormatError(f"the plan {config.plan_path} does not record the bit budget it was made for")
            config.plan_settings().check_made_with(
                plan.settings, ("bits", "precisions", *_plan.FIT_SETTINGS), f"the plan {config.plan_path} was made"
            )
        else:
            if not files:
                raise ValueError(
                    "LowRA plans from the checkpoint's safetensors files, and this load has none (a .bin, GGUF or "
                    "state_dict load): convert the checkpoint to safetensors or pass LowRAConfig(plan_path=...)"
                )
            plan_targets = checkpoint_targets(targets, _plan.checkpoint_keys(files), prefix)
            plan = _plan.make_plan(
                files,
                config,
                modules=plan_targets,
                progress=_progress(),
                cache=config.plan_cache,
                cache_dir=_plan_cache_dir(),
                device=_planning_device(device_map),
            )
        plan.check_targets(shapes, getattr(self, "_kept_dense", ()))
        if plan.blocksize != config.blocksize:
            raise ValueError(f"the plan uses blocksize {plan.blocksize}, the config {config.blocksize}")
        if config.plan_path is not None and plan.checkpoint and files:
            if plan.checkpoint != _plan.fingerprint(files, stat=False):
                # Same layers and shapes, other weights: the precisions and tables were fitted to those. Reusing a
                # plan may be intended (and a re-saved or re-sharded copy of the same weights lands here too).
                warnings.warn(
                    f"the LowRA plan {config.plan_path} was made from another checkpoint than this one (its content "
                    "fingerprint differs): its precisions and tables were fitted to those weights, not these",
                    stacklevel=2,
                )
        return plan

    def _prepare_prequantized(self, model, files, prefix) -> None:
        """The layers with LowRA state in the checkpoint become LinearLowRA; unknown state tensors fail here."""
        if not files:
            raise ValueError("a LowRA checkpoint must be loaded from its safetensors files")
        headers = _plan.checkpoint_headers(files)
        keys = {k: path for k, (path, _) in headers.items()}
        marker = f".weight.{BLOB_KEY}"
        names = {m.removesuffix(".weight") for m, _ in model.named_parameters()}
        known = set(SERIALIZED_WEIGHT_NAMES)
        lowra = {}
        for key in keys:
            if not key.endswith(marker):
                continue
            ckpt_layer = key[: -len(marker)]
            candidates = (ckpt_layer, f"{prefix}.{ckpt_layer}", ckpt_layer.removeprefix(f"{prefix}."))
            layer = next((c for c in candidates if c in names), None)
            if layer is None:
                hint = (": it was saved with peft adapters injected; save the base after peft's unload() or "
                        "merge_and_unload(), and the adapters with the PeftModel's save_pretrained"
                        if ckpt_layer.endswith(".base_layer") else "")  # fmt: skip
                raise LowRAFormatError(
                    f"the checkpoint holds LowRA state for {ckpt_layer}, which this model lacks{hint}"
                )
            module = model.get_submodule(layer)
            if not _is_target(module):
                kind = type(module).__name__
                raise LowRAFormatError(f"{layer} holds LowRA state but is a {kind}, not a linear layer")
            lowra[layer] = ckpt_layer
        if not lowra:
            raise LowRAFormatError("config.json says LowRA but the checkpoint holds no LowRA layer state")
        for layer, ckpt_layer in lowra.items():
            extra = [
                k for k in keys
                if k.startswith(f"{ckpt_layer}.weight.") and k.removeprefix(f"{ckpt_layer}.") not in known
            ]  # fmt: skip
            if extra:
                raise LowRAFormatError(f"unknown LowRA state tensors {extra} (written by a newer version?)")
        _check_orphan_state(model, headers, set(lowra.values()), prefix)
        _replace(model, sorted(lowra), self.quantization_config)
        self.lowra_modules = sorted(lowra)
        self._register_saved_loftq_init(model, headers, lowra)

    @staticmethod
    def _register_saved_loftq_init(model, headers, lowra) -> None:
        """A checkpoint saved after LoftQ holds each layer's adapter initialization: give the fresh layers the
        buffers to load it into (shapes read from the file header). Every layer has one or none does: a layer
        without its own would start LoRA at zero on a base that lacks its low-rank part."""
        from .. import loftq as _loftq

        inits = {}
        for layer, ckpt_layer in lowra.items():
            a, b = (headers.get(f"{ckpt_layer}.{n}") for n in (_loftq.INIT_A, _loftq.INIT_B))
            if a is not None or b is not None:
                inits[layer] = (ckpt_layer, a, b)
        if not inits:
            return
        missing = [layer for layer in lowra if layer not in inits or None in inits[layer][1:]]
        if missing:
            raise LowRAFormatError(
                f"the checkpoint holds LoftQ adapter initializations ({_loftq.INIT_A}, {_loftq.INIT_B}) for "
                f"{len(lowra) - len(missing)} of its {len(lowra)} LowRA layers; {missing[0]} lacks one or both "
                f"({len(missing)} layers in all): the file is incomplete"
            )
        for layer, (ckpt_layer, a, b) in inits.items():
            module = model.get_submodule(layer)
            shape_a, shape_b = list(a[1]["shape"]), list(b[1]["shape"])
            rank = shape_a[0] if shape_a else 0
            if rank < 1 or shape_a != [rank, module.in_features] or shape_b != [module.out_features, rank]:
                raise LowRAFormatError(
                    f"{ckpt_layer}: LoftQ initialization of shapes {shape_a} and {shape_b}; the layer "
                    f"[{module.out_features}, {module.in_features}] needs [r, {module.in_features}] and "
                    f"[{module.out_features}, r]"
                )
            dtypes = {a[1].get("dtype"), b[1].get("dtype")}
            if not dtypes <= {"F16", "BF16", "F32", "F64"}:  # an integer tensor would load as zeros into float buffers
                raise LowRAFormatError(f"{ckpt_layer}: LoftQ initialization stored as {sorted(map(str, dtypes))}; "
                                       "it must be floating point (F16, BF16, F32 or F64)")
            _loftq.register_init_buffers(module, int(rank), device=module.weight.device)

    # -- loading --------------------------------------------------------------------------------------------------

    def _quantize_weight(self, model, layer: str, value: torch.Tensor) -> ParamsLowRA:
        module = model.get_submodule(layer)
        if self.plan is None or layer not in self.plan:
            raise LowRAFormatError(f"no LowRA plan for {layer}")
        if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
            value = value.t()
        lp = self.plan[layer]
        config: LowRAConfig = self.quantization_config
        if config.loftq_rank > 0:
            # The plan (bits, tables) was made for W and stays fixed; LoftQ alternates quantize(W - BA) / SVD(W - Q).
            from .. import loftq as _loftq
            from ..functional import LowRAPlan

            _loftq.loftq_linear(
                module, value, config.loftq_rank, iterations=config.loftq_iterations, init=config.loftq_init,
                plan=LowRAPlan(lp.bits, lp.codebook, lp.thresholds), svd_niter=config.loftq_svd_niter,
            )
            module.set_quant_storage(config.quant_storage)  # LoftQ installs uint8 codes
            module._is_hf_initialized = True
            return module.weight
        param = ParamsLowRA(
            value,
            requires_grad=False,
            blocksize=module.blocksize,
            compress_statistics=module.compress_statistics,
            module=module,
            quant_storage=config.quant_storage,
        )
        param.set_plan(lp.bits, lp.codebook, lp.thresholds)
        param = param.to(value.device)  # quantizes where the weight was loaded (its device_map device)
        module._is_hf_initialized = True
        return param

    def get_quantize_ops(self):
        return LowRAQuantize(self)

    def get_weight_conversions(self):
        # Both 5.17 and 5.23+ append these to the model's converters (update_weight_conversions, not overridden).
        if not self.pre_quantized:
            return []
        return [WeightConverter(list(SERIALIZED_WEIGHT_NAMES), "weight", [LowRADeserialize(self)])]

    # -- after loading --------------------------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model, **kwargs):
        failed = []
        for name in self.lowra_modules:
            module = model.get_submodule(name)
            w = module.weight
            quantized = getattr(w, "quant_state", None) is not None and w.device.type != "meta"
            if not isinstance(module, LinearLowRA) or not quantized:
                failed.append(name)
        if failed:
            reasons = [f"  {n}: {self._errors[n]}" for n in failed if n in self._errors][:5]
            raise LowRAFormatError(
                f"LowRA could not load {len(failed)} of {len(self.lowra_modules)} quantized layers "
                f"(first: {failed[:3]})" + ("\n" + "\n".join(reasons) if reasons else "")
            )
        self._check_loftq_init(model)
        if self.pre_quantized:
            self._check_saved_config(model)
        # peft's prepare_model_for_kbit_training enables input grads / checkpointing only for these flags, and
        # Trainer skips DataParallel for them. LowRA is a 1-4-bit weight format, so "4bit" is accurate enough.
        model.is_loaded_in_4bit = True
        model.is_lowra_quantized = True
        # Our converter only gathers a layer's saved tensors; its names are the state dict's, so saving must not
        # try to reverse it (the reverse of a many-to-one converter renames keys).
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if not _is_ours(c)]
        _guard_dtype_casts(model)
        _bind_accounting(model)
        return model

    def _check_saved_config(self, model) -> None:
        """A saved model's weights come from its layers' states, not from config.json: a config whose blocksize or
        scale form differs from theirs (hand-edited, or copied from another model) would misdescribe the model it
        is saved with again, so it is refused; a budget far from the layers' average bits is named."""
        from ..convert import model_bits_report

        config = self.quantization_config
        for name in self.lowra_modules:
            state = model.get_submodule(name).weight.quant_state
            for field, saved, said in (("blocksize", state.blocksize, config.blocksize),
                                       ("compress_statistics", state.nested, config.compress_statistics)):
                if saved != said:
                    raise LowRAFormatError(
                        f"config.json's quantization_config says {field}={said!r}, but the saved layers (first: "
                        f"{name}) hold {field}={saved!r}: the config was edited or belongs to another model; restore "
                        f"{field}={saved!r}")  # fmt: skip
        nominal = model_bits_report(model)["nominal_bits"]
        if abs(nominal - config.bits) > _BITS_TOLERANCE:
            warnings.warn(f"config.json's quantization_config says bits={config.bits}, but the saved layers average "
                          f"{nominal:.4f} bits per parameter: the config was edited or belongs to another model",
                          stacklevel=2)

    def _check_loftq_init(self, model) -> None:
        """Saved LoftQ initializations must be finite: get_peft_model would copy NaN into lora_A / lora_B."""
        from .. import loftq as _loftq

        for name in self.lowra_modules:
            init = _loftq.stored_init(model.get_submodule(name))
            if init is not None and not all(bool(torch.isfinite(t).all()) for t in init):
                raise LowRAFormatError(f"{name}: its saved LoftQ initialization holds NaN or inf values")

    # -- capabilities ---------------------------------------------------------------------------------------------

    def is_serializable(self, safe_serialization=None):  # a method: transformers calls is_serializable()
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # generate(cache_implementation="static") then compiles the decode step on a GPU (reduce-overhead) as it does
        # for unquantized models: LinearLowRA traces into one graph, its kernels as custom ops (tests/test_decode.py).
        # Not for a model split over several devices: accelerate's hooks break the graph at every module, and each
        # LinearLowRA frame (guarded on its own stamps) is then a recompile until Dynamo's limit (on two H200s:
        # tokens right, but the limit hit and most layers eager). generate then runs eagerly, as before.
        return not self._several_devices

    def _dequantize(self, model, dtype=None):
        for name in self.lowra_modules:
            module = model.get_submodule(name)
            if not isinstance(module, LinearLowRA):
                continue
            weight = module.dequantize(dtype)
            dense = nn.Linear(module.in_features, module.out_features, module.bias is not None, device=weight.device,
                              dtype=weight.dtype)  # fmt: skip
            with torch.no_grad():
                dense.weight.copy_(weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, child = get_module_from_name(model, name)
            parent._modules[child] = dense
        _drop_lowra_attributes(model)  # transformers' dequantize then removes the quantizer and its config
        return model


# Methods _guard_dtype_casts and _bind_accounting bind on the model instance (popping them restores the class's own).
_GUARDED_CASTS = ("to", "bfloat16", "double", "type")
_ACCOUNTING = ("num_parameters", "get_memory_footprint")


def _drop_lowra_attributes(model) -> None:
    """The flags, dtype-cast guards and counters _process_model_after_weight_loading set, for a model with no
    LinearLowRA left."""
    for attr in ("is_loaded_in_4bit", "is_lowra_quantized", *_GUARDED_CASTS, *_ACCOUNTING):
        model.__dict__.pop(attr, None)


def _bind_accounting(model) -> None:
    """transformers' num_parameters counts a weight's elements, which for LowRA are packed bytes (51.6 M for
    SmolLM2-135M at 1.75 bits, changing with `bits`); it corrects only bnb's Params4bit. Count [out, in] per
    quantized layer instead, as it does for bnb and as peft's counter does for us.
    get_memory_footprint sums parameters and buffers, and a LowRA weight's scales and per-row tables live on its
    quant_state (about a third of a quantized layer's bytes at 576 columns): add them, whatever return_buffers
    says (they are part of the weight, not buffers)."""
    cls = type(model)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        states = {id(m.quant_state): m.quant_state for m in self.modules()
                  if isinstance(m, LinearLowRA) and m.quant_state is not None}
        return cls.get_memory_footprint(self, return_buffers=return_buffers) + sum(
            s.held_nbytes for s in states.values())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        count = cls.num_parameters(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        # LinearLowRA weights are never embeddings: exclude_embeddings leaves them in
        return count + sum(logical_numel(p) - p.numel() for p in self.parameters()
                           if isinstance(p, ParamsLowRA) and (p.requires_grad or not only_trainable))

    # bound per instance, as the cast guards
    model.num_parameters = types.MethodType(num_parameters, model)
    model.get_memory_footprint = types.MethodType(get_memory_footprint, model)


def release_if_dense(model) -> bool:
    """After layers were swapped for dense ones outside model.dequantize() (peft's merge_and_unload(dense=True)): if
    no LinearLowRA is left, drop what made the model LowRA-quantized, as dequantize() does: the flags, the cast
    guards, the quantizer and config.quantization_config. Otherwise save_pretrained would write a config that says
    LowRA beside a checkpoint with no LowRA state, which from_pretrained refuses. Returns whether it did."""
    if not isinstance(getattr(model, "hf_quantizer", None), LowRAHfQuantizer):
        return False
    if any(isinstance(m, LinearLowRA) for m in model.modules()):
        return False
    _drop_lowra_attributes(model)
    model.hf_quantizer.remove_quantization_config(model)
    return True


def _is_ours(conversion) -> bool:
    return any(isinstance(op, LowRADeserialize) for op in getattr(conversion, "operations", []))


def _guard_dtype_casts(model) -> None:
    """`model.to(dtype)` / `.bfloat16()` would recast norms around frozen packed codes: refuse, as transformers
    does for bitsandbytes (its guard only knows bitsandbytes; `.half()` / `.float()` are already refused)."""
    cls = type(model)

    def to(self, *args, **kwargs):
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            raise ValueError(
                "You cannot cast a LowRA-quantized model to a new dtype: load it with the dtype you want "
                "(from_pretrained(..., dtype=...)); moving it to a device is fine."
            )
        return cls.to(self, *args, **kwargs)

    def refused(name: str):
        def cast(self, *args, **kwargs):
            raise ValueError(
                f"`.{name}()` would cast a LowRA-quantized model's packed codes and tables: load it with the dtype "
                "you want instead (from_pretrained(..., dtype=...))"
            )

        return cast

    # Bound per instance (deepcopy rebinds bound methods to the copy). `.type()` and `.double()` cast the packed
    # codes themselves (uint8 to float), which no later call can undo.
    model.to = types.MethodType(to, model)
    for name in _GUARDED_CASTS[1:]:
        setattr(model, name, types.MethodType(refused(name), model))


# ------------------------------------------------------------------------------------------------------ plans


def write_plan(checkpoint, config: LowRAConfig, output=None, model_class=None, progress: bool = True) -> _plan.Plan:
    """Plan a safetensors checkpoint directory for `config` without loading it, and save it to `output` (default
    <checkpoint>/lowra-plan-<bits>.safetensors). Pass the saved path as LowRAConfig(plan_path=...) to use it."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    model_config = AutoConfig.from_pretrained(checkpoint)
    classes = [model_class] if model_class is not None else [AutoModelForCausalLM, AutoModel]
    model = None
    with torch.device("meta"):
        for cls in classes:
            try:
                model = cls.from_config(model_config)
                break
            except ValueError:
                continue
    if model is None:
        raise ValueError(f"no transformers model class instantiates {checkpoint}'s config; pass model_class=")
    targets = select_targets(model, config)
    files = _plan.checkpoint_files(checkpoint)
    prefix = getattr(model, "base_model_prefix", "") or ""
    plan_targets = checkpoint_targets(targets, _plan.checkpoint_keys(files), prefix)
    plan = _plan.make_plan(files, config, modules=plan_targets, progress=progress, cache=config.plan_cache,
                           cache_dir=_plan_cache_dir())  # fmt: skip
    plan.check_targets({n: _shape(m) for n, m in targets.items()})
    output = Path(output) if output is not None else checkpoint / f"lowra-plan-{config.bits:g}.safetensors"
    plan.save(output)
    return plan


# ------------------------------------------------------------------------------------------------------ registration


def register() -> None:
    """Register "lowra" with transformers (idempotent: transformers raises on a second registration)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowRAConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowRAHfQuantizer)


__all__ = [
    "LowRAConfig",
    "LowRAHfQuantizer",
    "LowRAQuantize",
    "LowRADeserialize",
    "last_load_errors",
    "register",
    "select_targets",
    "write_plan",
]
