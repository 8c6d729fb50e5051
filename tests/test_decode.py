"""bench/decode.py: greedy decoding over a static KV cache (the loop the end-to-end benchmark captures in a CUDA graph).

On the CPU the static-cache loop must give model.generate's greedy tokens, for a dense and a LowRA-quantized tiny
Llama; the step must trace into one torch.compile graph through LinearLowRA. On a GPU (marked cuda) the CUDA-graph
replay and the compiled step must give the eager loop's tokens exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from bitsandbytes_lowra import LinearLowRA, LowRAConfig
from bitsandbytes_lowra.bench import decode

hf_logging.disable_progress_bar()

PROMPT = [[1, 45, 17, 99, 3, 200]]
BATCH4 = [PROMPT[0], [7, 8, 9, 10, 11, 12], [200, 3, 99, 17, 45, 1], [5, 5, 6, 6, 7, 7]]
NEW = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    d = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    return d


def _load(path, device="cpu", lowra=False, **kw):
    if lowra:
        kw["quantization_config"] = LowRAConfig(bits=1.75, plan_cache=False)
    return AutoModelForCausalLM.from_pretrained(path, device_map=device, **kw).eval()


@pytest.fixture(scope="module")
def dense(tiny_dir):
    return _load(tiny_dir)


@pytest.fixture(scope="module")
def lowra(tiny_dir):
    model = _load(tiny_dir, lowra=True)
    assert sum(isinstance(m, LinearLowRA) for m in model.modules()) == 14  # 7 linears x 2 layers
    return model


def _ids(device="cpu"):
    return torch.tensor(PROMPT, device=device)


STATIC = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, cache_implementation="static")


def _forced_compile_config():
    """A compile_config for generate that also compiles on the CPU (transformers compiles on GPUs only, by default)."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    return config


def _static_generates(model, ids, base=None, **compile_kw):
    """generate over a static cache with compilation disabled, then twice as it comes (compile_kw: a compile_config):
    (eager tokens, [tokens of the two], [Dynamo graphs built by then], the compiled call transformers made or None).
    `base` is the transformers model under a peft wrapper; its compiled call and Dynamo's caches are dropped after."""
    base = model if base is None else base
    torch._dynamo.reset()
    base.__dict__.pop("_compiled_call", None)
    start = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, graphs = [], []
    try:
        with torch.no_grad():
            eager = model.generate(input_ids=ids, disable_compile=True, **STATIC)
            for _ in range(2):
                compiled.append(model.generate(input_ids=ids, **STATIC, **compile_kw))
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - start)
    finally:
        built = base.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
    return eager, compiled, graphs, built


@pytest.mark.parametrize("which", ["dense", "lowra"])
def test_static_eager_matches_generate(which, request):
    model = request.getfixturevalue(which)
    ref = decode.generate_greedy(model, _ids(), NEW)
    run = decode.static_greedy(model, _ids(), NEW, device="cpu", mode="eager", repeats=2)
    assert ref.tokens.shape == run.tokens.shape == (NEW,)
    assert len(set(ref.tokens.tolist())) > 3  # a real sequence, not one token repeated
    assert run.tokens.tolist() == ref.tokens.tolist()
    assert decode.first_mismatch(run.tokens, ref.tokens) is None
    assert run.tok_s > 0 and len(run.runs_s) == 2
    # the steps after the prefill are part of each whole run
    assert 0 < run.step_ms * (NEW - 1) < max(run.runs_s) * 1e3  # each run holds its steps; step_ms is their median
    # On the CPU the ops run as they are issued: issuing a step takes the step's time (marks microseconds apart)
    assert run.host_step_ms == pytest.approx(run.step_ms, rel=0.1)
    one = decode.static_greedy(model, _ids(), 1, device="cpu")
    assert one.step_ms is None and one.host_step_ms is None  # the prefill alone: no step


