"""QLoRA-style LoRA fine-tuning on a LowRA-quantized base: transformers' Trainer + peft, as a QLoRA script would.

The only difference from a QLoRA run is the quantization config handed to `from_pretrained`
(`LowRAConfig(bits=..., plan_path=...)` instead of `BitsAndBytesConfig(load_in_4bit=True, ...)`); the QLoRA / LoftQ
baselines use the same path with a NormalFloat plan (baselines.py). The steps:

1. `load_quantized`: from_pretrained with the method's plan (real packed LinearLowRA layers).
2. `add_lora`: prepare_model_for_kbit_training, get_peft_model(LoraConfig(r, lora_alpha, all linear layers)); then
   the method's initialization: zero B (peft's default, QLoRA) or LoftQ (5 alternating steps with the real lowra::
   quantizer, which re-quantizes the base to the residual: replace_lora_weights_lowra_loftq).
3. `train`: Trainer on fixed-length training sequences (`train_blocks`): wiki, blocks of the Wikipedia train split
   (eval.perplexity.train_chunks; the eval split never shares a title with it), causal LM loss on every token; aclsum,
   one paper per sequence (ROUGE prompt, reference summary, EOS, padding), loss on the summary only. Every sequence is
   seen at most once unless `allow_repeat`; the epochs run are recorded.

Multi-GPU: the same script runs under `accelerate launch` (docs/distributed.md); accelerate and Trainer do the
distributing. DDP: every rank loads the quantized base on its own GPU, only the LoRA parameters train and DDP averages
their gradients. FSDP: the packed codes are stored in the model's float dtype (`quant_storage`) so FSDP shards them
with the other frozen parameters; peft's prepare_model_for_kbit_training is skipped then (it casts bf16/fp16
parameters, codes included, to float32) and its two useful steps (frozen base, input gradients) done here.

Defaults (`FinetuneArgs`) follow the paper's Table 10 scaled down to a 2-core CPU: cosine schedule, warmup 3%,
max_grad_norm 0.3, weight decay 0.1, lr 3e-4, lora_alpha = lora_r; the step count, batch and block size are small
so that the whole sweep fits in hours on a CPU (docs/results.md says what ran). Optimizer: bitsandbytes' paged AdamW
on CUDA (as QLoRA), torch AdamW on CPU (paged optimizers page between GPU and host memory and need CUDA).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class FinetuneArgs:
    steps: int = 40
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    max_grad_norm: float = 0.3
    scheduler: str = "cosine"
    optim: str | None = None  # None: paged_adamw_32bit on CUDA, adamw_torch on CPU
    gradient_checkpointing: bool = True
    seed: int = 0
    dataset: str = "wiki"
    logging_steps: int = 5
    allow_repeat: bool = False  # let the steps take more than one pass over the training data
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "lora_r", "lora_alpha", "logging_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                kind = "non-negative" if name == "steps" else "positive"
                raise ValueError(f"{name} must be a {kind} integer, got {v!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.allow_repeat, bool):
            raise ValueError(f"allow_repeat must be a bool, got {self.allow_repeat!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        for name, below_one in (("lora_dropout", True), ("warmup_ratio", True), ("weight_decay", False),
                                ("max_grad_norm", False)):  # fmt: skip
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            if not ok or (below_one and v >= 1):
                raise ValueError(f"{name} must be {'in [0, 1)' if below_one else 'a number >= 0'}, got {v!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.optim is not None and self.optim not in optimizer_names():
            raise ValueError(f"optim must be one of transformers' optimizer names ({', '.join(optimizer_names())}), "
                             f"got {self.optim!r}")  # fmt: skip

    def resolved_optim(self) -> str:
        # FSDP2 hands the optimizer DTensor adapters; bitsandbytes' optimizer ops have no sharding rule for them
        # ("bitsandbytes.optimizer_update_32bit does not have a sharding strategy", seen on 2 H200s).
        fsdp2 = _fsdp_version_from_env() == 2
        if self.optim:
            if fsdp2 and _is_bnb_optim(self.optim):
                raise ValueError(f"optim {self.optim!r} is a bitsandbytes optimizer, which cannot update FSDP2's "
                                 "sharded (DTensor) adapters; use adamw_torch (the FSDP2 default) or FSDP1")
            return self.optim
        return "paged_adamw_32bit" if torch.cuda.is_available() and not fsdp2 else "adamw_torch"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["optim"] = self.resolved_optim()
        return d


DATASETS = ("wiki", "aclsum")
# transformers' lr_scheduler_type names (SchedulerType) that run with no lr_scheduler_kwargs and no eval strategy;
# the others (reduce_lr_on_plateau, greedy, cosine(_warmup)_with_min_lr, warmup_stable_decay) need one or the other.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")  # fmt: skip


def optimizer_names() -> tuple[str, ...]:
    """transformers' `optim` names (OptimizerNames) of the installed version. Some need packages of their own
    (galore, apollo, lomo, schedule-free, ...) or CUDA (paged_*): Trainer says so when it builds the optimizer."""
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


def _fsdp_version_from_env() -> int | None:
    """The FSDP version `accelerate launch` configured for this process (None: no FSDP)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def check_fsdp_offload() -> None:
    """Refuses FSDP's CPU offload (`fsdp_offload_params: true`, which `accelerate launch` passes as
    FSDP_OFFLOAD_PARAMS): LowRA weights stay on their GPU, as device_map offload is refused for a single GPU."""
    if _fsdp_version_from_env() is not None and os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ValueError("FSDP CPU offload (fsdp_offload_params: true) is not supported for LowRA's quantized "
                         "weights; set fsdp_offload_params: false in the accelerate config (docs/distributed.md)")


