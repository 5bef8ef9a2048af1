# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo bench check-policies clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m extproc demo --policy policies/demo.yaml

bench: install
	$(PY) -m bench.run

check-policies: install
	$(VENV)/bin/extproc policy check policies/*.yaml

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
