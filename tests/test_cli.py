"""The `lowra` command line: help, argument errors, plan / quantize / eval / memory on the real default model (tiny
eval budgets), and the harness' table / plot / grid helpers on synthetic records."""

import ast
import json
import math
import re
import subprocess
import sys

import pytest

from bitsandbytes_lowra import cli, sweep

COMMANDS = ["demo", "plan", "quantize", "eval", "finetune", "sweep", "report", "memory"]


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"lowra {command}" in out and "--quiet" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "bitsandbytes_lowra", "memory", "smollm2-135m", "--bits", "2", "--json"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["breakdowns"][0]["settings"]["bits"] == 2.0


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "smollm2-135m", "--bits", "0.5"])
    assert e.value.code == 2 and "bits must be in [1, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["plan", "smollm2-135m", "--bits", "2", "--method", "gptq"])
    assert "unknown method 'gptq'" in capsys.readouterr().err
    rc, _, err = _run(capsys, "plan", "smollm2-135m", "--bits", "1.75", "--method", "qlora", "-q")
    assert rc == 2 and "cannot go below 2 bits" in err
    rc, _, err = _run(capsys, "plan", "/nonexistent/model", "--bits", "2", "-q")
    assert rc == 2 and "neither 'smollm2-135m' nor a local checkpoint" in err


def test_eval_tells_whether_an_adapter_fits_its_base(capsys, tmp_path, monkeypatch):
    """`lowra finetune` records which quantized base its adapter belongs to; `lowra eval --adapter` on another base
    warns (LoftQ re-quantizes the base from its second iteration on: its adapter is meaningless elsewhere) and says
    so in its JSON."""
    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))  # the fits learned here stay here
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "finetune", "--bits", "2", "--steps", "0", "--init", "loftq", "--loftq-iterations", "2",
                      "-o", str(run), "-q")  # fmt: skip
    assert rc == 0, err
    assert json.loads((run / "adapter" / "metrics.json").read_text())["base_fingerprint"].startswith("4:")
    rc, out, err = _run(capsys, "eval", str(run / "base"), "--adapter", str(run / "adapter"), "--eval-tokens", "64",
                        "--json", "-q")  # fmt: skip
    assert rc == 0 and json.loads(out)["adapter_base_matches"] is True and "warning" not in err
    rc, out, err = _run(capsys, "eval", "smollm2-135m", "--bits", "2", "--adapter", str(run / "adapter"),
                        "--eval-tokens", "64", "--json", "-q")  # fmt: skip
    assert rc == 0 and json.loads(out)["adapter_base_matches"] is False
    assert "warning" in err and "trained on another quantized base" in err
    # a wrong --adapter is refused before the model loads (peft would take it for a Hub id and try the network)
    for adapter, message in ((run, f"pass --adapter {run / 'adapter'}"), (tmp_path / "nope", "does not exist"),
                             (run / "metrics.json", "is a file"), (run / "base", "holds no adapter_config.json")):
        rc, err = _refused_before_loading(capsys, monkeypatch, "eval", "smollm2-135m", "--adapter", str(adapter), "-q")
        assert rc == 2 and message in err, err


def test_finetune_checks_its_arguments_before_touching_the_model(capsys, tmp_path):
    # a bad step count is reported as such (by the parser), not after (or instead of) resolving and loading the model
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--model", "/nonexistent/model", "--bits", "2", "--steps", "-1", "-o",
                  str(tmp_path / "run"), "-q"])  # fmt: skip
    assert e.value.code == 2 and "argument --steps: must be an integer >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a previous run's outputs are not overwritten without --overwrite, and that is checked first too
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    rc, _, err = _run(capsys, "finetune", "--model", "/nonexistent/model", "--bits", "2", "-o", str(tmp_path / "run"),
                      "-q")  # fmt: skip
    assert rc == 2 and "is not an empty directory (pass --overwrite" in err
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"
    rc, _, err = _run(capsys, "finetune", "--model", "/nonexistent/model", "--bits", "2", "-o", str(tmp_path / "run"),
                      "--overwrite", "-q")  # fmt: skip
    assert rc == 2 and "neither 'smollm2-135m' nor a local checkpoint" in err  # past the output check


def test_memory_json_and_table(capsys):
    rc, out, _ = _run(capsys, "memory", "llama-2-7b", "--bits", "4", "2", "--json")
    assert rc == 0
    bd = json.loads(out)["breakdowns"]
    assert [b["settings"]["bits"] for b in bd] == [4.0, 2.0]
    assert bd[1]["lowra"]["finetune_total"] < bd[0]["lowra"]["finetune_total"]
    rc, out, _ = _run(capsys, "memory", "llama-2-7b", "--bits", "1.75")
    assert rc == 0 and "finetune_total" in out and "LowRA 1.75 bit" in out


