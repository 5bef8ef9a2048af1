# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test unit lint demo bench check-policies clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# pytest-xdist: one worker per core plus one, since about a third of the suite waits (paced
# streams, sampler intervals, reservation TTLs) rather than computes; each test module runs whole
# on one worker, so a module's shared stack starts once. PYTEST_ARGS="-n 0" runs in one process.
XDIST := -n $(shell echo $$(( $$(nproc) + 1 ))) --dist loadscope
# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: every xdist worker collects
# the whole suite (pytest rewrites the asserts of each test module, ~5 s of CPU a worker when
# nothing is cached) and every test stack starts Python children; the caches land in the
# git-ignored __pycache__ directories.
PYTEST := PYTHONDONTWRITEBYTECODE= $(PY) -m pytest

test: install
	$(PYTEST) -q $(XDIST) $(PYTEST_ARGS)

# The fast tier: every test that starts no Envoy and no redis-server.
unit: install
	$(PYTEST) -q $(XDIST) -m "not integration" $(PYTEST_ARGS)

# ruff (rules in pyproject.toml) over the code, tests and benchmarks; mypy --strict over extproc/.
lint: install
	$(VENV)/bin/ruff check extproc tests bench
	$(VENV)/bin/mypy

demo: install
	$(PY) -m extproc demo --policy policies/demo.yaml

bench: install
	$(PY) -m bench.run

check-policies: install
	$(VENV)/bin/extproc policy check policies/*.yaml

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis .mypy_cache .ruff_cache
