"""Evaluation harness: perplexity, ACLSum ROUGE and the Appendix C memory model (bitsandbytes_lowra.eval)."""

import math
import os

import pytest
import torch

from bitsandbytes_lowra import data
from bitsandbytes_lowra.eval import memory, rouge
from bitsandbytes_lowra.eval.perplexity import (
    DEFAULT_CONTEXT,
    DEFAULT_MAX_TOKENS,
    _cluster_se,
    _windows,
    eval_slices,
    perplexity,
    train_chunks,
    wiki_eval_tokens,
)


@pytest.fixture(scope="module")
def smollm2():
    # One intra-op thread for this module: the forwards here are tiny, and on the shared 2-core machine two OpenMP
    # threads waiting on each other made them 3-5x slower (measured); restored for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        yield data.load_smollm2()
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- perplexity


def test_wiki_eval_tokens_layout(smollm2):
    _, tok = smollm2
    leads = data.wiki_leads("eval")
    first = tok(leads[0], add_special_tokens=False)["input_ids"]
    second = tok(leads[1], add_special_tokens=False)["input_ids"]
    n = len(first) + 1 + len(second) + 1 + 10
    ids = wiki_eval_tokens(tok, max_tokens=n)
    assert ids.dtype == torch.long and ids.shape == (n,)
    expected = first + [tok.eos_token_id] + second + [tok.eos_token_id]
    assert ids[: len(expected)].tolist() == expected
    assert torch.equal(ids, wiki_eval_tokens(tok, max_tokens=n))  # deterministic


def test_train_chunks_are_blocks_of_train_leads(smollm2):
    _, tok = smollm2
    chunks = train_chunks(tok, context=64, max_chunks=5)
    assert chunks.dtype == torch.long and chunks.shape == (5, 64)
    first = tok(data.wiki_leads("train")[0], add_special_tokens=False)["input_ids"]
    flat = chunks.flatten().tolist()
    assert flat[: min(len(first), 320)] == first[:320]
    assert tok.eos_token_id in flat
    with pytest.raises(ValueError, match="context"):
        train_chunks(tok, context=1)


@pytest.mark.parametrize("n,context,stride", [(10, 4, 4), (11, 4, 4), (13, 5, 2), (9, 9, 1), (2, 512, 512)])
def test_windows_score_each_token_at_most_once(n, context, stride):
    scored = []
    for begin, end, first in _windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        scored.extend(range(first, end))
    assert len(scored) == len(set(scored))
    if stride == context:  # non-overlapping: the first token of each window has no context and is not scored
        assert scored == [t for t in range(n) if t % context != 0]
    else:  # sliding: every token but the very first is scored once
        assert sorted(scored) == list(range(1, n))


def test_perplexity_matches_manual_computation(smollm2):
    model, tok = smollm2
    context = 64
    tokens = wiki_eval_tokens(tok, max_tokens=2 * context + 30)  # two full windows and a short one
    res = perplexity(model, tokens, context=context, batch_size=2, progress=False)
    assert res["windows"] == 3 and res["tokens"] == 2 * (context - 1) + 29

    total = 0.0
    with torch.no_grad():
        for begin in range(0, tokens.numel(), context):
            w = tokens[begin : begin + context][None]
            logp = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
            total -= logp.gather(1, w[0, 1:, None]).sum().item()
        # The model's own mean loss on the first window agrees too.
        hf_loss = model(tokens[None, :context], labels=tokens[None, :context]).loss.item()
    assert res["total_nll"] == pytest.approx(total, rel=1e-5)
    first_window = perplexity(model, tokens[:context], context=context, progress=False)
    assert first_window["nll"] == pytest.approx(hf_loss, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / res["tokens"]), rel=1e-5)


def test_perplexity_is_sane_deterministic_and_batch_independent(smollm2):
    model, tok = smollm2
    model.train()  # the harness must switch to eval (no dropout) and restore the mode
    tokens = wiki_eval_tokens(tok, max_tokens=256)
    a = perplexity(model, tokens, context=128, batch_size=4, progress=False)
    assert model.training
    model.eval()
    b = perplexity(model, tokens, context=128, batch_size=4, progress=False)
    c = perplexity(model, tokens, context=128, batch_size=1, progress=False)
    assert math.isfinite(a["ppl"]) and 5 < a["ppl"] < 60, a
    assert a["ppl"] == b["ppl"]
    assert c["ppl"] == pytest.approx(a["ppl"], rel=1e-4)
    # Overlapping windows give every scored token more context: perplexity does not get worse.
    d = perplexity(model, tokens, context=128, stride=64, progress=False)
    assert d["tokens"] == tokens.numel() - 1 and d["ppl"] < a["ppl"]


