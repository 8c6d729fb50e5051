"""The kernel benchmark's measurement code on a small layer (GPU only): every contender runs, results are of a
correct product, and the summary table renders. Timings here are not results (docs/benchmarks.md has those)."""

import pytest
import torch

cuda = pytest.mark.cuda


@cuda
def test_bench_shape_runs_every_contender_and_checks_the_product():
    import bitsandbytes

    from bitsandbytes_lowra.bench import kernels

    res = kernels.bench_shape(256, 1024, [1, 4], copy_bw=4e12, replays=2, min_calls=2, bnb=bitsandbytes)
    for m in ("1", "4"):
        row = res["matmul"][m]
        for name in ("lowra_4bit", "lowra_1.75bit", "lowra_1.75bit_dq", "lowra_1.75bit_dq_prepass", "bnb_nf4",
                     "bnb_nf4_dq", "bf16"):
            assert row[name]["ms"] > 0, name
    d = res["dequantize"]
    assert d["copy_same_bytes"]["ms"] > 0 and d["lowra_4bit"]["frac_of_same_size_copy"] > 0
    mix = d["copy_dequant_mix"]  # the copy with dequantize's 1:4 read:write mix (Triton comes with CUDA torch)
    assert mix["bytes_written"] == 4 * mix["bytes_read"] == 256 * 1024 * 2 and d["lowra_4bit"]["frac_of_mix_copy"] > 0
    assert res["check"]["matmul_rel_err"] < 1e-2 and res["check"]["dq_matmul_rel_err"] < 1e-2
    # double-quantized scales: 1 byte per block (+ nested scales) instead of 4
    b = res["check"]["bytes"]
    assert b["lowra_1.75bit_dq"]["meta"] < b["lowra_1.75bit"]["meta"]
    text = kernels.table({"environment": kernels.environment(), "copy_bandwidth_tb_s": 4.0, "shapes": [res]})
    assert "double quant" in text and "256x1024" in text
    torch.cuda.synchronize()


def test_table_renders_a_dequantize_only_run():
    """`--only dequantize` results carry no quantize or matmul part; the table still shows the dequantize row."""
    from bitsandbytes_lowra.bench import kernels

    d = {name: {"frac_of_copy": f} for name, f in (("lowra_4bit", 0.91), ("lowra_1.75bit", 0.72), ("bnb_nf4", 0.56))}
    d["lowra_4bit"]["frac_of_same_size_copy"] = 0.97
    d["speedup_4bit_vs_bnb"] = 1.63
    env = dict(gpu="GPU", torch="2", cuda="13", bitsandbytes="0.50", date="today")
    text = kernels.table({"environment": env, "copy_bandwidth_tb_s": 4.2,
                          "shapes": [{"shape": [4096, 11008], "dequantize": d}]})
    row = [line for line in text.splitlines() if line.startswith(" 4096x11008")]
    assert len(row) == 1 and "91% /  72% /  56% (1.63x; lowra4 97% of a same-size copy)" in row[0], text
    d["copy_dequant_mix"] = {"ms": 1.0}
    d["lowra_4bit"]["frac_of_mix_copy"] = 1.02
    text = kernels.table({"environment": env, "copy_bandwidth_tb_s": 4.2,
                          "shapes": [{"shape": [4096, 11008], "dequantize": d}]})
    assert "97% of a same-size copy, 102% of a 1:4 copy)" in text, text


def _training_row(shape, base, ms, graph_ms, ref_ms, ref_graph):
    return {"shape": shape, "tokens": 512, "base": base, "fwd_bwd_ms": ms, "graph_ms": graph_ms,
            "fwd_bwd_vs_bf16": ms / ref_ms, "graph_vs_bf16": graph_ms / ref_graph}


def test_bench_main_runs_the_kernels_then_the_training_step(monkeypatch, tmp_path, capsys):
    """`python -m bitsandbytes_lowra.bench`: every comparison in one process and one JSON, the training step of each
    layer shape after the kernels; --only training skips the kernels. Measurement functions stubbed (GPU only)."""
    import json

    from bitsandbytes_lowra.bench import __main__ as bench_main
    from bitsandbytes_lowra.bench import e2e, kernels

    calls = []
    env = dict(gpu="GPU", torch="2", cuda="13", bitsandbytes="0.50", date="today")
    monkeypatch.setattr(kernels, "require_gpu_bench", lambda: calls.append("require"))
    monkeypatch.setattr(kernels, "environment", lambda: env)
    monkeypatch.setattr(kernels, "run", lambda shapes, batches, **kw: calls.append(("kernels", shapes, kw["only"]))
                        or {"environment": env, "shapes": []})
    monkeypatch.setattr(kernels, "table", lambda res: "KERNEL TABLE")

    def training(shapes, tokens):
        calls.append(("training", shapes, tokens))
        if calls[0] != "require":  # after the kernels, their results are on disk already
            assert "training" not in json.loads(out.read_text())
        return [_training_row("64x128", "bf16", 1.0, 0.1, 1.0, 0.1),
                _training_row("64x128", "lowra-1.75", 1.5, 0.12, 1.0, 0.1)]

    monkeypatch.setattr(e2e, "training_layer_bench", training)
    out = tmp_path / "bench.json"
    assert bench_main.main(["--shapes", "64x128", "--json", str(out), "--train-tokens", "512", "4096"]) == 0
    assert calls == [("kernels", [(64, 128)], None), ("training", [(64, 128)], [512, 4096])]
    res = json.loads(out.read_text())
    assert [r["base"] for r in res["training"]] == ["bf16", "lowra-1.75"] and res["environment"] == env
    text = capsys.readouterr().out
    assert text.index("KERNEL TABLE") < text.index("lowra-1.75: eager 1.500 ms (1.50x bf16), graph 0.120 ms (1.20x bf16)")
    calls.clear()
    out.unlink()
    assert bench_main.main(["--shapes", "64x128", "--only", "training", "--json", str(out)]) == 0
    assert calls == ["require", ("training", [(64, 128)], [512])]
    assert set(json.loads(out.read_text())) == {"environment", "training"}
    calls.clear()
    assert bench_main.main(["--shapes", "64x128", "--only", "matmul"]) == 0
    assert calls == [("kernels", [(64, 128)], "matmul")]