@pytest.mark.slow
def test_plan_quantize_eval_roundtrip(capsys, tmp_path):
    # The QLoRA plan needs no learning, so this runs in seconds on a fresh machine.
    rc, out, _ = _run(capsys, "plan", "smollm2-135m", "--bits", "2.5", "--method", "qlora", "--json", "-q",
                      "-o", str(tmp_path))  # fmt: skip
    assert rc == 0
    rec = json.loads(out)
    assert rec["nominal_bits"] == pytest.approx(2 + 2 * 7 / 30)
    assert rec["assignment"]["four_bit_layers"] == list(range(7))
    assert set(rec["precision_mix_by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}  # fmt: skip
    assert rec["effective_bits"] > rec["nominal_bits"]

    out_dir = tmp_path / "q"
    rc, out, _ = _run(capsys, "quantize", "smollm2-135m", "--bits", "4", "--method", "qlora", "-o", str(out_dir),
                      "--json", "-q")  # fmt: skip
    assert rc == 0
    q = json.loads(out)
    assert q["stored_nominal_bits"] == pytest.approx(4.0) and q["disk_bytes"] > 0
    assert q["memory_bytes"] < 4 * 135e6  # well below the fp32 model
    assert (out_dir / "config.json").is_file() and (out_dir / "lowra-plan.safetensors").is_file()

    rc, out, _ = _run(capsys, "eval", str(out_dir), "--eval-tokens", "130", "--context", "64", "--json", "-q")
    assert rc == 0
    ev = json.loads(out)
    assert ev["kind"] == "lowra-checkpoint" and ev["perplexity"]["tokens"] == 130 - 3
    assert 1 < ev["perplexity"]["ppl"] < 1000  # 4-bit NF keeps the model usable
    rc, out, _ = _run(capsys, "quantize", "smollm2-135m", "--bits", "4", "--method", "qlora", "-o", str(out_dir), "-q")
    assert rc == 2  # refuses to overwrite

    # a corrupt checkpoint: one line naming the layer and the problem, or the unreadable file, not a traceback
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(out_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    key = next(k for k in sd if k.endswith("down_proj.weight.lowra_row_offsets"))
    sd[key][1] += 7
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rc, _, err = _run(capsys, "eval", str(bad), "--eval-tokens", "64", "-q")
    assert rc == 2 and "LowRA state could not be loaded" in err and "row_offsets do not match" in err
    assert key.removesuffix(".weight.lowra_row_offsets") in err
    data = (out_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    rc, _, err = _run(capsys, "eval", str(bad), "--eval-tokens", "64", "-q")
    assert rc == 2 and "safetensors file of the checkpoint is unreadable" in err


def test_sweep_report_and_demo_refuse_outputs_that_would_lose_work(capsys, tmp_path):
    """Checked before any work: a directory where a file goes, a file where the demo's directory goes, and earlier
    sweep records that neither --resume nor --overwrite asked to touch. Unreadable inputs name their file."""
    rc, _, err = _run(capsys, "sweep", "--no-init", "-o", str(tmp_path), "-q")
    assert rc == 2 and "is a directory: pass a file path" in err
    rc, _, err = _run(capsys, "sweep", "--no-init", "--plot", str(tmp_path), "-o", str(tmp_path / "s.json"), "-q")
    assert rc == 2 and "is a directory" in err
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"records": _records()}))
    rc, _, err = _run(capsys, "sweep", "--no-init", "--model", "/nonexistent/model", "-o", str(earlier), "-q")
    assert rc == 2 and "pass --resume to continue it or --overwrite to replace it" in err
    assert json.loads(earlier.read_text())["records"] == _records()
    for flag in ("--resume", "--overwrite"):  # past the check: then the bad model is what is reported
        rc, _, err = _run(capsys, "sweep", "--no-init", "--model", "/nonexistent/model", "-o", str(earlier), flag, "-q")
        assert rc == 2 and "neither 'smollm2-135m' nor a local checkpoint" in err
    for flag in ("--no-init", "--no-finetune"):  # --steps would be recorded as 0 silently
        rc, _, err = _run(capsys, "sweep", flag, "--steps", "5", "-o", str(tmp_path / "new.json"), "-q")
        assert rc == 2 and f"--steps 5 with {flag}" in err and not (tmp_path / "new.json").exists()
    rc, _, err = _run(capsys, "report", str(tmp_path / "missing.json"), "-q")
    assert rc == 2 and "missing.json does not exist" in err
    (tmp_path / "bad.json").write_text("{not json")
    rc, _, err = _run(capsys, "report", str(tmp_path / "bad.json"), "-q")
    assert rc == 2 and "bad.json is not a sweep's JSON file" in err
    rc, _, err = _run(capsys, "report", str(earlier), "-o", str(tmp_path), "-q")
    assert rc == 2 and "is a directory" in err
    rc, _, err = _run(capsys, "demo", "-o", str(earlier), "-q")
    assert rc == 2 and "is a file: pass a directory" in err


def _records():
    recs = [{"method": "fp32", "bits": 32.0, "nominal_bits": 32.0, "ppl_quantized": 12.0}]
    for m, b, nb, p in [("qlora", 4.0, 4.0, 15.0), ("lowra", 4.0, 4.0, 14.0), ("qlora", 2.5, 2.467, 1e9),
                        ("lowra", 2.5, 2.5, 5e4), ("lowra", 1.75, 1.75, 1e5)]:
        recs.append({"method": m, "bits": b, "nominal_bits": nb, "effective_bits": nb + 0.9, "ppl_quantized": p,
                     "ppl_init": p / 2, "precision_mix": {"2": 0.5, "4": 0.5}})
    return recs


def test_results_table_and_plot(tmp_path):
    table = sweep.results_table(_records(), "ppl_quantized")
    lines = table.splitlines()
    assert lines[0].startswith("| bits") and "QLoRA" in lines[0] and "LowRA (PA + MTSearch)" in lines[0]
    row_175 = next(line for line in lines if line.startswith("| 1.75"))
    assert row_175.split("|")[2].strip() == "-"  # QLoRA has no 1.75-bit record
    assert "15.00 (4.000)" in table and "1e+09 (2.467)" in table
    png = sweep.plot(_records(), tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_skips_unsupported_pairs():
    grid = sweep.plan_grid(["qlora", "lowra"], [1.75, 4, 2])
    assert grid == [("qlora", 4.0), ("lowra", 4.0), ("qlora", 2.0), ("lowra", 2.0), ("lowra", 1.75)]
    with pytest.raises(ValueError, match="unknown method"):
        sweep.plan_grid(["nf4"], [4])
    assert sweep.plan_grid(["lowra", "lowra"], [2]) == [("lowra", 2.0)]  # named twice, run once


def test_sweep_with_nothing_to_run_and_conflicting_keep_flags_are_refused(capsys, monkeypatch, tmp_path):
    out = tmp_path / "s.json"
    rc, err = _refused_before_loading(capsys, monkeypatch, "sweep", "--methods", "qlora", "--bits", "1.5",
                                      "--no-dense", "-o", str(out), "-q")  # fmt: skip
    assert rc == 2 and "nothing to run" in err and not out.exists()
    rc, err = _refused_before_loading(capsys, monkeypatch, "sweep", "--resume", "--overwrite", "-o", str(out), "-q")
    assert rc == 2 and "not allowed with argument" in err


def test_markdown_report_has_tables_and_bits():
    md = sweep.markdown_report(_records(), "p.png")
    assert "Full precision (fp32) perplexity: **12.00**" in md
    assert "### Perplexity after quantization" in md and "### Perplexity after LoRA initialization" in md
    assert "after fine-tuning" not in md  # no record has that stage
    assert "![perplexity against bits](p.png)" in md
    assert "| lowra  | 1.75 |   1.750 |     2.650 |                    0.0% / 50.0% / 50.0% |" in md
    recs = _records()
    recs[0]["ppl_finetuned"] = 10.5  # the fp32 record trained with the sweep's protocol
    assert "fp32) perplexity: **12.00**; after LoRA fine-tuning with the same protocol: **10.50**" in \
        sweep.markdown_report(recs)


def test_finetune_args_validation_and_optimizer():
    from bitsandbytes_lowra.finetune import FinetuneArgs

    a = FinetuneArgs(steps=3)
    assert a.resolved_optim() in ("adamw_torch", "paged_adamw_32bit")
    assert FinetuneArgs(optim="paged_adamw_8bit").resolved_optim() == "paged_adamw_8bit"
    assert a.to_dict()["lora_alpha"] == a.lora_r  # scaling 1 by default, as the paper
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        FinetuneArgs(batch_size=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        FinetuneArgs(lr=float("nan"))
    with pytest.raises(ValueError, match="dataset must be one of"):
        FinetuneArgs(dataset="c4")


def test_sweep_protocol_defaults_fit_the_cpu_budget():
    # The documented sweep protocol: 40 steps x 4 x 128 tokens without checkpoint recompute; flags reach the trainer.
    args = cli.build_parser().parse_args(["sweep"])
    p = cli._protocol(args, cli._sweep_steps(args))
    assert (p.finetune_steps, p.finetune["batch_size"], p.finetune["seq_len"]) == (40, 4, 128)
    assert p.finetune_args().gradient_checkpointing is False
    args = cli.build_parser().parse_args(["sweep", "--gradient-checkpointing", "--seq-len", "256"])
    p = cli._protocol(args, cli._sweep_steps(args))
    assert p.finetune_args().gradient_checkpointing is True and p.finetune_args().seq_len == 256
    assert p.key()["finetune"]["gradient_checkpointing"] is True  # part of the protocol: --resume keeps them apart


def test_trainer_gets_the_recompute_flag_under_its_installed_name():
    # transformers 5.17 knows only gradient_checkpointing*, later 5.x prefer activation_checkpointing*.
    from transformers import TrainingArguments

    from bitsandbytes_lowra.finetune import _checkpointing_kwargs

    for enabled in (True, False):
        kwargs = _checkpointing_kwargs(enabled)
        targs = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], **kwargs)
        assert getattr(targs, next(iter(kwargs))) is enabled


def test_fsdp2_never_gets_a_bitsandbytes_optimizer(monkeypatch):
    from bitsandbytes_lowra.finetune import FinetuneArgs

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert FinetuneArgs().resolved_optim() == "adamw_torch"  # even where CUDA would pick paged_adamw_32bit
    with pytest.raises(ValueError, match="cannot update FSDP2's sharded"):
        FinetuneArgs(optim="paged_adamw_32bit").resolved_optim()
    monkeypatch.setenv("FSDP_VERSION", "1")  # flat plain-tensor parameters: bitsandbytes optimizers work
    assert FinetuneArgs(optim="paged_adamw_8bit").resolved_optim() == "paged_adamw_8bit"


def test_fsdp_cpu_offload_is_refused_before_anything_loads(monkeypatch, capsys, tmp_path):
    """accelerate passes fsdp_offload_params as FSDP_OFFLOAD_PARAMS; finetune refuses it before resolving a model
    (the model named here does not exist, which would otherwise fail first)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert cli.main([*FINETUNE, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "lowra finetune: error: FSDP CPU offload" in err and "fsdp_offload_params: false" in err
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    from bitsandbytes_lowra.finetune import check_fsdp_offload

    check_fsdp_offload()  # no offload: nothing to refuse
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    check_fsdp_offload()  # not an FSDP launch: the variable means nothing


# ------------------------------------------------------------------------------------------------------ review fixes


def _subparsers():
    import argparse

    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_every_flag_has_help_and_states_its_default():
    import argparse

    parser, commands = _subparsers()
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in [("lowra", parser), *commands.items()]
               for a in p._actions if a.help is None and not isinstance(a, argparse._SubParsersAction)]  # fmt: skip
    assert not missing, f"flags without help: {missing}"
    by_flag = {name: {o: a.help for a in p._actions for o in a.option_strings} for name, p in commands.items()}
    assert "default on" in by_flag["finetune"]["--gradient-checkpointing"]
    assert "--no-gradient-checkpointing" in by_flag["finetune"]["--gradient-checkpointing"]
    assert "default 4 2 1.75 1.25" in by_flag["memory"]["--bits"]
    for name in ("plan", "quantize", "finetune", "eval"):
        assert "in [1, 4] (qlora and loftq: at least 2)" in by_flag[name]["--bits"], name
    # every range a flag's type enforces is in its help (added where the help did not state it)
    unstated = [f"{name} {o}" for name, p in commands.items() for a in p._actions for o in a.option_strings
                if getattr(a.type, "range", None) and a.type.range[0] not in a.help]  # fmt: skip
    assert not unstated, unstated
    assert by_flag["finetune"]["--lora-r"] == "LoRA rank, an integer >= 1 (default 16)"
    assert by_flag["finetune"]["--lr"] == "learning rate, > 0 (default 3e-4, the paper's)"


def test_finetune_gradient_checkpointing_defaults_on_and_turns_off():
    parser = cli.build_parser()
    assert parser.parse_args(["finetune", "--bits", "2", "-o", "x"]).gradient_checkpointing is True
    args = parser.parse_args(["finetune", "--bits", "2", "-o", "x", "--no-gradient-checkpointing"])
    assert args.gradient_checkpointing is False


def test_version_flag(capsys):
    from bitsandbytes_lowra import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lowra {__version__}"


def _refused_before_loading(capsys, monkeypatch, *argv):
    """(exit status, stderr) of `lowra ARGV`, failing the test if the model was resolved or loaded first."""
    from bitsandbytes_lowra import finetune

    def touched(*a, **k):
        pytest.fail(f"lowra {' '.join(argv)} touched the model before refusing its arguments")

    monkeypatch.setattr(sweep, "resolve_checkpoint", touched)
    monkeypatch.setattr(finetune, "load_quantized", touched)
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's error
        rc = e.code
    return rc, capsys.readouterr().err


FINETUNE = ["finetune", "--model", "/nonexistent/model", "--bits", "2", "-q"]


@pytest.mark.parametrize("argv, message", [
    ([*FINETUNE, "--lora-dropout", "1.5"], "argument --lora-dropout: must be a number in [0, 1), got 1.5"),
    ([*FINETUNE, "--warmup-ratio", "1"], "argument --warmup-ratio: must be a number in [0, 1), got 1"),
    ([*FINETUNE, "--warmup-ratio", "3"], "argument --warmup-ratio: must be a number in [0, 1), got 3"),
    ([*FINETUNE, "--warmup-ratio", "-0.1"], "argument --warmup-ratio: must be a number in [0, 1), got -0.1"),
    ([*FINETUNE, "--scheduler", "bogus"], "argument --scheduler: invalid choice: 'bogus'"),
    ([*FINETUNE, "--optim", "bogus"], "argument --optim: unknown optimizer 'bogus'"),
    ([*FINETUNE, "--eval-tokens", "-3"], "argument --eval-tokens: must be 0 or an integer >= 2, got -3"),
    ([*FINETUNE, "--loftq-iterations", "0"], "argument --loftq-iterations: must be an integer >= 1, got 0"),
    ([*FINETUNE, "--weight-decay", "-1"], "argument --weight-decay: must be a number >= 0, got -1"),
    ([*FINETUNE, "--max-grad-norm", "-1"], "argument --max-grad-norm: must be a number >= 0, got -1"),
    (["eval", "smollm2-135m", "--rouge", "-1", "-q"], "argument --rouge: must be an integer >= 0, got -1"),
    (["eval", "smollm2-135m", "--eval-tokens", "-5", "-q"], "argument --eval-tokens: must be 0 or an integer >= 2"),
    (["eval", "smollm2-135m", "--context", "0", "-q"], "argument --context: must be an integer >= 2, got 0"),
    (["eval", "smollm2-135m", "--eval-batch-size", "0", "-q"], "argument --eval-batch-size: must be an integer >= 1"),
    # the training flags every training command shares (finetune, sweep, demo) and memory's
    ([*FINETUNE, "--steps", "-1"], "argument --steps: must be an integer >= 0, got -1"),
    ([*FINETUNE, "--lora-r", "0"], "argument --lora-r: must be an integer >= 1, got 0"),
    ([*FINETUNE, "--lr", "0"], "argument --lr: must be a number > 0, got 0"),
    ([*FINETUNE, "--lr", "-1"], "argument --lr: must be a number > 0, got -1"),  # not ">= 0"
    ([*FINETUNE, "--lr", "nan"], "argument --lr: must be a number > 0, got nan"),
    ([*FINETUNE, "--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got -1"),
    (["sweep", "--model", "/nonexistent/model", "--seed", "4294967296", "-q"], "argument --seed: must be an integer"),
    ([*FINETUNE, "--seq-len", "1"], "argument --seq-len: must be an integer >= 2, got 1"),
    ([*FINETUNE, "--grad-accum", "0"], "argument --grad-accum: must be an integer >= 1, got 0"),
    (["sweep", "--model", "/nonexistent/model", "--steps", "-1", "-q"], "argument --steps: must be an integer >= 0"),
    (["memory", "llama-2-7b", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
])  # fmt: skip
def test_argument_ranges_are_checked_by_the_parser(capsys, monkeypatch, tmp_path, argv, message):
    rc, err = _refused_before_loading(capsys, monkeypatch, *argv, *(["-o", str(tmp_path / "run")]
                                                                    if argv[0] == "finetune" else []))  # fmt: skip
    assert rc == 2 and message in err
    assert not (tmp_path / "run").exists()


def test_outputs_that_cannot_be_written_are_refused_before_any_work(capsys, monkeypatch, tmp_path):
    """A file where -o takes a directory, an existing non-plan file as plan -o (it was silently replaced), and an
    output nobody can write are one-line errors (exit 2) before the model is resolved, not tracebacks after the run
    (finetune used to find out after training)."""
    note = tmp_path / "notes.txt"
    note.write_text("keep me")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a parent directory would have to be")
    cases = [
        (["quantize", "smollm2-135m", "--bits", "2", "-o", str(note), "--overwrite"], f"{note} is a file"),
        ([*FINETUNE, "-o", str(note)], f"{note} is a file"),
        (["plan", "smollm2-135m", "--bits", "2", "-o", str(note)], "is not a LowRA plan"),
        (["plan", "smollm2-135m", "--bits", "2", "-o", str(blocked)], f"{blocked} is a file"),
        ([*FINETUNE, "-o", str(blocked / "run")], f"cannot write to {blocked / 'run'}"),
        (["quantize", "smollm2-135m", "--bits", "2", "-o", str(blocked / "q")], f"cannot write to {blocked / 'q'}"),
        (["plan", "smollm2-135m", "--bits", "2", "-o", str(blocked / "p.safetensors")], f"cannot write to {blocked}"),
    ]
    for argv, message in cases:
        rc, err = _refused_before_loading(capsys, monkeypatch, *argv, "-q")
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)
    assert note.read_text() == "keep me"


def test_malformed_report_and_memory_inputs_are_named_errors(capsys, tmp_path):
    cases = {"list.json": ("memory", b"[1, 2]", "its JSON is a list"),
             "text.json": ("memory", b"root:x:0:0", "is not a JSON model config"),
             "binary.json": ("memory", b"\xff\xfe\x00", "is not a JSON model config"),
             "record.json": ("report", b'{"records": [{"bits": 2}]}', "record 0 is not a sweep record")}  # fmt: skip
    for name, (command, data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        rc, _, err = _run(capsys, command, str(tmp_path / name))
        assert rc == 2 and message in err and str(tmp_path / name) in err, err


def test_json_output_has_null_for_non_finite_numbers(capsys):
    """A diverged perplexity is NaN or inf: not JSON, which strict parsers refuse; --json writes null."""
    import argparse

    args = argparse.Namespace(json=True)
    cli._emit(args, {"ppl": float("nan"), "inner": [float("inf"), 1.5], "ok": 2.0}, "unused")
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in --json output")) == \
        {"ppl": None, "inner": [None, 1.5], "ok": 2.0}


def test_commands_that_quantize_refuse_an_already_quantized_checkpoint(capsys, tmp_path):
    """plan / quantize / finetune on a quantized checkpoint: named as such, before any planning (it said "must be
    2-D [out_features, in_features]" of the first layer's packed codes)."""
    ckpt = tmp_path / "q"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "lowra", "bits": 2}}))  # fmt: skip
    for argv in (["plan", str(ckpt), "--bits", "2"], ["quantize", str(ckpt), "--bits", "2", "-o", str(tmp_path / "o")],
                 ["finetune", "--model", str(ckpt), "--bits", "2", "-o", str(tmp_path / "f")]):
        rc, _, err = _run(capsys, *argv, "-q")
        assert rc == 2 and f"{ckpt} is already quantized (lowra)" in err, err