def test_perplexity_rejects_bad_arguments(smollm2):
    model, tok = smollm2
    tokens = torch.arange(10)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens, context=4, stride=5, progress=False)
    with pytest.raises(ValueError, match="context"):
        perplexity(model, tokens, context=1, progress=False)
    with pytest.raises(ValueError, match="1-D LongTensor"):
        perplexity(model, tokens[None], context=4, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        perplexity(model, tok, max_tokens=1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, tokens, context=4, batch_size=0, progress=False)


def test_perplexity_says_how_much_of_the_stream_it_used(smollm2):
    """The default budget cuts the eval split: the result says so (it used to cut silently)."""
    model, tok = smollm2
    r = perplexity(model, tok, context=32, max_tokens=64, progress=False)
    assert (r["available_tokens"], r["input_tokens"], r["truncated"]) == (wiki_eval_tokens(tok).numel(), 64, True)
    tokens = wiki_eval_tokens(tok, max_tokens=100)
    r = perplexity(model, tokens, context=32, max_tokens=64, progress=False)
    assert (r["available_tokens"], r["input_tokens"], r["truncated"]) == (100, 64, True)
    r = perplexity(model, tokens, context=32, max_tokens=None, progress=False)
    assert (r["available_tokens"], r["input_tokens"], r["truncated"]) == (100, 100, False)


def test_text_only_perplexity_leaves_out_separators_and_lead_starts(smollm2):
    """ppl_text scores the leads' own text: not the EOS separator targets, nor the first target after each (a new
    lead's first token, which has nothing of its lead before it). ppl keeps every target."""
    model, tok = smollm2
    eos, context = tok.eos_token_id, 64
    tokens = wiki_eval_tokens(tok, max_tokens=8 * context)
    assert (tokens == eos).sum() >= 3  # the first leads are short enough: some separators are scored
    res = perplexity(model, tokens, context=context, progress=False, separator=eos)
    nll = {}
    with torch.no_grad():
        for begin in range(0, tokens.numel(), context):
            w = tokens[begin : begin + context]
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            for j, v in enumerate((-logp.gather(1, w[1:, None])[:, 0]).tolist()):
                nll[begin + 1 + j] = v
    sep = [t for t in nll if tokens[t] == eos]
    start = [t for t in nll if tokens[t - 1] == eos and tokens[t] != eos]
    text = [t for t in nll if t not in sep and t not in start]
    assert res["excluded"]["separator"]["tokens"] == len(sep) and res["excluded"]["lead_start"]["tokens"] == len(start)
    assert res["tokens_text"] == len(text) == res["tokens"] - len(sep) - len(start)
    assert res["total_nll_text"] == pytest.approx(sum(nll[t] for t in text), rel=1e-5)
    assert res["ppl_text"] == pytest.approx(math.exp(sum(nll[t] for t in text) / len(text)), rel=1e-5)
    assert res["excluded"]["separator"]["total_nll"] == pytest.approx(sum(nll[t] for t in sep), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(sum(nll.values()) / len(nll)), rel=1e-5)  # unchanged
    # a tokenizer's stream gets its EOS as the separator; a bare tensor without one gets no text-only numbers
    from_tok = perplexity(model, tok, context=context, max_tokens=8 * context, progress=False)
    assert from_tok["ppl_text"] == res["ppl_text"]
    bare = perplexity(model, tokens, context=context, progress=False)
    assert bare["ppl_text"] is None and bare["nll_text_se"] is None and bare["se_clusters"] == "window"


def test_standard_error_is_clustered():
    """One value per cluster: the textbook standard error of a mean; equal cluster means: none at all, however
    spread the values inside them are (what correlated tokens of one lead look like is the cluster's business)."""
    x = torch.tensor([1.0, 4.0, 2.0, 7.0, 3.0], dtype=torch.float64)
    assert _cluster_se(x, torch.arange(5)) == pytest.approx(float(x.std() / math.sqrt(5)))
    assert _cluster_se(torch.tensor([1.0, 3.0, 0.0, 4.0]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0)
    assert _cluster_se(x, torch.zeros(5, dtype=torch.long)) is None  # one cluster: no spread to measure
    # the same values in 2 clusters of correlated runs: a larger error than as 5 independent values
    y = torch.tensor([1.0, 1.0, 1.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    assert _cluster_se(y, torch.tensor([0, 0, 0, 1, 1, 1])) > _cluster_se(y, torch.arange(6))


def test_perplexity_standard_errors_cluster_by_lead(smollm2):
    model, tok = smollm2
    tokens = wiki_eval_tokens(tok, max_tokens=256)
    r = perplexity(model, tokens, context=128, progress=False, separator=tok.eos_token_id)
    leads = int((tokens[1:-1] == tok.eos_token_id).sum()) + 1  # leads that have a scored target
    assert r["se_clusters"] == "lead" and r["clusters"] == leads
    assert 0 < r["nll_se"] < r["nll"] and 0 < r["nll_text_se"] < r["nll_text"]


def test_eval_slices_are_disjoint_lead_aligned_and_spread_over_the_split(smollm2):
    _, tok = smollm2
    stream = wiki_eval_tokens(tok)
    slices = eval_slices(tok, 6, 100)
    starts = [s["start"] for s in slices]
    assert starts[0] == 0 and all(a + 100 <= b for a, b in zip(starts, starts[1:]))  # disjoint
    assert starts[-1] >= stream.numel() * 5 // 6  # spread over the whole split, not its first part
    leads = data.wiki_leads("eval")
    for s in slices:
        assert s["tokens"].numel() == 100 and torch.equal(s["tokens"], stream[s["start"] : s["start"] + 100])
        assert s["start"] == 0 or stream[s["start"] - 1] == tok.eos_token_id  # a lead's first token
        first = tok(leads[s["first_lead"]], add_special_tokens=False)["input_ids"]
        assert s["tokens"][:10].tolist() == first[:10] and s["lead"] == leads[s["first_lead"]][:40]
    whole = eval_slices(tok, 4)  # default length: up to the next slice, the whole split covered
    assert sum(s["tokens"].numel() for s in whole) == stream.numel() - whole[0]["start"]
    with pytest.raises(ValueError, match="at most"):
        eval_slices(tok, 24, 10**5)


def test_default_budget_is_a_fixed_prefix():
    assert DEFAULT_MAX_TOKENS % DEFAULT_CONTEXT == 0  # whole windows only


# ---------------------------------------------------------------- ROUGE


def test_rouge_scoring_function():
    ref = "They propose simple methods to improve analogy solvers."
    perfect = rouge.rouge_scores([ref], [ref])
    assert all(perfect[k] == pytest.approx(1.0) for k in rouge.ROUGE_TYPES)
    disjoint = rouge.rouge_scores(["zebra quantum giraffe"], [ref])
    assert all(disjoint[k] == 0.0 for k in rouge.ROUGE_TYPES)
    partial = rouge.rouge_scores(["they propose methods"], [ref])
    assert 0 < partial["rouge1"] < 1 and partial["rouge1"] > partial["rouge2"]
    with pytest.raises(ValueError, match="predictions"):
        rouge.rouge_scores(["a"], ["a", "b"])


def test_aclsum_examples_use_abstract_and_three_aspect_summary():
    ex = rouge.aclsum_examples("test", 3)
    raw = data.aclsum("test")[:3]
    assert [e["id"] for e in ex] == [r["id"] for r in raw]
    for e, r in zip(ex, raw):
        assert e["reference"] == " ".join(r["summary"][a].strip() for a in ("challenge", "approach", "outcome"))
        assert " ." not in e["source"] and " ," not in e["source"] and "( " not in e["source"]
        assert e["source"].split()[:3] == rouge.detokenize(r["sentences"]["abstract"][0]).split()[:3]
    assert rouge.detokenize("systems ( MT ) , e.g . it 's") == "systems (MT), e.g. it's"
    with pytest.raises(ValueError, match="n_examples"):
        rouge.aclsum_examples("test", 0)


def test_rouge_eval_on_two_examples(smollm2):
    model, tok = smollm2
    side = tok.padding_side
    prompt = rouge.build_prompt(tok, "Some abstract.")
    assert prompt.rstrip().endswith("assistant") and "Some abstract." in prompt  # chat template used
    res = rouge.rouge_eval(model, tok, n_examples=2, max_new_tokens=8, batch_size=2, progress=False)
    assert res["n_examples"] == 2 and len(res["examples"]) == 2
    for k in rouge.ROUGE_TYPES:
        assert 0.0 <= res[k] <= 1.0
    assert all(e["prediction"] for e in res["examples"])
    # Left padding must not change greedy decoding: the shorter prompt alone gives the same summary.
    sources = [e["source"] for e in rouge.aclsum_examples("test", 2)]
    shorter = min(range(2), key=lambda i: len(tok(rouge.build_prompt(tok, sources[i]))["input_ids"]))
    alone = rouge.generate_summaries(model, tok, [sources[shorter]], max_new_tokens=8, batch_size=1)
    assert alone == [res["examples"][shorter]["prediction"]]
    assert tok.padding_side == side  # the tokenizer is left as we found it
    with pytest.raises(ValueError, match="batch_size"):
        rouge.rouge_eval(model, tok, n_examples=1, batch_size=0, progress=False)


# ---------------------------------------------------------------- memory model

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # head_dim 16: k/v project to 32
    "vocab_size": 100,
    "tie_word_embeddings": False,
}


def test_memory_tiny_config_matches_hand_computation():
    r, seq = 8, 16
    b = memory.memory_breakdown(TINY, 2.0, lora_r=r, seq_len=seq, double_quant=False)
    # per decoder layer (out x in): q 64x64, k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64, down 64x128
    q_params = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 128 * 64 + 128 * 64 + 64 * 128)
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert b["counts"]["quantized_params"] == q_params == 73728
    assert b["counts"]["quantized_rows"] == rows == 1024
    assert b["counts"]["quantized_layers"] == 14
    # embed 100x64, lm_head 100x64, 2 norms per layer + final norm of 64
    assert b["counts"]["nonquantized_params"] == 2 * 6400 + (2 * 2 + 1) * 64
    lora = 2 * r * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) * 3)
    assert b["counts"]["lora_params"] == lora == 16384

    lo = b["lowra"]
    assert lo["quantized_weights"] == q_params * 2 // 8
    blocks = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64 * 2)  # rows x ceil(cols / 64)
    assert lo["metadata_detail"] == {
        "absmax": blocks * 4,
        "codebooks": rows * 16 * 2,
        "thresholds": rows * 15 * 2,
        "row_offsets": (rows + 14) * 8,
        "bits": rows,
    }
    assert lo["metadata"] == 4608 + 32768 + 30720 + 8304 + 1024
    assert lo["nonquantized_params"] == 13120 * 2
    assert (lo["lora_params"], lo["lora_grads"], lo["optimizer_states"]) == (lora * 2, lora * 2, lora * 8)
    saved_per_token = 2 * (6 * 64 + 128 + 7 * r)  # adapter inputs + rank-r intermediates, both layers
    assert lo["activations"] == seq * (2 * 64 + saved_per_token / 2) * 2  # checkpoints + one layer recomputed
    assert lo["inference_total"] == lo["quantized_weights"] + lo["metadata"] + 13120 * 2 + lora * 2
    assert lo["finetune_total"] == lo["inference_total"] + lora * 10 + lo["activations"]
    assert lo["effective_bits"] == pytest.approx(8 * (18432 + 77424) / q_params)

    nf4 = b["qlora_nf4"]
    assert nf4["quantized_weights"] == q_params // 2
    assert nf4["metadata"] == q_params // 64 * 4 + 14 * 16 * 4
    assert nf4["finetune_total"] - nf4["quantized_weights"] - nf4["metadata"] == (
        lo["finetune_total"] - lo["quantized_weights"] - lo["metadata"]
    )

    no_gc = memory.memory_breakdown(TINY, 2.0, lora_r=r, seq_len=seq, double_quant=False, gradient_checkpointing=False)
    assert no_gc["lowra"]["activations"] == seq * saved_per_token * 2
    dq = memory.memory_breakdown(TINY, 2.0, lora_r=r, seq_len=seq, double_quant=True)
    # uint8 absmax + one fp32 absmax per 256 of them (each layer has <= 256 blocks) + 256-entry fp32 map + offset
    assert dq["lowra"]["metadata_detail"]["absmax"] == blocks + 14 * (4 + 1024 + 4)
    shared = memory.memory_breakdown(TINY, 2.0, lora_r=r, seq_len=seq, shared_codebooks=True)
    assert shared["lowra"]["metadata_detail"]["codebooks"] == 14 * 3 * 16 * 2
    # Biases of quantized layers stay unquantized: q, k, v, o biases of each layer join the other parameters.
    biased = memory.memory_breakdown({**TINY, "attention_bias": True}, 2.0, lora_r=r)
    assert biased["counts"]["quantized_params"] == q_params
    assert biased["counts"]["nonquantized_params"] == 13120 + 2 * (64 + 32 + 32 + 64)


