"""The evaluation harness: every method x bit width through the same pipeline, one JSON record each.

For each (method, bits) (methods: baselines.py):

1. plan: `baselines.method_plan` (LowRA plans come from make_plan's cache; baselines are built in a second);
2. quantize: load the checkpoint with transformers and `LowRAConfig(plan_path=...)`: real packed LinearLowRA layers,
   the lowra:: kernels in every forward pass, for the baselines as much as for LowRA;
3. "after quantization": perplexity of the quantized base alone (no adapters);
4. "after initialization": with LoRA adapters on every linear layer, initialized by the method (QLoRA: B = 0, so
   this equals step 3 and is not recomputed; LoftQ / LowRA: LoftQ, 5 alternating steps on the real quantizer);
5. "after fine-tuning" (unless steps = 0): finetune.train for the protocol's steps, then perplexity again.

Perplexity: eval.perplexity (held-out Wikipedia leads, fixed split by title hash, non-overlapping windows of
`context` tokens over the first `eval_tokens` tokens of the split). Records are appended to the JSON file as soon as
each finishes, so a long sweep can be stopped and resumed (`resume=True` skips records already there with the same
protocol).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import baselines

DEFAULT_BITS = (4.0, 3.0, 2.5, 2.25, 2.0, 1.9, 1.8, 1.75, 1.5, 1.25)
DEMO_BITS = (4.0, 2.5, 2.0, 1.75)
DEMO_METHODS = ("qlora", "lowra")
DEFAULT_EVAL_TOKENS = 4096  # 8 windows of 512: every method scores the same tokens; see docs/results.md
DEMO_EVAL_TOKENS = 4096
DEFAULT_CONTEXT = 512
DEFAULT_MODEL = "smollm2-135m"


# ------------------------------------------------------------------------------------------------------ helpers


def resolve_checkpoint(model: str | os.PathLike | None) -> Path:
    """A local safetensors checkpoint directory; "smollm2-135m" (the default) is the packaged SmolLM2-135M."""
    if model is None or str(model) in (DEFAULT_MODEL, "default"):
        from . import data

        return data.smollm2_checkpoint()
    path = Path(model)
    if not path.is_dir():
        raise ValueError(
            f"model {str(model)!r} is neither {DEFAULT_MODEL!r} nor a local checkpoint directory (we never download)"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a transformers checkpoint directory")
    return path


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"bitsandbytes_lowra": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)  # fmt: skip
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    out["host"] = {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available(), "platform": platform.platform()}
    return out


def model_memory_bytes(model) -> int:
    """Bytes the model holds: LowRA layers by their packed codes + state, every other parameter / buffer as is."""
    from .nn import LinearLowRA

    total, seen = 0, set()
    for m in model.modules():
        if isinstance(m, LinearLowRA) and getattr(m.weight, "quant_state", None) is not None:
            total += m.weight.quant_state.nbytes
            seen.add(id(m.weight))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def plan_record(plan) -> dict:
    s = plan.summary()
    mix = s["precision_mix"]
    overall: dict[int, float] = {}
    total = plan.num_params()
    for lp in plan.layers.values():
        for b, n in zip(*torch.unique(lp.bits, return_counts=True)):
            overall[int(b)] = overall.get(int(b), 0.0) + int(n) * lp.cols / total
    return {
        "nominal_bits": s["nominal_bits"],
        "effective_bits": s["effective_bits"],
        "precision_mix": {str(b): overall[b] for b in sorted(overall)},
        "precision_mix_by_type": {k: {str(b): f for b, f in v.items()} for k, v in mix.items()},
        "assignment": {k: v for k, v in s["assignment"].items() if k != "seconds"},
        "quantized_parameters": s["parameters"],
    }


# ------------------------------------------------------------------------------------------------------ protocol


@dataclass
class Protocol:
    """Everything a record's numbers depend on besides method and bits (stored in each record)."""

    model: str = DEFAULT_MODEL
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    context: int = DEFAULT_CONTEXT
    eval_batch_size: int = 4
    finetune_steps: int = 0
    loftq_iterations: int = baselines.LOFTQ_ITERATIONS
    with_init: bool = True  # False: no LoRA initialization step (the demo: quantization only)
    svd_niter: int | None = 4  # LoftQ's SVD by torch.svd_lowrank (None: exact; far slower on a CPU)
    finetune: dict = field(default_factory=dict)  # FinetuneArgs fields (lora_r, lr, ...)
    seed: int = 0

    def key(self) -> dict:
        return {
            "model": self.model, "eval_tokens": self.eval_tokens, "context": self.context,
            "finetune_steps": self.finetune_steps, "with_init": self.with_init,
            "loftq_iterations": self.loftq_iterations, "svd_niter": self.svd_niter, "seed": self.seed,
            "finetune": {k: v for k, v in sorted(self.finetune.items()) if k != "logging_steps"},
        }  # fmt: skip

    def finetune_args(self):
        from .finetune import FinetuneArgs

        return FinetuneArgs(**{**self.finetune, "steps": self.finetune_steps, "seed": self.seed})