def test_quantize_and_finetune_refuse_to_write_over_their_input(capsys, tmp_path):
    """-o naming the input checkpoint with --overwrite wrote the quantized model over the dense one being read."""
    ckpt = tmp_path / "dense"
    ckpt.mkdir()
    config = json.dumps({"model_type": "llama"})
    (ckpt / "config.json").write_text(config)
    for argv in (["quantize", str(ckpt), "--bits", "2", "-o", str(ckpt)],
                 ["finetune", "--model", str(ckpt), "--bits", "2", "-o", str(tmp_path / "." / "dense")]):
        rc, _, err = _run(capsys, *argv, "--overwrite", "-q")
        assert rc == 2 and "is the input checkpoint: its files would be overwritten" in err, err
    assert [p.name for p in ckpt.iterdir()] == ["config.json"] and (ckpt / "config.json").read_text() == config


def test_report_plot_without_stage_writes_one_file_per_stage(capsys, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"records": _records()}))
    rc, out, err = _run(capsys, "report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "ppl.png"))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["ppl-init.png", "ppl-quantized.png"]


def test_eval_method_without_bits_and_sweep_bits_range(capsys, monkeypatch):
    rc, err = _refused_before_loading(capsys, monkeypatch, "eval", "smollm2-135m", "--method", "qlora", "-q")
    assert rc == 2 and "--method qlora needs --bits" in err  # it evaluated the dense model, quietly
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "bit budgets, each in [1, 4]" in help_text


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    """`lowra ... --json | head -1`: the reader goes away; no BrokenPipeError traceback."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "bitsandbytes_lowra", "memory", "llama-2-7b", "--json"], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=300)  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("argv", [
    ["plan", "smollm2-135m", "--bits", "1.5", "--method", "qlora"],
    ["quantize", "smollm2-135m", "--bits", "1.5", "--method", "loftq", "-o", "{tmp}/q"],
    ["eval", "smollm2-135m", "--bits", "1.5", "--method", "qlora"],
    ["finetune", "--bits", "1.5", "--method", "qlora", "-o", "{tmp}/run"],
])  # fmt: skip
def test_bits_below_the_methods_range_are_refused_before_the_model_is_resolved(capsys, monkeypatch, tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, err = _refused_before_loading(capsys, monkeypatch, *argv, "-q")
    assert rc == 2 and "--bits 1.5 with --method" in err and "cannot go below 2 bits" in err
    assert len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_finetune_args_refuse_out_of_range_training_settings():
    from bitsandbytes_lowra.finetune import SCHEDULERS, FinetuneArgs, optimizer_names

    for field, value, message in [("lora_dropout", 1.5, "lora_dropout must be in [0, 1)"),
                                  ("warmup_ratio", 1.0, "warmup_ratio must be in [0, 1)"),
                                  ("warmup_ratio", float("nan"), "warmup_ratio must be in [0, 1)"),
                                  ("weight_decay", -1.0, "weight_decay must be a number >= 0"),
                                  ("max_grad_norm", -1.0, "max_grad_norm must be a number >= 0"),
                                  ("scheduler", "bogus", "scheduler must be one of"),
                                  ("optim", "bogus", "optim must be one of transformers' optimizer")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            FinetuneArgs(**{field: value})
    FinetuneArgs(lora_dropout=0.1, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=0.0, scheduler="linear",
                 optim="adamw_torch")  # fmt: skip
    # the schedulers offered are transformers' own names, the optimizers transformers' whole list
    from transformers.trainer_utils import SchedulerType

    assert set(SCHEDULERS) <= {s.value for s in SchedulerType}
    assert {"adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit"} <= set(optimizer_names())


@pytest.mark.parametrize("ratio, steps, warmup",
                         [(0.03, 40, 2), (0.5, 40, 20), (0.0, 40, 0), (0.99, 10, 9), (0.03, 1, 0), (0.5, 2, 1)])
def test_warmup_ratio_reaches_the_trainer_as_a_ratio(tmp_path, ratio, steps, warmup):
    """ceil(ratio x steps) warmup steps, but never all of them (warmup starts at lr 0: a 1-step run would not train)"""
    from transformers import TrainingArguments

    from bitsandbytes_lowra.finetune import _warmup_kwargs

    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=steps,
                              **_warmup_kwargs(ratio, steps))  # fmt: skip
    assert targs.get_warmup_steps(steps) == warmup


def test_json_output_is_the_only_thing_on_stdout(capsys):
    """Whatever a command (or a library under it, as Trainer's log dicts) prints on stdout goes to stderr under
    --json; stdout holds the JSON document alone."""
    import argparse

    def noisy(args):
        print({"loss": 10.8, "epoch": 1})
        cli._emit(args, {"ok": True}, "text")
        return 0

    rc = cli._run_command(argparse.Namespace(json=True, func=noisy))
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out) == {"ok": True} and "'loss'" in err
    rc = cli._run_command(argparse.Namespace(json=False, func=noisy))
    out, err = capsys.readouterr()
    assert rc == 0 and out.splitlines() == ["{'loss': 10.8, 'epoch': 1}", "text"] and err == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_finetune_json_stdout_is_valid_json(capsys, tmp_path, monkeypatch, tiny_checkpoint, quiet):
    """Trainer prints its log dicts ({'loss': ...}, {'train_runtime': ...}) on stdout; under --json they go to
    stderr with the other logs (and with -q nowhere), so stdout parses as one JSON document."""
    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    rc, out, err = _run(capsys, "finetune", "--model", str(tiny_checkpoint), "--bits", "2", "--method", "qlora",
                        "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--logging-steps", "1",
                        "--no-gradient-checkpointing", "-o", str(tmp_path / "run"), "--json",
                        *(["-q"] if quiet else []))  # fmt: skip
    assert rc == 0, err
    metrics = json.loads(out)
    assert metrics["train"]["steps"] == 2 and len(metrics["train"]["loss_curve"]) == 2
    assert metrics["args"]["warmup_ratio"] == 0.03
    assert ("'loss'" in err) is not quiet


def test_sweep_plots_next_to_its_records_by_default(capsys, tmp_path, monkeypatch):
    """Without --plot the PNG goes beside --output (runs/a.json -> runs/a.png), so two sweeps side by side in one
    directory do not overwrite one plot."""
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: _records())
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        rc, out, err = _run(capsys, "sweep", "--no-init", "-o", str(runs / f"{name}.json"), "-q")
        assert rc == 0, err
        assert f"plot: {runs / f'{name}.png'}" in out and (runs / f"{name}.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written to the working directory


def test_sweep_json_stdout_is_valid_json(capsys, tmp_path, monkeypatch, tiny_checkpoint):
    """The sweep fine-tunes through the same Trainer: its --json output is one JSON document too."""
    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    rc, out, err = _run(capsys, "sweep", "--model", str(tiny_checkpoint), "--methods", "qlora", "--bits", "4",
                        "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "256", "--context",
                        "64", "--no-dense", "-o", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"),
                        "--json")  # fmt: skip
    assert rc == 0, err
    (record,) = json.loads(out)["records"]
    assert record["method"] == "qlora" and record["steps"] == 2 and "'train_runtime'" in err


def _doc_usages():
    """(command, usage line) of each usage block in docs/cli.md (continuation lines joined)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    usages, current = [], None
    for line in text.splitlines():
        if line.startswith("    lowra "):
            current = line.strip()
            usages.append(current)
        elif current is not None and line.startswith("        ") and usages[-1].endswith("\\"):
            usages[-1] = usages[-1][:-1] + " " + line.strip()
        else:
            current = None
    return [(u.split()[1], u) for u in usages]


def test_docs_usage_lines_match_the_parser():
    """Every flag in docs/cli.md's usage lines exists, a bracketed numeric value is the flag's default, and an
    on/off flag is shown in the form that changes its default (finetune: --no-gradient-checkpointing)."""
    import argparse

    _, commands = _subparsers()
    usages = _doc_usages()
    assert {c for c, _ in usages} == set(COMMANDS)
    for command, usage in usages:
        actions = {o: a for a in commands[command]._actions for o in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage):
            assert flag in actions, f"docs/cli.md: lowra {command} has no {flag}"
        for flag, value in re.findall(r"\[(--[\w-]+) ([\d.]+)\]", usage):
            assert float(actions[flag].default) == float(value), f"docs/cli.md: lowra {command} {flag} default"
        for flag in re.findall(r"\[(--[\w-]+)\]", usage):
            a = actions[flag]
            if isinstance(a, argparse.BooleanOptionalAction):
                assert flag.startswith("--no-") is (a.default is True), f"docs/cli.md: lowra {command} {flag}"


def test_eval_names_a_lowra_checkpoint_that_lost_its_quantization_config(capsys, tmp_path, monkeypatch,
                                                                         tiny_checkpoint):
    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    out = tmp_path / "q"
    rc, _, err = _run(capsys, "quantize", str(tiny_checkpoint), "--bits", "4", "--method", "qlora", "-o", str(out),
                      "-q")  # fmt: skip
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    rc, _, err = _run(capsys, "eval", str(out), "--eval-tokens", "64", "--context", "32", "-q")
    assert rc == 2 and "holds LowRA-quantized layers but its config.json has no LowRA quantization_config" in err


def test_plan_hint_names_the_settings_the_plan_was_made_for(capsys, tmp_path, monkeypatch, tiny_checkpoint):
    """The quantizer refuses a plan made for other settings than its config's: the LowRAConfig `plan` suggests for
    a LowRA-PA plan (fixed NF levels) must say learner_mode='fixed_mapping', and load."""
    from transformers import AutoModelForCausalLM

    from bitsandbytes_lowra import LowRAConfig

    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    out_file = tmp_path / "pa.safetensors"
    rc, out, err = _run(capsys, "plan", str(tiny_checkpoint), "--bits", "1.5", "--method", "lowra-pa", "-o",
                        str(out_file), "-q")  # fmt: skip
    assert rc == 0, err
    hint = re.search(r"LowRAConfig\((.*)\)", out).group(1)
    assert "learner_mode='fixed_mapping'" in hint
    call = ast.parse(f"LowRAConfig({hint})").body[0].value  # the suggestion as a user would paste it
    config = LowRAConfig(**{k.arg: ast.literal_eval(k.value) for k in call.keywords})
    AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=config, device_map="cpu")


def test_import_drops_only_bitsandbytes_hub_kernel_notice():
    """`import bitsandbytes_lowra` keeps bitsandbytes' kernels-community notice (a bnb CPU kernel LowRA never calls)
    off stderr, and nothing else that bitsandbytes' CPU backend logs."""
    import logging

    r = subprocess.run([sys.executable, "-c", "import bitsandbytes_lowra"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "kernels-community" not in r.stderr
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
        logger.warning("some other bitsandbytes CPU notice")
    finally:
        logger.removeHandler(handler)
    assert [rec.getMessage() for rec in seen] == ["some other bitsandbytes CPU notice"]


def test_demo_says_its_table_is_before_lora(capsys, tmp_path, monkeypatch):
    """The demo's table is of quantized weights alone; its output says so and points at the sweep that fine-tunes
    (the records come from the recorded sweep, so the table is a real one without minutes of planning)."""
    from pathlib import Path

    from bitsandbytes_lowra import sweep

    recorded = json.loads((Path(__file__).parents[1] / "docs/results/quality.json").read_text())
    recorded = recorded["records"] if isinstance(recorded, dict) else recorded
    picked = [r for r in recorded if r["method"] in ("fp32", "qlora", "lowra") and r["bits"] in (32, 4, 1.75)]
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: picked)
    rc, out, err = _run(capsys, "demo", "-o", str(tmp_path / "demo"), "-q")
    assert rc == 0, err
    assert "before any LoRA" in out and "lowra sweep" in out
    assert "19.31" in out  # the table itself is still printed (QLoRA at 4 bits, from the recorded records)


def test_finetune_aclsum_refuses_a_second_epoch_before_planning(capsys, tmp_path, monkeypatch, tiny_checkpoint):
    """The default 40 steps x 4 sequences would take 1.6 passes over the 100 ACLSum train papers: refused before the
    plan is made (Trainer used to start the second epoch silently)."""
    from bitsandbytes_lowra import baselines

    monkeypatch.setattr(baselines, "method_plan", lambda *a, **k: pytest.fail("planned before refusing the data"))
    rc, _, err = _run(capsys, "finetune", "--model", str(tiny_checkpoint), "--bits", "2", "--dataset", "aclsum",
                      "-o", str(tmp_path / "run"), "-q")  # fmt: skip
    assert rc == 2 and "need 160 (1.60 epochs): take at most 25 steps" in err and "--allow-repeat" in err


def test_finetune_aclsum_logs_and_records_its_data_and_epochs(capsys, tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    rc, out, err = _run(capsys, "finetune", "--model", str(tiny_checkpoint), "--bits", "2", "--method", "qlora",
                        "--dataset", "aclsum", "--steps", "2", "--batch-size", "1", "--seq-len", "192",
                        "--no-gradient-checkpointing", "-o", str(tmp_path / "run"), "--json")  # fmt: skip
    assert rc == 0, err
    metrics = json.loads(out)
    data = metrics["train"]["data"]
    assert metrics["train"]["epochs"] == 0.02 and data["epochs"] == 0.02 and metrics["args"]["allow_repeat"] is False
    assert data["dataset"] == "aclsum" and data["sequences"] + data["skipped"] == data["papers"] == 100
    assert data["truncated"] > 50 and data["target_tokens"] < data["tokens"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]["data"] == data
    assert f"{data['truncated']} of 100 abstracts cut to fit" in err and "the steps take 0.02 epochs" in err


def test_eval_rouge_json_keeps_each_prediction_and_reference(capsys, tmp_path, tiny_checkpoint):
    """The ROUGE spot check can be audited: the JSON holds every generated summary with its reference and scores."""
    from bitsandbytes_lowra.eval.rouge import aclsum_examples

    rc, out, err = _run(capsys, "eval", str(tiny_checkpoint), "--rouge", "2", "--max-new-tokens", "3", "--eval-tokens",
                        "64", "--context", "32", "--json", "-q")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out)["rouge"]
    assert r["n_examples"] == 2 and len(r["examples"]) == 2
    refs = [e["reference"] for e in aclsum_examples("test", 2)]
    for ex, ref in zip(r["examples"], refs):
        assert set(ex) == {"id", "prediction", "reference", "rouge1", "rouge2", "rougeL"} and ex["reference"] == ref
    assert r["rouge1"] == pytest.approx(sum(e["rouge1"] for e in r["examples"]) / 2)


def test_sweep_refuses_too_many_steps_before_quantizing_unless_allowed(capsys, tmp_path, monkeypatch, tiny_checkpoint):
    """`lowra sweep` checks its training data up front (it used to, only when the first training started: after the
    first quantization); --allow-repeat reaches FinetuneArgs and the protocol key, left alone unless it is given."""
    from bitsandbytes_lowra import baselines

    monkeypatch.setattr(baselines, "method_plan", lambda *a, **k: pytest.fail("planned before refusing the data"))
    rc, _, err = _run(capsys, "sweep", "--model", str(tiny_checkpoint), "--methods", "qlora", "--bits", "4", "--steps",
                      "100000", "--no-dense", "-o", str(tmp_path / "s.json"), "-q")  # fmt: skip
    assert rc == 2 and "epochs): take at most" in err and "--allow-repeat" in err
    args = cli.build_parser().parse_args(["sweep", "--allow-repeat"])
    assert cli._protocol(args, cli._sweep_steps(args)).finetune_args().allow_repeat is True
    args = cli.build_parser().parse_args(["sweep"])
    assert "allow_repeat" not in cli._protocol(args, cli._sweep_steps(args)).key()["finetune"]


def test_report_adds_text_only_tables_where_records_have_them(capsys, tmp_path):
    """Records with ppl_text get a second, text-only table; older records without it show '-' there."""
    recs = _records()
    for r in recs:
        if r["method"] == "lowra":
            r["ppl_text_quantized"] = r["ppl_quantized"] * 0.9
    recs[0].update(ppl_text_quantized=11.0, ppl_finetuned=10.5, ppl_text_finetuned=10.25)
    (tmp_path / "s.json").write_text(json.dumps({"records": recs}))
    rc, out, err = _run(capsys, "report", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "r.md"))
    assert rc == 0, err
    table = out.split("perplexity after quantization, text only")[1]
    assert "after LoRA initialization, text only" not in out  # no record has that stage text only
    row = next(line for line in table.splitlines() if line.startswith("4 "))
    assert row.split()[1:] == ["-", "12.60", "(4.000)"]  # QLoRA: an older record
    assert "fp32) perplexity: 12.00; after LoRA fine-tuning with the same protocol: 10.50. Text only" in out
    md = (tmp_path / "r.md").read_text()
    assert "### Perplexity after quantization, text only" in md and "after LoRA: **10.25**" in md


def test_eval_says_when_it_truncated_the_eval_split(capsys, tiny_checkpoint):
    from transformers import AutoTokenizer

    from bitsandbytes_lowra.eval.perplexity import wiki_eval_tokens

    rc, out, err = _run(capsys, "eval", str(tiny_checkpoint), "--eval-tokens", "64", "--context", "32", "-q")
    assert rc == 0, err
    available = wiki_eval_tokens(AutoTokenizer.from_pretrained(tiny_checkpoint)).numel()
    assert f"truncated to the first 64 of {available:,} tokens of the eval split" in out
    rc, out, err = _run(capsys, "eval", str(tiny_checkpoint), "--eval-tokens", "0", "--context", "512", "--json", "-q")
    assert rc == 0, err
    p = json.loads(out)["perplexity"]
    assert p["input_tokens"] == p["available_tokens"] == available and p["truncated"] is False


def test_eval_slices_json(capsys, tiny_checkpoint):
    """`lowra eval --slices N`: N disjoint lead-aligned slices of --eval-tokens each, per slice and pooled."""
    rc, out, err = _run(capsys, "eval", str(tiny_checkpoint), "--slices", "3", "--eval-tokens", "40", "--context",
                        "32", "--json", "-q")  # fmt: skip
    assert rc == 0, err
    doc = json.loads(out)["slices"]
    assert [s["index"] for s in doc["slices"]] == [0, 1, 2] and doc["slices"][0]["start"] == 0
    assert all(s["input_tokens"] == 40 and not s["truncated"] and s["ppl_text"] > 1 for s in doc["slices"])
    assert doc["pooled"]["tokens"] == sum(s["tokens"] for s in doc["slices"])
    assert doc["pooled"]["ppl"] == pytest.approx(
        math.exp(sum(s["total_nll"] for s in doc["slices"]) / doc["pooled"]["tokens"]))


def test_finetune_eval_tokens_records_each_stage_as_the_sweep_does(capsys, tmp_path, monkeypatch, tiny_checkpoint):
    """--eval-tokens: the metrics carry ppl_<stage>, ppl_text_<stage> and evals[<stage>], the sweep records' fields."""
    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    rc, out, err = _run(capsys, "finetune", "--model", str(tiny_checkpoint), "--bits", "2", "--method", "qlora",
                        "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64",
                        "--no-gradient-checkpointing", "-o", str(tmp_path / "run"), "--json", "-q")  # fmt: skip
    assert rc == 0, err
    metrics = json.loads(out)
    for stage in ("init", "finetuned"):
        ev = metrics["evals"][stage]
        assert metrics[f"ppl_{stage}"] == ev["ppl"] and metrics[f"ppl_text_{stage}"] == ev["ppl_text"]
        assert ev["input_tokens"] == 64 and ev["truncated"] and ev["tokens_text"] < ev["tokens"]
