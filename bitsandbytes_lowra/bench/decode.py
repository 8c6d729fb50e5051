"""Batch-1 greedy decoding for the end-to-end benchmark: `model.generate`, and a manual loop over a static KV cache
run eagerly, replayed from one CUDA graph per token, or through torch.compile(mode="reduce-overhead").

The static-cache loop takes host overhead (Python, dispatch, kernel launches) out of the decode time, for every
contender alike: the cache (transformers StaticCache) keeps its keys, values and position on the device, the token
fed back and the tokens produced live in fixed device buffers, so one step (forward of one token, greedy argmax, feed
back) has no host synchronization and can be captured once and replayed. Every mode runs the same step function, so
"eager" vs "cuda-graph" differ only in how the step is launched, and their tokens must be identical (the kernels are
the same, with the same inputs).

Uses only transformers API present in 5.17 and 5.24 (StaticCache(config=, max_cache_len=), Cache.reset(),
logits_to_keep; the cache keyword is `cache` from 5.2x on, `past_key_values` before: picked from the signature).
Greedy as `generate(min_new_tokens=max_new_tokens)`: end-of-sequence tokens are suppressed, logits compared in
float32.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field

import torch

MODES = ("eager", "cuda-graph", "compile")


@dataclass
class DecodeRun:
    """Tokens generated after the prompt ([new_tokens] int64, on the CPU) and timings of the measured runs."""

    tokens: torch.Tensor
    seconds: float  # median wall time of one whole generation (prefill + new_tokens - 1 steps), device synced
    new_tokens: int
    mode: str
    runs_s: list[float] = field(default_factory=list)
    # Static-cache loops: median milliseconds of one step after the prefill (CUDA: time between events on the
    # device's stream; CPU: wall time); None with a single new token. The prefill runs eagerly in every mode, so its
    # host time weighs on `seconds` of a graph-replayed or compiled loop too (at batch 1 on the H200's host, about a
    # sixth of a 32-token run); step_ms is the replayed part alone.
    step_ms: float | None = None
    # The host's milliseconds to issue one of those steps (nothing synchronized). Well below step_ms, the device
    # sets the pace and step_ms is its time; close to it, the loop waits on the host (Dynamo's guards before each
    # compiled call, for instance: twenty-sixth round) and step_ms measures the host, not the device.
    host_step_ms: float | None = None

    @property
    def tok_s(self) -> float:
        return self.new_tokens / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graphed(fn, warmup: int, device=None):
    """fn captured in a CUDA graph on `device` (default: the current one) after `warmup` calls on a side stream,
    which also do the lazy work a capture cannot (allocations, cuBLAS handles, the gradient buffers a backward
    inside the graph accumulates into); returns the graph's replay (which keeps the graph alive)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    _sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _check_args(input_ids: torch.Tensor, new_tokens: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = getattr(input_ids, "shape", input_ids)
        raise ValueError(f"input_ids must be a [1, prompt_len] tensor (batch 1), got {shape}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids must hold at least one prompt token")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive int, got {new_tokens!r}")


def eos_ids(model) -> list[int]:
    """The end-of-sequence ids generate(min_new_tokens=...) suppresses (generation config, else model config)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def cache_keyword(model) -> str:
    """The forward keyword of the KV cache: `cache` (transformers >= 5.2x) or `past_key_values` (5.17)."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def _quant_state_tensors(obj, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _quant_state_tensors(x, depth + 1)
    elif depth < 3 and hasattr(obj, "__dict__") and type(obj).__name__.startswith("QuantState"):
        for x in vars(obj).values():  # absmax, codebooks, bits, offsets, nested state2, cached matmul plan
            yield from _quant_state_tensors(x, depth + 1)


def mark_quant_states_static(model) -> int:
    """Mark the tensors of every quantization state (bnb QuantState, QuantStateLowRA) as static addresses.

    They are plain attributes, not parameters or buffers: without the mark, torch.compile's CUDA graph trees would
    treat them as changing inputs and copy them into the graph's buffers on every replay. Returns how many."""
    seen = set()
    for module in model.modules():
        for holder in (module, getattr(module, "weight", None)):
            for t in _quant_state_tensors(getattr(holder, "quant_state", None)):
                if id(t) not in seen:
                    seen.add(id(t))
                    torch._dynamo.mark_static_address(t)
    return len(seen)


