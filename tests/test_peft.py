"""peft LoRA on LinearLowRA: dispatch, forward, training, merge, adapters, save/load, LoftQ through peft.

The model is SmolLM2-135M cut to its first two decoder layers (real weights), every decoder linear converted to a
LinearLowRA by convert_to_lowra at 1.75 bits (1/2/4 bits per output channel, learned codebooks).
"""

import contextlib
import copy
import re
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

import bitsandbytes_lowra  # noqa: F401  (dispatch registration)
from bitsandbytes_lowra import data, loftq
from bitsandbytes_lowra.convert import convert_to_lowra
from bitsandbytes_lowra.functional import QuantStateLowRA
from bitsandbytes_lowra.integrations import peft as lowra_peft
from bitsandbytes_lowra.integrations.peft import LowRALoraLinear, encode_with_scales
from bitsandbytes_lowra.nn import LinearLowRA

pytestmark = pytest.mark.usefixtures("one_thread")


LAYERS = 2
TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar.",
]


def _row_bits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([1, 2, 4], dtype=torch.uint8)[torch.randint(0, 3, (rows,), generator=g)]


def _quantize_decoder(model) -> dict[str, torch.Tensor]:
    """The paper's pipeline on the decoder linears (learned tables, precisions assigned for 1.75 bits on average);
    returns their dense weights by checkpoint key."""
    dense = {f"{n}.weight": m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear
             and ".layers." in n}
    convert_to_lowra(model, bits=1.75, skip=("lm_head",))
    model.is_loaded_in_4bit = True  # what the LowRA HfQuantizer sets (prepare_model_for_kbit_training reads it)
    return dense


@contextlib.contextmanager
def _quiet_transformers():
    """Loading LAYERS of the 30 layers: transformers reports the others as unexpected keys."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = data.smollm2_checkpoint()
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=LAYERS, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dense = _quantize_decoder(model)
    return model.eval(), tok, dense


@pytest.fixture
def model(smol):
    return copy.deepcopy(smol[0])


@pytest.fixture
def batch(smol):
    return smol[1](TEXTS, return_tensors="pt", padding=True)


def _packed_snapshot(model):
    return {n: (m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
            for n, m in model.named_modules() if isinstance(m, LinearLowRA)}


def _randomize_lora(pm, std=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _logits(m, batch):
    with torch.no_grad():
        return m(**batch).logits


# -- dispatch -------------------------------------------------------------------------------------------------------


def test_all_linear_dispatches_every_lowra_layer(model):
    pm = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    lora_layers = {n: type(m) for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert len(lora_layers) == 7 * LAYERS
    assert set(lora_layers.values()) == {LowRALoraLinear}
    assert all(isinstance(m.get_base_layer(), LinearLowRA) for m in lowra_peft.lowra_lora_layers(pm).values())
    assert not isinstance(pm.base_model.model.lm_head, LowRALoraLinear)  # output layer excluded, as for nn.Linear


def test_trainable_parameter_count_counts_lowra_weights_as_weights(model, smol):
    """print_trainable_parameters reports the model's parameter count, not its packed bytes."""
    cfg = LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")
    dense = copy.deepcopy(smol[0])
    for key, W in smol[2].items():  # the same model with the dense weights the fixture quantized
        parent, child = key.removesuffix(".weight").rsplit(".", 1)
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight = nn.Parameter(W.clone())
        setattr(dense.get_submodule(parent), child, layer)
    want = get_peft_model(dense, cfg).get_nb_trainable_parameters()
    got = get_peft_model(model, cfg).get_nb_trainable_parameters()
    assert got == want and got[0] < got[1]


def test_user_custom_module_mapping_takes_precedence(model):
    class Mine(LowRALoraLinear):
        pass

    cfg = LoraConfig(r=4, target_modules=["q_proj"])
    cfg._register_custom_module({LinearLowRA: Mine})
    pm = get_peft_model(model, cfg)
    assert type(pm.base_model.model.model.layers[0].self_attn.q_proj) is Mine


