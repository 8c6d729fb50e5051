"""The `lowra` command line (also `python -m bitsandbytes_lowra`).

  lowra demo                          the main job on the embedded default (SmolLM2-135M + Wikipedia leads)
  lowra plan MODEL --bits B           plan (cached) and print the precision mix, nominal and effective bits
  lowra quantize MODEL --bits B -o D  plan, quantize and save a LowRA checkpoint
  lowra eval MODEL_OR_DIR             perplexity on held-out Wikipedia leads (optionally ACLSum ROUGE)
  lowra finetune ...                  QLoRA-style LoRA fine-tuning (Trainer + peft) on a LowRA base
  lowra sweep                         methods x bits -> table, JSON and a PNG plot
  lowra report JSON...                merge sweep outputs: one record per (method, bits), tables, plots
  lowra memory CONFIG                 fine-tuning / inference memory from a config alone (meta device)

MODEL is a local transformers checkpoint directory (safetensors) or "smollm2-135m" (the packaged default).
Every command takes --json for machine-readable output on stdout (progress and logs go to stderr).
docs/cli.md has examples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from . import baselines

METHOD_HELP = ("quantization method: " + ", ".join(f"{m.name} ({m.label})" for m in baselines.METHODS.values()))
# "in [1, 4] (qlora and loftq: at least 2)": the layer-wise 2/4-bit mix of those methods cannot go below 2 bits
BITS_RANGE = "in [1, 4]" + "".join(
    f" ({' and '.join(m.name for m in baselines.METHODS.values() if m.min_bits == lo)}: at least {lo:g})"
    for lo in sorted({m.min_bits for m in baselines.METHODS.values() if m.min_bits > 1})
)
# sweep's default steps: 40 x 4 x 128 tokens, no checkpoint recompute, what lets the whole sweep fit 3 hours on 2 CPU
# cores
SWEEP_STEPS = 40


# ------------------------------------------------------------------------------------------------------ output


def _emit(args, payload: dict, text: str) -> None:
    if getattr(args, "json", False):
        # the real stdout: while a --json command runs, sys.stdout is stderr (_run_command)
        out = getattr(args, "json_stdout", None) or sys.stdout
        print(json.dumps(_jsonable(payload), indent=2, allow_nan=False), file=out)
    else:
        print(text)


def _run_command(args) -> int:
    """args.func(args). Under --json, stdout carries the JSON document only: whatever else is printed on stdout while
    the command runs (transformers' Trainer prints its log dicts {'loss': ...}, {'train_runtime': ...} there, through
    PrinterCallback or tqdm.write) goes to stderr, with the logs."""
    if not getattr(args, "json", False):
        return args.func(args)
    args.json_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        return args.func(args)


def _jsonable(o):
    """o as plain JSON values: other objects through _json_default, and NaN / inf (a diverged perplexity) as null,
    since they are not JSON and strict parsers refuse them."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (str, int)):
        return o
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return _jsonable(_json_default(o))


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _mix_table(mix_by_type: dict) -> str:
    from .sweep import format_table

    precs = sorted({int(b) for v in mix_by_type.values() for b in v})
    header = ["layer type"] + [f"{p}-bit" for p in precs]
    rows = [[k] + [f"{100 * float(v.get(str(p), v.get(p, 0.0))):.1f}%" for p in precs] for k, v in mix_by_type.items()]
    return format_table(header, rows, markdown=False)


def _plan_text(rec: dict, extra: list[str] = ()) -> str:
    lines = [
        f"method {rec['method']} at {rec['bits']:g} bits over {rec['quantized_parameters']:,} quantized parameters",
        f"nominal bits   {rec['nominal_bits']:.4f}  (average code bits per quantized parameter)",
        f"effective bits {rec['effective_bits']:.4f}  (every stored bit: codes, absmax, tables, offsets)",
        "overall mix    " + ", ".join(f"{b}-bit {100 * f:.1f}%" for b, f in rec["precision_mix"].items()),
        "",
        _mix_table(rec["precision_mix_by_type"]),
    ]
    if rec.get("assignment", {}).get("four_bit_layers") is not None:
        lines.insert(4, f"4-bit decoder layers (by index) {rec['assignment']['four_bit_layers']}")
    return "\n".join([*lines, *extra])


def _add_common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout (logs go to stderr)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines on stderr")


def _add_eval_flags(p: argparse.ArgumentParser, default_tokens: int) -> None:
    p.add_argument("--eval-tokens", type=_count(2, zero_too=True), default=default_tokens,
                   help=f"held-out Wikipedia tokens to score (default {default_tokens}; 0 = the whole eval "
                   "split)")  # fmt: skip
    p.add_argument("--context", type=_count(2), default=512,
                   help="tokens per non-overlapping window (default 512)")
    p.add_argument("--eval-batch-size", type=_count(1), default=4, help="windows per forward pass (default 4)")


# ------------------------------------------------------------------------------------------------------ plan / quantize


def _check_method_bits(args) -> None:
    """--bits against --method's range (qlora / loftq: 2 to 4), before the model is resolved or loaded."""
    if getattr(args, "bits", None) is None:
        return
    try:
        baselines.check_bits(baselines.get_method(args.method), args.bits)
    except ValueError as e:
        raise ValueError(f"--bits {args.bits:g} with --method {args.method}: {e}") from None


def _cmd_plan(args) -> int:
    from .plan import FIT_SETTINGS, PlanSettings
    from .sweep import plan_record, resolve_checkpoint

    _check_method_bits(args)
    out = _plan_output(args)  # before any work
    checkpoint = _dense_checkpoint(resolve_checkpoint(args.model))
    t0 = time.perf_counter()
    plan = baselines.method_plan(args.method, checkpoint, args.bits, progress=_progress(args))
    rec = {"method": args.method, "bits": args.bits, **plan_record(plan), "plan_origin": plan.origin,
           "seconds": time.perf_counter() - t0, "checkpoint": str(checkpoint)}  # fmt: skip
    extra = [f"\nplan {plan.origin} in {rec['seconds']:.1f} s"]
    if out is not None:
        try:
            plan.save(out)
        except Exception as e:  # safetensors' own error type for a failed write (a full disk, say)
            raise ValueError(f"cannot write the plan to {out}: {e}") from None
        rec["plan_path"] = str(out)
        rec["plan_file_bytes"] = out.stat().st_size
        # The quantizer refuses a plan made for other settings than its config's: name those that are not defaults.
        default = PlanSettings(bits=args.bits).recorded_fields()
        kw = "".join(f"{k}={v!r}, " for k, v in plan.settings.items()
                     if k in ("precisions", *FIT_SETTINGS) and default[k] != v)  # fmt: skip
        extra.append(f"saved {out} ({_mib(out.stat().st_size)}); use it with LowRAConfig(bits={args.bits:g}, "
                     f"{kw}plan_path='{out}')")  # fmt: skip
    _emit(args, rec, _plan_text(rec, extra))
    return 0


