"""transformers integration: LowRAConfig, the "lowra" quantizer, save/reload, plan cache, refusals, model flags.

Small random models (Llama, GPT-2 with Conv1D, OPT) cover the mechanics quickly; SmolLM2-135M (the packaged real
model) checks the headline: global budgets 1.75 / 2.5 / 4, ordered perplexity, generation, bit-identical reload.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoQuantizationConfig,
)
from transformers.utils import logging as hf_logging

from bitsandbytes_lowra import LinearLowRA, LowRAConfig, learner, model_bits_report
from bitsandbytes_lowra.format import LowRAFormatError
from bitsandbytes_lowra.integrations import transformers as lt

hf_logging.disable_progress_bar()


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                         eos_token_id=0)  # fmt: skip
    else:
        cfg = OPTConfig(vocab_size=256, hidden_size=128, ffn_dim=192, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=128, pad_token_id=1, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """{kind: (checkpoint dir, reference fp32 model)} of small random models."""
    out = {}
    for kind in ("llama", "gpt2", "opt"):
        d = tmp_path_factory.mktemp(kind)
        model = _tiny(kind)
        model.save_pretrained(d)
        out[kind] = (d, model)
    return out


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    d = tmp_path / "plan-cache"
    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(d))
    return d




def _load(path, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model


def _x():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------ config


def test_registered_and_registration_is_idempotent():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowra"] is LowRAConfig
    assert AUTO_QUANTIZER_MAPPING["lowra"] is lt.LowRAHfQuantizer
    lt.register()  # a second registration (e.g. a re-import) must not raise
    lt.register()
    assert AUTO_QUANTIZER_MAPPING["lowra"] is lt.LowRAHfQuantizer


def test_config_roundtrips_through_json():
    cfg = LowRAConfig(bits=1.75, precisions=[4, 1, 2], blocksize=128, compress_statistics=False,
                      compute_dtype=torch.bfloat16, learner_mode="shared", learner_iterations=3, weight_power=2.0,
                      assigner_method="ilp", clusters=64, solver="cbc", time_limit=5.0, seed=3, loftq_rank=16,
                      loftq_iterations=2, modules_to_not_convert=["mlp.down_proj"], plan_path="/x/plan.safetensors",
                      plan_cache=False, loftq_svd_niter=2)  # fmt: skip
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["quant_method"] == "lowra" and d["compute_dtype"] == "bfloat16" and d["precisions"] == [1, 2, 4]
    assert "load_in_4bit" not in d and "load_in_8bit" not in d  # would reroute the dict to bitsandbytes
    back = AutoQuantizationConfig.from_dict(d)
    assert isinstance(back, LowRAConfig) and back == cfg and back.compute_dtype is torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs the bit budget"),
        ({"bits": 5}, "bits must be in"),
        ({"bits": 2, "learner_mode": "x"}, "learner_mode"),
        ({"bits": 2, "compute_dtype": "int8"}, "compute_dtype"),
        ({"bits": 2, "loftq_rank": -1}, "loftq_rank"),
        ({"bits": 2, "loftq_svd_niter": -1}, "loftq_svd_niter"),
        ({"bits": 2, "loftq_svd_niter": 2.0}, "loftq_svd_niter"),
        ({"bits": 2, "modules_to_not_convert": [1]}, "modules_to_not_convert"),
        ({"bits": 2, "unknown_option": 1}, "unknown options"),
        ({"bits": 2, "precisions": [2.7, 4]}, "precisions"),  # not quietly 2
        ({"bits": 2, "precisions": "24"}, "precisions"),
        ({"bits": 3, "precisions": 4}, "precisions must be a non-empty subset"),  # one number: not a raw TypeError
        # the ILP's own options, refused before any fit is learned
        ({"bits": 2, "assigner_method": "ilp", "clusters": 0}, "clusters"),
        ({"bits": 2, "assigner_method": "ilp", "time_limit": -1}, "time_limit"),
        ({"bits": 2, "time_limit": float("nan")}, "time_limit"),
        ({"bits": 2, "seed": "0"}, "seed"),
    ],
)
def test_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRAConfig(**kwargs)


@pytest.mark.parametrize(
    "bnb, hint",
    [
        ({"bnb_4bit_compute_dtype": torch.bfloat16}, "bnb_4bit_compute_dtype: use compute_dtype="),
        ({"bnb_4bit_use_double_quant": True}, "bnb_4bit_use_double_quant: use compress_statistics="),
        ({"bnb_4bit_quant_storage": torch.bfloat16}, "bnb_4bit_quant_storage: use quant_storage="),
        ({"llm_int8_skip_modules": ["lm_head"]}, "llm_int8_skip_modules: use modules_to_not_convert="),
        ({"load_in_4bit": True}, "load_in_4bit: implied"),
        ({"bnb_4bit_quant_type": "nf4"}, "bnb_4bit_quant_type: none"),
        ({"llm_int8_threshold": 6.0}, "llm_int8_threshold: none"),
    ],
)
def test_bitsandbytes_options_are_refused_with_their_lowra_name(bnb, hint):
    """A QLoRA script's BitsAndBytesConfig keywords, passed to LowRAConfig: the refusal says what to write instead."""
    with pytest.raises(ValueError, match="unknown options") as info:
        LowRAConfig(bits=2, **bnb)
    assert hint in str(info.value)
    with pytest.raises(ValueError) as info:  # several at once: one line each, other unknown keys named too
        LowRAConfig(bits=2, load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, foo=1)
    assert "['bnb_4bit_compute_dtype', 'foo', 'load_in_4bit']" in str(info.value)
    assert "use compute_dtype=" in str(info.value) and "load_in_4bit: implied" in str(info.value)


