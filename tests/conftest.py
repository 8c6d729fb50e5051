import pytest
import torch

import bitsandbytes_lowra  # noqa: F401  (registers the lowra:: ops)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def devices():
    """cpu always; cuda (marked) where present."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(scope="session")
def smollm2_weights():
    import os

    from bitsandbytes_lowra import data

    try:
        return data.smollm2_linear_weights()
    except data.MissingDataError as e:
        # The GPU machine cannot carry the 98 MB GGUF (shared/gpu-machine.md). In CI the package is installed by
        # `make test`, so a missing model there is a failure, never a skip.
        if os.environ.get("CI"):
            raise
        pytest.skip(f"real SmolLM2 weights unavailable here: {e}")
