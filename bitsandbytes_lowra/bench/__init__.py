"""Benchmarks (not tests): `python -m bitsandbytes_lowra.bench` runs the kernel comparisons against bitsandbytes and
bf16 in one process; `python -m bitsandbytes_lowra.bench.<name>` runs one (assigner, learner, kernels, e2e, cpu,
...)."""

import inspect
import itertools


def describe(doc: str) -> str:
    """A module docstring's first prose paragraph, on one line, for argparse's description (a usage line in
    backticks that opens the docstring is skipped; indented example lines end the paragraph)."""
    doc = inspect.cleandoc(doc)
    for para in doc.split("\n\n"):
        lines = list(itertools.takewhile(lambda ln: ln.strip() and not ln.startswith(" "), para.splitlines()))
        if lines and not lines[0].startswith("`"):
            return " ".join(" ".join(ln.split()) for ln in lines)
    return doc.splitlines()[0]
