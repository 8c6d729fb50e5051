"""Benchmarks of bitsandbytes-lowra against bitsandbytes and dense bf16 (`python -m bitsandbytes_lowra.bench`)."""