def _ppl(model, tok, tokens, protocol: Protocol, progress: bool) -> dict:
    """eval.perplexity's result on the first protocol.eval_tokens of `tokens`, the whole eval split (wiki_eval_tokens):
    the record says how much of it that is."""
    from .eval.perplexity import perplexity

    return perplexity(model, tokens, context=protocol.context, max_tokens=protocol.eval_tokens or None,
                      batch_size=protocol.eval_batch_size, progress=progress, separator=tok.eos_token_id)  # fmt: skip


def record_stage(rec: dict, stage: str, r: dict) -> None:
    """A stage's perplexity in the record: ppl_<stage>, ppl_text_<stage> and the whole result under evals[stage]."""
    rec[f"ppl_{stage}"] = r["ppl"]
    rec[f"ppl_text_{stage}"] = r.get("ppl_text")
    rec.setdefault("evals", {})[stage] = r


def _finetune(pm, tok, args, tokens, protocol: Protocol, progress: bool, rec: dict, blocks=None) -> dict:
    """Train the adapters, record the training metrics and the perplexity after it in `rec`; returns stage seconds."""
    from .finetune import train

    metrics = train(pm, tok, args, progress=progress, blocks=blocks)
    rec["finetune"] = {k: v for k, v in metrics.items() if k != "seconds"}
    r = _ppl(pm, tok, tokens, protocol, progress)
    record_stage(rec, "finetuned", r)
    return {"finetune": metrics["seconds"], "eval_finetuned": r["seconds"]}


