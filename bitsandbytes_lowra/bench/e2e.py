"""End-to-end and training benchmarks on a GPU: LowRA vs bitsandbytes NF4 vs bf16, side by side in one process.

    python -m bitsandbytes_lowra.bench.e2e --json out.json [--skip-model | --skip-training] [--bits 4 2 1.75]
                                       [--train-tokens 512 4096] [--new-tokens 64] [--repeats 3] [--no-graph]
                                       [--compile] [--finetune-tokens 512]

1. Training step of one layer: base + LoRA (r=64) forward + backward at 512 tokens (--train-tokens), base frozen,
   for LinearLowRA (1.75 and 4 bits), bnb.nn.Linear4bit (NF4) and a bf16 nn.Linear, on Llama-2-7B / 70B layer
   shapes: launched eagerly (`fwd_bwd_ms`, which the host bounds at 512 tokens), and replayed from a CUDA graph
   (`graph_ms`: the device's time alone; a capture that fails is recorded as `graph_error`).
2. A Llama-2-7B-shaped model from its config with random weights (synthetic: speed and memory only), saved once as a
   bf16 safetensors checkpoint, then loaded with from_pretrained as bf16, bnb NF4 and LowRA at each budget:
   load time (LowRA: the first load plans, later budgets reuse the cached fits), peak GPU memory, batch-1 greedy
   decode tokens/s, a whole-model LoRA fine-tuning step (finetune_bench: peft LoRA r=64 on every linear layer,
   one sequence of --finetune-tokens, AdamW; time and peak memory), and for LowRA a save_pretrained + reload of the
   pre-quantized checkpoint. Decode is measured (bench/decode.py) as eager `generate` (`decode_tok_s`) and as a
   static-KV-cache loop run eagerly (`static_eager_tok_s`) and replayed from a CUDA graph per token (`graph_tok_s`;
   with --compile also torch.compile(mode="reduce-overhead"), `compile_tok_s`): the graph takes host overhead out
   for every contender alike. Those rates include the prompt's eager prefill; `*_step_ms` is one replayed step
   alone (time on the device's stream) and `*_host_step_ms` the host's time to issue one: where the two are close
   the loop waits on the host (a compiled LowRA step did: Dynamo's guards, twenty-sixth round). The graph's tokens
   must equal the eager static loop's (`graph_matches_static_eager`: same kernels, same inputs); a capture that
   fails is recorded as `graph_error`, never fatal. Compiled tokens are compared, not required to match
   (`compile_matches_static_eager`): inductor's fused ops round differently. Tokens against `generate`'s
   (`*_matches_generate`, `*_first_mismatch_vs_generate`) are recorded, not required: generate's dynamic cache
   runs attention over other lengths and masks, so bf16 rounding can flip a near-tied argmax of a random model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

LLAMA2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, model_type="llama",
)


def cuda_time(fn, warmup: int = 3, iters: int = 10, device="cuda") -> float:
    """Median milliseconds of fn() between CUDA events (wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


class LoRA(torch.nn.Module):
    """The same plain LoRA branch on every base, so only the base differs between contenders."""

    def __init__(self, base: torch.nn.Module, n_in: int, n_out: int, r: int = 64, device="cuda",
                 dtype=torch.bfloat16):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(r, n_in, device=device, dtype=dtype) * 0.01)
        self.B = torch.nn.Parameter(torch.randn(n_out, r, device=device, dtype=dtype) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def training_layer_bench(shapes, tokens=(512,)) -> list[dict]:
    import bitsandbytes as bnb

    from .decode import graphed

    from bitsandbytes_lowra.functional import quantize_lowra_at_bits
    from bitsandbytes_lowra.nn import LinearLowRA

    rows = []
    for n_out, n_in in shapes:
        torch.manual_seed(0)
        dense = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        dense.weight.data.normal_(0, 0.02)
        dense.weight.requires_grad_(False)
        bases = {"bf16": dense}
        nf4 = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        nf4.weight = bnb.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        bases["bnb-nf4"] = nf4.to("cuda")
        for bits in (4.0, 1.75):
            # learned tables + per-row bits for this budget, then the layer quantized with them
            _, state = quantize_lowra_at_bits(dense.weight.data, bits=bits)
            bases[f"lowra-{bits:g}"] = LinearLowRA.from_linear(
                dense, state.bits, state.code, state.thresholds, compute_dtype=torch.bfloat16, device="cuda"
            )
        for n_tok in tokens:
            x = torch.randn(n_tok, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            this = []
            for name, base in bases.items():
                model = LoRA(base, n_in, n_out)

                def step():
                    y = model(x)
                    y.float().pow(2).mean().backward()

                row = {"shape": f"{n_out}x{n_in}", "tokens": n_tok, "base": name, "fwd_bwd_ms": cuda_time(step)}
                try:
                    row["graph_ms"] = cuda_time(graphed(step, warmup=3), iters=20)
                except Exception as e:  # noqa: BLE001  (recorded; the eager figure stands)
                    row["graph_error"] = f"{type(e).__name__}: {e}"[:2000]
                    _recover(torch.device("cuda"))
                this.append(row)
                x.grad = None
            ref = this[0]  # bf16
            for r in this:
                for key in ("fwd_bwd", "graph"):
                    if f"{key}_ms" in r and f"{key}_ms" in ref:
                        r[f"{key}_vs_bf16"] = r[f"{key}_ms"] / ref[f"{key}_ms"]
            rows += this
        del bases, dense
        gc.collect()
        torch.cuda.empty_cache()
    return rows


PROMPT = [1, 450, 4996, 17354, 1701, 29916]  # token ids of a Llama-2 prompt (the model is random anyway)


def decode_bench(model, new_tokens: int = 64, repeats: int = 3, graph: bool = True, compile: bool = False,
                 static_generate: bool = False, device="cuda", prompt=PROMPT) -> dict:
    """Batch-1 greedy decode of `new_tokens` tokens: eager generate, the static-cache loop eagerly, and (each
    optional) the same loop replayed from a CUDA graph / torch.compile'd, and `generate` over a static cache (which
    transformers compiles itself where the model allows: `static_generate_compiled`). A failing static path is
    recorded as `<key>_error` and the others still run."""
    from .decode import first_mismatch, generate_greedy, static_greedy

    ids = torch.tensor([prompt], device=device)
    ref = generate_greedy(model, ids, new_tokens, repeats=repeats)
    row = {"new_tokens": new_tokens, "decode_tok_s": ref.tok_s}
    if static_generate:  # what a user gets from generate(..., cache_implementation="static")
        model.__dict__.pop("_compiled_call", None)  # so that one found after the run is this run's
        try:
            run = generate_greedy(model, ids, new_tokens, repeats=repeats, static=True)
            row["static_generate_tok_s"] = run.tok_s
            row["static_generate_compiled"] = getattr(model, "_compiled_call", None) is not None
            row["static_generate_matches_generate"] = torch.equal(run.tokens, ref.tokens)
        except Exception as e:  # noqa: BLE001  (recorded; the other paths still run)
            row["static_generate_error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  static generate failed: {row['static_generate_error'][:300]}", flush=True)
            _recover(ids.device)
        finally:
            torch._dynamo.reset()  # drop transformers' compiled graphs (and their CUDA graph pools)
            model.__dict__.pop("_compiled_call", None)
    static_tokens = None
    modes = [("static_eager", "eager")] + [("graph", "cuda-graph")] * graph + [("compile", "compile")] * compile
    for key, mode in modes:
        try:
            run = static_greedy(model, ids, new_tokens, mode=mode, repeats=repeats)
        except Exception as e:  # noqa: BLE001  (record why this path cannot run; the benchmark goes on)
            row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  {key} decode failed: {row[f'{key}_error'][:300]}", flush=True)
            _recover(ids.device)
            continue
        finally:
            if mode == "compile":
                torch._dynamo.reset()  # drop the compiled graphs (and their CUDA graph pools) with the model
        row[f"{key}_tok_s"] = run.tok_s
        if run.step_ms is not None:
            row[f"{key}_step_ms"] = run.step_ms
            row[f"{key}_host_step_ms"] = run.host_step_ms
        mismatch = first_mismatch(run.tokens, ref.tokens)
        row[f"{key}_matches_generate"] = mismatch is None
        if mismatch is not None:
            row[f"{key}_first_mismatch_vs_generate"] = mismatch
        if mode == "eager":
            static_tokens = run.tokens
        elif static_tokens is not None:
            same = torch.equal(run.tokens, static_tokens)
            row[f"{key}_matches_static_eager"] = same
            if not same:
                row[f"{key}_first_mismatch_vs_static_eager"] = first_mismatch(run.tokens, static_tokens)
            # The proof that a replay recomputes: the same kernels on the same inputs give the same tokens. Not so
            # for compile: inductor fuses the ops between the GEMMs and rounds them differently (on the random
            # 7B model every contender's tokens part from the eager loop's, bf16's too; twenty-third round).
            if not same and mode == "cuda-graph":
                row[f"{key}_error"] = (f"{mode} tokens differ from the eager static-cache loop from token "
                                       f"{first_mismatch(run.tokens, static_tokens)}: {run.tokens.tolist()} vs "
                                       f"{static_tokens.tolist()}")
                print(f"  {row[f'{key}_error']}", flush=True)
    return row


def finetune_bench(model, tokens: int = 512, r: int = 64, steps: int = 5, device="cuda") -> dict:
    """One LoRA fine-tuning step of the whole model, as a QLoRA script takes it: peft LoRA (rank r, alpha 2r) on
    every linear layer, a causal-LM loss on one sequence of `tokens` random ids, backward, AdamW on the adapters.
    Median of `steps` timed steps after two warm-up steps; peak memory over them. Injects the adapters into `model`
    (drop it afterwards)."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen).to(device)
    losses = []

    def step():
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = cuda_time(step, warmup=2, iters=steps, device=device)
    row = {"finetune_tokens": tokens, "finetune_lora_rank": r, "finetune_step_ms": ms,
           "finetune_trainable_params": sum(p.numel() for p in params),
           "finetune_losses": [float(v) for v in losses]}  # warm-up steps first
    if on_cuda:
        row["peak_finetune_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def _recover(device: torch.device) -> None:
    """After a failed capture: let pending work finish so the next contender starts clean (errors ignored)."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass
        torch.cuda.empty_cache()


def model_bench(bits_list, workdir: str, decode_kw: dict | None = None, finetune_kw: dict | None = None) -> list[dict]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from bitsandbytes_lowra import LowRAConfig

    ckpt = os.path.join(workdir, "llama2-7b-random")
    config = LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k != "model_type"})
    t0 = time.perf_counter()
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(ckpt)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    print(f"random Llama-2-7B checkpoint written in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []

    def measure(name, save_to=None, finetune=True, **kw):
        """Load, decode, save the quantized model to `save_to` (before any adapter exists), fine-tune a step."""
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(kw.pop("path", ckpt), device_map="cuda", **kw)
        load_s = time.perf_counter() - t
        row = {"model": name, "load_s": load_s, "peak_load_gib": torch.cuda.max_memory_allocated() / 2**30,
               "weights_gib": torch.cuda.memory_allocated() / 2**30}
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            row.update(decode_bench(m, **(decode_kw or {})))
        row["peak_decode_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if save_to:
            m.save_pretrained(save_to)
        if finetune and finetune_kw is not None:
            try:
                row.update(finetune_bench(m, **finetune_kw))
            except Exception as e:  # noqa: BLE001  (recorded; the other contenders still run)
                row["finetune_error"] = f"{type(e).__name__}: {e}"[:2000]
                _recover(torch.device("cuda"))
        print(json.dumps(row), flush=True)
        rows.append(row)
        del m

    def free():
        gc.collect()
        torch.cuda.empty_cache()

    measure("bf16", dtype=torch.bfloat16)  # each model is dropped on return
    free()
    measure("bnb-nf4", dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True))
    free()
    for bits in bits_list:
        saved = os.path.join(workdir, f"lowra-{bits:g}") if bits == bits_list[-1] else None
        measure(f"lowra-{bits:g}", save_to=saved, dtype=torch.bfloat16, quantization_config=LowRAConfig(bits=bits))
        free()
        if saved:  # load time from a saved LowRA checkpoint (its fine-tuning step is the row above's)
            measure(f"lowra-{bits:g} (pre-quantized reload)", path=saved, finetune=False, dtype=torch.bfloat16)
            free()
    return rows


def training_table(rows: list[dict]) -> str:
    """One line per shape, token count and base: the eager step and the graph-replayed one, each against bf16."""
    lines = []
    for r in rows:
        graph = (f"graph {r['graph_ms']:.3f} ms ({r['graph_vs_bf16']:.2f}x bf16)" if "graph_ms" in r
                 else f"graph error: {r['graph_error'][:200]}")
        lines.append(f"train {r['shape']:>11} {r['tokens']:>5} tok {r['base']:>10}: eager {r['fwd_bwd_ms']:.3f} ms "
                     f"({r['fwd_bwd_vs_bf16']:.2f}x bf16), {graph}")
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    """Decode tokens/s per contender: eager generate, static cache eager, CUDA graph (and compile when run)."""
    def cell(r, key):
        if f"{key}_error" in r:
            return "error"
        if f"{key}_tok_s" not in r:
            return "-"
        step = ""
        if f"{key}_step_ms" in r:  # the step on the device's stream, and the host's time to issue one
            host = f", host {r[key + '_host_step_ms']:.2f}" if r.get(f"{key}_host_step_ms") is not None else ""
            step = f" ({r[key + '_step_ms']:.2f} ms/step{host})"
        return f"{r[key + '_tok_s']:.1f}{step}"

    def static_generate(r):
        if "static_generate_tok_s" not in r:
            return cell(r, "static_generate")
        return f"{r['static_generate_tok_s']:.1f} ({'compiled' if r['static_generate_compiled'] else 'eager'})"

    lines = ["model | generate tok/s | static generate | static eager | CUDA graph | compile | graph == static eager | "
             "graph == generate"]
    for r in rows:
        lines.append(" | ".join([r["model"], f"{r['decode_tok_s']:.1f}", static_generate(r), cell(r, "static_eager"),
                                 cell(r, "graph"), cell(r, "compile"), str(r.get("graph_matches_static_eager", "-")),
                                 str(r.get("graph_matches_generate", "-"))]))
    return "\n".join(lines)


def model_table(rows: list[dict]) -> str:
    """Load, memory and the fine-tuning step per contender."""
    def f(r, key, fmt):
        return "error" if key == "finetune_step_ms" and "finetune_error" in r else (fmt % r[key] if key in r else "-")

    lines = ["model | load s | weights GiB | peak decode GiB | fine-tune step ms | peak fine-tune GiB"]
    for r in rows:
        lines.append(" | ".join([r["model"], f(r, "load_s", "%.1f"), f(r, "weights_gib", "%.2f"),
                                 f(r, "peak_decode_gib", "%.2f"), f(r, "finetune_step_ms", "%.1f"),
                                 f(r, "peak_finetune_gib", "%.2f")]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--skip-model", action="store_true", help="only the one-layer training benchmark")
    ap.add_argument("--skip-training", action="store_true", help="only the model benchmark")
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 2.0, 1.75])
    ap.add_argument("--workdir", default=None,
                    help="folder (created if missing) for the random checkpoint's temp dir (default: the system's)")
    ap.add_argument("--train-tokens", type=int, nargs="+", default=[512],
                    help="tokens of the one-layer training step, one run per value")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per decode (batch 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per decode path (median)")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph decode")
    ap.add_argument("--finetune-tokens", type=int, default=512,
                    help="tokens of the whole-model LoRA fine-tuning step (one sequence; 0 skips it)")
    ap.add_argument("--compile", action="store_true",
                    help='also decode with torch.compile(mode="reduce-overhead") (compiles once per contender: slow)')
    ap.add_argument("--static-generate", action="store_true",
                    help='also time generate(cache_implementation="static"), which transformers compiles itself for '
                         "the contenders that allow it (slow, as --compile)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    if args.new_tokens < 1 or args.repeats < 1 or min(args.train_tokens) < 1:
        ap.error("--new-tokens, --repeats and --train-tokens must be positive")
    if args.finetune_tokens < 0:
        ap.error("--finetune-tokens must be 0 (skip) or positive")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    if not args.skip_training:
        results["training"] = training_layer_bench([(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)],
                                                   tokens=args.train_tokens)
        print(training_table(results["training"]), flush=True)
        dump()
    if not args.skip_model:
        decode_kw = dict(new_tokens=args.new_tokens, repeats=args.repeats, graph=not args.no_graph,
                         compile=args.compile, static_generate=args.static_generate)
        if args.workdir:
            os.makedirs(args.workdir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
            finetune_kw = dict(tokens=args.finetune_tokens) if args.finetune_tokens else None
            results["model"] = model_bench(sorted(args.bits, reverse=True), workdir, decode_kw, finetune_kw)
        dump()
        print(decode_table(results["model"]))
        print(model_table(results["model"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