def _is_bnb_optim(name: str) -> bool:
    """transformers' optim names that run bitsandbytes optimizers (paged_*, *_8bit, *_bnb*, lion/rmsprop bnb ...)."""
    return name.startswith("paged_") or "8bit" in name or "bnb" in name


# ------------------------------------------------------------------------------------------------------ distributed


def _launch_state():
    """accelerate's PartialState when `accelerate launch` / torchrun started several processes, else None. Creating it
    joins the process group they set up (gloo on CPU: accelerate needs cpu=True for it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def distributed() -> dict:
    """How this process was launched: {"num_processes", "process_index", "local_process_index", "fsdp",
    "fsdp_version", "is_main"}. Single process unless started by `accelerate launch` / torchrun."""
    state = _launch_state()
    if state is None:
        return {"num_processes": 1, "process_index": 0, "local_process_index": 0, "fsdp": False, "fsdp_version": None,
                "is_main": True}  # fmt: skip
    version = _fsdp_version_from_env()
    return {
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "local_process_index": state.local_process_index,
        "fsdp": version is not None,
        "fsdp_version": version,
        "is_main": state.is_main_process,
    }


def end_distributed() -> None:
    """Under `accelerate launch` / torchrun: wait for every rank, then leave the process group, so that no rank exits
    while the group is alive. A rank that returned with it alive while rank 0 was still writing its outputs aborted
    once in gloo's teardown ("terminate called without an active exception", CI, a loaded 2-core machine)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def main_process_first():
    """Context: the main process runs the body first (planning fills the on-disk plan cache), then the others."""
    import contextlib

    state = _launch_state()
    return contextlib.nullcontext() if state is None else state.main_process_first()


def _device_map():
    if torch.cuda.is_available():
        # Each rank holds the whole quantized model on its own GPU (DDP), or loads it there before FSDP shards it.
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return "cpu"


# ------------------------------------------------------------------------------------------------------ model


