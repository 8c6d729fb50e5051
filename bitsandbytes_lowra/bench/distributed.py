"""Multi-GPU LoRA fine-tuning benchmark: LowRA under FSDP2 vs single-GPU LowRA vs bitsandbytes QLoRA under FSDP2.

    python -m bitsandbytes_lowra.bench.distributed --json dist.json              # 2 GPUs, Llama-2-7B shape
    python -m bitsandbytes_lowra.bench.distributed --tiny --device cpu --json d.json   # the code path, on CPU/gloo

Self-launching: the parent writes a random-weight checkpoint of the model shape (from its config: no download), plans
LowRA once (LowRAConfig(bits) -> a plan file every contender reuses), then runs each contender in its own
subprocess (torch.distributed.run for the multi-process ones), so that one failing contender (missing bitsandbytes,
out of memory, a hang up to --timeout) is recorded and the others still run. Contenders:

- lowra-1gpu: LowRA at --bits, codes stored uint8, one process.
- lowra-fsdp2: LowRA at --bits, codes stored as bfloat16 (quant_storage), --nproc processes, torch's fully_shard on
  every decoder layer and the root (FSDP2, as accelerate's fsdp_version 2 wraps a Llama).
- bnb-nf4-fsdp2: bitsandbytes QLoRA (NF4, double quant, bnb_4bit_quant_storage=bfloat16), same FSDP2 wrapping.

Every contender: bf16 model, LoRA r=--lora-r (alpha = r) on all linear layers of the decoder, gradient checkpointing,
AdamW on the adapters, random token batches of --batch-size x --seq-len per process; --warmup untimed steps then
--steps timed ones. Reported: median step seconds, tokens/s over all processes, peak memory per GPU (max over ranks,
torch.cuda.max_memory_allocated during training) and after loading. Random weights: speed and memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .e2e import LLAMA2_7B

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5)  # fmt: skip
CONTENDERS = ("lowra-1gpu", "lowra-fsdp2", "bnb-nf4-fsdp2")


# ------------------------------------------------------------------------------------------------------ worker


def _lora(model, r: int):
    """Adapters on every linear layer of the decoder; the base frozen, gradient checkpointing (non-reentrant)."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _load(kind: str, ckpt: str, plan_path: str, bits: float, device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .. import LowRAConfig

    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    if kind.startswith("lowra"):
        storage = torch.bfloat16 if "fsdp" in kind else torch.uint8
        qc = LowRAConfig(bits=bits, plan_path=plan_path, quant_storage=storage)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16,
                                bnb_4bit_quant_storage=torch.bfloat16)  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=qc, dtype=torch.bfloat16,
                                                device_map=device_map)  # fmt: skip


def _shard(model) -> None:
    """FSDP2: every decoder layer its own unit, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for m in list(model.modules()):
        if type(m).__name__.endswith("DecoderLayer"):
            fully_shard(m)
    fully_shard(model)


def worker(args) -> int:
    """One process of one contender: load, LoRA, (shard), train; writes rank<r>.json into args.out."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    out = Path(args.out)
    row: dict = {"contender": args.worker, "rank": rank, "world": world}
    cuda = args.device == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        t0 = time.perf_counter()
        model = _load(args.worker, args.checkpoint, args.plan, args.bits, device)
        row["load_s"] = time.perf_counter() - t0
        pm = _lora(model, args.lora_r)
        if world > 1:
            _shard(pm)
        if cuda:
            torch.cuda.synchronize()
            row["weights_gib"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        params = [p for p in pm.parameters() if p.requires_grad]
        row["trainable_params"] = sum(p.numel() for p in params)  # this rank's shards under FSDP
        opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(1234 + rank)
        vocab = pm.config.vocab_size if hasattr(pm, "config") else model.config.vocab_size
        times, losses = [], []
        pm.train()
        for step in range(args.warmup + args.steps):
            ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g).to(device)
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
        row.update(step_s=statistics.median(times), step_s_all=times, losses=losses,
                   finite=all(map(lambda v: v == v and abs(v) != float("inf"), losses)))  # fmt: skip
        if cuda:
            row["peak_train_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()[-4000:]
    (out / f"rank{rank}.json").write_text(json.dumps(row))
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 0 if "error" not in row else 1


# ------------------------------------------------------------------------------------------------------ parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_checkpoint(path: Path, tiny: bool, device: str) -> float:
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.perf_counter()
    config = LlamaConfig(**(TINY if tiny else {k: v for k, v in LLAMA2_7B.items() if k != "model_type"}))
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def _run_contender(name: str, args, ckpt: Path, plan: Path, work: Path) -> dict:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    nproc = 1 if name.endswith("1gpu") else args.nproc
    worker_args = ["--worker", name, "--out", str(out), "--checkpoint", str(ckpt), "--plan", str(plan), "--bits",
                   str(args.bits), "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--lora-r",
                   str(args.lora_r)]  # fmt: skip
    module = ["-m", "bitsandbytes_lowra.bench.distributed", *worker_args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), *module]  # fmt: skip
    else:
        cmd = [sys.executable, *module]
    env = dict(os.environ)
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    rec = {"contender": name, "nproc": nproc}
    # Its own session: on a timeout the whole group (torchrun and its workers) is ended, so a hung contender
    # frees its GPUs for the next one.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        tail = proc.communicate(timeout=args.timeout)[0][-3000:]
        rec["returncode"] = proc.returncode
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)
                tail = proc.communicate(timeout=wait)[0][-3000:]
                break
            except subprocess.TimeoutExpired:
                tail = ""
            except ProcessLookupError:
                tail = ""
                break
        rec["returncode"] = None
        rec["error"] = f"timed out after {args.timeout} s"
    rec["wall_s"] = time.perf_counter() - t0
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors or len(ranks) != nproc:
        rec.setdefault("error", errors[0] if errors else f"{len(ranks)} of {nproc} processes reported")
        rec["log_tail"] = tail
        rec["traceback"] = next((r.get("traceback") for r in ranks if "traceback" in r), None)
        return rec
    tokens = args.batch_size * args.seq_len * nproc
    step = max(r["step_s"] for r in ranks)
    rec.update(
        step_s=step, tokens_per_s=tokens / step, tokens_per_step=tokens, load_s=max(r["load_s"] for r in ranks),
        losses=ranks[0]["losses"], finite=all(r["finite"] for r in ranks),
        trainable_params_per_rank=[r["trainable_params"] for r in ranks],
    )  # fmt: skip
    if args.device == "cuda":
        rec["peak_train_gib_per_gpu"] = max(r["peak_train_gib"] for r in ranks)
        rec["weights_gib_per_gpu"] = max(r["weights_gib"] for r in ranks)
    return rec