def test_config_update_and_from_dict_overrides_are_validated():
    """update() and from_dict(**kwargs) go through __init__'s checks: a bad value fails at once (not after planning)
    and changes nothing; names are normalized as in __init__; non-options come back unused, as in transformers."""
    cfg = LowRAConfig(bits=2)
    for bad, message in (({"compute_dtype": "fp16"}, "compute_dtype"), ({"blocksize": -3}, "blocksize"),
                         ({"bits": 2.0, "loftq_rank": -1}, "loftq_rank")):
        with pytest.raises(ValueError, match=message):
            cfg.update(**bad)
        with pytest.raises(ValueError, match=message):
            LowRAConfig.from_dict({"bits": 2}, **bad)
    assert cfg == LowRAConfig(bits=2)  # the refused updates left it as it was
    assert cfg.update(compute_dtype="bfloat16", bits=3, precisions=(4, 2), foo=1) == {"foo": 1}
    assert cfg.compute_dtype is torch.bfloat16 and cfg.bits == 3.0 and isinstance(cfg.bits, float)
    assert cfg.precisions == [2, 4]
    back, unused = LowRAConfig.from_dict({"bits": 2}, return_unused_kwargs=True, compute_dtype="torch.float16", foo=3)
    assert back.compute_dtype is torch.float16 and unused == {"foo": 3}
    assert LowRAConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------------------ load/save


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_quantize_save_reload_bit_identical(tiny_dir, tmp_path, plan_cache, kind):
    path, ref = tiny_dir[kind]
    q = _load(path, quantization_config=LowRAConfig(bits=2.5))
    names = q.hf_quantizer.lowra_modules
    assert names and all(isinstance(q.get_submodule(n), LinearLowRA) for n in names)
    assert not any("lm_head" in n or "embed" in n for n in names)  # output head and embeddings stay dense
    report = model_bits_report(q)
    assert abs(report["nominal_bits"] - 2.5) < 0.01 and report["nominal_bits"] <= 2.5
    assert report["nominal_bits"] == pytest.approx(q.hf_quantizer.plan.nominal_bits())
    # The quantized weights approximate the originals (Conv1D weights were transposed to [out, in]).
    ref_params = dict(ref.named_parameters())
    for n in names:
        w = ref_params[n + ".weight"].detach()
        if q.get_submodule(n).source_cls.__name__ == "Conv1D":
            w = w.t()
        deq = q.get_submodule(n).dequantize(torch.float32)
        assert deq.shape == w.shape
        assert ((deq - w).norm() / w.norm()) < 0.6
    x = _x()
    with torch.no_grad():
        logits = q(x).logits
        ref_logits = ref(x).logits
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits.flatten(), ref_logits.flatten(), dim=0) > 0.5

    out = tmp_path / "saved"
    q.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lowra" and saved["bits"] == 2.5
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{names[0]}.weight.lowra_bits", f"{names[0]}.weight.{lt.BLOB_KEY}"} <= keys

    r = _load(out)  # no quantization_config: it comes from config.json
    assert isinstance(r.hf_quantizer, lt.LowRAHfQuantizer) and r.hf_quantizer.plan is None  # no re-planning
    with torch.no_grad():
        assert torch.equal(r(x).logits, logits)
    sd_q, sd_r = q.state_dict(), r.state_dict()
    assert sd_q.keys() == sd_r.keys()
    assert all(torch.equal(sd_q[k], sd_r[k]) for k in sd_q)
    r.save_pretrained(tmp_path / "again")  # a reloaded model saves again
    resaved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert resaved.keys() == load_file(str(out / "model.safetensors")).keys()


def test_dtype_on_load_and_reload(tiny_dir, tmp_path, plan_cache):
    path, _ = tiny_dir["llama"]
    q = _load(path, quantization_config=LowRAConfig(bits=2.0), dtype=torch.bfloat16)
    dtypes = {p.dtype for n, p in q.named_parameters()}
    assert dtypes == {torch.bfloat16, torch.uint8}
    q.save_pretrained(tmp_path / "bf16")
    r = _load(tmp_path / "bf16", dtype=torch.float16)
    # Dense parameters follow the requested dtype (5.2x keeps checkpoint dtypes on quantizer converters otherwise).
    assert {p.dtype for n, p in r.named_parameters()} == {torch.float16, torch.uint8}
    x = _x()
    with torch.no_grad():
        assert torch.isfinite(r(x).logits).all()


def test_plan_cache_reused_and_budget_change_only_reassigns(tiny_dir, plan_cache, learn_calls):
    path, _ = tiny_dir["llama"]
    first = _load(path, quantization_config=LowRAConfig(bits=1.75))
    n_layers = len(first.hf_quantizer.lowra_modules)
    assert first.hf_quantizer.plan.origin == "computed" and len(learn_calls) == n_layers
    second = _load(path, quantization_config=LowRAConfig(bits=1.75))
    assert second.hf_quantizer.plan.origin == "plan-cache" and len(learn_calls) == n_layers  # no re-planning
    other = _load(path, quantization_config=LowRAConfig(bits=3.0))
    assert other.hf_quantizer.plan.origin == "fits-cache" and len(learn_calls) == n_layers
    assert abs(model_bits_report(other)["nominal_bits"] - 3.0) < 0.01
    x = _x()
    with torch.no_grad():
        assert torch.equal(first(x).logits, second(x).logits)
    nocache = _load(path, quantization_config=LowRAConfig(bits=1.75, plan_cache=False))
    assert nocache.hf_quantizer.plan.origin == "computed" and len(learn_calls) == 2 * n_layers


