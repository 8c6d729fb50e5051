"""bitsandbytes-lowra: LoRA fine-tuning on 1-4-bit mixed-precision base weights (LowRA, arXiv 2502.08141)."""

import logging as _logging

# The first `import bitsandbytes` (below, through _ops) logs "Failed to load CPU gemm_4bit_forward from
# kernels-community" on CPUs with AVX512-BF16 unless the optional `kernels` package can fetch a hub kernel. LowRA
# layers never call that bitsandbytes kernel, yet the line opened every `lowra` command like a broken install (and
# came before `-q` could be parsed). Only that one message is dropped; the logger's other records pass.
_BNB_HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_bnb_hub_kernel_notice(record: _logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BNB_HUB_KERNEL_NOTICE)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_bnb_hub_kernel_notice)

from . import _ops  # noqa: E402, F401  (defines the lowra:: op schemas)
from .backends import reference as _reference  # noqa: E402, F401  (default kernels)
from .backends import native as _native_backend  # noqa: E402
from .format import LowRAFormatError  # noqa: E402

# Native kernels override the reference for cpu (and cuda) when the library is built; see _native.py.
NATIVE_DEVICES = _native_backend.register()

__version__ = "0.1.0"
__all__ = ["LowRAFormatError", "__version__"]

# The quantized layer (functional API, QuantStateLowRA, ParamsLowRA / LinearLowRA, module conversion).
from .functional import (  # noqa: E402
    QuantStateLowRA,
    dequantize_lowra,
    matmul_lowra,
    quantize_lowra,
    quantize_lowra_at_bits,
)
from .nn import LinearLowRA, ParamsLowRA  # noqa: E402
from .convert import convert_to_lowra, model_bits_report  # noqa: E402

__all__ += [
    "QuantStateLowRA",
    "quantize_lowra",
    "dequantize_lowra",
    "matmul_lowra",
    "quantize_lowra_at_bits",
    "ParamsLowRA",
    "LinearLowRA",
    "convert_to_lowra",
    "model_bits_report",
]

# `import bitsandbytes_lowra` registers the "lowra" quantization method with transformers (idempotent).
from .integrations import transformers as _transformers_integration  # noqa: E402
from .integrations.transformers import LowRAConfig, write_plan  # noqa: E402

_transformers_integration.register()
__all__ += ["LowRAConfig", "write_plan"]


# peft dispatches LinearLowRA to our LoRA layer as soon as peft is imported, before or after us.
from .integrations import install_peft_hook  # noqa: E402

install_peft_hook()
