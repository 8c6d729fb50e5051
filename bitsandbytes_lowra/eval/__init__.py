"""Evaluation of any causal LM (dense, bitsandbytes NF4 or LowRA): perplexity, ACLSum ROUGE, the memory model.

docs/evaluation.md describes the protocols and records measured numbers. Submodules: `perplexity`, `rouge`,
`memory` (each runnable with `python -m`). The names below are loaded lazily so that importing the package (or
running a submodule with -m) does not import every submodule. The perplexity function itself lives in the submodule
of the same name (`from bitsandbytes_lowra.eval.perplexity import perplexity`): re-exporting it here would hide the
module.
"""

import importlib

_EXPORTS = {
    "format_table": "memory",
    "memory_breakdown": "memory",
    "memory_table": "memory",
    "rouge_eval": "rouge",
    "rouge_scores": "rouge",
    "train_chunks": "perplexity",
    "wiki_eval_tokens": "perplexity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