def test_precomputed_plan(tiny_dir, tmp_path, plan_cache, learn_calls):
    path, _ = tiny_dir["gpt2"]
    cfg = LowRAConfig(bits=2.0)
    plan = lt.write_plan(path, cfg, output=tmp_path / "plan.safetensors", progress=False)
    assert abs(plan.nominal_bits() - 2.0) < 0.01
    n = len(learn_calls)
    q = _load(path, quantization_config=LowRAConfig(bits=2.0, plan_path=str(tmp_path / "plan.safetensors")))
    assert q.hf_quantizer.plan.origin == "file" and len(learn_calls) == n
    direct = _load(path, quantization_config=LowRAConfig(bits=2.0))
    x = _x()
    with torch.no_grad():
        assert torch.equal(q(x).logits, direct(x).logits)
    with pytest.raises(ValueError, match="was made for bits=2.0"):
        _load(path, quantization_config=LowRAConfig(bits=3.0, plan_path=str(tmp_path / "plan.safetensors")))
    # A plan for another model fails before any weight is quantized.
    with pytest.raises(ValueError, match="does not match the model"):
        _load(tiny_dir["opt"][0], quantization_config=LowRAConfig(bits=2.0, plan_path=tmp_path / "plan.safetensors"))


def test_plan_made_for_other_settings_or_weights(tiny_dir, tmp_path, plan_cache):
    """plan_path compared only bits: a (1, 4) plan loaded under the default (2, 4) gave 1-bit rows while the saved
    config said precisions=None, and a plan for other weights of the same shapes loaded without a word."""
    path, model = tiny_dir["llama"]
    plan = tmp_path / "plan.safetensors"
    lt.write_plan(path, LowRAConfig(bits=2.5, precisions=[1, 4]), output=plan, progress=False)
    cases = {
        "precisions=[1, 4], the config asks for precisions=[2, 4] (its default for bits=2.5)": {},
        "learner_mode='per_channel', the config asks for learner_mode='shared'": dict(learner_mode="shared"),
        "weight_power=1.0, the config asks for weight_power=2.0": dict(weight_power=2.0),
    }
    for message, kw in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"the plan {plan} was made for ") + ".*" + re.escape(message)):
            _load(path, quantization_config=LowRAConfig(bits=2.5, plan_path=plan, **kw))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*made from another checkpoint")  # its own checkpoint: no warning
        q = _load(path, quantization_config=LowRAConfig(bits=2.5, precisions=[1, 4], plan_path=plan))
    assert {b for m in q.modules() if isinstance(m, LinearLowRA) for b in m.quant_state.bits.tolist()} <= {1, 4}
    other = tmp_path / "other"
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[0].mlp.up_proj.weight.mul_(2)
    perturbed.save_pretrained(other)
    with pytest.warns(UserWarning, match="was made from another checkpoint than this one"):
        _load(other, quantization_config=LowRAConfig(bits=2.5, precisions=[1, 4], plan_path=plan))


def test_load_quantized_describes_the_plan_it_loads(tiny_checkpoint, tmp_path, plan_cache):
    """finetune.load_quantized builds the config from the plan's recorded settings (LowRA-PA plans are
    fixed_mapping), so the quantizer's settings check accepts the plans the sweep makes."""
    from bitsandbytes_lowra import finetune
    from bitsandbytes_lowra import plan as P

    cfg = LowRAConfig(bits=1.5, learner_mode="fixed_mapping")
    plan = P.make_plan(tiny_checkpoint, cfg, progress=False, cache=False, modules=[
        f"model.layers.{i}.mlp.{n}_proj.weight" for i in range(2) for n in ("gate", "up", "down")] + [
        f"model.layers.{i}.self_attn.{n}_proj.weight" for i in range(2) for n in "qkvo"])  # fmt: skip
    model, _ = finetune.load_quantized(tiny_checkpoint, plan)
    qc = model.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    assert qc["learner_mode"] == "fixed_mapping" and qc["precisions"] == [1, 2, 4] and qc["bits"] == 1.5


def test_plan_for_layers_the_config_keeps_dense_says_so(tiny_dir, tmp_path, plan_cache):
    # The model has q_proj; modules_to_not_convert keeps it dense: not "plan has layers the model lacks".
    path, _ = tiny_dir["llama"]
    lt.write_plan(path, LowRAConfig(bits=2.0), output=tmp_path / "plan.safetensors", progress=False)
    cfg = LowRAConfig(bits=2.0, plan_path=tmp_path / "plan.safetensors", modules_to_not_convert=["q_proj"])
    with pytest.raises(ValueError, match=r"keeps in full precision .*q_proj") as e:
        _load(path, quantization_config=cfg)
    assert "the model lacks" not in str(e.value)


def test_config_precisions_normalized():
    assert LowRAConfig(bits=2, precisions=(4, 2.0, 2)).precisions == [2, 4]


def test_config_takes_numpy_scalars_as_python_numbers():
    # np.float32 bits, np.int64 blocksize and seed were refused ("not a multiple of 8 ... got np.int64(64)") while
    # np.float64 bits was kept as np.float64; all are taken now, and stored as plain int / float.
    cfg = LowRAConfig(bits=np.float32(1.75), precisions=np.array([1, 2, 4]), blocksize=np.int64(64),
                      learner_iterations=np.int32(3), weight_power=np.float64(2), clusters=np.int64(8),
                      time_limit=np.float32(5), seed=np.int64(3), loftq_rank=np.int64(2), loftq_iterations=np.int8(4))
    expected = {"bits": 1.75, "precisions": [1, 2, 4], "blocksize": 64, "learner_iterations": 3, "weight_power": 2.0,
                "clusters": 8, "time_limit": 5.0, "seed": 3, "loftq_rank": 2, "loftq_iterations": 4}
    for name, value in expected.items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value), (name, got)
    assert type(LowRAConfig(bits=np.float64(1.75)).bits) is float
    assert LowRAConfig(bits=np.int64(2)).bits == 2.0
    with pytest.raises(ValueError, match="blocksize"):
        LowRAConfig(bits=2, blocksize=np.int64(60))


