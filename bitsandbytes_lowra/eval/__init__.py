"""Evaluation of any causal LM (dense, bitsandbytes NF4 or LowRA): perplexity, ACLSum ROUGE, the memory model.

docs/evaluation.md describes the protocols and records measured numbers. The perplexity function lives in the
submodule of the same name (`from bitsandbytes_lowra.eval.perplexity import perplexity`); it is not re-exported here
so that `bitsandbytes_lowra.eval.perplexity` always means the module.
"""

from .memory import format_table, memory_breakdown, memory_table
from .perplexity import train_chunks, wiki_eval_tokens
from .rouge import rouge_eval, rouge_scores

__all__ = [
    "format_table",
    "memory_breakdown",
    "memory_table",
    "rouge_eval",
    "rouge_scores",
    "train_chunks",
    "wiki_eval_tokens",
]
