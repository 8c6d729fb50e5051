"""peft LoRA on LinearLowRA (peft 0.21): the layer, its automatic dispatch, merging, LoftQ on a PeftModel.

`import bitsandbytes_lowra` arranges for this module to load together with peft, and loading it wraps
`LoraModel._create_new_module` so that every LinearLowRA gets a `LowRALoraLinear`, whatever the path: get_peft_model,
PeftModel.from_pretrained, transformers' add_adapter / load_adapter (inject_adapter_in_model). Without it peft would
give a LinearLowRA (an nn.Linear) its dense `lora.Linear`, whose merge adds the delta to the packed uint8 codes.
A user's own `LoraConfig._register_custom_module` mapping for LinearLowRA still wins.

Merging re-quantizes with the stored precisions, codebooks, thresholds *and block scales* (absmax). Re-deriving the
scales from the merged weight is not an option: learned codebooks do not reach +-1, so a block's largest value
dequantizes to c_max * absmax and re-quantizing the dequantized weight shrinks every block by c_max and moves codes
(measured on SmolLM2 q_proj with learned tables: one such round trip changes the weight by 69% / 23% / 4.6% at
1 / 2 / 4 bits). With fixed scales, re-quantizing an unchanged weight is exact and merge + unmerge only rounds.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.quantization_utils import QuantizationBackend
from torch import nn

from .. import loftq as _loftq
from ..format import FLOAT_DTYPES, padded_cols
from ..functional import QuantStateLowRA
from ..nn import LinearLowRA, ParamsLowRA
from ..nn.modules import logical_numel

# init_lora_weights values that only touch the adapter (or, for "loftq", use what LoftQ stored on the base).
_SUPPORTED_INITS = (True, False, "gaussian", "eva", "loftq")
_ROUNDING_WARNING = (
    "{} LoRA into a LowRA (1-4 bit) weight re-quantizes it: generations may differ slightly due to rounding errors."
)


# ---------------------------------------------------------------------------------------------------------------
# Re-quantization with the stored tables and block scales
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_with_scales(W: torch.Tensor, state: QuantStateLowRA, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """Packed codes of W under `state`'s bits, thresholds and (decoded) block scales; the state is not changed.

    Same arithmetic as the quantize kernels (docs/format.md): v = w / absmax in float32 (0 where absmax is 0),
    code = number of the row's thresholds strictly below v, codes packed little-endian within each byte. Values
    beyond +-absmax take the outermost code; a block whose stored scale is 0 stays 0. NaN or inf is refused: no code
    represents it, and searchsorted would silently give NaN the outermost one.
    """
    rows, cols = state.shape
    if tuple(W.shape) != (rows, cols):
        raise ValueError(f"weight has shape {tuple(W.shape)}, the quantization state describes {(rows, cols)}")
    _check_finite(W, "the weight to re-quantize")
    bs = state.blocksize
    pc = padded_cols(cols, bs)
    dev = state.device
    absmax = state.absmax_fp32().reshape(rows, -1).to(dev)
    offsets, bits, thr = state.row_offsets.to(dev), state.bits.to(dev), state.thresholds.to(dev)
    packed = torch.zeros(state.packed_nbytes, dtype=torch.uint8, device=dev)
    step = max(1, chunk_elements // pc)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = torch.zeros(r1 - r0, pc, dtype=torch.float32, device=dev)
        x[:, :cols] = W[r0:r1].to(device=dev, dtype=torch.float32)
        a = absmax[r0:r1, :, None]
        v = torch.where(a > 0, x.view(r1 - r0, -1, bs) / torch.where(a > 0, a, torch.ones_like(a)), 0.0)
        v = v.view(r1 - r0, pc)
        for p in (1, 2, 4):
            idx = (bits[r0:r1] == p).nonzero().flatten()
            if not idx.numel():
                continue
            codes = torch.searchsorted(thr[r0 + idx, : 2**p - 1].float().contiguous(), v[idx].contiguous())
            per_byte = 8 // p
            shifts = torch.arange(per_byte, device=dev) * p
            byte_vals = (codes.view(idx.numel(), -1, per_byte) << shifts).sum(-1).to(torch.uint8)
            where = offsets[r0 + idx][:, None] + torch.arange(pc * p // 8, device=dev)[None, :]
            packed[where] = byte_vals
    return packed


def _check_finite(W: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(W)
    if bad.any():
        rows = bad.reshape(W.shape[0], -1).any(1).nonzero().flatten()
        raise ValueError(f"{what} holds NaN or inf in {rows.numel()} row(s) (first: {rows[:5].tolist()}); the codes "
                         "cannot represent them")


def requantize_in_place(layer: LinearLowRA, W: torch.Tensor) -> None:
    """Replace the layer's codes by those of W (same state object: bits, tables and scales unchanged)."""
    packed, state = layer._packed_and_state()
    packed.copy_(encode_with_scales(W, state))


