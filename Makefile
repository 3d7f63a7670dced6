# Set-up and everyday commands. `make demo` and `make test` are all a new user needs.
PYTHON      ?= python3.11
VENV        ?= .venv
# CPU wheel here; GPU users: make install TORCH_SPEC='torch==2.13.0' PIP_TORCH_INDEX=...
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= dev,scrub,hf
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast test-gpu lint demo bench bench-gpu bench-overhead clean docs-config docs-check

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

# Regenerate docs/configuration.md from the schema (a test fails when it is stale).
docs-config: install
	$(PY) -c "import pathlib; from pretrain.config import reference_markdown as ref; p = pathlib.Path('docs/configuration.md'); b, e = '<!-- config-reference:begin -->', '<!-- config-reference:end -->'; t = p.read_text(); p.write_text(t.split(b)[0] + b + '\n' + ref() + e + t.split(e, 1)[1])"

# The docs say what the code does: links, commands, config keys, make targets, the reference.
docs-check: install
	$(PY) -m pytest -q tests/test_docs.py tests/pretrain/test_config.py::test_configuration_reference_is_current

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The CUDA paths (attention backends, compiled model, one-GPU trainer): on a GPU machine.
test-gpu: install
	$(PY) -m pytest -m gpu tests/pretrain/test_gpu.py $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pretrain data_pipelines tests

demo: install
	bash launch/demo.sh

bench: install
	bash launch/bench.sh

# The framework-overhead proxy on CPU: trainer step vs bare model step vs nanoGPT's (host syncs and
# dispatched operators per step, step time).
bench-overhead: install
	$(PY) -m pretrain.bench.overhead

# The whole one-GPU check (test-gpu, model step vs nanoGPT, 125M/1B/7B trainer benches and their
# memory plans beside the measured peaks), one table.
bench-gpu: install
	PYTHON=$(PY) bash launch/bench_gpu.sh

clean:
	rm -rf runs artifacts .pytest_cache