def run_dense(checkpoint, protocol: Protocol, progress: bool = True, blocks=None) -> dict:
    """The full-precision reference record (float32 weights). With fine-tuning in the protocol, the same LoRA training
    on the unquantized model as well: the ceiling the quantized methods are trained towards (16-bit LoRA).
    blocks: the training sequences (default: finetune.train_blocks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .eval.perplexity import wiki_eval_tokens
    from .finetune import add_lora

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tokens = wiki_eval_tokens(tok)
    ppl = _ppl(model, tok, tokens, protocol, progress)
    rec = {
        "method": "fp32", "label": "full precision (fp32)", "bits": 32.0, "nominal_bits": 32.0, "effective_bits": 32.0,
        "ppl_init": None, "ppl_finetuned": None, "eval": ppl, "memory_bytes": model_memory_bytes(model),
    }  # fmt: skip
    record_stage(rec, "quantized", ppl)
    if protocol.finetune_steps > 0:
        args = protocol.finetune_args()
        pm, _ = add_lora(model, checkpoint, "zero", args, prepare=False)  # nothing quantized: no k-bit preparation
        record_stage(rec, "init", ppl)  # B = 0
        _finetune(pm, tok, args, tokens, protocol, progress, rec, blocks)
        del pm
    rec["seconds"] = time.perf_counter() - t0
    del model
    gc.collect()
    return rec


def run_one(method: str, bits: float, checkpoint, protocol: Protocol, progress: bool = True) -> dict:
    """One record: plan, quantize, evaluate (after quantization / initialization / fine-tuning)."""
    return run_group([method], bits, checkpoint, protocol, progress)[0]


def run_group(methods, bits: float, checkpoint, protocol: Protocol, progress: bool = True,
              on_record=None, blocks=None) -> list[dict]:
    """Records of methods that share one plan (qlora and loftq: the same NormalFloat layer-wise mix). The model is
    quantized and evaluated once; each method then gets its own copy for its LoRA initialization and training.
    on_record(rec) is called as each record is complete (the sweep saves it then, not after the whole group).
    blocks: the training sequences (default: finetune.train_blocks)."""
    import copy

    from .eval.perplexity import wiki_eval_tokens
    from .finetune import add_lora, load_quantized

    ms = [baselines.get_method(name) for name in methods]
    if len({m.quantization for m in ms}) != 1:
        raise ValueError(f"methods {list(methods)} do not share a plan")
    for m in ms:
        baselines.check_bits(m, bits)
    t0 = time.perf_counter()
    plan = baselines.method_plan(ms[0].name, checkpoint, bits, progress=progress)
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tok = load_quantized(checkpoint, plan)
    t_quant = time.perf_counter() - t0
    memory = model_memory_bytes(model)
    tokens = wiki_eval_tokens(tok)
    q = _ppl(model, tok, tokens, protocol, progress)
    base = {"bits": float(bits), **plan_record(plan), "plan_origin": plan.origin, "memory_bytes": memory,
            "eval": {"tokens": q["tokens"], "context": protocol.context}}  # fmt: skip
    records = []
    for i, m in enumerate(ms):
        times = {"plan": t_plan, "quantize": t_quant, "eval_quantized": q["seconds"]}
        rec = {"method": m.name, "label": m.label, "init": m.init, **base, "ppl_init": None, "ppl_finetuned": None}
        record_stage(rec, "quantized", q)
        need_lora = protocol.finetune_steps > 0 or (m.init == "loftq" and protocol.with_init)
        if protocol.with_init and m.init == "zero":
            record_stage(rec, "init", q)  # B = 0: the adapters add exactly nothing
        if need_lora:
            # LoftQ re-quantizes the base in place: later methods of the group start from a pristine copy.
            work = copy.deepcopy(model) if i < len(ms) - 1 else model
            args = protocol.finetune_args()
            t0 = time.perf_counter()
            pm, report = add_lora(work, checkpoint, m.init, args, loftq_iterations=protocol.loftq_iterations,
                                  svd_niter=protocol.svd_niter)
            times["init"] = time.perf_counter() - t0
            rec["init_report"] = report
            if m.init == "zero":
                record_stage(rec, "init", q)  # B = 0: the adapters add exactly nothing
            else:
                r = _ppl(pm, tok, tokens, protocol, progress)
                record_stage(rec, "init", r)
                times["eval_init"] = r["seconds"]
            if protocol.finetune_steps > 0:
                times.update(_finetune(pm, tok, args, tokens, protocol, progress, rec, blocks))
            del pm, work
        rec["seconds"] = times
        records.append(rec)
        if on_record is not None:
            on_record(rec)
    del model
    gc.collect()
    return records


# ------------------------------------------------------------------------------------------------------ sweep


def load_results(path) -> dict:
    """A sweep's JSON ({"records": []} when the file does not exist yet)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a sweep's JSON file")
    if not path.is_file():
        return {"records": []}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a sweep's JSON file ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("records", []), list):
        raise ValueError(f"{path} is not a sweep's JSON file (no list of records)")
    for i, r in enumerate(doc.get("records", [])):
        if not isinstance(r, dict) or not {"method", "bits"} <= r.keys():
            raise ValueError(f"{path}: record {i} is not a sweep record (each has at least 'method' and 'bits')")
    return doc


def _save(path, doc) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def plan_grid(methods, bits_list) -> list[tuple[str, float]]:
    """(method, bits) pairs the methods support, in bits-descending then method order; unsupported are skipped."""
    for m in methods:
        baselines.get_method(m)
    methods = list(dict.fromkeys(methods))  # a method named twice is run once
    out = []
    for b in sorted({float(b) for b in bits_list}, reverse=True):
        for m in methods:
            if baselines.supports(m, b):
                out.append((m, b))
    return out