def test_dora_and_base_rewriting_inits_are_refused(model):
    with pytest.raises(ValueError, match="use_dora.*not supported on LowRA"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported.*init='pissa'"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="'olora' is not supported"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))


@pytest.mark.parametrize("tuner", ["vera", "oft", "ia3", "loha", "adalora"])
def test_other_peft_tuners_are_refused_on_lowra_layers(model, tuner):
    import peft

    config = {
        "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "k_proj"]),
        "oft": lambda: peft.OFTConfig(oft_block_size=32, target_modules=["q_proj"]),
        "ia3": lambda: peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
        "loha": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj"]),
        "adalora": lambda: peft.AdaLoraConfig(r=4, target_modules=["q_proj"], total_step=10),
    }[tuner]()
    with pytest.raises(TypeError, match="cannot adapt LinearLowRA layers.*LoRA \\(LoraConfig\\) is the supported"):
        get_peft_model(copy.deepcopy(model), config)


def test_eva_initialization_works_on_lowra_layers(model, smol):
    """EVA only reads the layer inputs: it sets A from their SVD and keeps B at zero."""
    from peft.tuners.lora import EvaConfig, initialize_lora_eva_weights

    tok = smol[1]
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva",
                                          eva_config=EvaConfig(rho=1.0)))
    batches = [dict(tok(TEXTS, return_tensors="pt", padding=True)) for _ in range(3)]
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    for layer in lowra_peft.lowra_lora_layers(pm).values():
        A = layer.lora_A["default"].weight.detach()
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), rtol=1e-4, atol=1e-4)  # singular vectors
        assert not layer.lora_B["default"].weight.any()


# -- forward, training ----------------------------------------------------------------------------------------------


def test_forward_is_base_plus_scaled_lora(model):
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["v_proj"]))
    _randomize_lora(pm)
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    x = torch.randn(3, 5, layer.in_features)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer()(x) + 4.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer(x), layer.get_base_layer()(x))


def test_prepare_model_for_kbit_training_leaves_packed_weights_untouched(model):
    model = model.to(torch.bfloat16)  # so that the fp32 upcast of the other parameters actually runs
    before = _packed_snapshot(model)
    prepared = prepare_model_for_kbit_training(model)
    after = _packed_snapshot(prepared)
    assert before.keys() == after.keys() and len(before) == 7 * LAYERS
    for name, (packed, state) in before.items():
        assert after[name][0].dtype == torch.uint8
        assert torch.equal(after[name][0], packed), name
        assert after[name][1] == state, name
    assert prepared.model.norm.weight.dtype == torch.float32  # the non-quantized bf16 parameters were upcast
    assert not any(p.requires_grad for p in prepared.parameters())


def test_one_training_step_on_cpu_moves_only_lora(model, smol, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = smol[1]
    model = prepare_model_for_kbit_training(model)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    packed_before = _packed_snapshot(pm)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    # gradients: on LoRA parameters only (every one of them), none on the frozen base
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    pm.train()
    pm(**batch, labels=batch["input_ids"]).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert all(torch.isfinite(p.grad).all() for n, p in pm.named_parameters() if n in with_grad)
    # B starts at zero, so only B gets a non-zero gradient on the first step
    assert all(p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if ".lora_B." in n)
    pm.zero_grad(set_to_none=True)

    # and the QLoRA script: Trainer, one step
    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    dataset = [dict(tok(t)) for t in TEXTS]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", seed=0,
    )
    trainer = Trainer(model=pm, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    changed = [n for n, p in pm.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])]
    assert any(".lora_B." in n for n in changed)
    after = _packed_snapshot(pm)
    for name, (packed, state) in packed_before.items():
        assert torch.equal(after[name][0], packed) and after[name][1] == state