def load_quantized(checkpoint, plan, dtype=torch.float32, plan_path=None, quant_storage=torch.uint8):
    """(model, tokenizer): `checkpoint` loaded by transformers with the LowRA quantizer and this plan.

    The plan is written to `plan_path` (default: next to the run's cache) because LowRAConfig reads plans from files.
    quant_storage: dtype the packed codes are stored as (uint8; the model dtype for FSDP).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.transformers import LowRAConfig

    if plan_path is None:
        import tempfile

        fd, plan_path = tempfile.mkstemp(suffix=".safetensors", prefix="lowra-plan-")
        os.close(fd)
        remove = True
    else:
        remove = False
    try:
        plan.save(plan_path)
        # The config describes the plan (the quantizer refuses a plan made for other settings): its recorded ones.
        recorded = {k: v for k, v in plan.settings.items() if k in LowRAConfig._FIELDS}
        config = LowRAConfig(**{**recorded, "bits": float(plan.settings["bits"]), "blocksize": plan.blocksize},
                             plan_path=str(plan_path), quant_storage=quant_storage)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=dtype,
                                                     device_map=_device_map())
    finally:
        if remove:
            os.unlink(plan_path)
    return model.eval(), AutoTokenizer.from_pretrained(checkpoint)




def add_lora(model, checkpoint, init: str, args: FinetuneArgs, loftq_iterations: int = 5, prepare: bool = True,
             svd_niter: int | None = 4):
    """Wrap `model` in a peft LoRA model (all linear layers) with the method's initialization.

    init: "zero" (peft default: A Kaiming, B = 0, the QLoRA baseline) or "loftq" (the base is re-quantized to the
    residual of the rank-r LoftQ alternation, `loftq_iterations` steps, and the adapters hold the low-rank part).
    svd_niter: LoftQ's rank-r SVD by torch.svd_lowrank with this many subspace iterations (None: the exact SVD; on
    this CPU one 1536x576 SVD takes 0.33 s exact, 0.03 s low-rank at r=16).
    Returns (peft_model, report) where report has the LoftQ error reduction when init="loftq".
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if init not in ("zero", "loftq"):
        raise ValueError(f"init must be 'zero' or 'loftq', got {init!r}")
    if init == "loftq" and (isinstance(loftq_iterations, bool) or not isinstance(loftq_iterations, int)
                            or loftq_iterations < 1):  # fmt: skip
        raise ValueError(f"loftq_iterations must be a positive integer, got {loftq_iterations!r}")
    torch.manual_seed(args.seed)
    if prepare and _float_storage(model):
        # prepare_model_for_kbit_training would cast the bf16/fp16-stored codes to float32 (it spares only classes
        # named Params4bit); do its other steps: frozen base, gradients reaching the adapters through checkpointing.
        for p in model.parameters():
            p.requires_grad_(False)
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
    elif prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})  # as Trainer
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    pm = get_peft_model(model, config)
    report = {"init": init}
    if init == "loftq":
        from .integrations.peft import replace_lora_weights_lowra_loftq

        t0 = time.perf_counter()
        errors = replace_lora_weights_lowra_loftq(pm, checkpoint, iterations=loftq_iterations, svd_niter=svd_niter)
        before = math.sqrt(sum(b * b for b, _ in errors.values()))
        after = math.sqrt(sum(a * a for _, a in errors.values()))
        report.update(
            loftq_iterations=loftq_iterations,
            svd_niter=svd_niter,
            layers=len(errors),
            error_zero_init=before,
            error_loftq=after,
            seconds=time.perf_counter() - t0,
        )
    return pm, report


def _float_storage(model) -> bool:
    from .nn import LinearLowRA

    return any(isinstance(m, LinearLowRA) and m.weight.dtype != torch.uint8 for m in model.modules())


# ------------------------------------------------------------------------------------------------------ data


