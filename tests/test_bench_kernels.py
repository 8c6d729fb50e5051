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