def test_lowra_changes_the_tokens(dense, lowra):
    """The quantized model is really decoded (its greedy tokens are not the dense model's)."""
    a = decode.static_greedy(dense, _ids(), NEW, device="cpu").tokens
    b = decode.static_greedy(lowra, _ids(), NEW, device="cpu").tokens
    assert decode.first_mismatch(a, b) is not None


def test_eos_suppressed_as_generate_min_new_tokens(tiny_dir):
    """generate(min_new_tokens=n) never emits EOS; the static loop must suppress it the same way."""
    model = _load(tiny_dir)
    free = model.generate(_ids(), max_new_tokens=NEW, do_sample=False)[0, len(PROMPT[0]):]
    model.generation_config.eos_token_id = int(free[0])  # the token greedy would pick first
    ref = decode.generate_greedy(model, _ids(), NEW)
    run = decode.static_greedy(model, _ids(), NEW, device="cpu")
    assert int(free[0]) not in ref.tokens.tolist()
    assert run.tokens.tolist() == ref.tokens.tolist()


def test_prefill_resets_between_prompts(dense):
    """One decoder, two prompts of the same length: each run starts from an empty cache."""
    dec = decode.StaticGreedy(dense, 6, NEW, device="cpu")
    other = torch.tensor([[1, 7, 8, 9, 10, 11]])
    first = dec.generate(_ids()).clone()
    second = dec.generate(other).clone()
    assert dec.generate(_ids()).tolist() == first.tolist()
    assert second.tolist() == decode.generate_greedy(dense, other, NEW).tokens.tolist()


def test_step_times_exist_only_after_a_generate_with_steps(dense):
    dec = decode.StaticGreedy(dense, 6, NEW, device="cpu")
    assert dec.last_step_ms() is None and dec.last_step_host_ms() is None  # nothing timed yet
    dec.generate(_ids())
    assert dec.last_step_ms() > 0 and dec.last_step_host_ms() > 0
    single = decode.StaticGreedy(dense, 6, 1, device="cpu")
    single.generate(_ids())
    assert single.last_step_ms() is None and single.last_step_host_ms() is None  # the prefill alone


def test_compile_traces_lowra_step_in_one_graph(lowra):
    """torch.compile sees the whole decode step, LinearLowRA and the lowra ops included, as one graph (no breaks)."""
    dec = decode.StaticGreedy(lowra, 6, NEW, device="cpu")
    with torch.no_grad():
        dec.prefill(_ids())
        explained = torch._dynamo.explain(dec._eager_step)()
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("batch", [1, 4])
def test_transformers_compiled_generate_matches_eager(lowra, batch):
    """transformers' own compiled decoding (generate with a static cache and a compile_config) gives the eager
    static generate's tokens, its LinearLowRA reading their kept operands. transformers compiles a quantized model
    only if its quantizer says `is_compileable` (ours does), and on the CPU only when asked to (forced here; on a GPU
    it compiles by itself: test_cuda_generate_static_cache_compiles_by_itself)."""
    assert lowra.hf_quantizer.is_compileable
    ids = _ids() if batch == 1 else torch.tensor(BATCH4)
    eager, compiled, graphs, built = _static_generates(lowra, ids, compile_config=_forced_compile_config())
    assert built is not None and all(torch.equal(c, eager) for c in compiled)
    assert graphs[0] >= 1 and graphs[1] == graphs[0]  # compiled, and reused as is by the second generate
    assert all("_kept_operands" in m.__dict__ for m in lowra.modules() if isinstance(m, LinearLowRA))


def test_transformers_does_not_compile_a_model_split_over_devices(lowra, monkeypatch):
    """A model whose device map spans several devices (the quantizer saw it in validate_environment) is not
    compileable: accelerate's hooks would make every LinearLowRA a recompile (two H200s, twenty-eighth round), so
    generate runs it eagerly even when asked to compile, with the eager tokens."""
    monkeypatch.setattr(lowra.hf_quantizer, "_several_devices", True)
    assert not lowra.hf_quantizer.is_compileable
    eager, out, graphs, built = _static_generates(lowra, _ids(), compile_config=_forced_compile_config())
    assert built is None and graphs == [0, 0]
    assert all(torch.equal(o, eager) for o in out)


