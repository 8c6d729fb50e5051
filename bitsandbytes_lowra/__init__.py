"""bitsandbytes-lowra: LoRA fine-tuning on 1-4-bit mixed-precision base weights (LowRA, arXiv 2502.08141)."""

from . import _ops  # noqa: F401  (defines the lowra:: op schemas)
from .backends import reference as _reference  # noqa: F401  (default kernels)
from .format import LowRAFormatError

__version__ = "0.1.0"
__all__ = ["LowRAFormatError", "__version__"]
