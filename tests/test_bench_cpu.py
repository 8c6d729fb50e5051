"""The CPU benchmark's measurement code on tiny shapes: every contender runs and the table renders. Timings here are
not results (docs/benchmarks.md has those)."""

from bitsandbytes_lowra.bench import cpu


def test_cpu_bench_runs_every_contender():
    res = cpu.run(quick=True, dequantize_shapes=((64, 128),), train_shape=(64, 128), tokens=8)
    d = res["dequantize"][0]
    for name in ("lowra_1.75bit", "lowra_4bit", "bnb_nf4"):
        for dt in ("float32", "bfloat16"):
            assert d[f"{name}_{dt}"]["ms"] > 0 and d[f"{name}_{dt}"]["gelem_s"] > 0
    assert set(d["lowra_4bit_bfloat16"]["out_ms_by_isa"]) >= {"scalar"}  # every level the CPU has
    t = res["training"]
    for name in ("nn_linear", "lowra_1.75bit", "lowra_4bit", "bnb_nf4"):
        assert t[name]["ms"] > 0, name
    assert t["lowra_1.75bit_vs_bnb"] > 0 and res["environment"]["threads"] >= 1
    (dec,) = res["decode"]
    for m in ("1", "8"):
        for name in ("lowra_1.75bit", "lowra_1.75bit_dequantize_linear", "lowra_4bit", "bnb_nf4", "nn_linear"):
            assert dec[m][name]["ms"] > 0, (m, name)
    text = cpu.table(res)
    assert "64x128" in text and "training step" in text and "bnb_nf4" in text and "8 rows" in text
