"""ParamsLowRA and LinearLowRA: the quantized layer, designed after bitsandbytes' Params4bit and Linear4bit.

Life cycle (as bnb): a LinearLowRA holds its dense weight in a ParamsLowRA together with a *plan* (bits, codebook,
thresholds per row); the first move to a real device (`.to("cpu")`, `.cuda()`, `module.to(...)`) quantizes it there.
Afterwards the parameter holds the packed uint8 codes and a QuantStateLowRA, moves are plain moves (the state moves
in place, so module and parameter keep sharing one state object), and float dtype casts leave the codes alone.

LinearLowRA is an nn.Linear but deliberately not a bnb Linear4bit: peft would wrap a Linear4bit with its bnb LoRA
layer, whose merge calls bnb's dequantize.

quant_storage (as bnb's bnb_4bit_quant_storage): the packed bytes are kept as a 1-D tensor of this dtype (default
uint8; float16 / bfloat16 / float32 reinterpret the same bytes, no conversion). FSDP flattens and shards parameters of
one dtype together, so a model sharded with FSDP stores its codes in the model's float dtype. The per-row metadata
(QuantStateLowRA) is never sharded: it stays on the module (`module.quant_state`) and is re-attached to whatever
parameter object FSDP hands the module (docs/distributed.md).
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import torch
from torch import nn

from ..format import DEFAULT_BLOCKSIZE, FLOAT_DTYPES, LowRAFormatError, check_blocksize
from ..functional import (
    PLAIN_TENSOR_TYPES,
    LowRAPlan,
    QuantStateLowRA,
    _eager_direct,
    _functorch,
    _fused_decode_max_tokens,
    _unwatched,
    _use_fused_decode,
    dequantize_lowra,
    make_plan,
    matmul_lowra,
    quantize_lowra,
)
from ..operands import _STAMPS, BufferedOperands, KernelOperands, drop_kept_operands, watch_operands

_META_ATTRS = ("quant_state", "blocksize", "compress_statistics", "lowra_plan", "lowra_quantized", "quant_storage")
# Dtypes the packed bytes may be stored as (reinterpreted, never converted): uint8 and the float dtypes of models.
QUANT_STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def check_quant_storage(dtype) -> torch.dtype:
    """The quant_storage dtype (a torch.dtype or its name), or LowRAFormatError naming the accepted ones."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in QUANT_STORAGE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in QUANT_STORAGE_DTYPES)
        raise LowRAFormatError(f"quant_storage must be one of {names}, got {dtype!r}")
    return dtype


def to_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """The 1-D uint8 codes reinterpreted as `quant_storage` (a view, same bytes).

    A byte count that is not a multiple of the storage element size is refused rather than padded: LowRA rows are
    whole blocks (blocksize a multiple of 8, so every row a multiple of 8 bytes at any precision), so such a buffer can
    only come from a corrupt or foreign checkpoint, and padding would change the packed layout checkpoints record.
    """
    quant_storage = check_quant_storage(quant_storage)
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        raise LowRAFormatError(f"packed codes must be uint8 before conversion to quant_storage, got {packed.dtype}")
    size = torch.empty((), dtype=quant_storage).element_size()
    if packed.numel() % size:
        raise LowRAFormatError(
            f"{packed.numel()} packed bytes do not divide into {quant_storage} elements of {size} bytes (refused, not "
            "padded: valid LowRA rows are multiples of 8 bytes)"
        )
    return packed if quant_storage == torch.uint8 else packed.contiguous().view(quant_storage)


