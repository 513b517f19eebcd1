# All set-up happens here: `make demo` and `make test` create or reuse .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokgen-installed
# PyPI's torchvision/torchaudio are CUDA builds: pair them with PyPI's CUDA torch (it runs on CPU too).
# On a machine with its own torch, override: make test TORCH_PACKAGES="torch torchvision torchaudio"
TORCH_PACKAGES ?= "torch==2.13.0,!=2.13.0+cpu" torchvision==0.28.0 torchaudio==2.11.0 torchcodec
DEMO_OUT ?= demo_out
DATASET ?= digits

.PHONY: demo test test-slow bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PACKAGES)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokgen demo --dataset $(DATASET) --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
