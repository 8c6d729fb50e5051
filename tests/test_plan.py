"""plan.py: streaming planning, global budget, fits/plan storage and the on-disk cache."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitsandbytes_lowra import learner
from bitsandbytes_lowra import plan as P
from bitsandbytes_lowra.format import LowRAFormatError


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows of different scales so the assignment has something to choose; different widths exercise padding.
    shapes = {"a.q_proj": (48, 128), "a.up_proj": (96, 72), "b.q_proj": (32, 128), "b.up_proj": (64, 72)}
    out = {}
    for name, (r, c) in shapes.items():
        scale = torch.logspace(-2, 0, r)[:, None]
        out[f"{name}.weight"] = (torch.randn(r, c, generator=g) * scale).float()
    out["embed_tokens.weight"] = torch.randn(10, 128, generator=g)
    out["norm.weight"] = torch.ones(128)
    return out


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    # One learning pass for the tests that only vary the budget (assignment is cheap, learning is not).
    return tmp_path_factory.mktemp("plan-cache")


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(_weights(), str(d / "model.safetensors"))
    return d




@pytest.fixture(scope="module")
def fixed_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_file(_weights(), str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def reference_fits():
    w = _weights()
    return {
        n.removesuffix(".weight"): learner.learn_layer(t, precisions=(1, 2, 4), blocksize=64, iterations=2)
        for n, t in w.items()
        if n.endswith("proj.weight")
    }


@pytest.mark.parametrize("bits", [1.0, 1.75, 2.0, 2.5, 3.3, 4.0])
def test_budget_met_and_tables_follow_bits(fixed_checkpoint, shared_cache, reference_fits, bits):
    plan = P.make_plan(fixed_checkpoint, {"bits": bits}, progress=False, cache_dir=shared_cache)
    # Default targets: every *.weight except embeddings and norms.
    assert sorted(plan) == ["a.q_proj", "a.up_proj", "b.q_proj", "b.up_proj"]
    total = sum(lp.rows * lp.cols for lp in plan.layers.values())
    used = sum(int(lp.bits.long().sum()) * lp.cols for lp in plan.layers.values())
    assert plan.nominal_bits_exact() == Fraction(used, total)
    assert used <= bits * total  # never over budget
    assert bits - plan.nominal_bits() < 0.01
    allowed = (1, 2, 4) if bits < 2 else (2, 4)
    for name, lp in plan.layers.items():
        assert set(lp.bits.unique().tolist()) <= set(allowed)
        assert lp.codebook.dtype == torch.float16 and lp.codebook.shape == (lp.rows, 16)
        assert lp.thresholds.dtype == torch.float16 and lp.thresholds.shape == (lp.rows, 15)
        # Each row carries the learner's tables for the precision it got.
        code, thr = learner.tables_for_bits(reference_fits[name], lp.bits)
        assert torch.equal(code, lp.codebook) and torch.equal(thr, lp.thresholds)


def test_assignment_prefers_high_error_rows(fixed_checkpoint, shared_cache):
    plan = P.make_plan(fixed_checkpoint, {"bits": 2.5}, progress=False, cache_dir=shared_cache)
    # Rows were scaled by logspace(-2, 0): large rows have larger errors and must get at least as many bits.
    bits = plan["a.q_proj"].bits.float()
    lo, hi = bits[:16].mean(), bits[-16:].mean()
    assert hi > lo


def test_summary_and_precision_mix(checkpoint, tmp_path):
    plan = P.make_plan(checkpoint, {"bits": 1.75}, progress=False, cache_dir=tmp_path)
    s = plan.summary()
    exact = plan.nominal_bits_exact()
    assert s["nominal_bits"] == float(exact) and s["nominal_bits_exact"] == f"{exact.numerator}/{exact.denominator}"
    assert 1.74 < s["nominal_bits"] <= 1.75
    assert set(s["precision_mix"]) == {"q_proj", "up_proj"}
    for mix in s["precision_mix"].values():
        assert abs(sum(mix.values()) - 1) < 1e-12
    # Effective bits count metadata: more than nominal, more without double quantization of absmax for wide layers.
    assert s["effective_bits"] > s["nominal_bits"]
    assert s["assignment"]["method"] == "greedy" and s["assignment"]["gap"] >= 0


def test_cache_reuses_fits_across_budgets(checkpoint, tmp_path, learn_calls):
    cache = tmp_path / "cache"
    p1 = P.make_plan(checkpoint, {"bits": 1.75}, progress=False, cache_dir=cache)
    assert p1.origin == "computed" and len(learn_calls) == 4
    p2 = P.make_plan(checkpoint, {"bits": 1.75}, progress=False, cache_dir=cache)
    assert p2.origin == "plan-cache" and len(learn_calls) == 4
    p3 = P.make_plan(checkpoint, {"bits": 3.0}, progress=False, cache_dir=cache)
    assert p3.origin == "fits-cache" and len(learn_calls) == 4  # new budget: assignment only
    for name in p1:
        assert torch.equal(p1[name].bits, p2[name].bits)
        assert torch.equal(p1[name].codebook, p2[name].codebook)
    # Options that change the fits invalidate them.
    p4 = P.make_plan(checkpoint, {"bits": 1.75, "learner_iterations": 1}, progress=False, cache_dir=cache)
    assert p4.origin == "computed" and len(learn_calls) == 8
    # cache=False neither reads nor writes.
    P.make_plan(checkpoint, {"bits": 1.75}, progress=False, cache=False, cache_dir=cache)
    assert len(learn_calls) == 12


def test_cache_key_follows_checkpoint_content(checkpoint, tmp_path, learn_calls):
    cache = tmp_path / "cache"
    P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache_dir=cache)
    w = _weights()
    w["a.q_proj.weight"] = w["a.q_proj.weight"] * 2
    save_file(w, str(checkpoint / "model.safetensors"))
    p = P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache_dir=cache)
    assert p.origin == "computed" and len(learn_calls) == 8


def test_corrupt_cache_entry_is_recomputed(checkpoint, tmp_path, learn_calls):
    cache = tmp_path / "cache"
    P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache_dir=cache)
    for f in cache.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    p = P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache_dir=cache)
    assert p.origin == "computed" and len(learn_calls) == 8


def test_streams_one_tensor_at_a_time(checkpoint, tmp_path, monkeypatch):
    # The learner sees exactly the target weights, one by one, each freed before the next is read.
    import weakref

    alive = []
    real = learner.learn_layer

    def watching(W, *args, **kwargs):
        assert all(r() is None for r in alive), "a previous weight is still alive"
        alive.append(weakref.ref(W))
        return real(W, *args, **kwargs)

    monkeypatch.setattr(learner, "learn_layer", watching)
    P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache=False)
    assert len(alive) == 4


def test_sharded_checkpoint_and_explicit_modules(tmp_path):
    w = _weights()
    d = tmp_path / "sharded"
    d.mkdir()
    keys = sorted(w)
    shards = {"model-00001-of-00002.safetensors": keys[:3], "model-00002-of-00002.safetensors": keys[3:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: w[k] for k in ks}, str(d / fname))
        weight_map.update({k: fname for k in ks})
    import json

    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    plan = P.make_plan(d, {"bits": 2.0}, modules={"a.q_proj.weight": "x.q", "b.up_proj.weight": "y.up"},
                       progress=False, cache=False)  # fmt: skip
    assert sorted(plan) == ["x.q", "y.up"]
    assert plan["x.q"].rows == 48 and plan["y.up"].cols == 72
    with pytest.raises(ValueError, match="no tensor named"):
        P.make_plan(d, {"bits": 2.0}, modules=["nope.weight"], progress=False, cache=False)


def test_transposed_target(tmp_path):
    W = _weights()["a.q_proj.weight"]
    d = tmp_path / "c"
    d.mkdir()
    save_file({"h.0.c_attn.weight": W.t().contiguous()}, str(d / "model.safetensors"))
    plan = P.make_plan(d, {"bits": 2.0}, modules=[P.Target("h.0.c_attn", "h.0.c_attn.weight", transpose=True)],
                       progress=False, cache=False)  # fmt: skip
    ref = P.make_plan({"x.weight": W}, {"bits": 2.0}, progress=False)
    assert (plan["h.0.c_attn"].rows, plan["h.0.c_attn"].cols) == tuple(W.shape)
    assert torch.equal(plan["h.0.c_attn"].bits, ref["x"].bits)


def test_state_iterator_source():
    w = _weights()
    plan = P.make_plan(iter(w.items()), {"bits": 2.0}, progress=False)
    assert sorted(plan) == ["a.q_proj", "a.up_proj", "b.q_proj", "b.up_proj"]
    assert plan.key is None


def test_list_of_pairs_source_is_tensors_not_files():
    """A list of (name, tensor) pairs is an iterable of pairs, as a generator is; it was taken for a list of files."""
    w = _weights()
    ref = P.make_plan(iter(w.items()), {"bits": 2.0}, progress=False)
    for source in (list(w.items()), tuple(w.items())):
        plan = P.make_plan(source, {"bits": 2.0}, progress=False)
        assert sorted(plan) == sorted(ref) and all(torch.equal(plan[n].bits, ref[n].bits) for n in ref)
    with pytest.raises(TypeError, match=r"file paths or \(name, tensor\) pairs.*type str"):
        P.make_plan([("a.q_proj.weight", w["a.q_proj.weight"]), "model.safetensors"], {"bits": 2.0}, progress=False)


def test_file_source_selects_only_2d_weights(tmp_path):
    """A file plans the same layers as its dict: a conv1d "*.weight" (3-D) is not a linear layer."""
    g = torch.Generator().manual_seed(0)
    w = {"m.in_proj.weight": torch.randn(32, 64, generator=g), "m.conv1d.weight": torch.randn(16, 1, 4, generator=g),
         "m.out_proj.weight": torch.randn(64, 16, generator=g), "m.D": torch.randn(16, generator=g)}  # fmt: skip
    save_file(w, str(tmp_path / "model.safetensors"))
    from_file = P.make_plan(tmp_path / "model.safetensors", {"bits": 2.0}, progress=False, cache=False)
    from_dict = P.make_plan(w, {"bits": 2.0}, progress=False)
    assert sorted(from_file) == sorted(from_dict) == ["m.in_proj", "m.out_proj"]


def test_float64_weights_are_planned_as_float32(tmp_path):
    """The learner takes float32/16/bf16 only; a float64 checkpoint plans as its float32 cast (it loads as that)."""
    w = {k: v for k, v in _weights().items() if k.startswith("a.")}
    ref = P.make_plan(w, {"bits": 1.75}, progress=False)
    w64 = {k: v.double() for k, v in w.items()}
    save_file(w64, str(tmp_path / "model.safetensors"))
    for source in (w64, tmp_path / "model.safetensors"):
        plan = P.make_plan(source, {"bits": 1.75}, progress=False, cache=False)
        for n in ref:
            assert torch.equal(plan[n].bits, ref[n].bits) and torch.equal(plan[n].codebook, ref[n].codebook)


def test_ilp_assigner_and_shared_modes(checkpoint, tmp_path):
    greedy = P.make_plan(checkpoint, {"bits": 1.75}, progress=False, cache_dir=tmp_path)
    ilp = P.make_plan(checkpoint, {"bits": 1.75, "assigner_method": "ilp", "clusters": 8}, progress=False,
                      cache_dir=tmp_path)  # fmt: skip
    assert ilp.origin == "fits-cache" and ilp.assignment["method"] == "ilp-highs"
    assert ilp.nominal_bits() <= 1.75 and ilp.assignment["total_error"] >= greedy.assignment["lower_bound"] * (1 - 1e-9)
    shared = P.make_plan(checkpoint, {"bits": 1.75, "learner_mode": "shared"}, progress=False, cache_dir=tmp_path)
    for lp in shared.layers.values():
        for p in (1, 2, 4):
            rows = lp.codebook[lp.bits == p]
            if len(rows):
                assert (rows == rows[0]).all()  # one codebook per layer and precision


def test_plan_save_load_roundtrip(checkpoint, tmp_path):
    plan = P.make_plan(checkpoint, {"bits": 1.75, "precisions": [1, 4]}, progress=False, cache=False)
    path = tmp_path / "p.safetensors"
    plan.save(path)
    back = P.Plan.load(path)
    assert back.origin == "file" and back.settings == plan.settings
    assert back.nominal_bits_exact() == plan.nominal_bits_exact()
    for name in plan:
        for f in ("bits", "codebook", "thresholds"):
            assert torch.equal(getattr(back[name], f), getattr(plan[name], f))
    assert set(torch.cat([lp.bits for lp in back.layers.values()]).unique().tolist()) <= {1, 4}


def _tamper(path, fn):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    fn(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda t, m: t["a.q_proj:bits"].__setitem__(0, 3), "not one of"),
        (lambda t, m: t.__setitem__("a.q_proj:bits", t["a.q_proj:bits"][:-1].clone()), "must be torch.uint8"),
        (lambda t, m: t["a.q_proj:thresholds"][:, :3].copy_(t["a.q_proj:thresholds"][:, :3].flip(1)), "sorted"),
        (lambda t, m: t["b.up_proj:codebook"].__setitem__((0, 0), float("nan")), "NaN"),
        (lambda t, m: t.__setitem__("extra", torch.zeros(1)), "unexpected tensors"),
        (lambda t, m: t.pop("b.q_proj:codebook"), "lacks"),
        (lambda t, m: m.__setitem__("format", "something-else"), "is not a"),
        (lambda t, m: m.__setitem__("meta", "{not json"), "unreadable metadata"),
        (lambda t, m: m.__setitem__("meta", m["meta"].replace('"nominal_bits_exact": [', '"nominal_bits_exact": [1')),
         "do not add up"),
    ],
)
def test_plan_load_rejects_corruption(checkpoint, tmp_path, tamper, message):
    plan = P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache=False)
    path = tmp_path / "p.safetensors"
    plan.save(path)
    _tamper(path, tamper)
    with pytest.raises(LowRAFormatError, match=message):
        P.Plan.load(path)


def test_plan_load_rejects_garbage_and_fits_file(checkpoint, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    with pytest.raises(LowRAFormatError, match="not a readable safetensors"):
        P.Plan.load(bad)
    P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache_dir=tmp_path / "c")
    fits_file = next((tmp_path / "c").glob("fits-*.safetensors"))
    with pytest.raises(LowRAFormatError, match="is not a bitsandbytes_lowra.plan file"):
        P.Plan.load(fits_file)
    fits = P.ModelFits.load(fits_file)
    assert fits.precisions == (1, 2, 4) and sorted(fits.layers) == ["a.q_proj", "a.up_proj", "b.q_proj", "b.up_proj"]
    _tamper(fits_file, lambda t, m: t["a.q_proj:errors"].__setitem__((0, 0), -1.0))
    with pytest.raises(LowRAFormatError, match="negative or non-finite"):
        P.ModelFits.load(fits_file)


def test_check_targets(checkpoint):
    plan = P.make_plan(checkpoint, {"bits": 2.0}, progress=False, cache=False)
    shapes = {n: (lp.rows, lp.cols) for n, lp in plan.layers.items()}
    plan.check_targets(shapes)
    fewer = {n: s for n, s in shapes.items() if n != "a.q_proj"}
    with pytest.raises(ValueError, match=r"model lacks: \['a.q_proj'\]"):
        plan.check_targets(fewer)
    with pytest.raises(ValueError, match=r"keeps in full precision .*\['a.q_proj'\] $"):
        plan.check_targets(fewer, kept_dense=["a.q_proj", "lm_head"])
    with pytest.raises(ValueError, match="no plan for"):
        plan.check_targets({**shapes, "c.q_proj": (4, 4)})
    with pytest.raises(ValueError, match="shape"):
        plan.check_targets({**shapes, "a.q_proj": (48, 64)})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({}, "bit budget"),
        ({"bits": 0.5}, "bits must be in"),
        ({"bits": float("nan")}, "finite"),
        ({"bits": 1.5, "precisions": [2, 4]}, r"outside what precisions \(2, 4\) can meet"),
        ({"bits": 2.0, "precisions": [3]}, "subset"),
        ({"bits": 2.0, "precisions": 4}, "subset"),
        ({"bits": 2.0, "blocksize": 12}, "blocksize"),
        ({"bits": 2.0, "learner_mode": "magic"}, "learner_mode"),
        ({"bits": 2.0, "assigner_method": "anneal"}, "assigner_method"),
        ({"bits": 2.0, "solver": "gurobi"}, "solver"),
        ({"bits": 2.0, "learner_iterations": -1}, "learner_iterations"),
    ],
)
def test_settings_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        P.PlanSettings.from_config(settings)


def test_settings_take_numpy_scalars_as_python_numbers():
    s = P.PlanSettings.from_config({"bits": np.float32(2.5), "precisions": np.array([2, 4]), "blocksize": np.int64(32),
                                    "learner_iterations": np.int64(1), "seed": np.uint32(7)})
    assert (s.bits, s.precisions, s.blocksize, s.learner_iterations, s.seed) == (2.5, (2, 4), 32, 1, 7)
    assert [type(v) for v in (s.bits, s.blocksize, s.learner_iterations, s.seed)] == [float, int, int, int]
    assert type(s.precisions[0]) is int and s.assign_fields()["precisions"] == [2, 4]


def test_not_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="no .safetensors"):
        P.make_plan(tmp_path, {"bits": 2.0}, progress=False)
    with pytest.raises(FileNotFoundError):
        P.make_plan(tmp_path / "missing", {"bits": 2.0}, progress=False)


def test_plan_path_that_is_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.Plan.load(tmp_path / "missing.safetensors")
    (tmp_path / "lowra-plan-2.safetensors").write_bytes(b"x")
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a plan file.*lowra-plan-2\.safetensors"):
        P.Plan.load(tmp_path)


def test_assign_matches_assigner_on_concatenated_errors(checkpoint, tmp_path):
    # The global assignment is one assign_precisions over all rows of all layers (sizes = columns).
    from bitsandbytes_lowra.assigner import assign_precisions

    P.make_plan(checkpoint, {"bits": 1.75}, progress=False, cache_dir=tmp_path)
    fits = P.ModelFits.load(next(tmp_path.glob("fits-*.safetensors")))
    plan = fits.assign({"bits": 1.75})
    errors = np.concatenate([lf.errors.numpy() for lf in fits.layers.values()])
    sizes = np.concatenate([np.full(lf.rows, lf.cols) for lf in fits.layers.values()])
    a = assign_precisions(errors, sizes, 1.75, precisions=(1, 2, 4))
    assert np.array_equal(np.concatenate([plan[n].bits.numpy() for n in fits.layers]), a.bits)
    assert plan.assignment["total_error"] == pytest.approx(a.total_error)


def test_fits_refuse_settings_they_were_not_learned_with():
    """assign checked only blocksize: other learner settings were ignored and the fits' plan returned as theirs."""
    fits = P.learn_fits(((P.Target("a", "a.weight"), _weights()["a.q_proj.weight"]),), {"bits": 2.0}, progress=False)
    for kw, message in [
        ({"learner_mode": "shared"}, "learner_mode='per_channel', the config asks for learner_mode='shared'"),
        ({"learner_iterations": 5}, "learner_iterations=2, the config asks for learner_iterations=5"),
        ({"weight_power": 0.5}, "weight_power=1.0, the config asks for weight_power=0.5"),
        ({"blocksize": 128}, "blocksize=64, the config asks for blocksize=128"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"the fits were learned for {message}")):
            fits.assign({"bits": 2.0, **kw})
    assert fits.assign({"bits": 2.0, "assigner_method": "ilp", "clusters": 4}).nominal_bits() <= 2.0


