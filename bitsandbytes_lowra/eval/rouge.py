"""Summarization quality (ROUGE-1/2/L) of any causal LM on ACLSum, by greedy generation.

Protocol (docs/evaluation.md):

- Examples: the first `n_examples` records of `data.aclsum(split)` in file order (test split by default).
- Input: the paper's abstract (`sentences["abstract"]`, whose sentences come space-tokenized, e.g. "MT ( Machine
  Translation ) ." ; we join them and undo the spaces around punctuation). The abstract is the one section a short
  summary can be written from; introduction and conclusion are long and would push a small model past its context.
- Reference: ACLSum's abstractive summary, its three aspects joined in order: challenge, approach, outcome.
- Prompt: an instruction asking for that three-part summary, wrapped in the tokenizer's chat template when it has one
  (SmolLM2 is an instruct model), else a plain "Abstract: ... Summary:" completion prompt.
- Decoding: greedy (do_sample=False), at most `max_new_tokens` new tokens, stop at EOS; special tokens are dropped.
  Prompts go `batch_size` at a time, left-padded (the attention mask hides the padding).
- Scoring: `rouge_score` F-measures for rouge1, rouge2, rougeL with the Porter stemmer, averaged over examples.
"""

from __future__ import annotations

import re
import time

import torch

from .. import data
from .perplexity import model_device

ASPECTS = ("challenge", "approach", "outcome")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
INSTRUCTION = (
    "Summarize the following scientific paper abstract in three sentences: the challenge it addresses, "
    "the approach it proposes, and the outcome.\n\n"
)


def detokenize(text: str) -> str:
    """Undo ACLSum's spaces around punctuation: 'terms ( MT ) , e.g .' -> 'terms (MT), e.g.'."""
    text = re.sub(r"\s+([.,;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{])\s+", r"\1", text)
    text = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def aclsum_examples(split: str = "test", n_examples: int | None = 20) -> list[dict]:
    """[{id, title, source, reference}] for the first n_examples records (None = all)."""
    if n_examples is not None and (not isinstance(n_examples, int) or n_examples < 1):
        raise ValueError(f"n_examples must be None or a positive integer, got {n_examples!r}")
    records = data.aclsum(split)
    if n_examples is not None:
        records = records[:n_examples]
    out = []
    for r in records:
        missing = [a for a in ASPECTS if not r.get("summary", {}).get(a)]
        if missing or not r.get("sentences", {}).get("abstract"):
            raise ValueError(f"ACLSum record {r.get('id')!r} lacks {missing or ['abstract']}")
        out.append(
            {
                "id": r["id"],
                "title": r.get("title", ""),
                "source": detokenize(" ".join(r["sentences"]["abstract"])),
                "reference": " ".join(r["summary"][a].strip() for a in ASPECTS),
            }
        )
    return out


def build_prompt(tokenizer, source: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": INSTRUCTION + source}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return INSTRUCTION + "Abstract: " + source + "\n\nSummary:"


def adds_special_tokens(tokenizer) -> bool:
    """Whether prompts are tokenized with the tokenizer's special tokens: not under a chat template, which holds any
    the model expects already."""
    return not getattr(tokenizer, "chat_template", None)


def prompt_ids(tokenizer, source: str) -> list[int]:
    """The prompt's token ids as generation sees them (fine-tuning on aclsum trains on exactly these)."""
    return tokenizer(build_prompt(tokenizer, source), add_special_tokens=adds_special_tokens(tokenizer))["input_ids"]


@torch.no_grad()
def generate_summaries(
    model, tokenizer, sources: list[str], max_new_tokens: int = 128, batch_size: int = 4
) -> list[str]:
    """Greedy summaries, `batch_size` prompts at a time, left-padded so every prompt ends where generation starts."""
    from transformers import GenerationConfig

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; cannot batch or stop generation")
    # An explicit GenerationConfig so the checkpoint's own sampling defaults cannot leak in.
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad
    )
    add_special = adds_special_tokens(tokenizer)
    device = model_device(model)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for start in range(0, len(sources), batch_size):
            prompts = [build_prompt(tokenizer, s) for s in sources[start : start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
            enc = {k: v.to(device) for k, v in enc.items()}
            ids = model.generate(**enc, generation_config=gen)
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out


def rouge_scores(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE F-measures in [0, 1] plus the per-example scores, with the Porter stemmer."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # optional dependency (the `data` extra)
        raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from e
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_example = [
        {k: s.fmeasure for k, s in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)
    ]
    means = {k: sum(p[k] for p in per_example) / len(per_example) for k in ROUGE_TYPES}
    return {**means, "per_example": per_example}


def rouge_eval(
    model,
    tokenizer,
    n_examples: int | None = 20,
    split: str = "test",
    max_new_tokens: int = 128,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Generate summaries for the first n_examples ACLSum records and score them.

    Returns {rouge1, rouge2, rougeL, n_examples, split, seconds, examples: [{id, prediction, reference, rouge1, ...}]}.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    examples = aclsum_examples(split, n_examples)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    predictions: list[str] = []
    try:
        chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="aclsum generation", unit="batch")
        for chunk in chunks:
            sources = [e["source"] for e in chunk]
            predictions += generate_summaries(model, tokenizer, sources, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    scores = rouge_scores(predictions, [ex["reference"] for ex in examples])
    return {
        **{k: scores[k] for k in ROUGE_TYPES},
        "n_examples": len(examples),
        "split": split,
        "seconds": seconds,
        "examples": [
            {"id": ex["id"], "prediction": pred, "reference": ex["reference"], **per}
            for ex, pred, per in zip(examples, predictions, scores["per_example"])
        ],
    }


def main(argv=None) -> None:
    """`python -m bitsandbytes_lowra.eval.rouge`: ACLSum ROUGE of fp32 SmolLM2-135M."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--n-examples", type=int, default=20)
    p.add_argument("--split", default="test")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--show", type=int, default=2, help="also print this many predictions as text")
    args = p.parse_args(argv)
    model, tokenizer = data.load_smollm2()
    result = rouge_eval(
        model, tokenizer, args.n_examples, args.split, args.max_new_tokens, args.batch_size, progress=False
    )
    print(json.dumps(result, indent=2))  # every prediction, reference and score: the numbers can be audited
    for ex in result["examples"][: args.show]:
        print(f"--- {ex['id']}\nPRED: {ex['prediction']}\nREF:  {ex['reference']}")


if __name__ == "__main__":
    main()