def packed_bytes(weight: torch.Tensor, state: QuantStateLowRA, quant_storage: torch.dtype | None = None
                 ) -> torch.Tensor:
    """The packed codes of `weight` as a 1-D uint8 view, whatever dtype they are stored in; checked against `state`.

    Catches the ways a distributed wrapper or a helper can damage stored codes: a float cast of the storage (peft's
    prepare_model_for_kbit_training casts bf16/fp16 parameters to float32; an FSDP mixed-precision param_dtype other
    than the storage dtype does the same), and a still-sharded parameter.
    """
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    if type(data).__name__ == "DTensor":
        raise RuntimeError(
            "the LowRA weight is an FSDP-sharded DTensor here: use the layer inside the FSDP-wrapped model's forward "
            "(or after FSDPModule.unshard()), where FSDP hands it the whole parameter"
        )
    # uint8 is always accepted (the canonical form, e.g. codes just re-quantized by LoftQ); a float must be the dtype
    # they were stored as.
    if quant_storage is not None and data.dtype not in (quant_storage, torch.uint8):
        raise LowRAFormatError(
            f"the packed LowRA codes arrived as {data.dtype} but are stored as {quant_storage}: something cast them "
            "(peft's prepare_model_for_kbit_training casts bf16/fp16 parameters to float32; FSDP mixed precision "
            "casts to param_dtype). Use quant_storage equal to the model/param dtype and skip that cast "
            "(finetune.add_lora does; see docs/distributed.md)"
        )
    if data.dtype != torch.uint8:
        data = data.reshape(-1).contiguous().view(torch.uint8)
    if data.numel() != state.packed_nbytes:
        raise LowRAFormatError(
            f"the packed LowRA weight holds {data.numel()} bytes but its quant_state describes {state.packed_nbytes} "
            "(mismatched weight and state, or the stored codes were cast to another dtype)"
        )
    return data


