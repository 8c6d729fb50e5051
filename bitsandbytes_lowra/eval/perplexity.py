"""Perplexity of any causal LM on the held-out Wikipedia leads, plus training blocks from the train split.

Protocol (fixed so numbers are comparable across runs, models and quantizers; docs/evaluation.md):

- Text: the eval split of `data.wiki_leads` (split by a hash of the title), each lead tokenized without special
  tokens and followed by the tokenizer's EOS token, all concatenated in the split's (sorted-title) order.
- The stream is cut to its first `max_tokens` tokens (DEFAULT_MAX_TOKENS, chosen so SmolLM2-135M takes < 60 s on
  2 CPU cores; `max_tokens=None` uses the whole split, ~101k tokens); the result says so (available_tokens,
  input_tokens, truncated).
- Windows of `context` tokens. With the default `stride=None` (= context) they do not overlap: every token is scored
  once except the first of each window, which has no context (each window scores context - 1 tokens; a final short
  window is scored too). With `stride < context` windows overlap and each scores only its tokens not scored before
  (the usual sliding-window evaluation), so more tokens have long context, at more compute.
- The model runs in eval mode under no_grad on its own device; logits are upcast to float32 for the log-softmax and
  the token NLLs are summed in float64. ppl = exp(total NLL / scored tokens).
- Text only (`ppl_text`): the same, without the targets that are the separator (EOS) and the first target after each
  separator (a lead's first token, which has no in-lead context): what is left is the leads' own text.
- Spread (`nll_se`, `nll_text_se`): standard error of the mean NLL with the leads as clusters (tokens of one lead are
  correlated; leads are nearly independent), without a separator: with the windows as clusters.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import data

# 64 windows of 512 tokens: SmolLM2-135M fp32 evaluates this in ~45 s on 2 CPU cores (docs/evaluation.md).
DEFAULT_MAX_TOKENS = 32768
DEFAULT_CONTEXT = 512


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; it is needed to separate the Wikipedia leads")
    return int(eos)


def _concat_leads(tokenizer, leads: list[str], max_tokens: int | None) -> torch.Tensor:
    """Tokenize leads one batch at a time, each followed by EOS, stopping once max_tokens are collected."""
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    step = 256  # leads per tokenizer call: fast batched tokenization without tokenizing the whole split for a prefix
    for start in range(0, len(leads), step):
        for seq in tokenizer(leads[start : start + step], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def _check_max_tokens(max_tokens, minimum: int = 2) -> None:
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < minimum):
        raise ValueError(f"max_tokens must be None or an integer >= {minimum}, got {max_tokens!r}")


def wiki_eval_tokens(tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The held-out Wikipedia leads as one LongTensor token stream: lead_1 EOS lead_2 EOS ... (first max_tokens)."""
    _check_max_tokens(max_tokens)
    return _concat_leads(tokenizer, data.wiki_leads("eval"), max_tokens)