def test_transformers_compiled_generate_with_lora_adapters(tiny_dir):
    """The fine-tuned model as users generate with it: peft LoRA adapters (nonzero) on LinearLowRA layers, generate
    over a static cache compiled with fullgraph=True (no graph break in the adapter's forward either): the tokens of
    the uncompiled generate, one graph reused by the second generate."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _load(tiny_dir, lowra=True)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False)).eval()
    eager, compiled, graphs, built = _static_generates(model, _ids(), base, compile_config=_forced_compile_config())
    with torch.no_grad(), model.disable_adapter():
        without = model.generate(input_ids=_ids(), **STATIC)
    assert not torch.equal(without, eager)  # the adapters change the tokens: they are in the compiled graph
    assert built is not None and all(torch.equal(c, eager) for c in compiled)
    assert graphs[0] >= 1 and graphs[1] == graphs[0]


def test_compiled_steps_never_recompile_between_eager_prefills(lowra, monkeypatch):
    """Each generation prefills eagerly (LinearLowRA remembers its decode shortcut), then runs compiled steps: the
    traced forward must leave the module's __dict__ alone, or every prefill changes what the graph was traced
    against (on the H200, a 32-layer model then hit Dynamo's recompile limit: 73-101 ms compiled steps)."""
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: compile_(fn, backend=counter))
    dec = decode.StaticGreedy(lowra, 6, 8, device="cpu", mode="compile")
    try:
        for _ in range(3):
            dec.generate(_ids())
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    layers = [m for m in lowra.modules() if isinstance(m, LinearLowRA)]
    assert all("_decode_call" in m.__dict__ for m in layers)  # the eager prefill's, untouched by the compiled steps


def test_compile_traces_fused_decode_branch(monkeypatch):
    """The branch LinearLowRA takes when decoding on a GPU (lowra::matmul with the cached row grouping), forced on
    the CPU, must trace into one graph too."""
    from bitsandbytes_lowra import functional
    from bitsandbytes_lowra.nn import LinearLowRA

    torch.manual_seed(0)
    layer = LinearLowRA.from_linear(torch.nn.Linear(64, 32, bias=False), 2, device="cpu").eval()
    monkeypatch.setattr(functional, "_fused_decode_shape", lambda A: True)
    x = torch.randn(1, 1, 64)
    try:
        with torch.no_grad():
            layer(x)  # fills the row-grouping cache, as the eager warm-up does
            explained = torch._dynamo.explain(layer)(x)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]


def test_mark_quant_states_static(lowra, dense):
    assert decode.mark_quant_states_static(dense) == 0
    n = decode.mark_quant_states_static(lowra)
    layer = lowra.model.layers[0].mlp.up_proj
    state = layer.weight.quant_state
    assert n >= 14 * 5  # absmax, bits, codebook, thresholds, row offsets per layer (+ nested state)
    assert hasattr(state.absmax, "_dynamo_static_input_type")


