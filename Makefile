# The two commands of the README: `make test` and `make bench` (each sets up .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on the project's machines; an existing torch (a GPU machine's) is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup versions test test-interpret bench lint clean

$(VENV)/.done: pyproject.toml setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

setup: $(VENV)/.done

# The resolved versions of torch, triton, transformers, accelerate, lightning, kernels, ... and the
# file `import kernels` loads (CI prints them first: a dependency that moved shows in the log).
versions: setup
	$(PY) -m bench versions

# One pytest-xdist worker per core; the multi-process tests share one worker (xdist_group).
test: setup
	$(PY) -m pytest -q -n auto --dist loadgroup

test-interpret: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m interpret

bench: setup
	$(PY) -m bench all

lint: setup
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