def test_bench_main_says_why_it_cannot_run(monkeypatch, capsys):
    from bitsandbytes_lowra.bench import __main__ as bench_main
    from bitsandbytes_lowra.bench import kernels

    def unavailable():
        raise kernels.BenchUnavailable("needs a CUDA GPU")

    monkeypatch.setattr(kernels, "require_gpu_bench", unavailable)
    assert bench_main.main(["--only", "training"]) == 2
    assert "bench: needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main.main(["--train-tokens", "0"])


def test_dispatch_table_marks_an_automatic_choice_slower_than_the_best_path():
    from bitsandbytes_lowra.bench import dispatch

    rows = [dict(shape=[8192, 28672], m=2, state="1.75", ms=dict(auto=0.0953, gemv=0.0953, tensor=0.0800)),
            dict(shape=[28672, 8192], m=2, state="1.75", ms=dict(auto=0.0704, gemv=0.0704, tensor=0.0847))]
    lines = dispatch.table(rows).splitlines()
    assert "8192x28672" in lines[1] and "1.191" in lines[1] and "not the faster path" in lines[1]
    assert "28672x8192" in lines[2] and "1.000" in lines[2] and "not the faster path" not in lines[2]


def test_dispatch_refuses_bad_shapes():
    from bitsandbytes_lowra.bench import dispatch

    with pytest.raises(SystemExit):
        dispatch.main(["--batches", "0"])


@cuda
def test_dispatch_times_every_path_on_a_small_layer():
    from bitsandbytes_lowra.bench import dispatch

    res = dispatch.run([(256, 1024)], [2, 4], replays=2, min_calls=2)
    assert [(r["m"], r["state"]) for r in res] == [(m, s) for m in (2, 4) for s in ("1.75", "4", "1.75-dq")]
    for r in res:
        assert set(r["ms"]) == {"auto", "gemv", "tensor"} and min(r["ms"].values()) > 0


def test_dequant_launch_table_marks_an_automatic_launch_slower_than_the_best():
    from bitsandbytes_lowra.bench import dequant_launch

    rows = [dict(shape=[4096, 4096], state="4", ms=dict(auto=0.01303, resident=0.01379, one_task=0.01382),
                 bnb_nf4_ms=0.02038, copy_1to4_ms=0.01095),
            dict(shape=[2048, 2048], state="4", ms=dict(auto=0.0064, resident=0.00554, one_task=0.00554),
                 bnb_nf4_ms=0.00687, copy_1to4_ms=None)]
    lines = dequant_launch.table(rows).splitlines()
    assert "4096x4096" in lines[1] and "1.000" in lines[1] and "1.56" in lines[1] and "fastest" not in lines[1]
    assert "2048x2048" in lines[2] and "1.155" in lines[2] and "not the fastest launch" in lines[2]


def test_dequant_launch_refuses_bad_shapes():
    from bitsandbytes_lowra.bench import dequant_launch

    with pytest.raises(SystemExit):
        dequant_launch.main(["--shapes", "0x64"])


@cuda
def test_dequant_launch_times_every_launch_on_a_small_layer():
    from bitsandbytes_lowra.bench import dequant_launch

    res = dequant_launch.run([(256, 2048)], replays=2, min_calls=2)
    assert [r["state"] for r in res] == ["4", "1.75", "1.75dq"]
    for r in res:
        assert set(r["ms"]) == set(dequant_launch.LAUNCHES) and min(r["ms"].values()) > 0 and r["bnb_nf4_ms"] > 0


def test_bench_descriptions_are_whole_prose_paragraphs():
    """`--help` of a bench module shows its docstring's first prose paragraph whole (not a usage line, not half a
    sentence)."""
    from bitsandbytes_lowra.bench import describe

    doc = '''`python -m x [--a]`

    Times one thing
    against another.

        python -m x --a   # an example
    '''
    assert describe(doc) == "Times one thing against another."
    assert describe("One line only.") == "One line only."
    assert describe("Prose first\n    python -m x  # example\nmore") == "Prose first"