def generate_greedy(model, input_ids: torch.Tensor, new_tokens: int, repeats: int = 1,
                    static: bool = False) -> DecodeRun:
    """`model.generate` greedy, exactly new_tokens tokens; median of `repeats`.

    static=True passes `cache_implementation="static"`, with which transformers compiles the decode step itself
    (reduce-overhead) on a GPU where the model allows it: unquantized models, and quantized ones whose quantizer is
    compileable (LowRA's is, bnb's is not, so bnb runs it eagerly). Its warm-up is two whole generations (the first
    compiles, the second records the CUDA graphs), a dynamic cache's one of 4 tokens."""
    _check_args(input_ids, new_tokens)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if static:
        kw["cache_implementation"] = "static"
        warmups = [kw, kw]
    else:
        short = min(4, new_tokens)
        warmups = [{**kw, "max_new_tokens": short, "min_new_tokens": short}]
    device = input_ids.device
    with torch.no_grad():
        for w in warmups:
            model.generate(input_ids, **w)
        times, out = [], None
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(input_ids, **kw)
            _sync(device)
            times.append(time.perf_counter() - t0)
    tokens = out[0, input_ids.shape[1]:].cpu()
    return DecodeRun(tokens, statistics.median(times), new_tokens, "generate-static" if static else "generate", times)


