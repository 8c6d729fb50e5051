import contextlib

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


# Settings of the fast CUDA quantize, (bytes of weights per lane and task, tasks per warp run): the automatic choices
# take 128-byte tasks and runs of more than one task only on layers larger than the tests', so the tests force them.
# Each width automatic; runs of 3 tasks (they straddle rows and segments); the even split over a resident grid.
QUANTIZE_TUNINGS = ((64, 0), (128, 0), (64, 3), (128, -1))


@contextlib.contextmanager
def quantize_tuning(task_bytes: int, run: int = 0):
    """The fast CUDA quantize with these knobs (native.set_quantize_tuning) within the block; automatic after."""
    from bitsandbytes_lowra.backends import native

    native.set_quantize_tuning(task_bytes, run)
    try:
        yield
    finally:
        native.set_quantize_tuning()


# The streamed dequantize's knobs (run, pdl), each away from what the automatic choice takes at the tests' sizes (one
# task per warp; PDL only past one resident wave): an even split over a resident grid, with and without PDL, and runs
# of 3 tasks (they straddle rows and segments) as a programmatic dependent. Outputs are bit-identical at every one.
DEQUANTIZE_TUNINGS = ((-1, -1), (-1, 1), (3, 1), (1, 1))


@contextlib.contextmanager
def dequantize_tuning(run: int, pdl: int = 0):
    """The streamed CUDA dequantize with these knobs (native.set_dequantize_tuning) within the block; automatic
    after."""
    from bitsandbytes_lowra.backends import native

    native.set_dequantize_tuning(run, pdl)
    try:
        yield
    finally:
        native.set_dequantize_tuning()


@contextlib.contextmanager
def matmul_tuning(**knobs):
    """The fused CUDA matmul with these knobs (native.set_matmul_tuning keywords) within the block; automatic after."""
    from bitsandbytes_lowra.backends import native

    native.set_matmul_tuning(**knobs)
    try:
        yield
    finally:
        native.set_matmul_tuning()


def assert_sums_close(got: torch.Tensor, want: torch.Tensor, A: torch.Tensor, W: torch.Tensor, bias=None) -> None:
    """`got` and `want` are two float32 evaluations of A @ W.T (+ bias) that sum in different orders (a fused CPU
    kernel, a GEMM; SIMD widths differ between CPUs). Rounding errors add up like a random walk: each sum is within a
    few sqrt(K) eps sum|a w| of the exact one (K terms), so the two may differ by 4 sqrt(K) eps (|A| @ |W|.T + |bias|).
    A fixed tolerance fails where an output cancels to near 0; the worst-case bound, K eps, would pass a kernel that
    sums in float16."""
    A, W = A.detach().float(), W.detach().float()
    scale = A.abs() @ W.abs().T + (0 if bias is None else bias.detach().float().abs())
    bound = 4 * A.shape[-1] ** 0.5 * torch.finfo(torch.float32).eps * scale
    diff = (got.detach().float() - want.detach().float()).abs()
    assert torch.all(diff <= bound), f"differs by {float((diff / bound).max()):.2f}x the float32 summation bound"


def mixed_bits(rows: int, seed: int = 0) -> torch.Tensor:
    """A seeded random mix of 1/2/4-bit rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([1, 2, 4], dtype=torch.uint8)[torch.randint(0, 3, (rows,), generator=g)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, one_thread):
    """A 2-layer Llama with random weights and SmolLM2's real tokenizer: quantizes and fine-tunes in seconds."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitsandbytes_lowra import data

    tok = AutoTokenizer.from_pretrained(data.smollm2_checkpoint())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: one thread is as fast, and on a loaded 2-core machine OpenMP threads spin-waiting on each
    other made LAPACK's SVD 10-50x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def learn_calls(monkeypatch):
    """Records the shape of every learner.learn_layer call (to see whether planning re-learned)."""
    from bitsandbytes_lowra import learner

    calls = []
    real = learner.learn_layer

    def counting(W, *args, **kwargs):
        calls.append(tuple(W.shape))
        return real(W, *args, **kwargs)

    monkeypatch.setattr(learner, "learn_layer", counting)
    return calls
