"""Kernel implementations of the `lowra` ops: reference (pure PyTorch oracle), cpu and cuda (native library)."""