def run_sweep(
    methods,
    bits_list,
    protocol: Protocol,
    output=None,
    resume: bool = False,
    include_dense: bool = True,
    progress: bool = True,
    command: str | None = None,
    log=print,
) -> list[dict]:
    """Run every supported (method, bits), writing `output` (JSON) after each record; returns the records."""
    if output is not None and Path(output).is_dir():  # found now, not after the first record's hours
        raise ValueError(f"output {output} is a directory: pass a JSON file path")
    grid = plan_grid(methods, bits_list)
    if not grid and not include_dense:  # found now, before the checkpoint is resolved
        raise ValueError(f"nothing to run: no method of {list(methods)} supports the bits {list(bits_list)} (qlora and "
                         "loftq need 2 or more), and the fp32 reference is off")
    checkpoint = resolve_checkpoint(protocol.model)
    doc = load_results(output) if (output and resume) else {"records": []}
    key = protocol.key()
    other = [r for r in doc.get("records", []) if r.get("protocol") != key]
    if other:  # resuming with a changed flag must not drop (or mix in) the records of another protocol
        theirs = other[0].get("protocol") or {}
        diff = sorted(k for k in set(key) | set(theirs) if key.get(k) != theirs.get(k))
        raise ValueError(f"{output} holds {len(other)} record(s) of another protocol (differing in {', '.join(diff)}): "
                         "resume with the same flags, or write to a new -o")
    done = {(r["method"], r["bits"]) for r in doc.get("records", [])}
    blocks = None
    if protocol.finetune_steps > 0:  # the training data now, not after the first (slow) quantization: too little of
        # it for the steps is refused before any work; every training then takes these same blocks
        from transformers import AutoTokenizer

        from .finetune import train_blocks

        blocks = train_blocks(AutoTokenizer.from_pretrained(checkpoint), protocol.finetune_args())
    doc.update(
        {
            "description": "LowRA vs QLoRA / LoftQ on one harness (bitsandbytes_lowra.sweep); see docs/results.md",
            "protocol": key,
            "versions": versions(),
            "command": command or " ".join(["lowra", *sys.argv[1:]]),
        }
    )
    common = {"protocol": key, "seed": protocol.seed, "steps": protocol.finetune_steps,
              "command": doc["command"], "versions": doc["versions"]}  # fmt: skip
    # Methods sharing a plan at a bit width run as one group (quantized and evaluated once).
    groups: list[tuple[float, list[str]]] = [(32.0, ["fp32"])] if include_dense else []
    for method, bits in grid:
        kind = baselines.METHODS[method].quantization
        for b, ms in groups:
            if b == bits and ms[0] != "fp32" and baselines.METHODS[ms[0]].quantization == kind:
                ms.append(method)
                break
        else:
            groups.append((bits, [method]))
    total = sum(len(ms) for _, ms in groups)
    sweep_start = time.perf_counter()
    n = 0
    for bits, ms in groups:
        todo = [m for m in ms if (m, bits) not in done]
        n += len(ms) - len(todo)
        for m in ms:
            if m not in todo:
                log(f"{m} {bits:g} bits: already in {output}, skipped")
        if not todo:
            continue
        t0 = time.perf_counter()

        def keep(rec):  # saved as soon as it is complete: an interrupted group keeps its finished records
            nonlocal n
            rec.update(common)
            rec["group_wall_seconds"] = time.perf_counter() - t0  # from the group's start to this record
            doc["records"].append(rec)
            n += 1
            log(f"[{n}/{total}] {describe(rec)}  ({rec['group_wall_seconds']:.0f} s)")
            doc["sweep_wall_seconds"] = time.perf_counter() - sweep_start
            if output:
                _save(output, doc)

        if todo == ["fp32"]:
            keep(run_dense(checkpoint, protocol, progress, blocks))
        else:
            run_group(todo, bits, checkpoint, protocol, progress, on_record=keep, blocks=blocks)
    return doc["records"]


def describe(rec: dict) -> str:
    parts = [f"{rec['method']:<9} {rec['bits']:>5g} bits (nominal {rec['nominal_bits']:.3f})",
             f"ppl quantized {_fmt(rec.get('ppl_quantized'))}"]  # fmt: skip
    if rec.get("ppl_init") is not None:
        parts.append(f"init {_fmt(rec['ppl_init'])}")
    if rec.get("ppl_finetuned") is not None:
        parts.append(f"fine-tuned {_fmt(rec['ppl_finetuned'])}")
    return ", ".join(parts)


