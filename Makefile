# All set-up happens here: `make demo` and `make test` create or reuse .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokgen-installed
# PyPI's torchvision/torchaudio are CUDA builds: pair them with PyPI's CUDA torch (it runs on CPU too).
# On a machine with its own torch (a GPU box), use it instead of installing one:
#   make test VENV_FLAGS=--system-site-packages TORCH_PACKAGES=
# (the venv then sees the system's torch, torchvision and torchaudio, and pip keeps them: README, "Installing")
TORCH_PACKAGES ?= "torch==2.13.0,!=2.13.0+cpu" torchvision==0.28.0 torchaudio==2.11.0 torchcodec
VENV_FLAGS ?=
DEMO_OUT ?= demo_out
DATASET ?= digits

.PHONY: demo test test-slow bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH_PACKAGES)),$(PY) -m pip install -q $(TORCH_PACKAGES))
	$(PY) -m pip install -q -e ".[dev]"
	@# System tools for audio/video data (espeak-ng: spoken-digits; ffmpeg: torchcodec). Never fails the build.
	@command -v espeak-ng >/dev/null && command -v ffmpeg >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng ffmpeg >/dev/null; } || \
	  echo "warning: espeak-ng/ffmpeg missing (e.g. sudo apt-get install espeak-ng ffmpeg): the spoken-digits dataset needs espeak-ng; video/mp3 decoding falls back to PyAV/soundfile without ffmpeg"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokgen demo --dataset $(DATASET) --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/lint-imports  # the layers and no-cycles contracts in pyproject.toml
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
