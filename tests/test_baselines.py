"""Baseline plans (QLoRA / LoftQ layer-wise NormalFloat mix, LowRA ablations) in the common Plan format."""

from fractions import Fraction

import pytest
import torch

from bitsandbytes_lowra import baselines, codebooks
from bitsandbytes_lowra.plan import Plan


def _llama_shapes(layers=30, hidden=576, inter=1536, kv=192):
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj": (hidden, hidden), f"{p}.self_attn.k_proj": (kv, hidden),
            f"{p}.self_attn.v_proj": (kv, hidden), f"{p}.self_attn.o_proj": (hidden, hidden),
            f"{p}.mlp.gate_proj": (inter, hidden), f"{p}.mlp.up_proj": (inter, hidden),
            f"{p}.mlp.down_proj": (hidden, inter),
        })  # fmt: skip
    return shapes


def test_layer_index():
    assert baselines.layer_index("model.layers.12.mlp.up_proj") == 12
    assert baselines.layer_index("transformer.h.3.attn.c_attn") == 3
    assert baselines.layer_index("lm_head") is None


@pytest.mark.parametrize("bits,four", [(4.0, 30), (3.0, 15), (2.5, 7), (2.25, 3), (2.0, 0), (2.1, 1)])
def test_layerwise_mix_first_layers_at_4_bits_within_budget(bits, four):
    shapes = _llama_shapes()
    per = baselines.layerwise_bits(shapes, bits)
    four_layers = sorted({baselines.layer_index(n) for n, p in per.items() if p == 4})
    assert four_layers == list(range(four))  # a prefix by layer index, every module of a layer together
    total = sum(r * c for r, c in shapes.values())
    nominal = Fraction(sum(per[n] * r * c for n, (r, c) in shapes.items()), total)
    assert nominal <= Fraction(bits).limit_denominator(10**6)
    # one more layer at 4 bits would break the budget (k is the largest that fits)
    if four < 30:
        assert nominal + Fraction(2 * total // 30, total) > Fraction(bits).limit_denominator(10**6)


def test_layerwise_plan_is_a_valid_nf_plan(tmp_path):
    shapes = _llama_shapes(layers=4, hidden=128, inter=256, kv=64)
    plan = baselines.layerwise_nf_plan(shapes, 3.0)
    assert plan.nominal_bits() == 3.0
    assert plan.assignment["four_bit_layers"] == [0, 1]
    lp = plan["model.layers.0.mlp.up_proj"]
    cb, th = codebooks.nf_tables(lp.bits)
    assert torch.equal(lp.codebook, cb) and torch.equal(lp.thresholds, th)
    assert set(plan["model.layers.3.self_attn.q_proj"].bits.tolist()) == {2}
    plan.save(tmp_path / "p.safetensors")
    back = Plan.load(tmp_path / "p.safetensors")  # validated like any LowRA plan
    assert back.nominal_bits_exact() == plan.nominal_bits_exact()
    assert back.settings["bits"] == 3.0 and back.blocksize == 64


def test_methods_refuse_bits_they_cannot_reach():
    assert not baselines.supports("qlora", 1.75) and not baselines.supports("loftq", 1.9)
    assert baselines.supports("lowra", 1.25) and baselines.supports("lowra-pa", 1.5)
    with pytest.raises(ValueError, match="layer-wise 2/4-bit mix cannot go below 2 bits"):
        baselines.check_bits(baselines.get_method("qlora"), 1.75)
    with pytest.raises(ValueError, match="unknown method"):
        baselines.get_method("gptq")
    with pytest.raises(ValueError, match="2 <= bits <= 4"):
        baselines.layerwise_bits(_llama_shapes(2), 1.5)


def test_method_table_matches_the_paper_setup():
    m = baselines.METHODS
    assert m["qlora"].init == "zero" and m["loftq"].init == "loftq"
    assert m["qlora"].quantization == m["loftq"].quantization == "layerwise-nf"
    assert m["lowra-pa"].quantization == "assigner-nf" and m["lowra"].quantization == "assigner-learned"
    assert baselines.LOFTQ_ITERATIONS == 5


@pytest.fixture(scope="module")
def smollm2_checkpoint():
    from bitsandbytes_lowra import data

    return data.smollm2_checkpoint()


@pytest.mark.slow
def test_smollm2_targets_and_baseline_plan(smollm2_checkpoint):
    targets = baselines.model_targets(smollm2_checkpoint)
    assert len(targets) == 210  # 30 decoder layers x 7 projections; embeddings and the tied head stay dense
    plan = baselines.method_plan("qlora", smollm2_checkpoint, 2.5, progress=False)
    assert len(plan) == 210 and plan.nominal_bits() == pytest.approx(2 + 2 * 7 / 30)
    assert plan.assignment["four_bit_layers"] == list(range(7))
