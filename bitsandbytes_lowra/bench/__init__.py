"""Benchmarks, run as modules (``python -m bitsandbytes_lowra.bench.<name>``); not part of the test suite."""