def test_modules_to_not_convert_one_name_as_a_string(tiny_dir, plan_cache):
    """A single name is one name, not its characters (every projection ends in "j": nothing would be left)."""
    cfg = LowRAConfig(bits=2.0, modules_to_not_convert="down_proj")
    assert cfg.modules_to_not_convert == ["down_proj"]
    q = _load(tiny_dir["llama"][0], quantization_config=cfg)
    names = q.hf_quantizer.lowra_modules
    assert names and not any("down_proj" in n for n in names) and any("up_proj" in n for n in names)


def test_unsupported_dtype_refused_before_planning(tiny_dir, plan_cache, learn_calls):
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        AutoModelForCausalLM.from_pretrained(tiny_dir["llama"][0], device_map="cpu", dtype=torch.float64,
                                             quantization_config=LowRAConfig(bits=2.0))  # fmt: skip
    assert learn_calls == []


def test_float64_checkpoint_loads_as_float32(tiny_dir, tmp_path, plan_cache):
    """Planning reads the checkpoint's own tensors: float64 ones are planned as the float32 weights they load as."""
    path, model = tiny_dir["llama"]
    copy.deepcopy(model).double().save_pretrained(tmp_path / "f64")
    q = _load(tmp_path / "f64", dtype=torch.float32, quantization_config=LowRAConfig(bits=2.0))
    ref = _load(path, quantization_config=LowRAConfig(bits=2.0))
    assert q.hf_quantizer.lowra_modules == ref.hf_quantizer.lowra_modules
    with torch.no_grad():
        assert torch.equal(q(_x()).logits, ref(_x()).logits)


def test_loftq_rank_above_a_layers_size_refused_before_planning(tiny_dir, plan_cache, learn_calls):
    """It failed only after the whole planning pass, as one traceback per layer and transformers' generic error."""
    with pytest.raises(ValueError, match=r"loftq_rank=100 exceeds min\(out_features, in_features\) of 4 of the 14 "
                                         r"layers.*smallest: model\.layers\.0\.self_attn\.k_proj, 64"):
        AutoModelForCausalLM.from_pretrained(tiny_dir["llama"][0], device_map="cpu",
                                             quantization_config=LowRAConfig(bits=2.0, loftq_rank=100))  # fmt: skip
    assert learn_calls == []


def test_modules_to_not_convert(tiny_dir, plan_cache):
    path, _ = tiny_dir["llama"]
    skip = ["mlp.down_proj", "model.layers.1"]
    q = _load(path, quantization_config=LowRAConfig(bits=2.0, modules_to_not_convert=skip))
    names = q.hf_quantizer.lowra_modules
    assert names and not any("down_proj" in n or ".layers.1." in n for n in names)
    assert type(q.get_submodule("model.layers.0.mlp.down_proj")) is torch.nn.Linear
    assert type(q.lm_head) is torch.nn.Linear  # default skips still apply


def test_modules_to_not_convert_matching_nothing_warns(tiny_dir):
    """A typo or a non-matching name kept nothing dense without a word while the config still listed it."""
    model = tiny_dir["llama"][1]
    cfg = LowRAConfig(bits=2.0, modules_to_not_convert=["q_prj", "layers.0.mlp", "mlp.down_proj", "model.layers.1"])
    with pytest.warns(UserWarning, match=re.escape("entries ['q_prj', 'layers.0.mlp'] match no linear layer")):
        targets = lt.select_targets(model, cfg)
    assert sorted(targets) == [f"model.layers.0.{n}" for n in ("mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                                 "self_attn.o_proj", "self_attn.q_proj",
                                                                 "self_attn.v_proj")]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lt.select_targets(model, LowRAConfig(bits=2.0, modules_to_not_convert=["mlp.down_proj"]))


# ------------------------------------------------------------------------------------------------------ failures


@pytest.fixture(scope="module")
def saved_llama(tiny_dir, tmp_path_factory):
    import os

    old = os.environ.get("LOWRA_PLAN_CACHE")
    os.environ["LOWRA_PLAN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        q = _load(tiny_dir["llama"][0], quantization_config=LowRAConfig(bits=2.0))
    finally:
        os.environ.pop("LOWRA_PLAN_CACHE") if old is None else os.environ.__setitem__("LOWRA_PLAN_CACHE", old)
    d = tmp_path_factory.mktemp("saved-llama")
    q.save_pretrained(d)
    return d


@pytest.fixture
def hf_log():
    """Messages logged by transformers (its loggers do not propagate to pytest's capture)."""
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    # another test (the CLI's -q) may have lowered transformers' verbosity process-wide: the report is a warning
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    yield messages
    hf_logging.set_verbosity(verbosity)
    root.removeHandler(handler)


def _corrupt(src, dst, fn):
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    fn(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


LAYER = "model.layers.0.self_attn.q_proj.weight"


def _blob_with(sd, **changes):
    from bitsandbytes.utils import pack_dict_to_tensor

    blob = json.loads(bytes(sd[f"{LAYER}.{lt.BLOB_KEY}"].numpy()).decode())
    blob.update(changes)
    sd[f"{LAYER}.{lt.BLOB_KEY}"] = pack_dict_to_tensor(blob)


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda sd: sd[f"{LAYER}.lowra_bits"].__setitem__(0, 3), "not one of"),
        (lambda sd: sd.pop(f"{LAYER}.lowra_code"), "missing LowRA state fields"),
        (lambda sd: sd.__setitem__(LAYER, sd[LAYER][:-5].clone()), "bytes"),
        (lambda sd: _blob_with(sd, format_version=99), "format_version"),
        (lambda sd: sd[f"{LAYER}.lowra_row_offsets"].__setitem__(1, 7), "row_offsets do not match"),
    ],
)
def test_corrupted_state_fails_loudly(saved_llama, tmp_path, hf_log, fn, message):
    bad = _corrupt(saved_llama, tmp_path / "bad", fn)
    # transformers collects errors raised inside conversion ops, logs them in its load report, then raises.
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(bad, device_map="cpu")
    report = "\n".join(hf_log)
    assert "model.layers.0.self_attn.q_proj" in report and message in report
    # the same problem, by layer, for callers that do not read the report (the CLI)
    errors = lt.last_load_errors()
    assert message in errors["model.layers.0.self_attn.q_proj"]