class TrainBlocks(torch.utils.data.Dataset):
    """Fixed-length training sequences for Trainer: input_ids [n, seq_len], labels and attention_mask of that shape.

    Plain causal LM (the wiki path's packed chunks): labels = input_ids, no padding (labels and attention_mask left
    None). Prompt/target data (aclsum): labels -100 on the prompt and the padding, attention_mask 0 on the padding.
    `info`: what the data is and how it was built (recorded in the run's metrics under train.data).
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, info: dict | None = None):  # fmt: skip
        self.input_ids = input_ids
        self.labels = input_ids if labels is None else labels
        self.attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.info = {"sequences": len(self), **(info or {})}

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}


def train_blocks(tokenizer, args: FinetuneArgs, num_processes: int = 1) -> TrainBlocks:
    """The training sequences for `steps` optimizer steps of the global batch (batch_size x grad_accum x
    num_processes), each seen once. wiki: that many packed blocks of the train split (eval.perplexity.train_chunks);
    aclsum: one sequence per train paper (aclsum_blocks), all of them. Too few for the steps: see check_epochs.
    """
    if args.dataset == "wiki":
        from .eval.perplexity import train_chunks

        needed = args.steps * args.batch_size * args.grad_accum * num_processes
        blocks = TrainBlocks(train_chunks(tokenizer, context=args.seq_len, max_chunks=max(1, needed)),
                             info={"dataset": "wiki", "split": "train", "layout": "train-split leads joined by EOS, "
                                   "cut every seq_len tokens; every token a target"})  # fmt: skip
    else:
        blocks = aclsum_blocks(tokenizer, args.seq_len)
    check_epochs(blocks, args, num_processes)
    return blocks


def check_epochs(blocks: TrainBlocks, args: FinetuneArgs, num_processes: int = 1) -> float:
    """Passes over `blocks` that args.steps optimizer steps of the global batch take, also set as
    blocks.info["epochs"]. More than one is refused unless args.allow_repeat: Trainer would start the next epoch
    silently (it did: 122 aclsum blocks for the 160 sequences of 40 default steps)."""
    per_step = args.batch_size * args.grad_accum * num_processes
    needed = args.steps * per_step
    epochs = blocks.info["epochs"] = needed / len(blocks)
    if epochs > 1 and not args.allow_repeat:
        raise ValueError(f"{blocks.info.get('dataset', 'the data')} gives {len(blocks)} training sequences of "
                         f"{blocks.input_ids.shape[1]} tokens; {args.steps} steps x {per_step} sequences per step "
                         f"need {needed} ({epochs:.2f} epochs): take at most {len(blocks) // per_step} steps, a "
                         "smaller batch, or allow repeating the data (--allow-repeat; FinetuneArgs.allow_repeat)")
    return epochs


def aclsum_blocks(tokenizer, seq_len: int) -> TrainBlocks:
    """One sequence per ACLSum train paper: the ROUGE prompt (eval.rouge.prompt_ids: what generation sees), the
    reference summary, EOS; right-padded to seq_len. Labels: the summary and its EOS only (-100 on the prompt and the
    padding), so the model learns to summarize, not to reproduce the abstract.

    Longer than seq_len: the abstract is cut from its end (whole tokens) until the example fits; the summary is never
    cut. A paper whose summary leaves no room for a single token of its abstract is skipped. info counts both.
    """
    from .eval.rouge import aclsum_examples, build_prompt, prompt_ids

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: aclsum summaries need one to end on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows: list[tuple[list[int], list[int]]] = []  # (prompt ids, target ids)
    truncated = skipped = dropped = 0
    examples = aclsum_examples("train", None)
    spacer = "" if build_prompt(tokenizer, "").endswith((" ", "\n")) else " "  # "Summary:" + " text"
    for ex in examples:
        target = tokenizer(spacer + ex["reference"], add_special_tokens=False)["input_ids"] + [eos]
        room = seq_len - len(target)  # for the prompt
        prompt = prompt_ids(tokenizer, ex["source"])
        if len(prompt) > room:
            source = tokenizer(ex["source"], add_special_tokens=False)["input_ids"]
            keep = len(source) - (len(prompt) - room)
            while keep > 0:  # re-tokenized in the prompt, a cut abstract can merge differently: re-check
                prompt = prompt_ids(tokenizer, tokenizer.decode(source[:keep]).rstrip())
                if len(prompt) <= room:
                    break
                keep -= len(prompt) - room
            if keep <= 0:  # not one token of the abstract fits beside the summary
                skipped += 1
                continue
            truncated += 1
            dropped += len(source) - keep
        rows.append((prompt, target))
    if not rows:
        raise ValueError(f"no ACLSum summary fits in seq_len={seq_len} tokens with its prompt")
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (prompt, target) in enumerate(rows):
        n = len(prompt) + len(target)
        ids[i, :n] = torch.tensor(prompt + target)
        labels[i, len(prompt) : n] = torch.tensor(target)
        mask[i, :n] = 1
    info = {"dataset": "aclsum", "split": "train", "papers": len(examples), "skipped": skipped,
            "truncated": truncated, "abstract_tokens_dropped": dropped, "target_tokens": int((labels != -100).sum()),
            "tokens": int(mask.sum()), "layout": "one paper per sequence: prompt, summary, EOS, padding; loss on the "
            "summary and EOS only; an abstract too long for seq_len is cut from its end, a summary never"}  # fmt: skip
    return TrainBlocks(ids, labels, mask, info)


# ------------------------------------------------------------------------------------------------------ training


def _checkpointing_kwargs(enabled: bool) -> dict:
    """TrainingArguments' activation-recompute flags: `activation_checkpointing*` since transformers 5.2x (the
    `gradient_checkpointing*` names are deprecated there), only `gradient_checkpointing*` in 5.17."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def _warmup_kwargs(ratio: float, steps: int) -> dict:
    """TrainingArguments' warmup as a ratio of the total steps. transformers 5 has no `warmup_ratio`: a float
    `warmup_steps` below 1 is the ratio there (ceil(ratio x max_steps) steps; 1 or more is a number of steps, which is
    why FinetuneArgs refuses ratios outside [0, 1)). Versions with an integer `warmup_steps` take `warmup_ratio`.
    A warmup that would take every step is cut to steps - 1: warmup starts at lr 0, so a 1-step run would not train
    at all, and no run would reach the peak rate."""
    import dataclasses
    import math

    from transformers import TrainingArguments

    if math.ceil(steps * ratio) >= steps:
        return {"warmup_steps": max(steps - 1, 0)}  # an int: a number of steps in every version
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    if "warmup_ratio" in fields and "float" not in str(fields["warmup_steps"].type):
        return {"warmup_ratio": float(ratio)}
    return {"warmup_steps": float(ratio)}