def test_compiled_training_step_matches_eager(smol):
    """torch.compile (Trainer's torch_compile=True does the same) traces a LoRA step on LowRA layers into one graph,
    forward and backward (fullgraph=True: a graph break fails), and gives the eager loss and LoRA gradients."""
    tok = smol[1]
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        pm = get_peft_model(prepare_model_for_kbit_training(copy.deepcopy(smol[0]), use_gradient_checkpointing=False),
                            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        pm.train()
        step = torch.compile(pm, fullgraph=True) if compiled else pm
        torch._dynamo.reset()
        try:
            loss = step(**batch, labels=batch["input_ids"]).loss
            loss.backward()
        finally:
            torch._dynamo.reset()
        runs.append((loss.detach(), {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}))
    (eager_loss, eager_grads), (loss, grads) = runs
    assert grads.keys() == eager_grads.keys() and all(g is not None for g in grads.values())
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():  # inductor fuses and reorders float32 sums: close, not equal
        torch.testing.assert_close(g, eager_grads[n], rtol=1e-3, atol=1e-6, msg=n)


# -- merging --------------------------------------------------------------------------------------------------------


def test_encode_with_scales_matches_the_quantize_kernel(smol):
    """Re-encoding a weight with the scales its own quantization produced gives the kernel's codes, bit for bit;
    re-encoding the dequantized weight gives them back too (re-quantization with fixed scales is idempotent)."""
    from bitsandbytes_lowra.functional import quantize_lowra

    W = smol[2]["model.layers.0.self_attn.o_proj.weight"]
    packed, state = quantize_lowra(W, _row_bits(W.shape[0], 3), compress_statistics=False)
    assert torch.equal(encode_with_scales(W, state), packed)
    layer = smol[0].model.layers[0].self_attn.o_proj  # double-quantized scales
    lp, ls = layer._packed_and_state()
    assert ls.nested
    assert torch.equal(encode_with_scales(layer.dequantize(torch.float32), ls), lp)


def _level_step(state: QuantStateLowRA) -> torch.Tensor:
    """Per element, the largest gap between adjacent levels of its row times its block scale: one quantization step."""
    n = 2 ** state.bits.long()
    code = state.code.float()
    gaps = (code[:, 1:] - code[:, :-1]).where(torch.arange(15)[None, :] < (n - 1)[:, None], torch.zeros(()))
    scale = state.absmax_fp32().repeat_interleave(state.blocksize, dim=1)[:, : state.shape[1]]
    return gaps.amax(1)[:, None] * scale


def test_merge_then_unmerge_is_exact_while_the_adapters_are_unchanged(model, batch):
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                          task_type="CAUSAL_LM"))
    # A delta of the order of a quantization step, so that the merge moves codes whatever lora_A's initialization
    # (global RNG): at std=0.05 one code moved in the four layers, or none after another test had drawn from the RNG.
    _randomize_lora(pm, std=2.0)
    before = _packed_snapshot(pm)
    y_lora = _logits(pm, batch)
    with pytest.warns(UserWarning, match="re-quantizes"):
        pm.merge_adapter()
    assert any(not torch.equal(_packed_snapshot(pm)[n][0], p) for n, (p, _) in before.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rounding on the way back: no warning
        pm.unmerge_adapter()
    assert all(torch.equal(_packed_snapshot(pm)[n][0], p) for n, (p, _) in before.items())
    assert torch.equal(_logits(pm, batch), y_lora)

    # an adapter changed while merged (e.g. trained on): the codes cannot simply be put back, so re-quantize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(0.5)
    with pytest.warns(UserWarning, match="Unmerging LoRA.*re-quantizes"):
        pm.unmerge_adapter()


def test_a_refused_merge_changes_nothing(model, batch):
    """lora_bias on a base without a bias cannot merge: refused before the codes are re-quantized."""
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False))
    before, y_lora = _packed_snapshot(pm), _logits(pm, batch)
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        pm.merge_adapter(safe_merge=True)
    assert all(torch.equal(_packed_snapshot(pm)[n][0], p) for n, (p, _) in before.items())
    assert torch.equal(_logits(pm, batch), y_lora)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_a_broken_adapter_is_refused_by_a_merge_into_codes(model, batch, safe_merge):
    """NaN in an adapter: no code represents it (searchsorted gave it the outermost level, a silent constant row), so
    merging into LowRA codes refuses it with or without safe_merge, and nothing changes."""
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    _randomize_lora(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = _packed_snapshot(pm)
    with pytest.raises(ValueError, match="seem to be broken"):
        pm.merge_adapter(safe_merge=safe_merge)
    assert all(torch.equal(_packed_snapshot(pm)[n][0], p) for n, (p, _) in before.items())
    assert not layer.merged
    with pytest.raises(ValueError, match="NaN or inf in 1 row"):
        lowra_peft.encode_with_scales(torch.full(layer.get_base_layer().weight.quant_state.shape, 0.0).index_fill_(
            0, torch.tensor([3]), float("inf")), layer.get_base_layer().weight.quant_state)


class _Biased(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = LinearLowRA.from_linear(nn.Linear(128, 64), _row_bits(64, 0))

    def forward(self, x):
        return self.proj(x)


def test_unmerge_keeps_a_base_bias_trained_while_merged():
    """bias="all" trains the base bias; an update made while merged survives the exact unmerge (the codes still go
    back bit for bit), and without one the bias comes back bit for bit too."""
    pm = get_peft_model(_Biased(), LoraConfig(r=4, target_modules=["proj"], bias="all", init_lora_weights=False))
    layer = pm.base_model.model.proj
    codes, bias0 = layer.base_layer.weight.data.clone(), layer.base_layer.bias.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
        pm.unmerge_adapter()
        assert torch.equal(layer.base_layer.bias, bias0) and torch.equal(layer.base_layer.weight.data, codes)
        pm.merge_adapter()
        with torch.no_grad():
            layer.base_layer.bias.add_(1.0)  # an optimizer step on the trainable base bias
        want = layer.base_layer.bias.detach().clone()
        pm.unmerge_adapter()
    assert torch.equal(layer.base_layer.bias, want) and torch.equal(layer.base_layer.weight.data, codes)


def test_decode_shortcut_follows_merge_and_unmerge(model):
    """Decoding a few tokens at a time (the fused CPU matmul, through LinearLowRA's decode shortcut after the first
    call) gives the full path's logits before a merge, after it (re-quantized codes) and after the unmerge."""
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    _randomize_lora(pm, std=0.05)
    ids = {"input_ids": torch.tensor([[1, 504, 3340, 282]])}  # 4 tokens: within the fused CPU matmul's rows

    def full():
        LinearLowRA._decode_shortcut = False
        try:
            return _logits(pm, ids)
        finally:
            LinearLowRA._decode_shortcut = True

    layers = [m for m in pm.modules() if isinstance(m, LinearLowRA)]
    _logits(pm, ids)
    assert all("_decode_call" in m.__dict__ for m in layers)
    before = _logits(pm, ids)
    assert torch.equal(before, full())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the re-quantization warning
        pm.merge_adapter()
    merged = _logits(pm, ids)
    assert torch.equal(merged, full()) and not torch.equal(merged, before)
    pm.unmerge_adapter()
    assert torch.equal(_logits(pm, ids), before)


def test_merge_then_unmerge_restores_within_requantization_tolerance(model, smol, batch):
    """Without the stored codes (keep_premerge_codes=False, e.g. to save memory) unmerge re-quantizes."""
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    for layer in lowra_peft.lowra_lora_layers(pm).values():
        layer.keep_premerge_codes = False
    _randomize_lora(pm, std=0.01)
    y_lora = _logits(pm, batch)
    with pm.disable_adapter():
        y_base = _logits(pm, batch)
    base_before = {n: m.get_base_layer().dequantize(torch.float32) for n, m in lowra_peft.lowra_lora_layers(pm).items()}

    with pytest.warns(UserWarning, match="re-quantizes"):
        pm.merge_adapter()
    layers = lowra_peft.lowra_lora_layers(pm)
    for name, m in layers.items():  # merged weight = nearest representable to Q + delta: within one level step
        state = m.get_base_layer().weight.quant_state
        target = base_before[name] + m.get_delta_weight("default")
        assert ((m.get_base_layer().dequantize(torch.float32) - target).abs() <= _level_step(state) + 1e-6).all()
    y_merged = _logits(pm, batch)
    with pytest.warns(UserWarning, match="re-quantizes"):
        pm.unmerge_adapter()
    y_restored = _logits(pm, batch)  # adapter active again, on the restored base

    changed = total = 0
    for name, m in layers.items():
        after = m.get_base_layer().dequantize(torch.float32)
        state = m.get_base_layer().weight.quant_state
        diff = (after - base_before[name]).abs()
        assert (diff <= _level_step(state) + 1e-6).all(), name  # no element moved by more than one level
        changed += int((diff > 0).sum())
        total += diff.numel()
    assert changed / total < 0.02  # and almost none moved at all
    # output error of the round trip, against the output effect of the adapter itself
    assert (y_restored - y_lora).norm() < 0.05 * (y_lora - y_base).norm()
    assert torch.isfinite(y_merged).all()


def test_merge_keeps_scales_tables_and_format(model):
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj"]))
    _randomize_lora(pm, std=2.0)  # a delta of the order of a quantization step: smaller ones rarely move a code
    layer = pm.base_model.model.model.layers[0].mlp.gate_proj
    state = copy.deepcopy(layer.get_base_layer().weight.quant_state)
    packed = layer.get_base_layer().weight.data.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert layer.get_base_layer().weight.quant_state == state
    assert layer.get_base_layer().weight.data.shape == packed.shape
    assert not torch.equal(layer.get_base_layer().weight.data, packed)  # a delta this large moves codes


def test_merge_and_unload_gives_lowra_or_dense(model, batch):
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    _randomize_lora(pm, std=0.01)
    y_lora = _logits(pm, batch)
    pm_dense = copy.deepcopy(pm)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = lowra_peft.merge_and_unload(pm)
    kinds = {type(m) for n, m in merged.model.layers.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {LinearLowRA}
    assert not any(hasattr(m, "lora_A") for m in merged.modules())

    dense = lowra_peft.merge_and_unload(pm_dense, dense=True)
    kinds = {type(m) for n, m in dense.model.layers.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {nn.Linear}
    torch.testing.assert_close(_logits(dense, batch), y_lora, rtol=1e-4, atol=1e-4)  # exact merge, fp32 rounding
    assert (_logits(merged, batch) - y_lora).norm() > (_logits(dense, batch) - y_lora).norm()


@pytest.mark.parametrize("prepare", [False, True])
def test_dense_unload_computes_in_the_models_dtype(tiny_checkpoint, tmp_path, monkeypatch, prepare):
    """A bf16 load, prepared for training (norms and embeddings to float32) or not: the dense layers of
    merge_and_unload(dense=True) take the dtype the rest of the model computes in, so the merged model runs."""
    from transformers import AutoModelForCausalLM

    from bitsandbytes_lowra import LowRAConfig

    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    with _quiet_transformers():
        m = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=LowRAConfig(bits=2),
                                                 device_map="cpu", dtype=torch.bfloat16)  # fmt: skip
    if prepare:
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_lora = pm(ids).logits.float()
    merged = lowra_peft.merge_and_unload(pm, dense=True)
    want = torch.float32 if prepare else torch.bfloat16
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == want == merged.model.norm.weight.dtype
    with torch.no_grad():
        y = merged(ids).logits.float()
    # exact merge: float32 rounding after prepare, bfloat16's (logits ~1) without (measured 3e-7 and 6e-3)
    assert (y - y_lora).abs().max() < (1e-5 if prepare else 0.03)


def test_dense_unload_of_every_layer_leaves_a_dense_model_that_saves_and_reloads(tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    """merge_and_unload(dense=True) over every LowRA layer leaves what model.dequantize() leaves: no quantizer and no
    quantization config, so it casts like a dense model and what it saves reloads (config.json said LowRA beside a
    checkpoint without LowRA state, which from_pretrained refused). A merge that leaves LowRA layers keeps them."""
    from transformers import AutoModelForCausalLM

    from bitsandbytes_lowra import LowRAConfig
    from bitsandbytes_lowra.integrations.transformers import LowRAHfQuantizer

    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))

    def load():
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, quantization_config=LowRAConfig(bits=2),
                                                        device_map="cpu")  # fmt: skip

    def logits(m):
        with torch.no_grad():
            return m(ids).logits

    pm = get_peft_model(load(), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    _randomize_lora(pm)
    y_lora = logits(pm)
    dense = lowra_peft.merge_and_unload(pm, dense=True)
    assert getattr(dense, "hf_quantizer", None) is None and getattr(dense.config, "quantization_config", None) is None
    assert not getattr(dense, "is_loaded_in_4bit", False) and not getattr(dense, "is_quantized", False)
    y = logits(dense)
    torch.testing.assert_close(y, y_lora, rtol=1e-4, atol=1e-4)
    dense.save_pretrained(tmp_path / "dense")
    with _quiet_transformers():
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", device_map="cpu")
    assert torch.equal(logits(back), y)
    assert dense.double().model.layers[0].mlp.down_proj.weight.dtype == torch.float64  # refused while LowRA

    part = lowra_peft.merge_and_unload(get_peft_model(load(), LoraConfig(r=4, target_modules=["q_proj"])), dense=True)
    assert isinstance(part.hf_quantizer, LowRAHfQuantizer) and part.config.quantization_config is not None
    assert isinstance(part.model.layers[0].mlp.down_proj, LinearLowRA)
    with pytest.raises(ValueError, match="cast"):
        part.double()

    deq = load()
    deq.dequantize()
    assert deq.double().model.layers[0].mlp.down_proj.weight.dtype == torch.float64  # the guards go with dequantize


# -- several adapters, save / load ---------------------------------------------------------------------------------


def test_several_adapters_on_one_base_and_disable(model, batch):
    with torch.no_grad():
        y_base = model(**batch).logits
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    pm.add_adapter("second", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    _randomize_lora(pm)
    y_first = _logits(pm, batch)
    pm.set_adapter("second")
    y_second = _logits(pm, batch)
    assert not torch.allclose(y_first, y_second)
    assert not torch.allclose(y_second, y_base)
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRALoraLinear) and set(q.lora_A) == {"default", "second"}
    with pm.disable_adapter():
        assert torch.equal(_logits(pm, batch), y_base)
    # mixed batch: each row with its own adapter
    pm.eval()
    mixed = pm(**batch, adapter_names=["default", "second"]).logits.detach()
    torch.testing.assert_close(mixed[0], y_first[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1], y_second[1], rtol=1e-4, atol=1e-4)
    # both merged into the base in one re-quantization, then back exactly
    before = _packed_snapshot(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.base_model.merge_adapter(["default", "second"])
    assert q.merged_adapters == ["default", "second"]
    pm.base_model.unmerge_adapter()
    assert not q.merged and all(torch.equal(_packed_snapshot(pm)[n][0], p) for n, (p, _) in before.items())


def test_adapter_save_and_load_give_identical_outputs(model, smol, batch, tmp_path):
    base_copy = copy.deepcopy(model)
    base_copy2 = copy.deepcopy(model)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    _randomize_lora(pm)
    y = _logits(pm, batch)
    pm.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 2 * 7 * LAYERS and all(".lora_A." in k or ".lora_B." in k for k in saved)

    loaded = PeftModel.from_pretrained(base_copy, tmp_path / "adapter")
    assert {type(m) for m in loaded.modules() if hasattr(m, "lora_A")} == {LowRALoraLinear}
    assert torch.equal(_logits(loaded, batch), y)

    # transformers' own adapter loading (inject_adapter_in_model) dispatches the same way
    base_copy2.load_adapter(str(tmp_path / "adapter"))
    assert {type(m) for m in base_copy2.modules() if hasattr(m, "lora_A")} == {LowRALoraLinear}
    assert torch.equal(_logits(base_copy2, batch), y)


def test_transformers_add_adapter_needs_peft_0_22(model, batch):
    """transformers 5.2x refuses its own add_adapter / enable_adapters / ... with peft < 0.22 (docs/peft.md says so):
    the refusal is asserted as it is, so this test notices the day the installed versions allow it; then add_adapter
    must dispatch to LowRALoraLinear like every other path."""
    import peft
    from packaging.version import Version
    from transformers.integrations import peft as hf_peft

    min_version = getattr(hf_peft, "MIN_PEFT_VERSION", "0.0.0")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    if Version(peft.__version__) < Version(min_version):
        refusal = f"The version of PEFT you are using is not compatible, please use a version >= {min_version}"
        for call in (lambda: model.add_adapter(config), model.enable_adapters, model.disable_adapters,
                     model.active_adapters):
            with pytest.raises(ValueError, match=f"^{re.escape(refusal)}$"):
                call()
        return
    model.add_adapter(config)
    assert {type(m) for m in model.modules() if hasattr(m, "lora_A")} == {LowRALoraLinear}
    y = _logits(model, batch)
    model.disable_adapters()
    model.enable_adapters()
    assert torch.equal(_logits(model, batch), y)


# -- LoftQ through peft ---------------------------------------------------------------------------------------------


def _loftq_model(model, dense, rank, init="loftq", names=("k_proj", "v_proj")):
    results = {}
    for n, m in model.named_modules():
        if isinstance(m, LinearLowRA) and n.rsplit(".", 1)[-1] in names:
            results[n] = loftq.loftq_linear(m, dense[n + ".weight"], rank, iterations=3, init=init)
    return results


def test_get_peft_model_picks_up_stored_loftq_init(model, smol):
    dense = smol[2]
    results = _loftq_model(model, dense, rank=8)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["k_proj", "v_proj"]))
    for name, res in results.items():
        layer = pm.base_model.model.get_submodule(name)
        assert isinstance(layer, LowRALoraLinear)
        W = dense[name + ".weight"]
        effective = layer.get_base_layer().dequantize(torch.float32) + layer.get_delta_weight("default").detach()
        err = float(torch.linalg.norm(W - effective))
        assert err == pytest.approx(res.errors[res.best_step], rel=1e-4)
        assert err < res.baseline_error  # better than the zero-initialized adapter on a plainly quantized base
        # independent of lora_alpha: the stored factors are scale-free
        torch.testing.assert_close(layer.get_delta_weight("default"), res.lora_B @ res.lora_A, rtol=1e-4, atol=1e-6)


def test_stored_init_survives_save_pretrained_of_the_base(model, smol, tmp_path):
    dense = smol[2]
    results = _loftq_model(model, dense, rank=4, names=("k_proj",))
    sd = model.state_dict()
    keys = [k for k in sd if k.endswith(loftq.INIT_A) or k.endswith(loftq.INIT_B)]
    assert len(keys) == 2 * LAYERS
    fresh = copy.deepcopy(smol[0])
    for n, m in fresh.named_modules():
        if n in results:
            loftq.register_init_buffers(m, 4)
    fresh.load_state_dict(sd)
    for n in results:
        a, b = loftq.stored_init(fresh.get_submodule(n))
        assert torch.equal(a, results[n].lora_A) and torch.equal(b, results[n].lora_B)


def test_loftq_rank_mismatch_and_missing_init_are_clear_errors(model, smol):
    _loftq_model(model, smol[2], rank=8, names=("v_proj",))
    with pytest.raises(ValueError, match="rank 8.*r=4.*LoraConfig\\(r=8\\)"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.warns(UserWarning, match="ignores its stored initialization"):
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights="gaussian"))
    with pytest.raises(ValueError, match="has none"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights="loftq",
                                         loftq_config={"loftq_bits": 4}))