def eval_slices(tokenizer, n_slices: int, slice_tokens: int | None = None) -> list[dict]:
    """`n_slices` disjoint slices of the eval stream spread evenly over the whole split (it is in title order, so each
    covers its own alphabetic range): slice k starts at the first lead that starts at or after k/n_slices of the
    stream and takes `slice_tokens` tokens (default: all up to the next slice; never past it).

    Each slice: {"index", "start" (stream position), "tokens" (LongTensor), "first_lead" (index in the split),
    "lead" (its first 40 characters)}. Evaluate one with perplexity(model, s["tokens"], max_tokens=None,
    separator=tokenizer.eos_token_id)."""
    if isinstance(n_slices, bool) or not isinstance(n_slices, int) or n_slices < 1:
        raise ValueError(f"n_slices must be a positive integer, got {n_slices!r}")
    _check_max_tokens(slice_tokens)
    stream = wiki_eval_tokens(tokenizer)
    n = stream.numel()
    if slice_tokens is not None and slice_tokens * n_slices > n:
        raise ValueError(f"{n_slices} slices of {slice_tokens} tokens do not fit the eval split's {n} tokens: at most "
                         f"{n // n_slices} tokens each")  # fmt: skip
    lead_starts = torch.cat([torch.zeros(1, dtype=torch.long), (stream == _eos_id(tokenizer)).nonzero().flatten() + 1])
    lead_starts = lead_starts[lead_starts < n]
    idx = torch.searchsorted(lead_starts, torch.tensor([k * n // n_slices for k in range(n_slices)]))
    if int(idx[-1]) >= lead_starts.numel() or len(set(idx.tolist())) < n_slices:
        raise ValueError(f"the eval split's {lead_starts.numel()} leads cannot start {n_slices} slices: use fewer")
    starts = lead_starts[idx].tolist() + [n]
    leads = data.wiki_leads("eval")
    out = []
    for k in range(n_slices):
        end = starts[k + 1] if slice_tokens is None else min(starts[k] + slice_tokens, starts[k + 1])
        out.append({"index": k, "start": starts[k], "tokens": stream[starts[k] : end], "first_lead": int(idx[k]),
                    "lead": leads[int(idx[k])][:40]})  # fmt: skip
    return out


def train_chunks(tokenizer, context: int = DEFAULT_CONTEXT, max_chunks: int | None = None) -> torch.Tensor:
    """Training blocks [n, context] (LongTensor) cut without overlap from the train-split leads joined by EOS.

    The train split never shares a title with the eval split. The tail shorter than `context` is dropped.
    """
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2, got {context!r}")
    if max_chunks is not None and (not isinstance(max_chunks, int) or max_chunks < 1):
        raise ValueError(f"max_chunks must be None or a positive integer, got {max_chunks!r}")
    limit = None if max_chunks is None else max_chunks * context
    ids = _concat_leads(tokenizer, data.wiki_leads("train"), limit)
    n = ids.numel() // context
    if n == 0:
        raise ValueError(f"the train split has fewer than context={context} tokens")
    return ids[: n * context].view(n, context)


def _windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored): the window is tokens[begin:end], targets tokens[first_scored:end] are scored."""
    out = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)  # position begin has no context inside its window
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def _batches(windows, batch_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most batch_size at a time (no padding needed)."""
    batch: list[tuple[int, int, int]] = []
    for w in windows:
        if batch and (len(batch) == batch_size or (w[1] - w[0]) != (batch[0][1] - batch[0][0])):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters():
        return p.device
    raise ValueError("the model has no parameters, cannot tell its device")


@torch.no_grad()
def perplexity(
    model,
    tokenizer_or_tokens,
    context: int = DEFAULT_CONTEXT,
    stride: int | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    batch_size: int = 4,
    progress: bool = True,
    separator: int | None = None,
) -> dict:
    """Perplexity of a causal LM on the held-out Wikipedia leads (module docstring: the protocol).

    `tokenizer_or_tokens` is a tokenizer (the eval stream is built with `wiki_eval_tokens`) or a 1-D LongTensor of
    token ids to evaluate instead (cut to max_tokens as well). `separator`: the token that joins the leads (default:
    the tokenizer's EOS; with a tensor, None leaves the text-only numbers out). Returns a dict with ppl, nll (mean
    per scored token), total_nll, tokens (scored), available_tokens (in the given stream or the whole eval split),
    input_tokens (used), truncated, the text-only ppl_text, nll_text, total_nll_text, tokens_text and what they leave
    out (excluded), the standard errors nll_se, nll_text_se (se_clusters, clusters), windows, context, stride,
    seconds and device.
    """
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2, got {context!r}")
    stride = context if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(f"stride must be an integer in [1, context={context}], got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_max_tokens(max_tokens)

    if isinstance(tokenizer_or_tokens, torch.Tensor):
        tokens = tokenizer_or_tokens
        if tokens.dim() != 1 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a 1-D LongTensor, got {tokens.dtype} of shape {tuple(tokens.shape)}")
        available = tokens.numel()
    else:
        separator = _eos_id(tokenizer_or_tokens) if separator is None else separator
        tokens = wiki_eval_tokens(tokenizer_or_tokens)  # the whole split, to report its size: 0.35 s (prefix: 0.16)
        available = tokens.numel()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {tokens.numel()}")

    device = model_device(model)
    windows = _windows(tokens.numel(), context, stride)
    batches = list(_batches(windows, batch_size))
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    nlls, targets = [], []  # per scored target: its NLL and its position in the stream
    start = time.perf_counter()
    try:
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc=f"perplexity ({len(windows)} windows of {context})", unit="batch")
        for batch in it:
            ids = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device)
            out = model(input_ids=ids, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            for row, (b, e, first) in enumerate(batch):
                # logits[j] predicts token b + j + 1; score targets first .. e-1.
                lg = logits[row, first - b - 1 : e - b - 1].float()
                tgt = ids[row, first - b : e - b]
                nll = F.cross_entropy(lg, tgt, reduction="none").double().cpu()
                total_nll += nll.sum()
                nlls.append(nll)
                targets.append(torch.arange(first, e))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    nll, pos = torch.cat(nlls), torch.cat(targets)
    scored = nll.numel()
    mean = float(total_nll) / scored
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "total_nll": float(total_nll),
        "tokens": scored,
        "available_tokens": available,
        "input_tokens": int(tokens.numel()),
        "truncated": int(tokens.numel()) < available,
        **_text_and_spread(tokens, nll, pos, separator, windows),
        "windows": len(windows),
        "context": context,
        "stride": stride,
        "seconds": seconds,
        "device": str(device),
    }


def _text_and_spread(tokens, nll, pos, separator, windows) -> dict:
    """The text-only numbers (targets that are the separator, or the first after one, left out) and the clustered
    standard errors of the mean NLLs. Clusters: leads (a separator belongs to the lead it ends), else windows."""
    if separator is None:
        window = torch.searchsorted(torch.tensor([w[2] for w in windows]), pos, right=True) - 1
        return {"ppl_text": None, "nll_text": None, "total_nll_text": None, "tokens_text": None, "excluded": None,
                "nll_se": _cluster_se(nll, window), "nll_text_se": None, "se_clusters": "window",
                "clusters": len(windows)}  # fmt: skip
    is_sep = tokens == separator
    lead = torch.cumsum(is_sep.long(), 0) - is_sep.long()
    after = torch.zeros_like(is_sep)
    after[1:] = is_sep[:-1]
    sep, start = is_sep[pos], after[pos] & ~is_sep[pos]
    text = ~(sep | start)
    n_text = int(text.sum())
    total_text = float(nll[text].sum())
    mean_text = total_text / n_text if n_text else None
    return {
        "ppl_text": math.exp(mean_text) if n_text else None,
        "nll_text": mean_text,
        "total_nll_text": total_text,
        "tokens_text": n_text,
        "excluded": {"separator": {"tokens": int(sep.sum()), "total_nll": float(nll[sep].sum())},
                     "lead_start": {"tokens": int(start.sum()), "total_nll": float(nll[start].sum())}},  # fmt: skip
        "nll_se": _cluster_se(nll, lead[pos]),
        "nll_text_se": _cluster_se(nll[text], lead[pos][text]),
        "se_clusters": "lead",
        "clusters": len(torch.unique(lead[pos])),
    }


def _cluster_se(values: torch.Tensor, clusters: torch.Tensor) -> float | None:
    """Standard error of mean(values) with correlated clusters: the ratio estimator's linearization,
    sqrt(G/(G-1) * sum_g (S_g - mean * n_g)^2) / N over G clusters of sums S_g and sizes n_g. None below 2 clusters."""
    ids, inverse = torch.unique(clusters, return_inverse=True)
    g = ids.numel()
    if g < 2:
        return None
    sums = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, values.double())
    sizes = torch.zeros(g, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values, dtype=torch.float64))
    mean = sums.sum() / sizes.sum()
    return float(torch.sqrt(g / (g - 1) * ((sums - mean * sizes) ** 2).sum()) / sizes.sum())


def truncation_note(result: dict) -> str:
    """What a perplexity result left out of its stream, for printing beside it ("" when it used all of it)."""
    if not result.get("truncated"):
        return ""
    return f"truncated to the first {result['input_tokens']:,} of {result['available_tokens']:,} tokens"


def main(argv=None) -> None:
    """`python -m bitsandbytes_lowra.eval.perplexity`: the default protocol on fp32 SmolLM2-135M."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="0 = the whole eval split")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, tokenizer = data.load_smollm2()
    result = perplexity(
        model, tokenizer, args.context, args.stride, args.max_tokens or None, args.batch_size, progress=False
    )
    result["seconds_with_load"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