def train(peft_model, tokenizer, args: FinetuneArgs, output_dir=None, progress: bool = True, adapter_dir=None,
          blocks: TrainBlocks | None = None) -> dict:
    """Train the adapters for args.steps optimizer steps with transformers' Trainer; returns the metrics.

    Under `accelerate launch` Trainer runs DDP or FSDP (whichever accelerate configured); args.batch_size is per
    process. adapter_dir: save the adapter there with Trainer.save_model (gathers FSDP shards; main process writes).
    blocks: the training sequences (default: train_blocks, which refuses too little data unless args.allow_repeat).
    The metrics record the epochs Trainer ran and the data's info (train.data).
    """
    from transformers import Trainer, TrainingArguments, default_data_collator

    if args.steps == 0:
        return {"steps": 0, "train_loss": None, "seconds": 0.0}
    world = distributed()["num_processes"]
    if blocks is None:
        blocks = train_blocks(tokenizer, args, world)
    else:
        check_epochs(blocks, args, world)
    import tempfile

    tmp = None
    if output_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowra-finetune-")
        output_dir = tmp.name
    targs = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        **_warmup_kwargs(args.warmup_ratio, args.steps),
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        optim=args.resolved_optim(),
        **_checkpointing_kwargs(args.gradient_checkpointing),
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        include_num_input_tokens_seen="non_padding",  # attention-mask sums over every process: aclsum is padded
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=peft_model,
        args=targs,
        train_dataset=blocks,
        data_collator=default_data_collator,
    )
    if not progress:
        # Without a progress bar Trainer prints every log dict ({'loss': ...}, {'train_runtime': ...}) on stdout
        # (PrinterCallback); quiet means quiet, and the losses are in trainer.state.log_history all the same.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if adapter_dir is not None:
        trainer.save_model(str(adapter_dir))
    peft_model.eval()
    if tmp is not None:
        tmp.cleanup()
    return {
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "loss_curve": losses,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "num_processes": world,
        "epochs": float(trainer.state.epoch or 0.0),
        "data": blocks.info,
        "seconds": seconds,
    }


def base_fingerprint(model, layers: int = 4) -> str:
    """A short hash of the quantized base under a model (or a peft wrapper around it): the packed codes, scales and
    precisions of its first `layers` LowRA layers in module order. LoftQ re-quantizes the base to its residual, so
    its adapters only fit the base saved with them; metrics.json records this so that `lowra eval` can tell."""
    import hashlib

    from .nn import LinearLowRA

    h = hashlib.sha256()
    n = 0
    for module in model.modules():
        if n == layers:
            break
        if not isinstance(module, LinearLowRA):
            continue
        packed, state = module._packed_and_state()
        for t in (packed, state.absmax, state.bits):
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        h.update(repr(tuple(state.shape)).encode())
        n += 1
    return f"{n}:{h.hexdigest()[:16]}"


def write_outputs(peft_model, output_dir, metrics: dict) -> None:
    """The adapter (peft's save_pretrained: adapter_config.json + adapter_model.safetensors) and metrics.json."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")


__all__ = ["DATASETS", "SCHEDULERS", "FinetuneArgs", "TrainBlocks", "aclsum_blocks", "add_lora", "base_fingerprint",
           "check_epochs", "distributed", "end_distributed", "load_quantized", "main_process_first", "optimizer_names",
           "train", "train_blocks", "write_outputs"]
