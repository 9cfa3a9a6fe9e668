# Everything runs from .venv; `make test` on a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := tflite,litert,camera,metrics,audio,converter,server,dev

CONSTRAINTS := constraints/workstation.txt
# The PyTorch converter in a venv of its own (see constraints/torch.txt for why).
TORCH_VENV  := .venv-torch
TORCH_PY    := $(TORCH_VENV)/bin/python
TORCH_STAMP := $(TORCH_VENV)/.installed
MODEL_CACHE ?= $(HOME)/.cache/edge-deploy

.PHONY: setup setup-torch test lint fmt typecheck bench demo mosquitto console-tools chromium portaudio asyncapi clean pi-check install-check fuzz test-pythons

# Playwright (dev extra) drives the system's Chromium in the dashboard's browser tests;
# it must never download browsers of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

setup: $(STAMP) mosquitto console-tools chromium portaudio asyncapi setup-torch

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the dependency lists change.
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PY) -m pip check
	touch $@

# edge-convert with PyTorch sources (.venv-torch/bin/edge-convert); part of setup so that
# `make test` converts real PyTorch models (tests/test_convert_torch.py).
setup-torch: $(TORCH_STAMP)

$(TORCH_STAMP): pyproject.toml constraints/torch.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_PY) -m pip install -q --upgrade pip
	$(TORCH_PY) -m pip install -q -c constraints/torch.txt -e ".[converter,torch]"
	$(TORCH_PY) -m pip check
	touch $@

mosquitto:
	@scripts/ensure-mosquitto.sh

# mosquitto_pub, mosquitto_sub and jq for the example shell console (docs/examples/).
console-tools:
	@scripts/ensure-console-tools.sh

# Debian's Chromium for the dashboard's browser tests (EDGE_TEST_CHROMIUM names another).
chromium:
	@scripts/ensure-chromium.sh

# Debian's PortAudio for the microphone source (extra audio: sounddevice loads it).
portaudio:
	@scripts/ensure-portaudio.sh

# The AsyncAPI parser (Node) that checks docs/asyncapi.yaml, from tools/asyncapi's lockfile.
asyncapi:
	@scripts/ensure-asyncapi.sh

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

fmt: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	EDGE_REQUIRE_TORCH=1 $(PY) -m pytest

# Not part of `make test`: the agent's tests on Python 3.10 (JetPack 6) and 3.13 (Pi OS
# Trixie, numpy 2) in device venvs (.venv-py310, .venv-py313: litert,camera,metrics,audio, no
# TensorFlow, no tflite-runtime), with the models the tests build with TensorFlow made
# first here in .venv (tests/prebuilt_models.py, cached under $(MODEL_CACHE)). Left out
# there: tests/test_converter_*.py and tests marked `workstation`. Exits 77 when a Python
# is missing. See scripts/test-pythons.sh and docs/device-check.md.
test-pythons: setup
	@models=$$(PYTHONPATH=$(CURDIR) $(PY) -m tests.prebuilt_models $(MODEL_CACHE) 2>.prebuilt-models.log) \
		|| { cat .prebuilt-models.log; exit 1; }; rm -f .prebuilt-models.log; \
		echo "prebuilt models: $$models"; EDGE_TEST_MODELS=$$models scripts/test-pythons.sh

# Not part of `make test`: coverage-guided fuzzing (atheris) of every decoder of hostile
# bytes, about 40 s per target; falls back to hypothesis with 20000 examples per target
# where atheris cannot be installed. FUZZ_ARGS="--seconds 120 command" to focus.
fuzz: $(STAMP)
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[fuzz]" \
		|| echo "atheris cannot be installed here: using hypothesis"
	PYTHONPATH=$(CURDIR) $(PY) -m tests.fuzz.run $(FUZZ_ARGS)

# The whole loop on this machine: convert, broker, agent, deploy, hot-swap, refusal.
demo: setup
	$(PY) scripts/demo.py

bench: setup
	@for b in $$(ls benchmarks/*.py | xargs -n1 basename | sed 's/\.py$$//' | grep -v '^_'); do \
		echo "== $$b"; $(PY) -m benchmarks.$$b --quick --json || exit 1; done

# Not part of `make test`: the agent on an emulated Raspberry Pi OS (Debian arm64) userland,
# bookworm by default, PI_CHECK_ARGS="--suite trixie" for Trixie.
# Needs root; exits 77 when the machine cannot emulate arm64. See docs/device-check.md.
pi-check: $(STAMP) mosquitto
	PYTHONPATH=$(CURDIR) $(PY) tests/device/pi_check.py $(PI_CHECK_ARGS)

# Not part of `make test`: systemd/install.sh run for real in a fresh copy of pi-check's
# rootfs (systemctl stubbed), then the unit, user, venv, config and a second run checked.
# Needs root; exits 77 when the machine cannot emulate arm64. See docs/device-check.md.
install-check: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) tests/device/install_check.py $(INSTALL_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(TORCH_VENV) .venv-py310 .venv-py313 .pytest_cache .mypy_cache .ruff_cache tools/asyncapi/node_modules
