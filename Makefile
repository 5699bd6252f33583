# MM-Rec developer commands. Every target sets up .venv first (CPU PyTorch).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Everything the tests exercise (a missing optional package skips its tests) and what the default
# recipes log to (TensorBoard). lm-eval is the largest (~30 packages, ~1 min to install); its tests run offline.
# wandb (~15 packages): its test runs offline (WANDB_MODE=offline) in ~3 s.
# torchao (quant) is one 3.4 MB wheel without dependencies; its tests take ~15 s.
EXTRAS ?= dev,bpe,plot,jax,tensorboard,hf,eval,data,wandb,quant

.PHONY: setup demo test test-gpu lint bench-cpu clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

# Train the tiny preset on the embedded corpus (Python's own standard library), then sample.
demo: setup
	$(VENV)/bin/mmrec train

# The CPU test suite (Triton kernels run through TRITON_INTERPRET=1; GPU tests are skipped).
test: setup
	$(PY) -m pytest -q

# On a CUDA machine: the GPU-marked tests only.
test-gpu:
	python3 -m pytest -q -m gpu tests

lint: setup
	$(VENV)/bin/ruff check mm_rec tests benchmarks

bench-cpu: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
