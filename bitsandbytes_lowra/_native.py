"""Find and load the native library (csrc/) with ctypes; one clear error when it is missing.

Two builds exist: libbitsandbytes_lowra_cuda.so (CPU + CUDA kernels, built when nvcc was found) and
libbitsandbytes_lowra_cpu.so (CPU kernels only). The CUDA one is preferred when torch sees a GPU.
`LOWRA_LIBRARY=/path/to/lib.so` overrides the search.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path

import torch

_DIR = Path(__file__).resolve().parent
STATUS = {
    0: "ok",
    1: "invalid argument (null pointer, sizes, blocksize or a pointer off its element's alignment)",
    2: "a row's bits is not 1, 2 or 4",
    3: "row offsets inconsistent with bits or the packed buffer (corrupt or mismatched state)",
    4: "CUDA error",
    5: "the native library was built without CUDA",
    6: "out of host memory (a scratch allocation failed)",
    7: "internal error (an unexpected C++ exception in the native library: a bug)",
}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ABI_VERSION = 3  # csrc/lowra.h LOWRA_ABI_VERSION: the entry points' arguments as _declare states them
# Candidates passed over by load(), with why (a stale build of the preferred CUDA library, say): the reference
# fallback's warning names them.
passed_over: list[str] = []


class NativeLibraryError(RuntimeError):
    """The native library is missing, lacks CUDA, or a kernel reported an error."""

    tried: list[str] = []  # load(): each candidate and why it was not used


def _candidates() -> list[Path]:
    override = os.environ.get("LOWRA_LIBRARY")
    if override:
        return [Path(override)]
    names = ["libbitsandbytes_lowra_cpu.so"]
    if torch.cuda.is_available():
        names.insert(0, "libbitsandbytes_lowra_cuda.so")
    return [_DIR / n for n in names]


class NestedAbsmax(ctypes.Structure):
    """lowra.h LowraNestedAbsmax: double-quantized block scales, decoded by the CUDA kernels where they read them."""

    _fields_ = [("q", ctypes.c_void_p), ("nested", ctypes.c_void_p), ("code", ctypes.c_void_p),
                ("offset", ctypes.c_void_p), ("blocksize", ctypes.c_int64)]


def _abi_version(lib: ctypes.CDLL) -> int:
    """csrc/lowra.h LOWRA_ABI_VERSION of a loaded library (1: built before the ABI was versioned)."""
    fn = getattr(lib, "lowra_abi_version", None)
    if fn is None:
        return 1
    fn.restype, fn.argtypes = ctypes.c_int, []
    return int(fn())


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, nested = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(NestedAbsmax)
    quant = [p, i32, i64, i64, i64, p, p, p, p, i64, p]
    dequant = [p, i64, p, nested, p, p, p, i64, i64, i64, i32, p]
    for name, args in (
        ("lowra_quantize_cpu", quant),
        ("lowra_dequantize_cpu", dequant),
        ("lowra_quantize_cuda", quant + [p]),
        ("lowra_dequantize_cuda", dequant + [p]),
        ("lowra_matmul_cpu", [p, i32, i64, p, i64, p, nested, p, p, p, i64, i64, i64, p, p]),
        ("lowra_matmul_cuda", [p, i32, i64, p, i64, p, nested, p, p, p, i64, i64, i64, p, p, p, p, p, i64, p]),
        ("lowra_matmul_cuda_workspace_size", [i32, i64, i64, i64, i64, p, i32]),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i64 if name.endswith("workspace_size") else i32
    lib.lowra_version.restype = ctypes.c_char_p
    lib.lowra_last_cuda_error.restype = ctypes.c_char_p
    lib.lowra_has_cuda.restype = i32


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    tried = []
    for path in _candidates():
        if not path.is_file():
            tried.append(f"{path} (missing)")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        abi = _abi_version(lib)
        if abi != ABI_VERSION:
            tried.append(f"{path} (native ABI {abi}, this package needs {ABI_VERSION}: a stale build; rebuild it)")
            continue
        _declare(lib)
        passed_over[:] = [t for t in tried if not t.endswith("(missing)")]
        return lib
    error = NativeLibraryError(
        "bitsandbytes-lowra's native library could not be loaded; tried: " + "; ".join(tried)
        + ". Build it with `pip install .` or `make build` (needs CMake and a C++ compiler; nvcc for CUDA)."
    )
    error.tried = tried
    raise error


def available() -> bool:
    try:
        load()
        return True
    except NativeLibraryError:
        return False


def has_cuda() -> bool:
    return available() and bool(load().lowra_has_cuda())


def check(status: int, what: str) -> None:
    if status == 0:
        return
    msg = f"{what} failed: {STATUS.get(status, f'status {status}')}"
    if status == 4:
        msg += f" ({load().lowra_last_cuda_error().decode()})"
    raise NativeLibraryError(msg)


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())
