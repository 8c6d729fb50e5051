"""bitsandbytes-lowra: LoRA fine-tuning on 1-4-bit mixed-precision base weights (LowRA, arXiv 2502.08141)."""

from . import _ops  # noqa: F401  (defines the lowra:: op schemas)
from .backends import reference as _reference  # noqa: F401  (default kernels)
from .backends import native as _native_backend
from .format import LowRAFormatError

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

def _load_peft_integration_with_peft() -> None:
    """peft dispatches LinearLowRA to our LoRA layer (integrations/peft.py). That module loads as soon as peft is
    imported, before or after us, so `import bitsandbytes_lowra` alone never pays for importing peft."""
    import importlib.abc
    import sys
    import warnings

    def load():
        try:
            from .integrations import peft as _peft_integration  # noqa: F401  (registers on import)
        except Exception as e:  # never break `import peft` because of us
            warnings.warn(f"bitsandbytes_lowra: peft integration not loaded ({type(e).__name__}: {e})")

    if "peft" in sys.modules:
        load()
        return

    class _AfterPeft(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "peft":
                return None
            for finder in sys.meta_path:  # the real spec; probes (find_spec without import) leave us in place
                spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
                if spec is not None:
                    break
            if spec is None or not hasattr(spec.loader, "exec_module"):
                return None
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                load()

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _AfterPeft())


_load_peft_integration_with_peft()
