# Everything runs from .venv; `make test` on a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := tflite,litert,camera,metrics,converter,dev

.PHONY: setup test lint fmt typecheck bench demo mosquitto clean pi-check fuzz

setup: $(STAMP) mosquitto

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the dependency lists change.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip check
	touch $@

mosquitto:
	@scripts/ensure-mosquitto.sh

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
	$(PY) -m pytest

# Not part of `make test`: coverage-guided fuzzing (atheris) of every decoder of hostile
# bytes, about 40 s per target; falls back to hypothesis with 20000 examples per target
# where atheris cannot be installed. FUZZ_ARGS="--seconds 120 command" to focus.
fuzz: $(STAMP)
	@$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt -e ".[fuzz]" \
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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