def test_loftq_bases_left_without_an_adapter_warn(model, smol, tmp_path):
    """LoftQ stores every base as W - B0 A0: a layer that gets no adapter keeps a base without its low-rank part
    (worse than plain quantization). Every injection path says so, naming how many and one of them."""
    _loftq_model(model, smol[2], rank=4, names=("k_proj", "v_proj"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # all LoftQ layers adapted: no warning
        get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["k_proj", "v_proj"]))
    base = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=rf"{LAYERS} LowRA layers hold a LoftQ.*e\.g\. model\.layers\.0\.self_attn"
                                         r"\.k_proj.*target every quantized layer") as record:
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=["v_proj"]))
    assert sum("LoftQ/PiSSA initialization but got no LoRA" in str(w.message) for w in record) == 1  # once
    assert lowra_peft.loftq_bases_without_adapter(pm) == [f"base_model.model.model.layers.{i}.self_attn.k_proj"
                                                          for i in range(LAYERS)]
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.warns(UserWarning, match="got no LoRA adapter"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="got no LoRA adapter"):
        base.load_adapter(str(tmp_path / "adapter"))


def test_merge_and_unload_drops_the_stale_init(model, smol):
    _loftq_model(model, smol[2], rank=4, names=("v_proj",))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["v_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    assert loftq.stored_init(merged.model.layers[0].self_attn.v_proj) is None


def test_replace_lora_weights_lowra_loftq(model, smol, batch):
    dense = smol[2]
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj"]))
    report = lowra_peft.replace_lora_weights_lowra_loftq(pm, dense, iterations=2)
    assert len(report) == LAYERS
    for name, (before, after) in report.items():
        assert after < before
        layer = pm.base_model.model.get_submodule(name[len("base_model.model."):])
        W = dense[name[len("base_model.model."):] + ".weight"]
        eff = layer.get_base_layer().dequantize(torch.float32) + layer.get_delta_weight("default").detach()
        assert float(torch.linalg.norm(W - eff)) == pytest.approx(after, rel=1e-4)

    # base kept (peft's one-step variant), and a callback that rejects everything rolls back
    pm2 = get_peft_model(copy.deepcopy(smol[0]), LoraConfig(r=8, target_modules=["k_proj"]))
    packed = _packed_snapshot(pm2)
    report = lowra_peft.replace_lora_weights_lowra_loftq(pm2, requantize_base=False)  # reads the checkpoint dir
    assert all(after < before for before, after in report.values())
    assert all(torch.equal(_packed_snapshot(pm2)[n][0], p) for n, (p, _) in packed.items())
    pm3 = get_peft_model(copy.deepcopy(smol[0]), LoraConfig(r=8, target_modules=["k_proj"]))
    y = _logits(pm3, batch)
    report = lowra_peft.replace_lora_weights_lowra_loftq(pm3, dense, iterations=1, callback=lambda m, n: False)
    assert report == {}
    assert torch.equal(_logits(pm3, batch), y)
    with pytest.raises(KeyError, match="no dense weight"):
        lowra_peft.replace_lora_weights_lowra_loftq(pm3, {})
    with pytest.raises(ValueError, match="dense float weight"):
        lowra_peft.replace_lora_weights_lowra_loftq(pm3, lambda key: torch.zeros(10, dtype=torch.uint8))


def test_dispatch_is_registered_when_peft_is_imported_after_us():
    """`import bitsandbytes_lowra` does not import peft; peft imported later (after a find_spec probe, as
    transformers' is_peft_available does) gets the LowRA dispatch. A fresh interpreter: this session has both."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.util; import bitsandbytes_lowra; assert 'peft' not in sys.modules; "
        "assert importlib.util.find_spec('peft'); import peft; "
        "from peft.tuners.lora.model import LoraModel; assert LoraModel._create_new_module._lowra_dispatch"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_qlora_script_through_from_pretrained(smol, tmp_path, monkeypatch):
    """The QLoRA user's script, unchanged but for the quantization config: from_pretrained(LowRAConfig),
    prepare_model_for_kbit_training, get_peft_model("all-linear"), Trainer, save_pretrained of the adapter,
    PeftModel.from_pretrained on a freshly loaded base, merge_and_unload, save and reload of the merged model."""
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from bitsandbytes_lowra import LowRAConfig

    monkeypatch.setenv("LOWRA_PLAN_CACHE", str(tmp_path / "plans"))
    tok, path = smol[1], data.smollm2_checkpoint()

    def load():
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(path, quantization_config=LowRAConfig(bits=1.75),
                                                        num_hidden_layers=LAYERS, dtype=torch.float32)

    model = prepare_model_for_kbit_training(load())
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert sum(isinstance(m, LowRALoraLinear) for m in pm.modules()) == 7 * LAYERS
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", seed=0)
    Trainer(model=pm, args=args, train_dataset=[dict(tok(t)) for t in TEXTS],
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False)).train()
    pm.save_pretrained(tmp_path / "adapter")
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    y = _logits(pm.eval(), batch)

    reloaded = PeftModel.from_pretrained(load(), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded, batch), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = reloaded.merge_and_unload()
    assert isinstance(merged.model.layers[0].mlp.up_proj, LinearLowRA)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(again, batch), _logits(merged, batch))