def _table(results: dict) -> str:
    head = f"{'contender':<15} {'procs':>5} {'step s':>8} {'tok/s':>9} {'peak GiB/GPU':>13} {'weights GiB':>12}  note"
    lines = [head]
    for r in results["contenders"]:
        if "error" in r:
            lines.append(f"{r['contender']:<15} {r['nproc']:>5} {'-':>8} {'-':>9} {'-':>13} {'-':>12}  "
                         f"FAILED: {r['error'][:90]}")  # fmt: skip
            continue
        peak, w = r.get("peak_train_gib_per_gpu"), r.get("weights_gib_per_gpu")
        lines.append(
            f"{r['contender']:<15} {r['nproc']:>5} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
            f"{'-' if peak is None else f'{peak:.2f}':>13} {'-' if w is None else f'{w:.2f}':>12}  "
            f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the Llama-2-7B shape")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the FSDP contenders (default 2)")
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--bits", type=float, default=1.75)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1, help="per process")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=180, help="seconds per contender before it is recorded as failed")
    ap.add_argument("--workdir", default=None, help="for the random checkpoint (default: a temp dir)")
    # internal: one process of one contender
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    for name in ("--out", "--checkpoint", "--plan"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a GPU (use --tiny --device cpu to exercise the code path)")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        print(f"warning: {torch.cuda.device_count()} GPUs for --nproc {args.nproc}: FSDP contenders will fail",
              file=sys.stderr)  # fmt: skip

    import transformers

    from .. import LowRAConfig
    from ..integrations.transformers import write_plan

    results = {"torch": torch.__version__, "transformers": transformers.__version__, "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "model": "tiny-llama" if args.tiny else "llama-2-7b-shape (random weights)",
               "settings": {k: getattr(args, k) for k in ("bits", "steps", "warmup", "seq_len", "batch_size",
                                                           "lora_r", "nproc")},
               "contenders": []}  # fmt: skip
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="lowra-dist-bench-") as work:
        work = Path(work)
        ckpt = work / "checkpoint"
        results["checkpoint_s"] = _write_checkpoint(ckpt, args.tiny, args.device)
        print(f"random checkpoint written in {results['checkpoint_s']:.1f} s", flush=True)
        t0 = time.perf_counter()
        plan = work / "plan.safetensors"
        os.environ.setdefault("LOWRA_PLAN_CACHE", str(work / "plan-cache"))
        write_plan(ckpt, LowRAConfig(bits=args.bits), output=plan, progress=False)
        results["plan_s"] = time.perf_counter() - t0
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the learner's buffers: the contenders run in their own processes
        print(f"LowRA plan at {args.bits:g} bits in {results['plan_s']:.1f} s", flush=True)
        for name in args.contenders:
            rec = _run_contender(name, args, ckpt, plan, work)
            results["contenders"].append(rec)
            status = f"FAILED ({rec['error'][:200]})" if "error" in rec else f"step {rec['step_s']:.3f} s"
            print(f"{name}: {status}, {rec['wall_s']:.0f} s wall", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
    results["total_s"] = time.perf_counter() - t_all
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