def _fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return f"{x:,.{nd}f}" if x < 1e5 else f"{x:.3g}"


# ------------------------------------------------------------------------------------------------------ reports


def _column(records, stage):
    return {(r["method"], r["bits"]): r.get(stage) for r in records}


def results_table(records, stage: str = "ppl_quantized", methods=None, markdown: bool = True) -> str:
    """Bits as rows, methods as columns; each cell `ppl (nominal bits)`; '-' where the method does not go."""
    recs = [r for r in records if r["method"] != "fp32"]
    methods = methods or [m for m in baselines.METHODS if any(r["method"] == m for r in recs)]
    bits = sorted({r["bits"] for r in recs}, reverse=True)
    col = _column(recs, stage)
    nominal = {(r["method"], r["bits"]): r["nominal_bits"] for r in recs}
    header = ["bits"] + [baselines.METHODS[m].label for m in methods]
    rows = []
    for b in bits:
        row = [f"{b:g}"]
        for m in methods:
            v = col.get((m, b))
            row.append("-" if v is None else f"{_fmt(v)} ({nominal[(m, b)]:.3f})")
        rows.append(row)
    return format_table(header, rows, markdown=markdown)


def format_table(header, rows, markdown: bool = True) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    if markdown:
        lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
                 "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"]
        lines += ["| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in
                                    enumerate(zip(r, widths))) + " |" for r in rows]  # fmt: skip
    else:
        lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
                 "  ".join("-" * w for w in widths)]  # fmt: skip
        lines += ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]  # fmt: skip
    return "\n".join(lines)


def plot(records, path, stage: str = "ppl_quantized", title: str | None = None) -> Path:
    """PNG: perplexity against nominal bits, one line per method (log scale), the fp32 level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    dense = [r for r in records if r["method"] == "fp32"]
    for m in baselines.METHODS:
        pts = sorted((r["nominal_bits"], r[stage]) for r in records if r["method"] == m and r.get(stage) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=baselines.METHODS[m].label)
    if dense:
        ax.axhline(dense[0]["ppl_quantized"], color="gray", linestyle="--", label="fp32")
        if stage == "ppl_finetuned" and dense[0].get("ppl_finetuned") is not None:
            ax.axhline(dense[0]["ppl_finetuned"], color="black", linestyle=":", label="fp32 + LoRA (same training)")
    ax.set_yscale("log")
    ax.set_xlabel("nominal bits per quantized parameter")
    ax.set_ylabel("perplexity (held-out Wikipedia leads)")
    ax.set_title(title or f"SmolLM2-135M: {STAGES.get(stage, stage)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


STAGE_ORDER = ("ppl_quantized", "ppl_init", "ppl_finetuned")


def _depth(rec) -> int:
    return max((i for i, k in enumerate(STAGE_ORDER) if rec.get(k) is not None), default=-1)


def merge_results(paths) -> dict:
    """One record per (method, bits) from several sweep JSON files: the record that went furthest (fine-tuned >
    initialized > quantized; a later file wins a tie). Each record keeps its own protocol, command and versions."""
    best: dict = {}
    sources = []
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"{path} does not exist")
        doc = load_results(path)
        if not doc.get("records"):
            raise ValueError(f"{path} holds no records")
        sources.append({"file": str(path), "protocol": doc.get("protocol"), "command": doc.get("command"),
                        "sweep_wall_seconds": doc.get("sweep_wall_seconds")})  # fmt: skip
        for rec in doc["records"]:
            key = (rec["method"], rec["bits"])
            if key not in best or _depth(rec) >= _depth(best[key]):
                best[key] = {**rec, "source": str(path)}
    records = sorted(best.values(), key=lambda r: (-r["bits"], list(baselines.METHODS).index(r["method"])
                                                  if r["method"] in baselines.METHODS else -1))  # fmt: skip
    return {"description": "merged sweep records (bitsandbytes_lowra.sweep.merge_results); see docs/results.md",
            "sources": sources, "records": records}  # fmt: skip


def stage_tables(records, stages=None) -> list[tuple[str, str]]:
    """(record key, title) of each table a report shows: each of `stages` (default all) that a quantized record has,
    then the same stages text only (ppl_text_<stage>) where any record has those; records without them show '-'."""
    recs = [r for r in records if r["method"] != "fp32"]
    full = [(k, t) for k, t in STAGES.items() if (stages is None or k in stages) and any(r.get(k) is not None
                                                                                         for r in recs)]  # fmt: skip
    text = [(text_key(k), f"{t}, text only") for k, t in full if any(r.get(text_key(k)) is not None for r in recs)]
    return full + text


def text_key(stage: str) -> str:
    """ppl_<stage> -> ppl_text_<stage>: the same perplexity without separator and lead-start targets."""
    return stage.replace("ppl_", "ppl_text_", 1)


def dense_summary(records, markdown: bool = True) -> str | None:
    """The fp32 reference in one line (after LoRA too, and text only, where the record has those)."""
    dense = [r for r in records if r["method"] == "fp32"]
    if not dense:
        return None
    d = dense[0]
    fmt = (lambda x: f"**{x:.2f}**") if markdown else (lambda x: f"{x:.2f}")
    line = f"{'Full' if markdown else 'full'} precision (fp32) perplexity: {fmt(d['ppl_quantized'])}"
    if d.get("ppl_finetuned") is not None:
        line += f"; after LoRA fine-tuning with the same protocol: {fmt(d['ppl_finetuned'])}"
    if d.get("ppl_text_quantized") is not None:
        tuned = d.get("ppl_text_finetuned")
        line += (f". Text only (separator and lead-start targets left out): {fmt(d['ppl_text_quantized'])}"
                 + ("" if tuned is None else f"; after LoRA: {fmt(tuned)}"))  # fmt: skip
    return line


def eval_note(records) -> str | None:
    """How much of the eval split the records' perplexities used, when they say (newer records) and it was cut."""
    from .eval.perplexity import truncation_note

    notes = sorted({truncation_note(e) for r in records for e in (r.get("evals") or {}).values()} - {""})
    return f"perplexity {'; '.join(notes)} (the same tokens for every record)" if notes else None