class StaticGreedy:
    """Greedy decoding of one prompt length over a StaticCache, one token per step.

    `prefill(input_ids)` resets the cache and runs the prompt eagerly (its argmax is token 0); each step feeds the
    last token back, writes the next one into `tokens` at the device-side counter and advances it. In mode
    "cuda-graph" the step is captured once (after warm-up steps on a side stream) and replayed; in mode "compile" it
    is torch.compile(mode="reduce-overhead")'d (CUDA graph trees on a GPU).
    """

    def __init__(self, model, prompt_len: int, new_tokens: int, *, device, mode: str = "eager", warmup: int = 2):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        device = torch.device(device)
        if mode == "cuda-graph" and device.type != "cuda":
            raise ValueError(f"mode 'cuda-graph' needs a CUDA device, got {device}")
        if prompt_len < 1 or new_tokens < 1:
            raise ValueError(f"prompt_len and new_tokens must be positive, got {prompt_len}, {new_tokens}")
        from transformers import StaticCache

        self.model, self.device, self.mode = model, device, mode
        self.prompt_len, self.new_tokens, self.warmup = prompt_len, new_tokens, warmup
        # room for the warm-up/capture steps run after a prefill, before the cache is reset for the measured runs
        self.cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + warmup + 1)
        self._cache_kw = cache_keyword(model)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)  # the token fed to the next step
        self.tokens = torch.zeros(1, new_tokens, dtype=torch.long, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)  # next slot of `tokens`
        eos = eos_ids(model)
        self._suppress = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self._step = self._eager_step
        self._steps_marks = None  # (start, end) of the last generate()'s steps: events on CUDA, seconds on the CPU
        self._host_marks = None  # (start, end) host seconds around issuing those steps
        self._ready = False

    # -- the computation ----------------------------------------------------------------------------------------
    def _forward_pick(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
        logits = out.logits[:, -1, :].float()  # generate scores in float32 too
        if self._suppress is not None:
            logits = logits.index_fill(-1, self._suppress, float("-inf"))
        return logits.argmax(-1, keepdim=True)  # [1, 1]

    def _eager_step(self) -> None:
        nxt = self._forward_pick(self.ids)
        self.ids.copy_(nxt)
        # clamp: warm-up steps run past the end of `tokens`; their slots are overwritten by the measured run
        self.tokens.index_copy_(1, self.counter.clamp(max=self.new_tokens - 1), nxt)
        self.counter.add_(1)

    def prefill(self, input_ids: torch.Tensor) -> None:
        if tuple(input_ids.shape) != (1, self.prompt_len):
            raise ValueError(f"this decoder was built for prompts of shape (1, {self.prompt_len}), got "
                             f"{tuple(input_ids.shape)}")
        self.cache.reset()  # in place: the captured graph keeps pointing at the same buffers
        nxt = self._forward_pick(input_ids.to(self.device))
        self.ids.copy_(nxt)
        self.tokens[:, :1].copy_(nxt)
        self.counter.fill_(1)

    # -- preparation: warm-up, capture / compile ------------------------------------------------------------------
    def prepare(self, input_ids: torch.Tensor) -> None:
        """Warm up (lazy initializations, caches that read the device once, cuBLAS handles) and capture/compile."""
        with torch.no_grad():
            self.prefill(input_ids)
            if self.mode == "compile":
                for t in (self.ids, self.tokens, self.counter):
                    torch._dynamo.mark_static_address(t)
                mark_quant_states_static(self.model)
                self._step = torch.compile(self._eager_step, mode="reduce-overhead")
                for _ in range(self.warmup + 1):  # compile, then cudagraph-tree warm-up and recording
                    self._step()
            elif self.mode == "cuda-graph":
                self._step = graphed(self._eager_step, self.warmup, self.device)
            else:
                for _ in range(self.warmup):
                    self._eager_step()
            _sync(self.device)
        self._ready = True

    def generate(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[new_tokens] greedy tokens after the prompt, on the device (not synchronized)."""
        if not self._ready:
            self.prepare(input_ids)
        with torch.no_grad():
            self.prefill(input_ids)
            start = self._mark()
            t0 = time.perf_counter()
            for _ in range(self.new_tokens - 1):
                self._step()
            t1 = time.perf_counter()
            self._steps_marks = (start, self._mark())
            self._host_marks = (t0, t1)
        return self.tokens[0]

    def _mark(self):
        if self.device.type != "cuda":
            return time.perf_counter()  # CPU ops run synchronously
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def last_step_ms(self) -> float | None:
        """Milliseconds per step after the prefill in the last generate() (waits for it); None without steps or
        before any generate()."""
        if self.new_tokens < 2 or self._steps_marks is None:
            return None
        start, end = self._steps_marks
        if isinstance(start, float):
            total = (end - start) * 1e3
        else:
            end.synchronize()
            total = start.elapsed_time(end)
        return total / (self.new_tokens - 1)

    def last_step_host_ms(self) -> float | None:
        """Milliseconds the host took to issue one step of the last generate() (no synchronization inside: on CUDA
        the device may still be running them); None without steps or before any generate()."""
        if self.new_tokens < 2 or self._host_marks is None:
            return None
        start, end = self._host_marks
        return (end - start) * 1e3 / (self.new_tokens - 1)


def static_greedy(model, input_ids: torch.Tensor, new_tokens: int, *, device=None, mode: str = "eager",
                  repeats: int = 1, warmup: int = 2) -> DecodeRun:
    """Greedy decode of `new_tokens` tokens over a static cache (see StaticGreedy); median wall time of `repeats`
    whole generations after one unmeasured warm-up/capture. Every repeat must produce the same tokens (raises
    RuntimeError otherwise: a replay that does not recompute would show here)."""
    _check_args(input_ids, new_tokens)
    device = torch.device(device) if device is not None else input_ids.device
    dec = StaticGreedy(model, input_ids.shape[1], new_tokens, device=device, mode=mode, warmup=warmup)
    dec.prepare(input_ids)
    times, steps, host_steps, first = [], [], [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        tokens = dec.generate(input_ids)
        _sync(device)
        times.append(time.perf_counter() - t0)
        steps.append(dec.last_step_ms())
        host_steps.append(dec.last_step_host_ms())
        tokens = tokens.cpu()
        if first is None:
            first = tokens.clone()
        elif not torch.equal(first, tokens):
            raise RuntimeError(f"{mode} decoding is not repeatable: {first.tolist()} then {tokens.tolist()}")
    no_steps = steps[0] is None
    return DecodeRun(first, statistics.median(times), new_tokens, mode, times,
                     None if no_steps else statistics.median(steps), None if no_steps else statistics.median(host_steps))


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first differing token of two 1-D token tensors (None when equal)."""
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    if diff.numel():
        return int(diff[0])
    return None if a.numel() == b.numel() else n
