# `make demo` and `make test` each build the virtual environment from nothing, then run.
# torch is installed first, pinned to the CPU build that lies on this machine's disk; override
# with e.g. `make TORCH="torch==2.5.1" test` on a GPU machine.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-integration docs bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ebft run --config configs/demo.yaml --overwrite

test: $(STAMP)
	$(VENV)/bin/pytest -q -rs tests
	$(VENV)/bin/pytest -v -rs --durations=5 -m integration tests

test-unit: $(STAMP)
	$(VENV)/bin/pytest -q tests

test-integration: $(STAMP)
	$(VENV)/bin/pytest -q -m integration tests

# the flag table in docs/cli.md, rewritten from the settings' declarations (tests/test_docs.py checks it)
docs: $(STAMP)
	$(PY) tools/flag_table.py

clean:
	rm -rf $(VENV) runs .pytest_cache