def _plan_output(args) -> Path | None:
    """Where `plan -o` writes, checked before planning: a directory (or a path without a suffix) gets
    lowra-plan-<method>-<bits>.safetensors in it. An existing plan file there is replaced (re-planning), any other
    existing file is refused."""
    if not args.output:
        return None
    out = Path(args.output)
    if out.is_dir() or (not out.suffix and not out.exists()):
        out = out / f"lowra-plan-{args.method}-{args.bits:g}.safetensors"
    elif not out.suffix:
        raise ValueError(f"{out} is a file: -o takes a directory or a .safetensors path")
    if out.exists() and not _is_plan_file(out):
        raise ValueError(f"{out} exists and is not a LowRA plan: pick another path (only a plan file is replaced)")
    _writable_dir(out.parent)
    return out


def _is_plan_file(path: Path) -> bool:
    from safetensors import safe_open

    from .plan import PLAN_FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == PLAN_FORMAT
    except Exception:  # not a safetensors file at all
        return False


def _writable_dir(d: Path) -> None:
    """Creates d (and its parents) and checks a file can be written there: before any work, not after it."""
    import tempfile

    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {d}: {e.strerror or e}") from None


def _fresh_output(args) -> Path:
    """args.output as a directory, created now: refused if it is a file, if it holds files and --overwrite was not
    given, or if it cannot be written (all before any work)."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: -o takes a directory")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} exists and is not an empty directory (pass --overwrite to write into it)")
    _writable_dir(out)
    return out


def _cmd_quantize(args) -> int:
    from .finetune import load_quantized
    from .sweep import model_memory_bytes, plan_record, resolve_checkpoint

    _check_method_bits(args)
    out = _fresh_output(args)  # before the model is resolved (which may convert the packaged GGUF)
    checkpoint = _dense_checkpoint(resolve_checkpoint(args.model), out)
    t0 = time.perf_counter()
    plan = baselines.method_plan(args.method, checkpoint, args.bits, progress=_progress(args))
    t_plan = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "lowra-plan.safetensors"
    _log(args, f"plan ({plan.origin}) in {t_plan:.1f} s; quantizing ...")
    t0 = time.perf_counter()
    model, tok = load_quantized(checkpoint, plan, plan_path=plan_path)
    t_quant = time.perf_counter() - t0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    from .convert import model_bits_report

    stored = model_bits_report(model)
    rec = {
        "method": args.method, "bits": args.bits, **plan_record(plan), "plan_origin": plan.origin,
        "output": str(out), "disk_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "memory_bytes": model_memory_bytes(model), "stored_nominal_bits": stored["nominal_bits"],
        "stored_effective_bits": stored["effective_bits"], "seconds": {"plan": t_plan, "quantize": t_quant},
        "checkpoint": str(checkpoint),
    }  # fmt: skip
    extra = [
        "",
        f"size on disk   {_mib(rec['disk_bytes'])} ({out})",
        f"size in memory {_mib(rec['memory_bytes'])} (quantized layers packed; embeddings, norms in fp32)",
        f"stored layers  {stored['nominal_bits']:.4f} nominal / "
        f"{stored['effective_bits']:.4f} effective bits (measured on the saved layers; the lines above are the "
        "plan's estimate)",
        f"plan {t_plan:.1f} s, quantize {t_quant:.1f} s",
        f"load it with AutoModelForCausalLM.from_pretrained('{out}') after `import bitsandbytes_lowra`",
    ]
    _emit(args, rec, _plan_text(rec, extra))
    return 0


# ------------------------------------------------------------------------------------------------------ eval


def _load_for_eval(args):
    """(model, tokenizer, description) for `lowra eval`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.transformers import QUANT_METHOD
    from .sweep import resolve_checkpoint

    path = resolve_checkpoint(args.model)
    if _quant_method(path) == QUANT_METHOD:
        if args.bits is not None:
            raise ValueError(f"{path} is already LowRA-quantized; drop --bits")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu"
                                                     if not torch.cuda.is_available() else None)  # fmt: skip
        desc = {"kind": "lowra-checkpoint"}
    elif args.bits is not None:
        from .finetune import load_quantized

        plan = baselines.method_plan(args.method, path, args.bits, progress=_progress(args))
        model, _ = load_quantized(path, plan)
        desc = {"kind": "quantized-on-load", "method": args.method, "bits": args.bits,
                "nominal_bits": plan.nominal_bits(), "effective_bits": plan.effective_bits()}  # fmt: skip
    else:
        _refuse_lowra_state_without_config(Path(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        desc = {"kind": "dense", "dtype": "float32"}
    if args.adapter:
        from peft import PeftModel

        desc["adapter"] = str(args.adapter)
        desc["adapter_base_matches"] = _adapter_fits(model, Path(args.adapter), args)
        model = PeftModel.from_pretrained(model, args.adapter)
    return model.eval(), AutoTokenizer.from_pretrained(path), {"model": str(path), **desc}


def _check_adapter_dir(adapter) -> None:
    """--adapter must be a local peft adapter directory, checked before the model loads: given anything else, peft
    takes it for a Hub repository id and tries the network (retrying for ~25 s), which we never use."""
    if adapter is None:
        return
    d = Path(adapter)
    if (d / "adapter_config.json").is_file():
        return
    if (d / "adapter" / "adapter_config.json").is_file():  # a `lowra finetune` output directory
        raise ValueError(f"{d} is a finetune run; its adapter is {d / 'adapter'}: pass --adapter {d / 'adapter'}")
    what = "does not exist" if not d.exists() else "is a file" if not d.is_dir() else "holds no adapter_config.json"
    raise ValueError(f"--adapter {d} {what}: pass a peft adapter directory (e.g. OUT/adapter of `lowra finetune`)")


def _adapter_fits(base, adapter: Path, args) -> bool | None:
    """Whether `base` is the quantized base the adapter was trained on (its metrics.json from `lowra finetune`
    records a fingerprint; None when it records none). A mismatch is reported, not refused: the numbers are then
    those of the wrong pairing, which a user may want to see, but must not mistake for the adapter's."""
    from .finetune import base_fingerprint

    meta = adapter / "metrics.json"
    recorded = json.loads(meta.read_text()).get("base_fingerprint") if meta.is_file() else None
    if recorded is None:
        return None
    here = base_fingerprint(base)
    if here == recorded:
        return True
    print(f"lowra {args.command}: warning: {adapter} was trained on another quantized base than this one (base "
          f"fingerprint {recorded} recorded, {here} here); a LoftQ-initialized adapter only fits the base saved "
          "with it (`lowra finetune` writes OUT/base)", file=sys.stderr)
    return False


def _quant_method(checkpoint) -> str | None:
    """quantization_config.quant_method of a checkpoint's config.json; None for a dense checkpoint."""
    try:
        qc = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):  # unreadable: transformers reports it when it loads
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def _dense_checkpoint(checkpoint: Path, out: Path | None = None) -> Path:
    """plan, quantize and finetune start from a dense checkpoint: a quantized one holds codes where they look for
    weights (they said "must be 2-D [out_features, in_features]"). `out`, the command's output directory, must not be
    the checkpoint: --overwrite would write over the model being read."""
    if out is not None and Path(checkpoint).resolve() == out.resolve():
        raise ValueError(f"-o {out} is the input checkpoint: its files would be overwritten; pass another directory")
    method = _quant_method(checkpoint)
    if method is not None:
        raise ValueError(f"{checkpoint} is already quantized ({method}): plan, quantize and finetune take the dense "
                         "checkpoint it was made from")
    _refuse_lowra_state_without_config(Path(checkpoint))
    return checkpoint


def _refuse_lowra_state_without_config(path: Path) -> None:
    """A LowRA checkpoint whose config.json lost its quantization_config would load as a dense model and fail on
    every layer's shape in transformers' words: say what is wrong instead."""
    from .functional import BLOB_KEY
    from .plan import checkpoint_keys

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if any(k.endswith(f".weight.{BLOB_KEY}") for k in checkpoint_keys(files)):
        raise ValueError(f"{path} holds LowRA-quantized layers but its config.json has no LowRA quantization_config "
                         "(it was removed or overwritten): restore it from the saved model")  # fmt: skip


def _ppl_words(p: dict) -> str:
    """A perplexity result in one line: ppl, text only, the tokens, the mean NLL's standard error, and what a
    truncated evaluation left out of the eval split."""
    from .eval.perplexity import truncation_note

    line = f"perplexity {p['ppl']:.3f}" + (f" (text only {p['ppl_text']:.3f})" if p.get("ppl_text") else "")
    line += (f" on {p['tokens']:,} held-out Wikipedia tokens ({p['windows']} windows of {p['context']}, "
             f"{p['seconds']:.0f} s)")
    if p.get("nll_se") is not None:
        line += f"; mean NLL {p['nll']:.4f} +- {p['nll_se']:.4f} (standard error, {p['clusters']} {p['se_clusters']}s)"
    note = truncation_note(p)
    return line + (f"; {note} of the eval split (--eval-tokens 0: all)" if note else "")


def _eval_slices(args, model, tok) -> tuple[dict, list[str]]:
    """`lowra eval --slices N`: perplexity on N disjoint slices spread over the eval split (eval_slices), each
    --eval-tokens long; per slice and pooled (total NLL over total tokens)."""
    from .eval.perplexity import eval_slices, perplexity
    from .sweep import _fmt, format_table

    slices = eval_slices(tok, args.slices, args.eval_tokens or None)
    out = []
    for s in slices:
        r = perplexity(model, s.pop("tokens"), context=args.context, max_tokens=None, batch_size=args.eval_batch_size,
                       progress=False, separator=tok.eos_token_id)  # fmt: skip
        out.append({**s, **r})
        _log(args, f"slice {s['index'] + 1}/{len(slices)} ({s['lead']!r}...): {_ppl_words(r)}")
    pooled = {"slices": len(out), "tokens": sum(r["tokens"] for r in out),
              "tokens_text": sum(r["tokens_text"] for r in out), "seconds": sum(r["seconds"] for r in out)}  # fmt: skip
    pooled["ppl"] = math.exp(sum(r["total_nll"] for r in out) / pooled["tokens"])
    pooled["ppl_text"] = math.exp(sum(r["total_nll_text"] for r in out) / pooled["tokens_text"])
    rows = [[s["index"], s["lead"], f"{s['input_tokens']:,}", _fmt(s["ppl"], 3), _fmt(s["ppl_text"], 3),
             _fmt(s["nll_se"], 4)] for s in out]  # fmt: skip
    lines = [format_table(["slice", "first lead", "tokens", "ppl", "ppl text", "NLL SE"], rows, markdown=False),
             f"pooled over {len(out)} slices ({pooled['tokens']:,} scored tokens): perplexity {pooled['ppl']:.3f}, "
             f"text only {pooled['ppl_text']:.3f}"]  # fmt: skip
    return {"slices": out, "pooled": pooled}, lines


def _cmd_eval(args) -> int:
    from .eval.perplexity import perplexity

    if args.method is not None and args.bits is None:  # it would evaluate the dense model, quietly
        raise ValueError(f"--method {args.method} needs --bits: it picks how a dense checkpoint is quantized on load")
    args.method = args.method or "lowra"
    _check_method_bits(args)  # the other flags' ranges are checked by the parser (_count and friends)
    _check_adapter_dir(args.adapter)
    model, tok, desc = _load_for_eval(args)
    result = {**desc}
    lines = [f"model {desc['model']} ({desc['kind']}" + (f", {desc['method']} {desc['bits']:g} bits" if "bits" in desc
                                                          else "") + ")"]  # fmt: skip
    if args.slices:
        result["slices"], more = _eval_slices(args, model, tok)
        lines += more
    else:
        result["perplexity"] = perplexity(model, tok, context=args.context, max_tokens=args.eval_tokens or None,
                                          batch_size=args.eval_batch_size, progress=_progress(args))  # fmt: skip
        lines.append(_ppl_words(result["perplexity"]))
    if args.rouge:
        from .eval.rouge import rouge_eval

        r = rouge_eval(model, tok, n_examples=args.rouge, max_new_tokens=args.max_new_tokens, progress=_progress(args))
        result["rouge"] = r  # with each paper's prediction, reference and scores: the spot check can be audited
        lines.append(f"ACLSum ROUGE-1/2/L {100 * r['rouge1']:.2f} / {100 * r['rouge2']:.2f} / {100 * r['rougeL']:.2f} "
                     f"on {r['n_examples']} test papers")  # fmt: skip
    _emit(args, result, "\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------------------ finetune


def _cmd_finetune(args) -> int:
    import torch

    from .eval.perplexity import perplexity
    from .finetune import (FinetuneArgs, add_lora, base_fingerprint, check_fsdp_offload, distributed, end_distributed,
                           load_quantized, main_process_first, train, train_blocks, write_outputs)  # fmt: skip
    from .sweep import plan_record, record_stage, resolve_checkpoint, versions

    check_fsdp_offload()
    dist = distributed()  # under `accelerate launch`: DDP or FSDP, run by Trainer
    m = baselines.get_method(args.method)
    init = args.init or m.init
    dtype = getattr(torch, args.dtype)
    quant_storage = args.quant_storage
    if quant_storage == "auto":  # FSDP shards the codes with the float parameters: same dtype (docs/distributed.md)
        quant_storage = args.dtype if dist["fsdp"] else "uint8"
    if dist["fsdp"] and init == "loftq":
        raise ValueError(
            "LoftQ init re-quantizes the base, which FSDP runs cannot save from shards: initialize single-process "
            "(lowra finetune --steps 0 --init loftq), or fine-tune under FSDP with --init zero"
        )
    _check_method_bits(args)
    fa = FinetuneArgs(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, scheduler=args.scheduler, optim=args.optim,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, dataset=args.dataset,
        logging_steps=args.logging_steps, allow_repeat=args.allow_repeat,
    )  # fmt: skip
    fa.resolved_optim()  # refuses a bitsandbytes optimizer under FSDP2
    out = _fresh_output(args)
    # arguments are checked above, before the model is resolved (which may convert the packaged GGUF)
    checkpoint = _dense_checkpoint(resolve_checkpoint(args.model), out)
    blocks = None
    if fa.steps:  # the data before the planning: too little of it for --steps is refused without --allow-repeat
        from transformers import AutoTokenizer

        blocks = train_blocks(AutoTokenizer.from_pretrained(checkpoint), fa, dist["num_processes"])
        if dist["is_main"]:
            _log(args, _data_summary(blocks.info, fa.seq_len))
    with main_process_first():  # rank 0 plans and fills the plan cache, the others read it
        plan = baselines.method_plan(args.method, checkpoint, args.bits, progress=_progress(args) and dist["is_main"])
    model, tok = load_quantized(checkpoint, plan, dtype=dtype, quant_storage=getattr(torch, quant_storage))
    metrics = {"method": args.method, "bits": args.bits, "init": init, **plan_record(plan), "args": fa.to_dict(),
               "checkpoint": str(checkpoint), "command": " ".join(["lowra", *sys.argv[1:]]), "versions": versions(),
               "dtype": args.dtype, "quant_storage": quant_storage,
               "distributed": {k: dist[k] for k in ("num_processes", "fsdp", "fsdp_version")}}  # fmt: skip
    pm, report = add_lora(model, checkpoint, init, fa, loftq_iterations=args.loftq_iterations)
    metrics["init_report"] = report
    if not dist["fsdp"]:  # which base the adapter fits (LoftQ re-quantized it); `lowra eval --adapter` checks it
        metrics["base_fingerprint"] = base_fingerprint(pm)

    def ppl(tag):
        if args.eval_tokens and dist["num_processes"] == 1:
            r = perplexity(pm, tok, context=512, max_tokens=args.eval_tokens, progress=_progress(args))
            record_stage(metrics, tag, r)  # ppl_<tag>, ppl_text_<tag>, evals[tag]: the sweep records' fields
            _log(args, f"{tag}: {_ppl_words(r)}")

    if args.eval_tokens and dist["num_processes"] > 1 and dist["is_main"]:
        _log(args, "--eval-tokens is skipped in multi-process runs: evaluate the saved adapter with `lowra eval`")
    ppl("init")
    if dist["is_main"]:
        _log(args, f"training {fa.steps} steps (batch {fa.batch_size} x {fa.grad_accum} x {fa.seq_len} tokens x "
                   f"{dist['num_processes']} processes, optim {fa.resolved_optim()})"
                   + (f", {blocks.info['epochs']:.2f} epochs ..." if blocks is not None else " ..."))  # fmt: skip
    multi = dist["num_processes"] > 1
    metrics["train"] = train(pm, tok, fa, progress=_progress(args) and dist["is_main"],
                             adapter_dir=out / "adapter" if multi and fa.steps else None, blocks=blocks)  # fmt: skip
    ppl("finetuned")
    if not dist["is_main"]:
        end_distributed()  # waits for rank 0's outputs below
        return 0
    if not multi or not fa.steps:
        write_outputs(pm, out / "adapter", metrics)
    else:
        (out / "adapter" / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    wrote = [f"{out}/adapter (peft adapter)"]
    if dist["fsdp"]:
        # The base is sharded across the ranks; it is the checkpoint quantized with this plan (zero init only).
        plan.save(out / "lowra-plan.safetensors")
        wrote.append(f"{out}/lowra-plan.safetensors (the base: {checkpoint} quantized with this plan)")
        evaluate = f"lowra eval {checkpoint} --bits {args.bits:g} --method {args.method} --adapter {out}/adapter"
    else:
        # LoftQ re-quantized the base to its residual: the adapter only makes sense on that base, so it is saved too.
        base = pm.unload()
        base.save_pretrained(out / "base")
        tok.save_pretrained(out / "base")
        wrote.append(f"{out}/base (LowRA base it was trained on)")
        evaluate = f"lowra eval {out}/base --adapter {out}/adapter"
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    text = [f"{args.method} {args.bits:g} bits, {init} init: {metrics['train']['steps']} steps"
            + (f" ({metrics['train']['epochs']:.2f} epochs of {args.dataset})" if fa.steps else "")
            + f", train loss {metrics['train']['train_loss']}"]  # fmt: skip
    for tag, stage in (("init", "LoRA initialization"), ("finetuned", "fine-tuning")):
        if f"ppl_{tag}" in metrics:
            text.append(f"perplexity after {stage}: {metrics[f'ppl_{tag}']:.3f}")
    text.append("wrote " + ", ".join(wrote) + f", {out}/metrics.json")
    text.append(f"evaluate: {evaluate}")
    _emit(args, metrics, "\n".join(text))
    end_distributed()
    return 0


def _data_summary(info: dict, seq_len: int) -> str:
    """One line on the training data train_blocks built: sequences, and for aclsum what did not fit."""
    line = f"{info['dataset']}: {info['sequences']} training sequences of {seq_len} tokens"
    if info["dataset"] == "aclsum":
        line += (f" (one per train paper; loss on the summary only): {info['truncated']} of {info['papers']} "
                 f"abstracts cut to fit ({info['abstract_tokens_dropped']:,} tokens dropped), {info['skipped']} papers "
                 "skipped (no room for any abstract beside the summary)")  # fmt: skip
    return line + f"; the steps take {info['epochs']:.2f} epochs"


# ------------------------------------------------------------------------------------------------------ sweep / demo


def _sweep_steps(args) -> int:
    """sweep's fine-tuning steps: 0 under --no-finetune / --no-init, which refuse an explicit --steps (it would be
    recorded as 0 silently), else --steps or SWEEP_STEPS."""
    if args.steps is not None and (args.no_finetune or args.no_init):
        flag = "--no-init" if args.no_init else "--no-finetune"
        raise ValueError(f"--steps {args.steps} with {flag}: {flag} trains nothing, drop one of them")
    return 0 if (args.no_finetune or args.no_init) else SWEEP_STEPS if args.steps is None else args.steps


def _protocol(args, finetune_steps: int):
    from .sweep import Protocol

    ft = {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lr": args.lr, "batch_size": args.batch_size,
          "seq_len": args.seq_len, "grad_accum": 1,
          "gradient_checkpointing": getattr(args, "gradient_checkpointing", True)}  # fmt: skip
    if getattr(args, "allow_repeat", False):  # only when given: records made before the flag keep their protocol key
        ft["allow_repeat"] = True
    return Protocol(model=args.model, eval_tokens=args.eval_tokens, context=args.context,
                    eval_batch_size=args.eval_batch_size, finetune_steps=finetune_steps, finetune=ft,
                    seed=args.seed)  # fmt: skip


def _report(args, records, output_json, plot_path, stages) -> str:
    from .sweep import dense_summary, eval_note, plot, results_table, stage_tables

    text = [line for line in (dense_summary(records, markdown=False), eval_note(records)) if line]
    for key, title in stage_tables(records, stages):  # the text-only tables after the others
        text += ["", f"{title} (cell: perplexity (nominal bits))", results_table(records, key, markdown=False)]
    if plot_path:
        stage = next((s for s in reversed(stages) if any(r.get(s) is not None for r in records)), "ppl_quantized")
        plot(records, plot_path, stage=stage)
        text.append(f"\nplot: {plot_path}")
    if output_json:
        text.append(f"records: {output_json}")
    return "\n".join(text)


def _not_a_directory(*paths) -> None:
    for path in paths:
        if path and Path(path).is_dir():
            raise ValueError(f"{path} is a directory: pass a file path")


def _cmd_sweep(args) -> int:
    from .sweep import load_results, run_sweep

    if args.plot is None:
        args.plot = str(Path(args.output).with_suffix(".png"))
    _not_a_directory(args.output, args.plot, args.markdown)
    if not (args.resume or args.overwrite) and load_results(args.output)["records"]:
        raise ValueError(f"{args.output} already holds sweep records: pass --resume to continue it or --overwrite "
                         "to replace it")
    steps = _sweep_steps(args)
    protocol = _protocol(args, steps)
    protocol.with_init = not args.no_init
    t0 = time.perf_counter()
    records = run_sweep(args.methods, args.bits, protocol, output=args.output, resume=args.resume,
                        include_dense=not args.no_dense, progress=_progress(args),
                        command=" ".join(["lowra", *sys.argv[1:]]), log=lambda s: _log(args, s))  # fmt: skip
    stages = ["ppl_quantized"] + ([] if args.no_init else ["ppl_init"]) + (["ppl_finetuned"] if steps else [])
    text = _report(args, records, args.output, args.plot, stages)
    if args.markdown:
        from .sweep import markdown_report

        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(args.plot, md.parent) if args.plot else None
        md.write_text(markdown_report(records, rel) + "\n")
        text += f"\nmarkdown tables: {md}"
    _emit(args, {"records": records, "seconds": time.perf_counter() - t0}, text)
    return 0


def _cmd_demo(args) -> int:
    from .sweep import DEMO_BITS, DEMO_METHODS, run_sweep

    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: pass a directory for the demo's outputs")
    protocol = _protocol(args, 0)
    protocol.with_init = False
    t0 = time.perf_counter()
    _log(args, f"lowra demo: {', '.join(DEMO_METHODS)} at {', '.join(f'{b:g}' for b in DEMO_BITS)} bits on "
               f"{args.model}, perplexity on {args.eval_tokens:,} held-out Wikipedia tokens")  # fmt: skip
    records = run_sweep(DEMO_METHODS, DEMO_BITS, protocol, output=out / "demo.json", resume=False,
                        progress=_progress(args), command=" ".join(["lowra", *sys.argv[1:]]),
                        log=lambda s: _log(args, s))  # fmt: skip
    wall = time.perf_counter() - t0
    text = _report(args, records, out / "demo.json", out / "demo.png", ["ppl_quantized"])
    # The table alone reads as "nothing works below 4 bits": say what it measures and where the rest of the story is.
    text += ("\nThese perplexities are of the quantized weights alone, before any LoRA: below 4 bits a 135M-parameter "
             "model degrades sharply under every method.\n`lowra sweep` adds LoftQ initialization and LoRA "
             "fine-tuning for every method (about 2.3 h on 2 CPU cores); docs/results.md records its tables.")
    text += f"\ndemo wall time {wall / 60:.1f} min"
    _emit(args, {"records": records, "wall_seconds": wall, "plot": str(out / "demo.png")}, text)
    return 0


def _cmd_report(args) -> int:
    from .sweep import _save, markdown_report, merge_results, plot

    _not_a_directory(args.output, args.markdown)
    doc = merge_results(args.inputs)
    records = doc["records"]
    if args.output:
        _save(args.output, doc)
    stages = [s for s in ("ppl_quantized", "ppl_init", "ppl_finetuned") if any(r.get(s) is not None for r in records)]
    text = _report(args, records, args.output, None, stages)
    if args.plot:
        pattern = args.plot
        if len(stages) > 1 and "{stage}" not in pattern:  # one file per stage, not each stage over the last
            p = Path(pattern)
            pattern = str(p.with_name(f"{p.stem}-{{stage}}{p.suffix}"))
        for stage in stages:
            path = Path(pattern.replace("{stage}", stage.removeprefix("ppl_")))
            plot(records, path, stage=stage)
            text += f"\nplot: {path}"
    if args.markdown:
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown_report(records) + "\n")
        text += f"\nmarkdown tables: {md}"
    _emit(args, doc, text)
    return 0


# ------------------------------------------------------------------------------------------------------ memory


def _cmd_memory(args) -> int:
    from .eval.memory import format_table, memory_breakdown

    breakdowns = [
        memory_breakdown(args.config, b, args.lora_r, batch_size=args.batch_size, seq_len=args.seq_len,
                         double_quant=not args.no_double_quant,
                         gradient_checkpointing=not args.no_gradient_checkpointing,
                         shared_codebooks=args.shared_codebooks)  # fmt: skip
        for b in args.bits
    ]
    _emit(args, {"breakdowns": breakdowns}, format_table(breakdowns, title=breakdowns[0]["model"]))
    return 0


# ------------------------------------------------------------------------------------------------------ parser


def _bits(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be a number, got {s!r}") from None
    if not math.isfinite(v) or not 1.0 <= v <= 4.0:
        raise argparse.ArgumentTypeError(f"bits must be in [1, 4], got {s}")
    return v


def _count(minimum: int, zero_too: bool = False, maximum: int | None = None):
    """argparse type: an integer >= minimum (or 0, with zero_too), <= maximum when given."""
    if maximum is not None:
        allowed = f"an integer in [{minimum}, {maximum}]"
    else:
        allowed = f"0 or an integer >= {minimum}" if zero_too else f"an integer >= {minimum}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {s!r}") from None
        if (v < minimum and not (zero_too and v == 0)) or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {v}")
        return v

    parse.range = (allowed, allowed)
    return parse


def _number(s: str, allowed: str, ok) -> float:
    """A finite float for which ok(v) holds, else an argparse error that states `allowed`."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {s!r}") from None
    if not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {s}")
    return v


def _fraction(s: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _number(s, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _positive(s: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(s, "a number > 0", lambda v: v > 0)


def _non_negative(s: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(s, "a number >= 0", lambda v: v >= 0)


_fraction.range = ("[0, 1)", "in [0, 1)")
_positive.range = ("> 0", "> 0")
_non_negative.range = (">= 0", ">= 0")


def _state_ranges(parser: argparse.ArgumentParser) -> None:
    """Every flag's help states the range its type enforces, unless the help already does: `.range` on a type is
    (what a help that states it contains, the words to add)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _state_ranges(sub)
            continue
        marker, words = getattr(action.type, "range", (None, None))
        if marker is None or action.help is None or marker in action.help:
            continue
        i = action.help.find(" (default")
        action.help = f"{action.help}, {words}" if i < 0 else f"{action.help[:i]}, {words}{action.help[i:]}"


def _optim(s: str) -> str:
    from .finetune import optimizer_names

    if s not in optimizer_names():
        raise argparse.ArgumentTypeError(f"unknown optimizer {s!r}; transformers' optim names are "
                                         f"{', '.join(optimizer_names())}")  # fmt: skip
    return s


def _method(s: str) -> str:
    if s not in baselines.METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {s!r}; choose from {', '.join(baselines.METHODS)}")
    return s


def _add_lora_flags(p, steps_default: int, seq_len_default: int = 256) -> None:
    p.add_argument("--lora-r", type=_count(1), default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=_count(1), default=16, help="LoRA alpha (default 16: scaling 1, as the paper)")
    p.add_argument("--lr", type=_positive, default=3e-4, help="learning rate (default 3e-4, the paper's)")
    p.add_argument("--batch-size", type=_count(1), default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=_count(2), default=seq_len_default,
                   help=f"tokens per training sequence (default {seq_len_default})")
    p.add_argument("--steps", type=_count(0), default=steps_default, help=f"optimizer steps (default {steps_default})")
    p.add_argument("--seed", type=_count(0, maximum=2**32 - 1), default=0,
                   help="seed of LoRA init, data order and dropout (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from .sweep import DEFAULT_BITS, DEFAULT_EVAL_TOKENS, DEFAULT_MODEL, DEMO_EVAL_TOKENS

    from . import __version__
    from .finetune import SCHEDULERS

    parser = argparse.ArgumentParser(prog="lowra", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the bitsandbytes_lowra version and exit")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="LowRA vs QLoRA at 4/2.5/2/1.75 bits on SmolLM2-135M: table + plot",
                          description="Quantize the embedded default model (SmolLM2-135M) at 4, 2.5, 2 and 1.75 bits "
                          "with LowRA and with the QLoRA baseline (NormalFloat, LoftQ's layer-wise 2/4-bit mix below 4 "
                          "bits; it cannot go below 2), evaluate perplexity on held-out Wikipedia leads, print the "
                          "table and write the plot.")  # fmt: skip
    demo.add_argument("--model", default=DEFAULT_MODEL, help=argparse.SUPPRESS)
    demo.add_argument("-o", "--output-dir", default="lowra-demo",
                      help="where demo.json and demo.png go (default ./lowra-demo)")
    _add_eval_flags(demo, DEMO_EVAL_TOKENS)
    _add_common(demo)
    demo.set_defaults(func=_cmd_demo, lora_r=16, lora_alpha=16, lr=3e-4, batch_size=4, seq_len=256, seed=0)

    for name, helptext in (("plan", "plan a checkpoint for a bit budget (cached) and print the precision mix"),
                           ("quantize", "plan, quantize and save a LowRA checkpoint")):  # fmt: skip
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("model", help=f"checkpoint directory or {DEFAULT_MODEL!r}")
        p.add_argument("--bits", type=_bits, required=True, help=f"average bits per quantized parameter, {BITS_RANGE}")
        p.add_argument("--method", type=_method, default="lowra", help=METHOD_HELP + " (default lowra)")
        if name == "plan":
            p.add_argument("-o", "--output", help="save the plan (a .safetensors file, or a directory)")
            p.set_defaults(func=_cmd_plan)
        else:
            p.add_argument("-o", "--output", required=True, help="output directory (a transformers checkpoint)")
            p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
            p.set_defaults(func=_cmd_quantize)
        _add_common(p)

    ev = sub.add_parser("eval", help="perplexity on held-out Wikipedia leads (+ optional ACLSum ROUGE)",
                        description="Evaluate a dense checkpoint, a dense checkpoint quantized on load (--bits), or a "
                        "saved LowRA checkpoint, optionally with a LoRA adapter.")  # fmt: skip
    ev.add_argument("model", help=f"checkpoint directory (dense or LowRA) or {DEFAULT_MODEL!r}")
    ev.add_argument("--bits", type=_bits, default=None,
                    help=f"quantize a dense checkpoint on load at these bits, {BITS_RANGE}")
    ev.add_argument("--method", type=_method, default=None, help=METHOD_HELP + " (with --bits; default lowra)")
    ev.add_argument("--adapter", default=None, help="a peft LoRA adapter directory to apply")
    ev.add_argument("--rouge", type=_count(0), default=0, metavar="N",
                    help="also ROUGE on the first N ACLSum test papers (default 0: no ROUGE)")
    ev.add_argument("--max-new-tokens", type=_count(1), default=128, help="summary length for --rouge (default 128)")
    ev.add_argument("--slices", type=_count(0), default=0, metavar="N",
                    help="perplexity on N disjoint slices spread over the whole eval split, each starting at a lead "
                    "and --eval-tokens long (0: the rest up to the next slice), instead of its first --eval-tokens "
                    "(default 0: no slices)")  # fmt: skip
    _add_eval_flags(ev, 32768)
    _add_common(ev)
    ev.set_defaults(func=_cmd_eval)

    ft = sub.add_parser("finetune", help="QLoRA-style LoRA fine-tuning (transformers Trainer + peft)",
                        description="LoRA fine-tuning on a quantized base; the only difference from a QLoRA run is the "
                        "quantization config. Writes OUT/adapter, OUT/base and OUT/metrics.json.")  # fmt: skip
    ft.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or {DEFAULT_MODEL!r} (default)")
    ft.add_argument("--dataset", default="wiki", choices=["wiki", "aclsum"],
                    help="training data (default wiki): wiki, packed blocks of Wikipedia leads, loss on every token; "
                    "aclsum, one paper per sequence (prompt, summary, EOS, padding), loss on the summary only, an "
                    "abstract longer than fits --seq-len cut, never the summary")  # fmt: skip
    ft.add_argument("--allow-repeat", action="store_true",
                    help="let --steps take more than one pass over the training data (refused otherwise; the epochs "
                    "are logged and recorded in metrics.json either way)")  # fmt: skip
    ft.add_argument("--bits", type=_bits, required=True, help=f"average bits per quantized parameter, {BITS_RANGE}")
    ft.add_argument("--method", type=_method, default="lowra", help=METHOD_HELP + " (default lowra)")
    ft.add_argument("--init", choices=["zero", "loftq"], default=None, help="LoRA init (default: the method's)")
    ft.add_argument("--loftq-iterations", type=_count(1), default=baselines.LOFTQ_ITERATIONS,
                    help=f"LoftQ alternating steps with --init loftq (default {baselines.LOFTQ_ITERATIONS})")
    _add_lora_flags(ft, 40)
    ft.add_argument("--grad-accum", type=_count(1), default=1, help="gradient accumulation steps (default 1)")
    ft.add_argument("--lora-dropout", type=_fraction, default=0.0, help="LoRA dropout (default 0)")
    ft.add_argument("--warmup-ratio", type=_fraction, default=0.03,
                    help="learning-rate warmup as a fraction of --steps (default 0.03)")
    ft.add_argument("--weight-decay", type=_non_negative, default=0.1, help="AdamW weight decay (default 0.1)")
    ft.add_argument("--max-grad-norm", type=_non_negative, default=0.3,
                    help="gradient clipping norm (default 0.3; 0: no clipping)")
    ft.add_argument("--scheduler", default="cosine", choices=SCHEDULERS, metavar="SCHEDULER",
                    help="learning-rate schedule: " + ", ".join(SCHEDULERS) + " (default cosine)")
    ft.add_argument("--optim", type=_optim, default=None, help="transformers optim name (default paged_adamw_32bit on "
                    "CUDA, adamw_torch on CPU and under FSDP2)")  # fmt: skip
    ft.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute activations in backward to save memory (default on; --no-gradient-checkpointing "
                    "turns it off)")  # fmt: skip
    ft.add_argument("--logging-steps", type=_count(1), default=5,
                    help="log the training loss every N optimizer steps (default 5)")
    ft.add_argument("--eval-tokens", type=_count(2, zero_too=True), default=0, help="perplexity before/after on this "
                    "many held-out tokens (default 0: skip; single-process runs only)")  # fmt: skip
    ft.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype the model is loaded in (default float32)")
    ft.add_argument("--quant-storage", choices=["auto", "uint8", "bfloat16", "float16", "float32"], default="auto",
                    help="dtype the packed codes are stored as; auto: --dtype under FSDP (FSDP shards them with the "
                    "float parameters), else uint8 (docs/distributed.md)")  # fmt: skip
    ft.add_argument("-o", "--output", required=True, help="output directory")
    ft.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    _add_common(ft)
    ft.set_defaults(func=_cmd_finetune)

    sw = sub.add_parser("sweep", help="methods x bits -> table, JSON and PNG plot",
                        description="Every supported (method, bits) through one pipeline: perplexity after "
                        "quantization, after LoRA initialization and (unless --no-finetune) after fine-tuning.")
    sw.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint directory or {DEFAULT_MODEL!r} (default)")
    sw.add_argument("--methods", nargs="+", type=_method, default=list(baselines.METHODS), help=METHOD_HELP)
    sw.add_argument("--bits", nargs="+", type=_bits, default=list(DEFAULT_BITS),
                    help=f"bit budgets, each {BITS_RANGE} (default " + " ".join(f"{b:g}" for b in DEFAULT_BITS) + ")")
    sw.add_argument("--no-finetune", action="store_true", help="quantization + LoRA initialization only")
    sw.add_argument("--no-init", action="store_true", help="quantization only (implies --no-finetune; the fastest)")
    _add_lora_flags(sw, SWEEP_STEPS, seq_len_default=128)
    sw.set_defaults(steps=None)  # None: not given (refused beside --no-finetune / --no-init), else SWEEP_STEPS
    sw.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                    help="recompute activations in backward (default off: SmolLM2 fits without it)")
    sw.add_argument("--allow-repeat", action="store_true",
                    help="let --steps take more than one pass over the training data (refused otherwise, before any "
                    "quantization)")  # fmt: skip
    _add_eval_flags(sw, DEFAULT_EVAL_TOKENS)
    sw.add_argument("-o", "--output", default="lowra-sweep.json", help="records JSON (default lowra-sweep.json)")
    sw.add_argument("--plot", default=None,
                    help="PNG plot path (default: --output's path with .png, so two sweeps never share a plot)")
    sw.add_argument("--markdown", default=None, help="also write the tables as markdown to this file")
    keep = sw.add_mutually_exclusive_group()
    keep.add_argument("--resume", action="store_true", help="keep records of the same protocol already in --output")
    keep.add_argument("--overwrite", action="store_true", help="replace the records already in --output")
    sw.add_argument("--no-dense", action="store_true", help="skip the fp32 reference")
    _add_common(sw)
    sw.set_defaults(func=_cmd_sweep)

    rp = sub.add_parser("report", help="merge sweep JSON files into one record per (method, bits): tables + plots",
                        description="Merge sweep outputs (the record that went furthest wins: fine-tuned > "
                        "initialized > quantized), write the merged JSON, markdown tables and one plot per stage.")
    rp.add_argument("inputs", nargs="+", help="sweep JSON files")
    rp.add_argument("-o", "--output", default=None, help="merged JSON")
    rp.add_argument("--markdown", default=None, help="markdown tables")
    rp.add_argument("--plot", default=None, help="PNG path; '{stage}' is replaced by quantized / init / finetuned")
    _add_common(rp)
    rp.set_defaults(func=_cmd_report)

    mem = sub.add_parser("memory", help="fine-tuning / inference memory from a config (meta device, no weights)",
                         description="Memory breakdown of LowRA at each --bits and of QLoRA NF4, from a transformers "
                         "config alone (the paper's Appendix C). Shipped configs: llama-2-7b, llama-2-13b, llama-33b, "
                         "llama-65b, smollm2-135m.")  # fmt: skip
    mem.add_argument("config", help="a config.json path, a checkpoint directory, or a shipped config name")
    mem.add_argument("--bits", nargs="+", type=_bits, default=[4.0, 2.0, 1.75, 1.25],
                     help="LowRA budgets, each in [1, 4] (default 4 2 1.75 1.25)")
    mem.add_argument("--lora-r", type=_count(1), default=64, help="LoRA rank (default 64, the paper's)")
    mem.add_argument("--seq-len", type=_count(1), default=512, help="tokens per training sequence (default 512)")
    mem.add_argument("--batch-size", type=_count(1), default=1, help="sequences per step (default 1)")
    mem.add_argument("--no-double-quant", action="store_true",
                     help="block scales (absmax) in float32, not double-quantized (default: double-quantized, as "
                     "QLoRA)")  # fmt: skip
    mem.add_argument("--no-gradient-checkpointing", action="store_true",
                     help="activations without gradient checkpointing: every layer's kept for backward (default: with "
                     "it, one decoder layer's at a time)")  # fmt: skip
    mem.add_argument("--shared-codebooks", action="store_true", help="one codebook per layer and precision")
    _add_common(mem)
    mem.set_defaults(func=_cmd_memory)
    _state_ranges(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # addressed to library code (peft's prepare_model_for_kbit_training asks for it), not to our user
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    try:
        rc = _run_command(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at interpreter exit
        return rc
    except (ValueError, FileNotFoundError) as e:
        from .format import LowRAFormatError

        if isinstance(e, LowRAFormatError) and os.environ.get("LOWRA_DEBUG"):
            raise
        return _error(args, e)
    except BrokenPipeError:  # stdout closed early (`lowra ... --json | head`): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # permission denied, no space left, a file where a directory goes: the user's to fix
        if os.environ.get("LOWRA_DEBUG"):
            raise
        return _error(args, e)
    except RuntimeError as e:  # a checkpoint whose LowRA state transformers could not convert
        from .integrations.transformers import last_load_errors

        errors = last_load_errors()
        if not errors or "conversion" not in str(e) or os.environ.get("LOWRA_DEBUG"):
            raise
        layer, problem = next(iter(errors.items()))
        more = f" (and {len(errors) - 1} more layers)" if len(errors) > 1 else ""
        return _error(args, f"the checkpoint's LowRA state could not be loaded: {layer}: {problem}{more}")
    except Exception as e:
        from safetensors import SafetensorError

        if not isinstance(e, SafetensorError):
            raise
        return _error(args, f"a safetensors file of the checkpoint is unreadable (truncated or corrupt?): {e}")


def _error(args, message) -> int:
    print(f"lowra {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
