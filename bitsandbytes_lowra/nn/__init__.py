"""torch.nn building blocks of bitsandbytes-lowra (cf. bitsandbytes.nn)."""

from .modules import LinearLowRA, ParamsLowRA

__all__ = ["LinearLowRA", "ParamsLowRA"]