def test_conversion_ops_share_the_live_quantizer():
    """transformers deep-copies a converter per checkpoint key: the copies must keep the quantizer (its plan is not
    copied per layer, and the errors they record reach it)."""
    q = lt.LowRAHfQuantizer(LowRAConfig(bits=2.0))
    for op in (lt.LowRADeserialize(q), lt.LowRAQuantize(q)):
        dup = copy.deepcopy([op])[0]
        assert type(dup) is type(op) and dup is not op and dup.hf_quantizer is q


def _edited_config(saved, dst, **changes):
    import shutil

    shutil.copytree(saved, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field, value, saved", [("blocksize", 128, 64), ("compress_statistics", False, True)])
def test_saved_model_refuses_a_config_that_misdescribes_its_layers(saved_llama, tmp_path, field, value, saved):
    """The weights come from the layers' saved states: a hand-edited config.json was accepted and then described the
    model wrongly (and was saved again so)."""
    bad = _edited_config(saved_llama, tmp_path / "bad", **{field: value})
    message = f"says {field}={value!r}, but the saved layers .* hold {field}={saved!r}"
    with pytest.raises(LowRAFormatError, match=message):
        AutoModelForCausalLM.from_pretrained(bad, device_map="cpu")


def test_saved_model_names_a_budget_far_from_its_layers_bits(saved_llama, tmp_path):
    with pytest.warns(UserWarning, match="says bits=4.0, but the saved layers average 2.0000 bits"):
        AutoModelForCausalLM.from_pretrained(_edited_config(saved_llama, tmp_path / "b", bits=4.0), device_map="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*saved layers average")
        AutoModelForCausalLM.from_pretrained(saved_llama, device_map="cpu")  # the config as saved: no warning


def test_unknown_state_tensor_fails_before_loading(saved_llama, tmp_path):
    bad = _corrupt(saved_llama, tmp_path / "bad", lambda sd: sd.__setitem__(f"{LAYER}.lowra_future", torch.zeros(3)))
    with pytest.raises(LowRAFormatError, match="unknown LowRA state tensors"):
        AutoModelForCausalLM.from_pretrained(bad, device_map="cpu")


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda sd: sd.pop(f"{LAYER}.{lt.BLOB_KEY}"), "not its metadata"),
        (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(f"{LAYER}.")], "packed LowRA codes"),
    ],
)
def test_state_without_its_metadata_fails_before_loading(saved_llama, tmp_path, fn, message):
    """Without the metadata entry the layer would stay dense and fail on shapes far from the cause: name it."""
    bad = _corrupt(saved_llama, tmp_path / "bad", fn)
    with pytest.raises(LowRAFormatError, match=message) as info:
        AutoModelForCausalLM.from_pretrained(bad, device_map="cpu")
    assert "model.layers.0.self_attn.q_proj" in str(info.value)