def logical_numel(param: torch.Tensor) -> int:
    """The number of parameters a weight stands for: [out, in] for a quantized ParamsLowRA (whose elements are
    packed bytes), numel() for any other tensor. Parameter counters use it (model.num_parameters, peft's)."""
    state = getattr(param, "quant_state", None) if isinstance(param, ParamsLowRA) else None
    return math.prod(state.shape) if state is not None else param.numel()


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
        quant_storage: torch.dtype = torch.uint8,
        **kwargs,
    ) -> "ParamsLowRA":
        if data is None:
            data = torch.empty(0)
        quant_storage = check_quant_storage(quant_storage)
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
        self.quant_storage = quant_storage
        self.module = module
        return self

    def requires_grad_(self, requires_grad: bool = True):
        # Refused here, where it is asked (model.requires_grad_(True) comes here too), not later by a move or a copy:
        # codes stored as bfloat16 for FSDP would otherwise accept it.
        if requires_grad and self.lowra_quantized:
            raise ValueError("a quantized LowRA weight is frozen: it cannot require gradients (train LoRA adapters "
                             "on it, e.g. with peft)")
        return super().requires_grad_(requires_grad)

    @property
    def packed(self) -> torch.Tensor:
        """The packed codes as 1-D uint8 (a view of the stored bytes, whatever quant_storage is)."""
        if not self.lowra_quantized or self.quant_state is None:
            raise LowRAFormatError("this weight is not quantized: it has no packed codes")
        return packed_bytes(self, self.quant_state)

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
        if self.quant_storage is None:  # pickled before quant_storage existed
            self.quant_storage = torch.uint8
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
            quant_storage=self.quant_storage,
        )
        memo[id(self)] = new
        return new

    def __copy__(self):
        return ParamsLowRA(self.data, requires_grad=self.requires_grad, module=self.module, **self._meta())

    # -- what LinearLowRA's kept operands were taken from ---------------------------------------------------------
    lowra_stamp = 0  # a unique number, new whenever `data` or `quant_state` is set (LinearLowRA.kept_operands)

    def __setattr__(self, name: str, value) -> None:
        if name in ("data", "quant_state"):
            self.__dict__["lowra_stamp"] = next(_STAMPS)
            drop_kept_operands(self)  # a compiled call would not notice; and the old codes go now
        super().__setattr__(name, value)

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
    nested_absmax = property(lambda self: self._state_field("nested_absmax").state2.absmax)
    nested_quant_map = property(lambda self: self._state_field("nested_quant_map").state2.code)

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
        # Idempotent: only a dense weight with a plan gets here (to() checks lowra_quantized), so moving or reloading
        # an already-quantized weight never quantizes its codes again.
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
        self.data = to_storage(packed, self.quant_storage)
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
        quant_storage: torch.dtype | None = None,
        **kwargs,
    ) -> "ParamsLowRA":
        """Rebuild from packed codes and a QuantStateLowRA.as_dict(packed=True) dict (validated, then checked
        against the packed buffer). `data` may be stored in any quant_storage dtype; the result is stored as
        `quant_storage` (default: the dtype `data` came in)."""
        state = QuantStateLowRA.from_dict(quantized_stats, device=device)
        quant_storage = check_quant_storage(data.dtype if quant_storage is None else quant_storage)
        packed = data.to(device)
        if packed.dtype != torch.uint8 and packed.dtype in QUANT_STORAGE_DTYPES:
            packed = packed.reshape(-1).contiguous().view(torch.uint8)
        state.validate(packed)  # sizes, dtype and layout, with the format's own messages
        self = cls(
            to_storage(packed, quant_storage),
            requires_grad=requires_grad,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            module=module,
            lowra_quantized=True,
            quant_storage=quant_storage,
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
            if device is not None and device.type == "meta":
                # accelerate's meta-device init (to meta, shard, load rank 0's state dict): the codes come back from
                # the state dict, the metadata has no other source, so it stays where it is, on the module. A plain
                # tensor: nn.Module._apply wraps a cross-device-type result in nn.Parameter(...), which refuses
                # subclasses whose detach() is plain; the layer re-attaches the state later.
                return super().to(device=device, non_blocking=non_blocking)
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


# torch.compile: when a graph break inside LinearLowRA.forward leaves this override to run between two compiled
# regions, Dynamo compiled it as a frame of its own, and that frame re-entered itself without end (RecursionError).
# Skipping it as a frame leaves it traceable inside graphs (the decode step still compiles into one).
try:
    import torch._dynamo

    torch._dynamo.eval_frame.skip_code(ParamsLowRA.__torch_function__.__func__.__code__)
except (ImportError, AttributeError):  # a torch without Dynamo, or a future one that moved this: compile untouched
    pass


def _rebuild_params_lowra(data, requires_grad, meta):
    return ParamsLowRA(data, requires_grad=requires_grad, **meta)


# -- FSDP2 helpers: DTensor is imported lazily (torch.distributed may be unavailable) --------------------------------


def _is_dtensor(t) -> bool:
    return t is not None and type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def _local(t):
    """A replicated DTensor's full value (every rank has it); any other tensor as is."""
    return t.to_local() if _is_dtensor(t) else t


# `weight.quant_state`, `weight.absmax`, ... as on ParamsLowRA (properties there), set as attributes on FSDP's plain
# sharded parameter: user code inspecting the weight, and torch.distributed.checkpoint resolving "weight.<field>"
# names attribute by attribute, find them.
_STATE_ATTRS = {
    "absmax": lambda s: s.absmax, "lowra_bits": lambda s: s.bits, "lowra_code": lambda s: s.code,
    "lowra_thresholds": lambda s: s.thresholds, "lowra_row_offsets": lambda s: s.row_offsets,
    "nested_absmax": lambda s: s.state2.absmax if s.nested else None,
    "nested_quant_map": lambda s: s.state2.code if s.nested else None,
}  # fmt: skip


def _expose_state(param, state: QuantStateLowRA) -> None:
    param.quant_state = state
    for name, get in _STATE_ATTRS.items():
        setattr(param, name, get(state))


def _no_bias():
    return None


class _CountedParameters(dict):
    """LinearLowRA's `_parameters`: a dict that counts its writes. A compiled call takes the kept operands without
    reading the weight, so it compares this count with the one they were kept at: a weight written straight into
    the dict (torch.func.functional_call, accelerate's set_module_tensor_to_device) passes no setattr that could
    drop them. Every mutator counts (dict's own `update`, `pop`, ... do not go through __setitem__)."""

    __slots__ = ("writes",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes = 0

    def __reduce__(self):  # copies and pickles rebuild it through __init__ (dict's own way sets items first)
        return type(self), (dict(self),)

    def __setitem__(self, key, value):
        self.writes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.writes += 1
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        self.writes += 1
        super().update(*args, **kwargs)

    def pop(self, *args):
        self.writes += 1
        return super().pop(*args)

    def popitem(self):
        self.writes += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        self.writes += 1
        return super().setdefault(key, default)

    def clear(self):
        self.writes += 1
        super().clear()

    def __ior__(self, other):
        self.writes += 1
        return super().__ior__(other)


def _params_writes(module) -> int | None:
    """The write count of `module._parameters`, None where it is a plain dict (a module unpickled from an older
    version keeps one until its __setstate__ swaps it)."""
    params = module._parameters
    return params.writes if type(params) is _CountedParameters else None


class _DecodeCall:
    """LinearLowRA.forward's shortcut for eager decoding: the launch that matmul_lowra's fused direct path makes (the
    state's prepared launcher, QuantStateLowRA.prepared_matmul), behind a guard on everything that choice and that
    launcher depend on. A decode step calls every layer once per token, and the full path's checks cost more host time
    than the launch itself (docs/benchmarks.md); the guard re-checks what can change between two calls in a fraction
    of that. forward remembers one after a call that took that path; a call the guard refuses takes the full path.
    It holds weak references only: a weight, state or launcher replaced (a reload, FSDP's sharding, a move that
    drops the state's launchers) must not stay alive through it."""

    __slots__ = ("weight", "bias", "state", "launch", "address", "size", "dtype", "device", "cols", "numel")

    @staticmethod
    def remember(module, weight, bias, state, packed, x) -> None:
        """Keep the call module(x) just made on module.__dict__ if it took the fused direct path."""
        if _use_fused_decode(x, bias) and _eager_direct(x, bias):
            call = _DecodeCall()
            call.weight, call.state = weakref.ref(weight), weakref.ref(state)
            call.bias = _no_bias if bias is None else weakref.ref(bias)
            call.launch = weakref.ref(state.prepared_matmul(packed))
            with torch._C.DisableTorchFunctionSubclass():
                call.address, call.size = weight.data_ptr(), weight.numel()
            call.dtype, call.device, call.cols = x.dtype, x.device, (state.cols,)  # as x.shape[-1:], 0-d included
            call.numel = state.cols * _fused_decode_max_tokens(x.is_cuda)
            module.__dict__["_decode_call"] = call
        else:
            module.__dict__.pop("_decode_call", None)

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor | None:
        """module(x) through the launcher, or None where the full path must decide. The guard follows the full
        path's choices: the same parameter objects, codes at the same address, the same state with its launcher
        still current; activations of the same type, dtype, device and features, at most the fused kernels' rows;
        no gradient to track, no autocast, compute dtype and absmax cache as then, nothing watching ops."""
        params = module._parameters
        w, bias, state, launch = self.weight(), self.bias(), self.state(), self.launch()
        if (w is None or params.get("weight") is not w or params.get("bias") is not bias or launch is None
                or type(x) is not torch.Tensor or x.dtype is not self.dtype or x.device != self.device
                or x.shape[-1:] != self.cols or x.numel() > self.numel
                or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
                or torch.is_autocast_enabled(self.device.type) or not _unwatched() or _functorch(x)
                or w.quant_state is not state or module.compute_dtype not in (None, x.dtype) or module.cache_absmax):
            return None
        with torch._C.DisableTorchFunctionSubclass():
            if w.data_ptr() != self.address or w.numel() != self.size:  # new codes: `weight.data = ...`, a re-gather
                return None
        if state.prepared_matmul(launch.packed, build=False) is not launch:  # a tensor of the state changed
            return None
        return launch(x, bias if bias is None or bias.dtype == x.dtype else module._bias_as(bias, x.dtype))


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
        quant_storage: torch.dtype = torch.uint8,
    ):
        blocksize = check_blocksize(blocksize)
        quant_storage = check_quant_storage(quant_storage)
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:  # a string or int32 failed at forward
            raise ValueError(f"compute_dtype must be None (the input's dtype), torch.float32, torch.float16 or "
                             f"torch.bfloat16, got {compute_dtype!r}")
        super().__init__(in_features, out_features, bias, device)
        self.__dict__["_parameters"] = _CountedParameters(self._parameters)
        self.weight = ParamsLowRA(
            self.weight.data, requires_grad=False, blocksize=blocksize, compress_statistics=compress_statistics,
            module=self, quant_storage=quant_storage,
        )
        self.compute_dtype = compute_dtype
        self.compress_statistics = compress_statistics
        self.blocksize = blocksize
        self.quant_storage = quant_storage
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
        quant_storage: torch.dtype = torch.uint8,
    ) -> "LinearLowRA":
        """A LinearLowRA quantizing `linear`'s weight with the given plan on `device` (default: the weight's);
        the packed codes are stored as `quant_storage` (uint8, or the model's float dtype for FSDP)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LinearLowRA):
            raise TypeError("the layer is already a LinearLowRA")
        device = torch.device(device) if device is not None else linear.weight.device
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, compress_statistics,
            blocksize, device="meta", quant_storage=quant_storage,
        )
        weight = ParamsLowRA(
            linear.weight.detach(), blocksize=blocksize, compress_statistics=compress_statistics, module=new,
            quant_storage=quant_storage,
        )
        weight.set_plan(bits, codebooks, thresholds)
        new.weight = weight.to(device)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(device).clone(), requires_grad=linear.bias.requires_grad)
        new.train(linear.training)
        return new

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _fix_quant_state(self) -> None:
        """Re-attach module.quant_state to a weight that lost it (a wrapper rebuilt it as cls(data)).

        A still-sharded FSDP parameter (a DTensor) is left as it is: rebinding it would take it away from FSDP. It
        gets the state's fields as attributes instead (see _expose_state)."""
        w = self.weight
        if getattr(w, "quant_state", None) is not None or self.quant_state is None:
            return
        if _is_dtensor(w):
            _expose_state(w, self.quant_state)
        elif not isinstance(w, ParamsLowRA):
            self.weight = ParamsLowRA(
                w.data, quant_state=self.quant_state, blocksize=self.blocksize,
                compress_statistics=self.compress_statistics, module=self, lowra_quantized=True,
                quant_storage=w.dtype,
            )
        else:
            w.quant_state, w.lowra_quantized, w.module = self.quant_state, True, self

    def _packed_and_state(self) -> tuple[torch.Tensor, QuantStateLowRA]:
        """(packed uint8 codes, state) of the weight as FSDP/DDP or a plain move left it; the state comes from the
        parameter or, when a wrapper rebuilt the parameter without it, from the module."""
        if not _is_dtensor(self.weight):
            self._fix_quant_state()
        state = getattr(self.weight, "quant_state", None) or self.quant_state
        if state is None:
            raise RuntimeError(
                "LinearLowRA weight is not quantized yet: set a plan (weight.set_plan(...)) and move the layer to a "
                "device, or build it with LinearLowRA.from_linear / convert_to_lowra"
            )
        return packed_bytes(self.weight, state, getattr(self, "quant_storage", None)), state

    def set_quant_storage(self, quant_storage) -> "LinearLowRA":
        """Store the packed codes as `quant_storage` from now on (the same bytes reinterpreted, no copy): e.g. a
        checkpoint saved with uint8 codes, to be sharded by FSDP next to bfloat16 parameters."""
        quant_storage = check_quant_storage(quant_storage)
        packed, state = self._packed_and_state()
        self.weight = ParamsLowRA(
            to_storage(packed, quant_storage), quant_state=state, blocksize=state.blocksize,
            compress_statistics=state.nested, module=self, lowra_quantized=True, quant_storage=quant_storage,
        )
        self.quant_state = state
        self.quant_storage = quant_storage
        return self

    @property
    def is_quantized(self) -> bool:
        return getattr(self.weight, "quant_state", None) is not None or self.quant_state is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight (default: in the original dtype)."""
        packed, state = self._packed_and_state()
        return dequantize_lowra(packed, state, dtype)

    # Opt-in (set_absmax_cache): keep the decoded float32 block scales of a double-quantized weight between calls.
    cache_absmax = False

    def set_absmax_cache(self, enabled: bool = True) -> "LinearLowRA":
        """Keep the decoded block scales of a double-quantized weight between forward calls (off by default).

        The kernels decode double-quantized scales where they read them, so this rarely pays off: it trades the
        1-byte codes (+ a table lookup) for 4-byte float32 scales per block, and holds those 4 bytes per block
        (0.5 bit/param at blocksize 64), the memory double quantization exists to save. The
        cache follows the state: a move, a reload, a re-quantization or an in-place edit recomputes it. No effect
        without double quantization (the scales are float32 already)."""
        self.cache_absmax = bool(enabled)
        if not enabled:
            for state in (self.quant_state, getattr(self.weight, "quant_state", None)):
                if state is not None:
                    state.drop_absmax_cache()
        return self

    # Eager decoding calls through _DecodeCall where it can (a switch for benchmarks and tests of the full path).
    _decode_shortcut = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()  # Dynamo folds it: a graph traces one branch, and guards nothing
        if not compiling and self._decode_shortcut:
            call = self.__dict__.get("_decode_call")
            if call is not None:
                out = call(self, x)
                if out is not None:
                    return out
        # The full path; on the hot path of decoding too where the shortcut refused: every step below is the cheap
        # form of the same operation.
        ops = None  # the kept operands: read in place of the weight's and the state's fields
        w, plain = None, False
        held = self.__dict__.get("_kept_operands") if compiling and not self.cache_absmax else None
        writes = _params_writes(self) if held is not None else None
        if writes is not None and held[3] == writes:  # current: a change would have dropped them (kept_operands)
            packed, state, ops = held[4], None, held[5] if held[5] is not None else KernelOperands(*held[6:])
        else:
            w = self.weight
            plain = type(w) is ParamsLowRA and w.lowra_quantized and w.quant_state is not None
            if plain:
                state = w.quant_state  # what _packed_and_state would pick; it repairs weights that lost their state
                storage = getattr(self, "quant_storage", None)
                kept = None if self.cache_absmax else self.kept_operands(w, state, storage)
                if kept is not None:
                    packed, ops = kept
                else:
                    with torch._C.DisableTorchFunctionSubclass():  # `.data` without a trip through __torch_function__
                        packed = packed_bytes(w, state, storage)
            else:
                packed, state = self._packed_and_state()
        device_type = x.device.type
        bias = self.bias
        if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta has no autocast state to ask
            # Behave as nn.Linear under autocast: compute in, and return, the autocast dtype.
            compute = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                out = matmul_lowra(x.to(compute), packed, state, None if bias is None else bias.to(compute),
                                   cache_absmax=self.cache_absmax, operands=ops)
            return out.to(compute)
        # No autocast on this device: nothing to switch off (autocast of another device type does not touch ops on
        # this one), and dtype conversions only where the dtype differs.
        compute = self.compute_dtype or x.dtype
        out = matmul_lowra(x if x.dtype == compute else x.to(compute), packed, state,
                           bias if bias is None or bias.dtype == compute else self._bias_as(bias, compute),
                           cache_absmax=self.cache_absmax, operands=ops)
        # not while compiling: the traced graph must not touch the module's __dict__
        if plain and not compiling and self._decode_shortcut and compute == x.dtype and not self.cache_absmax:
            _DecodeCall.remember(self, w, bias, state, packed, x)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def __getstate__(self) -> dict:
        # copies and pickles drop the decode shortcut and the kept operands: they point into this layer's tensors
        state = super().__getstate__()
        state.pop("_decode_call", None)
        state.pop("_kept_operands", None)
        return state

    # A new or deleted weight drops the kept operands so that the old codes go now, not at the next eager call (the
    # write it makes to _CountedParameters already keeps a compiled call from using them). Assignment
    # (`lin.weight = p`) comes here through register_parameter; a write straight into `_parameters` (functional_call,
    # accelerate) only counts there, and the operands are let go at the next eager call.
    def register_parameter(self, name: str, param) -> None:
        if name == "weight":
            self.__dict__.pop("_kept_operands", None)
        super().register_parameter(name, param)

    def __delattr__(self, name: str) -> None:
        if name == "weight":
            self.__dict__.pop("_kept_operands", None)
        super().__delattr__(name)

    def _apply(self, fn, *args, **kwargs):
        # .to / .cuda / .cpu: the kept operands must not hold the codes on the old device (dropped here, whichever
        # way the conversion below replaces the weight or its data)
        self.__dict__.pop("_kept_operands", None)
        weight = self._parameters.get("weight")
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        swap = torch.__future__.get_swap_module_params_on_conversion()
        if not isinstance(weight, ParamsLowRA) or not (overwrite or swap):
            return super()._apply(fn, *args, **kwargs)
        # Those modes rewrap the converted weight in nn.Parameter(...), which needs a detach() that keeps the class;
        # ParamsLowRA's returns a plain tensor (as bnb's Params4bit's does), so the weight is converted here and the
        # rest of the module as torch does.
        self._parameters["weight"] = None
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            self._parameters["weight"] = weight
        with torch.no_grad():
            new = fn(weight)
        if new is weight:  # nothing to convert (.float() leaves packed codes alone)
            return self
        if not isinstance(new, ParamsLowRA):  # a function that builds plain tensors (to_empty's empty_like)
            new = ParamsLowRA(new, requires_grad=weight.requires_grad, module=weight.module, **weight._meta())
        grad = weight.grad  # only a dense (not yet quantized) weight can have one; converted with it, as torch does
        if swap:  # the same Python object keeps its identity, with the converted tensor and metadata
            self.__dict__.pop("_decode_call", None)  # its weak reference to the weight would block the swap
            weight.grad = None  # a gradient held by the weight would block it too
            try:
                torch.utils.swap_tensors(weight, new)
            except Exception as e:
                weight.grad = grad
                raise RuntimeError(f"_apply(): couldn't swap {self._get_name()}.weight: {e}") from e
            new = weight
        else:
            self._parameters["weight"] = new
        if grad is not None:
            with torch.no_grad():
                new.grad = fn(grad)
        return self

    def kept_operands(self, weight: ParamsLowRA, state: QuantStateLowRA, quant_storage: torch.dtype | None):
        """(packed codes, KernelOperands) of `weight` and its `state`, kept between eager calls (with the stored
        scales: forward does not ask for them where set_absmax_cache is on); None while compiling.

        Why: a compiled call fetches each input of its graph the way the trace reached it, attribute by attribute,
        and evaluates a guard on each before every call. Reached through the weight (a tensor subclass) and its state
        (weight.quant_state.state2.absmax, ...), a layer's eight operands made most of a compiled decode step's host
        time (docs/benchmarks.md, twenty-sixth to thirtieth rounds). So they are kept as one flat tuple on this
        module, and a compiled call (forward) takes them from there without reading the weight at all: the codes,
        and where the state keeps its tensors as views of one buffer (QuantStateLowRA.operand_buffer) that buffer
        and one integer key (BufferedOperands), else the fields. Eager calls read them too: checking them costs less
        than reading the fields.

        Freshness. A compiled call checks one thing only, the write count of this module's `_parameters`
        (_CountedParameters: a weight written straight into the dict, as torch.func.functional_call does, passes no
        setattr), so every other change that could make them stale drops them at once: setting the weight's `data`
        or `quant_state` (ParamsLowRA), a field of the state the kernels read (QuantStateLowRA), this module's weight
        (register_parameter, delattr), or a move (_apply). The next compiled call then fails its guard on the tuple
        (or on the count) and traces again, reading the fields; the next eager call keeps them anew. An eager call
        also rebuilds them when they were taken from another weight object or before its `data` or `quant_state` was
        set (ParamsLowRA.lowra_stamp), at another write count, before a field of the state was set
        (QuantStateLowRA.operands_stamp), before `bits` was edited in place (the CUDA row plan derives from it), or
        from codes, fields or nested scales since moved (set_(), `.data =`, state.state2.absmax = t): none of these
        last three does a compiled call see until an eager call comes between.

        None where the codes would be a copy, or while a CUDA graph is being captured (the row plan costs a host
        sync). The tensors are marked as static addresses: a parameter is one to CUDA graph trees, but the codes'
        view and the state's tensors are not, and every replay would copy them (the codes: the whole model's
        weights)."""
        if torch.compiler.is_compiling():  # forward took them if there were any
            return None
        kept = self.__dict__.get("_kept_operands")
        if (kept is not None and kept[0] == weight.lowra_stamp and kept[1] == state.operands_stamp
                and kept[3] == _params_writes(self)):
            ops = KernelOperands(*kept[6:])
            s2 = state.state2 if state.nested else None
            with torch._C.DisableTorchFunctionSubclass():
                address = weight.data_ptr()
            if (kept[2] == state.bits._version and kept[4].data_ptr() == address
                    and (s2 is None or (ops.nested_absmax is s2.absmax and ops.nested_code is s2.code))
                    and (kept[5] is None or state.operand_addresses() == kept[5].addresses)):
                return kept[4], ops
        with torch._C.DisableTorchFunctionSubclass():
            packed = packed_bytes(weight, state, quant_storage)
            view = packed.data_ptr() == weight.data_ptr()  # not a copy (codes stored as a float dtype, not contiguous)
        if not view or (state.bits.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.__dict__.pop("_kept_operands", None)
            return None
        ops = KernelOperands.of(state)
        buffered = BufferedOperands.of(state, ops)
        for t in (packed, *ops, buffered and buffered.buffer):  # CUDA graph trees (mode="reduce-overhead") would
            if isinstance(t, torch.Tensor):                     # copy any other input at each replay
                torch._dynamo.mark_static_address(t, guard=False)  # changes drop the tuple (above)
        watch_operands(weight, self)
        watch_operands(state, self)
        # flat: each item one subscript away from the module, the shortest fetch for a compiled call
        self.__dict__["_kept_operands"] = (weight.lowra_stamp, state.operands_stamp, state.bits._version,
                                           _params_writes(self), packed, buffered, *ops)
        return packed, ops

    def _bias_as(self, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`bias` cast to the compute dtype. A frozen bias's cast is kept between calls (a decode step would cast
        every layer's bias per token; bnb instead converts its parameter in place, which changes what it stores).
        Keyed on the parameter's identity, storage address, in-place version and the inference-mode flag (a tensor
        made in inference mode must not meet autograd outside it); a trainable bias is cast per call, in the graph."""
        if (bias.requires_grad and torch.is_grad_enabled()) or type(bias) not in PLAIN_TENSOR_TYPES:
            return bias.to(dtype)  # trainable, or a subclass (DTensor, ...) whose storage is not ours to key on
        key = (bias.data_ptr(), bias.device, bias._version, dtype, torch.is_inference_mode_enabled())
        hit = self.__dict__.get("_bias_cast")  # (bias, key, cast)
        if hit is not None and hit[0] is bias and hit[1] == key:
            return hit[2]
        with torch.no_grad():
            cast = bias.to(dtype)
        self.__dict__["_bias_cast"] = (bias, key, cast)
        return cast

    # -- state dict -------------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # "weight" is the parameter as stored (quant_storage dtype; under FSDP2 its shard, a DTensor), so FSDP's
        # state-dict machinery shards and gathers it like any parameter; from_prequantized reads any storage dtype.
        self._fix_quant_state()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed codes) and bias
        state = getattr(self.weight, "quant_state", None) or self.quant_state
        if state is not None and not _is_dtensor(self.weight):
            for k, v in state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()
        # Under FSDP2 (the weight is a DTensor shard) the state dict holds the sharded codes only. accelerate's
        # rank-0 broadcast (fsdp2_load_full_state_dict) and torch.distributed.checkpoint treat every entry as a
        # parameter or buffer they can resolve by name, which "weight.<field>" is not; the metadata is identical on
        # every rank (quantized from one plan) and stays on the module (docs/distributed.md).

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        qkeys = {k[len(wkey) + 1:]: _local(v) for k, v in state_dict.items() if k.startswith(wkey + ".")}
        if _is_dtensor(state_dict.get(wkey)) or _is_dtensor(self.weight):
            return self._load_sharded(state_dict, prefix, qkeys, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
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
        self.quant_storage = weight.quant_storage

    def _load_sharded(self, state_dict, prefix, qkeys, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs):
        """FSDP2: the weight entry is this rank's shard of the stored codes; nn.Module's loading copies (or, with
        assign=True, binds) it like any parameter. The metadata, when present, must describe this layer: it is
        rebuilt on the module (it is never sharded), and refused if it does not match the shard's size."""
        wkey = prefix + "weight"
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if not k.startswith(wkey + ".")}, prefix, local_metadata, strict,
            missing_keys, unexpected_keys, error_msgs,
        )
        if not qkeys:
            if self.quant_state is None:
                raise LowRAFormatError(f"{wkey}: a sharded LowRA weight arrived without its state; the layer has none")
            return
        try:
            state = QuantStateLowRA.from_dict(qkeys, device=self.quant_state.device if self.quant_state is not None
                                              else None)
        except LowRAFormatError as e:
            raise LowRAFormatError(f"{wkey}: {e}") from None
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise LowRAFormatError(
                f"{wkey}: quantized weight has shape {tuple(state.shape)}, this layer is "
                f"({self.out_features}, {self.in_features})"
            )
        size = self.weight.element_size()
        if self.weight.numel() * size != state.packed_nbytes:
            raise LowRAFormatError(
                f"{wkey}: the sharded weight holds {self.weight.numel() * size} bytes, the state describes "
                f"{state.packed_nbytes}"
            )
        self.quant_state = state
        self.blocksize, self.compress_statistics = state.blocksize, state.nested
        _expose_state(self.weight, state)

    def __setstate__(self, state):
        super().__setstate__(state)
        if type(self.__dict__.get("_parameters")) is dict:  # pickled by a version before _CountedParameters
            self.__dict__["_parameters"] = _CountedParameters(self._parameters)
        if isinstance(self.__dict__.get("_parameters", {}).get("weight"), ParamsLowRA):
            self.weight.module = self

    def extra_repr(self) -> str:
        s = super().extra_repr()
        state = self.quant_state or getattr(self.weight, "quant_state", None)
        if state is None:
            return s + ", quantized=False"
        counts = ", ".join(f"{p}b: {int((state.bits == p).sum())}" for p in (1, 2, 4))
        return s + f", bits={state.nominal_bits:.3f} ({counts} rows), blocksize={state.blocksize}"
