"""Integrations with transformers (`integrations.transformers`: LowRAConfig and the "lowra" quantizer) and peft
(`integrations.peft`: the LoRA layer for LinearLowRA, loaded when peft is imported)."""


def install_peft_hook() -> None:
    """peft dispatches LinearLowRA to our LoRA layer (integrations/peft.py). That module loads as soon as peft is
    imported, before or after us, so `import bitsandbytes_lowra` alone never pays for importing peft."""
    import importlib.abc
    import sys
    import warnings

    def load():
        try:
            from . import peft as _peft_integration  # noqa: F401  (registers on import)
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
