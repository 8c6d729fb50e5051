"""Benchmarks (not tests): `python -m bitsandbytes_lowra.bench` runs the kernel comparisons against bitsandbytes and
bf16 in one process; `python -m bitsandbytes_lowra.bench.<name>` runs one (assigner, learner, kernels, e2e, cpu,
...)."""
