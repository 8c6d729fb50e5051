"""The sweep pipeline end to end (plan -> quantize -> LoRA init -> fine-tune -> perplexity, resume) on a tiny
checkpoint: random Llama weights with SmolLM2's real tokenizer, scored on the real Wikipedia eval split."""

import math

import pytest

from bitsandbytes_lowra import sweep


def _protocol(path, steps=2):
    ft = {"lora_r": 4, "lora_alpha": 4, "lr": 1e-3, "batch_size": 2, "seq_len": 32, "grad_accum": 1,
          "gradient_checkpointing": False}  # fmt: skip
    return sweep.Protocol(model=str(path), eval_tokens=256, context=64, finetune_steps=steps, finetune=ft)


def test_an_interrupted_group_keeps_its_finished_records_and_resume_keeps_other_protocols(tiny_checkpoint, tmp_path,
                                                                                           monkeypatch):
    """Records are saved as each finishes, not when its group (qlora and loftq share one plan) ends; resuming with a
    changed flag is refused before any work, the file untouched (it used to drop the other protocol's records)."""
    import json

    from bitsandbytes_lowra import finetune

    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep.json"
    real = finetune.add_lora

    def add_lora(model, checkpoint, init, *a, **k):
        if init == "loftq":
            raise KeyboardInterrupt  # the run is stopped while the group's second method starts
        return real(model, checkpoint, init, *a, **k)

    monkeypatch.setattr(finetune, "add_lora", add_lora)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(["qlora", "loftq"], [4], _protocol(tiny_checkpoint, steps=1), output=out,
                        include_dense=False, progress=False, log=lambda s: None)  # fmt: skip
    saved = json.loads(out.read_text())
    assert [(r["method"], r["bits"]) for r in saved["records"]] == [("qlora", 4.0)]
    (rec,) = saved["records"]  # each stage's text-only perplexity and whole eval result are in the record
    assert set(rec["evals"]) == {"quantized", "init", "finetuned"} and rec["evals"]["init"] == rec["evals"]["quantized"]
    for stage, r in rec["evals"].items():
        assert rec[f"ppl_{stage}"] == r["ppl"] and rec[f"ppl_text_{stage}"] == r["ppl_text"] > 1
        assert r["input_tokens"] == 256 and r["truncated"] and r["available_tokens"] > 10**5 and r["nll_se"] > 0
    before = out.read_bytes()
    with pytest.raises(ValueError, match="another protocol.*eval_tokens"):
        changed = _protocol(tiny_checkpoint, steps=1)
        changed.eval_tokens = 128
        sweep.run_sweep(["qlora", "loftq"], [4], changed, output=out, resume=True, include_dense=False,
                        progress=False, log=lambda s: None)  # fmt: skip
    assert out.read_bytes() == before


def test_a_sweep_with_too_many_steps_for_its_data_fails_before_quantizing(tiny_checkpoint, monkeypatch):
    """The training blocks are built and checked before the first (slow) quantization, not when training starts."""
    from bitsandbytes_lowra import baselines

    monkeypatch.setattr(baselines, "method_plan", lambda *a, **k: pytest.fail("planned before refusing the data"))
    monkeypatch.setattr(sweep, "run_dense", lambda *a, **k: pytest.fail("evaluated before refusing the data"))
    with pytest.raises(ValueError, match=r"epochs\): take at most .*--allow-repeat"):
        sweep.run_sweep(["qlora"], [4], _protocol(tiny_checkpoint, steps=10**5), progress=False, log=lambda s: None)


@pytest.mark.slow
def test_sweep_runs_every_stage_and_resumes(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path / "cache"))  # plans learned here, not from a user's cache
    out = tmp_path / "sweep.json"
    from bitsandbytes_lowra import finetune

    built = []
    real = finetune.train_blocks
    monkeypatch.setattr(finetune, "train_blocks", lambda *a, **k: built.append(1) or real(*a, **k))
    records = sweep.run_sweep(["qlora", "loftq", "lowra"], [4, 2], _protocol(tiny_checkpoint), output=out,
                              progress=False, log=lambda s: None)  # fmt: skip
    assert len(built) == 1  # once, up front: every training takes the same blocks
    by = {(r["method"], r["bits"]): r for r in records}
    assert set(by) == {("fp32", 32.0), *((m, b) for m in ("qlora", "loftq", "lowra") for b in (4.0, 2.0))}
    for r in records:
        for stage in ("ppl_quantized", "ppl_init", "ppl_finetuned", "ppl_text_quantized", "ppl_text_init",
                      "ppl_text_finetuned"):  # fmt: skip
            assert math.isfinite(r[stage]) and r[stage] > 1, (r["method"], r["bits"], stage, r[stage])
        assert r["steps"] == 2 and r["protocol"]["finetune"]["seq_len"] == 32
    # The fp32 record is trained with the same protocol (the 16-bit LoRA reference).
    assert by[("fp32", 32.0)]["finetune"]["steps"] == 2
    for bits in (4.0, 2.0):
        q, lq, lw = by[("qlora", bits)], by[("loftq", bits)], by[("lowra", bits)]
        assert q["ppl_quantized"] == lq["ppl_quantized"]  # one NormalFloat plan, quantized and scored once
        assert q["ppl_init"] == q["ppl_quantized"]  # zero-initialized B adds nothing
        assert lq["init_report"]["error_loftq"] < lq["init_report"]["error_zero_init"]
        assert lw["nominal_bits"] == pytest.approx(bits, abs=1e-4) and lw["effective_bits"] > bits
    # Resume: a second run with the same protocol finds every record done and runs nothing.
    monkeypatch.setattr(sweep, "run_group", lambda *a, **k: pytest.fail("resume re-ran a finished group"))
    monkeypatch.setattr(sweep, "run_dense", lambda *a, **k: pytest.fail("resume re-ran the fp32 record"))
    again = sweep.run_sweep(["qlora", "loftq", "lowra"], [4, 2], _protocol(tiny_checkpoint), output=out, resume=True,
                            progress=False, log=lambda s: None)  # fmt: skip
    assert len(again) == len(records)