def test_memory_smollm2_linear_layers_match_the_real_model(smollm2):
    model, _ = smollm2
    linears, other = memory.model_shapes("smollm2-135m")
    real = data.smollm2_linear_weights()
    assert {name: (o, i) for name, o, i in linears} == {k: tuple(v.shape) for k, v in real.items()}
    n_linear = sum(v.numel() for v in real.values())
    assert n_linear == 106_168_320
    assert other == sum(p.numel() for p in model.parameters()) - n_linear  # tied embedding counted once
    b = memory.memory_breakdown("smollm2-135m", 2.0)
    assert b["counts"]["quantized_params"] == n_linear


def test_memory_is_monotone_in_bits():
    bits = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0]
    rows = [memory.memory_breakdown("llama-2-7b", x)["lowra"] for x in bits]
    for key in ("quantized_weights", "inference_total", "finetune_total", "effective_bits"):
        vals = [r[key] for r in rows]
        assert all(a < b for a, b in zip(vals, vals[1:])), key
    for key in ("metadata", "lora_params", "optimizer_states", "activations"):
        assert len({r[key] for r in rows}) == 1, key
    overhead = {round(r["effective_bits"] - x, 9) for r, x in zip(rows, bits)}
    assert len(overhead) == 1  # metadata costs the same bits per weight at every precision
    at4 = memory.memory_breakdown("llama-2-7b", 4)
    assert at4["lowra"]["quantized_weights"] == at4["qlora_nf4"]["quantized_weights"]  # all cols multiples of 64