class LowRABackend(QuantizationBackend):
    """peft's quantization-backend interface for LinearLowRA (get/set the base weight, re-quantizing on set)."""

    supports_merge = True
    backend_name = "lowra"
    layer_type = "linear"

    def get_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return base_layer.dequantize(torch.float32)

    def set_base_weight(self, peft_layer, weight_data: torch.Tensor) -> None:
        requantize_in_place(peft_layer.get_base_layer(), weight_data)


# ---------------------------------------------------------------------------------------------------------------
# The LoRA layer
# ---------------------------------------------------------------------------------------------------------------


def _requested_variants(config) -> list[str]:
    """LoRA variants (DoRA, aLoRA, VeLoRA, Arrow, MiCA, ...) the config asks for, by LoraConfig's own metadata."""
    import dataclasses

    out = []
    for f in dataclasses.fields(config):
        if f.name == "init_lora_weights":
            out += [v for v in f.metadata.get("lora_variants", ()) if config.init_lora_weights == v]
        elif f.metadata.get("is_lora_variant") and getattr(config, f.name):
            out.append(f.name)
    return out


class LowRALoraLinear(nn.Module, LoraLayer):
    """LoRA on a LinearLowRA, modeled on peft's bnb Linear4bit: base(x) + scaling * B(A(dropout(x))).

    The base stays packed and frozen. Merging dequantizes, adds (or subtracts) the deltas and re-quantizes with the
    stored precisions, codebooks, thresholds and block scales (see the module docstring). Plain LoRA only: DoRA and
    the other variants are refused. On a base that LoftQ / PiSSA produced (it stores `lowra_init_A/B`), every adapter
    created with init_lora_weights=True or "loftq" starts from that initialization, rescaled for its own scaling.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self.quantization_backend = LowRABackend()
        self._dense_unload = False  # set by merge_and_unload(dense=True), with:
        self._dense_dtype: torch.dtype | None = None  # the dense layer's dtype (None: the weight's original one)
        # Codes (on the CPU) and bias from before the first merge, with the merged adapters' weights: an unmerge
        # with those adapters unchanged restores them exactly instead of re-quantizing (see `unmerge`).
        self.keep_premerge_codes = True
        self._premerge: dict | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # -- creation -----------------------------------------------------------------------------------------------
    def resolve_lora_variant(self, *, config, **kwargs):
        requested = _requested_variants(config)
        if requested:
            raise ValueError(
                f"LoRA variants {requested} are not supported on LowRA-quantized layers: only plain LoRA is. DoRA and "
                "the weight-dependent variants read or rewrite the dense base weight, which a LinearLowRA keeps packed "
                "(1-4 bits per channel); dequantize the model first (merge_and_unload(dense=True) or "
                "model.dequantize()) to use them."
            )
        return None

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        init = config.init_lora_weights
        if not any(init is v or (isinstance(init, str) and init == v) for v in _SUPPORTED_INITS):
            hint = ""
            if isinstance(init, str) and init.startswith("pissa"):
                hint = (
                    " For PiSSA on LowRA, quantize with it, given the dense weights: "
                    "replace_lora_weights_lowra_loftq(peft_model, weights, init='pissa') or "
                    "bitsandbytes_lowra.loftq.loftq_linear(layer, W, r, init='pissa') before get_peft_model."
                )
            raise ValueError(
                f"init_lora_weights={init!r} is not supported on LowRA-quantized layers: it reads or rewrites the "
                f"dense base weight, which is packed. Supported: {list(_SUPPORTED_INITS)}.{hint}"
            )
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def reset_lora_parameters(self, adapter_name, init_lora_weights):
        super().reset_lora_parameters(adapter_name, init_lora_weights)
        if adapter_name not in self.lora_A or _loftq.stored_init(self.get_base_layer()) is None:
            return
        if init_lora_weights is True:
            self._apply_stored_init(adapter_name)
        elif init_lora_weights:
            warnings.warn(
                f"the base layer holds a LoftQ/PiSSA residual but init_lora_weights={init_lora_weights!r} ignores its "
                "stored initialization: the adapter does not start from the original weights (use True or 'loftq')."
            )

    def loftq_init(self, adapter_name, config):
        if _loftq.stored_init(self.get_base_layer()) is None:
            raise ValueError(
                "init_lora_weights='loftq' on a LowRA layer uses the initialization LoftQ stored when the base was "
                "quantized, and this base has none. Quantize with LoftQ (LowRAConfig(loftq_rank=r) in from_pretrained "
                "or bitsandbytes_lowra.loftq.loftq_linear), or run replace_lora_weights_lowra_loftq(peft_model, "
                "weights) on the PeftModel with the dense checkpoint."
            )
        self._apply_stored_init(adapter_name)

    def _apply_stored_init(self, adapter_name: str) -> None:
        A0, B0 = _loftq.stored_init(self.get_base_layer())
        r = self.r[adapter_name]
        if A0.shape[0] != r:
            raise ValueError(
                f"the base layer was quantized with LoftQ/PiSSA at rank {A0.shape[0]}, but adapter {adapter_name!r} "
                f"has r={r}: use LoraConfig(r={A0.shape[0]}) (the stored initialization only fits that rank), or "
                "init_lora_weights='gaussian' to start from a plain initialization on the residual base."
            )
        lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if lora_A.device.type == "meta":  # low_cpu_mem_usage: the weights are loaded afterwards
            return
        root = math.sqrt(self.scaling[adapter_name])  # scaling * (B0/root) @ (A0/root) = B0 @ A0
        with torch.no_grad():
            lora_A.copy_((A0.float() / root).to(lora_A.device))
            lora_B.copy_((B0.float() / root).to(lora_B.device))

    # -- merging --------------------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter) -> torch.Tensor:
        """scaling * B @ A in float32 (peft's Linear casts low-precision factors up on CPU; we always do)."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (B.float() @ A.float()) * self.scaling[adapter]

    def _delta_sum(self, adapters) -> torch.Tensor:
        return sum(self.get_delta_weight(a) for a in adapters)

    def _bias_delta(self, adapters):
        terms = [self.lora_B[a].bias * self.scaling[a] for a in adapters if self.lora_bias[a]]
        return sum(terms) if terms else None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        bias = self._bias_delta(adapter_names)
        if bias is not None and base.bias is None:  # refused before anything is changed (safe_merge or not)
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        if isinstance(base, LinearLowRA):
            warnings.warn(_ROUNDING_WARNING.format("Merging"))
            # All adapters in one re-quantization: one rounding, not one per adapter.
            W = self.quantization_backend.get_base_weight(base) + self._delta_sum(adapter_names)
            # always, not only with safe_merge: re-quantized NaN would be a finite code, the breakage invisible after
            if not torch.isfinite(W).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapters {adapter_names} seem to be broken "
                                 "(nothing was merged)")
            self._snapshot(base, adapter_names)
            requantize_in_place(base, W)
        else:  # a dense base (merge_and_unload(dense=True)): exact
            W = base.weight.data.float() + self._delta_sum(adapter_names)
            if safe_merge and not torch.isfinite(W).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapters {adapter_names} seem to be broken")
            base.weight.data = W.to(base.weight.dtype)
        if bias is not None:
            base.bias.data += bias.to(base.bias.dtype)
        if self._premerge is not None and base.bias is not None:
            self._premerge["merged_bias"] = base.bias.detach().clone()  # unmerge: was the bias trained since?
        self.merged_adapters.extend(adapter_names)

    def _adapter_snapshot(self, name: str):
        B = self.lora_B[name]
        return (self.lora_A[name].weight.detach().clone(), B.weight.detach().clone(),
                None if B.bias is None else B.bias.detach().clone(), self.scaling[name])

    def _snapshot(self, base: LinearLowRA, adapter_names) -> None:
        if not self.keep_premerge_codes:
            self._premerge = None
            return
        if self._premerge is None:
            if self.merged:  # merged before without a snapshot: nothing exact to go back to
                return
            self._premerge = {
                "packed": base.weight.data.detach().to("cpu", copy=True),
                "bias": None if base.bias is None else base.bias.detach().clone(),
                "adapters": {},
            }
        self._premerge["adapters"].update({a: self._adapter_snapshot(a) for a in adapter_names})

    def _premerge_matches(self, adapters) -> bool:
        snap = self._premerge
        if snap is None or set(snap["adapters"]) != set(adapters):
            return False
        for name in adapters:
            now = self._adapter_snapshot(name)
            for old, new in zip(snap["adapters"][name], now):
                if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
                    if old is None or new is None or not torch.equal(old, new):
                        return False
                elif old != new:
                    return False
        return True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        adapters = [a for a in self.merged_adapters if a in self.lora_A]
        base = self.get_base_layer()
        if isinstance(base, LinearLowRA) and self._premerge_matches(adapters):
            # The adapters did not change since they were merged: put the codes back, bit for bit, and the bias too
            # unless it changed while merged (a trainable base bias): then only the adapters' part comes off it.
            base.weight.data.copy_(self._premerge["packed"])
            if self._premerge["bias"] is not None:
                merged = self._premerge.get("merged_bias")
                if merged is None or torch.equal(base.bias, merged):
                    base.bias.data.copy_(self._premerge["bias"])
                else:
                    bias = self._bias_delta(adapters)
                    if bias is not None:
                        base.bias.data -= bias.to(base.bias.dtype)
        else:
            if isinstance(base, LinearLowRA):
                warnings.warn(_ROUNDING_WARNING.format("Unmerging"))
                requantize_in_place(base, self.quantization_backend.get_base_weight(base) - self._delta_sum(adapters))
            else:
                base.weight.data = (base.weight.data.float() - self._delta_sum(adapters)).to(base.weight.dtype)
            bias = self._bias_delta(adapters)
            if bias is not None:
                base.bias.data -= bias.to(base.bias.dtype)
        self._premerge = None
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names):
        """Called by peft's merge_and_unload / unload: the base layer, merged or not (dense on request)."""
        if self._dense_unload:
            self._dequantize_base(self._dense_dtype)
        if merge:
            keep, self.keep_premerge_codes = self.keep_premerge_codes, False  # the layer is discarded: no snapshot
            try:
                self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            finally:
                self.keep_premerge_codes = keep
        base = self.get_base_layer()
        if self.merged and isinstance(base, LinearLowRA):
            # the base now contains an adapter: it is no longer the residual LoftQ's initialization was made for
            _loftq.drop_init(base)
        self._premerge = None
        return base

    def _dequantize_base(self, dtype: torch.dtype | None = None) -> None:
        """Swap the LinearLowRA base for a dense nn.Linear holding its dequantized weight (exact merges from here), in
        `dtype` (default: the weight's original dtype)."""
        base = self.get_base_layer()
        if not isinstance(base, LinearLowRA):
            return
        if self.merged:
            self.unmerge()
        W = base.dequantize(dtype)
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        dense.weight = nn.Parameter(W, requires_grad=False)
        if base.bias is not None:
            dense.bias = nn.Parameter(base.bias.detach().to(W.dtype, copy=True), requires_grad=base.bias.requires_grad)
        self.base_layer = dense

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_A = self.lora_A[active_adapter]
            lora_B = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            if torch.is_autocast_enabled():
                output = lora_B(lora_A(dropout(x))) * scaling
            else:
                output = lora_B(lora_A(dropout(self._cast_input_dtype(x, lora_A.weight.dtype)))) * scaling
                output = output.to(result.dtype)
            result = result + output
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def dispatch_lowra(target: nn.Module, adapter_name: str, config, **kwargs) -> Optional[LowRALoraLinear]:
    """peft dispatcher: a LowRALoraLinear for a LinearLowRA target, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, LinearLowRA):
        return LowRALoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def _user_mapping_applies(config, target) -> bool:
    custom = getattr(config, "_custom_modules", None)
    if not custom:
        return False
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    return any(isinstance(base, key) for key in custom)


def register() -> None:
    """Make LoraModel try LowRA first (idempotent). Runs when this module is imported."""
    current = LoraModel.__dict__["_create_new_module"]
    original = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(original, "_lowra_dispatch", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if not _user_mapping_applies(lora_config, target):
            new_module = dispatch_lowra(target, adapter_name, lora_config, **kwargs)
            if new_module is not None:
                return new_module
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._lowra_dispatch = True
    _create_new_module.__wrapped__ = original
    LoraModel._create_new_module = staticmethod(_create_new_module)
    _check_loftq_bases_after_injection()
    _refuse_other_tuners()
    _count_quantized_parameters()


def loftq_bases_without_adapter(model: nn.Module) -> list[str]:
    """Names of the LinearLowRA layers of `model` that hold a stored LoftQ/PiSSA initialization but carry no LoRA
    adapter: their base is the quantized residual W - B0 A0, and nothing adds B0 A0 back."""
    adapted = {id(m.get_base_layer()) for m in model.modules() if isinstance(m, LowRALoraLinear) and m.lora_A}
    return [n for n, m in model.named_modules()
            if isinstance(m, LinearLowRA) and id(m) not in adapted and _loftq.stored_init(m) is not None]


def _check_loftq_bases_after_injection() -> None:
    """After every LoRA injection (get_peft_model, PeftModel.from_pretrained / load_adapter, transformers'
    load_adapter): warn when LoftQ bases were left without an adapter. With LowRAConfig(loftq_rank=r) every quantized
    layer lost its low-rank part, so targeting only some of them (q_proj, v_proj) leaves the others worse than plain
    quantization (on SmolLM2 at 2 bits: KL 7.4 against 4.7 without LoftQ)."""
    original = LoraModel.inject_adapter
    if getattr(original, "_lowra_loftq_check", False):
        return

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        out = original(self, model, adapter_name, *args, **kwargs)
        missing = loftq_bases_without_adapter(model)
        if missing:
            warnings.warn(
                f"{len(missing)} LowRA layers hold a LoftQ/PiSSA initialization but got no LoRA adapter (e.g. "
                f"{missing[0]}): their base lacks its low-rank part, which only an adapter restores, so they are "
                "worse than without LoftQ. With loftq_rank, target every quantized layer (target_modules="
                "'all-linear'), or load the model without loftq_rank.",
                stacklevel=3,
            )
        return out

    inject_adapter._lowra_loftq_check = True
    inject_adapter.__wrapped__ = original
    LoraModel.inject_adapter = inject_adapter


def _count_quantized_parameters() -> None:
    """print_trainable_parameters counts a LowRA weight as its packed bytes (57 M "parameters" for SmolLM2-135M at
    2 bits; peft corrects bnb's Params4bit by its class name only): count the weight's [out, in] instead."""
    from peft import PeftModel

    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_lowra_count", False):
        return

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original(self)
        for _, param in self.named_parameters():
            extra = logical_numel(param) - param.numel()
            total += extra
            trainable += extra if param.requires_grad else 0
        return trainable, total

    get_nb_trainable_parameters._lowra_count = True
    get_nb_trainable_parameters.__wrapped__ = original
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters


def _refuse_other_tuners() -> None:
    """Every peft tuner but LoRA (VeRA, OFT, BOFT, IA3, LoHa, LoKr, AdaLoRA, ...) treats its target's weight as a
    float matrix: it would read, or on merge overwrite, a LinearLowRA's packed codes. Refuse at injection, loudly,
    instead of corrupting silently. Covers the tuners peft defines (all imported with peft)."""

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    def guard(tuner_cls, original):
        def _create_and_replace(self, peft_config, adapter_name, target, *args, **kwargs):
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if isinstance(base, LinearLowRA):
                raise TypeError(
                    f"peft {tuner_cls.__name__} ({peft_config.peft_type}) cannot adapt LinearLowRA layers: it would "
                    "treat the packed LowRA codes as a float weight. LoRA (LoraConfig) is the supported tuner; exclude "
                    "the LowRA layers from target_modules, or dequantize the model first"
                )
            return original(self, peft_config, adapter_name, target, *args, **kwargs)

        _create_and_replace._lowra_refuse = True
        return _create_and_replace

    for cls in set(subclasses(BaseTuner)):
        original = cls.__dict__.get("_create_and_replace")
        if cls is LoraModel or original is None or getattr(original, "_lowra_refuse", False):
            continue
        cls._create_and_replace = guard(cls, original)


register()


# ---------------------------------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------------------------------


def lowra_lora_layers(peft_model) -> dict[str, LowRALoraLinear]:
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, LowRALoraLinear)}


def merge_and_unload(peft_model, *, dense: bool = False, progressbar: bool = False, safe_merge: bool = False,
                     adapter_names: Optional[list[str]] = None):
    """peft's merge_and_unload, with `dense=True` giving plain nn.Linear layers (dequantized base + exact deltas)
    instead of re-quantized LinearLowRA ones. They take the dtype of the model's input embeddings, the dtype the
    rest of the model computes in (float32 after prepare_model_for_kbit_training, whatever the load dtype):
    LinearLowRA computes in its input's dtype, an nn.Linear only in its weight's. A transformers model left with no
    LinearLowRA becomes a plain dense one, as after model.dequantize(): it saves, reloads and casts like one."""
    layers = lowra_lora_layers(peft_model).values() if dense else ()
    embeddings = peft_model.get_input_embeddings() if hasattr(peft_model, "get_input_embeddings") else None
    dtype = getattr(getattr(embeddings, "weight", None), "dtype", None)
    dtype = dtype if dtype in FLOAT_DTYPES else None
    for layer in layers:
        layer._dense_unload, layer._dense_dtype = True, dtype
    try:
        merged = peft_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
    finally:
        for layer in layers:
            layer._dense_unload, layer._dense_dtype = False, None
    if dense:
        from .transformers import release_if_dense

        release_if_dense(merged)
    return merged


def _weight_source(weights) -> Callable[[str], torch.Tensor]:
    """name -> dense tensor, from a mapping, a callable, or a safetensors file / checkpoint directory."""
    if callable(weights) and not isinstance(weights, Mapping):
        return weights
    if isinstance(weights, Mapping):
        def get(name):
            if name not in weights:
                raise KeyError(f"no dense weight {name!r} in the given mapping")
            return weights[name]
        return get
    if isinstance(weights, (str, os.PathLike)):
        import json

        from safetensors import safe_open

        path = os.fspath(weights)
        files = {}
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
            else:
                path = os.path.join(path, "model.safetensors")
        if not files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no safetensors checkpoint at {weights!r}")
            with safe_open(path, "pt") as f:
                files = {k: path for k in f.keys()}

        def get(name):
            if name not in files:
                raise KeyError(f"no dense weight {name!r} in the checkpoint {weights!r}")
            with safe_open(files[name], "pt") as f:
                return f.get_tensor(name)
        return get
    raise TypeError(f"weights must be a mapping, a callable or a safetensors path, got {type(weights).__name__}")


@torch.no_grad()
def replace_lora_weights_lowra_loftq(
    peft_model,
    weights=None,
    adapter_name: str = "default",
    iterations: int = _loftq.DEFAULT_ITERATIONS,
    requantize_base: bool = True,
    init: str = "loftq",
    svd_niter: int | None = None,
    callback: Callable[[nn.Module, str], bool] | None = None,
    prefix: str = "base_model.model.",
) -> dict[str, tuple[float, float]]:
    """LoftQ for a PeftModel whose LoRA layers sit on LinearLowRA bases, given the dense weights.

    weights: {checkpoint key: tensor}, a callable key -> tensor, or a safetensors file / checkpoint directory (default:
    the directory the base model was loaded from, if it holds the dense weights); the key of a layer is its module
    name without `prefix` plus ".weight".
    requantize_base=True runs the full alternation (`iterations` steps, the layer's plan kept) and replaces the
    base with the quantized residual, storing the initialization for later adapters; this changes the base under
    every other adapter of the layer. False keeps the base and sets the adapter to the rank-r SVD of W - Q (one
    step, what peft's replace_lora_weights_loftq does).
    callback(model, name) -> bool may reject a layer's replacement (it is rolled back), as in peft.
    Returns {name: (error with zero-initialized LoRA, error after)} in Frobenius norm.
    """
    if weights is None:
        weights = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
        if not weights or not os.path.exists(weights):
            raise ValueError("pass the dense weights (mapping, callable or safetensors path): the model does not say "
                             f"where its checkpoint is (name_or_path={weights!r})")
    get = _weight_source(weights)
    layers = lowra_lora_layers(peft_model)
    if not layers:
        raise ValueError("the model has no LoRA layer on a LinearLowRA base")
    report = {}
    for name, module in layers.items():
        if adapter_name not in module.lora_A:
            continue
        if module.merged:
            raise ValueError(f"{name}: unmerge the adapters before replacing them with LoftQ")
        base = module.get_base_layer()
        if not isinstance(base, LinearLowRA):
            continue
        key = (name[len(prefix):] if name.startswith(prefix) else name) + ".weight"
        W = get(key)
        if not W.is_floating_point() or tuple(W.shape) != (base.out_features, base.in_features):
            raise ValueError(
                f"{key}: expected the dense float weight of shape {(base.out_features, base.in_features)}, got "
                f"{W.dtype} {tuple(W.shape)} (a quantized checkpoint? LoftQ needs the original weights)"
            )
        W = W.to(base.weight.device)
        r, s = module.r[adapter_name], module.scaling[adapter_name]
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        saved = (lora_A.detach().clone(), lora_B.detach().clone(), base.weight, base.quant_state,
                 _loftq.stored_init(base))
        if requantize_base:
            res = _loftq.loftq_linear(base, W, r, iterations=iterations, init=init, svd_niter=svd_niter)
            B, A = res.lora_B, res.lora_A  # scale-free: B @ A is the low-rank part
            before, after = res.baseline_error, res.errors[res.best_step]
        else:
            deq = base.dequantize(torch.float32)
            B, A = _loftq.low_rank_factors(W.float() - deq, r, 1.0, svd_niter)
            before = float(torch.linalg.norm(W.float() - deq))
            after = float(torch.linalg.norm(W.float() - deq - B @ A))
        root = math.sqrt(s)
        lora_A.copy_((A / root).to(lora_A.dtype))
        lora_B.copy_((B / root).to(lora_B.dtype))
        if callback is not None and not callback(peft_model, name):
            lora_A.copy_(saved[0])
            lora_B.copy_(saved[1])
            if requantize_base:
                _loftq.set_quantized_weight(base, saved[2].data, saved[3])
                _loftq.drop_init(base)
                if saved[4] is not None:
                    _loftq.store_init(base, saved[4][0], saved[4][1], dtype=saved[4][0].dtype)
            continue
        report[name] = (before, after)
    if not report and callback is None:
        raise ValueError(f"no LoRA layer on a LinearLowRA base has adapter {adapter_name!r}")
    return report