def test_bad_arguments(dense):
    with pytest.raises(ValueError, match="batch 1"):
        decode.static_greedy(dense, torch.tensor(PROMPT * 2), NEW)
    with pytest.raises(ValueError, match="new_tokens"):
        decode.static_greedy(dense, _ids(), 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        decode.StaticGreedy(dense, 6, NEW, device="cpu", mode="graph")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        decode.StaticGreedy(dense, 6, NEW, device="cpu", mode="cuda-graph")
    dec = decode.StaticGreedy(dense, 6, NEW, device="cpu")
    with pytest.raises(ValueError, match="prompts of shape"):
        dec.prefill(torch.tensor([[1, 2, 3]]))


def test_first_mismatch():
    t = torch.tensor
    assert decode.first_mismatch(t([1, 2, 3]), t([1, 2, 3])) is None
    assert decode.first_mismatch(t([1, 2, 3]), t([1, 5, 3])) == 1
    assert decode.first_mismatch(t([1, 2]), t([1, 2, 3])) == 2


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.fixture(scope="module")
def cuda_models(tiny_dir):
    # bf16 on the GPU: LinearLowRA takes the fused decode kernel (lowra::matmul), as in the benchmark
    return {
        "dense": _load(tiny_dir, "cuda", dtype=torch.bfloat16),
        "lowra": _load(tiny_dir, "cuda", lowra=True, dtype=torch.bfloat16),
    }


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["dense", "lowra"])
def test_cuda_graph_replays_the_eager_loop(which, cuda_models):
    model = cuda_models[which]
    ids = _ids("cuda")
    eager = decode.static_greedy(model, ids, NEW, mode="eager")
    graph = decode.static_greedy(model, ids, NEW, mode="cuda-graph", repeats=2)
    assert len(set(eager.tokens.tolist())) > 3
    assert graph.tokens.tolist() == eager.tokens.tolist()
    # for the record in a failure message: the dynamic-cache generate (may differ by bf16 rounding of attention)
    ref = decode.generate_greedy(model, ids, NEW)
    print(which, "graph vs generate first mismatch:", decode.first_mismatch(graph.tokens, ref.tokens))


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_compile_reduce_overhead_matches_eager(cuda_models):
    model = cuda_models["lowra"]
    ids = _ids("cuda")
    eager = decode.static_greedy(model, ids, NEW, mode="eager")
    try:
        compiled = decode.static_greedy(model, ids, NEW, mode="compile", repeats=2)
    finally:
        torch._dynamo.reset()
    assert compiled.tokens.tolist() == eager.tokens.tolist()


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("adapters, batch", [(False, 1), (True, 1), (False, 4)])
def test_cuda_generate_static_cache_compiles_by_itself(tiny_dir, cuda_models, adapters, batch):
    """On a GPU, `generate(cache_implementation="static")` compiles a LowRA model's decode step (reduce-overhead: CUDA
    graph trees) with no compile_config, with or without peft LoRA adapters, at batch 1 (the GEMV) and 4 (the
    tensor-core kernel): the tokens are those of the same generate with compilation disabled, and a second generate
    reuses the first's graphs."""
    if adapters:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        base = _load(tiny_dir, "cuda", lowra=True, dtype=torch.bfloat16)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_lora_weights=False)).eval()
    else:
        model = base = cuda_models["lowra"]
    ids = _ids("cuda") if batch == 1 else torch.tensor(BATCH4, device="cuda")
    eager, compiled, graphs, built = _static_generates(model, ids, base)
    assert built is not None  # transformers' own compiled forward, made by generate
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
    assert eager.shape[0] == batch and len(set(eager[0].tolist())) > 3
    assert all(c.tolist() == eager.tolist() for c in compiled)


def test_e2e_decode_bench_records_failures(lowra):
    """The benchmark row: eager generate and the static loop measured, tokens compared; a path that cannot run (here
    the CUDA graph on the CPU) is recorded as its error, not raised."""
    from bitsandbytes_lowra.bench.e2e import decode_bench, decode_table

    row = decode_bench(lowra, new_tokens=8, repeats=1, graph=True, static_generate=True, device="cpu",
                       prompt=PROMPT[0])
    assert row["decode_tok_s"] > 0 and row["static_eager_tok_s"] > 0
    assert row["static_eager_matches_generate"] is True
    # generate over a static cache: on the CPU transformers does not compile it unless asked
    assert row["static_generate_tok_s"] > 0 and row["static_generate_compiled"] is False
    assert row["static_generate_matches_generate"] is True and "_compiled_call" not in lowra.__dict__
    assert "first_mismatch" not in " ".join(row)
    assert row["graph_error"].startswith("ValueError: mode 'cuda-graph' needs a CUDA device")
    assert "graph_tok_s" not in row
    table = decode_table([{"model": "lowra", **row}])
    assert table.splitlines()[1].startswith("lowra | ") and "| error |" in table and " (eager) | " in table