def test_memory_builds_large_models_without_allocating():
    def rss():
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    b = memory.memory_breakdown("llama-65b", 2.0)
    assert rss() - before < 512 * 2**20
    total = b["counts"]["quantized_params"] + b["counts"]["nonquantized_params"]
    assert 65.0e9 < total < 65.6e9  # LLaMA-65B has 65.3B parameters


def test_memory_config_sources_agree(tmp_path):
    from bitsandbytes_lowra.eval.memory import load_config

    path = memory.CONFIG_DIR / "llama-2-7b.json"
    copy = tmp_path / "config.json"
    copy.write_text(path.read_text())
    counts = [
        memory.memory_breakdown(src, 2.0)["counts"]
        for src in ("llama-2-7b", path, tmp_path, load_config("llama-2-7b"))
    ]
    assert all(c == counts[0] for c in counts)
    assert counts[0]["quantized_params"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert set(memory.available_configs()) >= {"llama-2-7b", "llama-2-13b", "llama-33b", "llama-65b", "smollm2-135m"}


def test_memory_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        memory.memory_breakdown("llama-2-7b", 0.5)
    with pytest.raises(ValueError, match="bits"):
        memory.memory_breakdown("llama-2-7b", 4.5)
    with pytest.raises(ValueError, match="no config"):
        memory.memory_breakdown("no-such-model", 2.0)
    with pytest.raises(ValueError, match="model_type"):
        memory.memory_breakdown({"hidden_size": 8}, 2.0)
    with pytest.raises(ValueError, match="blocksize"):
        memory.memory_breakdown(TINY, 2.0, blocksize=10)
    with pytest.raises(ValueError, match="lora_r"):
        memory.memory_breakdown(TINY, 2.0, lora_r=-1)


def test_memory_table_formatting():
    table = memory.memory_table("llama-2-7b", [4, 2, 1.75])
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| component"))
    assert header.count("|") == 6 and "QLoRA NF4" in header and "LowRA 1.75 bit" in header
    for comp in memory.COMPONENTS + ("inference_total", "finetune_total"):
        assert any(line.startswith(f"| {comp} |") for line in lines)
    finetune = next(line for line in lines if line.startswith("| finetune_total |"))
    mib = [float(x.replace(",", "")) for x in finetune.strip("|").split("|")[1:]]
    b2 = memory.memory_breakdown("llama-2-7b", 2)
    assert mib[2] == pytest.approx(b2["lowra"]["finetune_total"] / 2**20, abs=0.05)