def markdown_report(records, plot_name: str | None = None) -> str:
    """Generated tables (one per stage that has numbers) for docs/results: cells are perplexity (nominal bits)."""
    lines = [f"{line[0].upper()}{line[1:]}\n" for line in (dense_summary(records), eval_note(records)) if line]
    for stage, title in stage_tables(records):
        lines += [f"### {title[0].upper() + title[1:]}", "", "Cell: perplexity (nominal bits); '-': not supported "
                  "(QLoRA / LoftQ below 2 bits) or not run.", "", results_table(records, stage, markdown=True), ""]
    eff = [r for r in records if r["method"] != "fp32"]
    if eff:
        header = ["method", "bits", "nominal", "effective", "mix (share of parameters at 1/2/4 bits)"]
        rows = [[r["method"], f"{r['bits']:g}", f"{r['nominal_bits']:.3f}", f"{r['effective_bits']:.3f}",
                 " / ".join(f"{100 * float(r['precision_mix'].get(str(b), 0)):.1f}%" for b in (1, 2, 4))]
                for r in sorted(eff, key=lambda r: (-r["bits"], r["method"]))]  # fmt: skip
        lines += ["### Bits", "", format_table(header, rows, markdown=True), ""]
    if plot_name:
        lines += [f"![perplexity against bits]({plot_name})", ""]
    return "\n".join(lines)


STAGES = {
    "ppl_quantized": "perplexity after quantization",
    "ppl_init": "perplexity after LoRA initialization",
    "ppl_finetuned": "perplexity after fine-tuning",
}


__all__ = [
    "DEFAULT_BITS",
    "DEMO_BITS",
    "DEMO_METHODS",
    "Protocol",
    "plan_grid",
    "plot",
    "resolve_checkpoint",
    "results_table",
    "run_dense",
    "run_group",
    "run_one",
    "run_sweep",
]