def test_e2e_decode_bench_compiled_tokens_may_differ_graph_tokens_may_not(lowra, monkeypatch):
    """A CUDA-graph replay runs the eager loop's kernels, so different tokens are an error; compiled tokens may part
    from them (inductor's fused ops round differently) and are recorded, with the rate and the step time."""
    from bitsandbytes_lowra.bench.e2e import decode_bench, decode_table

    real = decode.static_greedy

    def fake(model, ids, new_tokens, *, mode="eager", **kw):
        run = real(model, ids, new_tokens, mode="eager", **kw)
        if mode != "eager":  # as if this mode had run: its tokens part from the eager loop's at token 3
            run.tokens = run.tokens.clone()
            run.tokens[3:] += 1
            run.mode = mode
        return run

    monkeypatch.setattr(decode, "static_greedy", fake)
    row = decode_bench(lowra, new_tokens=8, repeats=1, graph=True, compile=True, device="cpu", prompt=PROMPT[0])
    assert row["graph_error"].startswith("cuda-graph tokens differ from the eager static-cache loop from token 3")
    assert "compile_error" not in row and row["compile_tok_s"] > 0 and row["compile_step_ms"] > 0
    assert row["compile_host_step_ms"] > 0 and row["static_eager_host_step_ms"] > 0
    assert row["compile_matches_static_eager"] is False and row["compile_first_mismatch_vs_static_eager"] == 3
    line = decode_table([{"model": "lowra", **row}]).splitlines()[1]
    assert "| error |" in line and "ms/step, host " in line  # graph: error; the others: rate (step, host times)


def test_compile_survives_a_graph_break_inside_forward(monkeypatch):
    """A graph break inside LinearLowRA.forward (here a forced one) used to send Dynamo into endless recursion through
    ParamsLowRA.__torch_function__; the compiled layer must run and match eager."""
    from bitsandbytes_lowra import functional
    from bitsandbytes_lowra.nn import LinearLowRA, modules

    torch.manual_seed(0)
    layer = LinearLowRA.from_linear(torch.nn.Linear(64, 32, bias=False), 2, device="cpu").eval()

    def with_break(*args, **kwargs):
        torch._dynamo.graph_break()
        return functional.matmul_lowra(*args, **kwargs)

    monkeypatch.setattr(modules, "matmul_lowra", with_break)
    x = torch.randn(1, 1, 64)
    try:
        with torch.no_grad():
            want = layer(x)
            got = torch.compile(layer)(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, want)


def test_e2e_finetune_step_trains_the_adapters_only(tiny_dir):
    """The whole-model fine-tuning step of the end-to-end benchmark on a LowRA model: peft LoRA on every linear
    layer, the adapters change, the packed base weights do not, and the row says what was timed."""
    from bitsandbytes_lowra.bench.e2e import finetune_bench, model_table

    model = _load(tiny_dir, lowra=True)
    packed = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LinearLowRA)}
    row = finetune_bench(model, tokens=16, r=4, steps=2, device="cpu")
    assert row["finetune_tokens"] == 16 and row["finetune_lora_rank"] == 4 and row["finetune_step_ms"] > 0
    # r (in + out) per linear: q, o 64 -> 64; k, v 64 -> 32 (2 KV heads of 16); gate, up, down 64 <-> 128; 2 layers
    assert row["finetune_trainable_params"] == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
    losses = row["finetune_losses"]
    assert len(losses) == 4 and all(map(math.isfinite, losses)) and losses[-1] != losses[0]  # 2 warm-up + 2 timed
    lowra_layers = {n: m for n, m in model.named_modules() if isinstance(m, LinearLowRA)}
    assert len(lowra_layers) == 14
    for name, layer in lowra_layers.items():
        key = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        assert torch.equal(layer.weight, packed[key]), f"{key}: packed codes changed"
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero
    table = model_table([{"model": "lowra-1.75", "load_s": 1.0, **row}])
    assert table.splitlines()[1].startswith("lowra-1.75 | 1.0 | - | - | ")