def test_progress_bar(checkpoint, capsys):
    P.make_plan(checkpoint, {"bits": 2.0}, progress=True, cache=False)
    err = capsys.readouterr().err
    assert "LowRA planning" in err and "4/4" in err


def test_settings_the_assigner_would_refuse_are_refused_before_any_fit_is_learned():
    """bits above what the precisions can meet and a seed K-Means cannot take used to pass PlanSettings and fail
    only in the assigner, after every layer's tables were learned (the seed as sklearn's InvalidParameterError)."""
    with pytest.raises(ValueError, match=r"bits=3 is outside what precisions \(1, 2\) can meet"):
        P.PlanSettings(bits=3, precisions=(1, 2))
    for seed in (-1, 2**32):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            P.PlanSettings(bits=1.75, assigner_method="ilp", seed=seed)
    assert P.PlanSettings(bits=2, precisions=(1, 2)).precisions == (1, 2)


def test_a_nan_weight_is_named_by_its_checkpoint_key():
    with pytest.raises(LowRAFormatError, match=r"model\.layers\.7\.mlp\.down_proj\.weight contains 256 NaN"):
        P.make_plan({"model.layers.7.mlp.down_proj.weight": torch.full((4, 64), float("nan"))}, {"bits": 1.75},
                  progress=False, cache=False)


def test_damaged_checkpoint_headers_are_named_errors(tmp_path):
    """Planning reads the safetensors headers itself, before transformers' loader: a damaged header is a
    LowRAFormatError naming the file, not a bare UnicodeDecodeError / JSONDecodeError / struct.error."""
    good = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.zeros(4, 8)}, str(good))
    assert set(P.checkpoint_headers([good])) == {"a.weight"}
    raw = good.read_bytes()
    cases = {
        "garbled": raw[:20] + b"\xff" * 20 + raw[40:],  # not UTF-8
        "not_json": raw[:8] + b"[" + raw[9:],
        "short": raw[:5],
        "cut": raw[:30],
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(LowRAFormatError, match=name):
            P.checkpoint_headers([path])
