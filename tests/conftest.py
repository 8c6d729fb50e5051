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
    from bitsandbytes_lowra import data

    return data.smollm2_linear_weights()
