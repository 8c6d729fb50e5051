"""finetune.py's training data: the aclsum sequences (one paper each, loss on the summary only, a stated policy for
papers longer than seq_len), the epoch check every dataset goes through, and what reaches the model under Trainer."""

import pytest
import torch

from bitsandbytes_lowra import data
from bitsandbytes_lowra.eval import rouge
from bitsandbytes_lowra.finetune import FinetuneArgs, TrainBlocks, aclsum_blocks, add_lora, train, train_blocks


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.smollm2_checkpoint())


def _rows(blocks):
    """(prompt ids, target ids, padding length) of each sequence, split by its labels and attention mask."""
    out = []
    for ids, labels, mask in zip(blocks.input_ids, blocks.labels, blocks.attention_mask):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any(), "padding only at the end"
        assert (labels[n:] == -100).all(), "no loss on padding"
        target = (labels != -100).nonzero().flatten()
        first = int(target[0])
        assert target.tolist() == list(range(first, n)), "the target is one run up to the end of the example"
        assert labels[first:n].tolist() == ids[first:n].tolist()
        out.append((ids[:first].tolist(), ids[first:n].tolist(), len(ids) - n))
    return out


def test_aclsum_sequences_are_one_paper_each_with_loss_on_the_summary_only(tok):
    blocks = aclsum_blocks(tok, 512)
    examples = rouge.aclsum_examples("train", None)
    assert blocks.input_ids.shape == (len(examples), 512) and blocks.info["skipped"] == 0
    rows = _rows(blocks)
    fit = 0
    for (prompt, target, _), ex in zip(rows, examples):
        # the summary and EOS, whole, after exactly the prompt the ROUGE generation sees for this paper
        assert target[-1] == tok.eos_token_id and tok.decode(target[:-1]) == ex["reference"]
        if prompt == rouge.prompt_ids(tok, ex["source"]):
            fit += 1
    assert fit == len(examples) - blocks.info["truncated"] and blocks.info["truncated"] == 1
    assert blocks.info["target_tokens"] == sum(len(t) for _, t, _ in rows)
    assert blocks.info["tokens"] == int(blocks.attention_mask.sum())


def test_aclsum_cuts_the_abstract_never_the_summary_and_skips_what_cannot_fit(tok):
    seq_len = 160  # shorter than most papers, and than one summary with its prompt (57 + 108 tokens)
    blocks = aclsum_blocks(tok, seq_len)
    examples = iter(rouge.aclsum_examples("train", None))
    assert blocks.info["skipped"] >= 1 and len(blocks) + blocks.info["skipped"] == blocks.info["papers"] == 100
    assert blocks.info["truncated"] >= len(blocks) // 2 and blocks.info["abstract_tokens_dropped"] > 0
    empty = rouge.prompt_ids(tok, "")
    prefix, suffix = empty[:-7], empty[-6:]  # before "\n\n" + abstract: template, instruction; after: the end
    for prompt, target, _ in _rows(blocks):
        ex = next(e for e in examples if tok.decode(target[:-1]) == e["reference"])  # the summary, whole, in order
        assert prompt[: len(prefix)] == prefix, "every sequence starts at its prompt, not mid-example"
        assert prompt[-len(suffix) :] == suffix, "the cut is inside the abstract"
        assert len(prompt) + len(target) <= seq_len and len(prompt) > len(empty)  # some abstract left
        abstract = tok.decode(prompt).split(rouge.INSTRUCTION)[1].split(tok.eos_token)[0]
        assert ex["source"].startswith(abstract) and len(abstract) < len(ex["source"])  # its beginning, cut
    with pytest.raises(ValueError, match="no ACLSum summary fits"):
        aclsum_blocks(tok, 64)


def test_steps_beyond_one_pass_over_the_data_are_refused_unless_allowed(tok):
    """40 default steps x 4 sequences = 160 > the 100 aclsum papers: refused, with the epochs it would take; allowed,
    the epochs are recorded. The wiki path goes through the same check."""
    with pytest.raises(ValueError, match=r"100 training sequences .* need 160 \(1\.60 epochs\): take at most 25 "):
        train_blocks(tok, FinetuneArgs(dataset="aclsum"))
    assert train_blocks(tok, FinetuneArgs(dataset="aclsum", allow_repeat=True)).info["epochs"] == 1.6
    assert train_blocks(tok, FinetuneArgs(dataset="aclsum", steps=25)).info["epochs"] == 1.0
    wiki = train_blocks(tok, FinetuneArgs(steps=2, batch_size=3, grad_accum=2, seq_len=64), num_processes=2)
    assert wiki.input_ids.shape == (24, 64) and wiki.info["epochs"] == 1.0
    assert (wiki.labels == wiki.input_ids).all() and wiki.attention_mask.all()  # plain causal LM, every token
    with pytest.raises(ValueError, match="allow_repeat must be a bool"):
        FinetuneArgs(allow_repeat=1)


def test_trainer_gets_the_labels_and_records_the_epochs(tok, tiny_checkpoint):
    """What reaches the model under Trainer: the aclsum labels (-100 on prompt and padding) and attention mask; the
    metrics say how many passes over the data ran and count the tokens without the padding."""
    from transformers import AutoModelForCausalLM

    full = aclsum_blocks(tok, 256)
    small = TrainBlocks(full.input_ids[:4], full.labels[:4], full.attention_mask[:4], {"dataset": "aclsum"})
    args = FinetuneArgs(steps=3, batch_size=2, seq_len=256, logging_steps=1, gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    pm, _ = add_lora(model, None, "zero", args, prepare=False)
    with pytest.raises(ValueError, match=r"1\.50 epochs"):
        train(pm, tok, args, progress=False, blocks=small)
    seen = []
    pm.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["labels"].clone(), kw["attention_mask"].clone())),
                                 with_kwargs=True)  # fmt: skip
    args.allow_repeat = True
    metrics = train(pm, tok, args, progress=False, blocks=small)
    assert metrics["steps"] == 3 and metrics["epochs"] == 1.5 and metrics["data"]["epochs"] == 1.5
    assert len(seen) == 3
    assert metrics["tokens_seen"] == sum(int(m.sum()) for _, m in seen) < 3 * 2 * 256  # real tokens, not padding
    rows = {tuple(r.tolist()): i for i, r in enumerate(small.labels)}
    for labels, mask in seen:
        for lab, m in zip(labels, mask):
            i = rows[tuple(lab.tolist())]  # a whole sequence of the data, its labels untouched
            assert (m == small.attention_mask[i]).all() and (lab[: int(m.sum())] == -100).any()
