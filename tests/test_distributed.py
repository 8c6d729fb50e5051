"""Multi-process LoRA fine-tuning on a LowRA base, on the CPU with the gloo backend (docs/distributed.md).

- DDP: `accelerate launch --multi_gpu --num_processes 2 -m bitsandbytes_lowra finetune` (on a CPU-only machine
  accelerate's multi-GPU launcher is torchrun; `finetune.distributed` asks for gloo) against the same command in one
  process at the same global batch (2 x 2 vs 1 x 4): same losses and adapter weights within float noise.
- FSDP2 (torch's fully_shard; accelerate only runs FSDP on accelerators): bf16 model with bf16-stored codes, sharded
  after accelerate's own meta-device + rank-0 broadcast (`fsdp2_load_full_state_dict`, the cpu_ram_efficient_loading
  path), trained a few steps (finite, decreasing loss), then a sharded save / load with torch.distributed.checkpoint
  (bit-identical shards and outputs). In the same processes, FSDP1 (flat parameters) on bf16-stored codes.
- quant_storage without processes: storage dtypes, byte reinterpretation, refusals, state dict and from_pretrained
  round trips, idempotent moves.

The model is a 2-layer Llama with random weights and SmolLM2's tokenizer (the packaged data: wiki training blocks).
Children run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bitsandbytes_lowra import LinearLowRA, LowRAConfig
from bitsandbytes_lowra.format import LowRAFormatError
from bitsandbytes_lowra.nn.modules import QUANT_STORAGE_DTYPES, ParamsLowRA, check_quant_storage, to_storage

from .conftest import mixed_bits

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
FINETUNE = ["--bits", "2", "--init", "zero", "--steps", "6", "--seq-len", "32", "--lora-r", "8", "--logging-steps",
            "1", "--no-gradient-checkpointing", "--lr", "1e-2", "--scheduler", "constant", "--max-grad-norm", "1.0",
            "--json", "-q"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, **CHILD_ENV, PYTHONPATH=str(ROOT), LOWRA_PLAN_CACHE=str(tmp / "plans"))
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama checkpoint (random weights, SmolLM2 tokenizer) and a LowRA plan for it at 2 bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from bitsandbytes_lowra import data
    from bitsandbytes_lowra.integrations.transformers import write_plan

    try:
        tok = AutoTokenizer.from_pretrained(data.smollm2_checkpoint())
    except data.MissingDataError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 tokenizer unavailable here: {e}")
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    plan_path = d / "plan.safetensors"
    write_plan(d, LowRAConfig(bits=2, plan_cache=False), output=plan_path, progress=False)
    return d, plan_path


# ------------------------------------------------------------------------------------------------------ DDP


def _finetune(tiny_dir: Path, out: Path, tmp: Path, procs: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "bitsandbytes_lowra", "finetune", "--model", str(tiny_dir), *FINETUNE,
           "--batch-size", str(batch), "-o", str(out)]  # fmt: skip
    if procs > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", *cmd[2:]]  # fmt: skip
    r = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads((out / "metrics.json").read_text())


def test_ddp_equals_single_process(tiny, tmp_path):
    """2 processes x batch 2 (DDP through accelerate launch + Trainer) == 1 process x batch 4: losses, adapter."""
    from safetensors.torch import load_file

    tiny_dir, _ = tiny
    t0 = time.perf_counter()
    single = _finetune(tiny_dir, tmp_path / "single", tmp_path, 1, 4)
    ddp = _finetune(tiny_dir, tmp_path / "ddp", tmp_path, 2, 2)
    print(f"single + DDP fine-tuning runs: {time.perf_counter() - t0:.1f} s")
    assert ddp["distributed"]["num_processes"] == 2 and ddp["train"]["num_processes"] == 2
    assert single["train"]["tokens_seen"] == ddp["train"]["tokens_seen"] == 6 * 4 * 32
    a, b = single["train"]["loss_curve"], ddp["train"]["loss_curve"]
    assert len(a) == len(b) == 6 and all(map(torch.isfinite, torch.tensor(a)))
    assert a[-1] < a[0]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=1e-4)
    wa = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 2 * 7 * 2  # lora_A/B on 7 linear layers x 2 decoder layers
    moved = max(float(w.abs().max()) for k, w in wa.items() if "lora_B" in k)
    assert moved > 1e-3  # trained: B started at zero
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ FSDP2


def _fsdp_worker(rank: int, world: int, port: int, tiny_dir: str, plan_path: str, out: str) -> None:
    """One FSDP2 rank: load (bf16, bf16-stored codes), LoRA, accelerate's rank-0 sharded load, train, save/load."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import types

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from accelerate.utils.modeling import get_non_persistent_buffers
    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bitsandbytes_lowra.finetune import FinetuneArgs, add_lora, train_blocks

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    report: dict = {"rank": rank}
    try:
        config = LowRAConfig(bits=2, plan_path=plan_path, quant_storage=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map="cpu")  # fmt: skip
        tok = AutoTokenizer.from_pretrained(tiny_dir)
        args = FinetuneArgs(steps=5, batch_size=2, seq_len=32, lora_r=8, gradient_checkpointing=False, seed=0)
        pm, _ = add_lora(model, None, "zero", args)
        lowra = {n: m for n, m in pm.named_modules() if isinstance(m, LinearLowRA)}
        report["storage"] = sorted({str(m.weight.dtype) for m in lowra.values()})
        blocks = train_blocks(tok, args, world).input_ids  # global batch: rows [2 step r + ...]: each rank its half
        probe = blocks[:2]
        with torch.no_grad():
            ref = pm(input_ids=probe, labels=probe).loss.float().item()
        if rank != 0:
            # Rank-0 loading: the codes (and every other parameter) this rank loaded are replaced by rank 0's
            # through accelerate's broadcast, so damage them first. The metadata stays each rank's own.
            for m in lowra.values():
                m.weight.data.zero_()
            with torch.no_grad():
                report["loss_damaged"] = pm(input_ids=probe, labels=probe).loss.float().item()
        # accelerate's fsdp2_prepare_model with cpu_ram_efficient_loading: state dict, meta, shard, broadcast.
        original_sd = pm.state_dict()
        transient = get_non_persistent_buffers(pm, recurse=True, fqns=True)
        buffers = {k: v.clone() for k, v in pm.named_buffers() if k in transient}
        pm = pm.to(torch.device("meta"))
        layers = pm.base_model.model.model.layers
        for layer in layers:
            fully_shard(layer)
        fully_shard(pm)
        fsdp2_load_full_state_dict(types.SimpleNamespace(is_main_process=rank == 0), pm, original_sd)
        for k, v in buffers.items():
            mod, name = k.rsplit(".", 1)
            pm.get_submodule(mod).register_buffer(name, v, persistent=False)
        w = layers[0].self_attn.q_proj.base_layer.weight
        report["sharded"] = {"type": type(w).__name__, "dtype": str(w.dtype), "global": list(w.shape),
                             "local": list(w.to_local().shape)}  # fmt: skip
        with torch.no_grad():
            report["loss_after_shard"] = pm(input_ids=probe, labels=probe).loss.float().item()
        report["loss_before_shard"] = ref

        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(args.steps):
            batch = blocks[(2 * step + rank) * args.batch_size:(2 * step + rank + 1) * args.batch_size]
            loss = pm(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            avg = loss.detach().float()
            dist.all_reduce(avg)
            losses.append(avg.item() / world)
        report["losses"] = losses
        report["trainable_dtypes"] = sorted({str(p.dtype) for p in pm.parameters() if p.requires_grad})

        # Sharded save / load: torch.distributed.checkpoint of the FSDP2 state dict (sharded codes, LoRA, norms,
        # embeddings). Damage every LoRA shard and the local code shards, load, compare bit for bit.
        sd = get_model_state_dict(pm)
        report["state_keys"] = len(sd)
        report["metadata_keys"] = sum(".weight.lowra_" in k for k in sd)
        saved = {k: v.to_local().clone() if hasattr(v, "to_local") else v.clone() for k, v in sd.items()}
        with torch.no_grad():
            out_before = pm(input_ids=probe).logits
        dcp.save(sd, checkpoint_id=out)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.to_local().normal_()
            for m in pm.modules():
                if isinstance(m, LinearLowRA):
                    m.weight.to_local().zero_()
        sd2 = get_model_state_dict(pm)
        dcp.load(sd2, checkpoint_id=out)
        set_model_state_dict(pm, sd2)
        after = get_model_state_dict(pm)
        same = all(
            torch.equal((v.to_local() if hasattr(v, "to_local") else v).view(torch.uint8).flatten(),
                        saved[k].view(torch.uint8).flatten())
            for k, v in after.items()
        )  # fmt: skip
        report["roundtrip_identical"] = same
        with torch.no_grad():
            report["outputs_identical"] = bool(torch.equal(pm(input_ids=probe).logits, out_before))

        # A state dict that does carry metadata (an unsharded checkpoint's) next to the sharded weight: the layer
        # rebuilds its state from it (validated against the shard's size).
        name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer"
        layer = pm.get_submodule(name)
        meta = {k.removeprefix(name + "."): v for k, v in original_sd.items() if k.startswith(name + ".weight.")}
        old_state = layer.quant_state
        layer.load_state_dict({"weight": after[name + ".weight"], **meta}, strict=False)
        report["metadata_reloaded"] = layer.quant_state is not old_state and layer.quant_state == old_state
        with torch.no_grad():
            report["outputs_after_metadata"] = bool(torch.equal(pm(input_ids=probe).logits, out_before))

        # FSDP1 (flat parameters: one dtype per unit, hence quant_storage = the model dtype; with uint8 codes torch
        # refuses to flatten them with bf16 norms). A fresh model, adapters in bf16 too, one unit.
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map="cpu")  # fmt: skip
        pm1, _ = add_lora(model, None, "zero", args)
        for p in pm1.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        with torch.no_grad():
            ref1 = pm1(input_ids=probe, labels=probe).loss.float().item()
        f1 = FullyShardedDataParallel(pm1, use_orig_params=True, device_id=torch.device("cpu"))
        with torch.no_grad():
            report["fsdp1_loss_matches"] = f1(input_ids=probe, labels=probe).loss.float().item() == ref1
        opt1 = torch.optim.AdamW([p for p in f1.parameters() if p.requires_grad], lr=1e-2)
        fsdp1_losses = []
        for step in range(3):
            batch = blocks[(2 * step + rank) * args.batch_size:(2 * step + rank + 1) * args.batch_size]
            loss = f1(input_ids=batch, labels=batch).loss
            loss.backward()
            opt1.step()
            opt1.zero_grad()
            fsdp1_losses.append(loss.float().item())
        report["fsdp1_losses"] = fsdp1_losses
    except Exception as e:  # reported to the parent, which fails the test with it
        import traceback

        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        Path(out, f"report-{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def test_fsdp2_sharded_training_and_checkpoint(tiny, tmp_path):
    import torch.multiprocessing as mp

    tiny_dir, plan_path = tiny
    out = tmp_path / "fsdp"
    out.mkdir()
    old = {k: os.environ.get(k) for k in CHILD_ENV}
    os.environ.update(CHILD_ENV)  # spawned children inherit the environment
    t0 = time.perf_counter()
    try:
        mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tiny_dir), str(plan_path), str(out)), nprocs=2)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    print(f"FSDP2 run: {time.perf_counter() - t0:.1f} s")
    reports = [json.loads((out / f"report-{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert "error" not in rep, rep["error"]
        assert rep["storage"] == ["torch.bfloat16"]
        assert rep["sharded"]["type"] == "DTensor" and rep["sharded"]["dtype"] == "torch.bfloat16"
        assert rep["sharded"]["local"][0] * 2 >= rep["sharded"]["global"][0] > rep["sharded"]["local"][0]
        assert len(rep["trainable_dtypes"]) == 1  # FSDP2 reduce-scatters gradients of one dtype
        assert rep["metadata_keys"] == 0  # metadata stays on the modules (see LinearLowRA._save_to_state_dict)
        assert rep["roundtrip_identical"] and rep["outputs_identical"]
        assert rep["metadata_reloaded"] and rep["outputs_after_metadata"]
        assert rep["fsdp1_loss_matches"] and all(map(math.isfinite, rep["fsdp1_losses"]))
    r0, r1 = reports
    # Sharded forward == unsharded forward of rank 0; rank 1's damaged copy was replaced by rank 0's.
    assert r0["loss_after_shard"] == pytest.approx(r0["loss_before_shard"], abs=1e-2)
    assert r1["loss_after_shard"] == r0["loss_after_shard"]
    assert r1["loss_before_shard"] == r0["loss_before_shard"]  # every rank quantized the same from the plan
    assert abs(r1["loss_damaged"] - r0["loss_before_shard"]) > 1e-3  # the damage was real
    losses = torch.tensor(r0["losses"])
    assert r0["losses"] == r1["losses"] and torch.isfinite(losses).all()
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------------ quant_storage


def _layer(quant_storage=torch.uint8, rows: int = 48, cols: int = 200):
    torch.manual_seed(0)
    lin = nn.Linear(cols, rows)
    return lin, LinearLowRA.from_linear(lin, mixed_bits(rows), quant_storage=quant_storage)


@pytest.mark.parametrize("dtype", QUANT_STORAGE_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_quant_storage_same_bytes_same_outputs(dtype):
    lin, ref = _layer()
    _, q = _layer(dtype)
    assert q.weight.dtype == dtype and q.weight.dim() == 1 and q.quant_storage == dtype
    assert q.weight.numel() * q.weight.element_size() == ref.quant_state.packed_nbytes
    assert torch.equal(q.weight.packed, ref.weight.data)  # the same bytes, reinterpreted
    x = torch.randn(3, 200)
    assert torch.equal(q(x), ref(x)) and torch.equal(q.dequantize(), ref.dequantize())
    # state dict: the weight as stored, the metadata as always; loads into a uint8 layer and back
    sd = q.state_dict()
    assert sd["weight"].dtype == dtype
    fresh = LinearLowRA(200, 48)
    fresh.load_state_dict(sd)
    assert fresh.quant_storage == dtype and torch.equal(fresh(x), ref(x))
    assert fresh.quant_state == ref.quant_state


def test_quant_storage_refusals():
    for bad in (torch.int8, torch.float64, "int32", None):
        with pytest.raises(LowRAFormatError, match="quant_storage must be one of uint8, float16, bfloat16, float32"):
            check_quant_storage(bad)
    assert check_quant_storage("torch.bfloat16") is torch.bfloat16
    with pytest.raises(LowRAFormatError, match="do not divide into torch.float32 elements of 4 bytes"):
        to_storage(torch.zeros(10, dtype=torch.uint8), torch.float32)
    with pytest.raises(ValueError, match="quant_storage must be one of"):
        LowRAConfig(bits=2, quant_storage=torch.int16)
    with pytest.raises(LowRAFormatError, match="quant_storage must be one of"):
        LinearLowRA(200, 48, quant_storage=torch.float64)


def test_quant_storage_cast_is_caught():
    """prepare_model_for_kbit_training-style cast of bf16-stored codes to float32 -> a clear error, never garbage."""
    _, q = _layer(torch.bfloat16)
    q.weight.data = q.weight.data.to(torch.float32)
    with pytest.raises(LowRAFormatError, match="arrived as torch.float32 but are stored as torch.bfloat16"):
        q(torch.randn(2, 200))


def test_quant_storage_idempotent_moves_and_meta():
    """Moves and dtype casts never re-quantize or convert the codes; a move to meta keeps the metadata."""
    _, q = _layer(torch.bfloat16)
    packed, state = q.weight.packed.clone(), q.quant_state  # compare bytes: codes as bf16 can read as NaN
    for move in (lambda m: m.to("cpu"), lambda m: m.to(torch.float16), lambda m: m.float(), lambda m: m.cpu()):
        move(q)
        assert torch.equal(q.weight.packed, packed) and q.weight.dtype == torch.bfloat16 and q.quant_state is state
    moved = ParamsLowRA(q.weight.data, quant_state=state, module=q, quant_storage=torch.bfloat16).to("cpu")
    assert torch.equal(moved.packed, packed)  # an already-quantized parameter is moved, not quantized again
    q.to("meta")  # the parameter becomes a plain meta tensor; the module keeps the state on its device
    assert q.weight.is_meta and q.quant_state is state and q.quant_state.device.type == "cpu"


def test_set_quant_storage_and_transformers_round_trip(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_dir, plan_path = tiny
    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(dtype=torch.bfloat16, device_map="cpu")
    u8 = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=LowRAConfig(bits=2, plan_path=str(
        plan_path)), **kw)  # fmt: skip
    bf = AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=LowRAConfig(
        bits=2, plan_path=str(plan_path), quant_storage=torch.bfloat16), **kw)  # fmt: skip
    assert bf.config.quantization_config.to_dict()["quant_storage"] == "bfloat16"
    layers = [m for m in bf.modules() if isinstance(m, LinearLowRA)]
    assert len(layers) == 14 and all(m.weight.dtype == torch.bfloat16 for m in layers)
    ref = u8(x).logits
    assert torch.equal(bf(x).logits, ref)
    bf.save_pretrained(tmp_path / "bf")
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path / "bf", output_loading_info=True, **kw)
    assert not any(info.values()), info
    assert all(m.weight.dtype == torch.bfloat16 for m in again.modules() if isinstance(m, LinearLowRA))
    assert torch.equal(again(x).logits, ref)
    for m in u8.modules():  # a uint8 checkpoint re-stored for FSDP: same bytes, same outputs
        if isinstance(m, LinearLowRA):
            m.set_quant_storage(torch.bfloat16)
    assert torch.equal(u8(x).logits, ref)
