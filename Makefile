# Set-up and everyday commands. `make demo` and `make test` are all a new user needs.
PYTHON      ?= python3.11
VENV        ?= .venv
# CPU wheel here; GPU users: make install TORCH_SPEC='torch==2.13.0' PIP_TORCH_INDEX=...
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= dev,scrub,hf
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast lint demo bench clean

install: $(STAMP)

# Re-install only when the dependency list changes: a second `make install` does nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pretrain data_pipelines tests

demo: install
	bash launch/demo.sh

bench: install
	bash launch/bench.sh

clean:
	rm -rf runs artifacts .pytest_cache