def test_base_saved_with_adapters_injected_is_named(tiny_dir, tmp_path, plan_cache):
    """get_base_model().save_pretrained() with LoRA injected writes `<layer>.base_layer.weight*`: the reload says
    what happened and what to do."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_load(tiny_dir["llama"][0], quantization_config=LowRAConfig(bits=2.0)),
                        LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip
    pm.get_base_model().save_pretrained(tmp_path / "base")
    with pytest.raises(LowRAFormatError, match=r"base_layer, which this model lacks: it was saved with peft adapters"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu")


def test_lowra_config_without_lowra_weights_fails(tiny_dir, tmp_path):
    import shutil

    src, _ = tiny_dir["llama"]
    shutil.copytree(src, tmp_path / "fake")
    cfg = json.loads((tmp_path / "fake" / "config.json").read_text())
    cfg["quantization_config"] = LowRAConfig(bits=2.0).to_dict()
    (tmp_path / "fake" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowRAFormatError, match="holds no LowRA layer state"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fake", device_map="cpu")


def test_offload_is_refused(tiny_dir, plan_cache):
    path, _ = tiny_dir["llama"]
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    # no accelerator in the map: the message does not mention one
    with pytest.raises(ValueError, match="does not support disk offload: the device map puts some modules on disk and "
                                         r"the rest on the CPU \(.*entirely on the CPU") as info:
        AutoModelForCausalLM.from_pretrained(path, quantization_config=LowRAConfig(bits=2.0), device_map=device_map)
    assert "accelerator" not in str(info.value)
    quantizer = lt.LowRAHfQuantizer(LowRAConfig(bits=2.0), pre_quantized=False)
    with pytest.raises(ValueError, match=r"does not support disk offload: the device map puts some modules on disk \("):
        quantizer.validate_environment(device_map={"": "disk"})
    with pytest.raises(ValueError, match=r"CPU or disk offload: .* on \['cpu'\] and others on \['cuda:0'\].*"
                                         "on the accelerator"):
        quantizer.validate_environment(device_map={"model.layers.0": 0, "model.layers.1": "cpu"})
    quantizer.validate_environment(device_map={"": "cpu"})  # all on the CPU is fine
    assert quantizer.is_compileable
    quantizer.validate_environment(device_map={"model.layers.0": 0, "model.layers.1": 1})  # several GPUs too
    # but generate does not compile a model split over devices (accelerate's hooks: a recompile per layer)
    assert not quantizer.is_compileable
    quantizer.validate_environment(device_map={"model.layers.0": 0, "model.layers.1": "cuda:0"})  # one device
    assert quantizer.is_compileable


def test_non_safetensors_checkpoint_refused(tiny_dir, tmp_path, plan_cache):
    _, ref = tiny_dir["llama"]
    d = tmp_path / "bin"
    d.mkdir()
    ref.config.save_pretrained(d)
    torch.save(ref.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(d, quantization_config=LowRAConfig(bits=2.0), device_map="cpu")


# ------------------------------------------------------------------------------------------------------ flags, casts


def test_model_flags_and_dtype_guard(tiny_dir, plan_cache):
    path, _ = tiny_dir["llama"]
    q = _load(path, quantization_config=LowRAConfig(bits=2.0))
    assert q.is_quantized and q.is_loaded_in_4bit and q.quantization_method == "lowra"
    assert q.hf_quantizer.is_trainable and q.hf_quantizer.is_serializable()
    casts = (lambda m: m.to(torch.float16), lambda m: m.to("cpu", torch.bfloat16), lambda m: m.to(dtype=torch.float16),
             lambda m: m.half(), lambda m: m.float(), lambda m: m.bfloat16(), lambda m: m.double(),
             lambda m: m.type(torch.float16))  # fmt: skip
    codes = q.model.layers[0].mlp.down_proj.weight.data.clone()
    for cast in casts:
        with pytest.raises(ValueError):
            cast(q)
    assert torch.equal(q.model.layers[0].mlp.down_proj.weight.data, codes)  # refused before anything was cast
    assert q.to("cpu") is q and q.to(torch.device("cpu")) is q  # device moves are fine (Trainer does them)
    c = copy.deepcopy(q)
    with pytest.raises(ValueError):
        c.to(torch.float16)
    x = _x()
    with torch.no_grad():
        assert torch.equal(c(x).logits, q(x).logits)
    assert c.to("cpu") is c  # the guard is bound to the copy, not the original


def test_quant_storage_other_than_the_load_dtype_warns(tiny_dir, tmp_path, plan_cache):
    """A float quant_storage (for FSDP) that is not the load dtype is a mistake: said at load, on reload too."""
    path, _ = tiny_dir["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the default uint8 storage or the load dtype: no warning
        _load(path, quantization_config=LowRAConfig(bits=2.0), dtype=torch.float16)
        _load(path, quantization_config=LowRAConfig(bits=2.0, quant_storage=torch.bfloat16), dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"quant_storage=torch\.bfloat16 differs from the load dtype torch\.float32"
                                         r".*dtype=torch\.bfloat16"):
        q = _load(path, quantization_config=LowRAConfig(bits=2.0, quant_storage=torch.bfloat16), dtype=torch.float32)
    q.save_pretrained(tmp_path / "q")
    with pytest.warns(UserWarning, match="differs from the load dtype torch.float16"):
        _load(tmp_path / "q", dtype=torch.float16)


def test_prepare_model_for_kbit_training(tiny_dir, plan_cache):
    from peft import prepare_model_for_kbit_training

    path, _ = tiny_dir["llama"]
    q = _load(path, quantization_config=LowRAConfig(bits=2.0), dtype=torch.bfloat16)
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=True)
    assert q.is_gradient_checkpointing
    for n in q.hf_quantizer.lowra_modules:
        w = q.get_submodule(n).weight
        assert w.dtype == torch.uint8 and not w.requires_grad  # packed codes are not cast to fp32
    assert not any(p.requires_grad for p in q.parameters())
    emb_out = q.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert emb_out.requires_grad  # enable_input_require_grads ran: it only does for k-bit flagged models


def test_trainer_accepts_lowra_with_adapters_only(tiny_dir, plan_cache):
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_utils import validate_quantization_for_training

    path, _ = tiny_dir["llama"]
    q = _load(path, quantization_config=LowRAConfig(bits=2.0))
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(q)  # Trainer sees a quantized base model ...
    peft_model = get_peft_model(q, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    validate_quantization_for_training(peft_model)  # ... and trains it once adapters are attached
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = peft_model(_x(), labels=_x()).loss
    loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_num_parameters_counts_lowra_weights_as_weights(tiny_dir, plan_cache):
    """num_parameters() is the model's parameter count, whatever `bits` (transformers corrects only bnb's packed
    Params4bit), and agrees with peft's count."""
    from peft import LoraConfig, get_peft_model

    path, ref = tiny_dir["llama"]
    for bits in (1.75, 4.0):
        q = _load(path, quantization_config=LowRAConfig(bits=bits))
        for kwargs in ({}, {"exclude_embeddings": True}):
            assert q.num_parameters(**kwargs) == ref.num_parameters(**kwargs)
    pm = get_peft_model(q, LoraConfig(r=4, target_modules="all-linear"))
    trainable, total = pm.get_nb_trainable_parameters()
    assert pm.num_parameters() == total and pm.num_parameters(only_trainable=True) == trainable < total
    q = _load(path, quantization_config=LowRAConfig(bits=2.0)).dequantize()
    assert "num_parameters" not in vars(q) and q.num_parameters() == ref.num_parameters()


