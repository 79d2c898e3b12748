# The two commands: `make train` and `make test`. Each bootstraps .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests run on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before jax loads).
PYTEST_ARGS ?= -n 2 --dist loadfile -m "not slow and not tpu_aot"

.PHONY: venv train test test-all bench clean

venv: $(STAMP)

# Reinstalls only when pyproject.toml or constraints.txt changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,hf]"
	touch $(STAMP)

train: venv
	$(VENV)/bin/jaxlm train quickstart $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything, including slow tests (TPU AOT tests skip themselves without libtpu).
test-all: venv
	$(PY) -m pytest -n 2 --dist loadfile

bench: venv
	$(PY) -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) runs
