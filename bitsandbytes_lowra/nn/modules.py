"""ParamsLowRA and LinearLowRA: the quantized layer, designed after bitsandbytes' Params4bit and Linear4bit.

Life cycle (as bnb): a LinearLowRA holds its dense weight in a ParamsLowRA together with a *plan* (bits, codebook,
thresholds per row); the first move to a real device (`.to("cpu")`, `.cuda()`, `module.to(...)`) quantizes it there.
Afterwards the parameter holds the packed uint8 codes and a QuantStateLowRA, moves are plain moves (the state moves
in place, so module and parameter keep sharing one state object), and float dtype casts leave the codes alone.

LinearLowRA is an nn.Linear but deliberately not a bnb Linear4bit: peft would wrap a Linear4bit with its bnb LoRA
layer, whose merge calls bnb's dequantize.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..format import DEFAULT_BLOCKSIZE, LowRAFormatError, check_blocksize
from ..functional import (
    LowRAPlan,
    QuantStateLowRA,
    dequantize_lowra,
    make_plan,
    matmul_lowra,
    quantize_lowra,
)

_META_ATTRS = ("quant_state", "blocksize", "compress_statistics", "lowra_plan", "lowra_quantized")


class ParamsLowRA(nn.Parameter):
    """A frozen parameter holding a LowRA weight: dense until quantized, then packed uint8 codes + quant_state.

    Extra keyword arguments are accepted and ignored, because loaders (transformers) rebuild parameters with
    `ParamsLowRA(value, **old_param.__dict__)`. A uint8 `data` without quant_state is taken as already quantized;
    its state is recovered from `module.quant_state` by LinearLowRA (the way bnb's
    fix_4bit_weight_quant_state_from_module does) when a wrapper dropped it.
    """

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantStateLowRA | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        lowra_plan: LowRAPlan | None = None,
        module: nn.Module | None = None,
        lowra_quantized: bool | None = None,
        **kwargs,
    ) -> "ParamsLowRA":
        if data is None:
            data = torch.empty(0)
        if lowra_quantized is None:
            lowra_quantized = quant_state is not None or data.dtype == torch.uint8
        if requires_grad and (lowra_quantized or not data.dtype.is_floating_point):
            raise ValueError("a quantized LowRA weight is frozen: requires_grad must be False")
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.quant_state = quant_state
        self.blocksize = DEFAULT_BLOCKSIZE if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.lowra_plan = lowra_plan
        self.lowra_quantized = bool(lowra_quantized)
        self.module = module
        return self

    # -- metadata, copying, pickling ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {k: getattr(self, k, None) for k in _META_ATTRS}

    def __getstate__(self):
        # `module` is left out: a pickled LinearLowRA re-links it (see LinearLowRA.__setstate__).
        return {**self._meta(), "data": self.data, "requires_grad": self.requires_grad}

    def __setstate__(self, state):
        self.requires_grad = state["requires_grad"]
        self.data = state["data"]
        for k in _META_ATTRS:
            setattr(self, k, state.get(k))
        self.module = None

    def __reduce_ex__(self, proto):
        # nn.Parameter would rebuild a plain Parameter (bnb's Params4bit loses its class that way).
        return (_rebuild_params_lowra, (self.data, self.requires_grad, self._meta()))

    def __deepcopy__(self, memo):
        new = ParamsLowRA(
            self.data.clone(),
            requires_grad=self.requires_grad,
            quant_state=copy.deepcopy(self.quant_state, memo),
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            lowra_plan=copy.deepcopy(self.lowra_plan, memo),
            # While a whole module is deep-copied its copy is already in memo; a lone parameter gets no module.
            module=memo.get(id(self.module)) if self.module is not None else None,
            lowra_quantized=self.lowra_quantized,
        )
        memo[id(self)] = new
        return new

    def __copy__(self):
        return ParamsLowRA(self.data, requires_grad=self.requires_grad, module=self.module, **self._meta())

    # -- FSDP-style attribute access to the state (properties, not __getattr__: no torch.compile graph breaks) -----
    def _state_field(self, name: str):
        qs = self.__dict__.get("quant_state")
        if qs is None:
            raise AttributeError(f"'{type(self).__name__}' has no attribute '{name}' (not quantized)")
        return qs

    absmax = property(lambda self: self._state_field("absmax").absmax)
    lowra_bits = property(lambda self: self._state_field("lowra_bits").bits)
    lowra_code = property(lambda self: self._state_field("lowra_code").code)
    lowra_thresholds = property(lambda self: self._state_field("lowra_thresholds").thresholds)
    lowra_row_offsets = property(lambda self: self._state_field("lowra_row_offsets").row_offsets)

    # -- plan and quantization ------------------------------------------------------------------------------------
    def set_plan(self, bits, codebooks=None, thresholds=None) -> "ParamsLowRA":
        """Record how to quantize (bits per row, tables; see functional.make_plan); validated now, applied on the
        first move to a real device."""
        if self.lowra_quantized:
            raise LowRAFormatError("this weight is already quantized; a plan applies only to a dense weight")
        if self.dim() != 2:
            raise LowRAFormatError(f"a LowRA weight must be 2-D [out, in], got shape {tuple(self.shape)}")
        self.lowra_plan = make_plan(bits, codebooks, thresholds, rows=self.shape[0])
        return self

    def _quantize(self, device: torch.device) -> "ParamsLowRA":
        if self.lowra_plan is None:
            raise LowRAFormatError(
                "ParamsLowRA has no quantization plan: call weight.set_plan(bits, codebooks, thresholds) (or build the "
                "layer with LinearLowRA.from_linear / convert_to_lowra) before moving it to a device"
            )
        if self.is_meta:
            raise LowRAFormatError("the dense weight is on the meta device: load its values before quantizing")
        w = self.data.contiguous().to(device)
        packed, state = quantize_lowra(
            w, self.lowra_plan, blocksize=self.blocksize, compress_statistics=self.compress_statistics
        )
        self.data = packed
        self.quant_state = state
        self.lowra_quantized = True
        self.lowra_plan = None  # now part of the state
        if self.module is not None:
            self.module.quant_state = state
        return self

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device="cpu",
        module: nn.Module | None = None,
        **kwargs,
    ) -> "ParamsLowRA":
        """Rebuild from packed codes and a QuantStateLowRA.as_dict(packed=True) dict (validated, then checked
        against the packed buffer)."""
        state = QuantStateLowRA.from_dict(quantized_stats, device=device)
        packed = data.to(device)
        state.validate(packed)
        self = cls(
            packed,
            requires_grad=requires_grad,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            module=module,
            lowra_quantized=True,
        )
        if module is not None:
            module.quant_state = state
        return self

    # -- device moves -----------------------------------------------------------------------------------------------
    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.lowra_quantized:
            return self._quantize(device)
        if self.lowra_quantized:
            dtype = None  # float casts never touch packed codes
            if self.quant_state is not None and device is not None:
                self.quant_state.to(device)
        data = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        return ParamsLowRA(data, requires_grad=self.requires_grad, module=self.module, **self._meta())

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def half(self):
        return self.to(torch.float16)

    def float(self):
        return self.to(torch.float32)

    def bfloat16(self):
        return self.to(torch.bfloat16)

    def double(self):
        return self.to(torch.float64)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # chunk/split keep the class and the state (as bnb's Params4bit), everything else yields plain tensors.
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.chunk, torch.split):
            src = args[0]
            meta = dict(src._meta(), module=src.module)
            if isinstance(result, (tuple, list)):
                return tuple(cls(t, requires_grad=src.requires_grad, **meta) for t in result)
            return cls(result, requires_grad=src.requires_grad, **meta)
        return result


def _rebuild_params_lowra(data, requires_grad, meta):
    return ParamsLowRA(data, requires_grad=requires_grad, **meta)


class LinearLowRA(nn.Linear):
    """nn.Linear with a LowRA-quantized, frozen weight (1/2/4 bits per output channel).

    Args mirror bnb's Linear4bit: compute_dtype (default: the input's dtype; under torch.autocast the autocast
    dtype), compress_statistics (double-quantized absmax, default True), blocksize (default 64).
    forward = matmul_lowra (dequantize + matmul in a custom autograd Function; gradient for the input and bias only).
    State dict: `weight` (packed uint8 codes), `bias`, and `weight.<field>` for every QuantStateLowRA field.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        blocksize: int = DEFAULT_BLOCKSIZE,
        device=None,
    ):
        check_blocksize(blocksize)
        super().__init__(in_features, out_features, bias, device)
        self.weight = ParamsLowRA(
            self.weight.data, requires_grad=False, blocksize=blocksize, compress_statistics=compress_statistics,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.compress_statistics = compress_statistics
        self.blocksize = blocksize
        self.quant_state: QuantStateLowRA | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits,
        codebooks=None,
        thresholds=None,
        *,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        blocksize: int = DEFAULT_BLOCKSIZE,
        device=None,
    ) -> "LinearLowRA":
        """A LinearLowRA quantizing `linear`'s weight with the given plan on `device` (default: the weight's)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LinearLowRA):
            raise TypeError("the layer is already a LinearLowRA")
        device = torch.device(device) if device is not None else linear.weight.device
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, compress_statistics,
            blocksize, device="meta",
        )
        weight = ParamsLowRA(
            linear.weight.detach(), blocksize=blocksize, compress_statistics=compress_statistics, module=new
        )
        weight.set_plan(bits, codebooks, thresholds)
        new.weight = weight.to(device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(device).clone(), requires_grad=linear.bias.requires_grad)
        new.train(linear.training)
        return new

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _fix_quant_state(self) -> None:
        """Re-attach module.quant_state to a weight that lost it (a wrapper rebuilt it as cls(data))."""
        w = self.weight
        if getattr(w, "quant_state", None) is not None or self.quant_state is None:
            return
        if not isinstance(w, ParamsLowRA):
            self.weight = ParamsLowRA(
                w.data, quant_state=self.quant_state, blocksize=self.blocksize,
                compress_statistics=self.compress_statistics, module=self, lowra_quantized=True,
            )
        else:
            w.quant_state, w.lowra_quantized, w.module = self.quant_state, True, self

    def _packed_and_state(self) -> tuple[torch.Tensor, QuantStateLowRA]:
        self._fix_quant_state()
        state = getattr(self.weight, "quant_state", None)
        if state is None:
            raise RuntimeError(
                "LinearLowRA weight is not quantized yet: set a plan (weight.set_plan(...)) and move the layer to a "
                "device, or build it with LinearLowRA.from_linear / convert_to_lowra"
            )
        return self.weight.data, state

    @property
    def is_quantized(self) -> bool:
        return getattr(self.weight, "quant_state", None) is not None or self.quant_state is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight (default: in the original dtype)."""
        packed, state = self._packed_and_state()
        return dequantize_lowra(packed, state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, state = self._packed_and_state()
        if torch.is_autocast_enabled(x.device.type):
            # Behave as nn.Linear under autocast: compute in, and return, the autocast dtype.
            compute = out_dtype = torch.get_autocast_dtype(x.device.type)
        else:
            compute, out_dtype = self.compute_dtype or x.dtype, x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        with torch.autocast(x.device.type, enabled=False):
            out = matmul_lowra(x.to(compute), packed, state, bias)
        return out.to(out_dtype)

    # -- state dict -------------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._fix_quant_state()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed codes) and bias
        state = getattr(self.weight, "quant_state", None)
        if state is not None:
            for k, v in state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        qkeys = {k[len(wkey) + 1:]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        if not qkeys:
            if wkey in state_dict and self.is_quantized:
                raise LowRAFormatError(
                    f"{wkey}: the state dict holds a dense weight without LowRA state, but this layer is quantized"
                )
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        rest = {k: v for k, v in state_dict.items() if k != wkey and not k.startswith(wkey + ".")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if wkey in missing_keys:
            missing_keys.remove(wkey)
        if wkey not in state_dict:
            missing_keys.append(wkey)
            return
        device = self.weight.device if self.weight.device.type != "meta" else state_dict[wkey].device
        try:
            weight = ParamsLowRA.from_prequantized(state_dict[wkey], qkeys, device=device)
        except LowRAFormatError as e:
            raise LowRAFormatError(f"{wkey}: {e}") from None
        state = weight.quant_state
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise LowRAFormatError(
                f"{wkey}: quantized weight has shape {tuple(state.shape)}, this layer is "
                f"({self.out_features}, {self.in_features})"
            )
        weight.module = self
        self.weight = weight
        self.quant_state = state
        self.blocksize = state.blocksize
        self.compress_statistics = state.nested

    def __setstate__(self, state):
        super().__setstate__(state)
        if isinstance(self.__dict__.get("_parameters", {}).get("weight"), ParamsLowRA):
            self.weight.module = self

    def extra_repr(self) -> str:
        s = super().extra_repr()
        state = self.quant_state or getattr(self.weight, "quant_state", None)
        if state is None:
            return s + ", quantized=False"
        counts = ", ".join(f"{p}b: {int((state.bits == p).sum())}" for p in (1, 2, 4))
        return s + f", bits={state.nominal_bits:.3f} ({counts} rows), blocksize={state.blocksize}"