@pytest.mark.parametrize("compress_statistics", [True, False])
def test_memory_footprint_counts_the_quant_state(tiny_dir, tmp_path, plan_cache, compress_statistics):
    """get_memory_footprint() holds what save_pretrained writes (codes, scales, per-row tables), not the codes alone.
    Beyond the file it holds only the non-persistent buffers and
    each layer's operand-buffer extras (the CUDA row order, 16-byte alignment of its fields)."""
    from bitsandbytes_lowra._ops import OPERAND_ALIGN
    from bitsandbytes_lowra.functional import BLOB_KEY

    path, _ = tiny_dir["llama"]
    q = _load(path, quantization_config=LowRAConfig(bits=1.75, compress_statistics=compress_statistics))
    q.save_pretrained(tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        saved = sum(f.get_tensor(k).nbytes for k in f.keys() if not k.endswith(BLOB_KEY))  # the blob: JSON, not held
    persistent = set(q.state_dict())
    transient = sum(b.nbytes for n, b in q.named_buffers() if n not in persistent)
    layers = [q.get_submodule(n) for n in q.hf_quantizer.lowra_modules]
    extras = sum(m.out_features * 4 + 8 * OPERAND_ALIGN for m in layers)
    footprint = q.get_memory_footprint()
    assert saved + transient <= footprint <= saved + transient + extras
    codes, tables = sum(m.weight.nbytes for m in layers), sum(m.quant_state.held_nbytes for m in layers)
    assert footprint == type(q).get_memory_footprint(q) + tables and tables > codes / 3  # not a rounding error


def test_dequantize(tiny_dir, plan_cache):
    path, _ = tiny_dir["llama"]
    q = _load(path, quantization_config=LowRAConfig(bits=4.0))
    x = _x()
    with torch.no_grad():
        before = q(x).logits
    expected = {n: q.get_submodule(n).dequantize(torch.float32) for n in q.hf_quantizer.lowra_modules}
    d = q.dequantize()
    assert not any(isinstance(m, LinearLowRA) for m in d.modules())
    for n, w in expected.items():
        assert torch.equal(d.get_submodule(n).weight, w)
    with torch.no_grad():
        assert torch.allclose(d(x).logits, before, atol=1e-4)
    d.to(torch.float16)  # an ordinary model again: casts allowed


# ------------------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="session")
def smollm2():
    from transformers import AutoTokenizer

    from bitsandbytes_lowra import data

    path = data.smollm2_checkpoint()
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def eval_chunks(smollm2):
    from bitsandbytes_lowra import data

    _, tok = smollm2
    ids = tok("\n\n".join(data.wiki_leads("eval")[:20]), return_tensors="pt").input_ids[0]
    n, length = 4, 128
    assert ids.numel() >= n * length
    return ids[: n * length].view(n, length)


def _perplexity(model, chunks) -> float:
    with torch.no_grad():
        nll = sum(model(c[None], labels=c[None]).loss.item() for c in chunks) / len(chunks)
    return math.exp(nll)


@pytest.fixture(scope="session")
def smollm2_quantized(smollm2, eval_chunks):
    """{bits: (model, perplexity, plan origin, learner calls during the load)}, loaded in this order.

    Plans go to the user's plan cache (keyed by checkpoint content and options), so only the first run on a machine
    pays for learning; every later load, including the other budgets of the first run, must not learn again."""
    path, _ = smollm2
    calls = []
    real = learner.learn_layer

    def counting(W, *args, **kwargs):
        calls.append(tuple(W.shape))
        return real(W, *args, **kwargs)

    learner.learn_layer = counting
    out = {}
    try:
        for bits in (1.75, 2.5, 4.0):
            before = len(calls)
            model = _load(path, quantization_config=LowRAConfig(bits=bits))
            out[bits] = (model, _perplexity(model, eval_chunks), model.hf_quantizer.plan.origin, len(calls) - before)
    finally:
        learner.learn_layer = real
    return out


@pytest.mark.slow
def test_smollm2_budgets_perplexity_and_generation(smollm2, smollm2_quantized):
    _, tok = smollm2
    ppl = {}
    for bits, (model, p, _, _) in smollm2_quantized.items():
        report = model_bits_report(model)
        assert len(model.hf_quantizer.lowra_modules) == 210  # every decoder linear layer, not lm_head
        assert abs(report["nominal_bits"] - bits) < 0.01 and report["nominal_bits"] <= bits
        assert report["effective_bits"] > report["nominal_bits"]
        assert math.isfinite(p)
        ppl[bits] = p
        prompt = tok("The capital of France is", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        text = tok.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
        assert out.shape[1] == prompt.input_ids.shape[1] + 4 and text.strip()
    assert ppl[4.0] < ppl[2.5] < ppl[1.75], ppl
    assert ppl[4.0] < 40, ppl  # fp32 is about 13-16 on these leads: 4 bits stays close


@pytest.mark.slow
def test_smollm2_plan_cache_reused(smollm2_quantized):
    origins = [origin for _, _, origin, _ in smollm2_quantized.values()]
    learned = [n for _, _, _, n in smollm2_quantized.values()]
    # Either this run learned the fits first (210 layers, once) or an earlier run did (its plan for this budget, or
    # only the fits, from another budget, may be cached); later loads never learn.
    assert learned[0] in (0, 210) and learned[1:] == [0, 0], learned
    assert (origins[0] == "computed") == (learned[0] == 210), (origins, learned)
    assert all(o in ("fits-cache", "plan-cache") for o in origins[1:]), origins


@pytest.mark.slow
def test_smollm2_save_reload_bit_identical(smollm2_quantized, eval_chunks, tmp_path, learn_calls):
    model = smollm2_quantized[1.75][0]
    model.save_pretrained(tmp_path / "q")
    reloaded = _load(tmp_path / "q")
    assert reloaded.hf_quantizer.plan is None and not learn_calls  # rebuilt from the saved state, no planning
    chunk = eval_chunks[:1]
    with torch.no_grad():
        assert torch.equal(model(chunk).logits, reloaded(chunk).logits)


def test_loftq_through_from_pretrained_save_reload_and_peft(tiny_dir, tmp_path, plan_cache):
    """LowRAConfig(loftq_rank=r): from_pretrained quantizes the LoftQ residual and stores the rank-r init on each
    layer; it survives save/reload and get_peft_model starts from it (base + init approximates W better)."""
    from peft import LoraConfig, get_peft_model

    from bitsandbytes_lowra import loftq

    path, ref = tiny_dir["llama"]
    plain = _load(path, quantization_config=LowRAConfig(bits=2.0))
    q = _load(path, quantization_config=LowRAConfig(bits=2.0, loftq_rank=4, loftq_iterations=3))
    ref_params = dict(ref.named_parameters())
    names = q.hf_quantizer.lowra_modules
    better = 0
    for n in names:
        layer, w = q.get_submodule(n), ref_params[n + ".weight"].detach()
        A0, B0 = loftq.stored_init(layer)
        assert A0.shape == (4, layer.in_features) and B0.shape == (layer.out_features, 4)
        err_loftq = (w - layer.dequantize(torch.float32) - B0.float() @ A0.float()).norm()
        err_plain = (w - plain.get_submodule(n).dequantize(torch.float32)).norm()
        better += bool(err_loftq < err_plain)
    assert better == len(names)

    out = tmp_path / "loftq"
    q.save_pretrained(out)
    r = _load(out)
    for n in names:
        a, b = loftq.stored_init(q.get_submodule(n)), loftq.stored_init(r.get_submodule(n))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x = _x()
    with torch.no_grad():
        base_logits = r(x).logits
    pm = get_peft_model(r, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        lora_logits = pm(x).logits
    # the adapter starts from the stored init, not from B = 0
    assert not torch.allclose(lora_logits, base_logits)
    with pytest.raises(ValueError, match="rank"):
        get_peft_model(_load(out), LoraConfig(r=8, target_modules="all-linear"))


def test_loftq_svd_niter_reaches_the_svd_and_is_saved(tiny_dir, tmp_path, plan_cache, monkeypatch):
    """LowRAConfig(loftq_svd_niter=k): from_pretrained's LoftQ runs the randomized SVD (k subspace iterations) instead
    of the exact one; the option is saved in config.json. Default None: exact."""
    from bitsandbytes_lowra import loftq

    calls = []
    real = loftq.low_rank_factors
    monkeypatch.setattr(loftq, "low_rank_factors", lambda *a, **k: calls.append(a[3] if len(a) > 3 else None)
                        or real(*a, **k))
    path, _ = tiny_dir["llama"]
    q = _load(path, quantization_config=LowRAConfig(bits=2.0, loftq_rank=4, loftq_iterations=2, loftq_svd_niter=1))
    assert len(calls) == 2 * len(q.hf_quantizer.lowra_modules) and set(calls) == {1}
    q.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["loftq_svd_niter"] == 1
    assert _load(tmp_path / "q").config.quantization_config.loftq_svd_niter == 1
    calls.clear()
    _load(path, quantization_config=LowRAConfig(bits=2.0, loftq_rank=4, loftq_iterations=1))
    assert calls and set(calls) == {None}


@pytest.fixture(scope="module")
def saved_loftq(tiny_dir, tmp_path_factory):
    import os

    old = os.environ.get("LOWRA_PLAN_CACHE")
    os.environ["LOWRA_PLAN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        q = _load(tiny_dir["llama"][0], quantization_config=LowRAConfig(bits=2.0, loftq_rank=4, loftq_iterations=1))
    finally:
        os.environ.pop("LOWRA_PLAN_CACHE") if old is None else os.environ.__setitem__("LOWRA_PLAN_CACHE", old)
    d = tmp_path_factory.mktemp("saved-loftq")
    q.save_pretrained(d)
    return d


INIT_A = "model.layers.0.self_attn.q_proj.lowra_init_A"


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda sd: sd.pop(INIT_A), "lacks one or both"),
        (lambda sd: sd.__setitem__(INIT_A, sd[INIT_A][:2].clone()), "LoftQ initialization of shapes"),
        (lambda sd: sd.__setitem__(INIT_A, torch.full_like(sd[INIT_A], float("nan"))), "NaN or inf"),
        (lambda sd: sd.__setitem__(INIT_A, sd[INIT_A].to(torch.int32)), "must be floating point"),
    ],
)
def test_corrupt_loftq_init_fails(saved_loftq, tmp_path, fn, message):
    """A layer whose saved LoftQ init is gone would start LoRA at zero on a base that lacks its low-rank part; a NaN
    one would make every output NaN; an integer one loaded as zeros. None may load."""
    assert _load(saved_loftq) is not None  # the intact checkpoint loads
    bad = _corrupt(saved_loftq, tmp_path / "bad", fn)
    with pytest.raises(LowRAFormatError, match=message) as info:
        AutoModelForCausalLM.from_pretrained(bad, device_map="cpu")
    assert "model.layers.0.self_attn.q_proj" in str(info.value)
