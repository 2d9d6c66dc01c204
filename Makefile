# The two commands of the README: `make demo` and `make test`.
# Each creates the virtual environment and installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test processes; each takes whole files (their module fixtures stay shared). 0: one
# process, as against a shared broker (MQTT_TEST_BROKER), where files could collide.
PYTEST_WORKERS ?= 2

.PHONY: demo test check venv
venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Runs the whole system on embedded defaults until Ctrl-C.
demo: $(STAMP)
	$(VENV)/bin/dispatch-bridge demo

# Lint, type-check, then every test (unit, integration, end-to-end).
test: $(STAMP)
	bash .ci/ensure-system-packages
	$(VENV)/bin/ruff check bridge actor_sdk testkit tests bench
	$(VENV)/bin/ruff format --check bridge actor_sdk testkit tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile
